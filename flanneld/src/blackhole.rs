//! `--ip-blackhole-route` (Go flanneld HEAD): a blackhole route for the node's own subnet(s), so
//! traffic to addresses of the subnet that no pod holds is dropped here instead of following the
//! default route (for setups without a bridge owning the subnet, such as Canal). Checked, and put
//! back, every `--iptables-resync` seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use flannel_dataplane::netlink::Netlink;
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Keeps the blackhole routes to `subnets` until `shutdown`. A failure (another route to the same
/// prefix, such as a bridge's, makes the kernel refuse) is logged once per change of its message,
/// not at every check.
pub(crate) async fn keep(subnets: Vec<IpNet>, every: Duration, shutdown: CancellationToken) {
    let netlink = match Netlink::new() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %flannel_core::chain(&e), "cannot keep the blackhole routes");
            return;
        }
    };
    let mut failing: BTreeMap<IpNet, String> = BTreeMap::new();
    loop {
        for subnet in &subnets {
            match netlink.ensure_blackhole(*subnet).await {
                Ok(added) => {
                    if added {
                        info!(%subnet, "added the blackhole route for the own subnet");
                    }
                    failing.remove(subnet);
                }
                Err(e) => {
                    let message = flannel_core::chain(&e);
                    if failing.get(subnet) != Some(&message) {
                        warn!(%subnet, error = %message, "cannot add the blackhole route for the own subnet (is another route to it in the way?); will retry");
                        failing.insert(*subnet, message);
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
