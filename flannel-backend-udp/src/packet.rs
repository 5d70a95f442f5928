//! The udp backend's data path as pure code (no sockets, no TUN): what to do with a packet read from
//! the TUN device or a datagram received from a peer. Wire format, as Go flannel: the inner IPv4
//! packet is the whole UDP payload.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::table::Table;

/// What the I/O loop must do with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the (TTL-decremented) packet as one UDP datagram to this peer.
    SendTo(SocketAddrV4),
    /// Write the (TTL-decremented) packet to the TUN device.
    WriteTun,
    /// Write this ICMP "net unreachable" reply to the TUN device.
    Reply(Reply),
    /// Drop it.
    Drop(Drop),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not an IPv4 packet or truncated.
    Malformed,
    /// TTL reached zero.
    TtlExpired,
    /// No peer for the destination (an ICMP reply was not due).
    NoRoute,
    /// The datagram did not come from a known peer.
    UnknownPeer,
    /// The inner source is outside the sending peer's subnet (spoofed).
    Spoofed,
}

fn header_ok(p: &[u8]) -> bool {
    p.len() >= 20 && p[0] >> 4 == 4 && usize::from(p[0] & 0x0f) * 4 <= p.len() && p[0] & 0x0f >= 5
}

fn src(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[12], p[13], p[14], p[15])
}

fn dst(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[16], p[17], p[18], p[19])
}

/// Decrements the TTL and fixes the header checksum incrementally (RFC 1624). False when the TTL
/// is exhausted, or when `p` is too short to be an IPv4 header.
pub fn dec_ttl(p: &mut [u8]) -> bool {
    if p.len() < 20 || p[8] <= 1 {
        return false;
    }
    let old = u16::from_be_bytes([p[8], p[9]]);
    p[8] -= 1;
    let new = u16::from_be_bytes([p[8], p[9]]);
    // HC' = ~(~HC + ~m + m')
    let hc = u16::from_be_bytes([p[10], p[11]]);
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let hc = !(sum as u16);
    p[10..12].copy_from_slice(&hc.to_be_bytes());
    true
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP reply, built on the stack: the data path allocates nothing, even for a flood of packets
/// to unknown destinations. Derefs to its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    buf: [u8; Reply::MAX],
    len: usize,
}

impl Reply {
    /// IPv4 header + ICMP header + the offender's header (at most 60 bytes) + 8 bytes.
    pub const MAX: usize = 20 + 8 + 60 + 8;
}

