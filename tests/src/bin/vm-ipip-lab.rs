//! The ipip lab: run inside the test VM (a kernel with ipip tunnels; this machine's kernel has
//! none) by the test `ipip_backend_in_a_vm` (tests/tests/vm_ipip.rs). Three hosts on two underlay
//! segments joined by a router: hosts 1 and 2 share one, host 3 is behind the router. Each step
//! prints a line; the first failed check panics (exit code 101) and says what it saw. Then
//! DirectRouting, and Kubernetes mode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use flannel_tests::lab::Lab;
use flannel_tests::until;

/// Host `h`'s routes into the network (its pods' bridge aside), one per line, whitespace
/// normalised.
fn flannel_routes(lab: &Lab, h: usize) -> BTreeSet<String> {
    lab.hosts[h]
        .routes("")
        .lines()
        .filter(|l| l.starts_with("10.5.") && !l.contains("dev cni0"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The routes upstream's ipip backend installs on host `h`: every other host's subnet through
/// `flannel.ipip` to its public IP, onlink, or with DirectRouting on the external interface for
/// the hosts of `direct`.
fn expected_routes(lab: &Lab, h: usize, direct: &[usize]) -> BTreeSet<String> {
    (0..lab.hosts.len())
        .filter(|p| *p != h)
        .map(|p| {
            let (subnet, via) = (lab.subnet_of(p), lab.hosts[p].addr);
            if direct.contains(&p) {
                format!("{subnet} via {via} dev eth0")
            } else {
                format!("{subnet} via {via} dev flannel.ipip onlink")
            }
        })
        .collect()
}

fn link(lab: &Lab, h: usize) -> String {
    lab.hosts[h]
        .ns
        .exec(&["ip", "-d", "link", "show", "flannel.ipip"])
        .unwrap_or_default()
}

fn main() {
    assert_eq!(
        std::env::var(flannel_tests::vm::IN_VM_ENV).as_deref(),
        Ok("1"),
        "vm-ipip-lab runs inside the test VM: run the test ipip_backend_in_a_vm"
    );
    let started = Instant::now();
    let step = |what: &str| println!("[{:>6.1?}] {what}", started.elapsed());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    step(&format!("kernel {}", kernel.trim()));

    let config = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"ipip"}}"#;
    let mut lab = Lab::for_test("vm-ipip-lab", vec![2, 1], config, &[]).expect("the lab");
    // Host 1 has a flannel.ipip from an older configuration (another local address): made again.
    lab.hosts[0].sh("ip link add flannel.ipip type ipip local 192.0.2.1");
    lab.start_all();
    step("flanneld runs on the 3 hosts");
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    let failures = lab.ping_all(Duration::from_secs(60));
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    step("pods ping across hosts, across the router too");

    for h in 0..3 {
        let l = link(&lab, h);
        let want = format!("remote any local {} ", lab.hosts[h].addr);
        assert!(l.contains("ipip") && l.contains(&want), "host {h}: {l}");
        assert!(
            l.contains("mtu 1480 ") && l.contains(",UP,"),
            "host {h}: {l}"
        );
        let env = lab.hosts[h].subnet_env().unwrap();
        assert_eq!(env["FLANNEL_MTU"], "1480", "host {h}");
        let addrs = lab.hosts[h].sh("ip -o -4 addr show dev flannel.ipip");
        let own = lab.subnet_of(h);
        let own_addr = format!("{}/32", own.split('/').next().unwrap());
        assert!(
            addrs.contains(&own_addr) && addrs.lines().count() == 1,
            "host {h}: {addrs}"
        );
        assert_eq!(
            lab.lease_of(h),
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"ipip"}}"#,
                lab.hosts[h].addr
            ),
            "host {h}'s lease"
        );
        let (have, want) = (flannel_routes(&lab, h), expected_routes(&lab, h, &[]));
        assert!(have == want, "host {h}: {have:?}, want {want:?}");
    }
    assert!(
        lab.hosts[0].log_text().contains("making it again"),
        "{}",
        lab.hosts[0].log_text()
    );
    step(
        "flannel.ipip (local = the host's address, MTU 1480, the subnet's /32), upstream's lease and routes; an old device made again",
    );

    // On the wire: IP-in-IP between the hosts' addresses, no pod packet bare.
    let mut failures = Vec::new();
    let lines = lab.capture_underlay(0, || failures = lab.ping_all(Duration::from_secs(10)));
    assert!(failures.is_empty(), "{failures:?}");
    let ipip: Vec<&String> = lines.iter().filter(|l| l.contains("10.5.")).collect();
    assert!(!ipip.is_empty(), "no pod traffic seen: {lines:?}");
    let hosts: Vec<String> = lab.hosts.iter().map(|h| h.addr.to_string()).collect();
    for l in &ipip {
        // `<time> IP <outer src> > <outer dst>: IP 10.5.x.y > 10.5.z.w: ICMP ...`
        let outer: Vec<&str> = l.split_whitespace().skip(1).take(5).collect();
        let ends = (
            outer.get(1).copied().unwrap_or(""),
            outer.get(3).map(|d| d.trim_end_matches(':')).unwrap_or(""),
        );
        assert!(
            outer.first() == Some(&"IP")
                && outer.get(4) == Some(&"IP")
                && hosts.iter().any(|a| a == ends.0)
                && hosts.iter().any(|a| a == ends.1)
                && (ends.0 == hosts[0] || ends.1 == hosts[0]),
            "a pod packet not inside an outer header between the hosts: {l}"
        );
    }
    step("the underlay carries the pods' packets inside IP-in-IP between the hosts' addresses");

    // Someone deletes a route: back at once (a netlink notification).
    let victim = lab.subnet_of(2);
    lab.hosts[0].sh(&format!("ip route del {victim}"));
    let back = until(Duration::from_secs(30), || {
        flannel_routes(&lab, 0) == expected_routes(&lab, 0, &[])
    });
    assert!(back, "route not repaired: {:?}", flannel_routes(&lab, 0));
    step("a deleted route is put back");

    // Someone deletes the device: made again with its address and routes.
    lab.hosts[1].sh("ip link del flannel.ipip");
    let back = until(Duration::from_secs(60), || {
        link(&lab, 1).contains(",UP,") && flannel_routes(&lab, 1) == expected_routes(&lab, 1, &[])
    });
    assert!(back, "flannel.ipip not back:\n{}", lab.hosts[1].log_text());
    let failures = lab.ping_all(Duration::from_secs(60));
    assert!(
        failures.is_empty(),
        "after deleting the device: {failures:?}"
    );
    step("a deleted device is made again");

    // A lease of another backend type gets no route; a departed peer's route goes.
    lab.etcd_put(
        "/coreos.com/network/subnets/10.5.200.0-24",
        r#"{"PublicIP":"172.20.0.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#,
    );
    lab.etcd_put(
        "/coreos.com/network/subnets/10.5.201.0-24",
        r#"{"PublicIP":"172.20.0.98","PublicIPv6":null,"BackendType":"ipip"}"#,
    );
    let added = until(Duration::from_secs(30), || {
        flannel_routes(&lab, 0).contains("10.5.201.0/24 via 172.20.0.98 dev flannel.ipip onlink")
    });
    assert!(added, "{:?}", flannel_routes(&lab, 0));
    assert!(
        !flannel_routes(&lab, 0)
            .iter()
            .any(|r| r.starts_with("10.5.200.")),
        "{:?}",
        flannel_routes(&lab, 0)
    );
    lab.etcd_delete("/coreos.com/network/subnets/10.5.201.0-24");
    let gone = until(Duration::from_secs(30), || {
        !flannel_routes(&lab, 0)
            .iter()
            .any(|r| r.starts_with("10.5.201."))
    });
    assert!(gone, "{:?}", flannel_routes(&lab, 0));
    lab.etcd_delete("/coreos.com/network/subnets/10.5.200.0-24");
    step("a vxlan lease is ignored; a departed ipip peer's route goes");

    // flanneld stops: the device and routes carry on; a new flanneld takes the device over.
    let _ = lab.stop_flanneld(0);
    assert!(
        lab.ping((0, 0), lab.hosts[2].pods[0].ip, Duration::from_secs(10)),
        "no traffic while flanneld is stopped"
    );
    let index_before = lab.hosts[0].sh("cat /sys/class/net/flannel.ipip/ifindex");
    lab.start_flanneld(0);
    let failures = lab.ping_all(Duration::from_secs(60));
    assert!(failures.is_empty(), "after the restart: {failures:?}");
    assert_eq!(
        lab.hosts[0].sh("cat /sys/class/net/flannel.ipip/ifindex"),
        index_before,
        "the device was taken over, not made again"
    );
    step("traffic goes on while flanneld is stopped; the restart takes the device over");
    drop(lab);

    // DirectRouting: hosts 1 and 2 share a segment and route to each other without the tunnel;
    // host 3, behind the router, only through it.
    let config = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"ipip","DirectRouting":true}}"#;
    let mut lab = Lab::for_test("vm-ipip-direct", vec![2, 1], config, &[]).expect("the lab");
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    let failures = lab.ping_all(Duration::from_secs(60));
    assert!(failures.is_empty(), "DirectRouting: {failures:?}");
    for (h, direct) in [(0, vec![1]), (1, vec![0]), (2, vec![])] {
        let (have, want) = (flannel_routes(&lab, h), expected_routes(&lab, h, &direct));
        assert!(have == want, "host {h}: {have:?}, want {want:?}");
    }
    step(
        "DirectRouting: hosts on one segment route directly, the host behind the router through flannel.ipip",
    );
    drop(lab);

    // Kubernetes mode (the stand-in API server): the Node objects carry upstream's annotations for
    // ipip, and pods ping through flannel.ipip.
    let spec = flannel_tests::lab::LabSpec {
        segments: vec![2],
        config: r#"{"Network":"10.5.0.0/16","Backend":{"Type":"ipip"}}"#.into(),
        flanneld_args: vec![],
    };
    let mut lab = Lab::new_kube(&spec, flannel_tests::bin_path("flanneld"));
    lab.start_all();
    for i in 0..2 {
        lab.add_pods(i, 1);
    }
    let failures = lab.ping_all(Duration::from_secs(60));
    assert!(failures.is_empty(), "Kubernetes mode: {failures:?}");
    for h in 0..2 {
        let node = lab.assert_dataless_node_annotations(h, "ipip");
        let other = node["spec"]["podCIDR"].as_str().unwrap().to_string();
        let routes = lab.hosts[1 - h].routes("");
        assert!(
            routes.contains(&format!(
                "{other} via {} dev flannel.ipip onlink",
                lab.hosts[h].addr
            )),
            "host {}: {routes}",
            1 - h
        );
    }
    step(
        "Kubernetes mode: upstream's annotations (backend-type ipip, backend-data null), pods ping through flannel.ipip",
    );
    drop(lab);

    // The README's demo with --backend ipip, as a user on a kernel with ipip runs it.
    let (code, text) = flannel_tests::run_demo(&["--hosts", "2", "--backend", "ipip"]);
    assert_eq!(code, Some(0), "flannel-demo --backend ipip:\n{text}");
    assert!(
        text.contains(" 0 failed")
            && text.contains("host2 pod: answered")
            && text.contains("dev flannel.ipip"),
        "{text}"
    );
    step("the demo runs with --backend ipip");
    println!("vm-ipip-lab: all checks passed");
}
