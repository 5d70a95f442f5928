//! # flanneld-peerlog: an out-of-tree backend, end to end
//!
//! This crate shows the path of a third-party backend author. It implements a backend named
//! `peer-log` against the public [`flannel_core::Backend`] and [`flannel_core::Network`] traits: it
//! takes a subnet lease with its own type and data, and then, where a real backend would program
//! its data plane, logs every peer lease that appears, changes or goes away. It registers once with
//! [`flannel_core::register_backend!`], and its binary (`src/main.rs`) is a complete flanneld that
//! selects it from a network config such as
//! `{"Network":"10.5.0.0/16","Backend":{"Type":"peer-log"}}`.
//!
//! The three steps for your own backend:
//! 1. depend on `flannel-core` (and `flanneld` for the binary);
//! 2. implement `Backend` (create devices, acquire the lease with your backend data) and `Network`
//!    (turn lease events into data plane changes until shutdown), then call `register_backend!` once;
//! 3. in your `main`, name your crate (`use my_backend as _;`) and call `flanneld::main_with_args`.
//!
//! A backend that programs the kernel would rather hand its desired state to
//! `flannel_dataplane::driver::ReconciledNetwork`, which watches, diffs and repairs for it (see the
//! in-tree backends).

use std::sync::Arc;

use async_trait::async_trait;
use flannel_core::{
    Backend, BackendContext, BackendError, Lease, LeaseAttrs, LeaseChange, LeaseTracker,
    LeaseWatch, Network, NetworkConfig, RawJson, SubnetManager,
};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// The lease `BackendType` of this backend; peers of other types are not ours.
pub const BACKEND_TYPE: &str = "peer-log";

/// The `peer-log` backend.
#[derive(Debug)]
pub struct PeerLogBackend {
    ctx: BackendContext,
}

impl PeerLogBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

flannel_core::register_backend!("peer-log", PeerLogBackend::create);

#[async_trait]
impl Backend for PeerLogBackend {
    async fn register_network(
        &self,
        _config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let iface = &self.ctx.ext_iface;
        // What peers learn about this node: the public address, the type, and any data of ours
        // (here the interface name, as an example of backend data).
        let attrs = LeaseAttrs {
            public_ip: iface.ext_addr.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            backend_type: BACKEND_TYPE.into(),
            backend_data: Some(RawJson::from_value(
                &serde_json::json!({"Interface": iface.name}),
            )),
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        Ok(Box::new(PeerLogNetwork {
            lease,
            mtu: iface.mtu,
            sm: self.ctx.subnet_manager.clone(),
        }))
    }
}

/// The network of the `peer-log` backend.
#[derive(Debug)]
pub struct PeerLogNetwork {
    lease: Lease,
    mtu: u32,
    sm: Arc<dyn SubnetManager>,
}

#[async_trait]
impl Network for PeerLogNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) -> Result<(), BackendError> {
        // The subnet manager's watch: a snapshot first, then batches of events (and a new snapshot
        // after a reconnect that may have missed some); `None` at shutdown, an error when the watch
        // ended otherwise. The tracker turns both into changes and leaves out the own lease and
        // renewals that change nothing.
        let mut watch = LeaseWatch::start(self.sm.clone(), &shutdown);
        let mut tracker = LeaseTracker::new(Some(self.lease.key));
        while let Some(result) = watch.next(&shutdown).await? {
            tracker.apply_each(result, |change| match change {
                LeaseChange::Added(l) if l.attrs.backend_type == BACKEND_TYPE => {
                    info!(lease = %l, "peer added or changed")
                }
                LeaseChange::Removed(l) if l.attrs.backend_type == BACKEND_TYPE => {
                    info!(lease = %l, "peer removed")
                }
                LeaseChange::Added(l) | LeaseChange::Removed(l) => {
                    info!(lease = %l, kind = %l.attrs.backend_type, "not a peer-log lease; ignored")
                }
            });
        }
        Ok(())
    }
}
