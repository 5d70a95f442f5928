//! # flannel-backend-ipsec
//!
//! flannel's `ipsec` backend (shared/spec/flannel-compat.md §5.4), registered as `ipsec`: pod
//! traffic between hosts in ESP tunnels (IPsec, tunnel mode) that strongSwan's IKE daemon,
//! charon, negotiates with IKEv2 and a pre-shared key, as upstream's `pkg/backend/ipsec`. It needs
//! charon (Debian: `strongswan-charon`, `strongswan-swanctl` for its VICI plugin and
//! `libstrongswan-standard-plugins` for AES-GCM) and a kernel with ESP (`esp4`); flanneld starts
//! charon itself, as upstream's does.
//!
//! ```json
//! {"Network": "10.5.0.0/16",
//!  "Backend": {"Type": "ipsec", "PSK": "<at least 96 characters>", "UDPEncap": false,
//!              "ESPProposal": "aes128gcm16-sha256-prfsha256-ecp256"}}
//! ```
//!
//! ## What it does (as upstream)
//!
//! - Starts charon (the first of [`charon::CHARON_PATHS`]) unless one already answers on
//!   [`charon::VICI_SOCKET`], and loads the `PSK` as the IKE key for any peer.
//! - Per peer lease of type `ipsec`: an IKE connection `<own IP>-<own subnet>-<peer subnet>-<peer
//!   IP>` (IKEv2, `aes256-sha256-modp4096`, PSK both ways, `UDPEncap` as `encap`, retried forever)
//!   with one CHILD_SA in tunnel mode between the two subnets (`ESPProposal`, request id 11, rekeyed
//!   hourly, started at once), and three xfrm policies that flanneld installs itself: out (own
//!   subnet to the peer's through ESP from the own to the peer's public IP), in and fwd (the
//!   reverse), all with request id 11.
//! - No device and no routes: the pods' packets to other hosts follow the host's routes (its
//!   default route) and the out policy sends them through the tunnel instead.
//! - MTU: the external interface's minus 77 (minus 8 more with `UDPEncap`).
//! - The lease: `{"PublicIP":"…","BackendType":"ipsec"}`, no backend data.
//!
//! IPv4 only, as upstream. A `PSK` shorter than 96 characters is refused, as upstream refuses it.
//!
//! ## Beyond upstream
//!
//! The tunnels are data ([`peers::desired_tunnels`], pure) reconciled by `flannel-dataplane`'s
//! driver on every lease event and every 10 s: a policy deleted or changed behind flanneld's back
//! is put back, connections and policies of departed peers go (also those left by a crash), and a
//! charon that exited is started again and given the key and every connection (upstream does none
//! of this after its start). flanneld kills its charon when it stops (SIGKILL, not SIGTERM), so the
//! SAs stay in the kernel and the pods' traffic keeps flowing until the next flanneld's charon has
//! negotiated new ones; upstream stops charon, which deletes them first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use flannel_core::gojson::GoObject;
use flannel_core::{
    Backend, BackendContext, BackendError, Lease, LeaseAttrs, Network, NetworkConfig,
};
use flannel_dataplane::driver::{Model, ReconciledNetwork};
use flannel_dataplane::{KernelState, Ownership};
use ipnet::{IpNet, Ipv4Net};
use tracing::{info, warn};

pub mod charon;
pub mod peers;
pub mod xfrm;

use charon::Charon;
use peers::{End, Policy, Tunnel};
use xfrm::Xfrm;

flannel_core::register_backend!("ipsec", IpsecBackend::create);

/// The bytes ESP in tunnel mode adds at most with upstream's proposal (upstream's
/// `ipsecOverhead`: new IP header 20, SPI 4, sequence 4, IV 16, padding up to 15, pad length 1,
/// next header 1, ICV 16).
pub const OVERHEAD: u32 = 77;

/// What UDP encapsulation (`UDPEncap`) adds.
pub const UDP_ENCAP_OVERHEAD: u32 = 8;

