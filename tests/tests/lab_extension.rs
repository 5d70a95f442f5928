//! The extension backend in the lab, configured as upstream documents its host-gw example: the
//! operator's commands publish each host's MAC as backend data, route every peer's subnet via the
//! peer, and remove the route when the peer goes. Pods ping across 3 hosts over those routes; each
//! command sees upstream's environment and stdin; a lease for a piece of the underlay runs no
//! command (refused), nor does a lease of another type (ignored); a failing command is logged and flanneld goes on; a departed peer's remove command
//! runs (also for a peer whose add command failed, as upstream); a restart runs the add commands
//! again and the pods keep talking. And upstream's `dist/extension-vxlan`, unchanged, carries pods'
//! pings over the vxlan device its commands make.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use flannel_tests::lab::Lab;
use flannel_tests::until;

/// Upstream's host-gw example (Documentation/extension.md), with `replace` for `add` (a restart runs
/// every add command again) and each command also writing what it saw to `$EXT_DIR` (per host).
const CONFIG: &str = r#"{
  "Network": "172.16.0.0/12", "SubnetMin": "172.16.1.0", "SubnetMax": "172.16.250.0",
  "Backend": {
    "Type": "extension",
    "PreStartupCommand": "cat /sys/class/net/eth0/address",
    "PostStartupCommand": "echo \"$NETWORK $SUBNET $PUBLIC_IP [$IPV6SUBNET]\" > \"$EXT_DIR/post\"",
    "SubnetAddCommand": "read MAC; ip route replace \"$SUBNET\" via \"$PUBLIC_IP\" && echo \"add $SUBNET $PUBLIC_IP $MAC\" >> \"$EXT_DIR/log\"",
    "SubnetRemoveCommand": "read MAC; ip route del \"$SUBNET\" via \"$PUBLIC_IP\"; echo \"remove $SUBNET $PUBLIC_IP $MAC\" >> \"$EXT_DIR/log\""
  }
}"#;

fn ext_dir(lab: &Lab, i: usize) -> PathBuf {
    lab.dir().join(format!("ext-h{}", i + 1))
}

