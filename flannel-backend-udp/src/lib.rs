//! # flannel-backend-udp
//!
//! flannel's udp backend (shared/spec/flannel-compat.md §5.3), registered as `udp` (the default type
//! when the network config has no `Backend`): pods' packets go through the TUN device `flannel0` and
//! travel to the peer as the whole payload of one UDP datagram (port 8285 by default), wire-compatible
//! with Go flannel.
//!
//! ## Design
//!
//! - [`packet`]: the data path as pure code (encapsulation, decapsulation, TTL decrement with an
//!   incremental checksum fix, ICMP net-unreachable replies), returning an [`packet::Outcome`].
//! - [`table`]: the forwarding table (longest prefix match subnet → peer) and the reverse map that
//!   lets decapsulation drop datagrams from unknown peers or with an inner source outside the sending
//!   peer's subnet (anti-spoofing; Go flannel forwards them).
//! - The table is rebuilt from the lease set by the shared reconcile driver, which also keeps the
//!   cluster route `<Network> dev flannel0` in place; the I/O loop only reads an `Arc` of the current
//!   table, so lease updates never stall it.
//! - `flannel0` is created persistent: it and its route survive a flanneld restart and the next run
//!   re-attaches, so pods see a gap of the restart time only (Go's device disappears with the process).
//! - [`tun`]: opening `flannel0` (multi-queue), and under systemd a spare *parking queue* that, with
//!   the UDP socket, waits in systemd's file-descriptor store while flanneld restarts, so a restart
//!   delays packets instead of dropping them.
//!
//! The I/O loop (`pump`) runs one thread per direction that waits with `poll` and moves packets in
//! batches through buffers allocated once: TUN offloads (`tun-rs`: 64 KiB reads cut into MTU-sized
//! packets, TCP segments merged again on write) and UDP GSO/GRO (`quinn-udp`), while every datagram on
//! the wire carries exactly one inner IP packet. One queue per direction (see the README's figures).

pub mod metrics;
pub mod packet;
mod pump;
pub mod table;
pub mod tun;

use std::net::Ipv4Addr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use flannel_core::gojson::GoObject;
use flannel_core::{
    Backend, BackendContext, BackendError, Lease, LeaseAttrs, Network, NetworkConfig, SubnetManager,
};
use flannel_dataplane::LinkOps;
use flannel_dataplane::driver::{self, Model};
use flannel_dataplane::netlink::Netlink;
use flannel_dataplane::systemd;
use flannel_dataplane::{KernelOps, KernelState, Op, Ownership, Route};
use ipnet::{IpNet, Ipv4Net};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::table::Table;

flannel_core::register_backend!("udp", UdpBackend::create);

/// The TUN device name.
pub const DEVICE: &str = "flannel0";

/// The registered backend.
#[derive(Debug)]
pub struct UdpBackend {
    ctx: BackendContext,
}

impl UdpBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

fn bad(message: String) -> BackendError {
    BackendError::invalid("udp", message)
}

/// Socket buffer size asked for in each direction: bursts of 64 KiB GSO/GRO batches overflow the
/// default (`net.core.rmem_default`, about 200 KiB) and every datagram lost there is a TCP loss in a pod.
const SOCKET_BUFFER: usize = 8 << 20;

use nix::{setsockopt_impl, sockopt_impl};

sockopt_impl!(
    /// `IP_MTU_DISCOVER` (nix has no wrapper for it).
    IpMtuDiscover,
    SetOnly,
    libc::IPPROTO_IP,
    libc::IP_MTU_DISCOVER,
    usize
);

/// The name of the UDP socket in systemd's file-descriptor store.
pub const SOCKET_NAME: &str = "flannel-udp";

/// The UDP socket the previous flanneld left with systemd, when it is bound to `addr`; one bound
/// elsewhere (the address or port changed) is closed and removed from the store.
fn inherited_socket(addr: std::net::SocketAddrV4) -> Option<std::net::UdpSocket> {
    let fd = systemd::take_stored_fd(SOCKET_NAME)?;
    let socket = std::net::UdpSocket::from(fd);
    match socket.local_addr() {
        Ok(std::net::SocketAddr::V4(bound)) if bound == addr => {
            info!(%addr, "took over the UDP socket kept by systemd");
            Some(socket)
        }
        other => {
            warn!(?other, %addr, "the UDP socket kept by systemd is bound elsewhere; closing it");
            drop(socket);
            let _ = systemd::remove_stored_fd(SOCKET_NAME);
            None
        }
    }
}

