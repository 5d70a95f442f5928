//! The pure part of Kubernetes mode: annotation names, a Node's pod CIDRs, a Node turned into a lease,
//! and the patches flanneld sends. No I/O here; everything is unit-tested.
//!
//! Names and value formats are upstream's (`pkg/subnet/kube/annotations.go`, `kube.go`), so Go and
//! Rust nodes read each other's annotations.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use flannel_core::{Lease, LeaseAttrs, NetworkConfig, RawJson, SubnetKey};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Value, json};

/// The default `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// A bad `--kube-annotation-prefix`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPrefix {
    /// More than one `/`.
    #[error(
        "--kube-annotation-prefix {0:?} has more than one '/'; use a domain, optionally followed by '/' and a name, e.g. flannel.alpha.coreos.com"
    )]
    Slashes(String),
    /// Not a lower-case domain (optionally with a name).
    #[error(
        "--kube-annotation-prefix {0:?} must be a lower-case domain name, optionally followed by '/' and a name of [0-9a-z_-] (fqdn/[0-9a-z-_]*), e.g. flannel.alpha.coreos.com"
    )]
    Format(String),
}

/// The annotation keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationKeys {
    /// `…kube-subnet-manager`: `"true"` on nodes flannel manages; other nodes are ignored.
    pub subnet_kube_managed: String,
    /// `…backend-data`: the compact JSON of the IPv4 backend data.
    pub backend_data: String,
    /// `…backend-v6-data`.
    pub backend_v6_data: String,
    /// `…backend-type`.
    pub backend_type: String,
    /// `…public-ip`.
    pub public_ip: String,
    /// `…public-ipv6`.
    pub public_ipv6: String,
    /// `…node-public-ip` (set by the user: used as `--public-ip` at start).
    pub node_public_ip: String,
    /// `…node-public-ipv6`.
    pub node_public_ipv6: String,
    /// `…public-ip-overwrite` (set by the user: published instead of the detected address).
    pub public_ip_overwrite: String,
    /// `…public-ipv6-overwrite`.
    pub public_ipv6_overwrite: String,
}

