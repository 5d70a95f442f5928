//! The udp backend in the lab: pods talk over flannel0 + UDP 8285, large packets and a long TCP
//! transfer arrive intact, forged datagrams are dropped, removed peers get no traffic, restarts are
//! short, and under systemd (the file-descriptor store) lose nothing.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use flannel_tests::lab::Lab;
use flannel_tests::netns::in_netns;

/// flannel0's (rx packets, rx bytes, tx packets, tx bytes) on host `h`. The kernel counts one
/// packet per TUN read or write, so bytes per packet above the MTU show offloads at work.
fn flannel0_stats(lab: &Lab, h: usize) -> [u64; 4] {
    let out = lab.hosts[h].sh("ip -j -s link show dev flannel0");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v[0]["stats64"];
    [
        &s["rx"]["packets"],
        &s["rx"]["bytes"],
        &s["tx"]["packets"],
        &s["tx"]["bytes"],
    ]
    .map(|x| x.as_u64().unwrap())
}

fn udp_lab(test: &str) -> Option<Lab> {
    let mut lab = Lab::for_test(
        test,
        vec![3],
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#,
        &["--healthz-port=8081", "--healthz-ip=127.0.0.1"],
    )?;
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    Some(lab)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet (UDP checksum 0 = none) from `src` to `dst:port`.
fn inner_udp(src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// Whether pod (0,0) receives a UDP datagram on port 9999 after `send` runs.
fn pod_receives(lab: &Lab, send: impl FnOnce() + Send + 'static) -> bool {
    let ns = lab.hosts[0].pods[0].ns.name().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        in_netns(Some(&ns), move || {
            let s = UdpSocket::bind("0.0.0.0:9999").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            s.recv_from(&mut buf).is_ok()
        })
    });
    rx.recv().unwrap();
    send();
    receiver.join().unwrap()
}

fn send_from(ns: String, to: &str, datagram: Vec<u8>) -> impl FnOnce() + Send + 'static {
    let to = to.to_string();
    move || {
        in_netns(Some(&ns), move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(&datagram, to.as_str()).unwrap();
        })
    }
}

/// Sends `total` pseudo-random bytes over TCP from pod `from` to pod `to` (port 7000); returns the
/// bytes received and the FNV hashes of what was sent and what arrived.
fn tcp_transfer(
    lab: &Lab,
    from: (usize, usize),
    to: (usize, usize),
    total: u64,
) -> (u64, u64, u64) {
    let receiver_ns = lab.hosts[to.0].pods[to.1].ns.name().to_string();
    let sender_ns = lab.hosts[from.0].pods[from.1].ns.name().to_string();
    let dst_ip = lab.hosts[to.0].pods[to.1].ip;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        in_netns(Some(&receiver_ns), move || {
            let l = TcpListener::bind("0.0.0.0:7000").unwrap();
            ready_tx.send(()).unwrap();
            let (mut c, _) = l.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let (mut n, mut h) = (0u64, 0xcbf29ce484222325u64);
            let mut buf = vec![0u8; 65536];
            loop {
                let k = c.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                for b in &buf[..k] {
                    h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
                }
                n += k as u64;
            }
            (n, h)
        })
    });
    ready_rx.recv().unwrap();
    let sent_hash = in_netns(Some(&sender_ns), move || {
        let mut c = TcpStream::connect((dst_ip, 7000)).unwrap();
        let (mut x, mut h) = (0x9e3779b97f4a7c15u64, 0xcbf29ce484222325u64);
        let mut chunk = vec![0u8; 65536];
        let mut sent = 0u64;
        while sent < total {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
                h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
            }
            c.write_all(&chunk).unwrap();
            sent += chunk.len() as u64;
        }
        h
    });
    let (received, got_hash) = receiver.join().unwrap();
    (received, sent_hash, got_hash)
}