/// Raises the socket's buffers to [`SOCKET_BUFFER`] (the `FORCE` options pass the sysctl limits, as
/// root), falling back to what the limits allow.
fn grow_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
}

/// The `Port` option (default 8285).
pub fn parse_port(backend: &serde_json::Value) -> Result<u16, BackendError> {
    let o = GoObject::new(backend, "Backend").map_err(|e| bad(e.to_string()))?;
    let port = o
        .uint("Port")
        .map_err(|e| bad(e.to_string()))?
        .unwrap_or(8285);
    u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad(format!("Port {port} is not a UDP port (1..65535)")))
}

#[async_trait]
impl Backend for UdpBackend {
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let port = parse_port(&config.backend)?;
        let network = config.ipv4_only("udp", "vxlan, wireguard or host-gw")?;
        let ext = self.ctx.ext_iface.clone();
        let local = ext
            .iface_addr
            .ok_or_else(|| bad(format!("interface {} has no IPv4 address", ext.name)))?;
        // udp leases carry no BackendType and no data, as Go's.
        let attrs = LeaseAttrs {
            public_ip: ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        let own_subnet = lease
            .subnet()
            .ok_or_else(|| BackendError::Other("the lease has no IPv4 subnet".into()))?;
        let mtu = ext.mtu.saturating_sub(28);
        let tun::Tun { dev, park } = tun::open(DEVICE, u16::try_from(mtu).unwrap_or(u16::MAX))
            .map_err(|e| BackendError::Io {
                context: format!("opening TUN device {DEVICE}"),
                source: e,
            })?;
        let socket = match inherited_socket(std::net::SocketAddrV4::new(local, port)) {
            Some(s) => Ok(s),
            None => std::net::UdpSocket::bind((local, port)),
        }
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|e| BackendError::Io {
            context: format!("binding UDP {local}:{port}"),
            source: e,
        })?;
        grow_buffers(&socket);
        // Under systemd the socket outlives a restart: peers' datagrams queue in it meanwhile.
        if let Err(e) = systemd::store_fd(SOCKET_NAME, std::os::fd::AsFd::as_fd(&socket)) {
            warn!(error = %e, "storing the UDP socket with systemd");
        }
        let udp =
            quinn_udp::UdpSocketState::new((&socket).into()).map_err(|e| BackendError::Io {
                context: format!("configuring UDP {local}:{port}"),
                source: e,
            })?;
        // quinn-udp asks for IP_PMTUDISC_PROBE (QUIC must not fragment); flannel's datagrams behave as
        // Go's, which uses the kernel default: path MTU discovery, local fragmentation allowed.
        let _ = nix::sys::socket::setsockopt(
            &socket,
            IpMtuDiscover,
            &(libc::IP_PMTUDISC_WANT as usize),
        );
        let nl = Netlink::new()?;
        let mut model = UdpModel {
            nl,
            network,
            own_subnet,
            mtu,
            index: 0,
            table: Arc::new(RwLock::new(Arc::new(Table::default()))),
            ready: Arc::new(AtomicBool::new(false)),
            pending: std::sync::Mutex::new(None),
        };
        model.prepare().await?;
        info!(device = DEVICE, %local, port, mtu, "udp backend ready");
        Ok(Box::new(UdpNetwork {
            lease,
            mtu,
            port,
            model,
            dev,
            park,
            socket,
            udp,
            sm: self.ctx.subnet_manager.clone(),
        }))
    }
}

/// Keeps `flannel0` configured and the forwarding table in step with the leases.
#[derive(Debug)]
struct UdpModel {
    nl: Netlink,
    network: Ipv4Net,
    own_subnet: Ipv4Net,
    mtu: u32,
    index: u32,
    table: Arc<RwLock<Arc<Table>>>,
    /// Set once `table` holds the leases.
    ready: Arc<AtomicBool>,
    /// The table of the pass in progress.
    pending: std::sync::Mutex<Option<Arc<Table>>>,
}

