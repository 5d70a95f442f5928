//! Process-wide counters for the Prometheus `/metrics` endpoint. Plain atomics: incrementing costs
//! nothing measurable and needs no registry crate. Subnet managers, backends and the reconcile
//! driver record here; `flanneld` renders [`render_prometheus`].

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    lease_subnet: Mutex<Option<String>>,
    lease_expiration: AtomicI64,
    /// Successful lease renewals.
    pub lease_renewals: AtomicU64,
    /// Failed lease renewals.
    pub lease_renewal_errors: AtomicU64,
    /// Lease events received (added).
    pub lease_events_added: AtomicU64,
    /// Lease events received (removed).
    pub lease_events_removed: AtomicU64,
    /// Reconcile passes.
    pub reconcile_runs: AtomicU64,
    /// Peer leases refused by the [`crate::LeasePolicy`] (once per change of a lease).
    pub leases_refused: AtomicU64,
    /// Kernel changes applied, by `[add|delete][route|neigh|fdb]`.
    changes: [AtomicU64; 6],
    /// Netlink operations that failed.
    pub netlink_errors: AtomicU64,
    /// etcd requests that failed.
    pub etcd_errors: AtomicU64,
    /// Times the iptables rules had to be (re)installed.
    pub iptables_installs: AtomicU64,
    /// Times the firewall rules could not be read (not rebuilt blindly then).
    pub rule_read_errors: AtomicU64,
    /// udp backend: datagrams sent to peers.
    pub udp_tx_packets: AtomicU64,
    /// udp backend: bytes sent to peers.
    pub udp_tx_bytes: AtomicU64,
    /// udp backend: datagrams from peers written to the TUN device.
    pub udp_rx_packets: AtomicU64,
    /// udp backend: bytes from peers written to the TUN device.
    pub udp_rx_bytes: AtomicU64,
    /// udp backend: packets dropped (no route, TTL, unknown or spoofing peer, write errors).
    pub udp_dropped: AtomicU64,
}

const KINDS: [&str; 3] = ["route", "neigh", "fdb"];

fn idx(delete: bool, kind: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| *k == kind)
        .map(|i| i + if delete { 3 } else { 0 })
}

impl Metrics {
    /// Records the own lease.
    pub fn set_lease(&self, subnet: &str, expiration_unix: Option<i64>) {
        if let Ok(mut s) = self.lease_subnet.lock() {
            *s = Some(subnet.to_string());
        }
        self.lease_expiration
            .store(expiration_unix.unwrap_or(0), Ordering::Relaxed);
    }

