//! IP masquerade (`--ip-masq`) and forward (`--iptables-forward-rules`) rules, shared/spec/flannel-compat.md
//! §6, in Go flanneld HEAD's rule set (v0.21.3+: jumps appended, RETURN rules split by subnet).
//!
//! Rule generation is pure ([`masq_rules`], [`forward_rules`], [`restore_payload`], [`in_sync`],
//! [`complete`], [`repair_payload`]); applying is one `iptables-restore --noflush --wait`
//! transaction per table. At start it declares (creates or flushes) the flannel chain, fills it,
//! and replaces the jump into it, unless the chain already holds exactly these rules: rules for an
//! old subnet from a previous run disappear then (as Go flushes the chains at start). A resync loop checks `iptables -S` every `--iptables-resync` seconds for each of
//! its rules and the jump, and puts back what is missing without a flush, so the rules of a second
//! flanneld on the host (another network, `--etcd-prefix`, Go's `test_multi`) in the same chains stay,
//! as Go's resync leaves them.
//!
//! Every `iptables`/`nft` call is a `tokio::process` child with a timeout ([`RUN_TIMEOUT`]), so a
//! held xtables lock or a hung tool never stalls the agent (its `/healthz`, its lease keep-alive).
//! A listing that cannot be read is logged and counted, not taken for "rules missing".
//!
//! With `EnableIPv6` the same chains are kept in ip6tables for the IPv6 network (Go's `MasqIP6Rules`
//! and forward rules: multicast `ff00::/8` instead of `224.0.0.0/4`).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The masquerade chain.
pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
/// The forward chain.
pub const FWD_CHAIN: &str = "FLANNEL-FWD";

/// One table's flannel chain and the jump into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// The flannel chain.
    pub chain: &'static str,
    /// The built-in chain that jumps to it.
    pub parent: &'static str,
    /// The jump rule's arguments.
    pub jump: Vec<String>,
    /// The chain's rules' arguments, in order.
    pub rules: Vec<Vec<String>>,
    /// ip6tables instead of iptables.
    pub ipv6: bool,
}

impl RuleSet {
    /// `iptables` or `ip6tables`.
    pub fn command(&self) -> &'static str {
        if self.ipv6 { "ip6tables" } else { "iptables" }
    }

    /// `iptables-restore` or `ip6tables-restore`.
    pub fn restore_command(&self) -> &'static str {
        if self.ipv6 {
            "ip6tables-restore"
        } else {
            "iptables-restore"
        }
    }
}

fn args(s: &str, comment: &str) -> Vec<String> {
    // `C` stands for the comment match, kept as one token for the comment text.
    let mut out = Vec::new();
    for t in s.split_whitespace() {
        if t == "C" {
            out.extend([
                "-m".to_string(),
                "comment".into(),
                "--comment".into(),
                comment.to_string(),
            ]);
        } else {
            out.push(t.to_string());
        }
    }
    out
}

/// The masquerade rules for cluster network `n` and own subnet `s` (HEAD's set), in iptables for
/// IPv4 networks and ip6tables for IPv6 ones.
pub fn masq_rules(n: IpNet, s: IpNet, random_fully: bool) -> RuleSet {
    let c = "flanneld masq";
    let rf = if random_fully { " --random-fully" } else { "" };
    let ipv6 = matches!(n, IpNet::V6(_));
    let multicast = if ipv6 { "ff00::/8" } else { "224.0.0.0/4" };
    RuleSet {
        ipv6,
        table: "nat",
        chain: MASQ_CHAIN,
        parent: "POSTROUTING",
        jump: args(&format!("C -j {MASQ_CHAIN}"), c),
        rules: vec![
            args("-m mark --mark 0x4000/0x4000 C -j RETURN", c),
            args(&format!("-s {s} -d {n} C -j RETURN"), c),
            args(&format!("-s {n} -d {s} C -j RETURN"), c),
            args(&format!("! -s {n} -d {s} C -j RETURN"), c),
            args(&format!("-s {n} ! -d {multicast} C -j MASQUERADE{rf}"), c),
            args(&format!("! -s {n} -d {n} C -j MASQUERADE{rf}"), c),
        ],
    }
}

