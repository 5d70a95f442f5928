//! flanneld in Kubernetes mode as an operator meets it, without a data plane (the `alloc` backend,
//! in the root namespace, touching no kernel state): the node name from the pod, the config from
//! `--net-config-path`, waiting for a pod CIDR, and clear errors for bad pod CIDRs, a bad annotation
//! prefix or a missing node name.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use flannel_tests::Proc;
use flannel_tests::kubeapi::{ApiServer, alloc_flanneld};

fn start(api: &ApiServer, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    Proc::spawn(
        alloc_flanneld(api, dir)
            .arg("--public-ip=10.0.0.21")
            .args(extra)
            .envs(env.iter().copied()),
    )
}

fn wait_for(path: &Path, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(path) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#;

#[test]
fn node_name_from_the_pod_and_waiting_for_a_pod_cidr() {
    let api = ApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("net-conf.json"), CONFIG).unwrap();
    api.add_node("worker-1", &[]);
    api.add_pod("kube-flannel", "kube-flannel-ds-x1", "worker-1");
    let p = start(
        &api,
        dir.path(),
        &[],
        &[
            ("POD_NAME", "kube-flannel-ds-x1"),
            ("POD_NAMESPACE", "kube-flannel"),
        ],
    );
    // No pod CIDR yet: flanneld waits (and says so) instead of failing at once.
    std::thread::sleep(Duration::from_secs(4));
    assert!(!dir.path().join("subnet.env").exists());
    // The node IPAM controller assigns one: flanneld picks it up.
    api.update_node("worker-1", |n| {
        n["spec"]["podCIDR"] = "10.244.7.0/24".into();
        n["spec"]["podCIDRs"] = serde_json::json!(["10.244.7.0/24"]);
    });
    let env =
        wait_for(&dir.path().join("subnet.env"), Duration::from_secs(15)).expect("subnet.env");
    assert!(env.contains("FLANNEL_SUBNET=10.244.7.1/24\n"), "{env}");
    assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/16\n"), "{env}");
    let node = api.node("worker-1").unwrap();
    let a = &node["metadata"]["annotations"];
    assert_eq!(a["flannel.alpha.coreos.com/public-ip"], "10.0.0.21");
    assert_eq!(a["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
    let (code, err) = p.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("pod cidr not assigned"),
        "the wait is explained: {err}"
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r == "GET /api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-x1"),
        "the node name came from the pod"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn node_public_ip_annotation_and_a_custom_prefix() {
    let api = ApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("net-conf.json"), CONFIG).unwrap();
    api.add_node("worker-2", &["10.244.9.0/24"]);
    api.update_node("worker-2", |n| {
        n["metadata"]["annotations"] =
            serde_json::json!({"example.com/flannel-node-public-ip": "192.0.2.50"});
    });
    // --public-ip given on the command line wins; without it the annotation is used. This run
    // passes neither --public-ip override of its own, so drop the default one.
    let p = Proc::spawn(
        alloc_flanneld(&api, dir.path())
            .arg("--kube-annotation-prefix=example.com/flannel")
            .env("NODE_NAME", "worker-2"),
    );
    wait_for(&dir.path().join("subnet.env"), Duration::from_secs(15)).expect("subnet.env");
    let node = api.node("worker-2").unwrap();
    let a = &node["metadata"]["annotations"];
    assert_eq!(a["example.com/flannel-public-ip"], "192.0.2.50", "{node}");
    assert_eq!(a["example.com/flannel-kube-subnet-manager"], "true");
    assert!(a.get("flannel.alpha.coreos.com/public-ip").is_none());
    let (code, err) = p.stop();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn clear_errors_for_bad_settings_and_nodes() {
    let api = ApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("net-conf.json"), CONFIG).unwrap();
    api.add_node("w3", &["10.244.1.0/24", "fd00::/64", "10.244.2.0/24"]);
    api.add_node("w4", &["10.99.0.0/24"]);
    for (env, extra, want) in [
        (
            vec![],
            vec![],
            "set NODE_NAME, or POD_NAME and POD_NAMESPACE",
        ),
        (
            vec![("NODE_NAME", "w3")],
            vec!["--kube-annotation-prefix=Not/A/Prefix"],
            "--kube-annotation-prefix",
        ),
        (
            vec![("NODE_NAME", "w3")],
            vec![],
            "IPv4/IPv6 only or dualstack",
        ),
        (
            vec![("NODE_NAME", "w4")],
            vec![],
            "is not inside the flannel network 10.244.0.0/16",
        ),
        (vec![("NODE_NAME", "nope")], vec![], "not found"),
        (
            vec![("POD_NAME", "ghost"), ("POD_NAMESPACE", "kube-flannel")],
            vec![],
            "error retrieving pod spec for 'kube-flannel/ghost'",
        ),
    ] {
        let p = start(&api, dir.path(), &extra, &env);
        let (code, err) = p.stop_when_exited(Duration::from_secs(60));
        assert_eq!(code, Some(1), "{env:?} {extra:?}: {err}");
        assert!(
            err.contains(want),
            "{env:?} {extra:?}: want {want:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
