//! Peers as data: what a lease publishes (`{"PublicKey":"…","Port":51820}`, as upstream writes it),
//! the peers each device should have for the current leases, and the difference to the peers it has.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use flannel_core::gojson::GoObject;
use flannel_core::{Lease, LeaseAttrs, RawJson};
use ipnet::IpNet;

use crate::key::Key;
use crate::options::Mode;

/// What a node publishes in its lease's `BackendData` (and `BackendV6Data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerData {
    /// The node's WireGuard public key.
    pub public_key: Key,
    /// The port its device listens on; 0 from old upstream versions that did not publish one.
    pub port: u16,
}

impl PeerData {
    /// The JSON upstream writes (field order and names as Go's `json.Marshal`).
    pub fn to_json(&self) -> RawJson {
        RawJson::from_value(&serde_json::json!({
            "PublicKey": self.public_key.to_string(),
            "Port": self.port,
        }))
    }

    /// Decodes backend data from a lease (untrusted: any JSON may be there).
    pub fn decode(data: Option<&RawJson>, field: &str) -> Result<Self, String> {
        let data = data.ok_or_else(|| format!("no {field}"))?;
        match Self::from_canonical(data.as_str(), field) {
            Some(decoded) => decoded,
            None => Self::from_value(&data.to_value(), field),
        }
    }

    /// Decodes the canonical text, `{"PublicKey":"<key>","Port":<n>}` (compact, in this order:
    /// what upstream's and this flanneld write) without building a JSON tree, as every pass
    /// decodes every peer's data. `None` for any other text, decoded the general way; where this
    /// answers, it answers as that does (the `wireguard_lease` fuzz target checks it).
    fn from_canonical(text: &str, field: &str) -> Option<Result<Self, String>> {
        use flannel_core::gojson::{Canonical, canonical_fields};
        let [key, port] = canonical_fields(
            text,
            [("PublicKey", Canonical::Str), ("Port", Canonical::Uint)],
        )?;
        // A port out of range is explained the general way.
        let port: u16 = port.parse().ok()?;
        Some(
            key.parse::<Key>()
                .map(|public_key| Self { public_key, port })
                .map_err(|e| format!("{field}.PublicKey: {e}")),
        )
    }

    /// Decodes backend data the general way (Go's rules: keys in any case, unknown keys ignored).
    fn from_value(value: &serde_json::Value, field: &str) -> Result<Self, String> {
        let o = GoObject::new(value, field).map_err(|e| e.to_string())?;
        let key = o
            .string("PublicKey")
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{field} has no PublicKey"))?;
        let public_key = key
            .parse::<Key>()
            .map_err(|e| format!("{field}.PublicKey: {e}"))?;
        let port = o.uint("Port").map_err(|e| e.to_string())?.unwrap_or(0);
        let port =
            u16::try_from(port).map_err(|_| format!("{field}.Port {port} is not a UDP port"))?;
        Ok(Self { public_key, port })
    }

    /// Both decodings of `data` (for the fuzz target): the fast one, where it answers, and the
    /// general one.
    #[doc(hidden)]
    pub fn decodings(
        data: &RawJson,
        field: &str,
    ) -> (Option<Result<Self, String>>, Result<Self, String>) {
        (
            Self::from_canonical(data.as_str(), field),
            Self::from_value(&data.to_value(), field),
        )
    }
}

/// This node's lease attributes: upstream writes the same data into `BackendData` (IPv4 port) and
/// `BackendV6Data` (IPv6 port) for the families it runs.
pub fn lease_attrs(
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    families: (bool, bool),
    public_key: Key,
    ports: (u16, u16),
) -> LeaseAttrs {
    let (ipv4, ipv6) = families;
    LeaseAttrs {
        public_ip: public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        public_ipv6,
        backend_type: "wireguard".into(),
        backend_data: ipv4.then(|| {
            PeerData {
                public_key,
                port: ports.0,
            }
            .to_json()
        }),
        backend_v6_data: ipv6.then(|| {
            PeerData {
                public_key,
                port: ports.1,
            }
            .to_json()
        }),
    }
}

