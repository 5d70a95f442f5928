//! Benchmark: how fast flanneld's kernel backends follow the lease set, in the netns lab.
//!
//! For vxlan, host-gw and wireguard (its peers counted as `wg show` reads them: userspace devices
//! on a kernel without WireGuard): (a) N = 100, 1000, 5000 fake peer leases written to etcd as fast as it takes
//! them while flanneld runs on two hosts: time from the last write until both hosts hold every kernel
//! entry, and entries still missing after that; (b) a third host joining with 5000 leases present:
//! time until its entries are installed (from process start); (c) time to remove them all after the
//! leases are deleted; (d) flanneld's resident memory idle and at 5000 and 20,000 peers; (e) the CPU
//! flanneld uses per idle minute at 5000 and 20,000 peers (over a window holding one safety-net
//! resync: at least its interval); (f) while the leases arrive, a pod on host 0 pings one on host 1
//! every 5 ms for 3 s: the pings lost and the longest round trip (how long the pods' traffic is
//! held up while flanneld takes the new peers in).
//!
//! Needs root. `cargo build --release --workspace && ./target/release/bench-dataplane
//! [vxlan|host-gw|wireguard] [PEERS...]` (default: all three, 100 1000 5000 20000 peers). Each row also shows host 0's
//! flanneld counters for that step: reconcile passes and full reads of the kernel. `install_ms` is
//! what polling `ip` sees (one look at 20,000 vxlan peers dumps 120,000 entries, so it can be up to
//! two looks late); `applied_ms` is flanneld's own clock, from the last write until the later host's
//! last pass that worked ended (`flannel_reconcile_last_success_timestamp_seconds`).

use std::time::{Duration, Instant};

use flannel_tests::bench::{self, FakePeer, status_mib};
use flannel_tests::bin_path;
use flannel_tests::lab::{Lab, LabSpec};

struct Fake {
    key: String,
    value: String,
}

fn fakes(n: usize, backend: &str) -> Vec<Fake> {
    (0..n)
        .map(|i| {
            let p = FakePeer::new(i, 0);
            Fake {
                key: format!("/coreos.com/network/subnets/{}", p.subnet.replace('/', "-")),
                value: bench::lease_value(&p, backend),
            }
        })
        .collect()
}

fn wait_for(
    lab: &Lab,
    hosts: &[usize],
    n: usize,
    backend: &str,
    timeout: Duration,
) -> (Duration, usize) {
    bench::wait_for(lab, hosts, n, backend, 0, timeout)
}

/// CPU seconds flanneld (host 0) uses per minute while nothing changes, over a window that holds
/// one safety-net resync: at least the resync interval for `entries` kernel entries, extended
/// until a full read of the kernel has happened in it (at most twice the interval). Returns the
/// figure and the window's length in seconds.
fn idle_cpu_per_minute(lab: &Lab, entries: usize) -> (f64, f64) {
    let Some(pid) = lab.flanneld_pid(0) else {
        return (0.0, 0.0);
    };
    let ticks = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // utime and stime are fields 14 and 15; the command name (field 2) may hold spaces.
        let rest = stat.rsplit(')').next().unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        n(11) + n(12)
    };
    let reads = || {
        lab.metric(0, 8081, "flannel_kernel_reads_total")
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let interval = flannel_dataplane::driver::resync_interval(Duration::from_secs(60), entries);
    let (start, before, reads0) = (Instant::now(), ticks(pid), reads());
    std::thread::sleep(interval);
    while reads() <= reads0 && start.elapsed() < 2 * interval {
        std::thread::sleep(Duration::from_secs(2));
    }
    // The pass that follows the read, and the notifications it causes.
    std::thread::sleep(Duration::from_secs(2));
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    ((ticks(pid) - before) / hz / minutes, minutes * 60.0)
}

