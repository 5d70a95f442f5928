//! Benchmark: pod-to-pod TCP throughput over the udp and wireguard backends next to vxlan and next
//! to host-to-host on the underlay, in the same run (iperf3, 5 s each), plus the CPU flanneld uses
//! per Gbit; and, as an anchor for the wireguard figure, two lab hosts tunnelling through Debian's
//! wireguard-go (row `wireguard-go`: its CPU and memory in the flanneld columns).
//!
//! Needs root. `cargo build --release --workspace && ./target/release/bench-throughput`
//! `bench-throughput --rounds 5` lets the paths take turns five times and summarises them (median
//! and range; each ratio to vxlan within its round). `--pin` gives each of the two lab hosts a core
//! of its own, as two real hosts have: host 0's flanneld (every thread) and iperf3 client on the
//! first CPU this process may run on, host 1's on the second, and each host's underlay receive work
//! (RPS on its `eth0`) on its own core, where without it the kernel's scheduler spreads all four
//! processes over the machine's cores.

use std::process::{Command, Stdio};
use std::time::Duration;

use flannel_tests::bin_path;
use flannel_tests::lab::{Lab, LabSpec};

const SECONDS: u32 = 5;

/// With `--pin`, the core of each of the two lab hosts: the first two this process may run on.
type Cores = Option<[usize; 2]>;

/// The command prefix that runs lab host `host`'s process on its core when pinning
/// (`taskset -c CPU`), or none.
fn on_cpu(cores: Cores, host: usize) -> Vec<String> {
    match cores {
        Some(cores) => vec!["taskset".into(), "-c".into(), cores[host].to_string()],
        None => Vec::new(),
    }
}

/// Where a lab host's underlay device takes its RPS mask.
const RPS_FILE: &str = "/sys/class/net/eth0/queues/rx-0/rps_cpus";

/// With `--pin`: lab host `host` on core `cpu` alone: every thread of `pid` (its flanneld or
/// wireguard-go) and the receive work of its underlay device (RPS on `eth0`, so a packet arriving
/// from the other host is processed here, not on the sender's core as a veth's would be).
fn pin_host(host: &flannel_tests::lab::Host, cpu: usize, pid: Option<u32>) {
    if let Some(pid) = pid {
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
            .stdout(Stdio::null())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "taskset -a -p -c {cpu} {pid} failed (package util-linux)"
        );
    }
    let mask = flannel_tests::bench::cpu_mask(cpu);
    let read = host
        .ns
        .exec(&[
            "sh",
            "-c",
            &format!("echo {mask} > {RPS_FILE} && cat {RPS_FILE}"),
        ])
        .unwrap_or_else(|e| panic!("RPS on {}'s eth0: {e}", host.ns.name()));
    assert_eq!(
        flannel_tests::bench::parse_cpu_mask(&read),
        Some(vec![cpu]),
        "RPS on {}'s eth0 reads {read:?}",
        host.ns.name()
    );
}

