//! The backend options of the network config, with upstream's names, defaults and rules.

use std::time::Duration;

use flannel_core::BackendError;
use flannel_core::gojson::{FieldError, GoObject};

use crate::key::Key;

/// Bytes WireGuard adds to a packet on the underlay: the outer IP header (IPv6's 40), UDP 8, and
/// WireGuard's type, key index, nonce and tag (4 + 4 + 8 + 16). The device MTU is the underlay MTU
/// minus this, as upstream computes it.
pub const OVERHEAD: u32 = 80;

/// The IPv4 (or only) device.
pub const DEVICE: &str = "flannel-wg";
/// The IPv6 device of `Mode: separate`.
pub const DEVICE_V6: &str = "flannel-wg-v6";

/// How IPv4 and IPv6 traffic is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One device per address family, each with its own port (`flannel-wg`, `flannel-wg-v6`).
    Separate,
    /// One device for both families; each peer is reached over IPv4 or IPv6 by its addresses
    /// (IPv6 only when both ends have a public IPv6 address and the peer's IPv4 one is private).
    Auto,
    /// One device for both families, peers reached over IPv4.
    Ipv4,
    /// One device for both families, peers reached over IPv6.
    Ipv6,
}

/// The wireguard backend's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardOptions {
    /// `ListenPort`: the UDP port of `flannel-wg` (51820).
    pub listen_port: u16,
    /// `ListenPortV6`: the UDP port of `flannel-wg-v6` (51821).
    pub listen_port_v6: u16,
    /// `MTU`: the underlay MTU to assume (default: the external interface's).
    pub mtu: Option<u32>,
    /// `PSK`: a pre-shared key for every peer.
    pub psk: Option<Key>,
    /// `PersistentKeepaliveInterval` in seconds; `None` (0) sends no keep-alives.
    pub keepalive: Option<Duration>,
    /// `Mode` (`separate`).
    pub mode: Mode,
}

fn bad(message: String) -> BackendError {
    BackendError::invalid("wireguard", message)
}

fn port(o: &GoObject, key: &str, default: u16) -> Result<u16, BackendError> {
    let f = |e: FieldError| bad(e.to_string());
    match o.uint(key).map_err(f)? {
        None => Ok(default),
        Some(p) => u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
            bad(format!(
                "{key} {p} is not a UDP port: use 1..65535 (peers must know the port, so it cannot be left to chance)"
            ))
        }),
    }
}

