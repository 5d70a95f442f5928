//! # flannel-subnet
//!
//! Subnet managers for flannel. [`LocalManager`] over [`EtcdRegistry`] is the etcd v3 manager: it
//! reads the network config from `<prefix>/config`, leases per-host subnets under
//! `<prefix>/subnets/<A.B.C.D-LEN>` with Go flanneld's exact keys, values and 24 h etcd leases, renews
//! them, and watches every lease (snapshot, then events; reconnects with backoff; re-lists after
//! compaction). Go and Rust nodes can share one etcd.
//!
//! The logic sits on the thin [`Registry`] trait; the pure parts (subnet choice, key naming, lease
//! compatibility) are plain functions in [`alloc`].
//!
//! ```no_run
//! use flannel_core::{LeaseAttrs, SubnetManager};
//! use flannel_subnet::{EtcdConfig, EtcdRegistry, LocalManager, ManagerOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = EtcdRegistry::connect(&EtcdConfig {
//!     endpoints: vec!["http://127.0.0.1:2379".into()],
//!     ..Default::default()
//! })
//! .await?;
//! let manager = LocalManager::new(registry, ManagerOptions::default());
//! let config = manager.get_network_config().await?;
//! let lease = manager
//!     .acquire_lease(&LeaseAttrs { public_ip: "192.168.1.10".parse()?, ..Default::default() })
//!     .await?;
//! println!("network {:?}, our subnet {}", config.network(), lease.key);
//! # Ok(()) }
//! ```
//!
//! Differences from Go flanneld (all store-compatible): a lost allocation race is retried with another
//! subnet instead of exiting; a deleted or expired own lease is re-created (same subnet) instead of
//! shutting down; a reservation (a key without an etcd lease) stays lease-less when its owner reuses
//! it; leases are listed with one range read (no per-key TTL lookups); the own-lease watch uses the
//! exact key, not a prefix.
//!
//! With the `kube` feature, [`kube::KubeSubnetManager`] is Go flanneld's `--kube-subnet-mgr`: Node
//! objects as the store (see its module docs).

pub mod alloc;
#[cfg(feature = "kube")]
pub mod kube;
pub mod manager;
pub mod metrics;
pub mod registry;

pub use alloc::allocate_subnet;
pub use manager::{LocalManager, ManagerOptions, RACE_RETRIES, SUBNET_TTL};
pub use registry::{
    EtcdConfig, EtcdRegistry, KeyValue, Registry, RegistryError, RegistryEvent, RegistryWatch,
    WatchItem,
};
