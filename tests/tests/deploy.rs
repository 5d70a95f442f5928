//! `deploy/kube-flannel.yml` parses into the Kubernetes API types, hangs together (names, volumes,
//! the ConfigMap's two files), and its ClusterRole grants exactly the calls flanneld makes: flanneld
//! runs against the stand-in API server and every request it sent must be allowed, and every rule
//! used. The image (`scripts/build-image`, buildah, FROM scratch) is built and inspected: its
//! entrypoint, `flanneld --version` run from its root filesystem with chroot, the CNI plugin, the
//! tools the manifest's commands name, and the ipsec backend's charon answering the image's swanctl.
//! A strongSwan configuration on the build machine that is not Debian's is refused.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use flannel_core::{LeaseWatchResult, SubnetManager};
use flannel_subnet::kube::{KubeOptions, KubeSubnetManager};
use flannel_tests::kubeapi::{ApiServer, alloc_flanneld};
use flannel_tests::{Proc, bin_path, repo_root, require_root, skip};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

fn repo() -> PathBuf {
    repo_root()
}

struct Manifest {
    namespace: Namespace,
    account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config: ConfigMap,
    daemonset: DaemonSet,
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(repo().join("deploy/kube-flannel.yml")).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    let typed = |i: usize| docs[i].clone();
    Manifest {
        namespace: serde_json::from_value(typed(0)).unwrap(),
        account: serde_json::from_value(typed(1)).unwrap(),
        role: serde_json::from_value(typed(2)).unwrap(),
        binding: serde_json::from_value(typed(3)).unwrap(),
        config: serde_json::from_value(typed(4)).unwrap(),
        daemonset: serde_json::from_value(typed(5)).unwrap(),
    }
}

/// (resource, verb) pairs the ClusterRole grants.
fn granted(role: &ClusterRole) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for r in role.rules.as_ref().unwrap() {
        assert_eq!(
            r.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "core group only"
        );
        for res in r.resources.as_ref().unwrap() {
            for v in &r.verbs {
                out.insert((res.clone(), v.clone()));
            }
        }
    }
    out
}

/// The RBAC (resource, verb) of one request as the stand-in logged it (`METHOD path?query`).
fn rbac_of(request: &str) -> (String, String) {
    let (method, target) = request.split_once(' ').unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let watch = query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1");
    let (resource, named) = match parts.as_slice() {
        ["api", "v1", "nodes"] => ("nodes".to_string(), false),
        ["api", "v1", "nodes", _] => ("nodes".to_string(), true),
        ["api", "v1", "nodes", _, sub] => (format!("nodes/{sub}"), true),
        ["api", "v1", "namespaces", _, "pods", _] => ("pods".to_string(), true),
        other => panic!("a request to an unexpected path: {other:?}"),
    };
    let verb = match (method, named, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, false) => "get",
        ("GET", false, false) => "list",
        ("PATCH", _, _) => "patch",
        (m, ..) => panic!("unexpected method {m}"),
    };
    (resource, verb.to_string())
}

