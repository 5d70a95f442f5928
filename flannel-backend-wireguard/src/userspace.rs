//! A userspace WireGuard device over TUN, for kernels without the WireGuard module: flanneld's own
//! device loop around gotatun's protocol state machine (`noise::Tunn`: handshakes, sessions,
//! timers, cookies). One loop per device, on a thread of its own (so the rest of flanneld never
//! pauses the pods' traffic), reads a batch from whichever side is ready (from the TUN side, also
//! the reads already waiting behind it), runs the whole batch through the peers' tunnels under one
//! lock, and writes the results as a batch: TUN reads of up to 64 KiB split into packets
//! ([`crate::tun`]), encrypted datagrams sent as GSO runs and received as GRO reads
//! ([`crate::udp`]), decrypted packets written with TCP segments merged.
//!
//! A peer's tunnel (gotatun's `Tunn`, about 19 KB: eight sessions with their replay windows) is
//! made when the peer is first used (a packet for it, its handshake) and dropped once it has
//! expired (no session keys left, no handshake going on), so the peers a host does not talk to
//! cost neither memory nor timer work; a peer with a persistent keep-alive always has one. A new
//! device greets lazily: a data message for a session it does not know (a peer still using a
//! session with the device this one replaced, after a restart) makes it start a handshake with
//! the peer at that address, at most one at a time.
//!
//! gotatun's own device does the same work packet by packet through queues and tasks (two per
//! direction), an async lock on the device and one on the peer per packet; on a 2-core machine that
//! machinery cost more CPU than the cryptography (see the README's throughput section).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use gotatun::noise::handshake::parse_handshake_anon;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::tun::MtuWatcher;
use gotatun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use tun_rs::AsyncDevice;

use crate::key::{Key, PrivateKey};
use crate::peers::{PeerOp, PeerSpec};
use crate::pool::Pool;
use crate::tun::{TunReader, TunWriter, device_gone};
use crate::udp::{GroRecv, Sock, send_runs};

/// The data path's maps: looked up for every packet, filled from leases and our own handshakes.
type HashMap<K, V> = foldhash::HashMap<K, V>;
type HashSet<K> = foldhash::HashSet<K>;

/// Handshake messages a peer may send per second before cookies are asked for (gotatun's figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// How often the tunnels' timers run (handshake retries, keep-alives, session expiry).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// WireGuard's `Reject-After-Time`: a session's keys are not used after this. A data message for
/// an unknown session from a peer we hold a younger session with is a straggler from before it,
/// or forged (the source address is all it takes), so it is no reason for another handshake.
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// TUN reads (each up to 64 KiB of the pods' packets) taken in one turn of the device loop when the
/// device has them ready, and the datagrams after which a turn stops reading and sends.
const TUN_READS_PER_TURN: usize = 4;
const SEND_BATCH: usize = 64;
/// Packet buffers kept for reuse.
const POOL: usize = 512;

/// The device failed.
#[derive(Debug, thiserror::Error)]
#[error("WireGuard device {name}: {message}")]
pub struct DeviceError {
    /// The device.
    pub name: String,
    /// What went wrong.
    pub message: String,
}

/// Which peer an address belongs to: longest prefix first, by exact lookup per prefix length in
/// use (flannel's peers all have subnets of one or two lengths, so a lookup is one or two hashes).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Routes {
    /// Prefix lengths in use, longest first.
    lens: Vec<u8>,
    nets: HashMap<IpNet, Key>,
}

impl Routes {
    /// The routes of `peers`' allowed IPs. A network two peers claim goes to the one whose key
    /// sorts first (the peer diff refuses such leases before they get here).
    pub fn new<'a>(peers: impl IntoIterator<Item = &'a PeerSpec>) -> Self {
        let mut nets = HashMap::default();
        for p in peers {
            for n in &p.allowed_ips {
                nets.entry(n.trunc())
                    .and_modify(|k: &mut Key| *k = (*k).min(p.public_key))
                    .or_insert(p.public_key);
            }
        }
        let mut lens: Vec<u8> = nets.keys().map(IpNet::prefix_len).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        Self { lens, nets }
    }

    /// The peer whose allowed IPs hold `ip` most specifically.
    pub fn find(&self, ip: IpAddr) -> Option<Key> {
        self.lens.iter().find_map(|&len| {
            let net = IpNet::new(ip, len).ok()?.trunc();
            self.nets.get(&net).copied()
        })
    }
}

struct Peer {
    /// Its tunnel, while it has one (see the module's documentation).
    tunn: Option<Box<Tunn>>,
    /// As configured, with the endpoint the peer was last heard from.
    spec: PeerSpec,
    /// Bytes sent and received by its dropped tunnels, and when its last handshake completed as
    /// of the last one dropped (for `wg show`).
    tx: u64,
    rx: u64,
    last_handshake: Option<SystemTime>,
}

impl Peer {
    fn new(spec: PeerSpec, keys: &Keys) -> Self {
        let mut peer = Self {
            tunn: None,
            spec,
            tx: 0,
            rx: 0,
            last_handshake: None,
        };
        peer.renew(keys);
        peer
    }

    /// Its tunnel (`key` is its key), made if it has none and then counted in `live`.
    fn tunn(&mut self, key: Key, keys: &Keys, live: &mut HashSet<Key>) -> &mut Tunn {
        if self.tunn.is_none() {
            live.insert(key);
        }
        self.tunn.get_or_insert_with(|| keys.tunnel_for(&self.spec))
    }