/// One peer of a WireGuard device (`wg set <dev> peer <key> endpoint <ep> allowed-ips <ips>
/// [preshared-key <psk>] [persistent-keepalive <s>]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's public key.
    pub public_key: Key,
    /// Where it is reached.
    pub endpoint: SocketAddr,
    /// Its subnet(s), sorted.
    pub allowed_ips: Vec<IpNet>,
    /// The pre-shared key.
    pub preshared_key: Option<Key>,
    /// Keep-alive interval.
    pub keepalive: Option<Duration>,
}

/// What the desired peers depend on besides the leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerContext {
    /// `Mode`.
    pub mode: Mode,
    /// Our ports, used for peers that publish none (upstream's fallback).
    pub listen_port: u16,
    /// Our IPv6 port.
    pub listen_port_v6: u16,
    /// Whether the network runs IPv4 and IPv6.
    pub families: (bool, bool),
    /// Our own addresses (for `Mode: auto`).
    pub ext_addr: Option<Ipv4Addr>,
    /// Our IPv6 address.
    pub ext_v6_addr: Option<Ipv6Addr>,
    /// Our own public key: a lease that claims it is refused.
    pub own_key: Key,
    /// `PSK`.
    pub psk: Option<Key>,
    /// `PersistentKeepaliveInterval`.
    pub keepalive: Option<Duration>,
}

/// The peers of each device, by public key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredPeers {
    /// `flannel-wg` (the only device outside `Mode: separate`).
    pub main: BTreeMap<Key, PeerSpec>,
    /// `flannel-wg-v6` (`Mode: separate` with IPv6).
    pub v6: BTreeMap<Key, PeerSpec>,
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private(),
        IpAddr::V6(a) => (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}

impl PeerContext {
    /// Upstream's choice for `Mode: auto`: IPv6 only if the peer has a public IPv6 address, its
    /// IPv4 address is private (or we have none), and we have a public IPv6 address ourselves.
    /// Where either end has no IPv4 address at all (an IPv6-only network), IPv6 whatever its
    /// addresses: upstream would "default to IPv4 and cross fingers" there, an endpoint of 0.0.0.0.
    fn auto_uses_ipv6(&self, peer_v4: Ipv4Addr, peer_v6: Option<Ipv6Addr>) -> bool {
        let Some(v6) = peer_v6 else { return false };
        if peer_v4.is_unspecified() || self.ext_addr.is_none() {
            return true;
        }
        if !peer_v4.is_private() && self.ext_addr.is_some() {
            return false;
        }
        !is_private(IpAddr::V6(v6)) && self.ext_v6_addr.is_some_and(|a| !is_private(IpAddr::V6(a)))
    }

    fn spec(&self, key: Key, endpoint: SocketAddr, mut allowed_ips: Vec<IpNet>) -> PeerSpec {
        allowed_ips.sort();
        PeerSpec {
            public_key: key,
            endpoint,
            allowed_ips,
            preshared_key: self.psk,
            keepalive: self.keepalive,
        }
    }

