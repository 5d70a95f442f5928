//! # flannel-dataplane
//!
//! The kernel side shared by the kernel backends (vxlan, host-gw, ipip, udp's route, wireguard's
//! peers): desired state as plain data, a pure diff against the actual state, one narrow kernel
//! seam, one reconcile driver, the [`LeasePolicy`] that keeps hostile leases out, and reading the
//! host's interfaces ([`host`]).
//! `flannel-core` holds the contracts only; a backend that programs the kernel depends on this crate
//! too, one that does not (like `alloc`) on core alone.
//!
//! A backend describes what the kernel should hold for the current leases as a [`KernelState`] (routes,
//! neighbours, FDB entries) plus an [`Ownership`] saying which existing entries are flannel's. [`diff`]
//! turns desired and actual state into [`Op`]s; [`KernelOps`] reads and applies them (over netlink in
//! [`netlink::Netlink`], in memory in `FakeKernel` with the `test-util` feature); [`driver::run`] repeats this on every lease
//! event, on kernel notifications that are news ([`changes::needs_read`]) and periodically, so
//! deleted or changed entries come back and stale ones go away, without ever touching entries that
//! are not flannel's. Between full reads it diffs against what it knows ([`apply_diff`] keeps that
//! record, with up to [`APPLY_IN_FLIGHT`] requests in flight), so a lease change costs its own
//! entries, not a dump of the kernel's tables. Routes with a gateway go through next-hop objects
//! ([`nexthop`]), which the kernel installs in constant time instead of comparing each new route
//! with every other on the device. Tables are read through [`dump`], one receive buffer however
//! large they are, and after a large pass [`memory::release_freed`] hands the freed heap back.
//! [`systemd`] is the service manager's side of a restart.
//!
//! ```
//! use flannel_dataplane::{diff, KernelState, Op, Ownership, Route};
//! let route = Route { dst: "10.5.2.0/24".parse().unwrap(), gateway: Some("192.168.0.2".parse().unwrap()), oif: 2, onlink: false };
//! let mut desired = KernelState::default();
//! desired.routes.insert(route.clone());
//! let own = Ownership { networks: vec!["10.5.0.0/16".parse().unwrap()], gateway_route_oifs: vec![2], ..Default::default() };
//! assert_eq!(diff(&desired, &KernelState::default(), &own), vec![Op::AddRoute(route)]);
//! ```

pub mod changes;
pub mod driver;
pub mod dump;
pub mod host;
pub mod lease_policy;
pub mod memory;
pub mod metrics;
pub mod netlink;
pub mod nexthop;
pub mod systemd;

pub use lease_policy::LeasePolicy;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use async_trait::async_trait;
use ipnet::IpNet;

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

// The orders of the kernel entries below are those `derive` would give (field by field, addresses
// byte by byte), computed on integers: the derived order compares addresses as byte slices, a
// `memcmp` call per comparison, which was a tenth of a 20,000-peer pass (perf).

/// An address as an integer with the order of its bytes, IPv4 before IPv6.
fn ip_key(ip: &IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(*a))),
        IpAddr::V6(a) => (true, u128::from(*a)),
    }
}

/// A network as integers with the derived order of [`IpNet`] (family, address, prefix length).
fn net_key(n: &IpNet) -> (bool, u128, u8) {
    let (v6, addr) = ip_key(&n.addr());
    (v6, addr, n.prefix_len())
}

impl MacAddr {
    fn key(&self) -> u64 {
        let [a, b, c, d, e, f] = self.0;
        u64::from_be_bytes([0, 0, a, b, c, d, e, f])
    }
}

impl Ord for MacAddr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for MacAddr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl MacAddr {
    /// A random locally administered unicast address (first byte: bit 0 clear, bit 1 set), as Go
    /// flannel generates for `flannel.<VNI>`.
    pub fn random_local() -> Self {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        Self(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Text that is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(BadMac(s.to_string()));
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(BadMac(s.to_string()));
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.to_string()))?;
        }
        Ok(Self(b))
    }
}

impl TryFrom<&[u8]> for MacAddr {
    type Error = BadMac;
    fn try_from(v: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 6]>::try_from(v)
            .map(Self)
            .map_err(|_| BadMac(format!("{v:?}")))
    }
}

/// A route in the main table (`ip route replace <dst> [via <gateway>] dev <oif> [onlink]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// Destination subnet.
    pub dst: IpNet,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: u32,
    /// Whether the next hop is declared on-link (`RTNH_F_ONLINK`).
    pub onlink: bool,
}

impl Ord for Route {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        net_key(&self.dst)
            .cmp(&net_key(&o.dst))
            .then_with(|| {
                self.gateway
                    .as_ref()
                    .map(ip_key)
                    .cmp(&o.gateway.as_ref().map(ip_key))
            })
            .then_with(|| (self.oif, self.onlink).cmp(&(o.oif, o.onlink)))
    }
}

impl PartialOrd for Route {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        write!(f, " dev #{}", self.oif)?;
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}

/// A permanent neighbour entry (`ip neigh replace <ip> lladdr <mac> dev <ifindex> nud permanent`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Neigh {
    /// Device index.
    pub ifindex: u32,
    /// The IP address.
    pub ip: IpAddr,
    /// Its link-layer address.
    pub mac: MacAddr,
}

impl Ord for Neigh {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.ifindex, ip_key(&self.ip), self.mac.key()).cmp(&(
            o.ifindex,
            ip_key(&o.ip),
            o.mac.key(),
        ))
    }
}

impl PartialOrd for Neigh {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Neigh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lladdr {} dev #{}", self.ip, self.mac, self.ifindex)
    }
}

/// A permanent FDB entry of a vxlan device (`bridge fdb replace <mac> dev <ifindex> dst <dst> self permanent`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fdb {
    /// Device index.
    pub ifindex: u32,
    /// The remote VTEP's MAC.
    pub mac: MacAddr,
    /// The remote VTEP's underlay address.
    pub dst: IpAddr,
}

impl Ord for Fdb {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.ifindex, self.mac.key(), ip_key(&self.dst)).cmp(&(
            o.ifindex,
            o.mac.key(),
            ip_key(&o.dst),
        ))
    }
}