/// The forward accept rules for cluster network `n` (iptables or ip6tables by its family).
pub fn forward_rules(n: IpNet) -> RuleSet {
    let c = "flanneld forward";
    RuleSet {
        ipv6: matches!(n, IpNet::V6(_)),
        table: "filter",
        chain: FWD_CHAIN,
        parent: "FORWARD",
        jump: args(&format!("C -j {FWD_CHAIN}"), c),
        rules: vec![
            args(&format!("-s {n} C -j ACCEPT"), c),
            args(&format!("-d {n} C -j ACCEPT"), c),
        ],
    }
}

/// Renders arguments as `iptables -S` prints them (arguments with spaces in double quotes).
fn render(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl RuleSet {
    /// The chain as `iptables -t <table> -S <chain>` lists it.
    pub fn chain_listing(&self) -> Vec<String> {
        std::iter::once(format!("-N {}", self.chain))
            .chain(
                self.rules
                    .iter()
                    .map(|r| format!("-A {} {}", self.chain, render(r))),
            )
            .collect()
    }

    /// The jump as `iptables -S <parent>` lists it.
    pub fn jump_line(&self) -> String {
        format!("-A {} {}", self.parent, render(&self.jump))
    }
}

/// The `iptables-restore --noflush` payload that rebuilds the chain and its jump; `existing_jumps` is
/// how often the jump is present now (each copy is deleted first).
pub fn restore_payload(set: &RuleSet, existing_jumps: usize) -> String {
    let mut p = format!("*{}\n:{} - [0:0]\n", set.table, set.chain);
    for r in &set.rules {
        p.push_str(&format!("-A {} {}\n", set.chain, render(r)));
    }
    for _ in 0..existing_jumps {
        p.push_str(&format!("-D {} {}\n", set.parent, render(&set.jump)));
    }
    p.push_str(&format!(
        "-A {} {}\nCOMMIT\n",
        set.parent,
        render(&set.jump)
    ));
    p
}

/// Whether the chain holds every rule of `set` and its parent one jump into it (`iptables -C` of
/// each, as Go's resync checks): rules of others in the chain (a second flanneld on the host, for
/// another network, keeps its rules in the same chains) do not count against it.
pub fn complete(set: &RuleSet, chain_listing: &str, parent_listing: &str) -> bool {
    let have: std::collections::HashSet<&str> = chain_listing.lines().map(str::trim).collect();
    set.chain_listing()
        .iter()
        .all(|l| have.contains(l.as_str()))
        && jumps_in(set, parent_listing) == 1
}

fn jumps_in(set: &RuleSet, parent_listing: &str) -> usize {
    parent_listing
        .lines()
        .filter(|l| l.trim() == set.jump_line())
        .count()
}

/// The `iptables-restore --noflush` payload that puts back what [`complete`] found missing without
/// flushing the chain (others' rules stay): each rule of `set` deleted where present and appended
/// in order, as Go's bootstrap does, and the jump made single. A missing chain is made.
pub fn repair_payload(set: &RuleSet, chain_listing: &str, parent_listing: &str) -> String {
    let have: std::collections::HashSet<&str> = chain_listing.lines().map(str::trim).collect();
    if !have.contains(format!("-N {}", set.chain).as_str()) {
        return restore_payload(set, jumps_in(set, parent_listing));
    }
    let mut p = format!("*{}\n", set.table);
    for r in &set.rules {
        let rule = format!("{} {}", set.chain, render(r));
        if have.contains(format!("-A {rule}").as_str()) {
            p.push_str(&format!("-D {rule}\n"));
        }
        p.push_str(&format!("-A {rule}\n"));
    }
    for _ in 0..jumps_in(set, parent_listing) {
        p.push_str(&format!("-D {} {}\n", set.parent, render(&set.jump)));
    }
    p.push_str(&format!(
        "-A {} {}\nCOMMIT\n",
        set.parent,
        render(&set.jump)
    ));
    p
}

/// Whether the listings of the chain and its parent show exactly the expected rules and one jump.
pub fn in_sync(set: &RuleSet, chain_listing: &str, parent_listing: &str) -> bool {
    let have: Vec<&str> = chain_listing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let want = set.chain_listing();
    let jumps = parent_listing
        .lines()
        .filter(|l| l.trim() == set.jump_line())
        .count();
    have == want && jumps == 1
}

/// Errors from running iptables or nft.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {message}")]
pub struct IptablesError {
    command: String,
    message: String,
    /// The tool said the chain or table does not exist (a listing of nothing, not a failure).
    missing: bool,
}

/// How long one `iptables`/`nft` call may take (a held xtables lock makes `-w` wait).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a firewall tool as a `tokio::process` child (killed if it outlives [`RUN_TIMEOUT`]).
pub(crate) async fn run(args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let err = |message: String| IptablesError {
        command: args.join(" "),
        // How the tools say "no such chain/table" (iptables-nft 1.8.9 calls a chain that does not
        // exist yet "incompatible").
        missing: message.contains("No chain/target/match")
            || message.contains("No such file or directory")
            || message.contains("does not exist")
            || message.contains("is incompatible, use 'nft' tool"),
        message,
    };
    let mut child = tokio::process::Command::new(args[0])
        .args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(format!("{e} (is {} installed?)", args[0])))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
    }
    let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            err(format!(
                "no answer within {RUN_TIMEOUT:?} (does another program hold the xtables lock?)"
            ))
        })?
        .map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// A listing: the text, empty when the chain or table does not exist; an error when it could not be
