//! The etcd v3 subnet manager against a real etcd server.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, CompactionOptions, PutOptions};
use flannel_core::{
    LeaseAttrs, LeaseTracker, LeaseWatchResult, PreviousSubnets, SubnetError, SubnetKey,
    SubnetManager,
};
use flannel_subnet::{
    EtcdConfig, EtcdRegistry, KeyValue, LocalManager, ManagerOptions, Registry, RegistryError,
    RegistryWatch, WatchItem,
};
use flannel_tests::etcd::{EtcdServer, TlsFiles};
use flannel_tests::{eventually, require_etcd};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#;

async fn registry(url: &str) -> EtcdRegistry {
    EtcdRegistry::connect(&EtcdConfig {
        endpoints: vec![url.to_string()],
        ..Default::default()
    })
    .await
    .expect("connect")
}

async fn client(url: &str) -> Client {
    Client::connect([url], None).await.expect("etcd client")
}

/// A fresh etcd holding the network config `config`, and a client of it.
async fn etcd_with_config(config: &str) -> (EtcdServer, Client) {
    let etcd = EtcdServer::start();
    let mut c = client(&etcd.url()).await;
    c.put(format!("{PREFIX}/config"), config, None)
        .await
        .unwrap();
    (etcd, c)
}

fn attrs(ip: &str) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: ip.parse().unwrap(),
        backend_type: "alloc".into(),
        ..Default::default()
    }
}

