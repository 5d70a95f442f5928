//! The I/O loop: two threads, one per direction, that wait with `poll` and then move packets in
//! batches (`sendmmsg` towards peers, `recvmmsg` from them) through preallocated buffers. The packet
//! decisions are made by the pure code in [`crate::packet`]; the forwarding table is read once per
//! batch.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use flannel_core::metrics::metrics;

use crate::packet::{Outcome, from_tun, from_udp};
use crate::table::Table;

/// Packets per batch.
pub const BATCH: usize = 64;

/// Waits up to 100 ms for `fd` to become readable; false on timeout or error.
fn wait_readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 100) > 0 }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One message header for `sendmmsg`/`recvmmsg`: one buffer, one IPv4 peer address. The pointers
/// must stay valid while the header is used.
fn mmsghdr(addr: &mut libc::sockaddr_in, iov: &mut libc::iovec) -> libc::mmsghdr {
    // SAFETY: an all-zero msghdr is valid; the fields that matter are set below.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = (addr as *mut libc::sockaddr_in).cast();
    h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    h.msg_iov = iov;
    h.msg_iovlen = 1;
    libc::mmsghdr {
        msg_hdr: h,
        msg_len: 0,
    }
}

fn write_tun(tun: RawFd, packet: &[u8]) {
    // SAFETY: writing a valid buffer to an open file descriptor.
    if unsafe { libc::write(tun, packet.as_ptr().cast(), packet.len()) } < 0 {
        flannel_core::metrics::inc(&metrics().udp_dropped);
    }
}

/// The shared state of both directions.
#[derive(Debug, Clone)]
pub struct Pump {
    /// The TUN descriptor (non-blocking).
    pub tun: RawFd,
    /// The UDP socket descriptor (non-blocking).
    pub sock: RawFd,
    /// The forwarding table.
    pub table: Arc<RwLock<Arc<Table>>>,
    /// The peers' UDP port.
    pub port: u16,
    /// The TUN address (source of ICMP replies).
    pub tun_addr: Ipv4Addr,
    /// Buffer size (TUN MTU plus headroom).
    pub buf_len: usize,
    /// Set to stop both threads.
    pub stop: Arc<AtomicBool>,
}

impl Pump {
    fn table(&self) -> Arc<Table> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// TUN → peers, until `stop`.
    pub fn tun_to_udp(&self) {
        let mut bufs = vec![vec![0u8; self.buf_len]; BATCH];
        let mut lens = [0usize; BATCH];
        let mut addrs = [sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH];
        let m = metrics();
        while !self.stop.load(Ordering::Relaxed) {
            if !wait_readable(self.tun) {
                continue;
            }
            let table = self.table();
            let mut k = 0;
            // Read what is queued, up to a batch, deciding as we go; `k` packets go out.
            for _ in 0..BATCH {
                let buf = &mut bufs[k];
                // SAFETY: reading into a buffer we own.
                let n = unsafe { libc::read(self.tun, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                let n = n as usize;
                match from_tun(&mut buf[..n], &table, self.port, self.tun_addr) {
                    Outcome::SendTo(peer) => {
                        lens[k] = n;
                        addrs[k] = sockaddr(peer);
                        k += 1;
                    }
                    Outcome::Reply(r) => write_tun(self.tun, &r),
                    Outcome::WriteTun => write_tun(self.tun, &buf[..n]),
                    Outcome::Drop(_) => flannel_core::metrics::inc(&m.udp_dropped),
                }
            }
            if k == 0 {
                continue;
            }
            let mut iovs: Vec<libc::iovec> = (0..k)
                .map(|i| libc::iovec {
                    iov_base: bufs[i].as_mut_ptr().cast(),
                    iov_len: lens[i],
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = (0..k)
                .map(|i| mmsghdr(&mut addrs[i], &mut iovs[i]))
                .collect();
            let mut sent = 0;
            while sent < k {
                // SAFETY: `msgs[sent..k]` point into live buffers, iovecs and addresses.
                let r = unsafe {
                    libc::sendmmsg(
                        self.sock,
                        msgs[sent..].as_mut_ptr(),
                        (k - sent) as libc::c_uint,
                        0,
                    )
                };
                if r <= 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        wait_writable(self.sock);
                        continue;
                    }
                    // Skip the datagram that failed (e.g. an unreachable peer) and go on.
                    flannel_core::metrics::inc(&m.udp_dropped);
                    sent += 1;
                    continue;
                }
                for msg in &msgs[sent..sent + r as usize] {
                    m.udp_tx_bytes
                        .fetch_add(u64::from(msg.msg_len), Ordering::Relaxed);
                }
                m.udp_tx_packets.fetch_add(r as u64, Ordering::Relaxed);
                sent += r as usize;
            }
        }
    }

    /// Peers → TUN, until `stop`.
    pub fn udp_to_tun(&self) {
        let mut bufs = vec![vec![0u8; self.buf_len]; BATCH];
        // SAFETY: all-zero sockaddr_in values are valid.
        let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|i| mmsghdr(&mut addrs[i], &mut iovs[i]))
            .collect();
        let m = metrics();
        while !self.stop.load(Ordering::Relaxed) {
            if !wait_readable(self.sock) {
                continue;
            }
            for msg in msgs.iter_mut() {
                msg.msg_hdr.msg_namelen =
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            // SAFETY: every mmsghdr points at a live buffer, iovec and address of ours.
            let r = unsafe {
                libc::recvmmsg(
                    self.sock,
                    msgs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r <= 0 {
                continue;
            }
            let table = self.table();
            for i in 0..r as usize {
                let n = msgs[i].msg_len as usize;
                let from = Ipv4Addr::from(u32::from_be(addrs[i].sin_addr.s_addr));
                let packet = &mut bufs[i][..n];
                match from_udp(packet, from, &table) {
                    Outcome::WriteTun => {
                        write_tun(self.tun, packet);
                        m.udp_rx_packets.fetch_add(1, Ordering::Relaxed);
                        m.udp_rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    _ => flannel_core::metrics::inc(&m.udp_dropped),
                }
            }
        }
    }
}

fn wait_writable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 100) };
}
