//! Named network namespaces with drop guards, and running code inside one.

use std::process::Command;

/// The prefix of every namespace and link the tests make, so they can be told apart and cleaned up.
pub const PREFIX: &str = "flt";

/// Runs `ip` with `args`, returning stdout or an error with stderr.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on a thread inside the named namespace (or on the current thread when `None`).
///
/// # Panics
/// When the namespace cannot be entered or `f` panics.
pub fn in_netns<T: Send + 'static>(
    name: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let Some(name) = name else { return f() };
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A named network namespace, deleted (by name) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `flt<pid>-<tag>` (unique per test process).
    ///
    /// # Panics
    /// When `ip netns add` fails.
    pub fn new(tag: &str) -> Self {
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        crate::cleanup::clean_up_on_signals();
        crate::cleanup::create_netns(&name, || ip(&["netns", "add", &name])).expect("ip netns add");
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, cmd: &[&str]) -> Result<String, String> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// The processes in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<u32>, String> {
        Ok(ip(&["netns", "pids", &self.name])?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Runs `f` on a new thread that has entered the namespace, with a current-thread tokio runtime.
    ///
    /// # Panics
    /// When the namespace cannot be entered, or when `f` panics.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        in_netns(Some(&self.name), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        crate::cleanup::forget_netns(&self.name);
    }
}