    /// Drops its tunnel (keeping its counters), and makes a fresh one if it has a persistent
    /// keep-alive (which then starts a handshake at once, as the kernel's device keeps trying).
    fn renew(&mut self, keys: &Keys) {
        if let Some(t) = self.tunn.take() {
            let (since, tx, rx, ..) = t.stats();
            self.tx = self
                .tx
                .saturating_add(u64::try_from(tx).unwrap_or(u64::MAX));
            self.rx = self
                .rx
                .saturating_add(u64::try_from(rx).unwrap_or(u64::MAX));
            if let Some(since) = since {
                self.last_handshake = SystemTime::now().checked_sub(since);
            }
        }
        if self.spec.keepalive.is_some() {
            self.tunn = Some(keys.tunnel_for(&self.spec));
        }
    }

    /// (last handshake, bytes sent, bytes received), its tunnel's and the dropped ones'.
    fn stats(&self, now: SystemTime) -> (Option<SystemTime>, u64, u64) {
        let Some(t) = &self.tunn else {
            return (self.last_handshake, self.tx, self.rx);
        };
        let (since, tx, rx, ..) = t.stats();
        let total = |a: u64, b: usize| a.saturating_add(u64::try_from(b).unwrap_or(u64::MAX));
        (
            since
                .and_then(|d| now.checked_sub(d))
                .or(self.last_handshake),
            total(self.tx, tx),
            total(self.rx, rx),
        )
    }
}

/// What every tunnel of a device is made with.
struct Keys {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    index_table: IndexTable,
}

impl Keys {
    fn tunnel_for(&self, spec: &PeerSpec) -> Box<Tunn> {
        Box::new(Tunn::new(
            self.private.clone(),
            PublicKey::from(spec.public_key.0),
            spec.preshared_key.map(|k| k.0),
            spec.keepalive.and_then(|d| u16::try_from(d.as_secs()).ok()),
            self.index_table.clone(),
            self.rate_limiter.clone(),
        ))
    }
}

struct State {
    keys: Keys,
    peers: HashMap<Key, Peer>,
    /// Session indices of our handshakes, to the peer they are with.
    by_idx: HashMap<u32, Key>,
    /// Where each peer is (configured, or last heard from), for the lazy greeting.
    by_endpoint: HashMap<SocketAddr, Key>,
    /// The peers that have a tunnel: the timers run theirs only.
    live: HashSet<Key>,
    routes: Routes,
}

/// Datagrams to send after a batch, by address family (one socket each).
#[derive(Default)]
struct Outbox {
    v4: Vec<(Packet, SocketAddr)>,
    v6: Vec<(Packet, SocketAddr)>,
}

impl Outbox {
    fn push(&mut self, packet: Packet, to: SocketAddr) {
        match to {
            SocketAddr::V4(_) => self.v4.push((packet, to)),
            SocketAddr::V6(_) => self.v6.push((packet, to)),
        }
    }
}

fn register(by_idx: &mut HashMap<u32, Key>, packet: &WgKind, peer: Key) {
    let idx = match packet {
        WgKind::HandshakeInit(p) => p.sender_idx.get(),
        WgKind::HandshakeResp(p) => p.sender_idx.get(),
        _ => return,
    };
    by_idx.insert(idx, peer);
}

impl State {
    fn new(key: &PrivateKey) -> Self {
        let private = StaticSecret::from(key.to_bytes());
        let public = PublicKey::from(&private);
        Self {
            keys: Keys {
                rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
                private,
                public,
                index_table: IndexTable::from_os_rng(),
            },
            peers: HashMap::default(),
            by_idx: HashMap::default(),
            by_endpoint: HashMap::default(),
            live: HashSet::default(),
            routes: Routes::default(),
        }
    }

    fn apply(&mut self, ops: &[PeerOp]) {
        for op in ops {
            match op {
                PeerOp::Remove(k) => {
                    self.peers.remove(k);
                    self.by_idx.retain(|_, p| p != k);
                }
                PeerOp::Set(spec) => {
                    let mut spec = spec.clone();
                    spec.allowed_ips.sort();
                    let key = spec.public_key;
                    match self.peers.get_mut(&key) {
                        // Where it is and what it may send change without a new handshake.
                        Some(p)
                            if p.spec.preshared_key == spec.preshared_key
                                && p.spec.keepalive == spec.keepalive =>
                        {
                            p.spec = spec;
                        }
                        // A new pre-shared key or keep-alive: a new tunnel, the counters kept.
                        Some(p) => {
                            p.spec = spec;
                            p.renew(&self.keys);
                            self.by_idx.retain(|_, p| *p != key);
                        }
                        None => {
                            self.peers.insert(key, Peer::new(spec, &self.keys));
                        }
                    }
                }
            }
        }
        self.routes = Routes::new(self.peers.values().map(|p| &p.spec));
        self.by_endpoint = self
            .peers
            .iter()
            .map(|(k, p)| (p.spec.endpoint, *k))
            .collect();
        self.live = self
            .peers
            .iter()
            .filter(|(_, p)| p.tunn.is_some())
            .map(|(k, _)| *k)
            .collect();
    }

    /// Makes the peers `desired`, changing only those that differ (what
    /// [`crate::peers::diff_peers`] gives, without a copy of either side); how many changed.
    fn sync(&mut self, desired: &BTreeMap<Key, PeerSpec>) -> usize {
        let peers = &self.peers;
        let ops =
            crate::peers::diff_peers_by(desired, peers.keys(), |k| peers.get(k).map(|p| &p.spec));
        if !ops.is_empty() {
            self.apply(&ops);
        }
        ops.len()
    }

    /// Encrypts the packets read from the TUN device for their peers.
    fn outgoing(
        &mut self,
        packets: impl Iterator<Item = Packet>,
        mtu: &mut MtuWatcher,
        out: &mut Outbox,
    ) {
        for packet in packets {
            let Ok(ip) = packet.try_into_ip() else {
                continue;
            };
            let Some(key) = ip.destination().and_then(|d| self.routes.find(d)) else {
                continue;
            };
            let Some(peer) = self.peers.get_mut(&key) else {
                continue;
            };
            let tunn = peer.tunn(key, &self.keys, &mut self.live);
            if let Some(wg) = tunn.handle_outgoing_packet(ip.into_bytes(), Some(mtu)) {
                register(&mut self.by_idx, &wg, key);
                out.push(wg.into(), peer.spec.endpoint);
            }
        }
    }

