//! The wireguard backend in the multi-host lab, with the devices this machine's kernel allows
//! (userspace WireGuard over TUN where the kernel has no WireGuard): pods on different hosts reach
//! each other through `flannel-wg`, the leases carry upstream's data, the key survives a restart,
//! the device holds pods' packets back (none in clear) while flanneld is down and is taken over
//! at the restart, a deleted device is recreated, a socket error (`ss -K`) does not stop the device, the PSK and
//! keep-alive and listen-port options work, a jumbo-frame underlay carries full-size packets, and `wg show` reads
//! the userspace device. Kernel devices: tests/vm_wireguard.rs.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flannel_tests::lab::Lab;
use flannel_tests::until;

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}"#;

/// A 3-host wireguard lab with flanneld running and two pods per host.
fn lab(test: &str) -> Option<Lab> {
    lab_with(test, CONFIG, 3, 2)
}

/// A lab of `hosts` hosts with the network `config`, flanneld running, and `pods` pods per host.
fn lab_with(test: &str, config: &str, hosts: usize, pods: usize) -> Option<Lab> {
    let mut lab = Lab::for_test(test, vec![hosts], config, &[])?;
    lab.start_all();
    for i in (0..hosts).filter(|_| pods > 0) {
        lab.add_pods(i, pods);
    }
    Some(lab)
}

#[test]
fn pods_ping_over_flannel_wg_with_upstreams_lease_data() {
    let Some(lab) = lab("pods_ping_over_flannel_wg_with_upstreams_lease_data") else {
        return;
    };
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    for h in 0..3 {
        let (lease, public_key) = lab.wireguard_lease(h);
        assert_eq!(lease["BackendType"], "wireguard", "{lease}");
        assert_eq!(
            lease["BackendData"],
            serde_json::json!({"PublicKey": public_key, "Port": 51820}),
            "{lease}"
        );
        let key_file = lab.hosts[h].subnet_file.with_file_name("wgkey");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key_file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let host = &lab.hosts[h];
        let env = host.subnet_env().unwrap();
        assert_eq!(env["FLANNEL_MTU"], "1420", "underlay 1500 - 80");
        let routes = host.routes("");
        assert!(routes.contains("10.5.0.0/16 dev flannel-wg"), "{routes}");
        // The kernel's device where the kernel has WireGuard, else userspace over TUN, said so.
        let link = host.sh("ip -d link show flannel-wg");
        let log = host.log_text();
        if link.contains(" tun ") {
            assert!(log.contains("the kernel has no WireGuard"), "{log}");
            // This kernel's TUN has offloads (the udp backend uses them too).
            assert!(!log.contains("TUN offloads unavailable"), "{log}");
            wg_show_lists_the_leases(&lab, h, &public_key);
        } else {
            assert!(link.contains("wireguard"), "{link}");
            assert!(log.contains("kind=\"kernel WireGuard\""), "{log}");
        }
    }
}

#[test]
fn restart_keeps_the_key_and_a_deleted_device_comes_back() {
    let Some(mut lab) = lab("restart_keeps_the_key_and_a_deleted_device_comes_back") else {
        return;
    };
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    let (before, key_before) = lab.wireguard_lease(0);
    let _ = lab.stop_flanneld(0);
    lab.start_flanneld(0);
    let (after, key_after) = lab.wireguard_lease(0);
    assert_eq!(key_before, key_after, "the key file is kept");
    assert_eq!(before["BackendData"], after["BackendData"]);
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "after the restart: {failures:?}");
    // Someone deletes the device: flanneld makes a new one with the same key and peers.
    lab.hosts[1].sh("ip link del flannel-wg");
    assert!(
        until(Duration::from_secs(10), || lab.hosts[1]
            .routes("")
            .contains("dev flannel-wg")),
        "flannel-wg not back:\n{}",
        lab.hosts[1].log_text()
    );
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(
        failures.is_empty(),
        "after deleting the device: {failures:?}"
    );
}

