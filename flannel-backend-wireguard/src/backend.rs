//! The registered `wireguard` backend: its devices, its lease, and the reconcile model that keeps
//! the routes into the devices and the devices' peers in step with the leases.
//!
//! The devices are the kernel's WireGuard devices where the kernel has them ([`crate::kernel`],
//! as upstream's), and userspace WireGuard over TUN ([`crate::userspace`]) where it has not (or
//! with `FLANNEL_WIREGUARD_USERSPACE=1`); the wire protocol is the same, so hosts of both kinds
//! and upstream's nodes share one network. Each device holds the node's subnet
//! address (`<subnet>.0/32`, and the IPv6 one as `/128`), and the route into the cluster network
//! (`<Network> dev flannel-wg`) sends pods' traffic through it; WireGuard's allowed IPs pick the peer.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use flannel_core::{Backend, BackendContext, BackendError, Lease, Network, NetworkConfig};
use flannel_dataplane::driver::{Model, ReconciledNetwork};
use flannel_dataplane::netlink::{LinkState, Netlink};
use flannel_dataplane::{KernelState, LinkOps, Ownership, Route};
use ipnet::IpNet;
use tracing::info;

use crate::kernel::KernelDevice;
use crate::key::{self, Key, PrivateKey};
use crate::options::{DEVICE, DEVICE_V6, Mode, WireguardOptions};
use crate::peers::{DesiredPeers, PeerContext, PeerSpec, desired_peers, diff_peers, lease_attrs};
use crate::userspace::{DeviceError, UserspaceDevice};

/// The environment variable that makes flanneld use userspace WireGuard even where the kernel has
/// it (`1`).
pub const USERSPACE_ENV: &str = "FLANNEL_WIREGUARD_USERSPACE";

/// A device of either kind.
#[derive(Debug)]
enum Device {
    Kernel(KernelDevice),
    Userspace(UserspaceDevice),
}

impl Device {
    /// Makes its peers `desired`; how many changed. A kernel device is read first, and its key
    /// and port set again if they were changed behind flanneld's back.
    async fn sync(
        &mut self,
        key: &PrivateKey,
        port: u16,
        desired: &BTreeMap<Key, PeerSpec>,
    ) -> Result<usize, DeviceError> {
        match self {
            Device::Userspace(d) => Ok(d.sync(desired).await),
            Device::Kernel(d) => {
                let state = d.read().await?;
                if state.private_key != Some(key.to_bytes()) || state.listen_port != port {
                    info!(
                        index = d.index(),
                        "the WireGuard device's key or port was changed; setting them again"
                    );
                    d.set(Some(key), Some(port), &[]).await?;
                }
                let ops = diff_peers(desired, &state.peers);
                if !ops.is_empty() {
                    d.set(None, None, &ops).await?;
                }
                Ok(ops.len())
            }
        }
    }

    /// Lets the device go: a userspace device stops (its persistent TUN device stays for the next
    /// one to take over), a kernel device stays as it is.
    async fn stop(self) {
        if let Device::Userspace(d) = self {
            d.stop().await;
        }
    }
}

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
    dev: Option<Device>,
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
    /// Whether devices are userspace ones: asked for, or the kernel refused a `wireguard` link.
    userspace: bool,
    slots: Vec<Slot>,
    own_subnets: Vec<IpNet>,
    ctx: PeerContext,
    /// The peers the last [`Model::desired`] computed, taken by [`Model::finish`] of the same pass
    /// (every pass computes them again, so they are not kept between passes).
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
        opts.check_families(v4net.is_some())?;
        let mtu = opts.device_mtu(ext.mtu)?;
        let key_file = key::key_file(std::env::var_os("WIREGUARD_KEY_FILE"));
        let key = key::load_or_create(&key_file)
            .map_err(|e| BackendError::Other(flannel_core::chain(&e)))?;
        let attrs = lease_attrs(
            ext.ext_addr,
            ext.ext_v6_addr,
            (v4net.is_some(), v6net.is_some()),
            key.public_key(),
            opts.advertised_ports(),
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
            userspace: std::env::var_os(USERSPACE_ENV).is_some_and(|v| v == "1"),
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
        model.remove_unused_v6_device().await?;
        model.prepare().await?;
        info!(
            devices = ?model.slots.iter().map(|s| s.name).collect::<Vec<_>>(),
            public_key = %model.ctx.own_key,
            mtu,
            kind = if model.userspace {
                "userspace WireGuard over TUN"
            } else {
                "kernel WireGuard"
            },
            "wireguard backend ready"
        );
        Ok(Box::new(ReconciledNetwork::new(
            lease,
            mtu,
            model,
            self.ctx.subnet_manager.clone(),
        )))
    }
}

/// Makes a new kernel device shake hands with its peers at once. They still hold sessions with the
/// device it replaced (after someone deleted it) and would keep sending into them, unheard, until
/// WireGuard's own timeout starts a new handshake about 15 s later. One datagram to each peer's
/// device address (the discard port) through the tunnel starts the handshake now. (A userspace
/// device greets lazily, only the peers that send to it: see [`crate::userspace`].)
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

impl WgModel {
    /// Deletes a `flannel-wg-v6` that this configuration does not use (left by a run in
    /// `Mode: separate` with IPv6; devices outlive flanneld), with the routes through it.
    async fn remove_unused_v6_device(&self) -> Result<(), BackendError> {
        if self.slots.iter().any(|s| s.name == DEVICE_V6) {
            return Ok(());
        }
        if let Some(l) = self.nl.link_by_name(DEVICE_V6).await? {
            info!(
                device = DEVICE_V6,
                "deleting a WireGuard device this configuration does not use"
            );
            self.nl.delete_link(l.index).await?;
        }
        Ok(())
    }

