//! The subnet manager over a [`Registry`] (Go flannel's `etcd/local_manager.go` and the HEAD watch
//! semantics), implementing [`flannel_core::SubnetManager`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use flannel_core::{
    Backoff, Lease, LeaseAttrs, LeaseEvent, LeaseWatchResult, NetworkConfig, PreviousSubnets,
    SubnetError, SubnetKey, SubnetManager,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::alloc::{
    allocate_subnet, config_key, ipv6_only, is_compatible, lease_key, previous_key, subnets_prefix,
};
use crate::registry::{KeyValue, Registry, RegistryError, RegistryEvent, WatchItem};

/// Go flannel's lease TTL: 24 hours.
pub const SUBNET_TTL: Duration = Duration::from_secs(24 * 3600);

/// How often a lost race for a free subnet is retried with another subnet (Go: `raceRetries`).
pub const RACE_RETRIES: usize = 10;

/// Settings of a [`LocalManager`].
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// The key prefix (`--etcd-prefix`, default `/coreos.com/network`).
    pub prefix: String,
    /// What the previous run wrote to `subnet.env` (its subnet is reused when still free).
    pub previous: PreviousSubnets,
    /// Renew this long before the lease expires (`--subnet-lease-renew-margin`).
    pub renew_margin: Duration,
    /// The TTL of the etcd lease attached to our key (24 h; shorter in tests).
    pub lease_ttl: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            prefix: "/coreos.com/network".into(),
            previous: PreviousSubnets::default(),
            renew_margin: Duration::from_secs(3600),
            lease_ttl: SUBNET_TTL,
        }
    }
}

/// The subnet manager for a key-value registry (etcd).
#[derive(Debug)]
pub struct LocalManager<R: Registry> {
    registry: Arc<R>,
    opts: ManagerOptions,
}

fn store(e: RegistryError) -> SubnetError {
    crate::metrics::metrics().etcd_errors.inc();
    SubnetError::Store(Box::new(e))
}

/// Decodes one stored key into a lease; malformed keys and values are skipped with a warning.
pub fn lease_from_kv(kv: &KeyValue, asof: i64) -> Option<Lease> {
    let key = match SubnetKey::parse(&kv.key) {
        Ok(k) => k,
        Err(e) => {
            warn!(key = %kv.key, error = %e, "ignoring malformed subnet key");
            return None;
        }
    };
    let attrs = match LeaseAttrs::from_json(&kv.value) {
        Ok(a) => a,
        Err(e) => {
            warn!(key = %kv.key, error = %e, "ignoring lease with a malformed value");
            return None;
        }
    };
    Some(Lease {
        key,
        enable_ipv4: true,
        attrs,
        expiration: None,
        asof,
    })
}

/// Reconnect backoff, 100 ms doubling to 5 s (Go flannel HEAD's watch backoff).
fn watch_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// Hands `pending` events to `sink`, waiting for room; false if the consumer is gone.
async fn flush(sink: &mpsc::Sender<LeaseWatchResult>, pending: &mut Vec<LeaseEvent>) -> bool {
    pending.is_empty()
        || sink
            .send(LeaseWatchResult::Events(std::mem::take(pending)))
            .await
            .is_ok()
}

/// Logs that `what` failed, then waits with `backoff`; false if `shutdown` fired first.
async fn retry_after(
    backoff: &mut Backoff,
    what: &str,
    error: &(dyn std::fmt::Display + Sync),
    shutdown: &CancellationToken,
) -> bool {
    warn!(%error, retry_in = ?backoff.peek(), "{what}");
    backoff.sleep(shutdown).await
}

impl<R: Registry> LocalManager<R> {
    /// A manager over `registry`.
    pub fn new(registry: R, opts: ManagerOptions) -> Self {
        Self {
            registry: Arc::new(registry),
            opts,
        }
    }

    /// The registry.
    pub fn registry(&self) -> &R {
        &self.registry
    }

    fn lease(&self, key: SubnetKey, attrs: &LeaseAttrs, ttl: Option<Duration>) -> Lease {
        Lease {
            key,
            enable_ipv4: true,
            attrs: attrs.clone(),
            expiration: ttl.map(|t| SystemTime::now() + t),
            asof: 0,
        }
    }

