//! The flanneld binaries as a user runs them: flags, environment, config errors, the backend
//! registry, and a third-party flanneld (flanneld-peerlog) writing subnet.env from etcd.

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

/// Runs `f` with a client of the etcd at `url`, on a runtime of its own.
fn with_etcd<T>(url: &str, f: impl AsyncFnOnce(&mut etcd_client::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([url], None).await.unwrap();
        f(&mut c).await
    })
}

fn etcdctl_put(url: &str, key: &str, value: &str) {
    with_etcd(url, async |c| {
        c.put(key, value, None).await.unwrap();
    });
}

fn etcdctl_delete(url: &str, key: &str) {
    with_etcd(url, async |c| {
        c.delete(key, None).await.unwrap();
    });
}

fn etcd_get(url: &str, prefix: &str) -> Vec<(String, String)> {
    with_etcd(url, async |c| {
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
    // This test binary links flanneld (and so its in-tree backend crates) and flanneld-peerlog.
    use flanneld_peerlog as _;
    assert_eq!(
        flannel_core::registered_backends(),
        vec![
            "alloc",
            "extension",
            "host-gw",
            "ipip",
            "ipsec",
            "peer-log",
            "udp",
            "vxlan",
            "wireguard"
        ]
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
        "flanneld",
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
    // The plain flanneld does not link the example's peer-log: the error lists what it knows.
    etcdctl_put(
        &etcd.url(),
        "/coreos.com/network/config",
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"peer-log"}}"#,
    );
    let p = start("flanneld", &etcd, dir.path(), &["--iface=lo"], &[]);
    let (code, err) = p.stop_when_exited(Duration::from_secs(15));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown backend type \"peer-log\""), "{err}");
    assert!(
        err.contains("alloc, extension, host-gw, ipip, ipsec, udp, vxlan, wireguard"),
        "{err}"
    );
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
        "flanneld-peerlog",
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
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"PEER-LOG"}}"#,
    );
    let text = wait_for(&env_path, Duration::from_secs(15)).expect("subnet.env written");
    let leases = etcd_get(&etcd.url(), "/coreos.com/network/subnets/");
    assert_eq!(leases.len(), 1);
    let (key, value) = &leases[0];
    assert_eq!(
        value,
        r#"{"PublicIP":"10.0.0.21","PublicIPv6":null,"BackendType":"peer-log","BackendData":{"Interface":"lo"}}"#,
        "the third-party backend's type and data"
    );
    // Its network sees a peer come (and ignores a lease of another type).
    etcdctl_put(
        &etcd.url(),
        "/coreos.com/network/subnets/10.5.77.0-24",
        r#"{"PublicIP":"10.0.0.77","PublicIPv6":null,"BackendType":"peer-log"}"#,
    );
    etcdctl_put(
        &etcd.url(),
        "/coreos.com/network/subnets/10.5.78.0-24",
        r#"{"PublicIP":"10.0.0.78","PublicIPv6":null,"BackendType":"vxlan"}"#,
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
    std::thread::sleep(Duration::from_millis(1000));
    // ... and go.
    etcdctl_delete(&etcd.url(), "/coreos.com/network/subnets/10.5.77.0-24");
    std::thread::sleep(Duration::from_millis(1000));
    let (code, err) = p.stop();
    assert_eq!(code, Some(0), "SIGTERM is a clean exit: {err}");
    assert!(
        err.lines().any(
            |l| l.contains("peer added or changed") && l.contains("10.5.77.0-24 via 10.0.0.77")
        ),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("peer removed") && l.contains("10.5.77.0-24 via 10.0.0.77")),
        "the removal carries the lease as it was: {err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("not a peer-log lease") && l.contains("10.5.78.0-24")),
        "{err}"
    );
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
    assert!(
        etcd_get(&etcd.url(), "/coreos.com/network/subnets/")
            .iter()
            .any(|(k, _)| k == key)
    );
    // A restart keeps the subnet.
    let p = start(
        "flanneld-peerlog",
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
    let etcd = etcd_with_alloc_config();
    let dir = tempfile::tempdir().unwrap();
    let (sock, sock_path) = notify_socket(dir.path());
    let notify = sock_path.display().to_string();
    let p = start(
        "flanneld",
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
    // The shipped alloc backend writes upstream's alloc lease: no BackendType, no data.
    let leases = etcd_get(&etcd.url(), "/coreos.com/network/subnets/");
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].1, r#"{"PublicIP":"10.0.0.31","PublicIPv6":null}"#);
    let (code, _) = p.stop();
    assert_eq!(code, Some(0));
}

