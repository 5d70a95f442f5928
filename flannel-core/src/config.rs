//! The network configuration JSON (Go flannel's `subnet.Config`).
//!
//! Parsing follows Go's `encoding/json` (see [`crate::gojson`]) and validation follows
//! `CheckNetworkConfig`: the same defaults, the same limits and, as a prefix, the same error texts, each
//! followed by a hint saying how to fix the config.
//!
//! ```
//! use flannel_core::NetworkConfig;
//! let cfg = NetworkConfig::parse(r#"{"Network": "10.3.0.0/16", "Backend": {"Type": "VXLAN"}}"#).unwrap();
//! let v4 = cfg.ipv4.as_ref().unwrap();
//! assert_eq!(v4.subnet_len(), 24);
//! assert_eq!(v4.subnet_min().to_string(), "10.3.1.0");
//! assert_eq!(v4.subnet_max().to_string(), "10.3.255.0");
//! assert_eq!(cfg.backend_type, "vxlan");
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;

use crate::gojson::{FieldError, GoObject};

/// Why a network config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The document is not JSON at all.
    #[error(
        "network config is not valid JSON: {0}; write it as a JSON object such as {{\"Network\": \"10.5.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}"
    )]
    Json(#[from] serde_json::Error),
    /// A field has the wrong JSON type or an unparsable value.
    #[error("network config field {0}")]
    Field(#[from] FieldError),
    /// The values are inconsistent (Go's `CheckNetworkConfig`).
    #[error("{message} ({hint})")]
    Invalid {
        /// Go flannel's message.
        message: String,
        /// How to fix it.
        hint: String,
    },
}

fn invalid(message: impl Into<String>, hint: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        message: message.into(),
        hint: hint.into(),
    }
}

/// The raw config as decoded, before defaults and validation (what Go's `ParseConfig` returns).
///
/// Kubernetes mode uses this form as is; etcd mode turns it into a [`NetworkConfig`] with
/// [`NetworkConfigInput::check`].
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigInput {
    /// `EnableIPv4`, default true.
    pub enable_ipv4: bool,
    /// `EnableIPv6`, default false.
    pub enable_ipv6: bool,
    /// `EnableNFTables`, default false.
    pub enable_nftables: bool,
    /// `Network`, masked to its network address.
    pub network: Option<Ipv4Net>,
    /// `SubnetLen`, 0 when unset.
    pub subnet_len: u64,
    /// `SubnetMin`.
    pub subnet_min: Option<Ipv4Addr>,
    /// `SubnetMax`.
    pub subnet_max: Option<Ipv4Addr>,
    /// `IPv6Network`, masked.
    pub ipv6_network: Option<Ipv6Net>,
    /// `IPv6SubnetLen`, 0 when unset.
    pub ipv6_subnet_len: u64,
    /// `IPv6SubnetMin`.
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// `IPv6SubnetMax`.
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// The raw `Backend` object (`None` when absent).
    pub backend: Option<Value>,
    /// The lower-cased `Backend.Type`: `udp` when `Backend` is absent, empty when it has no `Type`.
    pub backend_type: String,
}

/// A validated network configuration, with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// The IPv4 pool, present when `EnableIPv4` is true.
    pub ipv4: Option<SubnetPool>,
    /// The IPv6 pool, present when `EnableIPv6` is true.
    pub ipv6: Option<SubnetPool>,
    /// `EnableNFTables`.
    pub enable_nftables: bool,
    /// The lower-cased backend type, e.g. `vxlan` (`udp` when `Backend` is absent).
    pub backend_type: String,
    /// The raw `Backend` object, handed to the backend to read its own options
    /// (an empty object when absent).
    pub backend: Value,
}

