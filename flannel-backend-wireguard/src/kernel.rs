//! A kernel WireGuard device (`ip link add <name> type wireguard`), configured over generic netlink
//! as `wg` and upstream's backend do: the device's key and port, and its peers read and changed
//! one message at a time.
//!
//! The messages are built with netlink-packet-wireguard and read by our own parser, which cannot
//! panic whatever the bytes ([`device_of`]; the crate's parser indexes into attributes without
//! checking their length, found by the `wireguard_dump` fuzz target). Both are pure functions, so
//! what goes to the kernel is tested without one; the lab test runs the device in a kernel that has
//! WireGuard (a virtual machine).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use flannel_dataplane::dump::{NETLINK_GENERIC, Raw, Socket};
use netlink_packet_core::NlasIterator;
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use crate::key::{Key, PrivateKey};
use crate::peers::{PeerOp, PeerSpec};
use crate::userspace::DeviceError;

/// Peers per `SET_DEVICE` message: a peer with two allowed IPs takes about 150 bytes, so a message
/// stays far below the socket's send limit however many peers change at once (`wg` splits its
/// messages the same way).
pub const PEERS_PER_MESSAGE: usize = 64;

/// What a kernel WireGuard device holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Its private key, when one is set.
    pub private_key: Option<[u8; 32]>,
    /// Its UDP port.
    pub listen_port: u16,
    /// Its peers, by public key (peers without an endpoint are left out: flanneld never makes one,
    /// so such a peer is replaced by the one it wants, or removed).
    pub peers: BTreeMap<Key, PeerSpec>,
}

/// A kernel WireGuard device flanneld configures.
pub struct KernelDevice {
    name: String,
    index: u32,
    family: u16,
    socket: Socket,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KernelDevice({} #{})", self.name, self.index)
    }
}

fn io_err(name: &str, what: &str, e: std::io::Error) -> DeviceError {
    DeviceError {
        name: name.into(),
        message: format!("{what}: {e}"),
    }
}

impl KernelDevice {
    /// Takes the kernel WireGuard device `name` (link `index`, made by the caller) and gives it
    /// `key` and `port`; its peers are left as they are (the caller diffs them).
    ///
    /// # Errors
    /// When the kernel has no `wireguard` generic netlink family or refuses the settings.
    pub async fn open(
        name: &str,
        index: u32,
        key: &PrivateKey,
        port: u16,
    ) -> Result<Self, DeviceError> {
        let mut socket = Socket::open(NETLINK_GENERIC)
            .map_err(|e| io_err(name, "opening a generic netlink socket", e))?;
        let family = resolve_family(&mut socket)
            .await
            .map_err(|e| io_err(name, "looking up the wireguard netlink family", e))?;
        let mut dev = Self {
            name: name.into(),
            index,
            family,
            socket,
        };
        dev.set(Some(key), Some(port), &[]).await?;
        Ok(dev)
    }

    /// The link index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Reads the device (`wg show <name> dump`).
    ///
    /// # Errors
    /// When the kernel refuses (the device is gone, for one).
    pub async fn read(&mut self) -> Result<DeviceState, DeviceError> {
        let mut msg = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfIndex(self.index)],
        });
        msg.set_resolved_family_id(self.family);
        let mut parts = Vec::new();
        self.socket
            .dump(msg, |m: Raw| parts.push(m.payload))
            .await
            .map_err(|e| io_err(&self.name, "reading the device", e))?;
        Ok(device_of(parts))
    }

    /// Sets the key and port (each when given) and applies `ops`.
    ///
    /// # Errors
    /// When the kernel refuses a message (the ones before it are applied).
    pub async fn set(
        &mut self,
        key: Option<&PrivateKey>,
        port: Option<u16>,
        ops: &[PeerOp],
    ) -> Result<(), DeviceError> {
        for payload in set_device_messages(self.index, key, port, ops) {
            let mut msg = GenlMessage::from_payload(payload);
            msg.set_resolved_family_id(self.family);
            self.socket
                .request(msg, |_: Raw| {})
                .await
                .map_err(|e| io_err(&self.name, "configuring the device", e))?;
        }
        Ok(())
    }
}