    /// Handles received datagrams: handshakes answered, data decrypted into `tun`.
    fn incoming(
        &mut self,
        datagrams: impl Iterator<Item = (Packet, SocketAddr)>,
        mtu: &mut MtuWatcher,
        out: &mut Outbox,
        tun: &mut Vec<Packet>,
    ) {
        for (datagram, from) in datagrams {
            let parsed = match self.keys.rate_limiter.verify_packet(from, datagram) {
                Ok(p) => p,
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    out.push(cookie.into(), from);
                    continue;
                }
                Err(_) => continue,
            };
            let keys = &self.keys;
            let key = match &parsed {
                WgKind::HandshakeInit(p) => parse_handshake_anon(&keys.private, &keys.public, p)
                    .ok()
                    .map(|h| Key(h.peer_static_public)),
                WgKind::HandshakeResp(p) => self.by_idx.get(&p.receiver_idx.get()).copied(),
                WgKind::CookieReply(p) => self.by_idx.get(&p.receiver_idx.get()).copied(),
                WgKind::Data(p) => {
                    let known = self.by_idx.get(&p.header.receiver_idx.get()).copied();
                    if known.is_none() {
                        self.greet(from, out);
                        continue;
                    }
                    known
                }
            };
            let Some((key, peer)) = key.and_then(|k| Some(k).zip(self.peers.get_mut(&k))) else {
                continue;
            };
            // A handshake may start a tunnel; anything else is for one that exists.
            let tunn = match (&parsed, &mut peer.tunn) {
                (_, Some(t)) => t,
                (WgKind::HandshakeInit(_), t @ None) => {
                    self.live.insert(key);
                    t.insert(keys.tunnel_for(&peer.spec))
                }
                _ => continue,
            };
            let result = tunn.handle_incoming_packet(parsed);
            // Authentic: the peer is where it sent from (it may have moved).
            if !matches!(result, TunnResult::Err(_)) && peer.spec.endpoint != from {
                peer.spec.endpoint = from;
                self.by_endpoint.insert(from, key);
            }
            match result {
                TunnResult::Done | TunnResult::Err(_) => {}
                TunnResult::WriteToNetwork(reply) => {
                    register(&mut self.by_idx, &reply, key);
                    out.push(reply.into(), from);
                    for queued in tunn.get_queued_packets(mtu) {
                        out.push(queued.into(), from);
                    }
                }
                TunnResult::WriteToTunnel(packet) => {
                    // A keep-alive is empty.
                    if packet.is_empty() {
                        continue;
                    }
                    // Cut to the IP packet's own length (the sender padded it to 16 bytes), as
                    // the kernel's and wireguard-go's devices do: a padded TCP segment could not
                    // be merged with the next on the TUN write.
                    let Ok(ip) = packet.try_into_ipvx() else {
                        continue;
                    };
                    let (source, ip) = ip.either(
                        |v4| (IpAddr::from(v4.header.source()), v4.into_bytes()),
                        |v6| (IpAddr::from(v6.header.source()), v6.into_bytes()),
                    );
                    // A peer may only send from its allowed IPs.
                    if self.routes.find(source) == Some(key) {
                        tun.push(ip);
                    }
                }
            }
        }
    }

    /// Answers a data message for a session this device does not know, from `from`: the peer
    /// there (if one is) still uses a session with the device this one replaced, so a handshake
    /// with it starts, unless one is going on or this device holds a live session with it.
    fn greet(&mut self, from: SocketAddr, out: &mut Outbox) {
        let Some(&key) = self.by_endpoint.get(&from) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let tunn = peer.tunn(key, &self.keys, &mut self.live);
        if tunn
            .stats()
            .0
            .is_some_and(|since| since < REJECT_AFTER_TIME)
        {
            return;
        }
        if let Some(init) = tunn.format_handshake_initiation(false) {
            let init = WgKind::from(init);
            register(&mut self.by_idx, &init, key);
            out.push(init.into(), peer.spec.endpoint);
        }
    }

    /// The device as `wg show` reports it (peers in key order).
    fn describe(&self, port: u16) -> crate::uapi::DeviceInfo {
        let now = SystemTime::now();
        let mut peers: Vec<crate::uapi::PeerInfo> = self
            .peers
            .values()
            .map(|p| {
                let (last_handshake, tx_bytes, rx_bytes) = p.stats(now);
                crate::uapi::PeerInfo {
                    public_key: p.spec.public_key.0,
                    preshared_key: p.spec.preshared_key.map(|k| k.0),
                    endpoint: p.spec.endpoint,
                    allowed_ips: p.spec.allowed_ips.clone(),
                    last_handshake,
                    rx_bytes,
                    tx_bytes,
                    keepalive: p.spec.keepalive,
                }
            })
            .collect();
        peers.sort_by_key(|p| p.public_key);
        crate::uapi::DeviceInfo {
            private_key: self.keys.private.to_bytes(),
            listen_port: port,
            peers,
        }
    }

    /// Runs the tunnels' timers (handshake retries, keep-alives, expiry) and drops the tunnels
    /// that have expired.
    fn timers(&mut self, out: &mut Outbox) {
        let Self {
            keys,
            by_idx,
            peers,
            live,
            ..
        } = self;
        live.retain(|key| {
            let Some(peer) = peers.get_mut(key) else {
                return false;
            };
            let Some(tunn) = peer.tunn.as_mut() else {
                return false;
            };
            if let Ok(Some(packet)) = tunn.update_timers() {
                register(by_idx, &packet, *key);
                out.push(packet.into(), peer.spec.endpoint);
            }
            if tunn.is_expired() {
                peer.renew(keys);
            }
            peer.tunn.is_some()
        });
        by_idx.retain(|idx, _| keys.index_table.in_use(*idx));
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every change under the lock is complete before anything that could panic.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running userspace WireGuard device: a TUN device of that name plus its UDP sockets.
pub struct UserspaceDevice {
    name: String,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The device loop's own thread (see [`UserspaceDevice::create`]).
    thread: Option<std::thread::JoinHandle<()>>,
    /// The `wg show` socket's server ([`crate::uapi::serve`]); `None` once stopped.
    uapi: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for UserspaceDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserspaceDevice({})", self.name)
    }
}

