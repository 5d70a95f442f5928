//! The TUN side of a userspace WireGuard device, with the kernel's offloads as the udp backend's
//! `flannel0` has them (tun-rs, `IFF_VNET_HDR`): one read takes up to 64 KiB of a TCP stream the
//! kernel did not cut into packets, split here into packets of the device's MTU for encryption;
//! decrypted packets are written in batches, the TCP segments of one flow merged into one write (so
//! the receiving pod's stack handles a few large segments instead of many small ones). A kernel
//! without TUN offloads gets a plain device: one packet per read and write.
//!
//! The device is persistent, as the udp backend's `flannel0`: it and the route into the network
//! stay while flanneld is down (a restart, an upgrade), so the pods' packets for other hosts are
//! dropped there instead of leaving by the host's default route unencrypted, and the next
//! flanneld re-attaches to it. A device loop that ends for another reason than a stop lets its
//! device go ([`release`]), so that the link's deletion tells the backend to make a new one.

use std::future::Future;
use std::io;

use gotatun::packet::Packet;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::pool::Pool;

/// Packets written per batch: their buffers grow to 64 KiB where segments merge into them.
pub const WRITE_BATCH: usize = 64;

/// Opens the TUN device `name` (offloads where the kernel has them) with `mtu`, making it, or
/// re-attaching to the one the last flanneld left, and marks it persistent.
///
/// # Errors
/// When the device cannot be made (no `/dev/net/tun`, no `CAP_NET_ADMIN`, a link of that name
/// that is not a TUN device).
pub fn open(name: &str, mtu: u16) -> io::Result<AsyncDevice> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload)
            .build_async()
    };
    let dev = match build(true) {
        Ok(d) => d,
        Err(first) => match build(false) {
            Ok(d) => {
                tracing::warn!(device = name, error = %first, "TUN offloads unavailable; one packet per read");
                d
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "opening TUN device {name}: {e} (is /dev/net/tun there and the tun module \
                         loaded? does flanneld have CAP_NET_ADMIN?)"
                    ),
                ));
            }
        },
    };
    dev.persist()
        .map_err(|e| io::Error::new(e.kind(), format!("making {name} persistent: {e}")))?;
    Ok(dev)
}

/// Lets the device go with its last descriptor (clears the persistence [`open`] set), for a
/// device loop that ends without being stopped: the link's deletion then tells the backend.
pub fn release(dev: &AsyncDevice) {
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETPERSIST takes its argument by value (0 clears the flag) and touches no memory
    // of ours; on a descriptor whose device is already gone it fails, which is fine.
    let _ = unsafe { libc::ioctl(dev.as_raw_fd(), libc::TUNSETPERSIST, 0) };
}

/// Reads batches of packets from the TUN device straight into packet buffers of a pool (the
/// buffers encryption starts from: no copy between the read and the cipher).
pub struct TunReader {
    raw: Vec<u8>,
    pool: Pool,
    slots: Vec<Slot>,
    sizes: Vec<usize>,
    /// Packets of the last read.
    count: usize,
}

/// A pool buffer lent to the TUN read (tun-rs writes into `AsMut<[u8]>` buffers).
struct Slot(Packet);

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for Slot {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl std::fmt::Debug for TunReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunReader")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

/// Whether a read error means the device is gone (then reading stops), rather than one packet that
/// could not be read.
pub fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::ENODEV | libc::EBADF | libc::ENXIO)
    )
}

impl TunReader {
    /// Reads into buffers of `pool` (made for the device's MTU).
    pub fn new(pool: Pool) -> Self {
        Self {
            raw: vec![0; VIRTIO_NET_HDR_LEN + 65_535],
            slots: (0..IDEAL_BATCH_SIZE).map(|_| Slot(pool.get())).collect(),
            pool,
            sizes: vec![0; IDEAL_BATCH_SIZE],
            count: 0,
        }
    }

    /// Waits for and reads one batch. Cancel-safe: nothing is read until the device is readable.
    ///
    /// # Errors
    /// What the read returned; [`device_gone`] tells whether to go on.
    pub async fn read(&mut self, dev: &AsyncDevice) -> io::Result<()> {
        self.count = 0;
        self.count = dev
            .recv_multiple(&mut self.raw, &mut self.slots, &mut self.sizes, 0)
            .await?;
        Ok(())
    }

    /// Reads one batch if the device has one now, without waiting: `None` when it has none (or
    /// the read failed: the next [`read`](Self::read) reports that).
    pub fn read_ready(&mut self, dev: &AsyncDevice) -> Option<()> {
        let read = std::pin::pin!(self.read(dev));
        match read.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(Ok(())) => Some(()),
            _ => None,
        }
    }

    /// The packets of the last read, each in its own buffer (its slot gets a fresh one).
    pub fn packets(&mut self) -> impl Iterator<Item = Packet> + '_ {
        let Self {
            pool,
            slots,
            sizes,
            count,
            ..
        } = self;
        let n = std::mem::take(count);
        slots
            .iter_mut()
            .zip(sizes.iter())
            .take(n)
            .map(|(slot, &size)| {
                let mut packet = std::mem::replace(&mut slot.0, pool.get());
                packet.truncate(size);
                packet
            })
    }
}

/// Writes decrypted packets in batches, merging the TCP segments of one flow.
pub struct TunWriter {
    bufs: Vec<Vec<u8>>,
    gro: GROTable,
}

impl std::fmt::Debug for TunWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunWriter").finish_non_exhaustive()
    }
}

impl Default for TunWriter {
    fn default() -> Self {
        Self {
            bufs: (0..WRITE_BATCH)
                .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65_535))
                .collect(),
            gro: GROTable::default(),
        }
    }
}

impl TunWriter {
    /// Writes `packets`, [`WRITE_BATCH`] at a time. A batch the device refuses is dropped (logged
    /// at debug), as a network drops packets.
    pub async fn write<P: std::ops::Deref<Target = [u8]>>(
        &mut self,
        dev: &AsyncDevice,
        packets: &[P],
    ) {
        for chunk in packets.chunks(WRITE_BATCH) {
            for (buf, packet) in self.bufs.iter_mut().zip(chunk) {
                buf.clear();
                buf.resize(VIRTIO_NET_HDR_LEN, 0);
                buf.extend_from_slice(packet);
            }
            if let Err(e) = dev
                .send_multiple(
                    &mut self.gro,
                    &mut self.bufs[..chunk.len()],
                    VIRTIO_NET_HDR_LEN,
                )
                .await
            {
                tracing::debug!(error = %e, "writing decrypted packets to the TUN device");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_that_cannot_be_opened_is_named_with_what_to_check() {
        // Longer than a link name may be (15 bytes): refused with or without root, and nothing
        // is made anywhere.
        let Err(e) = open("fltwg-name-too-long-for-a-link", 1420) else {
            panic!("a link name of 30 bytes was taken");
        };
        let text = e.to_string();
        assert!(
            text.contains("opening TUN device fltwg-name-too-long-for-a-link")
                && text.contains("/dev/net/tun"),
            "{text}"
        );
    }
}