impl std::ops::Deref for Reply {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// ICMP "destination unreachable / net unreachable" for `offender`, from `from` (the TUN address):
/// IPv4 header (ihl 5, ttl 8), then the offender's IP header and first 8 payload bytes. `None` for
/// ICMP offenders and non-first fragments, as Go flannel, and for anything that is not an IPv4 packet.
pub fn net_unreachable(offender: &[u8], from: Ipv4Addr) -> Option<Reply> {
    if !header_ok(offender) {
        return None;
    }
    let ihl = usize::from(offender[0] & 0x0f) * 4;
    let frag_offset = u16::from_be_bytes([offender[6], offender[7]]) & 0x1fff;
    if offender[9] == 1 || frag_offset != 0 {
        return None;
    }
    let quoted = &offender[..offender.len().min(ihl + 8)];
    let total = 20 + 8 + quoted.len();
    let mut reply = Reply {
        buf: [0; Reply::MAX],
        len: total,
    };
    let r = &mut reply.buf[..total];
    r[0] = 0x45;
    r[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    r[8] = 8; // ttl
    r[9] = 1; // ICMP
    r[12..16].copy_from_slice(&from.octets());
    r[16..20].copy_from_slice(&offender[12..16]);
    let c = checksum(&r[..20]);
    r[10..12].copy_from_slice(&c.to_be_bytes());
    r[20] = 3; // destination unreachable
    r[21] = 0; // net unreachable
    r[28..].copy_from_slice(quoted);
    let c = checksum(&r[20..]);
    r[22..24].copy_from_slice(&c.to_be_bytes());
    Some(reply)
}

/// A packet read from the TUN device (going to a peer).
pub fn from_tun(p: &mut [u8], table: &Table, port: u16, tun_addr: Ipv4Addr) -> Outcome {
    if !header_ok(p) {
        return Outcome::Drop(Drop::Malformed);
    }
    let Some(peer) = table.peer_for(dst(p)) else {
        return match net_unreachable(p, tun_addr) {
            Some(r) => Outcome::Reply(r),
            None => Outcome::Drop(Drop::NoRoute),
        };
    };
    if !dec_ttl(p) {
        return Outcome::Drop(Drop::TtlExpired);
    }
    Outcome::SendTo(SocketAddrV4::new(peer, port))
}

/// A datagram received from `from` (going to a local pod). Only known peers, and only inner sources
/// inside that peer's subnet, are accepted (Go flannel accepts anything).
pub fn from_udp(p: &mut [u8], from: Ipv4Addr, table: &Table) -> Outcome {
    if !header_ok(p) {
        return Outcome::Drop(Drop::Malformed);
    }
    match table.subnets_of(from) {
        None => return Outcome::Drop(Drop::UnknownPeer),
        Some(nets) if !nets.iter().any(|n| n.contains(&src(p))) => {
            return Outcome::Drop(Drop::Spoofed);
        }
        Some(_) => {}
    }
    if !dec_ttl(p) {
        return Outcome::Drop(Drop::TtlExpired);
    }
    Outcome::WriteTun
}

#[cfg(test)]
pub(crate) fn ipv4_packet(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = ttl;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table::from_peers([(
            "10.5.2.0/24".parse().unwrap(),
            "172.20.0.12".parse().unwrap(),
        )])
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        for ttl in [2u8, 64, 255] {
            let mut p = ipv4_packet([10, 5, 1, 2], [10, 5, 2, 2], 17, ttl, b"hello");
            assert!(dec_ttl(&mut p));
            assert_eq!(p[8], ttl - 1);
            assert_eq!(checksum(&p[..20]), 0, "header checksum verifies");
        }
        let mut p = ipv4_packet([10, 5, 1, 2], [10, 5, 2, 2], 17, 1, b"x");
        assert!(!dec_ttl(&mut p));
    }

    #[test]
    fn tun_to_peer() {
        let mut p = ipv4_packet([10, 5, 1, 2], [10, 5, 2, 9], 6, 64, b"data");
        assert_eq!(
            from_tun(&mut p, &table(), 8285, "10.5.1.0".parse().unwrap()),
            Outcome::SendTo("172.20.0.12:8285".parse().unwrap())
        );
        assert_eq!(p[8], 63);
        let mut p = ipv4_packet([10, 5, 1, 2], [10, 5, 2, 9], 6, 1, b"data");
        assert_eq!(
            from_tun(&mut p, &table(), 8285, "10.5.1.0".parse().unwrap()),
            Outcome::Drop(Drop::TtlExpired)
        );
        assert_eq!(
            from_tun(&mut [0u8; 10], &table(), 8285, "10.5.1.0".parse().unwrap()),
            Outcome::Drop(Drop::Malformed)
        );
    }

    #[test]
    fn unknown_destination_gets_net_unreachable() {
        let mut p = ipv4_packet(
            [10, 5, 1, 2],
            [10, 5, 9, 9],
            17,
            64,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        );
        let Outcome::Reply(r) = from_tun(&mut p, &table(), 8285, "10.5.1.0".parse().unwrap())
        else {
            panic!()
        };
        assert_eq!(checksum(&r[..20]), 0);
        assert_eq!(checksum(&r[20..]), 0);
        assert_eq!((r[8], r[9], r[20], r[21]), (8, 1, 3, 0));
        assert_eq!(&r[12..16], &[10, 5, 1, 0], "from the TUN address");
        assert_eq!(&r[16..20], &[10, 5, 1, 2], "to the offender");
        assert_eq!(&r[28..], &p[..28], "offender header and 8 bytes");
        // The largest quote: a 60-byte header with options, then 8 bytes.
        let mut long = ipv4_packet([10, 5, 1, 2], [10, 5, 9, 9], 17, 64, &[7; 100]);
        long[0] = 0x4f;
        let r = net_unreachable(&long, "10.5.1.0".parse().unwrap()).unwrap();
        assert_eq!(r.len(), Reply::MAX);
        assert_eq!(&r[28..], &long[..68]);
        // Never for ICMP offenders.
        let mut icmp = ipv4_packet(
            [10, 5, 1, 2],
            [10, 5, 9, 9],
            1,
            64,
            &[8, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(
            from_tun(&mut icmp, &table(), 8285, "10.5.1.0".parse().unwrap()),
            Outcome::Drop(Drop::NoRoute)
        );
    }

    #[test]
    fn peer_to_tun_with_anti_spoofing() {
        let t = table();
        let mut ok = ipv4_packet([10, 5, 2, 7], [10, 5, 1, 2], 17, 64, b"x");
        assert_eq!(
            from_udp(&mut ok, "172.20.0.12".parse().unwrap(), &t),
            Outcome::WriteTun
        );
        let mut spoofed = ipv4_packet([10, 5, 3, 7], [10, 5, 1, 2], 17, 64, b"x");
        assert_eq!(
            from_udp(&mut spoofed, "172.20.0.12".parse().unwrap(), &t),
            Outcome::Drop(Drop::Spoofed)
        );
        let mut stranger = ipv4_packet([10, 5, 2, 7], [10, 5, 1, 2], 17, 64, b"x");
        assert_eq!(
            from_udp(&mut stranger, "172.20.0.99".parse().unwrap(), &t),
            Outcome::Drop(Drop::UnknownPeer)
        );
    }
}
