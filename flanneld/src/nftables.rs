//! The nftables variant of the masquerade and forward rules (`EnableNFTables`, shared/spec/flannel-compat.md
//! §6.4): table `ip flannel-ipv4` with chains `postrtg` (nat) and `forward` (filter), and with
//! `EnableIPv6` table `ip6 flannel-ipv6` likewise; each rebuilt in one `nft -f` transaction and compared
//! with `nft list table` on every resync (Go installs them once).

use ipnet::IpNet;

use crate::iptables::{IptablesError, list, run};

/// The flannel IPv4 table.
pub const TABLE: &str = "flannel-ipv4";
/// The flannel IPv6 table.
pub const TABLE6: &str = "flannel-ipv6";

/// What one table holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    /// IPv6 (`ip6 flannel-ipv6`) instead of IPv4 (`ip flannel-ipv4`).
    pub ipv6: bool,
    /// The `postrtg` rules (when `--ip-masq`).
    pub masq: Option<Vec<String>>,
    /// The `forward` rules (when `--iptables-forward-rules`).
    pub forward: Option<Vec<String>>,
}

/// The rules for cluster network `n` and own subnet `s` (both of one family), in Go flanneld HEAD's
/// order.
pub fn nft_rules(n: IpNet, s: IpNet, masq: bool, forward: bool, fully_random: bool) -> NftTable {
    let fr = if fully_random { " fully-random" } else { "" };
    let ipv6 = matches!(n, IpNet::V6(_));
    let (ip, multicast) = if ipv6 {
        ("ip6", "ff00::/8")
    } else {
        ("ip", "224.0.0.0/4")
    };
    NftTable {
        ipv6,
        masq: masq.then(|| {
            vec![
                "meta mark 0x00004000 return".to_string(),
                format!("{ip} saddr {s} {ip} daddr {n} return"),
                format!("{ip} saddr {n} {ip} daddr {s} return"),
                format!("{ip} saddr != {s} {ip} daddr {n} return"),
                format!("{ip} saddr {n} {ip} daddr != {multicast} masquerade{fr}"),
                format!("{ip} saddr != {n} {ip} daddr {n} masquerade{fr}"),
            ]
        }),
        forward: forward.then(|| {
            vec![
                format!("{ip} saddr {n} accept"),
                format!("{ip} daddr {n} accept"),
            ]
        }),
    }
}

impl NftTable {
    /// The nft family and table name.
    pub fn name(&self) -> (&'static str, &'static str) {
        if self.ipv6 {
            ("ip6", TABLE6)
        } else {
            ("ip", TABLE)
        }
    }

    /// The table as `nft list table <family> <name>` prints it.
    pub fn listing(&self) -> String {
        let (family, name) = self.name();
        let mut t = format!("table {family} {name} {{\n\tcomment \"rules for {name}\"\n");
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
        let (family, name) = self.name();
        format!(
            "table {family} {name} {{}}\ndelete table {family} {name}\n{}",
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

/// `nft -j` output reduced to what the rules are: the table, its chains and each rule's expressions,
/// without `metainfo` (the nft version) and `handle` numbers, which change with every rebuild.
pub fn rules_as_data(json: &serde_json::Value) -> serde_json::Value {
    fn strip(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(o) => serde_json::Value::Object(
                o.iter()
                    .filter(|(k, _)| k.as_str() != "handle")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    let items = json["nftables"].as_array().cloned().unwrap_or_default();
    serde_json::Value::Array(
        items
            .iter()
            .filter(|i| i.get("metainfo").is_none())
            .map(strip)
            .collect(),
    )
}

/// What flanneld installed last, per table, as [`rules_as_data`] read it back right after.
static INSTALLED: std::sync::Mutex<Vec<((&str, &str), serde_json::Value)>> =
    std::sync::Mutex::new(Vec::new());

async fn read_as_data(family: &str, name: &str) -> Result<serde_json::Value, IptablesError> {
    let json = list(&["nft", "-j", "list", "table", family, name]).await?;
    if json.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
    Ok(rules_as_data(&v))
}

/// Makes the kernel hold exactly `table`. Returns whether anything had to change.
///
/// The rules are compared as data (`nft -j`), not as pretty-printed text, which changes between nft
/// versions: against what flanneld read back right after its own install. Before the first install
/// of this run (no such record), the text listing decides once.
pub async fn ensure(table: &NftTable) -> Result<bool, IptablesError> {
    let (family, name) = table.name();
    let counted = |e: IptablesError| {
        crate::metrics::metrics().rule_read_errors.inc();
        e
    };
    let remembered = INSTALLED.lock().ok().and_then(|m| {
        m.iter()
            .find(|(k, _)| *k == (family, name))
            .map(|(_, v)| v.clone())
    });
    let in_place = match remembered {
        Some(installed) => read_as_data(family, name).await.map_err(counted)? == installed,
        None => {
            let have = list(&["nft", "list", "table", family, name])
                .await
                .map_err(counted)?;
            in_sync(table, &have)
        }
    };
    if !in_place {
        run(&["nft", "-f", "-"], Some(&table.script())).await?;
    }
    // What the kernel holds now is ours: the reference for the next checks.
    let now = read_as_data(family, name).await.map_err(counted)?;
    if let Ok(mut m) = INSTALLED.lock() {
        m.retain(|(k, _)| *k != (family, name));
        m.push(((family, name), now));
    }
    Ok(!in_place)
}

/// Removes the flannel nftables tables (when switching to iptables mode); best effort.
pub async fn remove() {
    let _ = run(&["nft", "delete", "table", "ip", TABLE], None).await;
    let _ = run(&["nft", "delete", "table", "ip6", TABLE6], None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_compare_as_data_not_text() {
        let a: serde_json::Value = serde_json::from_str(r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "flannel-ipv4", "handle": 1}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 16384}}, {"return": null}]}}]}"#).unwrap();
        // Another nft version, other handles (a rebuild): the same rules.
        let b: serde_json::Value = serde_json::from_str(r#"{"nftables": [{"metainfo": {"version": "1.1.1", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "flannel-ipv4", "handle": 7}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 9, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 16384}}, {"return": null}]}}]}"#).unwrap();
        assert_eq!(rules_as_data(&a), rules_as_data(&b));
        // A changed verdict is a different rule set.
        let c: serde_json::Value = serde_json::from_str(
            &a.to_string()
                .replace(r#"{"return":null}"#, r#"{"accept":null}"#),
        )
        .unwrap();
        assert_ne!(rules_as_data(&a), rules_as_data(&c));
        // A missing table is the empty set.
        assert_eq!(
            rules_as_data(&serde_json::Value::Null),
            serde_json::json!([])
        );
    }

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

    #[test]
    fn ipv6_table() {
        let t = nft_rules(
            "fd00:5::/48".parse().unwrap(),
            "fd00:5:0:1::/64".parse().unwrap(),
            true,
            true,
            false,
        );
        let l = t.listing();
        assert!(l.starts_with("table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\""));
        assert!(
            l.contains("\t\tip6 saddr fd00:5::/48 ip6 daddr != ff00::/8 masquerade\n"),
            "{l}"
        );
        assert!(l.contains("\t\tip6 daddr fd00:5::/48 accept\n"), "{l}");
        assert!(
            t.script()
                .starts_with("table ip6 flannel-ipv6 {}\ndelete table ip6 flannel-ipv6\n")
        );
    }
}