impl PartialOrd for Fdb {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Fdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dst {} dev #{}", self.mac, self.dst, self.ifindex)
    }
}

/// Routes, neighbours and FDB entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Routes.
    pub routes: BTreeSet<Route>,
    /// Neighbours.
    pub neighs: BTreeSet<Neigh>,
    /// FDB entries.
    pub fdb: BTreeSet<Fdb>,
}

impl KernelState {
    /// Rebuilds the sets in bulk. Sets that grew one entry at a time in order (an install, the
    /// loop's record of its own changes) are trees of half-full nodes; rebuilt, their nodes are
    /// full, in about half the memory. The entries stay the same.
    pub fn compact(&mut self) {
        flannel_core::compact::compact(&mut self.routes);
        flannel_core::compact::compact(&mut self.neighs);
        flannel_core::compact::compact(&mut self.fdb);
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.routes.len() + self.neighs.len() + self.fdb.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which existing entries belong to the backend (and so may be removed when not desired). Everything
/// else is never touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// The cluster networks: only routes into them are considered.
    pub networks: Vec<IpNet>,
    /// Devices all of whose routes into the networks are ours (e.g. `flannel.1`).
    pub route_oifs: Vec<u32>,
    /// Devices whose routes into the networks **with a gateway** are ours (host-gw and DirectRouting
    /// routes on the external interface).
    pub gateway_route_oifs: Vec<u32>,
    /// Routes that are never ours even if they match (e.g. the own subnet).
    pub keep: Vec<IpNet>,
    /// Devices whose neighbour entries are ours.
    pub neigh_ifindexes: Vec<u32>,
    /// Devices whose FDB entries (with a remote address) are ours.
    pub fdb_ifindexes: Vec<u32>,
}

impl Ownership {
    /// Whether `r` is flannel's to change (into a cluster network, on flannel's devices).
    pub fn owns_route(&self, r: &Route) -> bool {
        let in_net = self.networks.iter().any(|n| n.contains(&r.dst));
        let kept = self.keep.iter().any(|k| k.contains(&r.dst));
        in_net
            && !kept
            && (self.route_oifs.contains(&r.oif)
                || (r.gateway.is_some() && self.gateway_route_oifs.contains(&r.oif)))
    }
}

/// One change to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Remove a route.
    DelRoute(Route),
    /// Remove a neighbour.
    DelNeigh(Neigh),
    /// Remove an FDB entry.
    DelFdb(Fdb),
    /// Add or replace a neighbour.
    AddNeigh(Neigh),
    /// Add or replace an FDB entry.
    AddFdb(Fdb),
    /// Add or replace a route.
    AddRoute(Route),
}

impl Op {
    /// The direction and kind, as [`ReconcileReport::applied`] counts them (`add route`,
    /// `delete fdb`, …).
    pub fn label(&self) -> &'static str {
        match self {
            Op::AddRoute(_) => "add route",
            Op::AddNeigh(_) => "add neigh",
            Op::AddFdb(_) => "add fdb",
            Op::DelRoute(_) => "delete route",
            Op::DelNeigh(_) => "delete neigh",
            Op::DelFdb(_) => "delete fdb",
        }
    }

    /// A short kind name for logs and metrics (`route`, `neigh`, `fdb`).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::DelRoute(_) | Op::AddRoute(_) => "route",
            Op::DelNeigh(_) | Op::AddNeigh(_) => "neigh",
            Op::DelFdb(_) | Op::AddFdb(_) => "fdb",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::DelRoute(r) => write!(f, "delete route {r}"),
            Op::DelNeigh(n) => write!(f, "delete neigh {n}"),
            Op::DelFdb(e) => write!(f, "delete fdb {e}"),
            Op::AddNeigh(n) => write!(f, "add neigh {n}"),
            Op::AddFdb(e) => write!(f, "add fdb {e}"),
            Op::AddRoute(r) => write!(f, "add route {r}"),
        }
    }
}

/// The operations that turn `actual` into `desired`, in a safe order: stale routes first, then stale
/// neighbours and FDB entries, then neighbours and FDB entries before the routes that need them (so
/// the kernel never has to ARP). Adds use replace semantics, so a changed entry is one add. Entries
/// that [`Ownership`] does not cover are never deleted.
pub fn diff(desired: &KernelState, actual: &KernelState, own: &Ownership) -> Vec<Op> {
    let mut ops = deletions(desired, actual, own);
    ops.extend(additions(desired, actual, own).iter().map(Addition::op));
    ops
}

/// The deletions of [`diff`], in its order. (Whether an entry's key is wanted is a lookup in the
/// desired sets, which sort by that key first: no set of wanted keys is built.)
fn deletions(desired: &KernelState, actual: &KernelState, own: &Ownership) -> Vec<Op> {
    let mut ops = Vec::new();
    // Routes are keyed by destination in the main table: a desired route replaces any route to the
    // same destination, so only destinations nobody wants any more are deleted.
    for r in &actual.routes {
        if own.owns_route(r) && desired.route_to(&r.dst).is_none() {
            ops.push(Op::DelRoute(r.clone()));
        }
    }
    for n in &actual.neighs {
        if own.neigh_ifindexes.contains(&n.ifindex) && desired.neigh_at(n.ifindex, n.ip).is_none() {
            ops.push(Op::DelNeigh(n.clone()));
        }
    }
    for e in &actual.fdb {
        if own.fdb_ifindexes.contains(&e.ifindex) && desired.fdb_of(e.ifindex, e.mac).is_none() {
            ops.push(Op::DelFdb(e.clone()));
        }
    }
    ops
}

