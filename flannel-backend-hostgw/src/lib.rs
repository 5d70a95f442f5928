//! # flannel-backend-hostgw
//!
//! flannel's host-gw backend (shared/spec/flannel-compat.md §5.2), registered as `host-gw`.
//!
//! ## Design
//!
//! No device and no encapsulation: for every peer lease of type `host-gw` the host routes the peer's
//! subnet to the peer's public IP on the external interface
//! (`ip route replace <subnet> via <PublicIP> dev <ext>`). That needs every host on one L2 segment; a
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
use flannel_core::dataplane::driver::{Model, ReconciledNetwork};
use flannel_core::dataplane::{KernelState, Ownership, Route};
use flannel_core::{
    Backend, BackendContext, BackendError, ExternalInterface, Lease, LeaseAttrs, Network,
    NetworkConfig,
};
use ipnet::{IpNet, Ipv4Net};

flannel_core::register_backend!("host-gw", HostGwBackend::create);

/// Everything [`desired_state`] needs besides the leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The cluster network.
    pub network: Ipv4Net,
    /// The own subnet (never touched).
    pub own_subnet: Ipv4Net,
    /// The external interface.
    pub ext_index: u32,
    /// The external interface's networks: peers must be inside one of them.
    pub ext_networks: Vec<IpNet>,
}

/// The routes the kernel should hold for `leases` (pure), and warnings for peers that are not on-link.
pub fn desired_state(topo: &Topology, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
    let mut state = KernelState::default();
    let mut warnings = Vec::new();
    for lease in leases {
        let Some(subnet) = lease.subnet() else {
            continue;
        };
        if lease.attrs.backend_type != "host-gw" {
            continue;
        }
        let gw = IpAddr::V4(lease.attrs.public_ip);
        if !topo.ext_networks.iter().any(|n| n.contains(&gw)) {
            let nets: Vec<String> = topo.ext_networks.iter().map(|n| n.to_string()).collect();
            warnings.push(format!(
                "host-gw cannot reach subnet {subnet}: its host {gw} is not on-link (the external interface is on {}); \
                 host-gw needs every host on one L2 network, use the vxlan backend (optionally with DirectRouting) instead",
                nets.join(", ")
            ));
            continue;
        }
        state.routes.insert(Route {
            dst: IpNet::V4(subnet),
            gateway: Some(gw),
            oif: topo.ext_index,
            onlink: false,
        });
    }
    let own = Ownership {
        networks: vec![IpNet::V4(topo.network)],
        gateway_route_oifs: vec![topo.ext_index],
        keep: vec![IpNet::V4(topo.own_subnet)],
        ..Default::default()
    };
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
    BackendError::InvalidOptions {
        backend: "host-gw".into(),
        message,
    }
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
        let network = config
            .network()
            .ok_or_else(|| bad("the host-gw backend needs an IPv4 Network".into()))?;
        let attrs = LeaseAttrs {
            public_ip: ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            backend_type: "host-gw".into(),
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        let own_subnet = lease
            .subnet()
            .ok_or_else(|| BackendError::Other("the lease has no IPv4 subnet".into()))?;
        let mtu = ext.mtu;
        let model = HostGwModel {
            ext,
            network,
            own_subnet,
        };
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
    network: Ipv4Net,
    own_subnet: Ipv4Net,
}

#[async_trait]
impl Model for HostGwModel {
    async fn prepare(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
        let topo = Topology {
            network: self.network,
            own_subnet: self.own_subnet,
            ext_index: self.ext.index,
            ext_networks: self.ext.iface_networks.clone(),
        };
        desired_state(&topo, leases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, ip: &str, ty: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            enable_ipv4: true,
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                backend_type: ty.into(),
                ..Default::default()
            },
            expiration: None,
            asof: 0,
        }
    }

    #[test]
    fn routes_via_on_link_peers_and_clear_warning_otherwise() {
        let topo = Topology {
            network: "10.5.0.0/16".parse().unwrap(),
            own_subnet: "10.5.1.0/24".parse().unwrap(),
            ext_index: 2,
            ext_networks: vec!["192.168.0.0/24".parse().unwrap()],
        };
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
}
