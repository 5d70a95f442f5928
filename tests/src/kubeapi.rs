//! A stand-in Kubernetes API server for Nodes and Pods, in-process, over plain HTTP.
//!
//! No real API server can be installed on these machines, so the Kubernetes-mode tests talk to this
//! one. It implements what flanneld and `kubectl` use, the way a real server answers:
//!
//! - discovery: `/version`, `/api`, `/apis`, `/api/v1`;
//! - `GET /api/v1/nodes` (a `NodeList` with `metadata.resourceVersion`; `limit` and `continue`
//!   page through a consistent snapshot; an unknown or evicted `continue` token is `410 Expired`);
//! - `GET /api/v1/nodes?watch=true&resourceVersion=R`: the changes after `R` replayed from a bounded
//!   history, then live; `ERROR` with a `410 Expired` Status once `R` is older than the history;
//!   no (or `0`) `resourceVersion`: synthetic `ADDED` events for every node first; `BOOKMARK`s with
//!   `allowWatchBookmarks=true`; closed after `timeoutSeconds`;
//! - `GET /api/v1/nodes/{name}`, `GET /api/v1/namespaces/{ns}/pods/{name}` (`404 NotFound` Status);
//! - `PATCH /api/v1/nodes/{name}` and `…/status` with JSON merge patches and strategic merge
//!   patches (lists of `status.conditions` and `status.addresses` merge by `type`, `null` deletes),
//!   under the node strategy: a write to the main resource keeps the old status, a write to the
//!   status subresource keeps the old spec. A patch that changes nothing bumps no resourceVersion.
//!
//! Tests change the cluster directly ([`ApiServer::add_node`], [`ApiServer::delete_node`], …) as the
//! controller manager and kubelet would. `tests/tests/kube_apiserver.rs` checks every rule, also with
//! `kubectl`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, Infallible>;

/// One change, as a watch sends it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Debug)]
struct Inner {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    history: VecDeque<Change>,
    history_cap: usize,
    /// Continue token → (list resourceVersion, the rest of the snapshot).
    pages: HashMap<String, (u64, Vec<Value>)>,
    page_order: VecDeque<String>,
    next_page: u64,
    bookmark_every: Duration,
    uid: u64,
}

#[derive(Debug)]
struct State {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    /// Cancelled to close every open watch (a new token then serves new watches).
    watches: Mutex<CancellationToken>,
    /// While set, new watch requests wait (to open a gap in which changes are missed).
    hold_watches: std::sync::atomic::AtomicBool,
    /// How many watches were answered with 410 Expired.
    expired: std::sync::atomic::AtomicU64,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a change (the caller holds the lock): history, then live watchers.
    fn emit(&self, inner: &mut Inner, kind: &'static str, object: Value) {
        let c = Change {
            rv: inner.rv,
            kind,
            object,
        };
        inner.history.push_back(c.clone());
        while inner.history.len() > inner.history_cap {
            inner.history.pop_front();
        }
        let _ = self.changes.send(c);
    }
}

/// The stand-in API server; stops when dropped.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn reply(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_else(|_| unreachable!("static response parts"))
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    reply(code, &status(code.as_u16(), reason, message))
}

fn not_found(kind: &str, name: &str) -> Response<Body> {
    let mut s = status(404, "NotFound", &format!("{kind} \"{name}\" not found"));
    s["details"] = json!({"name": name, "kind": kind});
    reply(StatusCode::NOT_FOUND, &s)
}

fn expired(message: &str) -> Value {
    status(410, "Expired", message)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The merge key of a list at `path` in a Node, as the Node's Go types declare it
/// (`patchStrategy:"merge" patchMergeKey:"type"`).
fn merge_key(path: &[&str]) -> Option<&'static str> {
    match path {
        ["status", "conditions"] | ["status", "addresses"] => Some("type"),
        _ => None,
    }
}