impl NetworkConfig {
    /// Parses and validates a config as flanneld does in etcd mode.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        NetworkConfigInput::parse(json)?.check()
    }

    /// The IPv4 cluster network (`Network`).
    pub fn network(&self) -> Option<Ipv4Net> {
        self.ipv4.as_ref().and_then(|p| match p.network {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        })
    }

    /// The IPv6 cluster network (`IPv6Network`).
    pub fn ipv6_network(&self) -> Option<Ipv6Net> {
        self.ipv6.as_ref().and_then(|p| match p.network {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        })
    }

    /// The IPv4 network, for a backend that carries IPv4 only (as upstream's udp, ipip and
    /// ipsec): a network with IPv6 (dual stack or IPv6 only) is refused with an error that names
    /// `backend` and the backends to choose instead (`alternatives`, e.g. `"vxlan or host-gw"`).
    ///
    /// ```
    /// # use flannel_core::NetworkConfig;
    /// let dual = NetworkConfig::parse(
    ///     r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"udp"}}"#,
    /// ).unwrap();
    /// let e = dual.ipv4_only("udp", "vxlan or host-gw").unwrap_err();
    /// assert!(e.to_string().contains("carries IPv4 only"), "{e}");
    /// ```
    pub fn ipv4_only(
        &self,
        backend: &str,
        alternatives: &str,
    ) -> Result<Ipv4Net, crate::BackendError> {
        match (self.network(), self.ipv6_network()) {
            (Some(n), None) => Ok(n),
            _ => Err(crate::BackendError::invalid(
                backend,
                format!(
                    "the {backend} backend carries IPv4 only, as upstream's: set EnableIPv6 to \
                     false (with an IPv4 Network), or for IPv6 choose {alternatives}"
                ),
            )),
        }
    }
}

impl NetworkConfigInput {
    /// Decodes the JSON with Go semantics: case-insensitive keys, unknown keys ignored, CIDRs masked,
    /// wrong JSON types rejected.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(json)?;
        let o = GoObject::new(&value, "config")?;
        let v4net = |s: &str| s.parse::<Ipv4Net>().ok().map(|n| n.trunc());
        let v6net = |s: &str| s.parse::<Ipv6Net>().ok().map(|n| n.trunc());
        let backend = o.value("Backend").cloned();
        let backend_type = match &backend {
            None if !o.contains("Backend") => "udp".to_string(),
            None => String::new(),
            Some(b) => GoObject::new(b, "Backend")?
                .string("Type")?
                .unwrap_or_default()
                .to_lowercase(),
        };
        Ok(Self {
            enable_ipv4: o.bool("EnableIPv4")?.unwrap_or(true),
            enable_ipv6: o.bool("EnableIPv6")?.unwrap_or(false),
            enable_nftables: o.bool("EnableNFTables")?.unwrap_or(false),
            network: o.parsed(
                "Network",
                "an IPv4 CIDR such as \"10.5.0.0/16\"",
                true,
                v4net,
            )?,
            subnet_len: o.uint("SubnetLen")?.unwrap_or(0),
            subnet_min: o.parsed("SubnetMin", "an IPv4 address", true, |s| s.parse().ok())?,
            subnet_max: o.parsed("SubnetMax", "an IPv4 address", true, |s| s.parse().ok())?,
            ipv6_network: o.parsed(
                "IPv6Network",
                "an IPv6 CIDR such as \"fc00::/48\"",
                true,
                v6net,
            )?,
            ipv6_subnet_len: o.uint("IPv6SubnetLen")?.unwrap_or(0),
            ipv6_subnet_min: o.parsed("IPv6SubnetMin", "an IPv6 address", false, |s| {
                s.parse().ok()
            })?,
            ipv6_subnet_max: o.parsed("IPv6SubnetMax", "an IPv6 address", false, |s| {
                s.parse().ok()
            })?,
            backend,
            backend_type,
        })
    }

    /// Applies Go's `CheckNetworkConfig`: fills `SubnetLen`, `SubnetMin` and `SubnetMax` defaults and
    /// rejects inconsistent values.
    pub fn check(self) -> Result<NetworkConfig, ConfigError> {
        if !self.enable_ipv4 && !self.enable_ipv6 {
            return Err(invalid(
                "none defined stack",
                "set EnableIPv4 or EnableIPv6 to true",
            ));
        }
        let ipv4 = if self.enable_ipv4 {
            Some(SubnetPool::check(
                &Family::V4,
                self.network.map(IpNet::V4),
                self.subnet_len,
                self.subnet_min.map(IpAddr::V4),
                self.subnet_max.map(IpAddr::V4),
            )?)
        } else {
            None
        };
        let ipv6 = if self.enable_ipv6 {
            Some(SubnetPool::check(
                &Family::V6,
                self.ipv6_network.map(IpNet::V6),
                self.ipv6_subnet_len,
                self.ipv6_subnet_min.map(IpAddr::V6),
                self.ipv6_subnet_max.map(IpAddr::V6),
            )?)
        } else {
            None
        };
        Ok(NetworkConfig {
            ipv4,
            ipv6,
            enable_nftables: self.enable_nftables,
            backend_type: self.backend_type,
            backend: self
                .backend
                .unwrap_or_else(|| Value::Object(Default::default())),
        })
    }
}

