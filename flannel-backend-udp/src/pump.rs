//! The I/O loop: two threads, one per direction, that wait with `poll` and then move packets in
//! batches through buffers allocated once.
//!
//! - TUN → peers: `flannel0` runs with offloads (`IFF_VNET_HDR`, TSO/USO), so one read returns up to
//!   64 KiB of one flow; `tun-rs` cuts it into MTU-sized IP packets with their checksums. Each packet
//!   gets its routing decision from [`crate::packet`], and runs of packets to the same peer leave in
//!   one `sendmsg` with UDP GSO (`quinn-udp`): the kernel sends them as separate datagrams, each
//!   carrying exactly one inner packet, as Go flannel's wire format wants.
//! - Peers → TUN: `recvmmsg` with UDP GRO (`quinn-udp`) returns many datagrams per call; each is
//!   checked (known peer, inner source in its subnet, TTL) and `tun-rs` merges consecutive TCP
//!   segments of one flow back into one large packet per TUN write.
//!
//! The forwarding table is read once per batch.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::metrics::metrics;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::packet::{Outcome, from_tun, from_udp};
use crate::table::Table;
use crate::tun::Park;

/// The largest UDP payload one GSO send may carry (an IPv4 datagram is at most 64 KiB).
const MAX_GSO_BYTES: usize = 65_000;
/// The largest read from the TUN device (virtio header + a 64 KiB GSO packet).
const TUN_READ: usize = VIRTIO_NET_HDR_LEN + 65_535;
/// Packets handed to `tun-rs` per merge-and-write call. Each buffer has room for a merged 64 KiB
/// packet; 64 of them hold a full 64 KiB flow batch and keep flanneld's memory small.
const TUN_WRITE_BATCH: usize = 64;
/// Receive buffers per `recvmmsg`, each large enough for one GRO batch of datagrams.
const RX_BATCH: usize = 16;
const RX_BUF: usize = 65_535;

/// Waits up to 50 ms for `fd` to become readable (or writable); false on timeout or error.
fn wait(fd: RawFd, events: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 50) > 0 }
}

fn add(counter: &prometheus_client::metrics::counter::Counter, n: usize) {
    counter.inc_by(n as u64);
}

/// Packets queued for one UDP GSO send: all to one peer and of one size, except a last shorter one
/// (what the kernel's UDP segmentation requires).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Run {
    /// The peer of every packet in the run.
    pub peer: Option<SocketAddrV4>,
    /// The size of each packet (the GSO segment size).
    pub seg: usize,
    /// Packets in the run.
    pub count: usize,
    /// Bytes in the run.
    pub bytes: usize,
    /// A shorter packet ended the run.
    pub closed: bool,
}

impl Run {
    /// Whether a packet of `len` bytes to `peer` can join (`max_segs` packets at most).
    pub fn accepts(&self, peer: SocketAddrV4, len: usize, max_segs: usize) -> bool {
        self.count == 0
            || (self.peer == Some(peer)
                && !self.closed
                && len <= self.seg
                && self.count < max_segs
                && self.bytes + len <= MAX_GSO_BYTES)
    }

    /// Adds a packet that [`Run::accepts`] allowed.
    pub fn push(&mut self, peer: SocketAddrV4, len: usize) {
        if self.count == 0 {
            self.peer = Some(peer);
            self.seg = len;
        } else if len < self.seg {
            self.closed = true;
        }
        self.count += 1;
        self.bytes += len;
    }
}

/// The state both directions share.
#[derive(Clone)]
pub struct Pump {
    /// The TUN device (non-blocking).
    pub dev: Arc<SyncDevice>,
    /// The UDP socket (non-blocking).
    pub sock: Arc<UdpSocket>,
    /// Batched/GSO/GRO state of the socket.
    pub udp: Arc<UdpSocketState>,
    /// The forwarding table.
    pub table: Arc<RwLock<Arc<Table>>>,
    /// The peers' UDP port.
    pub port: u16,
    /// The TUN address (source of ICMP replies).
    pub tun_addr: Ipv4Addr,
    /// Largest packet on the TUN device (its MTU, with headroom).
    pub mtu: usize,
    /// Set to stop TUN → peers (and both threads' waits).
    pub stop: Arc<AtomicBool>,
    /// Set to stop peers → TUN (stopped first at shutdown, so what it read reaches the TUN device).
    pub stop_rx: Arc<AtomicBool>,
    /// Set once the table holds the leases (before that, packets wait in the kernel's queues).
    pub ready: Arc<AtomicBool>,
    /// The parking queue, drained first when the previous flanneld left packets in it.
    pub park: Option<Arc<Park>>,
}