#[test]
fn a_plain_tun_device_of_the_name_is_taken_over_and_another_link_replaced() {
    // Before flanneld first starts: host 0 has a TUN device flannel-wg made by `ip tuntap`
    // (another program's, or a flanneld's left while the host was down), host 1 a veth of that
    // name. The TUN device is taken over (same link), the veth replaced; pods ping.
    let test = "a_plain_tun_device_of_the_name_is_taken_over_and_another_link_replaced";
    let Some(mut lab) = Lab::for_test(test, vec![2], CONFIG, &[]) else {
        return;
    };
    lab.hosts[0].sh("ip tuntap add flannel-wg mode tun");
    lab.hosts[1].sh("ip link add flannel-wg type veth peer name fltwg-other");
    let tun_before = wg_link_index(&lab, 0);
    lab.start_all();
    for h in 0..2 {
        lab.add_pods(h, 1);
    }
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "{failures:?}");
    let link = lab.hosts[0].sh("ip -d link show flannel-wg");
    if !link.contains(" tun ") {
        return; // a kernel with WireGuard replaces both
    }
    assert_eq!(
        wg_link_index(&lab, 0),
        tun_before,
        "the TUN device was not taken over"
    );
    let link = lab.hosts[1].sh("ip -d link show flannel-wg");
    assert!(link.contains(" tun "), "the veth is still there: {link}");
}

#[test]
fn a_socket_error_does_not_stop_the_device() {
    // `ss -K` aborts the userspace device's UDP sockets: the kernel keeps a socket bound to its
    // port but hands its next read ECONNABORTED. The device reads past it (gotatun's own device
    // stopped receiving at the first error): traffic goes on, and the device is not remade.
    let Some(lab) = lab("a_socket_error_does_not_stop_the_device") else {
        return;
    };
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    if !lab.hosts[1]
        .sh("ip -d link show flannel-wg")
        .contains(" tun ")
    {
        return; // a kernel device has no socket in flanneld
    }
    let killed = lab.hosts[1]
        .ns
        .exec(&["ss", "-K", "-u", "-a", "sport = :51820"])
        .unwrap();
    assert!(killed.contains(":51820"), "nothing aborted: {killed}");
    let failures = lab.ping_all(Duration::from_secs(10));
    let log = lab.hosts[1].log_text();
    assert!(failures.is_empty(), "after ss -K: {failures:?}\n{log}");
    assert!(!log.contains("recreating"), "the device was remade:\n{log}");
}

#[test]
fn persistent_keepalives_flow_on_an_idle_tunnel() {
    // `PersistentKeepaliveInterval: 1`: with no traffic at all (no pods), each host still sends
    // each peer a keep-alive a second (32 bytes on the wire each), as a node behind NAT needs.
    let config = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":1}}"#;
    let test = "persistent_keepalives_flow_on_an_idle_tunnel";
    let Some(lab) = lab_with(test, config, 2, 0) else {
        return;
    };
    // (public key, tx bytes, keep-alive) of host 0's one peer, from `wg show dump`.
    let peer = || {
        let dump = lab.wg(0, &["show", "flannel-wg", "dump"]).ok()?;
        let line = dump.lines().nth(1)?.to_string();
        let f: Vec<&str> = line.split('\t').collect();
        Some((
            f[0].to_string(),
            f[6].parse::<u64>().ok()?,
            f[7].to_string(),
        ))
    };
    assert!(
        until(Duration::from_secs(10), || peer().is_some()),
        "host 0 has no peer"
    );
    let (key, tx0, keepalive) = peer().unwrap();
    assert_eq!(key, lab.wireguard_lease(1).1);
    assert_eq!(keepalive, "1", "the interval as configured");
    assert!(
        until(Duration::from_secs(15), || peer()
            .is_some_and(|(_, tx, _)| tx >= tx0 + 3 * 32)),
        "no keep-alives on the idle tunnel: {:?}",
        peer()
    );
}

#[test]
fn a_listen_port_of_our_choosing_is_advertised_and_used() {
    // `ListenPort: 51900`: the leases advertise it, the devices listen on it, and each peer is
    // reached at its advertised port.
    let config = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","ListenPort":51900}}"#;
    let test = "a_listen_port_of_our_choosing_is_advertised_and_used";
    let Some(lab) = lab_with(test, config, 2, 1) else {
        return;
    };
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    for h in 0..2 {
        let (lease, _) = lab.wireguard_lease(h);
        assert_eq!(lease["BackendData"]["Port"], 51900, "{lease}");
        let dump = lab.wg(h, &["show", "flannel-wg", "dump"]).unwrap();
        let lines: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(lines[0][2], "51900", "{dump}");
        let other = &lab.hosts[1 - h];
        assert_eq!(lines[1][2], format!("{}:51900", other.addr), "{dump}");
    }
}