impl WireguardOptions {
    /// Parses the `Backend` object with Go's decoding rules (keys in any case, `null` as unset).
    pub fn parse(backend: &serde_json::Value) -> Result<Self, BackendError> {
        let o = GoObject::new(backend, "Backend").map_err(|e| bad(e.to_string()))?;
        let f = |e: FieldError| bad(e.to_string());
        let mtu = match o.uint("MTU").map_err(f)? {
            None | Some(0) => None,
            Some(m) => Some(
                u32::try_from(m)
                    .ok()
                    .filter(|m| *m >= OVERHEAD + 576)
                    .ok_or_else(|| {
                        bad(format!(
                            "MTU {m} is out of range: the underlay MTU must be at least {} ({OVERHEAD} of it goes to WireGuard)",
                            OVERHEAD + 576
                        ))
                    })?,
            ),
        };
        let psk = o
            .string("PSK")
            .map_err(f)?
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<Key>().map_err(|e| bad(format!("PSK: {e}"))))
            .transpose()?;
        let keepalive = match o.int("PersistentKeepaliveInterval").map_err(f)? {
            None | Some(0) => None,
            Some(s) if (1..=65535).contains(&s) => Some(Duration::from_secs(s.unsigned_abs())),
            Some(s) => {
                return Err(bad(format!(
                    "PersistentKeepaliveInterval {s} is out of range: give seconds, 1..65535, or 0 for none"
                )));
            }
        };
        let mode = match o.string("Mode").map_err(f)? {
            None => Mode::Separate,
            Some("separate") => Mode::Separate,
            Some("auto") => Mode::Auto,
            Some("ipv4") => Mode::Ipv4,
            Some("ipv6") => Mode::Ipv6,
            Some(other) => {
                return Err(bad(format!(
                    "Mode {other:?} is not a mode: use separate, auto, ipv4 or ipv6"
                )));
            }
        };
        Ok(Self {
            listen_port: port(&o, "ListenPort", 51820)?,
            listen_port_v6: port(&o, "ListenPortV6", 51821)?,
            mtu,
            psk,
            keepalive,
            mode,
        })
    }

    /// The ports this node advertises in its lease's `BackendData` and `BackendV6Data`: the ports
    /// its devices listen on. In `Mode: separate` the IPv6 device has `ListenPortV6`; in the
    /// one-device modes the one device listens on `ListenPort` for both families, so both say that.
    /// (Upstream writes `ListenPortV6` in both modes and, since it dials a peer's advertised port,
    /// its one-device nodes miss each other over IPv6 unless the two ports are equal; a deliberate
    /// deviation, see the README.)
    pub fn advertised_ports(&self) -> (u16, u16) {
        match self.mode {
            Mode::Separate => (self.listen_port, self.listen_port_v6),
            Mode::Auto | Mode::Ipv4 | Mode::Ipv6 => (self.listen_port, self.listen_port),
        }
    }

    /// Whether the mode can reach peers in a network of these families: `Mode: ipv4` dials peers'
    /// `PublicIP`, which an IPv6-only network (`ipv4` false) does not have.
    pub fn check_families(&self, ipv4: bool) -> Result<(), BackendError> {
        if self.mode == Mode::Ipv4 && !ipv4 {
            return Err(bad(
                "Mode ipv4 dials peers over IPv4, but the network is IPv6-only (no IPv4 Network): use Mode separate, auto or ipv6".into(),
            ));
        }
        Ok(())
    }

    /// The MTU of the WireGuard device(s) and of the pods: the underlay MTU (the `MTU` option, else
    /// the external interface's) minus [`OVERHEAD`]. An underlay too small for that is an error.
    pub fn device_mtu(&self, ext_mtu: u32) -> Result<u32, BackendError> {
        let underlay = self.mtu.unwrap_or(ext_mtu);
        underlay
            .checked_sub(OVERHEAD)
            .filter(|m| *m >= 576)
            .ok_or_else(|| {
                bad(format!(
                    "the underlay MTU {underlay} leaves no room for WireGuard's {OVERHEAD} bytes: set the MTU option"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<WireguardOptions, String> {
        WireguardOptions::parse(&v).map_err(|e| e.to_string())
    }

    #[test]
    fn one_device_modes_advertise_the_port_their_device_listens_on() {
        let parse = |mode: &str| {
            WireguardOptions::parse(&serde_json::json!({
                "Type": "wireguard", "ListenPort": 5000, "ListenPortV6": 5001, "Mode": mode
            }))
            .unwrap()
        };
        assert_eq!(parse("separate").advertised_ports(), (5000, 5001));
        for mode in ["auto", "ipv4", "ipv6"] {
            assert_eq!(parse(mode).advertised_ports(), (5000, 5000), "{mode}");
        }
    }

    #[test]
    fn defaults_are_upstreams() {
        let o = parse(json!({"Type": "wireguard"})).unwrap();
        assert_eq!(
            o,
            WireguardOptions {
                listen_port: 51820,
                listen_port_v6: 51821,
                mtu: None,
                psk: None,
                keepalive: None,
                mode: Mode::Separate,
            }
        );
        assert_eq!(o.device_mtu(1500).unwrap(), 1420);
    }

    #[test]
    fn every_option_in_any_case() {
        let psk = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let o = parse(json!({
            "type": "wireguard", "listenport": 5000, "ListenPortV6": 5001, "mtu": 9000,
            "PSK": psk, "PersistentKeepaliveInterval": 25, "Mode": "auto"
        }))
        .unwrap();
        assert_eq!((o.listen_port, o.listen_port_v6), (5000, 5001));
        assert_eq!(o.device_mtu(1500).unwrap(), 8920, "the MTU option wins");
        assert_eq!(o.psk.unwrap().to_string(), psk);
        assert_eq!(o.keepalive, Some(Duration::from_secs(25)));
        assert_eq!(o.mode, Mode::Auto);
        for (mode, want) in [
            ("separate", Mode::Separate),
            ("ipv4", Mode::Ipv4),
            ("ipv6", Mode::Ipv6),
        ] {
            assert_eq!(parse(json!({"Mode": mode})).unwrap().mode, want);
        }
        // Zero and null mean "unset", as in Go.
        let o = parse(json!({"PSK": "", "PersistentKeepaliveInterval": 0, "MTU": 0, "Mode": null}))
            .unwrap();
        assert_eq!(
            (o.psk, o.keepalive, o.mtu, o.mode),
            (None, None, None, Mode::Separate)
        );
    }

    #[test]
    fn bad_options_name_the_problem() {
        for (v, want) in [
            (
                json!({"ListenPort": 70000}),
                "ListenPort 70000 is not a UDP port",
            ),
            (
                json!({"ListenPortV6": 0}),
                "ListenPortV6 0 is not a UDP port",
            ),
            (json!({"ListenPort": "51820"}), "Backend.ListenPort"),
            (
                json!({"PSK": "short"}),
                "PSK: \"short\" is not a WireGuard key",
            ),
            (
                json!({"PersistentKeepaliveInterval": -5}),
                "PersistentKeepaliveInterval -5",
            ),
            (
                json!({"PersistentKeepaliveInterval": 1e9}),
                "PersistentKeepaliveInterval",
            ),
            (json!({"Mode": "Auto"}), "Mode \"Auto\" is not a mode"),
            (json!({"Mode": ""}), "Mode \"\" is not a mode"),
            (json!({"MTU": 100}), "MTU 100 is out of range"),
            (json!("wireguard"), "Backend"),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
        let e = parse(json!({}))
            .unwrap()
            .device_mtu(600)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no room"), "{e}");
        let ipv4 = parse(json!({"Mode": "ipv4"})).unwrap();
        assert!(ipv4.check_families(true).is_ok());
        let e = ipv4.check_families(false).unwrap_err().to_string();
        assert!(
            e.contains("IPv6-only") && e.contains("Mode separate"),
            "{e}"
        );
        for mode in ["separate", "auto", "ipv6"] {
            let o = parse(json!({ "Mode": mode })).unwrap();
            assert!(o.check_families(false).is_ok(), "{mode}");
        }
    }
}