impl AnnotationKeys {
    /// The keys for `prefix`, normalised as upstream does: no `/` → append `/`; otherwise append `-`
    /// unless it ends with `/` or `-`. It must then be a lower-case domain, `/`, and an optional
    /// `name-`. (Upstream's pattern is anchored only at the end, so it takes e.g. `Example.com`, whose
    /// keys the API server then rejects; here the whole prefix must match.)
    pub fn new(prefix: &str) -> Result<Self, BadPrefix> {
        static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
        let slashes = prefix.matches('/').count();
        if slashes > 1 {
            return Err(BadPrefix::Slashes(prefix.into()));
        }
        let mut p = prefix.to_string();
        if slashes == 0 {
            p.push('/');
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        let re = RE.get_or_init(|| {
            regex::Regex::new(r"^(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")
                .unwrap_or_else(|_| unreachable!("constant pattern"))
        });
        if !re.is_match(&p) {
            return Err(BadPrefix::Format(prefix.into()));
        }
        let k = |name: &str| format!("{p}{name}");
        Ok(Self {
            subnet_kube_managed: k("kube-subnet-manager"),
            backend_data: k("backend-data"),
            backend_v6_data: k("backend-v6-data"),
            backend_type: k("backend-type"),
            public_ip: k("public-ip"),
            public_ipv6: k("public-ipv6"),
            node_public_ip: k("node-public-ip"),
            node_public_ipv6: k("node-public-ipv6"),
            public_ip_overwrite: k("public-ip-overwrite"),
            public_ipv6_overwrite: k("public-ipv6-overwrite"),
        })
    }
}

/// What flannel reads of a Node: its name, its pod CIDR(s) and its annotations. Nothing else of the
/// Node object is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `spec.podCIDR`.
    pub pod_cidr: Option<String>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

/// Why a Node cannot be turned into a lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadNode {
    /// No pod CIDR yet (the controller manager's node IPAM assigns it).
    #[error(
        "node {0:?} pod cidr not assigned: start kube-controller-manager with --allocate-node-cidrs=true and --cluster-cidr, or set spec.podCIDR"
    )]
    NoPodCidr(String),
    /// Three or more pod CIDRs, or a CIDR that does not parse.
    #[error("node {node:?}: {problem}")]
    PodCidrs {
        /// The node.
        node: String,
        /// What is wrong.
        problem: String,
    },
    /// The pod CIDR lies outside the network config's network.
    #[error(
        "node {node:?}: its pod CIDR {cidr} is not inside the flannel network {network}; make --cluster-cidr and the Network of net-conf.json agree"
    )]
    OutsideNetwork {
        /// The node.
        node: String,
        /// Its pod CIDR.
        cidr: IpNet,
        /// The network.
        network: IpNet,
    },
    /// An annotation flannel needs is missing or malformed.
    #[error("node {node:?}: annotation {key} {problem}")]
    Annotation {
        /// The node.
        node: String,
        /// The annotation key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// The IPv4 and IPv6 pod CIDR of a node: `spec.podCIDRs` (one or two entries, classified by family)
/// or else `spec.podCIDR`. Host bits are cleared, as Go's `net.ParseCIDR` does.
pub fn pod_cidrs(node: &NodeInfo) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), BadNode> {
    let bad = |problem: String| BadNode::PodCidrs {
        node: node.name.clone(),
        problem,
    };
    let list: Vec<&str> = if node.pod_cidrs.is_empty() {
        match node.pod_cidr.as_deref().filter(|s| !s.is_empty()) {
            Some(c) => vec![c],
            None => return Err(BadNode::NoPodCidr(node.name.clone())),
        }
    } else if node.pod_cidrs.len() > 2 {
        return Err(bad(format!(
            "{} pod cidrs {:?}: pod cidrs should be IPv4/IPv6 only or dualstack",
            node.pod_cidrs.len(),
            node.pod_cidrs
        )));
    } else {
        node.pod_cidrs.iter().map(String::as_str).collect()
    };
    let (mut v4, mut v6) = (None, None);
    for c in list {
        match c.parse::<IpNet>() {
            Ok(IpNet::V4(n)) => v4 = Some(n.trunc()),
            Ok(IpNet::V6(n)) => v6 = Some(n.trunc()),
            Err(_) => return Err(bad(format!("pod cidr {c:?} is not a CIDR"))),
        }
    }
    Ok((v4, v6))
}

fn annotation<'a>(node: &'a NodeInfo, key: &str) -> Option<&'a str> {
    node.annotations
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Backend data from an annotation: JSON text; `null` (host-gw, udp) is no data.
fn backend_data(node: &NodeInfo, key: &str) -> Result<Option<RawJson>, BadNode> {
    let Some(text) = annotation(node, key) else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(text).map_err(|e| BadNode::Annotation {
        node: node.name.clone(),
        key: key.into(),
        problem: format!("is not JSON ({e})"),
    })?;
    Ok((!v.is_null()).then(|| RawJson::from_value(&v)))
}

fn parsed<T: std::str::FromStr>(
    node: &NodeInfo,
    key: &str,
    what: &str,
) -> Result<Option<T>, BadNode> {
    annotation(node, key)
        .map(|v| {
            v.parse().map_err(|_| BadNode::Annotation {
                node: node.name.clone(),
                key: key.into(),
                problem: format!("= {v:?} is not {what}"),
            })
        })
        .transpose()
}

