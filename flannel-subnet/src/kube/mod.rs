//! The Kubernetes subnet manager (`--kube-subnet-mgr`): Node objects are the store.
//!
//! Our lease is our Node's `spec.podCIDR(s)` (assigned by the controller manager's node IPAM); we
//! publish our public address and backend data as annotations on our Node, with a strategic-merge
//! patch to the `nodes/<name>/status` subresource (as upstream, so the RBAC rule is
//! `nodes/status: patch`), and mark the Node's `NetworkUnavailable` condition `False`. Peers come from
//! a watch of all Nodes ([`kube::runtime::watcher()`]: list, then watch, re-list after `410 Gone`), of
//! which only the few fields in [`NodeInfo`] are decoded and only the resulting lease is kept per node.
//!
//! ```no_run
//! use flannel_core::SubnetManager;
//! use flannel_subnet::kube::{KubeOptions, KubeSubnetManager, client};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = client(Some("https://10.0.0.1:6443"), Some("/etc/kubernetes/flannel.conf".as_ref())).await?;
//! let manager = KubeSubnetManager::new(client, KubeOptions {
//!     node_name: "node-1".into(),
//!     ..KubeOptions::default()
//! })?;
//! let config = manager.get_network_config().await?; // from /etc/kube-flannel/net-conf.json
//! # Ok(()) }
//! ```
//!
//! Differences from upstream: a change of any field that makes up a peer's lease (also its pod
//! CIDR, and the IPv4 half of a dual-stack node) is an event; upstream drops an IPv4-only change
//! when IPv6 is enabled. A node whose pod CIDR lies outside the network, or whose annotations do not
//! parse, is skipped with one log line per change instead of being installed.

pub mod annotations;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use flannel_core::{
    Backoff, Lease, LeaseAttrs, LeaseEvent, LeaseWatchResult, NetworkConfig, SubnetError,
    SubnetKey, SubnetManager,
};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use annotations::{AnnotationKeys, BadNode, BadPrefix, DEFAULT_PREFIX, NodeInfo};

/// Errors of Kubernetes mode set-up.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file could not be read.
    #[error("reading the kubeconfig {path}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither `--kube-api-url` nor `--kubeconfig-file`, and no in-cluster service account.
    #[error(
        "no Kubernetes API to talk to: give --kubeconfig-file or --kube-api-url, or run in a pod with a service account"
    )]
    InCluster(#[source] kube::config::InClusterError),
    /// `--kube-api-url` is not a URL.
    #[error("--kube-api-url {0:?} is not a URL such as https://10.0.0.1:6443")]
    BadUrl(String),
    /// The client could not be built from the config.
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    /// The API answered with an error.
    #[error("{what}")]
    Api {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// The node name cannot be found out.
    #[error("{0}")]
    NodeName(String),
    /// A bad `--kube-annotation-prefix`.
    #[error(transparent)]
    Prefix(#[from] BadPrefix),
    /// Our Node is not usable.
    #[error(transparent)]
    Node(#[from] BadNode),
}

impl From<KubeError> for SubnetError {
    fn from(e: KubeError) -> Self {
        SubnetError::Store(Box::new(e))
    }
}

/// Builds a client as upstream's `BuildConfigFromFlags`: from `kubeconfig` (with the server replaced
/// by `api_url` when both are given), from `api_url` alone (no credentials), or, with neither, from
/// the in-cluster service account.
pub async fn client(
    api_url: Option<&str>,
    kubeconfig: Option<&Path>,
) -> Result<kube::Client, KubeError> {
    let url = api_url
        .map(|u| {
            u.parse::<http::Uri>()
                .map_err(|_| KubeError::BadUrl(u.into()))
        })
        .transpose()?;
    let config = match (kubeconfig, url) {
        (Some(path), url) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.into(),
                    source,
                }
            })?;
            let mut c = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.into(),
                    source,
                })?;
            if let Some(u) = url {
                c.cluster_url = u;
            }
            c
        }
        (None, Some(u)) => kube::Config::new(u),
        (None, None) => kube::Config::incluster().map_err(KubeError::InCluster)?,
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}

