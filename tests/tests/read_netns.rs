//! Reading the kernel's tables against the real kernel, inside a network namespace: flanneld reads
//! exactly its own entries (main-table routes into the network on its devices, permanent neighbours
//! and FDB entries of its devices), whatever else the host has, and a table far larger than one
//! netlink datagram is read whole.

#![allow(clippy::unwrap_used)]

use std::io::Write;

use flannel_dataplane::netlink::Netlink;
use flannel_dataplane::{Fdb, KernelOps, MacAddr, Neigh, Ownership, Route};
use flannel_tests::netns::Netns;
use flannel_tests::require_root;

fn index(ns: &Netns, dev: &str) -> u32 {
    ns.exec(&["ip", "-o", "link", "show", dev])
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn read_takes_only_flannels_entries_and_reads_big_tables_whole() {
    if !require_root("read_takes_only_flannels_entries") {
        return;
    }
    const ROUTES: u32 = 3000;
    let ns = Netns::new("rd");
    let mut batch = tempfile::NamedTempFile::new().unwrap();
    for i in 0..ROUTES {
        // 10.6.0.0/16 and up: /24s on flannel's device.
        writeln!(
            batch,
            "route add 10.{}.{}.0/24 dev fltrd.1",
            6 + i / 256,
            i % 256
        )
        .unwrap();
    }
    batch.flush().unwrap();
    let batch_path = batch.path().to_str().unwrap().to_string();
    for cmd in [
        "ip link add fltrd0 type veth peer name fltrd1",
        "ip link set fltrd0 up",
        "ip link set fltrd1 up",
        "ip addr add 192.168.61.1/24 dev fltrd0",
        "ip link add fltrd.1 type vxlan id 1 local 192.168.61.1 dev fltrd0 dstport 8472 nolearning",
        "ip link add fltrd.2 type vxlan id 2 local 192.168.61.1 dev fltrd0 dstport 8473 nolearning",
        "ip link set fltrd.1 up",
        "ip link set fltrd.2 up",
        // Flannel's: a permanent neighbour and an FDB entry on fltrd.1.
        "ip neigh add 10.5.2.0 lladdr 02:00:00:00:00:02 dev fltrd.1 nud permanent",
        "bridge fdb add 02:00:00:00:00:02 dev fltrd.1 dst 192.168.61.2 self permanent",
        // Not flannel's: another device's neighbour and FDB entry, a neighbour that is not
        // permanent, a route into the network in another table, a route outside the network.
        "ip neigh add 192.168.61.9 lladdr 02:00:00:00:00:09 dev fltrd0 nud permanent",
        "bridge fdb add 02:00:00:00:00:03 dev fltrd.2 dst 192.168.61.3 self permanent",
        "ip neigh add 10.5.4.0 lladdr 02:00:00:00:00:04 dev fltrd.1 nud reachable",
        "ip route add 10.5.7.0/24 dev fltrd.1 table 100",
        "ip route add 172.31.0.0/24 dev fltrd.1",
    ] {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        ns.exec(&args).unwrap();
    }
    ns.exec(&["ip", "-batch", &batch_path]).unwrap();
    let vx = index(&ns, "fltrd.1");
    let read = ns.run(move || {
        Box::pin(async move {
            let own = Ownership {
                networks: vec!["10.0.0.0/8".parse().unwrap()],
                route_oifs: vec![vx],
                neigh_ifindexes: vec![vx],
                fdb_ifindexes: vec![vx],
                ..Default::default()
            };
            let nl = Netlink::new().unwrap();
            let first = nl.read(&own).await.unwrap();
            // Twice on the same connection: the second dump is not confused by the first.
            let second = nl.read(&own).await.unwrap();
            assert_eq!(first, second);
            first
        })
    });
    assert_eq!(read.routes.len(), ROUTES as usize, "every route, none else");
    assert!(
        read.routes
            .iter()
            .all(|r| r.oif == vx && r.gateway.is_none())
    );
    assert!(read.routes.contains(&Route {
        dst: "10.17.183.0/24".parse().unwrap(),
        gateway: None,
        oif: vx,
        onlink: false,
    }));
    assert!(
        !read
            .routes
            .iter()
            .any(|r| r.dst == "10.5.7.0/24".parse().unwrap()),
        "a route of another table is not read"
    );
    let neighs: Vec<&Neigh> = read.neighs.iter().collect();
    assert_eq!(
        neighs,
        [&Neigh {
            ifindex: vx,
            ip: "10.5.2.0".parse().unwrap(),
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
        }]
    );
    let fdb: Vec<&Fdb> = read.fdb.iter().collect();
    assert_eq!(
        fdb,
        [&Fdb {
            ifindex: vx,
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
            dst: "192.168.61.2".parse().unwrap(),
        }]
    );
}
