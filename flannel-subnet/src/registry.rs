//! The thin store seam under the subnet manager (Go flannel's `etcd/registry.go`): get, list,
//! create-if-absent, put, delete, TTL and watch, over etcd v3.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};

/// A key and its value as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// The etcd lease the key is attached to, 0 for none (a reservation).
    pub lease_id: i64,
    /// The revision of the last change.
    pub mod_revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// The key was created or its value replaced.
    Put(KeyValue),
    /// The key was deleted or its lease expired.
    Delete(String),
}

/// What a watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// Changes, and the store revision they bring the watcher to.
    Events(Vec<RegistryEvent>, i64),
    /// The requested start revision was compacted away: re-list and watch again.
    Compacted(i64),
}

/// Store errors, with a hint where one helps.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The etcd client failed. Its error is kept whole (and shown in the message, so it is not also
    /// reported as a source: a chain would print it twice).
    #[error("etcd: {error}{hint}")]
    Etcd {
        /// The client's error.
        error: etcd_client::Error,
        /// How to fix it, when known.
        hint: &'static str,
    },
    /// No endpoint was given.
    #[error("no etcd endpoints given; set --etcd-endpoints")]
    NoEndpoints,
    /// TLS files could not be read.
    #[error("reading etcd TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What to tell the operator about an etcd error, from its kind and gRPC status code (not from
/// its text).
fn hint(e: &etcd_client::Error) -> &'static str {
    use tonic::Code;
    match e {
        // etcd identifies its errors by code and description (Go's `rpctypes`): a failed login is
        // InvalidArgument "etcdserver: authentication failed, …", an empty user name InvalidArgument
        // "etcdserver: user name is empty".
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Unauthenticated => "; check --etcd-username and --etcd-password",
            Code::InvalidArgument
                if s.message().starts_with("etcdserver: authentication failed") =>
            {
                "; check --etcd-username and --etcd-password"
            }
            Code::InvalidArgument if s.message() == "etcdserver: user name is empty" => {
                "; etcd requires authentication: set --etcd-username/--etcd-password"
            }
            Code::PermissionDenied => {
                "; etcd requires authentication or the user lacks permission: set --etcd-username/--etcd-password and grant access to the prefix"
            }
            Code::Unavailable | Code::DeadlineExceeded => {
                "; is etcd running and reachable at --etcd-endpoints?"
            }
            _ => "",
        },
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            "; is etcd running and reachable at --etcd-endpoints? With TLS, check --etcd-cafile, --etcd-certfile and --etcd-keyfile, and that the endpoints use https://"
        }
        _ => "",
    }
}

impl From<etcd_client::Error> for RegistryError {
    fn from(e: etcd_client::Error) -> Self {
        RegistryError::Etcd {
            hint: hint(&e),
            error: e,
        }
    }
}

/// A stream of watch results.
#[async_trait]
pub trait RegistryWatch: Send {
    /// The next result; `Ok(None)` when the stream ended (reconnect).
    async fn next(&mut self) -> Result<Option<WatchItem>, RegistryError>;
}

