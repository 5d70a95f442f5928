//! # flannel-backend-vxlan
//!
//! flannel's vxlan backend (shared/spec/flannel-compat.md §5.1), registered as `vxlan`.
//!
//! ## Design
//!
//! Each host has one vxlan device, `flannel.<VNI>`, on its external interface, with the lease subnet's
//! network address as a /32. For every peer lease it installs, in this order, exactly what Go flannel
//! installs, so either implementation's kernel state works with the other:
//!
//! - `ip neigh replace <peer-subnet-addr> lladdr <VtepMAC> dev flannel.N nud permanent`
//! - `bridge fdb replace <VtepMAC> dev flannel.N dst <PublicIP> self permanent`
//! - `ip route replace <peer-subnet> via <peer-subnet-addr> dev flannel.N onlink`
//!
//! With `DirectRouting`, a peer whose public IP is on the external interface's own network gets
//! `ip route replace <peer-subnet> via <PublicIP> dev <ext>` instead.
//!
//! Unlike Go flannel, nothing is fire-and-forget: the desired entries are computed from the leases as
//! data ([`desired_state`], pure), compared with the kernel, and the difference applied, on every lease
//! event, on every netlink notification and periodically (see `flannel_dataplane::driver`). A
//! deleted device is recreated with the same MAC; deleted or changed entries come back; stale entries
//! of departed peers are removed. Entries on other devices are never touched.
//!
//! The device's MAC stays the same across restarts because a compatible existing device is reused.
//! Options (case-insensitive): `VNI` (1), `Port` (0 = kernel default 8472), `GBP`, `Learning`,
//! `DirectRouting`, `MTU` (external MTU).
//!
//! Dual stack (`EnableIPv6`): a second device, `flannel-v6.<VNI>`, over the external interface's IPv6
//! address (MTU − 70), with the IPv6 subnet's network address as a /128, its MAC advertised in
//! `BackendV6Data`, and the same three entries per peer in IPv6 (`PublicIPv6` as the FDB target).
//! An IPv6-only network (`EnableIPv4: false`, as Kubernetes mode allows) has only `flannel-v6.<VNI>`,
//! as Go flannel; the MTU it reports to pods is then the IPv6 device's (external MTU − 70, where Go
//! reports − 50 and leaves the difference to fragmentation).

use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use flannel_core::gojson::GoObject;
use flannel_core::{
    Backend, BackendContext, BackendError, ExternalInterface, Lease, LeaseAttrs, Network,
    NetworkConfig, RawJson,
};
use flannel_dataplane::LinkOps;
use flannel_dataplane::driver::{Model, ReconciledNetwork};
use flannel_dataplane::netlink::{Netlink, VxlanAttrs, VxlanSpec};
use flannel_dataplane::{Fdb, KernelState, MacAddr, Neigh, Ownership, Route};
use ipnet::IpNet;
use tracing::{info, warn};

flannel_core::register_backend!("vxlan", VxlanBackend::create);

/// The vxlan options of the network config's `Backend` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanOptions {
    /// `VNI`, default 1.
    pub vni: u32,
    /// `Port`, 0 = kernel default (8472).
    pub port: u16,
    /// `GBP`.
    pub gbp: bool,
    /// `Learning`.
    pub learning: bool,
    /// `DirectRouting`.
    pub direct_routing: bool,
    /// `MTU` of the underlay to assume (default: the external interface's).
    pub mtu: Option<u32>,
}

fn bad(message: String) -> BackendError {
    BackendError::invalid("vxlan", message)
}

impl VxlanOptions {
    /// Parses the options with Go's rules. A VNI above 65535 is refused: Go flanneld v0.20.2 peers
    /// decode it into 16 bits and would reject our lease.
    pub fn parse(backend: &serde_json::Value) -> Result<Self, BackendError> {
        let o = GoObject::new(backend, "Backend").map_err(|e| bad(e.to_string()))?;
        let f = |e: flannel_core::gojson::FieldError| bad(e.to_string());
        let vni = o.uint("VNI").map_err(f)?.unwrap_or(1);
        if vni == 0 || vni > 65535 {
            return Err(bad(format!(
                "VNI {vni} is out of range: use 1..65535 (Go flanneld v0.20.2 peers cannot read larger VNIs)"
            )));
        }
        let port = o.uint("Port").map_err(f)?.unwrap_or(0);
        let port = u16::try_from(port)
            .map_err(|_| bad(format!("Port {port} is not a UDP port (0..65535)")))?;
        let mtu = o.uint("MTU").map_err(f)?.filter(|m| *m > 0);
        let mtu = mtu
            .map(|m| {
                u32::try_from(m)
                    .ok()
                    .filter(|m| *m >= 100)
                    .ok_or_else(|| bad(format!("MTU {m} is too small")))
            })
            .transpose()?;
        Ok(Self {
            vni: vni as u32,
            port,
            gbp: o.bool("GBP").map_err(f)?.unwrap_or(false),
            learning: o.bool("Learning").map_err(f)?.unwrap_or(false),
            direct_routing: o.bool("DirectRouting").map_err(f)?.unwrap_or(false),
            mtu,
        })
    }

