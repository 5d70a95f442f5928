//! # flannel-backend-extension
//!
//! flannel's `extension` backend (shared/spec/flannel-compat.md §5.4), registered as `extension`: no
//! data plane of its own, but the operator's shell commands, run at start-up and for every peer
//! subnet that is added or removed. It is how upstream suggests prototyping a backend, and how some
//! clusters plug in routing flannel does not do itself.
//!
//! ```json
//! {
//!   "Network": "10.50.0.0/16",
//!   "Backend": {
//!     "Type": "extension",
//!     "PreStartupCommand": "cat /sys/class/net/eth0/address",
//!     "PostStartupCommand": "echo \"this host has $SUBNET\"",
//!     "SubnetAddCommand": "read MAC; ip route replace \"$SUBNET\" via \"$PUBLIC_IP\"",
//!     "SubnetRemoveCommand": "ip route del \"$SUBNET\" via \"$PUBLIC_IP\""
//!   }
//! }
//! ```
//!
//! ## What runs when (as upstream)
//!
//! - `PreStartupCommand`, before the lease is acquired: its output (stdout and stderr, trimmed) is
//!   published as the lease's `BackendData`, a JSON string. A failure stops the start.
//! - `PostStartupCommand`, once the lease is held, with this host's `NETWORK`, `SUBNET`,
//!   `IPV6SUBNET`, `PUBLIC_IP` and `PUBLIC_IPV6` in its environment. A failure stops the start.
//! - `SubnetAddCommand`, for each peer lease of type `extension` that appears or whose value changes
//!   (also for every peer at start), with the peer's `SUBNET`, `IPV6SUBNET`, `PUBLIC_IP` and
//!   `PUBLIC_IPV6` in its environment and the peer's backend data (the text of its JSON string) on
//!   stdin.
//! - `SubnetRemoveCommand`, for each such lease that goes away, with what the add command got.
//!
//! Every command runs as `sh -c <command>` with flanneld's environment plus those variables, as
//! upstream documents it (Go flannel from v0.28.2 splits the command on spaces and expands the
//! variables itself instead, so its documented examples, which quote, no longer run there). The
//! values are never pasted into the command text: a lease's addresses are parsed addresses, and a
//! peer's data only ever reaches stdin. A value a lease does not have is empty (Go writes `0.0.0.0/0`
//! or `::/0`).
//!
//! ## Limits Go's backend does not have
//!
//! - Each command is killed, with its whole process group, after [`COMMAND_TIMEOUT`] or when
//!   flanneld stops while it runs; its output is kept up to [`MAX_OUTPUT`] bytes. A child a
//!   finished command left running in the background is not waited for, nor killed.
//! - Peer leases pass the data plane's [`flannel_dataplane::LeasePolicy`] first: a lease outside the
//!   network, overlapping this host's subnet, a network directly connected to the external interface
//!   (the underlay) or a network the host routes outside the cluster network is refused (logged once
//!   per change, counted in `flannel_leases_refused`) and no command runs for it. A remove command
//!   runs only for a lease the add command ran for.
//! - A renewal that changes nothing runs nothing (upstream runs the add command again).
//!
//! Failed commands are logged with their output and counted (`flannel_extension_commands`), and not
//! retried, as upstream: write commands that can run twice (`ip route replace`, not `add`), since
//! every peer's add command runs again at each start.

mod command;
pub mod metrics;
mod options;

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;
use flannel_core::{
    Backend, BackendContext, BackendError, Lease, LeaseAttrs, LeaseChange, LeaseTracker,
    LeaseWatch, LeaseWatchResult, Network, NetworkConfig, RawJson, SubnetKey, SubnetManager,
    until_cancelled,
};
use flannel_dataplane::{KernelOps, LeasePolicy, Ownership};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use command::{COMMAND_TIMEOUT, CommandError, MAX_OUTPUT, run_command};
pub use options::{ExtensionOptions, MAX_COMMAND_LEN, backend_data_of, peer_stdin};

flannel_core::register_backend!("extension", ExtensionBackend::create);

/// The lease `BackendType` of this backend.
pub const BACKEND_TYPE: &str = "extension";

/// One of the four commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `PreStartupCommand`.
    PreStartup,
    /// `PostStartupCommand`.
    PostStartup,
    /// `SubnetAddCommand`.
    SubnetAdd,
    /// `SubnetRemoveCommand`.
    SubnetRemove,
}

