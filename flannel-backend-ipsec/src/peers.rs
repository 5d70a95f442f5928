//! The desired state as data (pure): one IKE connection and three xfrm policies per peer, and the
//! difference to what charon and the kernel hold.
//!
//! ```
//! use flannel_backend_ipsec::peers::{End, desired_tunnels, policy_changes};
//! use flannel_core::testing::peer_lease;
//!
//! let local = End { ip: "192.168.0.1".parse().unwrap(), subnet: "10.5.1.0/24".parse().unwrap() };
//! let peer = peer_lease("10.5.2.0-24", "192.168.0.2", "ipsec", None);
//! let (tunnels, warnings) = desired_tunnels(local, &[&peer]);
//! assert!(warnings.is_empty());
//! assert!(tunnels.contains_key("192.168.0.1-10.5.1.0/24-10.5.2.0/24-192.168.0.2"));
//!
//! // Against a kernel without policies: all three of the tunnel's are to be installed.
//! let desired = tunnels.values().flat_map(|t| t.policies()).collect();
//! let (install, delete) =
//!     policy_changes(&desired, &[], "10.5.0.0/16".parse().unwrap(), local.subnet);
//! assert_eq!((install.len(), delete.len()), (3, 0));
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use flannel_core::Lease;
use ipnet::Ipv4Net;

/// The request id that ties upstream's policies to the SAs charon negotiates (upstream's
/// `defaultReqID`): every flannel policy and CHILD_SA carries it.
pub const REQID: u32 = 11;

/// One end of a tunnel: a host's public IP and its pods' subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct End {
    /// The host's public IP (the tunnel's outer address).
    pub ip: Ipv4Addr,
    /// The host's subnet (the traffic the tunnel carries).
    pub subnet: Ipv4Net,
}

/// A tunnel between this host and one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tunnel {
    /// This host.
    pub local: End,
    /// The peer.
    pub remote: End,
}

impl Tunnel {
    /// The IKE connection's name in charon, as upstream's `formatConnectionName`:
    /// `<local IP>-<local subnet>-<remote subnet>-<remote IP>`.
    pub fn conn_name(&self) -> String {
        format!(
            "{}-{}-{}-{}",
            self.local.ip, self.local.subnet, self.remote.subnet, self.remote.ip
        )
    }

    /// The CHILD_SA's name, as upstream's `formatChildSAConfName`: `<local subnet>-<remote subnet>`.
    pub fn child_name(&self) -> String {
        format!("{}-{}", self.local.subnet, self.remote.subnet)
    }

    /// The three policies upstream installs for the tunnel: out (local subnet to remote subnet,
    /// through an ESP tunnel from the local to the remote IP), in and fwd (the reverse).
    pub fn policies(&self) -> [Policy; 3] {
        let out = Policy {
            src: self.local.subnet,
            dst: self.remote.subnet,
            dir: Dir::Out,
            tmpl_src: self.local.ip,
            tmpl_dst: self.remote.ip,
        };
        let inbound = Policy {
            src: self.remote.subnet,
            dst: self.local.subnet,
            dir: Dir::In,
            tmpl_src: self.remote.ip,
            tmpl_dst: self.local.ip,
        };
        let fwd = Policy {
            dir: Dir::Fwd,
            ..inbound
        };
        [out, inbound, fwd]
    }
}

/// The direction of an xfrm policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    /// Packets the host receives for itself (`XFRM_POLICY_IN`).
    In,
    /// Packets the host sends (`XFRM_POLICY_OUT`).
    Out,
    /// Packets the host forwards (`XFRM_POLICY_FWD`): to its pods.
    Fwd,
}

impl Dir {
    /// The kernel's number for the direction.
    pub fn kernel(self) -> u8 {
        match self {
            Dir::In => 0,
            Dir::Out => 1,
            Dir::Fwd => 2,
        }
    }

    /// The direction of the kernel's number, if it is one of these.
    pub fn from_kernel(n: u8) -> Option<Self> {
        match n {
            0 => Some(Dir::In),
            1 => Some(Dir::Out),
            2 => Some(Dir::Fwd),
            _ => None,
        }
    }
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dir::In => "in",
            Dir::Out => "out",
            Dir::Fwd => "fwd",
        })
    }
}