    /// The device name, `flannel.<VNI>`.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    /// The IPv6 device name, `flannel-v6.<VNI>`.
    pub fn device_name_v6(&self) -> String {
        format!("flannel-v6.{}", self.vni)
    }
}

/// A peer's vxlan lease data (`{"VNI":1,"VtepMAC":"…"}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerData {
    /// The peer's VNI.
    pub vni: u64,
    /// The peer's VTEP MAC.
    pub vtep_mac: MacAddr,
}

impl PeerData {
    /// Decodes a lease's `BackendData`.
    pub fn from_lease(lease: &Lease) -> Result<Self, String> {
        Self::from_data(lease.attrs.backend_data.as_ref(), "BackendData")
    }

    /// Decodes a lease's `BackendV6Data` (the IPv6 device's VNI and MAC).
    pub fn from_lease_v6(lease: &Lease) -> Result<Self, String> {
        Self::from_data(lease.attrs.backend_v6_data.as_ref(), "BackendV6Data")
    }

    fn from_data(data: Option<&RawJson>, field: &str) -> Result<Self, String> {
        let data = data.ok_or_else(|| format!("no {field}"))?;
        match Self::from_canonical(data.as_str()) {
            Some(decoded) => decoded,
            None => Self::from_value(&data.to_value(), field),
        }
    }

    /// Decodes the canonical text, `{"VNI":<n>,"VtepMAC":"<mac>"}` (compact, in this order: what
    /// Go's flanneld and this one write), without building a JSON tree: every pass decodes every
    /// peer's data, and the general way was a sixth of a 20,000-peer pass (perf). `None` for any
    /// other text, which is decoded the general way; where this answers, it answers as that does
    /// (the `vxlan_peer_data` fuzz target checks it).
    fn from_canonical(text: &str) -> Option<Result<Self, String>> {
        use flannel_core::gojson::{Canonical, canonical_fields};
        let [vni, mac] = canonical_fields(
            text,
            [("VNI", Canonical::Uint), ("VtepMAC", Canonical::Str)],
        )?;
        let vni: u64 = vni.parse().ok()?;
        Some(
            mac.parse()
                .map(|vtep_mac| Self { vni, vtep_mac })
                .map_err(|e: flannel_dataplane::BadMac| e.to_string()),
        )
    }

    /// Decodes backend data the general way (Go's rules: keys in any case, unknown keys ignored).
    fn from_value(data: &serde_json::Value, field: &str) -> Result<Self, String> {
        let o = GoObject::new(data, field).map_err(|e| e.to_string())?;
        let mac = o
            .string("VtepMAC")
            .map_err(|e| e.to_string())?
            .ok_or("no VtepMAC")?;
        Ok(Self {
            vni: o.uint("VNI").map_err(|e| e.to_string())?.unwrap_or(0),
            vtep_mac: mac
                .parse()
                .map_err(|e: flannel_dataplane::BadMac| e.to_string())?,
        })
    }

    /// Both decodings of `data` (for the fuzz target): the fast one, where it answers, and the
    /// general one.
    #[doc(hidden)]
    pub fn decodings(data: &RawJson) -> (Option<Result<Self, String>>, Result<Self, String>) {
        (
            Self::from_canonical(data.as_str()),
            Self::from_value(&data.to_value(), "BackendData"),
        )
    }
}

/// The VTEP MAC in backend data this node published before, if it is for `vni` and usable as a
/// device address (unicast).
pub fn remembered_mac(data: Option<&RawJson>, vni: u64) -> Option<MacAddr> {
    let d = PeerData::from_data(data, "BackendData").ok()?;
    let unicast = d.vtep_mac.0[0] & 1 == 0 && d.vtep_mac.0 != [0; 6];
    (d.vni == vni && unicast).then_some(d.vtep_mac)
}

/// Everything [`desired_state`] needs besides the leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The IPv4 side, `flannel.<VNI>`, unless the network is IPv6-only.
    pub ipv4: Option<FamilyTopology>,
    /// The external interface's index.
    pub ext_index: u32,
    /// The external interface's networks (for DirectRouting's "is the peer directly reachable").
    pub ext_networks: Vec<IpNet>,
    /// Whether DirectRouting is on.
    pub direct_routing: bool,
    /// The IPv6 side, `flannel-v6.<VNI>`, when `EnableIPv6`.
    pub ipv6: Option<FamilyTopology>,
}

