//! The multi-host lab: N hosts as network namespaces on an underlay bridge, one etcd reachable from
//! every host, the real `flanneld` binary in each host, and pods attached to a `cni0` bridge that holds
//! the host's subnet. Shared by the lab tests, the demo and the benchmarks.
//!
//! Layout (all inside namespaces this lab creates; nothing touches the root namespace):
//!
//! ```text
//!   <lab>-sw:  br0 172.20.0.1/16 (segment 0)   etcd on 172.20.0.1:2379
//!              [br1 172.21.0.1/16 (segment 1), routing between them, when two segments]
//!   <lab>-hN:  eth0 172.2S.0.(10+N)/16, default via the switch; flanneld; cni0 = FLANNEL_SUBNET
//!   <lab>-hNpM: eth0 = next address of the host's subnet, default via cni0
//! ```
//!
//! Every namespace is named `flt<pid>-<lab>-…` and removed (with its links) when the [`Lab`] drops,
//! also when a test fails; processes are stopped by PID.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::etcd::EtcdServer;
use crate::kubeapi::ApiServer;
use crate::netns::{Netns, in_netns};

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The switch's address on segment `s` (172.20.0.1, 172.21.0.1, …); segment `s` is 172.(20+s).0.0/16.
pub fn segment_gateway(s: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 20 + s as u8, 0, 1)
}

/// The switch's IPv6 address on segment `s` (fd00:20::1, fd00:21::1, …); segment `s` is
/// fd00:(20+s)::/64.
pub fn segment_gateway6(s: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x20 + s as u16, 0, 0, 0, 0, 0, 1)
}

/// One pod.
#[derive(Debug)]
pub struct Pod {
    /// Its namespace.
    pub ns: Netns,
    /// Its address (`0.0.0.0` in an IPv6-only network: the host's subnet.env has no IPv4 subnet).
    pub ip: Ipv4Addr,
    /// Its IPv6 address, when the host's subnet.env has an IPv6 subnet (dual stack).
    pub ip6: Option<Ipv6Addr>,
}

/// What [`Lab::ping_probe`] saw.
#[derive(Debug, Clone, Copy)]
pub struct PingStats {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// The longest round trip, in milliseconds (`None` when no reply came).
    pub max_ms: Option<f64>,
}

/// One host.
#[derive(Debug)]
pub struct Host {
    /// Its number (1-based).
    pub n: usize,
    /// Its namespace.
    pub ns: Netns,
    /// Its underlay address.
    pub addr: Ipv4Addr,
    /// Its underlay IPv6 address (fd00:(20+segment)::(10+n)).
    pub addr6: Ipv6Addr,
    /// Its subnet file.
    pub subnet_file: PathBuf,
    /// Its flanneld log.
    pub log: PathBuf,
    flanneld: Option<Child>,
    extra_args: Vec<String>,
    /// Extra environment of its flanneld (set before starting it).
    pub env: Vec<(String, String)>,
    /// Whether its flanneld gets a /run of its own (a tmpfs in its mount namespace): for daemons
    /// with fixed paths there, such as strongSwan's charon (`/run/charon.pid`, its control socket)
    /// that the ipsec backend starts. Set before starting it.
    pub private_run: bool,
    /// Its pods.
    pub pods: Vec<Pod>,
}

impl Host {
    /// Runs a shell-free command in the host (`ip netns exec`), panicking on failure.
    pub fn sh(&self, cmd: &str) -> String {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        self.ns
            .exec(&args)
            .unwrap_or_else(|e| panic!("{}: {e}", self.ns.name()))
    }

    /// `ip route show [ARGS]` with each route as Go flanneld installs it: flanneld installs routes
    /// with a gateway through next-hop objects, which `ip` shows as `nhid N` before the gateway.
    pub fn routes(&self, args: &str) -> String {
        without_nhid(&self.sh(&format!("ip route show {args}")))
    }

    /// Whether this host's kernel has ipip tunnels: a probe device is made and deleted again. (It
    /// has a local address: one with neither end would be the kernel's `tunl0` again, refused.)
    pub fn has_ipip(&self) -> bool {
        self.probe(
            "ip link add fltipprobe type ipip local 192.0.2.1",
            "ip link del fltipprobe",
        )
    }

    /// Whether this host's kernel has ESP with upstream's default cipher (AES-GCM): a probe SA
    /// between two documentation addresses is added and deleted again.
    pub fn has_esp(&self) -> bool {
        let sa = "src 192.0.2.1 dst 192.0.2.2 proto esp spi 0xf1a0ffff";
        self.probe(
            &format!(
                "ip xfrm state add {sa} mode tunnel aead rfc4106(gcm(aes)) \
                 0x0123456789abcdef0123456789abcdef01234567 128"
            ),
            &format!("ip xfrm state del {sa}"),
        )
    }

    /// Whether the command `add` (words split at whitespace) succeeds in the host; `del` then
    /// undoes it.
    fn probe(&self, add: &str, del: &str) -> bool {
        let ok = self
            .ns
            .exec(&add.split_whitespace().collect::<Vec<_>>())
            .is_ok();
        if ok {
            let _ = self.ns.exec(&del.split_whitespace().collect::<Vec<_>>());
        }
        ok
    }

