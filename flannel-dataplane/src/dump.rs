//! Netlink dumps read as they arrive, in bounded memory.
//!
//! rtnetlink's connection task reads a whole dump off the socket into its queues before the caller
//! sees the first message (the kernel produces the next part of a dump as soon as the previous one
//! is read, so the socket never runs dry), and those queues keep their high-water size. At 20,000
//! vxlan peers one read of the kernel is 60,000 parsed messages: about 11 MiB at once, 3 MiB of it
//! kept for good. A [`Socket`] instead parses each message from one receive buffer and hands it on
//! before it reads the next part, so a dump of any size costs one buffer.
//!
//! It also asks the kernel to filter where the kernel can (`NETLINK_GET_STRICT_CHK`, Linux 4.20):
//! routes of the main table only, neighbours and FDB entries of the given device only. Callers
//! filter again, so a kernel that ignores a filter gives the same result.

use std::fmt::Debug;
use std::io;

use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
pub use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

/// The receive buffer: larger than the biggest part of a dump the kernel sends (32 KiB).
const BUFFER: usize = 64 * 1024;

/// A netlink socket of its own for requests and dumps, one at a time: each answer is parsed from
/// one receive buffer and handed on before the next part is read. flanneld reads routes,
/// neighbours and FDB entries through one (`NETLINK_ROUTE`); the wireguard backend configures
/// kernel WireGuard devices through another (`NETLINK_GENERIC`).
pub struct Socket {
    socket: TokioSocket,
    /// Whether the kernel checks dump requests strictly, and so applies their filters.
    strict: bool,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("strict", &self.strict)
            .finish_non_exhaustive()
    }
}

impl Socket {
    /// A socket of netlink `protocol` ([`NETLINK_ROUTE`], [`NETLINK_GENERIC`]) in the current
    /// thread's network namespace (needs a tokio runtime).
    ///
    /// # Errors
    /// When the kernel refuses the socket.
    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = TokioSocket::new(protocol)?;
        socket.socket_mut().bind_auto()?;
        socket.socket_mut().connect(&SocketAddr::new(0, 0))?;
        let strict = socket.socket_ref().set_netlink_get_strict_chk(true).is_ok();
        Ok(Self {
            socket,
            strict,
            seq: 0,
            buf: Vec::with_capacity(BUFFER),
        })
    }

    /// Whether the kernel applies the filters of a dump request (otherwise it ignores them).
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// Sends `request` as a dump and hands each answer to `each` as it is parsed. A message that
    /// cannot be parsed is skipped (logged at debug): an entry flanneld cannot read is one it never
    /// changes.
    ///
    /// # Errors
    /// When the socket fails or the kernel answers with an error.
    pub async fn dump<R, A>(&mut self, request: R, each: impl FnMut(A)) -> io::Result<()>
    where
        R: NetlinkSerializable + Debug,
        A: NetlinkDeserializable + Debug,
    {
        self.exchange(request, NLM_F_REQUEST | NLM_F_DUMP, each)
            .await
    }

    /// Sends `request` with an acknowledgement asked for and waits for it; answers before it go to
    /// `each`.
    ///
    /// # Errors
    /// When the socket fails or the kernel answers with an error (its errno in the `io::Error`).
    pub async fn request<R, A>(&mut self, request: R, each: impl FnMut(A)) -> io::Result<()>
    where
        R: NetlinkSerializable + Debug,
        A: NetlinkDeserializable + Debug,
    {
        self.exchange(request, NLM_F_REQUEST | NLM_F_ACK, each)
            .await
    }

    async fn exchange<R, A>(
        &mut self,
        request: R,
        flags: u16,
        mut each: impl FnMut(A),
    ) -> io::Result<()>
    where
        R: NetlinkSerializable + Debug,
        A: NetlinkDeserializable + Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.send(&out).await?;
        loop {
            self.buf.clear();
            self.socket.recv(&mut self.buf).await?;
            for m in messages::<A>(&self.buf) {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "skipping a netlink message that does not parse");
                        continue;
                    }
                };
                // Answers to an earlier request that was abandoned half-way are not ours.
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    // An error without a code is an acknowledgement: the end as well.
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(()),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::Overrun(_) => {
                        return Err(io::Error::other("the netlink dump overran its buffer"));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// An answer kept as bytes, for a caller that parses it itself (the payload after the netlink
/// header; for generic netlink it starts with the 4-byte generic header). Reading one cannot fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Raw {
    /// The message type (for generic netlink, the family id).
    pub message_type: u16,
    /// The payload.
    pub payload: Vec<u8>,
}

impl NetlinkDeserializable for Raw {
    type Error = std::convert::Infallible;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        Ok(Self {
            message_type: header.message_type,
            payload: payload.to_vec(),
        })
    }
}

/// The netlink messages in one datagram, each parsed on its own: a message that does not parse is
/// an `Err` and the next one is still read; a header whose length does not fit ends the datagram.
pub fn messages<I: NetlinkDeserializable + Debug>(
    buf: &[u8],
) -> impl Iterator<Item = Result<NetlinkMessage<I>, DecodeError>> + '_ {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = match NetlinkBuffer::new_checked(rest) {
            Ok(b) => b.length() as usize,
            Err(e) => {
                rest = &[];
                return Some(Err(e));
            }
        };
        // (The length is at least a header and at most what is left: `new_checked` says so.)
        let (this, next) = rest.split_at(len);
        // Messages start at 4-byte boundaries.
        let pad = (len.next_multiple_of(4) - len).min(next.len());
        rest = &next[pad..];
        Some(NetlinkMessage::deserialize(this))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::DoneMessage;
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::packet_route::route::RouteMessage;

    fn bytes(payload: NetlinkPayload<RouteNetlinkMessage>, seq: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(header, payload);
        m.finalize();
        let mut out = vec![0; m.buffer_len()];
        m.serialize(&mut out);
        out
    }

    #[test]
    fn splits_a_datagram_into_messages_and_skips_a_broken_one() {
        let route = bytes(
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(RouteMessage::default())),
            7,
        );
        let done = bytes(NetlinkPayload::Done(DoneMessage::default()), 7);
        // A message whose header claims a type this crate does not know, length intact.
        let mut broken = route.clone();
        broken[4] = 0xfe;
        let mut buf = route.clone();
        buf.extend(&broken);
        buf.extend(&done);
        let got: Vec<_> = messages::<RouteNetlinkMessage>(&buf).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(
            got[0].as_ref().map(|m| &m.payload),
            Ok(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(
                _
            )))
        ));
        assert!(got[1].is_err(), "{:?}", got[1]);
        assert!(matches!(
            got[2]
                .as_ref()
                .map(|m| (&m.payload, m.header.sequence_number)),
            Ok((NetlinkPayload::Done(_), 7))
        ));
    }

    #[test]
    fn a_length_that_does_not_fit_ends_the_datagram() {
        let mut buf = bytes(NetlinkPayload::Done(DoneMessage::default()), 1);
        buf[0] = 0xff; // length 255, but the datagram is shorter
        let got: Vec<_> = messages::<RouteNetlinkMessage>(&buf).collect();
        assert_eq!(got.len(), 1);
        assert!(got[0].is_err());
        assert_eq!(messages::<RouteNetlinkMessage>(&[1, 2, 3]).count(), 1);
        assert_eq!(messages::<RouteNetlinkMessage>(&[]).count(), 0);
    }
}
