//! Pure lease logic: choosing a free subnet, lease compatibility, key naming.

use std::net::IpAddr;

use flannel_core::{Lease, NetworkConfig, SubnetError, SubnetKey, SubnetPool};
use ipnet::{IpNet, Ipv6Net};
use rand::Rng;

/// Go flannel looks at no more than this many free subnets before picking one at random.
pub const MAX_CANDIDATES: usize = 100;

fn range(n: &IpNet) -> (u128, u128) {
    let (lo, hi) = match (n.network(), n.broadcast()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b))),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b)),
        _ => (0, 0),
    };
    (lo, hi)
}

/// Sorted address ranges with a running maximum of their ends, for fast overlap queries.
struct Taken {
    starts: Vec<u128>,
    max_end: Vec<u128>,
}

impl Taken {
    fn new(nets: impl Iterator<Item = IpNet>) -> Self {
        let mut ranges: Vec<(u128, u128)> = nets.map(|n| range(&n)).collect();
        ranges.sort_unstable();
        let mut max_end = Vec::with_capacity(ranges.len());
        let mut m = 0;
        for (i, (_, e)) in ranges.iter().enumerate() {
            m = if i == 0 { *e } else { m.max(*e) };
            max_end.push(m);
        }
        Self {
            starts: ranges.into_iter().map(|r| r.0).collect(),
            max_end,
        }
    }

    fn overlaps(&self, n: &IpNet) -> bool {
        let (s, e) = range(n);
        // Ranges starting at or before e; one of them must end at or after s.
        let idx = self.starts.partition_point(|&start| start <= e);
        idx > 0 && self.max_end[idx - 1] >= s
    }
}

fn free_subnets(pool: &SubnetPool, taken: &Taken) -> Vec<IpNet> {
    pool.subnets()
        .filter(|n| !taken.overlaps(n))
        .take(MAX_CANDIDATES)
        .collect()
}

/// Picks a free subnet (and IPv6 subnet when enabled) the way Go flannel does: walk the pool from
/// `SubnetMin`, collect up to [`MAX_CANDIDATES`] subnets that overlap no existing lease, pick one
/// uniformly at random.
pub fn allocate_subnet(
    config: &NetworkConfig,
    leases: &[Lease],
    rng: &mut impl Rng,
) -> Result<SubnetKey, SubnetError> {
    let Some(v4) = &config.ipv4 else {
        return Err(ipv6_only());
    };
    let taken = Taken::new(leases.iter().map(|l| IpNet::V4(l.key.ipv4)));
    let free = free_subnets(v4, &taken);
    let pick = |free: &[IpNet], pool: &SubnetPool, rng: &mut dyn rand::RngCore| {
        if free.is_empty() {
            return Err(SubnetError::OutOfSubnets {
                network: pool.network().to_string(),
                subnet_len: pool.subnet_len(),
                capacity: pool.capacity(),
            });
        }
        Ok(free[rng.random_range(0..free.len())])
    };
    let ipv4 = match pick(&free, v4, rng)? {
        IpNet::V4(n) => n,
        IpNet::V6(_) => return Err(SubnetError::Other("IPv6 subnet in an IPv4 pool".into())),
    };
    let ipv6 = match &config.ipv6 {
        None => None,
        Some(v6) => {
            let taken = Taken::new(leases.iter().filter_map(|l| l.key.ipv6.map(IpNet::V6)));
            match pick(&free_subnets(v6, &taken), v6, rng)? {
                IpNet::V6(n) => Some(n),
                IpNet::V4(_) => {
                    return Err(SubnetError::Other("IPv4 subnet in an IPv6 pool".into()));
                }
            }
        }
    };
    Ok(SubnetKey { ipv4, ipv6 })
}

/// The error for an IPv6-only network in etcd mode (unsupported, as in Go flannel): an invalid
/// config for this subnet manager, so flanneld waits for a fixed one before any backend starts.
pub fn ipv6_only() -> SubnetError {
    SubnetError::ConfigInvalid(flannel_core::ConfigError::Invalid {
        message: "IPv6-only networks are not supported with the etcd subnet manager".into(),
        hint: "every node would advertise PublicIP 0.0.0.0; add an IPv4 Network, or run in Kubernetes mode (--kube-subnet-mgr), which supports IPv6-only".into(),
    })
}

/// Whether a lease key fits the config (Go's `isSubnetConfigCompat` plus the IPv6 rule): the IPv4
/// subnet lies in the pool with the right length, and the IPv6 part is present exactly when IPv6 is
/// enabled and then also fits.
pub fn is_compatible(config: &NetworkConfig, key: &SubnetKey) -> bool {
    let v4_ok = config
        .ipv4
        .as_ref()
        .is_some_and(|p| p.is_compatible(&IpNet::V4(key.ipv4)));
    let v6_ok = match (&config.ipv6, key.ipv6) {
        (None, None) => true,
        (Some(p), Some(n)) => p.is_compatible(&IpNet::V6(n)),
        _ => false,
    };
    v4_ok && v6_ok
}

