//! Kubernetes mode in the netns lab: three hosts whose `flanneld --kube-subnet-mgr` talk to the
//! stand-in API server over the underlay, each with a Node carrying its pod CIDR. Pods ping across
//! hosts for vxlan, host-gw, udp and wireguard; the annotations and the NetworkUnavailable condition read back
//! in upstream's formats; a deleted Node's routes go away; a restart keeps the subnet and the VTEP
//! MAC (also when the device is gone, as after a reboot); a watch that expires with 410 misses no
//! node added, and keeps no node deleted, during the gap.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flannel_tests::lab::{Lab, LabSpec};
use flannel_tests::{bin_path, require_root, until};
use serde_json::Value;

const PREFIX: &str = "flannel.alpha.coreos.com/";

fn lab(backend: &str) -> Lab {
    Lab::new_kube(
        &LabSpec {
            segments: vec![3],
            config: format!(r#"{{"Network":"10.5.0.0/16","Backend":{backend}}}"#),
            flanneld_args: vec!["--iptables-forward-rules=false".into()],
        },
        bin_path("flanneld"),
    )
}

fn annotation(node: &Value, key: &str) -> String {
    node["metadata"]["annotations"][format!("{PREFIX}{key}")]
        .as_str()
        .unwrap_or_else(|| panic!("no annotation {key}: {node}"))
        .to_string()
}

/// The node's NetworkUnavailable condition, once flanneld set it.
fn network_condition(lab: &Lab, node: &str) -> Option<Value> {
    lab.api().node(node)?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "NetworkUnavailable")
        .cloned()
}

