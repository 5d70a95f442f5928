//! Choosing the external interface the overlay runs over (Go flannel's `--iface`, `--iface-regex`,
//! `--iface-can-reach`, `--public-ip` rules).
//!
//! The choice itself is a pure function, [`choose`], over a [`HostSnapshot`] of links, addresses and
//! default routes; `flannel_dataplane::host::select_external_interface` reads that snapshot from the
//! kernel over netlink (and asks the kernel's route lookup for `--iface-can-reach`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The interface flanneld uses and the addresses it advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    /// Kernel interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Interface MTU.
    pub mtu: u32,
    /// The interface's IPv4 address (when the IPv4 stack is enabled).
    pub iface_addr: Option<Ipv4Addr>,
    /// The interface's IPv6 address (when the IPv6 stack is enabled).
    pub iface_v6_addr: Option<Ipv6Addr>,
    /// The advertised IPv4 address: `--public-ip`, else `iface_addr`.
    pub ext_addr: Option<Ipv4Addr>,
    /// The advertised IPv6 address: `--public-ipv6`, else `iface_v6_addr`.
    pub ext_v6_addr: Option<Ipv6Addr>,
    /// The networks directly attached to the interface (its addresses with their prefixes): peers
    /// inside them are on-link.
    pub iface_networks: Vec<ipnet::IpNet>,
}

impl ExternalInterface {
    /// For `EnableIPv6`: the interface's IPv6 address and the advertised one (`--public-ipv6`, else
    /// the same), or a message naming the interface when it has none.
    pub fn require_ipv6(&self) -> Result<(Ipv6Addr, Ipv6Addr), String> {
        let iface = self.iface_v6_addr.ok_or_else(|| {
            format!(
                "EnableIPv6 is set but {} has no global IPv6 address (give it one, or pass --public-ipv6)",
                self.name
            )
        })?;
        Ok((iface, self.ext_v6_addr.unwrap_or(iface)))
    }
}

impl fmt::Display for ExternalInterface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (index {}, mtu {}", self.name, self.index, self.mtu)?;
        if let Some(a) = self.ext_addr {
            write!(f, ", public ip {a}")?;
        }
        if let Some(a) = self.ext_v6_addr {
            write!(f, ", public ipv6 {a}")?;
        }
        write!(f, ")")
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IfaceSpec {
    /// `--iface` values (names or IP addresses), tried in order.
    pub ifaces: Vec<String>,
    /// `--iface-regex` values, tried after `ifaces`.
    pub iface_regexes: Vec<String>,
    /// `--iface-can-reach`: use the interface the kernel routes this address through.
    pub can_reach: Option<IpAddr>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// Whether the IPv4 stack is in use (config `EnableIPv4`).
    pub ipv4: bool,
    /// Whether the IPv6 stack is in use (config `EnableIPv6`).
    pub ipv6: bool,
}

/// One address of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddr {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Whether it is deprecated (skipped).
    pub deprecated: bool,
    /// Whether it is permanent (preferred over dynamic ones).
    pub permanent: bool,
}

/// One link and its addresses, in kernel order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    /// Kernel index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Addresses.
    pub addrs: Vec<HostAddr>,
}

/// The host's links and default routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSnapshot {
    /// Links in kernel index order.
    pub links: Vec<HostLink>,
    /// The link of the first IPv4 default route of the main table.
    pub default_v4: Option<u32>,
    /// The link of the first IPv6 default route of the main table.
    pub default_v6: Option<u32>,
    /// The kernel's answer for `--iface-can-reach`: output link and preferred source.
    pub can_reach: Option<(u32, Option<IpAddr>)>,
}