/// The name of the Node we run on: `NODE_NAME`, or the `spec.nodeName` of the pod named by
/// `POD_NAMESPACE` and `POD_NAME` (the DaemonSet passes these through the downward API).
pub async fn node_name(client: &kube::Client) -> Result<String, KubeError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(n) = env("NODE_NAME") {
        return Ok(n);
    }
    let (Some(ns), Some(pod)) = (env("POD_NAMESPACE"), env("POD_NAME")) else {
        return Err(KubeError::NodeName(
            "cannot tell which node this is: set NODE_NAME, or POD_NAME and POD_NAMESPACE (the DaemonSet sets them from the downward API)".into(),
        ));
    };
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let p = pods.get(&pod).await.map_err(|source| KubeError::Api {
        what: format!("error retrieving pod spec for '{ns}/{pod}'"),
        source,
    })?;
    p.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            KubeError::NodeName(format!("node name not present in pod spec '{ns}/{pod}'"))
        })
}

/// How the Kubernetes subnet manager behaves.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Our Node's name.
    pub node_name: String,
    /// `--kube-annotation-prefix`.
    pub annotation_prefix: String,
    /// `--net-config-path`: the network config JSON (a ConfigMap mounted into the pod).
    pub net_config_path: PathBuf,
    /// `--set-node-network-unavailable`: mark the Node's network available once we run.
    pub set_node_network_unavailable: bool,
    /// How long to wait for our Node to get a pod CIDR before giving up (upstream: 30 s).
    pub pod_cidr_wait: Duration,
    /// How often to look again meanwhile (upstream: 3 s).
    pub retry_every: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            annotation_prefix: DEFAULT_PREFIX.into(),
            net_config_path: "/etc/kube-flannel/net-conf.json".into(),
            set_node_network_unavailable: true,
            pod_cidr_wait: Duration::from_secs(30),
            retry_every: Duration::from_secs(3),
        }
    }
}

/// A Node as flannel reads it: only the metadata fields and pod CIDRs of [`NodeInfo`] are decoded;
/// the rest of the object (status, images, managed fields) is skipped by the decoder.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawNode")]
struct NodeView {
    meta: ObjectMeta,
    pod_cidr: Option<String>,
    pod_cidrs: Vec<String>,
}

