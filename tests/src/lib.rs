//! Test harness shared by the integration tests, the demo and the benchmarks: a real etcd server on
//! 127.0.0.1 with ephemeral ports ([`etcd::EtcdServer`]), a stand-in Kubernetes API server
//! ([`kubeapi::ApiServer`]), network namespaces with drop guards ([`netns::Netns`]), the multi-host
//! lab ([`lab::Lab`]), root detection ([`require_root`]), the paths of the built binaries
//! ([`bin_path`]), child processes with a guard ([`Proc`]), the benchmarks' helpers ([`bench`](mod@bench)), and
//! the record that lets every way out clean up ([`cleanup`]).

pub mod bench;
pub mod cleanup;
pub mod etcd;
pub mod kubeapi;
pub mod lab;
pub mod netns;
pub mod systemd;
pub mod vm;

use std::path::PathBuf;

/// Whether `FLANNEL_REQUIRE_ROOT_TESTS=1` is set (CI): then a test that would skip fails instead.
pub fn skips_forbidden() -> bool {
    std::env::var("FLANNEL_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1")
}

/// Skips (returns false, printing why) or, under `FLANNEL_REQUIRE_ROOT_TESTS=1`, fails the test.
///
/// # Panics
/// When skipping is forbidden.
pub fn skip(test: &str, reason: &str) -> bool {
    assert!(
        !skips_forbidden(),
        "{test}: cannot run ({reason}) and FLANNEL_REQUIRE_ROOT_TESTS=1 forbids skipping"
    );
    eprintln!("skipped: {test}: {reason}");
    false
}

/// True when running as root; otherwise skips as [`skip`] does.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(test, "needs root (CAP_NET_ADMIN) for network namespaces")
}

/// True when the `etcd` binary is installed; otherwise skips.
pub fn require_etcd(test: &str) -> bool {
    if etcd::etcd_binary().is_some() {
        return true;
    }
    skip(test, "needs the etcd binary (Debian package etcd-server)")
}

/// The path of a binary built by this workspace (`flanneld`, `flanneld-peerlog`), next to the test
/// executable's target directory.
///
/// # Panics
/// When the binary has not been built; the message says how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Test binaries live in target/<profile>/deps, other binaries in target/<profile>.
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect();
    let found = candidates.iter().find(|p| p.exists()).cloned();
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not built next to {}; run `cargo build --workspace` (the README's test command does)",
            exe.display()
        )
    })
}

/// Runs the demo (`flannel-demo`) with `args` to its end: its exit code and everything it printed
/// (stdout, then stderr).
///
/// # Panics
/// When the demo cannot be started.
pub fn run_demo(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin_path("flannel-demo"))
        .args(args)
        .output()
        .expect("run flannel-demo");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Polls `f` (every 50 ms) until it holds or `within` passes; its last answer.
pub fn until(within: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    f()
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The repository's root directory (scripts, deploy files).
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// A child process a test started (recorded in [`cleanup`]), stopped by PID when dropped. Its
/// stderr should be piped: [`stop`](Self::stop) returns it.
#[derive(Debug)]
pub struct Proc(pub std::process::Child);

impl Proc {
    /// Spawns `cmd`.
    ///
    /// # Panics
    /// When it cannot be started.
    pub fn spawn(cmd: &mut std::process::Command) -> Self {
        let child = cleanup::spawn(cmd).unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Self(child)
    }

    /// Stops it with SIGTERM (SIGKILL after 10 s) and returns its exit code and stderr.
    pub fn stop(mut self) -> (Option<i32>, String) {
        let status = cleanup::stop_child(&mut self.0, std::time::Duration::from_secs(10));
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status.and_then(|s| s.code()), err)
    }

    /// Waits up to `within` for it to exit by itself, then as [`stop`](Self::stop).
    pub fn stop_when_exited(mut self, within: std::time::Duration) -> (Option<i32>, String) {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.stop()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        cleanup::stop_child(&mut self.0, std::time::Duration::ZERO);
    }
}