impl Hook {
    /// The option's name in the network config.
    pub fn option(self) -> &'static str {
        match self {
            Hook::PreStartup => "PreStartupCommand",
            Hook::PostStartup => "PostStartupCommand",
            Hook::SubnetAdd => "SubnetAddCommand",
            Hook::SubnetRemove => "SubnetRemoveCommand",
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Hook::PreStartup => "pre_startup",
            Hook::PostStartup => "post_startup",
            Hook::SubnetAdd => "subnet_add",
            Hook::SubnetRemove => "subnet_remove",
        }
    }

    /// The command configured for this hook, if any.
    pub fn command(self, options: &ExtensionOptions) -> Option<&str> {
        match self {
            Hook::PreStartup => options.pre_startup.as_deref(),
            Hook::PostStartup => options.post_startup.as_deref(),
            Hook::SubnetAdd => options.subnet_add.as_deref(),
            Hook::SubnetRemove => options.subnet_remove.as_deref(),
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.option())
    }
}

/// `value`'s text, or empty when absent.
fn text(value: Option<impl ToString>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// The environment a peer command gets for `lease`: `SUBNET`, `IPV6SUBNET`, `PUBLIC_IP`,
/// `PUBLIC_IPV6` (empty when the lease has no such value).
pub fn lease_env(lease: &Lease) -> Vec<(&'static str, String)> {
    let public_ip = Some(lease.attrs.public_ip).filter(|ip| !ip.is_unspecified());
    vec![
        ("SUBNET", text(lease.subnet())),
        ("IPV6SUBNET", text(lease.ipv6_subnet())),
        ("PUBLIC_IP", text(public_ip)),
        ("PUBLIC_IPV6", text(lease.attrs.public_ipv6)),
    ]
}

/// The environment of the post-startup command: `NETWORK` (the IPv4 network) and this host's
/// [`lease_env`].
pub fn own_env(config: &NetworkConfig, lease: &Lease) -> Vec<(&'static str, String)> {
    let mut env = vec![("NETWORK", text(config.network()))];
    env.extend(lease_env(lease));
    env
}

/// What to do about one lease change.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Run the add command for the lease, with this stdin.
    Add(Lease, String),
    /// Run the remove command for the lease as it was added, with the stdin the add command got.
    Remove(Lease, String),
    /// Nothing runs for the lease.
    Skip(Skip),
}

/// Why no command runs for a lease (the message is logged as a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The lease policy refused the lease as unsafe (also counted in `flannel_leases_refused`).
    Refused(String),
    /// Not an extension lease, or its data is not a JSON string (upstream skips those too).
    Ignored(String),
}

/// The peer side as data: which leases the add command ran for, and what each lease change asks
/// for ([`PeerCommands::apply`]). Pure: no commands run here.
#[derive(Debug)]
pub struct PeerCommands {
    tracker: LeaseTracker,
    added: HashMap<SubnetKey, (Lease, String)>,
}

impl PeerCommands {
    /// The peers of a host whose own lease is `own` (never reported).
    pub fn new(own: SubnetKey) -> Self {
        Self {
            tracker: LeaseTracker::new(Some(own)),
            added: HashMap::new(),
        }
    }

    /// The steps for one watch result, in order. `check` is the lease policy: `Err(why)` refuses a
    /// lease.
    pub fn apply(
        &mut self,
        result: LeaseWatchResult,
        check: &dyn Fn(&Lease) -> Result<(), String>,
    ) -> Vec<Step> {
        let mut steps = Vec::new();
        let added = &mut self.added;
        self.tracker.apply_each(result, |change| match change {
            LeaseChange::Added(lease) => {
                // The stdin for the add command, or why none runs.
                let usable = if lease.attrs.backend_type != BACKEND_TYPE {
                    Err(Skip::Ignored(format!(
                        "ignoring the non-extension lease {lease} (type {:?})",
                        lease.attrs.backend_type
                    )))
                } else {
                    check(lease).map_err(Skip::Refused).and_then(|()| {
                        let data = lease.attrs.backend_data.as_ref().map(RawJson::to_value);
                        peer_stdin(data.as_ref())
                            .map_err(|why| Skip::Ignored(format!("ignoring lease {lease}: {why}")))
                    })
                };
                match usable {
                    Ok(stdin) => {
                        added.insert(lease.key, (lease.clone(), stdin.clone()));
                        steps.push(Step::Add(lease.clone(), stdin));
                    }
                    Err(skip) => {
                        steps.push(Step::Skip(skip));
                        // What the add command set up for the lease's old value goes.
                        if let Some((old, stdin)) = added.remove(&lease.key) {
                            steps.push(Step::Remove(old, stdin));
                        }
                    }
                }
            }
            LeaseChange::Removed(lease) => match added.remove(&lease.key) {
                Some((old, stdin)) => steps.push(Step::Remove(old, stdin)),
                None => debug!(%lease, "removed lease had no add command run; nothing to remove"),
            },
        });
        steps
    }
}

