//! Two networks on the same hosts, as Go's functional test `test_multi` runs them: one flanneld per
//! network on every host, each under its own `--etcd-prefix` with its own subnet file (vxlan on
//! 10.11.0.0/16, host-gw on 10.12.0.0/16). Both carry traffic; their masquerade and forward rules
//! share the flannel chains without either resync removing the other's; and one network dropping a
//! peer does not take the other's route to that peer with it (their routes may share a next-hop
//! object).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use flannel_tests::lab::Lab;
use flannel_tests::until;

const VXLAN: &str = r#"{"Network":"10.11.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
const HOSTGW: &str = r#"{"Network":"10.12.0.0/16","Backend":{"Type":"host-gw"}}"#;
const ARGS: &[&str] = &["--ip-masq", "--iptables-resync=1"];

/// `FLANNEL_SUBNET`'s address (the first of the subnet) in a subnet file.
fn first_address(file: &Path) -> (String, String) {
    let text = std::fs::read_to_string(file).unwrap();
    let subnet = text
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .unwrap()
        .to_string();
    let net = subnet.replace(".1/24", ".0/24");
    (subnet, net)
}

fn count(log: &Path, what: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(what)
        .count()
}

fn rules(lab: &Lab, h: usize, table: &str, chain: &str) -> String {
    lab.hosts[h].sh(&format!("iptables -w -t {table} -S {chain}"))
}

#[test]
fn two_networks_one_flanneld_each_on_the_same_hosts() {
    let test = "two_networks_one_flanneld_each_on_the_same_hosts";
    let Some(mut lab) = Lab::for_test(test, vec![2], VXLAN, ARGS) else {
        return;
    };
    lab.etcd_put("/hostgw/network/config", HOSTGW);
    lab.start_all();
    // The vxlan flanneld of host 1 routes to host 2 directly (DirectRouting: via host 2's address on
    // eth0). From here on nothing of its network changes: it must never have to repair a route.
    let vxlan_net1 = lab.subnet_of(1);
    let direct = format!("{vxlan_net1} via {} dev eth0", lab.hosts[1].addr);
    assert!(
        until(Duration::from_secs(10), || lab.hosts[0]
            .routes("")
            .contains(&direct)),
        "{}",
        lab.hosts[0].routes("")
    );
    std::thread::sleep(Duration::from_millis(500));
    let repaired = "data plane repaired or updated";
    let repairs_before = count(&lab.hosts[0].log, repaired);
    let mut second = Vec::new();
    for h in 0..2 {
        second.push(lab.start_second_flanneld(h, "hostgw", &["--etcd-prefix=/hostgw/network"]));
    }
    // The vxlan network's pods, and an address of each host's host-gw subnet on a bridge of its own.
    for (h, (_, file, _)) in second.iter().enumerate() {
        lab.add_pods(h, 1);
        let (addr, _) = first_address(file);
        lab.hosts[h].sh("ip link add fltmulti0 type bridge");
        lab.hosts[h].sh(&format!("ip addr add {addr} dev fltmulti0"));
        lab.hosts[h].sh("ip link set fltmulti0 up");
    }
    let failures = lab.ping_all(Duration::from_secs(20));
    assert!(failures.is_empty(), "the vxlan network: {failures:?}");
    let (a0, _) = first_address(&second[0].1);
    let (a1, net1) = first_address(&second[1].1);
    let (a0, a1) = (a0.replace("/24", ""), a1.replace("/24", ""));
    let pinged = until(Duration::from_secs(20), || {
        lab.hosts[0]
            .ns
            .exec(&["ping", "-c1", "-W1", "-I", &a0, &a1])
            .is_ok()
    });
    assert!(pinged, "the host-gw network: {a0} cannot reach {a1}");
    // Both route to host 2's address on eth0, each through a next-hop object of its own.
    let nhid = |dst: &str| {
        let line = lab.hosts[0].sh(&format!("ip route show {dst}"));
        line.split_whitespace()
            .skip_while(|w| *w != "nhid")
            .nth(1)
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no next-hop object: {line}"))
    };
    assert_ne!(
        nhid(&vxlan_net1),
        nhid(&net1),
        "one object for both flanneld's routes"
    );

    // Both networks' rules in the shared chains, and they stay: neither resync (every second)
    // takes the other's away, nor rebuilds its own again and again.
    let both = |h: usize| {
        let fwd = rules(&lab, h, "filter", "FLANNEL-FWD");
        let nat = rules(&lab, h, "nat", "FLANNEL-POSTRTG");
        ["10.11.0.0/16", "10.12.0.0/16"]
            .iter()
            .all(|n| fwd.contains(&format!("-s {n} ")) && nat.contains(&format!("-s {n} ")))
    };
    assert!(
        until(Duration::from_secs(10), || both(0) && both(1)),
        "{}\n{}",
        rules(&lab, 0, "filter", "FLANNEL-FWD"),
        rules(&lab, 0, "nat", "FLANNEL-POSTRTG")
    );
    let recreated = "some flannel rules were missing or changed";
    let logs = |h: usize| [lab.hosts[h].log.clone(), second[h].2.clone()];
    let before: Vec<usize> = (0..2)
        .flat_map(|h| logs(h).map(|l| count(&l, recreated)))
        .collect();
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        for h in 0..2 {
            assert!(
                both(h),
                "host {h} lost a network's rules:\n{}\n{}",
                rules(&lab, h, "filter", "FLANNEL-FWD"),
                rules(&lab, h, "nat", "FLANNEL-POSTRTG")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let after: Vec<usize> = (0..2)
        .flat_map(|h| logs(h).map(|l| count(&l, recreated)))
        .collect();
    assert_eq!(before, after, "a resync kept rebuilding the rules");

    // Host 2 leaves the host-gw network (its flanneld stops, its lease goes). Host 1's host-gw
    // route to it goes; its vxlan route to host 2 (the same next hop, maybe the same next-hop
    // object) stays untouched.
    let (proc, _, _) = second.remove(1);
    let _ = proc.stop();
    let key = net1.replace('/', "-");
    lab.etcd_delete(&format!("/hostgw/network/subnets/{key}"));
    assert!(
        until(Duration::from_secs(20), || !lab.hosts[0]
            .routes("")
            .contains(&format!("{net1} via"))),
        "host 1 kept its host-gw route to {net1}:\n{}",
        lab.hosts[0].routes("")
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lab.hosts[0].routes("").contains(&direct),
        "the vxlan route went with the host-gw one:\n{}",
        lab.hosts[0].routes("")
    );
    assert_eq!(
        count(&lab.hosts[0].log, repaired),
        repairs_before,
        "the vxlan flanneld had to repair its routes:\n{}",
        lab.hosts[0].log_text()
    );
    assert!(lab.ping((0, 0), lab.hosts[1].pods[0].ip, Duration::from_secs(5)));
}
