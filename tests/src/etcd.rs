//! A real etcd server for tests: Debian's `etcd`, on 127.0.0.1 with free ports and a temporary data
//! directory, stopped (by PID) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// The etcd binary, if installed.
pub fn etcd_binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// TLS material for a server that requires client certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate and key.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes a throwaway CA and a server and client certificate for 127.0.0.1 with `openssl`.
    ///
    /// # Panics
    /// When `openssl` fails.
    pub fn generate(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run openssl (Debian package openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=flannel-test-ca",
        ]);
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=flannel-test-{name}"),
            ]);
            std::fs::write(
                dir.join(format!("{name}.ext")),
                format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"),
            )
            .expect("write ext");
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        Self {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        }
    }
}

/// A running etcd.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    host: String,
    tls: Option<TlsFiles>,
    log: PathBuf,
    netns: Option<String>,
    name: String,
    /// `--initial-cluster` (`name=peer-url,...`); this member alone when `None`.
    initial_cluster: Option<String>,
}

impl EtcdServer {
    /// Starts a plaintext etcd on 127.0.0.1.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1", None)
    }

    /// Starts etcd on `host` (an address of the current network namespace), with TLS and client
    /// certificates when `tls` is given.
    ///
    /// # Panics
    /// When etcd cannot be started or does not become healthy within 20 s.
    pub fn start_on(host: &str, tls: Option<TlsFiles>) -> Self {
        Self::start_in(None, host, 0, tls)
    }

    /// Starts etcd inside the named network namespace (when given) on `host:port` (0: a free port).
    ///
    /// # Panics
    /// As [`start_on`](Self::start_on).
    pub fn start_in(netns: Option<&str>, host: &str, port: u16, tls: Option<TlsFiles>) -> Self {
        let dir = crate::cleanup::create_dir(|| {
            tempfile::Builder::new().prefix("flannel-etcd-").tempdir()
        })
        .expect("tempdir");
        let mut s = Self {
            child: None,
            log: dir.path().join("etcd.log"),
            dir,
            client_port: if port == 0 { free_port() } else { port },
            peer_port: if port == 0 { free_port() } else { port + 1 },
            host: host.to_string(),
            tls,
            netns: netns.map(str::to_string),
            name: "flannel-test".into(),
            initial_cluster: None,
        };
        s.spawn_moving(port == 0);
        s
    }

    /// Starts a cluster of `n` plaintext members on 127.0.0.1 and waits until all answer.
    ///
    /// # Panics
    /// As [`start_on`](Self::start_on).
    pub fn cluster(n: usize) -> Vec<Self> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Self> = ports
            .into_iter()
            .enumerate()
            .map(|(i, (client_port, peer_port))| {
                let dir = crate::cleanup::create_dir(|| {
                    tempfile::Builder::new().prefix("flannel-etcd-").tempdir()
                })
                .expect("tempdir");
                Self {
                    child: None,
                    log: dir.path().join("etcd.log"),
                    dir,
                    client_port,
                    peer_port,
                    host: "127.0.0.1".into(),
                    tls: None,
                    netns: None,
                    name: format!("m{i}"),
                    initial_cluster: Some(initial.clone()),
                }
            })
            .collect();
        // All members must run before any can elect a leader.
        for m in &mut members {
            m.spawn_process();
        }
        for m in &mut members {
            m.wait_healthy();
        }
        members
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    /// The TLS files, for a TLS server.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn spawn(&mut self) {
        self.spawn_moving(false);
    }

    /// Starts etcd and waits until it answers. With `may_move` (ports chosen by [`free_port`]), a
    /// port another process took between the choice and etcd's bind is replaced by a new free one
    /// (up to 3 tries): that race is not what any test is about.
    fn spawn_moving(&mut self, may_move: bool) {
        for _ in 0..3 {
            self.spawn_process();
            match self.until_healthy() {
                Ok(()) => return,
                Err(log) if may_move && log.contains("address already in use") => {
                    self.child = None;
                    self.client_port = free_port();
                    self.peer_port = free_port();
                    let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
                }
                Err(log) => panic!("{log}"),
            }
        }
        panic!(
            "etcd found its ports taken three times: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn spawn_process(&mut self) {
        let bin = etcd_binary().expect("etcd binary (Debian package etcd-server)");
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(self.url())
            .arg("--advertise-client-urls")
            .arg(self.url())
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(
                self.initial_cluster
                    .clone()
                    .unwrap_or_else(|| format!("{}={peer}", self.name)),
            )
            .arg("--log-level")
            .arg("warn");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        crate::cleanup::clean_up_on_signals();
        let child = crate::cleanup::spawn(&mut cmd).expect("spawn etcd");
        self.child = Some(child);
    }

    fn wait_healthy(&mut self) {
        if let Err(e) = self.until_healthy() {
            panic!("{e}");
        }
    }

    /// Waits up to 20 s until etcd answers; the reason (with its log) when it exits or does not.
    fn until_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "etcd exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ));
            }
            let addr = (self.host.clone(), self.client_port);
            let reachable = crate::netns::in_netns(self.netns.as_deref(), move || {
                std::net::TcpStream::connect((addr.0.as_str(), addr.1)).is_ok()
            });
            if reachable {
                // The port is open; give the member a moment to elect itself leader.
                std::thread::sleep(Duration::from_millis(300));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "etcd did not start within 20 s: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        ))
    }

    /// Stops the server (SIGKILL to our child, by PID) and keeps its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::cleanup::stop_child(&mut c, Duration::ZERO);
        }
    }

    /// Starts the stopped server again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        crate::cleanup::forget_dir(self.dir.path());
    }
}
