//! The TUN device (`flannel0`), opened with `tun-rs`: persistent, so it and its route outlive a
//! flanneld restart and the next flanneld re-attaches to it; with offloads (virtio header, TSO/USO)
//! where the kernel has them.
//!
//! Restarts under systemd lose no packets: `flannel0` is a multi-queue device, and besides the queue
//! flanneld reads it keeps a second, detached one, the *parking queue*, in systemd's file-descriptor
//! store. When flanneld stops, it attaches the parking queue before it closes its own, so packets
//! from the pods queue there (up to the device's `txqueuelen`) instead of being dropped while no
//! flanneld runs. The next flanneld gets the parking queue back from systemd, forwards what queued
//! there ([`Park::drain`]) and detaches it again. A `flannel0` made single-queue (by an older
//! flanneld, Go's, or `ip tuntap`) is used as it is, without a parking queue.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use flannel_dataplane::systemd;
use tun_rs::{DeviceBuilder, SyncDevice, VIRTIO_NET_HDR_LEN, VirtioNetHdr};

/// The name of the parking queue in systemd's file-descriptor store.
pub const PARK_NAME: &str = "flannel0-park";

/// `flannel0`: the queue flanneld reads, and the parking queue when there is one.
pub struct Tun {
    /// The queue the forwarding threads read and write.
    pub dev: SyncDevice,
    /// The spare queue that holds packets while flanneld restarts under systemd.
    pub park: Option<Park>,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("fd", &self.dev.as_raw_fd())
            .field("park", &self.park)
            .finish()
    }
}

/// Opens (creating or re-attaching to) the TUN device `name`, non-blocking, and marks it persistent.
/// Offloads are asked for first; a kernel without them gets a plain device. Under systemd it also
/// sets up the parking queue (taking the previous flanneld's from systemd when there is one).
pub fn open(name: &str, mtu: u16) -> io::Result<Tun> {
    let build = |offload: bool, multi_queue: bool| {
        DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload)
            .multi_queue(multi_queue)
            .build_sync()
    };
    let inherited = systemd::take_stored_fd(PARK_NAME);
    let (dev, multi_queue) = match build(true, true) {
        Ok(dev) => (dev, true),
        // An existing single-queue flannel0 refuses a multi-queue attach (EINVAL).
        Err(_) => match build(true, false) {
            Ok(dev) => (dev, false),
            Err(e) => {
                tracing::warn!(device = name, error = %e, "TUN offloads unavailable; one packet per read");
                let dev = build(false, true).or_else(|_| build(false, false)).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("creating TUN device {name}: {e} (is the tun module loaded? /dev/net/tun present?)"),
                    )
                })?;
                let mq = flags(dev.as_fd()).is_ok_and(|f| f & libc::IFF_MULTI_QUEUE as i16 != 0);
                (dev, mq)
            }
        },
    };
    dev.set_nonblocking(true)?;
    dev.persist()
        .map_err(|e| io::Error::new(e.kind(), format!("making {name} persistent: {e}")))?;
    let park = if multi_queue && systemd::manager_present() {
        match Park::set_up(name, dev.as_fd(), inherited) {
            Ok(park) => Some(park),
            Err(e) => {
                tracing::warn!(device = name, error = %e, "no parking queue: restarts drop the packets sent meanwhile");
                None
            }
        }
    } else {
        if inherited.is_some() {
            let _ = systemd::remove_stored_fd(PARK_NAME);
        }
        if !multi_queue && systemd::manager_present() {
            tracing::info!(
                device = name,
                "single-queue TUN device (made by another program): no parking queue, so restarts drop the packets sent meanwhile; delete it to have it recreated"
            );
        }
        None
    };
    Ok(Tun { dev, park })
}

/// The TUN flags of the queue `fd` (`TUNGETIFF`), and its device name.
fn get_iff(fd: BorrowedFd<'_>) -> io::Result<(i16, String)> {
    // SAFETY: ifreq is plain data; TUNGETIFF fills it for a TUN descriptor and fails otherwise.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF set the flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok((flags, String::from_utf8_lossy(&name).into_owned()))
}