/// The operations the subnet manager needs from its store.
#[async_trait]
pub trait Registry: Send + Sync + fmt::Debug {
    /// Reads one key, with the store revision of the read.
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, i64), RegistryError>;
    /// Reads every key under `prefix` in one range read, with the store revision of the read.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), RegistryError>;
    /// Creates `key` only if it does not exist (`Version == 0`), attached to a fresh lease of `ttl`
    /// (none when `ttl` is `None`). Returns the lease id, or `None` if the key already existed.
    async fn create(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, RegistryError>;
    /// Writes `key` unconditionally, attached to a fresh lease of `ttl` (none when `None`).
    /// Returns the lease id (0 for none).
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<i64, RegistryError>;
    /// Writes `key` attached to a fresh lease of `ttl` only if its current value is `expected`
    /// (a transaction comparing the value). Returns the lease id, or `None` if the value differed or
    /// the key was absent.
    async fn put_if_value(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, RegistryError>;
    /// Deletes `key`.
    async fn delete(&self, key: &str) -> Result<(), RegistryError>;
    /// The remaining time of a lease; `None` if it has none or expired.
    async fn ttl(&self, lease_id: i64) -> Result<Option<Duration>, RegistryError>;
    /// Watches `key` (or every key under it when `prefix`) from revision `since`.
    async fn watch(
        &self,
        key: &str,
        prefix: bool,
        since: i64,
    ) -> Result<Box<dyn RegistryWatch>, RegistryError>;
}

/// How to reach etcd.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    /// Endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Client key file (TLS).
    pub keyfile: Option<String>,
    /// Client certificate file (TLS).
    pub certfile: Option<String>,
    /// CA certificate file (TLS).
    pub cafile: Option<String>,
    /// User name for etcd authentication.
    pub username: Option<String>,
    /// Password for etcd authentication.
    pub password: Option<String>,
    /// How long to wait for a connection.
    pub dial_timeout: Option<Duration>,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("keyfile", &self.keyfile)
            .field("certfile", &self.certfile)
            .field("cafile", &self.cafile)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl EtcdConfig {
    /// Whether the connection will use TLS: a client certificate and key, a CA file, or an
    /// `https://` endpoint. (Go flanneld only turns TLS on when both key and certificate are given.)
    pub fn uses_tls(&self) -> bool {
        (self.keyfile.is_some() && self.certfile.is_some())
            || self.cafile.is_some()
            || self.endpoints.iter().any(|e| e.starts_with("https://"))
    }
}

/// The etcd v3 registry.
///
/// It talks to one endpoint at a time: the first of `--etcd-endpoints` that answers. When a request
/// finds that endpoint unavailable, it fails over to the next one that answers and retries once. (A
/// client balanced over all endpoints would keep sending requests to a dead one, which Go flanneld's
/// default list, `http://127.0.0.1:4001,http://127.0.0.1:2379`, usually contains.)
#[derive(Clone)]
pub struct EtcdRegistry {
    endpoints: Vec<String>,
    dial: Dial,
    current: std::sync::Arc<tokio::sync::RwLock<Client>>,
}

/// How to connect to an endpoint.
#[derive(Debug, Clone)]
struct Dial {
    /// The client's options (credentials, leader requirement).
    opts: ConnectOptions,
    tls: Option<TlsOptions>,
    /// How long connecting and the first answer may take.
    timeout: Duration,
}

/// HTTP/2 keep-alive: a ping every 10 s, answered within 5 s.
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// The HTTP/2 flow-control windows of the etcd connection: how much etcd may send ahead of what
/// flanneld has taken. tonic's defaults (2 MiB per stream, 5 MiB per connection) let a burst of
/// watch responses pile up in h2's receive buffer, which keeps its high-water size for the life of
/// the connection (2 MiB at 20,000 peers joining); 256 KiB still streams a 20,000-lease list at
/// memory speed on a LAN.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

fn read(path: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|source| RegistryError::TlsFile {
        path: path.to_string(),
        source,
    })
}

/// What an unclear write (an error, or a failed compare after a retry) did, judged by reading the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// The key holds our value under our lease: the write took effect (perhaps on a first attempt
    /// whose answer was lost, before a retry's compare failed against it).
    Ours,
    /// The key is absent or holds something else: our lease carries nothing and may be revoked.
    NotOurs,
    /// The key could not be read: nothing may be revoked (it could hold our write).
    Unknown,
}

/// Decides [`WriteOutcome`] from the read-back of the key.
pub(crate) fn after_unclear_write<E>(
    readback: &Result<Option<KeyValue>, E>,
    value: &[u8],
    lease: i64,
) -> WriteOutcome {
    match readback {
        Ok(Some(kv)) if kv.value == value && kv.lease_id == lease => WriteOutcome::Ours,
        Ok(_) => WriteOutcome::NotOurs,
        Err(_) => WriteOutcome::Unknown,
    }
}

/// Whether an error means "this endpoint cannot be reached" (so another one may help).
fn is_unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