#[test]
fn the_manifest_hangs_together() {
    let m = manifest();
    let ns = m.namespace.metadata.name.clone().unwrap();
    assert_eq!(m.account.metadata.namespace.as_deref(), Some(ns.as_str()));
    // The binding gives the role to the DaemonSet's service account.
    let subject = &m.binding.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), m.account.metadata.name.as_ref());
    assert_eq!(subject.namespace.as_deref(), Some(ns.as_str()));
    assert_eq!(
        Some(&m.binding.role_ref.name),
        m.role.metadata.name.as_ref()
    );
    let pod = m
        .daemonset
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.service_account_name, m.account.metadata.name);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(m.daemonset.metadata.namespace.as_deref(), Some(ns.as_str()));
    // The ConfigMap's two files: a network config flanneld accepts and upstream's conflist.
    let data = m.config.data.as_ref().unwrap();
    let net = flannel_core::NetworkConfig::parse(&data["net-conf.json"]).unwrap();
    assert_eq!(net.network().unwrap().to_string(), "10.244.0.0/16");
    let cni: Value = serde_json::from_str(&data["cni-conf.json"]).unwrap();
    assert_eq!(cni["plugins"][0]["type"], "flannel");
    assert_eq!(cni["plugins"][1]["type"], "portmap");
    // Every mount names a volume; the config volume is the ConfigMap.
    let volumes: Vec<_> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.clone())
        .collect();
    let all = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in all.clone() {
        for vm in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(&vm.name),
                "{}: no volume {}",
                c.name,
                vm.name
            );
        }
    }
    let cfg = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "flannel-cfg")
        .unwrap();
    assert_eq!(
        cfg.config_map.as_ref().unwrap().name,
        m.config.metadata.name.clone().unwrap()
    );
    // The agent: kube mode, the node name from the downward API, NET_ADMIN; every flag is one
    // flanneld knows (it refuses unknown flags with exit 2).
    let agent = &pod.containers[0];
    let args = agent.args.clone().unwrap();
    assert!(args.contains(&"--kube-subnet-mgr".to_string()));
    let env: Vec<(String, String)> = agent
        .env
        .iter()
        .flatten()
        .map(|e| {
            let f = e.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
            (e.name.clone(), f.field_path.clone())
        })
        .collect();
    assert_eq!(
        env,
        [
            ("POD_NAME".to_string(), "metadata.name".to_string()),
            (
                "POD_NAMESPACE".to_string(),
                "metadata.namespace".to_string()
            )
        ]
    );
    let caps = agent
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert!(
        caps.add
            .as_ref()
            .unwrap()
            .contains(&"NET_ADMIN".to_string())
    );
    // The TUN device (udp, userspace wireguard) comes from the host as a character device.
    let tun = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/dev/net/tun")
        })
        .expect("a hostPath volume for /dev/net/tun");
    assert_eq!(
        tun.host_path.as_ref().unwrap().type_.as_deref(),
        Some("CharDevice")
    );
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .any(|vm| vm.name == tun.name && vm.mount_path == "/dev/net/tun"),
        "the agent mounts /dev/net/tun"
    );
    let out = Command::new(bin_path("flanneld"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One image everywhere: the one scripts/build-image tags by default.
    let version = env!("CARGO_PKG_VERSION");
    for c in all {
        assert_eq!(
            c.image.as_deref(),
            Some(format!("localhost/flannel-rs:{version}").as_str())
        );
    }
    let inits: Vec<Vec<String>> = pod
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.args.clone().unwrap())
        .collect();
    assert!(inits.contains(&vec![
        "-f".into(),
        "/flannel".into(),
        "/opt/cni/bin/flannel".into()
    ]));
    assert!(inits.contains(&vec![
        "-f".into(),
        "/etc/kube-flannel/cni-conf.json".into(),
        "/etc/cni/net.d/10-flannel.conflist".into()
    ]));
}

