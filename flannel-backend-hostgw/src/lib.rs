//! # flannel-backend-hostgw
//!
//! flannel's host-gw backend (shared/spec/flannel-compat.md §5.2), registered as `host-gw`.
//!
//! ## Design
//!
//! No device and no encapsulation: for every peer lease of type `host-gw` the host routes the peer's
//! subnet to the peer's public IP on the external interface
//! (`ip route replace <subnet> via <PublicIP> dev <ext>`), and with `EnableIPv6` the peer's IPv6
//! subnet to its `PublicIPv6` likewise (dual stack; an IPv6-only network, as Kubernetes mode allows,
//! has only the IPv6 routes). That needs every host on one L2 segment; a
//! peer whose public IP is not on the external interface's network cannot be served and is reported
//! clearly (once per change) instead of failing in the kernel.
//!
//! The routes are computed from the leases as data ([`desired_state`], pure) and reconciled with the
//! kernel on every lease event, every netlink notification and periodically, so a deleted route comes
//! back within moments (Go flannel checks every 10 s) and routes of departed peers go away, also those
//! left from before a restart. Only routes into the cluster network with a gateway on the external
//! interface are considered flannel's.

use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use flannel_core::{
    Backend, BackendContext, BackendError, ExternalInterface, Lease, LeaseAttrs, Network,
    NetworkConfig,
};
use flannel_dataplane::driver::{Model, ReconciledNetwork};
use flannel_dataplane::{KernelState, Ownership, Route};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

flannel_core::register_backend!("host-gw", HostGwBackend::create);

/// Everything [`desired_state`] needs besides the leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The IPv4 cluster network and own subnet (never touched), unless the network is IPv6-only.
    pub ipv4: Option<(Ipv4Net, Ipv4Net)>,
    /// The external interface.
    pub ext_index: u32,
    /// The external interface's networks: peers must be inside one of them.
    pub ext_networks: Vec<IpNet>,
    /// The IPv6 cluster network and own IPv6 subnet (dual stack), when `EnableIPv6`.
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
}

/// The routes the kernel should hold for `leases` (pure), and warnings for peers that are not on-link.
pub fn desired_state(topo: &Topology, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
    let mut state = KernelState::default();
    let mut warnings = Vec::new();
    for lease in leases {
        if lease.attrs.backend_type != "host-gw" {
            continue;
        }
        let mut routes: Vec<(IpNet, IpAddr)> = Vec::with_capacity(2);
        if let (Some(_), Some(subnet)) = (topo.ipv4, lease.subnet()) {
            routes.push((IpNet::V4(subnet), IpAddr::V4(lease.attrs.public_ip)));
        }
        if let (Some(_), Some(subnet), Some(gw)) =
            (topo.ipv6, lease.ipv6_subnet(), lease.attrs.public_ipv6)
        {
            routes.push((IpNet::V6(subnet), IpAddr::V6(gw)));
        }
        for (dst, gw) in routes {
            if !topo.ext_networks.iter().any(|n| n.contains(&gw)) {
                let nets: Vec<String> = topo.ext_networks.iter().map(|n| n.to_string()).collect();
                warnings.push(format!(
                    "host-gw cannot reach subnet {dst}: its host {gw} is not on-link (the external interface is on {}); \
                     host-gw needs every host on one L2 network, use the vxlan backend (optionally with DirectRouting) instead",
                    nets.join(", ")
                ));
                continue;
            }
            state.routes.insert(Route {
                dst,
                gateway: Some(gw),
                oif: topo.ext_index,
                onlink: false,
            });
        }
    }
    let mut own = Ownership {
        gateway_route_oifs: vec![topo.ext_index],
        ..Default::default()
    };
    if let Some((network, own_subnet)) = topo.ipv4 {
        own.networks.push(IpNet::V4(network));
        own.keep.push(IpNet::V4(own_subnet));
    }
    if let Some((network, own_subnet)) = topo.ipv6 {
        own.networks.push(IpNet::V6(network));
        own.keep.push(IpNet::V6(own_subnet));
    }
    (state, own, warnings)
}

