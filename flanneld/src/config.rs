//! flanneld's settings: the command line flags of Go flanneld (same names and defaults), each also read
//! from `FLANNELD_<NAME>` and optionally from a config file.
//!
//! Layers, lowest first: built-in defaults < `--config-file` (TOML or JSON) < `FLANNELD_*` environment <
//! command-line flags. Go's single-dash spelling (`-iface=eth0`) is accepted too.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser};
use serde::{Deserialize, Deserializer};

/// The flanneld command line. Every value is optional here; defaults come from [`DEFAULTS`].
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "flanneld",
    about = "flannel overlay network agent: leases this host a subnet of the cluster network and carries traffic between hosts",
    long_about = "flanneld leases this host a subnet of the cluster-wide network from etcd, writes it to the subnet file for \
the container runtime, and programs the kernel so pods on different hosts reach each other.\n\n\
Every flag can also be given as an environment variable FLANNELD_<FLAG> (upper case, '-' as '_'), e.g. \
FLANNELD_ETCD_ENDPOINTS or FLANNELD_IFACE, or in a --config-file. Flags win over the environment, the \
environment over the file. Go flanneld's single-dash spelling (-iface=eth0) works too.",
    disable_version_flag = true
)]
pub struct Cli {
    /// Comma-separated list of etcd endpoints [default: http://127.0.0.1:4001,http://127.0.0.1:2379]
    #[arg(long, value_name = "URLS")]
    pub etcd_endpoints: Option<String>,
    /// etcd key prefix of the network [default: /coreos.com/network]
    #[arg(long, value_name = "PATH")]
    pub etcd_prefix: Option<String>,
    /// Client key file for TLS to etcd
    #[arg(long, value_name = "FILE")]
    pub etcd_keyfile: Option<String>,
    /// Client certificate file for TLS to etcd
    #[arg(long, value_name = "FILE")]
    pub etcd_certfile: Option<String>,
    /// CA certificate file for TLS to etcd
    #[arg(long, value_name = "FILE")]
    pub etcd_cafile: Option<String>,
    /// User name for etcd authentication
    #[arg(long, value_name = "USER")]
    pub etcd_username: Option<String>,
    /// Password for etcd authentication
    #[arg(long, value_name = "PASSWORD")]
    pub etcd_password: Option<String>,
    /// Interface (name or IP address) to use for inter-host traffic; repeat to give fallbacks in order
    #[arg(long, value_name = "IFACE")]
    pub iface: Vec<String>,
    /// Regex matched against interface addresses, then names; repeatable, tried after --iface
    #[arg(long, value_name = "REGEX")]
    pub iface_regex: Vec<String>,
    /// Use the interface the kernel would use to reach this IP address; tried last
    #[arg(long, value_name = "IP")]
    pub iface_can_reach: Option<String>,
    /// File to write the subnet environment to [default: /run/flannel/subnet.env]
    #[arg(long, value_name = "FILE")]
    pub subnet_file: Option<String>,
    /// IPv4 address other hosts reach this host at [default: the interface's address]
    #[arg(long, value_name = "IP")]
    pub public_ip: Option<String>,
    /// IPv6 address other hosts reach this host at [default: the interface's address]
    #[arg(long, value_name = "IP")]
    pub public_ipv6: Option<String>,
    /// Renew the subnet lease this many minutes before it expires, 1..1439 [default: 60]
    #[arg(long, value_name = "MINUTES")]
    pub subnet_lease_renew_margin: Option<i64>,
    /// Set up IP masquerade for traffic leaving the cluster network [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ip_masq: Option<bool>,
    /// Never use --random-fully for masquerading [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ip_masq_fully_random_disable: Option<bool>,
    /// Use the Kubernetes API (Node objects) instead of etcd [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub kube_subnet_mgr: Option<bool>,
    /// Kubernetes API server URL (kube mode)
    #[arg(long, value_name = "URL")]
    pub kube_api_url: Option<String>,
    /// Kubernetes annotation prefix (kube mode) [default: flannel.alpha.coreos.com]
    #[arg(long, value_name = "PREFIX")]
    pub kube_annotation_prefix: Option<String>,
    /// kubeconfig file (kube mode)
    #[arg(long, value_name = "FILE")]
    pub kubeconfig_file: Option<String>,
    /// Print the version and exit
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub version: Option<bool>,
    /// Address the health endpoint listens on [default: 0.0.0.0]
    #[arg(long, value_name = "IP")]
    pub healthz_ip: Option<String>,
    /// Port of the /healthz endpoint; 0 disables it [default: 0]
    #[arg(long, value_name = "PORT")]
    pub healthz_port: Option<u16>,
    /// Seconds between checks of the iptables rules [default: 5]
    #[arg(long, value_name = "SECONDS")]
    pub iptables_resync: Option<u64>,
    /// Add FLANNEL-FWD accept rules for the cluster network [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub iptables_forward_rules: Option<bool>,
    /// Keep a blackhole route for the own subnet [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ip_blackhole_route: Option<bool>,
    /// Network config file (kube mode) [default: /etc/kube-flannel/net-conf.json]
    #[arg(long, value_name = "FILE")]
    pub net_config_path: Option<String>,
    /// Set NetworkUnavailable=False on the node (kube mode) [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub set_node_network_unavailable: Option<bool>,
    /// Log verbosity: 0 info, 1-3 debug, 4+ trace (RUST_LOG overrides) [default: 0]
    #[arg(long = "v", value_name = "LEVEL")]
    pub v: Option<u8>,
    /// Accepted for compatibility with Go flanneld; ignored
    #[arg(long, value_name = "PATTERN", hide = true)]
    pub vmodule: Option<String>,
    /// Accepted for compatibility with Go flanneld; ignored
    #[arg(long = "log_backtrace_at", value_name = "FILE:LINE", hide = true)]
    pub log_backtrace_at: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Optional settings file (TOML or JSON) with the same keys as the flags, '-' written as '_'
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
}

