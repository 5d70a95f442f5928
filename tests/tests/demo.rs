//! The README's main command: the demo runs to the end and every step succeeds (exit code 0), for the
//! default vxlan cluster, for dual-stack host-gw, udp, wireguard, extension, Kubernetes mode and
//! IPv6-only (ipip and ipsec say why they cannot run on a kernel without ipip tunnels or ESP; the
//! test VM runs them);
//! `--help` and bad options behave as a
//! command line should; and every way out (a closed stdout, SIGTERM, SIGHUP) stops every process the
//! demo started and deletes every namespace and directory it made.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flannel_tests::{bin_path, require_etcd, require_root};

use flannel_tests::run_demo as demo;

#[test]
fn help_and_bad_options() {
    let (code, out) = demo(&["--help"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("Usage: flannel-demo") && out.contains("--backend"),
        "{out}"
    );
    let (code, out) = demo(&["--bogus"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--bogus") && out.contains("Usage:"), "{out}");
    let (code, out) = demo(&["--backend", "tencent-vpc"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("tencent-vpc") && out.contains("vxlan"),
        "{out}"
    );
    let (code, out) = demo(&["--backend", "ipsec", "--ipv6"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("IPv4 only"), "{out}");
    let (code, out) = demo(&["--backend", "ipip", "--ipv6"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("IPv4 only"), "{out}");
    let (code, out) = demo(&["--hosts", "1"]);
    assert_eq!(code, Some(2), "{out}");
}

/// `--backend ipip`: where the kernel has no ipip tunnels (this machine's) the demo says so and
/// stops, failing, with nothing left behind; where it has them (the test VM runs it there:
/// vm-ipip-lab) the tour succeeds.
/// `--backend ipsec`: where the kernel has no ESP (this machine's) the demo says so and stops,
/// failing, with nothing left behind; where it has it (the test VM runs it there: vm-ipsec-lab)
/// the tour succeeds.
#[test]
fn the_ipsec_demo_runs_or_says_why_not() {
    if !require_root("the_ipsec_demo") || !require_etcd("the_ipsec_demo") {
        return;
    }
    let (code, out) = demo(&["--hosts", "2", "--backend", "ipsec"]);
    if out.contains("This kernel has no ESP") {
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains("modprobe esp4") && out.contains("done"),
            "{out}"
        );
        assert!(!out.contains("Starting flanneld"), "{out}");
    } else {
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("pings answered, 0 failed") && out.contains("put back"),
            "{out}"
        );
    }
}

#[test]
fn the_ipip_demo_runs_or_says_why_not() {
    if !require_root("the_ipip_demo") || !require_etcd("the_ipip_demo") {
        return;
    }
    let (code, out) = demo(&["--hosts", "2", "--backend", "ipip"]);
    if out.contains("This kernel has no ipip tunnels") {
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains("modprobe ipip") && out.contains("done"),
            "{out}"
        );
        assert!(!out.contains("Starting flanneld"), "{out}");
    } else {
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("pings answered, 0 failed"), "{out}");
    }
}

#[test]
fn the_demo_runs_clean() {
    if !require_root("the_demo_runs_clean") || !require_etcd("the_demo_runs_clean") {
        return;
    }
    for args in [
        &["--hosts", "2"][..],
        &["--hosts", "2", "--backend", "host-gw", "--ipv6"],
        &["--hosts", "2", "--backend", "udp"],
        &["--hosts", "2", "--backend", "wireguard"],
        &["--hosts", "2", "--backend", "extension"],
        &["--hosts", "2", "--kube"],
        &["--hosts", "2", "--ipv6-only"],
    ] {
        let (code, out) = demo(args);
        assert_eq!(code, Some(0), "flannel-demo {args:?}:\n{out}");
        assert!(out.contains(" 0 failed"), "{args:?}: {out}");
        assert!(out.contains("host2 pod: answered"), "{args:?}: {out}");
    }
    // Kubernetes mode shows the Node annotations and the condition flanneld set.
    let (_, out) = demo(&["--hosts", "2", "--kube", "--backend", "host-gw"]);
    assert!(
        out.contains("flannel.alpha.coreos.com/backend-type: host-gw")
            && out.contains("flannel.alpha.coreos.com/backend-data: null")
            && out.contains("NetworkUnavailable=False reason FlannelIsUp"),
        "{out}"
    );
    let (code, out) = demo(&["--backend", "extension", "--ipv6"]);
    assert_eq!(
        code,
        Some(2),
        "the demo's extension commands are IPv4: {out}"
    );
    let (code, out) = demo(&["--backend", "udp", "--ipv6"]);
    assert_eq!(code, Some(2), "udp with --ipv6 is refused up front: {out}");
    let (code, out) = demo(&["--backend", "udp", "--ipv6-only"]);
    assert_eq!(
        code,
        Some(2),
        "udp with --ipv6-only is refused up front: {out}"
    );
    let (code, out) = demo(&["--ipv6", "--ipv6-only"]);
    assert_eq!(code, Some(2), "--ipv6 and --ipv6-only together: {out}");
}

/// A demo started with its own TMPDIR, so everything it makes (etcd's data, flanneld's subnet
/// files, hence their command lines) can be found by path afterwards.
struct Demo {
    child: Child,
    tmp: tempfile::TempDir,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Demo {
    fn start(args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin_path("flannel-demo"))
            .args(args)
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, tmp, lines }
    }

    /// Reads stdout until a line contains `text`; returns what was read.
    fn read_until(&mut self, text: &str) -> String {
        let mut seen = String::new();
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(text) {
                return seen;
            }
        }
        panic!("the demo ended before printing {text:?}:\n{seen}");
    }

    /// Waits (up to 30 s) for the exit; returns the exit code and stderr.
    fn wait(mut self) -> (Option<i32>, String, tempfile::TempDir) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the demo did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut err).unwrap();
        (status.code(), err, self.tmp)
    }
}