    /// A new device for slot `i`, where the link `found` (if any) has its name; whether it is fresh
    /// (its peers hold sessions with an older device and should be greeted). A kernel that refuses
    /// a `wireguard` link (`EOPNOTSUPP`: no module) makes this and every later device a userspace
    /// one.
    async fn make_device(
        &mut self,
        i: usize,
        found: Option<LinkState>,
    ) -> Result<(Device, bool), BackendError> {
        let (name, port) = (self.slots[i].name, self.slots[i].port);
        let kind = found.as_ref().and_then(|l| l.kind.clone());
        let is_wireguard = kind.as_deref() == Some("wireguard");
        let mut found = found;
        // A TUN device of that name is the userspace device the last flanneld left (persistent,
        // so the pods' traffic had nowhere to go in clear meanwhile): taken over where the kernel
        // still has no WireGuard.
        if !self.userspace
            && kind.as_deref() == Some("tun")
            && !crate::kernel::kernel_has_wireguard().await
        {
            info!(
                device = name,
                "the kernel has no WireGuard; taking over the userspace device left by the last run"
            );
            self.userspace = true;
        }
        if !self.userspace {
            match self.make_kernel_device(name, port, found.take()).await? {
                Some(made) => return Ok(made),
                None => {
                    info!(
                        device = name,
                        "the kernel has no WireGuard; using userspace WireGuard over TUN"
                    );
                    self.userspace = true;
                }
            }
        }
        // A TUN device of that name is taken over; any other link of that name is replaced.
        if let Some(l) = found.take_if(|l| l.kind.as_deref() != Some("tun")) {
            if is_wireguard {
                info!(
                    device = name,
                    "replacing a kernel WireGuard device with a userspace one"
                );
            } else {
                info!(device = name, kind = ?l.kind, "replacing a link that is not a TUN device");
            }
            self.nl.delete_link(l.index).await?;
        }
        let mtu = u16::try_from(self.mtu).unwrap_or(u16::MAX);
        let dev = UserspaceDevice::create(name, &self.key, port, mtu)
            .await
            .map_err(|e| {
                // Not replaced: it may be another flanneld's (attached, so busy).
                let hint = if found.is_some() {
                    " (a TUN device of that name exists and could not be taken over: if no \
                     other flanneld runs on this host, delete it with `ip link del`)"
                } else {
                    ""
                };
                BackendError::Other(format!("{e}{hint}"))
            })?;
        // Not fresh: it greets the peers that still use old sessions itself, as their data arrives.
        Ok((Device::Userspace(dev), false))
    }

    /// A kernel device `name`: a kernel WireGuard device of that name is taken over as it is
    /// (after a restart its peers and sessions carry on, so it is not fresh); anything else of
    /// that name is replaced. `None` when the kernel has no WireGuard.
    async fn make_kernel_device(
        &self,
        name: &str,
        port: u16,
        found: Option<LinkState>,
    ) -> Result<Option<(Device, bool)>, BackendError> {
        let (index, fresh) = match found {
            Some(l) if l.kind.as_deref() == Some("wireguard") => (l.index, false),
            other => {
                if let Some(l) = other {
                    info!(device = name, kind = ?l.kind, "replacing a link that is not a WireGuard device");
                    self.nl.delete_link(l.index).await?;
                }
                match self.nl.create_wireguard(name).await {
                    Ok(()) => {}
                    Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
                let link = self.nl.link_by_name(name).await?.ok_or_else(|| {
                    BackendError::Other(format!("{name} vanished right after it was made"))
                })?;
                (link.index, true)
            }
        };
        let dev = KernelDevice::open(name, index, &self.key, port)
            .await
            .map_err(|e| BackendError::Other(e.to_string()))?;
        Ok(Some((Device::Kernel(dev), fresh)))
    }
}

#[async_trait]
impl Model for WgModel {
    async fn prepare(&mut self) -> Result<(), BackendError> {
        for i in 0..self.slots.len() {
            let name = self.slots[i].name;
            let found = self.nl.link_by_name(name).await?;
            let keep = match (&self.slots[i].dev, &found) {
                (Some(Device::Kernel(d)), Some(l)) => l.index == d.index(),
                (Some(Device::Userspace(d)), Some(_)) => d.is_running(),
                _ => false,
            };
            let link = match found {
                Some(l) if keep => l,
                // Gone (deleted by someone), replaced, or not made yet: a new device; its peers
                // come back in this pass's `finish`.
                found => {
                    let had = match self.slots[i].dev.take() {
                        Some(old) => {
                            old.stop().await;
                            true
                        }
                        None => false,
                    };
                    if had {
                        info!(
                            device = name,
                            "the WireGuard device was removed; recreating it"
                        );
                    }
                    let (dev, fresh) = self.make_device(i, found).await?;
                    let slot = &mut self.slots[i];
                    slot.dev = Some(dev);
                    slot.fresh = fresh;
                    self.nl.link_by_name(name).await?.ok_or_else(|| {
                        BackendError::Other(format!("{name} vanished right after it was made"))
                    })?
                }
            };
            let slot = &mut self.slots[i];
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
            .map(|mut w| std::mem::take(&mut *w))
            .map_err(|_| BackendError::Other("the peer set lock is poisoned".into()))?;
        for slot in &mut self.slots {
            let Some(dev) = &mut slot.dev else { continue };
            let desired = if slot.v6 { &wanted.v6 } else { &wanted.main };
            let changes = dev
                .sync(&self.key, slot.port, desired)
                .await
                .map_err(|e| BackendError::Other(e.to_string()))?;
            if changes > 0 {
                info!(
                    device = slot.name,
                    changes,
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