    /// Whether flanneld is running.
    pub fn flanneld_running(&mut self) -> bool {
        self.flanneld
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The flanneld log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `subnet.env` values.
    pub fn subnet_env(&self) -> Option<std::collections::BTreeMap<String, String>> {
        let text = std::fs::read_to_string(&self.subnet_file).ok()?;
        Some(
            text.lines()
                .filter_map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect(),
        )
    }
}

/// The lab.
#[derive(Debug)]
pub struct Lab {
    /// The hosts.
    pub hosts: Vec<Host>,
    /// etcd, inside the switch namespace (an etcd lab).
    pub etcd: Option<EtcdServer>,
    /// The stand-in Kubernetes API server, inside the switch namespace (a Kubernetes lab, where
    /// every flanneld runs with `--kube-subnet-mgr` and host N is Node `hostN`).
    pub kube: Option<ApiServer>,
    /// The switch namespace.
    pub sw: Netns,
    /// The flanneld binary used.
    pub flanneld: PathBuf,
    tag: String,
    dir: tempfile::TempDir,
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Hosts per segment, e.g. `[3]` or `[2, 1]` for two L2 segments joined by the switch's routing.
    pub segments: Vec<usize>,
    /// The network config JSON.
    pub config: String,
    /// Extra flanneld flags.
    pub flanneld_args: Vec<String>,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// Builds the lab and starts etcd (the config is written; flanneld is not started yet).
    ///
    /// # Panics
    /// When a step fails.
    pub fn new(spec: &LabSpec, flanneld: PathBuf) -> Self {
        Self::build(spec, flanneld, false)
    }

    /// An etcd lab for `test` with the repository's `flanneld`: `segments` hosts, the network
    /// `config` JSON and extra flanneld `args`; `None` (with the skip printed) when the test cannot
    /// run here (no root, or no etcd).
    ///
    /// # Panics
    /// When a step fails, or when a needed tool is missing and `FLANNEL_REQUIRE_ROOT_TESTS=1`.
    pub fn for_test(test: &str, segments: Vec<usize>, config: &str, args: &[&str]) -> Option<Self> {
        if !crate::require_root(test) || !crate::require_etcd(test) {
            return None;
        }
        let spec = LabSpec {
            segments,
            config: config.into(),
            flanneld_args: args.iter().map(|a| a.to_string()).collect(),
        };
        Some(Self::new(&spec, crate::bin_path("flanneld")))
    }

    /// Builds a Kubernetes lab: the stand-in API server on the switch (`http://172.20.0.1:6443`)
    /// instead of etcd, the network config in a `net-conf.json` file, and a Node `hostN` per host
    /// with the Nth subnet of the network as its pod CIDR (IPv4, and IPv6 with `EnableIPv6`), as the
    /// controller manager's node IPAM would assign it. flanneld is not started yet.
    ///
    /// # Panics
    /// When a step fails.
    pub fn new_kube(spec: &LabSpec, flanneld: PathBuf) -> Self {
        Self::build(spec, flanneld, true)
    }

    /// The `n`-th (1-based) pod CIDR(s) of the network config: what the lab's node IPAM assigns to
    /// Node `hostN`.
    pub fn pod_cidrs(config: &str, n: usize) -> Vec<String> {
        let c = flannel_core::NetworkConfig::parse(config).expect("a valid network config");
        let mut out = Vec::new();
        if let Some(p) = &c.ipv4
            && let Some(s) = p.subnets().nth(n)
        {
            out.push(s.to_string());
        }
        if let Some(p) = &c.ipv6
            && let Some(s) = p.subnets().nth(n)
        {
            out.push(s.to_string());
        }
        out
    }

    /// The stand-in API server of a Kubernetes lab.
    ///
    /// # Panics
    /// In an etcd lab.
    pub fn api(&self) -> &ApiServer {
        self.kube
            .as_ref()
            .expect("a Kubernetes lab (Lab::new_kube)")
    }

    /// Checks that host `h`'s Node carries upstream's annotations for a backend whose leases have
    /// no data (ipip, ipsec): `backend-type` `kind`, `backend-data` null, `public-ip` the host's
    /// address; returns the Node.
    ///
    /// # Panics
    /// When one differs (naming it, with the Node), or in an etcd lab.
    pub fn assert_dataless_node_annotations(&self, h: usize, kind: &str) -> serde_json::Value {
        let node = self
            .api()
            .node(&format!("host{}", h + 1))
            .unwrap_or_else(|| panic!("no Node host{}", h + 1));
        let annotations = &node["metadata"]["annotations"];
        for (key, want) in [
            ("backend-type", kind.to_string()),
            ("backend-data", "null".to_string()),
            ("public-ip", self.hosts[h].addr.to_string()),
        ] {
            assert_eq!(
                annotations[format!("flannel.alpha.coreos.com/{key}")],
                want.as_str(),
                "{key} of host{}: {node}",
                h + 1
            );
        }
        node
    }

    fn build(spec: &LabSpec, flanneld: PathBuf, kube: bool) -> Self {
        let id = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("l{id}");
        let dir = crate::cleanup::create_dir(|| {
            tempfile::Builder::new().prefix("flannel-lab-").tempdir()
        })
        .expect("tempdir");
        let sw = Netns::new(&format!("{tag}-sw"));
        let swsh = |cmd: &str| {
            let args: Vec<&str> = cmd.split_whitespace().collect();
            sw.exec(&args).unwrap_or_else(|e| panic!("switch: {e}"));
        };
        for (s, _) in spec.segments.iter().enumerate() {
            swsh(&format!("ip link add br{s} type bridge"));
            swsh(&format!("ip addr add {}/16 dev br{s}", segment_gateway(s)));
            swsh(&format!(
                "ip addr add {}/64 dev br{s} nodad",
                segment_gateway6(s)
            ));
            swsh(&format!("ip link set br{s} up"));
        }
        swsh("sysctl -qw net.ipv4.ip_forward=1");
        swsh("sysctl -qw net.ipv6.conf.all.forwarding=1");
        let gw = segment_gateway(0).to_string();
        let (etcd, api) = if kube {
            let api = ApiServer::start_in(Some(sw.name()), &gw, 6443);
            std::fs::write(dir.path().join("net-conf.json"), &spec.config).expect("net-conf.json");
            (None, Some(api))
        } else {
            (
                Some(EtcdServer::start_in(Some(sw.name()), &gw, 2379, None)),
                None,
            )
        };
        let mut lab = Self {
            hosts: Vec::new(),
            etcd,
            kube: api,
            sw,
            flanneld,
            tag: tag.clone(),
            dir,
        };
        if let Some(api) = &lab.kube {
            let total: usize = spec.segments.iter().sum();
            for n in 1..=total {
                let cidrs = Self::pod_cidrs(&spec.config, n);
                let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
                api.add_node(&format!("host{n}"), &cidrs);
            }
        } else {
            lab.etcd_put("/coreos.com/network/config", &spec.config);
        }
        let mut n = 0;
        for (s, count) in spec.segments.iter().enumerate() {
            for _ in 0..*count {
                n += 1;
                lab.add_host(n, s, &tag, spec.flanneld_args.clone());
            }
        }
        lab
    }