/// Host 0's flanneld as a service of a real systemd user manager, restarted while a pod of host 1
/// pings one of host 0's: every ping is answered. Then host 0 runs flanneld directly again.
fn udp_restart_under_systemd(lab: &mut Lab, to: Ipv4Addr) {
    let mut mgr = match flannel_tests::systemd::UserManager::start() {
        Ok(m) => m,
        Err(e) => {
            flannel_tests::skip("udp restart under systemd", &e);
            return;
        }
    };
    let unit = "flt-flanneld-0.service";
    lab.stop_flanneld(0);
    lab.start_flanneld_service(0, &mut mgr, unit);
    assert!(
        lab.ping((1, 0), to, Duration::from_secs(10)),
        "no ping under systemd:\n{}",
        lab.hosts[0].log_text()
    );
    assert_eq!(
        mgr.property(unit, "NFileDescriptorStore"),
        "2",
        "the UDP socket and the parking queue are in the store"
    );
    let (sent, received) = lab.ping_during((1, 0), to, 50, |_| {
        mgr.must(&["restart", unit]);
    });

    eprintln!("udp restart under systemd: {sent} sent, {received} received");
    let log = lab.hosts[0].log_text();
    assert_eq!(
        sent, received,
        "pings lost across a restart under systemd:\n{log}"
    );
    assert!(
        log.contains("took over the UDP socket kept by systemd"),
        "{log}"
    );
    assert!(log.contains("took over the parking queue"), "{log}");
    assert_eq!(
        mgr.property(unit, "NFileDescriptorStore"),
        "2",
        "no duplicates"
    );
    mgr.must(&["stop", unit]);
    drop(mgr);
    lab.start_flanneld(0);
}