/// A descriptor systemd kept for a backend this flanneld does not run (udp's socket, after the host
/// moved to another backend) is closed and dropped from the store, not kept open for good.
#[test]
fn descriptors_no_backend_takes_are_closed_and_dropped_from_the_store() {
    if !require_etcd("descriptors_no_backend_takes_are_closed") {
        return;
    }
    let etcd = etcd_with_alloc_config();
    let dir = tempfile::tempdir().unwrap();
    let (sock, sock_path) = notify_socket(dir.path());
    let kept = dir.path().join("kept-by-systemd");
    std::fs::write(&kept, "").unwrap();
    // The shell opens descriptor 3 and sets LISTEN_PID to its own PID, which exec hands to flanneld:
    // what systemd does for a service with a stored descriptor.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"exec 3<"$KEPT"; LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(bin_path("flanneld"))
        .arg(format!("--etcd-endpoints={}", etcd.url()))
        .arg(format!(
            "--subnet-file={}",
            dir.path().join("subnet.env").display()
        ))
        .args([
            "--iptables-forward-rules=false",
            "--iface=lo",
            "--public-ip=10.0.0.32",
        ])
        .env("KEPT", &kept)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "flannel-udp")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let p = Proc::spawn(&mut cmd);
    let mut buf = [0u8; 128];
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("READY=1") {
        let n = sock
            .recv(&mut buf)
            .expect("flanneld sent nothing more to NOTIFY_SOCKET");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(got, ["FDSTOREREMOVE=1\nFDNAME=flannel-udp", "READY=1"]);
    let open: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", p.0.id()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    assert!(
        !open.iter().any(|t| t.ends_with("kept-by-systemd")),
        "the kept descriptor is still open: {open:?}"
    );
    let (code, log) = p.stop();
    assert_eq!(code, Some(0));
    assert!(log.contains("closed a descriptor"), "{log}");
}

/// A datagram socket in `dir` standing in for systemd's `NOTIFY_SOCKET`, and its path.
fn notify_socket(dir: &Path) -> (std::os::unix::net::UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    (sock, path)
}

