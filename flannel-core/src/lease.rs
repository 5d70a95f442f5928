//! Leases: who holds which subnet, under which key, with which backend data.
//!
//! The etcd key of a lease is its [`SubnetKey`] (`10.5.52.0-24`, or `10.5.52.0-24&fd00:12:13::-56` for
//! dual stack) and its value is the compact JSON of [`LeaseAttrs`], byte for byte as Go flannel writes it:
//!
//! ```
//! use flannel_core::{LeaseAttrs, SubnetKey};
//! let key: SubnetKey = "10.5.52.0-24".parse().unwrap();
//! assert_eq!(key.to_string(), "10.5.52.0-24");
//! let attrs = LeaseAttrs::from_json(
//!     br#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
//! ).unwrap();
//! assert_eq!(attrs.backend_type, "vxlan");
//! assert_eq!(
//!     attrs.to_json(),
//!     r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
//! );
//! ```

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;
use serde_json::Value;

use crate::gojson::{FieldError, GoObject};

/// The subnet(s) a lease holds; its text form is the last element of the etcd key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    /// The IPv4 subnet (`0.0.0.0/0` for an IPv6-only lease, as Go writes it).
    pub ipv4: Ipv4Net,
    /// The IPv6 subnet, for dual-stack leases.
    pub ipv6: Option<Ipv6Net>,
}

/// A key that does not name a subnet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a subnet key (expected A.B.C.D-LEN or A.B.C.D-LEN&IPV6-LEN, e.g. 10.5.52.0-24)"
)]
pub struct BadSubnetKey(pub String);

impl SubnetKey {
    /// An IPv4-only key.
    pub fn v4(ipv4: Ipv4Net) -> Self {
        Self { ipv4, ipv6: None }
    }

    /// Parses the subnet out of a full etcd key path or a bare key, exactly as Go's `ParseSubnetKey`:
    /// the pattern is anchored at the end only, the IPv4 prefix must fit in 5 bits and the IPv6 prefix
    /// in 7.
    pub fn parse(s: &str) -> Result<Self, BadSubnetKey> {
        static RE: OnceLock<regex::Regex> = OnceLock::new();
        let re = RE.get_or_init(|| {
            #[allow(clippy::unwrap_used)] // a constant, valid pattern
            regex::Regex::new(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$").unwrap()
        });
        let bad = || BadSubnetKey(s.to_string());
        let caps = re.captures(s).ok_or_else(bad)?;
        let ip: Ipv4Addr = caps[1].parse().map_err(|_| bad())?;
        let len: u8 = caps[2].parse().map_err(|_| bad())?;
        if len >= 32 {
            return Err(bad());
        }
        let ipv4 = Ipv4Net::new(ip, len).map_err(|_| bad())?;
        let ipv6 = match (caps.get(3), caps.get(4)) {
            (Some(ip6), Some(len6)) => {
                let ip6: Ipv6Addr = ip6.as_str().parse().map_err(|_| bad())?;
                let len6: u8 = len6.as_str().parse().map_err(|_| bad())?;
                if len6 >= 128 {
                    return Err(bad());
                }
                Some(Ipv6Net::new(ip6, len6).map_err(|_| bad())?)
            }
            _ => None,
        };
        Ok(Self { ipv4, ipv6 })
    }

    /// Whether this key holds the same subnets as `other` in the families `other` has (Go's own-lease
    /// filter compares by family).
    pub fn same_subnets(&self, other: &SubnetKey) -> bool {
        let v4_same = self.ipv4 == other.ipv4;
        match (self.ipv6, other.ipv6) {
            (Some(a), Some(b)) => v4_same && a == b,
            _ => v4_same,
        }
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ipv4.addr(), self.ipv4.prefix_len())?;
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.addr(), v6.prefix_len())?;
        }
        Ok(())
    }
}

