//! The demo: a local multi-host flannel cluster in network namespaces.
//!
//! `flannel-demo [--backend vxlan|host-gw|vxlan-direct|udp] [--hosts N] [--ipv6] [--hold]`
//!
//! Builds N hosts on an underlay switch, runs etcd and the real flanneld on every host, creates two
//! pods per host, pings every pod from every pod, and shows what flannel put in the kernel and in
//! etcd. Everything lives in network namespaces named `flt<pid>-…` and is removed on exit or Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flannel_tests::bin_path;
use flannel_tests::lab::{Lab, LabSpec};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn section(title: &str) {
    println!("\n=== {title}");
}

fn indent(text: &str) {
    for l in text.lines() {
        println!("    {l}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let backend = value("--backend").unwrap_or_else(|| "vxlan".into());
    let hosts: usize = value("--hosts")
        .and_then(|h| h.parse().ok())
        .unwrap_or(3)
        .clamp(2, 20);
    let hold = args.iter().any(|a| a == "--hold");
    let ipv6 = args.iter().any(|a| a == "--ipv6");
    let backend_json = match backend.as_str() {
        "vxlan" => r#"{"Type":"vxlan"}"#,
        "vxlan-direct" => r#"{"Type":"vxlan","DirectRouting":true}"#,
        "host-gw" => r#"{"Type":"host-gw"}"#,
        "udp" => r#"{"Type":"udp"}"#,
        other => {
            eprintln!("unknown --backend {other:?}: use vxlan, vxlan-direct, host-gw or udp");
            std::process::exit(2);
        }
    };
    if ipv6 && backend == "udp" {
        eprintln!(
            "--ipv6 needs --backend vxlan, vxlan-direct or host-gw: the udp backend is IPv4 only"
        );
        std::process::exit(2);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo needs root: it creates network namespaces");
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let v6 = if ipv6 {
        r#","EnableIPv6":true,"IPv6Network":"fd00:5::/48""#
    } else {
        ""
    };
    let config = format!(r#"{{"Network":"10.5.0.0/16"{v6},"Backend":{backend_json}}}"#);
    section(&format!("Building a {hosts}-host lab (backend {backend})"));
    println!(
        "    hosts are network namespaces on one underlay switch (172.20.0.0/16); etcd runs on the switch"
    );
    let mut lab = Lab::new(
        &LabSpec {
            segments: vec![hosts],
            config: config.clone(),
            flanneld_args: vec![],
        },
        bin_path("flanneld"),
    );
    println!(
        "    etcd: {}   network config at /coreos.com/network/config:",
        lab.etcd_url()
    );
    indent(&config);

    section("Starting flanneld on every host");
    for i in 0..hosts {
        if interrupted() {
            return;
        }
        lab.start_flanneld(i);
        let h = &lab.hosts[i];
        println!("    host{} ({}): subnet.env", h.n, h.addr);
        for line in std::fs::read_to_string(&h.subnet_file)
            .unwrap_or_default()
            .lines()
        {
            println!("        {line}");
        }
    }

    let cni = std::path::Path::new("/usr/lib/cni/bridge").exists();
    if cni {
        section(
            "Creating two pods per host through the flannel CNI plugin (it delegates to bridge + host-local)",
        );
        println!("    CNI config given to the plugin on host1:");
        indent(&lab.cni_netconf(0));
    } else {
        section("Creating two pods per host (veth on the host's cni0 bridge, MTU from subnet.env)");
    }
    for i in 0..hosts {
        if cni {
            lab.add_cni_pods(i, 2, &bin_path("flannel"));
        } else {
            lab.add_pods(i, 2);
        }
        let ips: Vec<String> = lab.hosts[i]
            .pods
            .iter()
            .map(|p| match p.ip6 {
                Some(ip6) => format!("{} + {ip6}", p.ip),
                None => p.ip.to_string(),
            })
            .collect();
        println!("    host{}: pods {}", lab.hosts[i].n, ips.join(", "));
    }
    if interrupted() {
        return;
    }

    section(if ipv6 {
        "Every pod pings every other pod (IPv4 and IPv6)"
    } else {
        "Every pod pings every other pod"
    });
    let mut pods: Vec<((usize, usize), std::net::IpAddr)> = lab
        .all_pods()
        .into_iter()
        .map(|(p, ip)| (p, ip.into()))
        .collect();
    for (h, host) in lab.hosts.iter().enumerate() {
        for (j, pod) in host.pods.iter().enumerate() {
            if let Some(ip6) = pod.ip6 {
                pods.push(((h, j), ip6.into()));
            }
        }
    }
    let mut ok = 0;
    let mut failed = Vec::new();
    for (from, from_ip) in &pods {
        for (to_pos, to) in &pods {
            if from == to_pos || from_ip.is_ipv4() != to.is_ipv4() || interrupted() {
                continue;
            }
            // (Retried for up to 5 s: fresh IPv6 addresses may still be in duplicate detection.)
            if lab.ping(*from, *to, Duration::from_secs(5)) {
                ok += 1;
            } else {
                failed.push(format!("{from_ip} -> {to}"));
            }
        }
    }
    println!(
        "    {ok} pings answered, {} failed {}",
        failed.len(),
        if failed.is_empty() { "" } else { "(see below)" }
    );
    for f in &failed {
        println!("    FAILED {f}");
    }

    section(
        "Each host's routes (flannel's are the ones into 10.5.0.0/16 via flannel.1 or eth0, or the one via flannel0)",
    );
    for h in &lab.hosts {
        println!("    host{} $ ip route", h.n);
        indent(&h.sh("ip route"));
        if ipv6 {
            println!("    host{} $ ip -6 route", h.n);
            indent(&h.sh("ip -6 route"));
        }
    }
    section("The rest of what flanneld put in host1's kernel");
    let h = &lab.hosts[0];
    if backend.starts_with("vxlan") {
        println!("    $ ip -d link show flannel.1");
        indent(&h.sh("ip -d link show flannel.1"));
        println!("    $ ip neigh show dev flannel.1");
        indent(&h.sh("ip neigh show dev flannel.1"));
        println!("    $ bridge fdb show dev flannel.1");
        indent(&h.sh("bridge fdb show dev flannel.1"));
    }
    if backend == "udp" {
        println!(
            "    $ ip -d link show flannel0   (a persistent TUN device: it outlives flanneld)"
        );
        indent(&h.sh("ip -d link show flannel0"));
        println!("    $ ip addr show flannel0");
        indent(&h.sh("ip addr show flannel0"));
    }

    section(
        "The leases in etcd (one per host; the key is the subnet, the value Go flanneld's JSON)",
    );
    for (k, v) in lab.etcd_list("/coreos.com/network/subnets/") {
        println!("    {k}\n        {v}");
    }

    // udp has one route for the whole network (to flannel0); the others one per peer.
    let doomed: Vec<String> = if backend == "udp" {
        vec!["10.5.0.0/16".into()]
    } else {
        let me = format!("\"PublicIP\":\"{}\"", lab.hosts[0].addr);
        lab.etcd_list("/coreos.com/network/subnets/")
            .into_iter()
            .filter(|(_, v)| !v.contains(&me))
            .flat_map(|(k, _)| {
                // `10.5.3.0-24` or, dual stack, `10.5.3.0-24&fd00:5:0:3::-64`: both routes go.
                let key = k.rsplit('/').next().unwrap_or_default().to_string();
                key.split('&')
                    .filter_map(|part| part.rsplit_once('-'))
                    .map(|(net, len)| format!("{net}/{len}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    section("Self-healing: deleting host1's flannel routes");
    for subnet in &doomed {
        match lab.hosts[0].ns.exec(&["ip", "route", "del", subnet]) {
            Ok(_) => println!("    deleted {subnet}"),
            Err(e) => println!("    could not delete {subnet}: {e}"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut back = lab.hosts[0].sh("ip route");
    if ipv6 {
        back.push_str(&lab.hosts[0].sh("ip -6 route"));
    }
    println!("    half a second later:");
    indent(&back);
    let again = lab.ping((0, 0), lab.hosts[1].pods[0].ip, Duration::from_secs(2));
    println!(
        "    host1 pod -> host2 pod: {}",
        if again { "answered" } else { "FAILED" }
    );

    if hold {
        section("Holding the lab; press Ctrl-C to clean up");
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    section("Cleaning up (stopping flanneld and etcd, deleting the namespaces)");
    drop(lab);
    println!("    done");
    if !failed.is_empty() || !again {
        std::process::exit(1);
    }
}