/// Whether the kernel has WireGuard, asked without making a device: it knows the `wireguard`
/// generic netlink family (the question loads the module where there is one, as making a device
/// does).
pub async fn kernel_has_wireguard() -> bool {
    match Socket::open(NETLINK_GENERIC) {
        Ok(mut socket) => resolve_family(&mut socket).await.is_ok(),
        Err(_) => false,
    }
}

/// The id the kernel gave the `wireguard` generic netlink family (it exists once the module is
/// loaded, which making a device does).
async fn resolve_family(socket: &mut Socket) -> std::io::Result<u16> {
    let msg = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".into())],
    });
    let mut id = None;
    socket
        .request(msg, |m: Raw| {
            for a in attrs(m.payload.get(GENL_HEADER..).unwrap_or_default()) {
                if a.kind() == CTRL_ATTR_FAMILY_ID {
                    id = u16_of(a.value()).or(id);
                }
            }
        })
        .await?;
    id.ok_or_else(|| std::io::Error::other("the kernel named no family id"))
}

fn allowed_ip(net: &ipnet::IpNet) -> WireguardAllowedIp {
    let family = match net.addr() {
        IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
        IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.network()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

fn peer_of(op: &PeerOp) -> WireguardPeer {
    match op {
        PeerOp::Remove(k) => WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(k.0),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ]),
        PeerOp::Set(p) => WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(p.public_key.0),
            // The allowed IPs given replace the peer's, as `wg set ... allowed-ips` does.
            WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
            WireguardPeerAttribute::Endpoint(p.endpoint),
            // All zeros clears a pre-shared key; 0 turns keep-alive off.
            WireguardPeerAttribute::PresharedKey(p.preshared_key.map(|k| k.0).unwrap_or_default()),
            WireguardPeerAttribute::PersistentKeepalive(
                p.keepalive
                    .map(|d| u16::try_from(d.as_secs()).unwrap_or(u16::MAX))
                    .unwrap_or(0),
            ),
            WireguardPeerAttribute::AllowedIps(p.allowed_ips.iter().map(allowed_ip).collect()),
        ]),
    }
}

/// The `SET_DEVICE` messages that give device `index` the key and port (each when given) and apply
/// `ops` in order, [`PEERS_PER_MESSAGE`] peers per message. No message when there is nothing to
/// set.
pub fn set_device_messages(
    index: u32,
    key: Option<&PrivateKey>,
    port: Option<u16>,
    ops: &[PeerOp],
) -> Vec<WireguardMessage> {
    let mut head = vec![WireguardAttribute::IfIndex(index)];
    if let Some(k) = key {
        head.push(WireguardAttribute::PrivateKey(k.to_bytes()));
    }
    if let Some(p) = port {
        head.push(WireguardAttribute::ListenPort(p));
    }
    let mut out: Vec<WireguardMessage> = ops
        .chunks(PEERS_PER_MESSAGE)
        .map(|chunk| WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![
                WireguardAttribute::IfIndex(index),
                WireguardAttribute::Peers(chunk.iter().map(peer_of).collect()),
            ],
        })
        .collect();
    if head.len() > 1 {
        match out.first_mut() {
            Some(first) => {
                first.attributes.splice(0..1, head);
            }
            None => out.push(WireguardMessage {
                cmd: WireguardCmd::SetDevice,
                attributes: head,
            }),
        }
    }
    out
}

/// The generic netlink header before a message's attributes.
const GENL_HEADER: usize = 4;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_PEERS: u16 = 8;
const WGPEER_A_PUBLIC_KEY: u16 = 1;
const WGPEER_A_PRESHARED_KEY: u16 = 2;
const WGPEER_A_ENDPOINT: u16 = 4;
const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
const WGPEER_A_ALLOWEDIPS: u16 = 9;
const WGALLOWEDIP_A_IPADDR: u16 = 2;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

