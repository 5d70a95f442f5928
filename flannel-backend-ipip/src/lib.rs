//! # flannel-backend-ipip
//!
//! flannel's `ipip` backend (shared/spec/flannel-compat.md §5.4), registered as `ipip`: pod traffic
//! between hosts in IP-in-IP tunnels (an outer IPv4 header, protocol 4, 20 bytes), as upstream's
//! `pkg/backend/ipip`. It needs a kernel with ipip tunnels (module `ipip`); on one without, the
//! backend refuses to start with an error saying so, before it takes a lease.
//!
//! ```json
//! {"Network": "10.5.0.0/16", "Backend": {"Type": "ipip", "DirectRouting": false}}
//! ```
//!
//! ## What it programs (as upstream)
//!
//! - One device, `flannel.ipip`, type ipip, `local` the external interface's address, `remote`
//!   any (one device for every peer: the kernel takes each packet's outer destination from its
//!   route's gateway), MTU the external interface's minus 20 (also `FLANNEL_MTU` in `subnet.env`),
//!   holding the own subnet's network address as a /32 (a source address for host-to-pod traffic,
//!   no broadcast routes), up. A `flannel.ipip` of another kind is refused, not deleted (it is not
//!   flannel's); one with other ends is made again.
//! - Per peer lease of type `ipip`: `<subnet> via <PublicIP> dev flannel.ipip onlink`. With
//!   `DirectRouting`, a peer on the external interface's network is routed without the tunnel:
//!   `<subnet> via <PublicIP> dev <external interface>`.
//! - The lease: `{"PublicIP":"…","BackendType":"ipip"}`, no backend data.
//!
//! IPv4 only, as upstream: a network with `EnableIPv6` (or IPv6 only) is refused with an error that
//! names the backends that carry IPv6.
//!
//! The routes are computed from the leases as data ([`desired_state`], pure) and reconciled with
//! the kernel by `flannel-dataplane`'s driver on every lease event, every netlink notification and
//! periodically: a deleted route comes back at once (upstream checks every 10 s), routes of departed
//! peers go, and a deleted or changed device is made again (upstream makes it only at start).

use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use flannel_core::gojson::GoObject;
use flannel_core::{
    Backend, BackendContext, BackendError, ExternalInterface, Lease, LeaseAttrs, Network,
    NetworkConfig,
};
use flannel_dataplane::LinkOps;
use flannel_dataplane::driver::{Model, ReconciledNetwork};
use flannel_dataplane::netlink::{IpipSpec, LinkState, Netlink};
use flannel_dataplane::{KernelState, Ownership, Route};
use ipnet::{IpNet, Ipv4Net};
use tracing::{info, warn};

flannel_core::register_backend!("ipip", IpipBackend::create);

/// The tunnel device's name, as upstream's.
pub const DEVICE: &str = "flannel.ipip";

/// The bytes IP-in-IP adds to a packet: the outer IPv4 header.
pub const OVERHEAD: u32 = 20;

/// The smallest MTU IPv4 allows a link (RFC 791): an underlay whose MTU less [`OVERHEAD`] is below
/// it cannot carry the tunnel.
const MIN_MTU: u32 = 68;

fn bad(message: String) -> BackendError {
    BackendError::invalid("ipip", message)
}

/// The ipip options of the network config's `Backend` object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpipOptions {
    /// `DirectRouting`: peers on the external interface's network are routed without the tunnel.
    pub direct_routing: bool,
}

impl IpipOptions {
    /// Parses the options with Go's rules (field names in any case, unknown fields ignored, a
    /// field of the wrong type an error).
    pub fn parse(backend: &serde_json::Value) -> Result<Self, BackendError> {
        let o = GoObject::new(backend, "Backend").map_err(|e| bad(e.to_string()))?;
        let direct_routing = o
            .bool("DirectRouting")
            .map_err(|e| bad(e.to_string()))?
            .unwrap_or(false);
        Ok(Self { direct_routing })
    }
}

