//! vxlan and host-gw in the multi-host lab: pods on different hosts reach each other, the kernel holds
//! exactly Go flannel's entries, and the data plane heals itself.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use flannel_tests::lab::{Lab, LabSpec};
use flannel_tests::{bin_path, require_etcd, require_root, until};

fn lab(test: &str, segments: Vec<usize>, backend: &str) -> Option<Lab> {
    if !require_root(test) || !require_etcd(test) {
        return None;
    }
    let spec = LabSpec {
        segments,
        config: format!(r#"{{"Network":"10.5.0.0/16","Backend":{backend}}}"#),
        flanneld_args: vec![],
    };
    Some(Lab::new(&spec, bin_path("flanneld")))
}

/// The leases in etcd: (subnet, public ip, vtep mac).
fn leases(lab: &Lab) -> Vec<(String, String, Option<String>)> {
    lab.etcd_list("/coreos.com/network/subnets/")
        .into_iter()
        .map(|(k, v)| {
            let subnet = k.rsplit('/').next().unwrap().replace('-', "/");
            let v: serde_json::Value = serde_json::from_str(&v).unwrap();
            let mac = v["BackendData"]["VtepMAC"].as_str().map(str::to_string);
            (subnet, v["PublicIP"].as_str().unwrap().to_string(), mac)
        })
        .collect()
}

fn lines(s: &str) -> BTreeSet<String> {
    s.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// The kernel entries Go flannel's vxlan backend installs on `host` for the other leases.
fn expected_vxlan(
    lab: &Lab,
    host: usize,
) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let me = lab.hosts[host].addr.to_string();
    let (mut routes, mut neighs, mut fdb) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (subnet, ip, mac) in leases(lab) {
        if ip == me {
            continue;
        }
        let gw = subnet.split('/').next().unwrap().to_string();
        let mac = mac.unwrap();
        routes.insert(format!("{subnet} via {gw} dev flannel.1 onlink"));
        neighs.insert(format!("{gw} lladdr {mac} PERMANENT"));
        fdb.insert(format!("{mac} dst {ip} self permanent"));
    }
    (routes, neighs, fdb)
}

fn actual_vxlan(lab: &Lab, host: usize) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let h = &lab.hosts[host];
    // Polled while the data plane may be broken: a missing device reads as no entries.
    let run = |cmd: &str| {
        h.ns.exec(&cmd.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    // `proto boot` is iproute2's default and not printed; Go's netlink library uses it too.
    let routes = lines(&flannel_tests::lab::without_nhid(&run("ip route show")))
        .into_iter()
        .filter(|l| l.contains("dev flannel.1"))
        .collect();
    (
        routes,
        lines(&run("ip neigh show dev flannel.1")),
        lines(&run("bridge fdb show dev flannel.1")),
    )
}

/// The routes Go flannel's host-gw backend installs on `host` (or DirectRouting routes).
fn expected_direct(lab: &Lab, host: usize, only: impl Fn(&str) -> bool) -> BTreeSet<String> {
    let me = lab.hosts[host].addr.to_string();
    leases(lab)
        .into_iter()
        .filter(|(_, ip, _)| *ip != me && only(ip))
        .map(|(subnet, ip, _)| format!("{subnet} via {ip} dev eth0"))
        .collect()
}

fn actual_direct(lab: &Lab, host: usize) -> BTreeSet<String> {
    lines(&lab.hosts[host].routes(""))
        .into_iter()
        .filter(|l| l.starts_with("10.5.") && l.contains("dev eth0"))
        .collect()
}

/// Pings `to` from pod (1,0) every 100 ms while `during` runs; returns (sent, received).
fn vtep_mac(lab: &Lab, host: usize) -> String {
    let out = lab.hosts[host].sh("ip -o link show flannel.1");
    let i = out.find("link/ether ").unwrap() + "link/ether ".len();
    out[i..i + 17].to_string()
}

fn lease_of(lab: &Lab, host: usize) -> (String, String, Option<String>) {
    let me = lab.hosts[host].addr.to_string();
    leases(lab)
        .into_iter()
        .find(|(_, ip, _)| *ip == me)
        .unwrap()
}

#[test]
fn vxlan_direct_routing_and_two_segments() {
    let Some(mut lab) = lab(
        "vxlan_direct_routing",
        vec![2, 1],
        r#"{"Type":"vxlan","DirectRouting":true}"#,
    ) else {
        return;
    };
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    let failures = lab.ping_all(Duration::from_secs(5));
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    // Host 0 and 1 share segment 172.20.0.0/16: direct routes between them, vxlan to host 2.
    let same_segment = |ip: &str| ip.starts_with("172.20.");
    assert!(
        until(Duration::from_secs(5), || actual_direct(&lab, 0)
            == expected_direct(&lab, 0, same_segment)),
        "{:?}",
        actual_direct(&lab, 0)
    );
    let (far_subnet, far_ip, far_mac) = lease_of(&lab, 2);
    let routes = lab.hosts[0].routes("");
    assert!(
        routes.contains(&format!(
            "{far_subnet} via {} dev flannel.1 onlink",
            far_subnet.split('/').next().unwrap()
        )),
        "{routes}"
    );
    let fdb = lab.hosts[0].sh("bridge fdb show dev flannel.1");
    assert_eq!(
        lines(&fdb),
        BTreeSet::from([format!("{} dst {far_ip} self permanent", far_mac.unwrap())])
    );
    // Host 2 is alone on its segment: everything goes through vxlan.
    assert!(actual_direct(&lab, 2).is_empty());
    assert_eq!(actual_vxlan(&lab, 2), expected_vxlan(&lab, 2));
}

#[test]
fn vxlan_works_across_a_router() {
    let Some(mut lab) = lab(
        "vxlan_works_across_a_router",
        vec![2, 1],
        r#"{"Type":"vxlan"}"#,
    ) else {
        return;
    };
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    let failures = lab.ping_all(Duration::from_secs(5));
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    for h in 0..3 {
        assert_eq!(actual_vxlan(&lab, h), expected_vxlan(&lab, h));
    }
}

#[test]
fn hostgw_reports_an_unreachable_next_hop() {
    let Some(mut lab) = lab(
        "hostgw_reports_an_unreachable_next_hop",
        vec![2, 1],
        r#"{"Type":"host-gw"}"#,
    ) else {
        return;
    };
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    // Hosts on the same segment work.
    assert!(
        lab.ping((0, 0), lab.hosts[1].pods[0].ip, Duration::from_secs(3))
            || lab.ping((0, 0), lab.hosts[1].pods[0].ip, Duration::from_secs(3))
    );
    let far = lease_of(&lab, 2).0;
    assert!(
        until(Duration::from_secs(5), || lab.hosts[0]
            .log_text()
            .contains(&format!("host-gw cannot reach subnet {far}"))),
        "no clear error in host 0's log:\n{}",
        lab.hosts[0].log_text()
    );
    assert!(lab.hosts[0].log_text().contains("use the vxlan backend"));
    assert!(
        lab.hosts[0].flanneld_running(),
        "an unreachable peer is not fatal"
    );
}

/// The three data-plane flavours every scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Vxlan,
    VxlanDirect,
    HostGw,
}

impl Flavor {
    const ALL: [Flavor; 3] = [Flavor::Vxlan, Flavor::VxlanDirect, Flavor::HostGw];

    fn backend(self) -> &'static str {
        match self {
            Flavor::Vxlan => r#"{"Type":"vxlan"}"#,
            Flavor::VxlanDirect => r#"{"Type":"vxlan","DirectRouting":true}"#,
            Flavor::HostGw => r#"{"Type":"host-gw"}"#,
        }
    }

    fn mtu(self) -> &'static str {
        if self == Flavor::HostGw {
            "1500"
        } else {
            "1450"
        }
    }

    /// Whether host `h` holds exactly Go flannel's entries for the current leases. With one segment,
    /// DirectRouting installs only direct routes (and no neighbour/FDB entries), like host-gw.
    fn in_sync(self, lab: &Lab, h: usize) -> bool {
        match self {
            Flavor::Vxlan => {
                lab.hosts[h]
                    .ns
                    .exec(&["ip", "link", "show", "flannel.1"])
                    .is_ok()
                    && actual_vxlan(lab, h) == expected_vxlan(lab, h)
            }
            Flavor::VxlanDirect => {
                let (_, neighs, fdb) = actual_vxlan(lab, h);
                let device = lab.hosts[h]
                    .ns
                    .exec(&["ip", "link", "show", "flannel.1"])
                    .is_ok();
                device
                    && actual_direct(lab, h) == expected_direct(lab, h, |_| true)
                    && neighs.is_empty()
                    && fdb.is_empty()
            }
            Flavor::HostGw => actual_direct(lab, h) == expected_direct(lab, h, |_| true),
        }
    }

    fn describe(self, lab: &Lab, h: usize) -> String {
        match self {
            Flavor::Vxlan => format!("{:?}", actual_vxlan(lab, h)),
            _ => format!("{:?}", actual_direct(lab, h)),
        }
    }

    /// Ways to break host 0's data plane, each with the command(s) that do it.
    fn chaos(self, lab: &Lab) -> Vec<(&'static str, Vec<String>)> {
        let (peer_subnet, peer_ip, peer_mac) = lease_of(lab, 1);
        let mut c = vec![
            (
                "delete a peer route",
                vec![format!("ip route del {peer_subnet}")],
            ),
            (
                "underlay down and up",
                vec![
                    "ip link set eth0 down".into(),
                    "SLEEP".into(),
                    "ip link set eth0 up".into(),
                ],
            ),
        ];
        match self {
            Flavor::Vxlan => c.extend([
                ("delete flannel.1", vec!["ip link del flannel.1".into()]),
                (
                    "flush flannel.1's neighbours",
                    vec!["ip neigh flush dev flannel.1 nud permanent".into()],
                ),
                (
                    "delete an FDB entry",
                    vec![format!(
                        "bridge fdb del {} dev flannel.1 dst {peer_ip} self",
                        peer_mac.unwrap()
                    )],
                ),
                (
                    "add a stale route on flannel.1",
                    vec!["ip route add 10.5.250.0/24 via 10.5.250.0 dev flannel.1 onlink".into()],
                ),
                (
                    "set flannel.1 down",
                    vec!["ip link set flannel.1 down".into()],
                ),
            ]),
            Flavor::VxlanDirect => c.extend([
                ("delete flannel.1", vec!["ip link del flannel.1".into()]),
                (
                    "add a stale direct route",
                    vec!["ip route add 10.5.250.0/24 via 172.20.0.99 dev eth0".into()],
                ),
                (
                    "add a stale route on flannel.1",
                    vec!["ip route add 10.5.251.0/24 via 10.5.251.0 dev flannel.1 onlink".into()],
                ),
            ]),
            Flavor::HostGw => c.extend([
                (
                    "add a stale route",
                    vec!["ip route add 10.5.250.0/24 via 172.20.0.99 dev eth0".into()],
                ),
                (
                    "change a route's gateway",
                    vec![format!(
                        "ip route replace {peer_subnet} via 172.20.0.98 dev eth0"
                    )],
                ),
            ]),
        }
        c
    }
}