impl UdpModel {
    /// `<Network> dev flannel0`.
    fn cluster_route(&self) -> Route {
        cluster_route(self.network, self.index)
    }
}

/// `<network> dev <flannel0's index>`: the one route of the udp backend.
fn cluster_route(network: Ipv4Net, index: u32) -> Route {
    Route {
        dst: IpNet::V4(network),
        gateway: None,
        oif: index,
        onlink: false,
    }
}

/// What the udp backend wants for `leases` (pure): the kernel holds only the cluster route into
/// `flannel0` (#`index`); the peers go into the userspace forwarding table.
pub fn desired_state(
    network: Ipv4Net,
    own_subnet: Ipv4Net,
    index: u32,
    leases: &[&Lease],
) -> (KernelState, Ownership, Table) {
    // udp nodes take every lease (Go does not check the type: udp leases have none).
    let peers = leases
        .iter()
        .filter_map(|l| l.subnet().map(|s| (s, l.attrs.public_ip)));
    let table = Table::from_peers(peers);
    let mut state = KernelState::default();
    state.routes.insert(cluster_route(network, index));
    let own = Ownership {
        networks: vec![IpNet::V4(network)],
        route_oifs: vec![index],
        keep: vec![IpNet::V4(own_subnet)],
        ..Default::default()
    };
    (state, own, table)
}