impl FromStr for SubnetKey {
    type Err = BadSubnetKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A JSON value kept as its compact text, like Go's `json.RawMessage`: one small allocation per lease
/// instead of a parsed tree, and written back exactly as read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawJson(Box<str>);

impl RawJson {
    /// The compact text of `v`.
    pub fn from_value(v: &Value) -> Self {
        Self(v.to_string().into_boxed_str())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parsed value (`null` if the text is somehow not JSON).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// The value of a lease key: the owner's public addresses and backend data.
///
/// Serializes to Go's compact JSON with fields in Go's order; `BackendType`, `BackendData` and
/// `BackendV6Data` are omitted when empty, `PublicIPv6` is `null` when unset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaseAttrs {
    /// The owner's IPv4 address (`0.0.0.0` when it has none). It identifies the node.
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// The owner's IPv6 address.
    #[serde(rename = "PublicIPv6")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// The backend type (`vxlan`, `host-gw`, …; empty for udp and alloc). The names of flannel's
    /// backends are shared, not copied into each lease (see [`backend_type_of`]).
    #[serde(rename = "BackendType", skip_serializing_if = "str::is_empty")]
    pub backend_type: Cow<'static, str>,
    /// Backend data for IPv4, e.g. `{"VNI":1,"VtepMAC":"…"}`.
    #[serde(rename = "BackendData", skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<RawJson>,
    /// Backend data for IPv6.
    #[serde(rename = "BackendV6Data", skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<RawJson>,
}

impl Default for LeaseAttrs {
    fn default() -> Self {
        Self {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: None,
            backend_type: Cow::Borrowed(""),
            backend_data: None,
            backend_v6_data: None,
        }
    }
}

/// `name` as a lease's backend type: one of flannel's backends' names (shared, no copy) or a copy.
pub fn backend_type_of(name: &str) -> Cow<'static, str> {
    const KNOWN: [&str; 8] = [
        "",
        "vxlan",
        "host-gw",
        "wireguard",
        "udp",
        "ipip",
        "alloc",
        "extension",
    ];
    match KNOWN.iter().find(|k| **k == name) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(name.to_string()),
    }
}

/// A lease value that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum BadLeaseValue {
    /// Not JSON.
    #[error("lease value is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field is wrong.
    #[error("lease value field {0}")]
    Field(#[from] FieldError),
}

impl LeaseAttrs {
    /// Decodes a lease value leniently, as Go does: keys case-insensitive, unknown keys ignored, an
    /// empty or malformed `PublicIP` is an error.
    pub fn from_json(bytes: &[u8]) -> Result<Self, BadLeaseValue> {
        let v: Value = serde_json::from_slice(bytes)?;
        let o = GoObject::new(&v, "lease")?;
        Ok(Self {
            public_ip: o
                .parsed("PublicIP", "an IPv4 address", true, |s| s.parse().ok())?
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: o.parsed("PublicIPv6", "an IPv6 address", false, |s| s.parse().ok())?,
            backend_type: backend_type_of(o.string("BackendType")?.unwrap_or_default()),
            backend_data: o.value("BackendData").map(RawJson::from_value),
            backend_v6_data: o.value("BackendV6Data").map(RawJson::from_value),
        })
    }

    /// The public addresses it names: `PublicIP` unless unspecified (an IPv6-only lease's), and
    /// `PublicIPv6`.
    pub fn public_ips(&self) -> impl Iterator<Item = std::net::IpAddr> {
        let v4 = (!self.public_ip.is_unspecified()).then_some(std::net::IpAddr::V4(self.public_ip));
        v4.into_iter()
            .chain(self.public_ipv6.map(std::net::IpAddr::V6))
    }

    /// The compact JSON Go flannel writes.
    pub fn to_json(&self) -> String {
        // Serializing plain data into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A subnet lease: a key, its value, and when it expires.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The subnet(s).
    pub key: SubnetKey,
    /// Whether the IPv4 subnet is in use (false for IPv6-only leases).
    pub enable_ipv4: bool,
    /// The value.
    pub attrs: LeaseAttrs,
    /// When the lease runs out (`None` for a reservation that never expires).
    pub expiration: Option<SystemTime>,
    /// The store revision this lease was read at (0 when unknown).
    pub asof: i64,
}

impl Lease {
    /// The IPv4 subnet, when enabled.
    pub fn subnet(&self) -> Option<Ipv4Net> {
        self.enable_ipv4.then_some(self.key.ipv4)
    }

    /// The IPv6 subnet, when enabled.
    pub fn ipv6_subnet(&self) -> Option<Ipv6Net> {
        self.key.ipv6
    }
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {}", self.key, self.attrs.public_ip)?;
        if let Some(v6) = self.attrs.public_ipv6 {
            write!(f, "/{v6}")?;
        }
        Ok(())
    }
}

/// A change to the set of leases.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// A lease appeared or its value changed.
    Added(Lease),
    /// A lease went away (deleted or expired). From a [`LeaseTracker`] it carries the last known
    /// attributes, so a backend knows which entries to remove.
    Removed(Lease),
}

impl LeaseEvent {
    /// The lease the event is about.
    pub fn lease(&self) -> &Lease {
        match self {
            LeaseEvent::Added(l) | LeaseEvent::Removed(l) => l,
        }
    }
}

