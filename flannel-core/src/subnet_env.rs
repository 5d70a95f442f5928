//! `subnet.env`: the file through which flanneld tells the container runtime (the CNI plugin, Docker's
//! `mk-docker-opts`) the host's subnet and MTU.
//!
//! ```
//! use flannel_core::SubnetEnv;
//! let env = SubnetEnv {
//!     network: Some("10.42.0.0/16".parse().unwrap()),
//!     subnet: Some("10.42.7.0/24".parse().unwrap()),
//!     ipv6_network: None,
//!     ipv6_subnet: None,
//!     mtu: 1450,
//!     ip_masq: true,
//! };
//! assert_eq!(
//!     env.render(),
//!     "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
//! );
//! ```

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The content of `subnet.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster IPv4 network.
    pub network: Option<Ipv4Net>,
    /// The own IPv4 lease subnet; written as `FLANNEL_SUBNET` with the first usable address.
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Net>,
    /// The own IPv6 subnet; written as `FLANNEL_IPV6_SUBNET` with the first usable address.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`: the MTU pods should use.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether flanneld masquerades pod traffic.
    pub ip_masq: bool,
}

/// `10.5.72.0/24` → `10.5.72.1/24`.
fn first_host(net: IpNet) -> String {
    let addr = match net.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a).wrapping_add(1)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a).wrapping_add(1)).into()),
    };
    format!("{addr}/{}", net.prefix_len())
}

impl SubnetEnv {
    /// The file content: exactly Go flanneld's variables, order and formats.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        if let (Some(n), Some(sn)) = (self.network, self.subnet) {
            let _ = writeln!(s, "FLANNEL_NETWORK={n}");
            let _ = writeln!(s, "FLANNEL_SUBNET={}", first_host(IpNet::V4(sn)));
        }
        if let (Some(n), Some(sn)) = (self.ipv6_network, self.ipv6_subnet) {
            let _ = writeln!(s, "FLANNEL_IPV6_NETWORK={n}");
            let _ = writeln!(s, "FLANNEL_IPV6_SUBNET={}", first_host(IpNet::V6(sn)));
        }
        let _ = writeln!(s, "FLANNEL_MTU={}", self.mtu);
        let _ = writeln!(s, "FLANNEL_IPMASQ={}", self.ip_masq);
        s
    }

    /// Writes the file atomically: a temporary file in the same directory (created 0755 if missing),
    /// mode 0644 regardless of umask, flushed to disk, then renamed over `path`. Readers see the old
    /// or the new content, never a part.
    pub fn write_atomic(&self, path: &Path) -> io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "subnet file path has no file name",
            )
        })?;
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// What a previous run left in `subnet.env`, masked to network form (`10.5.72.1/24` → `10.5.72.0/24`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreviousSubnets {
    /// `FLANNEL_NETWORK`.
    pub network: Option<Ipv4Net>,
    /// `FLANNEL_SUBNET`.
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET`.
    pub ipv6_subnet: Option<Ipv6Net>,
}

/// The `KEY=VALUE` pairs of a `subnet.env`-style file, as sourcing it would set them: blank lines and
/// `#` comments are skipped, `export ` and quotes around a value are tolerated, a later key wins. The
/// one reader of the format: flanneld's read-back ([`PreviousSubnets`]), the CNI plugin and
/// mk-docker-opts all use it.
pub fn read_vars(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim().trim_matches(|c| c == '"' || c == '\'').to_string(),
            )
        })
        .collect()
}

impl PreviousSubnets {
    /// Reads `path` leniently like Go's dotenv reader: a missing file, key or unparsable value is
    /// treated as empty; `#` comments, `export ` and quotes are accepted; a value listing more than one
    /// CIDR (comma separated) is treated as empty, invalid entries are skipped.
    pub fn read(path: &Path) -> Self {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(_) => Self::default(),
        }
    }

    /// Parses the text of a `subnet.env` file (see [`read`](Self::read)).
    pub fn parse(text: &str) -> Self {
        let mut prev = Self::default();
        for (k, v) in read_vars(text) {
            let one = |v: &str| -> Option<IpNet> {
                let nets: Vec<IpNet> = v
                    .split(',')
                    .filter_map(|p| p.trim().parse::<IpNet>().ok())
                    .map(|n| n.trunc())
                    .collect();
                (nets.len() == 1).then(|| nets[0])
            };
            match (k.as_str(), one(&v)) {
                ("FLANNEL_NETWORK", Some(IpNet::V4(n))) => prev.network = Some(n),
                ("FLANNEL_SUBNET", Some(IpNet::V4(n))) => prev.subnet = Some(n),
                ("FLANNEL_IPV6_NETWORK", Some(IpNet::V6(n))) => prev.ipv6_network = Some(n),
                ("FLANNEL_IPV6_SUBNET", Some(IpNet::V6(n))) => prev.ipv6_subnet = Some(n),
                _ => {}
            }
        }
        prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dual() -> SubnetEnv {
        SubnetEnv {
            network: Some("10.42.0.0/16".parse().unwrap()),
            subnet: Some("10.42.0.0/24".parse().unwrap()),
            ipv6_network: Some("2001:cafe:42::/56".parse().unwrap()),
            ipv6_subnet: Some("2001:cafe:42::/64".parse().unwrap()),
            mtu: 1450,
            ip_masq: true,
        }
    }

    #[test]
    fn golden_dual_stack() {
        assert_eq!(
            dual().render(),
            "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn golden_ipv6_only() {
        let env = SubnetEnv {
            network: None,
            subnet: None,
            ip_masq: false,
            mtu: 1472,
            ..dual()
        };
        assert_eq!(
            env.render(),
            "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn atomic_write_mode_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        dual().write_atomic(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        let prev = PreviousSubnets::read(&path);
        assert_eq!(prev.subnet.unwrap().to_string(), "10.42.0.0/24");
        assert_eq!(prev.network.unwrap().to_string(), "10.42.0.0/16");
        assert_eq!(prev.ipv6_subnet.unwrap().to_string(), "2001:cafe:42::/64");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // Rewriting replaces the content.
        let mut env = dual();
        env.mtu = 1400;
        env.write_atomic(&path).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("FLANNEL_MTU=1400\n")
        );
    }

    #[test]
    fn lenient_read() {
        let p = PreviousSubnets::parse(
            "# comment\nexport FLANNEL_SUBNET=\"10.5.72.1/24\"\nFLANNEL_NETWORK=10.5.0.0/16,10.6.0.0/16\nFLANNEL_IPV6_SUBNET=nonsense\n",
        );
        assert_eq!(p.subnet.unwrap().to_string(), "10.5.72.0/24");
        assert_eq!(p.network, None, "more than one entry is treated as empty");
        assert_eq!(p.ipv6_subnet, None);
        assert_eq!(
            PreviousSubnets::read(Path::new("/nonexistent/subnet.env")),
            PreviousSubnets::default()
        );
        let p = PreviousSubnets::parse("FLANNEL_SUBNET=10.5.72.1/24,bogus\n");
        assert_eq!(
            p.subnet.unwrap().to_string(),
            "10.5.72.0/24",
            "invalid entries are skipped"
        );
    }
}