/// read at all.
pub(crate) async fn list(args: &[&str]) -> Result<String, IptablesError> {
    match run(args, None).await {
        Err(e) if e.missing => Ok(String::new()),
        other => other,
    }
}

/// What `iptables --version` says: the version and whether it is the nf_tables variant.
pub async fn iptables_version() -> Result<((u32, u32, u32), bool), IptablesError> {
    let v = run(&["iptables", "--version"], None).await?;
    let nft = v.contains("nf_tables");
    let num = v
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .unwrap_or("0.0.0");
    let mut parts = num.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((
        (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        ),
        nft,
    ))
}

/// Whether `--random-fully` may be used (iptables ≥ 1.6.2, as Go checks).
pub fn supports_random_fully(version: (u32, u32, u32)) -> bool {
    version >= (1, 6, 2)
}

async fn listing(set: &RuleSet, chain: &str) -> Result<String, IptablesError> {
    list(&[set.command(), "-w", "-t", set.table, "-S", chain]).await
}

/// When rules are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// At start: the chain must hold exactly `set` (rebuilt whole otherwise, which also clears
    /// rules left from an earlier run with another subnet), as Go flushes the chains at start.
    Start,
    /// The resync: every rule of `set` present, others' rules left alone ([`complete`],
    /// [`repair_payload`]).
    Resync,
}

/// Makes the kernel hold `set` as `check` says (one transaction). Returns whether anything had to
/// change; an error (counted) when the rules could not even be read: nothing is rebuilt blindly
/// then.
pub async fn ensure(set: &RuleSet, check: Check) -> Result<bool, IptablesError> {
    let (chain, parent) = match (
        listing(set, set.chain).await,
        listing(set, set.parent).await,
    ) {
        (Ok(c), Ok(p)) => (c, p),
        (Err(e), _) | (_, Err(e)) => {
            crate::metrics::metrics().rule_read_errors.inc();
            return Err(e);
        }
    };
    let payload = match check {
        Check::Start if in_sync(set, &chain, &parent) => return Ok(false),
        Check::Start => restore_payload(set, jumps_in(set, &parent)),
        Check::Resync if complete(set, &chain, &parent) => return Ok(false),
        Check::Resync => repair_payload(set, &chain, &parent),
    };
    run(
        &[set.restore_command(), "--noflush", "--wait"],
        Some(&payload),
    )
    .await?;
    Ok(true)
}

