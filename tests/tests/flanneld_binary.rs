//! The flanneld binaries as a user runs them: flags, environment, config errors, the backend
//! registry, and a third-party flanneld (flanneld-alloc) writing subnet.env from etcd.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flannel_tests::etcd::EtcdServer;
use flannel_tests::{Proc, bin_path, require_etcd};

fn wait_for(path: &Path, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(path) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn etcdctl_put(url: &str, key: &str, value: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([url], None).await.unwrap();
        c.put(key, value, None).await.unwrap();
    });
}

fn etcd_get(url: &str, prefix: &str) -> Vec<(String, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([url], None).await.unwrap();
        let r = c
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap().to_string(),
                    kv.value_str().unwrap().to_string(),
                )
            })
            .collect()
    })
}

#[test]
fn linked_backends_are_registered() {
    // This test binary links flanneld (and so its in-tree backend crates) and flanneld-alloc.
    use flanneld_alloc as _;
    assert_eq!(
        flannel_core::registered_backends(),
        vec!["alloc", "host-gw", "udp", "vxlan"]
    );
    assert_eq!(
        flannel_core::lookup_backend("ALLOC").unwrap().name,
        "alloc",
        "lookup ignores case"
    );
    let e = flannel_core::lookup_backend("vxlan-typo")
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"vxlan-typo\"") && e.contains("alloc"), "{e}");
}