#[derive(Deserialize)]
struct RawNode {
    metadata: RawMeta,
    #[serde(default)]
    spec: RawSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMeta {
    name: Option<String>,
    resource_version: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
struct RawSpec {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs", default)]
    pod_cidrs: Vec<String>,
}

impl From<RawNode> for NodeView {
    fn from(r: RawNode) -> Self {
        Self {
            meta: ObjectMeta {
                name: r.metadata.name,
                resource_version: r.metadata.resource_version,
                annotations: Some(r.metadata.annotations),
                ..Default::default()
            },
            pod_cidr: r.spec.pod_cidr,
            pod_cidrs: r.spec.pod_cidrs,
        }
    }
}

impl kube::Resource for NodeView {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Node".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

impl NodeView {
    fn into_info(self) -> NodeInfo {
        NodeInfo {
            name: self.meta.name.unwrap_or_default(),
            pod_cidr: self.pod_cidr,
            pod_cidrs: self.pod_cidrs,
            annotations: self.meta.annotations.unwrap_or_default(),
        }
    }
}

/// Decodes a Node object (JSON) as the node watch does: only the fields of [`NodeInfo`] are read.
pub fn node_info_from_json(bytes: &[u8]) -> Result<NodeInfo, serde_json::Error> {
    serde_json::from_slice::<NodeView>(bytes).map(NodeView::into_info)
}

/// The Kubernetes subnet manager.
#[derive(Debug, Clone)]
pub struct KubeSubnetManager {
    nodes: Api<NodeView>,
    keys: AnnotationKeys,
    opts: KubeOptions,
}

impl KubeSubnetManager {
    /// A manager for `opts.node_name` over `client`; checks the annotation prefix.
    pub fn new(client: kube::Client, opts: KubeOptions) -> Result<Self, KubeError> {
        Ok(Self {
            nodes: Api::all(client),
            keys: AnnotationKeys::new(&opts.annotation_prefix)?,
            opts,
        })
    }

    /// The annotation keys in use.
    pub fn keys(&self) -> &AnnotationKeys {
        &self.keys
    }

    /// Reads our Node.
    pub async fn own_node(&self) -> Result<NodeInfo, KubeError> {
        let n = self
            .nodes
            .get(&self.opts.node_name)
            .await
            .map_err(|source| KubeError::Api {
                what: format!("reading node {:?}", self.opts.node_name),
                source,
            })?;
        Ok(n.into_info())
    }

    /// The `node-public-ip(v6)` annotations of our Node, which stand in for `--public-ip(v6)`.
    pub async fn node_public_ips(
        &self,
    ) -> Result<(Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>), KubeError> {
        Ok(annotations::node_public_ips(
            &self.keys,
            &self.own_node().await?,
        )?)
    }

    /// Our Node once it has a pod CIDR: looks every `retry_every` for up to `pod_cidr_wait`.
    async fn own_node_with_cidr(&self) -> Result<NodeInfo, KubeError> {
        let deadline = tokio::time::Instant::now() + self.opts.pod_cidr_wait;
        loop {
            let result = self.own_node().await.and_then(|n| {
                annotations::pod_cidrs(&n)?;
                Ok(n)
            });
            // Worth waiting for: a pod CIDR the node IPAM has not assigned yet, or an API server
            // that does not answer. Not: a node that does not exist or whose CIDRs are wrong.
            let transient = match &result {
                Ok(_) => false,
                Err(KubeError::Node(BadNode::NoPodCidr(_))) => true,
                Err(KubeError::Api { source, .. }) => {
                    !matches!(source, kube::Error::Api(s) if s.code == 404)
                }
                Err(_) => false,
            };
            match result {
                Ok(n) => return Ok(n),
                Err(e) if !transient || tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => warn!(
                    "{}; looking again in {:?} (giving up after {:?})",
                    flannel_core::chain(&e),
                    self.opts.retry_every,
                    self.opts.pod_cidr_wait
                ),
            }
            tokio::time::sleep(self.opts.retry_every).await;
        }
    }

    async fn patch_status(&self, what: &str, patch: serde_json::Value) -> Result<(), KubeError> {
        self.nodes
            .patch_status(
                &self.opts.node_name,
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
            .map(drop)
            .map_err(|source| KubeError::Api {
                what: format!("{what} of node {:?}", self.opts.node_name),
                source,
            })
    }

    fn read_config(path: &Path) -> Result<NetworkConfig, SubnetError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SubnetError::ConfigMissing(format!(
                "failed to read net conf {}: {e}; mount the kube-flannel-cfg ConfigMap there or pass --net-config-path",
                path.display()
            ))
        })?;
        Ok(NetworkConfig::parse(&text)?)
    }

    /// Upstream's (and our etcd manager's) 24 h nominal lease lifetime.
    fn expiration() -> Option<SystemTime> {
        SystemTime::now().checked_add(Duration::from_secs(24 * 3600))
    }
}

fn now_rfc3339() -> String {
    let t =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The peers as the watch last saw them: per node name, its lease (only managed, valid nodes).
#[derive(Debug, Default)]
struct PeerTable {
    leases: HashMap<String, Lease>,
    /// The last refusal logged per node, so a bad node is logged once per change.
    refused: HashMap<String, String>,
}

impl PeerTable {
    /// The lease of `node` (None when it is not flannel's or is refused, logged once per change).
    fn lease_of(
        &mut self,
        keys: &AnnotationKeys,
        config: &NetworkConfig,
        node: &NodeInfo,
    ) -> Option<Lease> {
        match annotations::node_to_lease(keys, config, node) {
            Ok(l) => {
                self.refused.remove(&node.name);
                l
            }
            Err(e) => {
                let msg = e.to_string();
                if self.refused.get(&node.name) != Some(&msg) {
                    warn!("ignoring node {:?}: {msg}", node.name);
                    self.refused.insert(node.name.clone(), msg);
                }
                None
            }
        }
    }

    /// A node was added or changed: the events that makes (a changed pod CIDR removes the old lease).
    fn apply(&mut self, name: &str, lease: Option<Lease>) -> Vec<LeaseEvent> {
        let old = match &lease {
            Some(l) => self.leases.insert(name.to_string(), l.clone()),
            None => self.leases.remove(name),
        };
        let mut events = Vec::new();
        match (old, lease) {
            (Some(o), Some(n)) if o.key == n.key && o.attrs == n.attrs => {}
            (Some(o), Some(n)) => {
                if o.key != n.key {
                    events.push(LeaseEvent::Removed(o));
                }
                events.push(LeaseEvent::Added(n));
            }
            (Some(o), None) => events.push(LeaseEvent::Removed(o)),
            (None, Some(n)) => events.push(LeaseEvent::Added(n)),
            (None, None) => {}
        }
        events
    }

    fn remove(&mut self, name: &str) -> Vec<LeaseEvent> {
        self.refused.remove(name);
        self.leases
            .remove(name)
            .map(LeaseEvent::Removed)
            .into_iter()
            .collect()
    }
}

#[async_trait]
impl SubnetManager for KubeSubnetManager {
    fn name(&self) -> &str {
        "kube"
    }

    async fn get_network_config(&self) -> Result<NetworkConfig, SubnetError> {
        Self::read_config(&self.opts.net_config_path)
    }

    async fn acquire_lease(&self, attrs: &LeaseAttrs) -> Result<Lease, SubnetError> {
        let config = self.get_network_config().await?;
        let node = self.own_node_with_cidr().await?;
        let key = annotations::own_lease_key(&config, &node).map_err(KubeError::from)?;
        let changed = annotations::desired_annotations(&self.keys, attrs, &node);
        if !changed.is_empty() {
            info!(node = %self.opts.node_name, annotations = changed.len(), "publishing flannel annotations on our node");
            self.patch_status("annotating", annotations::annotations_patch(&changed))
                .await?;
        }
        Ok(Lease {
            enable_ipv4: config.network().is_some(),
            key,
            attrs: attrs.clone(),
            expiration: Self::expiration(),
            asof: 0,
        })
    }

    async fn previous_attrs(&self) -> Option<LeaseAttrs> {
        let node = self.own_node().await.ok()?;
        Some(annotations::published_attrs(&self.keys, &node))
    }

    async fn renew_lease(&self, lease: &mut Lease) -> Result<(), SubnetError> {
        // Node objects do not expire: the pod CIDR is ours as long as the Node exists.
        lease.expiration = Self::expiration();
        Ok(())
    }

    async fn watch_leases(
        &self,
        sink: mpsc::Sender<LeaseWatchResult>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        let config = self.get_network_config().await?;
        let mut peers = PeerTable::default();
        // Nodes listed since the last Init, to replace the table at InitDone (a re-list after 410
        // Gone drops nodes deleted meanwhile and adds those created: nothing missed or invented).
        let mut relist: Option<HashMap<String, Lease>> = None;
        let stream = watcher(self.nodes.clone(), watcher::Config::default()).boxed();
        let mut stream = stream;
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                item = stream.next() => item,
            };
            let Some(item) = item else {
                return Err(SubnetError::Refused("the node watch ended".into()));
            };
            let result = match item {
                Ok(watcher::Event::Init) => {
                    relist = Some(HashMap::new());
                    None
                }
                Ok(watcher::Event::InitApply(n)) => {
                    let n = n.into_info();
                    if let (Some(l), Some(r)) =
                        (peers.lease_of(&self.keys, &config, &n), relist.as_mut())
                    {
                        r.insert(n.name, l);
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let fresh = relist.take().unwrap_or_default();
                    let snapshot: Vec<Lease> = fresh.values().cloned().collect();
                    info!(nodes = snapshot.len(), "node list synced");
                    peers.leases = fresh;
                    Some(LeaseWatchResult::Snapshot(snapshot))
                }
                Ok(watcher::Event::Apply(n)) => {
                    let n = n.into_info();
                    let lease = peers.lease_of(&self.keys, &config, &n);
                    let events = peers.apply(&n.name, lease);
                    (!events.is_empty()).then_some(LeaseWatchResult::Events(events))
                }
                Ok(watcher::Event::Delete(n)) => {
                    let events = peers.remove(&n.into_info().name);
                    (!events.is_empty()).then_some(LeaseWatchResult::Events(events))
                }
                Err(e) => {
                    warn!(error = %e, "node watch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    None
                }
            };
            if let Some(LeaseWatchResult::Events(events)) = &result {
                for e in events {
                    crate::metrics::metrics().lease_event(match e {
                        LeaseEvent::Added(_) => "added",
                        LeaseEvent::Removed(_) => "removed",
                    });
                }
            }
            if let Some(r) = result
                && sink.send(r).await.is_err()
            {
                return Ok(());
            }
        }
    }

    async fn watch_lease(
        &self,
        _key: SubnetKey,
        _sink: mpsc::Sender<LeaseWatchResult>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        // Our lease is our Node's pod CIDR: nothing can take it away while the Node exists.
        shutdown.cancelled().await;
        Ok(())
    }

    async fn complete_lease(
        &self,
        _lease: Lease,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        if self.opts.set_node_network_unavailable {
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
            loop {
                match self
                    .patch_status(
                        "setting NetworkUnavailable=False",
                        annotations::network_available_patch(&now_rfc3339()),
                    )
                    .await
                {
                    Ok(()) => {
                        info!(node = %self.opts.node_name, "node condition NetworkUnavailable=False (FlannelIsUp)");
                        break;
                    }
                    Err(e) => warn!(
                        "{}; retrying in {:?}",
                        flannel_core::chain(&e),
                        backoff.peek()
                    ),
                }
                if !backoff.sleep(&shutdown).await {
                    return Ok(());
                }
            }
        }
        shutdown.cancelled().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, ip: &str) -> Lease {
        Lease {
            key: key.parse().unwrap_or_else(|_| unreachable!()),
            enable_ipv4: true,
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap_or_else(|_| unreachable!()),
                ..Default::default()
            },
            expiration: None,
            asof: 0,
        }
    }

    #[test]
    fn peer_table_events() {
        let mut t = PeerTable::default();
        let a = lease("10.244.1.0-24", "192.168.0.1");
        assert_eq!(
            t.apply("n1", Some(a.clone())),
            vec![LeaseEvent::Added(a.clone())]
        );
        // The same lease again (a status heartbeat): no event.
        assert!(t.apply("n1", Some(a.clone())).is_empty());
        // A new public IP: added again.
        let b = lease("10.244.1.0-24", "192.168.0.9");
        assert_eq!(
            t.apply("n1", Some(b.clone())),
            vec![LeaseEvent::Added(b.clone())]
        );
        // A new pod CIDR: the old lease goes, the new one comes.
        let c = lease("10.244.7.0-24", "192.168.0.9");
        assert_eq!(
            t.apply("n1", Some(c.clone())),
            vec![LeaseEvent::Removed(b), LeaseEvent::Added(c.clone())]
        );
        // No longer flannel's (or refused): removed.
        assert_eq!(t.apply("n1", None), vec![LeaseEvent::Removed(c.clone())]);
        assert!(t.apply("n1", None).is_empty());
        t.apply("n2", Some(a.clone()));
        assert_eq!(t.remove("n2"), vec![LeaseEvent::Removed(a)]);
        assert!(t.remove("n2").is_empty());
    }

    #[test]
    fn the_node_decoder_keeps_only_what_flannel_uses() {
        let json = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1","resourceVersion":"42",
            "labels":{"a":"b"},"annotations":{"x.io/k":"v"},"managedFields":[{"manager":"kubelet"}]},
            "spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24"],"taints":[{"key":"k","effect":"NoSchedule"}]},
            "status":{"images":[{"names":["a"],"sizeBytes":1}],"conditions":[{"type":"Ready","status":"True"}]}}"#;
        let n: NodeView = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n.meta.resource_version.as_deref(), Some("42"));
        assert!(n.meta.labels.is_none() && n.meta.managed_fields.is_none());
        let info = n.into_info();
        assert_eq!(info.name, "n1");
        assert_eq!(info.pod_cidrs, vec!["10.244.1.0/24"]);
        assert_eq!(
            info.annotations.get("x.io/k").map(String::as_str),
            Some("v")
        );
        // A node without a spec (or annotations) decodes too.
        let n: NodeView =
            serde_json::from_str(r#"{"metadata":{"name":"n2"}}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n.into_info().pod_cidr, None);
    }
}