impl UserspaceDevice {
    /// Creates the TUN device `name` (or takes over the one a previous device of that name left)
    /// with `mtu` and starts WireGuard on UDP `port` (IPv4 and, where the host has IPv6, IPv6)
    /// with `key`, and the `wg show` socket ([`crate::uapi::serve`]).
    ///
    /// The device loop runs on its own thread (named after the device, with its own
    /// single-threaded runtime, in the caller's network namespace), as the udp backend's
    /// forwarding does: a reconcile pass over many leases, or anything else the caller's runtime
    /// is busy with, does not pause the pods' traffic, and on a host with more than one core the
    /// two run side by side.
    ///
    /// # Errors
    /// When the TUN device or the IPv4 socket cannot be made, or the thread cannot be started.
    pub async fn create(
        name: &str,
        key: &PrivateKey,
        port: u16,
        mtu: u16,
    ) -> Result<Self, DeviceError> {
        let err = |message: String| DeviceError {
            name: name.into(),
            message,
        };
        let state = Arc::new(Mutex::new(State::new(key)));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (opened, open_result) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let loop_state = state.clone();
        let dev_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = opened.send(Err(format!("starting its runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    // The descriptors belong to this thread's runtime: made here.
                    match open(&dev_name, port, mtu) {
                        Ok((dev, v4, v6)) => {
                            let _ = opened.send(Ok(()));
                            run(dev, v4, v6, loop_state, stopped, mtu).await;
                        }
                        Err(e) => {
                            let _ = opened.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| err(format!("starting the device thread: {e}")))?;
        match open_result.await {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                return Err(err(message));
            }
            Err(_) => return Err(err("the device thread ended while starting".into())),
        }
        let uapi = Some(tokio::spawn(crate::uapi::serve(
            crate::uapi::run_dir(),
            name.into(),
            {
                let state = state.clone();
                move || lock(&state).describe(port)
            },
        )));
        Ok(Self {
            name: name.into(),
            state,
            stop: Some(stop),
            thread: Some(thread),
            uapi,
        })
    }

    /// The device's peers, as specs (each with the endpoint it was last heard from).
    pub async fn peers(&self) -> BTreeMap<Key, PeerSpec> {
        lock(&self.state)
            .peers
            .iter()
            .map(|(k, p)| (*k, p.spec.clone()))
            .collect()
    }

    /// Makes the device's peers `desired`, changing only those that differ; how many changed.
    pub async fn sync(&self, desired: &BTreeMap<Key, PeerSpec>) -> usize {
        lock(&self.state).sync(desired)
    }

    /// Applies peer changes.
    ///
    /// # Errors
    /// None at present (every change is made in memory); the signature matches the kernel
    /// device's.
    pub async fn apply(&self, ops: &[PeerOp]) -> Result<(), DeviceError> {
        lock(&self.state).apply(ops);
        Ok(())
    }

    /// Whether its device loop still runs (it ends by itself when the TUN device is deleted or
    /// the IPv4 socket becomes unusable, and then lets the TUN device go).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the device. Its TUN device stays (persistent), with the routes through it, until
    /// the next device of that name takes it over.
    pub async fn stop(mut self) {
        if let Some(uapi) = self.uapi.take() {
            uapi.abort();
            let _ = uapi.await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for UserspaceDevice {
    fn drop(&mut self) {
        // The loop ends at its next turn once its stop channel is gone (the TUN device stays, as
        // after `stop`); its thread is not waited for here.
        drop(self.stop.take());
        if let Some(uapi) = self.uapi.take() {
            uapi.abort();
        }
    }
}

/// The TUN device and the UDP sockets of a device, made in the runtime that will use them.
type Opened = (AsyncDevice, Arc<Sock>, Option<Arc<Sock>>);

/// Opens the TUN device `name` and binds the UDP sockets on `port` (IPv6 where the host has it).
fn open(name: &str, port: u16, mtu: u16) -> Result<Opened, String> {
    let dev = crate::tun::open(name, mtu).map_err(|e| format!("TUN device: {e}"))?;
    let v4 = crate::udp::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .map_err(|e| format!("listening on UDP port {port}: {e}"))?;
    let v6 = match crate::udp::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(device = name, port, error = %e, "no IPv6 UDP socket; IPv4 peers only");
            None
        }
    };
    Ok((dev, v4, v6))
}

async fn recv_on(rx: Option<&mut GroRecv>) -> std::io::Result<()> {
    match rx {
        Some(rx) => rx.fill().await,
        None => std::future::pending().await,
    }
}

/// The device loop: one batch at a time from whichever side is ready.
async fn run(
    dev: AsyncDevice,
    v4: Arc<Sock>,
    v6: Option<Arc<Sock>>,
    state: Arc<Mutex<State>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    mtu: u16,
) {
    let pool = Pool::new(mtu, POOL);
    let mut reader = TunReader::new(pool.clone());
    let mut writer = TunWriter::default();
    let mut rx4 = GroRecv::new(v4.clone());
    let mut rx6 = v6.clone().map(GroRecv::new);
    let mut mtu_watch = MtuWatcher::new(mtu);
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Outbox::default();
    let mut decrypted: Vec<Packet> = Vec::new();
    let mut gso = Vec::new();
    let stopped = loop {
        tokio::select! {
            _ = &mut stop => break true,
            r = reader.read(&dev) => match r {
                Ok(()) => {
                    let mut st = lock(&state);
                    st.outgoing(reader.packets(), &mut mtu_watch, &mut out);
                    // What else the device holds now, up to a full send: fewer, larger sends
                    // (and receives on the peers' side), never a wait.
                    for _ in 1..TUN_READS_PER_TURN {
                        if out.v4.len() + out.v6.len() >= SEND_BATCH || reader.read_ready(&dev).is_none() {
                            break;
                        }
                        st.outgoing(reader.packets(), &mut mtu_watch, &mut out);
                    }
                }
                Err(e) if device_gone(&e) => {
                    tracing::warn!(error = %e, "the WireGuard TUN device is gone; the device stops");
                    break false;
                }
                Err(e) => tracing::debug!(error = %e, "skipping an unreadable read from the TUN device"),
            },
            r = rx4.fill() => match r {
                Ok(()) => lock(&state).incoming(
                    std::iter::from_fn(|| rx4.next_pending(&pool)),
                    &mut mtu_watch,
                    &mut out,
                    &mut decrypted,
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "the WireGuard IPv4 socket is unusable; the device stops");
                    break false;
                }
            },
            r = recv_on(rx6.as_mut()) => match (r, rx6.as_mut()) {
                (Ok(()), Some(rx)) => lock(&state).incoming(
                    std::iter::from_fn(|| rx.next_pending(&pool)),
                    &mut mtu_watch,
                    &mut out,
                    &mut decrypted,
                ),
                _ => {
                    tracing::warn!("the WireGuard IPv6 socket is unusable; IPv4 goes on");
                    rx6 = None;
                }
            },
            _ = tick.tick() => lock(&state).timers(&mut out),
        }
        if !decrypted.is_empty() {
            writer.write(&dev, &decrypted).await;
            decrypted.clear();
        }
        if !out.v4.is_empty() {
            send_runs(&v4, &out.v4, &mut gso).await;
            out.v4.clear();
        }
        if !out.v6.is_empty() {
            if let Some(v6) = &v6 {
                send_runs(v6, &out.v6, &mut gso).await;
            }
            out.v6.clear();
        }
    };
    if !stopped {
        // The link goes with this loop's descriptor: its deletion makes the backend recreate it.
        crate::tun::release(&dev);
    }
}

/// The private key of the device [`run_untrusted`] runs.
pub const FUZZ_DEVICE_PRIVATE: [u8; 32] = [7; 32];
/// The private key of its one peer.
pub const FUZZ_PEER_PRIVATE: [u8; 32] = [9; 32];

/// Runs untrusted bytes through a device's protocol side, as the fuzz target `wireguard_datagram`
/// does: `data` is a series of chunks, each a kind byte, a length (2 bytes, little-endian) and that
/// many bytes (or what is left): by the kind's low bit a datagram received from the UDP socket (0)
/// or a packet read from the TUN device (1), for a device with one peer, whose key is
/// [`FUZZ_PEER_PRIVATE`]'s; the device's is [`FUZZ_DEVICE_PRIVATE`]'s.
/// Returns how many datagrams it would send in answer to the chunks (not counting what its timers
/// send) and how many packets it would write to the TUN device. Never panics, whatever the bytes.
pub fn run_untrusted(data: &[u8]) -> (usize, usize) {
    // Fixed keys: the fuzzer's inputs stay meaningful from run to run.
    let mut state = State::new(&PrivateKey::from_bytes(FUZZ_DEVICE_PRIVATE));
    let peer = PeerSpec {
        public_key: Key(PublicKey::from(&StaticSecret::from(FUZZ_PEER_PRIVATE)).to_bytes()),
        endpoint: SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 51820)),
        allowed_ips: vec![IpNet::from(ipnet::Ipv4Net::new_assert(
            Ipv4Addr::new(10, 5, 3, 0),
            24,
        ))],
        preshared_key: None,
        keepalive: Some(Duration::from_secs(25)),
    };
    state.apply(&[PeerOp::Set(peer.clone())]);
    let pool = Pool::new(1420, 8);
    let mut mtu = MtuWatcher::new(1420);
    let mut out = Outbox::default();
    let mut tun = Vec::new();
    let (mut sent, mut written) = (0, 0);
    let mut rest = data;
    while let [kind, a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
        let (bytes, after) = tail.split_at(len);
        rest = after;
        let Some(packet) = pool.copy_of(bytes) else {
            continue;
        };
        if kind & 1 == 0 {
            state.incoming(
                std::iter::once((packet, peer.endpoint)),
                &mut mtu,
                &mut out,
                &mut tun,
            );
        } else {
            state.outgoing(std::iter::once(packet), &mut mtu, &mut out);
        }
        sent += out.v4.len() + out.v6.len();
        written += tun.len();
        // The timers run too (a persistent keep-alive is due at once), uncounted.
        state.timers(&mut out);
        out.v4.clear();
        out.v6.clear();
        tun.clear();
    }
    (sent, written)
}

/// What [`measure_datapath`] measured: the CPU time of flanneld's side of the data path per packet,
/// without the kernel's (no TUN device, no sockets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DatapathFigures {
    /// Packets carried through each side.
    pub packets: usize,
    /// Nanoseconds per packet on the sending side: a packet (as the TUN read leaves it in a
    /// buffer) routed to its peer, padded, encrypted, queued as a datagram.
    pub encrypt_ns: f64,
    /// Nanoseconds per packet on the receiving side: a datagram (as the UDP read leaves it)
    /// checked, decrypted, its source checked against the peer's allowed IPs.
    pub decrypt_ns: f64,
}