/// The per-family names and limits used by the validation rules.
struct Family {
    bits: u8,
    network: &'static str,
    len: &'static str,
    min: &'static str,
    max: &'static str,
    max_len: u8,
    min_useful_prefix: u8,
    default_len: u8,
    len_too_big: &'static str,
    too_small: &'static str,
}

impl Family {
    const V4: Family = Family {
        bits: 32,
        network: "Network",
        len: "SubnetLen",
        min: "SubnetMin",
        max: "SubnetMax",
        max_len: 30,
        min_useful_prefix: 28,
        default_len: 24,
        len_too_big: "SubnetLen must be less than /31",
        too_small: "network is too small. Minimum useful network prefix is /28",
    };
    const V6: Family = Family {
        bits: 128,
        network: "IPv6Network",
        len: "IPv6SubnetLen",
        min: "IPv6SubnetMin",
        max: "IPv6SubnetMax",
        max_len: 126,
        min_useful_prefix: 124,
        default_len: 64,
        len_too_big: "SubnetLen must be less than /127",
        too_small: "IPv6Network is too small. Minimum useful network prefix is /124",
    };
}

/// The range of per-host subnets of one address family: the cluster network, the per-host prefix
/// length and the first and last allocatable subnet addresses (both inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool {
    network: IpNet,
    subnet_len: u8,
    subnet_min: IpAddr,
    subnet_max: IpAddr,
}

