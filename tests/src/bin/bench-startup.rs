//! Benchmark: flanneld start-up to `subnet.env` with 0, 1000 and 5000 leases already in etcd.
//!
//! Runs the real `flanneld` binary (the alloc backend: lease only, so the figure is the subnet
//! manager's start-up cost) against a real etcd on 127.0.0.1, five times per size, and prints the
//! median and the spread. Go flanneld v0.20.2 takes about 1.3 s at 5000 leases (one TTL lookup per
//! lease); the target here is under 0.2 s.
//!
//! `cargo build --release --workspace && ./target/release/bench-startup`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flannel_tests::bin_path;
use flannel_tests::etcd::EtcdServer;

const RUNS: usize = 5;

const USAGE: &str = "usage: bench-startup (no arguments; a real etcd on 127.0.0.1, no root needed)";

fn main() -> anyhow::Result<()> {
    if !flannel_tests::bench::args(USAGE).is_empty() {
        flannel_tests::bench::bad_args(USAGE, "bench-startup takes no arguments");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "{:>8} {:>12} {:>12} {:>12}",
        "leases", "median_ms", "min_ms", "max_ms"
    );
    for n in [0usize, 1000, 5000] {
        let etcd = EtcdServer::start();
        let url = etcd.url();
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([url.as_str()], None).await?;
            c.put("/coreos.com/network/config", r#"{"Network":"10.0.0.0/8","Backend":{"Type":"alloc"}}"#, None).await?;
            let mut tasks = Vec::new();
            for w in 0..20 {
                let mut c = c.clone();
                tasks.push(tokio::spawn(async move {
                    for i in (w..n).step_by(20) {
                        let (a, b) = ((i + 1) / 256, (i + 1) % 256);
                        let key = format!("/coreos.com/network/subnets/10.{a}.{b}.0-24");
                        let val = format!(r#"{{"PublicIP":"172.16.{a}.{b}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"aa:bb:cc:00:{a:02x}:{b:02x}"}}}}"#);
                        let lease = c.lease_grant(86400, None).await?.id();
                        c.put(key, val, Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        })?;
        let mut times = Vec::new();
        for run in 0..RUNS {
            let dir = tempfile::tempdir()?;
            let env = dir.path().join("subnet.env");
            let start = Instant::now();
            let mut child = Command::new(bin_path("flanneld"))
                .arg(format!("--etcd-endpoints={url}"))
                .arg(format!("--subnet-file={}", env.display()))
                .arg("--iface=lo")
                // Runs in the root namespace: never touch its firewall.
                .arg("--iptables-forward-rules=false")
                .arg(format!("--public-ip=192.0.2.{}", run + 1))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let deadline = start + Duration::from_secs(30);
            while !env.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let took = start.elapsed();
            let _ = child.kill();
            let _ = child.wait();
            anyhow::ensure!(
                env.exists(),
                "flanneld did not write subnet.env within 30 s at {n} leases"
            );
            times.push(took);
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{n:>8} {:>12.1} {:>12.1} {:>12.1}",
            ms(times[RUNS / 2]),
            ms(times[0]),
            ms(times[RUNS - 1])
        );
    }
    Ok(())
}