/// Runs `hook`'s command if it is configured, logs and counts the outcome. `Ok(None)` when there is
/// no command.
async fn run_hook(
    hook: Hook,
    options: &ExtensionOptions,
    env: &[(&'static str, String)],
    stdin: &str,
) -> Result<Option<String>, CommandError> {
    let Some(cmd) = hook.command(options) else {
        debug!(%hook, "no command configured; skipping");
        return Ok(None);
    };
    match run_command(cmd, env, stdin, COMMAND_TIMEOUT).await {
        Ok(output) => {
            metrics::metrics().record(hook.label(), "ok");
            info!(%hook, command = cmd, %output, "ran command");
            Ok(Some(output))
        }
        Err(e) => {
            metrics::metrics().record(hook.label(), e.kind());
            Err(e)
        }
    }
}

/// The `extension` backend.
#[derive(Debug)]
pub struct ExtensionBackend {
    ctx: BackendContext,
}

impl ExtensionBackend {
    /// The registered constructor.
    pub fn create(ctx: BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(Self { ctx }))
    }
}

fn failed(hook: Hook, e: &CommandError) -> BackendError {
    BackendError::Other(format!(
        "the extension backend's {hook} failed: {e}; fix the command in the network config's Backend.{hook}"
    ))
}

#[async_trait]
impl Backend for ExtensionBackend {
    async fn register_network(
        &self,
        config: &NetworkConfig,
    ) -> Result<Box<dyn Network>, BackendError> {
        let options = ExtensionOptions::parse(&config.backend)?;
        let ext = &self.ctx.ext_iface;
        let backend_data = run_hook(Hook::PreStartup, &options, &[], "")
            .await
            .map_err(|e| failed(Hook::PreStartup, &e))?
            .map(|out| RawJson::from_value(&backend_data_of(&out)));
        let attrs = LeaseAttrs {
            public_ip: ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: config.ipv6_network().and(ext.ext_v6_addr),
            backend_type: BACKEND_TYPE.into(),
            backend_data,
            ..Default::default()
        };
        let lease = self.ctx.subnet_manager.acquire_lease(&attrs).await?;
        run_hook(Hook::PostStartup, &options, &own_env(config, &lease), "")
            .await
            .map_err(|e| failed(Hook::PostStartup, &e))?;
        Ok(Box::new(ExtensionNetwork {
            networks: cluster_networks(config),
            ext_index: ext.index,
            lease,
            mtu: ext.mtu,
            options,
            sm: self.ctx.subnet_manager.clone(),
        }))
    }
}

/// The cluster networks of a config (IPv4 and IPv6, those in use).
fn cluster_networks(config: &NetworkConfig) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = config.network().map(IpNet::V4).into_iter().collect();
    nets.extend(config.ipv6_network().map(IpNet::V6));
    nets
}

/// The network of the `extension` backend: runs the peer commands as leases come and go.
#[derive(Debug)]
pub struct ExtensionNetwork {
    networks: Vec<IpNet>,
    ext_index: u32,
    lease: Lease,
    mtu: u32,
    options: ExtensionOptions,
    sm: Arc<dyn SubnetManager>,
}

impl ExtensionNetwork {
    /// The lease policy for this host: the cluster networks, the own subnet, and the host's routes
    /// outside the cluster networks and its directly connected networks on the external interface
    /// (the underlay). Other routes into the cluster networks may be what the commands installed
    /// before a restart (a route via a peer, or through a device of the commands' own), so they are
    /// not taken for the host's networks.
    async fn policy(&self) -> LeasePolicy {
        let routes = match flannel_dataplane::netlink::Netlink::new() {
            Ok(nl) => nl.host_routes().await,
            Err(e) => Err(e),
        };
        let routes = routes.unwrap_or_else(|e| {
            warn!(error = %flannel_dataplane::chain(&e), "cannot read the routing table; leases are checked against the cluster network and the own subnet only");
            Vec::new()
        });
        let outside: Vec<_> = routes
            .into_iter()
            .filter(|r| {
                let underlay = r.gateway.is_none() && r.oif == self.ext_index;
                underlay || !self.networks.iter().any(|n| n.contains(&r.dst))
            })
            .collect();
        let ownership = Ownership {
            networks: self.networks.clone(),
            ..Default::default()
        };
        LeasePolicy::new(self.lease.key, &ownership, &outside)
            .with_own_public_ips(self.lease.attrs.public_ips())
    }

