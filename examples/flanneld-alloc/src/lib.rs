//! # flanneld-alloc: an out-of-tree backend, end to end
//!
//! This crate shows the path of a third-party backend author. It implements upstream flannel's
//! `alloc` backend (the node only takes a subnet lease; no data plane) against the public
//! [`flannel_core::Backend`] and [`flannel_core::Network`] traits, registers it once with
//! [`flannel_core::register_backend!`], and its binary (`src/main.rs`) is a complete flanneld that
//! selects it from a network config such as `{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}`.
//!
//! The three steps for your own backend:
//! 1. depend on `flannel-core` (and `flanneld` for the binary);
//! 2. implement `Backend` (create devices, acquire the lease with your backend data) and `Network`
//!    (turn lease events into data plane changes until shutdown), then call `register_backend!` once;
//! 3. in your `main`, name your crate (`use my_backend as _;`) and call `flanneld::main_with_args`.

use async_trait::async_trait;
use flannel_core::{
    Backend, BackendContext, BackendError, Lease, LeaseAttrs, Network, NetworkConfig,
};
use tokio_util::sync::CancellationToken;

/// The `alloc` backend: acquires a lease, programs nothing.
#[derive(Debug)]
pub struct AllocBackend {
    ctx: BackendContext,
}

impl AllocBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

flannel_core::register_backend!("alloc", AllocBackend::create);

#[async_trait]
impl Backend for AllocBackend {
    async fn register_network(
        &self,
        _config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let iface = &self.ctx.ext_iface;
        // Like Go's alloc backend: only the public addresses, no BackendType and no data.
        let attrs = LeaseAttrs {
            public_ip: iface.ext_addr.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            public_ipv6: iface.ext_v6_addr,
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        Ok(Box::new(AllocNetwork {
            lease,
            mtu: iface.mtu,
        }))
    }
}

/// The network of the `alloc` backend.
#[derive(Debug)]
pub struct AllocNetwork {
    lease: Lease,
    mtu: u32,
}

#[async_trait]
impl Network for AllocNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) -> Result<(), BackendError> {
        shutdown.cancelled().await;
        Ok(())
    }
}