    /// Records kernel changes: `label` is `add route`, `delete fdb`, … as in a reconcile report.
    pub fn record_change(&self, label: &str, n: u64) {
        let (op, kind) = label.split_once(' ').unwrap_or(("", ""));
        if let Some(i) = idx(op == "delete", kind) {
            self.changes[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A change counter (for tests).
    pub fn changes(&self, delete: bool, kind: &str) -> u64 {
        idx(delete, kind).map_or(0, |i| self.changes[i].load(Ordering::Relaxed))
    }
}

static METRICS: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();

/// The process-wide counters.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::default)
}

/// Increments a counter by one.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The counters in Prometheus text format (version 0.0.4).
pub fn render_prometheus(m: &Metrics) -> String {
    let mut s = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    counter(
        "flannel_lease_renewals_total",
        "Successful renewals of the own lease.",
        g(&m.lease_renewals),
    );
    counter(
        "flannel_lease_renewal_errors_total",
        "Failed renewals of the own lease.",
        g(&m.lease_renewal_errors),
    );
    counter(
        "flannel_reconcile_runs_total",
        "Data plane reconcile passes.",
        g(&m.reconcile_runs),
    );
    counter(
        "flannel_leases_refused_total",
        "Peer leases refused as unsafe (outside the network, overlapping the host's networks or own subnet), once per change.",
        g(&m.leases_refused),
    );
    counter(
        "flannel_netlink_errors_total",
        "Netlink operations that failed.",
        g(&m.netlink_errors),
    );
    counter(
        "flannel_etcd_errors_total",
        "etcd requests that failed.",
        g(&m.etcd_errors),
    );
    counter(
        "flannel_iptables_installs_total",
        "Times the iptables rules were (re)installed.",
        g(&m.iptables_installs),
    );
    counter(
        "flannel_rule_read_errors_total",
        "Times the iptables or nftables rules could not be read.",
        g(&m.rule_read_errors),
    );
    for (name, help, v) in [
        (
            "flannel_udp_tx_packets_total",
            "udp backend: datagrams sent to peers.",
            &m.udp_tx_packets,
        ),
        (
            "flannel_udp_tx_bytes_total",
            "udp backend: bytes sent to peers.",
            &m.udp_tx_bytes,
        ),
        (
            "flannel_udp_rx_packets_total",
            "udp backend: datagrams from peers written to the TUN device.",
            &m.udp_rx_packets,
        ),
        (
            "flannel_udp_rx_bytes_total",
            "udp backend: bytes from peers written to the TUN device.",
            &m.udp_rx_bytes,
        ),
        (
            "flannel_udp_dropped_total",
            "udp backend: packets dropped (unknown peer, spoofed source, no route, TTL, I/O errors).",
            &m.udp_dropped,
        ),
    ] {
        counter(name, help, g(v));
    }
    let _ = writeln!(
        s,
        "# HELP flannel_lease_events_total Lease events received from the subnet manager."
    );
    let _ = writeln!(s, "# TYPE flannel_lease_events_total counter");
    let _ = writeln!(
        s,
        "flannel_lease_events_total{{type=\"added\"}} {}",
        g(&m.lease_events_added)
    );
    let _ = writeln!(
        s,
        "flannel_lease_events_total{{type=\"removed\"}} {}",
        g(&m.lease_events_removed)
    );
    let _ = writeln!(
        s,
        "# HELP flannel_dataplane_changes_total Kernel entries added or deleted by reconciliation (repairs included)."
    );
    let _ = writeln!(s, "# TYPE flannel_dataplane_changes_total counter");
    for (i, (op, kind)) in ["add", "delete"]
        .iter()
        .flat_map(|op| KINDS.iter().map(move |k| (*op, *k)))
        .enumerate()
    {
        let _ = writeln!(
            s,
            "flannel_dataplane_changes_total{{op=\"{op}\",kind=\"{kind}\"}} {}",
            g(&m.changes[i])
        );
    }
    let subnet = m.lease_subnet.lock().ok().and_then(|s| s.clone());
    if let Some(subnet) = subnet {
        let _ = writeln!(
            s,
            "# HELP flannel_lease_info The own lease.\n# TYPE flannel_lease_info gauge"
        );
        let _ = writeln!(s, "flannel_lease_info{{subnet=\"{subnet}\"}} 1");
        let _ = writeln!(
            s,
            "# HELP flannel_lease_expiration_timestamp_seconds When the own lease expires (0: never)."
        );
        let _ = writeln!(s, "# TYPE flannel_lease_expiration_timestamp_seconds gauge");
        let _ = writeln!(
            s,
            "flannel_lease_expiration_timestamp_seconds {}",
            m.lease_expiration.load(Ordering::Relaxed)
        );
    }
    s
}

/// Seconds since the Unix epoch of a `SystemTime`.
pub fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        inc(&m.lease_renewals);
        m.record_change("add route", 3);
        m.record_change("delete fdb", 1);
        m.record_change("bogus", 1);
        m.set_lease("10.5.3.0/24", Some(1_700_000_000));
        inc(&m.udp_dropped);
        m.udp_tx_bytes.fetch_add(1472, Ordering::Relaxed);
        let text = render_prometheus(&m);
        assert!(text.contains("\nflannel_udp_dropped_total 1\n"), "{text}");
        assert!(
            text.contains("\nflannel_udp_tx_bytes_total 1472\n"),
            "{text}"
        );
        assert!(text.contains(
            "# TYPE flannel_lease_renewals_total counter\nflannel_lease_renewals_total 1\n"
        ));
        assert!(text.contains("flannel_dataplane_changes_total{op=\"add\",kind=\"route\"} 3\n"));
        assert!(text.contains("flannel_dataplane_changes_total{op=\"delete\",kind=\"fdb\"} 1\n"));
        assert!(text.contains("flannel_lease_info{subnet=\"10.5.3.0/24\"} 1\n"));
        assert!(text.contains("flannel_lease_expiration_timestamp_seconds 1700000000\n"));
        assert_eq!(m.changes(false, "route"), 3);
        // Every sample line is `name{labels} value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
