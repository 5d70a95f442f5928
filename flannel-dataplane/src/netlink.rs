//! The real kernel seam over rtnetlink, plus the link and address helpers the backends need.
//!
//! Each method names the `ip`/`bridge` command it is equivalent to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoIpTunnel, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::{
    Handle, LinkIpIp, LinkUnspec, LinkVxlan, LinkWireguard, MulticastGroup, RouteMessageBuilder,
};

use crate::LinkOps;
use crate::changes::{Entry, KernelChange, NotificationSender, Notifications, notifications};
use crate::dump::{NETLINK_ROUTE, Socket};
use crate::nexthop::{self, NextHop, NexthopMessage};
use crate::{
    DataplaneError, Fdb, KernelCause, KernelOps, KernelState, MacAddr, Neigh, Op, Ownership, Route,
};

fn err(context: impl Into<String>, e: impl Into<KernelCause>) -> DataplaneError {
    DataplaneError {
        context: context.into(),
        cause: e.into(),
    }
}

/// A netlink connection to the kernel of the current network namespace.
///
/// The sockets for next-hop objects and for reading tables are opened at their first use, so a
/// connection that only manages links and addresses (a backend's devices) costs one socket.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
    /// Next-hop objects for routes with a gateway (see [`crate::nexthop`]); `None` when turned off.
    nexthops: Option<std::sync::Arc<Nexthops>>,
    /// A socket of its own for reading tables in bounded memory (see [`crate::dump`]).
    dumper: std::sync::Arc<tokio::sync::Mutex<Option<Socket>>>,
}

/// flanneld's next-hop objects: a connection for their messages (opened at the first use) and
/// what flanneld holds.
#[derive(Default)]
struct Nexthops {
    handle: std::sync::OnceLock<netlink_proto::ConnectionHandle<NexthopMessage>>,
    registry: std::sync::Mutex<nexthop::Registry>,
    /// Whether the kernel has next-hop objects (known after the first dump).
    enabled: tokio::sync::OnceCell<bool>,
    /// Where deletions of objects still in use are reported (see [`Netlink::subscribe`]).
    news: std::sync::Mutex<Option<NotificationSender>>,
}

impl std::fmt::Debug for Nexthops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nexthops")
            .field("enabled", &self.enabled.get())
            .finish_non_exhaustive()
    }
}

