//! flanneld's own counters, and the registry `/metrics` serves: every crate registers its own metrics
//! into it (`flannel_subnet::metrics`, `flannel_dataplane::metrics`, `flannel_backend_udp::metrics`,
//! `flannel_backend_extension::metrics`).

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// flanneld's own metrics (the firewall rules).
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Times the iptables or nftables rules had to be (re)installed.
    pub rule_installs: Counter,
    /// Times the rules could not be read (not rebuilt blindly then).
    pub rule_read_errors: Counter,
}

/// The process-wide instance.
pub fn metrics() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(AgentMetrics::default)
}

/// The registry with every crate's metrics.
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let mut r = Registry::default();
        flannel_subnet::metrics::register(&mut r);
        flannel_dataplane::metrics::register(&mut r);
        flannel_backend_udp::metrics::register(&mut r);
        flannel_backend_extension::metrics::register(&mut r);
        let m = metrics();
        r.register(
            "flannel_iptables_installs",
            "Times the iptables or nftables rules were (re)installed",
            m.rule_installs.clone(),
        );
        r.register(
            "flannel_rule_read_errors",
            "Times the iptables or nftables rules could not be read",
            m.rule_read_errors.clone(),
        );
        r
    })
}

/// The metrics in the OpenMetrics text format.
pub fn render() -> String {
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut s, registry());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crate_s_metrics_are_rendered() {
        flannel_backend_udp::metrics::metrics().dropped.inc();
        flannel_backend_udp::metrics::metrics()
            .tx_bytes
            .inc_by(1472);
        flannel_dataplane::metrics::metrics().record_change("add route", 3);
        flannel_subnet::metrics::metrics().lease_event("removed");
        flannel_subnet::metrics::metrics().set_lease("10.5.1.0-24", None);
        metrics().rule_read_errors.inc();
        flannel_backend_extension::metrics::metrics().record("subnet_add", "failed");
        let text = render();
        for line in [
            "flannel_udp_dropped_total 1\n",
            "flannel_udp_tx_bytes_total 1472\n",
            "flannel_dataplane_changes_total{op=\"add\",kind=\"route\"} 3\n",
            "flannel_lease_events_total{type=\"removed\"} 1\n",
            "flannel_lease_info{subnet=\"10.5.1.0-24\"} 1\n",
            "flannel_lease_expiration_timestamp_seconds 0\n",
            "flannel_rule_read_errors_total 1\n",
            "flannel_extension_commands_total{hook=\"subnet_add\",result=\"failed\"} 1\n",
            "flannel_reconcile_runs_total 0\n",
            "# TYPE flannel_leases_refused counter\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
