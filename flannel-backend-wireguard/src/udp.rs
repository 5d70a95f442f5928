//! The UDP side of a userspace WireGuard device: gotatun's sockets (batched receives with GRO), with
//! sends batched. gotatun hands over one encrypted datagram at a time; they are queued, and a task
//! sends what the queue holds in one `sendmmsg` each time it runs (on flanneld's one runtime thread:
//! every datagram gotatun encrypted from one TUN read).
//!
//! The queue also keeps one failed send from stopping the device: gotatun ends its sending loop
//! at the first error a socket returns (an unreachable peer, a firewall's `EPERM`); here a batch
//! that fails is dropped (logged at debug), as a network drops packets, and sending goes on.

use std::io;
use std::net::SocketAddr;

use gotatun::packet::Packet;
use gotatun::udp::socket::{UdpSocket, UdpSocketFactory};
use gotatun::udp::{UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use tokio::sync::mpsc;

/// Datagrams waiting to be sent (a bound on what a burst may hold).
const QUEUE: usize = 1024;

/// Binds gotatun's sockets and batches their sends.
#[derive(Debug, Default)]
pub struct BatchedUdpFactory;

/// Queues datagrams for the sending task of one socket (which ends when every clone is dropped).
#[derive(Clone)]
pub struct BatchedSend {
    tx: mpsc::Sender<(Packet, SocketAddr)>,
    socket: UdpSocket,
}

impl std::fmt::Debug for BatchedSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchedSend").finish_non_exhaustive()
    }
}

impl BatchedSend {
    fn new(socket: UdpSocket) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(send_batches(socket.clone(), rx));
        Self { tx, socket }
    }
}

async fn send_batches(socket: UdpSocket, mut rx: mpsc::Receiver<(Packet, SocketAddr)>) {
    let max = socket.max_number_of_packets_to_send().max(1);
    let mut buf = Default::default();
    let mut batch = Vec::with_capacity(max);
    while rx.recv_many(&mut batch, max).await > 0 {
        if let Err(e) = socket.send_many_to(&mut buf, &mut batch).await {
            tracing::debug!(error = %e, dropped = batch.len(), "sending WireGuard datagrams");
        }
        batch.clear();
    }
}

impl UdpSend for BatchedSend {
    type SendManyBuf = ();

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.tx
            .send((packet, destination))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the UDP sender stopped"))
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        UdpSend::local_addr(&self.socket)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        UdpSend::set_fwmark(&self.socket, mark)
    }
}

impl UdpTransportFactory for BatchedUdpFactory {
    type SendV4 = BatchedSend;
    type SendV6 = BatchedSend;
    type RecvV4 = UdpSocket;
    type RecvV6 = UdpSocket;

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> io::Result<((BatchedSend, UdpSocket), (BatchedSend, UdpSocket))> {
        let ((s4, r4), (s6, r6)) = UdpSocketFactory.bind(params).await?;
        Ok(((BatchedSend::new(s4), r4), (BatchedSend::new(s6), r6)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gotatun::packet::PacketBufPool;

    fn packet(pool: &PacketBufPool, bytes: &[u8]) -> Packet {
        let mut p = pool.get();
        p[..bytes.len()].copy_from_slice(bytes);
        p.truncate(bytes.len());
        p
    }

    #[tokio::test]
    async fn a_send_that_fails_does_not_stop_the_ones_after_it() {
        let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let send = BatchedSend::new(UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap());
        let pool = PacketBufPool::new(4);
        // An IPv4 socket cannot send to an IPv6 address: the kernel refuses that datagram.
        send.send_to(packet(&pool, b"refused"), "[::1]:9".parse().unwrap())
            .await
            .unwrap();
        // Let the sending task take that one alone before the next is queued.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        send.send_to(packet(&pool, b"delivered"), listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n =
            tokio::task::spawn_blocking(move || listener.recv(&mut buf).map(|n| buf[..n].to_vec()))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(n, b"delivered");
    }
}