/// Built-in defaults, as Go flanneld's.
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "etcd_endpoints",
        "http://127.0.0.1:4001,http://127.0.0.1:2379",
    ),
    ("etcd_prefix", "/coreos.com/network"),
    ("etcd_keyfile", ""),
    ("etcd_certfile", ""),
    ("etcd_cafile", ""),
    ("etcd_username", ""),
    ("etcd_password", ""),
    ("iface_can_reach", ""),
    ("subnet_file", "/run/flannel/subnet.env"),
    ("public_ip", ""),
    ("public_ipv6", ""),
    ("subnet_lease_renew_margin", "60"),
    ("ip_masq", "false"),
    ("ip_masq_fully_random_disable", "false"),
    ("kube_subnet_mgr", "false"),
    ("kube_api_url", ""),
    ("kube_annotation_prefix", "flannel.alpha.coreos.com"),
    ("kubeconfig_file", ""),
    ("healthz_ip", "0.0.0.0"),
    ("healthz_port", "0"),
    ("iptables_resync", "5"),
    ("iptables_forward_rules", "true"),
    ("ip_blackhole_route", "false"),
    ("net_config_path", "/etc/kube-flannel/net-conf.json"),
    ("set_node_network_unavailable", "true"),
    ("v", "0"),
    ("vmodule", ""),
    ("log_backtrace_at", ""),
    ("log_format", "text"),
];

/// The resolved settings.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct Config {
    pub etcd_endpoints: String,
    pub etcd_prefix: String,
    pub etcd_keyfile: String,
    pub etcd_certfile: String,
    pub etcd_cafile: String,
    pub etcd_username: String,
    pub etcd_password: String,
    #[serde(default, deserialize_with = "one_or_many")]
    pub iface: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub iface_regex: Vec<String>,
    pub iface_can_reach: String,
    pub subnet_file: PathBuf,
    pub public_ip: String,
    pub public_ipv6: String,
    pub subnet_lease_renew_margin: i64,
    pub ip_masq: bool,
    pub ip_masq_fully_random_disable: bool,
    pub kube_subnet_mgr: bool,
    pub kube_api_url: String,
    pub kube_annotation_prefix: String,
    pub kubeconfig_file: String,
    pub healthz_ip: String,
    pub healthz_port: u16,
    pub iptables_resync: u64,
    pub iptables_forward_rules: bool,
    pub ip_blackhole_route: bool,
    pub net_config_path: String,
    pub set_node_network_unavailable: bool,
    pub v: u8,
    pub vmodule: String,
    pub log_backtrace_at: String,
    pub log_format: String,
}

/// A repeatable flag: the environment gives one value (no comma splitting, as Go), a file may give a
/// list.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) if s.is_empty() => vec![],
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Rewrites Go-style single-dash long flags (`-iface=eth0`, `-v 2`) to `--iface=eth0`, `--v 2`.
pub fn normalize_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let cmd = Cli::command();
    let longs: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .chain(["help".to_string()])
        .collect();
    let mut out = Vec::new();
    let mut done = false;
    for (i, a) in args.into_iter().enumerate() {
        let a: OsString = a.into();
        if i == 0 || done {
            out.push(a);
            continue;
        }
        let s = a.to_string_lossy().into_owned();
        if s == "--" {
            done = true;
        } else if let Some(rest) = s.strip_prefix('-').filter(|r| !r.starts_with('-')) {
            let name = rest.split('=').next().unwrap_or(rest);
            if longs.iter().any(|l| l == name) {
                out.push(OsString::from(format!("-{s}")));
                continue;
            }
        }
        out.push(a);
    }
    out
}