impl Nexthops {
    /// Opens the connection. Its socket also listens to next-hop notifications: the echoes of
    /// flanneld's own changes arrive as part of their requests' answers, everything else goes to
    /// [`Nexthops::on_notification`].
    fn open(self: &std::sync::Arc<Self>) -> std::io::Result<()> {
        use netlink_sys::AsyncSocket;
        let (mut conn, handle, mut messages) =
            netlink_proto::new_connection::<NexthopMessage>(netlink_sys::protocols::NETLINK_ROUTE)?;
        let socket = conn.socket_mut().socket_mut();
        // Bound first: the kernel delivers notifications only to sockets with an address.
        socket.bind(&netlink_sys::SocketAddr::new(0, 0))?;
        if let Err(e) = socket.add_membership(nexthop::RTNLGRP_NEXTHOP) {
            // Objects deleted by hand are then repaired at the next resync.
            tracing::info!(error = %e, "no notifications of next-hop objects");
        }
        tokio::spawn(conn);
        let _ = self.handle.set(handle);
        let nh = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some((msg, _)) = messages.next().await {
                let Some(nh) = nh.upgrade() else { return };
                nh.on_notification(msg.payload);
            }
        });
        Ok(())
    }

    /// Reports, as [`KernelChange::Other`], the deletion of an object of flanneld's that a route
    /// still points at (someone else's doing: flanneld deletes only objects no route uses).
    fn on_notification(&self, payload: NetlinkPayload<NexthopMessage>) {
        let news = match payload {
            NetlinkPayload::InnerMessage(m) => {
                m.kind == nexthop::RTM_DELNEXTHOP
                    && m.id.is_some_and(|id| self.registry().in_use(id))
            }
            // An error or overrun report: a deletion may have been lost.
            _ => true,
        };
        if news && let Some(tx) = self.news.lock().ok().as_deref().and_then(Option::as_ref) {
            tx.send(KernelChange::Other);
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, nexthop::Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `m`; the kernel's answers (a dump's objects, none for an acknowledged change).
    async fn send(&self, m: NexthopMessage) -> std::io::Result<Vec<NexthopMessage>> {
        let handle = self
            .handle
            .get()
            .ok_or_else(|| std::io::Error::other("no netlink socket for next-hop objects"))?;
        let mut answers = handle
            .clone()
            .request(nexthop::request(m), netlink_sys::SocketAddr::new(0, 0))
            .map_err(std::io::Error::other)?;
        let mut out = Vec::new();
        while let Some(msg) = answers.next().await {
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Whether next-hop objects are in use: on the first call, opens the connection and reads
    /// flanneld's objects from the kernel (a kernel without them answers the dump with an error:
    /// routes then carry their gateway, as before).
    async fn enabled(self: &std::sync::Arc<Self>) -> bool {
        *self
            .enabled
            .get_or_init(|| async {
                match self.open() {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::info!(error = %e, "no netlink socket for next-hop objects: routes carry their gateway");
                        return false;
                    }
                }
                match self.refresh().await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::info!(error = %e, "no next-hop objects in this kernel (before 5.3?): routes carry their gateway");
                        false
                    }
                }
            })
            .await
    }

    /// Reads flanneld's objects from the kernel (at the first use: left-overs of an earlier run are
    /// adopted, or deleted at the first full read when no route uses them).
    async fn refresh(&self) -> std::io::Result<()> {
        let objects = self.send(NexthopMessage::dump()).await?;
        let mut reg = self.registry();
        reg.clear_objects();
        for o in objects {
            if let (Some(id), Some(hop)) = (o.id, o.hop())
                && (nexthop::FIRST_ID..=nexthop::LAST_ID).contains(&id)
            {
                reg.insert(id, hop);
            }
        }
        Ok(())
    }

    /// The object for `hop`, created if flanneld has none.
    async fn ensure(&self, hop: NextHop) -> Result<u32, DataplaneError> {
        if let Some(id) = self.registry().id_of(&hop) {
            return Ok(id);
        }
        let context = || format!("add nexthop via {} dev #{}", hop.gateway, hop.oif);
        // An id another program took is skipped (bounded).
        for _ in 0..64 {
            let id = self.registry().next_free().ok_or_else(|| {
                err(
                    context(),
                    std::io::Error::other("no free nexthop id in flanneld's range"),
                )
            })?;
            match self.send(NexthopMessage::new_object(id, hop)).await {
                Ok(_) => {
                    self.registry().insert(id, hop);
                    return Ok(id);
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.registry().skip(id);
                }
                Err(e) => return Err(err(context(), e)),
            }
        }
        Err(err(
            context(),
            std::io::Error::from_raw_os_error(libc::EEXIST),
        ))
    }

    /// Deletes object `id` (gone already is fine) and forgets it.
    async fn delete(&self, id: u32) {
        match self.send(NexthopMessage::delete(id)).await {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::debug!(id, error = %e, "deleting a nexthop object"),
        }
        self.registry().remove(id);
    }
}

/// What the kernel reports about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// Index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC address.
    pub mac: Option<MacAddr>,
    /// Whether it is administratively up.
    pub up: bool,
    /// MTU.
    pub mtu: u32,
    /// The vxlan attributes, for a vxlan device.
    pub vxlan: Option<VxlanAttrs>,
    /// The tunnel's ends, for an ipip device.
    pub ipip: Option<IpipAttrs>,
    /// The link's kind (`ip -d link`: `vxlan`, `wireguard`, `tun`, ...), when it has one.
    pub kind: Option<String>,
}

/// The attributes of a vxlan device that decide whether it can be reused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    /// VNI.
    pub vni: u32,
    /// Underlay device index.
    pub link: Option<u32>,
    /// Local address (IPv4 for `flannel.N`, IPv6 for `flannel-v6.N`).
    pub local: Option<IpAddr>,
    /// UDP port (0: kernel default).
    pub port: u16,
    /// Whether learning is on.
    pub learning: bool,
    /// Whether Group Based Policy is on.
    pub gbp: bool,
}

/// What a vxlan device to create looks like (`ip link add <name> address <mac> mtu <mtu> type vxlan
/// id <vni> local <local> dev <link> [nolearning] [dstport <port>] [gbp]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name, `flannel.<VNI>`.
    pub name: String,
    /// The wanted attributes.
    pub attrs: VxlanAttrs,
    /// MAC address.
    pub mac: MacAddr,
    /// MTU.
    pub mtu: u32,
}

