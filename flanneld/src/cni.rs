//! The `flannel` CNI plugin (CNI spec 1.0: ADD, DEL, CHECK, VERSION), as flannel-io/cni-plugin does it:
//! read `subnet.env`, delegate to the `bridge` plugin with `host-local` IPAM for the host's subnet, and
//! keep the rendered delegate config under `dataDir/<containerID>` for DEL and CHECK.
//!
//! The config building is pure ([`read_subnet_env`], [`delegate_config`]); the binary (`src/bin/flannel.rs`)
//! runs the delegate.

use serde_json::{Map, Value, json};

/// CNI versions this plugin accepts.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// A CNI error result (printed as JSON on stdout, exit status 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// CNI error code (7 = invalid network config, 11 = try again later, 999 = other).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Details.
    pub details: String,
}

impl CniError {
    /// An "invalid network config" error.
    pub fn config(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code: 7,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON result for `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}).to_string()
    }
}

/// Checks `CNI_CONTAINERID` as the CNI spec restricts it (`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`): the
/// plugin uses it as a file name under `dataDir`, so an absolute path or `..` must never get there.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(CniError {
            code: 4,
            msg: "invalid container ID".into(),
            details: format!(
                "CNI_CONTAINERID {id:?} must match ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$ (CNI spec)"
            ),
        })
    }
}

/// What the plugin reads from `subnet.env` (bare `KEY=VALUE` lines, as the upstream plugin).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlannelEnv {
    /// `FLANNEL_NETWORK` (comma lists accepted).
    pub networks: Vec<String>,
    /// `FLANNEL_SUBNET`, masked to the network address.
    pub subnet: Option<String>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_networks: Vec<String>,
    /// `FLANNEL_IPV6_SUBNET`, masked.
    pub ipv6_subnet: Option<String>,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ipmasq: bool,
}

fn masked(cidr: &str) -> Result<String, String> {
    cidr.trim()
        .parse::<ipnet::IpNet>()
        .map(|n| n.trunc().to_string())
        .map_err(|_| format!("{cidr:?} is not a CIDR"))
}

/// Parses `subnet.env`. Fails, naming what is missing, unless it has a network, a subnet, the MTU and
/// the masquerade setting.
pub fn read_subnet_env(text: &str) -> Result<FlannelEnv, CniError> {
    let vars = flannel_core::subnet_env::read_vars(text);
    let bad = |what: String| CniError::config("invalid subnet.env", what);
    let list = |k: &str| -> Result<Vec<String>, CniError> {
        match vars.get(k) {
            None => Ok(Vec::new()),
            Some(v) => v
                .split(',')
                .map(masked)
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("{k}: {e}"))),
        }
    };
    let one = |k: &str| -> Result<Option<String>, CniError> {
        vars.get(k)
            .map(|v| masked(v).map_err(|e| bad(format!("{k}: {e}"))))
            .transpose()
    };
    let env = FlannelEnv {
        networks: list("FLANNEL_NETWORK")?,
        subnet: one("FLANNEL_SUBNET")?,
        ipv6_networks: list("FLANNEL_IPV6_NETWORK")?,
        ipv6_subnet: one("FLANNEL_IPV6_SUBNET")?,
        mtu: match vars.get("FLANNEL_MTU") {
            None => return Err(bad("FLANNEL_MTU is missing".into())),
            Some(m) => m
                .parse()
                .map_err(|_| bad(format!("FLANNEL_MTU {m:?} is not a number")))?,
        },
        ipmasq: match vars.get("FLANNEL_IPMASQ") {
            None => return Err(bad("FLANNEL_IPMASQ is missing".into())),
            Some(m) => m == "true",
        },
    };
    if env.networks.is_empty() && env.ipv6_networks.is_empty() {
        return Err(bad(
            "FLANNEL_NETWORK and FLANNEL_IPV6_NETWORK are missing".into()
        ));
    }
    if env.subnet.is_none() && env.ipv6_subnet.is_none() {
        return Err(bad(
            "FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET are missing".into()
        ));
    }
    Ok(env)
}

/// The plugin's own settings from its network config.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: String,
    /// `name`.
    pub name: String,
    /// `subnetFile`, default `/run/flannel/subnet.env`.
    pub subnet_file: String,
    /// `dataDir`, default `/var/lib/cni/flannel`.
    pub data_dir: String,
    /// The whole config, for `delegate`, `ipam` and `runtimeConfig`.
    pub raw: Map<String, Value>,
}

/// Parses the network config given on stdin.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::config("invalid network config", e.to_string()))?;
    let Value::Object(raw) = v else {
        return Err(CniError::config(
            "invalid network config",
            "expected a JSON object",
        ));
    };
    let s = |k: &str, d: &str| raw.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
    Ok(NetConf {
        cni_version: s("cniVersion", "0.3.1"),
        name: s("name", ""),
        subnet_file: s("subnetFile", "/run/flannel/subnet.env"),
        data_dir: s("dataDir", "/var/lib/cni/flannel"),
        raw,
    })
}

/// The delegate plugin's config (pure), exactly as the upstream plugin renders it: type `bridge` unless
/// set, `ipMasq` = not `FLANNEL_IPMASQ`, `mtu` = `FLANNEL_MTU`, `isGateway` true for bridge, the
/// network's name and CNI version, and `host-local` IPAM with one range per family and a route to each
/// cluster network (other IPAM settings from the config's `ipam` are kept).
pub fn delegate_config(conf: &NetConf, env: &FlannelEnv) -> Value {
    let mut d = match conf.raw.get("delegate") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    d.entry("type").or_insert(json!("bridge"));
    d.entry("ipMasq").or_insert(json!(!env.ipmasq));
    d.entry("mtu").or_insert(json!(env.mtu));
    if d.get("type").and_then(Value::as_str) == Some("bridge") {
        d.entry("isGateway").or_insert(json!(true));
    }
    d.insert("name".into(), json!(conf.name));
    d.insert("cniVersion".into(), json!(conf.cni_version));
    let mut ipam = match conf.raw.get("ipam") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    ipam.entry("type").or_insert(json!("host-local"));
    let mut ranges = Vec::new();
    for sn in env.subnet.iter().chain(env.ipv6_subnet.iter()) {
        ranges.push(json!([{"subnet": sn}]));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));
    let routes: Vec<Value> = env
        .networks
        .iter()
        .chain(env.ipv6_networks.iter())
        .map(|n| json!({"dst": n}))
        .collect();
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    if let Some(rc) = conf.raw.get("runtimeConfig") {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    Value::Object(d)
}

/// The VERSION result.
pub fn version_result(cni_version: &str) -> String {
    json!({"cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_as_the_spec_allows() {
        for ok in ["abc", "0f3e9a", "a.b-c_d", "A1", "x..y"] {
            assert_eq!(validate_container_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "../etc", "/abs", "a/b", ".hidden", "-x", "_x", "a b", "é", "a\0b", "..",
        ] {
            let e = validate_container_id(bad).unwrap_err();
            assert_eq!(e.code, 4, "{bad:?}");
            assert_eq!(e.msg, "invalid container ID");
        }
    }

    const ENV: &str = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn delegate_like_upstream() {
        let conf = parse_netconf(br#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#).unwrap();
        let env = read_subnet_env(ENV).unwrap();
        let d = delegate_config(&conf, &env);
        assert_eq!(
            d,
            json!({
                "hairpinMode": true, "isDefaultGateway": true, "type": "bridge", "ipMasq": false, "mtu": 1472,
                "isGateway": true, "name": "cbr0", "cniVersion": "1.0.0",
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.74.0/24"}]], "routes": [{"dst": "10.1.0.0/16"}]}
            })
        );
        assert_eq!(conf.subnet_file, "/run/flannel/subnet.env");
        assert_eq!(conf.data_dir, "/var/lib/cni/flannel");
    }

    #[test]
    fn explicit_settings_win_and_dual_stack() {
        let conf = parse_netconf(br#"{"cniVersion":"0.3.1","name":"n","delegate":{"type":"bridge","mtu":1400,"ipMasq":true},"ipam":{"dataDir":"/x"}}"#).unwrap();
        let env = read_subnet_env("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:4a::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n").unwrap();
        let d = delegate_config(&conf, &env);
        assert_eq!(d["mtu"], 1400);
        assert_eq!(d["ipMasq"], true);
        assert_eq!(d["ipam"]["dataDir"], "/x");
        assert_eq!(
            d["ipam"]["ranges"],
            json!([[{"subnet": "10.1.74.0/24"}], [{"subnet": "fd00:0:0:4a::/64"}]])
        );
        assert_eq!(
            d["ipam"]["routes"],
            json!([{"dst": "10.1.0.0/16"}, {"dst": "fd00::/56"}])
        );
    }

    #[test]
    fn an_ipv6_only_subnet_env_gives_one_ipv6_range_and_route() {
        let conf = parse_netconf(br#"{"cniVersion":"0.3.1","name":"n"}"#).unwrap();
        let env = read_subnet_env("FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:4a::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n").unwrap();
        let d = delegate_config(&conf, &env);
        assert_eq!(d["mtu"], 1430);
        assert_eq!(
            d["ipam"]["ranges"],
            json!([[{"subnet": "fd00:0:0:4a::/64"}]])
        );
        assert_eq!(d["ipam"]["routes"], json!([{"dst": "fd00::/56"}]));
    }

    #[test]
    fn bad_subnet_env_is_a_config_error() {
        for (text, want) in [
            ("", "FLANNEL_MTU is missing"),
            (
                "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\n",
                "FLANNEL_IPMASQ is missing",
            ),
            (
                "FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
                "FLANNEL_NETWORK and FLANNEL_IPV6_NETWORK are missing",
            ),
            (
                "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
                "FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET are missing",
            ),
            (
                "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=nope\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
                "FLANNEL_SUBNET",
            ),
            (
                "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=big\nFLANNEL_IPMASQ=false\n",
                "not a number",
            ),
        ] {
            let e = read_subnet_env(text).unwrap_err();
            assert_eq!(e.code, 7);
            assert!(e.details.contains(want), "{text:?}: {e:?}");
        }
        let e = parse_netconf(b"{").unwrap_err();
        assert!(e.to_json("1.0.0").contains("\"code\":7"));
    }

    #[test]
    fn version_lists_1_0_0() {
        let v: Value = serde_json::from_str(&version_result("1.0.0")).unwrap();
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "1.0.0")
        );
    }
}