/// An addition of [`diff`], as a reference into the desired state: a large change's list of
/// additions then holds 16 bytes an entry, not a copy of each.
#[derive(Debug, Clone, Copy)]
enum Addition<'a> {
    Neigh(&'a Neigh),
    Fdb(&'a Fdb),
    Route(&'a Route),
}

impl Addition<'_> {
    fn op(&self) -> Op {
        match *self {
            Addition::Neigh(n) => Op::AddNeigh(n.clone()),
            Addition::Fdb(e) => Op::AddFdb(e.clone()),
            Addition::Route(r) => Op::AddRoute(r.clone()),
        }
    }
}

/// The additions of [`diff`], in its order: neighbours and FDB entries before the routes.
fn additions<'a>(
    desired: &'a KernelState,
    actual: &KernelState,
    own: &Ownership,
) -> Vec<Addition<'a>> {
    // (Lookups rather than `difference`, whose items would borrow `actual` too.)
    let mut adds: Vec<Addition<'a>> = desired
        .neighs
        .iter()
        .filter(|n| !actual.neighs.contains(*n))
        .map(Addition::Neigh)
        .collect();
    adds.extend(
        desired
            .fdb
            .iter()
            .filter(|e| !actual.fdb.contains(*e))
            .map(Addition::Fdb),
    );
    // Only routes into the cluster networks are read back; one outside them would be added again
    // at every pass, so it is never added (the lease policy refuses such leases with a reason).
    adds.extend(
        desired
            .routes
            .iter()
            .filter(|r| !actual.routes.contains(*r))
            .filter(|r| own.networks.iter().any(|n| n.contains(&r.dst)))
            .map(Addition::Route),
    );
    adds
}

/// The kernel's answer to one request.
#[derive(Debug, thiserror::Error)]
pub enum KernelCause {
    /// A netlink request failed (the kernel's errno is in it).
    #[error(transparent)]
    Netlink(#[from] rtnetlink::Error),
    /// Another I/O error (e.g. opening the netlink socket).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Errors of the kernel seam: what was being done, naming the object, with the kernel's answer as
/// the source and a hint chosen by its errno.
#[derive(Debug, thiserror::Error)]
#[error("{context}{}", self.hint().map(|h| format!(" ({h})")).unwrap_or_default())]
pub struct DataplaneError {
    /// What was being done (e.g. `add route 10.5.2.0/24 via 10.5.2.0 dev #5 onlink`).
    pub context: String,
    /// The kernel's answer.
    #[source]
    pub cause: KernelCause,
}

impl DataplaneError {
    /// The kernel's errno (positive), when the answer carries one.
    pub fn errno(&self) -> Option<i32> {
        match &self.cause {
            KernelCause::Netlink(rtnetlink::Error::NetlinkError(m)) => {
                Some(-m.raw_code()).filter(|e| *e > 0)
            }
            KernelCause::Io(e) => e.raw_os_error(),
            KernelCause::Netlink(_) => None,
        }
    }

    /// What to do about it, by errno.
    pub fn hint(&self) -> Option<&'static str> {
        hint_for(self.errno()?)
    }
}

/// The operator's hint for a kernel errno.
pub fn hint_for(errno: i32) -> Option<&'static str> {
    match errno {
        libc::ENETUNREACH => {
            Some("the next hop is not on-link: is the peer on the same L2 network?")
        }
        libc::EPERM | libc::EACCES => Some("flanneld needs CAP_NET_ADMIN: run it as root"),
        libc::EEXIST => Some("an entry with that key exists and was not replaced"),
        libc::ENODEV => Some("the device is gone; it is recreated at the next pass"),
        _ => None,
    }
}

pub use flannel_core::chain;

impl From<DataplaneError> for flannel_core::BackendError {
    fn from(e: DataplaneError) -> Self {
        flannel_core::BackendError::Kernel(Box::new(e))
    }
}

/// What the reconcile loop needs from the kernel: read the entries of interest, apply one change.
#[async_trait]
pub trait KernelOps: Send + Sync + fmt::Debug {
    /// Reads the main-table routes into `own.networks` and the neighbour and FDB entries of the devices
    /// named in `own`.
    async fn read(&self, own: &Ownership) -> Result<KernelState, DataplaneError>;
    /// Applies one change (adds replace).
    async fn apply(&self, op: &Op) -> Result<(), DataplaneError>;
    /// Every main-table route, whatever its destination (the host's routing before flannel acts:
    /// see [`crate::LeasePolicy`]).
    async fn host_routes(&self) -> Result<Vec<Route>, DataplaneError>;
}

/// What the backends need of the kernel's links and addresses (the devices they keep): the other half
/// of the kernel seam, so that `prepare()` can be tested without root.
#[async_trait]
pub trait LinkOps: Send + Sync + fmt::Debug {
    /// The link named `name`, if it exists (`ip link show <name>`).
    async fn link_by_name(&self, name: &str) -> Result<Option<netlink::LinkState>, DataplaneError>;
    /// Creates a vxlan device (`ip link add <name> type vxlan id <vni> …`).
    async fn create_vxlan(&self, spec: &netlink::VxlanSpec) -> Result<(), DataplaneError>;
    /// Creates an ipip device (`ip link add <name> type ipip local <addr>`).
    async fn create_ipip(&self, spec: &netlink::IpipSpec) -> Result<(), DataplaneError>;
    /// Deletes a link (`ip link del`).
    async fn delete_link(&self, index: u32) -> Result<(), DataplaneError>;
    /// Sets a link up (`ip link set <dev> up`).
    async fn set_up(&self, index: u32) -> Result<(), DataplaneError>;
    /// Sets a link's MTU (`ip link set <dev> mtu <mtu>`).
    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), DataplaneError>;
    /// Makes `addr` the link's only address inside `network` (others there are removed; addresses
    /// outside it are left alone).
    async fn ensure_only_address(
        &self,
        index: u32,
        addr: IpNet,
        network: IpNet,
    ) -> Result<(), DataplaneError>;
}

/// A fake link: its state and addresses.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone)]
pub struct FakeLink {
    /// What `link_by_name` reports.
    pub state: netlink::LinkState,
    /// Its addresses.
    pub addrs: Vec<IpNet>,
}