/// The ends of an ipip device (`ip -d link`: `ipip remote any local 172.20.0.11`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpipAttrs {
    /// The local end (`None`: any).
    pub local: Option<Ipv4Addr>,
    /// The remote end (`None`: any, as flannel's device has it: one device for every peer).
    pub remote: Option<Ipv4Addr>,
}

/// An ipip device to create (`ip link add <name> mtu <mtu> type ipip local <local>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipSpec {
    /// Device name, `flannel.ipip`.
    pub name: String,
    /// The local end: the external interface's address.
    pub local: Ipv4Addr,
    /// MTU.
    pub mtu: u32,
}

impl Netlink {
    /// `ip link add` of `msg`; an error says what was being done (`context`).
    async fn add_link(
        &self,
        msg: rtnetlink::packet_route::link::LinkMessage,
        context: impl FnOnce() -> String,
    ) -> Result<(), DataplaneError> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| err(context(), e))
    }

    /// Opens a connection (the connection task runs on the current tokio runtime).
    pub fn new() -> Result<Self, DataplaneError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| err("opening a netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            nexthops: Some(std::sync::Arc::default()),
            dumper: std::sync::Arc::default(),
        })
    }

    /// The socket for reading tables, opened at the first use.
    async fn dumper(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Socket>, DataplaneError> {
        let mut slot = self.dumper.lock().await;
        if slot.is_none() {
            *slot = Some(
                Socket::open(NETLINK_ROUTE)
                    .map_err(|e| err("opening a netlink socket for dumps", e))?,
            );
        }
        tokio::sync::MutexGuard::try_map(slot, Option::as_mut).map_err(|_| {
            err(
                "opening a netlink socket for dumps",
                std::io::Error::other("gone"),
            )
        })
    }

    /// The same connection without next-hop objects: routes carry their gateway (what a kernel
    /// before 5.3 gets).
    pub fn without_nexthops(mut self) -> Self {
        self.nexthops = None;
        self
    }

    /// The next-hop objects, when they are in use.
    async fn nexthops(&self) -> Option<&Nexthops> {
        let nh = self.nexthops.as_ref()?;
        nh.enabled().await.then_some(nh.as_ref())
    }

    /// `ip route replace <dst> nhid <id>`, the object (`via <gateway> dev <oif> [onlink]`) made
    /// first when flanneld has none; an object someone deleted is made again.
    async fn add_route_via_object(
        &self,
        nh: &Nexthops,
        r: &Route,
        gateway: IpAddr,
    ) -> Result<(), DataplaneError> {
        let hop = NextHop {
            gateway,
            oif: r.oif,
            onlink: r.onlink,
        };
        // Errors name the route (the object is how it is installed, not what the operator asked).
        let named = |e: DataplaneError| DataplaneError {
            context: format!("{} (via nexthop object)", Op::AddRoute(r.clone())),
            cause: e.cause,
        };
        let mut id = nh.ensure(hop).await.map_err(named)?;
        let mut result = self.replace_route_to_object(r.dst, id).await;
        // The kernel answers EINVAL ("Nexthop id does not exist") when the object is gone (deleted
        // by hand, or with its device): make it again and try once more. Other errors are the
        // route's; the object stays recorded (forgetting it would leak it in the kernel).
        if matches!(&result, Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EINVAL)
        {
            if nh.registry().in_use(id) {
                nh.registry().remove(id);
            } else {
                // Deleted if it does exist after all (ENOENT is fine), and forgotten.
                nh.delete(id).await;
            }
            id = nh.ensure(hop).await.map_err(named)?;
            result = self.replace_route_to_object(r.dst, id).await;
        }
        result.map_err(|e| err(Op::AddRoute(r.clone()).to_string(), e))?;
        let unused = nh.registry().set_route(r.dst, Some(id));
        if let Some(old) = unused {
            nh.delete(old).await;
        }
        Ok(())
    }

    async fn replace_route_to_object(&self, dst: IpNet, id: u32) -> Result<(), rtnetlink::Error> {
        let mut msg = route_to_object(dst, id);
        msg.header.protocol = RouteProtocol::Boot;
        self.handle.route().add(msg).replace().execute().await
    }

    /// `ip route del <dst> nhid <id>` (a route through an object matches no gateway), then the
    /// object when no other route uses it.
    async fn del_route_via_object(
        &self,
        nh: &Nexthops,
        r: &Route,
        id: u32,
    ) -> Result<(), DataplaneError> {
        let mut msg = route_to_object(r.dst, id);
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
            Err(e) => return Err(err(Op::DelRoute(r.clone()).to_string(), e)),
        }
        let unused = nh.registry().set_route(r.dst, None);
        if let Some(old) = unused {
            nh.delete(old).await;
        }
        Ok(())
    }

    /// Creates a kernel WireGuard device (`ip link add <name> type wireguard`). A kernel without
    /// WireGuard answers `EOPNOTSUPP` ([`DataplaneError::errno`]).
    ///
    /// # Errors
    /// When the kernel refuses the device.
    pub async fn create_wireguard(&self, name: &str) -> Result<(), DataplaneError> {
        let msg = LinkWireguard::new(name).build();
        self.add_link(msg, || format!("creating WireGuard device {name}"))
            .await
    }

    /// Subscribes to link, address, route and neighbour notifications, each turned into a
    /// [`KernelChange`] (up to 4096 queued; past that the receiver gets [`KernelChange::Other`]).
    /// When this connection uses next-hop objects, the deletion of one of flanneld's objects that
    /// a route still points at comes as [`KernelChange::Other`] too: the kernel takes the object's
    /// IPv4 routes along without a notification of their own. flanneld's own deletions (of objects
    /// no route uses) are not news.
    pub fn subscribe(&self) -> Result<Notifications, DataplaneError> {
        let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .map_err(|e| err("subscribing to netlink notifications", e))?;
        tokio::spawn(conn);
        let (tx, rx) = notifications(4096);
        if let Some(nh) = &self.nexthops
            && let Ok(mut news) = nh.news.lock()
        {
            *news = Some(tx.clone());
        }
        tokio::spawn(async move {
            while let Some((msg, _)) = messages.next().await {
                let change = match msg.payload {
                    NetlinkPayload::InnerMessage(m) => change_of(m),
                    // An error or overrun report: something may have been lost.
                    _ => Some(KernelChange::Other),
                };
                if let Some(c) = change
                    && !tx.send(c)
                {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// The addresses of a link, with their prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, DataplaneError> {
        let mut out = Vec::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| err(format!("listing addresses of link #{index}"), e))?
        {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(net) = ip.and_then(|ip| IpNet::new(ip, msg.header.prefix_len).ok()) {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Makes sure the main table has a blackhole route to `dst` (`ip route add blackhole <dst>`, what
    /// `--ip-blackhole-route` asks for); true when it had to be added. A route of another kind to
    /// the same prefix (a bridge's own route, say) makes the add fail with `EEXIST`.
    pub async fn ensure_blackhole(&self, dst: IpNet) -> Result<bool, DataplaneError> {
        let probe = match dst {
            IpNet::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpNet::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let mut routes = self.handle.route().get(probe).execute();
        while let Some(r) = routes
            .try_next()
            .await
            .map_err(|e| err("listing routes", e))?
        {
            if table_of(&r) == 254
                && r.header.kind == RouteType::BlackHole
                && route_dst(&r) == Some(dst)
            {
                return Ok(false);
            }
        }
        let msg = match dst {
            IpNet::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .kind(RouteType::BlackHole)
                .protocol(RouteProtocol::Boot)
                .build(),
            IpNet::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .kind(RouteType::BlackHole)
                .protocol(RouteProtocol::Boot)
                .build(),
        };
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(|e| err(format!("add blackhole route {dst}"), e))?;
        Ok(true)
    }

    /// The main-table routes of one family that `keep` accepts (`ip route show table main`), and
    /// in `nh_ids` the next-hop object of every main-table route that has one, with whether `keep`
    /// accepted the route.
    async fn routes(
        &self,
        v6: bool,
        keep: impl Fn(&Route) -> bool,
        out: &mut Vec<Route>,
        nh_ids: &mut Vec<(IpNet, u32, bool)>,
    ) -> Result<(), DataplaneError> {
        let mut request = RouteMessage::default();
        request.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let mut dumper = self.dumper().await?;
        if dumper.strict() {
            request.header.table = RouteHeader::RT_TABLE_MAIN;
        }
        dumper
            .dump(RouteNetlinkMessage::GetRoute(request), |m| {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    return;
                };
                let nh_id = nh_id_of(&r);
                // With nexthop_compat_mode off the kernel reports only the object: take its next
                // hop from what flanneld knows of its own objects.
                let route = route_of(&r).or_else(|| {
                    let hop = self.nexthops.as_ref()?.registry().hop_of(nh_id?)?;
                    Some(Route {
                        dst: route_dst(&r)?,
                        gateway: Some(hop.gateway),
                        oif: hop.oif,
                        onlink: hop.onlink,
                    })
                });
                if let Some(route) = route {
                    // Every route's object is in use, whoever's route it is (a second flanneld on
                    // the host, for another network, has objects of its own).
                    let kept = keep(&route);
                    if let Some(id) = nh_id {
                        nh_ids.push((route.dst, id, kept));
                    }
                    if kept {
                        out.push(route);
                    }
                }
            })
            .await
            .map_err(|e| err("listing routes", e))
    }

    /// The permanent neighbour entries (`family` Inet or Inet6) or FDB entries (Bridge) of device
    /// `ifindex` (`ip neigh show dev <ifindex> nud permanent`, `bridge fdb show dev <ifindex>`).
    async fn entries(
        &self,
        family: AddressFamily,
        ifindex: u32,
        out: &mut KernelState,
    ) -> Result<(), DataplaneError> {
        let mut request = NeighbourMessage::default();
        request.header.family = family;
        let mut dumper = self.dumper().await?;
        if family == AddressFamily::Bridge {
            // The FDB dump takes the device from the header (strict requests only).
            if dumper.strict() {
                request.header.ifindex = ifindex;
            }
        } else {
            request
                .attributes
                .push(NeighbourAttribute::IfIndex(ifindex));
        }
        dumper
            .dump(RouteNetlinkMessage::GetNeighbour(request), |m| {
                let RouteNetlinkMessage::NewNeighbour(n) = m else {
                    return;
                };
                if n.header.ifindex != ifindex {
                    return;
                }
                match neigh_entry(&n) {
                    Some(Entry::Fdb(e)) if family == AddressFamily::Bridge => {
                        out.fdb.insert(e);
                    }
                    Some(Entry::Neigh(e))
                        if family != AddressFamily::Bridge
                            && n.header.state == NeighbourState::Permanent =>
                    {
                        out.neighs.insert(e);
                    }
                    _ => {}
                }
            })
            .await
            .map_err(|e| {
                let what = if family == AddressFamily::Bridge {
                    "listing FDB entries"
                } else {
                    "listing neighbours"
                };
                err(what, e)
            })
    }
}

/// A main-table route message for `dst` through next-hop object `id` (`<dst> nhid <id>`).
fn route_to_object(dst: IpNet, id: u32) -> RouteMessage {
    let mut msg = match dst {
        IpNet::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .build(),
        IpNet::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .build(),
    };
    msg.attributes.push(RouteAttribute::NhId(id));
    msg
}

/// The next-hop object a route points at (`RTA_NH_ID`).
fn nh_id_of(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::NhId(id) => Some(*id),
        _ => None,
    })
}

fn link_state(msg: rtnetlink::packet_route::link::LinkMessage) -> LinkState {
    let mut s = LinkState {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        mtu: 0,
        vxlan: None,
        ipip: None,
        kind: None,
    };
    for a in msg.attributes {
        match a {
            LinkAttribute::IfName(n) => s.name = n,
            LinkAttribute::Mtu(m) => s.mtu = m,
            LinkAttribute::Address(mac) => s.mac = MacAddr::try_from(mac.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                s.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
                let is_vxlan = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
                if is_vxlan {
                    let mut v = VxlanAttrs {
                        learning: true,
                        ..Default::default()
                    };
                    for i in &infos {
                        if let LinkInfo::Data(InfoData::Vxlan(data)) = i {
                            for d in data {
                                match *d {
                                    InfoVxlan::Id(id) => v.vni = id,
                                    InfoVxlan::Link(l) => v.link = Some(l),
                                    InfoVxlan::Local(l) => v.local = Some(IpAddr::V4(l)),
                                    InfoVxlan::Local6(l) => v.local = Some(IpAddr::V6(l)),
                                    InfoVxlan::Port(p) => v.port = p,
                                    InfoVxlan::Learning(l) => v.learning = l,
                                    InfoVxlan::Gbp => v.gbp = true,
                                    _ => {}
                                }
                            }
                        }
                    }
                    s.vxlan = Some(v);
                }
                if infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::IpIp)))
                {
                    s.ipip = Some(ipip_attrs(&infos));
                }
            }
            _ => {}
        }
    }
    s
}

/// An ipip device's ends from its link info; the unspecified address (what the kernel reports for
/// `any`) is `None`.
fn ipip_attrs(infos: &[LinkInfo]) -> IpipAttrs {
    let mut a = IpipAttrs::default();
    let end = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) if !v4.is_unspecified() => Some(*v4),
        _ => None,
    };
    for i in infos {
        if let LinkInfo::Data(InfoData::IpTunnel(data)) = i {
            for d in data {
                match d {
                    InfoIpTunnel::Local(ip) => a.local = end(ip),
                    InfoIpTunnel::Remote(ip) => a.remote = end(ip),
                    _ => {}
                }
            }
        }
    }
    a
}