/// Nothing of the demo with PID `pid` and TMPDIR `tmp` is left: no namespace, no process, no file.
fn assert_nothing_left(pid: u32, tmp: &Path) {
    let prefix = format!("flt{pid}-");
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    assert!(
        !ns.lines().any(|l| l.starts_with(&prefix)),
        "namespaces left behind:\n{ns}"
    );
    let needle = tmp.to_string_lossy().into_owned();
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                left.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
            }
        }
    }
    assert!(left.is_empty(), "processes left running: {left:?}");
    let files: Vec<_> = std::fs::read_dir(tmp).unwrap().flatten().collect();
    assert!(files.is_empty(), "files left in TMPDIR: {files:?}");
}

#[test]
fn a_closed_stdout_stops_and_cleans_up() {
    if !require_root("a_closed_stdout_stops_and_cleans_up")
        || !require_etcd("a_closed_stdout_stops_and_cleans_up")
    {
        return;
    }
    // `./scripts/demo | head`: the reader goes away while flanneld is starting.
    let mut d = Demo::start(&["--hosts", "2"]);
    let pid = d.child.id();
    d.read_until("=== Starting flanneld");
    let Demo { lines, .. } = &mut d;
    drop(std::mem::replace(
        lines,
        BufReader::new(empty_stdout()).lines(),
    ));
    let (code, err, tmp) = d.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("stdout was closed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_nothing_left(pid, tmp.path());
}

/// A stdout handle whose reading end is already closed, to swap in for the demo's.
fn empty_stdout() -> std::process::ChildStdout {
    let mut c = Command::new("true").stdout(Stdio::piped()).spawn().unwrap();
    let out = c.stdout.take().unwrap();
    c.wait().unwrap();
    out
}

#[test]
fn sigterm_and_sighup_stop_and_clean_up() {
    if !require_root("sigterm_and_sighup_stop_and_clean_up")
        || !require_etcd("sigterm_and_sighup_stop_and_clean_up")
    {
        return;
    }
    for (sig, at) in [
        (libc::SIGTERM, "=== Starting flanneld"),
        (libc::SIGHUP, "=== Holding the lab"),
    ] {
        let mut d = Demo::start(&["--hosts", "2", "--hold"]);
        let pid = d.child.id();
        d.read_until(at);
        // SAFETY: a signal to our own child, by PID.
        unsafe { libc::kill(pid as i32, sig) };
        let (code, err, tmp) = d.wait();
        assert_eq!(code, Some(128 + sig), "signal {sig}: {err}");
        assert!(err.contains("deleting every namespace"), "{err}");
        assert_nothing_left(pid, tmp.path());
    }
}