/// The registered backend.
#[derive(Debug)]
pub struct HostGwBackend {
    ctx: BackendContext,
}

impl HostGwBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

fn bad(message: String) -> BackendError {
    BackendError::invalid("host-gw", message)
}

#[async_trait]
impl Backend for HostGwBackend {
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let ext = self.ctx.ext_iface.clone();
        if ext.ext_addr != ext.iface_addr {
            return Err(bad(format!(
                "the public IP {:?} differs from {}'s address {:?}: probably you're on a NAT, which is not supported by host-gw backend",
                ext.ext_addr, ext.name, ext.iface_addr
            )));
        }
        let public_ipv6 = match config.ipv6_network() {
            Some(_) => {
                let (iface6, public6) = ext.require_ipv6().map_err(bad)?;
                if public6 != iface6 {
                    return Err(bad(format!(
                        "the public IPv6 {public6} differs from {}'s address {iface6}: probably you're on a NAT, which is not supported by host-gw backend",
                        ext.name
                    )));
                }
                Some(public6)
            }
            None => None,
        };
        let attrs = LeaseAttrs {
            public_ip: ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6,
            backend_type: "host-gw".into(),
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        let ipv4 = flannel_core::backend::ipv4_networks(config, &lease)?;
        let ipv6 = flannel_core::backend::ipv6_networks(config, &lease)?;
        let mtu = ext.mtu;
        let model = HostGwModel { ext, ipv4, ipv6 };
        Ok(Box::new(ReconciledNetwork::new(
            lease,
            mtu,
            model,
            self.ctx.subnet_manager.clone(),
        )))
    }
}

#[derive(Debug)]
struct HostGwModel {
    ext: ExternalInterface,
    ipv4: Option<(Ipv4Net, Ipv4Net)>,
    ipv6: Option<(Ipv6Net, Ipv6Net)>,
}

