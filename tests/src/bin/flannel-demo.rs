//! The demo: a local multi-host flannel cluster in network namespaces.
//!
//! `flannel-demo [--backend vxlan|host-gw|vxlan-direct|udp|wireguard|ipip|ipsec|extension] [--hosts N] [--ipv6 | --ipv6-only] [--kube] [--hold]`
//!
//! Builds N hosts on an underlay switch, runs etcd and the real flanneld on every host, creates two
//! pods per host, pings every pod from every pod, and shows what flannel put in the kernel and in
//! etcd. Everything lives in network namespaces named `flt<pid>-…` and is removed on every way out:
//! the end, a closed stdout (`| head`), a panic, SIGINT, SIGTERM and SIGHUP
//! ([`flannel_tests::cleanup`]).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use flannel_tests::bin_path;
use flannel_tests::cleanup;
use flannel_tests::lab::{Lab, LabSpec};

/// A local multi-host flannel cluster in network namespaces (run as root): etcd on an underlay
/// switch, the real flanneld on every host, two pods per host created through the flannel CNI
/// plugin, pings between all pods, and what flanneld put in each kernel. Everything is removed at
/// the end, on Ctrl-C, SIGTERM or SIGHUP, and when stdout is closed.
#[derive(Debug, Parser)]
#[command(name = "flannel-demo", version)]
struct Args {
    /// The flannel backend the cluster uses.
    #[arg(long, value_enum, default_value_t = DemoBackend::Vxlan)]
    backend: DemoBackend,
    /// How many hosts (2 to 20).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=20))]
    hosts: u8,
    /// Dual stack: IPv6 on the underlay, an IPv6 pod network and IPv6 pods (not with udp).
    #[arg(long)]
    ipv6: bool,
    /// An IPv6-only pod network (`"EnableIPv4": false`): pods with only IPv6 addresses. Kubernetes
    /// mode only, as upstream (implies --kube); not with udp.
    #[arg(long, conflicts_with = "ipv6")]
    ipv6_only: bool,
    /// Kubernetes mode: flanneld --kube-subnet-mgr against a stand-in API server with a Node per host
    /// (pod CIDRs assigned as the node IPAM controller would), instead of etcd.
    #[arg(long)]
    kube: bool,
    /// Keep the cluster up after the tour until Ctrl-C (which also cleans up).
    #[arg(long)]
    hold: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DemoBackend {
    /// VXLAN encapsulation (flannel.1).
    Vxlan,
    /// VXLAN, with direct routes between hosts on one L2 segment.
    VxlanDirect,
    /// Routes to each peer subnet via the peer's address (hosts on one L2 segment).
    HostGw,
    /// Userspace encapsulation over the TUN device flannel0.
    Udp,
    /// Encrypted: WireGuard (userspace, over the TUN device flannel-wg).
    Wireguard,
    /// IP-in-IP tunnels (flannel.ipip); needs a kernel with ipip (module ipip); IPv4 only.
    Ipip,
    /// Encrypted: IPsec (ESP tunnels negotiated by strongSwan's charon, which flanneld starts);
    /// needs a kernel with ESP (module esp4); IPv4 only.
    Ipsec,
    /// Your commands: upstream's host-gw example of the extension backend (a route per peer, made
    /// by SubnetAddCommand); IPv4 only here.
    Extension,
}

impl DemoBackend {
    fn name(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::VxlanDirect => "vxlan-direct",
            Self::HostGw => "host-gw",
            Self::Udp => "udp",
            Self::Wireguard => "wireguard",
            Self::Ipip => "ipip",
            Self::Ipsec => "ipsec",
            Self::Extension => "extension",
        }
    }

    fn json(self) -> &'static str {
        match self {
            Self::Vxlan => r#"{"Type":"vxlan"}"#,
            Self::VxlanDirect => r#"{"Type":"vxlan","DirectRouting":true}"#,
            Self::HostGw => r#"{"Type":"host-gw"}"#,
            Self::Udp => r#"{"Type":"udp"}"#,
            Self::Wireguard => r#"{"Type":"wireguard"}"#,
            Self::Ipip => r#"{"Type":"ipip"}"#,
            // The demo's key (make a cluster's own with `openssl rand -hex 48`).
            Self::Ipsec => concat!(
                r#"{"Type":"ipsec","PSK":""#,
                "demo-key-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
                r#""}"#
            ),
            Self::Extension => concat!(
                r#"{"Type":"extension","PreStartupCommand":"cat /sys/class/net/eth0/address","#,
                r#""SubnetAddCommand":"read MAC; ip route replace \"$SUBNET\" via \"$PUBLIC_IP\"","#,
                r#""SubnetRemoveCommand":"ip route del \"$SUBNET\" via \"$PUBLIC_IP\""}"#
            ),
        }
    }
}