/// A directory of executable shell scripts standing in for tools (put it first on `PATH`).
fn fake_tools(tools: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (tool, script) in tools {
        let p = dir.path().join(tool);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    dir
}

/// flanneld (the alloc backend) with `--ip-masq` against `etcd`, whose firewall tools are the scripts in `fakes`
/// (the root namespace's real firewall is never touched), plus `extra` flags.
fn alloc_with_fake_firewall(
    etcd: &EtcdServer,
    dir: &Path,
    fakes: &Path,
    public_ip: &str,
    extra: &[String],
) -> Proc {
    Proc::spawn(
        Command::new(bin_path("flanneld"))
            .arg(format!("--etcd-endpoints={}", etcd.url()))
            .arg(format!(
                "--subnet-file={}",
                dir.join("subnet.env").display()
            ))
            .args(["--iface=lo", "--ip-masq"])
            .arg(format!("--public-ip={public_ip}"))
            .args(extra)
            .env("PATH", format!("{}:/usr/bin:/bin", fakes.display()))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

/// A fresh etcd holding a network config for the alloc backend.
fn etcd_with_alloc_config() -> EtcdServer {
    let etcd = EtcdServer::start();
    etcdctl_put(
        &etcd.url(),
        "/coreos.com/network/config",
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    etcd
}

/// `GET path` on 127.0.0.1:`port` with a deadline; the status line, or None when nothing answered.
fn http_status(port: u16, path: &str, within: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        within,
    )
    .ok()?;
    c.set_read_timeout(Some(within)).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    out.lines().next().map(str::to_string)
}

#[test]
fn a_hung_iptables_does_not_freeze_flanneld() {
    if !require_etcd("a_hung_iptables_does_not_freeze_flanneld") {
        return;
    }
    // iptables, iptables-restore, ip6tables and nft that hang, as `iptables -w` does while another
    // program holds the xtables lock. (Fakes on PATH: the root namespace's firewall is never touched.)
    let hang = "#!/bin/sh\nexec sleep 60\n";
    let fakes = fake_tools(&[
        ("iptables", hang),
        ("iptables-restore", hang),
        ("ip6tables", hang),
        ("ip6tables-restore", hang),
        ("nft", hang),
    ]);
    let etcd = etcd_with_alloc_config();
    let dir = tempfile::tempdir().unwrap();
    let port = flannel_tests::free_port();
    let p = alloc_with_fake_firewall(
        &etcd,
        dir.path(),
        fakes.path(),
        "10.0.0.30",
        &[
            format!("--healthz-port={port}"),
            "--healthz-ip=127.0.0.1".into(),
        ],
    );
    // It gets as far as the firewall rules (the lease is in etcd), where iptables hangs...
    let deadline = Instant::now() + Duration::from_secs(15);
    while etcd_get(&etcd.url(), "/coreos.com/network/subnets/").is_empty() {
        assert!(Instant::now() < deadline, "no lease acquired");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    // ...and still answers /healthz (and says it is not ready).
    for _ in 0..3 {
        assert_eq!(
            http_status(port, "/healthz", Duration::from_secs(2)).as_deref(),
            Some("HTTP/1.1 200 OK"),
            "/healthz must answer while iptables hangs"
        );
        let ready = http_status(port, "/readyz", Duration::from_secs(2)).unwrap_or_default();
        assert!(ready.contains("503"), "{ready}");
    }
    assert!(
        !dir.path().join("subnet.env").exists(),
        "not ready without its rules"
    );
    // SIGTERM ends it promptly, hung child and all.
    let t = Instant::now();
    let (code, err) = p.stop();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_second_signal_exits_at_once() {
    if !require_etcd("a_second_signal_exits_at_once") {
        return;
    }
    // A store that never answers: flanneld waits for it; the first SIGTERM starts a graceful stop,
    // a second one ends the process at once.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(
        Command::new(bin_path("flanneld"))
            .arg(format!("--etcd-endpoints={url}"))
            .arg(format!(
                "--subnet-file={}",
                dir.path().join("subnet.env").display()
            ))
            .args(["--iface=lo", "--iptables-forward-rules=false"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(800));
    let pid = p.0.id() as i32;
    // SAFETY: signals to our own child, by PID.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // Half of the first signal's 1 s grace: the second one ends it before the grace is over, with
    // 128 + 15 (a graceful end would be 0).
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let (code, err) = p.stop_when_exited(Duration::from_secs(5));
    assert_eq!(code, Some(143), "{err}");
    assert!(err.contains("second stop signal"), "{err}");
}

#[test]
fn unreadable_rules_are_an_error_not_a_blind_rebuild() {
    if !require_etcd("unreadable_rules_are_an_error_not_a_blind_rebuild") {
        return;
    }
    // An iptables whose listings fail (not "no such chain"): flanneld must not take that for
    // "rules missing" and rebuild through iptables-restore, which records that it was called.
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("restore-called");
    let restore = format!("#!/bin/sh\ntouch {}\n", marker.display());
    let fakes = fake_tools(&[
        (
            "iptables",
            "#!/bin/sh\ncase \"$*\" in *--version*) echo 'iptables v1.8.9 (nf_tables)';; *) echo 'iptables: Permission denied (you must be root)' >&2; exit 4;; esac\n",
        ),
        ("iptables-restore", &restore),
        ("nft", "#!/bin/sh\nexit 0\n"),
    ]);
    let etcd = etcd_with_alloc_config();
    let dir = tempfile::tempdir().unwrap();
    let p = alloc_with_fake_firewall(&etcd, dir.path(), fakes.path(), "10.0.0.31", &[]);
    let (code, err) = p.stop_when_exited(Duration::from_secs(15));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Permission denied"),
        "the cause is named: {err}"
    );
    assert!(
        !marker.exists(),
        "rules were rebuilt blindly after a failed listing"
    );
}