/// The kernel's own cost of installing `n` per-peer routes in a fresh namespace, with `ip -batch`
/// (no flanneld): routes via a distinct on-link gateway each on one device, as flannel's vxlan and
/// host-gw routes are; the same routes through nexthop objects; and routes sharing one gateway.
/// Returns milliseconds for each.
fn kernel_floor(n: usize) -> (f64, f64, f64) {
    let ns = flannel_tests::netns::Netns::new("fib");
    for cmd in [
        "ip link add fltfib0 type veth peer name fltfib1",
        "ip addr add 10.0.0.1/32 dev fltfib0",
        "ip addr add 192.0.2.2/24 dev fltfib1",
        "ip link set fltfib0 up",
        "ip link set fltfib1 up",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>())
            .expect("set up the floor namespace");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let subnet = |i: usize| format!("{}.{}.{}", 10 + i / 62_500, 1 + (i / 250) % 250, i % 250);
    let mut distinct = String::new();
    let mut nexthops = String::new();
    let mut nh_routes = String::new();
    let mut shared = String::new();
    for i in 0..n {
        let s = subnet(i);
        distinct.push_str(&format!(
            "route add {s}.0/24 via {s}.0 dev fltfib0 onlink\n"
        ));
        nexthops.push_str(&format!(
            "nexthop add id {} via {s}.0 dev fltfib0 onlink\n",
            i + 1
        ));
        nh_routes.push_str(&format!("route add {s}.0/24 nhid {} table 100\n", i + 1));
        shared.push_str(&format!(
            "route add {s}.0/24 via 192.0.2.1 dev fltfib1 table 200\n"
        ));
    }
    let time = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write batch");
        let start = Instant::now();
        ns.exec(&["ip", "-batch", &path.to_string_lossy()])
            .expect("ip -batch");
        start.elapsed().as_secs_f64() * 1000.0
    };
    let a = time("distinct", distinct);
    let b = time("nexthops", nexthops + &nh_routes);
    let c = time("shared", shared);
    (a, b, c)
}

fn rss_mib(pid: Option<u32>) -> f64 {
    status_mib(pid, "VmRSS:")
}

const USAGE: &str = "usage: bench-dataplane [BACKEND...] [PEERS...]
  BACKEND: vxlan, host-gw, wireguard (default: all three)
  PEERS: fake peer leases per step, 1 to 38500 (default: 100 1000 5000 20000)
needs root (network namespaces)";

