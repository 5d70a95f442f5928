//! # flannel-core
//!
//! The shared contracts of the flannel overlay network agent: everything the subnet managers
//! (`flannel-subnet`), the backends (`flannel-backend-*`), the `flanneld` binary and third-party code
//! agree on. It names no implementation: no netlink (the kernel side is `flannel-dataplane`), no
//! metrics (each crate registers its own).
//!
//! - [`NetworkConfig`]: the network config JSON, parsed and validated exactly as Go flannel does.
//! - [`Lease`], [`LeaseAttrs`], [`SubnetKey`], [`LeaseEvent`], [`LeaseWatchResult`], [`LeaseTracker`]:
//!   leases as stored in etcd, byte-compatible with Go flanneld, and the events about them.
//! - [`SubnetManager`]: the store of leases (etcd v3 and Kubernetes in `flannel-subnet`).
//! - [`Backend`], [`Network`] and the registry ([`register_backend!`], [`lookup_backend`]): how a data
//!   plane plugs in.
//! - [`SubnetEnv`]: `/run/flannel/subnet.env`, written atomically, and read by the one reader
//!   [`subnet_env::read_vars`].
//! - [`iface`]: choosing the external interface and the public address (pure; the host is read by
//!   `flannel_dataplane::host`).
//! - [`chain`]: an error with its causes on one line.
//! - [`Backoff`]: the doubling wait before a retry, shared by the managers and the reconcile loop.
//! - [`gojson`]: Go `encoding/json` decoding rules (case-insensitive keys) for backend options.
//! - [`compact`]: rebuilding a large sorted set with full nodes (the lease table, the kernel record).
//!
//! ```
//! use flannel_core::{NetworkConfig, SubnetEnv};
//! let cfg = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
//! let env = SubnetEnv {
//!     network: cfg.network(),
//!     subnet: Some("10.5.72.0/24".parse().unwrap()),
//!     ipv6_network: None,
//!     ipv6_subnet: None,
//!     mtu: 1450,
//!     ip_masq: false,
//! };
//! assert!(env.render().starts_with("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"));
//! ```

pub mod backend;
pub mod backoff;
pub mod compact;
pub mod config;
pub mod gojson;
pub mod iface;
pub mod lease;
pub mod manager;
pub mod subnet_env;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use backend::{
    Backend, BackendContext, BackendCtor, BackendError, BackendRegistration, LeaseWatch, Network,
    lookup_backend, new_backend, registered_backends, until_cancelled,
};
pub use backoff::Backoff;
pub use config::{ConfigError, NetworkConfig, NetworkConfigInput, SubnetPool};
pub use iface::{ExternalInterface, IfaceError, IfaceSpec};
pub use lease::{
    Lease, LeaseAttrs, LeaseChange, LeaseEvent, LeaseTracker, LeaseWatchResult, RawJson, SubnetKey,
    backend_type_of,
};
pub use manager::{SubnetError, SubnetManager};
pub use subnet_env::{PreviousSubnets, SubnetEnv};

#[doc(hidden)]
pub use inventory;

/// An error and all its causes as one line, `outer: inner: …` (for logs and reports that keep text;
/// the crates' errors keep their causes as sources instead of flattening them into strings).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