/// Removes the flannel chains and jumps (when switching to nftables mode); best effort.
pub async fn remove(sets: &[RuleSet]) {
    for set in sets {
        let cmd = set.command();
        let parent = listing(set, set.parent).await.unwrap_or_default();
        for _ in parent.lines().filter(|l| l.trim() == set.jump_line()) {
            let mut args = vec![cmd, "-w", "-t", set.table, "-D", set.parent];
            args.extend(set.jump.iter().map(String::as_str));
            let _ = run(&args, None).await;
        }
        let _ = run(&[cmd, "-w", "-t", set.table, "-F", set.chain], None).await;
        let _ = run(&[cmd, "-w", "-t", set.table, "-X", set.chain], None).await;
    }
}

/// The masquerade and forward rules in one of the two kernel interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrafficRules {
    /// iptables chains (default).
    Iptables(Vec<RuleSet>),
    /// The nftables tables (`EnableNFTables`): IPv4, and IPv6 with `EnableIPv6`.
    Nftables(Vec<crate::nftables::NftTable>),
}

impl TrafficRules {
    /// Makes the kernel hold these rules as `check` says (nftables tables: exactly, both times);
    /// returns whether anything changed.
    pub async fn ensure(&self, check: Check) -> Result<bool, IptablesError> {
        let changed = match self {
            TrafficRules::Iptables(sets) => {
                let mut changed = false;
                for set in sets {
                    changed |= ensure(set, check).await?;
                }
                changed
            }
            TrafficRules::Nftables(tables) => {
                let mut changed = false;
                for t in tables {
                    changed |= crate::nftables::ensure(t).await?;
                }
                changed
            }
        };
        if changed {
            crate::metrics::metrics().rule_installs.inc();
        }
        Ok(changed)
    }
}

