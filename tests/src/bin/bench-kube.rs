//! Benchmark: Kubernetes mode at scale. 5000 Nodes (each annotated as a flannel peer) in the
//! stand-in API server, one real `flanneld --kube-subnet-mgr` in the netns lab. Prints, for vxlan and
//! host-gw: the time from starting flanneld until every peer's entries are installed; the time from
//! the last of 5000 node updates sent at full speed (every peer gets a new VTEP MAC or public IP)
//! until the kernel matches; the entries missing after each (must be 0); flanneld's resident memory
//! after the updates and its peak.
//!
//! Needs root. `cargo build --release --workspace && ./target/release/bench-kube [NODES]`

use std::time::{Duration, Instant};

use flannel_tests::bench::{FakePeer, status_mib, wait_for};
use flannel_tests::bin_path;
use flannel_tests::lab::{Lab, LabSpec};

const P: &str = "flannel.alpha.coreos.com/";

fn annotations(backend: &str, p: &FakePeer) -> Vec<(String, String)> {
    let data = if backend == "vxlan" {
        p.vxlan_data()
    } else {
        "null".into()
    };
    vec![
        (format!("{P}kube-subnet-manager"), "true".into()),
        (format!("{P}backend-type"), backend.into()),
        (format!("{P}backend-data"), data),
        (format!("{P}public-ip"), p.public_ip.clone()),
    ]
}

const USAGE: &str = "usage: bench-kube [NODES]
  NODES: peer Nodes in the stand-in API server, 1 to 38500 (default 5000)
needs root (network namespaces)";

fn main() {
    let args = flannel_tests::bench::args(USAGE);
    let n = match args.as_slice() {
        [] => 5000,
        [a] => flannel_tests::bench::number_arg(
            USAGE,
            "NODES",
            a,
            1..=flannel_tests::bench::MAX_FAKE_PEERS,
        ),
        _ => flannel_tests::bench::bad_args(USAGE, "one argument at most"),
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench-kube needs root (network namespaces)");
        std::process::exit(1);
    }
    println!(
        "{:<8} {:>6} {:>9} {:>8} {:>10} {:>8} {:>8} {:>9}",
        "backend", "nodes", "start_ms", "missing", "update_ms", "missing", "rss_MiB", "peak_MiB"
    );
    for backend in ["vxlan", "host-gw"] {
        let config = format!(r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"{backend}"}}}}"#);
        let lab = Lab::new_kube(
            &LabSpec {
                segments: vec![1],
                config,
                flanneld_args: vec!["--iptables-forward-rules=false".into()],
            },
            bin_path("flanneld"),
        );
        let mut lab = lab;
        let api = lab.api();
        for i in 0..n {
            let p = FakePeer::new(i, 0);
            let a = annotations(backend, &p);
            let a: Vec<(&str, &str)> = a.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            api.add_annotated_node(&format!("peer{i}"), &[&p.subnet], &a);
        }
        // (a) From process start until every peer's entries are in the kernel.
        let start = Instant::now();
        lab.start_flanneld(0);
        let (_, miss_start) = wait_for(&lab, &[0], n, backend, 0, Duration::from_secs(60));
        let start_ms = start.elapsed().as_secs_f64() * 1000.0;
        // (b) Every node updated at full speed; from the last update until the kernel matches.
        let api = lab.api();
        for i in 0..n {
            let p = FakePeer::new(i, 1);
            let a = annotations(backend, &p);
            api.update_node(&format!("peer{i}"), |node| {
                for (k, v) in &a {
                    node["metadata"]["annotations"][k] = serde_json::json!(v);
                }
            });
        }
        let (update, miss_update) = wait_for(&lab, &[0], n, backend, 1, Duration::from_secs(60));
        let pid = lab.flanneld_pid(0);
        let rss = status_mib(pid, "VmRSS:");
        let peak = status_mib(pid, "VmHWM:");
        println!(
            "{backend:<8} {n:>6} {start_ms:>9.0} {miss_start:>8} {:>10.0} {miss_update:>8} {rss:>8.1} {peak:>9.1}",
            update.as_secs_f64() * 1000.0
        );
    }
}
