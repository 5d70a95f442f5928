//! The udp backend's counters, registered into a Prometheus registry by the binary ([`register`]).

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// The udp backend's metrics.
#[derive(Debug, Default)]
pub struct UdpMetrics {
    /// Datagrams sent to peers.
    pub tx_packets: Counter,
    /// Bytes sent to peers.
    pub tx_bytes: Counter,
    /// Datagrams from peers written to the TUN device.
    pub rx_packets: Counter,
    /// Bytes from peers written to the TUN device.
    pub rx_bytes: Counter,
    /// Packets dropped (no route, TTL, unknown or spoofing peer, write errors).
    pub dropped: Counter,
}

/// The process-wide instance.
pub fn metrics() -> &'static UdpMetrics {
    static M: OnceLock<UdpMetrics> = OnceLock::new();
    M.get_or_init(UdpMetrics::default)
}

/// Registers these metrics (call once per registry).
pub fn register(r: &mut Registry) {
    let m = metrics();
    for (name, help, c) in [
        (
            "flannel_udp_tx_packets",
            "udp backend: datagrams sent to peers",
            &m.tx_packets,
        ),
        (
            "flannel_udp_tx_bytes",
            "udp backend: bytes sent to peers",
            &m.tx_bytes,
        ),
        (
            "flannel_udp_rx_packets",
            "udp backend: datagrams from peers written to the TUN device",
            &m.rx_packets,
        ),
        (
            "flannel_udp_rx_bytes",
            "udp backend: bytes from peers written to the TUN device",
            &m.rx_bytes,
        ),
        (
            "flannel_udp_dropped",
            "udp backend: packets dropped (no route, TTL, unknown or spoofing peer, write errors)",
            &m.dropped,
        ),
    ] {
        r.register(name, help, c.clone());
    }
}