/// Keeps the rules in place until `shutdown`, checking every `every` and putting back what is
/// missing ([`Check::Resync`]: "Some rules are missing; deleting and recreating rules"; others'
/// rules in the chains stay, as Go's resync leaves them). Rules stay on exit, as with Go flanneld.
pub async fn keep(rules: TrafficRules, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match rules.ensure(Check::Resync).await {
            Ok(true) => info!("some flannel rules were missing or changed; recreated them"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "checking the flannel rules failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n() -> IpNet {
        "10.10.0.0/16".parse().unwrap()
    }
    fn s() -> IpNet {
        "10.10.1.0/24".parse().unwrap()
    }

    #[test]
    fn ipv6_sets_go_to_ip6tables_with_ipv6_multicast() {
        let n6: IpNet = "fd00:5::/48".parse().unwrap();
        let s6: IpNet = "fd00:5:0:1::/64".parse().unwrap();
        let set = masq_rules(n6, s6, false);
        assert_eq!(
            (set.command(), set.restore_command()),
            ("ip6tables", "ip6tables-restore")
        );
        assert!(set.chain_listing().contains(
            &r#"-A FLANNEL-POSTRTG -s fd00:5::/48 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE"#.to_string()
        ));
        assert!(forward_rules(n6).ipv6);
        assert_eq!(masq_rules(n(), s(), false).command(), "iptables");
    }

    #[test]
    fn golden_masq_listing() {
        let set = masq_rules(n(), s(), true);
        assert_eq!(
            set.jump_line(),
            r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#
        );
        assert_eq!(
            set.chain_listing(),
            vec![
                "-N FLANNEL-POSTRTG",
                r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.10.1.0/24 -d 10.10.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.10.0.0/16 -d 10.10.1.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG ! -s 10.10.0.0/16 -d 10.10.1.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.10.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
                r#"-A FLANNEL-POSTRTG ! -s 10.10.0.0/16 -d 10.10.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
            ]
        );
        assert!(
            !masq_rules(n(), s(), false)
                .chain_listing()
                .iter()
                .any(|l| l.contains("random-fully"))
        );
    }

    #[test]
    fn golden_forward_listing() {
        let set = forward_rules(n());
        assert_eq!(
            set.jump_line(),
            r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#
        );
        assert_eq!(
            set.chain_listing(),
            vec![
                "-N FLANNEL-FWD",
                r#"-A FLANNEL-FWD -s 10.10.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
                r#"-A FLANNEL-FWD -d 10.10.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
            ]
        );
    }

    #[test]
    fn payload_rebuilds_chain_and_replaces_jumps() {
        let set = forward_rules(n());
        let p = restore_payload(&set, 2);
        assert!(p.starts_with("*filter\n:FLANNEL-FWD - [0:0]\n-A FLANNEL-FWD -s 10.10.0.0/16"));
        assert_eq!(p.matches("-D FORWARD ").count(), 2);
        assert!(p.ends_with(
            "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\nCOMMIT\n"
        ));
    }

    #[test]
    fn sync_check() {
        let set = forward_rules(n());
        let chain = set.chain_listing().join("\n");
        let parent = format!("-P FORWARD ACCEPT\n{}\n", set.jump_line());
        assert!(in_sync(&set, &chain, &parent));
        assert!(
            !in_sync(&set, &chain, "-P FORWARD ACCEPT\n"),
            "missing jump"
        );
        assert!(
            !in_sync(&set, &chain, &format!("{parent}{}\n", set.jump_line())),
            "duplicate jump"
        );
        let partial = set.chain_listing()[..2].join("\n");
        assert!(!in_sync(&set, &partial, &parent), "missing rule");
        let stale = masq_rules(n(), "10.10.9.0/24".parse().unwrap(), true);
        let now = masq_rules(n(), s(), true);
        assert!(
            !in_sync(&now, &stale.chain_listing().join("\n"), &now.jump_line()),
            "old subnet"
        );
    }

    #[test]
    fn random_fully_version_gate() {
        assert!(supports_random_fully((1, 8, 9)));
        assert!(supports_random_fully((1, 6, 2)));
        assert!(!supports_random_fully((1, 6, 1)));
    }

    /// Two flanneld on one host (two networks): each one's resync finds its own rules among the
    /// other's, and puts back only its own, without a flush.
    #[test]
    fn the_resync_leaves_another_networks_rules_alone() {
        let mine = forward_rules(n());
        let theirs = forward_rules("10.12.0.0/16".parse().unwrap());
        let jump = mine.jump_line();
        let both: Vec<String> = mine
            .chain_listing()
            .into_iter()
            .chain(theirs.chain_listing().into_iter().skip(1))
            .collect();
        let both = both.join("\n");
        assert!(complete(&mine, &both, &jump) && complete(&theirs, &both, &jump));
        assert!(
            !in_sync(&mine, &both, &jump),
            "the start check wants the chain exact"
        );
        assert!(
            !complete(&mine, &both, &format!("{jump}\n{jump}")),
            "two jumps"
        );
        assert!(!complete(&mine, &both, ""), "no jump");

        // The other flanneld flushed the chain and filled it with its own: ours go back at the end.
        let theirs_only = theirs.chain_listing().join("\n");
        assert!(!complete(&mine, &theirs_only, &jump));
        let p = repair_payload(&mine, &theirs_only, &jump);
        assert_eq!(
            p,
            "*filter\n\
             -A FLANNEL-FWD -s 10.10.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 10.10.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\nCOMMIT\n"
        );
        assert!(!p.contains(":FLANNEL-FWD"), "no flush: {p}");

        // One of ours deleted: the other deleted and both appended in order.
        let partial = format!("-N FLANNEL-FWD\n{}", mine.chain_listing()[2]);
        let p = repair_payload(&mine, &partial, "");
        assert!(
            p.contains(&format!("-D {}", &mine.chain_listing()[2][3..])),
            "{p}"
        );
        assert_eq!(p.matches("-A FLANNEL-FWD").count(), 2, "{p}");
        assert!(!p.contains("-D FORWARD"), "{p}");

        // No chain at all: made, as at start.
        assert_eq!(repair_payload(&mine, "", ""), restore_payload(&mine, 0));
    }
}