    async fn execute(&self, step: Step) {
        let (hook, lease, stdin) = match step {
            Step::Skip(Skip::Refused(why)) => {
                flannel_dataplane::metrics::metrics().leases_refused.inc();
                warn!("{why}");
                return;
            }
            Step::Skip(Skip::Ignored(why)) => {
                warn!("{why}");
                return;
            }
            Step::Add(lease, stdin) => (Hook::SubnetAdd, lease, stdin),
            Step::Remove(lease, stdin) => (Hook::SubnetRemove, lease, stdin),
        };
        info!(%hook, %lease, "subnet {}", if hook == Hook::SubnetAdd { "added" } else { "removed" });
        if let Err(e) = run_hook(hook, &self.options, &lease_env(&lease), &stdin).await {
            warn!(%hook, %lease, error = %e, "command failed (not retried)");
        }
    }
}

#[async_trait]
impl Network for ExtensionNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) -> Result<(), BackendError> {
        let mut watch = LeaseWatch::start(self.sm.clone(), &shutdown);
        let policy = self.policy().await;
        let check = |lease: &Lease| policy.check(lease);
        let mut peers = PeerCommands::new(self.lease.key);
        info!("watching for new subnet leases");
        while let Some(result) = watch.next(&shutdown).await? {
            for step in peers.apply(result, &check) {
                if until_cancelled(&shutdown, self.execute(step))
                    .await
                    .is_none()
                {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use flannel_core::LeaseEvent;

    fn lease(subnet: &str, ip: &str, ty: &str, data: Option<serde_json::Value>) -> Lease {
        flannel_core::testing::peer_lease(&subnet.replace('/', "-"), ip, ty, data)
    }

    fn ok(_: &Lease) -> Result<(), String> {
        Ok(())
    }

    fn names(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Add(l, stdin) => format!("add {} {stdin}", l.key),
                Step::Remove(l, stdin) => format!("remove {} {stdin}", l.key),
                Step::Skip(Skip::Refused(why)) => format!("refuse: {why}"),
                Step::Skip(Skip::Ignored(why)) => format!("ignore: {why}"),
            })
            .collect()
    }

    #[test]
    fn peers_are_added_changed_and_removed_once_each() {
        let own = lease("10.5.1.0/24", "172.20.0.11", "extension", None);
        let mut p = PeerCommands::new(own.key);
        let a = lease(
            "10.5.2.0/24",
            "172.20.0.12",
            "extension",
            Some("mac-a".into()),
        );
        let b = lease("10.5.3.0/24", "172.20.0.13", "extension", None);
        let steps = p.apply(
            LeaseWatchResult::Snapshot(vec![own.clone(), a.clone(), b.clone()]),
            &ok,
        );
        assert_eq!(
            names(&steps),
            ["add 10.5.2.0-24 mac-a", "add 10.5.3.0-24 "],
            "own lease never, each peer once"
        );
        // A renewal (same value) runs nothing; a changed value runs the add command again.
        let steps = p.apply(
            LeaseWatchResult::Events(vec![LeaseEvent::Added(a.clone())]),
            &ok,
        );
        assert!(steps.is_empty(), "{steps:?}");
        let a2 = lease(
            "10.5.2.0/24",
            "172.20.0.22",
            "extension",
            Some("mac-a2".into()),
        );
        let steps = p.apply(LeaseWatchResult::Events(vec![LeaseEvent::Added(a2)]), &ok);
        assert_eq!(names(&steps), ["add 10.5.2.0-24 mac-a2"]);
        // A removal carries what the add command got, also when the event has less.
        let mut bare = a.clone();
        bare.attrs = LeaseAttrs::default();
        let steps = p.apply(
            LeaseWatchResult::Events(vec![LeaseEvent::Removed(bare)]),
            &ok,
        );
        assert_eq!(names(&steps), ["remove 10.5.2.0-24 mac-a2"]);
        match &steps[0] {
            Step::Remove(l, _) => assert_eq!(l.attrs.public_ip.to_string(), "172.20.0.22"),
            other => panic!("{other:?}"),
        }
        // A snapshot without b removes it.
        let steps = p.apply(LeaseWatchResult::Snapshot(vec![own]), &ok);
        assert_eq!(names(&steps), ["remove 10.5.3.0-24 "]);
    }

    #[test]
    fn refused_foreign_and_malformed_leases_run_nothing() {
        let own = lease("10.5.1.0/24", "172.20.0.11", "extension", None);
        let mut p = PeerCommands::new(own.key);
        let refuse = |l: &Lease| {
            if l.key.ipv4.to_string() == "10.5.9.0/24" {
                Err("refusing lease 10.5.9.0-24: it overlaps the underlay".to_string())
            } else {
                Ok(())
            }
        };
        let steps = p.apply(
            LeaseWatchResult::Snapshot(vec![
                lease("10.5.9.0/24", "172.20.0.19", "extension", None),
                lease(
                    "10.5.4.0/24",
                    "172.20.0.14",
                    "vxlan",
                    Some(serde_json::json!({"VNI": 1})),
                ),
                lease(
                    "10.5.5.0/24",
                    "172.20.0.15",
                    "extension",
                    Some(serde_json::json!({"x": 1})),
                ),
            ]),
            &refuse,
        );
        let n = names(&steps);
        assert_eq!(n.len(), 3, "{n:?}");
        // Refused (unsafe, counted as such) apart from ignored (not ours, or malformed).
        assert!(
            n.iter()
                .any(|s| s.starts_with("refuse: ") && s.contains("overlaps the underlay")),
            "{n:?}"
        );
        assert!(
            n.iter().any(|s| s.starts_with("ignore: ")
                && s.contains("non-extension")
                && s.contains("vxlan")),
            "{n:?}"
        );
        assert!(
            n.iter()
                .any(|s| s.starts_with("ignore: ") && s.contains("not the JSON string")),
            "{n:?}"
        );
        // Their removal runs no remove command: none of them was added.
        let steps = p.apply(LeaseWatchResult::Snapshot(vec![]), &refuse);
        assert!(steps.is_empty(), "{steps:?}");
        // A lease that was added and then turns bad has its old value removed.
        let good = lease("10.5.6.0/24", "172.20.0.16", "extension", Some("m".into()));
        p.apply(LeaseWatchResult::Snapshot(vec![good.clone()]), &ok);
        let mut bad = good.clone();
        bad.attrs.backend_data = Some(RawJson::from_value(&serde_json::json!(7)));
        let steps = p.apply(LeaseWatchResult::Events(vec![LeaseEvent::Added(bad)]), &ok);
        let n = names(&steps);
        assert!(
            n[0].starts_with("ignore: ") && n[1] == "remove 10.5.6.0-24 m",
            "{n:?}"
        );
    }

    #[test]
    fn the_environment_names_every_value_and_leaves_absent_ones_empty() {
        let mut l = lease("10.5.2.0/24", "172.20.0.12", "extension", None);
        let env = lease_env(&l);
        assert_eq!(
            env,
            vec![
                ("SUBNET", "10.5.2.0/24".to_string()),
                ("IPV6SUBNET", String::new()),
                ("PUBLIC_IP", "172.20.0.12".to_string()),
                ("PUBLIC_IPV6", String::new()),
            ]
        );
        // An IPv6-only lease: no IPv4 values (Go would say 0.0.0.0/0, a default route).
        l.enable_ipv4 = false;
        l.key.ipv6 = Some("fd00:5:2::/64".parse().unwrap());
        l.attrs.public_ip = Ipv4Addr::UNSPECIFIED;
        l.attrs.public_ipv6 = Some("fd00:20::12".parse().unwrap());
        let env: HashMap<_, _> = lease_env(&l).into_iter().collect();
        assert_eq!(env["SUBNET"], "");
        assert_eq!(env["PUBLIC_IP"], "");
        assert_eq!(env["IPV6SUBNET"], "fd00:5:2::/64");
        assert_eq!(env["PUBLIC_IPV6"], "fd00:20::12");
        let config =
            NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"extension"}}"#)
                .unwrap();
        let own: HashMap<_, _> = own_env(
            &config,
            &lease("10.5.1.0/24", "172.20.0.11", "extension", None),
        )
        .into_iter()
        .collect();
        assert_eq!(own["NETWORK"], "10.5.0.0/16");
        assert_eq!(own["SUBNET"], "10.5.1.0/24");
    }
}
