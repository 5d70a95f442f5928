//! # flannel-backend-vxlan
//!
//! The vxlan backend (flannel.<VNI> devices, neighbour/FDB/route entries per peer, DirectRouting), per shared/spec/flannel-compat.md §5.1.
//!
//! **Not implemented yet**: this crate registers no backend, so a network config selecting it gets
//! flanneld's "unknown backend type" error listing the backends that are available. It exists so the
//! workspace layout and `flanneld`'s linking (`use flannel_backend_vxlan as _;`) are in place.
