//! The data plane's counters, registered into a Prometheus registry by the binary ([`register`]).

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a metric family.
type Labels = Vec<(&'static str, String)>;

/// The data plane's metrics.
#[derive(Debug, Default)]
pub struct DataplaneMetrics {
    /// Reconcile passes.
    pub reconcile_runs: Counter,
    /// Full reads of the kernel's entries (at start, at each resync, after news from the kernel or a
    /// failure; lease changes alone do not read).
    pub kernel_reads: Counter,
    /// Kernel entries added or deleted, by `op` (`add`, `delete`) and `kind` (`route`, `neigh`, `fdb`).
    pub changes: Family<Labels, Counter>,
    /// Netlink operations that failed.
    pub netlink_errors: Counter,
    /// Peer leases refused by the [`crate::LeasePolicy`], once per change.
    pub leases_refused: Counter,
    /// When the last pass that worked ended (seconds since the Unix epoch): from then on the kernel
    /// held every entry the leases asked for.
    pub last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl DataplaneMetrics {
    /// Records `n` kernel changes labelled as in a reconcile report (`add route`, `delete fdb`, …).
    pub fn record_change(&self, label: &str, n: u64) {
        let (op, kind) = label.split_once(' ').unwrap_or(("", ""));
        self.changes
            .get_or_create(&vec![("op", op.to_string()), ("kind", kind.to_string())])
            .inc_by(n);
    }
}

/// The process-wide instance.
pub fn metrics() -> &'static DataplaneMetrics {
    static M: OnceLock<DataplaneMetrics> = OnceLock::new();
    M.get_or_init(DataplaneMetrics::default)
}

/// Registers these metrics (call once per registry).
pub fn register(r: &mut Registry) {
    let m = metrics();
    r.register(
        "flannel_reconcile_runs",
        "Data plane reconcile passes",
        m.reconcile_runs.clone(),
    );
    r.register(
        "flannel_kernel_reads",
        "Full reads of the kernel's routes, neighbours and FDB entries by the reconcile loop",
        m.kernel_reads.clone(),
    );
    r.register(
        "flannel_dataplane_changes",
        "Kernel entries added or deleted by reconciliation (repairs included)",
        m.changes.clone(),
    );
    r.register(
        "flannel_netlink_errors",
        "Netlink operations that failed",
        m.netlink_errors.clone(),
    );
    r.register(
        "flannel_reconcile_last_success_timestamp_seconds",
        "When the last reconcile pass that worked ended (Unix time)",
        m.last_success.clone(),
    );
    r.register(
        "flannel_leases_refused",
        "Peer leases refused as unsafe (outside the network, overlapping the host's networks or own subnet), once per change",
        m.leases_refused.clone(),
    );
}
