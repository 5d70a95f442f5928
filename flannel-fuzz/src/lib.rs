//! # flannel-fuzz
//!
//! One fuzz target per parser of untrusted input: everything flanneld reads from the store, the
//! Kubernetes API, a file, the CLI, stdin or the wire. Each target takes arbitrary bytes and must
//! never panic; where a value parses, it also checks a round trip or runs what consumes it.
//!
//! The same functions run two ways: as cargo-fuzz targets (`fuzz/`, `scripts/fuzz TARGET SECONDS`),
//! and as a short property run in CI (`tests/property.rs`: random inputs plus the seed corpus in
//! `corpus/`, and every crash found kept in `corpus/` as a regression input).
//!
//! ```
//! flannel_fuzz::network_config(br#"{"Network":"10.5.0.0/16"}"#);
//! flannel_fuzz::udp_datagram(&[0x45, 0, 0, 20]);
//! ```

use std::net::Ipv4Addr;

use flannel_backend_udp::packet;
use flannel_backend_udp::table::Table;
use flannel_core::{LeaseAttrs, NetworkConfig, PreviousSubnets, SubnetKey};
use flannel_subnet::kube::{AnnotationKeys, NodeInfo, annotations};

/// A fuzz target: arbitrary bytes in, no panic.
pub type Target = fn(&[u8]);

/// Every target, by name (as `scripts/fuzz` and the property test know them).
pub const TARGETS: &[(&str, Target)] = &[
    ("network_config", network_config),
    ("lease_json", lease_json),
    ("subnet_key", subnet_key),
    ("subnet_env", subnet_env),
    ("cni_stdin", cni_stdin),
    ("udp_datagram", udp_datagram),
    ("firewall_listing", firewall_listing),
    ("kube_node", kube_node),
    ("kube_annotations", kube_annotations),
    ("wireguard_options", wireguard_options),
    ("wireguard_lease", wireguard_lease),
    ("tun_read", tun_read),
    ("listen_fds", listen_fds),
    ("nexthop_message", nexthop_message),
    ("netlink_dump", netlink_dump),
    ("wireguard_dump", wireguard_dump),
    ("wireguard_datagram", wireguard_datagram),
    ("vxlan_peer_data", vxlan_peer_data),
    ("wireguard_uapi", wireguard_uapi),
    ("extension_lease", extension_lease),
    ("ipip_lease", ipip_lease),
    ("ipsec_lease", ipsec_lease),
    ("xfrm_dump", xfrm_dump),
];

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// The network config JSON (from etcd, or `net-conf.json` in Kubernetes mode).
pub fn network_config(data: &[u8]) {
    if let Ok(c) = NetworkConfig::parse(&text(data)) {
        let _ = (c.network(), c.ipv6_network());
        for pool in [c.ipv4, c.ipv6].into_iter().flatten() {
            let _ = pool.capacity();
            for s in pool.subnets().take(3) {
                assert!(
                    pool.is_compatible(&s),
                    "{s} from the pool {pool} is not compatible"
                );
            }
        }
    }
}

/// A lease value (JSON from etcd): what parses must write back and parse to the same.
pub fn lease_json(data: &[u8]) {
    if let Ok(a) = LeaseAttrs::from_json(data) {
        let again = LeaseAttrs::from_json(a.to_json().as_bytes())
            .unwrap_or_else(|e| panic!("{} does not parse back: {e}", a.to_json()));
        assert_eq!(again, a);
    }
}

/// A subnet key (the last element of an etcd key): what parses must print and parse to the same.
pub fn subnet_key(data: &[u8]) {
    if let Ok(k) = SubnetKey::parse(&text(data)) {
        assert_eq!(SubnetKey::parse(&k.to_string()), Ok(k));
    }
}

/// `subnet.env` as flanneld (restart), the CNI plugin and mk-docker-opts read it.
pub fn subnet_env(data: &[u8]) {
    let t = text(data);
    let _ = PreviousSubnets::parse(&t);
    let _ = flanneld::cni::read_subnet_env(&t);
    let env = flanneld::docker_opts::read_env(&t);
    if let Some(s) = env.get("FLANNEL_SUBNET") {
        let _ = flanneld::docker_opts::subnet_network(s);
    }
}