/// A peer Node as a lease, as upstream's `nodeToLease`: `None` when the node is not managed by flannel
/// (no `kube-subnet-manager: "true"`). The pod CIDR(s) must lie inside the network config's networks;
/// with IPv4 enabled the node must publish `public-ip`, with IPv6 `public-ipv6`.
pub fn node_to_lease(
    keys: &AnnotationKeys,
    config: &NetworkConfig,
    node: &NodeInfo,
) -> Result<Option<Lease>, BadNode> {
    if annotation(node, &keys.subnet_kube_managed) != Some("true") {
        return Ok(None);
    }
    let (v4, v6) = pod_cidrs(node)?;
    let missing = |key: &str| BadNode::Annotation {
        node: node.name.clone(),
        key: key.into(),
        problem: "is missing".into(),
    };
    let mut attrs = LeaseAttrs {
        backend_type: flannel_core::backend_type_of(
            annotation(node, &keys.backend_type).unwrap_or_default(),
        ),
        ..Default::default()
    };
    let mut key = SubnetKey::v4(Ipv4Net::default());
    let mut enable_ipv4 = false;
    if let Some(network) = config.network() {
        let subnet = v4.ok_or_else(|| BadNode::PodCidrs {
            node: node.name.clone(),
            problem: "no IPv4 pod cidr, but the network config has an IPv4 Network".into(),
        })?;
        inside(node, IpNet::V4(network), IpNet::V4(subnet))?;
        attrs.public_ip = parsed::<Ipv4Addr>(node, &keys.public_ip, "an IPv4 address")?
            .ok_or_else(|| missing(&keys.public_ip))?;
        attrs.backend_data = backend_data(node, &keys.backend_data)?;
        key.ipv4 = subnet;
        enable_ipv4 = true;
    }
    if let Some(network6) = config.ipv6_network() {
        let subnet6 = v6.ok_or_else(|| BadNode::PodCidrs {
            node: node.name.clone(),
            problem: "no IPv6 pod cidr, but the network config enables IPv6".into(),
        })?;
        inside(node, IpNet::V6(network6), IpNet::V6(subnet6))?;
        attrs.public_ipv6 = Some(
            parsed::<Ipv6Addr>(node, &keys.public_ipv6, "an IPv6 address")?
                .ok_or_else(|| missing(&keys.public_ipv6))?,
        );
        attrs.backend_v6_data = backend_data(node, &keys.backend_v6_data)?;
        key.ipv6 = Some(subnet6);
    }
    Ok(Some(Lease {
        key,
        enable_ipv4,
        attrs,
        expiration: None,
        asof: 0,
    }))
}

fn inside(node: &NodeInfo, network: IpNet, cidr: IpNet) -> Result<(), BadNode> {
    if network.contains(&cidr) {
        Ok(())
    } else {
        Err(BadNode::OutsideNetwork {
            node: node.name.clone(),
            cidr,
            network,
        })
    }
}

/// What a Node published before, read back leniently from its annotations (unparsable values are
/// left out): upstream restores the vxlan VTEP MAC after a reboot from `backend-data`.
pub fn published_attrs(keys: &AnnotationKeys, node: &NodeInfo) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: parsed(node, &keys.public_ip, "")
            .ok()
            .flatten()
            .unwrap_or(Ipv4Addr::UNSPECIFIED),
        public_ipv6: parsed(node, &keys.public_ipv6, "").ok().flatten(),
        backend_type: flannel_core::backend_type_of(
            annotation(node, &keys.backend_type).unwrap_or_default(),
        ),
        backend_data: backend_data(node, &keys.backend_data).ok().flatten(),
        backend_v6_data: backend_data(node, &keys.backend_v6_data).ok().flatten(),
    }
}

/// Our own lease key from our Node's pod CIDR(s), checked against the network config (upstream's
/// `AcquireLease` checks).
pub fn own_lease_key(config: &NetworkConfig, node: &NodeInfo) -> Result<SubnetKey, BadNode> {
    let (v4, v6) = pod_cidrs(node)?;
    let mut key = SubnetKey::v4(Ipv4Net::default());
    if let (Some(network), Some(subnet)) = (config.network(), v4) {
        inside(node, IpNet::V4(network), IpNet::V4(subnet))?;
        key.ipv4 = subnet;
    } else if config.network().is_some() {
        return Err(BadNode::PodCidrs {
            node: node.name.clone(),
            problem: "no IPv4 pod cidr, but the network config has an IPv4 Network".into(),
        });
    }
    if let Some(subnet6) = v6 {
        let Some(network6) = config.ipv6_network() else {
            return Err(BadNode::PodCidrs {
                node: node.name.clone(),
                problem: format!(
                    "IPv6 pod cidr {subnet6} given, but the network config has no IPv6Network"
                ),
            });
        };
        inside(node, IpNet::V6(network6), IpNet::V6(subnet6))?;
        key.ipv6 = Some(subnet6);
    } else if config.ipv6_network().is_some() {
        return Err(BadNode::PodCidrs {
            node: node.name.clone(),
            problem: "no IPv6 pod cidr, but the network config enables IPv6".into(),
        });
    }
    Ok(key)
}