/// What a notification says, or `None` when it cannot concern flannel's entries (routes of other
/// tables).
fn change_of(m: RouteNetlinkMessage) -> Option<KernelChange> {
    let entry = |added: bool, e: Entry| {
        Some(if added {
            KernelChange::Added(e)
        } else {
            KernelChange::Removed(e)
        })
    };
    match m {
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r)
            if table_of(&r) != 254 =>
        {
            None
        }
        RouteNetlinkMessage::NewRoute(r) => match route_of(&r) {
            Some(route) => entry(true, Entry::Route(route)),
            None => Some(KernelChange::Other),
        },
        RouteNetlinkMessage::DelRoute(r) => match route_of(&r) {
            Some(route) => entry(false, Entry::Route(route)),
            None => Some(KernelChange::Other),
        },
        RouteNetlinkMessage::NewNeighbour(n) => Some(match neigh_entry(&n) {
            Some(e) if n.header.state == NeighbourState::Permanent => KernelChange::Added(e),
            _ => KernelChange::OnDevice(n.header.ifindex),
        }),
        RouteNetlinkMessage::DelNeighbour(n) => Some(match neigh_entry(&n) {
            Some(e) => KernelChange::Removed(e),
            None => KernelChange::OnDevice(n.header.ifindex),
        }),
        _ => Some(KernelChange::Other),
    }
}

