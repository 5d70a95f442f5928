//! The `flannel` CNI plugin with Debian's reference plugins (bridge, host-local) in the lab: pods get
//! addresses from their host's subnet and reach each other across hosts; DEL frees the address; a
//! missing or bad subnet.env is a CNI error result, not a crash.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use flannel_tests::lab::{Lab, LabSpec};
use flannel_tests::{bin_path, require_etcd, require_root, skip};

/// The lab's netconf for host `h`, with another subnet file.
fn netconf(lab: &Lab, h: usize, subnet_file: &Path) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&lab.cni_netconf(h)).unwrap();
    v["subnetFile"] = serde_json::json!(subnet_file);
    v.to_string()
}

#[test]
fn cni_pods_get_host_subnet_addresses_and_ping_across_hosts() {
    if !require_root("cni_pods") || !require_etcd("cni_pods") {
        return;
    }
    if !Path::new("/usr/lib/cni/bridge").exists()
        && !skip("cni_pods", "needs Debian's containernetworking-plugins")
    {
        return;
    }
    let spec = LabSpec {
        segments: vec![2],
        config: r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#.into(),
        flanneld_args: vec![],
    };
    let mut lab = Lab::new(&spec, bin_path("flanneld"));
    lab.start_all();
    let plugin = bin_path("flannel");
    let mut pods = Vec::new();
    for h in 0..2 {
        let env = lab.hosts[h].subnet_env().unwrap();
        let subnet: ipnet::Ipv4Net = env["FLANNEL_SUBNET"]
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .trunc();
        let conf = netconf(&lab, h, &lab.hosts[h].subnet_file.clone());
        for p in 0..2 {
            let ns = lab.pod_netns(&format!("cni{h}{p}"));
            let id = format!("ctr-{h}-{p}");
            let (code, out) = lab.cni(h, &plugin, "ADD", &id, ns.name(), &conf);
            assert_eq!(code, Some(0), "ADD failed: {out}");
            let result: serde_json::Value = serde_json::from_str(&out).unwrap();
            let addr: ipnet::Ipv4Net = result["ips"][0]["address"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                subnet.contains(&addr.addr()),
                "{addr} outside the host's subnet {subnet}"
            );
            let mtu = ns.exec(&["cat", "/sys/class/net/eth0/mtu"]).unwrap();
            assert_eq!(mtu.trim(), env["FLANNEL_MTU"], "pod MTU from subnet.env");
            // CHECK goes to the delegate with the runtime's prevResult. (Debian's bridge plugin 1.1.1
            // rejects its own gateway-less IPAM routes on CHECK, so the routes are left out here.)
            let mut check: serde_json::Value = serde_json::from_str(&conf).unwrap();
            check["prevResult"] = result.clone();
            check["prevResult"]
                .as_object_mut()
                .unwrap()
                .remove("routes");
            let (code, out) = lab.cni(h, &plugin, "CHECK", &id, ns.name(), &check.to_string());
            assert_eq!(code, Some(0), "CHECK failed: {out}");
            check["prevResult"]["ips"][0]["address"] = serde_json::json!("10.99.0.9/24");
            let (code, out) = lab.cni(h, &plugin, "CHECK", &id, ns.name(), &check.to_string());
            assert_eq!(code, Some(1), "CHECK of a wrong address must fail: {out}");
            assert!(
                out.contains("10.99.0.9"),
                "the delegate's verdict is relayed: {out}"
            );
            pods.push((h, ns, id, addr.addr(), conf.clone()));
        }
    }
    for (_, from, _, _, _) in &pods {
        for (_, _, _, to, _) in &pods {
            let ok = (0..20).any(|_| {
                from.exec(&["ping", "-c", "1", "-W", "1", &to.to_string()])
                    .is_ok()
                    || {
                        std::thread::sleep(Duration::from_millis(100));
                        false
                    }
            });
            assert!(ok, "{} cannot reach {to}", from.name());
        }
    }
    // DEL frees the address (host-local's reservation file) and is idempotent.
    let (h, ns, id, ip, conf) = &pods[0];
    let reservation = lab.dir().join(format!("cni-h{}/ipam/cbr0/{ip}", h + 1));
    assert!(reservation.exists(), "host-local reserved {ip}");
    let (code, out) = lab.cni(*h, &plugin, "DEL", id, ns.name(), conf);
    assert_eq!(code, Some(0), "DEL failed: {out}");
    assert!(!reservation.exists(), "DEL did not free {ip}");
    let (code, _) = lab.cni(*h, &plugin, "DEL", id, ns.name(), conf);
    assert_eq!(code, Some(0), "a second DEL succeeds");

    // A missing or malformed subnet.env is a CNI error result.
    let ns = lab.pod_netns("cnibad");
    let missing = netconf(&lab, 0, &lab.dir().join("nope/subnet.env"));
    let (code, out) = lab.cni(0, &plugin, "ADD", "ctr-bad", ns.name(), &missing);
    assert_eq!(code, Some(1));
    let err: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(err["code"], 11, "{out}");
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("is flanneld running"),
        "{out}"
    );
    let bad_file = lab.dir().join("bad.env");
    std::fs::write(
        &bad_file,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\n",
    )
    .unwrap();
    let (code, out) = lab.cni(
        0,
        &plugin,
        "ADD",
        "ctr-bad",
        ns.name(),
        &netconf(&lab, 0, &bad_file),
    );
    assert_eq!(code, Some(1));
    let err: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(err["code"], 7, "{out}");
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("FLANNEL_MTU is missing"),
        "{out}"
    );
    let (code, out) = lab.cni(
        0,
        &plugin,
        "VERSION",
        "",
        ns.name(),
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert_eq!(code, Some(0));
    assert!(out.contains("\"1.0.0\""), "{out}");
}