impl Cli {
    /// The flags given on the command line, as config keys and values.
    fn overrides(&self) -> Vec<(&'static str, config::Value)> {
        let mut v: Vec<(&'static str, config::Value)> = Vec::new();
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(x) = &self.$field {
                    v.push((stringify!($field), x.clone().into()));
                }
            )*};
        }
        set!(
            etcd_endpoints,
            etcd_prefix,
            etcd_keyfile,
            etcd_certfile,
            etcd_cafile,
            etcd_username,
            etcd_password,
            iface_can_reach,
            subnet_file,
            public_ip,
            public_ipv6,
            subnet_lease_renew_margin,
            ip_masq,
            ip_masq_fully_random_disable,
            kube_subnet_mgr,
            kube_api_url,
            kube_annotation_prefix,
            kubeconfig_file,
            healthz_ip,
            iptables_forward_rules,
            ip_blackhole_route,
            net_config_path,
            set_node_network_unavailable,
            vmodule,
            log_backtrace_at,
            log_format
        );
        if let Some(p) = self.healthz_port {
            v.push(("healthz_port", i64::from(p).into()));
        }
        if let Some(p) = self.iptables_resync {
            v.push((
                "iptables_resync",
                i64::try_from(p).unwrap_or(i64::MAX).into(),
            ));
        }
        if let Some(p) = self.v {
            v.push(("v", i64::from(p).into()));
        }
        if !self.iface.is_empty() {
            v.push(("iface", self.iface.clone().into()));
        }
        if !self.iface_regex.is_empty() {
            v.push(("iface_regex", self.iface_regex.clone().into()));
        }
        v
    }
}

/// Resolves the settings from defaults, the optional file, `env` (the process environment, or a map in
/// tests) and the flags.
pub fn load(cli: &Cli, env: Option<config::Map<String, String>>) -> anyhow::Result<Config> {
    let mut b = config::Config::builder();
    for (k, v) in DEFAULTS {
        b = b.set_default(*k, *v)?;
    }
    if let Some(file) = &cli.config_file {
        if !file.exists() {
            bail!(
                "config file {} does not exist; fix --config-file",
                file.display()
            );
        }
        b = b.add_source(config::File::from(file.as_path()).required(true));
    }
    b = b.add_source(
        config::Environment::with_prefix("FLANNELD")
            .prefix_separator("_")
            .ignore_empty(true)
            .try_parsing(true)
            .source(env),
    );
    for (k, v) in cli.overrides() {
        b = b.set_override(k, v)?;
    }
    let cfg: Config = b
        .build()
        .context("reading the settings")?
        .try_deserialize()
        .context("a setting has the wrong type (check the FLANNELD_* environment variables and the config file)")?;
    cfg.validate()?;
    Ok(cfg)
}