#[test]
fn the_underlay_carries_only_wireguard_udp() {
    let Some(lab) = lab("the_underlay_carries_only_wireguard_udp") else {
        return;
    };
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    let mut failures = Vec::new();
    let lines = lab.capture_underlay(0, || failures = lab.ping_all(Duration::from_secs(10)));
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        lines.len() >= 8,
        "the pings crossed host 0's underlay: {lines:#?}"
    );
    for line in &lines {
        assert!(
            line.contains(".51820 > ") && line.contains(".51820: UDP"),
            "not WireGuard between the hosts' ports: {line}"
        );
        assert!(!line.contains("10.5."), "pod addresses in clear: {line}");
    }
}

#[test]
fn while_flanneld_is_down_pod_traffic_is_held_back_not_sent_in_clear() {
    // A restart or an upgrade: flanneld stops. The device and the route into the network stay, so
    // the pods' packets for other hosts are dropped there instead of taking the host's default
    // route unencrypted; the next flanneld takes the device over (same link) and traffic resumes.
    let test = "while_flanneld_is_down_pod_traffic_is_held_back_not_sent_in_clear";
    let Some(mut lab) = lab_with(test, CONFIG, 2, 1) else {
        return;
    };
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    let link_before = wg_link_index(&lab, 0);
    let _ = lab.stop_flanneld(0);
    let routes = lab.hosts[0].routes("");
    assert!(
        routes.contains("10.5.0.0/16 dev flannel-wg"),
        "the route into the network went with flanneld:\n{routes}"
    );
    let peer = lab.hosts[1].pods[0].ip;
    let mut answered = true;
    let lines = lab.capture_underlay(0, || {
        answered = lab.ping((0, 0), peer, Duration::from_secs(3));
    });
    assert!(!answered, "a ping crossed with flanneld down");
    for line in &lines {
        assert!(
            !line.contains("10.5."),
            "pod traffic in clear on the underlay while flanneld was down: {line}"
        );
    }
    lab.start_flanneld(0);
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "after the restart: {failures:?}");
    assert_eq!(
        wg_link_index(&lab, 0),
        link_before,
        "the device was made anew, not taken over"
    );
}

#[test]
fn a_jumbo_frame_underlay_carries_full_size_packets() {
    // Underlay MTU 9000: flannel-wg gets 8920, and its full-size packets (larger than the 4 KiB
    // buffers the userspace device once had) must cross whole.
    let test = "a_jumbo_frame_underlay_carries_full_size_packets";
    let Some(mut lab) = Lab::for_test(test, vec![2], CONFIG, &[]) else {
        return;
    };
    for h in &lab.hosts {
        lab.sw
            .exec(&["ip", "link", "set", &format!("h{}", h.n), "mtu", "9000"])
            .unwrap();
        h.ns.exec(&["ip", "link", "set", "eth0", "mtu", "9000"])
            .unwrap();
    }
    lab.start_all();
    for h in 0..2 {
        lab.add_pods(h, 1);
        let env = lab.hosts[h].subnet_env().unwrap();
        assert_eq!(env["FLANNEL_MTU"], "8920", "underlay 9000 - 80");
    }
    let to = lab.hosts[1].pods[0].ip.to_string();
    let from = &lab.hosts[0].pods[0].ns;
    // 8892 bytes of ICMP payload + 28 of headers = 8920, not to be fragmented.
    let big_ping = || {
        from.exec(&["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "8892", &to])
            .is_ok()
    };
    assert!(
        until(Duration::from_secs(10), big_ping),
        "a full-size ping does not cross"
    );
    let bytes = 20 << 20;
    assert_eq!(tcp_transfer(&lab, (0, 0), (1, 0), bytes), bytes);
}

/// `wg show` (Debian's wg, over the userspace device's control socket) on host `h` lists what the
/// leases say: our key and port, the other hosts as peers at their addresses with their subnets,
/// a handshake and traffic with each (the pods have pinged); `wg set` is refused.
fn wg_show_lists_the_leases(lab: &Lab, h: usize, public_key: &str) {
    let dump = lab
        .wg(h, &["show", "flannel-wg", "dump"])
        .unwrap_or_else(|e| panic!("wg show on host {h}: {e}"));
    let mut lines = dump.lines();
    let me: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!((me[1], me[2]), (public_key, "51820"), "{dump}");
    let peers: Vec<Vec<&str>> = lines.map(|l| l.split('\t').collect()).collect();
    assert_eq!(peers.len(), lab.hosts.len() - 1, "{dump}");
    for (o, other) in lab.hosts.iter().enumerate().filter(|(o, _)| *o != h) {
        let (_, key) = lab.wireguard_lease(o);
        let subnet = other.subnet_env().unwrap()["FLANNEL_SUBNET"].clone();
        let p = peers
            .iter()
            .find(|p| p[0] == key)
            .unwrap_or_else(|| panic!("host {o} is no peer: {dump}"));
        assert_eq!(p[2], format!("{}:51820", other.addr), "{dump}");
        let net: ipnet::Ipv4Net = subnet.parse().unwrap();
        assert_eq!(p[3], net.trunc().to_string(), "{dump}");
        let numbers: Vec<u64> = p[4..7].iter().map(|n| n.parse().unwrap()).collect();
        assert!(
            numbers.iter().all(|&n| n > 0),
            "handshake, rx, tx with host {o}: {dump}"
        );
    }
    let refused = lab.wg(h, &["set", "flannel-wg", "listen-port", "1"]);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("Operation not permitted")),
        "{refused:?}"
    );
}

