//! # flannel-backend-wireguard
//!
//! The parts of flannel's `wireguard` backend that do not touch a device, compatible with upstream's
//! (`pkg/backend/wireguard`): the options ([`WireguardOptions`]: `ListenPort`, `ListenPortV6`, `MTU`,
//! `PSK`, `PersistentKeepaliveInterval`, `Mode`), the node's key ([`key::load_or_create`]:
//! `/run/flannel/wgkey` or `WIREGUARD_KEY_FILE`, kept across restarts), the lease data
//! (`{"PublicKey":"…","Port":51820}`), and the peers as data: [`desired_peers`] turns the peers'
//! leases into the peers each device should have, [`diff_peers`] into the changes a device needs.
//!
//! Not yet here: the devices themselves (kernel WireGuard over netlink where the kernel has it, a
//! userspace implementation over TUN elsewhere), so this crate does not register the `wireguard`
//! backend yet and `flanneld` refuses `"Type": "wireguard"` as an unknown backend.
//!
//! ```
//! use flannel_backend_wireguard::{WireguardOptions, Mode};
//! let o = WireguardOptions::parse(&serde_json::json!({"Type": "wireguard", "Mode": "auto"})).unwrap();
//! assert_eq!((o.listen_port, o.mode), (51820, Mode::Auto));
//! assert_eq!(o.device_mtu(1500).unwrap(), 1420);
//! ```

pub mod key;
pub mod options;
pub mod peers;

pub use key::{Key, PrivateKey};
pub use options::{DEVICE, DEVICE_V6, Mode, OVERHEAD, WireguardOptions};
pub use peers::{
    DesiredPeers, PeerContext, PeerData, PeerOp, PeerSpec, desired_peers, diff_peers, lease_attrs,
};
