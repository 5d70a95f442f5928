//! The nftables variant of the masquerade and forward rules (`EnableNFTables`, shared/spec/flannel-compat.md
//! §6.4): table `ip flannel-ipv4` with chains `postrtg` (nat) and `forward` (filter), rebuilt in one
//! `nft -f` transaction and compared with `nft list table` on every resync (Go installs them once).

use ipnet::Ipv4Net;

use crate::iptables::{IptablesError, run};

/// The flannel IPv4 table.
pub const TABLE: &str = "flannel-ipv4";

/// What the table holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    /// The `postrtg` rules (when `--ip-masq`).
    pub masq: Option<Vec<String>>,
    /// The `forward` rules (when `--iptables-forward-rules`).
    pub forward: Option<Vec<String>>,
}

/// The rules for cluster network `n` and own subnet `s`, in Go flanneld HEAD's order.
pub fn nft_rules(
    n: Ipv4Net,
    s: Ipv4Net,
    masq: bool,
    forward: bool,
    fully_random: bool,
) -> NftTable {
    let fr = if fully_random { " fully-random" } else { "" };
    NftTable {
        masq: masq.then(|| {
            vec![
                "meta mark 0x00004000 return".to_string(),
                format!("ip saddr {s} ip daddr {n} return"),
                format!("ip saddr {n} ip daddr {s} return"),
                format!("ip saddr != {s} ip daddr {n} return"),
                format!("ip saddr {n} ip daddr != 224.0.0.0/4 masquerade{fr}"),
                format!("ip saddr != {n} ip daddr {n} masquerade{fr}"),
            ]
        }),
        forward: forward.then(|| {
            vec![
                format!("ip saddr {n} accept"),
                format!("ip daddr {n} accept"),
            ]
        }),
    }
}

impl NftTable {
    /// The table as `nft list table ip flannel-ipv4` prints it.
    pub fn listing(&self) -> String {
        let mut t = format!("table ip {TABLE} {{\n\tcomment \"rules for {TABLE}\"\n");
        let mut chains = Vec::new();
        if let Some(rules) = &self.masq {
            chains.push((
                "postrtg",
                "chain to manage traffic masquerading by flannel",
                "type nat hook postrouting priority srcnat; policy accept;",
                rules,
            ));
        }
        if let Some(rules) = &self.forward {
            chains.push((
                "forward",
                "chain to accept flannel traffic",
                "type filter hook forward priority filter; policy accept;",
                rules,
            ));
        }
        let chains: Vec<String> = chains
            .into_iter()
            .map(|(name, comment, hook, rules)| {
                let mut c = format!("\tchain {name} {{\n\t\tcomment \"{comment}\"\n\t\t{hook}\n");
                for r in rules {
                    c.push_str(&format!("\t\t{r}\n"));
                }
                c.push_str("\t}\n");
                c
            })
            .collect();
        t.push_str(&chains.join("\n"));
        t.push_str("}\n");
        t
    }

    /// The `nft -f` script that replaces the table atomically.
    pub fn script(&self) -> String {
        format!(
            "table ip {TABLE} {{}}\ndelete table ip {TABLE}\n{}",
            self.listing()
        )
    }
}

fn normalized(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Whether `nft list table` output shows exactly the expected table.
pub fn in_sync(table: &NftTable, listing: &str) -> bool {
    normalized(listing) == normalized(&table.listing())
}

/// Makes the kernel hold exactly `table`. Returns whether anything had to change.
pub fn ensure(table: &NftTable) -> Result<bool, IptablesError> {
    let have = run(&["nft", "list", "table", "ip", TABLE], None).unwrap_or_default();
    if in_sync(table, &have) {
        return Ok(false);
    }
    run(&["nft", "-f", "-"], Some(&table.script()))?;
    Ok(true)
}

/// Removes the flannel nftables table (when switching to iptables mode); best effort.
pub fn remove() {
    let _ = run(&["nft", "delete", "table", "ip", TABLE], None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_table() {
        let t = nft_rules(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.1.0/24".parse().unwrap(),
            true,
            true,
            true,
        );
        assert_eq!(
            t.listing(),
            "table ip flannel-ipv4 {\n\tcomment \"rules for flannel-ipv4\"\n\tchain postrtg {\n\t\tcomment \"chain to manage traffic masquerading by flannel\"\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tmeta mark 0x00004000 return\n\t\tip saddr 10.5.1.0/24 ip daddr 10.5.0.0/16 return\n\t\tip saddr 10.5.0.0/16 ip daddr 10.5.1.0/24 return\n\t\tip saddr != 10.5.1.0/24 ip daddr 10.5.0.0/16 return\n\t\tip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random\n\t\tip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random\n\t}\n\n\tchain forward {\n\t\tcomment \"chain to accept flannel traffic\"\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tip saddr 10.5.0.0/16 accept\n\t\tip daddr 10.5.0.0/16 accept\n\t}\n}\n"
        );
        assert!(t.script().starts_with(
            "table ip flannel-ipv4 {}\ndelete table ip flannel-ipv4\ntable ip flannel-ipv4 {"
        ));
        assert!(in_sync(&t, &t.listing().replace('\t', "    ")));
        let fwd_only = nft_rules(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.1.0/24".parse().unwrap(),
            false,
            true,
            true,
        );
        assert!(!fwd_only.listing().contains("postrtg"));
        assert!(!in_sync(&fwd_only, &t.listing()));
    }
}
