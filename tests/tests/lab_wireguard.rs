//! The wireguard backend in the multi-host lab (userspace WireGuard over TUN): pods on different
//! hosts reach each other through `flannel-wg`, the leases carry upstream's data, the key survives a
//! restart, and a deleted device is recreated.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flannel_backend_wireguard::PrivateKey;
use flannel_tests::lab::{Lab, LabSpec};
use flannel_tests::{bin_path, require_etcd, require_root, until};

fn lab(test: &str) -> Option<Lab> {
    if !require_root(test) || !require_etcd(test) {
        return None;
    }
    let spec = LabSpec {
        segments: vec![3],
        config: r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}"#.into(),
        flanneld_args: vec![],
    };
    let mut lab = Lab::new(&spec, bin_path("flanneld"));
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 2);
    }
    Some(lab)
}

/// Host `h`'s lease value and the public key its key file gives.
fn lease_and_key(lab: &Lab, h: usize) -> (serde_json::Value, String) {
    let me = lab.hosts[h].addr.to_string();
    let value = lab
        .etcd_list("/coreos.com/network/subnets/")
        .into_iter()
        .map(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).unwrap())
        .find(|v| v["PublicIP"] == me)
        .unwrap();
    let key_file = lab.hosts[h].subnet_file.with_file_name("wgkey");
    let key: PrivateKey = std::fs::read_to_string(&key_file).unwrap().parse().unwrap();
    (value, key.public_key().to_string())
}

#[test]
fn pods_ping_over_flannel_wg_with_upstreams_lease_data() {
    let Some(lab) = lab("pods_ping_over_flannel_wg_with_upstreams_lease_data") else {
        return;
    };
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "unreachable: {failures:?}");
    for h in 0..3 {
        let (lease, public_key) = lease_and_key(&lab, h);
        assert_eq!(lease["BackendType"], "wireguard", "{lease}");
        assert_eq!(
            lease["BackendData"],
            serde_json::json!({"PublicKey": public_key, "Port": 51820}),
            "{lease}"
        );
        let key_file = lab.hosts[h].subnet_file.with_file_name("wgkey");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key_file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let host = &lab.hosts[h];
        let env = host.subnet_env().unwrap();
        assert_eq!(env["FLANNEL_MTU"], "1420", "underlay 1500 - 80");
        let routes = host.sh("ip route");
        assert!(routes.contains("10.5.0.0/16 dev flannel-wg"), "{routes}");
    }
}

#[test]
fn restart_keeps_the_key_and_a_deleted_device_comes_back() {
    let Some(mut lab) = lab("restart_keeps_the_key_and_a_deleted_device_comes_back") else {
        return;
    };
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    let (before, key_before) = lease_and_key(&lab, 0);
    let _ = lab.stop_flanneld(0);
    lab.start_flanneld(0);
    let (after, key_after) = lease_and_key(&lab, 0);
    assert_eq!(key_before, key_after, "the key file is kept");
    assert_eq!(before["BackendData"], after["BackendData"]);
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "after the restart: {failures:?}");
    // Someone deletes the device: flanneld makes a new one with the same key and peers.
    lab.hosts[1].sh("ip link del flannel-wg");
    assert!(
        until(Duration::from_secs(10), || lab.hosts[1]
            .sh("ip route")
            .contains("dev flannel-wg")),
        "flannel-wg not back:\n{}",
        lab.hosts[1].log_text()
    );
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(
        failures.is_empty(),
        "after deleting the device: {failures:?}"
    );
}

#[test]
fn the_underlay_carries_only_wireguard_udp() {
    let Some(lab) = lab("the_underlay_carries_only_wireguard_udp") else {
        return;
    };
    assert!(lab.ping_all(Duration::from_secs(10)).is_empty());
    // Capture host 0's IPv4 underlay (etcd's TCP aside) while every pod pings every other pod
    // (`--immediate-mode`: packets reach the file at once, not when a ring block is full).
    let file = lab.dir().join("underlay.pcap");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", lab.hosts[0].ns.name()])
        .args([
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-nn",
            "-U",
            "-w",
        ])
        .arg(&file)
        .args(["ip and not tcp port 2379"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut tcpdump = flannel_tests::cleanup::spawn(&mut cmd).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let failures = lab.ping_all(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    flannel_tests::cleanup::stop_child(&mut tcpdump, Duration::from_secs(5));
    assert!(failures.is_empty(), "{failures:?}");
    let out = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() >= 8,
        "the pings crossed host 0's underlay: {text}"
    );
    for line in &lines {
        assert!(
            line.contains(".51820 > ") && line.contains(".51820: UDP"),
            "not WireGuard between the hosts' ports: {line}"
        );
        assert!(!line.contains("10.5."), "pod addresses in clear: {line}");
    }
}