/// The attributes in `buf`, up to the first one whose length does not fit.
fn attrs(buf: &[u8]) -> impl Iterator<Item = netlink_packet_core::NlaBuffer<&[u8]>> {
    NlasIterator::new(buf).map_while(Result::ok)
}

fn u16_of(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.try_into().ok()?))
}

fn key_of(v: &[u8]) -> Option<Key> {
    Some(Key(v.try_into().ok()?))
}

/// A `sockaddr_in` or `sockaddr_in6`, as the kernel writes an endpoint.
fn endpoint_of(v: &[u8]) -> Option<std::net::SocketAddr> {
    let family = u16::from_ne_bytes(v.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(v.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET if v.len() >= 8 => {
            let ip: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            Some((IpAddr::from(ip), port).into())
        }
        libc::AF_INET6 if v.len() >= 24 => {
            let ip: [u8; 16] = v.get(8..24)?.try_into().ok()?;
            Some((IpAddr::from(ip), port).into())
        }
        _ => None,
    }
}

fn allowed_ip_of(v: &[u8]) -> Option<ipnet::IpNet> {
    let mut ip = None;
    let mut cidr = None;
    for a in attrs(v) {
        match a.kind() {
            WGALLOWEDIP_A_IPADDR => {
                ip = match a.value().len() {
                    4 => <[u8; 4]>::try_from(a.value()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(a.value()).ok().map(IpAddr::from),
                    _ => None,
                };
            }
            WGALLOWEDIP_A_CIDR_MASK => cidr = a.value().first().copied(),
            _ => {}
        }
    }
    ipnet::IpNet::new(ip?, cidr?).ok()
}

/// A peer as far as it was read: the kernel splits a device with many peers (or a peer with many
/// allowed IPs) over several messages, repeating the peer's key where its allowed IPs continue.
#[derive(Default)]
struct PartPeer {
    endpoint: Option<std::net::SocketAddr>,
    allowed_ips: Vec<ipnet::IpNet>,
    preshared_key: Option<Key>,
    keepalive: Option<Duration>,
}

fn read_peer(v: &[u8], peers: &mut BTreeMap<Key, PartPeer>) {
    let Some(key) = attrs(v)
        .find(|a| a.kind() == WGPEER_A_PUBLIC_KEY)
        .and_then(|a| key_of(a.value()))
    else {
        return;
    };
    let peer = peers.entry(key).or_default();
    for a in attrs(v) {
        let v = a.value();
        match a.kind() {
            WGPEER_A_ENDPOINT => peer.endpoint = endpoint_of(v).or(peer.endpoint),
            WGPEER_A_PRESHARED_KEY => peer.preshared_key = key_of(v).filter(|k| k.0 != [0; 32]),
            WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL => {
                peer.keepalive = u16_of(v)
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(u64::from(s)));
            }
            WGPEER_A_ALLOWEDIPS => peer
                .allowed_ips
                .extend(attrs(v).filter_map(|ip| allowed_ip_of(ip.value()))),
            _ => {}
        }
    }
}

/// The device as the parts of a `GET_DEVICE` dump describe it, each part a generic netlink payload
/// (header and attributes) as the kernel sent it. Whatever the bytes, this returns: attributes of
/// unknown kinds or wrong lengths are skipped, and a peer without a key or an endpoint is left out.
pub fn device_of<P: AsRef<[u8]>>(parts: impl IntoIterator<Item = P>) -> DeviceState {
    let mut state = DeviceState::default();
    let mut peers: BTreeMap<Key, PartPeer> = BTreeMap::new();
    for part in parts {
        let body = part.as_ref().get(GENL_HEADER..).unwrap_or_default();
        for a in attrs(body) {
            match a.kind() {
                WGDEVICE_A_PRIVATE_KEY => {
                    state.private_key = key_of(a.value()).map(|k| k.0).filter(|k| *k != [0; 32]);
                }
                WGDEVICE_A_LISTEN_PORT => {
                    state.listen_port = u16_of(a.value()).unwrap_or(state.listen_port);
                }
                WGDEVICE_A_PEERS => {
                    for p in attrs(a.value()) {
                        read_peer(p.value(), &mut peers);
                    }
                }
                _ => {}
            }
        }
    }
    state.peers = peers
        .into_iter()
        .filter_map(|(key, mut p)| {
            p.allowed_ips.sort();
            p.allowed_ips.dedup();
            Some((
                key,
                PeerSpec {
                    public_key: key,
                    endpoint: p.endpoint?,
                    allowed_ips: p.allowed_ips,
                    preshared_key: p.preshared_key,
                    keepalive: p.keepalive,
                },
            ))
        })
        .collect();
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;

    fn spec(n: u8, psk: Option<Key>, keepalive: Option<u64>) -> PeerSpec {
        PeerSpec {
            public_key: Key([n; 32]),
            endpoint: format!("172.20.0.{n}:51820").parse().unwrap(),
            allowed_ips: vec![
                format!("10.5.{n}.0/24").parse().unwrap(),
                format!("fd00:{n}::/64").parse().unwrap(),
            ],
            preshared_key: psk,
            keepalive: keepalive.map(Duration::from_secs),
        }
    }

    /// The bytes of a message (generic header and attributes), as netlink-packet-wireguard writes
    /// them: the kernel answers a dump in the same layout, so what our parser reads back from these
    /// is what a device set this way reports.
    fn wire(m: &WireguardMessage) -> Vec<u8> {
        let g = GenlMessage::from_payload(m.clone());
        let mut buf = vec![0; g.buffer_len()];
        g.emit(&mut buf);
        buf
    }

    #[test]
    fn what_is_set_reads_back_the_same() {
        let key = PrivateKey::from_bytes([7; 32]);
        let peers: Vec<PeerSpec> = (1..=3)
            .map(|n| spec(n, (n == 2).then_some(Key([9; 32])), (n == 3).then_some(25)))
            .collect();
        let ops: Vec<PeerOp> = peers.iter().cloned().map(PeerOp::Set).collect();
        let msgs = set_device_messages(5, Some(&key), Some(51820), &ops);
        assert_eq!(msgs.len(), 1);
        // A device's dump answers with the same attributes it was given.
        let state = device_of(msgs.iter().map(wire));
        assert_eq!(state.private_key, Some(key.to_bytes()));
        assert_eq!(state.listen_port, 51820);
        let want: BTreeMap<Key, PeerSpec> = peers.into_iter().map(|p| (p.public_key, p)).collect();
        assert_eq!(state.peers, want);
        let PeerOp::Set(_) = &ops[0] else { panic!() };
        let WireguardAttribute::Peers(list) = &msgs[0].attributes[3] else {
            panic!("{:?}", msgs[0].attributes)
        };
        assert!(
            list[0].0.contains(&WireguardPeerAttribute::Flags(
                WireguardPeerFlags::ReplaceAllowedIps
            )),
            "allowed IPs are replaced, not added to"
        );
    }

    #[test]
    fn many_peers_go_in_several_messages_and_the_key_only_in_the_first() {
        let ops: Vec<PeerOp> = (0..150u8)
            .map(|n| PeerOp::Set(spec(n, None, None)))
            .collect();
        let key = PrivateKey::from_bytes([1; 32]);
        let msgs = set_device_messages(9, Some(&key), None, &ops);
        assert_eq!(msgs.len(), 3, "64 + 64 + 22");
        let counts: Vec<usize> = msgs
            .iter()
            .map(|m| {
                m.attributes
                    .iter()
                    .filter_map(|a| match a {
                        WireguardAttribute::Peers(l) => Some(l.len()),
                        _ => None,
                    })
                    .sum()
            })
            .collect();
        assert_eq!(counts, vec![64, 64, 22]);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.attributes[0], WireguardAttribute::IfIndex(9));
            let has_key = m
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::PrivateKey(_)));
            assert_eq!(has_key, i == 0);
        }
        assert_eq!(device_of(msgs.iter().map(wire)).peers.len(), 150);
        assert!(set_device_messages(9, None, None, &[]).is_empty());
        assert_eq!(set_device_messages(9, None, Some(1), &[]).len(), 1);
    }

    #[test]
    fn a_removal_names_the_key_and_the_flag_only() {
        let msgs = set_device_messages(3, None, None, &[PeerOp::Remove(Key([4; 32]))]);
        let WireguardAttribute::Peers(list) = &msgs[0].attributes[1] else {
            panic!()
        };
        assert_eq!(
            list[0].0,
            vec![
                WireguardPeerAttribute::PublicKey([4; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)
            ]
        );
        // Cleared settings are sent as zeros, which the kernel reads as "none".
        let msgs = set_device_messages(3, None, None, &[PeerOp::Set(spec(1, None, None))]);
        let WireguardAttribute::Peers(list) = &msgs[0].attributes[1] else {
            panic!()
        };
        assert!(
            list[0]
                .0
                .contains(&WireguardPeerAttribute::PresharedKey([0; 32]))
        );
        assert!(
            list[0]
                .0
                .contains(&WireguardPeerAttribute::PersistentKeepalive(0))
        );
    }

    #[test]
    fn a_peer_split_over_parts_is_merged_and_incomplete_peers_are_left_out() {
        let p = spec(1, None, None);
        let part = |ips: &[ipnet::IpNet], endpoint: bool| WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(
                [WireguardPeerAttribute::PublicKey(p.public_key.0)]
                    .into_iter()
                    .chain(endpoint.then_some(WireguardPeerAttribute::Endpoint(p.endpoint)))
                    .chain([WireguardPeerAttribute::AllowedIps(
                        ips.iter().map(allowed_ip).collect(),
                    )])
                    .collect(),
            )])],
        };
        let no_endpoint = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![
                WireguardPeer(vec![WireguardPeerAttribute::PublicKey([2; 32])]),
                WireguardPeer(vec![WireguardPeerAttribute::Endpoint(p.endpoint)]),
            ])],
        };
        let state = device_of(
            [
                part(&p.allowed_ips[1..], true),
                part(&p.allowed_ips[..1], false),
                no_endpoint,
            ]
            .iter()
            .map(wire),
        );
        assert_eq!(state.peers.len(), 1, "{:?}", state.peers);
        assert_eq!(state.peers[&p.public_key], p);
        assert_eq!(state.private_key, None);
    }

    #[test]
    fn attributes_of_the_wrong_length_are_skipped_not_a_panic() {
        let p = spec(1, None, None);
        let mut bytes = wire(&WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(p.public_key.0),
                WireguardPeerAttribute::Endpoint(p.endpoint),
                WireguardPeerAttribute::AllowedIps(vec![allowed_ip(&p.allowed_ips[0])]),
            ])])],
        });
        assert_eq!(device_of([&bytes]).peers.len(), 1);
        // Every cut of the message, and every byte changed in turn: never a panic.
        for cut in 0..bytes.len() {
            let _ = device_of([&bytes[..cut]]);
        }
        for i in 0..bytes.len() {
            let old = bytes[i];
            for v in [0, 1, 4, 0xff] {
                bytes[i] = v;
                let _ = device_of([&bytes]);
            }
            bytes[i] = old;
        }
        // An empty CIDR attribute (what crashed the crate's parser) drops that allowed IP only.
        let empty_cidr = [4u8, 0, 3, 0];
        assert_eq!(allowed_ip_of(&empty_cidr), None);
        assert_eq!(endpoint_of(&[2, 0, 0]), None);
    }
}
