//! The registered `wireguard` backend: its devices, its lease, and the reconcile model that keeps
//! the routes into the devices and the devices' peers in step with the leases.
//!
//! The devices are userspace WireGuard over TUN ([`crate::userspace`]); the wire protocol is the
//! kernel's, so peers may run upstream's kernel devices. Each device holds the node's subnet
//! address (`<subnet>.0/32`, and the IPv6 one as `/128`), and the route into the cluster network
//! (`<Network> dev flannel-wg`) sends pods' traffic through it; WireGuard's allowed IPs pick the peer.

use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use flannel_core::{Backend, BackendContext, BackendError, Lease, Network, NetworkConfig};
use flannel_dataplane::driver::{Model, ReconciledNetwork};
use flannel_dataplane::netlink::Netlink;
use flannel_dataplane::{KernelState, LinkOps, Ownership, Route};
use ipnet::IpNet;
use tracing::info;

use crate::key::{self, PrivateKey};
use crate::options::{DEVICE, DEVICE_V6, Mode, WireguardOptions};
use crate::peers::{DesiredPeers, PeerContext, desired_peers, diff_peers, lease_attrs};
use crate::userspace::UserspaceDevice;

flannel_core::register_backend!("wireguard", WireguardBackend::create);

/// The registered backend.
#[derive(Debug)]
pub struct WireguardBackend {
    ctx: BackendContext,
}

impl WireguardBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

/// One WireGuard device and what it carries.
#[derive(Debug)]
struct Slot {
    name: &'static str,
    port: u16,
    /// The cluster networks routed into it.
    networks: Vec<IpNet>,
    /// Its own addresses (the subnet's first address, as a host prefix).
    addrs: Vec<IpNet>,
    /// Whether it takes the peers of `flannel-wg-v6` (`Mode: separate` with IPv6).
    v6: bool,
    dev: Option<UserspaceDevice>,
    index: u32,
    /// Made since the last `finish`: its peers still hold sessions with the device it replaced.
    fresh: bool,
}

/// The reconcile model of the wireguard backend.
#[derive(Debug)]
struct WgModel {
    nl: Netlink,
    key: PrivateKey,
    mtu: u32,
    slots: Vec<Slot>,
    own_subnets: Vec<IpNet>,
    ctx: PeerContext,
    /// The peers the last [`Model::desired`] computed, for [`Model::finish`] to apply.
    wanted: Mutex<DesiredPeers>,
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

#[async_trait]
impl Backend for WireguardBackend {
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let opts = WireguardOptions::parse(&config.backend)?;
        let ext = self.ctx.ext_iface.clone();
        let (v4net, v6net) = (config.network(), config.ipv6_network());
        let mtu = opts.device_mtu(ext.mtu)?;
        let key_file = key::key_file(std::env::var_os("WIREGUARD_KEY_FILE"));
        let key = key::load_or_create(&key_file)
            .map_err(|e| BackendError::Other(flannel_core::chain(&e)))?;
        let attrs = lease_attrs(
            ext.ext_addr,
            ext.ext_v6_addr,
            (v4net.is_some(), v6net.is_some()),
            key.public_key(),
            (opts.listen_port, opts.listen_port_v6),
        );
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        let own_v4 = lease.subnet().map(|s| host_prefix(IpAddr::V4(s.network())));
        let own_v6 = lease
            .ipv6_subnet()
            .map(|s| host_prefix(IpAddr::V6(s.network())));
        let slot = |name, port, networks: Vec<Option<IpNet>>, addrs: Vec<Option<IpNet>>, v6| Slot {
            name,
            port,
            networks: networks.into_iter().flatten().collect(),
            addrs: addrs.into_iter().flatten().collect(),
            v6,
            dev: None,
            index: 0,
            fresh: false,
        };
        let (n4, n6) = (v4net.map(IpNet::V4), v6net.map(IpNet::V6));
        let slots = if opts.mode == Mode::Separate {
            let mut s = Vec::new();
            if n4.is_some() {
                s.push(slot(
                    DEVICE,
                    opts.listen_port,
                    vec![n4],
                    vec![own_v4],
                    false,
                ));
            }
            if n6.is_some() {
                s.push(slot(
                    DEVICE_V6,
                    opts.listen_port_v6,
                    vec![n6],
                    vec![own_v6],
                    true,
                ));
            }
            s
        } else {
            vec![slot(
                DEVICE,
                opts.listen_port,
                vec![n4, n6],
                vec![own_v4, own_v6],
                false,
            )]
        };
        let own_subnets = [
            lease.subnet().map(IpNet::V4),
            lease.ipv6_subnet().map(IpNet::V6),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut model = WgModel {
            nl: Netlink::new()?,
            mtu,
            slots,
            own_subnets,
            ctx: PeerContext {
                mode: opts.mode,
                listen_port: opts.listen_port,
                listen_port_v6: opts.listen_port_v6,
                families: (v4net.is_some(), v6net.is_some()),
                ext_addr: ext.ext_addr,
                ext_v6_addr: ext.ext_v6_addr,
                own_key: key.public_key(),
                psk: opts.psk,
                keepalive: opts.keepalive,
            },
            key,
            wanted: Mutex::new(DesiredPeers::default()),
        };
        model.prepare().await?;
        info!(
            devices = ?model.slots.iter().map(|s| s.name).collect::<Vec<_>>(),
            public_key = %model.ctx.own_key,
            mtu,
            "wireguard backend ready (userspace WireGuard over TUN)"
        );
        Ok(Box::new(ReconciledNetwork::new(
            lease,
            mtu,
            model,
            self.ctx.subnet_manager.clone(),
        )))
    }
}

/// Makes a new device shake hands with its peers at once. They still hold sessions with the device
/// it replaced (after a restart, or after someone deleted it) and would keep sending into them,
/// unheard, until WireGuard's own timeout starts a new handshake about 15 s later. One datagram to
/// each peer's device address (the discard port) through the tunnel starts the handshake now.
fn greet<'a>(peers: impl Iterator<Item = &'a crate::peers::PeerSpec>) {
    let targets: Vec<IpAddr> = peers
        .flat_map(|p| p.allowed_ips.iter().map(|n| n.network()))
        .collect();
    for ip in targets {
        let bind: std::net::SocketAddr = match ip {
            IpAddr::V4(_) => "0.0.0.0:0",
            IpAddr::V6(_) => "[::]:0",
        }
        .parse()
        .unwrap_or_else(|_| unreachable!());
        if let Ok(sock) = std::net::UdpSocket::bind(bind) {
            let _ = sock.send_to(b"flannel", (ip, 9));
        }
    }
}

