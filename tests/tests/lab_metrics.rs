//! `/healthz`, `/readyz` and the Prometheus `/metrics` endpoint of a flanneld in the lab.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use flannel_tests::lab::{Lab, LabSpec};
use flannel_tests::{bin_path, require_etcd, require_root};

fn get(lab: &Lab, h: usize, path: &str) -> (String, String) {
    lab.http_get(h, 8081, path)
}

fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn health_and_metrics_endpoints() {
    if !require_root("health_and_metrics_endpoints")
        || !require_etcd("health_and_metrics_endpoints")
    {
        return;
    }
    let spec = LabSpec {
        segments: vec![2],
        config: r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#.into(),
        flanneld_args: vec![
            "--healthz-port=8081".into(),
            "--healthz-ip=127.0.0.1".into(),
        ],
    };
    let mut lab = Lab::new(&spec, bin_path("flanneld"));
    lab.start_all();
    assert_eq!(
        get(&lab, 0, "/healthz"),
        ("HTTP/1.1 200 OK".into(), "flanneld is running".into())
    );
    assert_eq!(
        get(&lab, 0, "/readyz"),
        ("HTTP/1.1 200 OK".into(), "flanneld is ready".into())
    );
    assert_eq!(get(&lab, 0, "/nope").0, "HTTP/1.1 404 Not Found");
    let env = lab.hosts[0].subnet_env().unwrap();
    let subnet: ipnet::Ipv4Net = env["FLANNEL_SUBNET"]
        .parse::<ipnet::Ipv4Net>()
        .unwrap()
        .trunc();
    let route = r#"flannel_dataplane_changes_total{op="add",kind="route"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = get(&lab, 0, "/metrics").1;
    while sample(&text, route) != Some(1.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        text = get(&lab, 0, "/metrics").1;
    }
    assert!(
        text.contains(&format!("flannel_lease_info{{subnet=\"{subnet}\"}} 1")),
        "{text}"
    );
    assert_eq!(
        sample(&text, route),
        Some(1.0),
        "one peer route installed: {text}"
    );
    assert!(sample(&text, "flannel_reconcile_runs_total").unwrap() >= 1.0);
    let expiry = sample(&text, "flannel_lease_expiration_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expiry - now - 86400.0).abs() < 120.0,
        "24 h lease: {expiry} vs now {now}"
    );
    // The last pass that worked ended after flanneld started and not after now.
    let last = sample(&text, "flannel_reconcile_last_success_timestamp_seconds").unwrap();
    assert!(
        last <= now + 1.0 && last > now - 120.0,
        "last pass {last} vs now {now}"
    );
    // A repair shows up as another route added.
    let peer = lab
        .etcd_list("/coreos.com/network/subnets/")
        .into_iter()
        .map(|(k, _)| k.rsplit('/').next().unwrap().replace('-', "/"))
        .find(|s| *s != subnet.to_string())
        .unwrap();
    lab.hosts[0].sh(&format!("ip route del {peer}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(&get(&lab, 0, "/metrics").1, route) != Some(2.0) {
        assert!(Instant::now() < deadline, "the repair was not counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The peer leaves: a removed lease event and a deleted route are counted.
    lab.stop_flanneld(1);
    lab.etcd_delete(&format!(
        "/coreos.com/network/subnets/{}",
        peer.replace('/', "-")
    ));
    let removed = r#"flannel_lease_events_total{type="removed"}"#;
    let deleted = r#"flannel_dataplane_changes_total{op="delete",kind="route"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = get(&lab, 0, "/metrics").1;
        if sample(&text, removed) == Some(1.0) && sample(&text, deleted) == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "departure not counted: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