fn log_lines(lab: &Lab, i: usize) -> Vec<String> {
    std::fs::read_to_string(ext_dir(lab, i).join("log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The lease of host `i` from etcd: (subnet, value).
fn lease_of(lab: &Lab, i: usize) -> (String, serde_json::Value) {
    let ip = lab.hosts[i].addr.to_string();
    lab.etcd_list("/coreos.com/network/subnets/")
        .into_iter()
        .map(|(k, v)| {
            let subnet = k.rsplit('/').next().unwrap().replace('-', "/");
            (
                subnet,
                serde_json::from_str::<serde_json::Value>(&v).unwrap(),
            )
        })
        .find(|(_, v)| v["PublicIP"] == ip.as_str())
        .unwrap()
}

fn mac_of(lab: &Lab, i: usize) -> String {
    lab.hosts[i]
        .sh("cat /sys/class/net/eth0/address")
        .trim()
        .to_string()
}

#[test]
fn upstream_s_host_gw_example_runs_as_documented() {
    let args = [
        "--iptables-forward-rules=false",
        "--healthz-port=8081",
        "--healthz-ip=127.0.0.1",
    ];
    let Some(mut lab) = Lab::for_test("extension_backend", vec![3], CONFIG, &args) else {
        return;
    };
    for i in 0..3 {
        let dir = ext_dir(&lab, i);
        std::fs::create_dir_all(&dir).unwrap();
        lab.hosts[i]
            .env
            .push(("EXT_DIR".into(), dir.display().to_string()));
    }
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "{failures:?}");

    // The lease: type extension, the pre-startup command's output as a JSON string.
    for i in 0..3 {
        let (subnet, v) = lease_of(&lab, i);
        assert_eq!(v["BackendType"], "extension", "{v}");
        assert_eq!(v["BackendData"], mac_of(&lab, i).as_str(), "{v}");
        let post = std::fs::read_to_string(ext_dir(&lab, i).join("post")).unwrap();
        assert_eq!(
            post.trim(),
            format!("172.16.0.0/12 {subnet} {} []", lab.hosts[i].addr)
        );
    }
    // Each peer's add command ran once, with the peer's values and its data on stdin; its route is
    // there as the command made it.
    for i in 0..3 {
        let mut want = Vec::new();
        for j in (0..3).filter(|j| *j != i) {
            let (subnet, _) = lease_of(&lab, j);
            want.push(format!(
                "add {subnet} {} {}",
                lab.hosts[j].addr,
                mac_of(&lab, j)
            ));
            let route = lab.hosts[i].routes(&subnet);
            assert!(
                route.contains(&format!("via {}", lab.hosts[j].addr)),
                "host {i}: {route}"
            );
        }
        let mut got = log_lines(&lab, i);
        got.sort();
        want.sort();
        assert_eq!(got, want, "host {i}");
    }

    // A lease for a piece of the underlay (inside this too-wide Network) runs no command: it would
    // route the hosts' own network away. A peer whose command fails is logged, flanneld goes on.
    lab.etcd_put(
        "/coreos.com/network/subnets/172.20.0.0-24",
        r#"{"PublicIP":"172.20.0.99","PublicIPv6":null,"BackendType":"extension","BackendData":"x"}"#,
    );
    lab.etcd_put(
        "/coreos.com/network/subnets/172.16.252.0-24",
        r#"{"PublicIP":"172.20.0.98","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:98"}}"#,
    );
    lab.etcd_put(
        "/coreos.com/network/subnets/172.16.251.0-24",
        r#"{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"extension","BackendData":"y"}"#,
    );
    for i in 0..3 {
        assert!(
            until(Duration::from_secs(10), || {
                let log = lab.hosts[i].log_text();
                log.contains("refusing lease 172.20.0.0-24")
                    && log.contains("ignoring the non-extension lease 172.16.252.0-24")
                    && log.contains("command failed")
                    && log.contains("172.16.251.0-24")
            }),
            "host {i}:\n{}",
            lab.hosts[i].log_text()
        );
        assert!(lab.hosts[i].flanneld_running());
        // Counted, for operators: nothing retries a failed command.
        let metric = |hook: &str, result: &str| {
            lab.metric(
                i,
                8081,
                &format!(r#"flannel_extension_commands_total{{hook="{hook}",result="{result}"}}"#),
            )
        };
        assert_eq!(metric("subnet_add", "failed"), Some(1.0), "host {i}");
        assert_eq!(metric("subnet_add", "ok"), Some(2.0), "host {i}");
        assert_eq!(metric("pre_startup", "ok"), Some(1.0), "host {i}");
        // The underlay lease is refused as unsafe; the vxlan one only ignored (not ours).
        assert_eq!(
            lab.metric(i, 8081, "flannel_leases_refused_total"),
            Some(1.0),
            "host {i}"
        );
        let lines = log_lines(&lab, i);
        assert!(
            !lines.iter().any(|l| l.contains("172.20.0.0")
                || l.contains("172.16.252.0")
                || l.contains("192.0.2.1")),
            "{lines:?}"
        );
        assert!(!lab.hosts[i].routes("").contains("172.20.0.0/24"));
    }
    assert!(lab.ping_all(Duration::from_secs(5)).is_empty());

    // A peer that goes away: its remove command runs with what the add command got.
    let (gone_subnet, _) = lease_of(&lab, 2);
    let gone = format!(
        "remove {gone_subnet} {} {}",
        lab.hosts[2].addr,
        mac_of(&lab, 2)
    );
    lab.stop_flanneld(2);
    lab.etcd_delete(&format!(
        "/coreos.com/network/subnets/{}",
        gone_subnet.replace('/', "-")
    ));
    for i in 0..2 {
        assert!(
            until(Duration::from_secs(10), || log_lines(&lab, i)
                .contains(&gone)),
            "host {i}: {:?}",
            log_lines(&lab, i)
        );
        assert_eq!(lab.hosts[i].routes(&gone_subnet), "", "host {i}");
        // The refused lease's removal runs no remove command either.
        assert!(!log_lines(&lab, i).iter().any(|l| l.contains("172.20.0.0")));
    }
    lab.etcd_delete("/coreos.com/network/subnets/172.20.0.0-24");
    lab.etcd_delete("/coreos.com/network/subnets/172.16.251.0-24");
    lab.etcd_delete("/coreos.com/network/subnets/172.16.252.0-24");
    // The lease whose add command failed gets its remove command, as upstream runs it.
    for i in 0..2 {
        assert!(
            until(Duration::from_secs(10), || log_lines(&lab, i)
                .contains(&"remove 172.16.251.0/24 192.0.2.1 y".to_string())),
            "host {i}: {:?}",
            log_lines(&lab, i)
        );
    }

    // A restart keeps the subnet and the data, and runs the add command for the peer again.
    let before = lease_of(&lab, 0);
    let adds_before = log_lines(&lab, 1).len();
    lab.stop_flanneld(0);
    lab.start_flanneld(0);
    assert_eq!(lease_of(&lab, 0), before);
    let (peer_subnet, _) = lease_of(&lab, 1);
    let again = format!(
        "add {peer_subnet} {} {}",
        lab.hosts[1].addr,
        mac_of(&lab, 1)
    );
    assert!(
        until(Duration::from_secs(10), || log_lines(&lab, 0)
            .iter()
            .filter(|l| **l == again)
            .count()
            == 2),
        "{:?}",
        log_lines(&lab, 0)
    );
    assert_eq!(
        log_lines(&lab, 1).len(),
        adds_before,
        "a restart of a peer, not a change"
    );
    let pods: Vec<_> = lab.all_pods();
    let (from, to) = (pods[0].0, pods[1].1);
    assert!(lab.ping(from, to, Duration::from_secs(5)));
}

/// Upstream's `dist/extension-vxlan`, byte for byte (its `ShutdownCommand` is a key upstream's code
/// never reads; so do we): the commands make a vxlan device, publish its MAC, and give each peer a
/// route, neighbour and FDB entry. Pods ping across 3 hosts through it.
const UPSTREAM_VXLAN: &str = r#"{
  "Network": "10.50.0.0/16",
  "Backend": {
    "Type": "extension",
    "PreStartupCommand": "export VNI=1; export IF_NAME=flannel-vxlan; ip link del \"$IF_NAME\" 2>/dev/null; ip link add \"$IF_NAME\" type vxlan id \"$VNI\" dstport 8472 nolearning && ip link set mtu 1450 dev \"$IF_NAME\" && cat \"/sys/class/net/${IF_NAME}/address\"",
    "PostStartupCommand": "export IF_NAME=flannel-vxlan; export SUBNET_IP=$(echo \"$SUBNET\" | cut -d'/' -f 1); ip addr add \"${SUBNET_IP}/32\" dev \"$IF_NAME\" && ip link set \"$IF_NAME\" up",
    "ShutdownCommand": "export IF_NAME=flannel-vxlan; ip link del \"$IF_NAME\"",
    "SubnetAddCommand": "export SUBNET_IP=$(echo \"$SUBNET\" | cut -d'/' -f 1); export IF_NAME=flannel-vxlan; read VTEP; ip route add \"$SUBNET\" nexthop via \"$SUBNET_IP\" dev \"$IF_NAME\" onlink && ip neigh replace \"$SUBNET_IP\" dev \"$IF_NAME\" lladdr \"$VTEP\" && bridge fdb add \"$VTEP\" dev \"$IF_NAME\" self dst \"$PUBLIC_IP\""
  }
}
"#;

#[test]
fn upstream_s_vxlan_example_runs_unchanged() {
    let args = ["--iptables-forward-rules=false"];
    let Some(mut lab) = Lab::for_test("extension_upstream_vxlan", vec![3], UPSTREAM_VXLAN, &args)
    else {
        return;
    };
    lab.start_all();
    for i in 0..3 {
        lab.add_pods(i, 1);
    }
    let failures = lab.ping_all(Duration::from_secs(10));
    assert!(failures.is_empty(), "{failures:?}");
    for i in 0..3 {
        let h = &lab.hosts[i];
        let mac = h
            .sh("cat /sys/class/net/flannel-vxlan/address")
            .trim()
            .to_string();
        let (_, v) = lease_of(&lab, i);
        assert_eq!(v["BackendData"], mac.as_str(), "{v}");
        // Each peer's FDB entry names its MAC and public IP, as the add command made it.
        let fdb = h.sh("bridge fdb show dev flannel-vxlan");
        for j in (0..3).filter(|j| *j != i) {
            let (_, peer) = lease_of(&lab, j);
            let want = format!(
                "{} dst {}",
                peer["BackendData"].as_str().unwrap(),
                lab.hosts[j].addr
            );
            assert!(fdb.contains(&want), "host {i}: {want} not in\n{fdb}");
        }
    }
}