/// Everything [`desired_state`] needs besides the leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The cluster network.
    pub network: Ipv4Net,
    /// The own subnet (never touched).
    pub own_subnet: Ipv4Net,
    /// `flannel.ipip`'s index.
    pub ipip_index: u32,
    /// The external interface's index.
    pub ext_index: u32,
    /// The external interface's networks (for DirectRouting's "is the peer directly reachable").
    pub ext_networks: Vec<IpNet>,
    /// Whether DirectRouting is on.
    pub direct_routing: bool,
}

/// The routes the kernel should hold for `leases` (pure), which routes are flannel's, and warnings
/// for leases that cannot be served. Leases of other backend types are ignored, as upstream does.
pub fn desired_state(topo: &Topology, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
    let mut state = KernelState::default();
    let mut warnings = Vec::new();
    for lease in leases {
        if lease.attrs.backend_type != "ipip" {
            continue;
        }
        let Some(subnet) = lease.subnet() else {
            continue;
        };
        let public = lease.attrs.public_ip;
        if let Some(why) = flannel_dataplane::lease_policy::unusable_tunnel_end(public) {
            warnings.push(format!(
                "ignoring ipip lease {} for {subnet}: {why} ({public}) to tunnel to",
                lease.key
            ));
            continue;
        }
        let direct = topo.direct_routing
            && topo
                .ext_networks
                .iter()
                .any(|n| n.contains(&IpAddr::V4(public)));
        state.routes.insert(if direct {
            Route {
                dst: IpNet::V4(subnet),
                gateway: Some(IpAddr::V4(public)),
                oif: topo.ext_index,
                onlink: false,
            }
        } else {
            Route {
                dst: IpNet::V4(subnet),
                gateway: Some(IpAddr::V4(public)),
                oif: topo.ipip_index,
                onlink: true,
            }
        });
    }
    let own = Ownership {
        networks: vec![IpNet::V4(topo.network)],
        route_oifs: vec![topo.ipip_index],
        gateway_route_oifs: if topo.direct_routing {
            vec![topo.ext_index]
        } else {
            vec![]
        },
        keep: vec![IpNet::V4(topo.own_subnet)],
        ..Default::default()
    };
    (state, own, warnings)
}

/// Whether `link` is the ipip device `spec` describes (its ends; the MTU is set in place).
fn matches(link: &LinkState, spec: &IpipSpec) -> bool {
    link.ipip
        .as_ref()
        .is_some_and(|a| a.local == Some(spec.local) && a.remote.is_none())
}

/// Makes sure the device of `spec` exists with `spec`'s ends (created; made again when its ends
/// differ), and returns it. A link of that name that is no ipip device is an error: it is not
/// flannel's to delete.
pub async fn ensure_device(nl: &dyn LinkOps, spec: &IpipSpec) -> Result<LinkState, BackendError> {
    if let Some(link) = nl.link_by_name(&spec.name).await? {
        if matches(&link, spec) {
            return Ok(link);
        }
        let Some(have) = &link.ipip else {
            return Err(bad(format!(
                "{} exists but is {} device, not an ipip tunnel; flanneld does not delete a device it did not make: \
                 remove it (`ip link del {}`) and start flanneld again",
                spec.name,
                link.kind
                    .as_deref()
                    .map_or("another kind of".to_string(), |k| format!("a {k}")),
                spec.name
            )));
        };
        let any = |a: Option<Ipv4Addr>| a.map_or("any".to_string(), |a| a.to_string());
        warn!(
            device = %spec.name,
            local = %any(have.local),
            remote = %any(have.remote),
            want_local = %spec.local,
            "the ipip device's ends differ from the external interface's; making it again"
        );
        nl.delete_link(link.index).await?;
    }
    nl.create_ipip(spec).await.map_err(|e| {
        if e.errno() == Some(libc::EOPNOTSUPP) {
            BackendError::Other(format!(
                "this kernel has no ipip tunnels: creating {} was refused ({}); load the module with \
                 `modprobe ipip`, or choose a backend that needs no kernel module, such as vxlan",
                spec.name,
                std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)
            ))
        } else {
            e.into()
        }
    })?;
    nl.link_by_name(&spec.name)
        .await?
        .filter(|l| matches(l, spec))
        .ok_or_else(|| {
            BackendError::Other(format!("{} vanished right after it was created", spec.name))
        })
}