#[async_trait]
impl Model for HostGwModel {
    async fn prepare(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
        let topo = Topology {
            ipv4: self.ipv4,
            ext_index: self.ext.index,
            ext_networks: self.ext.iface_networks.clone(),
            ipv6: self.ipv6,
        };
        desired_state(&topo, leases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cluster network 10.5.0.0/16, own subnet 10.5.1.0/24, external interface #2 on 192.168.0.0/24.
    fn topo() -> Topology {
        Topology {
            ipv4: Some((
                "10.5.0.0/16".parse().unwrap(),
                "10.5.1.0/24".parse().unwrap(),
            )),
            ext_index: 2,
            ext_networks: vec!["192.168.0.0/24".parse().unwrap()],
            ipv6: None,
        }
    }

    fn lease(key: &str, ip: &str, ty: &str) -> Lease {
        flannel_core::testing::peer_lease(key, ip, ty, None)
    }

    /// The same leases twice: the second pass changes nothing, also with hostile leases in the set.
    #[tokio::test]
    async fn the_same_input_twice_changes_nothing_the_second_time() {
        use flannel_dataplane::FakeKernel;
        let topo = topo();
        // The host before flannel: the underlay's connected route.
        let k = FakeKernel::with_link_routes(&[("192.168.0.0/24", 2)]);
        let peers = [
            lease("10.5.2.0-24", "192.168.0.2", "host-gw"),
            lease("10.99.0.0-16", "192.168.0.3", "host-gw"),
            lease("0.0.0.0-1", "192.168.0.4", "host-gw"),
            lease("192.168.0.0-24", "192.168.0.5", "host-gw"),
            lease("10.5.1.128-25", "192.168.0.6", "host-gw"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (allowed, refused) = k
            .reconcile_twice("10.5.1.0-24".parse().unwrap(), &refs, |l| {
                let (s, own, _) = desired_state(&topo, l);
                (s, own)
            })
            .await;
        assert_eq!((allowed.len(), refused.len()), (1, 4), "{refused:?}");
    }

    #[test]
    fn routes_via_on_link_peers_and_clear_warning_otherwise() {
        let topo = topo();
        let peers = [
            lease("10.5.2.0-24", "192.168.0.2", "host-gw"),
            lease("10.5.3.0-24", "192.168.1.3", "host-gw"),
            lease("10.5.4.0-24", "192.168.0.4", "vxlan"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (s, own, warnings) = desired_state(&topo, &refs);
        let routes: Vec<String> = s.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(routes, vec!["10.5.2.0/24 via 192.168.0.2 dev #2"]);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("10.5.3.0/24") && warnings[0].contains("not on-link"),
            "{}",
            warnings[0]
        );
        assert_eq!(own.gateway_route_oifs, vec![2]);
        assert!(own.route_oifs.is_empty() && own.neigh_ifindexes.is_empty());
    }

    #[test]
    fn dual_stack_routes_each_family_via_the_peers_address_of_that_family() {
        let mut topo = topo();
        topo.ext_networks.push("fd00:20::/64".parse().unwrap());
        topo.ipv6 = Some((
            "fd00:5::/48".parse().unwrap(),
            "fd00:5:0:1::/64".parse().unwrap(),
        ));
        let mut dual = lease("10.5.2.0-24&fd00:5:0:2::-64", "192.168.0.2", "host-gw");
        dual.attrs.public_ipv6 = Some("fd00:20::2".parse().unwrap());
        let mut off_link = lease("10.5.3.0-24&fd00:5:0:3::-64", "192.168.0.3", "host-gw");
        off_link.attrs.public_ipv6 = Some("fd00:99::3".parse().unwrap());
        // A v4-only peer (no IPv6 part, no PublicIPv6) gets its IPv4 route only.
        let v4_only = lease("10.5.4.0-24", "192.168.0.4", "host-gw");
        let refs = [&dual, &off_link, &v4_only];
        let (s, own, warnings) = desired_state(&topo, &refs);
        let routes: Vec<String> = s.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            routes,
            vec![
                "10.5.2.0/24 via 192.168.0.2 dev #2",
                "10.5.3.0/24 via 192.168.0.3 dev #2",
                "10.5.4.0/24 via 192.168.0.4 dev #2",
                "fd00:5:0:2::/64 via fd00:20::2 dev #2",
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("fd00:5:0:3::/64"), "{}", warnings[0]);
        assert!(own.networks.contains(&"fd00:5::/48".parse().unwrap()));
        assert!(own.keep.contains(&"fd00:5:0:1::/64".parse().unwrap()));
    }

    #[test]
    fn an_ipv6_only_network_routes_and_owns_only_ipv6() {
        let topo = Topology {
            ipv4: None,
            ext_index: 2,
            ext_networks: vec!["fd00:20::/64".parse().unwrap()],
            ipv6: Some((
                "fd00:5::/48".parse().unwrap(),
                "fd00:5:0:1::/64".parse().unwrap(),
            )),
        };
        // As the Kubernetes subnet manager reads an IPv6-only node: no IPv4 part in use.
        let mut peer = lease("0.0.0.0-0&fd00:5:0:2::-64", "0.0.0.0", "host-gw");
        peer.enable_ipv4 = false;
        peer.attrs.public_ipv6 = Some("fd00:20::2".parse().unwrap());
        let (s, own, warnings) = desired_state(&topo, &[&peer]);
        let routes: Vec<String> = s.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(routes, vec!["fd00:5:0:2::/64 via fd00:20::2 dev #2"]);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(own.networks, vec!["fd00:5::/48".parse::<IpNet>().unwrap()]);
        assert_eq!(own.keep, vec!["fd00:5:0:1::/64".parse::<IpNet>().unwrap()]);
    }
}