/// Runs `batches` batches of `batch` IPv4 packets of `packet_len` bytes (20..=1420) from one
/// in-memory device to another after a real handshake between them, timing each side: the figure
/// benchmarks print for the userspace device's own cost, free of the kernel's work and of the
/// other processes on the machine. Returns `None` when the packets did not all arrive (which would
/// be a bug).
pub fn measure_datapath(packet_len: u16, batch: usize, batches: usize) -> Option<DatapathFigures> {
    use std::time::Instant;
    let len = usize::from(packet_len.clamp(20, 1420));
    let mut pair = Pair::new()?;
    let pool = Pool::new(1420, 2 * batch + 8);
    let template = ipv4_packet(len, [10, 5, 2, 1], [10, 5, 3, 1])?;
    let (mut out_a, mut tun) = (Outbox::default(), Vec::new());
    // The handshake: A's first packet waits in A's queue for it.
    pair.a.outgoing(
        pool.copy_of(&template).into_iter(),
        &mut pair.mtu,
        &mut out_a,
    );
    pair.settle(&mut out_a, &mut tun);
    if tun.len() != 1 {
        return None;
    }
    tun.clear();
    let (mut enc, mut dec) = (Duration::ZERO, Duration::ZERO);
    let mut out_b = Outbox::default();
    for _ in 0..batches {
        let packets: Vec<Packet> = (0..batch).filter_map(|_| pool.copy_of(&template)).collect();
        let t = Instant::now();
        pair.a
            .outgoing(packets.into_iter(), &mut pair.mtu, &mut out_a);
        enc += t.elapsed();
        let t = Instant::now();
        pair.b.incoming(
            out_a.v4.drain(..).map(|(p, _)| (p, pair.a_ep)),
            &mut pair.mtu,
            &mut out_b,
            &mut tun,
        );
        dec += t.elapsed();
        if tun.len() != batch || tun.iter().any(|p| p.len() != len) {
            return None;
        }
        tun.clear();
    }
    let n = batch * batches;
    let per = |d: Duration| d.as_secs_f64() * 1e9 / n.max(1) as f64;
    Some(DatapathFigures {
        packets: n,
        encrypt_ns: per(enc),
        decrypt_ns: per(dec),
    })
}