    /// The peers one lease asks for, as (device is v6, spec).
    fn peers_of(&self, lease: &Lease) -> Result<Vec<(bool, PeerSpec)>, String> {
        let a = &lease.attrs;
        if a.backend_type != "wireguard" {
            return Err(format!(
                "its backend is {:?}, not wireguard",
                a.backend_type
            ));
        }
        let (ipv4, ipv6) = self.families;
        let v4 = (ipv4 && lease.enable_ipv4)
            .then(|| PeerData::decode(a.backend_data.as_ref(), "BackendData"))
            .transpose()?;
        let v6 = (ipv6 && lease.key.ipv6.is_some())
            .then(|| PeerData::decode(a.backend_v6_data.as_ref(), "BackendV6Data"))
            .transpose()?;
        let v4_endpoint = |d: &PeerData| -> Result<SocketAddr, String> {
            if a.public_ip.is_unspecified() {
                return Err("it has no PublicIP".into());
            }
            let port = if d.port == 0 {
                self.listen_port
            } else {
                d.port
            };
            Ok(SocketAddr::new(IpAddr::V4(a.public_ip), port))
        };
        let v6_endpoint = |d: &PeerData| -> Result<SocketAddr, String> {
            let ip = a.public_ipv6.ok_or("it has no PublicIPv6")?;
            let port = if d.port == 0 {
                self.listen_port_v6
            } else {
                d.port
            };
            Ok(SocketAddr::new(IpAddr::V6(ip), port))
        };
        let subnet_v4 = lease.subnet().map(IpNet::V4);
        let subnet_v6 = lease.key.ipv6.map(IpNet::V6);
        let mut out = Vec::new();
        if self.mode == Mode::Separate {
            if let (Some(d), Some(s)) = (v4, subnet_v4) {
                out.push((false, self.spec(d.public_key, v4_endpoint(&d)?, vec![s])));
            }
            if let (Some(d), Some(s)) = (v6, subnet_v6) {
                out.push((true, self.spec(d.public_key, v6_endpoint(&d)?, vec![s])));
            }
            return Ok(out);
        }
        // One device: upstream takes the key from the IPv6 data when there is some.
        let Some(d) = v6.or(v4) else {
            return Ok(out);
        };
        let use_v6 = match self.mode {
            Mode::Ipv6 => true,
            Mode::Auto => self.auto_uses_ipv6(a.public_ip, a.public_ipv6),
            _ => false,
        };
        // The peer's one device listens on one port, whichever family reaches it: the port of its
        // IPv4 data where it has some (upstream's one-device nodes advertise ListenPortV6 in their
        // IPv6 data, a port their device does not listen on), else of its IPv6 data.
        let port = v4.or(v6).map_or(0, |x| x.port);
        let endpoint = if use_v6 {
            v6_endpoint(&PeerData { port, ..d })?
        } else {
            v4_endpoint(&PeerData { port, ..d })?
        };
        let allowed: Vec<IpNet> = [
            subnet_v4.filter(|_| v4.is_some()),
            subnet_v6.filter(|_| v6.is_some()),
        ]
        .into_iter()
        .flatten()
        .collect();
        out.push((false, self.spec(d.public_key, endpoint, allowed)));
        Ok(out)
    }
}

/// The peers each device should have for `leases` (the peers' leases, own lease excluded), and a
/// line for each lease that cannot be served. A public key claimed by more than one lease, or our
/// own key, is refused for all of them: WireGuard knows a peer by its key, and one key with two
/// leases' subnets would carry one node's traffic to another.
pub fn desired_peers(leases: &[&Lease], ctx: &PeerContext) -> (DesiredPeers, Vec<String>) {
    let mut warnings = Vec::new();
    let mut wanted: Vec<(bool, PeerSpec, &Lease)> = Vec::with_capacity(leases.len());
    for lease in leases {
        match ctx.peers_of(lease) {
            Ok(peers) => wanted.extend(peers.into_iter().map(|(v6, p)| (v6, p, *lease))),
            Err(why) => warnings.push(format!(
                "not adding the WireGuard peer of lease {}: {why}",
                lease.key
            )),
        }
    }
    // How many leases claim each key on each device (a lease makes one peer per device), and the
    // names of those that share one (rare: only they are spelled out).
    let mut claims: HashMap<(bool, Key), u32> = HashMap::with_capacity(wanted.len());
    for (v6, p, _) in &wanted {
        *claims.entry((*v6, p.public_key)).or_default() += 1;
    }
    let mut shared: BTreeMap<(bool, Key), BTreeSet<String>> = BTreeMap::new();
    for (v6, p, lease) in &wanted {
        if claims[&(*v6, p.public_key)] > 1 {
            shared
                .entry((*v6, p.public_key))
                .or_default()
                .insert(lease.key.to_string());
        }
    }
    let mut out = DesiredPeers::default();
    for (v6, p, lease) in wanted {
        if p.public_key == ctx.own_key {
            warnings.push(format!(
                "not adding the WireGuard peer of lease {}: it claims this node's own public key",
                lease.key
            ));
        } else if let Some(claimants) = shared.get(&(v6, p.public_key)) {
            let owner = lease.key.to_string();
            warnings.push(format!(
                "not adding the WireGuard peer of lease {owner}: its public key {} is also claimed by {}",
                p.public_key,
                claimants.iter().filter(|c| **c != owner).cloned().collect::<Vec<_>>().join(", ")
            ));
        } else if v6 {
            out.v6.insert(p.public_key, p);
        } else {
            out.main.insert(p.public_key, p);
        }
    }
    (out, warnings)
}