/// An in-memory kernel that records every applied op, with links and addresses; for tests of
/// backends and the reconcile loop (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct FakeKernel {
    /// The current entries.
    pub state: std::sync::Mutex<KernelState>,
    /// Every op applied, in order.
    pub applied: std::sync::Mutex<Vec<Op>>,
    /// The links, by name.
    pub links: std::sync::Mutex<BTreeMap<String, FakeLink>>,
    /// Link indexes handed out so far (a new link never reuses one, as in the kernel).
    pub created: std::sync::atomic::AtomicU32,
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl LinkOps for FakeKernel {
    async fn link_by_name(&self, name: &str) -> Result<Option<netlink::LinkState>, DataplaneError> {
        Ok(self
            .links
            .lock()
            .ok()
            .and_then(|l| l.get(name).map(|f| f.state.clone())))
    }

    async fn create_vxlan(&self, spec: &netlink::VxlanSpec) -> Result<(), DataplaneError> {
        self.add_link(netlink::LinkState {
            name: spec.name.clone(),
            index: 0,
            mac: Some(spec.mac),
            up: false,
            mtu: spec.mtu,
            vxlan: Some(spec.attrs.clone()),
            ipip: None,
            kind: Some("vxlan".into()),
        });
        Ok(())
    }

    async fn create_ipip(&self, spec: &netlink::IpipSpec) -> Result<(), DataplaneError> {
        self.add_link(netlink::LinkState {
            name: spec.name.clone(),
            index: 0,
            mac: None,
            up: false,
            mtu: spec.mtu,
            vxlan: None,
            ipip: Some(netlink::IpipAttrs {
                local: Some(spec.local),
                remote: None,
            }),
            kind: Some("ipip".into()),
        });
        Ok(())
    }

    async fn delete_link(&self, index: u32) -> Result<(), DataplaneError> {
        if let Ok(mut links) = self.links.lock() {
            links.retain(|_, l| l.state.index != index);
        }
        Ok(())
    }

    async fn set_up(&self, index: u32) -> Result<(), DataplaneError> {
        self.with_link(index, |l| l.state.up = true)
    }

    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), DataplaneError> {
        self.with_link(index, |l| l.state.mtu = mtu)
    }

    async fn ensure_only_address(
        &self,
        index: u32,
        addr: IpNet,
        network: IpNet,
    ) -> Result<(), DataplaneError> {
        self.with_link(index, |l| {
            l.addrs
                .retain(|a| *a == addr || !network.contains(&a.addr()));
            if !l.addrs.contains(&addr) {
                l.addrs.push(addr);
            }
        })
    }
}

#[cfg(any(test, feature = "test-util"))]
impl FakeKernel {
    /// Adds `state` as a new link with the next index (the kernel never reuses one).
    fn add_link(&self, mut state: netlink::LinkState) {
        if let Ok(mut links) = self.links.lock() {
            state.index = 11
                + self
                    .created
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            links.insert(
                state.name.clone(),
                FakeLink {
                    state,
                    addrs: Vec::new(),
                },
            );
        }
    }