/// Makes sure the device of `spec` exists ([`ensure_device`]), has `spec`'s MTU, holds only `addr`
/// inside `network`, and is up; its index.
pub async fn keep_device(
    nl: &dyn LinkOps,
    spec: &IpipSpec,
    addr: IpNet,
    network: IpNet,
) -> Result<u32, BackendError> {
    if nl.link_by_name(&spec.name).await?.is_none() {
        warn!(device = %spec.name, "the ipip device is missing; making it again");
    }
    let link = ensure_device(nl, spec).await?;
    if link.mtu != spec.mtu {
        nl.set_mtu(link.index, spec.mtu).await?;
    }
    nl.ensure_only_address(link.index, addr, network).await?;
    if !link.up {
        nl.set_up(link.index).await?;
    }
    Ok(link.index)
}

/// The registered backend.
#[derive(Debug)]
pub struct IpipBackend {
    ctx: BackendContext,
}

impl IpipBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

#[async_trait]
impl Backend for IpipBackend {
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let opts = IpipOptions::parse(&config.backend)?;
        config.ipv4_only("ipip", "vxlan, wireguard or host-gw")?;
        let ext = self.ctx.ext_iface.clone();
        let local = ext
            .iface_addr
            .ok_or_else(|| bad(format!("interface {} has no IPv4 address", ext.name)))?;
        let mtu = ext
            .mtu
            .checked_sub(OVERHEAD)
            .filter(|m| *m >= MIN_MTU)
            .ok_or_else(|| {
                bad(format!(
                    "the MTU {} of interface {} is too small for ipip (it adds {OVERHEAD} bytes)",
                    ext.mtu, ext.name
                ))
            })?;
        let spec = IpipSpec {
            name: DEVICE.into(),
            local,
            mtu,
        };
        // The device first: on a kernel without ipip, no lease is taken for a node that cannot
        // carry its traffic.
        let nl = Netlink::new()?;
        let link = ensure_device(&nl, &spec).await?;
        info!(device = DEVICE, %local, index = link.index, "ipip device ready");
        let attrs = LeaseAttrs {
            public_ip: ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            backend_type: "ipip".into(),
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        let (network, own_subnet) = flannel_core::backend::ipv4_networks(config, &lease)?
            .ok_or_else(|| bad("the lease has no IPv4 subnet".into()))?;
        let mut model = IpipModel {
            nl,
            ext,
            opts,
            spec,
            network,
            own_subnet,
            index: link.index,
        };
        model.prepare().await?;
        Ok(Box::new(ReconciledNetwork::new(
            lease,
            mtu,
            model,
            self.ctx.subnet_manager.clone(),
        )))
    }
}

/// The device and topology the reconcile loop keeps up.
#[derive(Debug)]
struct IpipModel {
    nl: Netlink,
    ext: ExternalInterface,
    opts: IpipOptions,
    spec: IpipSpec,
    network: Ipv4Net,
    own_subnet: Ipv4Net,
    index: u32,
}