impl EtcdRegistry {
    /// Connects to the first endpoint that answers.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, RegistryError> {
        let timeout = cfg.dial_timeout.unwrap_or(Duration::from_secs(5));
        let mut opts = ConnectOptions::new().with_require_leader(true);
        if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
            opts = opts.with_user(u.clone(), p.clone());
        }
        let mut endpoints = cfg.endpoints.clone();
        let mut dial_tls = None;
        if cfg.uses_tls() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &cfg.cafile {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&cfg.certfile, &cfg.keyfile) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            dial_tls = Some(tls);
            for e in &mut endpoints {
                if let Some(rest) = e.strip_prefix("http://") {
                    *e = format!("https://{rest}");
                }
            }
        } else {
            tracing::warn!(
                "the etcd connection is not encrypted; pass --etcd-certfile, --etcd-keyfile and --etcd-cafile to use TLS"
            );
        }
        let dial = Dial {
            opts,
            tls: dial_tls,
            timeout,
        };
        let client = connect_any(&endpoints, &dial).await?;
        Ok(Self {
            endpoints,
            dial,
            current: std::sync::Arc::new(tokio::sync::RwLock::new(client)),
        })
    }

    /// The etcd client in use.
    pub async fn client(&self) -> Client {
        self.current.read().await.clone()
    }

    /// Runs `op` on the current client; if the endpoint is unavailable, fails over and retries once.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, RegistryError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await;
        match op(client).await {
            Err(e) if is_unavailable(&e) && self.endpoints.len() > 1 => {
                tracing::warn!(error = %e, "etcd endpoint unavailable; trying the others");
                let fresh = connect_any(&self.endpoints, &self.dial).await?;
                *self.current.write().await = fresh.clone();
                Ok(op(fresh).await?)
            }
            r => Ok(r?),
        }
    }

    async fn grant(&self, ttl: Option<Duration>) -> Result<i64, RegistryError> {
        match ttl {
            None => Ok(0),
            Some(t) => {
                let secs = i64::try_from(t.as_secs().max(1)).unwrap_or(i64::MAX);
                self.call(|mut c| async move { c.lease_grant(secs, None).await.map(|r| r.id()) })
                    .await
            }
        }
    }

    /// Puts `key` with a fresh lease of `ttl` in a transaction guarded by `compare`. Anything but a
    /// clean success is resolved by reading the key back (see [`after_unclear_write`]): the lease is
    /// revoked only when the key is known not to hold our write.
    async fn put_when(
        &self,
        compare: Compare,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, RegistryError> {
        let lease = self.grant(ttl).await?;
        let result = self
            .call(|mut c| {
                let txn = Txn::new().when([compare.clone()]).and_then([TxnOp::put(
                    key,
                    value,
                    put_opts(lease),
                )]);
                async move { c.txn(txn).await }
            })
            .await;
        match result {
            Ok(r) if r.succeeded() => Ok(Some(lease)),
            other => {
                let readback = self.get(key).await.map(|(kv, _)| kv);
                match after_unclear_write(&readback, value, lease) {
                    WriteOutcome::Ours => Ok(Some(lease)),
                    WriteOutcome::NotOurs => {
                        self.revoke(lease).await;
                        other?;
                        Ok(None)
                    }
                    WriteOutcome::Unknown => {
                        tracing::warn!(
                            key,
                            "etcd did not say whether a write took effect and the key cannot be read; keeping its lease (it expires by itself)"
                        );
                        other?;
                        readback.map(|_| None)
                    }
                }
            }
        }
    }

    async fn revoke(&self, lease: i64) {
        if lease != 0 {
            let _ = self
                .call(|mut c| async move { c.lease_revoke(lease).await })
                .await;
        }
    }
}

/// Keys per page of a list.
const LIST_PAGE: i64 = 1000;

/// The end of the key range holding every key that starts with `prefix` (etcd's `GetPrefixRangeEnd`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(l) = end.last_mut() {
                *l += 1;
            }
            return end;
        }
        end.pop();
    }
    // Every byte 0xff (or empty): the range runs to the end of the key space.
    vec![0]
}