/// Host `h`'s flannel-wg link index (same index: the same link, taken over, not made anew).
fn wg_link_index(lab: &Lab, h: usize) -> String {
    let l = lab.hosts[h].sh("ip -o link show flannel-wg");
    l.split(':').next().unwrap_or_default().to_string()
}

/// Runs `cmd` (a program and its arguments) in host `h`'s namespace; panics with its stderr.
fn run_in(lab: &Lab, h: usize, cmd: &[&str]) -> String {
    lab.hosts[h]
        .ns
        .exec(cmd)
        .unwrap_or_else(|e| panic!("host {h}: {e}"))
}

/// Sends `bytes` over TCP from pod `from` to pod `to` and returns how many arrived.
fn tcp_transfer(lab: &Lab, from: (usize, usize), to: (usize, usize), bytes: usize) -> usize {
    use std::io::{Read, Write};
    let to_ns = lab.hosts[to.0].pods[to.1].ns.name().to_string();
    let from_ns = lab.hosts[from.0].pods[from.1].ns.name().to_string();
    let to_ip = lab.hosts[to.0].pods[to.1].ip;
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        flannel_tests::netns::in_netns(Some(&to_ns), move || {
            let l = std::net::TcpListener::bind("0.0.0.0:5201").unwrap();
            tx.send(()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        })
    });
    rx.recv().unwrap();
    flannel_tests::netns::in_netns(Some(&from_ns), move || {
        let mut s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from((to_ip, 5201)),
            Duration::from_secs(10),
        )
        .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            s.write_all(&chunk[..n]).unwrap();
            sent += n;
        }
    });
    server.join().unwrap()
}

/// A 3-host lab with `config` where host 2 is an upstream-style node: Debian's wireguard-go and wg,
/// its device configured from the leases the way upstream's backend configures the kernel device
/// (no preshared key), a lease of its own, and one pod per host.
fn lab_with_a_wireguard_go_node(test: &str, config: &str) -> Option<(Lab, flannel_tests::Proc)> {
    let mut lab = Lab::for_test(test, vec![3], config, &[])?;
    lab.start_flanneld(0);
    lab.start_flanneld(1);
    // Host 2: the upstream-style node, with its device and a lease of its own.
    let (wg_go, private) = lab.start_wireguard_go(2, "flannel-wg", 51820);
    let taken: Vec<String> = lab
        .etcd_list("/coreos.com/network/subnets/")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let subnet = (200..250)
        .map(|n| format!("10.5.{n}.0"))
        .find(|s| !taken.iter().any(|k| k.ends_with(&format!("{s}-24"))))
        .unwrap();
    let me = lab.hosts[2].addr.to_string();
    lab.etcd_put(
        &format!("/coreos.com/network/subnets/{subnet}-24"),
        &format!(
            r#"{{"PublicIP":"{me}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{}","Port":51820}}}}"#,
            private.public_key()
        ),
    );
    // Peers from the leases, as upstream's addPeer does.
    for h in 0..2 {
        let (lease, public_key) = lab.wireguard_lease(h);
        let peer_subnet = lab.hosts[h].subnet_env().unwrap()["FLANNEL_SUBNET"]
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .trunc()
            .to_string();
        let endpoint = format!("{}:51820", lease["PublicIP"].as_str().unwrap());
        let set = [
            "set",
            "flannel-wg",
            "peer",
            &public_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &peer_subnet,
        ];
        lab.wg(2, &set).unwrap_or_else(|e| panic!("{e}"));
    }
    let own = format!("{subnet}/32");
    run_in(&lab, 2, &["ip", "addr", "add", &own, "dev", "flannel-wg"]);
    run_in(
        &lab,
        2,
        &["ip", "link", "set", "flannel-wg", "mtu", "1420", "up"],
    );
    run_in(
        &lab,
        2,
        &["ip", "route", "add", "10.5.0.0/16", "dev", "flannel-wg"],
    );
    let gw = subnet.trim_end_matches(".0").to_string() + ".1";
    std::fs::write(
        &lab.hosts[2].subnet_file,
        format!("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET={gw}/24\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=false\n"),
    )
    .unwrap();
    for h in 0..3 {
        lab.add_pods(h, 1);
    }
    Some((lab, wg_go))
}

