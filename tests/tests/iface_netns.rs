//! External interface selection against the real kernel, inside a network namespace.

#![allow(clippy::unwrap_used)]

use flannel_core::iface::IfaceSpec;
use flannel_dataplane::host::select_external_interface;
use flannel_tests::netns::Netns;
use flannel_tests::require_root;

#[test]
fn selection_in_a_namespace() {
    if !require_root("selection_in_a_namespace") {
        return;
    }
    let ns = Netns::new("iface");
    let sh = |cmd: &str| {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        ns.exec(&args).unwrap_or_else(|e| panic!("{e}"));
    };
    // Two veth pairs inside the namespace: fltA0 carries the default route, fltB0 a second network.
    sh("ip link add fltA0 mtu 1400 type veth peer name fltA1");
    sh("ip link add fltB0 mtu 9000 type veth peer name fltB1");
    for l in ["fltA0", "fltA1", "fltB0", "fltB1"] {
        sh(&format!("ip link set {l} up"));
    }
    sh("ip addr add 192.168.50.2/24 dev fltA0");
    sh("ip addr add 10.77.0.2/24 dev fltB0");
    sh("ip addr add 10.77.0.3/24 dev fltB0");
    sh("ip route add default via 192.168.50.1 dev fltA0");

    let results = ns.run(|| {
        Box::pin(async {
            let v4 = IfaceSpec {
                ipv4: true,
                ..Default::default()
            };
            let pick = |spec: IfaceSpec| async move {
                select_external_interface(&spec).await.map(|e| {
                    (
                        e.name,
                        e.mtu,
                        e.iface_addr.map(|a| a.to_string()),
                        e.ext_addr.map(|a| a.to_string()),
                    )
                })
            };
            vec![
                pick(v4.clone()).await.map_err(|e| e.to_string()),
                pick(IfaceSpec {
                    ifaces: vec!["fltB0".into()],
                    ..v4.clone()
                })
                .await
                .map_err(|e| e.to_string()),
                pick(IfaceSpec {
                    ifaces: vec!["10.77.0.3".into()],
                    ..v4.clone()
                })
                .await
                .map_err(|e| e.to_string()),
                pick(IfaceSpec {
                    iface_regexes: vec![r"^10\.77\.".into()],
                    ..v4.clone()
                })
                .await
                .map_err(|e| e.to_string()),
                pick(IfaceSpec {
                    can_reach: Some("10.77.0.50".parse().unwrap()),
                    ..v4.clone()
                })
                .await
                .map_err(|e| e.to_string()),
                pick(IfaceSpec {
                    ifaces: vec!["fltA0".into()],
                    public_ip: Some("203.0.113.7".parse().unwrap()),
                    ..v4.clone()
                })
                .await
                .map_err(|e| e.to_string()),
                pick(IfaceSpec {
                    ifaces: vec!["fltNope".into()],
                    ..v4.clone()
                })
                .await
                .map_err(|e| e.to_string()),
            ]
        })
    });
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        results[0],
        Ok(("fltA0".into(), 1400, s("192.168.50.2"), s("192.168.50.2"))),
        "default route"
    );
    assert_eq!(
        results[1],
        Ok(("fltB0".into(), 9000, s("10.77.0.2"), s("10.77.0.2"))),
        "by name"
    );
    assert_eq!(
        results[2],
        Ok(("fltB0".into(), 9000, s("10.77.0.3"), s("10.77.0.3"))),
        "by IP"
    );
    assert_eq!(
        results[3],
        Ok(("fltB0".into(), 9000, s("10.77.0.2"), s("10.77.0.2"))),
        "by regex"
    );
    assert_eq!(
        results[4].as_ref().map(|r| r.0.as_str()),
        Ok("fltB0"),
        "can-reach"
    );
    assert_eq!(
        results[5],
        Ok(("fltA0".into(), 1400, s("192.168.50.2"), s("203.0.113.7"))),
        "public ip override"
    );
    let err = results[6].as_ref().unwrap_err();
    assert!(
        err.contains("Failed to find interface") && err.contains("fltNope"),
        "{err}"
    );
}