/// Strategic merge patch for a Node: a JSON merge patch, except that the lists with a merge key
/// merge element by element (an element with `"$patch": "delete"` removes its match).
fn strategic_patch(target: &mut Value, patch: &Value, path: &mut Vec<String>) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        path.push(k.clone());
        let parts: Vec<&str> = path.iter().map(String::as_str).collect();
        if v.is_null() {
            t.remove(k);
        } else if let (Some(key), Value::Array(items)) = (merge_key(&parts), v) {
            let list = t.entry(k.clone()).or_insert_with(|| json!([]));
            if !list.is_array() {
                *list = json!([]);
            }
            if let Value::Array(existing) = list {
                for item in items {
                    let id = item.get(key).cloned();
                    let pos = existing.iter().position(|e| e.get(key) == id.as_ref());
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            existing.remove(i);
                        }
                        (None, true) => {}
                        (Some(i), false) => merge_patch(&mut existing[i], item),
                        (None, false) => existing.push(item.clone()),
                    }
                }
            }
        } else {
            strategic_patch(t.entry(k.clone()).or_insert(Value::Null), v, path);
        }
        path.pop();
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect::<HashMap<_, _>>()
        })
        .unwrap_or_default()
}

fn with_kind(mut v: Value, kind: &str) -> Value {
    if let Value::Object(o) = &mut v {
        o.insert("kind".into(), json!(kind));
        o.insert("apiVersion".into(), json!("v1"));
    }
    v
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

impl ApiServer {
    /// Starts a server on `host` (port 0: a free one) inside the named network namespace, or the
    /// current one when `None`.
    ///
    /// # Panics
    /// When it cannot bind.
    pub fn start_in(netns: Option<&str>, host: &str, port: u16) -> Self {
        let (tx, _) = broadcast::channel(65536);
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                rv: 1,
                nodes: BTreeMap::new(),
                pods: BTreeMap::new(),
                history: VecDeque::new(),
                history_cap: 10_000,
                pages: HashMap::new(),
                page_order: VecDeque::new(),
                next_page: 0,
                bookmark_every: Duration::from_secs(1),
                uid: 0,
            }),
            changes: tx,
            watches: Mutex::new(CancellationToken::new()),
            hold_watches: std::sync::atomic::AtomicBool::new(false),
            expired: std::sync::atomic::AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let netns = netns.map(str::to_string);
        let host = host.to_string();
        let (st, sp, rq) = (state.clone(), stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            if let Some(ns) = netns {
                let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open netns");
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a valid namespace fd affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                    .await
                    .expect("bind the stand-in API server");
                let _ = addr_tx.send(listener.local_addr().expect("local_addr"));
                loop {
                    let conn = tokio::select! {
                        _ = sp.cancelled() => return,
                        c = listener.accept() => c,
                    };
                    let Ok((stream, _)) = conn else { continue };
                    let (st, sp, rq) = (st.clone(), sp.clone(), rq.clone());
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let (st, sp, rq) = (st.clone(), sp.clone(), rq.clone());
                            async move { Ok::<_, Infallible>(handle(st, sp, rq, req).await) }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    });
                }
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the stand-in API server did not start");
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
            requests,
        }
    }

    /// Starts a server on 127.0.0.1 with a free port.
    pub fn start() -> Self {
        Self::start_in(None, "127.0.0.1", 0)
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server (for kubectl and `--kubeconfig-file`).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: flannel\ncurrent-context: lab\nusers:\n- name: flannel\n  user: {{}}\n",
            self.url()
        )
    }

    /// Every request so far, as `METHOD path?query` (to compare with RBAC rules).
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many changes the watch history keeps (default 10,000); older resourceVersions get 410.
    pub fn set_history(&self, cap: usize) {
        let mut i = self.state.lock();
        i.history_cap = cap;
        while i.history.len() > cap {
            i.history.pop_front();
        }
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (default 1 s).
    pub fn set_bookmark_every(&self, every: Duration) {
        self.state.lock().bookmark_every = every;
    }

    /// Drops all saved list snapshots: every outstanding `continue` token is then expired.
    pub fn expire_continue_tokens(&self) {
        let mut i = self.state.lock();
        i.pages.clear();
        i.page_order.clear();
    }

    /// Closes every open watch; while `hold` is true, new watch requests wait until
    /// [`release_watches`](Self::release_watches). Changes made meanwhile reach the clients only by
    /// replay, or (once out of the history) by a re-list after 410.
    pub fn close_watches(&self, hold: bool) {
        use std::sync::atomic::Ordering;
        self.state.hold_watches.store(hold, Ordering::SeqCst);
        let mut w = self.state.watches.lock().unwrap_or_else(|e| e.into_inner());
        w.cancel();
        *w = CancellationToken::new();
    }

    /// Lets held watch requests proceed.
    pub fn release_watches(&self) {
        self.state
            .hold_watches
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many watch requests were answered with 410 Expired so far.
    pub fn expired_watches(&self) -> u64 {
        self.state.expired.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.lock().rv
    }

    /// Adds a Node with `spec.podCIDR(s)` (as the node IPAM controller assigns them) and a Ready
    /// condition (as the kubelet reports it).
    pub fn add_node(&self, name: &str, pod_cidrs: &[&str]) {
        let st = &self.state;
        let mut i = st.lock();
        i.rv += 1;
        i.uid += 1;
        let mut spec = json!({});
        if let Some(first) = pod_cidrs.first() {
            spec = json!({"podCIDR": first, "podCIDRs": pod_cidrs});
        }
        let node = json!({
            "kind": "Node", "apiVersion": "v1",
            "metadata": {
                "name": name, "uid": format!("00000000-0000-0000-0000-{:012}", i.uid),
                "resourceVersion": i.rv.to_string(),
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            },
            "spec": spec,
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "addresses": [{"type": "Hostname", "address": name}],
            },
        });
        let kind = if i.nodes.insert(name.into(), node.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.emit(&mut i, kind, node);
    }

    /// Adds a Node with pod CIDRs and annotations in one change (a peer that runs flannel already).
    pub fn add_annotated_node(&self, name: &str, pod_cidrs: &[&str], annotations: &[(&str, &str)]) {
        self.add_node(name, pod_cidrs);
        self.update_node(name, |n| {
            let a: serde_json::Map<String, Value> = annotations
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            n["metadata"]["annotations"] = Value::Object(a);
        });
    }

    /// Changes a Node as a controller would (no strategy applied); a change bumps the
    /// resourceVersion and is sent to watchers. Returns false when there is no such node.
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut Value)) -> bool {
        let st = &self.state;
        let mut i = st.lock();
        let Some(mut node) = i.nodes.get(name).cloned() else {
            return false;
        };
        let before = node.clone();
        f(&mut node);
        if node != before {
            i.rv += 1;
            node["metadata"]["resourceVersion"] = json!(i.rv.to_string());
            i.nodes.insert(name.into(), node.clone());
            st.emit(&mut i, "MODIFIED", node);
        }
        true
    }

    /// Deletes a Node. Returns false when there is no such node.
    pub fn delete_node(&self, name: &str) -> bool {
        let st = &self.state;
        let mut i = st.lock();
        let Some(mut node) = i.nodes.remove(name) else {
            return false;
        };
        i.rv += 1;
        node["metadata"]["resourceVersion"] = json!(i.rv.to_string());
        st.emit(&mut i, "DELETED", node);
        true
    }

    /// A Node as stored.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.state.lock().nodes.get(name).cloned()
    }

    /// Adds a Pod scheduled on `node`.
    pub fn add_pod(&self, namespace: &str, name: &str, node: &str) {
        let mut i = self.state.lock();
        i.rv += 1;
        let pod = json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": i.rv.to_string()},
            "spec": {"nodeName": node, "containers": [{"name": "kube-flannel", "image": "flannel"}]},
        });
        i.pods.insert((namespace.into(), name.into()), pod);
    }
}