#[async_trait]
impl Model for WgModel {
    async fn prepare(&mut self) -> Result<(), BackendError> {
        for slot in &mut self.slots {
            let link = self.nl.link_by_name(slot.name).await?;
            let link = match (link, slot.dev.is_some()) {
                (Some(l), true) => l,
                // Gone (deleted by someone), or not made yet: a new device; its peers come back in
                // this pass's `finish`.
                (_, had) => {
                    if let Some(old) = slot.dev.take() {
                        old.stop().await;
                    }
                    if had {
                        info!(
                            device = slot.name,
                            "the WireGuard device was removed; recreating it"
                        );
                    }
                    let dev = UserspaceDevice::create(slot.name, &self.key, slot.port)
                        .await
                        .map_err(|e| BackendError::Other(e.to_string()))?;
                    slot.dev = Some(dev);
                    slot.fresh = true;
                    self.nl.link_by_name(slot.name).await?.ok_or_else(|| {
                        BackendError::Other(format!(
                            "{} vanished right after it was made",
                            slot.name
                        ))
                    })?
                }
            };
            slot.index = link.index;
            for (addr, network) in slot.addrs.iter().zip(&slot.networks) {
                self.nl
                    .ensure_only_address(link.index, *addr, *network)
                    .await?;
            }
            if link.mtu != self.mtu {
                self.nl.set_mtu(link.index, self.mtu).await?;
            }
            if !link.up {
                self.nl.set_up(link.index).await?;
            }
        }
        Ok(())
    }

    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
        let mut state = KernelState::default();
        let mut own = Ownership {
            keep: self.own_subnets.clone(),
            ..Ownership::default()
        };
        for slot in &self.slots {
            for net in &slot.networks {
                state.routes.insert(Route {
                    dst: *net,
                    gateway: None,
                    oif: slot.index,
                    onlink: false,
                });
                own.networks.push(*net);
            }
            own.route_oifs.push(slot.index);
        }
        let (peers, warnings) = desired_peers(leases, &self.ctx);
        if let Ok(mut w) = self.wanted.lock() {
            *w = peers;
        }
        (state, own, warnings)
    }

    async fn finish(&mut self) -> Result<(), BackendError> {
        let wanted = self
            .wanted
            .lock()
            .map(|w| w.clone())
            .map_err(|_| BackendError::Other("the peer set lock is poisoned".into()))?;
        for slot in &mut self.slots {
            let Some(dev) = &slot.dev else { continue };
            let desired = if slot.v6 { &wanted.v6 } else { &wanted.main };
            let ops = diff_peers(desired, &dev.peers().await);
            if !ops.is_empty() {
                dev.apply(&ops)
                    .await
                    .map_err(|e| BackendError::Other(e.to_string()))?;
                info!(
                    device = slot.name,
                    changes = ops.len(),
                    peers = desired.len(),
                    "WireGuard peers updated"
                );
            }
            if std::mem::take(&mut slot.fresh) {
                greet(desired.values());
            }
        }
        Ok(())
    }
}