/// One address family of [`Topology`]: its vxlan device and networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyTopology {
    /// The cluster network of this family.
    pub network: IpNet,
    /// The own subnet of this family (never touched).
    pub own_subnet: IpNet,
    /// The family's vxlan device's index (`flannel.<VNI>` or `flannel-v6.<VNI>`).
    pub vxlan_index: u32,
}

/// The entries the kernel should hold for `leases` (pure). Leases of other backend types are ignored,
/// as Go flannel does; leases with unreadable data produce a warning.
pub fn desired_state(topo: &Topology, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
    let mut state = KernelState::default();
    let mut warnings = Vec::new();
    for lease in leases {
        if lease.attrs.backend_type != "vxlan" {
            continue;
        }
        if let (Some(v4), Some(subnet)) = (&topo.ipv4, lease.subnet()) {
            let peer = Peer {
                subnet: IpNet::V4(subnet),
                gw: IpAddr::V4(subnet.network()),
                public_ip: IpAddr::V4(lease.attrs.public_ip),
                data: || PeerData::from_lease(lease),
            };
            peer.add_to(&mut state, &mut warnings, topo, v4.vxlan_index, lease);
        }
        if let (Some(v6), Some(subnet), Some(public)) =
            (&topo.ipv6, lease.ipv6_subnet(), lease.attrs.public_ipv6)
        {
            let peer = Peer {
                subnet: IpNet::V6(subnet),
                gw: IpAddr::V6(subnet.network()),
                public_ip: IpAddr::V6(public),
                data: || PeerData::from_lease_v6(lease),
            };
            peer.add_to(&mut state, &mut warnings, topo, v6.vxlan_index, lease);
        }
    }
    let mut own = Ownership {
        gateway_route_oifs: if topo.direct_routing {
            vec![topo.ext_index]
        } else {
            vec![]
        },
        ..Default::default()
    };
    for family in [&topo.ipv4, &topo.ipv6].into_iter().flatten() {
        own.networks.push(family.network);
        own.route_oifs.push(family.vxlan_index);
        own.keep.push(family.own_subnet);
        own.neigh_ifindexes.push(family.vxlan_index);
        own.fdb_ifindexes.push(family.vxlan_index);
    }
    (state, own, warnings)
}

/// One family of one peer lease.
struct Peer<F> {
    subnet: IpNet,
    /// The peer subnet's network address: the next hop on the vxlan device.
    gw: IpAddr,
    public_ip: IpAddr,
    data: F,
}

impl<F: Fn() -> Result<PeerData, String>> Peer<F> {
    /// Go flannel's entries for this peer: a direct route (DirectRouting, peer on-link), else
    /// neighbour + FDB + onlink route on the vxlan device `index`.
    fn add_to(
        self,
        state: &mut KernelState,
        warnings: &mut Vec<String>,
        topo: &Topology,
        index: u32,
        lease: &Lease,
    ) {
        if topo.direct_routing
            && topo
                .ext_networks
                .iter()
                .any(|n| n.contains(&self.public_ip))
        {
            state.routes.insert(Route {
                dst: self.subnet,
                gateway: Some(self.public_ip),
                oif: topo.ext_index,
                onlink: false,
            });
            return;
        }
        let data = match (self.data)() {
            Ok(d) => d,
            Err(e) => {
                warnings.push(format!(
                    "ignoring vxlan lease {} for {}: bad backend data: {e}",
                    lease.key, self.subnet
                ));
                return;
            }
        };
        state.neighs.insert(Neigh {
            ifindex: index,
            ip: self.gw,
            mac: data.vtep_mac,
        });
        state.fdb.insert(Fdb {
            ifindex: index,
            mac: data.vtep_mac,
            dst: self.public_ip,
        });
        state.routes.insert(Route {
            dst: self.subnet,
            gateway: Some(self.gw),
            oif: index,
            onlink: true,
        });
    }
}

/// The registered backend.
#[derive(Debug)]
pub struct VxlanBackend {
    ctx: BackendContext,
}

impl VxlanBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

/// Creates or reuses `flannel.<VNI>` and returns its index and MAC. A compatible existing device is
/// reused as is (keeping its MAC); an incompatible one is deleted and recreated.
async fn ensure_device(nl: &dyn LinkOps, spec: &VxlanSpec) -> Result<(u32, MacAddr), BackendError> {
    if let Some(link) = nl.link_by_name(&spec.name).await? {
        let compatible = link.vxlan.as_ref().is_some_and(|have| {
            let want = &spec.attrs;
            have.vni == want.vni
                && (have.link.is_none() || want.link.is_none() || have.link == want.link)
                && (have.local.is_none() || want.local.is_none() || have.local == want.local)
                && (have.port == 0 || want.port == 0 || have.port == want.port)
                && have.gbp == want.gbp
        });
        match (compatible, link.mac) {
            (true, Some(mac)) => return Ok((link.index, mac)),
            _ => {
                warn!(device = %spec.name, "existing device is incompatible with the config; recreating it");
                nl.delete_link(link.index).await?;
            }
        }
    }
    nl.create_vxlan(spec).await?;
    let link = nl.link_by_name(&spec.name).await?.ok_or_else(|| {
        BackendError::Other(format!("{} vanished right after it was created", spec.name))
    })?;
    Ok((link.index, link.mac.unwrap_or(spec.mac)))
}

