//! The subnet manager contract: the cluster's memory of who holds which subnet.

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{ConfigError, Lease, LeaseAttrs, LeaseWatchResult, SubnetKey};

/// Errors of a subnet manager.
#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    /// No network config is stored yet.
    #[error("{0}")]
    ConfigMissing(String),
    /// The stored network config is invalid.
    #[error("invalid network config: {0}")]
    ConfigInvalid(#[from] ConfigError),
    /// Every subnet of the pool is taken.
    #[error(
        "out of subnets: all {capacity} /{subnet_len} subnets of {network} are leased; enlarge the Network, shrink SubnetLen or remove stale leases"
    )]
    OutOfSubnets {
        /// The cluster network.
        network: String,
        /// Per-host prefix length.
        subnet_len: u8,
        /// How many subnets the pool has.
        capacity: u128,
    },
    /// The own lease is gone and could not be taken back.
    #[error("lease {0} was lost: {1}")]
    LeaseLost(SubnetKey, String),
    /// The store could not be reached or refused a request; the store's own error is the source.
    #[error("subnet store")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store worked but the request could not be completed (e.g. every allocation race lost).
    #[error("subnet store: {0}")]
    Refused(String),
    /// Something else went wrong.
    #[error("{0}")]
    Other(String),
}

/// Where leases live: etcd in this workspace, the Kubernetes API in Go flannel's kube mode.
///
/// Every method can be called from many tasks at once. Watches deliver into a channel until
/// `shutdown` is cancelled or the receiver is dropped; they reconnect on their own and only return an
/// error that retrying cannot fix.
#[async_trait]
pub trait SubnetManager: Send + Sync + std::fmt::Debug {
    /// A short name for logs (`etcd`, `kube`).
    fn name(&self) -> &str;

    /// Reads and validates the network config.
    async fn get_network_config(&self) -> Result<crate::NetworkConfig, SubnetError>;

    /// Acquires a lease for this node (reusing the one it held before when possible) and publishes
    /// `attrs` in it.
    async fn acquire_lease(&self, attrs: &LeaseAttrs) -> Result<Lease, SubnetError>;

    /// Extends `lease` and updates its expiration.
    async fn renew_lease(&self, lease: &mut Lease) -> Result<(), SubnetError>;

    /// Watches every lease: first a [`LeaseWatchResult::Snapshot`], then batches of events; after a
    /// reconnect that may have missed events, a new snapshot.
    async fn watch_leases(
        &self,
        sink: mpsc::Sender<LeaseWatchResult>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError>;

    /// Watches one lease (normally the own one) the same way.
    async fn watch_lease(
        &self,
        key: SubnetKey,
        sink: mpsc::Sender<LeaseWatchResult>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError>;

    /// What this node published in its lease before, when the store keeps it across reboots (the
    /// Kubernetes manager reads it back from the node's annotations). Backends use it to keep stable
    /// identities, such as the vxlan VTEP MAC, when their device is gone. The default: nothing.
    async fn previous_attrs(&self) -> Option<LeaseAttrs> {
        None
    }

    /// Keeps the own lease alive until `shutdown`: renews it before it expires and takes it back if it
    /// disappears. Returns an error only when the lease is lost for good.
    async fn complete_lease(
        &self,
        lease: Lease,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError>;
}
