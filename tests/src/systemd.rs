//! A real systemd service manager for the lab: Debian's `systemd --user`, run by the harness.
//!
//! A user manager refuses to start unless the machine was booted with systemd (it looks for
//! `/run/systemd/system/`). So it runs in a mount namespace of its own (`unshare -m`) where a tmpfs
//! over `/run/systemd` holds that directory: the machine's `/run/systemd` is untouched, and the rest
//! of the filesystem (`/run/netns`, the lab's directories) is shared. Its units live in a temporary
//! `XDG_CONFIG_HOME`, its sockets in a temporary `XDG_RUNTIME_DIR`; it starts an empty target, not
//! the user's default units. `systemctl --user` reaches it through `nsenter` into that namespace.
//! Dropping it stops its units and then the manager, by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `systemd --user` with its own unit directory.
#[derive(Debug)]
pub struct UserManager {
    dir: tempfile::TempDir,
    child: Option<Child>,
    units: Vec<String>,
}

impl UserManager {
    /// Starts a user manager; `Err` with the reason when it does not come up within 10 s.
    pub fn start() -> Result<UserManager, String> {
        let dir =
            crate::cleanup::create_dir(|| tempfile::Builder::new().prefix("flt-systemd").tempdir())
                .map_err(|e| format!("temporary directory: {e}"))?;
        let runtime = dir.path().join("run");
        let units = dir.path().join("config/systemd/user");
        std::fs::create_dir_all(&runtime).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&units).map_err(|e| e.to_string())?;
        std::fs::write(
            units.join("flt-lab.target"),
            "[Unit]\nDescription=flannel lab (nothing by default)\n",
        )
        .map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("manager.log")).map_err(|e| e.to_string())?;
        let script = "mkdir -p /run/systemd && mount -t tmpfs flt-systemd /run/systemd && \
                      mkdir /run/systemd/system && exec /lib/systemd/systemd --user --unit=flt-lab.target";
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", script])
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("SYSTEMD_LOG_TARGET", "console")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = crate::cleanup::spawn(&mut cmd).map_err(|e| format!("unshare: {e}"))?;
        let mut mgr = UserManager {
            dir,
            child: Some(child),
            units: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // "offline" is what systemctl says when it cannot reach the manager at all.
            let up = runtime.join("systemd/private").exists()
                && mgr.systemctl(&["is-system-running"]).is_ok_and(|o| {
                    let state = String::from_utf8_lossy(&o.stdout);
                    !state.trim().is_empty() && state.trim() != "offline"
                });
            if up {
                return Ok(mgr);
            }
            if let Some(Ok(Some(status))) = mgr.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "systemd --user exited ({status}): {}",
                    std::fs::read_to_string(mgr.dir.path().join("manager.log")).unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                return Err("systemd --user did not come up in 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The manager's PID.
    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Runs `systemctl --user ARGS` against this manager.
    pub fn systemctl(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("nsenter")
            .args([
                "-t",
                &self.pid().to_string(),
                "-m",
                // Entering a mount namespace puts a process at that namespace's root; the
                // manager's own root (not the same one when the tests run in a chroot) is where
                // XDG_RUNTIME_DIR's path leads.
                "-r",
                "--",
                "systemctl",
                "--user",
            ])
            .args(args)
            .env("XDG_RUNTIME_DIR", self.dir.path().join("run"))
            .stdin(Stdio::null())
            .output()
    }

    /// Runs `systemctl --user ARGS` and panics with its output when it fails.
    ///
    /// # Panics
    /// When systemctl fails.
    pub fn must(&self, args: &[&str]) -> String {
        let out = self.systemctl(args).expect("systemctl");
        assert!(
            out.status.success(),
            "systemctl --user {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes the unit `name` (e.g. `flt-flanneld-0.service`) and reloads the manager.
    ///
    /// # Panics
    /// When writing or reloading fails.
    pub fn add_unit(&mut self, name: &str, text: &str) {
        let path = self.unit_dir().join(name);
        std::fs::write(&path, text).expect("write unit");
        self.must(&["daemon-reload"]);
        if !self.units.iter().any(|u| u == name) {
            self.units.push(name.to_string());
        }
    }

    fn unit_dir(&self) -> PathBuf {
        self.dir.path().join("config/systemd/user")
    }

    /// One property of a unit (`systemctl show -p PROP --value`).
    ///
    /// # Panics
    /// When systemctl fails.
    pub fn property(&self, unit: &str, prop: &str) -> String {
        self.must(&["show", "-p", prop, "--value", unit])
            .trim()
            .to_string()
    }

    /// The manager's directory (unit files, sockets, its log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        for unit in std::mem::take(&mut self.units) {
            let _ = self.systemctl(&["stop", &unit]);
        }
        if let Some(mut child) = self.child.take() {
            crate::cleanup::stop_child(&mut child, Duration::from_secs(10));
        }
        crate::cleanup::forget_dir(self.dir.path());
    }
}
