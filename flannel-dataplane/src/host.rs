//! Reading the host's links, addresses and default routes over netlink, and choosing the external
//! interface from them with the pure [`flannel_core::iface::choose`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_core::iface::{
    ExternalInterface, HostAddr, HostLink, HostSnapshot, IfaceError, IfaceSpec, choose,
};
use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};

fn nl<E: fmt::Display>(e: E) -> IfaceError {
    IfaceError::Netlink(e.to_string())
}

/// Reads links, addresses and default routes of the current network namespace over netlink, and
/// asks the kernel's route lookup for `can_reach` when given.
pub async fn read_host(can_reach: Option<IpAddr>) -> Result<HostSnapshot, IfaceError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(nl)?;
    let conn = tokio::spawn(conn);
    let result = async {
        let mut host = HostSnapshot::default();
        let mut links = handle.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(nl)? {
            let mut link = HostLink {
                index: msg.header.index,
                name: String::new(),
                mtu: 0,
                addrs: Vec::new(),
            };
            for a in msg.attributes {
                match a {
                    LinkAttribute::IfName(n) => link.name = n,
                    LinkAttribute::Mtu(m) => link.mtu = m,
                    _ => {}
                }
            }
            host.links.push(link);
        }
        host.links.sort_by_key(|l| l.index);
        let mut addrs = handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.map_err(nl)? {
            let mut ip = None;
            let mut local = None;
            let mut flags = AddressFlags::empty();
            for a in msg.attributes {
                match a {
                    AddressAttribute::Address(a) => ip = Some(a),
                    AddressAttribute::Local(a) => local = Some(a),
                    AddressAttribute::Flags(f) => flags = f,
                    _ => {}
                }
            }
            if let (Some(ip), Some(link)) = (
                local.or(ip),
                host.links.iter_mut().find(|l| l.index == msg.header.index),
            ) {
                link.addrs.push(HostAddr {
                    ip,
                    prefix_len: msg.header.prefix_len,
                    deprecated: flags.contains(AddressFlags::Deprecated),
                    permanent: flags.contains(AddressFlags::Permanent),
                });
            }
        }
        // Default routes: the first of each family, from the same route dump the data plane uses.
        let kernel = crate::netlink::Netlink::new().map_err(|e| nl(flannel_core::chain(&e)))?;
        let routes = crate::KernelOps::host_routes(&kernel)
            .await
            .map_err(|e| nl(flannel_core::chain(&e)))?;
        for r in routes {
            if r.dst.prefix_len() != 0 {
                continue;
            }
            let slot = if r.dst.addr().is_ipv6() {
                &mut host.default_v6
            } else {
                &mut host.default_v4
            };
            if slot.is_none() {
                *slot = Some(r.oif);
            }
        }
        if let Some(target) = can_reach {
            let msg = match target {
                IpAddr::V4(a) => rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(a, 32)
                    .build(),
                IpAddr::V6(a) => rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(a, 128)
                    .build(),
            };
            let mut req = handle.route().get(msg);
            req.message_mut().header.address_family = if target.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let mut routes = req.execute();
            if let Ok(Some(r)) = routes.try_next().await {
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                let src = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::PrefSource(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                    RouteAttribute::PrefSource(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                    _ => None,
                });
                host.can_reach = oif.map(|i| (i, src));
            }
        }
        Ok(host)
    }
    .await;
    conn.abort();
    result
}

/// Reads the host over netlink and [`choose`]s the external interface.
pub async fn select_external_interface(spec: &IfaceSpec) -> Result<ExternalInterface, IfaceError> {
    let host = read_host(spec.can_reach).await?;
    choose(spec, &host)
}