#[async_trait]
impl Model for IpipModel {
    async fn prepare(&mut self) -> Result<(), BackendError> {
        // The subnet's network address alone (/32): no broadcast routes.
        let addr = IpNet::V4(Ipv4Net::from(self.own_subnet.network()));
        self.index = keep_device(&self.nl, &self.spec, addr, IpNet::V4(self.network)).await?;
        Ok(())
    }

    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
        let topo = Topology {
            network: self.network,
            own_subnet: self.own_subnet,
            ipip_index: self.index,
            ext_index: self.ext.index,
            ext_networks: self.ext.iface_networks.clone(),
            direct_routing: self.opts.direct_routing,
        };
        desired_state(&topo, leases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_dataplane::netlink::IpipAttrs;
    use flannel_dataplane::{FakeKernel, reconcile_once};
    use serde_json::json;

    /// Cluster network 10.5.0.0/16, own subnet 10.5.1.0/24, `flannel.ipip` #7, external interface
    /// #2 on 192.168.0.0/24.
    fn topo(direct_routing: bool) -> Topology {
        Topology {
            network: "10.5.0.0/16".parse().unwrap(),
            own_subnet: "10.5.1.0/24".parse().unwrap(),
            ipip_index: 7,
            ext_index: 2,
            ext_networks: vec!["192.168.0.0/24".parse().unwrap()],
            direct_routing,
        }
    }

    fn lease(key: &str, ip: &str, ty: &str) -> Lease {
        flannel_core::testing::peer_lease(key, ip, ty, None)
    }

    fn routes(s: &KernelState) -> Vec<String> {
        s.routes.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn options_parse_like_go() {
        let parse = |v: serde_json::Value| IpipOptions::parse(&v);
        assert_eq!(
            parse(json!({"Type": "ipip"})).unwrap(),
            IpipOptions::default()
        );
        assert!(
            parse(json!({"Type": "ipip", "directrouting": true}))
                .unwrap()
                .direct_routing,
            "field names in any case, as Go's decoder"
        );
        assert_eq!(
            parse(json!({"Type": "ipip", "VNI": 4, "Other": [1]})).unwrap(),
            IpipOptions::default(),
            "unknown fields are ignored"
        );
        let e = parse(json!({"Type": "ipip", "DirectRouting": "yes"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("DirectRouting") && e.contains("ipip"), "{e}");
        assert!(parse(json!(["ipip"])).is_err());
    }

    #[test]
    fn peers_are_routed_through_the_tunnel_onlink_as_upstream() {
        let peers = [
            lease("10.5.2.0-24", "192.168.0.2", "ipip"),
            // Off the underlay's segment: the tunnel still reaches it (routed underlay).
            lease("10.5.3.0-24", "192.168.9.3", "ipip"),
            lease("10.5.4.0-24", "192.168.0.4", "vxlan"),
            lease("10.5.5.0-24", "192.168.0.5", "host-gw"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (s, own, warnings) = desired_state(&topo(false), &refs);
        assert_eq!(
            routes(&s),
            vec![
                "10.5.2.0/24 via 192.168.0.2 dev #7 onlink",
                "10.5.3.0/24 via 192.168.9.3 dev #7 onlink",
            ]
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(own.route_oifs, vec![7]);
        assert!(own.gateway_route_oifs.is_empty());
        assert_eq!(own.keep, vec!["10.5.1.0/24".parse::<IpNet>().unwrap()]);
        assert!(own.neigh_ifindexes.is_empty() && own.fdb_ifindexes.is_empty());
    }

    #[test]
    fn direct_routing_only_for_peers_on_the_segment() {
        let peers = [
            lease("10.5.2.0-24", "192.168.0.2", "ipip"),
            lease("10.5.3.0-24", "192.168.9.3", "ipip"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (s, own, _) = desired_state(&topo(true), &refs);
        assert_eq!(
            routes(&s),
            vec![
                "10.5.2.0/24 via 192.168.0.2 dev #2",
                "10.5.3.0/24 via 192.168.9.3 dev #7 onlink",
            ]
        );
        assert_eq!(own.gateway_route_oifs, vec![2]);
        // Not DirectRouting's: a route via the external interface is somebody else's.
        let (_, own, _) = desired_state(&topo(false), &refs);
        let r = s.routes.iter().find(|r| r.oif == 2).unwrap();
        assert!(!own.owns_route(r));
    }

    #[test]
    fn leases_without_a_usable_far_end_are_reported_not_routed() {
        let peers = [
            lease("10.5.2.0-24", "0.0.0.0", "ipip"),
            lease("10.5.3.0-24", "127.0.0.1", "ipip"),
            lease("10.5.4.0-24", "224.0.0.1", "ipip"),
            lease("10.5.5.0-24", "255.255.255.255", "ipip"),
            lease("10.5.6.0-24", "192.168.0.6", "ipip"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (s, _, warnings) = desired_state(&topo(false), &refs);
        assert_eq!(
            routes(&s),
            vec!["10.5.6.0/24 via 192.168.0.6 dev #7 onlink"]
        );
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert!(
            warnings[0].contains("10.5.2.0/24") && warnings[0].contains("no public IP"),
            "{}",
            warnings[0]
        );
    }

    /// The same leases twice: the second pass changes nothing, also with hostile leases in the set;
    /// a departed peer's route goes.
    #[tokio::test]
    async fn reconciling_is_idempotent_and_removes_departed_peers() {
        let topo = topo(false);
        let k = FakeKernel::with_link_routes(&[("192.168.0.0/24", 2)]);
        let peers = [
            lease("10.5.2.0-24", "192.168.0.2", "ipip"),
            lease("10.5.3.0-24", "192.168.0.3", "ipip"),
            lease("10.99.0.0-16", "192.168.0.4", "ipip"),
            lease("192.168.0.0-24", "192.168.0.5", "ipip"),
            lease("10.5.1.128-25", "192.168.0.6", "ipip"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (allowed, refused) = k
            .reconcile_twice("10.5.1.0-24".parse().unwrap(), &refs, |l| {
                let (s, own, _) = desired_state(&topo, l);
                (s, own)
            })
            .await;
        assert_eq!((allowed.len(), refused.len()), (2, 3), "{refused:?}");
        let (s, own, _) = desired_state(&topo, &allowed[..1]);
        let report = reconcile_once(&k, &s, &own).await.unwrap();
        assert!(!report.is_noop());
        let have = k.state.lock().unwrap().clone();
        let have: Vec<String> = have.routes.iter().map(|r| r.to_string()).collect();
        assert!(
            have.contains(&"10.5.2.0/24 via 192.168.0.2 dev #7 onlink".to_string())
                && !have.iter().any(|r| r.starts_with("10.5.3.0/24")),
            "{have:?}"
        );
    }

    fn spec(local: &str) -> IpipSpec {
        IpipSpec {
            name: DEVICE.into(),
            local: local.parse().unwrap(),
            mtu: 1480,
        }
    }

    #[tokio::test]
    async fn the_device_is_made_reused_remade_and_repaired() {
        let k = FakeKernel::default();
        let addr: IpNet = "10.5.1.0/32".parse().unwrap();
        let net: IpNet = "10.5.0.0/16".parse().unwrap();
        let first = keep_device(&k, &spec("192.168.0.1"), addr, net)
            .await
            .unwrap();
        let link = k.link_by_name(DEVICE).await.unwrap().unwrap();
        assert!(link.up && link.mtu == 1480);
        assert_eq!(
            link.ipip,
            Some(IpipAttrs {
                local: Some("192.168.0.1".parse().unwrap()),
                remote: None
            })
        );
        assert_eq!(k.links.lock().unwrap()[DEVICE].addrs, vec![addr]);

        // Reused as is; an MTU someone changed is put back.
        k.set_mtu(first, 9000).await.unwrap();
        assert_eq!(
            keep_device(&k, &spec("192.168.0.1"), addr, net)
                .await
                .unwrap(),
            first
        );
        assert_eq!(k.link_by_name(DEVICE).await.unwrap().unwrap().mtu, 1480);

        // The external interface's address changed: the device is made again with the new end.
        let second = keep_device(&k, &spec("192.168.0.9"), addr, net)
            .await
            .unwrap();
        assert_ne!(second, first);
        let link = k.link_by_name(DEVICE).await.unwrap().unwrap();
        assert_eq!(
            link.ipip.unwrap().local,
            Some("192.168.0.9".parse().unwrap())
        );

        // Deleted: made again, up, with its address.
        k.delete_link(second).await.unwrap();
        let third = keep_device(&k, &spec("192.168.0.9"), addr, net)
            .await
            .unwrap();
        assert_ne!(third, second);
        assert!(k.link_by_name(DEVICE).await.unwrap().unwrap().up);
        assert_eq!(k.links.lock().unwrap()[DEVICE].addrs, vec![addr]);
    }

    #[tokio::test]
    async fn a_device_of_another_kind_is_refused_not_deleted() {
        let k = FakeKernel::default();
        let vx = flannel_dataplane::netlink::VxlanSpec {
            name: DEVICE.into(),
            attrs: Default::default(),
            mac: flannel_dataplane::MacAddr([2, 0, 0, 0, 0, 1]),
            mtu: 1450,
        };
        k.create_vxlan(&vx).await.unwrap();
        let e = ensure_device(&k, &spec("192.168.0.1"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a vxlan device") && e.contains("ip link del flannel.ipip"),
            "{e}"
        );
        let still = k.link_by_name(DEVICE).await.unwrap().unwrap();
        assert_eq!(still.kind.as_deref(), Some("vxlan"));
    }
}