#[async_trait]
impl Model for UdpModel {
    async fn prepare(&mut self) -> Result<(), BackendError> {
        let link = self.nl.link_by_name(DEVICE).await?.ok_or_else(|| {
            BackendError::Other(format!("{DEVICE} is gone; restart flanneld to recreate it"))
        })?;
        self.index = link.index;
        let addr = IpNet::V4(
            Ipv4Net::new(self.own_subnet.network(), 32)
                .map_err(|e| BackendError::Other(e.to_string()))?,
        );
        self.nl
            .ensure_only_address(link.index, addr, IpNet::V4(self.network))
            .await?;
        if link.mtu != self.mtu {
            self.nl.set_mtu(link.index, self.mtu).await?;
        }
        if !link.up {
            self.nl.set_up(link.index).await?;
        }
        // The cluster route does not depend on the leases: in place before subnet.env says "ready",
        // as Go's udp backend does (a new flannel0 has none; the reconcile loop keeps it afterwards).
        self.nl.apply(&Op::AddRoute(self.cluster_route())).await?;
        Ok(())
    }

    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
        let (state, own, table) = desired_state(self.network, self.own_subnet, self.index, leases);
        // Published by `finish`, after a pass: `desired` is also asked with no leases (the
        // driver's ownership probe at start), which must not reach the forwarding threads.
        if let Ok(mut pending) = self.pending.lock() {
            *pending = Some(Arc::new(table));
        }
        (state, own, Vec::new())
    }

    async fn finish(&mut self) -> Result<(), BackendError> {
        let table = self.pending.lock().ok().and_then(|mut p| p.take());
        if let (Some(table), Ok(mut t)) = (table, self.table.write()) {
            *t = table;
            self.ready.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// The running udp network.
pub struct UdpNetwork {
    lease: Lease,
    mtu: u32,
    port: u16,
    model: UdpModel,
    dev: tun_rs::SyncDevice,
    park: Option<tun::Park>,
    socket: std::net::UdpSocket,
    udp: quinn_udp::UdpSocketState,
    sm: Arc<dyn SubnetManager>,
}

impl std::fmt::Debug for UdpNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpNetwork")
            .field("lease", &self.lease)
            .field("mtu", &self.mtu)
            .field("port", &self.port)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Network for UdpNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) -> Result<(), BackendError> {
        let UdpNetwork {
            lease,
            mut model,
            dev,
            park,
            socket,
            udp,
            sm,
            port,
            mtu,
        } = *self;
        let park = park.map(Arc::new);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_rx = Arc::new(AtomicBool::new(false));
        let pump = pump::Pump {
            dev: Arc::new(dev),
            sock: Arc::new(socket),
            udp: Arc::new(udp),
            table: model.table.clone(),
            port,
            tun_addr: model.own_subnet.network(),
            mtu: usize::try_from(mtu).unwrap_or(1500).max(1500) + 64,
            stop: stop.clone(),
            stop_rx: stop_rx.clone(),
            ready: model.ready.clone(),
            park: park.clone(),
        };
        let spawn = |name: &str, f: fn(&pump::Pump)| {
            let p = pump.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(&p))
        };
        let tx = spawn("udp-tun-out", pump::Pump::tun_to_udp);
        let rx = spawn("udp-tun-in", pump::Pump::udp_to_tun);
        // A thread that could not be started means no forwarding: an error, never a silent half.
        let spawn_error = [&tx, &rx]
            .iter()
            .find_map(|t| t.as_ref().err().map(|e| e.to_string()));
        let result = match spawn_error {
            Some(e) => Err(BackendError::Other(format!(
                "starting the udp forwarding threads: {e}"
            ))),
            None => driver::run_on_netlink(&mut model, sm, &lease, shutdown).await,
        };
        // Stop in the order that loses nothing under systemd: first reading the socket (datagrams
        // then wait in it for the next flanneld), and once what was read is on the TUN device, hand
        // the TUN traffic to the parking queue, which systemd keeps; then stop reading the TUN.
        let join = |t: std::io::Result<std::thread::JoinHandle<()>>| async move {
            if let Ok(t) = t {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
        };
        stop_rx.store(true, Ordering::Relaxed);
        join(rx).await;
        if let Some(park) = &park
            && let Err(e) = park.take_over_from(std::os::fd::AsFd::as_fd(&*pump.dev))
        {
            warn!(error = %e, "attaching the parking queue; packets sent during the restart are dropped");
        }
        stop.store(true, Ordering::Relaxed);
        join(tx).await;
        // The descriptors close when the last thread's `Pump` is gone.
        drop(pump);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same leases twice: the second pass changes nothing, also with hostile leases in the set;
    /// the refused ones never reach the forwarding table.
    #[tokio::test]
    async fn the_same_input_twice_changes_nothing_the_second_time() {
        use flannel_dataplane::FakeKernel;
        let lease = |key: &str, ip: &str| Lease {
            key: key.parse().unwrap(),
            enable_ipv4: true,
            attrs: flannel_core::LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                ..Default::default()
            },
            expiration: None,
            asof: 0,
        };
        let (network, own_subnet) = (
            "10.5.0.0/16".parse().unwrap(),
            "10.5.1.0/24".parse().unwrap(),
        );
        // The host before flannel: the underlay's connected route.
        let k = FakeKernel::with_link_routes(&[("192.168.0.0/24", 2)]);
        let peers = [
            lease("10.5.2.0-24", "192.168.0.2"),
            lease("10.99.0.0-16", "192.168.0.3"),
            lease("0.0.0.0-1", "192.168.0.4"),
            lease("192.168.0.0-24", "192.168.0.5"),
        ];
        let refs: Vec<&Lease> = peers.iter().collect();
        let (allowed, refused) = k
            .reconcile_twice("10.5.1.0-24".parse().unwrap(), &refs, |l| {
                let (s, own, _) = desired_state(network, own_subnet, 9, l);
                (s, own)
            })
            .await;
        assert_eq!((allowed.len(), refused.len()), (1, 3), "{refused:?}");
        let (_, _, table) = desired_state(network, own_subnet, 9, &allowed);
        assert_eq!(table.len(), 1);
        assert_eq!(table.peer_for("10.99.1.1".parse().unwrap()), None);
    }

    #[test]
    fn port_option() {
        assert_eq!(
            parse_port(&serde_json::json!({"Type":"udp"})).unwrap(),
            8285
        );
        assert_eq!(
            parse_port(&serde_json::json!({"port": 9000})).unwrap(),
            9000
        );
        assert!(parse_port(&serde_json::json!({"Port": 70000})).is_err());
        assert!(parse_port(&serde_json::json!({"Port": "1"})).is_err());
    }
}