/// The CNI plugin's stdin (the network config a runtime passes), rendered into the delegate config.
pub fn cni_stdin(data: &[u8]) {
    if let Ok(conf) = flanneld::cni::parse_netconf(data)
        && let Ok(env) = flanneld::cni::read_subnet_env(
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
    {
        let _ = flanneld::cni::delegate_config(&conf, &env).to_string();
    }
}

/// A udp-backend packet in both directions: as read from flannel0 (to a peer) and as received from
/// a peer (to a pod).
pub fn udp_datagram(data: &[u8]) {
    let table = Table::from_peers([
        (
            "10.5.2.0/24".parse().unwrap_or_default(),
            Ipv4Addr::new(192, 168, 0, 2),
        ),
        (
            "10.5.3.0/24".parse().unwrap_or_default(),
            Ipv4Addr::new(192, 168, 0, 3),
        ),
    ]);
    let mut p = data.to_vec();
    let _ = packet::from_tun(&mut p, &table, 8285, Ipv4Addr::new(10, 5, 1, 0));
    let mut p = data.to_vec();
    let _ = packet::from_udp(&mut p, Ipv4Addr::new(192, 168, 0, 2), &table);
    let _ = packet::net_unreachable(data, Ipv4Addr::new(10, 5, 1, 0));
    let mut p = data.to_vec();
    let _ = packet::dec_ttl(&mut p);
    let _ = packet::checksum(data);
}

/// `iptables -S` and `nft list table` output, compared with the rules flanneld wants.
pub fn firewall_listing(data: &[u8]) {
    type Wanted = (
        [flanneld::iptables::RuleSet; 2],
        flanneld::nftables::NftTable,
    );
    static WANTED: std::sync::OnceLock<Wanted> = std::sync::OnceLock::new();
    let (sets, table) = WANTED.get_or_init(|| {
        let n = "10.5.0.0/16".parse().unwrap_or_default();
        let s = "10.5.1.0/24".parse().unwrap_or_default();
        (
            [
                flanneld::iptables::masq_rules(n, s, true),
                flanneld::iptables::forward_rules(n),
            ],
            flanneld::nftables::nft_rules(n, s, true, true, false),
        )
    });
    let t = text(data);
    let (chain, parent) = t.split_once('\u{0}').unwrap_or((&t, ""));
    for set in sets {
        let _ = flanneld::iptables::in_sync(set, chain, parent);
    }
    let _ = flanneld::nftables::in_sync(table, &t);
}

/// A Node object as the Kubernetes watch decodes it, then turned into a lease.
pub fn kube_node(data: &[u8]) {
    if let Ok(node) = flannel_subnet::kube::node_info_from_json(data) {
        lease_of(&node);
    }
}

/// A Node's annotations and pod CIDRs as fields (NUL-separated: prefix, podCIDR, podCIDRs, then the
/// values of the annotations under that prefix), turned into a lease and a patch.
pub fn kube_annotations(data: &[u8]) {
    let t = text(data);
    let mut f = t.split('\u{0}');
    let prefix = f.next().unwrap_or_default();
    let keys = match AnnotationKeys::new(prefix) {
        Ok(k) => k,
        Err(_) => {
            AnnotationKeys::new(annotations::DEFAULT_PREFIX).unwrap_or_else(|_| unreachable!())
        }
    };
    let pod_cidr = f.next().map(str::to_string);
    let pod_cidrs: Vec<String> = f
        .next()
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let mut node = NodeInfo {
        name: "fuzz".into(),
        pod_cidr,
        pod_cidrs,
        annotations: Default::default(),
    };
    for key in [
        &keys.subnet_kube_managed,
        &keys.backend_type,
        &keys.backend_data,
        &keys.backend_v6_data,
        &keys.public_ip,
        &keys.public_ipv6,
        &keys.public_ip_overwrite,
        &keys.node_public_ip,
    ] {
        if let Some(v) = f.next() {
            node.annotations.insert(key.clone(), v.to_string());
        }
    }
    lease_of(&node);
    let _ = annotations::node_public_ips(&keys, &node);
    let attrs = annotations::published_attrs(&keys, &node);
    let _ = annotations::annotations_patch(&annotations::desired_annotations(&keys, &attrs, &node));
}

fn lease_of(node: &NodeInfo) {
    let keys = AnnotationKeys::new(annotations::DEFAULT_PREFIX).unwrap_or_else(|_| unreachable!());
    for config in [
        r#"{"Network":"10.244.0.0/16"}"#,
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48"}"#,
    ] {
        let Ok(c) = NetworkConfig::parse(config) else {
            continue;
        };
        if let Ok(Some(lease)) = annotations::node_to_lease(&keys, &c, node) {
            let net = c.network().unwrap_or_default();
            assert!(
                net.contains(&lease.key.ipv4),
                "a lease outside the network was accepted: {}",
                lease.key
            );
        }
        let _ = annotations::own_lease_key(&c, node);
    }
}

/// The wireguard backend's options (the `Backend` object of the network config).
pub fn wireguard_options(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(o) = flannel_backend_wireguard::WireguardOptions::parse(&v) {
        assert!(o.listen_port > 0 && o.listen_port_v6 > 0);
        for ext in [0, 1280, 1500, u32::MAX] {
            if let Ok(m) = o.device_mtu(ext) {
                assert!(m >= 576 && m < o.mtu.unwrap_or(ext), "{m} from {ext}");
            }
        }
    }
}

/// A peer's wireguard lease (a lease value from the store), turned into WireGuard peers in every
/// mode: what is accepted must carry the lease's own subnet(s) only, at its public address; and
/// where the fast decoding of canonical backend data answers, it answers as the general one.
pub fn wireguard_lease(data: &[u8]) {
    use flannel_backend_wireguard::{Key, Mode, PeerContext, PeerData, desired_peers};
    // A canonical text made of the input too (any string as the key, a port in and out of
    // range), so that the fast decoding runs whatever the bytes.
    let port = data
        .iter()
        .fold(0u64, |n, b| (n * 31 + u64::from(*b)) % 70_000);
    let canonical = flannel_core::RawJson::from_value(
        &serde_json::json!({"PublicKey": text(data), "Port": port}),
    );
    let (fast, general) = PeerData::decodings(&canonical, "BackendData");
    assert_eq!(
        fast.is_some(),
        port <= 65_535 && !canonical.as_str().contains('\\')
    );
    if let Some(fast) = fast {
        assert_eq!(fast, general, "{}", canonical.as_str());
    }
    let Ok(attrs) = LeaseAttrs::from_json(data) else {
        return;
    };
    for raw in [&attrs.backend_data, &attrs.backend_v6_data]
        .into_iter()
        .flatten()
    {
        let (fast, general) = PeerData::decodings(raw, "BackendData");
        if let Some(fast) = fast {
            assert_eq!(fast, general, "{}", raw.as_str());
        }
    }
    let lease = flannel_core::Lease {
        key: SubnetKey::parse("10.5.2.0-24&fd00:5:2::-64").unwrap_or_else(|_| unreachable!()),
        enable_ipv4: true,
        attrs,
        expiration: None,
        asof: 0,
    };
    for mode in [Mode::Separate, Mode::Auto, Mode::Ipv4, Mode::Ipv6] {
        let ctx = PeerContext {
            mode,
            listen_port: 51820,
            listen_port_v6: 51821,
            families: (true, true),
            ext_addr: Some(Ipv4Addr::new(192, 168, 0, 1)),
            ext_v6_addr: Some("2001:db8::1".parse().unwrap_or_else(|_| unreachable!())),
            own_key: Key([1; 32]),
            psk: None,
            keepalive: None,
        };
        let (peers, _) = desired_peers(&[&lease], &ctx);
        for p in peers.main.values().chain(peers.v6.values()) {
            assert!(p.endpoint.port() > 0);
            let ip = p.endpoint.ip();
            assert!(
                ip == std::net::IpAddr::V4(lease.attrs.public_ip)
                    || Some(ip) == lease.attrs.public_ipv6.map(std::net::IpAddr::V6),
                "{ip} is not the lease's address"
            );
            for a in &p.allowed_ips {
                assert!(
                    *a == ipnet::IpNet::V4(lease.key.ipv4)
                        || Some(*a) == lease.key.ipv6.map(ipnet::IpNet::V6),
                    "{a} is not the lease's subnet"
                );
            }
        }
    }
}

/// A read from a `flannel0` queue with a virtio header (the parking queue's packets, which come
/// from pods): the IP packet is taken out, its checksum completed, then routed as the udp backend
/// routes it.
pub fn tun_read(data: &[u8]) {
    let mut read = data.to_vec();
    if let Some(packet) = flannel_backend_udp::tun::packet_of(&mut read) {
        let len = packet.len();
        assert!(len < data.len(), "the packet lies inside the read");
        udp_datagram(packet);
    }
}

/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` as a service manager (or whoever set them) passes
/// them, split from the input at NUL bytes: never more descriptors than the bounded maximum, and
/// only for our PID.
pub fn listen_fds(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let (pid, count, names) = (parts.next(), parts.next(), parts.next());
    let got = flannel_dataplane::systemd::parse_listen_fds(pid, count, names, 42);
    assert!(got.len() <= 64, "bounded");
    if !got.is_empty() {
        let pid = pid.unwrap_or_default();
        assert!(
            pid.bytes().all(|b| b.is_ascii_digit()),
            "digits only: {pid:?}"
        );
        assert_eq!(pid.parse::<u32>().ok(), Some(42), "only our PID");
    }
}

/// A next-hop object message as the kernel sends it (the payload after the netlink header): what
/// parses serializes back to a message that parses to the same value.
pub fn nexthop_message(data: &[u8]) {
    use flannel_dataplane::nexthop::NexthopMessage;
    use netlink_packet_core::NetlinkSerializable;
    if let Ok(m) = NexthopMessage::parse(104, data) {
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        assert_eq!(NexthopMessage::parse(104, &buf).ok(), Some(m));
    }
}

/// One datagram of a netlink dump (routes, neighbours, FDB entries) as the kernel sends it: split
/// into messages, each parsed on its own. Every message takes at least a header, so the split ends.
pub fn netlink_dump(data: &[u8]) {
    let mut n = 0;
    for m in flannel_dataplane::dump::messages::<rtnetlink::packet_route::RouteNetlinkMessage>(data)
    {
        n += 1;
        assert!(n <= data.len() / 16 + 1, "more messages than headers fit");
        if let Ok(m) = m {
            let _ = format!("{m:?}");
        }
    }
}

/// One datagram of a kernel WireGuard device's `GET_DEVICE` dump: split into generic netlink
/// messages, and the parts read as one device. What is read is consistent: every peer under its
/// own key, with an endpoint, its allowed IPs sorted and without repeats.
pub fn wireguard_dump(data: &[u8]) {
    use flannel_backend_wireguard::kernel::device_of;
    use flannel_dataplane::dump::{Raw, messages};
    let parts: Vec<Vec<u8>> = messages::<Raw>(data)
        .filter_map(Result::ok)
        .filter_map(|m| match m.payload {
            netlink_packet_core::NetlinkPayload::InnerMessage(r) => Some(r.payload),
            _ => None,
        })
        .collect();
    let state = device_of(&parts);
    for (key, peer) in &state.peers {
        assert_eq!(*key, peer.public_key);
        assert!(
            peer.allowed_ips.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            peer.allowed_ips
        );
    }
}

/// Datagrams from the network and packets from the TUN device through a userspace WireGuard
/// device's protocol side (flanneld's device loop around gotatun's `Tunn`): whatever the bytes,
/// nothing panics, and nothing reaches the TUN device unless it decrypted under a session (which
/// random bytes cannot make).
pub fn wireguard_datagram(data: &[u8]) {
    let (_, written) = flannel_backend_wireguard::userspace::run_untrusted(data);
    assert_eq!(written, 0, "random bytes decrypted");
}

/// A peer's vxlan backend data (JSON from a lease): where the fast decoding of the canonical text
/// answers, it answers exactly as the general decoding does.
pub fn vxlan_peer_data(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let raw = flannel_core::RawJson::from_value(&value);
    let (fast, general) = flannel_backend_vxlan::PeerData::decodings(&raw);
    if let Some(fast) = fast {
        assert_eq!(fast, general, "{}", raw.as_str());
    }
}

/// A request on a userspace WireGuard device's control socket (`wg show`'s): never panics; read in
/// two pieces (split where the first byte says) it gets the verdict it gets whole; a request is
/// one only once its empty line has arrived; and a verdict does not change with more bytes.
pub fn wireguard_uapi(data: &[u8]) {
    use flannel_backend_wireguard::uapi::{RequestError, RequestReader, parse_request};
    let parsed = parse_request(data);
    let split = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut reader = RequestReader::default();
    let first = reader.feed(&data[..split]);
    let pieces = reader
        .feed(&data[split..])
        .unwrap_or(Err(RequestError::Incomplete));
    assert_eq!(pieces, parsed);
    if let Some(early) = first {
        assert_eq!(early, parsed, "a verdict changed with more bytes");
    }
    if parsed.is_ok() {
        assert!(
            data.windows(2).any(|w| w == b"\n\n"),
            "a request without its empty line"
        );
    }
    if parsed != Err(RequestError::Incomplete) {
        let mut more = data.to_vec();
        more.extend_from_slice(b"get=1\n\n");
        assert_eq!(parse_request(&more), parsed);
    }
}

/// The extension backend's options (the network config's `Backend` object) and a peer's lease value
/// from the store, turned into the steps the backend runs commands for: an accepted command is
/// non-blank, within the size limit and free of NUL bytes; a lease gets its add command only when it
/// is an extension lease whose data is a JSON string (what reaches stdin, without NUL bytes), and a
/// remove command later only then.
pub fn extension_lease(data: &[u8]) {
    use flannel_backend_extension::{
        ExtensionOptions, MAX_COMMAND_LEN, PeerCommands, Step, lease_env,
    };
    use flannel_core::{Lease, LeaseWatchResult};
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(o) = ExtensionOptions::parse(&v) {
        for c in [o.pre_startup, o.post_startup, o.subnet_add, o.subnet_remove]
            .iter()
            .flatten()
        {
            assert!(!c.trim().is_empty() && c.len() <= MAX_COMMAND_LEN && !c.contains('\0'));
        }
    }
    let Ok(attrs) = LeaseAttrs::from_json(data) else {
        return;
    };
    let key = |s: &str| s.parse::<ipnet::Ipv4Net>().map(SubnetKey::v4);
    let (Ok(own), Ok(peer)) = (key("10.5.1.0/24"), key("10.5.2.0/24")) else {
        return;
    };
    let lease = Lease {
        key: peer,
        enable_ipv4: true,
        attrs,
        expiration: None,
        asof: 0,
    };
    let mut peers = PeerCommands::new(own);
    let ok = |_: &Lease| Ok(());
    let steps = peers.apply(LeaseWatchResult::Snapshot(vec![lease]), &ok);
    let added = match steps.as_slice() {
        [Step::Add(l, stdin)] => {
            assert_eq!(l.attrs.backend_type, "extension");
            assert!(!stdin.contains('\0'));
            assert!(lease_env(l).iter().all(|(_, v)| !v.contains('\0')));
            true
        }
        [Step::Skip(_)] => false,
        other => panic!("{other:?}"),
    };
    let steps = peers.apply(LeaseWatchResult::Snapshot(Vec::new()), &ok);
    assert_eq!(steps.len(), usize::from(added), "{steps:?}");
}

/// The ipip backend's options (a `Backend` object) and a peer's ipip lease (a lease value from the
/// store) turned into routes: an accepted lease gets at most one route, for its own subnet, to its
/// own public IP, never to an unusable far end.
pub fn ipip_lease(data: &[u8]) {
    use flannel_backend_ipip::{IpipOptions, Topology, desired_state};
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let direct_routing = IpipOptions::parse(&v).is_ok_and(|o| o.direct_routing);
    let Ok(attrs) = LeaseAttrs::from_json(data) else {
        return;
    };
    let (Some((network, own, subnet)), Ok(ext)) =
        (tunnel_nets(), "192.168.0.0/24".parse::<ipnet::IpNet>())
    else {
        return;
    };
    let topo = Topology {
        network,
        own_subnet: own,
        ipip_index: 7,
        ext_index: 2,
        ext_networks: vec![ext],
        direct_routing,
    };
    let lease = lease_at(subnet, attrs);
    let (state, own, _) = desired_state(&topo, &[&lease]);
    assert!(state.routes.len() <= 1, "{:?}", state.routes);
    for r in &state.routes {
        let public = std::net::IpAddr::V4(lease.attrs.public_ip);
        assert_eq!(lease.attrs.backend_type, "ipip");
        assert_eq!(r.dst, ipnet::IpNet::V4(subnet));
        assert_eq!(r.gateway, Some(public));
        assert!(!public.is_unspecified() && !public.is_loopback() && !public.is_multicast());
        assert!(own.owns_route(r), "{r}");
    }
}

/// The tunnel backends' targets' network 10.5.0.0/16, own subnet 10.5.1.0/24 and peer subnet
/// 10.5.2.0/24.
fn tunnel_nets() -> Option<(ipnet::Ipv4Net, ipnet::Ipv4Net, ipnet::Ipv4Net)> {
    let net = |a, len| ipnet::Ipv4Net::new(Ipv4Addr::new(10, 5, a, 0), len).ok();
    Some((net(0, 16)?, net(1, 24)?, net(2, 24)?))
}

/// A peer's IPv4 lease for `subnet` with `attrs`.
fn lease_at(subnet: ipnet::Ipv4Net, attrs: LeaseAttrs) -> flannel_core::Lease {
    flannel_core::Lease {
        key: SubnetKey::v4(subnet),
        enable_ipv4: true,
        attrs,
        expiration: None,
        asof: 0,
    }
}

/// The ipsec backend: its options (the `Backend` object) and a peer's lease from the same bytes,
/// the tunnel and policies computed from them. An accepted key is long enough, the MTU leaves room
/// for ESP, and a tunnel joins the own subnet to the peer's usable public IP and subnet.
pub fn ipsec_lease(data: &[u8]) {
    use flannel_backend_ipsec::peers::{End, conn_changes, desired_tunnels, is_ours};
    use flannel_backend_ipsec::{IpsecOptions, MIN_PSK_LEN, OVERHEAD};
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(o) = IpsecOptions::parse(&v) {
        assert!(o.psk.len() >= MIN_PSK_LEN);
        assert!(!o.esp_proposal.is_empty() && !o.esp_proposal.contains(char::is_whitespace));
        for ext in [0, 100, 1500, u32::MAX] {
            if let Some(m) = o.mtu(ext) {
                assert!(m >= 68 && m <= ext - OVERHEAD, "{m} from {ext}");
            }
        }
    }
    let Ok(attrs) = LeaseAttrs::from_json(data) else {
        return;
    };
    let Some((network, own, subnet)) = tunnel_nets() else {
        return;
    };
    let local = End {
        ip: Ipv4Addr::new(192, 168, 0, 1),
        subnet: own,
    };
    let lease = lease_at(subnet, attrs);
    let (tunnels, _) = desired_tunnels(local, &[&lease]);
    assert!(tunnels.len() <= 1);
    for (name, t) in &tunnels {
        assert_eq!(lease.attrs.backend_type, "ipsec");
        assert_eq!(*name, t.conn_name());
        assert_eq!((t.local, t.remote.subnet), (local, subnet));
        let ip = t.remote.ip;
        assert!(!ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast());
        for p in t.policies() {
            assert!(is_ours(&p, network, own), "{p}");
        }
        let (load, unload) = conn_changes(&tunnels, &Default::default(), local);
        assert_eq!((load.len(), unload.len()), (1, 0));
    }
}

/// One datagram of the kernel's XFRM policy dump: split into netlink messages, each policy read
/// as the ipsec backend reads it (its own bounds-checked parser). What is read is an IPv4 policy
/// with host bits clear. (netlink-packet-xfrm's own parser indexes past the end of a short policy
/// message: found by this target, kept in its corpus.)
pub fn xfrm_dump(data: &[u8]) {
    use flannel_dataplane::dump::{Raw, messages};
    for m in messages::<Raw>(data).flatten() {
        if let netlink_packet_core::NetlinkPayload::InnerMessage(raw) = m.payload
            && let Some(k) = flannel_backend_ipsec::xfrm::policy_of(&raw.payload)
        {
            assert_eq!(k.src, k.src.trunc());
            assert_eq!(k.dst, k.dst.trunc());
            let _ = k.as_flannel();
        }
    }
}