#[test]
fn pods_ping_across_hosts_for_every_backend_with_upstream_annotations() {
    if !require_root("kube: pods_ping_across_hosts") {
        return;
    }
    for (backend, ty) in [
        (r#"{"Type":"vxlan"}"#, "vxlan"),
        (r#"{"Type":"host-gw"}"#, "host-gw"),
        (r#"{"Type":"udp"}"#, ""),
        (r#"{"Type":"wireguard"}"#, "wireguard"),
        // Upstream's host-gw example of the extension backend, publishing each host's MAC.
        (
            r#"{"Type":"extension","PreStartupCommand":"cat /sys/class/net/eth0/address","SubnetAddCommand":"ip route replace \"$SUBNET\" via \"$PUBLIC_IP\""}"#,
            "extension",
        ),
    ] {
        let mut lab = lab(backend);
        lab.start_all();
        for i in 0..3 {
            lab.add_pods(i, 1);
        }
        let failures = lab.ping_all(Duration::from_secs(10));
        assert!(failures.is_empty(), "{backend}: {failures:?}");
        for (i, h) in lab.hosts.iter().enumerate() {
            let name = format!("host{}", i + 1);
            let node = lab.api().node(&name).unwrap();
            // The lease is the Node's pod CIDR.
            let cidr = node["spec"]["podCIDR"].as_str().unwrap().to_string();
            let env = h.subnet_env().unwrap();
            let first = cidr.replace(".0/24", ".1/24");
            assert_eq!(env["FLANNEL_SUBNET"], first, "{backend} {name}");
            // Upstream's annotations, exactly.
            assert_eq!(annotation(&node, "kube-subnet-manager"), "true");
            assert_eq!(annotation(&node, "backend-type"), ty);
            assert_eq!(annotation(&node, "public-ip"), h.addr.to_string());
            let data = annotation(&node, "backend-data");
            if ty == "vxlan" {
                // Upstream reads the MAC back by splitting this exact layout.
                let mac = data
                    .strip_prefix(r#"{"VNI":1,"VtepMAC":""#)
                    .and_then(|r| r.strip_suffix(r#""}"#))
                    .unwrap_or_else(|| panic!("backend-data layout: {data}"));
                assert_eq!(mac.len(), 17, "{data}");
                let dev = h.sh("ip -br link show flannel.1");
                assert!(dev.contains(mac), "{dev} vs {data}");
            } else if ty == "wireguard" {
                // The key and port, as upstream's wireguard backend writes them.
                let data: Value = serde_json::from_str(&data).unwrap();
                let key = lab.wireguard_public_key(i);
                assert_eq!(data, serde_json::json!({"PublicKey": key, "Port": 51820}));
                // Each host's device has the other two as peers, with their pod CIDRs.
                let dump = lab.wg(i, &["show", "flannel-wg", "dump"]).unwrap();
                assert_eq!(dump.lines().count(), 3, "{dump}");
            } else if ty == "extension" {
                // The pre-startup command's output as a JSON string, as upstream writes it.
                let mac = h.sh("cat /sys/class/net/eth0/address");
                assert_eq!(data, format!("\"{}\"", mac.trim()), "{backend}");
            } else {
                assert_eq!(data, "null", "{backend}: host-gw and udp write null");
            }
            // NetworkUnavailable=False, reason FlannelIsUp, and the kubelet's Ready kept.
            assert!(
                until(Duration::from_secs(5), || network_condition(&lab, &name)
                    .is_some()),
                "{name} has no NetworkUnavailable condition"
            );
            let c = network_condition(&lab, &name).unwrap();
            assert_eq!(c["status"], "False");
            assert_eq!(c["reason"], "FlannelIsUp");
            assert_eq!(c["message"], "Flannel is running on this node");
            let t = c["lastTransitionTime"].as_str().unwrap();
            assert!(t.len() == 20 && t.ends_with('Z'), "RFC 3339 seconds: {t}");
            let node = lab.api().node(&name).unwrap();
            assert!(
                node["status"]["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["type"] == "Ready"),
                "the status patch merged by type: {node}"
            );
        }
        // flanneld wrote only through nodes/status (and read nodes), as the RBAC rules allow.
        for r in lab.api().requests() {
            let allowed = r.starts_with("GET /api/v1/nodes")
                || (r.starts_with("PATCH /api/v1/nodes/") && r.contains("/status"));
            assert!(
                allowed,
                "{backend}: a request the ClusterRole does not grant: {r}"
            );
        }
    }
}

#[test]
fn deleted_nodes_restarts_and_an_expired_watch() {
    if !require_root("kube: deleted_nodes_restarts_and_an_expired_watch") {
        return;
    }
    let mut lab = lab(r#"{"Type":"vxlan"}"#);
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    let h3_cidr = Lab::pod_cidrs(r#"{"Network":"10.5.0.0/16"}"#, 3)[0].clone();
    let routes = |lab: &Lab, i: usize| lab.hosts[i].routes("");
    assert!(routes(&lab, 0).contains(&h3_cidr));

    // A deleted Node: its routes go away on the other hosts.
    lab.stop_flanneld(2);
    assert!(lab.api().delete_node("host3"));
    for i in 0..2 {
        assert!(
            until(Duration::from_secs(5), || !routes(&lab, i)
                .contains(&h3_cidr)),
            "host{}: route to the deleted node stays:\n{}",
            i + 1,
            routes(&lab, i)
        );
    }

    // A restart keeps the subnet and the VTEP MAC, also when the device is gone (a reboot).
    let before = lab.api().node("host1").unwrap();
    let data = annotation(&before, "backend-data");
    let env = lab.hosts[0].subnet_env().unwrap();
    lab.stop_flanneld(0);
    lab.hosts[0].sh("ip link del flannel.1");
    lab.start_flanneld(0);
    assert_eq!(lab.hosts[0].subnet_env().unwrap(), env);
    let after = lab.api().node("host1").unwrap();
    assert_eq!(
        annotation(&after, "backend-data"),
        data,
        "the VTEP MAC survives"
    );
    let mac = &data[data.len() - 19..data.len() - 2];
    assert!(lab.hosts[0].sh("ip -br link show flannel.1").contains(mac));
    assert!(lab.ping((1, 0), lab.hosts[0].pods[0].ip, Duration::from_secs(10)));

    // A watch that expires: the API server's history is gone (as after etcd compaction) while
    // host2's watch is closed; meanwhile a node joins and one leaves. host2 gets 410 Expired,
    // re-lists, and ends up with exactly the nodes that exist.
    let api = lab.api();
    api.set_history(0);
    api.close_watches(true);
    let joined = Lab::pod_cidrs(r#"{"Network":"10.5.0.0/16"}"#, 9)[0].clone();
    api.add_node("host9", &[&joined]);
    assert!(api.update_node("host9", |n| {
        n["metadata"]["annotations"] = serde_json::json!({
            format!("{PREFIX}kube-subnet-manager"): "true",
            format!("{PREFIX}backend-type"): "vxlan",
            format!("{PREFIX}backend-data"): r#"{"VNI":1,"VtepMAC":"0e:11:22:33:44:55"}"#,
            format!("{PREFIX}public-ip"): "172.20.0.99",
        });
    }));
    let host1_cidr = lab.api().node("host1").unwrap()["spec"]["podCIDR"]
        .as_str()
        .unwrap()
        .to_string();
    lab.stop_flanneld(0);
    assert!(lab.api().delete_node("host1"));
    let expired_before = lab.api().expired_watches();
    lab.api().release_watches();
    assert!(
        until(Duration::from_secs(15), || {
            let r = routes(&lab, 1);
            r.contains(&joined) && !r.contains(&host1_cidr)
        }),
        "host2 after the gap:\n{}",
        routes(&lab, 1)
    );
    assert!(
        lab.api().expired_watches() > expired_before,
        "the watch really expired (410)"
    );
    let fdb = lab.hosts[1].sh("bridge fdb show dev flannel.1");
    assert!(fdb.contains("0e:11:22:33:44:55 dst 172.20.0.99"), "{fdb}");
}

#[test]
fn dual_stack_pods_ping_over_both_families() {
    if !require_root("kube: dual_stack_pods_ping_over_both_families") {
        return;
    }
    let config = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"vxlan"}}"#;
    let mut lab = Lab::new_kube(
        &LabSpec {
            segments: vec![3],
            config: config.into(),
            flanneld_args: vec!["--iptables-forward-rules=false".into()],
        },
        bin_path("flanneld"),
    );
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    let failures = lab.ping_both_families();
    assert!(failures.is_empty(), "{failures:?}");
    for (i, h) in lab.hosts.iter().enumerate() {
        let node = lab.api().node(&format!("host{}", i + 1)).unwrap();
        let cidrs = Lab::pod_cidrs(config, i + 1);
        let env = h.subnet_env().unwrap();
        assert_eq!(
            env["FLANNEL_IPV6_SUBNET"],
            cidrs[1].replace("::/64", "::1/64"),
            "the IPv6 lease is the Node's IPv6 pod CIDR"
        );
        assert_eq!(annotation(&node, "public-ipv6"), h.addr6.to_string());
        let v6 = annotation(&node, "backend-v6-data");
        assert!(
            v6.starts_with(r#"{"VNI":1,"VtepMAC":""#) && v6.ends_with(r#""}"#),
            "{v6}"
        );
        assert_ne!(
            v6,
            annotation(&node, "backend-data"),
            "two devices, two MACs"
        );
    }
}

/// An IPv6-only cluster (`EnableIPv4: false`), which Kubernetes mode allows (etcd mode does not):
/// Nodes with only an IPv6 pod CIDR, pods with only IPv6 addresses. For vxlan (only
/// `flannel-v6.1`), host-gw and wireguard (only `flannel-wg-v6`; with `Mode: auto`, `flannel-wg`
/// over IPv6 between the hosts' private addresses) the pods ping across hosts,
/// subnet.env carries only the IPv6 lines, the annotations are upstream's IPv6 ones,
/// `--ip-masq` installs only IPv6 rules (ip6tables, or nftables' `ip6 flannel-ipv6`), and a
/// deleted device is made again.
#[test]
fn ipv6_only_pods_ping_for_vxlan_host_gw_and_wireguard() {
    if !require_root("kube: ipv6_only_pods_ping_for_vxlan_host_gw_and_wireguard") {
        return;
    }
    // (host-gw with nftables rules, the others with iptables ones.)
    for (backend, options, device, nft) in [
        ("vxlan", "", Some("flannel-v6.1"), false),
        ("host-gw", "", None, true),
        ("wireguard", "", Some("flannel-wg-v6"), false),
        ("wireguard", r#","Mode":"auto""#, Some("flannel-wg"), false),
    ] {
        let config = format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:5::/48","EnableNFTables":{nft},"Backend":{{"Type":"{backend}"{options}}}}}"#
        );
        let mut lab = Lab::new_kube(
            &LabSpec {
                segments: vec![3],
                config: config.clone(),
                flanneld_args: vec!["--iptables-forward-rules=false".into(), "--ip-masq".into()],
            },
            bin_path("flanneld"),
        );
        lab.start_all();
        for i in 0..3 {
            lab.add_pods(i, 1);
        }
        let failures = lab.ping_ipv6();
        assert!(failures.is_empty(), "{backend}: {failures:?}");
        for (i, h) in lab.hosts.iter().enumerate() {
            let env = h.subnet_env().unwrap();
            let cidrs = Lab::pod_cidrs(&config, i + 1);
            assert_eq!(cidrs.len(), 1, "an IPv6 pod CIDR alone: {cidrs:?}");
            assert_eq!(
                env.get("FLANNEL_IPV6_SUBNET"),
                Some(&cidrs[0].replace("::/64", "::1/64")),
                "{backend}: {env:?}"
            );
            assert_eq!(
                env.get("FLANNEL_IPV6_NETWORK").map(String::as_str),
                Some("fd00:5::/48")
            );
            assert!(
                !env.contains_key("FLANNEL_SUBNET") && !env.contains_key("FLANNEL_NETWORK"),
                "{backend}: no IPv4 lines in an IPv6-only subnet.env: {env:?}"
            );
            let node = lab.api().node(&format!("host{}", i + 1)).unwrap();
            assert_eq!(
                annotation(&node, "public-ipv6"),
                h.addr6.to_string(),
                "{backend}"
            );
            if backend != "host-gw" {
                let v6 = annotation(&node, "backend-v6-data");
                assert!(v6.starts_with('{'), "{backend}: {v6}");
            }
            let links = h.sh("ip -o link show");
            if let Some(device) = device {
                assert!(links.contains(&format!(" {device}:")), "{backend}: {links}");
            }
            for v4_device in ["flannel.1", "flannel-wg"] {
                assert!(
                    device == Some(v4_device) || !links.contains(&format!(" {v4_device}:")),
                    "{backend}: no IPv4 device in an IPv6-only network: {links}"
                );
            }
            if nft {
                let t = h.sh("nft list table ip6 flannel-ipv6");
                assert!(t.contains("ip6 saddr fd00:5::/48"), "{backend}: {t}");
                let tables = h.sh("nft list tables");
                assert!(!tables.contains("flannel-ipv4"), "{backend}: {tables}");
            } else {
                let nat6 = h.sh("ip6tables -t nat -S FLANNEL-POSTRTG");
                assert!(nat6.contains("fd00:5::/48"), "{backend}: {nat6}");
                let nat4 = h.sh("iptables -t nat -S");
                assert!(!nat4.contains("FLANNEL"), "{backend}: {nat4}");
            }
        }
        if let Some(device) = device {
            // The IPv6 device is the only one; deleted, it is made again and carries on.
            lab.hosts[1].sh(&format!("ip link del {device}"));
            let failures = lab.ping_ipv6();
            assert!(
                failures.is_empty(),
                "{backend} after deleting {device}: {failures:?}"
            );
        }
    }
}