/// An IP address as a number (IPv4 in the low 32 bits).
pub(crate) fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address of the same family as `like` with numeric value `n`.
pub(crate) fn u128_to_ip(n: u128, like: IpAddr) -> IpAddr {
    match like {
        // Truncation is intended: IPv4 values live in the low 32 bits.
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

impl SubnetPool {
    fn check(
        f: &Family,
        network: Option<IpNet>,
        subnet_len: u64,
        min: Option<IpAddr>,
        max: Option<IpAddr>,
    ) -> Result<Self, ConfigError> {
        let network = match network {
            Some(n) if !(n.prefix_len() == 0 && ip_to_u128(n.addr()) == 0) => n,
            _ => {
                return Err(invalid(
                    format!(
                        "please define a correct {} parameter in the flannel config",
                        f.network
                    ),
                    format!(
                        "set \"{}\" to the cluster-wide CIDR, e.g. {}",
                        f.network,
                        if f.bits == 32 {
                            "\"10.5.0.0/16\""
                        } else {
                            "\"fc00::/48\""
                        }
                    ),
                ));
            }
        };
        let prefix = network.prefix_len();
        let subnet_len = if subnet_len > 0 {
            if subnet_len > u64::from(f.max_len) {
                return Err(invalid(
                    f.len_too_big,
                    format!("set {} to at most {} or leave it out", f.len, f.max_len),
                ));
            }
            if subnet_len < u64::from(prefix) + 2 {
                return Err(invalid(
                    "network must be able to accommodate at least four subnets",
                    format!(
                        "{} is {subnet_len} but {} is a /{prefix}: use a {} of at least {}",
                        f.len,
                        f.network,
                        f.len,
                        prefix + 2
                    ),
                ));
            }
            subnet_len as u8
        } else if prefix > f.min_useful_prefix {
            return Err(invalid(
                f.too_small,
                format!("use a {} of /{} or larger", f.network, f.min_useful_prefix),
            ));
        } else if prefix <= f.default_len - 2 {
            f.default_len
        } else {
            prefix + 2
        };
        // Sizes come from input: no arithmetic here may overflow, also for a network at the top of
        // the address space (`ffff::/16`, `255.255.0.0/16`). subnet_len >= prefix + 2 >= 2 here.
        let size: u128 = 1u128 << (f.bits - subnet_len);
        let base = ip_to_u128(network.addr());
        let host_bits = u32::from(f.bits - prefix);
        let host_mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |v| v - 1);
        let end = base | host_mask; // last address of the network
        let unspecified = |ip: &IpAddr| ip_to_u128(*ip) == 0;
        let pick =
            |given: Option<IpAddr>, name: &str, default: u128| -> Result<IpAddr, ConfigError> {
                match given {
                    None => Ok(u128_to_ip(default, network.addr())),
                    Some(ip) if unspecified(&ip) => Ok(u128_to_ip(default, network.addr())),
                    Some(ip) if network.contains(&ip) => Ok(ip),
                    Some(ip) => Err(invalid(
                        format!("{name} is not in the range of the {}", f.network),
                        format!("{name} {ip} must lie inside {network}, or leave it out"),
                    )),
                }
            };
        let subnet_min = pick(min, f.min, base + size)?;
        let subnet_max = pick(max, f.max, end - (size - 1))?;
        for (name, ip) in [(f.min, subnet_min), (f.max, subnet_max)] {
            if !ip_to_u128(ip).is_multiple_of(size) {
                return Err(invalid(
                    format!("{name} is not on a SubnetLen boundary: {ip}"),
                    format!("{name} must be the first address of a /{subnet_len} subnet"),
                ));
            }
        }
        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
        })
    }

    /// The cluster network of this family.
    pub fn network(&self) -> IpNet {
        self.network
    }

    /// The per-host subnet prefix length.
    pub fn subnet_len(&self) -> u8 {
        self.subnet_len
    }

    /// The first allocatable subnet address.
    pub fn subnet_min(&self) -> IpAddr {
        self.subnet_min
    }

    /// The last allocatable subnet address (inclusive).
    pub fn subnet_max(&self) -> IpAddr {
        self.subnet_max
    }

    /// The number of addresses in one per-host subnet.
    pub fn subnet_size(&self) -> u128 {
        let bits = if self.network.addr().is_ipv4() {
            32
        } else {
            128
        };
        1u128 << (bits - self.subnet_len)
    }

    /// Whether `subnet` may be used as a lease of this pool: its address lies in
    /// [`subnet_min`](Self::subnet_min), [`subnet_max`](Self::subnet_max) and its prefix is `SubnetLen`
    /// (Go's lease compatibility check).
    pub fn is_compatible(&self, subnet: &IpNet) -> bool {
        let a = ip_to_u128(subnet.addr());
        subnet.addr().is_ipv4() == self.network.addr().is_ipv4()
            && subnet.prefix_len() == self.subnet_len
            && a >= ip_to_u128(self.subnet_min)
            && a <= ip_to_u128(self.subnet_max)
    }

    /// Every subnet of the pool in address order, from `SubnetMin` to `SubnetMax`.
    pub fn subnets(&self) -> impl Iterator<Item = IpNet> + '_ {
        let size = self.subnet_size();
        let min = ip_to_u128(self.subnet_min);
        let max = ip_to_u128(self.subnet_max);
        let count = if max < min { 0 } else { (max - min) / size + 1 };
        (0..count).map(move |i| {
            let addr = u128_to_ip(min + i * size, self.network.addr());
            // The prefix length is valid for the family by construction.
            IpNet::new(addr, self.subnet_len).unwrap_or(self.network)
        })
    }

    /// The number of subnets in the pool.
    pub fn capacity(&self) -> u128 {
        let (min, max) = (ip_to_u128(self.subnet_min), ip_to_u128(self.subnet_max));
        if max < min {
            0
        } else {
            (max - min) / self.subnet_size() + 1
        }
    }
}

