//! The backend contract and the backend registry.
//!
//! A backend turns leases into a data plane (vxlan devices and FDB entries, host routes, a userspace
//! tunnel, …). Each backend crate registers a constructor under its type name, like Go flannel's
//! `backend.Register` in `init()`; `flanneld` picks one by the network config's `Backend.Type`.
//!
//! Writing a backend:
//!
//! ```
//! use async_trait::async_trait;
//! use flannel_core::{Backend, BackendContext, BackendError, Lease, LeaseAttrs, Network, NetworkConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! #[derive(Debug)]
//! struct Noop(BackendContext);
//!
//! #[async_trait]
//! impl Backend for Noop {
//!     async fn register_network(&self, _config: &NetworkConfig) -> Result<Box<dyn Network>, BackendError> {
//!         let attrs = LeaseAttrs { public_ip: self.0.ext_iface.ext_addr.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED), ..Default::default() };
//!         let lease = self.0.subnet_manager.acquire_lease(&attrs).await?;
//!         Ok(Box::new(NoopNet { lease, mtu: self.0.ext_iface.mtu }))
//!     }
//! }
//!
//! #[derive(Debug)]
//! struct NoopNet { lease: Lease, mtu: u32 }
//!
//! #[async_trait]
//! impl Network for NoopNet {
//!     fn lease(&self) -> &Lease { &self.lease }
//!     fn mtu(&self) -> u32 { self.mtu }
//!     async fn run(self: Box<Self>, shutdown: CancellationToken) -> Result<(), BackendError> {
//!         shutdown.cancelled().await;
//!         Ok(())
//!     }
//! }
//!
//! flannel_core::register_backend!("noop-doc", |ctx| Ok(Box::new(Noop(ctx))));
//!
//! assert!(flannel_core::registered_backends().contains(&"noop-doc"));
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::{
    ExternalInterface, Lease, LeaseWatchResult, NetworkConfig, SubnetError, SubnetManager,
};

/// With an IPv4 `Network` (`EnableIPv4`, the default): the cluster network and `lease`'s subnet
/// (`None` for an IPv6-only network). A lease without an IPv4 subnet is an error then.
pub fn ipv4_networks(
    config: &NetworkConfig,
    lease: &Lease,
) -> Result<Option<(Ipv4Net, Ipv4Net)>, BackendError> {
    paired(
        config.network(),
        lease.subnet(),
        "the network has an IPv4 Network but the lease has no IPv4 subnet",
    )
}

/// With `EnableIPv6`: the IPv6 cluster network and `lease`'s IPv6 subnet (`None` without it). A lease
/// without an IPv6 part is an error then.
pub fn ipv6_networks(
    config: &NetworkConfig,
    lease: &Lease,
) -> Result<Option<(Ipv6Net, Ipv6Net)>, BackendError> {
    paired(
        config.ipv6_network(),
        lease.ipv6_subnet(),
        "EnableIPv6 is set but the lease has no IPv6 subnet",
    )
}

/// One family's network and subnet: both, or none when the network does not use the family.
fn paired<N>(
    network: Option<N>,
    subnet: Option<N>,
    missing: &str,
) -> Result<Option<(N, N)>, BackendError> {
    match (network, subnet) {
        (Some(network), Some(subnet)) => Ok(Some((network, subnet))),
        (Some(_), None) => Err(BackendError::Other(missing.into())),
        (None, _) => Ok(None),
    }
}