    /// Takes a lease on exactly `key` if it is free (used to recover a lost lease).
    async fn reclaim(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Option<Lease>, SubnetError> {
        let ttl = Some(self.opts.lease_ttl);
        let created = self
            .registry
            .create(
                &lease_key(&self.opts.prefix, &key),
                attrs.to_json().as_bytes(),
                ttl,
            )
            .await
            .map_err(store)?;
        Ok(created.map(|_| self.lease(key, attrs, ttl)))
    }

    /// The watch loop shared by [`watch_leases`](SubnetManager::watch_leases) and
    /// [`watch_lease`](SubnetManager::watch_lease): a snapshot, then events from the next revision;
    /// reconnect with backoff (100 ms to 5 s) after errors, re-list after compaction.
    async fn watch_loop(
        &self,
        key: &str,
        prefix: bool,
        sink: mpsc::Sender<LeaseWatchResult>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        let mut since: Option<i64> = None;
        let mut backoff = watch_backoff();
        // Events read but not yet taken by the consumer (kept across a reconnect: `since` is
        // already past them).
        let mut pending: Vec<LeaseEvent> = Vec::new();
        loop {
            if shutdown.is_cancelled() || sink.is_closed() {
                return Ok(());
            }
            if !flush(&sink, &mut pending).await {
                return Ok(());
            }
            let from = match since {
                Some(s) => s,
                None => {
                    let listed = if prefix {
                        self.registry.list(key).await
                    } else {
                        self.registry
                            .get(key)
                            .await
                            .map(|(kv, rev)| (kv.into_iter().collect(), rev))
                    };
                    match listed {
                        Ok((kvs, rev)) => {
                            let leases =
                                kvs.iter().filter_map(|kv| lease_from_kv(kv, rev)).collect();
                            if sink.send(LeaseWatchResult::Snapshot(leases)).await.is_err() {
                                return Ok(());
                            }
                            since = Some(rev + 1);
                            rev + 1
                        }
                        Err(e) => {
                            if !retry_after(&mut backoff, "listing leases failed", &e, &shutdown)
                                .await
                            {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
            };
            let mut watch = match self.registry.watch(key, prefix, from).await {
                Ok(w) => w,
                Err(e) => {
                    if !retry_after(
                        &mut backoff,
                        "starting the lease watch failed",
                        &e,
                        &shutdown,
                    )
                    .await
                    {
                        return Ok(());
                    }
                    continue;
                }
            };
            // Events are read from the store as fast as it sends them and wait here, merged into
            // one batch, while the consumer is busy (a long kernel pass): a stalled reader would
            // leave them in the HTTP/2 connection's receive buffers, which keep their high-water
            // size for the life of the connection.
            loop {
                let step = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = sink.closed() => return Ok(()),
                    permit = sink.reserve(), if !pending.is_empty() => match permit {
                        Ok(permit) => {
                            permit.send(LeaseWatchResult::Events(std::mem::take(&mut pending)));
                            continue;
                        }
                        Err(_) => return Ok(()),
                    },
                    item = watch.next() => item,
                };
                match step {
                    Ok(Some(WatchItem::Events(events, rev))) => {
                        backoff.reset();
                        since = Some(rev + 1);
                        let m = crate::metrics::metrics();
                        pending.extend(events.iter().filter_map(|e| {
                            let event = match e {
                                RegistryEvent::Put(kv) => {
                                    lease_from_kv(kv, rev).map(LeaseEvent::Added)?
                                }
                                RegistryEvent::Delete(k) => LeaseEvent::Removed(Lease {
                                    key: SubnetKey::parse(k).ok()?,
                                    enable_ipv4: true,
                                    attrs: LeaseAttrs::default(),
                                    expiration: None,
                                    asof: rev,
                                }),
                            };
                            m.lease_event(match event {
                                LeaseEvent::Added(_) => "added",
                                LeaseEvent::Removed(_) => "removed",
                            });
                            Some(event)
                        }));
                    }
                    Ok(Some(WatchItem::Compacted(rev))) => {
                        info!(
                            compact_revision = rev,
                            "watch fell behind a compaction; re-listing leases"
                        );
                        since = None;
                        break;
                    }
                    Ok(None) => {
                        // What was read reaches the consumer before the pause.
                        if !flush(&sink, &mut pending).await
                            || !retry_after(
                                &mut backoff,
                                "lease watch closed; reconnecting",
                                &"stream ended",
                                &shutdown,
                            )
                            .await
                        {
                            return Ok(());
                        }
                        break;
                    }
                    Err(e) => {
                        // What was read reaches the consumer before the pause.
                        if !flush(&sink, &mut pending).await
                            || !retry_after(
                                &mut backoff,
                                "lease watch failed; reconnecting",
                                &e,
                                &shutdown,
                            )
                            .await
                        {
                            return Ok(());
                        }
                        break;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl<R: Registry + 'static> SubnetManager for LocalManager<R> {
    fn name(&self) -> &str {
        "etcd"
    }

    async fn get_network_config(&self) -> Result<NetworkConfig, SubnetError> {
        let key = config_key(&self.opts.prefix);
        let (kv, _) = self.registry.get(&key).await.map_err(store)?;
        let kv = kv.ok_or_else(|| {
            SubnetError::ConfigMissing(format!(
                "flannel config not found in etcd store. Did you create your config using etcdv3 API? \
                 Write it with: etcdctl put {key} '{{\"Network\":\"10.5.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'"
            ))
        })?;
        let text = String::from_utf8_lossy(&kv.value);
        let config = NetworkConfig::parse(&text)?;
        if config.ipv4.is_none() {
            return Err(ipv6_only());
        }
        Ok(config)
    }

    async fn acquire_lease(&self, attrs: &LeaseAttrs) -> Result<Lease, SubnetError> {
        let config = self.get_network_config().await?;
        if config.ipv4.is_none() {
            return Err(ipv6_only());
        }
        let ttl = Some(self.opts.lease_ttl);
        let value = attrs.to_json();
        for attempt in 0..RACE_RETRIES {
            let (mut kvs, _) = self
                .registry
                .list(&subnets_prefix(&self.opts.prefix))
                .await
                .map_err(store)?;
            // 1. Reuse the lease held under our public IP.
            if attrs.public_ip != std::net::Ipv4Addr::UNSPECIFIED {
                let mine = kvs.iter().position(|kv| {
                    lease_from_kv(kv, 0).is_some_and(|l| l.attrs.public_ip == attrs.public_ip)
                });
                if let Some(i) = mine {
                    let kv = kvs.remove(i);
                    if let Some(l) = lease_from_kv(&kv, 0) {
                        if is_compatible(&config, &l.key) {
                            // A reservation (no etcd lease) stays a reservation.
                            let ttl = (kv.lease_id != 0).then_some(self.opts.lease_ttl);
                            self.registry
                                .put(&kv.key, value.as_bytes(), ttl)
                                .await
                                .map_err(store)?;
                            info!(subnet = %l.key, "reusing the lease held under our public IP");
                            return Ok(self.lease(l.key, attrs, ttl));
                        }
                        info!(subnet = %l.key, "our old lease does not fit the network config any more; deleting it");
                        self.registry.delete(&kv.key).await.map_err(store)?;
                    }
                }
            }
            let leases: Vec<Lease> = kvs.iter().filter_map(|kv| lease_from_kv(kv, 0)).collect();
            // 2. Reuse the previous subnet from the subnet file; 3. else allocate.
            let prev = &self.opts.previous;
            let key = match previous_key(&config, &leases, prev.subnet, prev.ipv6_subnet) {
                Some(k) => {
                    info!(subnet = %k, "reusing the subnet from the previous subnet file");
                    k
                }
                None => allocate_subnet(&config, &leases, &mut rand::rng())?,
            };
            match self
                .registry
                .create(&lease_key(&self.opts.prefix, &key), value.as_bytes(), ttl)
                .await
                .map_err(store)?
            {
                Some(_) => {
                    info!(subnet = %key, "acquired a new lease");
                    return Ok(self.lease(key, attrs, ttl));
                }
                None => {
                    // Go flanneld exits here; we try another subnet.
                    warn!(subnet = %key, attempt = attempt + 1, "another node took the subnet first; trying another");
                }
            }
        }
        Err(SubnetError::Refused(format!(
            "lost the race for a free subnet {RACE_RETRIES} times in a row; is another node allocating with the same config?"
        )))
    }

    async fn renew_lease(&self, lease: &mut Lease) -> Result<(), SubnetError> {
        let key = lease_key(&self.opts.prefix, &lease.key);
        let ttl = lease.expiration.map(|_| self.opts.lease_ttl);
        let ours = lease.attrs.to_json();
        // Only extend what is still ours: another node may have taken the subnet meanwhile.
        let renewed = self
            .registry
            .put_if_value(&key, ours.as_bytes(), ours.as_bytes(), ttl)
            .await
            .map_err(store)?;
        if renewed.is_none() {
            let (current, _) = self.registry.get(&key).await.map_err(store)?;
            match current {
                None => {
                    if self.reclaim(lease.key, &lease.attrs).await?.is_none() {
                        return Err(lost(lease.key));
                    }
                    info!(subnet = %lease.key, "our lease had disappeared; re-created it");
                    lease.expiration = Some(SystemTime::now() + self.opts.lease_ttl);
                    return Ok(());
                }
                Some(kv) => {
                    let holder = lease_from_kv(&kv, 0).map(|l| l.attrs.public_ip);
                    if holder != Some(lease.attrs.public_ip) {
                        return Err(lost(lease.key));
                    }
                    // Our node, other attributes (e.g. written by an older run): take it over.
                    self.registry
                        .put(&key, ours.as_bytes(), ttl)
                        .await
                        .map_err(store)?;
                }
            }
        }
        lease.expiration = ttl.map(|t| SystemTime::now() + t);
        Ok(())
    }

    async fn watch_leases(
        &self,
        sink: mpsc::Sender<LeaseWatchResult>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        self.watch_loop(&subnets_prefix(&self.opts.prefix), true, sink, shutdown)
            .await
    }

    async fn watch_lease(
        &self,
        key: SubnetKey,
        sink: mpsc::Sender<LeaseWatchResult>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        self.watch_loop(&lease_key(&self.opts.prefix, &key), false, sink, shutdown)
            .await
    }

    async fn complete_lease(
        &self,
        mut lease: Lease,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        let (tx, mut rx) = mpsc::channel(16);
        let watch_stop = shutdown.child_token();
        let _stop_guard = watch_stop.clone().drop_guard();
        let watcher = self.watch_lease(lease.key, tx, watch_stop.clone());
        tokio::pin!(watcher);
        let retry = (self.opts.lease_ttl / 10).min(Duration::from_secs(60));
        let mut next_renew = renew_at(&lease, self.opts.renew_margin);
        loop {
            let wait = next_renew.map(|t| {
                t.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            });
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = &mut watcher => {
                    return Ok(());
                }
                _ = async { match wait { Some(w) => tokio::time::sleep(w).await, None => std::future::pending().await } } => {
                    match self.renew_lease(&mut lease).await {
                        Ok(()) => {
                            let m = crate::metrics::metrics();
                            m.lease_renewals.inc();
                            m.set_lease(&lease.key.ipv4.to_string(), lease.expiration);
                            info!(subnet = %lease.key, "renewed the lease");
                            next_renew = renew_at(&lease, self.opts.renew_margin);
                        }
                        Err(e @ SubnetError::LeaseLost(..)) => return Err(e),
                        Err(e) => {
                            crate::metrics::metrics().lease_renewal_errors.inc();
                            warn!(subnet = %lease.key, error = %flannel_core::chain(&e), retry_in = ?retry, "renewing the lease failed");
                            next_renew = Some(SystemTime::now() + retry);
                        }
                    }
                }
                msg = rx.recv() => {
                    // The latest state of our key in this result: None = gone, Some(ip) = held by ip.
                    let latest: Option<Option<std::net::Ipv4Addr>> = match msg {
                        Some(LeaseWatchResult::Snapshot(v)) => Some(v.first().map(|l| l.attrs.public_ip)),
                        Some(LeaseWatchResult::Events(ev)) => ev.last().map(|e| match e {
                            LeaseEvent::Added(l) => Some(l.attrs.public_ip),
                            LeaseEvent::Removed(_) => None,
                        }),
                        None => None,
                    };
                    if let Some(Some(holder)) = latest
                        && holder != lease.attrs.public_ip
                    {
                        warn!(subnet = %lease.key, %holder, "another node wrote our lease");
                        return Err(lost(lease.key));
                    }
                    let gone = matches!(latest, Some(None));
                    if gone {
                        warn!(subnet = %lease.key, "our lease was deleted or expired; taking it back");
                        match self.reclaim(lease.key, &lease.attrs).await {
                            Ok(Some(l)) => {
                                info!(subnet = %l.key, "lease re-created");
                                lease = l;
                                next_renew = renew_at(&lease, self.opts.renew_margin);
                            }
                            Ok(None) => return Err(lost(lease.key)),
                            Err(e) => {
                                warn!(error = %flannel_core::chain(&e), "re-creating the lease failed; will retry on the next watch result");
                                next_renew = Some(SystemTime::now() + Duration::from_secs(1));
                            }
                        }
                    }
                }
            }
        }
    }
}

fn lost(key: SubnetKey) -> SubnetError {
    SubnetError::LeaseLost(
        key,
        "another node holds the subnet now; restart flanneld to acquire a new one".into(),
    )
}

fn renew_at(lease: &Lease, margin: Duration) -> Option<SystemTime> {
    lease
        .expiration
        .map(|e| e.checked_sub(margin).unwrap_or(SystemTime::UNIX_EPOCH))
}