fn data_text(d: &Option<RawJson>) -> String {
    d.as_ref()
        .map_or_else(|| "null".to_string(), |r| r.as_str().to_string())
}

/// The annotations our Node must carry for `attrs` (upstream's `AcquireLease`): the changed ones
/// only, empty when the Node is already right. `backend-data` is written as `null` for backends
/// without data (host-gw, udp), as upstream does; an `…-overwrite` annotation is published instead
/// of the detected address.
pub fn desired_annotations(
    keys: &AnnotationKeys,
    attrs: &LeaseAttrs,
    node: &NodeInfo,
) -> BTreeMap<String, String> {
    let bd = data_text(&attrs.backend_data);
    let v6bd = data_text(&attrs.backend_v6_data);
    let bt: &str = &attrs.backend_type;
    let mut want = BTreeMap::new();
    want.insert(keys.backend_type.clone(), bt.to_string());
    // Upstream's condition, simplified: vxlan publishes only with data; every other backend always.
    if bt != "vxlan" || bd != "null" {
        want.insert(keys.backend_data.clone(), bd);
        let ip = annotation(node, &keys.public_ip_overwrite)
            .map(str::to_string)
            .unwrap_or_else(|| attrs.public_ip.to_string());
        want.insert(keys.public_ip.clone(), ip);
    }
    if let Some(v6) = attrs.public_ipv6
        && ((matches!(bt, "vxlan" | "wireguard") && v6bd != "null") || bt == "host-gw")
    {
        want.insert(keys.backend_v6_data.clone(), v6bd);
        let ip = annotation(node, &keys.public_ipv6_overwrite)
            .map(str::to_string)
            .unwrap_or_else(|| v6.to_string());
        want.insert(keys.public_ipv6.clone(), ip);
    }
    want.insert(keys.subnet_kube_managed.clone(), "true".into());
    want.retain(|k, v| node.annotations.get(k) != Some(v));
    want
}

/// The strategic-merge patch that sets `annotations` (sent to `nodes/<name>/status`, as upstream).
pub fn annotations_patch(annotations: &BTreeMap<String, String>) -> Value {
    json!({ "metadata": { "annotations": annotations } })
}