async fn keys(c: &mut Client) -> BTreeSet<SubnetKey> {
    let r = c
        .get(
            format!("{PREFIX}/subnets"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| SubnetKey::parse(kv.key_str().unwrap()).unwrap())
        .collect()
}

/// Starts `m`'s lease watch into a channel of `capacity`: the results, the token that stops it,
/// and its task.
fn start_watch<M: SubnetManager + 'static>(
    m: Arc<M>,
    capacity: usize,
) -> (
    mpsc::Receiver<LeaseWatchResult>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), SubnetError>>,
) {
    let (tx, rx) = mpsc::channel(capacity);
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { m.watch_leases(tx, stop).await })
    };
    (rx, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_missing_invalid_ipv6_only_then_valid() {
    if !require_etcd("config_missing_invalid_ipv6_only_then_valid") {
        return;
    }
    let etcd = EtcdServer::start();
    let m = LocalManager::new(registry(&etcd.url()).await, ManagerOptions::default());
    let e = m.get_network_config().await.unwrap_err();
    assert!(matches!(e, SubnetError::ConfigMissing(_)), "{e}");
    assert!(
        e.to_string().contains("/coreos.com/network/config"),
        "says where to put it: {e}"
    );
    let mut c = client(&etcd.url()).await;
    c.put(
        format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","SubnetLen":8}"#,
        None,
    )
    .await
    .unwrap();
    let e = m.get_network_config().await.unwrap_err();
    assert!(e.to_string().contains("at least four subnets"), "{e}");
    // IPv6-only: an invalid config for the etcd subnet manager (waited out before any backend
    // makes a device), naming the way that supports it.
    c.put(
        format!("{PREFIX}/config"),
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:5::/48"}"#,
        None,
    )
    .await
    .unwrap();
    let e = m.get_network_config().await.unwrap_err();
    assert!(matches!(e, SubnetError::ConfigInvalid(_)), "{e}");
    assert!(
        e.to_string().contains("IPv6-only") && e.to_string().contains("--kube-subnet-mgr"),
        "{e}"
    );
    c.put(format!("{PREFIX}/config"), CONFIG, None)
        .await
        .unwrap();
    let cfg = m.get_network_config().await.unwrap();
    assert_eq!(cfg.network().unwrap().to_string(), "10.5.0.0/16");
    assert_eq!(cfg.backend_type, "alloc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_acquires_get_distinct_subnets_and_exhaustion_is_clear() {
    if !require_etcd("fifty_concurrent_acquires") {
        return;
    }
    let (etcd, mut c) = etcd_with_config(
        r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.60.0"}"#,
    )
    .await;
    let reg = registry(&etcd.url()).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let m = LocalManager::new(reg.clone(), ManagerOptions::default());
        tasks.push(tokio::spawn(async move {
            m.acquire_lease(&attrs(&format!("192.168.0.{}", i + 1)))
                .await
        }));
    }
    let mut got = BTreeSet::new();
    for t in tasks {
        let lease = t.await.unwrap().expect("acquire");
        assert!(
            got.insert(lease.key),
            "subnet {} handed out twice",
            lease.key
        );
    }
    assert_eq!(got.len(), 50);
    assert_eq!(
        keys(&mut c).await,
        got,
        "etcd holds exactly the leases handed out"
    );
    // Every stored value is ours, in Go's format.
    let r = c
        .get(
            format!("{PREFIX}/subnets"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    for kv in r.kvs() {
        let v = kv.value_str().unwrap();
        assert!(
            v.starts_with(r#"{"PublicIP":"192.168.0."#)
                && v.ends_with(r#"","PublicIPv6":null,"BackendType":"alloc"}"#),
            "{v}"
        );
        assert_ne!(kv.lease(), 0, "attached to an etcd lease");
    }

    // A small network runs out with a clear error.
    c.put("/small/config", r#"{"Network":"10.9.0.0/28"}"#, None)
        .await
        .unwrap();
    let opts = ManagerOptions {
        prefix: "/small".into(),
        ..Default::default()
    };
    let m = LocalManager::new(reg.clone(), opts);
    for i in 0..3 {
        m.acquire_lease(&attrs(&format!("192.168.1.{}", i + 1)))
            .await
            .expect("three /30 subnets fit");
    }
    let e = m.acquire_lease(&attrs("192.168.1.9")).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("out of subnets: all 3 /30 subnets of 10.9.0.0/28"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_subnet_and_go_json_is_compatible() {
    if !require_etcd("restart_keeps_subnet") {
        return;
    }
    let (etcd, mut c) = etcd_with_config(CONFIG).await;
    let reg = registry(&etcd.url()).await;

    // Same public IP: the same lease is reused.
    let m = LocalManager::new(reg.clone(), ManagerOptions::default());
    let first = m.acquire_lease(&attrs("192.168.7.1")).await.unwrap();
    let again = m.acquire_lease(&attrs("192.168.7.1")).await.unwrap();
    assert_eq!(first.key, again.key);

    // Lease gone (e.g. after a long downtime) but the subnet file remains: the subnet comes back,
    // even with a new public IP.
    c.delete(format!("{PREFIX}/subnets/{}", first.key), None)
        .await
        .unwrap();
    let text = format!(
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET={}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        std::net::Ipv4Addr::from(u32::from(first.key.ipv4.addr()) + 1)
    );
    let prev = PreviousSubnets::parse(&text);
    let m = LocalManager::new(
        reg.clone(),
        ManagerOptions {
            previous: prev,
            ..Default::default()
        },
    );
    let back = m.acquire_lease(&attrs("192.168.7.2")).await.unwrap();
    assert_eq!(back.key, first.key);

    // A lease written by Go flanneld, byte for byte, is read; a node with its public IP reuses it.
    let go = r#"{"PublicIP":"192.168.7.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
    c.put(format!("{PREFIX}/subnets/10.5.99.0-24"), go, None)
        .await
        .unwrap();
    let (mut rx, stop, w) = start_watch(Arc::new(m), 8);
    let Some(LeaseWatchResult::Snapshot(leases)) = rx.recv().await else {
        panic!("no snapshot")
    };
    let golang = leases
        .iter()
        .find(|l| l.key.to_string() == "10.5.99.0-24")
        .expect("Go lease read");
    assert_eq!(
        golang.attrs.backend_data.as_ref().unwrap().to_value()["VtepMAC"],
        "c6:d2:32:6f:8f:44"
    );
    assert_eq!(golang.attrs.to_json(), go);
    stop.cancel();
    w.await.unwrap().unwrap();
    let m = LocalManager::new(reg.clone(), ManagerOptions::default());
    let mine = m
        .acquire_lease(&LeaseAttrs {
            backend_type: "vxlan".into(),
            ..attrs("192.168.7.3")
        })
        .await
        .unwrap();
    assert_eq!(mine.key.to_string(), "10.5.99.0-24");
    let stored = c
        .get(format!("{PREFIX}/subnets/10.5.99.0-24"), None)
        .await
        .unwrap();
    assert_eq!(
        stored.kvs()[0].value_str().unwrap(),
        r#"{"PublicIP":"192.168.7.3","PublicIPv6":null,"BackendType":"vxlan"}"#
    );
    // The reservation (no etcd lease) stays a reservation.
    assert_eq!(stored.kvs()[0].lease(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_never_handed_out() {
    if !require_etcd("reservations_are_never_handed_out") {
        return;
    }
    let (etcd, mut c) = etcd_with_config(
        r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}"#,
    )
    .await;
    for s in ["10.5.1.0-24", "10.5.2.0-24"] {
        c.put(
            format!("{PREFIX}/subnets/{s}"),
            r#"{"PublicIP":"10.0.0.200"}"#,
            None,
        )
        .await
        .unwrap();
    }
    let m = LocalManager::new(registry(&etcd.url()).await, ManagerOptions::default());
    let l = m.acquire_lease(&attrs("10.0.0.1")).await.unwrap();
    assert_eq!(l.key.to_string(), "10.5.3.0-24");
    assert!(
        m.acquire_lease(&attrs("10.0.0.2"))
            .await
            .unwrap_err()
            .to_string()
            .contains("out of subnets")
    );
}

/// Collects watch results into a tracker until it holds `want`.
/// A manager on `reg` that acquires a lease for `ip` and keeps it renewed until the token is
/// cancelled: (manager, lease, its etcd key, the token, the keeper task).
async fn kept_lease(
    reg: EtcdRegistry,
    opts: ManagerOptions,
    ip: &str,
) -> (
    Arc<LocalManager<EtcdRegistry>>,
    flannel_core::Lease,
    String,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), SubnetError>>,
) {
    let m = Arc::new(LocalManager::new(reg, opts));
    let lease = m.acquire_lease(&attrs(ip)).await.unwrap();
    let key = format!("{PREFIX}/subnets/{}", lease.key);
    let stop = CancellationToken::new();
    let keeper = {
        let (m, stop, lease) = (m.clone(), stop.clone(), lease.clone());
        tokio::spawn(async move { m.complete_lease(lease, stop).await })
    };
    (m, lease, key, stop, keeper)
}

async fn converge(
    rx: &mut mpsc::Receiver<LeaseWatchResult>,
    t: &mut LeaseTracker,
    want: &BTreeSet<SubnetKey>,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let have: BTreeSet<SubnetKey> = t.leases().map(|l| l.key).collect();
        if &have == want {
            return true;
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => {
                t.apply(r);
            }
            _ => {
                eprintln!("tracker holds {have:?}, want {want:?}");
                return false;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_add_remove_expiry_and_survives_restart() {
    if !require_etcd("watch_sees_add_remove_expiry") {
        return;
    }
    let mut etcd = EtcdServer::start();
    let mut c = client(&etcd.url()).await;
    let m = Arc::new(LocalManager::new(
        registry(&etcd.url()).await,
        ManagerOptions::default(),
    ));
    let (mut rx, stop, w) = start_watch(m.clone(), 64);
    let mut t = LeaseTracker::new(None);
    assert!(converge(&mut rx, &mut t, &BTreeSet::new()).await);
    let put = |s: &str| {
        (
            format!("{PREFIX}/subnets/{s}"),
            format!(
                r#"{{"PublicIP":"10.0.0.{}"}}"#,
                s.split('.').nth(2).unwrap()
            ),
        )
    };
    let (k, v) = put("10.5.1.0-24");
    c.put(k, v, None).await.unwrap();
    let (k, v) = put("10.5.2.0-24");
    c.put(k.clone(), v, None).await.unwrap();
    let want: BTreeSet<SubnetKey> = ["10.5.1.0-24", "10.5.2.0-24"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(converge(&mut rx, &mut t, &want).await, "adds seen");
    c.delete(k, None).await.unwrap();
    let want: BTreeSet<SubnetKey> = ["10.5.1.0-24"].iter().map(|s| s.parse().unwrap()).collect();
    assert!(converge(&mut rx, &mut t, &want).await, "delete seen");
    // TTL expiry.
    let lease = c.lease_grant(2, None).await.unwrap().id();
    let (k, v) = put("10.5.3.0-24");
    c.put(k, v, Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let with3: BTreeSet<SubnetKey> = ["10.5.1.0-24", "10.5.3.0-24"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        converge(&mut rx, &mut t, &with3).await,
        "short-TTL lease seen"
    );
    assert!(
        converge(&mut rx, &mut t, &want).await,
        "expiry seen as removal"
    );

    // etcd restart: the watcher reconnects and sees what happens afterwards.
    etcd.restart();
    let mut c = client(&etcd.url()).await;
    let (k, v) = put("10.5.4.0-24");
    c.put(k, v, None).await.unwrap();
    c.delete(format!("{PREFIX}/subnets/10.5.1.0-24"), None)
        .await
        .unwrap();
    let after = keys(&mut c).await;
    assert_eq!(after.len(), 1);
    assert!(
        converge(&mut rx, &mut t, &after).await,
        "no missed and no phantom lease after an etcd restart"
    );
    stop.cancel();
    w.await.unwrap().unwrap();
}

/// A real etcd registry whose watches wait for a permit: lets the test change and compact the store
/// between the snapshot and the watch, which is what a slow or disconnected watcher experiences.
/// It also counts the events its watches have handed to the manager (`read`).
#[derive(Debug)]
struct Gated {
    inner: EtcdRegistry,
    gate: Arc<Semaphore>,
    read: Arc<AtomicUsize>,
}

impl Gated {
    async fn open(url: &str, permits: usize) -> Self {
        Self {
            inner: registry(url).await,
            gate: Arc::new(Semaphore::new(permits)),
            read: Arc::default(),
        }
    }
}

/// A watch that counts the events it yields.
struct Counted {
    inner: Box<dyn RegistryWatch>,
    read: Arc<AtomicUsize>,
}

#[async_trait]
impl RegistryWatch for Counted {
    async fn next(&mut self) -> Result<Option<WatchItem>, RegistryError> {
        let item = self.inner.next().await;
        if let Ok(Some(WatchItem::Events(events, _))) = &item {
            self.read.fetch_add(events.len(), Ordering::SeqCst);
        }
        item
    }
}

#[async_trait]
impl Registry for Gated {
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, i64), RegistryError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), RegistryError> {
        self.inner.list(prefix).await
    }
    async fn create(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, RegistryError> {
        self.inner.create(key, value, ttl).await
    }
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<i64, RegistryError> {
        self.inner.put(key, value, ttl).await
    }
    async fn put_if_value(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, RegistryError> {
        self.inner.put_if_value(key, expected, value, ttl).await
    }
    async fn delete(&self, key: &str) -> Result<(), RegistryError> {
        self.inner.delete(key).await
    }
    async fn ttl(&self, lease_id: i64) -> Result<Option<Duration>, RegistryError> {
        self.inner.ttl(lease_id).await
    }
    async fn watch(
        &self,
        key: &str,
        prefix: bool,
        since: i64,
    ) -> Result<Box<dyn RegistryWatch>, RegistryError> {
        self.gate.acquire().await.expect("gate").forget();
        Ok(Box::new(Counted {
            inner: self.inner.watch(key, prefix, since).await?,
            read: self.read.clone(),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_recovers_from_compaction_without_missing_or_phantom_leases() {
    if !require_etcd("watch_recovers_from_compaction") {
        return;
    }
    let etcd = EtcdServer::start();
    let mut c = client(&etcd.url()).await;
    for i in 1..=5 {
        c.put(
            format!("{PREFIX}/subnets/10.5.{i}.0-24"),
            format!(r#"{{"PublicIP":"10.0.0.{i}"}}"#),
            None,
        )
        .await
        .unwrap();
    }
    let registry = Gated::open(&etcd.url(), 0).await;
    let gate = registry.gate.clone();
    let m = Arc::new(LocalManager::new(registry, ManagerOptions::default()));
    let (mut rx, stop, w) = start_watch(m.clone(), 64);
    let mut t = LeaseTracker::new(None);
    let Some(first) = rx.recv().await else {
        panic!("no snapshot")
    };
    t.apply(first);
    assert_eq!(t.leases().count(), 5);
    // While the watcher is not watching: remove two, add two, then compact everything away.
    for i in [1, 2] {
        c.delete(format!("{PREFIX}/subnets/10.5.{i}.0-24"), None)
            .await
            .unwrap();
    }
    for i in [6, 7] {
        c.put(
            format!("{PREFIX}/subnets/10.5.{i}.0-24"),
            format!(r#"{{"PublicIP":"10.0.0.{i}"}}"#),
            None,
        )
        .await
        .unwrap();
    }
    let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
    c.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    gate.add_permits(100);
    let want = keys(&mut c).await;
    assert_eq!(want.len(), 5);
    assert!(
        converge(&mut rx, &mut t, &want).await,
        "re-listed after compaction"
    );
    // And it keeps watching afterwards.
    c.put(
        format!("{PREFIX}/subnets/10.5.8.0-24"),
        r#"{"PublicIP":"10.0.0.8"}"#,
        None,
    )
    .await
    .unwrap();
    let want = keys(&mut c).await;
    assert!(converge(&mut rx, &mut t, &want).await);
    stop.cancel();
    w.await.unwrap().unwrap();
}

/// A list bigger than one gRPC message may be (tonic decodes at most 4 MiB; 20,000 vxlan leases are
/// about that) is read in pages at one revision, and whole; pages of big values shrink until they fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_bigger_than_a_grpc_message_is_read_whole() {
    if !require_etcd("a_list_bigger_than_a_grpc_message") {
        return;
    }
    let etcd = EtcdServer::start();
    let mut c = client(&etcd.url()).await;
    const N: usize = 2500;
    // 5 kB values: a page of 1000 is over the limit too, so pages shrink until they fit.
    let pad = "x".repeat(5000);
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(
                    format!("{PREFIX}/subnets/10.{}.{}.0-24", 100 + i / 256, i % 256),
                    format!(r#"{{"PublicIP":"10.0.0.1","BackendData":{{"Pad":"{pad}"}}}}"#),
                    None,
                )
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    let reg = registry(&etcd.url()).await;
    let (kvs, rev) = reg.list(&format!("{PREFIX}/subnets/")).await.unwrap();
    assert_eq!(kvs.len(), N, "every key, once");
    let distinct: BTreeSet<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(distinct.len(), N);
    let now = c.get("x", None).await.unwrap().header().unwrap().revision();
    assert_eq!(rev, now, "the revision the list was read at");
}

/// While the consumer is busy (a long kernel pass), the watch keeps reading the store: events wait
/// in the manager, merged into one batch, not in the connection's receive buffers (which would keep
/// their high-water size for the life of the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_consumer_gets_the_events_merged_and_the_watch_keeps_reading() {
    if !require_etcd("a_busy_consumer_gets_the_events_merged") {
        return;
    }
    let etcd = EtcdServer::start();
    let mut c = client(&etcd.url()).await;
    let registry = Gated::open(&etcd.url(), 100).await;
    let read = registry.read.clone();
    let m = Arc::new(LocalManager::new(registry, ManagerOptions::default()));
    // Room for one result: the consumer below takes the snapshot and then stops reading.
    let (mut rx, stop, w) = start_watch(m, 1);
    let Some(LeaseWatchResult::Snapshot(first)) = rx.recv().await else {
        panic!("no snapshot")
    };
    assert!(first.is_empty());
    const N: usize = 100;
    for i in 0..N {
        c.put(
            format!("{PREFIX}/subnets/10.5.{i}.0-24"),
            format!(r#"{{"PublicIP":"10.0.0.{i}"}}"#),
            None,
        )
        .await
        .unwrap();
    }
    let all_read = eventually(Duration::from_secs(20), || {
        let n = read.load(Ordering::SeqCst);
        async move { (n == N).then_some(()) }
    })
    .await;
    assert!(
        all_read.is_some(),
        "the watch stopped reading while the consumer was busy: {} of {N} events read",
        read.load(Ordering::SeqCst)
    );
    let mut t = LeaseTracker::new(None);
    let mut results = 0;
    while t.leases().count() < N {
        let r = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("events arrive")
            .expect("watch open");
        assert!(matches!(r, LeaseWatchResult::Events(_)));
        t.apply(r);
        results += 1;
    }
    // At most one result waited in the channel; everything read after it came as one merged batch.
    // (etcd may also put all the events in one watch response, when the watch reads late: then
    // the first result holds them all.)
    assert!(results <= 2, "{N} events came as {results} results");
    stop.cancel();
    w.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_short_lease_alive_and_a_deleted_lease_comes_back() {
    if !require_etcd("renewal_keeps_a_short_lease_alive") {
        return;
    }
    let (etcd, mut c) = etcd_with_config(CONFIG).await;
    let opts = ManagerOptions {
        lease_ttl: Duration::from_secs(3),
        renew_margin: Duration::from_secs(2),
        ..Default::default()
    };
    let (_m, _lease, key, stop, keeper) =
        kept_lease(registry(&etcd.url()).await, opts, "10.0.0.1").await;
    // Three TTLs later the key is still there.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = c.get(key.as_str(), None).await.unwrap();
        assert_eq!(r.kvs().len(), 1, "lease expired although it is renewed");
    }
    // Deleted by someone: re-created with the same subnet.
    c.delete(key.as_str(), None).await.unwrap();
    let back = eventually(Duration::from_secs(10), || {
        let (mut c, key) = (c.clone(), key.clone());
        async move {
            c.get(key, None)
                .await
                .ok()
                .filter(|r| !r.kvs().is_empty())
                .map(|r| r.kvs()[0].value_str().unwrap().to_string())
        }
    })
    .await;
    assert_eq!(
        back.as_deref(),
        Some(r#"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"alloc"}"#)
    );
    // Taken by another node in the meantime: the keeper reports the loss.
    let other = LeaseAttrs {
        public_ip: "10.0.0.77".parse().unwrap(),
        ..Default::default()
    };
    c.delete(key.as_str(), None).await.unwrap();
    c.put(key.as_str(), other.to_json(), None).await.unwrap();
    // Whether the keeper sees the delete first (its re-create then fails) or re-creates the key before
    // the other node's put lands (it then sees a foreign value), it must report the loss and must not
    // overwrite the other node's lease with a renewal.
    let outcome = tokio::time::timeout(Duration::from_secs(10), keeper)
        .await
        .expect("the keeper noticed the takeover within 10 s");
    let e = outcome.unwrap().unwrap_err();
    assert!(
        e.to_string().contains("another node holds the subnet"),
        "{e}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = c.get(key.as_str(), None).await.unwrap();
    assert!(
        r.kvs()[0].value_str().unwrap().contains("10.0.0.77"),
        "the other node's lease was overwritten"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates() {
    if !require_etcd("tls_client_certificates") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(dir.path());
    let etcd = EtcdServer::start_on("127.0.0.1", Some(tls.clone()));
    let s = |p: &std::path::Path| Some(p.display().to_string());
    let cfg = EtcdConfig {
        endpoints: vec![etcd.url()],
        cafile: s(&tls.ca),
        certfile: s(&tls.client_cert),
        keyfile: s(&tls.client_key),
        ..Default::default()
    };
    let reg = EtcdRegistry::connect(&cfg).await.expect("TLS connect");
    reg.put(&format!("{PREFIX}/config"), CONFIG.as_bytes(), None)
        .await
        .expect("put over TLS");
    let m = LocalManager::new(reg, ManagerOptions::default());
    let l = m
        .acquire_lease(&attrs("10.0.0.1"))
        .await
        .expect("acquire over TLS");
    assert!(l.key.to_string().starts_with("10.5."));
    // Without a client certificate the server refuses us.
    let bad = EtcdConfig {
        certfile: None,
        keyfile: None,
        ..cfg
    };
    let r = match EtcdRegistry::connect(&bad).await {
        Ok(reg) => reg.get("/x").await.map(|_| ()),
        Err(e) => Err(e),
    };
    let e = r.expect_err("no client cert must fail");
    assert!(e.to_string().contains("etcd"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_password_auth() {
    if !require_etcd("username_password_auth") {
        return;
    }
    let etcd = EtcdServer::start();
    let mut c = client(&etcd.url()).await;
    c.user_add("root", "rootpw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.auth_enable().await.unwrap();
    let cfg = EtcdConfig {
        endpoints: vec![etcd.url()],
        username: Some("root".into()),
        password: Some("rootpw".into()),
        ..Default::default()
    };
    let reg = EtcdRegistry::connect(&cfg).await.expect("auth connect");
    reg.put(&format!("{PREFIX}/config"), CONFIG.as_bytes(), None)
        .await
        .unwrap();
    let m = LocalManager::new(reg, ManagerOptions::default());
    m.acquire_lease(&attrs("10.0.0.1"))
        .await
        .expect("acquire with auth");
    let wrong = EtcdConfig {
        password: Some("nope".into()),
        ..cfg
    };
    let e = EtcdRegistry::connect(&wrong)
        .await
        .expect_err("wrong password must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("authentication failed") && msg.contains("--etcd-password"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_endpoints_with_a_dead_one_like_gos_default() {
    if !require_etcd("several_endpoints_with_a_dead_one") {
        return;
    }
    let etcd = EtcdServer::start();
    // Go's default list names 127.0.0.1:4001, which is normally dead; here a free port plays it.
    let dead = format!("http://127.0.0.1:{}", flannel_tests::free_port());
    let reg = EtcdRegistry::connect(&EtcdConfig {
        endpoints: vec![dead, etcd.url()],
        ..Default::default()
    })
    .await
    .expect("connect with one dead endpoint");
    reg.put(&format!("{PREFIX}/config"), CONFIG.as_bytes(), None)
        .await
        .expect("put");
    let m = LocalManager::new(reg, ManagerOptions::default());
    for i in 1..=10 {
        m.acquire_lease(&attrs(&format!("10.0.1.{i}")))
            .await
            .expect("every request reaches the live endpoint");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_member_dies_mid_run_and_renewals_and_the_watch_go_on() {
    if !require_etcd("a_cluster_member_dies_mid_run") {
        return;
    }
    let mut members = EtcdServer::cluster(3);
    let urls: Vec<String> = members.iter().map(EtcdServer::url).collect();
    // The checks talk to the members that stay.
    let c = Client::connect(&urls[1..], None).await.unwrap();
    let configured = flannel_tests::eventually(Duration::from_secs(20), || {
        let mut c = c.clone();
        async move { c.put(format!("{PREFIX}/config"), CONFIG, None).await.ok() }
    })
    .await;
    assert!(configured.is_some(), "the cluster elected a leader");
    let opts = || ManagerOptions {
        lease_ttl: Duration::from_secs(6),
        renew_margin: Duration::from_secs(4),
        ..Default::default()
    };
    let reg = EtcdRegistry::connect(&EtcdConfig {
        endpoints: urls.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (m, lease, key, stop, keeper) = kept_lease(reg, opts(), "10.0.0.1").await;
    let (tx, mut rx) = mpsc::channel(64);
    let watcher = {
        let (m, stop) = (m.clone(), stop.clone());
        tokio::spawn(async move { m.watch_leases(tx, stop).await })
    };
    let mut t = LeaseTracker::new(None);
    let mine: BTreeSet<SubnetKey> = [lease.key].into();
    assert!(converge(&mut rx, &mut t, &mine).await, "own lease seen");

    // The manager talks to the first member that answered: kill it.
    members[0].stop();
    // Renewals go on through another member: the 6 s lease lives on for twice its TTL.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The checking client sees the election too ("leader changed"): it retries such answers.
        let r = flannel_tests::eventually(Duration::from_secs(5), || {
            let (mut c, key) = (c.clone(), key.clone());
            async move { c.get(key, None).await.ok() }
        })
        .await
        .expect("the surviving members answer");
        assert_eq!(r.kvs().len(), 1, "the lease expired after the member died");
    }
    // The watch goes on too: another node's new lease reaches the tracker.
    let other_reg = EtcdRegistry::connect(&EtcdConfig {
        endpoints: urls[1..].to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let other = LocalManager::new(other_reg, opts())
        .acquire_lease(&attrs("10.0.0.2"))
        .await
        .unwrap();
    let both: BTreeSet<SubnetKey> = [lease.key, other.key].into();
    assert!(
        converge(&mut rx, &mut t, &both).await,
        "the watch sees a lease written after the member died"
    );
    assert!(!keeper.is_finished(), "the keeper is still renewing");
    stop.cancel();
    let _ = watcher.await;
}