/// An IPv4 xfrm policy of upstream's shape: a selector from `src` to `dst` in direction `dir`,
/// one template (ESP, tunnel mode, request id [`REQID`]) from `tmpl_src` to `tmpl_dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Policy {
    /// The selector's source.
    pub src: Ipv4Net,
    /// The selector's destination.
    pub dst: Ipv4Net,
    /// The direction.
    pub dir: Dir,
    /// The tunnel's outer source address.
    pub tmpl_src: Ipv4Addr,
    /// The tunnel's outer destination address.
    pub tmpl_dst: Ipv4Addr,
}

impl Policy {
    /// What the kernel keys a policy by (besides marks and interface ids, which flannel does not
    /// use): its selector and direction.
    pub fn selector(&self) -> (Ipv4Net, Ipv4Net, Dir) {
        (self.src, self.dst, self.dir)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} dir {} tmpl {} -> {} esp tunnel reqid {REQID}",
            self.src, self.dst, self.dir, self.tmpl_src, self.tmpl_dst
        )
    }
}

/// A policy as read from the kernel: its selector and direction, and its first template if it
/// has one (with the template's protocol, mode and request id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPolicy {
    /// The selector's source.
    pub src: Ipv4Net,
    /// The selector's destination.
    pub dst: Ipv4Net,
    /// The direction.
    pub dir: Dir,
    /// The first template: outer source, outer destination, protocol, mode, request id.
    pub tmpl: Option<Template>,
}

/// An xfrm policy template as read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    /// Outer source address.
    pub src: Ipv4Addr,
    /// Outer destination address.
    pub dst: Ipv4Addr,
    /// IP protocol (50 for ESP).
    pub proto: u8,
    /// Mode (1 for tunnel).
    pub mode: u8,
    /// Request id.
    pub reqid: u32,
}

impl KernelPolicy {
    /// The policy in upstream's shape, if it has that shape (ESP, tunnel, [`REQID`]).
    pub fn as_flannel(&self) -> Option<Policy> {
        let t = self.tmpl?;
        (t.proto == libc::IPPROTO_ESP as u8 && t.mode == 1 && t.reqid == REQID).then_some(Policy {
            src: self.src,
            dst: self.dst,
            dir: self.dir,
            tmpl_src: t.src,
            tmpl_dst: t.dst,
        })
    }
}

/// The tunnels for `leases` (the peers' leases, the own excluded), by connection name, and
/// warnings for leases that cannot be served. Leases of other backend types are ignored, as
/// upstream does.
pub fn desired_tunnels(local: End, leases: &[&Lease]) -> (BTreeMap<String, Tunnel>, Vec<String>) {
    let mut tunnels = BTreeMap::new();
    let mut warnings = Vec::new();
    for lease in leases {
        if lease.attrs.backend_type != "ipsec" {
            continue;
        }
        let Some(subnet) = lease.subnet() else {
            continue;
        };
        if subnet == local.subnet {
            continue;
        }
        let ip = lease.attrs.public_ip;
        if let Some(why) = flannel_dataplane::lease_policy::unusable_tunnel_end(ip) {
            warnings.push(format!(
                "ignoring ipsec lease {} for {subnet}: {why} ({ip}) to tunnel to",
                lease.key
            ));
            continue;
        }
        let t = Tunnel {
            local,
            remote: End { ip, subnet },
        };
        tunnels.insert(t.conn_name(), t);
    }
    (tunnels, warnings)
}

/// Whether a policy read from the kernel is this host's flannel's: upstream's shape, with the
/// own subnet on one side and a subnet of the network on the other. Policies of anything else
/// (another IPsec setup on the host) are never touched.
pub fn is_ours(p: &Policy, network: Ipv4Net, own: Ipv4Net) -> bool {
    (p.src == own && network.contains(&p.dst) && p.dst != own)
        || (p.dst == own && network.contains(&p.src) && p.src != own)
}

