//! Which peer leases may reach the data plane.
//!
//! Everything in a lease comes from the store, and anyone who can write the store can write a lease.
//! One bad key must never take down a host or the cluster, so before a backend sees the peers'
//! leases, [`LeasePolicy::filter`] refuses every lease whose subnet
//!
//! - lies outside the cluster network (`Network`, or `IPv6Network` for the IPv6 part): installing it
//!   would route non-cluster traffic into the overlay (a `0.0.0.0/1` lease would take half the
//!   internet), and the reconcile loop could not even see such a route to keep it right;
//! - overlaps a network the host could reach before flannel: a directly connected network (such as
//!   the underlay the hosts talk over: a lease for a piece of it would cut the host off from its
//!   peers and from the store, so the delete that would repair it could never arrive) or a route to a
//!   specific network through a gateway that is not flannel's;
//! - overlaps our own subnet without being it;
//!
//! and every lease other than ours that names one of this host's public IPs (with
//! [`LeasePolicy::with_own_public_ips`]): the data plane would send that subnet's traffic to this
//! host itself, round and round (two hosts sharing one public IP, as behind one NAT address, cannot
//! both be reached).
//!
//! A refused lease is reported (the driver logs it once per change and counts it); the others go on.
//! Routes that contain the whole cluster network (a default route, a VPN's 10.0.0.0/8) are not in the
//! way: leases are more specific by design. Routes that flannel itself owns (on its devices, or
//! host-gw routes left by an earlier run) and our own subnet's route (`cni0`) are not protected.

use ipnet::IpNet;

use crate::{Ownership, Route};
use flannel_core::{Lease, SubnetKey};

/// The rules of the module doc, for one host.
#[derive(Debug, Clone)]
pub struct LeasePolicy {
    networks: Vec<IpNet>,
    own_key: SubnetKey,
    own: Vec<IpNet>,
    protected: Vec<Route>,
    own_public: Vec<std::net::IpAddr>,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl LeasePolicy {
    /// The policy for a host whose lease is `own_key`, whose backend owns what `flannel` says (the
    /// cluster networks among it), and whose routing table before flannel's first pass was
    /// `host_routes` (every main-table route, any destination).
    pub fn new(own_key: SubnetKey, flannel: &Ownership, host_routes: &[Route]) -> Self {
        let mut own = Vec::new();
        if own_key.ipv4.prefix_len() > 0 {
            own.push(IpNet::V4(own_key.ipv4));
        }
        if let Some(v6) = own_key.ipv6 {
            own.push(IpNet::V6(v6));
        }
        let networks = flannel.networks.clone();
        let protected = host_routes
            .iter()
            .filter(|r| r.dst.prefix_len() > 0)
            .filter(|r| !flannel.owns_route(r))
            .filter(|r| !own.iter().any(|o| o.contains(&r.dst)))
            .filter(|r| r.gateway.is_none() || !networks.iter().any(|n| r.dst.contains(n)))
            .cloned()
            .collect();
        Self {
            networks,
            own_key,
            own,
            protected,
            own_public: Vec::new(),
        }
    }

    /// Also refuses other leases that name one of `ips`, this host's public addresses (its own
    /// lease's `PublicIP` and `PublicIPv6`).
    pub fn with_own_public_ips(mut self, ips: impl IntoIterator<Item = std::net::IpAddr>) -> Self {
        self.own_public = ips.into_iter().collect();
        self
    }

    /// Why `lease` must not be installed, or `Ok`.
    pub fn check(&self, lease: &Lease) -> Result<(), String> {
        let mut parts = Vec::new();
        if lease.enable_ipv4 {
            parts.push(IpNet::V4(lease.key.ipv4));
        }
        if let Some(v6) = lease.key.ipv6
            && self.networks.iter().any(|n| n.addr().is_ipv6())
        {
            parts.push(IpNet::V6(v6));
        }
        let who = format!("lease {} (public IP {})", lease.key, lease.attrs.public_ip);
        if lease.key != self.own_key
            && let Some(ip) = lease
                .attrs
                .public_ips()
                .find(|ip| self.own_public.contains(ip))
        {
            return Err(format!(
                "refusing {who}: {ip} is this host's own public IP, so its traffic would come back here; \
                 two hosts cannot share one public IP: give each host its own (--iface, --public-ip), or delete the key if it is stale"
            ));
        }
        for part in &parts {
            let same_family: Vec<&IpNet> = self
                .networks
                .iter()
                .filter(|n| n.addr().is_ipv4() == part.addr().is_ipv4())
                .collect();
            if !same_family.iter().any(|n| n.contains(part)) {
                let nets: Vec<String> = same_family.iter().map(|n| n.to_string()).collect();
                return Err(format!(
                    "refusing {who}: {part} is outside the cluster network {}; delete the key or fix its subnet",
                    if nets.is_empty() {
                        "(none of this family)".to_string()
                    } else {
                        nets.join(", ")
                    }
                ));
            }
            if lease.key != self.own_key
                && let Some(o) = self.own.iter().find(|o| overlaps(o, part))
            {
                return Err(format!(
                    "refusing {who}: {part} overlaps this host's own subnet {o}; two hosts cannot hold overlapping subnets, delete one of the keys"
                ));
            }
            if let Some(r) = self.protected.iter().find(|r| overlaps(&r.dst, part)) {
                return Err(format!(
                    "refusing {who}: {part} overlaps {}, which this host reached before flannel (route {r}); installing it could cut the host off. Delete the key, or choose a Network that does not overlap the hosts' networks",
                    r.dst
                ));
            }
        }
        Ok(())
    }

    /// The leases that may be installed, and a reason for each refused one.
    pub fn filter<'a>(&self, leases: &[&'a Lease]) -> (Vec<&'a Lease>, Vec<String>) {
        let mut ok = Vec::with_capacity(leases.len());
        let mut refused = Vec::new();
        for l in leases {
            match self.check(l) {
                Ok(()) => ok.push(*l),
                Err(why) => refused.push(why),
            }
        }
        (ok, refused)
    }
}