/// `flanneld` with the alloc backend (no data plane, so safe in the root namespace) in Kubernetes mode against `api`:
/// the config at `dir/net-conf.json`, the subnet file `dir/subnet.env`, `--iface=lo`, no firewall
/// rules, no node name from the environment (callers set `NODE_NAME` or `POD_*`), stderr piped.
pub fn alloc_flanneld(api: &ApiServer, dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(crate::bin_path("flanneld"));
    cmd.arg("--kube-subnet-mgr")
        .arg(format!("--kube-api-url={}", api.url()))
        .arg(format!(
            "--net-config-path={}",
            dir.join("net-conf.json").display()
        ))
        .arg(format!(
            "--subnet-file={}",
            dir.join("subnet.env").display()
        ))
        .args(["--iface=lo", "--iptables-forward-rules=false"])
        .env_remove("NODE_NAME")
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(
    st: Arc<State>,
    stop: CancellationToken,
    log: Arc<Mutex<Vec<String>>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    log.lock().unwrap_or_else(|e| e.into_inner()).push(format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
    ));
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let q = query(&req);
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, ["version"]) => reply(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-flannel-standin",
                "platform": "linux/amd64"}),
        ),
        (Method::GET, ["api"]) => reply(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        ),
        (Method::GET, ["apis"]) => reply(
            StatusCode::OK,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        (Method::GET, ["api", "v1"]) => reply(StatusCode::OK, &api_resources()),
        (Method::GET, ["api", "v1", "nodes"]) => {
            if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                while st.hold_watches.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                watch(st, stop, &q)
            } else {
                list(&st, &q)
            }
        }
        (Method::GET, ["api", "v1", "nodes", name]) => match st.lock().nodes.get(*name) {
            Some(n) => reply(StatusCode::OK, n),
            None => not_found("nodes", name),
        },
        (Method::GET, ["api", "v1", "nodes", name, "status"]) => match st.lock().nodes.get(*name) {
            Some(n) => reply(StatusCode::OK, n),
            None => not_found("nodes", name),
        },
        (Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match st.lock().pods.get(&(ns.to_string(), name.to_string())) {
                Some(p) => reply(StatusCode::OK, p),
                None => not_found("pods", name),
            }
        }
        (Method::PATCH, ["api", "v1", "nodes", name]) => {
            let name = name.to_string();
            patch(&st, req, &name, false).await
        }
        (Method::PATCH, ["api", "v1", "nodes", name, "status"]) => {
            let name = name.to_string();
            patch(&st, req, &name, true).await
        }
        (m, _) if m == Method::GET || m == Method::PATCH => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        ),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
    }
}

