//! The `flannel` CNI plugin with hostile input, as a container runtime could pass it: a container ID
//! that is a path gets CNI error 4 and nothing is written outside `dataDir`; a corrupt saved config is
//! a CNI error, not `null` handed to the delegate. (No delegate runs: every case fails before it.)

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use flannel_tests::bin_path;
use serde_json::Value;

fn plugin(command: &str, id: &str, netconf: &str) -> (Option<i32>, Value) {
    let mut child = Command::new(bin_path("flannel"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", "/var/run/netns/none")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(netconf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.code(),
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn a_container_id_that_is_a_path_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let subnet = dir.path().join("subnet.env");
    std::fs::write(
        &subnet,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let netconf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
        "subnetFile": subnet, "dataDir": data,
    })
    .to_string();
    let outside = dir.path().join("escaped");
    for id in [
        "../escaped".to_string(),
        outside.display().to_string(),
        "a/../../escaped".into(),
        "".into(),
        ".".into(),
    ] {
        for command in ["ADD", "DEL", "CHECK"] {
            let (code, result) = plugin(command, &id, &netconf);
            assert_eq!(code, Some(1), "{command} {id:?}: {result}");
            assert_eq!(result["code"], 4, "{command} {id:?}: {result}");
            assert_eq!(result["msg"], "invalid container ID");
        }
    }
    assert!(!outside.exists(), "a file was written outside dataDir");
    assert!(!data.exists(), "nothing was written at all");
}

#[test]
fn a_corrupt_saved_config_is_a_cni_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("c0ffee"), "{ not json").unwrap();
    std::fs::write(data.join("nullish"), "null").unwrap();
    let netconf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
        "subnetFile": dir.path().join("subnet.env"), "dataDir": data,
    })
    .to_string();
    for id in ["c0ffee", "nullish"] {
        for command in ["DEL", "CHECK"] {
            let (code, result) = plugin(command, id, &netconf);
            assert_eq!(code, Some(1), "{command} {id}: {result}");
            assert_eq!(result["code"], 999, "{result}");
            assert!(
                result["msg"].as_str().unwrap().contains("corrupt"),
                "{result}"
            );
        }
    }
    // A DEL of a container never added still succeeds (the runtime retries DELs).
    let (code, _) = plugin("DEL", "never-added", &netconf);
    assert_eq!(code, Some(0));
}