/// Upstream's default `ESPProposal`.
pub const DEFAULT_ESP_PROPOSAL: &str = "aes128gcm16-sha256-prfsha256-ecp256";

/// The shortest `PSK` upstream accepts.
pub const MIN_PSK_LEN: usize = 96;

/// How often the policies and connections are checked without a lease event.
pub const RESYNC: Duration = Duration::from_secs(10);

fn bad(message: String) -> BackendError {
    BackendError::invalid("ipsec", message)
}

/// The ipsec options of the network config's `Backend` object.
#[derive(Clone, PartialEq, Eq)]
pub struct IpsecOptions {
    /// `PSK`: the cluster's pre-shared key (at least [`MIN_PSK_LEN`] bytes).
    pub psk: String,
    /// `UDPEncap`: force UDP encapsulation of ESP (NAT traversal).
    pub udp_encap: bool,
    /// `ESPProposal`: the CHILD_SAs' proposal (strongSwan's syntax).
    pub esp_proposal: String,
}

impl std::fmt::Debug for IpsecOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpsecOptions")
            .field("psk", &format_args!("<{} bytes>", self.psk.len()))
            .field("udp_encap", &self.udp_encap)
            .field("esp_proposal", &self.esp_proposal)
            .finish()
    }
}

impl IpsecOptions {
    /// Parses the options with Go's rules (field names in any case, unknown fields ignored, a
    /// field of the wrong type an error) and upstream's checks (the key's length).
    pub fn parse(backend: &serde_json::Value) -> Result<Self, BackendError> {
        let o = GoObject::new(backend, "Backend").map_err(|e| bad(e.to_string()))?;
        let udp_encap = o
            .bool("UDPEncap")
            .map_err(|e| bad(e.to_string()))?
            .unwrap_or(false);
        let esp_proposal = match o.string("ESPProposal").map_err(|e| bad(e.to_string()))? {
            None | Some("") => DEFAULT_ESP_PROPOSAL.to_string(),
            Some(p) => p.to_string(),
        };
        if esp_proposal.len() > 256
            || !esp_proposal
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.,".contains(c))
        {
            return Err(bad(format!(
                "ESPProposal {esp_proposal:?} is not a strongSwan proposal (such as {DEFAULT_ESP_PROPOSAL})"
            )));
        }
        let psk = o
            .string("PSK")
            .map_err(|e| bad(e.to_string()))?
            .unwrap_or("")
            .to_string();
        // Go's len(): bytes.
        let len = psk.len();
        if len < MIN_PSK_LEN {
            return Err(bad(format!(
                "PSK is {len} bytes long; it must have at least {MIN_PSK_LEN} (as upstream's), \
                 for example `openssl rand -hex 48`"
            )));
        }
        Ok(Self {
            psk,
            udp_encap,
            esp_proposal,
        })
    }

    /// The pods' MTU for an external interface of MTU `ext_mtu`, if it can carry the tunnel.
    pub fn mtu(&self, ext_mtu: u32) -> Option<u32> {
        let overhead = OVERHEAD
            + if self.udp_encap {
                UDP_ENCAP_OVERHEAD
            } else {
                0
            };
        ext_mtu.checked_sub(overhead).filter(|m| *m >= 68)
    }
}

/// The registered backend.
#[derive(Debug)]
pub struct IpsecBackend {
    ctx: BackendContext,
}

impl IpsecBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