fn api_resources() -> Value {
    json!({
        "kind": "APIResourceList", "groupVersion": "v1",
        "resources": [
            {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "Node",
             "verbs": ["get", "list", "patch", "watch"], "shortNames": ["no"]},
            {"name": "nodes/status", "singularName": "", "namespaced": false, "kind": "Node",
             "verbs": ["get", "patch"]},
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
             "verbs": ["get"], "shortNames": ["po"]},
        ],
    })
}

fn list(st: &State, q: &HashMap<String, String>) -> Response<Body> {
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let mut i = st.lock();
    let (rv, mut items) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match i.pages.remove(token) {
            Some(page) => page,
            None => {
                return reply(
                    StatusCode::GONE,
                    &expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                );
            }
        },
        None => {
            // List items carry no kind/apiVersion, as a real server's.
            let all: Vec<Value> = i
                .nodes
                .values()
                .map(|n| {
                    let mut n = n.clone();
                    if let Value::Object(o) = &mut n {
                        o.remove("kind");
                        o.remove("apiVersion");
                    }
                    n
                })
                .collect();
            (i.rv, all)
        }
    };
    let rest = if items.len() > limit {
        items.split_off(limit)
    } else {
        Vec::new()
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if !rest.is_empty() {
        i.next_page += 1;
        let token = format!("c{}-{rv}", i.next_page);
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        i.pages.insert(token.clone(), (rv, rest));
        i.page_order.push_back(token);
        while i.page_order.len() > 64 {
            if let Some(old) = i.page_order.pop_front() {
                i.pages.remove(&old);
            }
        }
    }
    reply(
        StatusCode::OK,
        &json!({"kind": "NodeList", "apiVersion": "v1", "metadata": metadata, "items": items}),
    )
}