fn flags(fd: BorrowedFd<'_>) -> io::Result<i16> {
    get_iff(fd).map(|(f, _)| f)
}

/// A second queue of a multi-queue TUN device, normally detached (it gets no packets).
#[derive(Debug)]
pub struct Park {
    fd: OwnedFd,
    /// Whether it came from the previous flanneld (so packets may be queued in it).
    inherited: bool,
}

impl Park {
    /// Takes `inherited` when it is a queue of `name`, else opens a new queue with `main`'s flags;
    /// stores it with systemd. An inherited queue stays attached until [`Park::drain`] has run.
    fn set_up(name: &str, main: BorrowedFd<'_>, inherited: Option<OwnedFd>) -> io::Result<Park> {
        let inherited = inherited.filter(|fd| match get_iff(fd.as_fd()) {
            Ok((_, n)) if n == name => true,
            other => {
                tracing::warn!(?other, "the stored parking queue is not {name}'s; dropped");
                false
            }
        });
        let park = match inherited {
            Some(fd) => Park {
                fd,
                inherited: true,
            },
            None => {
                let park = Park {
                    fd: open_queue(name, flags(main)?)?,
                    inherited: false,
                };
                park.set_attached(false)?;
                park
            }
        };
        systemd::store_fd(PARK_NAME, park.fd.as_fd())?;
        Ok(park)
    }

    /// Whether it came from the previous flanneld.
    pub fn inherited(&self) -> bool {
        self.inherited
    }

    /// Attaches (`true`) or detaches the queue (`TUNSETQUEUE`). Detaching drops what it holds.
    pub fn set_attached(&self, attached: bool) -> io::Result<()> {
        set_queue(self.fd.as_fd(), attached)
    }

    /// Hands the traffic over to the parking queue when flanneld stops: attaches it, then detaches
    /// `main` (the queue being read), so from here on packets queue in the parking queue, which
    /// systemd keeps for the next flanneld. Only what `main` holds unread at that instant is lost.
    pub fn take_over_from(&self, main: BorrowedFd<'_>) -> io::Result<()> {
        self.set_attached(true)?;
        set_queue(main, false)
    }

    /// Reads every packet queued in the parking queue and gives each IP packet to `forward`, then
    /// detaches the queue. Returns (packets forwarded, packets dropped). Segmentation-offload
    /// packets (large TCP/UDP bursts) are dropped: their senders resend them.
    pub fn drain(&self, buf: &mut [u8], mut forward: impl FnMut(&mut [u8])) -> (usize, usize) {
        let (mut forwarded, mut dropped) = (0, 0);
        // Bounded: at most a full queue (txqueuelen, 500 by default) and then some.
        for _ in 0..4096 {
            let n = match nix::unistd::read(&self.fd, buf) {
                Ok(n) => n,
                Err(_) => break,
            };
            match packet_of(&mut buf[..n]) {
                Some(p) => {
                    forward(p);
                    forwarded += 1;
                }
                None => dropped += 1,
            }
        }
        if let Err(e) = self.set_attached(false) {
            tracing::warn!(error = %e, "detaching the parking queue");
        }
        (forwarded, dropped)
    }
}

