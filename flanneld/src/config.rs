//! flanneld's settings: the command line flags of Go flanneld (same names and defaults), each also read
//! from `FLANNELD_<NAME>` and optionally from a config file.
//!
//! Layers, lowest first: built-in defaults < `--config-file` (TOML or JSON) < `FLANNELD_*` environment <
//! command-line flags. Go's single-dash spelling (`-iface=eth0`) is accepted too.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser};
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
    /// Comma-separated list of etcd endpoints
    #[arg(long, value_name = "URLS")]
    pub etcd_endpoints: Option<String>,
    /// etcd key prefix of the network
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
    /// File to write the subnet environment to
    #[arg(long, value_name = "FILE")]
    pub subnet_file: Option<String>,
    /// IPv4 address other hosts reach this host at (unset: the external interface's address)
    #[arg(long, value_name = "IP")]
    pub public_ip: Option<String>,
    /// IPv6 address other hosts reach this host at (unset: the external interface's address)
    #[arg(long, value_name = "IP")]
    pub public_ipv6: Option<String>,
    /// Renew the subnet lease this many minutes before it expires, 1..1439
    #[arg(long, value_name = "MINUTES")]
    pub subnet_lease_renew_margin: Option<i64>,
    /// Set up IP masquerade for traffic leaving the cluster network
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ip_masq: Option<bool>,
    /// Never use --random-fully for masquerading
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ip_masq_fully_random_disable: Option<bool>,
    /// Use the Kubernetes API (Node objects) instead of etcd
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub kube_subnet_mgr: Option<bool>,
    /// Kubernetes API server URL (kube mode)
    #[arg(long, value_name = "URL")]
    pub kube_api_url: Option<String>,
    /// Kubernetes annotation prefix (kube mode)
    #[arg(long, value_name = "PREFIX")]
    pub kube_annotation_prefix: Option<String>,
    /// kubeconfig file (kube mode)
    #[arg(long, value_name = "FILE")]
    pub kubeconfig_file: Option<String>,
    /// Print the version and exit
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub version: Option<bool>,
    /// Address the health endpoint listens on
    #[arg(long, value_name = "IP")]
    pub healthz_ip: Option<String>,
    /// Port of the /healthz endpoint; 0 disables it
    #[arg(long, value_name = "PORT")]
    pub healthz_port: Option<u16>,
    /// Seconds between checks of the iptables rules
    #[arg(long, value_name = "SECONDS")]
    pub iptables_resync: Option<u64>,
    /// Add FLANNEL-FWD accept rules for the cluster network
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub iptables_forward_rules: Option<bool>,
    /// Keep a blackhole route for the own subnet(s), checked every --iptables-resync seconds
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ip_blackhole_route: Option<bool>,
    /// Network config file (kube mode)
    #[arg(long, value_name = "FILE")]
    pub net_config_path: Option<String>,
    /// Set NetworkUnavailable=False on the node (kube mode)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub set_node_network_unavailable: Option<bool>,
    /// Log verbosity: 0 info, 1-3 debug, 4+ trace (RUST_LOG overrides)
    #[arg(long = "v", value_name = "LEVEL")]
    pub v: Option<u8>,
    /// Accepted for compatibility with Go flanneld; ignored
    #[arg(long, value_name = "PATTERN", hide = true)]
    pub vmodule: Option<String>,
    /// Accepted for compatibility with Go flanneld; ignored
    #[arg(long = "log_backtrace_at", value_name = "FILE:LINE", hide = true)]
    pub log_backtrace_at: Option<String>,
    /// Log format: text or json
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Optional settings file (TOML or JSON) with the same keys as the flags, '-' written as '_'
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
}

/// Built-in defaults, as Go flanneld's: the one place they are written. `--help` shows them from
/// here ([`command`]), and [`load`] starts from them.
pub const DEFAULTS: &[(&str, &str)] = &[
    (
        "etcd_endpoints",
        "http://127.0.0.1:4001,http://127.0.0.1:2379",
    ),
    ("etcd_prefix", "/coreos.com/network"),
    ("subnet_file", "/run/flannel/subnet.env"),
    ("subnet_lease_renew_margin", "60"),
    ("ip_masq", "false"),
    ("ip_masq_fully_random_disable", "false"),
    ("kube_subnet_mgr", "false"),
    ("kube_annotation_prefix", "flannel.alpha.coreos.com"),
    ("healthz_ip", "0.0.0.0"),
    ("healthz_port", "0"),
    ("iptables_resync", "5"),
    ("iptables_forward_rules", "true"),
    ("ip_blackhole_route", "false"),
    ("net_config_path", "/etc/kube-flannel/net-conf.json"),
    ("set_node_network_unavailable", "true"),
    ("v", "0"),
    ("log_format", "text"),
];

