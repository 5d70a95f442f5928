//! # flannel-backend-wireguard
//!
//! flannel's `wireguard` backend, compatible with upstream's (`pkg/backend/wireguard`): pods' traffic
//! between hosts goes encrypted through the WireGuard device `flannel-wg` (and `flannel-wg-v6` in
//! `Mode: separate` with IPv6). The devices are the kernel's WireGuard devices where the kernel has
//! them ([`kernel`], configured over generic netlink as upstream's are), and userspace WireGuard
//! over TUN ([`userspace`]: our device loop around gotatun's protocol) where it has not (or with [`USERSPACE_ENV`]`=1`), so the
//! backend works on any kernel with TUN; the wire protocol is the same, so hosts of both kinds and
//! upstream's nodes share one network.
//!
//! - [`WireguardOptions`]: `ListenPort`, `ListenPortV6`, `MTU`, `PSK`,
//!   `PersistentKeepaliveInterval`, `Mode`, with upstream's defaults.
//! - [`key::load_or_create`]: the node's key, `/run/flannel/wgkey` or `WIREGUARD_KEY_FILE` (0600),
//!   kept across restarts.
//! - The lease data upstream writes (`{"PublicKey":"…","Port":51820}`) and the peers as data:
//!   [`desired_peers`] turns the peers' leases into each device's peers, [`diff_peers`] into the
//!   changes a device needs. The shared reconcile driver runs it: the route into the network
//!   through the device is a kernel entry like any other backend's, and the peers are applied after
//!   each pass (`Model::finish`, which compares them with the device's peers first: a kernel
//!   device's read back, so a peer removed behind flanneld's back comes back, a userspace device's
//!   in place, [`peers::diff_peers_by`]); a deleted device is recreated with its peers.
//! - [`kernel`]: the kernel device's netlink messages, built and read as plain functions
//!   ([`kernel::set_device_messages`], [`kernel::device_of`], which never panics on odd bytes).
//! - [`userspace`]: one loop per device (on its own thread) running batches through gotatun's protocol state machine
//!   (`noise::Tunn`), between our TUN side ([`tun`]: a persistent device, so while flanneld is
//!   down pods' packets are dropped there, not sent in clear; offloads, batched writes with TCP segments
//!   merged) and UDP side ([`udp`]: GSO sends, GRO receives), in buffers sized by the MTU
//!   ([`pool`]); [`userspace::Routes`] is the cryptokey routing; [`userspace::measure_datapath`]
//!   times the device's own side of the data path (the `bench-wireguard-cpu` benchmark);
//!   [`uapi`] answers `wg show` for it on WireGuard's userspace control socket.
//!
//! ```
//! use flannel_backend_wireguard::{WireguardOptions, Mode};
//! let o = WireguardOptions::parse(&serde_json::json!({"Type": "wireguard", "Mode": "auto"})).unwrap();
//! assert_eq!((o.listen_port, o.mode), (51820, Mode::Auto));
//! assert_eq!(o.device_mtu(1500).unwrap(), 1420);
//! ```

mod backend;
pub mod kernel;
pub mod key;
pub mod options;
pub mod peers;
pub mod pool;
pub mod tun;
pub mod uapi;
pub mod udp;
pub mod userspace;

pub use backend::{USERSPACE_ENV, WireguardBackend};
pub use key::{Key, PrivateKey};
pub use options::{DEVICE, DEVICE_V6, Mode, OVERHEAD, WireguardOptions};
pub use peers::{
    DesiredPeers, PeerContext, PeerData, PeerOp, PeerSpec, desired_peers, diff_peers, lease_attrs,
};