#[test]
fn a_wireguard_go_node_configured_as_upstream_talks_to_ours() {
    let test = "a_wireguard_go_node_configured_as_upstream_talks_to_ours";
    let Some((mut lab, wg_go)) = lab_with_a_wireguard_go_node(test, CONFIG) else {
        return;
    };
    let failures = lab.ping_all(Duration::from_secs(20));
    // 20 MB of TCP each way between one of our pods and the wireguard-go node's pod.
    let to_go = tcp_transfer(&lab, (0, 0), (2, 0), 20 << 20);
    let from_go = tcp_transfer(&lab, (2, 0), (1, 0), 20 << 20);
    let shown = lab.wg(2, &["show", "flannel-wg"]).unwrap_or_else(|e| e);
    // Host 0 restarts: wireguard-go still sends on its session with the old device, and would
    // notice only after its own timeouts (15 s without an answer, then a handshake); host 0
    // answers that data with a handshake, so the wireguard-go pod reaches ours again at once.
    let _ = lab.stop_flanneld(0);
    lab.start_flanneld(0);
    let pod0 = lab.hosts[0].pods[0].ip;
    let greeted = lab.ping((2, 0), pod0, Duration::from_secs(6));
    let _ = wg_go.stop();
    assert!(failures.is_empty(), "unreachable: {failures:?}\n{shown}");
    assert_eq!((to_go, from_go), (20 << 20, 20 << 20), "{shown}");
    assert!(shown.contains("latest handshake"), "{shown}");
    assert!(
        greeted,
        "the wireguard-go pod did not reach host 0's within 6 s of its restart (its own timeouts take 15 s)"
    );
}

#[test]
fn the_psk_option_is_the_preshared_key_upstreams_nodes_use() {
    // The network's `PSK`: every handshake mixes it in, so a node without it cannot talk to ours
    // and one with it (wireguard-go given it per peer, as upstream's backend gives it) can.
    let psk = "m7W4uR4Lk5Qn4mB9zK9k6bQm3vFh3p8cWl0x9jQe7Hs=";
    let config =
        format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"wireguard","PSK":"{psk}"}}}}"#);
    let test = "the_psk_option_is_the_preshared_key_upstreams_nodes_use";
    let Some((lab, wg_go)) = lab_with_a_wireguard_go_node(test, &config) else {
        return;
    };
    let to_go = lab.hosts[2].pods[0].ip;
    assert!(
        lab.ping((0, 0), lab.hosts[1].pods[0].ip, Duration::from_secs(10)),
        "our two hosts share the PSK"
    );
    assert!(
        !lab.ping((0, 0), to_go, Duration::from_secs(3)),
        "a node without the PSK is reached"
    );
    let file = lab.hosts[2].subnet_file.with_file_name("psk");
    std::fs::write(&file, psk).unwrap();
    let path = file.display().to_string();
    for h in 0..2 {
        let (_, key) = lab.wireguard_lease(h);
        let set = ["set", "flannel-wg", "peer", &key, "preshared-key", &path];
        lab.wg(2, &set).unwrap_or_else(|e| panic!("{e}"));
    }
    let failures = lab.ping_all(Duration::from_secs(20));
    let shown = lab.wg(2, &["show", "flannel-wg"]).unwrap_or_else(|e| e);
    let _ = wg_go.stop();
    assert!(failures.is_empty(), "with the PSK: {failures:?}\n{shown}");
    assert!(shown.contains("preshared key: (hidden)"), "{shown}");
}