/// One change to a device's peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerOp {
    /// Remove the peer with this key.
    Remove(Key),
    /// Add the peer, or replace its endpoint, allowed IPs, pre-shared key and keep-alive.
    Set(PeerSpec),
}

/// The changes that turn a device's `actual` peers into `desired`: removals first (so a subnet that
/// moved to a new key is never claimed twice), then additions and updates.
pub fn diff_peers(
    desired: &BTreeMap<Key, PeerSpec>,
    actual: &BTreeMap<Key, PeerSpec>,
) -> Vec<PeerOp> {
    diff_peers_by(desired, actual.keys(), |k| actual.get(k))
}

/// [`diff_peers`] for a device that keeps its peers some other way: `keys` are its peers' keys and
/// `spec` looks one up (no copy of either side is made).
pub fn diff_peers_by<'a>(
    desired: &BTreeMap<Key, PeerSpec>,
    keys: impl Iterator<Item = &'a Key>,
    spec: impl Fn(&Key) -> Option<&'a PeerSpec>,
) -> Vec<PeerOp> {
    let mut ops: Vec<PeerOp> = keys
        .filter(|k| !desired.contains_key(k))
        .map(|k| PeerOp::Remove(*k))
        .collect();
    ops.extend(
        desired
            .iter()
            .filter(|(k, p)| spec(k) != Some(p))
            .map(|(_, p)| PeerOp::Set(p.clone())),
    );
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::SubnetKey;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn lease(subnet: &str, ip: &str, data: Option<serde_json::Value>) -> Lease {
        Lease {
            key: subnet.parse::<SubnetKey>().unwrap(),
            enable_ipv4: true,
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                backend_type: "wireguard".into(),
                backend_data: data.map(|d| RawJson::from_value(&d)),
                ..LeaseAttrs::default()
            },
            expiration: None,
            asof: 0,
        }
    }

    fn data(k: u8, port: u16) -> serde_json::Value {
        serde_json::json!({"PublicKey": key(k).to_string(), "Port": port})
    }

    fn ctx(mode: Mode) -> PeerContext {
        PeerContext {
            mode,
            listen_port: 51820,
            listen_port_v6: 51821,
            families: (true, false),
            ext_addr: Some("192.168.0.1".parse().unwrap()),
            ext_v6_addr: None,
            own_key: key(1),
            psk: None,
            keepalive: None,
        }
    }

    #[test]
    fn lease_data_is_upstreams_json() {
        let attrs = lease_attrs(
            Some("192.168.0.1".parse().unwrap()),
            None,
            (true, false),
            key(7),
            (51820, 51821),
        );
        assert_eq!(
            attrs.backend_data.as_ref().unwrap().as_str(),
            format!(r#"{{"PublicKey":"{}","Port":51820}}"#, key(7))
        );
        assert!(attrs.backend_v6_data.is_none());
        assert_eq!(attrs.backend_type, "wireguard");
        let back = PeerData::decode(attrs.backend_data.as_ref(), "BackendData").unwrap();
        assert_eq!(
            back,
            PeerData {
                public_key: key(7),
                port: 51820
            }
        );
    }

    #[test]
    fn the_canonical_text_is_decoded_fast_and_as_the_general_way_does() {
        let canonical = RawJson::from_value(&data(2, 5000));
        let (fast, general) = PeerData::decodings(&canonical, "BackendData");
        assert_eq!(
            fast,
            Some(Ok(PeerData {
                public_key: key(2),
                port: 5000
            }))
        );
        assert_eq!(fast, Some(general));
        // A bad key in the canonical shape: the same error either way.
        let bad = RawJson::from_value(&serde_json::json!({"PublicKey": "xyz", "Port": 1}));
        let (fast, general) = PeerData::decodings(&bad, "BackendData");
        assert!(fast.as_ref().is_some_and(Result::is_err));
        assert_eq!(fast, Some(general));
        // Other shapes (key case, order, a port out of range) are left to the general way.
        for other in [
            serde_json::json!({"publickey": key(2).to_string(), "Port": 1}),
            serde_json::json!({"Port": 1, "PublicKey": key(2).to_string()}),
            serde_json::json!({"PublicKey": key(2).to_string(), "Port": 65536}),
        ] {
            let (fast, general) = PeerData::decodings(&RawJson::from_value(&other), "BackendData");
            assert_eq!(fast, None, "{other}");
            assert!(general.is_ok() == (other["Port"] != 65536), "{other}");
        }
    }

    #[test]
    fn bad_lease_data_is_explained() {
        for (v, want) in [
            (None, "no BackendData"),
            (Some(serde_json::json!({})), "has no PublicKey"),
            (
                Some(serde_json::json!({"PublicKey": "xyz"})),
                "BackendData.PublicKey",
            ),
            (
                Some(serde_json::json!({"PublicKey": key(2).to_string(), "Port": 65536})),
                "not a UDP port",
            ),
            (Some(serde_json::json!([1, 2])), "BackendData"),
        ] {
            let raw = v.map(|v| RawJson::from_value(&v));
            let e = PeerData::decode(raw.as_ref(), "BackendData").unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn separate_mode_one_peer_per_lease_with_its_subnet() {
        let l2 = lease("10.5.2.0-24", "192.168.0.2", Some(data(2, 5000)));
        // An old upstream node that publishes no port: our own port is assumed.
        let l3 = lease("10.5.3.0-24", "192.168.0.3", Some(data(3, 0)));
        let (d, w) = desired_peers(&[&l2, &l3], &ctx(Mode::Separate));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(d.main.len(), 2);
        let p2 = &d.main[&key(2)];
        assert_eq!(p2.endpoint, "192.168.0.2:5000".parse().unwrap());
        assert_eq!(
            p2.allowed_ips,
            vec!["10.5.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            d.main[&key(3)].endpoint,
            "192.168.0.3:51820".parse().unwrap()
        );
        assert!(d.v6.is_empty());
    }

    #[test]
    fn unusable_and_conflicting_leases_are_refused_with_a_reason() {
        let mut other = lease("10.5.4.0-24", "192.168.0.4", Some(data(4, 0)));
        other.attrs.backend_type = "vxlan".into();
        let leases = [
            lease("10.5.2.0-24", "192.168.0.2", Some(data(2, 0))),
            lease("10.5.3.0-24", "192.168.0.3", Some(data(2, 0))),
            lease("10.5.5.0-24", "192.168.0.5", Some(data(1, 0))),
            lease("10.5.6.0-24", "0.0.0.0", Some(data(6, 0))),
            lease("10.5.7.0-24", "192.168.0.7", None),
            other,
            lease("10.5.8.0-24", "192.168.0.8", Some(data(8, 0))),
        ];
        let refs: Vec<&Lease> = leases.iter().collect();
        let (d, w) = desired_peers(&refs, &ctx(Mode::Separate));
        assert_eq!(
            d.main.keys().copied().collect::<Vec<_>>(),
            vec![key(8)],
            "only the good one"
        );
        let all = w.join("\n");
        for want in [
            "10.5.2.0-24: its public key",
            "also claimed by 10.5.3.0-24",
            "10.5.5.0-24: it claims this node's own public key",
            "10.5.6.0-24: it has no PublicIP",
            "10.5.7.0-24: no BackendData",
            "not wireguard",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn one_device_modes_carry_both_subnets() {
        let mut l = lease("10.5.2.0-24", "10.0.0.2", Some(data(2, 5000)));
        l.key = "10.5.2.0-24&fd00:5:2::-64".parse().unwrap();
        l.attrs.public_ipv6 = Some("2001:db8::2".parse().unwrap());
        l.attrs.backend_v6_data = Some(RawJson::from_value(&data(2, 5001)));
        let mut c = ctx(Mode::Ipv4);
        c.families = (true, true);
        let (d, w) = desired_peers(&[&l], &c);
        assert!(w.is_empty(), "{w:?}");
        let p = &d.main[&key(2)];
        assert_eq!(p.endpoint, "10.0.0.2:5000".parse().unwrap());
        assert_eq!(p.allowed_ips.len(), 2);
        c.mode = Mode::Ipv6;
        assert_eq!(
            desired_peers(&[&l], &c).0.main[&key(2)].endpoint,
            "[2001:db8::2]:5000".parse().unwrap(),
            "the port its one device listens on (its IPv4 data's), over IPv6"
        );
        // Auto: the peer's IPv4 address is private and both ends have public IPv6: IPv6.
        c.mode = Mode::Auto;
        c.ext_v6_addr = Some("2001:db8::1".parse().unwrap());
        assert!(desired_peers(&[&l], &c).0.main[&key(2)].endpoint.is_ipv6());
        // Without a public IPv6 address here, IPv4.
        c.ext_v6_addr = None;
        assert!(desired_peers(&[&l], &c).0.main[&key(2)].endpoint.is_ipv4());
        // An IPv6-only network (no IPv4 part, PublicIP 0.0.0.0, no IPv4 address here): IPv6, also
        // between private (ULA) addresses.
        let mut v6_only = lease("0.0.0.0-0", "0.0.0.0", None);
        v6_only.enable_ipv4 = false;
        v6_only.key = "0.0.0.0-0&fd00:5:3::-64".parse().unwrap();
        v6_only.attrs.public_ipv6 = Some("fd00:20::3".parse().unwrap());
        v6_only.attrs.backend_v6_data = Some(RawJson::from_value(&data(3, 51820)));
        let mut c6 = ctx(Mode::Auto);
        c6.families = (false, true);
        c6.ext_addr = None;
        c6.ext_v6_addr = Some("fd00:20::1".parse().unwrap());
        let (d6, w6) = desired_peers(&[&v6_only], &c6);
        assert!(w6.is_empty(), "{w6:?}");
        assert_eq!(
            d6.main[&key(3)].endpoint,
            "[fd00:20::3]:51820".parse().unwrap()
        );
        assert_eq!(
            d6.main[&key(3)].allowed_ips,
            vec!["fd00:5:3::/64".parse::<IpNet>().unwrap()]
        );
        // Separate: a peer per device.
        c.mode = Mode::Separate;
        let (d, _) = desired_peers(&[&l], &c);
        assert_eq!((d.main.len(), d.v6.len()), (1, 1));
        assert_eq!(
            d.v6[&key(2)].endpoint,
            "[2001:db8::2]:5001".parse().unwrap()
        );
    }

    #[test]
    fn diff_removes_first_and_only_touches_what_changed() {
        let c = ctx(Mode::Separate);
        let l2 = lease("10.5.2.0-24", "192.168.0.2", Some(data(2, 0)));
        let l3 = lease("10.5.3.0-24", "192.168.0.3", Some(data(3, 0)));
        let (before, _) = desired_peers(&[&l2, &l3], &c);
        assert!(diff_peers(&before.main, &before.main).is_empty());
        // Peer 3 leaves; peer 2 gets a new key (it was reinstalled) and moves.
        let l2b = lease("10.5.2.0-24", "192.168.0.9", Some(data(9, 0)));
        let (after, _) = desired_peers(&[&l2b], &c);
        let ops = diff_peers(&after.main, &before.main);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(ops[0], PeerOp::Remove(_)) && matches!(ops[1], PeerOp::Remove(_)));
        let PeerOp::Set(p) = &ops[2] else {
            panic!("{ops:?}")
        };
        assert_eq!(
            (p.public_key, p.endpoint),
            (key(9), "192.168.0.9:51820".parse().unwrap())
        );
        // A changed endpoint alone is one Set.
        let l3b = lease("10.5.3.0-24", "192.168.0.33", Some(data(3, 0)));
        let (moved, _) = desired_peers(&[&l2, &l3b], &c);
        assert_eq!(diff_peers(&moved.main, &before.main).len(), 1);
    }
}
