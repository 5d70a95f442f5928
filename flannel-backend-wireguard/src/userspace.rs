//! A userspace WireGuard device over TUN (gotatun), for kernels without the WireGuard module. The
//! TUN side is ours ([`crate::tun`]: offloads and batched writes), and so is the UDP side
//! ([`crate::udp`]: GSO sends, GRO receives); gotatun does the protocol.

use std::collections::BTreeMap;

use gotatun::device::{Device, DeviceBuilder, Peer};
use gotatun::x25519::{PublicKey, StaticSecret};

use crate::tun::{TunReader, TunWriter};
use crate::udp::OffloadUdpFactory;

use crate::key::{Key, PrivateKey};
use crate::peers::{PeerOp, PeerSpec};

/// The device failed.
#[derive(Debug, thiserror::Error)]
#[error("WireGuard device {name}: {message}")]
pub struct DeviceError {
    /// The device.
    pub name: String,
    /// What went wrong.
    pub message: String,
}

/// A running userspace WireGuard device: a TUN device of that name plus its UDP socket(s).
pub struct UserspaceDevice {
    name: String,
    device: Device<(OffloadUdpFactory, TunWriter, TunReader)>,
}

impl std::fmt::Debug for UserspaceDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserspaceDevice({})", self.name)
    }
}

fn peer_of(spec: &PeerSpec) -> Peer {
    let mut p = Peer::new(PublicKey::from(spec.public_key.0));
    p.endpoint = Some(spec.endpoint);
    p.allowed_ips = spec.allowed_ips.iter().filter_map(gotatun_net).collect();
    p.preshared_key = spec.preshared_key.map(|k| k.0);
    p.keepalive = spec.keepalive.and_then(|d| u16::try_from(d.as_secs()).ok());
    p
}

fn gotatun_net(n: &ipnet::IpNet) -> Option<ipnetwork::IpNetwork> {
    ipnetwork::IpNetwork::new(n.addr(), n.prefix_len()).ok()
}

impl UserspaceDevice {
    /// Creates the TUN device `name` with `mtu` and starts WireGuard on `port` with `key`.
    pub async fn create(
        name: &str,
        key: &PrivateKey,
        port: u16,
        mtu: u16,
    ) -> Result<Self, DeviceError> {
        let err = |message: String| DeviceError {
            name: name.into(),
            message,
        };
        let (writer, reader) =
            crate::tun::open(name, mtu).map_err(|e| err(format!("TUN device: {e}")))?;
        let device = DeviceBuilder::new()
            .with_udp(OffloadUdpFactory)
            .with_ip_pair(writer, reader)
            .with_private_key(StaticSecret::from(key.to_bytes()))
            .build()
            .await
            .map_err(|e| err(e.to_string()))?;
        // The device binds its UDP sockets and starts forwarding on a configuration change (at
        // build only when it already has peers): setting the port is that change.
        device
            .set_listen_port(port)
            .await
            .map_err(|e| err(format!("listening on UDP port {port}: {e}")))?;
        Ok(Self {
            name: name.into(),
            device,
        })
    }

    /// The device's peers, as specs.
    pub async fn peers(&self) -> BTreeMap<Key, PeerSpec> {
        let mut out = BTreeMap::new();
        for ps in self.device.peers().await {
            let p = ps.peer;
            let Some(endpoint) = p.endpoint else { continue };
            let key = Key(p.public_key.to_bytes());
            let mut allowed_ips: Vec<ipnet::IpNet> = p
                .allowed_ips
                .iter()
                .filter_map(|n| ipnet::IpNet::new(n.ip(), n.prefix()).ok())
                .collect();
            allowed_ips.sort();
            out.insert(
                key,
                PeerSpec {
                    public_key: key,
                    endpoint,
                    allowed_ips,
                    preshared_key: p.preshared_key.map(Key),
                    keepalive: p
                        .keepalive
                        .map(|s| std::time::Duration::from_secs(u64::from(s))),
                },
            );
        }
        out
    }

    /// Applies peer changes.
    pub async fn apply(&self, ops: &[PeerOp]) -> Result<(), DeviceError> {
        let err = |message: String| DeviceError {
            name: self.name.clone(),
            message,
        };
        for op in ops {
            match op {
                PeerOp::Remove(k) => {
                    self.device
                        .remove_peer(&PublicKey::from(k.0))
                        .await
                        .map_err(|e| err(e.to_string()))?;
                }
                PeerOp::Set(spec) => {
                    self.device
                        .add_or_update_peer(peer_of(spec))
                        .await
                        .map_err(|e| err(e.to_string()))?;
                }
            }
        }
        Ok(())
    }

    /// Stops the device (its TUN device goes away).
    pub async fn stop(self) {
        self.device.stop().await;
    }
}