/// The IP packet in a read from a queue with a virtio header, its checksum completed; `None` for a
/// segmentation-offload packet or a malformed read.
pub fn packet_of(read: &mut [u8]) -> Option<&mut [u8]> {
    if read.len() <= VIRTIO_NET_HDR_LEN {
        return None;
    }
    let hdr = VirtioNetHdr::decode(&read[..VIRTIO_NET_HDR_LEN]).ok()?;
    let packet = &mut read[VIRTIO_NET_HDR_LEN..];
    if hdr.gso_type != 0 {
        return None;
    }
    if hdr.flags & 1 != 0 {
        // VIRTIO_NET_HDR_F_NEEDS_CSUM: the field holds the pseudo-header sum; finish it.
        let start = usize::from(hdr.csum_start);
        let at = start.checked_add(usize::from(hdr.csum_offset))?;
        if at.checked_add(2)? > packet.len() {
            return None;
        }
        let initial = u16::from_be_bytes([packet[at], packet[at + 1]]);
        packet[at] = 0;
        packet[at + 1] = 0;
        let sum = tun_rs::checksum(&packet[start..], u64::from(initial));
        packet[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
    }
    Some(packet)
}

/// Attaches (`true`) or detaches the queue `fd` of a multi-queue TUN device (`TUNSETQUEUE`).
fn set_queue(fd: BorrowedFd<'_>, attached: bool) -> io::Result<()> {
    // SAFETY: ifreq is plain data; TUNSETQUEUE reads only its flags.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_ifru.ifru_flags = if attached {
        libc::IFF_ATTACH_QUEUE
    } else {
        libc::IFF_DETACH_QUEUE
    } as i16;
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETQUEUE, &req) } < 0 {
        let e = io::Error::last_os_error();
        // Already in the wanted state.
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Opens another queue of the multi-queue TUN device `name` with the same `flags`, non-blocking.
fn open_queue(name: &str, flags: i16) -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; the name fits (IFNAMSIZ checked) and is NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let keep =
        (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE | libc::IFF_VNET_HDR) as i16;
    req.ifr_ifru.ifru_flags = flags & keep;
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: into_raw_fd hands over the open descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(file)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_of(hdr: VirtioNetHdr, packet: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; VIRTIO_NET_HDR_LEN];
        hdr.encode(&mut v).unwrap();
        v.extend_from_slice(packet);
        v
    }

    /// An IPv4 UDP packet 10.5.1.2:1000 -> 10.5.2.2:2000 with payload `data` and checksum `csum`.
    fn udp_packet(data: &[u8], csum: u16) -> Vec<u8> {
        let total = 28 + data.len();
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
            10,
            5,
            1,
            2,
            10,
            5,
            2,
            2,
        ];
        let ulen = 8 + data.len();
        p.extend_from_slice(&[0x03, 0xe8, 0x07, 0xd0, (ulen >> 8) as u8, ulen as u8]);
        p.extend_from_slice(&csum.to_be_bytes());
        p.extend_from_slice(data);
        p
    }

    #[test]
    fn a_plain_read_is_its_packet() {
        let p = udp_packet(b"hi", 0x1234);
        let mut read = read_of(VirtioNetHdr::default(), &p);
        assert_eq!(packet_of(&mut read).unwrap(), &p[..]);
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        // The full checksum, as a receiver verifies it.
        let data = b"hello";
        let full = {
            let p = udp_packet(data, 0);
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&p[12..20]);
            pseudo.extend_from_slice(&[0, 17, 0, (8 + data.len()) as u8]);
            pseudo.extend_from_slice(&p[20..]);
            !tun_rs::checksum(&pseudo, 0)
        };
        // What the kernel hands over with NEEDS_CSUM: the pseudo-header sum in the field.
        let pseudo_sum = {
            let p = udp_packet(data, 0);
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&p[12..20]);
            pseudo.extend_from_slice(&[0, 17, 0, (8 + data.len()) as u8]);
            tun_rs::checksum(&pseudo, 0)
        };
        let hdr = VirtioNetHdr {
            flags: 1,
            csum_start: 20,
            csum_offset: 6,
            ..Default::default()
        };
        let mut read = read_of(hdr, &udp_packet(data, pseudo_sum));
        let p = packet_of(&mut read).unwrap();
        assert_eq!(u16::from_be_bytes([p[26], p[27]]), full);
    }

    #[test]
    fn offload_bursts_and_malformed_reads_are_refused() {
        let p = udp_packet(b"x", 0);
        let gso = VirtioNetHdr {
            gso_type: 1,
            gso_size: 1400,
            ..Default::default()
        };
        assert!(packet_of(&mut read_of(gso, &p)).is_none());
        assert!(packet_of(&mut [0u8; 4]).is_none());
        let out_of_range = VirtioNetHdr {
            flags: 1,
            csum_start: 60_000,
            csum_offset: 6,
            ..Default::default()
        };
        assert!(packet_of(&mut read_of(out_of_range, &p)).is_none());
    }
}