/// A neighbour message as a neighbour (IPv4/IPv6) or an FDB entry (bridge family), when it carries
/// both addresses.
fn neigh_entry(m: &NeighbourMessage) -> Option<Entry> {
    let ip = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(d) => neigh_ip(d),
        _ => None,
    })?;
    let mac = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => MacAddr::try_from(l.as_slice()).ok(),
        _ => None,
    })?;
    let ifindex = m.header.ifindex;
    Some(if m.header.family == AddressFamily::Bridge {
        Entry::Fdb(Fdb {
            ifindex,
            mac,
            dst: ip,
        })
    } else {
        Entry::Neigh(Neigh { ifindex, ip, mac })
    })
}

fn table_of(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// A route message's destination prefix (`0.0.0.0/0` or `::/0` for a default route).
fn route_dst(r: &RouteMessage) -> Option<IpNet> {
    let ip = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        })
        .or_else(|| {
            (r.header.destination_prefix_length == 0).then_some(match r.header.address_family {
                AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            })
        })?;
    IpNet::new(ip, r.header.destination_prefix_length).ok()
}

/// Converts a dumped route of the main table with one next hop into a [`Route`].
fn route_of(r: &RouteMessage) -> Option<Route> {
    if table_of(r) != 254 || r.header.kind != RouteType::Unicast {
        return None;
    }
    let mut gateway = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = route_dst(r)?;
    Some(Route {
        dst,
        gateway,
        oif: oif?,
        onlink: r.header.flags.contains(RouteFlags::Onlink),
    })
}

