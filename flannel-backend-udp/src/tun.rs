//! The TUN device (`flannel0`), opened with `tun-rs`: persistent, so it and its route outlive a
//! flanneld restart and the next flanneld re-attaches to it; with offloads (virtio header, TSO/USO)
//! where the kernel has them.

use std::io;

use tun_rs::{DeviceBuilder, SyncDevice};

/// Opens (creating or re-attaching to) the TUN device `name`, non-blocking, and marks it persistent.
/// Offloads are asked for first; a kernel without them gets a plain device.
pub fn open(name: &str, mtu: u16) -> io::Result<SyncDevice> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload)
            .build_sync()
    };
    let dev = match build(true) {
        Ok(dev) => dev,
        Err(e) => {
            tracing::warn!(device = name, error = %e, "TUN offloads unavailable; one packet per read");
            build(false).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("creating TUN device {name}: {e} (is the tun module loaded? /dev/net/tun present?)"),
                )
            })?
        }
    };
    dev.set_nonblocking(true)?;
    dev.persist()
        .map_err(|e| io::Error::new(e.kind(), format!("making {name} persistent: {e}")))?;
    Ok(dev)
}