#[async_trait]
impl Backend for IpsecBackend {
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let opts = IpsecOptions::parse(&config.backend)?;
        config.ipv4_only("ipsec", "wireguard (encrypted), vxlan or host-gw")?;
        let ext = self.ctx.ext_iface.clone();
        let mtu = opts.mtu(ext.mtu).ok_or_else(|| {
            bad(format!(
                "the MTU {} of interface {} is too small for ipsec (it adds up to {} bytes)",
                ext.mtu,
                ext.name,
                OVERHEAD + UDP_ENCAP_OVERHEAD
            ))
        })?;
        let public_ip = ext
            .ext_addr
            .ok_or_else(|| bad(format!("interface {} has no IPv4 address", ext.name)))?;
        // The kernel and charon first: a host that cannot carry the tunnels takes no lease.
        let xfrm = Xfrm::new()?;
        xfrm.policies().await.map_err(|e| {
            BackendError::Other(format!(
                "{e}: the ipsec backend needs a kernel with XFRM (IPsec)"
            ))
        })?;
        match xfrm.has_esp().await {
            Ok(true) => {}
            Ok(false) => {
                return Err(BackendError::Other(
                    "this kernel has no ESP (IPsec's encryption, module esp4): the ipsec backend cannot \
                     carry traffic here; load the module with `modprobe esp4`, or choose wireguard \
                     (encrypted, and runs in userspace where the kernel lacks it)"
                        .into(),
                ));
            }
            Err(e) => warn!(error = %e, "cannot tell whether this kernel has ESP; going on"),
        }
        let mut charon = Charon::new(charon::find_charon()?, PathBuf::from(charon::VICI_SOCKET));
        charon.ensure().await?;
        charon.load_shared_key(&opts.psk).await?;
        info!(udp_encap = opts.udp_encap, esp_proposal = %opts.esp_proposal, "IPsec ready");
        let attrs = LeaseAttrs {
            public_ip,
            backend_type: "ipsec".into(),
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        let (network, own_subnet) = flannel_core::backend::ipv4_networks(config, &lease)?
            .ok_or_else(|| bad("the lease has no IPv4 subnet".into()))?;
        let model = IpsecModel {
            charon,
            xfrm,
            opts,
            network,
            local: End {
                ip: public_ip,
                subnet: own_subnet,
            },
            wanted: Mutex::new(BTreeMap::new()),
            key_loaded: true,
            reload_all: true,
        };
        Ok(Box::new(ReconciledNetwork::new(
            lease,
            mtu,
            model,
            self.ctx.subnet_manager.clone(),
        )))
    }
}

/// charon, the kernel's policies and the wanted tunnels the reconcile loop keeps in step.
#[derive(Debug)]
struct IpsecModel {
    charon: Charon,
    xfrm: Xfrm,
    opts: IpsecOptions,
    network: Ipv4Net,
    local: End,
    /// The tunnels of the last [`Model::desired`], applied by [`Model::finish`].
    wanted: Mutex<BTreeMap<String, Tunnel>>,
    /// Whether the running charon has the key.
    key_loaded: bool,
    /// Whether every wanted connection is to be loaded at the next pass, also those charon has
    /// (loading replaces them): at the first pass, where a charon that outlived the last flanneld
    /// may hold them with other options.
    reload_all: bool,
}

impl IpsecModel {
    async fn sync_policies(&self, wanted: &BTreeMap<String, Tunnel>) -> Result<(), BackendError> {
        let desired: BTreeSet<Policy> = wanted.values().flat_map(|t| t.policies()).collect();
        let kernel = self.xfrm.policies().await?;
        let (upserts, deletes) =
            peers::policy_changes(&desired, &kernel, self.network, self.local.subnet);
        for p in &deletes {
            info!(policy = %p, "removing an IPsec policy no peer needs");
            self.xfrm.delete(p).await?;
        }
        for p in &upserts {
            info!(policy = %p, "installing an IPsec policy");
            self.xfrm.upsert(p).await?;
        }
        Ok(())
    }