/// The status patch that marks the node's network as available (upstream's `CompleteLease`):
/// condition `NetworkUnavailable=False`, reason `FlannelIsUp`; `now` is an RFC 3339 time.
pub fn network_available_patch(now: &str) -> Value {
    json!({ "status": { "conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}})
}

/// The `node-public-ip` / `node-public-ipv6` annotations of our Node (used as `--public-ip` and
/// `--public-ipv6` when those are not given).
pub fn node_public_ips(
    keys: &AnnotationKeys,
    node: &NodeInfo,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), BadNode> {
    Ok((
        parsed(node, &keys.node_public_ip, "an IPv4 address")?,
        parsed(node, &keys.node_public_ipv6, "an IPv6 address")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_prefix_table() {
        // upstream annotations_test.go, plus the normalisation of each form.
        for (prefix, backend_type) in [
            (
                "flannel.alpha.coreos.com",
                "flannel.alpha.coreos.com/backend-type",
            ),
            (
                "flannel.alpha.coreos.com/",
                "flannel.alpha.coreos.com/backend-type",
            ),
            (
                "flannel.alpha.coreos.com/prefix",
                "flannel.alpha.coreos.com/prefix-backend-type",
            ),
            (
                "flannel.alpha.coreos.com/prefix-",
                "flannel.alpha.coreos.com/prefix-backend-type",
            ),
            ("org.com", "org.com/backend-type"),
            ("org9.com", "org9.com/backend-type"),
            ("org.com/9", "org.com/9-backend-type"),
        ] {
            let k = AnnotationKeys::new(prefix).unwrap_or_else(|e| panic!("{prefix}: {e}"));
            assert_eq!(k.backend_type, backend_type, "{prefix}");
        }
        for bad in [
            "org",
            "org/",
            "org/prefix",
            "org.COM",
            "org.com/PREFIX",
            "a.b/c/d",
            "Org.com",
            "",
        ] {
            assert!(AnnotationKeys::new(bad).is_err(), "{bad:?} must be refused");
        }
        let k = AnnotationKeys::new(DEFAULT_PREFIX).unwrap();
        assert_eq!(
            [
                &k.subnet_kube_managed,
                &k.backend_data,
                &k.backend_v6_data,
                &k.public_ip,
                &k.public_ipv6,
                &k.node_public_ip,
                &k.node_public_ipv6,
                &k.public_ip_overwrite,
                &k.public_ipv6_overwrite,
            ],
            [
                "flannel.alpha.coreos.com/kube-subnet-manager",
                "flannel.alpha.coreos.com/backend-data",
                "flannel.alpha.coreos.com/backend-v6-data",
                "flannel.alpha.coreos.com/public-ip",
                "flannel.alpha.coreos.com/public-ipv6",
                "flannel.alpha.coreos.com/node-public-ip",
                "flannel.alpha.coreos.com/node-public-ipv6",
                "flannel.alpha.coreos.com/public-ip-overwrite",
                "flannel.alpha.coreos.com/public-ipv6-overwrite",
            ]
        );
    }

    fn node(cidrs: &[&str], ann: &[(&str, &str)]) -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            pod_cidr: cidrs.first().map(|s| s.to_string()),
            pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            annotations: ann
                .iter()
                .map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string()))
                .collect(),
        }
    }

    fn keys() -> AnnotationKeys {
        AnnotationKeys::new(DEFAULT_PREFIX).unwrap()
    }

    fn v4_config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap()
    }

    fn dual_config() -> NetworkConfig {
        NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn pod_cidrs_by_family() {
        let mut n = node(&["10.244.3.7/24"], &[]);
        assert_eq!(
            pod_cidrs(&n).unwrap(),
            (Some("10.244.3.0/24".parse().unwrap()), None)
        );
        n.pod_cidrs = vec!["fd00:10:0:3::/64".into(), "10.244.3.0/24".into()];
        assert_eq!(
            pod_cidrs(&n).unwrap(),
            (
                Some("10.244.3.0/24".parse().unwrap()),
                Some("fd00:10:0:3::/64".parse().unwrap())
            )
        );
        // Only spec.podCIDR (older clusters).
        n.pod_cidrs.clear();
        n.pod_cidr = Some("fd00:10:0:3::/64".into());
        assert_eq!(
            pod_cidrs(&n).unwrap(),
            (None, Some("fd00:10:0:3::/64".parse().unwrap()))
        );
        n.pod_cidr = None;
        assert_eq!(pod_cidrs(&n), Err(BadNode::NoPodCidr("n1".into())));
        n.pod_cidr = Some(String::new());
        assert!(matches!(pod_cidrs(&n), Err(BadNode::NoPodCidr(_))));
        n.pod_cidrs = vec![
            "10.244.3.0/24".into(),
            "fd00::/64".into(),
            "10.244.4.0/24".into(),
        ];
        let e = pod_cidrs(&n).unwrap_err().to_string();
        assert!(e.contains("IPv4/IPv6 only or dualstack"), "{e}");
        n.pod_cidrs = vec!["10.244.3.0".into()];
        assert!(
            pod_cidrs(&n)
                .unwrap_err()
                .to_string()
                .contains("not a CIDR")
        );
    }

    #[test]
    fn a_peer_node_becomes_a_lease() {
        let n = node(
            &["10.244.3.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#),
                ("public-ip", "192.168.1.3"),
            ],
        );
        let l = node_to_lease(&keys(), &v4_config(), &n).unwrap().unwrap();
        assert_eq!(l.key.to_string(), "10.244.3.0-24");
        assert!(l.enable_ipv4);
        assert_eq!(
            l.attrs.to_json(),
            r#"{"PublicIP":"192.168.1.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}}"#
        );
        // host-gw writes backend-data "null": no data.
        let n = node(
            &["10.244.4.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "host-gw"),
                ("backend-data", "null"),
                ("public-ip", "192.168.1.4"),
            ],
        );
        let l = node_to_lease(&keys(), &v4_config(), &n).unwrap().unwrap();
        assert_eq!(l.attrs.backend_data, None);
        // Not managed by flannel: ignored.
        let n = node(&["10.244.5.0/24"], &[("public-ip", "192.168.1.5")]);
        assert_eq!(node_to_lease(&keys(), &v4_config(), &n).unwrap(), None);
        let n = node(&["10.244.5.0/24"], &[("kube-subnet-manager", "false")]);
        assert_eq!(node_to_lease(&keys(), &v4_config(), &n).unwrap(), None);
    }

    #[test]
    fn bad_peer_nodes_are_refused_with_the_reason() {
        let managed = [
            ("kube-subnet-manager", "true"),
            ("public-ip", "192.168.1.3"),
        ];
        // Outside the network.
        let e =
            node_to_lease(&keys(), &v4_config(), &node(&["10.99.0.0/24"], &managed)).unwrap_err();
        assert!(matches!(e, BadNode::OutsideNetwork { .. }), "{e}");
        // The whole network, or a larger one, is not inside it either.
        let e = node_to_lease(&keys(), &v4_config(), &node(&["10.0.0.0/8"], &managed)).unwrap_err();
        assert!(matches!(e, BadNode::OutsideNetwork { .. }), "{e}");
        // No public IP, or a bad one.
        let e = node_to_lease(
            &keys(),
            &v4_config(),
            &node(&["10.244.3.0/24"], &[("kube-subnet-manager", "true")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("public-ip is missing"), "{e}");
        let e = node_to_lease(
            &keys(),
            &v4_config(),
            &node(
                &["10.244.3.0/24"],
                &[("kube-subnet-manager", "true"), ("public-ip", "300.1.1.1")],
            ),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not an IPv4 address"), "{e}");
        // Backend data that is not JSON.
        let e = node_to_lease(
            &keys(),
            &v4_config(),
            &node(
                &["10.244.3.0/24"],
                &[
                    ("kube-subnet-manager", "true"),
                    ("public-ip", "192.168.1.3"),
                    ("backend-data", "{VNI:1"),
                ],
            ),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
        // Dual stack config, IPv4-only node.
        let e = node_to_lease(&keys(), &dual_config(), &node(&["10.244.3.0/24"], &managed))
            .unwrap_err();
        assert!(e.to_string().contains("no IPv6 pod cidr"), "{e}");
    }

    #[test]
    fn a_dual_stack_peer() {
        let n = node(
            &["10.244.3.0/24", "fd00:10:0:3::/64"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#),
                (
                    "backend-v6-data",
                    r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e4"}"#,
                ),
                ("public-ip", "192.168.1.3"),
                ("public-ipv6", "fd00:1::3"),
            ],
        );
        let l = node_to_lease(&keys(), &dual_config(), &n).unwrap().unwrap();
        assert_eq!(l.key.to_string(), "10.244.3.0-24&fd00:10:0:3::-64");
        assert_eq!(l.attrs.public_ipv6, Some("fd00:1::3".parse().unwrap()));
        assert!(l.attrs.backend_v6_data.is_some());
    }

    #[test]
    fn own_key_checks_the_network() {
        let n = node(&["10.244.3.0/24"], &[]);
        assert_eq!(
            own_lease_key(&v4_config(), &n).unwrap().to_string(),
            "10.244.3.0-24"
        );
        assert!(matches!(
            own_lease_key(&v4_config(), &node(&["10.1.0.0/24"], &[])),
            Err(BadNode::OutsideNetwork { .. })
        ));
        assert!(own_lease_key(&v4_config(), &node(&["10.244.3.0/24", "fd00::/64"], &[])).is_err());
        assert_eq!(
            own_lease_key(
                &dual_config(),
                &node(&["10.244.3.0/24", "fd00:10:0:3::/64"], &[])
            )
            .unwrap()
            .to_string(),
            "10.244.3.0-24&fd00:10:0:3::-64"
        );
    }

    fn attrs(bt: &str, data: Option<&str>) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: "192.168.1.3".parse().unwrap(),
            backend_type: flannel_core::backend_type_of(bt),
            backend_data: data.map(|d| RawJson::from_value(&serde_json::from_str(d).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn desired_annotations_match_upstream_formats() {
        let k = keys();
        let fresh = node(&["10.244.3.0/24"], &[]);
        let want = desired_annotations(
            &k,
            &attrs("vxlan", Some(r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#)),
            &fresh,
        );
        let got: Vec<(&str, &str)> = want
            .iter()
            .map(|(a, b)| {
                (
                    a.trim_start_matches("flannel.alpha.coreos.com/"),
                    b.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("backend-data", r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#),
                ("backend-type", "vxlan"),
                ("kube-subnet-manager", "true"),
                ("public-ip", "192.168.1.3"),
            ]
        );
        // host-gw and udp (no backend type, like Go's udp): backend-data is "null".
        for bt in ["host-gw", ""] {
            let want = desired_annotations(&k, &attrs(bt, None), &fresh);
            assert_eq!(want[&k.backend_data], "null", "{bt}");
            assert_eq!(want[&k.backend_type], bt);
        }
        // Nothing to change: an empty patch.
        let mut done = fresh.clone();
        done.annotations = desired_annotations(&k, &attrs("", None), &fresh);
        let again = desired_annotations(&k, &attrs("", None), &done);
        assert!(again.is_empty(), "{again:?}");
        // An overwrite annotation is published instead of the detected address.
        let mut over = fresh.clone();
        over.annotations
            .insert(k.public_ip_overwrite.clone(), "203.0.113.9".into());
        let want = desired_annotations(&k, &attrs("host-gw", None), &over);
        assert_eq!(want[&k.public_ip], "203.0.113.9");
        // Dual stack: the IPv6 annotations too.
        let mut a = attrs("vxlan", Some(r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#));
        a.public_ipv6 = Some("fd00:1::3".parse().unwrap());
        a.backend_v6_data = Some(RawJson::from_value(
            &serde_json::json!({"VNI":1,"VtepMAC":"12:c6:65:89:b4:e4"}),
        ));
        let want = desired_annotations(&k, &a, &fresh);
        assert_eq!(want[&k.public_ipv6], "fd00:1::3");
        assert_eq!(
            want[&k.backend_v6_data],
            r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e4"}"#
        );
    }

    #[test]
    fn patches_have_upstream_shape() {
        let p = network_available_patch("2026-11-26T10:00:00Z");
        assert_eq!(
            p.to_string(),
            r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp","message":"Flannel is running on this node","lastTransitionTime":"2026-11-26T10:00:00Z","lastHeartbeatTime":"2026-11-26T10:00:00Z"}]}}"#
        );
        let mut a = BTreeMap::new();
        a.insert("x.io/public-ip".to_string(), "1.2.3.4".to_string());
        assert_eq!(
            annotations_patch(&a).to_string(),
            r#"{"metadata":{"annotations":{"x.io/public-ip":"1.2.3.4"}}}"#
        );
    }

    #[test]
    fn published_attrs_read_back_leniently() {
        let n = node(
            &["10.244.3.0/24"],
            &[
                ("backend-type", "vxlan"),
                ("backend-data", r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#),
                ("backend-v6-data", "{broken"),
                ("public-ip", "192.168.1.3"),
            ],
        );
        let a = published_attrs(&keys(), &n);
        assert_eq!(
            a.backend_data.unwrap().as_str(),
            r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#
        );
        assert_eq!(a.backend_v6_data, None);
        assert_eq!(a.public_ip.to_string(), "192.168.1.3");
    }

    #[test]
    fn node_public_ip_annotations() {
        let k = keys();
        let n = node(
            &[],
            &[
                ("node-public-ip", "198.51.100.7"),
                ("node-public-ipv6", "2001:db8::7"),
            ],
        );
        assert_eq!(
            node_public_ips(&k, &n).unwrap(),
            (
                Some("198.51.100.7".parse().unwrap()),
                Some("2001:db8::7".parse().unwrap())
            )
        );
        assert_eq!(node_public_ips(&k, &node(&[], &[])).unwrap(), (None, None));
        assert!(node_public_ips(&k, &node(&[], &[("node-public-ip", "x")])).is_err());
    }
}
