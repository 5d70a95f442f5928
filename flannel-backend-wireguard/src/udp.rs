//! The UDP side of a userspace WireGuard device, with the kernel's segmentation offloads as the udp
//! backend has them (quinn-udp): the datagrams one batch of packets became are sent as runs, each
//! run of equal-sized datagrams to one peer as one GSO send (the kernel carries it as one buffer as
//! far as it can); receives take what the kernel coalesced (GRO) in one read and split it at the
//! kernel's stride (gotatun's own sockets read one datagram into 4 KiB while asking for `UDP_GRO`,
//! which would cut the datagrams of a peer that sends with GSO: ours, newer wireguard-go).
//!
//! One failed send does not stop the device: a run the kernel refuses (an unreachable peer, a
//! firewall's `EPERM`) is dropped (logged at debug), as a network drops packets, and the runs
//! after it are sent.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;

use gotatun::packet::Packet;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

use crate::pool::Pool;

/// Socket buffers (gotatun's size).
const SOCKET_BUFFER: usize = 7 << 20;
/// One GSO send carries at most this much (the kernel's limit for one UDP buffer).
const MAX_GSO_BYTES: usize = 65_000;
/// Receive buffers per read, each room for one coalesced read.
const RX_BATCH: usize = 4;
const RX_BUF: usize = 65_535;

/// A bound socket with its offload state.
#[derive(Debug)]
pub struct Sock {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

/// Binds a UDP socket to `addr` with large buffers and the kernel's offloads.
///
/// # Errors
/// When the socket cannot be made or bound.
pub fn bind(addr: SocketAddr) -> io::Result<Arc<Sock>> {
    let domain = match addr {
        SocketAddr::V4(_) => socket2::Domain::IPV4,
        SocketAddr::V6(_) => socket2::Domain::IPV6,
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_reuse_address(true)?;
    s.set_recv_buffer_size(SOCKET_BUFFER)?;
    s.set_send_buffer_size(SOCKET_BUFFER)?;
    s.bind(&addr.into())?;
    let std: std::net::UdpSocket = s.into();
    let state = UdpSocketState::new((&std).into())?;
    Ok(Arc::new(Sock {
        io: tokio::net::UdpSocket::from_std(std)?,
        state,
    }))
}

/// How many of `batch`, from the first, go in one send: datagrams to one destination, all of the
/// first one's size but the last (which may be shorter), at most `max_segments` and
/// 65,000 bytes in all.
pub fn run_length(batch: &[(usize, SocketAddr)], max_segments: usize) -> usize {
    let Some(&(size, dst)) = batch.first() else {
        return 0;
    };
    let mut n = 1;
    let mut bytes = size;
    for &(len, to) in &batch[1..] {
        if to != dst || len > size || n >= max_segments || bytes + len > MAX_GSO_BYTES {
            break;
        }
        n += 1;
        bytes += len;
        if len < size {
            break;
        }
    }
    n
}

/// Sends `batch`, each run of datagrams to one peer of one size as one GSO send (built in `out`).
/// A run the kernel refuses is dropped (logged at debug), and the runs after it are still sent.
pub async fn send_runs(sock: &Sock, batch: &[(Packet, SocketAddr)], out: &mut Vec<u8>) {
    let shape: Vec<(usize, SocketAddr)> = batch.iter().map(|(p, a)| (p.len(), *a)).collect();
    let max = sock.state.max_gso_segments().max(1);
    let mut i = 0;
    while i < batch.len() {
        let n = run_length(&shape[i..], max).max(1);
        out.clear();
        for (p, _) in &batch[i..i + n] {
            out.extend_from_slice(p);
        }
        let transmit = Transmit {
            destination: shape[i].1,
            ecn: None,
            contents: out,
            segment_size: (n > 1).then_some(shape[i].0),
            src_ip: None,
        };
        if let Err(e) = send_one(sock, &transmit).await {
            tracing::debug!(error = %e, dropped = n, to = %shape[i].1, "sending WireGuard datagrams");
        }
        i += n;
    }
}

/// Whether a receive error means the socket is unusable (rather than one failed read).
fn socket_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENOTSOCK | libc::EINVAL)
    )
}