/// Errors of a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No backend is registered under that name.
    #[error(
        "unknown backend type {name:?}: this flanneld knows {registered}; set Backend.Type in the network config to one of them"
    )]
    Unknown {
        /// The requested name.
        name: String,
        /// The registered names, comma separated.
        registered: String,
    },
    /// The backend's options in the network config are wrong.
    #[error("invalid {backend} backend options: {message}")]
    InvalidOptions {
        /// The backend type.
        backend: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The subnet manager failed.
    #[error(transparent)]
    Subnet(#[from] SubnetError),
    /// A kernel or I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the object (e.g. `creating vxlan device flannel.1`).
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The kernel refused or failed a change (the data plane's typed error, with its cause).
    #[error(transparent)]
    Kernel(Box<dyn std::error::Error + Send + Sync>),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    /// Bad options of `backend` in the network config: `message` says what is wrong and how to fix it.
    pub fn invalid(backend: &str, message: impl Into<String>) -> Self {
        Self::InvalidOptions {
            backend: backend.into(),
            message: message.into(),
        }
    }
}

/// What a backend constructor gets: the subnet manager and the chosen external interface.
#[derive(Debug, Clone)]
pub struct BackendContext {
    /// The subnet manager, for acquiring the lease.
    pub subnet_manager: Arc<dyn SubnetManager>,
    /// The interface the overlay runs over.
    pub ext_iface: ExternalInterface,
}

/// A backend: sets up the node's part of one network.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Creates what the backend needs (devices), acquires the lease through the subnet manager with
    /// the backend's data in it, and returns the network ready to [`run`](Network::run).
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError>;
}

/// A registered network: knows its lease and MTU and keeps the data plane in step with the leases.
#[async_trait]
pub trait Network: Send + Sync + std::fmt::Debug {
    /// The node's own lease.
    fn lease(&self) -> &Lease;

    /// The MTU pods should use (written to `subnet.env`).
    fn mtu(&self) -> u32;

    /// Processes lease events until `shutdown` is cancelled. The data plane is left in place on return.
    async fn run(self: Box<Self>, shutdown: CancellationToken) -> Result<(), BackendError>;
}

/// A backend constructor.
pub type BackendCtor = fn(BackendContext) -> Result<Box<dyn Backend>, BackendError>;

/// One entry of the backend registry; create it with [`register_backend!`](crate::register_backend).
#[derive(Debug)]
pub struct BackendRegistration {
    /// The type name, lower case (`vxlan`, `host-gw`, …).
    pub name: &'static str,
    /// The constructor.
    pub ctor: BackendCtor,
}

inventory::collect!(BackendRegistration);

/// Registers a backend constructor under a type name. Use it once at the top level of a backend crate:
///
/// ```text
/// flannel_core::register_backend!("vxlan", VxlanBackend::create);
/// ```
///
/// The binary must name the crate (`use my_backend as _;`) or the linker drops the registration.
#[macro_export]
macro_rules! register_backend {
    ($name:expr, $ctor:expr) => {
        $crate::inventory::submit! {
            $crate::BackendRegistration { name: $name, ctor: $ctor }
        }
    };
}

/// The names of every backend linked into this binary, sorted.
pub fn registered_backends() -> Vec<&'static str> {
    let mut names: Vec<_> = inventory::iter::<BackendRegistration>
        .into_iter()
        .map(|r| r.name)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Finds a backend by type name, case-insensitively.
pub fn lookup_backend(name: &str) -> Result<&'static BackendRegistration, BackendError> {
    inventory::iter::<BackendRegistration>
        .into_iter()
        .find(|r| r.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            let names = registered_backends();
            BackendError::Unknown {
                name: name.to_string(),
                registered: if names.is_empty() {
                    "no backends".to_string()
                } else {
                    names.join(", ")
                },
            }
        })
}

/// Finds the backend named `name` and constructs it.
pub fn new_backend(name: &str, ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
    (lookup_backend(name)?.ctor)(ctx)
}

/// The lease watch of a [`Network::run`]: the subnet manager's [`SubnetManager::watch_leases`] on a
/// task of its own, its results one at a time, and its end told apart (shutdown, or an error that
/// retrying cannot fix). Feed the results to a [`LeaseTracker`](crate::LeaseTracker) to get the
/// changes.
///
/// ```no_run
/// # async fn demo(sm: std::sync::Arc<dyn flannel_core::SubnetManager>, own: flannel_core::SubnetKey,
/// #     shutdown: tokio_util::sync::CancellationToken) -> Result<(), flannel_core::BackendError> {
/// use flannel_core::{LeaseTracker, LeaseWatch};
/// let mut watch = LeaseWatch::start(sm, &shutdown);
/// let mut peers = LeaseTracker::new(Some(own));
/// while let Some(result) = watch.next(&shutdown).await? {
///     peers.apply_each(result, |change| println!("{change:?}"));
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LeaseWatch {
    rx: mpsc::Receiver<LeaseWatchResult>,
    task: Option<JoinHandle<Result<(), SubnetError>>>,
    _stop: DropGuard,
}