/// An IPv4 packet of `len` (20..) bytes from `src` to `dst` (UDP, no body to speak of).
fn ipv4_packet(len: usize, src: [u8; 4], dst: [u8; 4]) -> Option<Vec<u8>> {
    let len = len.max(20);
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    Some(p)
}

/// Two in-memory devices, each the other's peer: A (keys of [`FUZZ_PEER_PRIVATE`], 10.5.2.0/24
/// behind it) and B ([`FUZZ_DEVICE_PRIVATE`], 10.5.3.0/24).
struct Pair {
    a: State,
    b: State,
    /// A's key and B as A's peer, for a test that restarts A.
    #[cfg_attr(not(test), expect(dead_code))]
    a_key: PrivateKey,
    #[cfg_attr(not(test), expect(dead_code))]
    b_spec: PeerSpec,
    a_ep: SocketAddr,
    b_ep: SocketAddr,
    mtu: MtuWatcher,
}

impl Pair {
    fn new() -> Option<Self> {
        let (a_key, b_key) = (
            PrivateKey::from_bytes(FUZZ_PEER_PRIVATE),
            PrivateKey::from_bytes(FUZZ_DEVICE_PRIVATE),
        );
        let (a_ep, b_ep) = (
            SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 51820)),
            SocketAddr::from((Ipv4Addr::new(192, 0, 2, 2), 51820)),
        );
        let spec = |key: &PrivateKey, net: &str, endpoint: SocketAddr| -> Option<PeerSpec> {
            Some(PeerSpec {
                public_key: key.public_key(),
                endpoint,
                allowed_ips: vec![net.parse().ok()?],
                preshared_key: None,
                keepalive: None,
            })
        };
        let b_spec = spec(&b_key, "10.5.3.0/24", b_ep)?;
        let mut a = State::new(&a_key);
        let mut b = State::new(&b_key);
        a.apply(&[PeerOp::Set(b_spec.clone())]);
        b.apply(&[PeerOp::Set(spec(&a_key, "10.5.2.0/24", a_ep)?)]);
        Some(Self {
            a,
            b,
            a_key,
            b_spec,
            a_ep,
            b_ep,
            mtu: MtuWatcher::new(1420),
        })
    }

    /// Passes A's datagrams to B and B's answers back, until neither has more to say (a few
    /// rounds at most); what either decrypts goes to `tun`.
    fn settle(&mut self, out_a: &mut Outbox, tun: &mut Vec<Packet>) {
        let mut out_b = Outbox::default();
        for _ in 0..4 {
            self.b.incoming(
                out_a.v4.drain(..).map(|(p, _)| (p, self.a_ep)),
                &mut self.mtu,
                &mut out_b,
                tun,
            );
            self.a.incoming(
                out_b.v4.drain(..).map(|(p, _)| (p, self.b_ep)),
                &mut self.mtu,
                out_a,
                tun,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: u8, nets: &[&str]) -> PeerSpec {
        PeerSpec {
            public_key: Key([key; 32]),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
            preshared_key: None,
            keepalive: None,
        }
    }

    #[test]
    fn the_datapath_measurement_carries_every_packet() {
        let f = measure_datapath(1420, 16, 3).expect("all packets arrive");
        assert_eq!(f.packets, 48);
        assert!(f.encrypt_ns > 0.0 && f.decrypt_ns > 0.0, "{f:?}");
        // 20 bytes travel padded to 32: they arrive cut back to 20 (checked inside), as the
        // kernel's and wireguard-go's devices cut them.
        let f = measure_datapath(0, 4, 1).expect("the shortest IPv4 packet, unpadded");
        assert_eq!(f.packets, 4);
    }

    #[test]
    fn routes_find_the_most_specific_peer() {
        let peers = [
            spec(1, &["10.5.0.0/16"]),
            spec(2, &["10.5.3.0/24", "fd00:5:3::/64"]),
            spec(3, &["10.5.4.7/24"]),
        ];
        let r = Routes::new(&peers);
        let find = |ip: &str| r.find(ip.parse().unwrap()).map(|k| k.0[0]);
        assert_eq!(find("10.5.3.9"), Some(2));
        assert_eq!(find("10.5.4.1"), Some(3), "a network is kept by its prefix");
        assert_eq!(
            find("10.5.9.1"),
            Some(1),
            "the shorter prefix when no longer one holds it"
        );
        assert_eq!(find("fd00:5:3::1"), Some(2));
        assert_eq!(find("fd00:5:4::1"), None);
        assert_eq!(find("10.6.0.1"), None);
        assert_eq!(Routes::new(&[]).find("10.5.3.9".parse().unwrap()), None);
    }

    #[test]
    fn a_network_two_peers_claim_goes_to_one_of_them_whatever_the_order() {
        let a = spec(1, &["10.5.3.0/24"]);
        let b = spec(2, &["10.5.3.0/24"]);
        let ip = "10.5.3.1".parse().unwrap();
        assert_eq!(Routes::new([&a, &b]).find(ip), Some(a.public_key));
        assert_eq!(Routes::new([&b, &a]).find(ip), Some(a.public_key));
    }

    #[test]
    fn a_new_endpoint_keeps_the_tunnel_and_a_new_keepalive_replaces_it() {
        let mut st = State::new(&PrivateKey::generate().unwrap());
        let mut p = spec(7, &["10.5.3.0/24"]);
        st.apply(&[PeerOp::Set(p.clone())]);
        st.by_idx.insert(42, p.public_key);
        p.endpoint = "192.0.2.9:51820".parse().unwrap();
        st.apply(&[PeerOp::Set(p.clone())]);
        assert_eq!(st.peers[&p.public_key].spec.endpoint, p.endpoint);
        assert_eq!(
            st.by_idx.get(&42),
            Some(&p.public_key),
            "same tunnel, same sessions"
        );
        p.keepalive = Some(Duration::from_secs(25));
        st.apply(&[PeerOp::Set(p.clone())]);
        assert!(
            st.by_idx.is_empty(),
            "a new tunnel: the old sessions' indices are gone"
        );
        st.apply(&[PeerOp::Remove(p.public_key)]);
        assert!(st.peers.is_empty());
        assert_eq!(st.routes.find("10.5.3.1".parse().unwrap()), None);
    }

    #[test]
    fn sync_changes_only_the_peers_that_differ() {
        let mut st = State::new(&PrivateKey::generate().unwrap());
        let (a, b, c) = (
            spec(7, &["10.5.3.0/24"]),
            spec(8, &["10.5.4.0/24"]),
            spec(9, &["10.5.5.0/24"]),
        );
        st.apply(&[PeerOp::Set(a.clone()), PeerOp::Set(b.clone())]);
        st.by_idx.insert(42, a.public_key);
        let desired: BTreeMap<Key, PeerSpec> = [(a.public_key, a.clone()), (c.public_key, c)]
            .into_iter()
            .collect();
        // b goes, c comes, a stays as it is (its session with it).
        assert_eq!(st.sync(&desired), 2);
        assert_eq!(
            st.peers
                .keys()
                .copied()
                .collect::<std::collections::BTreeSet<Key>>(),
            desired.keys().copied().collect()
        );
        assert_eq!(st.by_idx.get(&42), Some(&a.public_key));
        assert_eq!(st.routes.find("10.5.4.1".parse().unwrap()), None);
        assert_eq!(st.sync(&desired), 0, "nothing left to change");
        // The same as the diff of copies gives.
        let mut moved = desired.clone();
        if let Some(p) = moved.get_mut(&a.public_key) {
            p.endpoint = "192.0.2.9:51820".parse().unwrap();
        }
        let have: BTreeMap<Key, PeerSpec> =
            st.peers.iter().map(|(k, p)| (*k, p.spec.clone())).collect();
        let expected = crate::peers::diff_peers(&moved, &have).len();
        assert_eq!(st.sync(&moved), expected);
        assert_eq!(expected, 1);
    }

    fn tunnels(st: &State) -> usize {
        st.peers.values().filter(|p| p.tunn.is_some()).count()
    }

    #[test]
    fn peers_get_a_tunnel_when_used_and_with_a_keepalive_at_once() {
        let mut st = State::new(&PrivateKey::generate().unwrap());
        let idle: Vec<PeerOp> = (1..=50)
            .map(|i| PeerOp::Set(spec(i, &[&format!("10.5.{i}.0/24")])))
            .collect();
        st.apply(&idle);
        assert_eq!(tunnels(&st), 0, "idle peers cost no tunnel");
        let pool = Pool::new(1420, 4);
        let packet = ipv4_packet(28, [10, 5, 0, 1], [10, 5, 7, 1]).unwrap();
        let mut out = Outbox::default();
        st.outgoing(
            pool.copy_of(&packet).into_iter(),
            &mut MtuWatcher::new(1420),
            &mut out,
        );
        assert_eq!(tunnels(&st), 1);
        assert!(st.peers[&Key([7; 32])].tunn.is_some());
        assert_eq!(out.v4.len(), 1, "its handshake initiation");
        // What the timers do with a tunnel once it has expired: dropped, its counters kept.
        let State { peers, keys, .. } = &mut st;
        let peer = peers.get_mut(&Key([7; 32])).unwrap();
        peer.renew(keys);
        assert!(peer.tunn.is_none());
        let (_, tx, rx) = peer.stats(SystemTime::now());
        assert_eq!(
            (tx, rx),
            (148, 0),
            "the initiation's bytes are still counted"
        );
        st.outgoing(
            pool.copy_of(&packet).into_iter(),
            &mut MtuWatcher::new(1420),
            &mut out,
        );
        let mut kept = spec(60, &["10.5.60.0/24"]);
        kept.keepalive = Some(Duration::from_secs(25));
        st.apply(&[PeerOp::Set(kept)]);
        assert_eq!(tunnels(&st), 2, "a keep-alive needs its tunnel");
        st.timers(&mut out);
        assert_eq!(tunnels(&st), 2, "live tunnels are not dropped");
        assert_eq!(st.live.len(), 2, "the timers run the two tunnels only");
    }

    impl Pair {
        /// A receives `datagram` from `from`: what it sends in answer (what it decrypts goes to
        /// `tun`).
        fn a_receives(
            &mut self,
            datagram: Packet,
            from: SocketAddr,
            tun: &mut Vec<Packet>,
        ) -> Outbox {
            let mut answer = Outbox::default();
            self.a.incoming(
                std::iter::once((datagram, from)),
                &mut self.mtu,
                &mut answer,
                tun,
            );
            answer
        }
    }

    #[test]
    fn a_restarted_device_greets_a_peer_that_sends_on_an_old_session() {
        let mut pair = Pair::new().unwrap();
        let pool = Pool::new(1420, 8);
        let (mut out_a, mut tun) = (Outbox::default(), Vec::new());
        let a_to_b = ipv4_packet(60, [10, 5, 2, 1], [10, 5, 3, 1]).unwrap();
        let b_to_a = ipv4_packet(60, [10, 5, 3, 1], [10, 5, 2, 1]).unwrap();
        pair.a
            .outgoing(pool.copy_of(&a_to_b).into_iter(), &mut pair.mtu, &mut out_a);
        pair.settle(&mut out_a, &mut tun);
        assert_eq!(tun.len(), 1, "the first session carries");
        tun.clear();
        // A restarts: same key, same peer, no sessions. B sends on its old session.
        pair.a = State::new(&pair.a_key);
        pair.a.apply(&[PeerOp::Set(pair.b_spec.clone())]);
        // B sends one packet to A: the datagram it becomes.
        let b_sends = |pair: &mut Pair| -> Packet {
            let mut out = Outbox::default();
            pair.b
                .outgoing(pool.copy_of(&b_to_a).into_iter(), &mut pair.mtu, &mut out);
            assert_eq!(out.v4.len(), 1);
            out.v4.remove(0).0
        };
        let b_ep = pair.b_ep;
        let stale = b_sends(&mut pair);
        let mut out_a = pair.a_receives(stale, b_ep, &mut tun);
        assert!(tun.is_empty(), "an old session's data cannot be read");
        assert_eq!(out_a.v4.len(), 1, "a handshake initiation for B");
        assert_eq!((out_a.v4[0].0.len(), out_a.v4[0].1), (148, b_ep));
        // More stale data while that handshake goes on: no second one.
        let stale = b_sends(&mut pair);
        let more = pair.a_receives(stale, b_ep, &mut tun);
        assert!(more.v4.is_empty(), "one handshake at a time");
        // From an address no peer has: nothing.
        let stale = b_sends(&mut pair);
        let more = pair.a_receives(stale, "192.0.2.99:51820".parse().unwrap(), &mut tun);
        assert!(more.v4.is_empty(), "a stranger is not greeted");
        // The handshake completes; B's next packet is read.
        pair.settle(&mut out_a, &mut tun);
        tun.clear();
        let fresh = b_sends(&mut pair);
        pair.a_receives(fresh, b_ep, &mut tun);
        assert_eq!(tun.len(), 1, "the new session carries B's packets");
        assert_eq!(&tun[0][..], &b_to_a[..]);
        // Data for an unknown session (forged: the receiver index changed) from B's address, now
        // that A holds a live session with B: no new handshake.
        let mut forged = b_sends(&mut pair);
        forged[4] ^= 0xff;
        let after = pair.a_receives(forged, b_ep, &mut tun);
        assert!(after.v4.is_empty(), "no handshake over a live session");
    }

    #[test]
    fn a_real_handshake_through_the_untrusted_entry_is_answered() {
        // The peer's side: a device with our device as its peer, sending a packet to our subnet.
        let mut peer = State::new(&PrivateKey::from_bytes(FUZZ_PEER_PRIVATE));
        let ours = PeerSpec {
            public_key: Key(PublicKey::from(&StaticSecret::from(FUZZ_DEVICE_PRIVATE)).to_bytes()),
            allowed_ips: vec!["10.5.2.0/24".parse().unwrap()],
            ..spec(0, &[])
        };
        peer.apply(&[PeerOp::Set(ours)]);
        let mut ping = [0u8; 28];
        ping[0] = 0x45;
        ping[2..4].copy_from_slice(&28u16.to_be_bytes());
        ping[8] = 64;
        ping[9] = 1;
        ping[12..16].copy_from_slice(&[10, 5, 3, 1]);
        ping[16..20].copy_from_slice(&[10, 5, 2, 1]);
        let pool = Pool::new(1420, 4);
        let mut out = Outbox::default();
        peer.outgoing(
            pool.copy_of(&ping).into_iter(),
            &mut MtuWatcher::new(1420),
            &mut out,
        );
        let init = out.v4.pop().expect("a handshake initiation").0;
        assert_eq!(init.len(), 148, "a handshake initiation");
        let mut data = vec![0u8];
        data.extend_from_slice(&u16::try_from(init.len()).unwrap().to_le_bytes());
        data.extend_from_slice(&init);
        let (sent, written) = run_untrusted(&data);
        assert_eq!(
            (sent, written),
            (1, 0),
            "answered with a handshake response"
        );
        // The same bytes from a stranger's key are not answered.
        let mut bad = data.clone();
        bad[3 + 8] ^= 1;
        assert_eq!(run_untrusted(&bad), (0, 0));
        assert_eq!(run_untrusted(&[]), (0, 0));
    }
}