#[test]
fn help_version_and_bad_flags() {
    let out = Command::new(bin_path("flanneld"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for f in [
        "--etcd-endpoints",
        "--iface",
        "--subnet-file",
        "--public-ip",
        "FLANNELD_",
    ] {
        assert!(help.contains(f), "--help lacks {f}");
    }
    let out = Command::new(bin_path("flanneld"))
        .arg("-version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        flanneld::VERSION,
        "Go prints the version to stderr"
    );
    let out = Command::new(bin_path("flanneld"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
    let out = Command::new(bin_path("flanneld"))
        .env("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "5000")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 1 and 1439"));
}

fn start(bin: &str, etcd: &EtcdServer, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(bin_path(bin));
    cmd.arg(format!("--etcd-endpoints={}", etcd.url()))
        .arg(format!(
            "--subnet-file={}",
            dir.join("subnet.env").display()
        ))
        // These run in the root namespace: never touch its firewall.
        .arg("--iptables-forward-rules=false")
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Proc::spawn(&mut cmd)
}

#[test]
fn unknown_backend_and_env_iface_are_reported() {
    if !require_etcd("unknown_backend_and_env_iface_are_reported") {
        return;
    }
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    etcdctl_put(
        &etcd.url(),
        "/coreos.com/network/config",
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    // FLANNELD_IFACE is picked up: a missing interface is named in the error.
    let p = start(
        "flanneld-alloc",
        &etcd,
        dir.path(),
        &[],
        &[("FLANNELD_IFACE", "flt-nosuch0")],
    );
    let (code, err) = p.stop_when_exited(Duration::from_secs(15));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("flt-nosuch0") && err.contains("Failed to find interface"),
        "{err}"
    );
    // The plain flanneld does not link alloc: the error lists what it knows.
    let p = start("flanneld", &etcd, dir.path(), &["--iface=lo"], &[]);
    let (code, err) = p.stop_when_exited(Duration::from_secs(15));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown backend type \"alloc\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn third_party_flanneld_waits_for_config_then_writes_subnet_env() {
    if !require_etcd("third_party_flanneld_waits_for_config") {
        return;
    }
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let env_path = dir.path().join("subnet.env");
    let p = start(
        "flanneld-alloc",
        &etcd,
        dir.path(),
        &["-iface=lo", "--public-ip=10.0.0.21"],
        &[],
    );
    // No config: it waits.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!env_path.exists());
    // Malformed config: it keeps waiting, no panic.
    etcdctl_put(
        &etcd.url(),
        "/coreos.com/network/config",
        r#"{"Network":"10.5.0.0/16","SubnetLen":"24"}"#,
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!env_path.exists());
    // Valid config: subnet.env appears with the lease.
    etcdctl_put(
        &etcd.url(),
        "/coreos.com/network/config",
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"ALLOC"}}"#,
    );
    let text = wait_for(&env_path, Duration::from_secs(15)).expect("subnet.env written");
    let leases = etcd_get(&etcd.url(), "/coreos.com/network/subnets/");
    assert_eq!(leases.len(), 1);
    let (key, value) = &leases[0];
    assert_eq!(
        value, r#"{"PublicIP":"10.0.0.21","PublicIPv6":null}"#,
        "alloc leases carry no BackendType"
    );
    let subnet = key.rsplit('/').next().unwrap().replace('-', "/");
    let sn: ipnet::Ipv4Net = subnet.parse().unwrap();
    let first = std::net::Ipv4Addr::from(u32::from(sn.addr()) + 1);
    assert_eq!(
        text,
        format!(
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET={first}/24\nFLANNEL_MTU=65536\nFLANNEL_IPMASQ=false\n"
        )
    );
    let (code, err) = p.stop();
    assert_eq!(code, Some(0), "SIGTERM is a clean exit: {err}");
    assert!(
        err.contains("flannel config not found in etcd store"),
        "{err}"
    );
    assert!(
        err.contains("config.SubnetLen"),
        "the malformed config is explained: {err}"
    );
    // stderr is a pipe here, not a terminal: the log carries no ANSI colour escapes.
    assert!(
        !err.contains('\x1b'),
        "colour escapes in a piped log: {err:?}"
    );
    // Data plane and lease stay: the key is still in etcd after exit.
    assert_eq!(
        etcd_get(&etcd.url(), "/coreos.com/network/subnets/").len(),
        1
    );
    // A restart keeps the subnet.
    let p = start(
        "flanneld-alloc",
        &etcd,
        dir.path(),
        &["--iface=lo", "--public-ip=10.0.0.21"],
        &[],
    );
    std::fs::remove_file(&env_path).unwrap();
    let again = wait_for(&env_path, Duration::from_secs(15)).expect("subnet.env rewritten");
    assert_eq!(again, text);
    let (code, _) = p.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn mk_docker_opts_matches_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("subnet.env");
    let out = dir.path().join("docker_opts.env");
    std::fs::write(&env, "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n").unwrap();
    let run = |extra: &[&str]| {
        Command::new(bin_path("mk-docker-opts"))
            .arg("-f")
            .arg(&env)
            .arg("-d")
            .arg(&out)
            .args(extra)
            .env_remove("DOCKER_OPTS")
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
    );
    let o = run(&["-c", "-k", "DOCKER_NETWORK_OPTIONS"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DOCKER_NETWORK_OPTIONS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
    );
    let o = run(&["-h"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Generate Docker daemon options"));
    std::fs::write(&env, "FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPMASQ=maybe\n").unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Invalid value of FLANNEL_IPMASQ: maybe"));
}

#[test]
fn sd_notify_ready_after_subnet_env() {
    if !require_etcd("sd_notify_ready_after_subnet_env") {
        return;
    }
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    etcdctl_put(
        &etcd.url(),
        "/coreos.com/network/config",
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let notify = sock_path.display().to_string();
    let p = start(
        "flanneld-alloc",
        &etcd,
        dir.path(),
        &["--iface=lo", "--public-ip=10.0.0.31"],
        &[("NOTIFY_SOCKET", notify.as_str())],
    );
    let mut buf = [0u8; 64];
    let n = sock
        .recv(&mut buf)
        .expect("flanneld sent nothing to NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(
        dir.path().join("subnet.env").exists(),
        "READY=1 only after subnet.env is written"
    );
    let (code, _) = p.stop();
    assert_eq!(code, Some(0));
}
