//! Next-hop objects (`ip nexthop`, Linux 5.3+) for the routes with a gateway.
//!
//! Every per-peer route flannel installs has its own gateway on one device (vxlan's `<subnet> via
//! <subnet>.0 dev flannel.1 onlink`, host-gw's `<subnet> via <peer> dev eth0`). The kernel compares
//! each such route's next hop with the others on the device, so installing n of them costs O(n²):
//! 5.5 s for 20,000 on the lab machine. A route that points at a next-hop object (`<subnet> nhid N`)
//! skips that comparison: about 0.5 s for the same 20,000. The kernel still reports such a route with its
//! gateway, device and `onlink` (`net.ipv4.nexthop_compat_mode`, on by default), so readers of the
//! routing table, Go flanneld and `ip route` included, see the same routes as before.
//!
//! flanneld's objects have ids in [`FIRST_ID`]..=[`LAST_ID`]; one per (gateway, device, onlink),
//! created when a route first needs it and deleted when the last route using it goes (an object
//! still referenced cannot be deleted without taking its routes with it). rtnetlink has no nexthop
//! messages, so [`NexthopMessage`] is written here: the `nhmsg` header and the `NHA_ID`, `NHA_OIF`
//! and `NHA_GATEWAY` attributes.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};

/// The first id of flanneld's next-hop objects (`0x464c0000`, "FL").
pub const FIRST_ID: u32 = 0x464c_0000;
/// The last id of flanneld's next-hop objects (262,144 ids).
pub const LAST_ID: u32 = 0x464f_ffff;

const RTM_NEWNEXTHOP: u16 = 104;
/// `RTM_DELNEXTHOP`.
pub const RTM_DELNEXTHOP: u16 = 105;
/// `RTNLGRP_NEXTHOP`, the multicast group of next-hop notifications.
pub const RTNLGRP_NEXTHOP: u32 = 32;
const RTM_GETNEXTHOP: u16 = 106;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
/// `RTNH_F_ONLINK`.
const ONLINK: u32 = 4;
/// `RTPROT_BOOT`, the protocol of flanneld's routes.
const PROTO_BOOT: u8 = 3;

/// A next hop: gateway, device index, and whether the gateway is on-link without a matching route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// The gateway.
    pub gateway: IpAddr,
    /// The output device.
    pub oif: u32,
    /// `onlink`.
    pub onlink: bool,
}

/// An `RTM_*NEXTHOP` message: the `nhmsg` header and the attributes flanneld uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NexthopMessage {
    /// `RTM_NEWNEXTHOP`, `RTM_DELNEXTHOP` or `RTM_GETNEXTHOP`.
    pub kind: u16,
    /// `AF_INET`, `AF_INET6`, or 0 (`AF_UNSPEC`, for a dump or a delete by id).
    pub family: u8,
    /// The routing protocol that made it.
    pub protocol: u8,
    /// `RTNH_F_*` flags.
    pub flags: u32,
    /// `NHA_ID`.
    pub id: Option<u32>,
    /// `NHA_OIF`.
    pub oif: Option<u32>,
    /// `NHA_GATEWAY`.
    pub gateway: Option<IpAddr>,
}