/// Why a peer's public IP cannot be the far end of a tunnel to it (ipip, ipsec), if it cannot: no
/// address (`0.0.0.0`), a loopback address, or not a unicast address. Such a lease gets a warning
/// and nothing in the kernel.
pub fn unusable_tunnel_end(ip: std::net::Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("it has no public IP")
    } else if ip.is_loopback() {
        Some("its public IP is a loopback address")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some("its public IP is not a unicast address")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::LeaseAttrs;

    fn route(dst: &str, gw: Option<&str>, oif: u32) -> Route {
        Route {
            dst: dst.parse().unwrap_or_else(|_| unreachable!()),
            gateway: gw.map(|g| g.parse().unwrap_or_else(|_| unreachable!())),
            oif,
            onlink: false,
        }
    }

    fn lease(key: &str) -> Lease {
        let key: SubnetKey = key.parse().unwrap_or_else(|_| unreachable!());
        Lease {
            key,
            enable_ipv4: key.ipv4.prefix_len() > 0,
            attrs: LeaseAttrs {
                public_ip: "172.30.0.12".parse().unwrap_or_else(|_| unreachable!()),
                ..Default::default()
            },
            expiration: None,
            asof: 0,
        }
    }

    /// eth0 = 2 (underlay 172.30.0.0/16), flannel.1 = 5, cni0 = 7, eth1 = 9.
    fn host(network: &str) -> LeasePolicy {
        let own = Ownership {
            networks: vec![network.parse().unwrap_or_else(|_| unreachable!())],
            route_oifs: vec![5],
            gateway_route_oifs: vec![2],
            keep: vec![],
            neigh_ifindexes: vec![5],
            fdb_ifindexes: vec![5],
        };
        let routes = [
            route("0.0.0.0/0", Some("172.30.0.1"), 2),
            route("172.30.0.0/16", None, 2),
            route("10.244.1.0/24", None, 7),
            route("10.0.0.0/8", Some("192.168.9.1"), 9),
            route("192.168.9.0/24", None, 9),
            route("10.244.77.0/24", Some("192.168.9.1"), 9),
            // Left by an earlier run: flannel's own.
            route("10.244.5.0/24", Some("172.30.0.15"), 2),
            route("10.244.6.0/24", Some("10.244.6.0"), 5),
        ];
        LeasePolicy::new(
            "10.244.1.0-24".parse().unwrap_or_else(|_| unreachable!()),
            &own,
            &routes,
        )
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            network: &'static str,
            key: &'static str,
            refused: Option<&'static str>,
        }
        let cases = [
            Case {
                name: "a peer",
                network: "10.244.0.0/16",
                key: "10.244.3.0-24",
                refused: None,
            },
            Case {
                name: "outside Network",
                network: "10.244.0.0/16",
                key: "10.99.0.0-16",
                refused: Some("outside the cluster network"),
            },
            Case {
                name: "half the internet",
                network: "10.244.0.0/16",
                key: "0.0.0.0-1",
                refused: Some("outside the cluster network"),
            },
            Case {
                name: "the underlay, outside Network",
                network: "10.244.0.0/16",
                key: "172.30.0.0-24",
                refused: Some("outside"),
            },
            Case {
                name: "the underlay inside a too-wide Network",
                network: "172.16.0.0/12",
                key: "172.30.0.0-24",
                refused: Some("overlaps 172.30.0.0/16"),
            },
            Case {
                name: "a Network-wide lease",
                network: "10.244.0.0/16",
                key: "10.244.0.0-16",
                refused: Some("own subnet"),
            },
            Case {
                name: "inside our subnet",
                network: "10.244.0.0/16",
                key: "10.244.1.128-25",
                refused: Some("own subnet"),
            },
            Case {
                name: "our own key",
                network: "10.244.0.0/16",
                key: "10.244.1.0-24",
                refused: None,
            },
            Case {
                name: "a static route of someone else's",
                network: "10.244.0.0/16",
                key: "10.244.77.0-24",
                refused: Some("overlaps 10.244.77.0/24"),
            },
            Case {
                name: "a host-gw route from an earlier run",
                network: "10.244.0.0/16",
                key: "10.244.5.0-24",
                refused: None,
            },
            Case {
                name: "a vxlan route from an earlier run",
                network: "10.244.0.0/16",
                key: "10.244.6.0-24",
                refused: None,
            },
        ];
        for c in cases {
            let got = host(c.network).check(&lease(c.key));
            match c.refused {
                None => assert_eq!(got, Ok(()), "{}", c.name),
                Some(why) => {
                    let e = got.expect_err(c.name);
                    assert!(e.contains(why), "{}: {e}", c.name);
                    assert!(e.contains(c.key), "{}: names the lease: {e}", c.name);
                }
            }
        }
    }

    #[test]
    fn a_wide_route_through_a_gateway_is_not_in_the_way() {
        // 10.0.0.0/8 via a VPN contains the whole cluster network: leases are more specific.
        assert_eq!(
            host("10.244.0.0/16").check(&lease("10.244.200.0-24")),
            Ok(())
        );
    }

    #[test]
    fn filter_keeps_the_good_and_explains_the_bad() {
        let (good, bad) = (lease("10.244.3.0-24"), lease("10.99.0.0-16"));
        let (ok, why) = host("10.244.0.0/16").filter(&[&good, &bad]);
        assert_eq!(ok, vec![&good]);
        assert_eq!(why.len(), 1);
    }

    #[test]
    fn ipv6_parts_are_checked_against_the_ipv6_network() {
        let own = Ownership {
            networks: vec![
                "10.244.0.0/16".parse().unwrap_or_else(|_| unreachable!()),
                "fd00:10::/48".parse().unwrap_or_else(|_| unreachable!()),
            ],
            ..Ownership::default()
        };
        let p = LeasePolicy::new(
            "10.244.1.0-24&fd00:10:0:1::-64"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
            &own,
            &[route("fd00:99::/64", None, 2)],
        );
        assert_eq!(p.check(&lease("10.244.3.0-24&fd00:10:0:3::-64")), Ok(()));
        let e = p.check(&lease("10.244.3.0-24&fd00:99::-64")).unwrap_err();
        assert!(
            e.contains("outside the cluster network fd00:10::/48"),
            "{e}"
        );
    }

    #[test]
    fn a_peer_naming_this_hosts_public_ip_is_refused() {
        let me: std::net::IpAddr = "172.30.0.11".parse().unwrap_or_else(|_| unreachable!());
        let me6: std::net::IpAddr = "fd00:30::11".parse().unwrap_or_else(|_| unreachable!());
        let p = host("10.244.0.0/16").with_own_public_ips([me, me6]);
        let mut twin = lease("10.244.3.0-24");
        twin.attrs.public_ip = "172.30.0.11".parse().unwrap_or_else(|_| unreachable!());
        let e = p.check(&twin).unwrap_err();
        assert!(
            e.contains("172.30.0.11 is this host's own public IP") && e.contains("--public-ip"),
            "{e}"
        );
        let mut twin6 = lease("10.244.4.0-24");
        twin6.attrs.public_ipv6 = Some("fd00:30::11".parse().unwrap_or_else(|_| unreachable!()));
        assert!(p.check(&twin6).is_err());
        // Our own lease, and a peer of another address, pass.
        let mut own = lease("10.244.1.0-24");
        own.attrs.public_ip = "172.30.0.11".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(p.check(&own), Ok(()));
        assert_eq!(p.check(&lease("10.244.3.0-24")), Ok(()));
        // An IPv6-only lease names no IPv4 address: 0.0.0.0 is nobody's.
        let p = host("10.244.0.0/16")
            .with_own_public_ips(flannel_core::LeaseAttrs::default().public_ips());
        let mut v6only = lease("10.244.3.0-24");
        v6only.attrs.public_ip = std::net::Ipv4Addr::UNSPECIFIED;
        assert_eq!(p.check(&v6only), Ok(()));
    }
}