/// Runs iperf3 from namespace `client` to `server_ip` (server in namespace `server`); Gbit/s
/// received. With `cores`, the client runs on host 0's core and the server on host 1's.
fn iperf(client: &str, server: &str, server_ip: &str, cores: Cores) -> f64 {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", server])
        .args(on_cpu(cores, 1))
        .args(["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server (Debian package iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args(["netns", "exec", client])
        .args(on_cpu(cores, 0))
        .args([
            "iperf3",
            "-c",
            server_ip,
            "-p",
            "5201",
            "-t",
            &SECONDS.to_string(),
            "-J",
        ])
        .output()
        .expect("iperf3 client");
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// The receiving host's UDP `RcvbufErrors` (datagrams lost because a socket buffer was full).
fn udp_rcvbuf_errors(host: &flannel_tests::lab::Host) -> u64 {
    let snmp = host.sh("cat /proc/net/snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Resident memory of a process, MiB.
fn rss_mib(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// Two lab hosts whose only tunnel is Debian's wireguard-go (`fltwg0` and `fltwg1`; 10.99.0.1 and
/// .2, MTU 1420 as flannel's): host-to-host Gbit/s through it, the CPU seconds both wireguard-go
/// processes used per Gbit, and the larger one's resident MiB.
fn wireguard_go_anchor(cores: Cores) -> Option<(f64, f64, f64)> {
    let spec = LabSpec {
        segments: vec![2],
        config: r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#.into(),
        flanneld_args: vec![],
    };
    let lab = Lab::new(&spec, bin_path("flanneld"));
    let (a, ka) = lab.start_wireguard_go(0, "fltwg0", 51820);
    let (b, kb) = lab.start_wireguard_go(1, "fltwg1", 51820);
    let keys = [ka.public_key().to_string(), kb.public_key().to_string()];
    for h in 0..2 {
        let other = 1 - h;
        let host = &lab.hosts[h];
        let set = format!(
            "set fltwg{h} peer {} endpoint {}:51820 allowed-ips 10.99.0.{}/32",
            keys[other],
            lab.hosts[other].addr,
            other + 1
        );
        let args: Vec<&str> = set.split_whitespace().collect();
        lab.wg(h, &args).unwrap_or_else(|e| panic!("{e}"));
        host.sh(&format!("ip addr add 10.99.0.{}/24 dev fltwg{h}", h + 1));
        host.sh(&format!("ip link set fltwg{h} mtu 1420 up"));
    }
    // `ip netns exec` execs wireguard-go: these are its processes.
    let procs = [Some(a.0.id()), Some(b.0.id())];
    if let Some(cores) = cores {
        for (h, pid) in procs.iter().enumerate() {
            pin_host(&lab.hosts[h], cores[h], *pid);
        }
    }
    let up = flannel_tests::until(Duration::from_secs(10), || {
        lab.hosts[0]
            .ns
            .exec(&["ping", "-c", "1", "-W", "1", "10.99.0.2"])
            .is_ok()
    });
    let result = up.then(|| {
        let cpu_before: f64 = procs.iter().map(|p| cpu_seconds(*p)).sum();
        let gbps = iperf(
            lab.hosts[0].ns.name(),
            lab.hosts[1].ns.name(),
            "10.99.0.2",
            cores,
        );
        let cpu: f64 = procs.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu_before;
        let rss = procs.iter().map(|p| rss_mib(*p)).fold(0.0, f64::max);
        let gbits = gbps * f64::from(SECONDS);
        (gbps, if gbits > 0.0 { cpu / gbits } else { 0.0 }, rss)
    });
    let _ = (a.stop(), b.stop());
    result
}

/// One path's figures in one run.
#[derive(Clone, Copy)]
struct Row {
    gbps: f64,
    cpu_per_gbit: f64,
    rss: f64,
}

/// Pod-to-pod over `backend` in a fresh two-host lab (and host to host on the underlay when
/// `underlay` is set): its row, the receiving host's UDP receive-buffer drops and the underlay's
/// Gbit/s. `None` when the pods cannot reach each other. With `cores`, each host on its core.
fn measure(backend: &str, underlay: bool, cores: Cores) -> Option<(Row, u64, f64)> {
    let spec = LabSpec {
        segments: vec![2],
        config: format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"{backend}"}}}}"#),
        flanneld_args: vec![],
    };
    let mut lab = Lab::new(&spec, bin_path("flanneld"));
    lab.start_all();
    lab.add_pods(0, 1);
    lab.add_pods(1, 1);
    if !lab.ping((0, 0), lab.hosts[1].pods[0].ip, Duration::from_secs(3)) {
        eprintln!("{backend}: pods cannot reach each other; skipping");
        return None;
    }
    if let Some(cores) = cores {
        for (h, cpu) in cores.into_iter().enumerate() {
            pin_host(&lab.hosts[h], cpu, lab.flanneld_pid(h));
        }
    }
    let underlay = if underlay {
        iperf(
            lab.hosts[0].ns.name(),
            lab.hosts[1].ns.name(),
            &lab.hosts[1].addr.to_string(),
            cores,
        )
    } else {
        0.0
    };
    let cpu_before = cpu_seconds(lab.flanneld_pid(0)) + cpu_seconds(lab.flanneld_pid(1));
    let gbps = iperf(
        lab.hosts[0].pods[0].ns.name(),
        lab.hosts[1].pods[0].ns.name(),
        &lab.hosts[1].pods[0].ip.to_string(),
        cores,
    );
    let cpu = cpu_seconds(lab.flanneld_pid(0)) + cpu_seconds(lab.flanneld_pid(1)) - cpu_before;
    let drops = udp_rcvbuf_errors(&lab.hosts[1]);
    let rss = rss_mib(lab.flanneld_pid(0)).max(rss_mib(lab.flanneld_pid(1)));
    let gbits = gbps * f64::from(SECONDS);
    let row = Row {
        gbps,
        cpu_per_gbit: if gbits > 0.0 { cpu / gbits } else { 0.0 },
        rss,
    };
    Some((row, drops, underlay))
}

/// `a / b` with two decimals, or `-` without a `b`.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// The median of `v` (sorted in place); 0 for none.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One round's figures.
struct Run {
    /// The underlay's Gbit/s (0 without vxlan, in whose lab it is measured).
    underlay: f64,
    /// Each path's row.
    rows: Vec<(String, Row)>,
    /// Each backend's UDP receive-buffer drops on the receiving host.
    drops: Vec<(String, u64)>,
}

/// One round: every backend in turn, then wireguard-go when wireguard is among them.
fn round(backends: &[String], cores: Cores) -> Run {
    let mut rows = Vec::new();
    let mut drops = Vec::new();
    let mut underlay = 0.0;
    for backend in backends {
        if let Some((row, d, u)) = measure(backend, backend == "vxlan", cores) {
            if backend == "vxlan" {
                underlay = u;
            }
            rows.push((backend.clone(), row));
            drops.push((backend.clone(), d));
        }
    }
    if backends.iter().any(|b| b == "wireguard") {
        match wireguard_go_anchor(cores) {
            Some((gbps, cpu_per_gbit, rss)) => rows.push((
                "wireguard-go".into(),
                Row {
                    gbps,
                    cpu_per_gbit,
                    rss,
                },
            )),
            None => eprintln!("wireguard-go: the two hosts cannot reach each other; skipping"),
        }
    }
    Run {
        underlay,
        rows,
        drops,
    }
}

const USAGE: &str = "usage: bench-throughput [--rounds N] [--pin] [BACKEND...]
  BACKEND: vxlan, host-gw, udp, wireguard (default: vxlan udp wireguard); the underlay is measured
           in vxlan's lab, Debian's wireguard-go beside wireguard
  --rounds N: the paths take turns N times (1 to 20), each in a fresh lab, then a summary
              (median and range; each ratio to vxlan taken within its round)
  --pin: each lab host on a core of its own (the first two CPUs this process may run on: its
         flanneld, its iperf3, its underlay's receive work), as two real hosts; without it all
         share the machine's cores
needs root (network namespaces)";

fn main() {
    let mut args = flannel_tests::bench::args(USAGE);
    // With rounds, the backends take turns N times (a fresh lab each time) and each path's figures
    // are summarised over the rounds, its ratio to vxlan taken within each round: this shared
    // machine moves single runs by a fifth.
    let mut rounds = 1usize;
    if let Some(i) = args.iter().position(|a| a == "--rounds") {
        let n = args.get(i + 1).map_or("", String::as_str);
        rounds = flannel_tests::bench::number_arg(USAGE, "--rounds", n, 1..=20);
        args.drain(i..i + 2);
    }
    let pin = args.iter().any(|a| a == "--pin");
    args.retain(|a| a != "--pin");
    if let Some(a) = args
        .iter()
        .find(|a| !["vxlan", "host-gw", "udp", "wireguard"].contains(&a.as_str()))
    {
        flannel_tests::bench::bad_args(USAGE, &format!("unknown backend or option {a:?}"));
    }
    let cores: Cores = match flannel_tests::bench::allowed_cpus()[..] {
        _ if !pin => None,
        [a, b, ..] => Some([a, b]),
        ref cpus => flannel_tests::bench::bad_args(
            USAGE,
            &format!("--pin needs two CPUs to run on; this process may use {cpus:?}"),
        ),
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench-throughput needs root (network namespaces)");
        std::process::exit(1);
    }
    let backends = if args.is_empty() {
        vec!["vxlan".into(), "udp".into(), "wireguard".into()]
    } else {
        args
    };
    if rounds == 1 {
        let run = round(&backends, cores);
        print_run(&run);
        for (b, n) in run.drops {
            println!("{b}: UDP receive-buffer drops on the receiving host: {n}");
        }
        return;
    }
    let mut runs = Vec::new();
    for r in 1..=rounds {
        let run = round(&backends, cores);
        println!("round {r} of {rounds}:");
        print_run(&run);
        for (b, n) in run.drops.iter().filter(|(_, n)| *n > 0) {
            println!("{b}: UDP receive-buffer drops on the receiving host: {n}");
        }
        runs.push(run);
    }
    print_summary(&runs);
}

/// One run's table: each path's Gbit/s, its ratio to vxlan and to the underlay, flanneld's CPU per
/// Gbit and resident memory.
fn print_run(run: &Run) {
    let Run { underlay, rows, .. } = run;
    let underlay = *underlay;
    let vxlan = rows
        .iter()
        .find(|(b, _)| b == "vxlan")
        .map_or(0.0, |(_, r)| r.gbps);
    println!(
        "{:<12} {:>8} {:>10} {:>13} {:>24} {:>18}",
        "path", "Gbit/s", "vs_vxlan", "vs_underlay", "flanneld_cpu_s_per_Gbit", "flanneld_rss_MiB"
    );
    // Without vxlan there is no underlay row, and no ratio to it.
    if underlay > 0.0 {
        println!(
            "{:<12} {:>8.2} {:>10} {:>13.2} {:>24} {:>18}",
            "underlay", underlay, "-", 1.0, "-", "-"
        );
    }
    for (b, r) in rows {
        let (rv, ru) = (ratio(r.gbps, vxlan), ratio(r.gbps, underlay));
        println!(
            "{b:<12} {:>8.2} {rv:>10} {ru:>13} {:>24.3} {:>18.1}",
            r.gbps, r.cpu_per_gbit, r.rss
        );
    }
}

/// Each path over all rounds: median and range of its Gbit/s and of its ratio to vxlan in the
/// same round, its median CPU per Gbit and its largest resident memory.
fn print_summary(runs: &[Run]) {
    println!("summary of {} rounds (median, min-max):", runs.len());
    println!(
        "{:<12} {:>8} {:>13} {:>9} {:>11} {:>24} {:>18}",
        "path",
        "Gbit/s",
        "range",
        "vs_vxlan",
        "range",
        "flanneld_cpu_s_per_Gbit",
        "flanneld_rss_MiB"
    );
    let mut paths: Vec<&str> = Vec::new();
    for run in runs {
        for (b, _) in &run.rows {
            if !paths.contains(&b.as_str()) {
                paths.push(b);
            }
        }
    }
    let range = |v: &[f64], digits: usize| match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => format!("{lo:.digits$}-{hi:.digits$}"),
        _ => "-".into(),
    };
    let mut underlay: Vec<f64> = runs
        .iter()
        .map(|r| r.underlay)
        .filter(|u| *u > 0.0)
        .collect();
    if !underlay.is_empty() {
        let m = median(&mut underlay);
        println!(
            "{:<12} {m:>8.2} {:>13} {:>9} {:>11} {:>24} {:>18}",
            "underlay",
            range(&underlay, 2),
            "-",
            "-",
            "-",
            "-"
        );
    }
    for path in paths {
        let mut gbps = Vec::new();
        let mut vs_vxlan = Vec::new();
        let mut cpu = Vec::new();
        let mut rss: f64 = 0.0;
        for run in runs {
            let rows = &run.rows;
            let vxlan = rows.iter().find(|(b, _)| b == "vxlan").map(|(_, r)| r.gbps);
            if let Some((_, r)) = rows.iter().find(|(b, _)| b == path) {
                gbps.push(r.gbps);
                cpu.push(r.cpu_per_gbit);
                rss = rss.max(r.rss);
                if let Some(v) = vxlan.filter(|v| *v > 0.0) {
                    vs_vxlan.push(r.gbps / v);
                }
            }
        }
        let g = median(&mut gbps);
        let c = median(&mut cpu);
        let (v, vr) = if vs_vxlan.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (format!("{:.2}", median(&mut vs_vxlan)), range(&vs_vxlan, 2))
        };
        println!(
            "{path:<12} {g:>8.2} {:>13} {v:>9} {vr:>11} {c:>24.3} {rss:>18.1}",
            range(&gbps, 2)
        );
    }
}