#[test]
fn udp_backend_end_to_end() {
    let Some(mut lab) = udp_lab("udp_backend_end_to_end") else {
        return;
    };
    let env = lab.hosts[0].subnet_env().unwrap();
    assert_eq!(env["FLANNEL_MTU"], "1472", "external MTU - 28");
    let failures = lab.ping_all(Duration::from_secs(5));
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    // The wire format: udp leases carry no BackendType; flannel0 holds the subnet address.
    for (k, v) in lab.etcd_list("/coreos.com/network/subnets/") {
        assert!(v.ends_with(r#""PublicIPv6":null}"#), "{k}: {v}");
    }
    assert!(lab.hosts[0].routes("").contains("10.5.0.0/16 dev flannel0"));

    // Packets up to the pod MTU arrive (1444 bytes of ICMP payload + 28 = 1472).
    let to = lab.hosts[1].pods[0].ip.to_string();
    for size in ["56", "1000", "1444"] {
        let r = lab.hosts[0].pods[0]
            .ns
            .exec(&["ping", "-c", "2", "-W", "2", "-M", "do", "-s", size, &to]);
        assert!(r.is_ok(), "ping -s {size}: {r:?}");
    }

    // A 200 MB TCP transfer arrives intact.
    let total: u64 = 200 << 20;
    let (sender_before, receiver_before) = (flannel0_stats(&lab, 0), flannel0_stats(&lab, 1));
    let started = Instant::now();
    let (received, sent_hash, got_hash) = tcp_transfer(&lab, (0, 0), (1, 0), total);
    eprintln!("200 MB over udp in {:?}", started.elapsed());
    assert_eq!(received, total);
    assert_eq!(got_hash, sent_hash, "bytes changed in transit");
    // Offloads at work: the sender reads TSO packets of many segments from flannel0 (tx), the
    // receiver writes merged TCP segments (rx); without them every packet is at most the MTU (1472).
    let per_packet = |after: [u64; 4], before: [u64; 4], i: usize| {
        (after[i + 1] - before[i + 1]) / (after[i] - before[i]).max(1)
    };
    let read = per_packet(flannel0_stats(&lab, 0), sender_before, 2);
    let written = per_packet(flannel0_stats(&lab, 1), receiver_before, 0);
    eprintln!("bytes per TUN read {read}, per TUN write {written}");
    assert!(read > 3000, "TSO reads: {read} bytes per packet");
    assert!(written > 3000, "merged writes: {written} bytes per packet");
    // The socket's receive buffer was raised: at the default a burst of GSO batches overflows it and
    // every datagram lost there is a TCP loss in a pod.
    let ss = lab.hosts[1].sh("ss -uamn sport = :8285");
    let rb: u64 = ss
        .split([',', '('])
        .find_map(|f| f.strip_prefix("rb"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(rb >= 8 << 20, "receive buffer {rb}: {ss}");

    // Forged datagrams are dropped: from a non-peer, and from a peer with a spoofed inner source.
    let me = lab.hosts[0].pods[0].ip;
    let to0 = format!("{}:8285", lab.hosts[0].addr);
    let h1_pod = lab.hosts[1].pods[0].ip;
    let h2_pod = lab.hosts[2].pods[0].ip;
    let sw = lab.sw.name().to_string();
    let h1 = lab.hosts[1].ns.name().to_string();
    let dropped = |lab: &Lab| lab.metric(0, 8081, "flannel_udp_dropped_total").unwrap();
    let dropped_before = dropped(&lab);
    assert!(
        !pod_receives(
            &lab,
            send_from(sw, &to0, inner_udp(h1_pod, me, 9999, b"forged"))
        ),
        "a non-peer's datagram was delivered"
    );
    assert!(
        !pod_receives(
            &lab,
            send_from(h1.clone(), &to0, inner_udp(h2_pod, me, 9999, b"spoofed"))
        ),
        "a spoofed inner source was delivered"
    );
    assert!(
        dropped(&lab) >= dropped_before + 2.0,
        "both forged datagrams are counted as dropped"
    );
    assert!(
        pod_receives(
            &lab,
            send_from(h1, &to0, inner_udp(h1_pod, me, 9999, b"genuine"))
        ),
        "a genuine datagram was dropped"
    );

    // A removed peer gets no more traffic: count the datagrams arriving at its port 8285 while pod
    // (0,0) keeps pinging its pod; once host 0 has processed the removal the count stays at zero.
    let (gone, _) = lab
        .etcd_list("/coreos.com/network/subnets/")
        .into_iter()
        .find(|(_, v)| v.contains(&lab.hosts[2].addr.to_string()))
        .unwrap();
    lab.hosts[2].sh("iptables -w -I INPUT -p udp --dport 8285 -j ACCEPT");
    let counted = |lab: &Lab| -> u64 {
        let out = lab.hosts[2].sh("iptables -w -nvxL INPUT");
        out.lines()
            .find(|l| l.contains("dpt:8285"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    let target = lab.hosts[2].pods[0].ip.to_string();
    let ping = |lab: &Lab| {
        let _ = lab.hosts[0].pods[0]
            .ns
            .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "1", &target]);
    };
    ping(&lab);
    assert!(counted(&lab) > 0, "the counter sees traffic to a live peer");
    lab.stop_flanneld(2);
    lab.etcd_delete(&gone);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        lab.hosts[2].sh("iptables -w -Z INPUT");
        ping(&lab);
        if counted(&lab) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host 0 still sends to the removed peer"
        );
    }

    // Restart: flannel0 and its route persist, so the gap is the restart time only.
    let to = lab.hosts[0].pods[0].ip;
    let (sent, received) = lab.ping_during((1, 0), to, 50, |lab| {
        lab.stop_flanneld(0);
        assert!(
            lab.hosts[0].routes("").contains("10.5.0.0/16 dev flannel0"),
            "the route outlives flanneld"
        );
        lab.start_flanneld(0);
    });
    eprintln!("udp restart: {sent} sent, {received} received");
    assert!(
        sent - received <= 10,
        "more than a second of pings lost across a restart: {received} of {sent}"
    );

    // Under systemd nothing is lost: the UDP socket and a parking queue of flannel0 wait in
    // systemd's file-descriptor store while flanneld restarts, queueing what arrives meanwhile.
    udp_restart_under_systemd(&mut lab, to);

    // A flannel0 made without offloads (an older flanneld, `ip tuntap`) is taken over and works.
    lab.stop_flanneld(0);
    lab.hosts[0].sh("ip link del flannel0");
    lab.hosts[0].sh("ip tuntap add dev flannel0 mode tun");
    lab.start_flanneld(0);
    // subnet.env (written before start_flanneld returns) means the route is in place.
    assert!(
        lab.hosts[0].routes("").contains("10.5.0.0/16 dev flannel0"),
        "the cluster route is in place when subnet.env appears"
    );
    assert!(
        !lab.hosts[0].log_text().contains("offloads unavailable"),
        "offloads are switched on for a taken-over device"
    );
    // (Host 2 left the cluster above.)
    for (from, to) in [(0, 1), (1, 0)] {
        let ip = lab.hosts[to].pods[0].ip;
        assert!(
            lab.ping((from, 0), ip, Duration::from_secs(5)),
            "host {from} -> host {to} after taking over a plain flannel0"
        );
    }
}

/// What the Go-style peer saw.
#[derive(Debug, Default)]
struct GoPeerStats {
    /// Datagrams received from flanneld hosts and written to its TUN device.
    datagrams: u64,
    /// The largest of them.
    largest: usize,
    /// Datagrams that were not exactly one IPv4 packet (bad version, or total length != size).
    not_one_packet: u64,
    /// Packets read from its TUN device and sent to a peer.
    sent: u64,
}

/// A stand-in for a host running Go flanneld's udp backend (its C proxy): a plain TUN device
/// (`IFF_TUN | IFF_NO_PI`, no offloads) and a UDP socket on port 8285; one packet per read and per
/// write; a packet read from the TUN goes as the whole payload of one datagram to the peer whose
/// subnet holds its destination. Runs in namespace `ns` until `stop` (at most 120 s).
fn go_style_peer(
    ns: String,
    bind: std::net::SocketAddrV4,
    peers: Vec<(ipnet::Ipv4Net, Ipv4Addr)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ready: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<GoPeerStats> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        in_netns(Some(&ns), move || {
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap();
            let mut ifr = [0u8; 40];
            ifr[..8].copy_from_slice(b"flannel0");
            ifr[16..18].copy_from_slice(&(0x0001i16 | 0x1000).to_ne_bytes()); // IFF_TUN | IFF_NO_PI
            // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` holds.
            let rc = unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, ifr.as_mut_ptr()) };
            assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            let sock = UdpSocket::bind(bind).unwrap();
            ready.send(()).unwrap();
            let mut stats = GoPeerStats::default();
            let mut buf = vec![0u8; 65536];
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut fds = [
                    libc::pollfd {
                        fd: tun.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: sock.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: two valid pollfds.
                if unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) } <= 0 {
                    continue;
                }
                if fds[0].revents & libc::POLLIN != 0 {
                    // SAFETY: reading into a buffer we own.
                    let n =
                        unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n >= 20 {
                        let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                        if let Some((_, peer)) = peers.iter().find(|(net, _)| net.contains(&dst)) {
                            let _ = sock.send_to(&buf[..n as usize], (*peer, 8285));
                            stats.sent += 1;
                        }
                    }
                }
                if fds[1].revents & libc::POLLIN != 0 {
                    let (n, _) = sock.recv_from(&mut buf).unwrap();
                    let total = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                    if n < 20 || buf[0] >> 4 != 4 || total != n {
                        stats.not_one_packet += 1;
                    }
                    stats.datagrams += 1;
                    stats.largest = stats.largest.max(n);
                    // SAFETY: writing a buffer we own.
                    unsafe { libc::write(tun.as_raw_fd(), buf.as_ptr().cast(), n) };
                }
            }
            stats
        })
    })
}

