//! `--ip-masq` and the forward rules in the lab: exact rules, masquerade only for traffic leaving the
//! cluster network, resync of deleted rules, stale rules of an old subnet removed at start; and the
//! blackhole route of `--ip-blackhole-route`, kept on the same resync.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use flannel_tests::lab::{Lab, segment_gateway};
use flannel_tests::netns::in_netns;
use flannel_tests::until;

fn lab(test: &str, args: &[&str]) -> Option<Lab> {
    lab_with(
        test,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
        args,
    )
}

fn lab_with(test: &str, config: &str, args: &[&str]) -> Option<Lab> {
    Lab::for_test(test, vec![2], config, args)
}

fn expected_nat(lab: &Lab, h: usize) -> Vec<String> {
    let env = lab.hosts[h].subnet_env().unwrap();
    let sn: ipnet::Ipv4Net = env["FLANNEL_SUBNET"]
        .parse::<ipnet::Ipv4Net>()
        .unwrap()
        .trunc();
    let c = r#"-m comment --comment "flanneld masq""#;
    let n = "10.5.0.0/16";
    vec![
        "-N FLANNEL-POSTRTG".to_string(),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {sn} -d {n} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {n} -d {sn} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {n} -d {sn} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {n} ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"),
        format!("-A FLANNEL-POSTRTG ! -s {n} -d {n} {c} -j MASQUERADE --random-fully"),
    ]
}

fn listing(lab: &Lab, h: usize, table: &str, chain: &str) -> Vec<String> {
    lab.hosts[h]
        .ns
        .exec(&["iptables", "-w", "-t", table, "-S", chain])
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Sends one UDP datagram from pod `from` to pod `to` and returns the source address `to` saw.
fn udp_source(lab: &Lab, from: (usize, usize), to: (usize, usize)) -> Option<Ipv4Addr> {
    let to_ns = lab.hosts[to.0].pods[to.1].ns.name().to_string();
    let from_ns = lab.hosts[from.0].pods[from.1].ns.name().to_string();
    let to_ip = lab.hosts[to.0].pods[to.1].ip;
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        in_netns(Some(&to_ns), move || {
            let sock = UdpSocket::bind("0.0.0.0:9999").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 16];
            sock.recv_from(&mut buf).ok().map(|(_, a)| a.ip())
        })
    });
    rx.recv().unwrap();
    in_netns(Some(&from_ns), move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.send_to(b"who am i", (to_ip, 9999)).unwrap();
    });
    match receiver.join().unwrap() {
        Some(std::net::IpAddr::V4(a)) => Some(a),
        _ => None,
    }
}

/// Appends (another) jump into FLANNEL-POSTRTG to host `h`'s POSTROUTING, as a leftover would be.
fn add_masq_jump(h: &flannel_tests::lab::Host) {
    h.ns.exec(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "FLANNEL-POSTRTG",
    ])
    .unwrap();
}

#[test]
fn masquerade_only_leaving_the_cluster_and_rules_are_kept() {
    let Some(mut lab) = lab("masquerade", &["--ip-masq", "--iptables-resync=1"]) else {
        return;
    };
    // A stale chain from an earlier run with another subnet, and a duplicate jump: both fixed at start.
    let h0 = &lab.hosts[0];
    h0.sh("iptables -w -t nat -N FLANNEL-POSTRTG");
    h0.ns
        .exec(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "FLANNEL-POSTRTG",
            "-s",
            "10.5.200.0/24",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "RETURN",
        ])
        .unwrap();
    for _ in 0..2 {
        add_masq_jump(h0);
    }
    lab.start_all();
    lab.add_pods(0, 1);
    lab.add_pods(1, 1);
    for h in 0..2 {
        assert_eq!(lab.hosts[h].subnet_env().unwrap()["FLANNEL_IPMASQ"], "true");
        assert_eq!(
            listing(&lab, h, "nat", "FLANNEL-POSTRTG"),
            expected_nat(&lab, h),
            "host {h}"
        );
        let post = listing(&lab, h, "nat", "POSTROUTING");
        let jump = r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#;
        assert_eq!(post.iter().filter(|l| *l == jump).count(), 1, "{post:?}");
        assert_eq!(
            listing(&lab, h, "filter", "FLANNEL-FWD"),
            vec![
                "-N FLANNEL-FWD".to_string(),
                r#"-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#.into(),
                r#"-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#.into(),
            ]
        );
        assert!(
            listing(&lab, h, "filter", "FORWARD").iter().any(
                |l| l == r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#
            )
        );
    }
    // Leaving the cluster network: the switch (no route back to pods) answers only thanks to masquerade.
    let outside = segment_gateway(0);
    assert!(
        lab.ping((0, 0), outside, Duration::from_secs(2)),
        "pod cannot reach {outside} through masquerade"
    );
    // Pod to pod: the source address is kept.
    let src = udp_source(&lab, (0, 0), (1, 0));
    assert_eq!(
        src,
        Some(lab.hosts[0].pods[0].ip),
        "pod-to-pod traffic must not be masqueraded"
    );

    // Deleted rules, a flushed chain and a deleted jump come back within the resync period.
    let want = expected_nat(&lab, 0);
    for cmd in [
        "iptables -w -t nat -D FLANNEL-POSTRTG 3",
        "iptables -w -t nat -F FLANNEL-POSTRTG",
        "iptables -w -t filter -F FLANNEL-FWD",
    ] {
        lab.hosts[0].sh(cmd);
        assert!(
            until(Duration::from_secs(5), || listing(
                &lab,
                0,
                "nat",
                "FLANNEL-POSTRTG"
            ) == want
                && listing(&lab, 0, "filter", "FLANNEL-FWD").len() == 3),
            "{cmd}: not restored"
        );
    }
    lab.hosts[0]
        .ns
        .exec(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ])
        .unwrap();
    assert!(
        until(Duration::from_secs(5), || lab.ping(
            (0, 0),
            outside,
            Duration::from_secs(1)
        )),
        "jump not restored"
    );
}