#[async_trait]
impl Backend for VxlanBackend {
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let opts = VxlanOptions::parse(&config.backend)?;
        let ext = self.ctx.ext_iface.clone();
        let local = match config.network() {
            Some(_) => Some(
                ext.iface_addr
                    .ok_or_else(|| bad(format!("interface {} has no IPv4 address", ext.name)))?,
            ),
            None => None,
        };
        let v6_addrs = match config.ipv6_network() {
            Some(_) => Some(ext.require_ipv6().map_err(bad)?),
            None => None,
        };
        let nl = Netlink::new()?;
        let underlay_mtu = opts.mtu.unwrap_or(ext.mtu);
        // Go's figure (50 bytes of headers over IPv4); an IPv6-only network reports its device's.
        let mtu = match local {
            Some(_) => underlay_mtu.saturating_sub(50),
            None => underlay_mtu.saturating_sub(70),
        };
        let attrs = |local: IpAddr| VxlanAttrs {
            vni: opts.vni,
            link: Some(ext.index),
            local: Some(local),
            port: opts.port,
            learning: opts.learning,
            gbp: opts.gbp,
        };
        // A device that exists keeps its MAC; a new one (after a reboot) takes the MAC this node
        // published before, when the store remembers it, so peers' entries stay valid.
        let previous = self.ctx.subnet_manager.previous_attrs().await;
        let remembered = |data: Option<&RawJson>| {
            remembered_mac(data, u64::from(opts.vni)).unwrap_or_else(MacAddr::random_local)
        };
        // `flannel.<VNI>` over the IPv4 underlay, `flannel-v6.<VNI>` over the IPv6 one (70 bytes of
        // headers), each as its family is in use.
        let spec = local.map(|l| VxlanSpec {
            name: opts.device_name(),
            attrs: attrs(IpAddr::V4(l)),
            mac: remembered(previous.as_ref().and_then(|p| p.backend_data.as_ref())),
            mtu: underlay_mtu.saturating_sub(50),
        });
        let spec6 = v6_addrs.map(|(l, _)| VxlanSpec {
            name: opts.device_name_v6(),
            attrs: attrs(IpAddr::V6(l)),
            mac: remembered(previous.as_ref().and_then(|p| p.backend_v6_data.as_ref())),
            mtu: underlay_mtu.saturating_sub(70),
        });
        let mut data = [None, None];
        for (spec, data) in [spec, spec6].into_iter().zip(&mut data) {
            if let Some(mut spec) = spec {
                let (index, mac) = ensure_device(&nl, &spec).await?;
                spec.mac = mac;
                info!(device = %spec.name, %mac, index, "vxlan device ready");
                *data = Some(spec);
            }
        }
        let [spec, spec6] = data;
        let lease_data = |s: &VxlanSpec| {
            RawJson::from_value(&serde_json::json!({"VNI": opts.vni, "VtepMAC": s.mac.to_string()}))
        };
        let attrs = LeaseAttrs {
            public_ip: ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: v6_addrs.map(|(_, public)| public),
            backend_type: "vxlan".into(),
            backend_data: spec.as_ref().map(lease_data),
            backend_v6_data: spec6.as_ref().map(lease_data),
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        let side = |spec: Option<VxlanSpec>, nets: Option<(IpNet, IpNet)>| {
            let (spec, (network, own_subnet)) = spec.zip(nets)?;
            Some(Side {
                spec,
                network,
                own_subnet,
                index: 0,
            })
        };
        let v4 = flannel_core::backend::ipv4_networks(config, &lease)?;
        let v6 = flannel_core::backend::ipv6_networks(config, &lease)?;
        let mut model = VxlanModel {
            nl,
            ext,
            opts,
            v4: side(spec, v4.map(|(n, s)| (IpNet::V4(n), IpNet::V4(s)))),
            v6: side(spec6, v6.map(|(n, s)| (IpNet::V6(n), IpNet::V6(s)))),
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
struct VxlanModel {
    nl: Netlink,
    ext: ExternalInterface,
    opts: VxlanOptions,
    /// `flannel.<VNI>` and the IPv4 networks, unless the network is IPv6-only.
    v4: Option<Side>,
    /// `flannel-v6.<VNI>` and the IPv6 networks, with `EnableIPv6`.
    v6: Option<Side>,
}

/// One family's vxlan device and networks.
#[derive(Debug)]
struct Side {
    spec: VxlanSpec,
    network: IpNet,
    own_subnet: IpNet,
    index: u32,
}

impl Side {
    fn topology(&self) -> FamilyTopology {
        FamilyTopology {
            network: self.network,
            own_subnet: self.own_subnet,
            vxlan_index: self.index,
        }
    }
}

/// Makes sure the device of `spec` exists (recreated with the same MAC when it went), holds only
/// `addr` inside `network`, and is up; its index.
async fn keep_device(
    nl: &dyn LinkOps,
    spec: &VxlanSpec,
    addr: IpNet,
    network: IpNet,
) -> Result<u32, BackendError> {
    let link = match nl.link_by_name(&spec.name).await? {
        Some(l) if l.vxlan.is_some() => l,
        _ => {
            warn!(device = %spec.name, mac = %spec.mac, "vxlan device is missing; recreating it with the same MAC");
            let (index, _) = ensure_device(nl, spec).await?;
            nl.link_by_name(&spec.name)
                .await?
                .filter(|l| l.index == index)
                .ok_or_else(|| {
                    BackendError::Other(format!("{} could not be recreated", spec.name))
                })?
        }
    };
    nl.ensure_only_address(link.index, addr, network).await?;
    if !link.up {
        nl.set_up(link.index).await?;
    }
    Ok(link.index)
}

#[async_trait]
impl Model for VxlanModel {
    async fn prepare(&mut self) -> Result<(), BackendError> {
        if let Some(v6) = &self.v6 {
            // As Go: no router advertisements on the IPv6 device (best effort).
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv6/conf/{}/accept_ra", v6.spec.name),
                "0",
            );
        }
        for side in [self.v4.as_mut(), self.v6.as_mut()].into_iter().flatten() {
            // The subnet's network address alone (/32, /128): no broadcast routes.
            let own = side.own_subnet.network();
            let addr = IpNet::new(own, if own.is_ipv4() { 32 } else { 128 })
                .map_err(|e| BackendError::Other(e.to_string()))?;
            side.index = keep_device(&self.nl, &side.spec, addr, side.network).await?;
        }
        Ok(())
    }

    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
        let topo = Topology {
            ipv4: self.v4.as_ref().map(Side::topology),
            ext_index: self.ext.index,
            ext_networks: self.ext.iface_networks.clone(),
            direct_routing: self.opts.direct_routing,
            ipv6: self.v6.as_ref().map(Side::topology),
        };
        desired_state(&topo, leases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_dataplane::{FakeKernel, diff};
    use serde_json::json;

    #[test]
    fn the_lease_data_flannel_writes_is_decoded_without_a_json_tree() {
        // What Go's flanneld writes, as a lease holds it.
        let go = br#"{"PublicIP":"10.0.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let attrs = flannel_core::LeaseAttrs::from_json(go).unwrap();
        let data = attrs.backend_data.unwrap();
        let want = PeerData {
            vni: 1,
            vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap(),
        };
        assert_eq!(
            PeerData::decodings(&data),
            (Some(Ok(want.clone())), Ok(want))
        );
        // Other shapes go the general way, with Go's rules.
        let other =
            flannel_core::RawJson::from_value(&json!({"vni": 2, "VTEPMAC": "aa:bb:cc:dd:ee:ff"}));
        let (fast, general) = PeerData::decodings(&other);
        assert_eq!(fast, None);
        assert_eq!(general.unwrap().vni, 2);
        let bad = flannel_core::RawJson::from_value(&json!({"VNI": 1, "VtepMAC": "zz"}));
        let (fast, general) = PeerData::decodings(&bad);
        assert!(fast.as_ref().is_some_and(Result::is_err));
        assert_eq!(fast.unwrap(), general);
    }

    #[test]
    fn remembered_mac_only_for_the_same_vni_and_unicast() {
        let d = |v: serde_json::Value| RawJson::from_value(&v);
        let mac: MacAddr = "12:c6:65:89:b4:e3".parse().unwrap();
        let ok = d(json!({"VNI": 1, "VtepMAC": "12:c6:65:89:b4:e3"}));
        assert_eq!(remembered_mac(Some(&ok), 1), Some(mac));
        assert_eq!(remembered_mac(Some(&ok), 2), None, "another VNI");
        assert_eq!(remembered_mac(None, 1), None);
        let multicast = d(json!({"VNI": 1, "VtepMAC": "13:c6:65:89:b4:e3"}));
        assert_eq!(remembered_mac(Some(&multicast), 1), None);
        let junk = d(json!({"VNI": 1, "VtepMAC": "nope"}));
        assert_eq!(remembered_mac(Some(&junk), 1), None);
        assert_eq!(remembered_mac(Some(&d(json!(null))), 1), None);
    }

    fn lease(key: &str, ip: &str, data: serde_json::Value, ty: &str) -> Lease {
        flannel_core::testing::peer_lease(key, ip, ty, Some(data))
    }

    fn topo(direct: bool) -> Topology {
        Topology {
            ipv4: Some(FamilyTopology {
                network: "10.5.0.0/16".parse().unwrap(),
                own_subnet: "10.5.1.0/24".parse().unwrap(),
                vxlan_index: 7,
            }),
            ext_index: 2,
            ext_networks: vec!["192.168.0.0/24".parse().unwrap()],
            direct_routing: direct,
            ipv6: None,
        }
    }

    #[test]
    fn options_parse_like_go() {
        let o = VxlanOptions::parse(&json!({"Type":"vxlan"})).unwrap();
        assert_eq!(
            (o.vni, o.port, o.gbp, o.learning, o.direct_routing, o.mtu),
            (1, 0, false, false, false, None)
        );
        assert_eq!(o.device_name(), "flannel.1");
        let o = VxlanOptions::parse(
            &json!({"type":"vxlan","vni":42,"port":4789,"directrouting":true,"GBP":true}),
        )
        .unwrap();
        assert_eq!(
            (o.vni, o.port, o.gbp, o.direct_routing),
            (42, 4789, true, true)
        );
        for (bad, want) in [
            (json!({"VNI": 70000}), "1..65535"),
            (json!({"VNI": "1"}), "Backend.VNI"),
            (json!({"Port": 70000}), "not a UDP port"),
            (json!({"DirectRouting": "yes"}), "Backend.DirectRouting"),
        ] {
            let e = VxlanOptions::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn peer_entries_match_go() {
        let peers = [
            lease(
                "10.5.2.0-24",
                "192.168.0.2",
                json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}),
                "vxlan",
            ),
            lease(
                "10.5.3.0-24",
                "192.168.9.3",
                json!({"vni":1,"vtepmac":"AA:BB:CC:DD:EE:03"}),
                "vxlan",
            ),
            lease("10.5.4.0-24", "192.168.0.4", json!(null), "host-gw"),
            lease(
                "10.5.5.0-24",
                "192.168.0.5",
                json!({"VNI":1,"VtepMAC":"nope"}),
                "vxlan",
            ),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (s, own, warnings) = desired_state(&topo(false), &refs);
        let routes: Vec<String> = s.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            routes,
            vec![
                "10.5.2.0/24 via 10.5.2.0 dev #7 onlink",
                "10.5.3.0/24 via 10.5.3.0 dev #7 onlink"
            ]
        );
        let neighs: Vec<String> = s.neighs.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            neighs,
            vec![
                "10.5.2.0 lladdr aa:bb:cc:dd:ee:02 dev #7",
                "10.5.3.0 lladdr aa:bb:cc:dd:ee:03 dev #7"
            ]
        );
        let fdb: Vec<String> = s.fdb.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            fdb,
            vec![
                "aa:bb:cc:dd:ee:02 dst 192.168.0.2 dev #7",
                "aa:bb:cc:dd:ee:03 dst 192.168.9.3 dev #7"
            ]
        );
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("10.5.5.0-24"));
        assert_eq!(own.keep, vec!["10.5.1.0/24".parse::<IpNet>().unwrap()]);
        assert!(own.gateway_route_oifs.is_empty());
    }

