//! Routes through next-hop objects against the real kernel, inside a network namespace: what `ip`
//! shows, what flanneld reads back, objects made, shared, replaced and deleted with their routes,
//! adopted after a restart, left-over ones removed, and the plain routes of a kernel without them.

#![allow(clippy::unwrap_used)]

use flannel_dataplane::netlink::Netlink;
use flannel_dataplane::nexthop::{FIRST_ID, LAST_ID};
use flannel_dataplane::{KernelOps, KernelState, Op, Ownership, Route, apply_diff};
use flannel_tests::netns::Netns;
use flannel_tests::require_root;

fn ip(args: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ids of the next-hop objects in flanneld's range.
fn objects() -> Vec<u32> {
    ip("nexthop show")
        .lines()
        .filter_map(|l| {
            l.strip_prefix("id ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .filter(|id| (FIRST_ID..=LAST_ID).contains(id))
        .collect()
}

/// The next-hop object id route `dst` goes through, as `ip route` shows it.
fn object_of(dst: &str) -> String {
    ip(&format!("route show {dst}"))
        .split_whitespace()
        .skip_while(|w| *w != "nhid")
        .nth(1)
        .unwrap()
        .to_string()
}

/// A namespace with a veth pair `<link>0`/`<link>1`, both up, `addr` on `<link>0`, and no IPv6
/// (its link-local addresses would come, and be announced, during a test).
fn veth_lab(tag: &str, link: &str, addr: &str) -> Netns {
    let ns = Netns::new(tag);
    for cmd in [
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=1".to_string(),
        "sysctl -qw net.ipv6.conf.default.disable_ipv6=1".to_string(),
        format!("ip link add {link}0 type veth peer name {link}1"),
        format!("ip link set {link}0 up"),
        format!("ip link set {link}1 up"),
        format!("ip addr add {addr} dev {link}0"),
    ] {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        ns.exec(&args).unwrap();
    }
    ns
}

/// The index of `dev` (in the current namespace) and flanneld's ownership of routes with a gateway
/// on it into 10.5.0.0/16.
fn device_and_ownership(dev: &str) -> (u32, Ownership) {
    let oif = ip(&format!("-o link show {dev}"))
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    let own = Ownership {
        networks: vec!["10.5.0.0/16".parse().unwrap()],
        gateway_route_oifs: vec![oif],
        ..Default::default()
    };
    (oif, own)
}

fn route(dst: &str, gw: &str, oif: u32, onlink: bool) -> Route {
    Route {
        dst: dst.parse().unwrap(),
        gateway: Some(gw.parse().unwrap()),
        oif,
        onlink,
    }
}

#[test]
fn routes_through_next_hop_objects() {
    if !require_root("routes_through_next_hop_objects") {
        return;
    }
    let ns = veth_lab("nh", "fltnh", "192.168.60.1/24");
    ns.run(|| {
        Box::pin(async {
            let (oif, own) = device_and_ownership("fltnh0");
            let nl = Netlink::new().unwrap();
            // vxlan's shape (onlink) and host-gw's (a gateway on the device's network).
            let mut desired = KernelState::default();
            desired
                .routes
                .insert(route("10.5.2.0/24", "10.5.2.0", oif, true));
            desired
                .routes
                .insert(route("10.5.3.0/24", "192.168.60.3", oif, false));
            let mut known = nl.read(&own).await.unwrap();
            let report = apply_diff(&nl, &desired, &own, &mut known).await;
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            let shown = ip("route show 10.5.2.0/24");
            assert!(
                shown.contains("nhid")
                    && shown.contains("via 10.5.2.0")
                    && shown.contains("onlink"),
                "{shown}"
            );
            assert!(ip("route show 10.5.3.0/24").contains("via 192.168.60.3"));
            assert_eq!(objects().len(), 2, "one object per next hop");
            // What flanneld reads back is what it wanted: a second pass changes nothing.
            let mut read = nl.read(&own).await.unwrap();
            assert_eq!(read, desired);
            let again = apply_diff(&nl, &desired, &own, &mut read).await;
            assert!(again.applied.is_empty(), "{:?}", again.applied);

            // A new gateway for a route: a new object, the old one goes.
            desired
                .routes
                .remove(&route("10.5.3.0/24", "192.168.60.3", oif, false));
            desired
                .routes
                .insert(route("10.5.3.0/24", "192.168.60.4", oif, false));
            let before = objects();
            let report = apply_diff(&nl, &desired, &own, &mut read).await;
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            assert!(ip("route show 10.5.3.0/24").contains("via 192.168.60.4"));
            let after = objects();
            assert_eq!(after.len(), 2);
            assert_ne!(before, after);

            // A restart: a new connection adopts the objects; nothing is made again. A left-over
            // object of flanneld's range that no route uses goes at the first read.
            drop(nl);
            ip(&format!(
                "nexthop add id {} via 10.5.9.0 dev fltnh0 onlink",
                FIRST_ID + 4000
            ));
            let nl = Netlink::new().unwrap();
            let mut read = nl.read(&own).await.unwrap();
            assert_eq!(read, desired);
            assert_eq!(objects(), after, "the left-over is gone, the others kept");
            let again = apply_diff(&nl, &desired, &own, &mut read).await;
            assert!(again.applied.is_empty(), "{:?}", again.applied);
            assert_eq!(objects(), after);

            // An object deleted by hand takes its route along; the next pass restores both.
            let id = object_of("10.5.2.0/24");
            ip(&format!("nexthop del id {id}"));
            assert!(ip("route show 10.5.2.0/24").is_empty());
            let mut read = nl.read(&own).await.unwrap();
            let report = apply_diff(&nl, &desired, &own, &mut read).await;
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            assert!(ip("route show 10.5.2.0/24").contains("via 10.5.2.0"));
            assert_eq!(nl.read(&own).await.unwrap(), desired);
            // The same without a read in between: the add finds its object gone (EINVAL), makes
            // it again and installs the route.
            let id = object_of("10.5.2.0/24");
            ip(&format!("nexthop del id {id}"));
            nl.apply(&Op::AddRoute(route("10.5.2.0/24", "10.5.2.0", oif, true)))
                .await
                .unwrap();
            assert!(ip("route show 10.5.2.0/24").contains("via 10.5.2.0"));
            assert_eq!(objects().len(), 2, "{:?}", objects());

            // Removing the routes removes the objects.
            let mut known = nl.read(&own).await.unwrap();
            let report = apply_diff(&nl, &KernelState::default(), &own, &mut known).await;
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            assert!(ip("route show 10.5.0.0/16 root 10.5.0.0/16").is_empty());
            assert!(objects().is_empty(), "{:?}", objects());

            // Without objects (a kernel before 5.3): plain routes with their gateway.
            let plain = Netlink::new().unwrap().without_nexthops();
            plain
                .apply(&Op::AddRoute(route("10.5.2.0/24", "10.5.2.0", oif, true)))
                .await
                .unwrap();
            let shown = ip("route show 10.5.2.0/24");
            assert!(
                !shown.contains("nhid") && shown.contains("via 10.5.2.0"),
                "{shown}"
            );
            // ... which a connection with objects takes over, and deletes, as any route.
            let mut known = nl.read(&own).await.unwrap();
            apply_diff(&nl, &KernelState::default(), &own, &mut known).await;
            assert!(ip("route show 10.5.2.0/24").is_empty());
        })
    });
}

/// A next-hop object deleted by hand takes its IPv4 routes along without a route notification: the
/// subscription reports it (as "read everything"), while flanneld's own deletions are no news.
#[test]
fn an_object_deleted_by_hand_is_news() {
    use flannel_dataplane::changes::KernelChange;
    if !require_root("an_object_deleted_by_hand_is_news") {
        return;
    }
    let ns = veth_lab("nhn", "fltnn", "192.168.61.1/24");
    ns.run(|| {
        Box::pin(async {
            let (oif, own) = device_and_ownership("fltnn0");
            let nl = Netlink::new().unwrap();
            let mut notes = nl.subscribe().unwrap();
            let mut desired = KernelState::default();
            desired
                .routes
                .insert(route("10.5.2.0/24", "10.5.2.0", oif, true));
            let mut known = nl.read(&own).await.unwrap();
            let report = apply_diff(&nl, &desired, &own, &mut known).await;
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            // Time for the kernel's notifications to arrive before looking at what is queued.
            let settle = || tokio::time::sleep(std::time::Duration::from_millis(300));
            settle().await;
            let echoes = notes.drain();
            assert!(
                !echoes.contains(&KernelChange::Other),
                "making an object is no news: {echoes:?}"
            );

            ip(&format!("nexthop del id {}", object_of("10.5.2.0/24")));
            assert!(
                ip("route show 10.5.2.0/24").is_empty(),
                "the route went too"
            );
            let first = tokio::time::timeout(std::time::Duration::from_secs(2), notes.recv())
                .await
                .expect("a notification within 2 s");
            let mut seen = vec![first.unwrap()];
            settle().await;
            seen.extend(notes.drain());
            assert!(seen.contains(&KernelChange::Other), "{seen:?}");

            // Repaired by a read; then flanneld removes the route and its object itself.
            let mut known = nl.read(&own).await.unwrap();
            let report = apply_diff(&nl, &desired, &own, &mut known).await;
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            assert!(ip("route show 10.5.2.0/24").contains("via 10.5.2.0"));
            settle().await;
            notes.drain();
            let report = apply_diff(&nl, &KernelState::default(), &own, &mut known).await;
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            assert!(objects().is_empty(), "{:?}", objects());
            settle().await;
            let own_deletes = notes.drain();
            assert!(
                !own_deletes.contains(&KernelChange::Other),
                "flanneld's own deletion is no news: {own_deletes:?}"
            );
        })
    });
}