#[test]
fn without_ip_masq_pods_cannot_leave_the_cluster() {
    let Some(mut lab) = lab("without_ip_masq", &[]) else {
        return;
    };
    lab.start_all();
    lab.add_pods(0, 1);
    lab.add_pods(1, 1);
    assert_eq!(
        lab.hosts[0].subnet_env().unwrap()["FLANNEL_IPMASQ"],
        "false"
    );
    assert!(
        listing(&lab, 0, "nat", "FLANNEL-POSTRTG").is_empty(),
        "no masquerade chain without --ip-masq"
    );
    assert_eq!(
        listing(&lab, 0, "filter", "FLANNEL-FWD").len(),
        3,
        "forward rules are on by default"
    );
    assert!(
        !lab.ping((0, 0), segment_gateway(0), Duration::from_secs(2)),
        "reached the outside without masquerade?"
    );
    assert!(lab.ping((0, 0), lab.hosts[1].pods[0].ip, Duration::from_secs(2)));
}

#[test]
fn nftables_mode() {
    let config = r#"{"Network":"10.5.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;
    let Some(mut lab) = lab_with(
        "nftables_mode",
        config,
        &["--ip-masq", "--iptables-resync=1"],
    ) else {
        return;
    };
    // Leftovers of iptables mode are removed when switching to nftables.
    let h0 = &lab.hosts[0];
    h0.sh("iptables -w -t nat -N FLANNEL-POSTRTG");
    add_masq_jump(h0);
    lab.start_all();
    lab.add_pods(0, 1);
    lab.add_pods(1, 1);
    let env = lab.hosts[0].subnet_env().unwrap();
    let sn: ipnet::Ipv4Net = env["FLANNEL_SUBNET"]
        .parse::<ipnet::Ipv4Net>()
        .unwrap()
        .trunc();
    let want =
        flanneld::nftables::nft_rules("10.5.0.0/16".parse().unwrap(), sn.into(), true, true, true);
    let table = || {
        lab.hosts[0]
            .ns
            .exec(&["nft", "list", "table", "ip", "flannel-ipv4"])
            .unwrap_or_default()
    };
    assert!(flanneld::nftables::in_sync(&want, &table()), "{}", table());
    assert!(
        listing(&lab, 0, "nat", "FLANNEL-POSTRTG").is_empty(),
        "iptables leftovers removed"
    );
    assert!(
        !listing(&lab, 0, "nat", "POSTROUTING")
            .iter()
            .any(|l| l.contains("FLANNEL-POSTRTG"))
    );
    assert!(
        lab.ping((0, 0), segment_gateway(0), Duration::from_secs(2)),
        "masquerade through nftables"
    );
    assert_eq!(
        udp_source(&lab, (0, 0), (1, 0)),
        Some(lab.hosts[0].pods[0].ip),
        "pod-to-pod not masqueraded"
    );
    lab.hosts[0].sh("nft flush chain ip flannel-ipv4 postrtg");
    assert!(
        until(Duration::from_secs(5), || flanneld::nftables::in_sync(
            &want,
            &table()
        )),
        "not restored: {}",
        table()
    );
    lab.hosts[0].sh("nft delete table ip flannel-ipv4");
    assert!(
        until(Duration::from_secs(5), || flanneld::nftables::in_sync(
            &want,
            &table()
        )),
        "table not restored"
    );
}

#[test]
fn the_blackhole_route_for_the_own_subnet_is_kept() {
    let Some(mut lab) = lab(
        "blackhole",
        &["--ip-blackhole-route", "--iptables-resync=1"],
    ) else {
        return;
    };
    lab.start_all();
    let h = &lab.hosts[0];
    let subnet: ipnet::Ipv4Net = h.subnet_env().unwrap()["FLANNEL_SUBNET"]
        .parse::<ipnet::Ipv4Net>()
        .unwrap()
        .trunc();
    let blackholes = || h.sh("ip route show type blackhole");
    assert!(
        until(Duration::from_secs(10), || blackholes()
            .contains(&subnet.to_string())),
        "no blackhole route for {subnet}: {}\n{}",
        blackholes(),
        h.log_text()
    );
    // Traffic to an address of the subnet that no pod holds is dropped here instead of following
    // the default route: the kernel answers a lookup of it with the blackhole's EINVAL.
    let addr = std::net::Ipv4Addr::from(u32::from(subnet.addr()) + 77).to_string();
    let get = h.ns.exec(&["ip", "route", "get", &addr]);
    assert!(
        get.as_ref().is_err_and(|e| e.contains("Invalid argument")),
        "{get:?}"
    );
    // Deleted, it comes back within the resync period; there is never more than one.
    h.sh(&format!("ip route del blackhole {subnet}"));
    assert!(
        until(Duration::from_secs(10), || blackholes()
            .contains(&subnet.to_string())),
        "the blackhole route did not come back:\n{}",
        h.log_text()
    );
    assert_eq!(blackholes().lines().count(), 1, "{}", blackholes());
    assert_eq!(
        h.log_text()
            .matches("added the blackhole route for the own subnet")
            .count(),
        2,
        "{}",
        h.log_text()
    );
    // The other host keeps its own.
    assert!(
        lab.hosts[1]
            .sh("ip route show type blackhole")
            .contains("/24")
    );
}