impl std::fmt::Debug for Pump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pump")
            .field("tun_fd", &self.dev.as_raw_fd())
            .field("sock", &self.sock)
            .field("port", &self.port)
            .field("tun_addr", &self.tun_addr)
            .finish_non_exhaustive()
    }
}

impl Pump {
    fn table(&self) -> Arc<Table> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Writes one packet (an ICMP reply, or a packet for a local address) to the TUN device.
    fn write_one(&self, gro: &mut GROTable, buf: &mut Vec<u8>, packet: &[u8]) {
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(packet);
        if self
            .dev
            .send_multiple(gro, std::slice::from_mut(buf), VIRTIO_NET_HDR_LEN)
            .is_err()
        {
            metrics().dropped.inc();
        }
    }

    /// Sends the `run` of packets gathered in `out` as one GSO send (datagrams of `run.seg` bytes).
    fn send_run(&self, run: &Run, out: &[u8]) {
        let m = metrics();
        let Some(peer) = run.peer else { return };
        let transmit = Transmit {
            destination: SocketAddr::V4(peer),
            ecn: None,
            contents: out,
            segment_size: (run.count > 1).then_some(run.seg),
            src_ip: None,
        };
        // A full socket buffer is waited out (bounded); any other error drops the run.
        for _ in 0..50 {
            match self.udp.try_send((&*self.sock).into(), &transmit) {
                Ok(()) => {
                    add(&m.tx_packets, run.count);
                    add(&m.tx_bytes, out.len());
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    wait(self.sock.as_raw_fd(), libc::POLLOUT);
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "udp send failed");
                    break;
                }
            }
        }
        add(&m.dropped, run.count);
    }

    /// Waits until the table holds the leases; false if stopped first.
    fn wait_ready(&self) -> bool {
        while !self.ready.load(Ordering::Acquire) {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Forwards one packet read from the TUN device on its own (the parking queue's packets).
    fn forward_one(
        &self,
        packet: &mut [u8],
        table: &Table,
        gro: &mut GROTable,
        reply: &mut Vec<u8>,
    ) {
        match from_tun(packet, table, self.port, self.tun_addr) {
            Outcome::SendTo(peer) => {
                let mut run = Run::default();
                run.push(peer, packet.len());
                self.send_run(&run, packet);
            }
            Outcome::Reply(r) => self.write_one(gro, reply, &r),
            Outcome::WriteTun => self.write_one(gro, reply, packet),
            Outcome::Drop(_) => {
                metrics().dropped.inc();
            }
        }
    }

    /// TUN → peers, until `stop`: once the table is ready, first what the previous flanneld left in
    /// the parking queue, then the device's own queue.
    pub fn tun_to_udp(&self) {
        let m = metrics();
        let mut raw = vec![0u8; TUN_READ];
        let mut bufs = vec![vec![0u8; self.mtu]; IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut out: Vec<u8> = Vec::with_capacity(MAX_GSO_BYTES + self.mtu);
        let mut reply = Vec::with_capacity(VIRTIO_NET_HDR_LEN + self.mtu);
        let mut gro = GROTable::default();
        let fd = self.dev.as_raw_fd();
        if !self.wait_ready() {
            return;
        }
        if let Some(park) = self.park.as_ref().filter(|p| p.inherited()) {
            let table = self.table();
            let (forwarded, dropped) = park.drain(&mut raw, |packet| {
                self.forward_one(packet, &table, &mut gro, &mut reply)
            });
            add(&m.dropped, dropped);
            tracing::info!(
                forwarded,
                dropped,
                "took over the parking queue: forwarded the packets queued while flanneld restarted"
            );
        }
        while !self.stop.load(Ordering::Relaxed) {
            if !wait(fd, libc::POLLIN) {
                continue;
            }
            let table = self.table();
            let max_segs = self.udp.max_gso_segments().max(1);
            // Drain what is queued (bounded), then wait again.
            for _ in 0..64 {
                let n = match self.dev.recv_multiple(&mut raw, &mut bufs, &mut sizes, 0) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "unreadable packet on {}", crate::DEVICE);
                        m.dropped.inc();
                        continue;
                    }
                };
                let mut run = Run::default();
                out.clear();
                for (buf, &len) in bufs.iter_mut().zip(&sizes).take(n) {
                    let packet = &mut buf[..len];
                    match from_tun(packet, &table, self.port, self.tun_addr) {
                        Outcome::SendTo(peer) => {
                            if !run.accepts(peer, len, max_segs) {
                                self.send_run(&run, &out);
                                run = Run::default();
                                out.clear();
                            }
                            run.push(peer, len);
                            out.extend_from_slice(packet);
                        }
                        Outcome::Reply(r) => self.write_one(&mut gro, &mut reply, &r),
                        Outcome::WriteTun => self.write_one(&mut gro, &mut reply, packet),
                        Outcome::Drop(_) => {
                            m.dropped.inc();
                        }
                    }
                }
                if run.count > 0 {
                    self.send_run(&run, &out);
                }
            }
        }
    }

    /// Peers → TUN, until `stop_rx` (or `stop`).
    pub fn udp_to_tun(&self) {
        let m = metrics();
        let mut arena = vec![0u8; RX_BATCH * RX_BUF];
        let mut slices: Vec<IoSliceMut<'_>> =
            arena.chunks_mut(RX_BUF).map(IoSliceMut::new).collect();
        let mut meta = vec![RecvMeta::default(); RX_BATCH];
        // tun-rs merges TCP segments into a buffer only within its capacity: room for 64 KiB each
        // (untouched pages cost no memory).
        let mut bufs: Vec<Vec<u8>> = (0..TUN_WRITE_BATCH)
            .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65_535))
            .collect();
        let mut gro = GROTable::default();
        let fd = self.sock.as_raw_fd();
        if !self.wait_ready() {
            return;
        }
        while !self.stop_rx.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            if !wait(fd, libc::POLLIN) {
                continue;
            }
            let table = self.table();
            for _ in 0..64 {
                let n = match self.udp.recv((&*self.sock).into(), &mut slices, &mut meta) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "udp receive failed");
                        break;
                    }
                };
                let mut k = 0;
                for (slice, meta) in slices.iter().zip(&meta).take(n) {
                    let SocketAddr::V4(from) = meta.addr else {
                        m.dropped.inc();
                        continue;
                    };
                    let stride = meta.stride.max(1);
                    for datagram in slice[..meta.len].chunks(stride) {
                        if k == bufs.len() {
                            self.write_tun(&mut gro, &mut bufs[..k]);
                            k = 0;
                        }
                        let buf = &mut bufs[k];
                        buf.clear();
                        buf.resize(VIRTIO_NET_HDR_LEN, 0);
                        buf.extend_from_slice(datagram);
                        match from_udp(&mut buf[VIRTIO_NET_HDR_LEN..], *from.ip(), &table) {
                            Outcome::WriteTun => {
                                add(&m.rx_packets, 1);
                                add(&m.rx_bytes, datagram.len());
                                k += 1;
                            }
                            _ => {
                                m.dropped.inc();
                            }
                        }
                    }
                }
                self.write_tun(&mut gro, &mut bufs[..k]);
            }
        }
    }

    /// Writes decapsulated packets (virtio header room in front), merging TCP segments of one flow.
    fn write_tun(&self, gro: &mut GROTable, bufs: &mut [Vec<u8>]) {
        if bufs.is_empty() {
            return;
        }
        if let Err(e) = self.dev.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN) {
            tracing::debug!(error = %e, "writing to {}", crate::DEVICE);
            metrics().dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(172, 20, 0, n), 8285)
    }

    #[test]
    fn a_run_is_one_peer_one_size_and_a_shorter_last_packet() {
        let mut run = Run::default();
        assert!(run.accepts(peer(1), 1472, 64));
        run.push(peer(1), 1472);
        assert!(run.accepts(peer(1), 1472, 64));
        assert!(!run.accepts(peer(2), 1472, 64), "another peer");
        assert!(!run.accepts(peer(1), 1500, 64), "a larger packet");
        assert!(run.accepts(peer(1), 100, 64));
        run.push(peer(1), 100);
        assert!(run.closed);
        assert!(
            !run.accepts(peer(1), 100, 64),
            "nothing after the short one"
        );
        assert_eq!((run.count, run.bytes, run.seg), (2, 1572, 1472));
    }

    #[test]
    fn a_run_is_bounded_by_segments_and_bytes() {
        let mut run = Run::default();
        for _ in 0..3 {
            assert!(run.accepts(peer(1), 1000, 3));
            run.push(peer(1), 1000);
        }
        assert!(!run.accepts(peer(1), 1000, 3), "segment limit");
        let mut run = Run::default();
        while run.accepts(peer(1), 9000, 1000) {
            run.push(peer(1), 9000);
        }
        assert!(run.bytes <= MAX_GSO_BYTES);
        assert_eq!(run.count, MAX_GSO_BYTES / 9000);
    }
}