/// A malformed next-hop message from the kernel.
#[derive(Debug, thiserror::Error)]
#[error("malformed nexthop message: {0}")]
pub struct DecodeError(&'static str);

impl NexthopMessage {
    /// The object `id` for `hop` (`ip nexthop add id <id> via <gw> dev <oif> [onlink]`).
    pub fn new_object(id: u32, hop: NextHop) -> Self {
        Self {
            kind: RTM_NEWNEXTHOP,
            family: family_of(hop.gateway),
            protocol: PROTO_BOOT,
            flags: if hop.onlink { ONLINK } else { 0 },
            id: Some(id),
            oif: Some(hop.oif),
            gateway: Some(hop.gateway),
        }
    }

    /// A request deleting object `id`.
    pub fn delete(id: u32) -> Self {
        Self {
            kind: RTM_DELNEXTHOP,
            family: 0,
            protocol: 0,
            flags: 0,
            id: Some(id),
            oif: None,
            gateway: None,
        }
    }

    /// A dump request for every object.
    pub fn dump() -> Self {
        Self {
            kind: RTM_GETNEXTHOP,
            family: 0,
            protocol: 0,
            flags: 0,
            id: None,
            oif: None,
            gateway: None,
        }
    }

    /// The next hop this object describes, when it has a gateway and a device.
    pub fn hop(&self) -> Option<NextHop> {
        Some(NextHop {
            gateway: self.gateway?,
            oif: self.oif?,
            onlink: self.flags & ONLINK != 0,
        })
    }

    fn attrs(&self) -> Vec<(u16, Vec<u8>)> {
        let mut a = Vec::new();
        if let Some(id) = self.id {
            a.push((NHA_ID, id.to_ne_bytes().to_vec()));
        }
        if let Some(oif) = self.oif {
            a.push((NHA_OIF, oif.to_ne_bytes().to_vec()));
        }
        match self.gateway {
            Some(IpAddr::V4(g)) => a.push((NHA_GATEWAY, g.octets().to_vec())),
            Some(IpAddr::V6(g)) => a.push((NHA_GATEWAY, g.octets().to_vec())),
            None => {}
        }
        a
    }

    /// Parses the payload of a next-hop message (after the netlink header).
    pub fn parse(kind: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        let head = payload.get(..8).ok_or(DecodeError("shorter than nhmsg"))?;
        let mut m = Self {
            kind,
            family: head[0],
            protocol: head[2],
            flags: u32::from_ne_bytes([head[4], head[5], head[6], head[7]]),
            id: None,
            oif: None,
            gateway: None,
        };
        let mut rest = &payload[8..];
        while rest.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
            let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
            if len < 4 || len > rest.len() {
                return Err(DecodeError("attribute length out of range"));
            }
            let value = &rest[4..len];
            let u32_of = |v: &[u8]| -> Result<u32, DecodeError> {
                Ok(u32::from_ne_bytes(
                    v.try_into()
                        .map_err(|_| DecodeError("u32 attribute size"))?,
                ))
            };
            match kind {
                NHA_ID => m.id = Some(u32_of(value)?),
                NHA_OIF => m.oif = Some(u32_of(value)?),
                NHA_GATEWAY => {
                    m.gateway = Some(match value.len() {
                        4 => IpAddr::V4(Ipv4Addr::new(value[0], value[1], value[2], value[3])),
                        16 => {
                            let mut o = [0u8; 16];
                            o.copy_from_slice(value);
                            IpAddr::V6(Ipv6Addr::from(o))
                        }
                        _ => return Err(DecodeError("gateway size")),
                    })
                }
                _ => {}
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        Ok(m)
    }
}

fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

impl NetlinkSerializable for NexthopMessage {
    fn message_type(&self) -> u16 {
        self.kind
    }

    fn buffer_len(&self) -> usize {
        8 + self
            .attrs()
            .iter()
            .map(|(_, v)| (4 + v.len()).next_multiple_of(4))
            .sum::<usize>()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer.fill(0);
        buffer[0] = self.family;
        buffer[2] = self.protocol;
        buffer[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        let mut at = 8;
        for (kind, value) in self.attrs() {
            let len = 4 + value.len();
            buffer[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
            buffer[at + 2..at + 4].copy_from_slice(&kind.to_ne_bytes());
            buffer[at + 4..at + len].copy_from_slice(&value);
            at += len.next_multiple_of(4);
        }
    }
}

impl NetlinkDeserializable for NexthopMessage {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        Self::parse(header.message_type, payload)
    }
}

impl From<NexthopMessage> for NetlinkPayload<NexthopMessage> {
    fn from(m: NexthopMessage) -> Self {
        NetlinkPayload::InnerMessage(m)
    }
}

/// A netlink request for `m`: create (failing if the id exists), delete, or dump.
pub fn request(m: NexthopMessage) -> NetlinkMessage<NexthopMessage> {
    let flags = match m.kind {
        RTM_NEWNEXTHOP => NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        RTM_GETNEXTHOP => NLM_F_REQUEST | NLM_F_DUMP,
        _ => NLM_F_REQUEST | NLM_F_ACK,
    };
    let mut msg = NetlinkMessage::from(m);
    msg.header.flags = flags;
    msg.finalize();
    msg
}

/// One of flanneld's objects and how many routes point at it.
#[derive(Debug, Clone, Copy)]
struct Object {
    hop: NextHop,
    /// Routes of this flanneld's networks.
    users: u32,
    /// Routes outside them (another flanneld's, for another network), as of the last full read.
    others: u32,
}

/// Which objects flanneld holds and which routes use them.
///
/// Kept small, as a host has one object per peer: the objects by id (with their users), an
/// index of their ids by next hop (4 bytes a slot), and the object each route points at.
#[derive(Default)]
pub struct Registry {
    objects: HashMap<u32, Object>,
    /// The ids in `objects`, found by their next hop (hashed with `hasher`).
    by_hop: HashTable<u32>,
    hasher: RandomState,
    /// The object each route (by destination) points at.
    route_id: HashMap<ipnet::IpNet, u32>,
    /// Ids in flanneld's range that another program holds.
    foreign: std::collections::HashSet<u32>,
    cursor: u32,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("objects", &self.objects.len())
            .field("routes", &self.route_id.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// The id of the object for `hop`, if flanneld has one.
    pub fn id_of(&self, hop: &NextHop) -> Option<u32> {
        let objects = &self.objects;
        self.by_hop
            .find(self.hasher.hash_one(hop), |id| {
                objects.get(id).is_some_and(|o| o.hop == *hop)
            })
            .copied()
    }

    /// The next hop of object `id`, if it is flanneld's.
    pub fn hop_of(&self, id: u32) -> Option<NextHop> {
        self.objects.get(&id).map(|o| o.hop)
    }

    /// The object route `dst` points at.
    pub fn route(&self, dst: &ipnet::IpNet) -> Option<u32> {
        self.route_id.get(dst).copied()
    }

    /// Whether a route points at object `id`.
    pub fn in_use(&self, id: u32) -> bool {
        self.objects.get(&id).is_some_and(|o| o.users > 0)
    }

    /// Takes `id` out of the index by next hop (`hop` is its next hop).
    fn unindex(&mut self, id: u32, hop: &NextHop) {
        if let Ok(entry) = self
            .by_hop
            .find_entry(self.hasher.hash_one(hop), |&x| x == id)
        {
            entry.remove();
        }
    }

    /// Records an object (created, or found in a dump). It is the one found for its next hop from
    /// now on.
    pub fn insert(&mut self, id: u32, hop: NextHop) {
        let (users, others) = match self.objects.get(&id) {
            Some(old) => {
                let (old_hop, users, others) = (old.hop, old.users, old.others);
                self.unindex(id, &old_hop);
                (users, others)
            }
            None => (0, 0),
        };
        if let Some(other) = self.id_of(&hop) {
            self.unindex(other, &hop);
        }
        self.objects.insert(id, Object { hop, users, others });
        let (objects, hasher) = (&self.objects, &self.hasher);
        self.by_hop
            .insert_unique(hasher.hash_one(hop), id, |other| {
                objects.get(other).map_or(0, |o| hasher.hash_one(o.hop))
            });
    }

    /// Forgets every object (before recording a fresh dump); what routes point at stays.
    pub fn clear_objects(&mut self) {
        self.objects.clear();
        self.by_hop.clear();
    }

    /// Forgets an object (deleted, or gone).
    pub fn remove(&mut self, id: u32) {
        if let Some(o) = self.objects.remove(&id) {
            self.unindex(id, &o.hop);
        }
    }

    /// Marks `id` as another program's (skipped from now on).
    pub fn skip(&mut self, id: u32) {
        self.foreign.insert(id);
    }

    /// A free id in flanneld's range (not one it holds), starting after the last one given.
    pub fn next_free(&mut self) -> Option<u32> {
        let span = LAST_ID - FIRST_ID + 1;
        for _ in 0..span {
            let id = FIRST_ID + self.cursor % span;
            self.cursor = self.cursor.wrapping_add(1);
            if !self.objects.contains_key(&id) && !self.foreign.contains(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Route `dst` now points at `id` (or at nothing); returns an object no route uses any more. An
    /// object that routes of another flanneld used too (at the last full read) is let go instead:
    /// forgotten, and its id skipped, not deleted.
    pub fn set_route(&mut self, dst: ipnet::IpNet, id: Option<u32>) -> Option<u32> {
        let old = match id {
            Some(id) => self.route_id.insert(dst, id),
            None => self.route_id.remove(&dst),
        };
        if old == id {
            return None;
        }
        if let Some(o) = id.and_then(|id| self.objects.get_mut(&id)) {
            o.users += 1;
        }
        let old = old?;
        let o = self.objects.get_mut(&old)?;
        o.users = o.users.saturating_sub(1);
        match (o.users, o.others) {
            (0, 0) => Some(old),
            (0, _) => {
                self.remove(old);
                self.skip(old);
                None
            }
            _ => None,
        }
    }

    /// Replaces what routes point at with what a full read of the routing table found (each
    /// route with its object and whether it is one of this flanneld's networks), and returns
    /// flanneld's objects no route uses (left from an earlier run, or by a deleted route) among
    /// those `read` covers (the families and devices that were read: another backend's objects
    /// are not this read's to judge). Objects only routes outside this flanneld's networks use
    /// belong to another flanneld on the host (another network): they are forgotten and their ids
    /// skipped, so each flanneld's routes use its own objects.
    pub fn reset_routes(
        &mut self,
        routes: impl IntoIterator<Item = (ipnet::IpNet, u32, bool)>,
        read: impl Fn(&NextHop) -> bool,
    ) -> Vec<u32> {
        self.route_id.clear();
        for o in self.objects.values_mut() {
            o.users = 0;
            o.others = 0;
        }
        for (dst, id, ours) in routes {
            if let Some(o) = self.objects.get_mut(&id) {
                if ours {
                    self.route_id.insert(dst, id);
                    o.users += 1;
                } else {
                    o.others += 1;
                }
            }
        }
        let theirs: Vec<u32> = self
            .objects
            .iter()
            .filter(|(_, o)| o.users == 0 && o.others > 0)
            .map(|(id, _)| *id)
            .collect();
        for id in theirs {
            self.remove(id);
            self.skip(id);
        }
        let mut unused: Vec<u32> = self
            .objects
            .iter()
            .filter(|(_, o)| o.users == 0 && read(&o.hop))
            .map(|(id, _)| *id)
            .collect();
        unused.sort_unstable();
        unused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(gw: &str) -> NextHop {
        NextHop {
            gateway: gw.parse().unwrap(),
            oif: 5,
            onlink: true,
        }
    }

    #[test]
    fn a_message_round_trips() {
        for m in [
            NexthopMessage::new_object(FIRST_ID + 7, hop("10.5.2.0")),
            NexthopMessage::new_object(FIRST_ID, hop("fd00::1")),
            NexthopMessage::delete(FIRST_ID + 1),
            NexthopMessage::dump(),
        ] {
            let mut buf = vec![0xaa; m.buffer_len()];
            m.serialize(&mut buf);
            assert_eq!(NexthopMessage::parse(m.kind, &buf).unwrap(), m);
        }
        let m = NexthopMessage::new_object(9, hop("10.5.2.0"));
        assert_eq!(m.hop(), Some(hop("10.5.2.0")));
        // nhmsg (8) + id (8) + oif (8) + IPv4 gateway (8).
        assert_eq!(m.buffer_len(), 32);
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(NexthopMessage::parse(RTM_NEWNEXTHOP, &[0; 4]).is_err());
        let mut bad = vec![0u8; 8];
        bad.extend_from_slice(&[200, 0, 1, 0]);
        assert!(NexthopMessage::parse(RTM_NEWNEXTHOP, &bad).is_err());
        let mut short_id = vec![0u8; 8];
        short_id.extend_from_slice(&[6, 0, 1, 0, 1, 2, 0, 0]);
        assert!(NexthopMessage::parse(RTM_NEWNEXTHOP, &short_id).is_err());
    }

    #[test]
    fn objects_are_shared_and_released_with_their_last_route() {
        let mut r = Registry::default();
        let a = r.next_free().unwrap();
        r.insert(a, hop("10.5.2.0"));
        assert_eq!(r.id_of(&hop("10.5.2.0")), Some(a));
        let (d1, d2) = (
            "10.5.2.0/24".parse().unwrap(),
            "10.5.9.0/24".parse().unwrap(),
        );
        assert_eq!(r.set_route(d1, Some(a)), None);
        assert_eq!(r.set_route(d1, Some(a)), None, "the same route again");
        assert_eq!(r.set_route(d2, Some(a)), None);
        assert!(r.in_use(a));
        assert_eq!(r.set_route(d1, None), None, "still used by d2");
        assert_eq!(r.set_route(d2, None), Some(a), "last user gone");
        assert!(!r.in_use(a));
        // A route moving to another object releases the old one.
        let b = r.next_free().unwrap();
        assert_ne!(a, b);
        r.insert(b, hop("10.5.3.0"));
        r.set_route(d1, Some(a));
        assert_eq!(r.set_route(d1, Some(b)), Some(a));
    }

    #[test]
    fn a_full_read_finds_the_unused_objects() {
        let mut r = Registry::default();
        r.insert(FIRST_ID, hop("10.5.2.0"));
        r.insert(FIRST_ID + 1, hop("10.5.3.0"));
        r.insert(FIRST_ID + 2, hop("fd00::2"));
        let routes = [
            ("10.5.2.0/24".parse().unwrap(), FIRST_ID, true),
            ("10.5.4.0/24".parse().unwrap(), 77, true), // not flanneld's object
        ];
        // Only IPv4 was read: the unused IPv6 object is not judged.
        let unused = r.reset_routes(routes, |h| h.gateway.is_ipv4());
        assert_eq!(unused, [FIRST_ID + 1]);
        assert_eq!(r.route(&"10.5.2.0/24".parse().unwrap()), Some(FIRST_ID));
        assert_eq!(r.route(&"10.5.4.0/24".parse().unwrap()), None);
        r.remove(FIRST_ID + 1);
        assert_eq!(r.hop_of(FIRST_ID + 1), None);
        assert_eq!(r.id_of(&hop("10.5.3.0")), None);
    }

    /// A second flanneld on the host (another network): objects only its routes use are not this
    /// one's (forgotten, ids skipped, never deleted nor reused); an object both used (adopted by an
    /// older flanneld) is let go, not deleted, when this one's last route leaves it.
    #[test]
    fn another_flannelds_objects_are_left_to_it() {
        let mut r = Registry::default();
        let (mine, theirs, shared) = (FIRST_ID, FIRST_ID + 1, FIRST_ID + 2);
        r.insert(mine, hop("10.5.2.0"));
        r.insert(theirs, hop("172.20.0.12"));
        r.insert(shared, hop("172.20.0.13"));
        let (d_mine, d_shared): (ipnet::IpNet, ipnet::IpNet) = (
            "10.11.2.0/24".parse().unwrap(),
            "10.11.3.0/24".parse().unwrap(),
        );
        let routes = [
            (d_mine, mine, true),
            (d_shared, shared, true),
            ("10.12.2.0/24".parse().unwrap(), theirs, false),
            ("10.12.3.0/24".parse().unwrap(), shared, false),
        ];
        let unused = r.reset_routes(routes, |_| true);
        assert!(unused.is_empty(), "{unused:?}");
        assert_eq!(r.hop_of(theirs), None, "forgotten");
        assert_eq!(
            r.id_of(&hop("172.20.0.12")),
            None,
            "not reused for that next hop"
        );
        assert!(
            (0..3).all(|_| r.next_free() != Some(theirs)),
            "its id skipped"
        );
        assert_eq!(r.route(&"10.12.2.0/24".parse().unwrap()), None);
        // Our last route through the shared object goes: let go, not deleted.
        assert_eq!(r.set_route(d_shared, None), None);
        assert_eq!(r.hop_of(shared), None);
        // Our own object, as before: deleted with its last route.
        assert_eq!(r.set_route(d_mine, None), Some(mine));
    }

    /// The registry's index by next hop against the plain two-map model it replaced: the same
    /// answers after any sequence of inserts, removals and clears.
    #[test]
    fn the_index_by_next_hop_agrees_with_two_maps() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let hops: Vec<NextHop> = (0..12).map(|i| hop(&format!("10.5.{i}.0"))).collect();
        let mut r = Registry::default();
        let (mut by_id, mut by_hop) = (HashMap::new(), HashMap::new());
        for step in 0..5000 {
            let id = FIRST_ID + rng.random_range(0..16u32);
            let h = hops[rng.random_range(0..hops.len())];
            match rng.random_range(0..10) {
                0..=5 => {
                    r.insert(id, h);
                    if let Some(old) = by_id.insert(id, h)
                        && by_hop.get(&old) == Some(&id)
                    {
                        by_hop.remove(&old);
                    }
                    by_hop.insert(h, id);
                }
                6..=8 => {
                    r.remove(id);
                    if let Some(old) = by_id.remove(&id)
                        && by_hop.get(&old) == Some(&id)
                    {
                        by_hop.remove(&old);
                    }
                }
                _ => {
                    r.clear_objects();
                    by_id.clear();
                    by_hop.clear();
                }
            }
            for h in &hops {
                assert_eq!(r.id_of(h), by_hop.get(h).copied(), "step {step}: {h:?}");
            }
            for id in FIRST_ID..FIRST_ID + 16 {
                assert_eq!(r.hop_of(id), by_id.get(&id).copied(), "step {step}: {id}");
            }
        }
    }

    #[test]
    fn ids_stay_in_range_and_skip_taken_ones() {
        let mut r = Registry::default();
        r.insert(FIRST_ID, hop("10.5.2.0"));
        let id = r.next_free().unwrap();
        assert_eq!(id, FIRST_ID + 1);
        r.cursor = LAST_ID - FIRST_ID;
        assert_eq!(r.next_free(), Some(LAST_ID));
        assert_eq!(
            r.next_free(),
            Some(FIRST_ID + 1),
            "wraps, skipping the taken id"
        );
    }
}