/// The flanneld command line with each flag's default (from [`DEFAULTS`]) in its help.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    for (key, value) in DEFAULTS {
        let id = *key;
        cmd = cmd.mut_arg(id, |a| {
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            a.help(format!("{help} [default: {value}]"))
        });
    }
    cmd
}

/// Parses a command line (program name first; Go's single-dash spelling accepted).
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let matches = command().try_get_matches_from(normalize_args(args))?;
    Cli::from_arg_matches(&matches)
}

/// The layered values as read, before they are checked and typed. Keys without an entry in
/// [`DEFAULTS`] are `None` when nobody set them.
#[derive(Debug, Clone, Deserialize)]
struct Raw {
    etcd_endpoints: String,
    etcd_prefix: String,
    etcd_keyfile: Option<PathBuf>,
    etcd_certfile: Option<PathBuf>,
    etcd_cafile: Option<PathBuf>,
    etcd_username: Option<String>,
    etcd_password: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    iface: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    iface_regex: Vec<String>,
    iface_can_reach: Option<String>,
    subnet_file: PathBuf,
    public_ip: Option<String>,
    public_ipv6: Option<String>,
    subnet_lease_renew_margin: i64,
    ip_masq: bool,
    ip_masq_fully_random_disable: bool,
    kube_subnet_mgr: bool,
    kube_api_url: Option<String>,
    kube_annotation_prefix: String,
    kubeconfig_file: Option<PathBuf>,
    healthz_ip: String,
    healthz_port: u16,
    iptables_resync: u64,
    iptables_forward_rules: bool,
    ip_blackhole_route: bool,
    net_config_path: PathBuf,
    set_node_network_unavailable: bool,
    v: u8,
    vmodule: Option<String>,
    log_backtrace_at: Option<String>,
    log_format: String,
}

/// flanneld's settings, checked and typed: built once by [`load`], then only read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where leases live: etcd, or Node objects (`--kube-subnet-mgr`).
    pub store: Store,
    /// How to choose the external interface (`--iface`, `--iface-regex`, `--iface-can-reach`).
    pub iface: IfaceChoice,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `--subnet-file`.
    pub subnet_file: PathBuf,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// Masquerade with `--random-fully` where iptables has it (not `--ip-masq-fully-random-disable`).
    pub random_fully: bool,
    /// `--iptables-forward-rules`.
    pub forward_rules: bool,
    /// `--iptables-resync`: how often the rules and the blackhole route are checked; at least 1 s.
    pub rules_resync: Duration,
    /// `--ip-blackhole-route`.
    pub blackhole_route: bool,
    /// `--healthz-ip`/`--healthz-port`; `None` when the port is 0.
    pub healthz: Option<SocketAddr>,
    /// `-v` and `--log-format`.
    pub log: LogSettings,
    /// Go's glog flags that were given (`--vmodule`, `--log_backtrace_at`): accepted, ignored.
    pub ignored_flags: Vec<&'static str>,
}

/// The store of leases.
#[derive(Debug, Clone)]
pub enum Store {
    /// etcd v3 (the default).
    Etcd {
        /// Endpoints, TLS files and credentials (`--etcd-*`).
        etcd: flannel_subnet::EtcdConfig,
        /// `--etcd-prefix`.
        prefix: String,
        /// `--subnet-lease-renew-margin`.
        renew_margin: Duration,
    },
    /// The Kubernetes API (`--kube-subnet-mgr`).
    Kube(KubeSettings),
}

/// `--kube-*` settings.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// `--kube-api-url`; with no kubeconfig either, the in-cluster service account is used.
    pub api_url: Option<String>,
    /// `--kubeconfig-file`.
    pub kubeconfig: Option<PathBuf>,
    /// `--kube-annotation-prefix`, checked by upstream's rules.
    pub annotation_prefix: String,
    /// `--net-config-path`.
    pub net_config_path: PathBuf,
    /// `--set-node-network-unavailable`.
    pub set_node_network_unavailable: bool,
}