/// Why no interface could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// Nothing matched.
    #[error("{0}")]
    NotFound(String),
    /// The interface has no usable address of a needed family.
    #[error(
        "interface {iface} has no usable {family} address; give it one, or pick another interface with --iface"
    )]
    NoAddress {
        /// Interface name.
        iface: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// The interface reports MTU 0.
    #[error("interface {0} has MTU 0; check the interface configuration")]
    ZeroMtu(String),
    /// An `--iface-regex` does not compile.
    #[error("invalid --iface-regex {0:?}: {1}")]
    BadRegex(String, String),
    /// The kernel could not be asked.
    #[error("reading interfaces over netlink: {0}")]
    Netlink(String),
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The address flanneld uses on `link` for one family: deprecated addresses skipped, global before
/// link-local, permanent before dynamic, otherwise kernel order.
fn best_addr(link: &HostLink, v6: bool) -> Option<IpAddr> {
    let mut cands: Vec<&HostAddr> = link
        .addrs
        .iter()
        .filter(|a| a.ip.is_ipv6() == v6 && !a.deprecated && !a.ip.is_multicast())
        .collect();
    cands.sort_by_key(|a| (is_link_local(&a.ip), !a.permanent));
    cands.first().map(|a| a.ip)
}

fn finish(
    spec: &IfaceSpec,
    link: &HostLink,
    fixed: Option<IpAddr>,
) -> Result<ExternalInterface, IfaceError> {
    if link.mtu == 0 {
        return Err(IfaceError::ZeroMtu(link.name.clone()));
    }
    let pick = |v6: bool| match fixed {
        Some(ip) if ip.is_ipv6() == v6 => Some(ip),
        _ => best_addr(link, v6),
    };
    let iface_addr = if spec.ipv4 {
        match pick(false) {
            Some(IpAddr::V4(a)) => Some(a),
            _ => {
                return Err(IfaceError::NoAddress {
                    iface: link.name.clone(),
                    family: "IPv4",
                });
            }
        }
    } else {
        None
    };
    let iface_v6_addr = if spec.ipv6 {
        match pick(true) {
            Some(IpAddr::V6(a)) => Some(a),
            _ => {
                return Err(IfaceError::NoAddress {
                    iface: link.name.clone(),
                    family: "IPv6",
                });
            }
        }
    } else {
        None
    };
    Ok(ExternalInterface {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        iface_addr,
        iface_v6_addr,
        ext_addr: if spec.ipv4 {
            spec.public_ip.or(iface_addr)
        } else {
            None
        },
        ext_v6_addr: if spec.ipv6 {
            spec.public_ipv6.or(iface_v6_addr)
        } else {
            None
        },
        iface_networks: link
            .addrs
            .iter()
            .filter_map(|a| {
                ipnet::IpNet::new(a.ip, a.prefix_len)
                    .ok()
                    .map(|n| n.trunc())
            })
            .collect(),
    })
}

/// Looks an `--iface` value up: an IP address names the interface that owns it, anything else is a
/// name.
fn by_name_or_ip<'a>(
    host: &'a HostSnapshot,
    value: &str,
) -> Option<(&'a HostLink, Option<IpAddr>)> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return host
            .links
            .iter()
            .find(|l| l.addrs.iter().any(|a| a.ip == ip))
            .map(|l| (l, Some(ip)));
    }
    host.links
        .iter()
        .find(|l| l.name == value)
        .map(|l| (l, None))
}

fn by_regex<'a>(
    host: &'a HostSnapshot,
    spec: &IfaceSpec,
    re: &regex::Regex,
) -> Option<(&'a HostLink, Option<IpAddr>)> {
    // Address match first: the link must have a matching address of every enabled family.
    for link in &host.links {
        let m = |v6: bool| {
            link.addrs
                .iter()
                .filter(|a| a.ip.is_ipv6() == v6 && !a.deprecated)
                .find(|a| re.is_match(&a.ip.to_string()))
                .map(|a| a.ip)
        };
        let v4 = if spec.ipv4 { m(false) } else { None };
        let v6 = if spec.ipv6 { m(true) } else { None };
        if (!spec.ipv4 || v4.is_some()) && (!spec.ipv6 || v6.is_some()) {
            return Some((link, v4.or(v6)));
        }
    }
    host.links
        .iter()
        .find(|l| re.is_match(&l.name))
        .map(|l| (l, None))
}

