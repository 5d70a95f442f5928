//! The set-up scripts as a new user meets them: `scripts/check-deps` passes on a machine that ran
//! `scripts/install-deps`, and fails, naming the missing piece and the Debian package that brings
//! it, when a tool, the well-known `.proto` files, a CNI plugin or the CA certificates are missing.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use flannel_tests::skip;

fn repo() -> PathBuf {
    flannel_tests::repo_root()
}

/// Runs `scripts/check-deps` with extra environment; returns (exit code, stderr).
fn check_deps(env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let out = Command::new("/bin/bash")
        .arg(repo().join("scripts/check-deps"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The check must pass here before its failures mean anything: true when it does, else skips.
fn machine_is_set_up(test: &str) -> bool {
    let (code, err) = check_deps(&[]);
    code == Some(0) || skip(test, &format!("run ./scripts/install-deps first:\n{err}"))
}

/// The tools the check looks for, each linked into `dir` unless it is in `leave_out`.
fn path_without(dir: &Path, leave_out: &[&str]) {
    let tools = [
        "cargo",
        "cc",
        "protoc",
        "etcd",
        "etcdctl",
        "ip",
        "ping",
        "iperf3",
        "iptables",
        "iptables-restore",
        "ip6tables",
        "nft",
        "openssl",
        "pgrep",
        "buildah",
        "busybox",
        "kubectl",
        "tcpdump",
        "wireguard-go",
        "wg",
        "systemctl",
        "unshare",
        "nsenter",
        "taskset",
        "swanctl",
        "qemu-system-x86_64",
        "mktemp",
        "rm",
    ];
    for t in tools.iter().filter(|t| !leave_out.contains(t)) {
        let out = Command::new("/bin/bash")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .unwrap();
        let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!found.is_empty(), "{t} is not installed");
        std::os::unix::fs::symlink(found, dir.join(t)).unwrap();
    }
}

fn problems(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("  - ")).collect()
}

#[test]
fn check_deps_passes_on_a_set_up_machine() {
    if !machine_is_set_up("check_deps_passes_on_a_set_up_machine") {
        return;
    }
    let (code, err) = check_deps(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.is_empty(), "a passing check is silent: {err}");
}

#[test]
fn check_deps_names_a_missing_protoc_and_its_package() {
    if !machine_is_set_up("check_deps_names_a_missing_protoc") {
        return;
    }
    let bin = tempfile::tempdir().unwrap();
    path_without(bin.path(), &["protoc"]);
    let (code, err) = check_deps(&[("PATH", bin.path())]);
    assert_eq!(code, Some(1), "{err}");
    let p = problems(&err);
    assert_eq!(p.len(), 1, "only protoc is missing: {err}");
    assert!(
        p[0].contains("protoc not found") && p[0].contains("protobuf-compiler"),
        "{err}"
    );
    assert!(
        err.contains("./scripts/install-deps"),
        "says what to run: {err}"
    );

    // Several missing pieces are all named, each with its package.
    let bin = tempfile::tempdir().unwrap();
    path_without(bin.path(), &["etcd", "nft", "iptables-restore"]);
    let (code, err) = check_deps(&[("PATH", bin.path())]);
    assert_eq!(code, Some(1), "{err}");
    let p = problems(&err);
    assert_eq!(p.len(), 3, "{err}");
    assert!(
        p[0].contains("etcd not found") && p[0].contains("etcd-server"),
        "{err}"
    );
    assert!(
        p[1].contains("iptables-restore") && p[1].contains("package iptables"),
        "{err}"
    );
    assert!(
        p[2].contains("nft not found") && p[2].contains("nftables"),
        "{err}"
    );
}

#[test]
fn check_deps_names_missing_well_known_protos_and_cni_plugins() {
    if !machine_is_set_up("check_deps_names_missing_well_known_protos") {
        return;
    }
    // protoc present, but no google/protobuf/descriptor.proto (protobuf-compiler without
    // libprotobuf-dev: the fresh-machine failure this check exists for).
    let empty = tempfile::tempdir().unwrap();
    let (code, err) = check_deps(&[("FLANNEL_PROTOBUF_INCLUDE", empty.path())]);
    assert_eq!(code, Some(1), "{err}");
    let p = problems(&err);
    assert_eq!(p.len(), 1, "{err}");
    assert!(
        p[0].contains("descriptor.proto") && p[0].contains("libprotobuf-dev"),
        "{err}"
    );

    // A descriptor.proto protoc cannot compile: the check really runs protoc on an import of it.
    let broken = tempfile::tempdir().unwrap();
    let dir = broken.path().join("google/protobuf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("descriptor.proto"), "this is not protobuf").unwrap();
    let (code, err) = check_deps(&[("FLANNEL_PROTOBUF_INCLUDE", broken.path())]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("protoc cannot compile"), "{err}");

    // No CNI reference plugins.
    let (code, err) = check_deps(&[("FLANNEL_CNI_PLUGIN_DIR", empty.path())]);
    assert_eq!(code, Some(1), "{err}");
    let p = problems(&err);
    assert_eq!(p.len(), 2, "bridge and host-local: {err}");
    assert!(
        p.iter().all(|l| l.contains("containernetworking-plugins")),
        "{err}"
    );
    assert!(
        p[0].contains("/bridge") && p[1].contains("/host-local"),
        "{err}"
    );
}

/// A minimal Debian has no CA certificates, and cargo cannot fetch a crate without them (found by
/// running `.ci/run` in a debootstrap'ed Debian).
#[test]
fn check_deps_names_missing_ca_certificates() {
    if !machine_is_set_up("check_deps_names_missing_ca_certificates") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("ca-certificates.crt");
    let (code, err) = check_deps(&[("FLANNEL_CA_BUNDLE", &bundle)]);
    assert_eq!(code, Some(1), "{err}");
    let p = problems(&err);
    assert_eq!(p.len(), 1, "{err}");
    assert!(
        p[0].contains(&format!("{} missing", bundle.display()))
            && p[0].contains("HTTPS")
            && p[0].contains("package ca-certificates"),
        "{err}"
    );
    // An empty bundle is no better.
    std::fs::write(&bundle, "").unwrap();
    let (code, err) = check_deps(&[("FLANNEL_CA_BUNDLE", &bundle)]);
    assert_eq!(code, Some(1), "{err}");
}

#[test]
fn check_deps_names_a_disk_too_small_for_the_build() {
    if !machine_is_set_up("check_deps_names_a_disk_too_small_for_the_build") {
        return;
    }
    // No disk here has a million GiB free: the check must say so, and what to do.
    let (code, err) = check_deps(&[("FLANNEL_NEED_DISK_GIB", Path::new("1000000"))]);
    assert_eq!(code, Some(1), "{err}");
    let p = problems(&err);
    assert_eq!(p.len(), 1, "{err}");
    assert!(
        p[0].contains("GiB free")
            && p[0].contains("1000000 GiB")
            && p[0].contains("CARGO_TARGET_DIR"),
        "{err}"
    );
}

#[test]
fn the_scripts_run_the_check_first() {
    // A broken machine must fail in the first second, before a build: the check comes first.
    for script in ["scripts/test-all", "scripts/install-deps"] {
        let text = std::fs::read_to_string(repo().join(script)).unwrap();
        let first_cargo = text.find("cargo ").unwrap_or(text.len());
        let check = text
            .find("scripts/check-deps")
            .unwrap_or_else(|| panic!("{script} does not run scripts/check-deps"));
        assert!(check < first_cargo, "{script} builds before it checks");
    }
    let demo = std::fs::read_to_string(repo().join("scripts/demo")).unwrap();
    let install = demo.find("scripts/install-deps").expect("demo installs");
    assert!(
        install < demo.find("cargo ").unwrap(),
        "demo builds before it checks"
    );
}

#[test]
fn check_deps_names_an_unprepared_test_vm() {
    if !machine_is_set_up("check_deps_names_an_unprepared_test_vm") {
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let (code, err) = check_deps(&[("FLANNEL_TEST_VM_DIR", empty.path())]);
    assert_eq!(code, Some(1), "{err}");
    let p = problems(&err);
    assert_eq!(p.len(), 1, "only the VM is missing: {err}");
    assert!(p[0].contains("scripts/test-vm prepare"), "{err}");
}