/// Connects to one endpoint and checks that it answers.
async fn connect_one(endpoint: &str, dial: &Dial) -> Result<Client, etcd_client::Error> {
    // An endpoint written without a scheme (`10.0.0.1:2379`) is taken as etcd-client takes it.
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else if dial.tls.is_some() {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    };
    let mut e = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(dial.timeout)
        .http2_keep_alive_interval(KEEP_ALIVE.0)
        .keep_alive_timeout(KEEP_ALIVE.1)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    if let Some(tls) = &dial.tls {
        e = e.tls_config(tls.clone())?;
    }
    let timeout = dial.timeout;
    let timed_out = || {
        etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{endpoint} did not answer within {timeout:?}"),
        ))
    };
    let connected = tokio::time::timeout(timeout, async {
        let channel = e.connect().await?;
        Client::from_channel(
            etcd_client::Channel::Tonic(channel),
            Some(dial.opts.clone()),
        )
        .await
    })
    .await;
    let mut client = connected.map_err(|_| timed_out())??;
    match tokio::time::timeout(timeout, client.status()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(timed_out()),
    }
}

/// The first endpoint that answers; an error that is not about reachability (wrong credentials, TLS)
/// is returned at once.
async fn connect_any(endpoints: &[String], dial: &Dial) -> Result<Client, RegistryError> {
    let mut last = None;
    for ep in endpoints {
        match connect_one(ep, dial).await {
            Ok(c) => {
                tracing::debug!(endpoint = %ep, "connected to etcd");
                return Ok(c);
            }
            Err(e) if is_unavailable(&e) => {
                tracing::debug!(endpoint = %ep, error = %e, "etcd endpoint unavailable");
                last = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => RegistryError::NoEndpoints,
    })
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        lease_id: k.lease(),
        mod_revision: k.mod_revision(),
    }
}

