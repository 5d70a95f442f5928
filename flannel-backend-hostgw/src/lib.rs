//! # flannel-backend-hostgw
//!
//! The host-gw backend (a route per peer subnet via the peer's public IP), per shared/spec/flannel-compat.md §5.2.
//!
//! **Not implemented yet**: this crate registers no backend, so a network config selecting it gets
//! flanneld's "unknown backend type" error listing the backends that are available. It exists so the
//! workspace layout and `flanneld`'s linking (`use flannel_backend_hostgw as _;`) are in place.