/// What to change in the kernel's policies: the desired ones that are missing or differ (to
/// add or replace: the kernel keys a policy by selector and direction), and the host's flannel
/// policies nothing wants any more (to delete).
pub fn policy_changes(
    desired: &BTreeSet<Policy>,
    kernel: &[KernelPolicy],
    network: Ipv4Net,
    own: Ipv4Net,
) -> (Vec<Policy>, Vec<Policy>) {
    let have: BTreeMap<_, _> = kernel.iter().map(|k| ((k.src, k.dst, k.dir), k)).collect();
    let upserts = desired
        .iter()
        .filter(|p| {
            have.get(&p.selector())
                .and_then(|k| k.as_flannel())
                .as_ref()
                != Some(*p)
        })
        .copied()
        .collect();
    let wanted: BTreeSet<_> = desired.iter().map(Policy::selector).collect();
    let deletes = kernel
        .iter()
        .filter_map(KernelPolicy::as_flannel)
        .filter(|p| is_ours(p, network, own) && !wanted.contains(&p.selector()))
        .collect();
    (upserts, deletes)
}

/// The connection names to load (desired, not loaded) and to unload (loaded, ours, not
/// desired). A connection is ours when its name starts with `<local IP>-<local subnet>-`
/// (upstream's naming); charon's other connections are left alone.
pub fn conn_changes(
    desired: &BTreeMap<String, Tunnel>,
    loaded: &BTreeSet<String>,
    local: End,
) -> (Vec<Tunnel>, Vec<String>) {
    let prefix = format!("{}-{}-", local.ip, local.subnet);
    let load = desired
        .iter()
        .filter(|(name, _)| !loaded.contains(*name))
        .map(|(_, t)| *t)
        .collect();
    let unload = loaded
        .iter()
        .filter(|n| n.starts_with(&prefix) && !desired.contains_key(*n))
        .cloned()
        .collect();
    (load, unload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::testing::peer_lease;

    fn local() -> End {
        End {
            ip: "192.168.0.1".parse().unwrap(),
            subnet: "10.5.1.0/24".parse().unwrap(),
        }
    }

    fn net() -> Ipv4Net {
        "10.5.0.0/16".parse().unwrap()
    }

    fn tunnels(leases: &[Lease]) -> (BTreeMap<String, Tunnel>, Vec<String>) {
        let refs: Vec<&Lease> = leases.iter().collect();
        desired_tunnels(local(), &refs)
    }

    #[test]
    fn one_tunnel_per_ipsec_peer_named_as_upstream() {
        let (t, w) = tunnels(&[
            peer_lease("10.5.2.0-24", "192.168.0.2", "ipsec", None),
            peer_lease("10.5.3.0-24", "192.168.0.3", "vxlan", None),
            peer_lease("10.5.4.0-24", "0.0.0.0", "ipsec", None),
            peer_lease("10.5.1.0-24", "192.168.0.9", "ipsec", None),
        ]);
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            ["192.168.0.1-10.5.1.0/24-10.5.2.0/24-192.168.0.2"]
        );
        let tunnel = t.values().next().unwrap();
        assert_eq!(tunnel.child_name(), "10.5.1.0/24-10.5.2.0/24");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("10.5.4.0") && w[0].contains("no public IP"),
            "{w:?}"
        );
    }

    #[test]
    fn policies_are_upstreams_three() {
        let (t, _) = tunnels(&[peer_lease("10.5.2.0-24", "192.168.0.2", "ipsec", None)]);
        let p: Vec<String> = t
            .values()
            .next()
            .unwrap()
            .policies()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            p,
            [
                "10.5.1.0/24 -> 10.5.2.0/24 dir out tmpl 192.168.0.1 -> 192.168.0.2 esp tunnel reqid 11",
                "10.5.2.0/24 -> 10.5.1.0/24 dir in tmpl 192.168.0.2 -> 192.168.0.1 esp tunnel reqid 11",
                "10.5.2.0/24 -> 10.5.1.0/24 dir fwd tmpl 192.168.0.2 -> 192.168.0.1 esp tunnel reqid 11",
            ]
        );
    }

    fn kernel(p: &Policy) -> KernelPolicy {
        KernelPolicy {
            src: p.src,
            dst: p.dst,
            dir: p.dir,
            tmpl: Some(Template {
                src: p.tmpl_src,
                dst: p.tmpl_dst,
                proto: 50,
                mode: 1,
                reqid: REQID,
            }),
        }
    }

    #[test]
    fn policy_changes_add_missing_replace_changed_and_delete_only_own_stale() {
        let (t, _) = tunnels(&[
            peer_lease("10.5.2.0-24", "192.168.0.2", "ipsec", None),
            peer_lease("10.5.3.0-24", "192.168.0.3", "ipsec", None),
        ]);
        let desired: BTreeSet<Policy> = t.values().flat_map(|t| t.policies()).collect();
        let mut have: Vec<KernelPolicy> = desired.iter().map(kernel).collect();
        // In sync: nothing to do, twice.
        assert_eq!(
            policy_changes(&desired, &have, net(), local().subnet),
            (vec![], vec![])
        );

        // One deleted behind flanneld's back, one pointing at an old address of the peer.
        let gone = have.remove(0);
        let moved = have.iter_mut().find(|k| k.dir == Dir::Out).unwrap();
        moved.tmpl = Some(Template {
            dst: "192.168.0.99".parse().unwrap(),
            ..moved.tmpl.unwrap()
        });
        let moved_sel = (moved.src, moved.dst, moved.dir);
        // A departed peer's policy, and policies that are not flannel's.
        let departed = Tunnel {
            local: local(),
            remote: End {
                ip: "192.168.0.4".parse().unwrap(),
                subnet: "10.5.4.0/24".parse().unwrap(),
            },
        }
        .policies()[1];
        have.push(kernel(&departed));
        let foreign_reqid = KernelPolicy {
            src: "10.5.1.0/24".parse().unwrap(),
            dst: "10.5.9.0/24".parse().unwrap(),
            dir: Dir::Out,
            tmpl: Some(Template {
                reqid: 7,
                ..kernel(&departed).tmpl.unwrap()
            }),
        };
        let outside = kernel(&Policy {
            src: "10.5.1.0/24".parse().unwrap(),
            dst: "172.16.0.0/24".parse().unwrap(),
            dir: Dir::Out,
            tmpl_src: local().ip,
            tmpl_dst: "192.168.0.7".parse().unwrap(),
        });
        let between_others = kernel(&Policy {
            src: "10.5.7.0/24".parse().unwrap(),
            dst: "10.5.8.0/24".parse().unwrap(),
            dir: Dir::Out,
            tmpl_src: local().ip,
            tmpl_dst: "192.168.0.8".parse().unwrap(),
        });
        have.extend([foreign_reqid, outside, between_others]);

        let (up, del) = policy_changes(&desired, &have, net(), local().subnet);
        let mut up_sel: Vec<_> = up.iter().map(Policy::selector).collect();
        up_sel.sort();
        let mut want = vec![(gone.src, gone.dst, gone.dir), moved_sel];
        want.sort();
        assert_eq!(up_sel, want);
        assert_eq!(del, vec![departed]);
    }

    #[test]
    fn conn_changes_leave_other_connections_alone() {
        let (t, _) = tunnels(&[
            peer_lease("10.5.2.0-24", "192.168.0.2", "ipsec", None),
            peer_lease("10.5.3.0-24", "192.168.0.3", "ipsec", None),
        ]);
        let loaded: BTreeSet<String> = [
            "192.168.0.1-10.5.1.0/24-10.5.2.0/24-192.168.0.2",
            "192.168.0.1-10.5.1.0/24-10.5.4.0/24-192.168.0.4",
            "site-to-site",
            // An old subnet of this host (another network config): not this flanneld's to unload.
            "192.168.0.1-10.6.1.0/24-10.6.2.0/24-192.168.0.2",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let (load, unload) = conn_changes(&t, &loaded, local());
        assert_eq!(
            load.iter().map(Tunnel::conn_name).collect::<Vec<_>>(),
            ["192.168.0.1-10.5.1.0/24-10.5.3.0/24-192.168.0.3"]
        );
        assert_eq!(unload, ["192.168.0.1-10.5.1.0/24-10.5.4.0/24-192.168.0.4"]);
    }
}