fn put_opts(lease: i64) -> Option<PutOptions> {
    (lease != 0).then(|| PutOptions::new().with_lease(lease))
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, i64), RegistryError> {
        let r = self
            .call(|mut c| async move { c.get(key, None).await })
            .await?;
        let rev = r.header().map_or(0, |h| h.revision());
        Ok((r.kvs().first().map(kv), rev))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), RegistryError> {
        // In pages, all at the revision of the first one: a single range answer over 4 MiB (about
        // 20,000 vxlan leases) is more than tonic decodes. A page still too big (huge values) is
        // asked for again at half the size.
        let end = prefix_end(prefix.as_bytes());
        let (mut out, mut rev, mut limit) = (Vec::new(), 0, LIST_PAGE);
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if rev != 0 {
                opts = opts.with_revision(rev);
            }
            let page = self
                .call(|mut c| {
                    let (from, opts) = (from.clone(), opts.clone());
                    async move { c.get(from, Some(opts)).await }
                })
                .await;
            let r = match page {
                Err(RegistryError::Etcd {
                    error: etcd_client::Error::GRpcStatus(s),
                    ..
                }) if s.code() == tonic::Code::OutOfRange && limit > 1 => {
                    limit /= 2;
                    continue;
                }
                r => r?,
            };
            if rev == 0 {
                rev = r.header().map_or(0, |h| h.revision());
            }
            out.extend(r.kvs().iter().map(kv));
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, rev)),
            }
        }
    }

    async fn create(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, RegistryError> {
        self.put_when(Compare::version(key, CompareOp::Equal, 0), key, value, ttl)
            .await
    }

    async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<i64, RegistryError> {
        let lease = self.grant(ttl).await?;
        let result = self
            .call(|mut c| async move { c.put(key, value, put_opts(lease)).await })
            .await;
        if let Err(e) = result {
            // The put may still have been applied (an answer lost on the way): revoke only a lease
            // that is known not to hold the key.
            let readback = self.get(key).await.map(|(kv, _)| kv);
            return match after_unclear_write(&readback, value, lease) {
                WriteOutcome::Ours => Ok(lease),
                WriteOutcome::NotOurs => {
                    self.revoke(lease).await;
                    Err(e)
                }
                WriteOutcome::Unknown => Err(e),
            };
        }
        Ok(lease)
    }

    async fn put_if_value(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, RegistryError> {
        self.put_when(
            Compare::value(key, CompareOp::Equal, expected),
            key,
            value,
            ttl,
        )
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), RegistryError> {
        self.call(|mut c| async move { c.delete(key, None).await })
            .await?;
        Ok(())
    }

    async fn ttl(&self, lease_id: i64) -> Result<Option<Duration>, RegistryError> {
        if lease_id == 0 {
            return Ok(None);
        }
        let r = self
            .call(|mut c| async move { c.lease_time_to_live(lease_id, None).await })
            .await?;
        Ok(u64::try_from(r.ttl())
            .ok()
            .filter(|t| *t > 0)
            .map(Duration::from_secs))
    }

    async fn watch(
        &self,
        key: &str,
        prefix: bool,
        since: i64,
    ) -> Result<Box<dyn RegistryWatch>, RegistryError> {
        let stream = self
            .call(|mut c| async move {
                let mut opts = WatchOptions::new().with_start_revision(since);
                if prefix {
                    opts = opts.with_prefix();
                }
                c.watch(key, Some(opts)).await
            })
            .await?;
        Ok(Box::new(EtcdWatch { stream }))
    }
}

struct EtcdWatch {
    stream: WatchStream,
}

#[async_trait]
impl RegistryWatch for EtcdWatch {
    async fn next(&mut self) -> Result<Option<WatchItem>, RegistryError> {
        loop {
            let Some(r) = self.stream.message().await? else {
                return Ok(None);
            };
            if r.compact_revision() != 0 {
                return Ok(Some(WatchItem::Compacted(r.compact_revision())));
            }
            if r.canceled() {
                // Canceled for another reason (e.g. lost leader): reconnect.
                tracing::debug!(reason = r.cancel_reason(), "etcd watch canceled");
                return Ok(None);
            }
            if r.created() && r.events().is_empty() {
                continue;
            }
            let rev = r.header().map_or(0, |h| h.revision());
            let events = r
                .events()
                .iter()
                .filter_map(|e| {
                    let k = e.kv()?;
                    Some(match e.event_type() {
                        EventType::Put => RegistryEvent::Put(kv(k)),
                        EventType::Delete => {
                            RegistryEvent::Delete(String::from_utf8_lossy(k.key()).into_owned())
                        }
                    })
                })
                .collect();
            return Ok(Some(WatchItem::Events(events, rev)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_end_where_etcd_says() {
        assert_eq!(
            prefix_end(b"/coreos.com/network/subnets/"),
            b"/coreos.com/network/subnets0"
        );
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    fn kv(value: &str, lease: i64) -> KeyValue {
        KeyValue {
            key: "/coreos.com/network/subnets/10.5.1.0-24".into(),
            value: value.as_bytes().to_vec(),
            lease_id: lease,
            mod_revision: 7,
        }
    }

    #[test]
    fn an_unclear_write_is_resolved_by_reading_back() {
        let ours = r#"{"PublicIP":"10.0.0.1"}"#.as_bytes();
        // The first attempt committed, the retry's compare failed against it: ours, keep the lease.
        let r: Result<_, ()> = Ok(Some(kv(r#"{"PublicIP":"10.0.0.1"}"#, 42)));
        assert_eq!(after_unclear_write(&r, ours, 42), WriteOutcome::Ours);
        // Someone else's value, or our value under another lease: not ours.
        let r: Result<_, ()> = Ok(Some(kv(r#"{"PublicIP":"10.0.0.2"}"#, 42)));
        assert_eq!(after_unclear_write(&r, ours, 42), WriteOutcome::NotOurs);
        let r: Result<_, ()> = Ok(Some(kv(r#"{"PublicIP":"10.0.0.1"}"#, 41)));
        assert_eq!(after_unclear_write(&r, ours, 42), WriteOutcome::NotOurs);
        let r: Result<Option<KeyValue>, ()> = Ok(None);
        assert_eq!(after_unclear_write(&r, ours, 42), WriteOutcome::NotOurs);
        // Unreadable: never revoke what may be ours.
        let r: Result<Option<KeyValue>, ()> = Err(());
        assert_eq!(after_unclear_write(&r, ours, 42), WriteOutcome::Unknown);
    }
}