#[test]
fn a_peer_whose_key_changes_is_updated() {
    let Some(mut lab) = lab("a_peer_whose_key_changes_is_updated") else {
        return;
    };
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    let (_, old_key) = lab.wireguard_lease(1);
    // Host 1 loses its key file (a reinstalled node): it makes a new key and publishes it.
    let _ = lab.stop_flanneld(1);
    std::fs::remove_file(lab.hosts[1].subnet_file.with_file_name("wgkey")).unwrap();
    lab.start_flanneld(1);
    let (lease, new_key) = lab.wireguard_lease(1);
    assert_ne!(old_key, new_key);
    assert_eq!(lease["BackendData"]["PublicKey"], new_key.as_str());
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "after the key change: {failures:?}");
    assert!(
        lab.hosts[0].log_text().contains("WireGuard peers updated"),
        "{}",
        lab.hosts[0].log_text()
    );
}

#[test]
fn dual_stack_in_both_kinds_of_mode() {
    // separate: flannel-wg for IPv4 on 51820, flannel-wg-v6 for IPv6 on 51821; auto and ipv4: one
    // device for both families on 51820; ipv6: the same, its peers reached over the IPv6 underlay.
    for (mode, devices) in [
        ("separate", &["flannel-wg", "flannel-wg-v6"][..]),
        ("auto", &["flannel-wg"][..]),
        ("ipv4", &["flannel-wg"][..]),
        ("ipv6", &["flannel-wg"][..]),
    ] {
        let config = format!(
            r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
        );
        let Some(mut lab) =
            Lab::for_test("dual_stack_in_both_kinds_of_mode", vec![3], &config, &[])
        else {
            return;
        };
        lab.start_all();
        for i in 0..3 {
            lab.add_pods(i, 1);
        }
        let failures = lab.ping_both_families();
        assert!(failures.is_empty(), "{mode}: {failures:?}");
        let links = lab.hosts[0].sh("ip link");
        for d in devices {
            assert!(links.contains(&format!(" {d}:")), "{mode}: no {d}: {links}");
        }
        assert_eq!(
            links.contains(" flannel-wg-v6:"),
            mode == "separate",
            "{mode}: {links}"
        );
        // The IPv6 data names the port the IPv6 traffic is received on: flannel-wg-v6's, or the
        // one device's.
        let (lease, key) = lab.wireguard_lease(0);
        let port = if mode == "separate" { 51821 } else { 51820 };
        assert_eq!(
            lease["BackendV6Data"],
            serde_json::json!({"PublicKey": key, "Port": port}),
            "{mode}: {lease}"
        );
        if mode != "separate" {
            // The one device's peers are reached over the family the mode says (auto: IPv4 here,
            // the lab's IPv6 addresses being private).
            let dump = lab.wg(0, &["show", "flannel-wg", "dump"]).unwrap();
            let endpoints: Vec<&str> = dump
                .lines()
                .skip(1)
                .filter_map(|l| l.split('\t').nth(2))
                .collect();
            assert_eq!(endpoints.len(), 2, "{dump}");
            assert!(
                endpoints
                    .iter()
                    .all(|e| e.starts_with('[') == (mode == "ipv6")),
                "{mode} endpoints: {dump}"
            );
        } else {
            // Devices outlive flanneld: switched to one device, host 0 deletes the now unused
            // flannel-wg-v6 (and the route through it) and routes IPv6 into flannel-wg.
            let _ = lab.stop_flanneld(0);
            assert!(lab.hosts[0].sh("ip link").contains(" flannel-wg-v6:"));
            lab.etcd_put(
                "/coreos.com/network/config",
                &config.replace("separate", "auto"),
            );
            lab.start_flanneld(0);
            let links = lab.hosts[0].sh("ip link");
            assert!(!links.contains(" flannel-wg-v6:"), "{links}");
            assert!(
                until(Duration::from_secs(10), || lab.hosts[0]
                    .sh("ip -6 route")
                    .contains("fd00:5::/48 dev flannel-wg ")),
                "{}",
                lab.hosts[0].sh("ip -6 route")
            );
        }
    }
}