fn watch(st: Arc<State>, stop: CancellationToken, q: &HashMap<String, String>) -> Response<Body> {
    let from = q
        .get("resourceVersion")
        .filter(|r| !r.is_empty() && *r != "0");
    let bookmarks = q
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
    let mut first: Vec<Bytes> = Vec::new();
    let (mut live, every, mut last_rv) = {
        let i = st.lock();
        let every = i.bookmark_every;
        match from {
            None => {
                for n in i.nodes.values() {
                    first.push(event_line("ADDED", n));
                }
            }
            Some(r) => {
                let Ok(r) = r.parse::<u64>() else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("resourceVersion {r:?} is not a number"),
                    );
                };
                // The history holds every change after `oldest - 1`; older is gone.
                let oldest = i.history.front().map_or(i.rv + 1, |c| c.rv);
                if r + 1 < oldest && r < i.rv {
                    st.expired.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let msg = format!("too old resource version: {r} ({})", oldest - 1);
                    first.push(event_line("ERROR", &expired(&msg)));
                    let body = futures::stream::iter(
                        first
                            .into_iter()
                            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
                    );
                    return Response::builder()
                        .header("content-type", "application/json")
                        .body(BodyExt::boxed(StreamBody::new(body)))
                        .unwrap_or_else(|_| unreachable!());
                }
                for c in i.history.iter().filter(|c| c.rv > r) {
                    first.push(event_line(c.kind, &c.object));
                }
            }
        }
        (st.changes.subscribe(), every, i.rv)
    };
    let closed = st.watches.lock().unwrap_or_else(|e| e.into_inner()).clone();
    tokio::spawn(async move {
        for b in first {
            if tx.send(Ok(Frame::data(b))).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            let line = tokio::select! {
                _ = stop.cancelled() => return,
                _ = closed.cancelled() => return,
                _ = &mut end => return,
                _ = tick.tick(), if bookmarks => event_line("BOOKMARK", &json!({
                    "kind": "Node", "apiVersion": "v1",
                    "metadata": {"resourceVersion": last_rv.to_string()},
                })),
                c = live.recv() => match c {
                    Ok(c) => {
                        last_rv = c.rv;
                        event_line(c.kind, &c.object)
                    }
                    // A watcher too slow for the change rate is closed, as a real server does;
                    // the client watches again from its last resourceVersion.
                    Err(_) => return,
                },
            };
            if tx.send(Ok(Frame::data(line))).await.is_err() {
                return;
            }
        }
    });
    let body = tokio_stream_from(rx);
    Response::builder()
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(body)))
        .unwrap_or_else(|_| unreachable!())
}

fn tokio_stream_from<T>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn patch(st: &State, req: Request<Incoming>, name: &str, status: bool) -> Response<Body> {
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("the body of the request was in an unknown format: {e}"),
            );
        }
    };
    let mut i = st.lock();
    let Some(old) = i.nodes.get(name).cloned() else {
        return not_found("nodes", name);
    };
    let mut new = old.clone();
    match ctype.as_str() {
        "application/merge-patch+json" => merge_patch(&mut new, &patch),
        "application/strategic-merge-patch+json" => {
            strategic_patch(&mut new, &patch, &mut Vec::new())
        }
        other => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"
                ),
            );
        }
    }
    // The node strategy: the main resource cannot change status, the status subresource cannot
    // change spec; identity fields are the server's.
    let keep = if status { "spec" } else { "status" };
    match old.get(keep) {
        Some(v) => new[keep] = v.clone(),
        None => {
            if let Value::Object(o) = &mut new {
                o.remove(keep);
            }
        }
    }
    for f in ["name", "uid", "creationTimestamp", "resourceVersion"] {
        new["metadata"][f] = old["metadata"][f].clone();
    }
    new["kind"] = json!("Node");
    new["apiVersion"] = json!("v1");
    if new != old {
        i.rv += 1;
        new["metadata"]["resourceVersion"] = json!(i.rv.to_string());
        i.nodes.insert(name.into(), new.clone());
        st.emit(&mut i, "MODIFIED", new.clone());
    }
    reply(StatusCode::OK, &with_kind(new, "Node"))
}
