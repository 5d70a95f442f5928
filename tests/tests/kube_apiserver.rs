//! The stand-in Kubernetes API server answers as a real one does: every rule of
//! `flannel_tests::kubeapi` has a test here, over plain HTTP, and `kubectl` (a client nobody here
//! wrote) lists, watches and patches through it.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use flannel_tests::kubeapi::ApiServer;
use flannel_tests::skip;
use serde_json::{Value, json};

/// One HTTP/1.1 request (connection closed after it); returns the status and the de-chunked body.
fn http(s: &ApiServer, method: &str, path: &str, ctype: &str, body: &str) -> (u16, String) {
    let addr = s.url().trim_start_matches("http://").to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let code: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut r = rest;
        while let Some((size, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (code, body)
}

fn get(s: &ApiServer, path: &str) -> (u16, Value) {
    let (code, body) = http(s, "GET", path, "application/json", "");
    (
        code,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

/// A watch's events (the request sets timeoutSeconds so the stream ends).
fn watch(s: &ApiServer, query: &str) -> Vec<Value> {
    let (code, body) = http(
        s,
        "GET",
        &format!("/api/v1/nodes?watch=true&{query}"),
        "",
        "",
    );
    assert_eq!(code, 200, "{body}");
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn names(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn list_pages_through_a_consistent_snapshot() {
    let s = ApiServer::start();
    for i in 1..=5 {
        s.add_node(&format!("n{i}"), &[&format!("10.244.{i}.0/24")]);
    }
    let (code, page1) = get(&s, "/api/v1/nodes?limit=2");
    assert_eq!(code, 200);
    assert_eq!(page1["kind"], "NodeList");
    assert_eq!(names(page1["items"].as_array().unwrap()), ["n1", "n2"]);
    assert_eq!(page1["metadata"]["remainingItemCount"], 3);
    assert!(
        page1["items"][0].get("kind").is_none(),
        "list items carry no kind"
    );
    let list_rv = rv(&page1);
    // A node added after the first page is not in the rest of this list.
    s.add_node("n6", &["10.244.6.0/24"]);
    let token = page1["metadata"]["continue"].as_str().unwrap();
    let (_, page2) = get(&s, &format!("/api/v1/nodes?limit=2&continue={token}"));
    assert_eq!(names(page2["items"].as_array().unwrap()), ["n3", "n4"]);
    assert_eq!(
        rv(&page2),
        list_rv,
        "every page has the list's resourceVersion"
    );
    let token = page2["metadata"]["continue"].as_str().unwrap().to_string();
    let (_, page3) = get(&s, &format!("/api/v1/nodes?limit=2&continue={token}"));
    assert_eq!(names(page3["items"].as_array().unwrap()), ["n5"]);
    assert!(page3["metadata"].get("continue").is_none());
    // A token that was used, or expired, is 410 Expired.
    let (code, st) = get(&s, &format!("/api/v1/nodes?limit=2&continue={token}"));
    assert_eq!(
        (code, st["reason"].as_str()),
        (410, Some("Expired")),
        "{st}"
    );
    let (_, p) = get(&s, "/api/v1/nodes?limit=1");
    s.expire_continue_tokens();
    let t = p["metadata"]["continue"].as_str().unwrap();
    let (code, st) = get(&s, &format!("/api/v1/nodes?continue={t}"));
    assert_eq!((code, st["code"].as_u64()), (410, Some(410)));
    // Without a limit: everything, now with n6.
    let (_, all) = get(&s, "/api/v1/nodes");
    assert_eq!(all["items"].as_array().unwrap().len(), 6);
    assert!(rv(&all) > list_rv);
}

#[test]
fn watch_replays_history_sends_bookmarks_and_times_out() {
    let s = ApiServer::start();
    s.add_node("n1", &["10.244.1.0/24"]);
    let (_, list) = get(&s, "/api/v1/nodes");
    let from = rv(&list);
    s.add_node("n2", &["10.244.2.0/24"]);
    s.update_node("n1", |n| n["metadata"]["labels"]["x"] = json!("y"));
    s.delete_node("n2");
    let started = std::time::Instant::now();
    let ev = watch(&s, &format!("resourceVersion={from}&timeoutSeconds=1"));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "timeoutSeconds holds the stream"
    );
    let kinds: Vec<(&str, &str)> = ev
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("ADDED", "n2"), ("MODIFIED", "n1"), ("DELETED", "n2")]
    );
    let rvs: Vec<u64> = ev.iter().map(|e| rv(&e["object"])).collect();
    assert!(
        rvs.windows(2).all(|w| w[0] < w[1]) && rvs[0] > from,
        "{rvs:?}"
    );
    // From the newest resourceVersion: nothing to replay.
    assert!(
        watch(
            &s,
            &format!("resourceVersion={}&timeoutSeconds=1", s.resource_version())
        )
        .is_empty()
    );
    // No resourceVersion: the current state as synthetic ADDED events.
    let ev = watch(&s, "timeoutSeconds=1");
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (
            ev[0]["type"].as_str(),
            ev[0]["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("n1"))
    );
    // Bookmarks carry the current resourceVersion and nothing else.
    s.set_bookmark_every(Duration::from_millis(200));
    let now = s.resource_version();
    let ev = watch(
        &s,
        &format!("resourceVersion={now}&allowWatchBookmarks=true&timeoutSeconds=1"),
    );
    assert!(ev.len() >= 2, "{ev:?}");
    for e in &ev {
        assert_eq!(e["type"], "BOOKMARK");
        assert_eq!(rv(&e["object"]), now);
        assert!(e["object"].get("spec").is_none());
    }
    // No bookmarks unless asked.
    assert!(watch(&s, &format!("resourceVersion={now}&timeoutSeconds=1")).is_empty());
}

#[test]
fn watch_from_a_version_older_than_the_history_is_410_expired() {
    let s = ApiServer::start();
    s.add_node("n1", &["10.244.1.0/24"]);
    let old = s.resource_version();
    s.set_history(2);
    for i in 0..5 {
        s.update_node("n1", |n| {
            n["metadata"]["labels"]["i"] = json!(i.to_string())
        });
    }
    let ev = watch(&s, &format!("resourceVersion={old}&timeoutSeconds=1"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["kind"], "Status");
    assert_eq!(ev[0]["object"]["code"], 410);
    assert_eq!(ev[0]["object"]["reason"], "Expired");
    // Within the history it still replays.
    let ev = watch(
        &s,
        &format!(
            "resourceVersion={}&timeoutSeconds=1",
            s.resource_version() - 1
        ),
    );
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["type"], "MODIFIED");
}

#[test]
fn get_nodes_and_pods_and_404() {
    let s = ApiServer::start();
    s.add_node("n1", &["10.244.1.0/24", "fd00:10:0:1::/64"]);
    s.add_pod("kube-flannel", "kube-flannel-ds-abc", "n1");
    let (code, n) = get(&s, "/api/v1/nodes/n1");
    assert_eq!(code, 200);
    assert_eq!(n["kind"], "Node");
    assert_eq!(n["spec"]["podCIDRs"][1], "fd00:10:0:1::/64");
    let (code, p) = get(
        &s,
        "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-abc",
    );
    assert_eq!(code, 200);
    assert_eq!(p["spec"]["nodeName"], "n1");
    let (code, st) = get(&s, "/api/v1/nodes/nope");
    assert_eq!(code, 404);
    assert_eq!(st["reason"], "NotFound");
    assert_eq!(st["message"], "nodes \"nope\" not found");
    let (code, _) = get(&s, "/api/v1/namespaces/default/pods/nope");
    assert_eq!(code, 404);
}

#[test]
fn patches_follow_strategic_merge_and_the_node_strategy() {
    let s = ApiServer::start();
    s.add_node("n1", &["10.244.1.0/24"]);
    let sm = "application/strategic-merge-patch+json";
    // Conditions merge by type: NetworkUnavailable joins Ready, Ready stays.
    let (code, body) = http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1/status",
        sm,
        r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp"}]}}"#,
    );
    assert_eq!(code, 200, "{body}");
    let n = s.node("n1").unwrap();
    let types: Vec<&str> = n["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Ready", "NetworkUnavailable"]);
    // The same type again replaces only that element's fields.
    http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1/status",
        sm,
        r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"True"}]}}"#,
    );
    let n = s.node("n1").unwrap();
    assert_eq!(n["status"]["conditions"][1]["status"], "True");
    assert_eq!(n["status"]["conditions"][1]["reason"], "FlannelIsUp");
    assert_eq!(n["status"]["conditions"].as_array().unwrap().len(), 2);
    // A JSON merge patch replaces the whole list.
    http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1/status",
        "application/merge-patch+json",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
    );
    assert_eq!(
        s.node("n1").unwrap()["status"]["conditions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Main resource: status changes are dropped, metadata and spec changes kept.
    let before = rv(&s.node("n1").unwrap());
    let (code, _) = http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1",
        sm,
        r#"{"metadata":{"annotations":{"a":"1"}},"spec":{"unschedulable":true},"status":{"conditions":[{"type":"X","status":"True"}]}}"#,
    );
    assert_eq!(code, 200);
    let n = s.node("n1").unwrap();
    assert_eq!(n["metadata"]["annotations"]["a"], "1");
    assert_eq!(n["spec"]["unschedulable"], true);
    assert_eq!(
        n["status"]["conditions"].as_array().unwrap().len(),
        1,
        "status write to the main resource dropped"
    );
    assert!(rv(&n) > before);
    // Status subresource: spec changes are dropped, annotations and status kept.
    http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1/status",
        sm,
        r#"{"metadata":{"annotations":{"b":"2"}},"spec":{"podCIDR":"10.9.9.0/24"},"status":{"conditions":[{"type":"Y","status":"True"}]}}"#,
    );
    let n = s.node("n1").unwrap();
    assert_eq!(
        n["spec"]["podCIDR"], "10.244.1.0/24",
        "spec write to status dropped"
    );
    assert_eq!(n["metadata"]["annotations"]["b"], "2");
    assert_eq!(n["status"]["conditions"].as_array().unwrap().len(), 2);
    // null deletes; a patch that changes nothing keeps the resourceVersion.
    http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1",
        sm,
        r#"{"metadata":{"annotations":{"a":null}}}"#,
    );
    let n = s.node("n1").unwrap();
    assert!(n["metadata"]["annotations"].get("a").is_none());
    let r = rv(&n);
    let (code, _) = http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1",
        sm,
        r#"{"metadata":{"annotations":{"b":"2"}}}"#,
    );
    assert_eq!(code, 200);
    assert_eq!(rv(&s.node("n1").unwrap()), r, "a no-op patch bumps nothing");
    // Identity fields are the server's.
    http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1",
        sm,
        r#"{"metadata":{"name":"other","uid":"x"}}"#,
    );
    assert_eq!(s.node("n1").unwrap()["metadata"]["name"], "n1");
    // Errors: unknown node, unsupported patch type, bad JSON.
    let (code, _) = http(&s, "PATCH", "/api/v1/nodes/nope/status", sm, "{}");
    assert_eq!(code, 404);
    let (code, _) = http(
        &s,
        "PATCH",
        "/api/v1/nodes/n1",
        "application/json-patch+json",
        "[]",
    );
    assert_eq!(code, 415);
    let (code, _) = http(&s, "PATCH", "/api/v1/nodes/n1", sm, "{");
    assert_eq!(code, 400);
}