#[test]
fn the_cluster_role_grants_exactly_the_calls_flanneld_makes() {
    let m = manifest();
    let rules = granted(&m.role);
    let api = ApiServer::start();
    api.add_node("w1", &["10.244.1.0/24"]);
    api.add_node("w2", &["10.244.2.0/24"]);
    api.add_pod("kube-flannel", "kube-flannel-ds-w1", "w1");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("net-conf.json");
    std::fs::write(&conf, &m.config.data.as_ref().unwrap()["net-conf.json"]).unwrap();
    // flanneld as the DaemonSet runs it (node name from the pod; alloc: no kernel changes here).
    let p = Proc::spawn(
        alloc_flanneld(&api, dir.path())
            .arg("--public-ip=10.0.0.1")
            .env("POD_NAME", "kube-flannel-ds-w1")
            .env("POD_NAMESPACE", "kube-flannel"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && !api.node("w1").unwrap()["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "NetworkUnavailable")
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    p.stop();
    // The peer watch (alloc runs none): the same manager in-process, until its first snapshot.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = flannel_subnet::kube::client(Some(&api.url()), None)
            .await
            .unwrap();
        let km = KubeSubnetManager::new(
            client,
            KubeOptions {
                node_name: "w2".into(),
                net_config_path: conf.clone(),
                ..KubeOptions::default()
            },
        )
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let stop = tokio_util::sync::CancellationToken::new();
        let watch = tokio::spawn({
            let stop = stop.clone();
            async move { km.watch_leases(tx, stop).await }
        });
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap();
        assert!(
            matches!(first, Some(LeaseWatchResult::Snapshot(_))),
            "{first:?}"
        );
        // Let the watch request itself go out after the list.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
        watch.await.unwrap().unwrap();
    });
    let used: BTreeSet<(String, String)> = api.requests().iter().map(|r| rbac_of(r)).collect();
    for call in &used {
        assert!(
            rules.contains(call),
            "flanneld calls {call:?}, which the ClusterRole does not grant"
        );
    }
    for rule in &rules {
        assert!(
            used.contains(rule),
            "the ClusterRole grants {rule:?}, which flanneld never uses"
        );
    }
    assert_eq!(rules.len(), 5, "{rules:?}");
}

/// Runs `scripts/build-image --no-build` with `args`; returns whether it succeeded and its stderr.
fn build_image_with(args: &[&str]) -> (bool, String) {
    let out = Command::new(repo().join("scripts/build-image"))
        .arg("--no-build")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A build machine's own strongSwan settings do not go into the image unseen: strongSwan's
/// configuration must be Debian's files as dpkg recorded them; a changed file and an added one are
/// refused by name, with what to do, before anything is built; `--own-strongswan-conf` takes them.
#[test]
fn the_image_refuses_a_strongswan_configuration_that_is_not_debians() {
    let name = "the_image_refuses_a_strongswan_configuration";
    if Command::new("buildah").arg("--version").output().is_err()
        || !std::path::Path::new("/etc/strongswan.conf").exists()
    {
        skip(
            name,
            "needs buildah and strongSwan (./scripts/install-deps)",
        );
        return;
    }
    let etc = tempfile::tempdir().unwrap();
    let copied = Command::new("cp")
        .args(["-a", "/etc/strongswan.conf", "/etc/strongswan.d"])
        .arg(etc.path())
        .status()
        .unwrap();
    assert!(copied.success());
    let dir = etc.path().to_str().unwrap();
    // A profile with no binaries: a run that passes the check stops at them, before the image.
    let no_bins = ["--profile", "no-such-profile", "--strongswan-etc", dir];
    let (ok, err) = build_image_with(&no_bins);
    assert!(!ok);
    assert!(
        err.contains("target/no-such-profile/flanneld not found") && !err.contains("strongSwan"),
        "Debian's files as shipped pass the check: {err}"
    );

    let changed = etc.path().join("strongswan.d/charon.conf");
    let mut text = std::fs::read_to_string(&changed).unwrap();
    text.push_str("charon {\n  install_routes = no\n}\n");
    std::fs::write(&changed, text).unwrap();
    let added = etc.path().join("strongswan.d/charon/site.conf");
    std::fs::write(&added, "charon {\n}\n").unwrap();
    let (ok, err) = build_image_with(&no_bins);
    assert!(!ok);
    assert!(
        err.contains("strongSwan's configuration here is not Debian's as shipped")
            && err.contains(changed.to_str().unwrap())
            && err.contains(added.to_str().unwrap())
            && err.contains("--force-confmiss")
            && err.contains("--own-strongswan-conf")
            && !err.contains("flanneld not found"),
        "{err}"
    );
    let unchanged = etc.path().join("strongswan.conf");
    assert!(
        !err.contains(&format!("{}\n", unchanged.display())),
        "{err}"
    );

    let (ok, err) = build_image_with(&[&no_bins[..], &["--own-strongswan-conf"]].concat());
    assert!(!ok);
    assert!(
        err.contains("target/no-such-profile/flanneld not found") && !err.contains("strongSwan"),
        "--own-strongswan-conf takes the files as they are: {err}"
    );
}

#[test]
fn the_image_builds_offline_and_runs_from_its_root_filesystem() {
    if !require_root("the_image_builds_offline") {
        return;
    }
    if Command::new("buildah").arg("--version").output().is_err() {
        skip(
            "the_image_builds_offline",
            "needs buildah (Debian package buildah)",
        );
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let global = [
        format!("--root={}", store.path().join("root").display()),
        format!("--runroot={}", store.path().join("run").display()),
        "--storage-driver=vfs".to_string(),
    ];
    let buildah = |args: &[&str]| {
        let out = Command::new("buildah")
            .args(&global)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "buildah {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The test binaries' own profile: the debug build test-all made (release in the README).
    let profile = bin_path("flanneld")
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let out = Command::new(repo().join("scripts/build-image"))
        .args([
            "--profile",
            &profile,
            "--no-build",
            "--tag",
            "localhost/flannel-rs:test",
            "--",
        ])
        .args(&global)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-image: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect: Value = serde_json::from_str(&buildah(&[
        "inspect",
        "--type",
        "image",
        "localhost/flannel-rs:test",
    ]))
    .unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/opt/bin/flanneld"])
    );
    assert_eq!(
        inspect["OCIv1"]["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "FROM scratch: one layer"
    );
    let ctr = buildah(&["from", "localhost/flannel-rs:test"]);
    let root = PathBuf::from(buildah(&["mount", &ctr]));
    let chroot = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new("chroot")
            .arg(&root)
            .args(args)
            .envs(env.iter().copied())
            .env("PATH", "/opt/bin:/usr/sbin:/bin")
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, text) = chroot(&["/opt/bin/flanneld", "--version"], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    // The CNI plugin the init container copies, and what the manifest's commands need.
    let (code, text) = chroot(&["/flannel"], &[("CNI_COMMAND", "VERSION")]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("supportedVersions"), "{text}");
    for tool in [
        &["cp", "--help"][..],
        &["iptables", "--version"],
        &["iptables-restore", "--version"],
        &["nft", "--version"],
        &["/opt/bin/mk-docker-opts", "-h"],
        &["ip", "-V"],
        &["bridge", "-V"],
        &["wg", "--version"],
    ] {
        let (code, text) = chroot(tool, &[]);
        assert!(
            code.is_some()
                && !text.contains("not found")
                && !text.contains("error while loading shared libraries"),
            "{tool:?}: {code:?} {text}"
        );
    }
    // The shell tools upstream's extension examples use (Documentation/extension.md).
    let (code, text) = chroot(
        &[
            "sh",
            "-c",
            r#"export SUBNET_IP=$(echo "10.50.3.0/24" | cut -d'/' -f 1); read MAC; echo "$SUBNET_IP $MAC""#,
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.trim(), "10.50.3.0", "{text}");
    the_images_charon_answers(&root);
    let m = manifest();
    let pod = m.daemonset.spec.unwrap().template.spec.unwrap();
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let cmd = &c.command.as_ref().unwrap()[0];
        let path = if cmd.starts_with('/') {
            cmd.clone()
        } else {
            format!("/bin/{cmd}")
        };
        assert!(
            root.join(path.trim_start_matches('/')).exists(),
            "{}: {cmd} is not in the image",
            c.name
        );
    }
    buildah(&["umount", &ctr]);
    buildah(&["rm", &ctr]);
    buildah(&["rmi", "--all", "--force"]);
}

/// The ipsec backend's IKE daemon in the image at `root`: at the path flanneld looks for it on
/// Debian, it starts from the image's own files and libraries and answers the image's swanctl over
/// VICI at the socket flanneld uses, with the plugins flanneld's connections need loaded. It runs
/// in a namespace of the test's own (its IKE sockets stay there) with the /dev and /proc a
/// container runtime would give it (mounted in that command's own mount namespace).
fn the_images_charon_answers(root: &std::path::Path) {
    let ns = flannel_tests::netns::Netns::new("img");
    let in_image = |cmd: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns.name(), "sh", "-c"])
            .arg(r#"mount --bind /dev "$0/dev" && mount -t proc proc "$0/proc" && exec chroot "$0" "$@""#)
            .arg(root)
            .args(cmd)
            .env("PATH", "/opt/bin:/usr/sbin:/bin");
        c
    };
    let charon = Proc::spawn(
        in_image(&["/usr/lib/ipsec/charon"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let vici = root.join("var/run/charon.vici");
    let listening = flannel_tests::until(Duration::from_secs(20), || vici.exists());
    let stats = in_image(&["swanctl", "--stats"]).output().unwrap();
    let (_, log) = charon.stop();
    assert!(listening, "charon never opened {}: {log}", vici.display());
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.status.success(),
        "swanctl --stats: {text}{}{log}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let loaded: BTreeSet<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("loaded plugins:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // VICI and the kernel interface, randomness, and the algorithms of upstream's IKE proposal
    // (aes256-sha256-modp4096) and of the default ESP proposal (aes128gcm16).
    for plugin in [
        "vici",
        "kernel-netlink",
        "socket-default",
        "random",
        "nonce",
        "aes",
        "sha2",
        "hmac",
        "gmp",
        "gcm",
    ] {
        assert!(
            loaded.contains(plugin),
            "plugin {plugin} not loaded: {text}{log}"
        );
    }
    assert!(!log.contains("failed"), "charon's log: {log}");
}