fn route_message(r: &Route) -> RouteMessage {
    let mut msg = match (r.dst, r.gateway) {
        (IpNet::V4(d), gw) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .output_interface(r.oif);
            if let Some(IpAddr::V4(g)) = gw {
                b = b.gateway(g);
            }
            if r.onlink {
                b = b.onlink();
            }
            b.build()
        }
        (IpNet::V6(d), gw) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .output_interface(r.oif);
            if let Some(IpAddr::V6(g)) = gw {
                b = b.gateway(g);
            }
            if r.onlink {
                b = b.onlink();
            }
            b.build()
        }
    };
    msg.header.protocol = RouteProtocol::Boot;
    if r.gateway.is_none() {
        // A device route (`ip route add <dst> dev <oif>`) has link scope.
        msg.header.scope = RouteScope::Link;
    }
    msg
}

fn neigh_message(family: AddressFamily, ifindex: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = ifindex;
    m
}

fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

fn neigh_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        // FDB dumps carry the remote address as raw bytes.
        NeighbourAddress::Other(b) if b.len() == 4 => {
            Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
        }
        NeighbourAddress::Other(b) if b.len() == 16 => <[u8; 16]>::try_from(b.as_slice())
            .ok()
            .map(|o| IpAddr::V6(o.into())),
        _ => None,
    }
}

