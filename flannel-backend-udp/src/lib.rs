//! # flannel-backend-udp
//!
//! The udp backend (userspace encapsulation over a TUN device, wire-compatible with Go flannel), per shared/spec/flannel-compat.md §5.3.
//!
//! **Not implemented yet**: this crate registers no backend, so a network config selecting it gets
//! flanneld's "unknown backend type" error listing the backends that are available. It exists so the
//! workspace layout and `flanneld`'s linking (`use flannel_backend_udp as _;`) are in place.
