//! The kernel's IPsec policies over XFRM netlink: read them all, add or replace one, delete one.

use std::net::IpAddr;

use flannel_core::BackendError;
use std::net::Ipv4Addr;

use flannel_dataplane::dump::{Raw, Socket};
use ipnet::Ipv4Net;
use netlink_packet_xfrm::{UserTemplate, XFRM_MSG_NEWPOLICY, XfrmMessage};
use netlink_sys::protocols::NETLINK_XFRM;
use xfrmnetlink::Handle;

use crate::peers::{Dir, KernelPolicy, Policy, REQID, Template};

const AF_INET: u16 = libc::AF_INET as u16;

fn error(what: &str, e: xfrmnetlink::Error) -> BackendError {
    let detail = match &e {
        xfrmnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    };
    BackendError::Other(format!("{what}: {detail}"))
}

/// A connection to the kernel's XFRM netlink family.
#[derive(Debug, Clone)]
pub struct Xfrm {
    handle: Handle,
}

impl Xfrm {
    /// Opens the connection (its task runs on the current tokio runtime).
    pub fn new() -> Result<Self, BackendError> {
        let (conn, handle, _) = xfrmnetlink::new_connection()
            .map_err(|e| BackendError::Other(format!("cannot open an XFRM netlink socket: {e}")))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Whether the kernel has ESP (module `esp4`): a probe SA (ESP, AES-CBC with HMAC-SHA256,
    /// between two documentation addresses, 192.0.2.1 and 192.0.2.2, that no host uses) is added
    /// and deleted at once. `false` only when the kernel says it has no ESP; an error of another
    /// kind (the probe's algorithms missing) is no answer, and the backend goes on.
    pub async fn has_esp(&self) -> Result<bool, BackendError> {
        let (src, dst) = (
            IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2)),
        );
        let spi = 0xf1a0_0000 | (std::process::id() & 0xffff);
        let esp = libc::IPPROTO_ESP as u8;
        let add = self
            .handle
            .state()
            .add(src, dst)
            .protocol(esp)
            .spi(spi)
            .mode(1)
            .encryption("cbc(aes)", &vec![0x5a; 16])
            .map_err(|e| error("building the ESP probe", e))?
            .authentication("hmac(sha256)", &vec![0xa5; 32])
            .map_err(|e| error("building the ESP probe", e))?;
        match add.execute().await {
            Ok(()) => {
                let _ = self
                    .handle
                    .state()
                    .delete(src, dst)
                    .protocol(esp)
                    .spi(spi)
                    .execute()
                    .await;
                Ok(true)
            }
            Err(xfrmnetlink::Error::NetlinkError(m))
                if m.to_io().raw_os_error() == Some(libc::EPROTONOSUPPORT) =>
            {
                Ok(false)
            }
            Err(e) => Err(error("probing the kernel for ESP", e)),
        }
    }

    /// Every IPv4 policy of the main policy database (with its first template, if any), read on
    /// a socket of its own and parsed by [`policy_of`] (netlink-packet-xfrm's parser indexes past
    /// the end of a short message: fuzzing found it).
    pub async fn policies(&self) -> Result<Vec<KernelPolicy>, BackendError> {
        let mut socket = Socket::open(NETLINK_XFRM)
            .map_err(|e| BackendError::Other(format!("cannot open an XFRM netlink socket: {e}")))?;
        let mut out = Vec::new();
        let request = XfrmMessage::GetPolicy(netlink_packet_xfrm::policy::DelGetMessage::default());
        socket
            .dump(request, |m: Raw| {
                if m.message_type == XFRM_MSG_NEWPOLICY
                    && let Some(p) = policy_of(&m.payload)
                {
                    out.push(p);
                }
            })
            .await
            .map_err(|e| {
                BackendError::Other(format!("reading the kernel's IPsec policies: {e}"))
            })?;
        Ok(out)
    }

    /// Adds `p`, or replaces the policy of its selector and direction.
    pub async fn upsert(&self, p: &Policy) -> Result<(), BackendError> {
        let mut tmpl = UserTemplate::default();
        tmpl.source(&IpAddr::V4(p.tmpl_src));
        tmpl.destination(&IpAddr::V4(p.tmpl_dst));
        tmpl.protocol(libc::IPPROTO_ESP as u8);
        tmpl.mode(1);
        tmpl.reqid(REQID);
        self.handle
            .policy()
            .update(
                IpAddr::V4(p.src.network()),
                p.src.prefix_len(),
                IpAddr::V4(p.dst.network()),
                p.dst.prefix_len(),
            )
            .direction(p.dir.kernel())
            .add_template(tmpl)
            .execute()
            .await
            .map_err(|e| error(&format!("installing the IPsec policy {p}"), e))
    }

    /// Deletes the policy of `p`'s selector and direction (gone already is fine).
    pub async fn delete(&self, p: &Policy) -> Result<(), BackendError> {
        let r = self
            .handle
            .policy()
            .delete(
                IpAddr::V4(p.src.network()),
                p.src.prefix_len(),
                IpAddr::V4(p.dst.network()),
                p.dst.prefix_len(),
            )
            .direction(p.dir.kernel())
            .execute()
            .await;
        match r {
            Err(xfrmnetlink::Error::NetlinkError(m))
                if m.to_io().raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            r => r.map_err(|e| error(&format!("deleting the IPsec policy {p}"), e)),
        }
    }
}