    fn add_host(&mut self, n: usize, segment: usize, tag: &str, extra_args: Vec<String>) {
        let ns = Netns::new(&format!("{tag}-h{n}"));
        let addr = Ipv4Addr::new(172, 20 + segment as u8, 0, 10 + n as u8);
        let addr6 = Ipv6Addr::new(
            0xfd00,
            0x20 + segment as u16,
            0,
            0,
            0,
            0,
            0,
            0x10 + n as u16,
        );
        let sw = self.sw.name().to_string();
        run(Command::new("ip").args([
            "netns",
            "exec",
            &sw,
            "ip",
            "link",
            "add",
            &format!("h{n}"),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        self.sw
            .exec(&[
                "ip",
                "link",
                "set",
                &format!("h{n}"),
                "master",
                &format!("br{segment}"),
                "up",
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        let host = Host {
            n,
            ns,
            addr,
            addr6,
            subnet_file: self.dir.path().join(format!("h{n}/subnet.env")),
            log: self.dir.path().join(format!("h{n}.log")),
            flanneld: None,
            extra_args,
            env: Vec::new(),
            private_run: false,
            pods: Vec::new(),
        };
        host.sh(&format!("ip addr add {addr}/16 dev eth0"));
        host.sh("ip link set eth0 up");
        host.sh(&format!(
            "ip route add default via {}",
            segment_gateway(segment)
        ));
        host.sh("sysctl -qw net.ipv4.ip_forward=1");
        // IPv6 on the underlay too (used when the network config enables IPv6); no DAD, so the
        // address is usable at once.
        host.sh(&format!("ip addr add {addr6}/64 dev eth0 nodad"));
        host.sh(&format!(
            "ip -6 route add default via {}",
            segment_gateway6(segment)
        ));
        host.sh("sysctl -qw net.ipv6.conf.all.forwarding=1");
        self.hosts.push(host);
    }

    /// The etcd endpoint as the hosts see it.
    ///
    /// # Panics
    /// In a Kubernetes lab.
    pub fn etcd_url(&self) -> String {
        self.etcd.as_ref().expect("an etcd lab (Lab::new)").url()
    }

    /// Where the hosts find their store: the etcd URL, or the API server URL in a Kubernetes lab.
    pub fn store_url(&self) -> String {
        match &self.kube {
            Some(api) => api.url(),
            None => self.etcd_url(),
        }
    }

    fn etcd<T: Send + 'static>(
        &self,
        f: impl FnOnce(
            etcd_client::Client,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>
        + Send
        + 'static,
    ) -> T {
        let url = self.etcd_url();
        in_netns(Some(self.sw.name()), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let c = etcd_client::Client::connect([url.as_str()], None)
                    .await
                    .expect("etcd connect");
                f(c).await
            })
        })
    }

    /// Host `h`'s subnet as its lease in etcd names it (`10.5.3.0/24`), or in a Kubernetes lab
    /// its Node's pod CIDR.
    ///
    /// # Panics
    /// When etcd holds no lease with the host's address, or the Node has no pod CIDR.
    pub fn subnet_of(&self, h: usize) -> String {
        if let Some(api) = &self.kube {
            return api
                .node(&format!("host{}", h + 1))
                .and_then(|n| n["spec"]["podCIDR"].as_str().map(str::to_string))
                .unwrap_or_else(|| panic!("Node host{} has no pod CIDR", h + 1));
        }
        let ip = format!("\"{}\"", self.hosts[h].addr);
        self.etcd_list("/coreos.com/network/subnets/")
            .into_iter()
            .find(|(_, v)| v.contains(&ip))
            .and_then(|(k, _)| k.rsplit('/').next().map(|s| s.replace('-', "/")))
            .unwrap_or_else(|| panic!("no lease of host {h}"))
    }

    /// Host `h`'s lease as etcd holds it (the JSON value under its subnet's key).
    ///
    /// # Panics
    /// When etcd holds no lease with the host's address.
    pub fn lease_of(&self, h: usize) -> String {
        let key = self.subnet_of(h).replace('/', "-");
        self.etcd_list("/coreos.com/network/subnets/")
            .into_iter()
            .find(|(k, _)| k.rsplit('/').next() == Some(key.as_str()))
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no lease of host {h}"))
    }

    /// Writes a key.
    pub fn etcd_put(&self, key: &str, value: &str) {
        let (k, v) = (key.to_string(), value.to_string());
        self.etcd(move |mut c| {
            Box::pin(async move {
                c.put(k, v, None).await.expect("etcd put");
            })
        });
    }

    /// Deletes a key.
    pub fn etcd_delete(&self, key: &str) {
        let k = key.to_string();
        self.etcd(move |mut c| {
            Box::pin(async move {
                c.delete(k, None).await.expect("etcd delete");
            })
        });
    }

    /// Every key and value under a prefix.
    pub fn etcd_list(&self, prefix: &str) -> Vec<(String, String)> {
        let p = prefix.to_string();
        self.etcd(move |mut c| {
            Box::pin(async move {
                let r = c
                    .get(p, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
                    .expect("etcd get");
                r.kvs()
                    .iter()
                    .map(|kv| {
                        (
                            kv.key_str().unwrap_or_default().to_string(),
                            kv.value_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
        })
    }

    /// Writes many leases in one go (for benchmarks), returns after etcd accepted them all.
    pub fn etcd_put_many(&self, kvs: Vec<(String, String)>) {
        self.etcd(move |c| {
            Box::pin(async move {
                let mut tasks = Vec::new();
                for chunk in kvs.chunks(kvs.len().div_ceil(16).max(1)) {
                    let (mut c, chunk) = (c.clone(), chunk.to_vec());
                    tasks.push(tokio::spawn(async move {
                        for (k, v) in chunk {
                            c.put(k, v, None).await.expect("etcd put");
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("put task");
                }
            })
        })
    }

    /// Deletes many keys in one go (for benchmarks).
    pub fn etcd_delete_many(&self, keys: Vec<String>) {
        self.etcd(move |c| {
            Box::pin(async move {
                let mut tasks = Vec::new();
                for chunk in keys.chunks(keys.len().div_ceil(16).max(1)) {
                    let (mut c, chunk) = (c.clone(), chunk.to_vec());
                    tasks.push(tokio::spawn(async move {
                        for k in chunk {
                            c.delete(k, None).await.expect("etcd delete");
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("delete task");
                }
            })
        })
    }

    /// The PID of host `i`'s flanneld.
    pub fn flanneld_pid(&self, i: usize) -> Option<u32> {
        self.hosts[i].flanneld.as_ref().map(Child::id)
    }

    /// The first pod of every host pings the first pod of every other host over IPv4 and IPv6 (each
    /// retried up to 5 s); returns the failures.
    ///
    /// # Panics
    /// When a pod has no IPv6 address.
    pub fn ping_both_families(&self) -> Vec<String> {
        self.ping_pairs(|pod| {
            let ip6 = pod.ip6.expect("the pod has an IPv6 address");
            vec![IpAddr::V4(pod.ip), IpAddr::V6(ip6)]
        })
    }

    /// As [`Lab::ping_both_families`], over IPv6 alone (an IPv6-only network).
    ///
    /// # Panics
    /// When a pod has no IPv6 address.
    pub fn ping_ipv6(&self) -> Vec<String> {
        self.ping_pairs(|pod| vec![IpAddr::V6(pod.ip6.expect("the pod has an IPv6 address"))])
    }

    fn ping_pairs(&self, addrs: impl Fn(&Pod) -> Vec<IpAddr>) -> Vec<String> {
        let mut failures = Vec::new();
        for from in 0..self.hosts.len() {
            for to in 0..self.hosts.len() {
                if from == to {
                    continue;
                }
                for ip in addrs(&self.hosts[to].pods[0]) {
                    if !self.ping(
                        (from, 0),
                        ip,
                        Duration::from_secs(5) * crate::vm::slowdown(),
                    ) {
                        failures.push(format!("host {from} -> {ip}"));
                    }
                }
            }
        }
        failures
    }

    /// The program, arguments and environment of host `i`'s flanneld (run through `ip netns exec`).
    fn flanneld_command(&self, i: usize) -> (Vec<String>, Vec<(String, String)>) {
        let h = &self.hosts[i];
        let mut argv: Vec<String> = vec!["ip".into(), "netns".into(), "exec".into()];
        argv.push(h.ns.name().to_string());
        if h.private_run {
            // `ip netns exec` runs the command in a mount namespace of its own (mounts do not
            // propagate back), so the tmpfs is this flanneld's and its children's alone. Where the
            // lab's directory is under /run (the test VM's temporary files), it is moved back on
            // top (through /mnt, a mount point outside /run).
            let keep = if self.dir.path().starts_with("/run") {
                self.dir.path().display().to_string()
            } else {
                String::new()
            };
            argv.extend([
                "sh".into(),
                "-c".into(),
                concat!(
                    r#"set -e; keep=$1; shift; "#,
                    r#"if [ -n "$keep" ]; then mount --bind "$keep" /mnt; fi; "#,
                    r#"mount -t tmpfs flannel-lab-run /run; "#,
                    r#"if [ -n "$keep" ]; then mkdir -p "$keep"; mount --move /mnt "$keep"; fi; "#,
                    r#"exec "$@""#
                )
                .into(),
                "sh".into(),
                keep,
            ]);
        }
        argv.push(self.flanneld.display().to_string());
        match &self.kube {
            Some(api) => argv.extend([
                "--kube-subnet-mgr".into(),
                format!("--kube-api-url={}", api.url()),
                format!(
                    "--net-config-path={}",
                    self.dir.path().join("net-conf.json").display()
                ),
            ]),
            None => argv.push(format!("--etcd-endpoints={}", self.etcd_url())),
        }
        argv.push("--iface=eth0".into());
        argv.push(format!("--subnet-file={}", h.subnet_file.display()));
        argv.extend(h.extra_args.iter().cloned());
        let env = vec![
            ("NODE_NAME".to_string(), format!("host{}", h.n)),
            // Hosts share one filesystem: each keeps its WireGuard key beside its subnet.env.
            (
                "WIREGUARD_KEY_FILE".to_string(),
                h.subnet_file.with_file_name("wgkey").display().to_string(),
            ),
            // ... and its userspace devices' `wg` control sockets ([`Lab::wg`] shows them).
            (
                flannel_backend_wireguard::uapi::RUN_DIR_ENV.to_string(),
                h.subnet_file
                    .with_file_name("wireguard")
                    .display()
                    .to_string(),
            ),
            ("RUST_LOG".to_string(), "info".to_string()),
        ]
        .into_iter()
        .chain(h.env.iter().cloned())
        .collect();
        (argv, env)
    }

    /// Starts Debian's wireguard-go on host `h` as the device `name` (in the foreground: its
    /// daemonised mode dies in a namespace), gives it a new key (in `<host dir>/<name>.key`) and
    /// `port`, and returns the process (stopped when dropped) and the key. The device is down,
    /// without address or peers. Its control socket is in the host's own directory
    /// ([`Lab::with_run_dir`]): configure it with [`Lab::wg`].
    ///
    /// # Panics
    /// When wireguard-go or wg fails (Debian packages wireguard-go, wireguard-tools).
    pub fn start_wireguard_go(
        &self,
        h: usize,
        name: &str,
        port: u16,
    ) -> (crate::Proc, flannel_backend_wireguard::PrivateKey) {
        let host = &self.hosts[h];
        let dir = host.subnet_file.parent().expect("host dir").to_path_buf();
        std::fs::create_dir_all(&dir).expect("host dir");
        let key_file = dir.join(format!("{name}.key"));
        let private = flannel_backend_wireguard::PrivateKey::generate().expect("a key");
        std::fs::write(&key_file, private.to_base64()).expect("key file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", host.ns.name()])
            .args(self.with_run_dir(h))
            .args(["wireguard-go", name])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let proc = crate::Proc::spawn(&mut cmd);
        assert!(
            crate::until(Duration::from_secs(10), || host
                .ns
                .exec(&["ip", "link", "show", name])
                .is_ok()),
            "wireguard-go made no device {name} on host {h}"
        );
        let port = port.to_string();
        let key_path = key_file.display().to_string();
        self.wg(
            h,
            &["set", name, "listen-port", &port, "private-key", &key_path],
        )
        .unwrap_or_else(|e| panic!("wg set on host {h}: {e}"));
        (proc, private)
    }

    /// Runs Debian's `wg` with `args` in host `h`, where it finds the control sockets of the host's
    /// userspace WireGuard devices (flanneld's and wireguard-go's, see [`Lab::with_run_dir`]) and its
    /// kernel devices over netlink.
    ///
    /// # Errors
    /// What `wg` printed when it failed.
    pub fn wg(&self, h: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.with_run_dir(h);
        cmd.push("wg".into());
        cmd.extend(args.iter().map(|a| a.to_string()));
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        self.hosts[h].ns.exec(&cmd)
    }

    /// The start of a command line that runs the rest in a mount namespace of its own where host
    /// `h`'s WireGuard socket directory (`<host dir>/wireguard`, flanneld's
    /// `FLANNEL_WIREGUARD_RUN_DIR` there) is mounted at /run/wireguard, where wireguard-go makes its
    /// sockets and wg looks for them: lab hosts share one filesystem, and each host's devices need
    /// sockets of their own.
    pub fn with_run_dir(&self, h: usize) -> Vec<String> {
        let dir = self.hosts[h].subnet_file.with_file_name("wireguard");
        std::fs::create_dir_all(&dir).expect("the host's WireGuard socket directory");
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            "mkdir -p /run/wireguard && mount --bind \"$0\" /run/wireguard && exec \"$@\"",
        ]
        .into_iter()
        .map(String::from)
        .chain([dir.display().to_string()])
        .collect()
    }

    /// Host `h`'s lease value (etcd labs) and the WireGuard public key its key file gives.
    ///
    /// # Panics
    /// When the lease or the key file is missing.
    pub fn wireguard_lease(&self, h: usize) -> (serde_json::Value, String) {
        let me = self.hosts[h].addr.to_string();
        let value = self
            .etcd_list("/coreos.com/network/subnets/")
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).ok())
            .find(|v| v["PublicIP"] == me)
            .unwrap_or_else(|| panic!("no lease of host {h}"));
        (value, self.wireguard_public_key(h))
    }

    /// The WireGuard public key host `h`'s key file gives (base64).
    ///
    /// # Panics
    /// When the key file is missing or holds no key.
    pub fn wireguard_public_key(&self, h: usize) -> String {
        let key_file = self.hosts[h].subnet_file.with_file_name("wgkey");
        let key: flannel_backend_wireguard::PrivateKey = std::fs::read_to_string(&key_file)
            .unwrap_or_else(|e| panic!("{}: {e}", key_file.display()))
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", key_file.display()));
        key.public_key().to_string()
    }

    /// Starts flanneld on host `i` (0-based) and waits until it wrote subnet.env.
    ///
    /// # Panics
    /// When it does not come up within 20 s.
    pub fn start_flanneld(&mut self, i: usize) {
        let _ = std::fs::remove_file(&self.hosts[i].subnet_file);
        let child = self.spawn_flanneld(i);
        self.hosts[i].flanneld = Some(child);
        self.wait_subnet_file(i, true);
    }

    /// Starts host `i`'s flanneld, logging to the host's log.
    fn spawn_flanneld(&self, i: usize) -> Child {
        let (argv, env) = self.flanneld_command(i);
        spawn_logged(&argv, env, &self.hosts[i].log)
    }

    /// Starts a second flanneld on host `i` (as Go's `test_multi` runs one per network, each under
    /// its own `--etcd-prefix`): the host's flanneld's arguments with `args` added, its subnet file `<host dir>/<name>.env` and its log
    /// `<host dir>/<name>.log`, and waits up to 20 s (100 s in the test VM) for the subnet file.
    /// Returns the process (stopped when dropped), the subnet file and the log.
    ///
    /// # Panics
    /// When it exits or writes no subnet file in time.
    pub fn start_second_flanneld(
        &self,
        i: usize,
        name: &str,
        args: &[&str],
    ) -> (crate::Proc, PathBuf, PathBuf) {
        let (mut argv, env) = self.flanneld_command(i);
        let dir = self.hosts[i].subnet_file.with_file_name("");
        let (file, log) = (
            dir.join(format!("{name}.env")),
            dir.join(format!("{name}.log")),
        );
        for a in &mut argv {
            if a.starts_with("--subnet-file=") {
                *a = format!("--subnet-file={}", file.display());
            }
        }
        argv.extend(args.iter().map(|a| a.to_string()));
        let mut proc = crate::Proc(spawn_logged(&argv, env, &log));
        let deadline = Instant::now() + Duration::from_secs(20) * crate::vm::slowdown();
        while !file.exists() {
            let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                matches!(proc.0.try_wait(), Ok(None)),
                "the second flanneld {name} on host {i} exited:\n{}",
                log_text()
            );
            assert!(
                Instant::now() < deadline,
                "the second flanneld {name} on host {i} wrote no subnet file:\n{}",
                log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (proc, file, log)
    }

    /// Waits up to 20 s (100 s in the test VM, which emulates its CPU) for host `i`'s subnet.env
    /// (checking that its own flanneld child runs).
    fn wait_subnet_file(&mut self, i: usize, own_child: bool) {
        let h = &mut self.hosts[i];
        let deadline = Instant::now() + Duration::from_secs(20) * crate::vm::slowdown();
        while !h.subnet_file.exists() {
            if own_child && !h.flanneld_running() {
                panic!("flanneld on {} exited:\n{}", h.ns.name(), h.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "flanneld on {} wrote no subnet.env in {} s:\n{}",
                h.ns.name(),
                20 * crate::vm::slowdown(),
                h.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs host `i`'s flanneld as the service `unit` of the systemd user manager `mgr`
    /// (`Type=notify`, with a file-descriptor store, logging to the host's log), and waits for its
    /// subnet.env. Restart it with `mgr.must(&["restart", unit])`.
    ///
    /// # Panics
    /// When the service does not start.
    pub fn start_flanneld_service(
        &mut self,
        i: usize,
        mgr: &mut crate::systemd::UserManager,
        unit: &str,
    ) {
        let (argv, env) = self.flanneld_command(i);
        let h = &self.hosts[i];
        let _ = std::fs::remove_file(&h.subnet_file);
        let environment: String = env
            .iter()
            .map(|(k, v)| format!("Environment=\"{k}={v}\"\n"))
            .collect();
        let text = format!(
            "[Service]\nType=notify\nExecStart={}\n{environment}FileDescriptorStoreMax=8\n\
             StandardOutput=append:{log}\nStandardError=append:{log}\nTimeoutStopSec=10\n",
            argv.join(" "),
            log = h.log.display()
        );
        mgr.add_unit(unit, &text);
        mgr.must(&["start", unit]);
        self.wait_subnet_file(i, false);
    }

    /// Runs host `i`'s flanneld as [`Lab::start_flanneld`] would, for a start that must fail:
    /// waits up to `limit` for it to exit and returns its exit code (`None`: still running at
    /// `limit`, then stopped) and its log.
    pub fn run_flanneld_to_exit(&mut self, i: usize, limit: Duration) -> (Option<i32>, String) {
        let mut child = self.spawn_flanneld(i);
        let deadline = Instant::now() + limit;
        let code = loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    crate::cleanup::forget_process(child.id());
                    break status.code();
                }
                _ if Instant::now() > deadline => {
                    let _ = crate::cleanup::stop_child(&mut child, Duration::from_secs(5));
                    break None;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        (code, self.hosts[i].log_text())
    }

    /// What crossed host `h`'s IPv4 underlay (etcd's TCP aside) while `during` ran, as tcpdump
    /// prints it (`--immediate-mode`: packets reach the file at once, not when a ring block is
    /// full).
    ///
    /// # Panics
    /// When tcpdump cannot be started.
    pub fn capture_underlay(&self, h: usize, during: impl FnOnce()) -> Vec<String> {
        self.capture(
            self.hosts[h].ns.name(),
            "eth0",
            &format!("underlay-{h}"),
            during,
        )
    }

    /// What crossed the wire of host `h` (its port on the switch, in the switch's namespace: what
    /// the host sent and received, before any decapsulation of the host's own; etcd's TCP aside),
    /// as tcpdump prints it.
    ///
    /// # Panics
    /// When tcpdump cannot be started.
    pub fn capture_switch_port(&self, h: usize, during: impl FnOnce()) -> Vec<String> {
        let port = format!("h{}", self.hosts[h].n);
        self.capture(self.sw.name(), &port, &format!("port-{h}"), during)
    }

    fn capture(&self, ns: &str, iface: &str, name: &str, during: impl FnOnce()) -> Vec<String> {
        let file = self.dir().join(format!("{name}.pcap"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args([
                "tcpdump",
                "--immediate-mode",
                "-i",
                iface,
                "-nn",
                "-U",
                "-w",
            ])
            .arg(&file)
            .args(["ip and not tcp port 2379"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut tcpdump = crate::cleanup::spawn(&mut cmd).expect("tcpdump");
        std::thread::sleep(Duration::from_millis(500));
        during();
        std::thread::sleep(Duration::from_millis(300));
        crate::cleanup::stop_child(&mut tcpdump, Duration::from_secs(5));
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&file)
            .output()
            .expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Starts flanneld on every host.
    pub fn start_all(&mut self) {
        for i in 0..self.hosts.len() {
            self.start_flanneld(i);
        }
    }

    /// Stops flanneld on host `i` with SIGTERM (by PID) and returns its exit code.
    pub fn stop_flanneld(&mut self, i: usize) -> Option<i32> {
        let mut child = self.hosts[i].flanneld.take()?;
        crate::cleanup::stop_child(&mut child, Duration::from_secs(10))?.code()
    }

    /// Creates `count` pods on host `i`: a `cni0` bridge with the host's FLANNEL_SUBNET gateway and
    /// MTU, and per pod a namespace attached by veth with the next address and a default route; the
    /// same in IPv6 with FLANNEL_IPV6_SUBNET (dual stack, or IPv6 alone in an IPv6-only network).
    ///
    /// # Panics
    /// When subnet.env is missing or a command fails.
    pub fn add_pods(&mut self, i: usize, count: usize) {
        let tag = self.tag.clone();
        let h = &mut self.hosts[i];
        let env = h.subnet_env().expect("subnet.env");
        let mtu = env["FLANNEL_MTU"].clone();
        let v4 = env.get("FLANNEL_SUBNET").map(|c| {
            let (gw, prefix) = c.split_once('/').expect("cidr");
            (gw.parse::<Ipv4Addr>().expect("gateway"), prefix.to_string())
        });
        // Dual stack: FLANNEL_IPV6_SUBNET is the gateway's address with the prefix, like the IPv4 one.
        let v6 = env.get("FLANNEL_IPV6_SUBNET").map(|c| {
            let (gw, prefix) = c.split_once('/').expect("cidr");
            (
                gw.parse::<Ipv6Addr>().expect("IPv6 gateway"),
                prefix.to_string(),
            )
        });
        if h.ns.exec(&["ip", "link", "show", "cni0"]).is_err() {
            h.sh("ip link add cni0 type bridge");
            if let Some((gw, prefix)) = &v4 {
                h.sh(&format!("ip addr add {gw}/{prefix} dev cni0"));
            }
            if let Some((gw6, prefix6)) = &v6 {
                h.sh(&format!("ip addr add {gw6}/{prefix6} dev cni0 nodad"));
            }
            h.sh(&format!("ip link set cni0 mtu {mtu} up"));
        }
        for _ in 0..count {
            let j = h.pods.len() + 1;
            let ns = Netns::new(&format!("{tag}-h{}p{j}", h.n));
            let veth = format!("p{j}");
            h.ns.exec(&[
                "ip",
                "link",
                "add",
                &veth,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])
            .unwrap_or_else(|e| panic!("{e}"));
            h.sh(&format!("ip link set {veth} master cni0 up"));
            let mut cmds = vec![format!("ip link set eth0 mtu {mtu} up")];
            let ip = v4.as_ref().map_or(Ipv4Addr::UNSPECIFIED, |(gw, prefix)| {
                let ip = Ipv4Addr::from(u32::from(*gw) + j as u32);
                cmds.push(format!("ip addr add {ip}/{prefix} dev eth0"));
                cmds.push(format!("ip route add default via {gw}"));
                ip
            });
            let ip6 = v6.as_ref().map(|(gw6, prefix6)| {
                let ip6 = Ipv6Addr::from(u128::from(*gw6) + j as u128);
                cmds.push(format!("ip addr add {ip6}/{prefix6} dev eth0 nodad"));
                cmds.push(format!("ip -6 route add default via {gw6}"));
                ip6
            });
            for cmd in cmds {
                let args: Vec<&str> = cmd.split_whitespace().collect();
                ns.exec(&args).unwrap_or_else(|e| panic!("{e}"));
            }
            h.pods.push(Pod { ns, ip, ip6 });
        }
    }

    /// Runs the `flannel` CNI plugin (`plugin`) in host `i` with `command` for container `id` in network
    /// namespace `netns`, with `netconf` on stdin and Debian's reference plugins on CNI_PATH. Returns the
    /// exit code and stdout.
    pub fn cni(
        &self,
        i: usize,
        plugin: &std::path::Path,
        command: &str,
        id: &str,
        netns: &str,
        netconf: &str,
    ) -> (Option<i32>, String) {
        use std::io::Write as _;
        let h = &self.hosts[i];
        let plugin_dir = plugin
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut child = Command::new("ip")
            .args(["netns", "exec", h.ns.name()])
            .arg(plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", format!("/usr/lib/cni:{plugin_dir}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the CNI plugin");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(netconf.as_bytes()).expect("write netconf");
        }
        let out = child.wait_with_output().expect("CNI plugin output");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The CNI network config for host `i`, as a runtime would pass it (upstream's reference
    /// `10-flannel.conflist` delegate settings; state directories inside the lab).
    pub fn cni_netconf(&self, i: usize) -> String {
        let dir = self.dir.path().join(format!("cni-h{}", self.hosts[i].n));
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "type": "flannel",
            "subnetFile": self.hosts[i].subnet_file,
            "dataDir": dir.join("flannel"),
            "ipam": {"dataDir": dir.join("ipam")},
            "delegate": {"hairpinMode": true, "isDefaultGateway": true}
        })
        .to_string()
    }

    /// Creates `count` pods on host `i` through the `flannel` CNI plugin (`plugin`) and Debian's
    /// reference plugins, as a container runtime would.
    ///
    /// # Panics
    /// When the plugin fails.
    pub fn add_cni_pods(&mut self, i: usize, count: usize, plugin: &std::path::Path) {
        for _ in 0..count {
            let j = self.hosts[i].pods.len() + 1;
            let ns = Netns::new(&format!("{}-h{}c{j}", self.tag, self.hosts[i].n));
            let (code, out) = self.cni(
                i,
                plugin,
                "ADD",
                &format!("ctr-h{}-{j}", self.hosts[i].n),
                ns.name(),
                &self.cni_netconf(i),
            );
            assert_eq!(code, Some(0), "CNI ADD failed: {out}");
            let result: serde_json::Value = serde_json::from_str(&out).expect("CNI result");
            let addrs: Vec<IpAddr> = result["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["address"].as_str()?.split('/').next()?.parse().ok())
                .collect();
            // (None in an IPv6-only network: `0.0.0.0`, as `add_pods` gives.)
            let ip = addrs
                .iter()
                .find_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            assert!(
                !ip.is_unspecified()
                    || self.hosts[i]
                        .subnet_env()
                        .is_some_and(|e| !e.contains_key("FLANNEL_SUBNET")),
                "CNI result has no IPv4 address though subnet.env has an IPv4 subnet: {out}"
            );
            let ip6 = addrs.iter().find_map(|a| match a {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            });
            self.hosts[i].pods.push(Pod { ns, ip, ip6 });
        }
    }

    /// A scratch directory of the lab (removed with it).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A new, empty pod namespace `<lab>-<name>` (for CNI tests).
    pub fn pod_netns(&self, name: &str) -> Netns {
        Netns::new(&format!("{}-{name}", self.tag))
    }

    /// Pings `to` from pod `(host, pod)`, once a second, until it answers or `wait` has passed; true
    /// when it answered. (One lost or refused ping must not decide: a route may be on its way.)
    pub fn ping(&self, from: (usize, usize), to: impl Into<IpAddr>, wait: Duration) -> bool {
        let to: IpAddr = to.into();
        let pod = &self.hosts[from.0].pods[from.1];
        let deadline = Instant::now() + wait;
        loop {
            let started = Instant::now();
            if pod
                .ns
                .exec(&["ping", "-c", "1", "-W", "1", &to.to_string()])
                .is_ok()
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // A refused ping returns at once: pace the retries.
            std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
        }
    }

    /// Pings `to` from pod `from` `count` times, every 0.1 s, while `during` runs (it starts after
    /// 0.5 s); returns (sent, received).
    ///
    /// # Panics
    /// When ping cannot run or prints no summary.
    pub fn ping_during(
        &mut self,
        from: (usize, usize),
        to: impl Into<IpAddr>,
        count: u32,
        during: impl FnOnce(&mut Lab),
    ) -> (u32, u32) {
        let p = self.ping_probe(from, to, Duration::from_millis(100), count, during);
        (p.sent, p.received)
    }

    /// Pings `to` from pod `from` `count` times, every `interval` (root may go below 0.2 s),
    /// while `during` runs (it starts after 0.5 s): what was sent, received and the longest
    /// round trip.
    ///
    /// # Panics
    /// When ping cannot run or prints no summary.
    pub fn ping_probe(
        &mut self,
        from: (usize, usize),
        to: impl Into<IpAddr>,
        interval: Duration,
        count: u32,
        during: impl FnOnce(&mut Lab),
    ) -> PingStats {
        let ns = self.hosts[from.0].pods[from.1].ns.name().to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, "ping", "-n", "-q", "-W", "1", "-i"])
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg("-c")
            .arg(count.to_string())
            .arg(to.into().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let child = crate::cleanup::spawn(&mut cmd).expect("ping");
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(500));
        during(self);
        let out = child.wait_with_output().expect("ping");
        crate::cleanup::forget_process(pid);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let stats = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary: {text}"));
        let nums: Vec<u32> = stats
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect();
        // `rtt min/avg/max/mdev = 0.041/0.062/0.170/0.020 ms` (absent when nothing came back).
        let max_ms = text
            .lines()
            .find_map(|l| l.split_once(" = "))
            .and_then(|(_, v)| v.split('/').nth(2))
            .and_then(|v| v.parse().ok());
        PingStats {
            sent: nums[0],
            received: nums[1],
            max_ms,
        }
    }

    /// Every pod's address with its (host, pod) position.
    pub fn all_pods(&self) -> Vec<((usize, usize), Ipv4Addr)> {
        self.hosts
            .iter()
            .enumerate()
            .flat_map(|(h, host)| {
                host.pods
                    .iter()
                    .enumerate()
                    .map(move |(p, pod)| ((h, p), pod.ip))
            })
            .collect()
    }

    /// `GET path` on 127.0.0.1:`port` inside host `h` (flanneld's `--healthz-port`): the status line
    /// and the body.
    ///
    /// # Panics
    /// When the request fails.
    pub fn http_get(&self, h: usize, port: u16, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let ns = self.hosts[h].ns.name().to_string();
        let path = path.to_string();
        in_netns(Some(&ns), move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            // Sent in several writes on purpose (as `write!` does): the server must read the whole head.
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .expect("request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("response");
            let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
            (
                head.lines().next().unwrap_or_default().to_string(),
                body.to_string(),
            )
        })
    }

    /// The value of the Prometheus sample `name` (exact name with labels) in host `h`'s `/metrics`.
    pub fn metric(&self, h: usize, port: u16, name: &str) -> Option<f64> {
        let text = self.http_get(h, port, "/metrics").1;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Pings every pod from every pod (retrying each pair for up to `within`); returns the failures.
    pub fn ping_all(&self, within: Duration) -> Vec<String> {
        let pods = self.all_pods();
        let mut failures = Vec::new();
        for (from, _) in &pods {
            for (to_pos, to) in &pods {
                if from == to_pos {
                    continue;
                }
                let deadline = Instant::now() + within;
                let mut ok = self.ping(*from, *to, Duration::from_secs(1));
                while !ok && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                    ok = self.ping(*from, *to, Duration::from_secs(1));
                }
                if !ok {
                    failures.push(format!("pod {from:?} -> {to}"));
                }
            }
        }
        failures
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test shows what every flanneld said: CI keeps only the test output. Write
            // errors are ignored (a closed stderr must not turn this into a second panic, which
            // would abort before the cleanup below).
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            for h in &self.hosts {
                let log = h.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let _ = writeln!(
                    err,
                    "---- flanneld log of {} (last {} lines) ----",
                    h.ns.name(),
                    tail.len()
                );
                for l in tail.iter().rev() {
                    let _ = writeln!(err, "{l}");
                }
            }
        }
        for h in &mut self.hosts {
            if let Some(mut c) = h.flanneld.take() {
                crate::cleanup::stop_child(&mut c, Duration::from_millis(50));
            }
            // What flanneld started in the host and left running (charon, should flanneld have
            // been killed): processes of the lab's own namespace, ended by PID.
            if let Ok(pids) = h.ns.pids() {
                for pid in pids {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
        if let Some(e) = &mut self.etcd {
            e.stop();
        }
        crate::cleanup::forget_dir(self.dir.path());
        // Pods, hosts and the switch namespaces are removed by their own guards (fields drop after
        // this), which also deletes every link inside them.
    }
}

/// `ip route` output without the `nhid N` of routes through next-hop objects.
pub fn without_nhid(text: &str) -> String {
    text.lines()
        .map(|l| {
            let mut words = l.split(' ').peekable();
            let mut out: Vec<&str> = Vec::new();
            while let Some(w) = words.next() {
                if w == "nhid" {
                    words.next();
                    continue;
                }
                out.push(w);
            }
            out.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts `argv` with `env`, stdout and stderr appended to `log`.
fn spawn_logged(argv: &[String], env: Vec<(String, String)>, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    crate::cleanup::spawn(&mut cmd).expect("spawn flanneld")
}