fn flavor_lab(test: &str, flavor: Flavor, pods: usize) -> Option<Lab> {
    let mut lab = lab(&format!("{test} ({flavor:?})"), vec![3], flavor.backend())?;
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, pods);
    }
    Some(lab)
}

#[test]
fn pods_ping_and_kernel_entries_match_go() {
    for flavor in Flavor::ALL {
        let Some(lab) = flavor_lab("pods_ping_and_kernel_entries_match_go", flavor, 2) else {
            return;
        };
        let failures = lab.ping_all(Duration::from_secs(5));
        assert!(failures.is_empty(), "{flavor:?}: unreachable: {failures:?}");
        for h in 0..3 {
            assert!(
                until(Duration::from_secs(5), || flavor.in_sync(&lab, h)),
                "{flavor:?} host {h}: {}",
                flavor.describe(&lab, h)
            );
            assert_eq!(
                lab.hosts[h].subnet_env().unwrap()["FLANNEL_MTU"],
                flavor.mtu(),
                "{flavor:?}"
            );
        }
        let want_type = if flavor == Flavor::HostGw {
            "host-gw"
        } else {
            "vxlan"
        };
        for (k, v) in lab.etcd_list("/coreos.com/network/subnets/") {
            assert!(
                v.contains(&format!(r#""PublicIPv6":null,"BackendType":"{want_type}""#)),
                "{flavor:?} {k}: {v}"
            );
        }
    }
}

#[test]
fn restart_keeps_pods_talking_and_departed_peers_are_removed() {
    for flavor in Flavor::ALL {
        let Some(mut lab) = flavor_lab("restart_and_departed_peer", flavor, 1) else {
            return;
        };
        assert!(
            lab.ping_all(Duration::from_secs(5)).is_empty(),
            "{flavor:?}"
        );
        let before = lease_of(&lab, 0);
        let mac_before = (flavor != Flavor::HostGw).then(|| vtep_mac(&lab, 0));
        let to = lab.hosts[0].pods[0].ip;
        let (sent, received) = lab.ping_during((1, 0), to, 60, |lab| {
            assert_eq!(lab.stop_flanneld(0), Some(0), "SIGTERM is a clean exit");
            lab.start_flanneld(0);
        });
        eprintln!("{flavor:?} restart: {sent} pings sent, {received} received");
        assert_eq!(
            sent - received,
            0,
            "{flavor:?}: pings were lost across a flanneld restart"
        );
        assert_eq!(
            lease_of(&lab, 0),
            before,
            "{flavor:?}: same subnet and backend data after restart"
        );
        if let Some(mac) = mac_before {
            assert_eq!(vtep_mac(&lab, 0), mac, "{flavor:?}: same VTEP MAC");
            assert_eq!(
                before.2.as_deref(),
                Some(mac.as_str()),
                "{flavor:?}: the lease advertises the device MAC"
            );
        }
        // Host 2 goes away for good: its lease is deleted, the others drop its entries.
        let (gone, _, _) = lease_of(&lab, 2);
        lab.stop_flanneld(2);
        lab.etcd_delete(&format!(
            "/coreos.com/network/subnets/{}",
            gone.replace('/', "-")
        ));
        for h in 0..2 {
            assert!(
                until(Duration::from_secs(5), || flavor.in_sync(&lab, h)),
                "{flavor:?} host {h} kept the departed peer: {}",
                flavor.describe(&lab, h)
            );
            assert!(!lab.hosts[h].routes("").contains(&gone), "{flavor:?}");
        }
    }
}

#[test]
fn chaos_is_repaired() {
    for flavor in Flavor::ALL {
        let Some(lab) = flavor_lab("chaos_is_repaired", flavor, 1) else {
            return;
        };
        assert!(
            lab.ping_all(Duration::from_secs(5)).is_empty(),
            "{flavor:?}"
        );
        let mac = (flavor != Flavor::HostGw).then(|| vtep_mac(&lab, 0));
        for (what, cmds) in flavor.chaos(&lab) {
            for cmd in &cmds {
                if cmd == "SLEEP" {
                    std::thread::sleep(Duration::from_millis(500));
                } else {
                    lab.hosts[0].sh(cmd);
                }
            }
            let start = Instant::now();
            let healed = until(Duration::from_secs(10), || flavor.in_sync(&lab, 0));
            assert!(
                healed,
                "{flavor:?} {what}: not repaired: {}\nlog:\n{}",
                flavor.describe(&lab, 0),
                lab.hosts[0].log_text()
            );
            let failures = lab.ping_all(Duration::from_secs(5));
            assert!(
                failures.is_empty(),
                "{flavor:?} {what}: pods cannot talk: {failures:?}"
            );
            eprintln!("{flavor:?} {what}: repaired in {:?}", start.elapsed());
            if let Some(mac) = &mac {
                assert_eq!(
                    &vtep_mac(&lab, 0),
                    mac,
                    "{flavor:?} {what}: the VTEP MAC changed"
                );
            }
        }
        assert!(
            lab.hosts[0].log_text().contains("data plane repaired"),
            "{flavor:?}: repairs are logged"
        );
    }
}
