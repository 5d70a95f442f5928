//! The extension backend's counters, registered into a Prometheus registry by the binary
//! ([`register`]).

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of a metric family.
type Labels = Vec<(&'static str, &'static str)>;

/// The extension backend's metrics.
#[derive(Debug, Default)]
pub struct ExtensionMetrics {
    /// Commands run, by `hook` (`pre_startup`, `post_startup`, `subnet_add`, `subnet_remove`) and
    /// `result` (`ok`, `failed`, `timed_out`). Nothing retries a failed command: this counter is
    /// how an operator finds one.
    pub commands: Family<Labels, Counter>,
}

impl ExtensionMetrics {
    /// Counts one command run.
    pub fn record(&self, hook: &'static str, result: &'static str) {
        self.commands
            .get_or_create(&vec![("hook", hook), ("result", result)])
            .inc();
    }
}

/// The process-wide instance.
pub fn metrics() -> &'static ExtensionMetrics {
    static M: OnceLock<ExtensionMetrics> = OnceLock::new();
    M.get_or_init(ExtensionMetrics::default)
}

/// Registers these metrics (call once per registry).
pub fn register(r: &mut Registry) {
    r.register(
        "flannel_extension_commands",
        "extension backend: commands run, by hook and result (ok, failed, timed_out)",
        metrics().commands.clone(),
    );
}
