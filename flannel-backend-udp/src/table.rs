//! The forwarding table: peer subnets (longest prefix match) to peer public IPs, and back.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Subnet → peer, with longest-prefix-match lookup, and peer → its subnets for anti-spoofing.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Per prefix length (longest first): masked network → peer.
    by_len: Vec<(u8, HashMap<u32, Ipv4Addr>)>,
    peers: HashMap<Ipv4Addr, Vec<Ipv4Net>>,
}

impl Table {
    /// A table from (subnet, peer public IP) pairs.
    pub fn from_peers(peers: impl IntoIterator<Item = (Ipv4Net, Ipv4Addr)>) -> Self {
        let mut t = Table::default();
        for (net, ip) in peers {
            let net = net.trunc();
            let len = net.prefix_len();
            let slot = match t.by_len.iter().position(|(l, _)| *l == len) {
                Some(i) => i,
                None => {
                    t.by_len.push((len, HashMap::new()));
                    t.by_len.len() - 1
                }
            };
            t.by_len[slot].1.insert(u32::from(net.network()), ip);
            t.peers.entry(ip).or_default().push(net);
        }
        t.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
        t
    }

    /// The peer whose subnet holds `dst`.
    pub fn peer_for(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let d = u32::from(dst);
        self.by_len.iter().find_map(|(len, m)| {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
            m.get(&(d & mask)).copied()
        })
    }

    /// The subnets announced by the peer at `ip`.
    pub fn subnets_of(&self, ip: Ipv4Addr) -> Option<&[Ipv4Net]> {
        self.peers.get(&ip).map(Vec::as_slice)
    }

    /// The number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let t = Table::from_peers([
            ("10.5.0.0/16".parse().unwrap(), "1.1.1.1".parse().unwrap()),
            ("10.5.2.0/24".parse().unwrap(), "2.2.2.2".parse().unwrap()),
            ("10.5.2.128/25".parse().unwrap(), "3.3.3.3".parse().unwrap()),
        ]);
        assert_eq!(
            t.peer_for("10.5.2.200".parse().unwrap()),
            Some("3.3.3.3".parse().unwrap())
        );
        assert_eq!(
            t.peer_for("10.5.2.1".parse().unwrap()),
            Some("2.2.2.2".parse().unwrap())
        );
        assert_eq!(
            t.peer_for("10.5.9.1".parse().unwrap()),
            Some("1.1.1.1".parse().unwrap())
        );
        assert_eq!(t.peer_for("10.6.0.1".parse().unwrap()), None);
        assert_eq!(t.subnets_of("2.2.2.2".parse().unwrap()).unwrap().len(), 1);
        assert_eq!(t.len(), 3);
    }
}