impl fmt::Display for SubnetPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (/{} subnets {}..{})",
            self.network, self.subnet_len, self.subnet_min, self.subnet_max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_at_the_top_of_the_address_space() {
        // base + 2^(bits-prefix) overflows here: a debug build panicked, a release build wrapped.
        let c = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"ffff::/16","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let p = c.ipv6.unwrap();
        assert_eq!(p.subnet_max().to_string(), "ffff:ffff:ffff:ffff::");
        assert_eq!(p.subnet_min().to_string(), "ffff:0:0:1::");
        let c = NetworkConfig::parse(r#"{"Network":"255.255.0.0/16"}"#).unwrap();
        let p = c.ipv4.unwrap();
        assert_eq!(p.subnet_max().to_string(), "255.255.255.0");
        assert_eq!(p.capacity(), 255);
        assert_eq!(p.subnets().last().unwrap().to_string(), "255.255.255.0/24");
        // The whole IPv6 space with a valid SubnetLen: still no overflow, a clear answer.
        let r = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"8000::/1","IPv6SubnetLen":64}"#,
        );
        let p = r.unwrap().ipv6.unwrap();
        assert_eq!(p.subnet_max().to_string(), "ffff:ffff:ffff:ffff::");
    }

    #[test]
    fn ipv4_only_backends_get_the_ipv4_network_or_a_clear_refusal() {
        let v4 = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        assert_eq!(
            v4.ipv4_only("ipip", "vxlan").unwrap().to_string(),
            "10.5.0.0/16"
        );
        for json in [
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}"#,
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56"}"#,
        ] {
            let e = NetworkConfig::parse(json)
                .unwrap()
                .ipv4_only("ipip", "vxlan or host-gw")
                .unwrap_err()
                .to_string();
            assert!(e.contains("ipip backend carries IPv4 only"), "{e}");
            assert!(e.contains("choose vxlan or host-gw"), "{e}");
        }
    }

    fn v4(cfg: &NetworkConfig) -> (String, u8, String, String) {
        let p = cfg.ipv4.unwrap();
        (
            p.network().to_string(),
            p.subnet_len(),
            p.subnet_min().to_string(),
            p.subnet_max().to_string(),
        )
    }

    fn err(json: &str) -> String {
        NetworkConfig::parse(json).unwrap_err().to_string()
    }

    #[test]
    fn upstream_config_defaults() {
        let c = NetworkConfig::parse(r#"{"Network":"10.3.0.0/16"}"#).unwrap();
        assert_eq!(
            v4(&c),
            (
                "10.3.0.0/16".into(),
                24,
                "10.3.1.0".into(),
                "10.3.255.0".into()
            )
        );
        assert!(c.ipv6.is_none());
    }

    #[test]
    fn upstream_ipv6_defaults() {
        let c = NetworkConfig::parse(
            r#"{"enableIPv6":true,"ipv6Network":"fc00::/48","enableIPv4":false}"#,
        )
        .unwrap();
        assert!(c.ipv4.is_none());
        let p = c.ipv6.unwrap();
        assert_eq!(p.subnet_len(), 64);
        assert_eq!(p.subnet_min().to_string(), "fc00:0:0:1::");
        assert_eq!(p.subnet_max().to_string(), "fc00:0:0:ffff::");
    }

    #[test]
    fn upstream_overrides_kept() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.5.0","SubnetMax":"10.3.8.0","SubnetLen":28}"#,
        )
        .unwrap();
        assert_eq!(
            v4(&c),
            (
                "10.3.0.0/16".into(),
                28,
                "10.3.5.0".into(),
                "10.3.8.0".into()
            )
        );
        let c = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":56,"IPv6SubnetMin":"fc00:0:0:100::","IPv6SubnetMax":"fc00:0:0:ff00::"}"#,
        )
        .unwrap();
        let p = c.ipv6.unwrap();
        assert_eq!(
            (
                p.subnet_len(),
                p.subnet_min().to_string(),
                p.subnet_max().to_string()
            ),
            (56, "fc00:0:0:100::".into(), "fc00:0:0:ff00::".into())
        );
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_ignored() {
        let c = NetworkConfig::parse(
            r#"{"NETWORK":"10.3.0.0/16","subnetlen":26,"whatever":[1,2],"backend":{"type":"Host-GW"}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv4.unwrap().subnet_len(), 26);
        assert_eq!(c.backend_type, "host-gw");
    }

    #[test]
    fn cidrs_are_masked() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.3.7/16"}"#).unwrap();
        assert_eq!(c.network().unwrap().to_string(), "10.5.0.0/16");
    }

    #[test]
    fn default_subnet_len_by_prefix() {
        struct Case {
            name: &'static str,
            network: &'static str,
            want: Result<u8, &'static str>,
        }
        let cases = [
            Case {
                name: "/8 gives /24",
                network: "10.0.0.0/8",
                want: Ok(24),
            },
            Case {
                name: "/22 gives /24",
                network: "10.0.0.0/22",
                want: Ok(24),
            },
            Case {
                name: "/23 gives /25",
                network: "10.0.0.0/23",
                want: Ok(25),
            },
            Case {
                name: "/28 gives /30",
                network: "10.0.0.0/28",
                want: Ok(30),
            },
            Case {
                name: "/29 too small",
                network: "10.0.0.0/29",
                want: Err("network is too small"),
            },
        ];
        for c in cases {
            let got = NetworkConfig::parse(&format!(r#"{{"Network":"{}"}}"#, c.network))
                .map(|cfg| cfg.ipv4.unwrap().subnet_len())
                .map_err(|e| e.to_string());
            match (&got, c.want) {
                (Ok(g), Ok(w)) => assert_eq!(*g, w, "{}", c.name),
                (Err(g), Err(w)) => assert!(g.contains(w), "{}: {g}", c.name),
                _ => panic!("{}: got {got:?}", c.name),
            }
        }
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let cases = [
            (r#"{}"#, "please define a correct Network parameter"),
            (
                r#"{"Network":"0.0.0.0/0"}"#,
                "please define a correct Network parameter",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#,
                "SubnetLen must be less than /31",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#,
                "at least four subnets",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#,
                "SubnetMin is not in the range of the Network",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMax":"11.0.0.0"}"#,
                "SubnetMax is not in the range of the Network",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.5"}"#,
                "SubnetMin is not on a SubnetLen boundary: 10.0.1.5",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.1.128"}"#,
                "SubnetMax is not on a SubnetLen boundary",
            ),
            (r#"{"EnableIPv4":false}"#, "none defined stack"),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true}"#,
                "please define a correct IPv6Network parameter",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/125"}"#,
                "IPv6Network is too small",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}"#,
                "SubnetLen must be less than /127",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fd00::"}"#,
                "IPv6SubnetMin is not in the range",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMax":"fc00:0:0:1::1"}"#,
                "IPv6SubnetMax is not on a SubnetLen boundary",
            ),
        ];
        for (json, want) in cases {
            let e = err(json);
            assert!(e.contains(want), "{json}: {e}");
            assert!(e.contains('('), "{json}: error has no hint: {e}");
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let cases = [
            (
                r#"{"Network":"10.0.0.0/16","SubnetLen":"24"}"#,
                "config.SubnetLen",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetLen":-1}"#,
                "config.SubnetLen",
            ),
            (r#"{"Network":"banana"}"#, "config.Network"),
            (r#"{"Network":"fc00::/48"}"#, "config.Network"),
            (r#"{"Network":null}"#, "config.Network"),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"x"}"#,
                "config.SubnetMin",
            ),
            (
                r#"{"Network":"10.0.0.0/16","EnableIPv6":"yes"}"#,
                "config.EnableIPv6",
            ),
            (r#"{"Network":"10.0.0.0/16","Backend":"vxlan"}"#, "Backend"),
            (
                r#"{"Network":"10.0.0.0/16","Backend":{"Type":5}}"#,
                "Backend.Type",
            ),
            (r#"[1]"#, "config"),
            (r#"{"Network":"10.0.0.0/16""#, "not valid JSON"),
        ];
        for (json, want) in cases {
            let e = err(json);
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn backend_type_resolution() {
        let t = |j: &str| NetworkConfig::parse(j).unwrap().backend_type;
        assert_eq!(t(r#"{"Network":"10.0.0.0/16"}"#), "udp");
        assert_eq!(t(r#"{"Network":"10.0.0.0/16","Backend":{}}"#), "");
        assert_eq!(t(r#"{"Network":"10.0.0.0/16","Backend":null}"#), "");
        assert_eq!(
            t(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"VXLAN","VNI":3}}"#),
            "vxlan"
        );
        let c =
            NetworkConfig::parse(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":3}}"#)
                .unwrap();
        assert_eq!(c.backend["VNI"], 3);
    }

    #[test]
    fn pool_iteration_and_compatibility() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.25.0"}"#,
        )
        .unwrap();
        let p = c.ipv4.unwrap();
        assert_eq!(p.capacity(), 25);
        let all: Vec<_> = p.subnets().map(|n| n.to_string()).collect();
        assert_eq!(all.first().unwrap(), "10.3.1.0/24");
        assert_eq!(all.last().unwrap(), "10.3.25.0/24");
        assert!(p.is_compatible(&"10.3.7.0/24".parse().unwrap()));
        assert!(!p.is_compatible(&"10.3.26.0/24".parse().unwrap()));
        assert!(!p.is_compatible(&"10.3.7.0/25".parse().unwrap()));
        assert!(!p.is_compatible(&"10.3.0.0/24".parse().unwrap()));
    }
}