    async fn sync_conns(&self, wanted: &BTreeMap<String, Tunnel>) -> Result<(), BackendError> {
        let loaded = if self.reload_all {
            BTreeSet::new()
        } else {
            self.charon.conns().await?
        };
        let (load, unload) = peers::conn_changes(wanted, &loaded, self.local);
        for name in &unload {
            info!(conn = %name, "unloading the IKE connection of a departed peer");
            // The SAs first: were it the other way, a failed terminate would never be retried
            // (the next pass sees no connection to unload).
            let ended = self.charon.terminate_ike(name).await?;
            if ended > 0 {
                info!(conn = %name, sas = ended, "ended the IKE_SAs of a departed peer");
            }
            self.charon.unload_conn(name).await?;
        }
        if !load.is_empty() && !self.reload_all {
            // Connections missing from a charon flanneld did not restart (the host's, restarted
            // on its own) mean its key is missing too.
            self.charon.load_shared_key(&self.opts.psk).await?;
        }
        for t in &load {
            info!(conn = %t.conn_name(), "loading an IKE connection");
            self.charon
                .load_conn(t, &self.opts.esp_proposal, self.opts.udp_encap)
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Model for IpsecModel {
    async fn prepare(&mut self) -> Result<(), BackendError> {
        if self.charon.ensure().await? {
            self.key_loaded = false;
        }
        if !self.key_loaded {
            self.charon.load_shared_key(&self.opts.psk).await?;
            self.key_loaded = true;
        }
        Ok(())
    }

    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
        let (tunnels, warnings) = peers::desired_tunnels(self.local, leases);
        if let Ok(mut w) = self.wanted.lock() {
            *w = tunnels;
        }
        // The network (the lease policy's "inside the cluster network"), no devices: no route is
        // flannel's.
        let own = Ownership {
            networks: vec![IpNet::V4(self.network)],
            keep: vec![IpNet::V4(self.local.subnet)],
            ..Ownership::default()
        };
        (KernelState::default(), own, warnings)
    }

    async fn finish(&mut self) -> Result<(), BackendError> {
        let wanted = self
            .wanted
            .lock()
            .map(|w| w.clone())
            .map_err(|_| BackendError::Other("the tunnel set lock is poisoned".into()))?;
        self.sync_policies(&wanted).await?;
        if let Err(e) = self.sync_conns(&wanted).await {
            // The next pass starts charon again if it went away.
            self.key_loaded = false;
            return Err(e);
        }
        self.reload_all = false;
        Ok(())
    }

    fn resync_every(&self) -> Option<Duration> {
        Some(RESYNC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn psk() -> String {
        "k".repeat(MIN_PSK_LEN)
    }

    #[test]
    fn options_parse_like_upstream() {
        let parse = |v: serde_json::Value| IpsecOptions::parse(&v);
        let o = parse(json!({"Type": "ipsec", "PSK": psk()})).unwrap();
        assert_eq!(o.esp_proposal, DEFAULT_ESP_PROPOSAL);
        assert!(!o.udp_encap);
        assert_eq!(o.mtu(1500), Some(1423));
        let o = parse(json!({"Type": "ipsec", "psk": psk(), "udpencap": true, "espproposal": "aes256gcm16-modp2048"}))
            .unwrap();
        assert!(o.udp_encap, "field names in any case, as Go's decoder");
        assert_eq!(o.esp_proposal, "aes256gcm16-modp2048");
        assert_eq!(o.mtu(1500), Some(1415));
        assert_eq!(o.mtu(100), None);
        assert!(
            !format!("{o:?}").contains(&psk()),
            "the key stays out of logs"
        );

        let e = parse(json!({"Type": "ipsec", "PSK": "short"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("PSK") && e.contains("96"), "{e}");
        let e = parse(json!({"Type": "ipsec"})).unwrap_err().to_string();
        assert!(e.contains("PSK"), "{e}");
        let e = parse(json!({"Type": "ipsec", "PSK": psk(), "UDPEncap": "yes"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("UDPEncap"), "{e}");
        let e = parse(json!({"Type": "ipsec", "PSK": psk(), "ESPProposal": "aes\n}"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ESPProposal"), "{e}");
        // Go's len() counts bytes: 48 two-byte characters are enough, as for upstream.
        assert!(parse(json!({"Type": "ipsec", "PSK": "é".repeat(48)})).is_ok());
        assert!(parse(json!({"Type": "ipsec", "PSK": "é".repeat(47)})).is_err());
    }
}
