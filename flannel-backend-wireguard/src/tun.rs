//! The TUN side of a userspace WireGuard device, with the kernel's offloads as the udp backend's
//! `flannel0` has them (tun-rs, `IFF_VNET_HDR`): one read takes up to 64 KiB of a TCP stream the
//! kernel did not cut into packets, split here into packets of the device's MTU for gotatun to
//! encrypt; the packets gotatun decrypts are queued and written in batches, the TCP segments of one
//! flow merged into one write (so the receiving pod's stack handles a few large segments instead of
//! many small ones). A kernel without TUN offloads gets a plain device: one packet per read and
//! write.

use std::io;
use std::sync::Arc;

use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Decrypted packets waiting to be written (a bound on what a burst may hold).
const QUEUE: usize = 1024;
/// Packets written per batch: their buffers grow to 64 KiB where segments merge into them.
const WRITE_BATCH: usize = 64;

/// Reads packets from the TUN device (for gotatun to encrypt and send).
pub struct TunReader {
    dev: Arc<AsyncDevice>,
    mtu: u16,
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl std::fmt::Debug for TunReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunReader")
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

/// Queues decrypted packets for the writer task (which ends when every `TunWriter` is dropped).
#[derive(Clone, Debug)]
pub struct TunWriter {
    tx: mpsc::Sender<Packet<Ip>>,
}

/// Opens the TUN device `name` (offloads where the kernel has them) with `mtu`, and starts the
/// task that writes decrypted packets to it.
///
/// # Errors
/// When the device cannot be made (no `/dev/net/tun`, no `CAP_NET_ADMIN`).
pub fn open(name: &str, mtu: u16) -> io::Result<(TunWriter, TunReader)> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload)
            .build_async()
    };
    let dev = match build(true) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(device = name, error = %e, "TUN offloads unavailable; one packet per read");
            build(false)?
        }
    };
    let dev = Arc::new(dev);
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(write_batches(dev.clone(), rx));
    let reader = TunReader {
        dev,
        mtu,
        raw: vec![0; VIRTIO_NET_HDR_LEN + 65_535],
        bufs: vec![vec![0; usize::from(mtu)]; IDEAL_BATCH_SIZE],
        sizes: vec![0; IDEAL_BATCH_SIZE],
    };
    Ok((TunWriter { tx }, reader))
}

/// Writes what the queue holds each time it runs: on flanneld's one runtime thread that is every
/// packet gotatun decrypted from one batch of datagrams.
async fn write_batches(dev: Arc<AsyncDevice>, mut rx: mpsc::Receiver<Packet<Ip>>) {
    let mut batch: Vec<Packet<Ip>> = Vec::with_capacity(WRITE_BATCH);
    let mut bufs: Vec<Vec<u8>> = (0..WRITE_BATCH)
        .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65_535))
        .collect();
    let mut gro = GROTable::default();
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let n = batch.len();
        for (buf, packet) in bufs.iter_mut().zip(batch.drain(..)) {
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(&packet.into_bytes());
        }
        if let Err(e) = dev
            .send_multiple(&mut gro, &mut bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            tracing::debug!(error = %e, "writing decrypted packets to the TUN device");
        }
    }
}

impl IpSend for TunWriter {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.tx
            .send(packet)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the TUN writer stopped"))
    }
}

/// Whether a read error means the device is gone (then gotatun stops reading), rather than one
/// packet that could not be read.
fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::ENODEV | libc::EBADF | libc::ENXIO)
    )
}

impl IpRecv for TunReader {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        loop {
            let n = match self
                .dev
                .recv_multiple(&mut self.raw, &mut self.bufs, &mut self.sizes, 0)
                .await
            {
                Ok(n) => n,
                Err(e) if device_gone(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "skipping an unreadable read from the TUN device");
                    continue;
                }
            };
            let mut out = Vec::with_capacity(n);
            for (buf, &len) in self.bufs.iter().zip(&self.sizes).take(n) {
                let mut packet = pool.get();
                let Some(dst) = packet.get_mut(..len) else {
                    continue;
                };
                dst.copy_from_slice(&buf[..len]);
                packet.truncate(len);
                if let Ok(p) = packet.try_into_ip() {
                    out.push(p);
                }
            }
            if !out.is_empty() {
                return Ok(out.into_iter());
            }
        }
    }

    fn mtu(&self) -> MtuWatcher {
        MtuWatcher::new(self.mtu)
    }
}
