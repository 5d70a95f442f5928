//! Dual stack (`EnableIPv6`) in the lab: every pod reaches every other pod over IPv4 and IPv6, the
//! leases advertise each host's IPv6 address, and each host holds the IPv6 entries Go flannel installs.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flannel_tests::lab::{Lab, LabSpec};
use flannel_tests::{bin_path, require_etcd, require_root};

fn dual_lab(test: &str, backend: &str, args: &[&str]) -> Option<Lab> {
    dual_lab_with(test, "", backend, args)
}

/// A dual-stack lab with `extra` (`,"Key":value` pairs) added to the network config.
fn dual_lab_with(test: &str, extra: &str, backend: &str, args: &[&str]) -> Option<Lab> {
    if !require_root(test) || !require_etcd(test) {
        return None;
    }
    let spec = LabSpec {
        segments: vec![3],
        config: format!(
            r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48"{extra},"Backend":{backend}}}"#
        ),
        flanneld_args: args.iter().map(|a| a.to_string()).collect(),
    };
    let mut lab = Lab::new(&spec, bin_path("flanneld"));
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    Some(lab)
}

/// Each host's lease: (IPv6 subnet as in the key, the PublicIPv6 it advertises).
fn v6_leases(lab: &Lab) -> Vec<(String, String)> {
    lab.etcd_list("/coreos.com/network/subnets/")
        .into_iter()
        .map(|(k, v)| {
            let key = k.rsplit('/').next().unwrap().to_string();
            let (_, v6) = key.split_once('&').expect("a dual-stack key");
            let (net, len) = v6.rsplit_once('-').unwrap();
            let json: serde_json::Value = serde_json::from_str(&v).unwrap();
            (
                format!("{net}/{len}"),
                json["PublicIPv6"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn hostgw_dual_stack() {
    let Some(lab) = dual_lab("hostgw_dual_stack", r#"{"Type":"host-gw"}"#, &["--ip-masq"]) else {
        return;
    };
    let failures = lab.ping_both_families();
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    let leases = v6_leases(&lab);
    for h in &lab.hosts {
        let own = leases
            .iter()
            .find(|(_, ip)| *ip == h.addr6.to_string())
            .unwrap_or_else(|| panic!("no lease advertises {}: {leases:?}", h.addr6));
        let routes = flannel_tests::lab::without_nhid(&h.sh("ip -6 route show"));
        for (subnet, gw) in &leases {
            let want = format!("{subnet} via {gw} dev eth0");
            if subnet == &own.0 {
                assert!(!routes.contains(&want), "own subnet routed away: {routes}");
            } else {
                assert!(
                    routes.contains(&want),
                    "host {}: {want} missing in {routes}",
                    h.n
                );
            }
        }
        // --ip-masq keeps the same chains in ip6tables for the IPv6 network.
        let masq = h.sh("ip6tables -w -t nat -S FLANNEL-POSTRTG");
        assert!(
            masq.contains("-s fd00:5::/48 ! -d ff00::/8") && masq.contains("-j MASQUERADE"),
            "{masq}"
        );
    }
    // The switch has no route to the pods' IPv6 subnets: only masqueraded pings come back.
    let outside = flannel_tests::lab::segment_gateway6(0);
    assert!(
        lab.ping((0, 0), outside, Duration::from_secs(5)),
        "a pod reaches a host outside the cluster over IPv6 (masqueraded)"
    );
}

/// The IPv6 VTEP MAC a lease advertises (`BackendV6Data.VtepMAC`), by IPv6 subnet.
fn v6_macs(lab: &Lab) -> Vec<(String, String)> {
    lab.etcd_list("/coreos.com/network/subnets/")
        .into_iter()
        .map(|(k, v)| {
            let key = k.rsplit('/').next().unwrap().to_string();
            let (_, v6) = key.split_once('&').unwrap();
            let (net, len) = v6.rsplit_once('-').unwrap();
            let json: serde_json::Value = serde_json::from_str(&v).unwrap();
            let mac = json["BackendV6Data"]["VtepMAC"]
                .as_str()
                .unwrap_or_else(|| panic!("no BackendV6Data.VtepMAC in {v}"))
                .to_string();
            (format!("{net}/{len}"), mac)
        })
        .collect()
}

#[test]
fn vxlan_dual_stack() {
    let Some(lab) = dual_lab("vxlan_dual_stack", r#"{"Type":"vxlan"}"#, &[]) else {
        return;
    };
    let failures = lab.ping_both_families();
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    let leases = v6_leases(&lab);
    let macs = v6_macs(&lab);
    for h in &lab.hosts {
        let (own, _) = leases
            .iter()
            .find(|(_, ip)| *ip == h.addr6.to_string())
            .unwrap_or_else(|| panic!("no lease advertises {}: {leases:?}", h.addr6));
        let link = h.sh("ip -d link show flannel-v6.1");
        assert!(
            link.contains("vxlan id 1") && link.contains(&format!("local {}", h.addr6)),
            "{link}"
        );
        assert!(link.contains("mtu 1430"), "underlay MTU - 70: {link}");
        let own_mac = &macs.iter().find(|(s, _)| s == own).unwrap().1;
        assert!(
            link.contains(own_mac.as_str()),
            "advertised MAC {own_mac}: {link}"
        );
        let addr = h.sh("ip -6 addr show dev flannel-v6.1");
        let own_addr = own.split('/').next().unwrap();
        assert!(addr.contains(&format!("{own_addr}/128")), "{addr}");
        let routes = flannel_tests::lab::without_nhid(&h.sh("ip -6 route show"));
        let neighs = h.sh("ip -6 neigh show dev flannel-v6.1");
        let fdb = h.sh("bridge fdb show dev flannel-v6.1");
        for ((subnet, public), (_, mac)) in leases.iter().zip(&macs) {
            if subnet == own {
                continue;
            }
            let gw = subnet.split('/').next().unwrap();
            // (The kernel gives IPv6 routes metric 1024, Go's alike.)
            let route = format!("{subnet} via {gw} dev flannel-v6.1 ");
            assert!(
                routes
                    .lines()
                    .any(|l| l.starts_with(&route) && l.contains(" onlink")),
                "host {}: {route}... onlink missing in {routes}",
                h.n
            );
            let neigh = format!("{gw} lladdr {mac} PERMANENT");
            assert!(
                neighs.contains(&neigh),
                "host {}: {neigh} missing in {neighs}",
                h.n
            );
            let entry = format!("{mac} dst {public} self permanent");
            assert!(
                fdb.contains(&entry),
                "host {}: {entry} missing in {fdb}",
                h.n
            );
        }
    }
    // Self-healing on the IPv6 side: a deleted route comes back, a deleted flannel-v6.1 is recreated
    // with the MAC the lease advertises.
    let peer_subnet = &leases
        .iter()
        .find(|(_, ip)| *ip != lab.hosts[0].addr6.to_string())
        .unwrap()
        .0;
    lab.hosts[0].sh(&format!("ip -6 route del {peer_subnet}"));
    let (own1, _) = leases
        .iter()
        .find(|(_, ip)| *ip == lab.hosts[1].addr6.to_string())
        .unwrap();
    let mac1 = macs.iter().find(|(s, _)| s == own1).unwrap().1.clone();
    lab.hosts[1].sh("ip link del flannel-v6.1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let route_back = flannel_tests::lab::without_nhid(&lab.hosts[0].sh("ip -6 route show"))
            .contains(&format!("{peer_subnet} via"));
        let dev_back = lab.hosts[1]
            .ns
            .exec(&["ip", "link", "show", "flannel-v6.1"])
            .is_ok_and(|l| l.contains(&mac1));
        if route_back && dev_back {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not repaired: route {route_back}, device {dev_back}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let failures = lab.ping_both_families();
    assert!(failures.is_empty(), "after repairs: {failures:?}");
}

#[test]
fn cni_pods_get_both_families() {
    if !std::path::Path::new("/usr/lib/cni/bridge").exists() {
        assert!(
            std::env::var_os("FLANNEL_REQUIRE_ROOT_TESTS").is_none(),
            "Debian's containernetworking-plugins are missing"
        );
        eprintln!("skipping cni_pods_get_both_families: no /usr/lib/cni/bridge");
        return;
    }
    if !require_root("cni_pods_get_both_families") || !require_etcd("cni_pods_get_both_families") {
        return;
    }
    let spec = LabSpec {
        segments: vec![2],
        config: r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"vxlan"}}"#.into(),
        flanneld_args: vec![],
    };
    let mut lab = Lab::new(&spec, bin_path("flanneld"));
    lab.start_all();
    for i in 0..2 {
        lab.add_cni_pods(i, 1, &bin_path("flannel"));
    }
    for h in 0..2 {
        let env = lab.hosts[h].subnet_env().unwrap();
        let subnet6: ipnet::Ipv6Net = env["FLANNEL_IPV6_SUBNET"].parse().unwrap();
        let ip6 = lab.hosts[h].pods[0]
            .ip6
            .expect("the CNI result has an IPv6 address");
        assert!(subnet6.trunc().contains(&ip6), "{ip6} in {subnet6}");
    }
    let failures = lab.ping_both_families();
    assert!(failures.is_empty(), "unreachable: {failures:?}");
}

#[test]
fn nftables_mode_masquerades_ipv6_too() {
    let Some(lab) = dual_lab_with(
        "nftables_mode_masquerades_ipv6_too",
        r#","EnableNFTables":true"#,
        r#"{"Type":"host-gw"}"#,
        &["--ip-masq"],
    ) else {
        return;
    };
    for h in &lab.hosts {
        let t = h.sh("nft list table ip6 flannel-ipv6");
        assert!(
            t.contains("ip6 saddr fd00:5::/48 ip6 daddr != ff00::/8 masquerade"),
            "{t}"
        );
        assert!(
            h.sh("nft list table ip flannel-ipv4")
                .contains("masquerade")
        );
    }
    let outside = flannel_tests::lab::segment_gateway6(0);
    assert!(
        lab.ping((0, 0), outside, Duration::from_secs(5)),
        "a pod reaches a host outside the cluster over IPv6 (masqueraded by nftables)"
    );
    let failures = lab.ping_both_families();
    assert!(failures.is_empty(), "unreachable: {failures:?}");
}