    fn with_link(&self, index: u32, f: impl FnOnce(&mut FakeLink)) -> Result<(), DataplaneError> {
        let mut links = self.links.lock().map_err(|_| DataplaneError {
            context: format!("link #{index}"),
            cause: KernelCause::Io(std::io::Error::other("poisoned")),
        })?;
        match links.values_mut().find(|l| l.state.index == index) {
            Some(l) => {
                f(l);
                Ok(())
            }
            None => Err(DataplaneError {
                context: format!("link #{index}"),
                cause: KernelCause::Io(std::io::Error::from_raw_os_error(libc::ENODEV)),
            }),
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
impl FakeKernel {
    /// A fake kernel that already holds `routes` (e.g. the host's connected networks), given as
    /// `(destination, output interface)` link routes without a gateway.
    ///
    /// # Panics
    /// When a destination is not a CIDR.
    pub fn with_link_routes(routes: &[(&str, u32)]) -> Self {
        let k = Self::default();
        if let Ok(mut s) = k.state.lock() {
            for (dst, oif) in routes {
                s.routes.insert(Route {
                    dst: dst
                        .parse()
                        .unwrap_or_else(|_| panic!("{dst} is not a CIDR")),
                    gateway: None,
                    oif: *oif,
                    onlink: false,
                });
            }
        }
        k
    }

    /// For a backend's tests: passes `leases` through the lease policy of a host whose lease is
    /// `own` and whose routes before flannel are this kernel's, then reconciles the allowed ones'
    /// entries (`desired`: the backend's desired state for a set of leases) twice. Returns the
    /// allowed leases and the refusals.
    ///
    /// # Panics
    /// When the first pass changes nothing, the second changes anything, or the kernel fails.
    pub async fn reconcile_twice<'a>(
        &self,
        own: flannel_core::SubnetKey,
        leases: &[&'a flannel_core::Lease],
        desired: impl Fn(&[&flannel_core::Lease]) -> (KernelState, Ownership),
    ) -> (Vec<&'a flannel_core::Lease>, Vec<String>) {
        let host = self.host_routes().await.expect("the fake kernel's routes");
        let policy = LeasePolicy::new(own, &desired(&[]).1, &host);
        let (allowed, refused) = policy.filter(leases);
        let (state, ownership) = desired(&allowed);
        let first = reconcile_once(self, &state, &ownership)
            .await
            .expect("the first pass");
        assert!(!first.is_noop(), "the first pass changed nothing");
        let second = reconcile_once(self, &state, &ownership)
            .await
            .expect("the second pass");
        assert!(
            second.is_noop(),
            "the same input again changed {:?}",
            second.applied
        );
        (allowed, refused)
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl KernelOps for FakeKernel {
    async fn read(&self, own: &Ownership) -> Result<KernelState, DataplaneError> {
        // As the netlink reader: only routes into the cluster networks are seen.
        let mut s = self.state.lock().map(|s| s.clone()).unwrap_or_default();
        s.routes
            .retain(|r| own.networks.iter().any(|n| n.contains(&r.dst)));
        Ok(s)
    }

    async fn host_routes(&self) -> Result<Vec<Route>, DataplaneError> {
        Ok(self
            .state
            .lock()
            .map(|s| s.routes.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn apply(&self, op: &Op) -> Result<(), DataplaneError> {
        if let Ok(mut s) = self.state.lock() {
            match op {
                Op::DelRoute(r) => {
                    s.routes.remove(r);
                }
                Op::DelNeigh(n) => {
                    s.neighs.remove(n);
                }
                Op::DelFdb(e) => {
                    s.fdb.remove(e);
                }
                Op::AddRoute(r) => {
                    s.routes.retain(|x| x.dst != r.dst);
                    s.routes.insert(r.clone());
                }
                Op::AddNeigh(n) => {
                    s.neighs.retain(|x| (x.ifindex, x.ip) != (n.ifindex, n.ip));
                    s.neighs.insert(n.clone());
                }
                Op::AddFdb(e) => {
                    s.fdb.retain(|x| (x.ifindex, x.mac) != (e.ifindex, e.mac));
                    s.fdb.insert(e.clone());
                }
            }
        }
        if let Ok(mut a) = self.applied.lock() {
            a.push(op.clone());
        }
        Ok(())
    }
}

/// Counts of what one reconcile pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Ops applied successfully, by kind and direction (`add route`, `delete fdb`, …).
    pub applied: BTreeMap<String, usize>,
    /// Ops that failed, with the error.
    pub failed: Vec<String>,
}

impl ReconcileReport {
    /// Whether nothing had to change.
    pub fn is_noop(&self) -> bool {
        self.applied.is_empty() && self.failed.is_empty()
    }
}

/// One pass: read, diff, apply every op (continuing past failures, which are reported).
pub async fn reconcile_once(
    kernel: &dyn KernelOps,
    desired: &KernelState,
    own: &Ownership,
) -> Result<ReconcileReport, DataplaneError> {
    let mut actual = kernel.read(own).await?;
    Ok(apply_diff(kernel, desired, own, &mut actual).await)
}

/// Applies the difference between `desired` and `known` (the kernel's entries as last read, and kept
/// up to date by this function: each op that succeeds is recorded in it), continuing past failures,
/// which are reported. After a failure `known` may no longer match the kernel: read it again.
pub async fn apply_diff(
    kernel: &dyn KernelOps,
    desired: &KernelState,
    own: &Ownership,
    known: &mut KernelState,
) -> ReconcileReport {
    let mut report = ReconcileReport::default();
    // Deletions first, then additions (a changed entry is one replacing add, never a delete and an
    // add of the same key); within each phase up to APPLY_IN_FLIGHT requests are in flight at
    // once, so a large change costs the kernel's work, not one round trip per entry. Results are
    // taken as they come, and the additions are references into `desired` until they are sent:
    // nothing the size of the change is copied.
    let deletions = deletions(desired, known, own);
    let additions = additions(desired, known, own);
    apply_each(kernel, &mut deletions.into_iter(), known, &mut report).await;
    let mut next = 0;
    let mut adds = std::iter::from_fn(|| {
        let add = additions.get(next)?;
        next += 1;
        Some(add.op())
    });
    apply_each(kernel, &mut adds, known, &mut report).await;
    report
}

/// Applies `ops` with up to [`APPLY_IN_FLIGHT`] in flight, taking the answers in order.
async fn apply_each(
    kernel: &dyn KernelOps,
    ops: &mut (dyn Iterator<Item = Op> + Send),
    known: &mut KernelState,
    report: &mut ReconcileReport,
) {
    use futures::StreamExt;
    let mut in_flight = futures::stream::FuturesOrdered::new();
    loop {
        while in_flight.len() < APPLY_IN_FLIGHT {
            let Some(op) = ops.next() else { break };
            in_flight.push_back(async move {
                let result = kernel.apply(&op).await;
                (op, result)
            });
        }
        let Some((op, result)) = in_flight.next().await else {
            return;
        };
        report.take(known, op, result);
    }
}

impl ReconcileReport {
    /// Takes the kernel's answer to `op`: recorded in `known` and counted, or reported.
    fn take(&mut self, known: &mut KernelState, op: Op, result: Result<(), DataplaneError>) {
        match result {
            Ok(()) => {
                known.record(&op);
                let label = op.label();
                match self.applied.get_mut(label) {
                    Some(n) => *n += 1,
                    None => {
                        self.applied.insert(label.to_string(), 1);
                    }
                }
            }
            Err(e) => self.failed.push(chain(&e)),
        }
    }
}

/// Kernel requests [`apply_diff`] keeps in flight at once.
pub const APPLY_IN_FLIGHT: usize = 64;

impl KernelState {
    /// Records an op the kernel accepted, with its replace semantics: a route replaces the route to
    /// the same destination, a neighbour the one for the same address on its device, an FDB entry
    /// the one for the same MAC on its device. (Entries sharing that key sort next to each other, so
    /// this costs a lookup, not a scan.)
    pub fn record(&mut self, op: &Op) {
        const ANY_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        match op {
            Op::AddRoute(r) | Op::DelRoute(r) => {
                let first = Route {
                    dst: r.dst,
                    gateway: None,
                    oif: 0,
                    onlink: false,
                };
                remove_run(&mut self.routes, &first, |x| x.dst == r.dst);
                if matches!(op, Op::AddRoute(_)) {
                    self.routes.insert(r.clone());
                }
            }
            Op::AddNeigh(n) | Op::DelNeigh(n) => {
                let first = Neigh {
                    mac: MacAddr([0; 6]),
                    ..n.clone()
                };
                remove_run(&mut self.neighs, &first, |x| {
                    (x.ifindex, x.ip) == (n.ifindex, n.ip)
                });
                if matches!(op, Op::AddNeigh(_)) {
                    self.neighs.insert(n.clone());
                }
            }
            Op::AddFdb(e) | Op::DelFdb(e) => {
                let first = Fdb {
                    dst: ANY_IP,
                    ..e.clone()
                };
                remove_run(&mut self.fdb, &first, |x| {
                    (x.ifindex, x.mac) == (e.ifindex, e.mac)
                });
                if matches!(op, Op::AddFdb(_)) {
                    self.fdb.insert(e.clone());
                }
            }
        }
    }
}

impl KernelState {
    /// The neighbour entry for `ip` on device `ifindex`, if any.
    pub fn neigh_at(&self, ifindex: u32, ip: IpAddr) -> Option<&Neigh> {
        let first = Neigh {
            ifindex,
            ip,
            mac: MacAddr([0; 6]),
        };
        self.neighs
            .range(&first..)
            .next()
            .filter(|n| (n.ifindex, n.ip) == (ifindex, ip))
    }

    /// A route to `dst`, if any.
    pub fn route_to(&self, dst: &IpNet) -> Option<&Route> {
        let first = Route {
            dst: *dst,
            gateway: None,
            oif: 0,
            onlink: false,
        };
        self.routes.range(&first..).next().filter(|r| r.dst == *dst)
    }

    /// The FDB entry for `mac` on device `ifindex`, if any.
    pub fn fdb_of(&self, ifindex: u32, mac: MacAddr) -> Option<&Fdb> {
        let first = Fdb {
            ifindex,
            mac,
            dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        };
        self.fdb
            .range(&first..)
            .next()
            .filter(|e| (e.ifindex, e.mac) == (ifindex, mac))
    }
}

/// Removes the entries from `first` on for which `same` holds (a run of neighbours in the order).
fn remove_run<T: Ord + Clone>(set: &mut BTreeSet<T>, first: &T, same: impl Fn(&T) -> bool) {
    let doomed: Vec<T> = set
        .range(first..)
        .take_while(|x| same(x))
        .cloned()
        .collect();
    for d in doomed {
        set.remove(&d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orders computed on integers are the orders `derive` gave (field by field, addresses
    /// byte by byte), on entries drawn from small pools so that ties are common.
    #[test]
    fn entry_orders_are_the_derived_ones() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let ips: Vec<IpAddr> = [
            "10.5.2.0",
            "10.5.2.1",
            "10.6.0.0",
            "9.255.255.255",
            "255.0.0.1",
            "0.0.0.0",
            "fd00::1",
            "fd00::",
            "::",
            "ff02::1",
            "fd00:0:0:1::",
            "::ffff:10.5.2.0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let macs = [
            [0u8; 6],
            [0, 0, 0, 0, 0, 1],
            [1, 0, 0, 0, 0, 0],
            [0xff; 6],
            [0x0e, 2, 3, 4, 5, 6],
        ];
        let ip = |rng: &mut rand::rngs::StdRng| ips[rng.random_range(0..ips.len())];
        let mut routes = Vec::new();
        let (mut neighs, mut fdb) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            let a = ip(&mut rng);
            let len = if a.is_ipv4() {
                rng.random_range(20..=32)
            } else {
                rng.random_range(56..=128)
            };
            routes.push(Route {
                dst: IpNet::new(a, len).unwrap(),
                gateway: rng.random_bool(0.7).then(|| ip(&mut rng)),
                oif: rng.random_range(1..4),
                onlink: rng.random_bool(0.5),
            });
            let mac = MacAddr(macs[rng.random_range(0..macs.len())]);
            neighs.push(Neigh {
                ifindex: rng.random_range(1..4),
                ip: ip(&mut rng),
                mac,
            });
            fdb.push(Fdb {
                ifindex: rng.random_range(1..4),
                mac,
                dst: ip(&mut rng),
            });
        }
        for a in &routes {
            for b in &routes {
                let derived =
                    (a.dst, a.gateway, a.oif, a.onlink).cmp(&(b.dst, b.gateway, b.oif, b.onlink));
                assert_eq!(a.cmp(b), derived, "{a} vs {b}");
            }
        }
        for a in &neighs {
            for b in &neighs {
                let derived = (a.ifindex, a.ip, a.mac.0).cmp(&(b.ifindex, b.ip, b.mac.0));
                assert_eq!(a.cmp(b), derived, "{a} vs {b}");
            }
        }
        for a in &fdb {
            for b in &fdb {
                let derived = (a.ifindex, a.mac.0, a.dst).cmp(&(b.ifindex, b.mac.0, b.dst));
                assert_eq!(a.cmp(b), derived, "{a} vs {b}");
                assert_eq!(a.mac.cmp(&b.mac), a.mac.0.cmp(&b.mac.0));
            }
        }
    }

    #[test]
    fn hints_come_from_the_errno_and_the_cause_is_kept() {
        let e = DataplaneError {
            context: "add route 10.5.2.0/24 via 192.168.9.2 dev #2".into(),
            cause: KernelCause::Io(std::io::Error::from_raw_os_error(libc::ENETUNREACH)),
        };
        assert_eq!(e.errno(), Some(libc::ENETUNREACH));
        assert_eq!(
            e.to_string(),
            "add route 10.5.2.0/24 via 192.168.9.2 dev #2 (the next hop is not on-link: is the peer on the same L2 network?)"
        );
        assert!(
            std::error::Error::source(&e).is_some(),
            "the kernel's answer is the source"
        );
        let line = chain(&e);
        assert!(line.contains("Network is unreachable"), "{line}");
        let e = DataplaneError {
            context: "x".into(),
            cause: KernelCause::Io(std::io::Error::from_raw_os_error(libc::EPERM)),
        };
        assert!(e.to_string().contains("CAP_NET_ADMIN"));
        let e = DataplaneError {
            context: "x".into(),
            cause: KernelCause::Io(std::io::Error::other("no errno")),
        };
        assert_eq!((e.errno(), e.hint()), (None, None));
        assert_eq!(e.to_string(), "x");
        let b: flannel_core::BackendError = e.into();
        assert!(chain(&b).ends_with("no errno"), "{}", chain(&b));
    }

    /// A kernel whose every op takes 1 ms (paused time) and that records how many were in flight.
    #[derive(Debug, Default)]
    struct SlowKernel {
        in_flight: std::sync::atomic::AtomicUsize,
        max_in_flight: std::sync::atomic::AtomicUsize,
        log: std::sync::Mutex<Vec<(bool, bool)>>,
    }

    #[async_trait]
    impl KernelOps for SlowKernel {
        async fn read(&self, _: &Ownership) -> Result<KernelState, DataplaneError> {
            Ok(KernelState::default())
        }
        async fn apply(&self, op: &Op) -> Result<(), DataplaneError> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.max_in_flight.fetch_max(now, SeqCst);
            let delete = matches!(op, Op::DelRoute(_) | Op::DelNeigh(_) | Op::DelFdb(_));
            self.log.lock().unwrap().push((delete, true));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            self.log.lock().unwrap().push((delete, false));
            self.in_flight.fetch_sub(1, SeqCst);
            Ok(())
        }
        async fn host_routes(&self) -> Result<Vec<Route>, DataplaneError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn apply_diff_keeps_requests_in_flight_and_deletes_before_adding() {
        let own = Ownership {
            networks: vec!["10.5.0.0/16".parse().unwrap()],
            gateway_route_oifs: vec![5],
            ..Default::default()
        };
        let mut known = KernelState::default();
        let mut desired = KernelState::default();
        for i in 0..200u32 {
            let (a, b) = (i / 256, i % 256);
            known
                .routes
                .insert(route(&format!("10.5.{a}.{b}/32"), "192.168.0.9", 5, false));
            desired.routes.insert(route(
                &format!("10.5.{}.{b}/32", a + 100),
                "192.168.0.9",
                5,
                false,
            ));
        }
        let kernel = SlowKernel::default();
        let report = apply_diff(&kernel, &desired, &own, &mut known).await;
        assert!(report.failed.is_empty());
        assert_eq!(report.applied.values().sum::<usize>(), 400);
        assert_eq!(known, desired, "the record follows every op");
        let max = kernel
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(max, APPLY_IN_FLIGHT, "requests overlap, up to the bound");
        // No add starts before the last delete finished.
        let log = kernel.log.lock().unwrap();
        let last_delete_end = log.iter().rposition(|&(d, start)| d && !start).unwrap();
        let first_add_start = log.iter().position(|&(d, start)| !d && start).unwrap();
        assert!(last_delete_end < first_add_start);
    }

    fn route(dst: &str, gw: &str, oif: u32, onlink: bool) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            gateway: Some(gw.parse().unwrap()),
            oif,
            onlink,
        }
    }
    fn neigh(ip: &str, mac: &str) -> Neigh {
        Neigh {
            ifindex: 5,
            ip: ip.parse().unwrap(),
            mac: mac.parse().unwrap(),
        }
    }
    fn fdb(mac: &str, dst: &str) -> Fdb {
        Fdb {
            ifindex: 5,
            mac: mac.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }
    fn state(routes: Vec<Route>, neighs: Vec<Neigh>, fdbs: Vec<Fdb>) -> KernelState {
        KernelState {
            routes: routes.into_iter().collect(),
            neighs: neighs.into_iter().collect(),
            fdb: fdbs.into_iter().collect(),
        }
    }
    #[test]
    fn compacting_keeps_every_entry_and_the_record_goes_on() {
        let mut s = KernelState::default();
        for i in 0..300u32 {
            let op = Op::AddRoute(Route {
                dst: format!("10.{}.{}.0/24", 5 + i / 256, i % 256)
                    .parse()
                    .unwrap(),
                gateway: None,
                oif: 5,
                onlink: false,
            });
            s.record(&op);
            s.record(&Op::AddNeigh(Neigh {
                ifindex: 5,
                ip: std::net::Ipv4Addr::from(0x0a05_0000 + (i << 8)).into(),
                mac: MacAddr([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
            }));
        }
        let before = s.clone();
        s.compact();
        assert_eq!(s, before);
        let gone = before.routes.iter().next().cloned().unwrap();
        s.record(&Op::DelRoute(gone.clone()));
        assert!(!s.routes.contains(&gone));
        assert_eq!(s.routes.len(), 299);
    }

    fn vxlan_own() -> Ownership {
        Ownership {
            networks: vec!["10.5.0.0/16".parse().unwrap()],
            route_oifs: vec![5],
            gateway_route_oifs: vec![2],
            keep: vec!["10.5.1.0/24".parse().unwrap()],
            neigh_ifindexes: vec![5],
            fdb_ifindexes: vec![5],
        }
    }

    struct Case {
        name: &'static str,
        desired: KernelState,
        actual: KernelState,
        want: Vec<Op>,
    }

    #[test]
    fn diff_cases() {
        let peer_route = route("10.5.2.0/24", "10.5.2.0", 5, true);
        let peer_neigh = neigh("10.5.2.0", "aa:aa:aa:aa:aa:02");
        let peer_fdb = fdb("aa:aa:aa:aa:aa:02", "192.168.0.2");
        let peer = state(
            vec![peer_route.clone()],
            vec![peer_neigh.clone()],
            vec![peer_fdb.clone()],
        );
        let cases = vec![
            Case {
                name: "empty kernel: neighbour and fdb before the route",
                desired: peer.clone(),
                actual: KernelState::default(),
                want: vec![
                    Op::AddNeigh(peer_neigh.clone()),
                    Op::AddFdb(peer_fdb.clone()),
                    Op::AddRoute(peer_route.clone()),
                ],
            },
            Case {
                name: "in sync: nothing",
                desired: peer.clone(),
                actual: peer.clone(),
                want: vec![],
            },
            Case {
                name: "departed peer: route first, then neigh and fdb",
                desired: KernelState::default(),
                actual: peer.clone(),
                want: vec![
                    Op::DelRoute(peer_route.clone()),
                    Op::DelNeigh(peer_neigh.clone()),
                    Op::DelFdb(peer_fdb.clone()),
                ],
            },
            Case {
                name: "changed VtepMAC: neighbour replaced, old fdb removed, new fdb added",
                desired: state(
                    vec![peer_route.clone()],
                    vec![neigh("10.5.2.0", "aa:aa:aa:aa:aa:99")],
                    vec![fdb("aa:aa:aa:aa:aa:99", "192.168.0.2")],
                ),
                actual: peer.clone(),
                want: vec![
                    Op::DelFdb(peer_fdb.clone()),
                    Op::AddNeigh(neigh("10.5.2.0", "aa:aa:aa:aa:aa:99")),
                    Op::AddFdb(fdb("aa:aa:aa:aa:aa:99", "192.168.0.2")),
                ],
            },
            Case {
                name: "wrong gateway on a route: replaced, not deleted",
                desired: state(
                    vec![route("10.5.3.0/24", "192.168.0.3", 2, false)],
                    vec![],
                    vec![],
                ),
                actual: state(
                    vec![route("10.5.3.0/24", "192.168.0.9", 2, false)],
                    vec![],
                    vec![],
                ),
                want: vec![Op::AddRoute(route("10.5.3.0/24", "192.168.0.3", 2, false))],
            },
            Case {
                name: "foreign entries are never touched",
                desired: KernelState::default(),
                actual: state(
                    vec![
                        route("10.6.0.0/24", "10.6.0.1", 5, false), // outside the cluster network
                        route("10.5.9.0/24", "192.168.0.1", 3, false), // on another device
                        Route {
                            dst: "10.5.8.0/24".parse().unwrap(),
                            gateway: None,
                            oif: 2,
                            onlink: false,
                        }, // no gateway on ext
                        route("10.5.1.0/24", "10.5.1.0", 5, true),  // own subnet is kept
                    ],
                    vec![Neigh {
                        ifindex: 2,
                        ip: "192.168.0.1".parse().unwrap(),
                        mac: "00:11:22:33:44:55".parse().unwrap(),
                    }],
                    vec![Fdb {
                        ifindex: 7,
                        mac: "00:11:22:33:44:55".parse().unwrap(),
                        dst: "1.2.3.4".parse().unwrap(),
                    }],
                ),
                want: vec![],
            },
            Case {
                name: "stale route into the network on flannel.1 is removed",
                desired: peer.clone(),
                actual: state(
                    vec![
                        peer_route.clone(),
                        route("10.5.77.0/24", "10.5.77.0", 5, true),
                    ],
                    vec![peer_neigh.clone()],
                    vec![peer_fdb.clone()],
                ),
                want: vec![Op::DelRoute(route("10.5.77.0/24", "10.5.77.0", 5, true))],
            },
        ];
        for c in cases {
            assert_eq!(
                diff(&c.desired, &c.actual, &vxlan_own()),
                c.want,
                "{}",
                c.name
            );
        }
    }

    #[tokio::test]
    async fn reconcile_converges_on_the_fake_kernel() {
        let k = FakeKernel::default();
        let desired = state(
            vec![route("10.5.2.0/24", "10.5.2.0", 5, true)],
            vec![neigh("10.5.2.0", "aa:aa:aa:aa:aa:02")],
            vec![fdb("aa:aa:aa:aa:aa:02", "192.168.0.2")],
        );
        let r = reconcile_once(&k, &desired, &vxlan_own()).await.unwrap();
        assert_eq!(r.applied.values().sum::<usize>(), 3);
        assert_eq!(*k.state.lock().unwrap(), desired);
        let r = reconcile_once(&k, &desired, &vxlan_own()).await.unwrap();
        assert!(r.is_noop(), "second pass changes nothing");
    }

    #[tokio::test]
    async fn what_apply_diff_records_is_what_a_read_returns() {
        // The loop diffs lease changes against what it recorded instead of reading the kernel, so
        // the record must match a fresh read after every kind of change: adds, replacements (a
        // new gateway, a new MAC for the same address, a moved VTEP) and removals.
        let k = FakeKernel::default();
        let own = vxlan_own();
        let steps = [
            state(
                vec![
                    route("10.5.2.0/24", "10.5.2.0", 5, true),
                    route("10.5.3.0/24", "10.5.3.0", 5, true),
                ],
                vec![
                    neigh("10.5.2.0", "aa:aa:aa:aa:aa:02"),
                    neigh("10.5.3.0", "aa:aa:aa:aa:aa:03"),
                ],
                vec![
                    fdb("aa:aa:aa:aa:aa:02", "192.168.0.2"),
                    fdb("aa:aa:aa:aa:aa:03", "192.168.0.3"),
                ],
            ),
            state(
                vec![
                    route("10.5.2.0/24", "10.5.2.9", 5, true),
                    route("10.5.4.0/24", "10.5.4.0", 5, true),
                ],
                vec![
                    neigh("10.5.2.0", "aa:aa:aa:aa:aa:09"),
                    neigh("10.5.4.0", "aa:aa:aa:aa:aa:04"),
                ],
                vec![
                    fdb("aa:aa:aa:aa:aa:02", "192.168.0.9"),
                    fdb("aa:aa:aa:aa:aa:04", "192.168.0.4"),
                ],
            ),
            KernelState::default(),
        ];
        let mut known = k.read(&own).await.unwrap();
        for desired in &steps {
            let r = apply_diff(&k, desired, &own, &mut known).await;
            assert!(r.failed.is_empty(), "{:?}", r.failed);
            assert_eq!(known, k.read(&own).await.unwrap());
            assert_eq!(&known, desired);
        }
    }

    #[tokio::test]
    async fn a_route_the_reader_cannot_see_is_never_added() {
        // Outside the cluster network: netlink's reader would not see it, so adding it would repeat
        // at every pass. It is not added at all.
        let k = FakeKernel::default();
        let desired = state(
            vec![
                route("10.5.2.0/24", "10.5.2.0", 5, true),
                route("10.99.0.0/16", "10.99.0.0", 5, true),
            ],
            vec![],
            vec![],
        );
        let r = reconcile_once(&k, &desired, &vxlan_own()).await.unwrap();
        assert_eq!(r.applied.get("add route"), Some(&1));
        let r = reconcile_once(&k, &desired, &vxlan_own()).await.unwrap();
        assert!(r.is_noop(), "{:?}", r.applied);
    }

    #[test]
    fn mac_text_round_trip_and_local_bit() {
        let m: MacAddr = "C6:d2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        assert!("c6:d2:32:6f:8f".parse::<MacAddr>().is_err());
        assert!("c6:d2:32:6f:8f:4g".parse::<MacAddr>().is_err());
        for _ in 0..20 {
            let r = MacAddr::random_local();
            assert_eq!(
                r.0[0] & 0x03,
                0x02,
                "{r} must be locally administered unicast"
            );
        }
    }
}
