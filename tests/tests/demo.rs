//! The README's main command: the demo runs to the end and every step succeeds (exit code 0), for the
//! default vxlan cluster and for dual-stack host-gw and udp.

use std::process::Command;

use flannel_tests::{bin_path, require_etcd, require_root};

fn demo(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin_path("flannel-demo"))
        .args(args)
        .output()
        .expect("run flannel-demo");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
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
    ] {
        let (code, out) = demo(args);
        assert_eq!(code, Some(0), "flannel-demo {args:?}:\n{out}");
        assert!(out.contains(" 0 failed"), "{args:?}: {out}");
        assert!(out.contains("host2 pod: answered"), "{args:?}: {out}");
    }
    let (code, out) = demo(&["--backend", "udp", "--ipv6"]);
    assert_eq!(code, Some(2), "udp with --ipv6 is refused up front: {out}");
}
