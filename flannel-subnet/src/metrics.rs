//! The subnet managers' counters and the own-lease gauges, registered into a Prometheus registry by
//! the binary ([`register`]).

use std::sync::OnceLock;
use std::sync::atomic::AtomicI64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a metric family.
type Labels = Vec<(&'static str, String)>;

/// The subnet managers' metrics.
#[derive(Debug, Default)]
pub struct SubnetMetrics {
    /// Successful renewals of the own lease.
    pub lease_renewals: Counter,
    /// Failed renewals of the own lease.
    pub lease_renewal_errors: Counter,
    /// Lease events received, by `type` (`added`, `removed`).
    pub lease_events: Family<Labels, Counter>,
    /// etcd requests that failed.
    pub etcd_errors: Counter,
    /// The own lease (`subnet` label, value 1).
    pub lease_info: Family<Labels, Gauge>,
    /// When the own lease expires (Unix seconds; 0: never).
    pub lease_expiration: Gauge<i64, AtomicI64>,
}

impl SubnetMetrics {
    /// Records the own lease.
    pub fn set_lease(&self, subnet: &str, expiration: Option<std::time::SystemTime>) {
        self.lease_info.clear();
        self.lease_info
            .get_or_create(&vec![("subnet", subnet.to_string())])
            .set(1);
        let secs = expiration
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.lease_expiration.set(secs);
    }

    /// Counts a lease event (`added` or `removed`).
    pub fn lease_event(&self, kind: &'static str) {
        self.lease_events
            .get_or_create(&vec![("type", kind.to_string())])
            .inc();
    }
}

/// The process-wide instance.
pub fn metrics() -> &'static SubnetMetrics {
    static M: OnceLock<SubnetMetrics> = OnceLock::new();
    M.get_or_init(SubnetMetrics::default)
}

/// Registers these metrics (call once per registry).
pub fn register(r: &mut Registry) {
    let m = metrics();
    r.register(
        "flannel_lease_renewals",
        "Successful renewals of the own lease",
        m.lease_renewals.clone(),
    );
    r.register(
        "flannel_lease_renewal_errors",
        "Failed renewals of the own lease",
        m.lease_renewal_errors.clone(),
    );
    r.register(
        "flannel_lease_events",
        "Lease events received from the subnet manager",
        m.lease_events.clone(),
    );
    r.register(
        "flannel_etcd_errors",
        "etcd requests that failed",
        m.etcd_errors.clone(),
    );
    r.register("flannel_lease_info", "The own lease", m.lease_info.clone());
    r.register(
        "flannel_lease_expiration_timestamp_seconds",
        "When the own lease expires (0: never)",
        m.lease_expiration.clone(),
    );
}