/// Stdout was closed (e.g. `flannel-demo | head`): stop the tour and clean up.
#[derive(Debug)]
struct StdoutClosed;

/// Writes one line to stdout; a closed stdout becomes [`StdoutClosed`] instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(|_| StdoutClosed)?
    };
}

fn section(title: &str) -> Result<(), StdoutClosed> {
    say!("\n=== {title}");
    Ok(())
}

fn indent(text: &str) -> Result<(), StdoutClosed> {
    for l in text.lines() {
        say!("    {l}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.ipv6
        && matches!(
            args.backend,
            DemoBackend::Udp
                | DemoBackend::Wireguard
                | DemoBackend::Ipip
                | DemoBackend::Ipsec
                | DemoBackend::Extension
        )
    {
        let _ = writeln!(
            std::io::stderr(),
            "--ipv6 needs --backend vxlan, vxlan-direct or host-gw (the udp, ipip and ipsec backends are IPv4 only; the demo shows wireguard and extension with IPv4)"
        );
        return ExitCode::from(2);
    }
    if args.ipv6_only
        && matches!(
            args.backend,
            DemoBackend::Udp | DemoBackend::Ipip | DemoBackend::Ipsec | DemoBackend::Extension
        )
    {
        let _ = writeln!(
            std::io::stderr(),
            "--ipv6-only needs --backend vxlan, vxlan-direct, host-gw or wireguard (the udp, ipip and ipsec backends are IPv4 only; the demo's extension commands route IPv4)"
        );
        return ExitCode::from(2);
    }
    // IPv6-only networks need Kubernetes mode (etcd leases cannot tell such nodes apart).
    args.kube |= args.ipv6_only;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let _ = writeln!(
            std::io::stderr(),
            "the demo needs root: it creates network namespaces"
        );
        return ExitCode::FAILURE;
    }
    // Signals, and a panic anywhere (also one during unwinding, which would abort), stop every
    // process and delete every namespace the lab made.
    cleanup::clean_up_on_signals();
    std::panic::set_hook(Box::new(|info| {
        let _ = writeln!(std::io::stderr(), "flannel-demo: {info}; cleaning up");
        cleanup::clean_up_and_exit(101);
    }));
    match tour(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(StdoutClosed) => {
            let _ = writeln!(
                std::io::stderr(),
                "flannel-demo: stdout was closed; stopped and cleaned up"
            );
            ExitCode::FAILURE
        }
    }
}

/// The tour; the lab is dropped (every process stopped, every namespace deleted) when it returns,
/// whichever way. Returns whether every step succeeded.
fn tour(args: &Args) -> Result<bool, StdoutClosed> {
    let hosts = usize::from(args.hosts);
    let backend = args.backend.name();
    let backend_json = args.backend.json();
    let (hold, ipv6, v6_only) = (args.hold, args.ipv6 || args.ipv6_only, args.ipv6_only);
    let config = if v6_only {
        format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{backend_json}}}"#
        )
    } else if ipv6 {
        format!(
            r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{backend_json}}}"#
        )
    } else {
        format!(r#"{{"Network":"10.5.0.0/16","Backend":{backend_json}}}"#)
    };
    // The network flannel routes, and its devices (the IPv6 ones in an IPv6-only network).
    let (network, vxlan_dev, wg_dev) = if v6_only {
        ("fd00:5::/48", "flannel-v6.1", "flannel-wg-v6")
    } else {
        ("10.5.0.0/16", "flannel.1", "flannel-wg")
    };
    let store = if args.kube {
        "a stand-in Kubernetes API server"
    } else {
        "etcd"
    };
    section(&format!(
        "Building a {hosts}-host lab (backend {backend}, store {store})"
    ))?;
    say!(
        "    hosts are network namespaces on one underlay switch (172.20.0.0/16); {store} runs on the switch"
    );
    let spec = LabSpec {
        segments: vec![hosts],
        config: config.clone(),
        // ipsec's policies select the pods' own addresses: flanneld masquerades (only what leaves
        // the network), so that the CNI plugin does not (it would hide the pods' addresses).
        flanneld_args: if backend == "ipsec" {
            vec!["--ip-masq".into()]
        } else {
            vec![]
        },
    };
    let mut lab = if args.kube {
        Lab::new_kube(&spec, bin_path("flanneld"))
    } else {
        Lab::new(&spec, bin_path("flanneld"))
    };
    if args.kube {
        let kubeconfig = lab.dir().join("kubeconfig");
        let _ = std::fs::write(&kubeconfig, lab.api().kubeconfig());
        say!(
            "    API server: {}   (from the switch: ip netns exec {} kubectl --kubeconfig {} get nodes)",
            lab.store_url(),
            lab.sw.name(),
            kubeconfig.display()
        );
        say!("    Nodes, each with the pod CIDR the node IPAM controller would assign:");
        for h in &lab.hosts {
            let node = lab.api().node(&format!("host{}", h.n)).unwrap_or_default();
            say!(
                "        host{}  spec.podCIDRs {}",
                h.n,
                node["spec"]["podCIDRs"]
            );
        }
        say!("    flanneld runs with --kube-subnet-mgr and NODE_NAME=hostN; net-conf.json:");
    } else {
        say!(
            "    etcd: {}   network config at /coreos.com/network/config:",
            lab.etcd_url()
        );
    }
    indent(&config)?;
    if backend == "ipip" {
        // Asked in a lab host: flanneld would stop with the same news.
        if !lab.hosts[0].has_ipip() {
            say!(
                "\n    This kernel has no ipip tunnels (module ipip), so the ipip backend cannot run here: \
                 flanneld would stop at start saying so. Load the module (modprobe ipip) or try --backend vxlan."
            );
            return finish(lab, false, store, false);
        }
    }
    if backend == "ipsec" {
        if !lab.hosts[0].has_esp() {
            say!(
                "\n    This kernel has no ESP with AES-GCM (modules esp4, gcm), so the ipsec backend cannot run here: \
                 flanneld would stop at start saying so. Load the module (modprobe esp4) or try --backend wireguard (encrypted too)."
            );
            return finish(lab, false, store, false);
        }
        say!(
            "    each host's flanneld starts its own charon (strongSwan), in a /run of its own (lab hosts share one filesystem),"
        );
        say!(
            "    and runs with --ip-masq, as upstream's DaemonSet does: the CNI plugin then leaves the pods' addresses alone"
        );
        for h in &mut lab.hosts {
            h.private_run = true;
        }
    }

    section("Starting flanneld on every host")?;
    for i in 0..hosts {
        lab.start_flanneld(i);
        let h = &lab.hosts[i];
        say!("    host{} ({}): subnet.env", h.n, h.addr);
        for line in std::fs::read_to_string(&h.subnet_file)
            .unwrap_or_default()
            .lines()
        {
            say!("        {line}");
        }
    }

    let cni = std::path::Path::new("/usr/lib/cni/bridge").exists();
    if cni {
        section(
            "Creating two pods per host through the flannel CNI plugin (it delegates to bridge + host-local)",
        )?;
        say!("    CNI config given to the plugin on host1:");
        indent(&lab.cni_netconf(0))?;
    } else {
        section(
            "Creating two pods per host (veth on the host's cni0 bridge, MTU from subnet.env)",
        )?;
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
                Some(ip6) if v6_only => ip6.to_string(),
                Some(ip6) => format!("{} + {ip6}", p.ip),
                None => p.ip.to_string(),
            })
            .collect();
        say!("    host{}: pods {}", lab.hosts[i].n, ips.join(", "));
    }

    section(if v6_only {
        "Every pod pings every other pod (IPv6)"
    } else if ipv6 {
        "Every pod pings every other pod (IPv4 and IPv6)"
    } else {
        "Every pod pings every other pod"
    })?;
    let mut pods: Vec<((usize, usize), std::net::IpAddr)> = lab
        .all_pods()
        .into_iter()
        .filter(|(_, ip)| !ip.is_unspecified())
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
            if from == to_pos || from_ip.is_ipv4() != to.is_ipv4() {
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
    say!(
        "    {ok} pings answered, {} failed {}",
        failed.len(),
        if failed.is_empty() { "" } else { "(see below)" }
    );
    for f in &failed {
        say!("    FAILED {f}");
    }

    let flannels = match backend {
        "udp" => format!("the one into {network} via flannel0"),
        "wireguard" => format!("the one into {network} via {wg_dev}"),
        "host-gw" => format!("the ones into {network} via eth0"),
        "ipip" => {
            format!("the ones into {network} via flannel.ipip, onlink to each host's address")
        }
        "extension" => format!("the ones into {network} via eth0, made by SubnetAddCommand"),
        "ipsec" => "none: the pods' packets follow the default route, and the xfrm policies below put them in ESP".to_string(),
        _ => format!("the ones into {network} via {vxlan_dev} (or eth0 with DirectRouting)"),
    };
    section(&format!("Each host's routes (flannel's are {flannels})"))?;
    for h in &lab.hosts {
        if !v6_only {
            say!("    host{} $ ip route", h.n);
            indent(&h.sh("ip route"))?;
        }
        if ipv6 {
            say!("    host{} $ ip -6 route", h.n);
            indent(&h.sh("ip -6 route"))?;
        }
    }
    section("The rest of what flanneld put in host1's kernel")?;
    let h = &lab.hosts[0];
    if backend.starts_with("vxlan") {
        for cmd in [
            format!("ip -d link show {vxlan_dev}"),
            format!("ip neigh show dev {vxlan_dev}"),
            format!("bridge fdb show dev {vxlan_dev}"),
        ] {
            say!("    $ {cmd}");
            indent(&h.sh(&cmd))?;
        }
    }
    if backend == "ipip" {
        say!("    $ ip -d link show flannel.ipip   (local: this host's address; remote: any)");
        indent(&h.sh("ip -d link show flannel.ipip"))?;
        say!("    $ ip addr show flannel.ipip");
        indent(&h.sh("ip addr show flannel.ipip"))?;
    }
    if backend == "ipsec" {
        say!(
            "    $ ip xfrm policy   (out, in and fwd per peer, request id 11: charon's SAs carry them)"
        );
        indent(&h.sh("ip xfrm policy"))?;
        say!(
            "    $ ip xfrm state | grep -c '^src'   (the SAs charon negotiated, one per direction and peer)"
        );
        indent(&format!(
            "{}",
            h.sh("ip xfrm state")
                .lines()
                .filter(|l| l.starts_with("src"))
                .count()
        ))?;
    }
    if backend == "udp" {
        say!("    $ ip -d link show flannel0   (a persistent TUN device: it outlives flanneld)");
        indent(&h.sh("ip -d link show flannel0"))?;
        say!("    $ ip addr show flannel0");
        indent(&h.sh("ip addr show flannel0"))?;
    }
    if backend == "wireguard" {
        say!(
            "    $ ip -d link show {wg_dev}   (userspace WireGuard over TUN: no kernel module needed)"
        );
        indent(&h.sh(&format!("ip -d link show {wg_dev}")))?;
        say!("    $ ip addr show {wg_dev}");
        indent(&h.sh(&format!("ip addr show {wg_dev}")))?;
        say!("    $ wg show {wg_dev}   (Debian's wg: the peers the leases say, after the pings)");
        match lab.wg(0, &["show", wg_dev]) {
            Ok(text) => indent(&text)?,
            Err(e) => say!("    (wg show failed: {e})"),
        }
    }

    if args.kube {
        section(
            "The Node objects (flannel's annotations, as upstream writes them, and the NetworkUnavailable condition)",
        )?;
        // The condition is set right after subnet.env is written: give the last host a moment.
        std::thread::sleep(Duration::from_millis(300));
        for h in &lab.hosts {
            let node = lab.api().node(&format!("host{}", h.n)).unwrap_or_default();
            say!("    host{}:", h.n);
            if let Some(a) = node["metadata"]["annotations"].as_object() {
                for (k, v) in a {
                    say!("        {k}: {}", v.as_str().unwrap_or_default());
                }
            }
            for c in node["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
            {
                say!(
                    "        condition {}={} reason {} ({})",
                    c["type"].as_str().unwrap_or_default(),
                    c["status"].as_str().unwrap_or_default(),
                    c["reason"].as_str().unwrap_or_default(),
                    c["message"].as_str().unwrap_or_default()
                );
            }
        }
    } else {
        section(
            "The leases in etcd (one per host; the key is the subnet, the value Go flanneld's JSON)",
        )?;
        for (k, v) in lab.etcd_list("/coreos.com/network/subnets/") {
            say!("    {k}\n        {v}");
        }
    }

    // udp and wireguard have one route for the whole network (into their device); the others one
    // per peer.
    let doomed: Vec<String> = if backend == "udp" || backend == "wireguard" {
        vec![network.into()]
    } else if args.kube {
        lab.hosts
            .iter()
            .skip(1)
            .flat_map(|h| Lab::pod_cidrs(&config, h.n))
            .collect()
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
    if backend == "extension" {
        // Nothing to heal: flanneld runs the commands when leases change, and repairs nothing.
        section(
            "What the extension backend ran on host1 (its commands run when leases change; it repairs nothing)",
        )?;
        for l in lab.hosts[0].log_text().lines() {
            if l.contains("flannel_backend_extension") {
                let msg = l
                    .split_once("flannel_backend_extension: ")
                    .map_or(l, |(_, m)| m);
                say!("    {msg}");
            }
        }
        let peer_pod = &lab.hosts[1].pods[0];
        let again = lab.ping((0, 0), peer_pod.ip, Duration::from_secs(2));
        say!(
            "    host1 pod -> host2 pod: {}",
            if again { "answered" } else { "FAILED" }
        );
        return finish(lab, hold, store, failed.is_empty() && again);
    }
    if backend == "ipsec" {
        section("Self-healing: deleting host1's out policies (flanneld checks them every 10 s)")?;
        let out_policies = |lab: &Lab| {
            lab.hosts[0]
                .sh("ip xfrm policy list dir out")
                .lines()
                .filter(|l| l.starts_with("src"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
        };
        let before = out_policies(&lab);
        for p in &before {
            // `src A dst B` -> `ip xfrm policy del src A dst B dir out`
            let mut args: Vec<&str> = vec!["ip", "xfrm", "policy", "del"];
            args.extend(p.split_whitespace());
            args.extend(["dir", "out"]);
            match lab.hosts[0].ns.exec(&args) {
                Ok(_) => say!("    deleted {p} dir out"),
                Err(e) => say!("    could not delete {p}: {e}"),
            }
        }
        let limit = Duration::from_secs(15) * flannel_tests::vm::slowdown();
        let back = flannel_tests::until(limit, || out_policies(&lab) == before);
        say!("    {}:", if back { "put back" } else { "NOT put back" });
        indent(&lab.hosts[0].sh("ip xfrm policy list dir out"))?;
        let peer_pod = &lab.hosts[1].pods[0];
        let again = lab.ping(
            (0, 0),
            peer_pod.ip,
            Duration::from_secs(2) * flannel_tests::vm::slowdown(),
        );
        say!(
            "    host1 pod -> host2 pod: {}",
            if again { "answered" } else { "FAILED" }
        );
        return finish(lab, hold, store, failed.is_empty() && back && again);
    }
    section("Self-healing: deleting host1's flannel routes")?;
    for subnet in &doomed {
        match lab.hosts[0].ns.exec(&["ip", "route", "del", subnet]) {
            Ok(_) => say!("    deleted {subnet}"),
            Err(e) => say!("    could not delete {subnet}: {e}"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut back = if v6_only {
        String::new()
    } else {
        lab.hosts[0].sh("ip route")
    };
    if ipv6 {
        back.push_str(&lab.hosts[0].sh("ip -6 route"));
    }
    say!("    half a second later:");
    indent(&back)?;
    let peer_pod = &lab.hosts[1].pods[0];
    let target: std::net::IpAddr = match peer_pod.ip6 {
        Some(ip6) if v6_only => ip6.into(),
        _ => peer_pod.ip.into(),
    };
    // (Longer in the test VM, whose emulated CPU runs flanneld several times slower.)
    let again = lab.ping(
        (0, 0),
        target,
        Duration::from_secs(2) * flannel_tests::vm::slowdown(),
    );
    say!(
        "    host1 pod -> host2 pod: {}",
        if again { "answered" } else { "FAILED" }
    );

    finish(lab, hold, store, failed.is_empty() && again)
}

/// The end of the tour: holds the lab until Ctrl-C with `hold`, else stops and deletes it; returns
/// `ok`.
fn finish(lab: Lab, hold: bool, store: &str, ok: bool) -> Result<bool, StdoutClosed> {
    if hold {
        section("Holding the lab; press Ctrl-C to clean up")?;
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    section(&format!(
        "Cleaning up (stopping flanneld and {store}, deleting the namespaces)"
    ))?;
    drop(lab);
    say!("    done");
    Ok(ok)
}