fn kubectl_available(test: &str) -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
        || skip(test, "needs kubectl on PATH")
}

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["--request-timeout=10s"])
        .args(args)
        .env("KUBECACHEDIR", kubeconfig.parent().unwrap().join("cache"))
        .env("HOME", kubeconfig.parent().unwrap())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kubectl_lists_watches_and_patches_through_the_stand_in() {
    if !kubectl_available("kubectl_lists_watches_and_patches_through_the_stand_in") {
        return;
    }
    let s = ApiServer::start();
    s.add_node("n1", &["10.244.1.0/24"]);
    s.add_node("n2", &["10.244.2.0/24"]);
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, s.kubeconfig()).unwrap();

    // get nodes -o json: kubectl's list is the server's list.
    let (ok, out, err) = kubectl(&kc, &["get", "nodes", "-o", "json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["kind"], "List");
    let items = list["items"].as_array().unwrap();
    assert_eq!(names(items), ["n1", "n2"]);
    assert_eq!(
        items[0]["kind"], "Node",
        "kubectl fills in the kind of list items"
    );
    assert_eq!(items[1]["spec"]["podCIDR"], "10.244.2.0/24");
    let (ok, out, err) = kubectl(
        &kc,
        &["get", "node", "n2", "-o", "jsonpath={.spec.podCIDRs[0]}"],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "10.244.2.0/24");
    let (ok, _, err) = kubectl(&kc, &["get", "node", "nope"]);
    assert!(!ok);
    assert!(err.contains("nodes \"nope\" not found"), "{err}");

    // patch --subresource=status (kubectl 1.24+; Debian 12's kubernetes-client is 1.20): conditions
    // merge by type, as on a real server.
    let (_, version, _) = kubectl(&kc, &["version", "--client", "-o", "json"]);
    let minor: u32 = serde_json::from_str::<Value>(&version)
        .ok()
        .and_then(|v| {
            v["clientVersion"]["minor"]
                .as_str()
                .map(|m| m.trim_end_matches('+').to_string())
        })
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if minor < 24 {
        eprintln!("kubectl 1.{minor} has no --subresource: its patch checks are left out");
    } else {
        let (ok, _, err) = kubectl(
            &kc,
            &[
                "patch",
                "node",
                "n1",
                "--subresource=status",
                "--type=strategic",
                "-p",
                r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp"}]}}"#,
            ],
        );
        assert!(ok, "{err}");
        let n = s.node("n1").unwrap();
        assert_eq!(
            n["status"]["conditions"].as_array().unwrap().len(),
            2,
            "{n}"
        );
        // A spec change through the status subresource is dropped, as a real server's node strategy does.
        let (ok, _, err) = kubectl(
            &kc,
            &[
                "patch",
                "node",
                "n1",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"spec":{"podCIDR":"10.9.0.0/24"}}"#,
            ],
        );
        assert!(ok, "{err}");
        assert_eq!(s.node("n1").unwrap()["spec"]["podCIDR"], "10.244.1.0/24");
    }

    // get nodes --watch: kubectl lists, then shows changes as they happen.
    let mut child = flannel_tests::cleanup::spawn(
        Command::new("kubectl")
            .arg(format!("--kubeconfig={}", kc.display()))
            .args([
                "get",
                "nodes",
                "--watch",
                "--output-watch-events",
                "-o",
                "json",
                "--request-timeout=0",
            ])
            .env("KUBECACHEDIR", dir.path().join("cache"))
            .env("HOME", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    s.add_node("n3", &["10.244.3.0/24"]);
    s.update_node("n2", |n| n["metadata"]["annotations"] = json!({"x": "1"}));
    s.delete_node("n1");
    std::thread::sleep(Duration::from_secs(2));
    flannel_tests::cleanup::stop_child(&mut child, Duration::from_millis(500));
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    // kubectl prints one JSON document per event.
    let mut events = Vec::new();
    let de = serde_json::Deserializer::from_str(&out).into_iter::<Value>();
    for v in de {
        let v = v.unwrap_or_else(|e| panic!("{e}: {out}"));
        events.push((
            v["type"].as_str().unwrap_or_default().to_string(),
            v["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    let want: Vec<(String, String)> = [
        ("ADDED", "n1"),
        ("ADDED", "n2"),
        ("ADDED", "n3"),
        ("MODIFIED", "n2"),
        ("DELETED", "n1"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(events, want, "kubectl's events:\n{out}\n{err}");
}