/// The size of `struct xfrm_userpolicy_info`, the fixed part of a policy message.
const POLICY_INFO_LEN: usize = 168;
/// The size of `struct xfrm_user_tmpl`.
const TMPL_LEN: usize = 64;
/// `XFRMA_TMPL`: the policy's templates.
const XFRMA_TMPL: u16 = 5;

fn ipv4_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(a))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The policy of one dump message's payload (`XFRM_MSG_NEWPOLICY`: `struct xfrm_userpolicy_info`
/// and attributes), if it is an IPv4 policy in one of the three directions. Read with bounds
/// checks throughout: a short or malformed message is `None`, never a panic.
pub fn policy_of(payload: &[u8]) -> Option<KernelPolicy> {
    let info = payload.get(..POLICY_INFO_LEN)?;
    // The selector: daddr 0..16, saddr 16..32, ports, family at 40, prefix lengths at 42 and 43.
    if u16_at(info, 40)? != AF_INET {
        return None;
    }
    let dst = Ipv4Net::new(ipv4_at(info, 0)?, *info.get(42)?).ok()?;
    let src = Ipv4Net::new(ipv4_at(info, 16)?, *info.get(43)?).ok()?;
    let dir = Dir::from_kernel(*info.get(160)?)?;
    let mut tmpl = None;
    let mut rest = payload.get(POLICY_INFO_LEN..)?;
    while rest.len() >= 4 && tmpl.is_none() {
        let len = usize::from(u16_at(rest, 0)?);
        let kind = u16_at(rest, 2)? & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        if kind == XFRMA_TMPL
            && let Some(t) = rest.get(4..len).and_then(|b| b.get(..TMPL_LEN))
            && u16_at(t, 24)? == AF_INET
        {
            // id: daddr 0..16, spi 16..20, proto 20; family 24; saddr 28..44; reqid 44; mode 48.
            tmpl = Some(Template {
                src: ipv4_at(t, 28)?,
                dst: ipv4_at(t, 0)?,
                proto: *t.get(20)?,
                mode: *t.get(48)?,
                reqid: u32_at(t, 44)?,
            });
        }
        rest = rest.get(len.next_multiple_of(4).min(rest.len())..)?;
    }
    Some(KernelPolicy {
        src: src.trunc(),
        dst: dst.trunc(),
        dir,
        tmpl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_xfrm::XfrmAttrs;
    use netlink_packet_xfrm::policy::ModifyMessage;

    /// A policy as the kernel sends it in a dump (`XFRM_MSG_NEWPOLICY`), serialized.
    fn dump_message(p: &Policy, reqid: u32, tmpl_family: u16) -> Vec<u8> {
        let mut m = ModifyMessage::default();
        let sel = &mut m.user_policy_info.selector;
        sel.family = AF_INET;
        sel.saddr = netlink_packet_xfrm::Address::from_ipv4(&p.src.network());
        sel.daddr = netlink_packet_xfrm::Address::from_ipv4(&p.dst.network());
        sel.prefixlen_s = p.src.prefix_len();
        sel.prefixlen_d = p.dst.prefix_len();
        m.user_policy_info.direction = p.dir.kernel();
        let mut t = UserTemplate::default();
        t.source(&IpAddr::V4(p.tmpl_src));
        t.destination(&IpAddr::V4(p.tmpl_dst));
        t.protocol(libc::IPPROTO_ESP as u8);
        t.mode(1);
        t.reqid(reqid);
        t.family = tmpl_family;
        m.nlas.push(XfrmAttrs::Template(vec![t]));
        let mut msg =
            NetlinkMessage::new(NetlinkHeader::default(), XfrmMessage::AddPolicy(m).into());
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    /// The message's payload read as the dump reads it.
    fn read(bytes: &[u8]) -> Option<KernelPolicy> {
        let m = flannel_dataplane::dump::messages::<Raw>(bytes)
            .next()?
            .ok()?;
        match m.payload {
            NetlinkPayload::InnerMessage(raw) => {
                assert_eq!(raw.message_type, XFRM_MSG_NEWPOLICY);
                policy_of(&raw.payload)
            }
            _ => None,
        }
    }

    #[test]
    fn a_dumped_policy_reads_back_as_upstreams_shape() {
        let p = Policy {
            src: "10.5.1.0/24".parse().unwrap(),
            dst: "10.5.2.0/24".parse().unwrap(),
            dir: Dir::Fwd,
            tmpl_src: "192.168.0.2".parse().unwrap(),
            tmpl_dst: "192.168.0.1".parse().unwrap(),
        };
        let k = read(&dump_message(&p, REQID, AF_INET)).expect("an IPv4 policy");
        assert_eq!(k.as_flannel(), Some(p));
        // Another request id: a policy, but not flannel's shape.
        let k = read(&dump_message(&p, 7, AF_INET)).expect("an IPv4 policy");
        assert_eq!((k.src, k.dst, k.dir), (p.src, p.dst, p.dir));
        assert_eq!(k.as_flannel(), None);
        // An IPv6 outer template is not read as IPv4 addresses.
        let k = read(&dump_message(&p, REQID, libc::AF_INET6 as u16)).expect("a policy");
        assert_eq!(k.tmpl, None);
        assert_eq!(k.as_flannel(), None);
        // Truncated anywhere: no panic; without its template, not flannel's.
        let bytes = dump_message(&p, REQID, AF_INET);
        let payload = &bytes[16..];
        for n in 0..payload.len() {
            if let Some(k) = policy_of(&payload[..n]) {
                assert_eq!(k.as_flannel(), None, "{n} bytes");
            }
        }
    }
}