/// What a subnet manager's watch delivers: a full snapshot (at start and after a resync) or a batch of
/// events.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseWatchResult {
    /// Every lease that exists now.
    Snapshot(Vec<Lease>),
    /// Changes since the previous result.
    Events(Vec<LeaseEvent>),
}

/// Turns watch results into added/removed events against a local map of known leases, the way Go's
/// `LeaseWatcher` does: the own lease is never reported, removals carry the stored attributes, and a
/// snapshot is reported as the difference to what was known.
#[derive(Debug, Clone)]
pub struct LeaseTracker {
    own: Option<SubnetKey>,
    known: BTreeSet<ByKey>,
    /// The fewest leases known since the table was last compacted.
    compacted_len: usize,
}

/// A change [`LeaseTracker::apply_each`] reports: the lease as added, or as it was stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LeaseChange<'a> {
    /// A lease added or changed.
    Added(&'a Lease),
    /// A lease removed.
    Removed(&'a Lease),
}

impl LeaseChange<'_> {
    /// The change as an owned event.
    pub fn to_event(self) -> LeaseEvent {
        match self {
            LeaseChange::Added(l) => LeaseEvent::Added(l.clone()),
            LeaseChange::Removed(l) => LeaseEvent::Removed(l.clone()),
        }
    }
}

/// Leases a table grows by (and at least a quarter of its size) before [`LeaseTracker`] compacts it.
const COMPACT_AFTER: usize = 1024;

/// A lease ordered and found by its key (which it holds already: a map would hold the key twice).
#[derive(Debug, Clone)]
struct ByKey(Lease);

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ByKey {}

impl PartialOrd for ByKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.key.cmp(&other.0.key)
    }
}

impl std::borrow::Borrow<SubnetKey> for ByKey {
    fn borrow(&self) -> &SubnetKey {
        &self.0.key
    }
}

impl LeaseTracker {
    /// Rebuilds the set of known leases in bulk: one that grew a lease at a time is a tree of
    /// half-full nodes, rebuilt its nodes are full. The leases stay the same.
    pub fn compact(&mut self) {
        crate::compact::compact(&mut self.known);
        self.compacted_len = self.known.len();
    }

    /// A tracker that filters out `own` (the node's own lease).
    pub fn new(own: Option<SubnetKey>) -> Self {
        Self {
            own,
            known: BTreeSet::new(),
            compacted_len: 0,
        }
    }

    fn is_own(&self, key: &SubnetKey) -> bool {
        self.own.as_ref().is_some_and(|o| key.same_subnets(o))
    }