fn main() {
    let args = flannel_tests::bench::args(USAGE);
    const BACKENDS: [&str; 3] = ["vxlan", "host-gw", "wireguard"];
    for a in &args {
        if !BACKENDS.contains(&a.as_str()) {
            flannel_tests::bench::number_arg(
                USAGE,
                "PEERS",
                a,
                1..=flannel_tests::bench::MAX_FAKE_PEERS,
            );
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench-dataplane needs root (network namespaces)");
        std::process::exit(1);
    }
    let flanneld = bin_path("flanneld");
    let named = |a: &String| BACKENDS.contains(&a.as_str());
    let backends: Vec<&str> = BACKENDS
        .into_iter()
        .filter(|b| !args.iter().any(named) || args.iter().any(|a| a == b))
        .collect();
    let mut sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![100, 1000, 5000, 20_000];
    }
    println!(
        "{:<8} {:>6} {:>11} {:>10} {:>8} {:>10} {:>8} {:>11} {:>9} {:>7} {:>6} {:>9} {:>9}",
        "backend",
        "peers",
        "install_ms",
        "applied_ms",
        "missing",
        "remove_ms",
        "rss_MiB",
        "settled_MiB",
        "peak_MiB",
        "passes",
        "reads",
        "anon_MiB",
        "file_MiB"
    );
    let mut joins = Vec::new();
    let mut idle_cpu = Vec::new();
    let mut probes = Vec::new();
    for backend in backends {
        let spec = LabSpec {
            segments: vec![3],
            config: format!(r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"{backend}"}}}}"#),
            flanneld_args: vec!["--healthz-port=8081".into()],
        };
        let counters = |lab: &Lab| {
            let m = |name| lab.metric(0, 8081, name).unwrap_or(0.0);
            (
                m("flannel_reconcile_runs_total"),
                m("flannel_kernel_reads_total"),
            )
        };
        let mut lab = Lab::new(&spec, flanneld.clone());
        lab.start_flanneld(0);
        lab.start_flanneld(1);
        std::thread::sleep(Duration::from_secs(1));
        let idle = rss_mib(lab.flanneld_pid(0));
        let (anon, file) = (
            status_mib(lab.flanneld_pid(0), "RssAnon:"),
            status_mib(lab.flanneld_pid(0), "RssFile:"),
        );
        println!(
            "{backend:<8} {:>6} {:>11} {:>10} {:>8} {:>10} {idle:>8.1} {:>11} {:>9} {:>7} {:>6} {anon:>9.1} {file:>9.1}",
            0, "-", "-", "-", "-", "-", "-", "-", "-"
        );
        // Pods for the probe below (after the idle figures).
        lab.add_pods(0, 1);
        lab.add_pods(1, 1);
        for &n in &sizes {
            let leases = fakes(n, backend);
            let (passes0, reads0) = counters(&lab);
            // A pod on host 0 pings one on host 1 every 5 ms (3 s) while the leases arrive: how
            // long the pods' traffic is held up while flanneld takes the new peers in.
            let to = lab.hosts[1].pods[0].ip;
            let mut installed = None;
            let probe = lab.ping_probe((0, 0), to, Duration::from_millis(5), 600, |lab| {
                lab.etcd_put_many(
                    leases
                        .iter()
                        .map(|f| (f.key.clone(), f.value.clone()))
                        .collect(),
                );
                let written = unix_now();
                let r = wait_for(lab, &[0, 1], n, backend, Duration::from_secs(60));
                installed = Some((written, r));
            });
            probes.push((backend, n, probe));
            let Some((written, (install, miss))) = installed else {
                unreachable!("the install step ran")
            };
            // flanneld's own clock: when its last pass that worked ended, on the later host (the
            // polling above can only see it up to one look late, and at 20,000 vxlan peers one
            // look dumps 120,000 entries).
            let done = [0, 1]
                .iter()
                .filter_map(|&h| {
                    lab.metric(h, 8081, "flannel_reconcile_last_success_timestamp_seconds")
                })
                .fold(0.0f64, f64::max);
            let applied_ms = ((done - written) * 1000.0).max(0.0);
            let (passes1, reads1) = counters(&lab);
            let rss = rss_mib(lab.flanneld_pid(0));
            std::thread::sleep(Duration::from_secs(6));
            let settled = rss_mib(lab.flanneld_pid(0));
            let peak = status_mib(lab.flanneld_pid(0), "VmHWM:");
            // What the settled figure is made of: the heap and stacks, and mapped file pages
            // (flanneld's code, mostly).
            let (anon, file) = (
                status_mib(lab.flanneld_pid(0), "RssAnon:"),
                status_mib(lab.flanneld_pid(0), "RssFile:"),
            );
            if n >= 5000 {
                // Host 0's peers: the fake ones and the lab's two other hosts.
                let peers = n + 2;
                // wireguard's kernel record is the one route into the network.
                let entries = match backend {
                    "vxlan" => 3 * peers,
                    "wireguard" => 1,
                    _ => peers,
                };
                let (cpu, window) = idle_cpu_per_minute(&lab, entries);
                idle_cpu.push((backend, n, cpu, window));
            }
            if n == 5000 {
                let start = Instant::now();
                lab.start_flanneld(2);
                let (t, m) = wait_for(&lab, &[2], n, backend, Duration::from_secs(60));
                let _ = t;
                joins.push((backend, start.elapsed().as_secs_f64() * 1000.0, m));
            }
            lab.etcd_delete_many(leases.iter().map(|f| f.key.clone()).collect());
            let hosts: Vec<usize> = if n == 5000 { vec![0, 1, 2] } else { vec![0, 1] };
            let (remove, left) = wait_for(&lab, &hosts, 0, backend, Duration::from_secs(60));
            let remove = if left == 0 {
                format!("{:.0}", remove.as_secs_f64() * 1000.0)
            } else {
                format!("{left} left")
            };
            println!(
                "{backend:<8} {n:>6} {:>11.0} {applied_ms:>10.0} {miss:>8} {remove:>10} {rss:>8.1} {settled:>11.1} {peak:>9.1} {:>7} {:>6} {anon:>9.1} {file:>9.1}",
                install.as_secs_f64() * 1000.0,
                passes1 - passes0,
                reads1 - reads0
            );
        }
    }
    println!();
    println!(
        "{:<8} {:>24} {:>8}",
        "backend", "join_with_5000_ms", "missing"
    );
    for (backend, ms, m) in joins {
        println!("{backend:<8} {ms:>24.0} {m:>8}");
    }
    println!();
    println!(
        "{:<8} {:>6} {:>22} {:>9}",
        "backend", "peers", "idle_cpu_s_per_minute", "window_s"
    );
    for (backend, n, cpu, window) in idle_cpu {
        println!("{backend:<8} {n:>6} {cpu:>22.3} {window:>9.0}");
    }
    println!();
    println!(
        "{:<8} {:>6} {:>11} {:>10} {:>16}",
        "backend", "peers", "pings_sent", "lost", "longest_rtt_ms"
    );
    for (backend, n, p) in probes {
        let max = p.max_ms.map_or("-".to_string(), |m| format!("{m:.1}"));
        println!(
            "{backend:<8} {n:>6} {:>11} {:>10} {max:>16}",
            p.sent,
            p.sent.saturating_sub(p.received)
        );
    }
    // What the kernel alone needs for the same number of routes (the floor under the install times).
    println!();
    println!(
        "{:>6} {:>24} {:>22} {:>20}",
        "routes", "distinct_gateways_ms", "nexthop_objects_ms", "shared_gateway_ms"
    );
    for &n in sizes.iter().filter(|&&n| n >= 5000) {
        let (a, b, c) = kernel_floor(n);
        println!("{n:>6} {a:>24.0} {b:>22.0} {c:>20.0}");
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