    #[test]
    fn direct_routing_only_inside_the_segment() {
        let peers = [
            lease(
                "10.5.2.0-24",
                "192.168.0.2",
                json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}),
                "vxlan",
            ),
            lease(
                "10.5.3.0-24",
                "192.168.9.3",
                json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:03"}),
                "vxlan",
            ),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (s, own, _) = desired_state(&topo(true), &refs);
        let routes: Vec<String> = s.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            routes,
            vec![
                "10.5.2.0/24 via 192.168.0.2 dev #2",
                "10.5.3.0/24 via 10.5.3.0 dev #7 onlink"
            ]
        );
        assert_eq!(s.neighs.len(), 1);
        assert_eq!(own.gateway_route_oifs, vec![2]);
    }

    #[tokio::test]
    async fn departed_peer_is_cleaned_on_the_fake_kernel() {
        let k = FakeKernel::default();
        let peers = [lease(
            "10.5.2.0-24",
            "192.168.0.2",
            json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}),
            "vxlan",
        )];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (s, own, _) = desired_state(&topo(false), &refs);
        flannel_dataplane::reconcile_once(&k, &s, &own)
            .await
            .unwrap();
        assert_eq!(k.state.lock().unwrap().len(), 3);
        let (empty, own, _) = desired_state(&topo(false), &[]);
        flannel_dataplane::reconcile_once(&k, &empty, &own)
            .await
            .unwrap();
        assert!(k.state.lock().unwrap().is_empty());
        assert!(diff(&empty, &k.state.lock().unwrap(), &own).is_empty());
    }

    fn spec(vni: u32, mac: &str) -> VxlanSpec {
        VxlanSpec {
            name: format!("flannel.{vni}"),
            attrs: VxlanAttrs {
                vni,
                link: Some(2),
                local: Some("192.168.0.1".parse().unwrap()),
                port: 0,
                learning: false,
                gbp: false,
            },
            mac: mac.parse().unwrap(),
            mtu: 1450,
        }
    }

    /// prepare()'s device handling without root: create, reuse (keeping the MAC), recreate when
    /// incompatible, and repair (up, only our address in the network).
    #[tokio::test]
    async fn devices_are_created_reused_recreated_and_repaired() {
        use flannel_dataplane::FakeKernel;
        let k = FakeKernel::default();
        // Missing: created with the spec's MAC.
        let (index, mac) = ensure_device(&k, &spec(1, "0e:00:00:00:00:01"))
            .await
            .unwrap();
        assert_eq!(mac.to_string(), "0e:00:00:00:00:01");
        // Present and compatible: reused as is, with its own MAC (not the new random one).
        let (again, mac2) = ensure_device(&k, &spec(1, "0e:00:00:00:00:99"))
            .await
            .unwrap();
        assert_eq!((again, mac2), (index, mac));
        // Incompatible (another local address): recreated.
        let mut other = spec(1, "0e:00:00:00:00:02");
        other.attrs.local = Some("192.168.0.7".parse().unwrap());
        let (new_index, new_mac) = ensure_device(&k, &other).await.unwrap();
        assert_ne!(new_index, index);
        assert_eq!(new_mac.to_string(), "0e:00:00:00:00:02");
        // Repair: a down device with a stray address in the network is set up with only ours.
        let addr: IpNet = "10.5.1.0/32".parse().unwrap();
        let network: IpNet = "10.5.0.0/16".parse().unwrap();
        k.links.lock().unwrap().get_mut("flannel.1").unwrap().addrs = vec![
            "10.5.9.0/32".parse().unwrap(),
            "169.254.1.1/16".parse().unwrap(),
        ];
        let kept = keep_device(&k, &other, addr, network).await.unwrap();
        assert_eq!(kept, new_index);
        let link = k.links.lock().unwrap()["flannel.1"].clone();
        assert!(link.state.up);
        assert_eq!(
            link.addrs,
            vec!["169.254.1.1/16".parse::<IpNet>().unwrap(), addr],
            "the stray address in the network goes, others stay"
        );
        // Deleted: recreated with the same MAC.
        k.links.lock().unwrap().clear();
        keep_device(&k, &other, addr, network).await.unwrap();
        let link = k.links.lock().unwrap()["flannel.1"].clone();
        assert_eq!(link.state.mac.unwrap().to_string(), "0e:00:00:00:00:02");
        assert!(link.state.up);
    }

    /// The same leases twice: the second pass changes nothing, also with hostile leases in the set
    /// (refused by the lease policy: outside the network, half the internet, the underlay).
    #[tokio::test]
    async fn the_same_input_twice_changes_nothing_the_second_time() {
        // The host before flannel: the underlay's connected route.
        let k = FakeKernel::with_link_routes(&[("192.168.0.0/24", 2)]);
        let data = json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"});
        let peers = [
            lease("10.5.2.0-24", "192.168.0.2", data.clone(), "vxlan"),
            lease("10.99.0.0-16", "192.168.0.3", data.clone(), "vxlan"),
            lease("0.0.0.0-1", "192.168.0.4", data.clone(), "vxlan"),
            lease("192.168.0.0-24", "192.168.0.5", data, "vxlan"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        for direct in [false, true] {
            let t = topo(direct);
            let (allowed, refused) = k
                .reconcile_twice("10.5.1.0-24".parse().unwrap(), &refs, |l| {
                    let (s, own, _) = desired_state(&t, l);
                    (s, own)
                })
                .await;
            assert_eq!((allowed.len(), refused.len()), (1, 3), "{refused:?}");
        }
    }

    /// A dual-stack topology (`flannel-v6.1` is #8, the external interface on fd00:20::/64 too) and an
    /// on-link dual-stack peer with both data fields.
    fn dual_setup(direct: bool) -> (Topology, Lease) {
        let mut t = topo(direct);
        t.ext_networks.push("fd00:20::/64".parse().unwrap());
        t.ipv6 = Some(FamilyTopology {
            network: "fd00:5::/48".parse().unwrap(),
            own_subnet: "fd00:5:0:1::/64".parse().unwrap(),
            vxlan_index: 8,
        });
        let mut peer = lease(
            "10.5.2.0-24&fd00:5:0:2::-64",
            "192.168.0.2",
            json!({"VNI":1,"VtepMAC":"aa:00:00:00:00:02"}),
            "vxlan",
        );
        peer.attrs.public_ipv6 = Some("fd00:20::2".parse().unwrap());
        peer.attrs.backend_v6_data = Some(RawJson::from_value(
            &json!({"VNI":1,"VtepMAC":"bb:00:00:00:00:02"}),
        ));
        (t, peer)
    }

    #[test]
    fn dual_stack_adds_go_s_ipv6_entries_on_flannel_v6() {
        let (t, dual) = dual_setup(false);
        // IPv6 part without BackendV6Data: the IPv4 entries stay, the IPv6 ones are skipped with a
        // warning.
        let mut no_v6_data = lease(
            "10.5.3.0-24&fd00:5:0:3::-64",
            "192.168.0.3",
            json!({"VNI":1,"VtepMAC":"aa:00:00:00:00:03"}),
            "vxlan",
        );
        no_v6_data.attrs.public_ipv6 = Some("fd00:20::3".parse().unwrap());
        let (s, own, warnings) = desired_state(&t, &[&dual, &no_v6_data]);
        assert_eq!(
            s.routes.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            vec![
                "10.5.2.0/24 via 10.5.2.0 dev #7 onlink",
                "10.5.3.0/24 via 10.5.3.0 dev #7 onlink",
                "fd00:5:0:2::/64 via fd00:5:0:2:: dev #8 onlink",
            ]
        );
        assert!(s.neighs.contains(&Neigh {
            ifindex: 8,
            ip: "fd00:5:0:2::".parse().unwrap(),
            mac: "bb:00:00:00:00:02".parse().unwrap(),
        }));
        assert!(s.fdb.contains(&Fdb {
            ifindex: 8,
            mac: "bb:00:00:00:00:02".parse().unwrap(),
            dst: "fd00:20::2".parse().unwrap(),
        }));
        assert_eq!((s.neighs.len(), s.fdb.len()), (3, 3));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("BackendV6Data"), "{}", warnings[0]);
        assert!(own.route_oifs.contains(&8) && own.fdb_ifindexes.contains(&8));
        assert!(own.keep.contains(&"fd00:5:0:1::/64".parse().unwrap()));
    }

    #[test]
    fn dual_stack_direct_routing_routes_on_link_ipv6_peers_directly() {
        let (t, near) = dual_setup(true);
        let mut far = near.clone();
        far.key = "10.5.3.0-24&fd00:5:0:3::-64".parse().unwrap();
        far.attrs.public_ip = "192.168.9.3".parse().unwrap();
        far.attrs.public_ipv6 = Some("fd00:99::3".parse().unwrap());
        let (s, own, _) = desired_state(&t, &[&near, &far]);
        let routes: Vec<String> = s.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            routes,
            vec![
                "10.5.2.0/24 via 192.168.0.2 dev #2",
                "10.5.3.0/24 via 10.5.3.0 dev #7 onlink",
                "fd00:5:0:2::/64 via fd00:20::2 dev #2",
                "fd00:5:0:3::/64 via fd00:5:0:3:: dev #8 onlink",
            ]
        );
        assert_eq!(own.gateway_route_oifs, vec![2]);
    }

    #[test]
    fn an_ipv6_only_network_has_only_flannel_v6_entries() {
        let (mut t, _) = dual_setup(false);
        t.ipv4 = None;
        // As the Kubernetes subnet manager reads an IPv6-only node: no IPv4 part, no BackendData.
        let mut peer = lease("0.0.0.0-0&fd00:5:0:2::-64", "0.0.0.0", json!(null), "vxlan");
        peer.enable_ipv4 = false;
        peer.attrs.backend_data = None;
        peer.attrs.public_ipv6 = Some("fd00:20::2".parse().unwrap());
        peer.attrs.backend_v6_data = Some(RawJson::from_value(
            &json!({"VNI":1,"VtepMAC":"bb:00:00:00:00:02"}),
        ));
        let (s, own, warnings) = desired_state(&t, &[&peer]);
        assert!(warnings.is_empty(), "{warnings:?}");
        let routes: Vec<String> = s.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            routes,
            vec!["fd00:5:0:2::/64 via fd00:5:0:2:: dev #8 onlink"]
        );
        assert_eq!((s.neighs.len(), s.fdb.len()), (1, 1));
        assert_eq!(own.networks, vec!["fd00:5::/48".parse::<IpNet>().unwrap()]);
        assert_eq!(
            (own.route_oifs, own.neigh_ifindexes, own.fdb_ifindexes),
            (vec![8], vec![8], vec![8])
        );
    }
}