#[async_trait]
impl LinkOps for Netlink {
    /// The link called `name` (`ip -d link show <name>`).
    async fn link_by_name(&self, name: &str) -> Result<Option<LinkState>, DataplaneError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_state(msg))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(err(format!("looking up link {name}"), e)),
        }
    }

    /// Creates a vxlan device.
    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), DataplaneError> {
        let a = &spec.attrs;
        let mut b = LinkVxlan::new(&spec.name, a.vni)
            .learning(a.learning)
            .address(spec.mac.0.to_vec())
            .mtu(spec.mtu);
        if let Some(l) = a.link {
            b = b.dev(l);
        }
        match a.local {
            Some(IpAddr::V4(l)) => b = b.local(l),
            Some(IpAddr::V6(l)) => b = b.local6(l),
            None => {}
        }
        if a.port > 0 {
            b = b.port(a.port);
        }
        if a.gbp {
            b = b.gbp();
        }
        self.add_link(b.build(), || {
            format!("creating vxlan device {} (vni {})", spec.name, a.vni)
        })
        .await
    }

    /// Creates an ipip device.
    async fn create_ipip(&self, spec: &IpipSpec) -> Result<(), DataplaneError> {
        let b = LinkIpIp::new(&spec.name).local(spec.local).mtu(spec.mtu);
        self.add_link(b.build(), || {
            format!("creating ipip device {} (local {})", spec.name, spec.local)
        })
        .await
    }

    /// Deletes a link (`ip link del`).
    async fn delete_link(&self, index: u32) -> Result<(), DataplaneError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| err(format!("deleting link #{index}"), e))
    }

    /// Sets a link up (`ip link set <dev> up`).
    async fn set_up(&self, index: u32) -> Result<(), DataplaneError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| err(format!("setting link #{index} up"), e))
    }

    /// Sets a link's MTU (`ip link set <dev> mtu <mtu>`).
    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), DataplaneError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| err(format!("setting the MTU of link #{index} to {mtu}"), e))
    }

    /// Makes `addr` the only address of `index` inside `network` (`ip addr add`, `ip addr del` of the
    /// others), as Go flannel's `EnsureV4AddressOnLink`.
    async fn ensure_only_address(
        &self,
        index: u32,
        addr: IpNet,
        network: IpNet,
    ) -> Result<(), DataplaneError> {
        let have = self.addresses(index).await?;
        for a in &have {
            if *a != addr && network.contains(&a.addr()) {
                let mut msgs = self
                    .handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .set_address_filter(a.addr())
                    .execute();
                if let Ok(Some(m)) = msgs.try_next().await {
                    self.handle.address().del(m).execute().await.map_err(|e| {
                        err(format!("removing stale address {a} from link #{index}"), e)
                    })?;
                }
            }
        }
        if !have.contains(&addr) {
            self.handle
                .address()
                .add(index, addr.addr(), addr.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(|e| err(format!("adding address {addr} to link #{index}"), e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl KernelOps for Netlink {
    async fn host_routes(&self) -> Result<Vec<Route>, DataplaneError> {
        let (mut routes, mut ids) = (Vec::new(), Vec::new());
        self.routes(false, |_| true, &mut routes, &mut ids).await?;
        self.routes(true, |_| true, &mut routes, &mut ids).await?;
        Ok(routes)
    }

    async fn read(&self, own: &Ownership) -> Result<KernelState, DataplaneError> {
        let mut out = KernelState::default();
        let (mut routes, mut ids) = (Vec::new(), Vec::new());
        let in_networks = |r: &Route| own.networks.iter().any(|n| n.contains(&r.dst));
        if own.networks.iter().any(|n| n.addr().is_ipv4()) {
            self.routes(false, in_networks, &mut routes, &mut ids)
                .await?;
        }
        if own.networks.iter().any(|n| n.addr().is_ipv6()) {
            self.routes(true, in_networks, &mut routes, &mut ids)
                .await?;
        }
        out.routes.extend(routes);
        // What the routes point at, as read; objects of flanneld's that no route uses go.
        // (The objects themselves were read once, at the first use; flanneld's own changes keep
        // that record, and an object deleted by hand shows as a failed route, which is retried.)
        if let Some(nh) = self.nexthops().await {
            let read_v4 = own.networks.iter().any(|n| n.addr().is_ipv4());
            let read_v6 = own.networks.iter().any(|n| n.addr().is_ipv6());
            let unused = nh.registry().reset_routes(ids, |hop| {
                (if hop.gateway.is_ipv4() {
                    read_v4
                } else {
                    read_v6
                }) && (own.gateway_route_oifs.contains(&hop.oif)
                    || own.route_oifs.contains(&hop.oif))
            });
            for id in unused {
                nh.delete(id).await;
            }
        }
        for &ifindex in &own.neigh_ifindexes {
            for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                self.entries(family, ifindex, &mut out).await?;
            }
        }
        for &ifindex in &own.fdb_ifindexes {
            self.entries(AddressFamily::Bridge, ifindex, &mut out)
                .await?;
        }
        Ok(out)
    }

    async fn apply(&self, op: &Op) -> Result<(), DataplaneError> {
        tracing::trace!(%op, "netlink");
        let result = match op {
            Op::AddRoute(r) => match (self.nexthops().await, r.gateway) {
                (Some(nh), Some(gateway)) => {
                    return self.add_route_via_object(nh, r, gateway).await;
                }
                _ => {
                    self.handle
                        .route()
                        .add(route_message(r))
                        .replace()
                        .execute()
                        .await
                }
            },
            Op::DelRoute(r) => {
                if let Some(nh) = self.nexthops().await {
                    let id = nh.registry().route(&r.dst);
                    if let Some(id) = id {
                        return self.del_route_via_object(nh, r, id).await;
                    }
                }
                let mut m = route_message(r);
                // Match routes whoever built them.
                m.header.protocol = RouteProtocol::Unspec;
                m.header.scope = RouteScope::NoWhere;
                self.handle.route().del(m).execute().await
            }
            Op::AddNeigh(n) => {
                self.handle
                    .neighbours()
                    .add(n.ifindex, n.ip)
                    .link_layer_address(&n.mac.0)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            Op::DelNeigh(n) => {
                let family = if n.ip.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let mut m = neigh_message(family, n.ifindex);
                m.attributes
                    .push(NeighbourAttribute::Destination(neigh_addr(n.ip)));
                self.handle.neighbours().del(m).execute().await
            }
            Op::AddFdb(e) => {
                self.handle
                    .neighbours()
                    .add_bridge(e.ifindex, &e.mac.0)
                    .destination(e.dst)
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            Op::DelFdb(e) => {
                let mut m = neigh_message(AddressFamily::Bridge, e.ifindex);
                m.header.flags = NeighbourFlags::Own;
                m.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(e.mac.0.to_vec()));
                m.attributes
                    .push(NeighbourAttribute::Destination(neigh_addr(e.dst)));
                self.handle.neighbours().del(m).execute().await
            }
        };
        result.map_err(|e| err(op.to_string(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipip_ends_read_as_the_kernel_reports_them() {
        let info = |local: &str, remote: &str| {
            vec![
                LinkInfo::Kind(InfoKind::IpIp),
                LinkInfo::Data(InfoData::IpTunnel(vec![
                    InfoIpTunnel::Link(0),
                    InfoIpTunnel::Local(local.parse().unwrap()),
                    InfoIpTunnel::Remote(remote.parse().unwrap()),
                    InfoIpTunnel::Ttl(0),
                ])),
            ]
        };
        // `ip link add flannel.ipip type ipip local 172.20.0.11`: remote any is 0.0.0.0.
        assert_eq!(
            ipip_attrs(&info("172.20.0.11", "0.0.0.0")),
            IpipAttrs {
                local: Some(Ipv4Addr::new(172, 20, 0, 11)),
                remote: None
            }
        );
        assert_eq!(
            ipip_attrs(&info("0.0.0.0", "192.0.2.7")),
            IpipAttrs {
                local: None,
                remote: Some(Ipv4Addr::new(192, 0, 2, 7))
            }
        );
        assert_eq!(
            ipip_attrs(&[LinkInfo::Kind(InfoKind::IpIp)]),
            IpipAttrs::default()
        );
    }
}
