//! Hostile leases in the lab: keys anyone who can write etcd could write. A lease for a piece of the
//! underlay (inside a too-wide Network), one outside the Network and one for half the internet are
//! refused on every host with one log line each and a counter, never installed, and never retried:
//! the hosts keep talking to each other and to etcd, and a resync later nothing was changed or
//! logged again. A lease naming a host's own public IP is refused on that host.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flannel_tests::lab::{Lab, LabSpec};
use flannel_tests::{bin_path, require_etcd, require_root};

#[test]
fn hostile_leases_are_refused_once_and_the_cluster_keeps_working() {
    if !require_root("hostile_leases") || !require_etcd("hostile_leases") {
        return;
    }
    // The Network contains the underlay (172.20.0.0/16); the hosts' own subnets come from
    // 172.16.x.0/24 (SubnetMin/SubnetMax), as a careless but working config could have it.
    let mut lab = Lab::new(
        &LabSpec {
            segments: vec![3],
            config: r#"{"Network":"172.16.0.0/12","SubnetMin":"172.16.1.0","SubnetMax":"172.16.250.0","Backend":{"Type":"vxlan"}}"#.into(),
            flanneld_args: vec![
                "--iptables-forward-rules=false".into(),
                "--healthz-port=8081".into(),
                "--healthz-ip=127.0.0.1".into(),
            ],
        },
        bin_path("flanneld"),
    );
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    let data = r#""BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}"#;
    let hostile = [
        ("172.20.0.0-24", "overlaps 172.20.0.0/16"),
        ("10.99.0.0-16", "outside the cluster network"),
        ("0.0.0.0-1", "outside the cluster network"),
    ];
    for (key, _) in hostile {
        lab.etcd_put(
            &format!("/coreos.com/network/subnets/{key}"),
            &format!(r#"{{"PublicIP":"172.20.0.99","PublicIPv6":null,{data}}}"#),
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let changes_before: Vec<usize> = lab
        .hosts
        .iter()
        .map(|h| {
            h.log_text()
                .matches("data plane repaired or updated")
                .count()
        })
        .collect();
    // Nothing installed, the cluster still works, etcd still reachable (a new key arrives).
    for h in &lab.hosts {
        let routes = h.routes("");
        assert!(
            !routes.contains("172.20.0.0/24")
                && !routes.contains("10.99.0.0/16")
                && !routes.contains("0.0.0.0/1"),
            "{}: {routes}",
            h.ns.name()
        );
    }
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    for (i, _) in lab.hosts.iter().enumerate() {
        assert_eq!(
            lab.metric(i, 8081, "flannel_leases_refused_total"),
            Some(3.0),
            "host {i}"
        );
    }
    // A full pass later (a link added and removed is news that makes flanneld read the kernel again,
    // as the periodic resync does): no refusal logged again, no change made again.
    for (i, h) in lab.hosts.iter().enumerate() {
        let reads = || {
            lab.metric(i, 8081, "flannel_kernel_reads_total")
                .unwrap_or(0.0)
        };
        let before = reads();
        h.sh("ip link add fltpoke0 type veth peer name fltpoke1");
        h.sh("ip link del fltpoke0");
        assert!(
            flannel_tests::until(Duration::from_secs(10), || reads() > before),
            "{}: no full pass after a link change",
            h.ns.name()
        );
    }
    for (i, h) in lab.hosts.iter().enumerate() {
        let log = h.log_text();
        for (key, why) in hostile {
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(&format!("refusing lease {key}")))
                .collect();
            assert_eq!(
                lines.len(),
                1,
                "{}: one line for {key}:\n{log}",
                h.ns.name()
            );
            assert!(lines[0].contains(why), "{}", lines[0]);
        }
        assert_eq!(
            log.matches("data plane repaired or updated").count(),
            changes_before[i],
            "{}: changes made again at a resync:\n{log}",
            h.ns.name()
        );
    }
    assert_eq!(
        lab.metric(0, 8081, "flannel_leases_refused_total"),
        Some(3.0)
    );
    // The store is reachable: deleting the keys works and a good peer still arrives.
    for (key, _) in hostile {
        lab.etcd_delete(&format!("/coreos.com/network/subnets/{key}"));
    }
    lab.etcd_put(
        "/coreos.com/network/subnets/172.16.251.0-24",
        &format!(r#"{{"PublicIP":"172.20.0.98","PublicIPv6":null,{data}}}"#),
    );
    let ok = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        lab.hosts[0].routes("").contains("172.16.251.0/24")
    });
    assert!(ok, "{}", lab.hosts[0].routes(""));
}

/// A lease naming a host's own public IP (another host behind the same NAT address, or a forged
/// key): that host refuses it, since the vxlan entries would send the subnet's traffic back to
/// itself; the others install it as any peer.
#[test]
fn a_lease_naming_a_hosts_own_public_ip_is_refused_there() {
    let test = "a_lease_naming_a_hosts_own_public_ip_is_refused_there";
    let Some(mut lab) = Lab::for_test(
        test,
        vec![2],
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#,
        &[],
    ) else {
        return;
    };
    lab.start_all();
    for i in 0..2 {
        lab.add_pods(i, 1);
    }
    let me = lab.hosts[0].addr;
    lab.etcd_put(
        "/coreos.com/network/subnets/10.5.77.0-24",
        &format!(
            r#"{{"PublicIP":"{me}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:77"}}}}"#
        ),
    );
    assert!(
        flannel_tests::until(Duration::from_secs(10), || lab.hosts[1]
            .routes("")
            .contains("10.5.77.0/24 via 10.5.77.0 dev flannel.1 onlink")),
        "host 2 did not install the lease:\n{}",
        lab.hosts[1].routes("")
    );
    assert!(
        flannel_tests::until(Duration::from_secs(10), || lab.hosts[0]
            .log_text()
            .contains("refusing lease 10.5.77.0-24")),
        "{}",
        lab.hosts[0].log_text()
    );
    let log = lab.hosts[0].log_text();
    assert!(
        log.contains(&format!("{me} is this host's own public IP")),
        "{log}"
    );
    assert!(!lab.hosts[0].routes("").contains("10.5.77.0/24"));
    let fdb = lab.hosts[0].sh("bridge fdb show dev flannel.1");
    assert!(!fdb.contains("0e:00:00:00:00:77"), "{fdb}");
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
}