/// How the external interface is chosen, in this order.
#[derive(Debug, Clone, Default)]
pub struct IfaceChoice {
    /// `--iface`: names or addresses.
    pub names: Vec<String>,
    /// `--iface-regex`.
    pub regexes: Vec<String>,
    /// `--iface-can-reach`.
    pub can_reach: Option<IpAddr>,
}

/// Logging settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    /// `-v`: 0 info, 1-3 debug, 4 and more trace.
    pub verbosity: u8,
    /// `--log-format=json`.
    pub json: bool,
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
/// tests) and the flags, and checks them: a bad value is an error naming the setting.
pub fn load(cli: &Cli, env: Option<config::Map<String, String>>) -> anyhow::Result<Settings> {
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
    let raw: Raw = b
        .build()
        .context("reading the settings")?
        .try_deserialize()
        .context("a setting has the wrong type (check the FLANNELD_* environment variables and the config file)")?;
    raw.check()
}

/// Parses an optional address setting.
fn ip<T: std::str::FromStr>(
    flag: &str,
    value: Option<&str>,
    kind: &str,
) -> anyhow::Result<Option<T>> {
    value
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| anyhow::anyhow!("{flag} must be an {kind} address (got {v:?})"))
        })
        .transpose()
}

impl Raw {
    /// Checks every value (those Go flanneld checks at start-up, and the addresses it would only
    /// trip over later) and builds the typed settings.
    fn check(self) -> anyhow::Result<Settings> {
        let margin = self.subnet_lease_renew_margin;
        let margin_minutes = u64::try_from(margin)
            .ok()
            .filter(|m| (1..=1439).contains(m))
            .with_context(|| {
                format!(
                    "--subnet-lease-renew-margin must be between 1 and 1439 minutes (got {margin})"
                )
            })?;
        let json = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => bail!("--log-format must be text or json (got {other:?})"),
        };
        let public_ip = match self.public_ip.as_deref() {
            Some(v) if v.parse::<Ipv6Addr>().is_ok() => {
                bail!("--public-ip must be an IPv4 address (got {v:?}); use --public-ipv6 for IPv6")
            }
            v => ip::<Ipv4Addr>("--public-ip", v, "IPv4")?,
        };
        let public_ipv6 = ip::<Ipv6Addr>("--public-ipv6", self.public_ipv6.as_deref(), "IPv6")?;
        let can_reach = ip::<IpAddr>("--iface-can-reach", self.iface_can_reach.as_deref(), "IP")?;
        let healthz = if self.healthz_port == 0 {
            None
        } else {
            let addr = ip::<IpAddr>("--healthz-ip", Some(&self.healthz_ip), "IP")?
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            Some(SocketAddr::new(addr, self.healthz_port))
        };
        let store = if self.kube_subnet_mgr {
            flannel_subnet::kube::annotations::AnnotationKeys::new(&self.kube_annotation_prefix)
                .map_err(|e| anyhow::anyhow!("--kube-annotation-prefix: {e}"))?;
            Store::Kube(KubeSettings {
                api_url: self.kube_api_url,
                kubeconfig: self.kubeconfig_file,
                annotation_prefix: self.kube_annotation_prefix,
                net_config_path: self.net_config_path,
                set_node_network_unavailable: self.set_node_network_unavailable,
            })
        } else {
            let endpoints: Vec<String> = self
                .etcd_endpoints
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if endpoints.is_empty() {
                bail!(
                    "--etcd-endpoints is empty; give at least one etcd URL such as http://127.0.0.1:2379"
                );
            }
            let path = |p: Option<PathBuf>| p.map(|p| p.to_string_lossy().into_owned());
            Store::Etcd {
                etcd: flannel_subnet::EtcdConfig {
                    endpoints,
                    keyfile: path(self.etcd_keyfile),
                    certfile: path(self.etcd_certfile),
                    cafile: path(self.etcd_cafile),
                    username: self.etcd_username,
                    password: self.etcd_password,
                    dial_timeout: None,
                },
                prefix: self.etcd_prefix,
                renew_margin: Duration::from_secs(margin_minutes * 60),
            }
        };
        let ignored_flags = [
            ("--vmodule", self.vmodule.is_some()),
            ("--log_backtrace_at", self.log_backtrace_at.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        Ok(Settings {
            store,
            iface: IfaceChoice {
                names: self.iface,
                regexes: self.iface_regex,
                can_reach,
            },
            public_ip,
            public_ipv6,
            subnet_file: self.subnet_file,
            ip_masq: self.ip_masq,
            random_fully: !self.ip_masq_fully_random_disable,
            forward_rules: self.iptables_forward_rules,
            rules_resync: Duration::from_secs(self.iptables_resync.max(1)),
            blackhole_route: self.ip_blackhole_route,
            healthz,
            log: LogSettings {
                verbosity: self.v,
                json,
            },
            ignored_flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        parse(std::iter::once("flanneld").chain(args.iter().copied())).unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn etcd(s: &Settings) -> (&flannel_subnet::EtcdConfig, &str, Duration) {
        match &s.store {
            Store::Etcd {
                etcd,
                prefix,
                renew_margin,
            } => (etcd, prefix, *renew_margin),
            Store::Kube(_) => panic!("expected etcd, got {:?}", s.store),
        }
    }

    #[test]
    fn defaults_match_go() {
        let s = load(&cli(&[]), env(&[])).unwrap();
        let (etcd, prefix, margin) = etcd(&s);
        assert_eq!(
            etcd.endpoints,
            vec!["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(etcd.keyfile, None);
        assert_eq!(prefix, "/coreos.com/network");
        assert_eq!(margin, Duration::from_secs(3600));
        assert_eq!(s.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert!(!s.ip_masq && s.random_fully && s.forward_rules && !s.blackhole_route);
        assert_eq!(s.rules_resync, Duration::from_secs(5));
        assert_eq!(s.healthz, None, "port 0 disables the health server");
        assert!(s.iface.names.is_empty() && s.iface.can_reach.is_none());
        assert_eq!((s.public_ip, s.public_ipv6), (None, None));
        assert_eq!(
            s.log,
            LogSettings {
                verbosity: 0,
                json: false
            }
        );
        assert!(s.ignored_flags.is_empty());
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
            ("FLANNELD_ETCD_PASSWORD", "12345"),
            ("FLANNELD_LOG_BACKTRACE_AT", "x.go:1"),
        ]);
        let s = load(&cli(&[]), e.clone()).unwrap();
        assert_eq!(s.iface.names, vec!["eth1"]);
        assert_eq!(etcd(&s).0.endpoints.len(), 2);
        assert_eq!(
            etcd(&s).0.password.as_deref(),
            Some("12345"),
            "a number-like value stays text"
        );
        assert!(s.ip_masq);
        assert_eq!(s.healthz, Some("0.0.0.0:8081".parse().unwrap()));
        assert_eq!(s.public_ip, None, "empty values are ignored");
        assert_eq!(s.ignored_flags, vec!["--log_backtrace_at"]);
        let s = load(
            &cli(&[
                "--iface=eth2",
                "--iface",
                "10.0.0.9",
                "--ip-masq=false",
                "--healthz-ip=127.0.0.1",
            ]),
            e,
        )
        .unwrap();
        assert_eq!(s.iface.names, vec!["eth2", "10.0.0.9"]);
        assert!(!s.ip_masq);
        assert_eq!(s.healthz, Some("127.0.0.1:8081".parse().unwrap()));
    }

    #[test]
    fn env_iface_is_one_value() {
        let s = load(&cli(&[]), env(&[("FLANNELD_IFACE", "eth0,eth1")])).unwrap();
        assert_eq!(
            s.iface.names,
            vec!["eth0,eth1"],
            "Go does not split the environment value"
        );
    }

    #[test]
    fn go_single_dash_flags() {
        let c = cli(&["-iface=eth0", "-v", "2", "-ip-masq", "-etcd-prefix", "/x"]);
        assert_eq!(c.iface, vec!["eth0"]);
        assert_eq!(c.v, Some(2));
        assert_eq!(c.ip_masq, Some(true));
        assert_eq!(c.etcd_prefix.as_deref(), Some("/x"));
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
        let mut c = cli(&[]);
        c.config_file = Some(f.clone());
        let s = load(&c, env(&[("FLANNELD_HEALTHZ_PORT", "10")])).unwrap();
        assert_eq!(etcd(&s).1, "/file");
        assert_eq!(s.iface.names, vec!["a", "b"]);
        assert_eq!(
            s.healthz.map(|a| a.port()),
            Some(10),
            "environment beats the file"
        );
        c.config_file = Some(dir.path().join("missing.toml"));
        assert!(
            load(&c, env(&[]))
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
    }

    #[test]
    fn typed_values() {
        let s = load(
            &cli(&[
                "--public-ip=10.0.0.5",
                "--public-ipv6=fd00::5",
                "--iface-can-reach=192.0.2.1",
                "--iptables-resync=0",
                "--ip-masq-fully-random-disable",
                "--subnet-lease-renew-margin=5",
                "--log-format=json",
                "--v=4",
            ]),
            env(&[]),
        )
        .unwrap();
        assert_eq!(s.public_ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(s.public_ipv6, Some("fd00::5".parse().unwrap()));
        assert_eq!(s.iface.can_reach, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(
            s.rules_resync,
            Duration::from_secs(1),
            "0 s would be a busy loop"
        );
        assert!(!s.random_fully);
        assert_eq!(etcd(&s).2, Duration::from_secs(300));
        assert_eq!(
            s.log,
            LogSettings {
                verbosity: 4,
                json: true
            }
        );
    }

    #[test]
    fn kube_mode() {
        let s = load(
            &cli(&["--kube-subnet-mgr", "--kubeconfig-file=/k.conf"]),
            env(&[]),
        )
        .unwrap();
        let Store::Kube(k) = &s.store else {
            panic!("{:?}", s.store)
        };
        assert_eq!(k.annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(k.kubeconfig, Some(PathBuf::from("/k.conf")));
        assert_eq!(k.api_url, None);
        assert_eq!(
            k.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert!(k.set_node_network_unavailable);
        let e = load(
            &cli(&["--kube-subnet-mgr", "--kube-annotation-prefix=-bad-"]),
            env(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--kube-annotation-prefix"), "{e:#}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = |args: &[&str], e: &[(&str, &str)]| {
            format!("{:#}", load(&cli(args), env(e)).unwrap_err())
        };
        assert!(err(&[], &[("FLANNELD_HEALTHZ_PORT", "abc")]).contains("healthz_port"));
        assert!(err(&["--subnet-lease-renew-margin=0"], &[]).contains("between 1 and 1439"));
        assert!(err(&["--subnet-lease-renew-margin=-3"], &[]).contains("between 1 and 1439"));
        assert!(err(&["--public-ip=fe80::1"], &[]).contains("IPv4"));
        assert!(err(&["--public-ip=bogus"], &[]).contains("--public-ip must be an IPv4 address"));
        assert!(err(&["--public-ipv6=10.0.0.1"], &[]).contains("--public-ipv6 must be an IPv6"));
        assert!(err(&["--iface-can-reach=x"], &[]).contains("--iface-can-reach"));
        assert!(
            err(&["--healthz-port=80", "--healthz-ip=localhost"], &[]).contains("--healthz-ip")
        );
        assert!(err(&["--log-format=xml"], &[]).contains("text or json"));
        assert!(err(&["--etcd-endpoints= , "], &[]).contains("--etcd-endpoints is empty"));
        assert!(parse(["flanneld", "--no-such-flag"]).is_err());
    }

    #[test]
    fn help_shows_every_default_from_the_table() {
        let cmd = command();
        for (key, value) in DEFAULTS {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == key)
                .unwrap_or_else(|| panic!("no flag for the default {key}"));
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(
                help.ends_with(&format!("[default: {value}]")),
                "--{key}: {help}"
            );
        }
        // And the rendered text carries them (whitespace aside: clap wraps long lines).
        let help = command().render_long_help().to_string();
        let words: Vec<&str> = help.split_whitespace().collect();
        assert!(
            words
                .join(" ")
                .contains("etcd key prefix of the network [default: /coreos.com/network]")
        );
        // Flags without a default show none.
        let keyfile = cmd
            .get_arguments()
            .find(|a| a.get_id() == "etcd_keyfile")
            .unwrap();
        assert!(!keyfile.get_help().unwrap().to_string().contains("default"));
    }

    #[test]
    fn help_lists_every_go_flag() {
        let help = command().render_long_help().to_string();
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