    /// The leases known now (own lease excluded).
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.known.iter().map(|k| &k.0)
    }

    /// Applies one watch result and returns the events a backend should act on.
    pub fn apply(&mut self, result: LeaseWatchResult) -> Vec<LeaseEvent> {
        let mut out = Vec::new();
        self.apply_each(result, |c| out.push(c.to_event()));
        out
    }

    /// Applies one watch result and hands each change a backend should act on to `f`, without
    /// copying the leases (the table keeps them). A table that grew by many leases is compacted
    /// (see [`crate::compact`]), so an install of thousands of peers does not leave it half empty.
    pub fn apply_each(&mut self, result: LeaseWatchResult, mut f: impl FnMut(LeaseChange<'_>)) {
        match result {
            LeaseWatchResult::Snapshot(leases) => self.reset(leases, &mut f),
            LeaseWatchResult::Events(events) => {
                for e in events {
                    if self.is_own(&e.lease().key) {
                        continue;
                    }
                    match e {
                        LeaseEvent::Added(l) => {
                            let unchanged =
                                self.known.get(&l.key).is_some_and(|k| k.0.attrs == l.attrs);
                            // The same value re-put (a renewal) is refreshed quietly.
                            if !unchanged {
                                f(LeaseChange::Added(&l));
                            }
                            self.known.replace(ByKey(l));
                        }
                        LeaseEvent::Removed(l) => {
                            let stored = self.known.take(&l.key).map(|k| k.0);
                            f(LeaseChange::Removed(stored.as_ref().unwrap_or(&l)));
                        }
                    }
                }
            }
        }
        self.compacted_len = self.compacted_len.min(self.known.len());
        if self.known.len() >= self.compacted_len + COMPACT_AFTER.max(self.compacted_len / 4) {
            self.compact();
        }
    }

    fn reset(&mut self, leases: Vec<Lease>, f: &mut impl FnMut(LeaseChange<'_>)) {
        let fresh: BTreeSet<ByKey> = leases
            .into_iter()
            .filter(|l| !self.is_own(&l.key))
            .map(ByKey)
            .collect();
        for old in self.known.difference(&fresh) {
            f(LeaseChange::Removed(&old.0));
        }
        for new in &fresh {
            if self
                .known
                .get(new)
                .is_none_or(|old| old.0.attrs != new.0.attrs)
            {
                f(LeaseChange::Added(&new.0));
            }
        }
        self.known = fresh;
        // Built in bulk: compact already.
        self.compacted_len = self.known.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_subnet_keys_v4_and_v6() {
        let k: SubnetKey = "10.12.13.0-24".parse().unwrap();
        assert_eq!(k.ipv4.to_string(), "10.12.13.0/24");
        assert_eq!(k.ipv6, None);
        assert_eq!(k.to_string(), "10.12.13.0-24");
        let k =
            SubnetKey::parse("/coreos.com/network/subnets/10.12.13.0-24&fd00:12:13::-56").unwrap();
        assert_eq!(k.ipv6.unwrap().to_string(), "fd00:12:13::/56");
        assert_eq!(k.to_string(), "10.12.13.0-24&fd00:12:13::-56");
        let k = SubnetKey::parse("10.12.13.0-24&2001::-56").unwrap();
        assert_eq!(k.to_string(), "10.12.13.0-24&2001::-56");
    }

    #[test]
    fn upstream_invalid_subnet_keys() {
        for bad in [
            "10",
            "10.12.13.0",
            "10.12.13-24",
            "10.12.13.300-24",
            "10.12.13.0-24hi",
            "&2001::-56",
            "10.12.13.0-24&20011::-56",
            "10.12.13.0-24&2001::",
            "10.12.13.0-32",
            "10.12.13.0-24&2001::-128",
            "10.12.13.0-24&2001:DB8::-56",
        ] {
            assert!(SubnetKey::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn backend_names_are_shared_and_others_copied() {
        let a = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.2","BackendType":"vxlan"}"#).unwrap();
        assert!(matches!(a.backend_type, Cow::Borrowed("vxlan")));
        let a = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.2"}"#).unwrap();
        assert!(matches!(a.backend_type, Cow::Borrowed("")));
        let a = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.2","BackendType":"x-1"}"#).unwrap();
        assert!(matches!(&a.backend_type, Cow::Owned(s) if s == "x-1"));
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"x-1"}"#
        );
    }

    #[test]
    fn lease_json_golden() {
        let golden = [
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            r#"{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"host-gw"}"#,
            r#"{"PublicIP":"10.0.0.2","PublicIPv6":null}"#,
            r#"{"PublicIP":"10.0.0.2","PublicIPv6":"2001:db8::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:fe"}}"#,
        ];
        for g in golden {
            let a = LeaseAttrs::from_json(g.as_bytes()).unwrap();
            assert_eq!(a.to_json(), g);
        }
        let a = LeaseAttrs {
            public_ip: "10.1.2.3".parse().unwrap(),
            backend_type: "host-gw".into(),
            ..Default::default()
        };
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"10.1.2.3","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
    }

    #[test]
    fn lease_json_lenient_reading() {
        let a = LeaseAttrs::from_json(br#"{"publicip":"10.0.0.9","extra":1,"backendtype":"udp"}"#)
            .unwrap();
        assert_eq!(a.public_ip.to_string(), "10.0.0.9");
        assert_eq!(a.backend_type, "udp");
        assert!(LeaseAttrs::from_json(br#"{"PublicIP":""}"#).is_err());
        assert!(LeaseAttrs::from_json(br#"{"PublicIP":"300.0.0.1"}"#).is_err());
        assert!(LeaseAttrs::from_json(b"garbage").is_err());
        let a = LeaseAttrs::from_json(br#"{}"#).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::UNSPECIFIED);
    }

    fn lease(key: &str, ip: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            enable_ipv4: true,
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                ..Default::default()
            },
            expiration: None,
            asof: 0,
        }
    }

    #[test]
    fn tracker_filters_own_and_reports_stored_attrs_on_removal() {
        let own: SubnetKey = "10.5.1.0-24".parse().unwrap();
        let mut t = LeaseTracker::new(Some(own));
        let ev = t.apply(LeaseWatchResult::Snapshot(vec![
            lease("10.5.1.0-24", "1.1.1.1"),
            lease("10.5.2.0-24", "1.1.1.2"),
        ]));
        assert_eq!(ev, vec![LeaseEvent::Added(lease("10.5.2.0-24", "1.1.1.2"))]);
        // A removal without attrs is reported with the stored ones.
        let mut bare = lease("10.5.2.0-24", "0.0.0.0");
        bare.attrs = LeaseAttrs::default();
        let ev = t.apply(LeaseWatchResult::Events(vec![
            LeaseEvent::Added(lease("10.5.1.0-24", "1.1.1.1")),
            LeaseEvent::Removed(bare),
        ]));
        assert_eq!(
            ev,
            vec![LeaseEvent::Removed(lease("10.5.2.0-24", "1.1.1.2"))]
        );
        assert_eq!(t.leases().count(), 0);
    }

    #[test]
    fn compacting_the_tracker_keeps_its_leases() {
        let mut t = LeaseTracker::new(None);
        let all: Vec<Lease> = (0..200)
            .map(|i| lease(&format!("10.{}.{}.0-24", 5 + i / 256, i % 256), "1.1.1.2"))
            .collect();
        for l in &all {
            t.apply(LeaseWatchResult::Events(vec![LeaseEvent::Added(l.clone())]));
        }
        t.compact();
        let kept: Vec<&Lease> = t.leases().collect();
        assert_eq!(kept, all.iter().collect::<Vec<_>>());
        // And it goes on as before: a removal is reported with the stored lease.
        let ev = t.apply(LeaseWatchResult::Events(vec![LeaseEvent::Removed(
            all[7].clone(),
        )]));
        assert_eq!(ev, vec![LeaseEvent::Removed(all[7].clone())]);
        assert_eq!(t.leases().count(), 199);
    }

    #[test]
    fn a_table_grown_by_thousands_of_events_keeps_them_all() {
        // 5000 leases one event at a time (compacted on the way), with removals in between,
        // reported to apply_each as apply reports them.
        let (mut t, mut shadow) = (LeaseTracker::new(None), LeaseTracker::new(None));
        let all: Vec<Lease> = (0..5000)
            .map(|i| lease(&format!("10.{}.{}.0-24", 5 + i / 256, i % 256), "1.1.1.2"))
            .collect();
        for (i, l) in all.iter().enumerate() {
            let mut batch = vec![LeaseEvent::Added(l.clone())];
            if i % 7 == 6 {
                batch.push(LeaseEvent::Removed(all[i - 3].clone()));
            }
            let mut seen = Vec::new();
            t.apply_each(LeaseWatchResult::Events(batch.clone()), |c| {
                seen.push(c.to_event())
            });
            assert_eq!(seen, shadow.apply(LeaseWatchResult::Events(batch)));
        }
        let kept: Vec<&Lease> = t.leases().collect();
        let want: Vec<&Lease> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| !(*i + 3 < all.len() && (*i + 3) % 7 == 6))
            .map(|(_, l)| l)
            .collect();
        assert_eq!(kept.len(), want.len());
        assert_eq!(kept, want);
    }

    #[test]
    fn tracker_resync_emits_difference() {
        let mut t = LeaseTracker::new(None);
        t.apply(LeaseWatchResult::Snapshot(vec![
            lease("10.5.2.0-24", "1.1.1.2"),
            lease("10.5.3.0-24", "1.1.1.3"),
        ]));
        let ev = t.apply(LeaseWatchResult::Snapshot(vec![
            lease("10.5.3.0-24", "1.1.1.3"),
            lease("10.5.4.0-24", "1.1.1.4"),
            lease("10.5.2.0-24", "9.9.9.9"),
        ]));
        // Changed 10.5.2 re-added, 10.5.4 new, 10.5.3 unchanged is silent.
        assert_eq!(
            ev,
            vec![
                LeaseEvent::Added(lease("10.5.2.0-24", "9.9.9.9")),
                LeaseEvent::Added(lease("10.5.4.0-24", "1.1.1.4")),
            ]
        );
        let ev = t.apply(LeaseWatchResult::Snapshot(vec![]));
        assert_eq!(ev.len(), 3);
        assert!(ev.iter().all(|e| matches!(e, LeaseEvent::Removed(_))));
    }

    #[test]
    fn tracker_suppresses_renewal_reputs() {
        let mut t = LeaseTracker::new(None);
        let ev = t.apply(LeaseWatchResult::Events(vec![LeaseEvent::Added(lease(
            "10.5.2.0-24",
            "1.1.1.2",
        ))]));
        assert_eq!(ev.len(), 1);
        let ev = t.apply(LeaseWatchResult::Events(vec![LeaseEvent::Added(lease(
            "10.5.2.0-24",
            "1.1.1.2",
        ))]));
        assert!(ev.is_empty());
    }
}
