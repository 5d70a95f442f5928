//! # flannel-backend-alloc
//!
//! flannel's `alloc` backend (shared/spec/flannel-compat.md §5.4), registered as `alloc`: the node
//! acquires a subnet lease, keeps it renewed and writes `subnet.env`, and programs nothing. Something
//! else carries the traffic between the subnets (a cloud's route tables, a router announcing them);
//! flannel only hands them out.
//!
//! ```json
//! {"Network": "10.5.0.0/16", "Backend": {"Type": "alloc"}}
//! ```
//!
//! As upstream's, the lease carries the public addresses only: no `BackendType` and no backend data
//! (`{"PublicIP":"10.0.0.21","PublicIPv6":null}`), and the MTU in `subnet.env` is the external
//! interface's.

use async_trait::async_trait;
use flannel_core::{
    Backend, BackendContext, BackendError, Lease, LeaseAttrs, Network, NetworkConfig,
};
use tokio_util::sync::CancellationToken;

flannel_core::register_backend!("alloc", AllocBackend::create);

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

#[async_trait]
impl Backend for AllocBackend {
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let iface = &self.ctx.ext_iface;
        // Like Go's alloc backend: only the public addresses, no BackendType and no data.
        let attrs = LeaseAttrs {
            public_ip: iface.ext_addr.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            public_ipv6: config.ipv6_network().and(iface.ext_v6_addr),
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        Ok(Box::new(AllocNetwork {
            lease,
            mtu: iface.mtu,
        }))
    }
}

/// The network of the `alloc` backend: nothing to keep in step, only the lease to report.
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