/// Sends one transmit, waiting while the socket buffer is full.
async fn send_one(sock: &Sock, transmit: &Transmit<'_>) -> io::Result<()> {
    loop {
        sock.io.writable().await?;
        match sock.io.try_io(Interest::WRITABLE, || {
            sock.state.try_send((&sock.io).into(), transmit)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Receives datagrams, one coalesced read at a time, and hands them out one by one.
pub struct GroRecv {
    sock: Arc<Sock>,
    /// [`RX_BATCH`] buffers of [`RX_BUF`] bytes in one allocation (large enough to be mapped on its
    /// own: its pages cost memory only once a read fills them).
    arena: Vec<u8>,
    meta: Vec<RecvMeta>,
    /// Datagrams read and not handed out yet: (start, end) in `arena`, and the source.
    pending: VecDeque<(usize, usize, SocketAddr)>,
}

impl std::fmt::Debug for GroRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroRecv")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl GroRecv {
    /// Receives on `sock`.
    pub fn new(sock: Arc<Sock>) -> Self {
        Self {
            sock,
            arena: vec![0; RX_BATCH * RX_BUF],
            meta: vec![RecvMeta::default(); RX_BATCH],
            pending: VecDeque::new(),
        }
    }

    /// Reads what the socket holds (up to `RX_BATCH` coalesced reads) into `pending`.
    ///
    /// # Errors
    /// When the socket is unusable (gone); other failed reads are one read lost.
    pub async fn fill(&mut self) -> io::Result<()> {
        let Self {
            sock, arena, meta, ..
        } = self;
        let n = loop {
            sock.io.readable().await?;
            let mut slices: Vec<IoSliceMut<'_>> =
                arena.chunks_mut(RX_BUF).map(IoSliceMut::new).collect();
            match sock.io.try_io(Interest::READABLE, || {
                sock.state.recv((&sock.io).into(), &mut slices, meta)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // gotatun stops receiving at the first error it is handed: only a socket that is
                // gone ends it; anything else (an ICMP error queued on the socket) is one read lost.
                Err(e) if socket_gone(&e) => return Err(e),
                Err(e) => tracing::debug!(error = %e, "receiving WireGuard datagrams"),
            }
        };
        for (i, m) in meta.iter().enumerate().take(n) {
            let base = i * RX_BUF;
            let stride = m.stride.max(1);
            let mut start = 0;
            while start < m.len.min(RX_BUF) {
                let end = (start + stride).min(m.len).min(RX_BUF);
                self.pending.push_back((base + start, base + end, m.addr));
                start = end;
            }
        }
        Ok(())
    }

    /// The next datagram read and not handed out yet, copied into a packet buffer of `pool`.
    pub fn next_pending(&mut self, pool: &Pool) -> Option<(Packet, SocketAddr)> {
        while let Some((start, end, from)) = self.pending.pop_front() {
            // A datagram larger than a buffer of the device's MTU is no WireGuard message of ours.
            if let Some(packet) = pool.copy_of(&self.arena[start..end]) {
                return Some((packet, from));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(pool: &Pool, bytes: &[u8]) -> Packet {
        pool.copy_of(bytes).expect("fits a buffer")
    }

    #[tokio::test]
    async fn a_send_that_fails_does_not_stop_the_ones_after_it() {
        let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let to = listener.local_addr().unwrap();
        let sock = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let pool = Pool::new(1420, 8);
        // An IPv4 socket cannot send to an IPv6 address: the kernel refuses that datagram.
        let refused: SocketAddr = "[::1]:9".parse().unwrap();
        let batch = vec![
            (packet(&pool, b"refused"), refused),
            (packet(&pool, b"delivered-1"), to),
            (packet(&pool, b"delivered-2"), to),
            (packet(&pool, b"short"), to),
        ];
        send_runs(&sock, &batch, &mut Vec::new()).await;
        let got = tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 64];
            (0..3)
                .map(|_| listener.recv(&mut buf).map(|n| buf[..n].to_vec()).unwrap())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        assert_eq!(
            got,
            [&b"delivered-1"[..], b"delivered-2", b"short"],
            "the runs after a refused one are sent, one datagram each"
        );
    }

    #[tokio::test]
    async fn a_gso_run_is_received_as_the_datagrams_it_was_made_of() {
        let rx = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = rx.io.local_addr().unwrap();
        let mut recv = GroRecv::new(rx);
        let tx = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let pool = Pool::new(1420, 64);
        let sent: Vec<Vec<u8>> = (0..20u8)
            .map(|i| vec![i; if i == 19 { 300 } else { 1200 }])
            .collect();
        let batch: Vec<(Packet, SocketAddr)> =
            sent.iter().map(|d| (packet(&pool, d), to)).collect();
        send_runs(&tx, &batch, &mut Vec::new()).await;
        let mut got = Vec::new();
        while got.len() < sent.len() {
            tokio::time::timeout(std::time::Duration::from_secs(10), recv.fill())
                .await
                .expect("the datagrams arrive on 127.0.0.1")
                .unwrap();
            while let Some((p, _)) = recv.next_pending(&pool) {
                got.push(p.to_vec());
            }
        }
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn a_jumbo_mtu_datagram_is_received_whole() {
        // MTU 8920 (a 9000-byte underlay): its largest datagram is 8920 + 8 of padding + 32.
        let rx = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = rx.io.local_addr().unwrap();
        let mut recv = GroRecv::new(rx);
        let pool = Pool::new(8920, 4);
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent: Vec<u8> = (0..8960u32).map(|i| (i % 251) as u8).collect();
        tx.send_to(&sent, to).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), recv.fill())
            .await
            .expect("the datagram arrives on 127.0.0.1")
            .unwrap();
        let got = recv.next_pending(&pool).map(|(p, _)| p.to_vec());
        assert_eq!(got.as_deref(), Some(&sent[..]));
    }

    #[test]
    fn runs_are_one_destination_and_one_size_with_a_shorter_last() {
        let a: SocketAddr = "10.0.0.1:51820".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:51820".parse().unwrap();
        assert_eq!(run_length(&[], 64), 0);
        // 1452-byte datagrams to a, the last shorter: one run; then b starts another.
        let mut batch = vec![(1452, a); 5];
        batch.push((600, a));
        batch.push((1452, a));
        assert_eq!(run_length(&batch, 64), 6, "a shorter datagram ends the run");
        assert_eq!(run_length(&[(1452, a), (1452, b)], 64), 1);
        assert_eq!(
            run_length(&[(600, a), (1452, a)], 64),
            1,
            "none longer than the first"
        );
        assert_eq!(
            run_length(&vec![(1452, a); 100], 10),
            10,
            "the kernel's segment limit"
        );
        let n = run_length(&vec![(1452, a); 100], 64);
        assert_eq!(n, MAX_GSO_BYTES / 1452, "the size limit of one send");
    }
}
