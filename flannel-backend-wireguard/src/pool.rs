//! Packet buffers for a userspace device, sized by its MTU: a packet read from the TUN device is
//! encrypted from the buffer it was read into, and a datagram is decrypted in the buffer it was
//! received into, so a buffer must hold the largest datagram of the device's MTU (the packet padded
//! to 16 bytes, plus WireGuard's 32 bytes of header and tag). gotatun's pools have their buffer
//! size as a type parameter; this picks the smallest of three that fits.

use gotatun::packet::{Packet, PacketBufPool};

/// WireGuard's data message overhead: 16 bytes of header, 16 of tag.
const OVERHEAD: usize = 32;
/// Buffers of a standard MTU (up to 4064), jumbo frames (up to 9184), and any MTU at all.
const SMALL: usize = 4096;
const JUMBO: usize = 9216;
const ANY: usize = (u16::MAX as usize + 1) + OVERHEAD;

/// A pool of packet buffers large enough for one MTU.
#[derive(Clone)]
pub enum Pool {
    /// MTU up to 4064.
    Small(PacketBufPool<SMALL>),
    /// MTU up to 9184.
    Jumbo(PacketBufPool<JUMBO>),
    /// Any MTU.
    Any(PacketBufPool<ANY>),
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} bytes per buffer)", self.buffer_len())
    }
}

impl Pool {
    /// A pool keeping up to `capacity` buffers for packets of up to `mtu` bytes.
    pub fn new(mtu: u16, capacity: usize) -> Self {
        let need = usize::from(mtu).next_multiple_of(16) + OVERHEAD;
        if need <= SMALL {
            Self::Small(PacketBufPool::new(capacity))
        } else if need <= JUMBO {
            Self::Jumbo(PacketBufPool::new(capacity))
        } else {
            Self::Any(PacketBufPool::new(capacity))
        }
    }

    /// A buffer (of [`Pool::buffer_len`] bytes; truncate it to what it holds).
    pub fn get(&self) -> Packet {
        match self {
            Self::Small(p) => p.get(),
            Self::Jumbo(p) => p.get(),
            Self::Any(p) => p.get(),
        }
    }

    /// A buffer holding a copy of `bytes`, or `None` when they are larger than a buffer.
    pub fn copy_of(&self, bytes: &[u8]) -> Option<Packet> {
        let mut packet = self.get();
        packet.get_mut(..bytes.len())?.copy_from_slice(bytes);
        packet.truncate(bytes.len());
        Some(packet)
    }

    /// The size of each buffer.
    pub fn buffer_len(&self) -> usize {
        match self {
            Self::Small(_) => SMALL,
            Self::Jumbo(_) => JUMBO,
            Self::Any(_) => ANY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_holds_the_largest_datagram_of_the_mtu() {
        for mtu in [576u16, 1280, 1420, 4064, 4065, 8920, 9184, 9185, 65_535] {
            let pool = Pool::new(mtu, 2);
            let largest = usize::from(mtu).next_multiple_of(16) + OVERHEAD;
            assert!(pool.buffer_len() >= largest, "MTU {mtu}: {pool:?}");
            assert_eq!(pool.get().len(), pool.buffer_len());
        }
        assert_eq!(
            Pool::new(1420, 2).buffer_len(),
            SMALL,
            "no waste at the usual MTU"
        );
        assert_eq!(Pool::new(8920, 2).buffer_len(), JUMBO);
        let pool = Pool::new(1420, 2);
        assert_eq!(pool.copy_of(b"abc").as_deref(), Some(&b"abc"[..]));
        assert!(pool.copy_of(&[0; SMALL + 1]).is_none());
    }
}