impl LeaseWatch {
    /// Starts watching every lease of `sm`. The watch stops when `shutdown` is cancelled or this
    /// value is dropped.
    pub fn start(sm: Arc<dyn SubnetManager>, shutdown: &CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let stop = shutdown.child_token();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move { sm.watch_leases(tx, stop).await })
        };
        Self {
            rx,
            task: Some(task),
            _stop: stop.drop_guard(),
        }
    }

    /// The next watch result: a snapshot first, then batches of events (and a new snapshot after a
    /// reconnect that may have missed some). `Ok(None)` once `shutdown` is cancelled.
    ///
    /// # Errors
    /// The watch ended on its own: the subnet manager's error, or [`BackendError::Other`] when it
    /// gave none. Do not call `next` again after an error.
    pub async fn next(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<LeaseWatchResult>, BackendError> {
        let result = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            r = self.rx.recv() => r,
        };
        if result.is_some() || shutdown.is_cancelled() {
            return Ok(result);
        }
        match self.task.take() {
            Some(task) => match task.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(BackendError::Other(
                    "the lease watch stopped unexpectedly".into(),
                )),
            },
            None => Err(BackendError::Other("the lease watch has ended".into())),
        }
    }
}

/// Runs a future until `shutdown` is cancelled; handy in [`Network::run`] implementations.
pub async fn until_cancelled<F: std::future::Future>(
    shutdown: &CancellationToken,
    f: F,
) -> Option<F::Output> {
    tokio::select! {
        _ = shutdown.cancelled() => None,
        out = f => Some(out),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::{Script, ScriptedManager};

    /// A watch of a scripted manager that delivered its first snapshot, and the script.
    async fn watching(shutdown: &CancellationToken) -> (LeaseWatch, Script) {
        let (sm, script) = ScriptedManager::new();
        let mut w = LeaseWatch::start(Arc::new(sm), shutdown);
        script
            .send(Ok(LeaseWatchResult::Snapshot(Vec::new())))
            .await
            .unwrap();
        assert_eq!(
            w.next(shutdown).await.unwrap(),
            Some(LeaseWatchResult::Snapshot(Vec::new()))
        );
        (w, script)
    }

    #[tokio::test]
    async fn a_lease_watch_reports_results_then_its_error() {
        let shutdown = CancellationToken::new();
        let (mut w, script) = watching(&shutdown).await;
        script
            .send(Err(SubnetError::Other(
                "the store refused the watch".into(),
            )))
            .await
            .unwrap();
        let e = w.next(&shutdown).await.unwrap_err().to_string();
        assert!(e.contains("the store refused the watch"), "{e}");
        assert!(w.next(&shutdown).await.is_err(), "ended for good");
        // A watch that ends without an error, while not shut down, is an error too.
        let (sm, script) = ScriptedManager::new();
        let mut w = LeaseWatch::start(Arc::new(sm), &shutdown);
        drop(script);
        let e = w.next(&shutdown).await.unwrap_err().to_string();
        assert!(e.contains("stopped unexpectedly"), "{e}");
    }

    #[tokio::test]
    async fn a_lease_watch_ends_quietly_at_shutdown_and_stops_its_task() {
        let shutdown = CancellationToken::new();
        let (mut w, _script) = watching(&shutdown).await;
        shutdown.cancel();
        assert_eq!(w.next(&shutdown).await.unwrap(), None);
        // Dropping the watch stops its task even without a shutdown.
        let other = CancellationToken::new();
        let (sm, _script) = ScriptedManager::new();
        let w = LeaseWatch::start(Arc::new(sm), &other);
        let task = w.task.as_ref().map(JoinHandle::abort_handle).unwrap();
        drop(w);
        for _ in 0..100 {
            if task.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(task.is_finished());
        assert!(!other.is_cancelled());
    }
}