/// The key to reuse from the previous run's subnet file, if it fits the config and nobody holds it.
pub fn previous_key(
    config: &NetworkConfig,
    leases: &[Lease],
    prev_v4: Option<ipnet::Ipv4Net>,
    prev_v6: Option<Ipv6Net>,
) -> Option<SubnetKey> {
    let ipv4 = prev_v4?;
    let key = SubnetKey {
        ipv4,
        ipv6: if config.ipv6.is_some() { prev_v6 } else { None },
    };
    let held = leases.iter().any(|l| l.key.ipv4 == ipv4);
    (!held && is_compatible(config, &key)).then_some(key)
}

/// The etcd key of a lease: `<prefix>/subnets/<subnet-key>`.
pub fn lease_key(prefix: &str, key: &SubnetKey) -> String {
    format!("{}/{key}", subnets_prefix(prefix))
}

/// The listing prefix `<prefix>/subnets` (no trailing slash, as Go).
pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets", prefix.trim_end_matches('/'))
}

/// The config key `<prefix>/config`.
pub fn config_key(prefix: &str) -> String {
    format!("{}/config", prefix.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::LeaseAttrs;
    use rand::SeedableRng;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    fn lease(key: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            enable_ipv4: true,
            attrs: LeaseAttrs::default(),
            expiration: None,
            asof: 0,
        }
    }

    fn upstream() -> (NetworkConfig, Vec<Lease>) {
        (
            cfg(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.25.0"}"#),
            [
                "10.3.1.0-24",
                "10.3.2.0-24",
                "10.3.4.0-24",
                "10.3.5.0-24",
                "10.3.31.0-24",
            ]
            .into_iter()
            .map(lease)
            .collect(),
        )
    }

    #[test]
    fn allocates_free_subnets_in_range() {
        let (c, leases) = upstream();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let k = allocate_subnet(&c, &leases, &mut rng).unwrap();
            assert!(is_compatible(&c, &k), "{k}");
            assert!(!leases.iter().any(|l| l.key.ipv4 == k.ipv4), "{k} is taken");
            seen.insert(k.ipv4);
        }
        assert_eq!(
            seen.len(),
            21,
            "every one of the 21 free subnets is reachable"
        );
    }

    #[test]
    fn overlapping_leases_of_other_sizes_block() {
        let c = cfg(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.4.0"}"#);
        // A /22 covering 10.3.0.0-10.3.3.255 and a /28 inside 10.3.4.0.
        let leases = vec![lease("10.3.0.0-22"), lease("10.3.4.16-28")];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let err = allocate_subnet(&c, &leases, &mut rng).unwrap_err();
        assert!(
            err.to_string()
                .contains("out of subnets: all 4 /24 subnets of 10.3.0.0/16"),
            "{err}"
        );
    }

    #[test]
    fn candidates_are_capped_like_go() {
        let c = cfg(r#"{"Network":"10.0.0.0/8"}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let k = allocate_subnet(&c, &[], &mut rng).unwrap();
            let third = k.ipv4.addr().octets();
            let idx = u32::from(third[1]) * 256 + u32::from(third[2]);
            assert!(
                (1..=100).contains(&idx),
                "{k} is beyond the first 100 free subnets"
            );
        }
    }

    #[test]
    fn dual_stack_allocation_and_compatibility() {
        let c = cfg(r#"{"Network":"10.3.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let k = allocate_subnet(&c, &[], &mut rng).unwrap();
        assert!(k.ipv6.is_some());
        assert!(is_compatible(&c, &k));
        assert!(
            !is_compatible(&c, &SubnetKey::v4(k.ipv4)),
            "IPv6 part required when enabled"
        );
        let v4only = cfg(r#"{"Network":"10.3.0.0/16"}"#);
        assert!(
            !is_compatible(&v4only, &k),
            "IPv6 part forbidden when disabled"
        );
    }

    #[test]
    fn previous_subnet_reuse_rules() {
        let (c, leases) = upstream();
        let p = |s: &str| previous_key(&c, &leases, Some(s.parse().unwrap()), None);
        assert_eq!(p("10.3.6.0/24").unwrap().to_string(), "10.3.6.0-24");
        assert!(p("10.3.1.0/24").is_none(), "held by someone");
        assert!(p("10.4.6.0/24").is_none(), "outside the network");
        assert!(p("10.3.30.0/24").is_none(), "beyond SubnetMax");
        assert!(p("10.3.6.0/25").is_none(), "wrong length");
    }

    #[test]
    fn key_paths() {
        let k: SubnetKey = "10.5.52.0-24".parse().unwrap();
        assert_eq!(
            lease_key("/coreos.com/network/", &k),
            "/coreos.com/network/subnets/10.5.52.0-24"
        );
        assert_eq!(
            subnets_prefix("/coreos.com/network"),
            "/coreos.com/network/subnets"
        );
        assert_eq!(config_key("/x/"), "/x/config");
    }
}