/// Chooses the external interface from a host snapshot, following Go flannel's order (see the
/// module docs). Candidates that fail are logged and skipped; the error lists what was tried.
pub fn choose(spec: &IfaceSpec, host: &HostSnapshot) -> Result<ExternalInterface, IfaceError> {
    let explicit =
        !spec.ifaces.is_empty() || !spec.iface_regexes.is_empty() || spec.can_reach.is_some();
    if !explicit {
        let name = spec
            .public_ip
            .map(|a| a.to_string())
            .or(spec.public_ipv6.map(|a| a.to_string()));
        if let Some(name) = name {
            let (link, fixed) = by_name_or_ip(host, &name).ok_or_else(|| {
                IfaceError::NotFound(format!(
                    "no local interface has the address {name} given by --public-ip/--public-ipv6; \
                     behind NAT also pass --iface to name the interface"
                ))
            })?;
            return finish(spec, link, fixed);
        }
        let index = match (spec.ipv4, spec.ipv6) {
            (true, true) => match (host.default_v4, host.default_v6) {
                (Some(a), Some(b)) if a == b => Some(a),
                (Some(_), Some(_)) => {
                    return Err(IfaceError::NotFound(
                        "the IPv4 and IPv6 default routes use different interfaces; choose one with --iface".into(),
                    ));
                }
                _ => None,
            },
            (true, false) => host.default_v4,
            (false, _) => host.default_v6,
        };
        let link = index
            .and_then(|i| host.links.iter().find(|l| l.index == i))
            .ok_or_else(|| {
                IfaceError::NotFound(
                    "no default route found to pick the external interface; choose one with --iface, \
                     --iface-regex or --iface-can-reach"
                        .into(),
                )
            })?;
        return finish(spec, link, None);
    }
    let mut tried = Vec::new();
    for value in &spec.ifaces {
        match by_name_or_ip(host, value).map(|(l, ip)| finish(spec, l, ip)) {
            Some(Ok(e)) => return Ok(e),
            Some(Err(e)) => {
                tracing::warn!(iface = %value, error = %e, "skipping --iface candidate");
                tried.push(format!("--iface {value}: {e}"));
            }
            None => tried.push(format!("--iface {value}: no such interface or address")),
        }
    }
    for pattern in &spec.iface_regexes {
        let re = regex::Regex::new(pattern)
            .map_err(|e| IfaceError::BadRegex(pattern.clone(), e.to_string()))?;
        match by_regex(host, spec, &re).map(|(l, ip)| finish(spec, l, ip)) {
            Some(Ok(e)) => return Ok(e),
            Some(Err(e)) => {
                tracing::warn!(regex = %pattern, error = %e, "skipping --iface-regex candidate");
                tried.push(format!("--iface-regex {pattern}: {e}"));
            }
            None => tried.push(format!("--iface-regex {pattern}: nothing matches")),
        }
    }
    if let Some(target) = spec.can_reach {
        match host
            .can_reach
            .and_then(|(i, src)| host.links.iter().find(|l| l.index == i).map(|l| (l, src)))
        {
            Some((link, src)) => match finish(spec, link, src) {
                Ok(e) => return Ok(e),
                Err(e) => tried.push(format!("--iface-can-reach {target}: {e}")),
            },
            None => tried.push(format!("--iface-can-reach {target}: no route")),
        }
    }
    Err(IfaceError::NotFound(format!(
        "Failed to find interface to use that matches the interfaces and/or regexes provided ({})",
        tried.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> HostAddr {
        HostAddr {
            ip: s.parse().unwrap(),
            prefix_len: 24,
            deprecated: false,
            permanent: true,
        }
    }

    fn host() -> HostSnapshot {
        HostSnapshot {
            links: vec![
                HostLink {
                    index: 1,
                    name: "lo".into(),
                    mtu: 65536,
                    addrs: vec![addr("127.0.0.1"), addr("::1")],
                },
                HostLink {
                    index: 2,
                    name: "eth0".into(),
                    mtu: 1500,
                    addrs: vec![addr("fe80::1"), addr("192.168.1.10"), addr("2001:db8::10")],
                },
                HostLink {
                    index: 3,
                    name: "eth1".into(),
                    mtu: 9000,
                    addrs: vec![addr("10.0.0.5"), addr("10.0.0.6")],
                },
                HostLink {
                    index: 4,
                    name: "eth2".into(),
                    mtu: 0,
                    addrs: vec![addr("10.9.0.5")],
                },
                HostLink {
                    index: 5,
                    name: "eth3".into(),
                    mtu: 1500,
                    addrs: vec![addr("fe80::3")],
                },
            ],
            default_v4: Some(2),
            default_v6: Some(2),
            can_reach: None,
        }
    }

    fn v4() -> IfaceSpec {
        IfaceSpec {
            ipv4: true,
            ..Default::default()
        }
    }

    #[test]
    fn default_route_interface() {
        let e = choose(&v4(), &host()).unwrap();
        assert_eq!((e.name.as_str(), e.mtu), ("eth0", 1500));
        assert_eq!(e.iface_addr.unwrap().to_string(), "192.168.1.10");
        assert_eq!(e.ext_addr, e.iface_addr);
        let dual = IfaceSpec { ipv6: true, ..v4() };
        let e = choose(&dual, &host()).unwrap();
        assert_eq!(
            e.iface_v6_addr.unwrap().to_string(),
            "2001:db8::10",
            "global before link-local"
        );
        let mut h = host();
        h.default_v6 = Some(3);
        assert!(
            choose(&dual, &h)
                .unwrap_err()
                .to_string()
                .contains("different interfaces")
        );
        h.default_v4 = None;
        assert!(
            choose(&v4(), &h)
                .unwrap_err()
                .to_string()
                .contains("no default route")
        );
    }

    #[test]
    fn iface_by_name_and_ip_in_order() {
        let spec = IfaceSpec {
            ifaces: vec!["nope".into(), "eth1".into()],
            ..v4()
        };
        let e = choose(&spec, &host()).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr.unwrap().to_string()),
            ("eth1", "10.0.0.5".into())
        );
        let spec = IfaceSpec {
            ifaces: vec!["10.0.0.6".into()],
            ..v4()
        };
        let e = choose(&spec, &host()).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr.unwrap().to_string()),
            ("eth1", "10.0.0.6".into())
        );
    }

    #[test]
    fn failing_candidates_are_skipped_and_reported() {
        let spec = IfaceSpec {
            ifaces: vec!["eth2".into(), "eth3".into()],
            ..v4()
        };
        let err = choose(&spec, &host()).unwrap_err().to_string();
        assert!(err.starts_with("Failed to find interface to use"), "{err}");
        assert!(err.contains("eth2 has MTU 0"), "{err}");
        assert!(err.contains("eth3 has no usable IPv4 address"), "{err}");
    }

    #[test]
    fn regex_matches_addresses_then_names() {
        let spec = IfaceSpec {
            iface_regexes: vec![r"^10\.0\.0\.6$".into()],
            ..v4()
        };
        let e = choose(&spec, &host()).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr.unwrap().to_string()),
            ("eth1", "10.0.0.6".into())
        );
        let spec = IfaceSpec {
            iface_regexes: vec!["^eth0$".into()],
            ..v4()
        };
        assert_eq!(choose(&spec, &host()).unwrap().name, "eth0");
        let spec = IfaceSpec {
            iface_regexes: vec!["(".into()],
            ..v4()
        };
        assert!(matches!(
            choose(&spec, &host()),
            Err(IfaceError::BadRegex(..))
        ));
        let spec = IfaceSpec {
            ifaces: vec!["nope".into()],
            iface_regexes: vec!["^eth1".into()],
            ..v4()
        };
        assert_eq!(
            choose(&spec, &host()).unwrap().name,
            "eth1",
            "regexes come after --iface"
        );
    }

    #[test]
    fn can_reach_uses_kernel_answer() {
        let mut h = host();
        h.can_reach = Some((3, Some("10.0.0.6".parse().unwrap())));
        let spec = IfaceSpec {
            can_reach: Some("10.0.0.1".parse().unwrap()),
            ..v4()
        };
        let e = choose(&spec, &h).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr.unwrap().to_string()),
            ("eth1", "10.0.0.6".into())
        );
        h.can_reach = None;
        assert!(
            choose(&spec, &h)
                .unwrap_err()
                .to_string()
                .contains("no route")
        );
    }

    #[test]
    fn public_ip_alone_picks_the_owner() {
        let spec = IfaceSpec {
            public_ip: Some("10.0.0.6".parse().unwrap()),
            ..v4()
        };
        let e = choose(&spec, &host()).unwrap();
        assert_eq!(
            (e.name.as_str(), e.ext_addr.unwrap().to_string()),
            ("eth1", "10.0.0.6".into())
        );
        let spec = IfaceSpec {
            public_ip: Some("203.0.113.9".parse().unwrap()),
            ..v4()
        };
        assert!(
            choose(&spec, &host())
                .unwrap_err()
                .to_string()
                .contains("--iface")
        );
        // With --iface, --public-ip only overrides the advertised address (NAT).
        let spec = IfaceSpec {
            ifaces: vec!["eth0".into()],
            public_ip: Some("203.0.113.9".parse().unwrap()),
            ..v4()
        };
        let e = choose(&spec, &host()).unwrap();
        assert_eq!(e.iface_addr.unwrap().to_string(), "192.168.1.10");
        assert_eq!(e.ext_addr.unwrap().to_string(), "203.0.113.9");
    }

    #[test]
    fn deprecated_and_dynamic_addresses_rank_last() {
        let mut h = host();
        h.links[2].addrs = vec![
            HostAddr {
                ip: "10.0.0.7".parse().unwrap(),
                prefix_len: 24,
                deprecated: true,
                permanent: true,
            },
            HostAddr {
                ip: "10.0.0.8".parse().unwrap(),
                prefix_len: 24,
                deprecated: false,
                permanent: false,
            },
            addr("10.0.0.9"),
        ];
        let spec = IfaceSpec {
            ifaces: vec!["eth1".into()],
            ..v4()
        };
        assert_eq!(
            choose(&spec, &h).unwrap().iface_addr.unwrap().to_string(),
            "10.0.0.9"
        );
    }
}