impl Config {
    /// Checks values that Go flanneld checks at startup.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=1439).contains(&self.subnet_lease_renew_margin) {
            bail!(
                "--subnet-lease-renew-margin must be between 1 and 1439 minutes (got {})",
                self.subnet_lease_renew_margin
            );
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!(
                "--log-format must be text or json (got {:?})",
                self.log_format
            );
        }
        for (flag, value) in [
            ("--public-ip", &self.public_ip),
            ("--iface-can-reach", &self.iface_can_reach),
        ] {
            if !value.is_empty() && value.parse::<std::net::IpAddr>().is_err() {
                bail!("{flag} must be an IP address (got {value:?})");
            }
        }
        if !self.public_ip.is_empty() && self.public_ip.parse::<std::net::Ipv4Addr>().is_err() {
            bail!(
                "--public-ip must be an IPv4 address (got {:?}); use --public-ipv6 for IPv6",
                self.public_ip
            );
        }
        if !self.public_ipv6.is_empty() && self.public_ipv6.parse::<std::net::Ipv6Addr>().is_err() {
            bail!(
                "--public-ipv6 must be an IPv6 address (got {:?})",
                self.public_ipv6
            );
        }
        Ok(())
    }

    /// The etcd endpoints, split on commas.
    pub fn endpoints(&self) -> Vec<String> {
        self.etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_args(
            std::iter::once("flanneld").chain(args.iter().copied()),
        ))
        .unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_match_go() {
        let c = load(&parse(&[]), env(&[])).unwrap();
        assert_eq!(
            c.endpoints(),
            vec!["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(c.etcd_prefix, "/coreos.com/network");
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.subnet_lease_renew_margin, 60);
        assert!(!c.ip_masq);
        assert!(c.iptables_forward_rules);
        assert_eq!(c.iptables_resync, 5);
        assert_eq!(c.healthz_port, 0);
        assert!(c.iface.is_empty());
    }

    #[test]
    fn environment_is_read_and_flags_win() {
        let e = env(&[
            ("FLANNELD_IFACE", "eth1"),
            (
                "FLANNELD_ETCD_ENDPOINTS",
                "http://10.0.0.1:2379,http://10.0.0.2:2379",
            ),
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_HEALTHZ_PORT", "8081"),
            ("FLANNELD_PUBLIC_IP", ""),
            ("FLANNELD_LOG_BACKTRACE_AT", "x.go:1"),
        ]);
        let c = load(&parse(&[]), e.clone()).unwrap();
        assert_eq!(c.iface, vec!["eth1"]);
        assert_eq!(c.endpoints().len(), 2);
        assert!(c.ip_masq);
        assert_eq!(c.healthz_port, 8081);
        assert_eq!(c.public_ip, "", "empty values are ignored");
        let c = load(
            &parse(&["--iface=eth2", "--iface", "10.0.0.9", "--ip-masq=false"]),
            e,
        )
        .unwrap();
        assert_eq!(c.iface, vec!["eth2", "10.0.0.9"]);
        assert!(!c.ip_masq);
    }

    #[test]
    fn env_iface_is_one_value() {
        let c = load(&parse(&[]), env(&[("FLANNELD_IFACE", "eth0,eth1")])).unwrap();
        assert_eq!(
            c.iface,
            vec!["eth0,eth1"],
            "Go does not split the environment value"
        );
    }

    #[test]
    fn go_single_dash_flags() {
        let cli = parse(&["-iface=eth0", "-v", "2", "-ip-masq", "-etcd-prefix", "/x"]);
        assert_eq!(cli.iface, vec!["eth0"]);
        assert_eq!(cli.v, Some(2));
        assert_eq!(cli.ip_masq, Some(true));
        assert_eq!(cli.etcd_prefix.as_deref(), Some("/x"));
    }

    #[test]
    fn config_file_layer() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("flanneld.toml");
        std::fs::write(
            &f,
            "etcd_prefix = \"/file\"\niface = [\"a\", \"b\"]\nhealthz_port = 9\n",
        )
        .unwrap();
        let mut cli = parse(&[]);
        cli.config_file = Some(f.clone());
        let c = load(&cli, env(&[("FLANNELD_HEALTHZ_PORT", "10")])).unwrap();
        assert_eq!(c.etcd_prefix, "/file");
        assert_eq!(c.iface, vec!["a", "b"]);
        assert_eq!(c.healthz_port, 10, "environment beats the file");
        cli.config_file = Some(dir.path().join("missing.toml"));
        assert!(
            load(&cli, env(&[]))
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = load(&parse(&[]), env(&[("FLANNELD_HEALTHZ_PORT", "abc")])).unwrap_err();
        assert!(format!("{e:#}").contains("healthz_port"), "{e:#}");
        let e = load(&parse(&["--subnet-lease-renew-margin=0"]), env(&[])).unwrap_err();
        assert!(e.to_string().contains("between 1 and 1439"));
        let e = load(&parse(&["--public-ip=fe80::1"]), env(&[])).unwrap_err();
        assert!(e.to_string().contains("IPv4"));
        assert!(Cli::try_parse_from(["flanneld", "--no-such-flag"]).is_err());
    }

    #[test]
    fn help_lists_every_go_flag() {
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "--etcd-endpoints",
            "--etcd-prefix",
            "--etcd-keyfile",
            "--etcd-certfile",
            "--etcd-cafile",
            "--etcd-username",
            "--etcd-password",
            "--iface",
            "--iface-regex",
            "--iface-can-reach",
            "--subnet-file",
            "--public-ip",
            "--public-ipv6",
            "--subnet-lease-renew-margin",
            "--ip-masq",
            "--kube-subnet-mgr",
            "--healthz-ip",
            "--healthz-port",
            "--iptables-resync",
            "--iptables-forward-rules",
            "--net-config-path",
            "--version",
            "--v",
        ] {
            assert!(help.contains(flag), "--help lacks {flag}");
        }
    }
}