#[test]
fn a_go_style_udp_host_interoperates() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(mut lab) = udp_lab("a_go_style_udp_host_interoperates") else {
        return;
    };
    // Host 2 becomes a Go-style udp host: our flanneld goes (its lease stays, as a Go host's would),
    // flannel0 is replaced by a plain TUN device driven one packet at a time.
    lab.stop_flanneld(2);
    lab.hosts[2].sh("ip link del flannel0");
    let subnet_of = |h: usize| -> ipnet::Ipv4Net {
        let env = lab.hosts[h].subnet_env().unwrap();
        env["FLANNEL_SUBNET"]
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .trunc()
    };
    let peers = vec![
        (subnet_of(0), lab.hosts[0].addr),
        (subnet_of(1), lab.hosts[1].addr),
    ];
    let own = subnet_of(2);
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let peer = go_style_peer(
        lab.hosts[2].ns.name().to_string(),
        std::net::SocketAddrV4::new(lab.hosts[2].addr, 8285),
        peers,
        stop.clone(),
        ready_tx,
    );
    ready_rx.recv().unwrap();
    // Go's device setup: the subnet's network address, MTU = underlay - 28, the cluster route.
    let h2 = &lab.hosts[2];
    h2.sh(&format!("ip addr add {}/32 dev flannel0", own.network()));
    h2.sh("ip link set flannel0 mtu 1472 up");
    h2.sh("ip route add 10.5.0.0/16 dev flannel0");

    for (from, to) in [(0, 2), (2, 0), (1, 2), (2, 1)] {
        let ip = lab.hosts[to].pods[0].ip;
        assert!(
            lab.ping((from, 0), ip, Duration::from_secs(5)),
            "pod on host {from} -> pod on host {to}"
        );
    }
    // Bulk both ways: ours sends with TSO reads + UDP GSO, the Go-style host one packet at a time.
    for (from, to) in [((0, 0), (2, 0)), ((2, 0), (0, 0))] {
        let total: u64 = 20 << 20;
        let (received, sent_hash, got_hash) = tcp_transfer(&lab, from, to, total);
        assert_eq!(received, total, "{from:?} -> {to:?}");
        assert_eq!(
            got_hash, sent_hash,
            "{from:?} -> {to:?}: bytes changed in transit"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let stats = peer.join().unwrap();
    eprintln!("Go-style peer: {stats:?}");
    assert_eq!(
        stats.not_one_packet, 0,
        "every datagram is one IPv4 packet: {stats:?}"
    );
    assert!(
        stats.largest <= 1472,
        "no datagram above the MTU: {stats:?}"
    );
    assert!(
        stats.datagrams > (20 << 20) / 1472,
        "the 20 MB arrived as MTU-sized datagrams: {stats:?}"
    );
    assert!(
        stats.sent > (20 << 20) / 1472,
        "and went back the same way: {stats:?}"
    );
}
