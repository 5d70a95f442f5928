//! A virtual machine for tests that need a kernel this machine may not have: Debian's kernel (it
//! has WireGuard) under qemu, prepared by `scripts/test-vm prepare`. The VM sees the host's files
//! (its root is the host's root over 9p, so it runs the workspace's binaries where they were
//! built, also from a checkout under `/tmp`) but has its own kernel, its own `/run` (temporary
//! files go to `/run/tmp`: `TMPDIR`), and no network device: whatever a job does to networks stays
//! in the VM.
//!
//! ```no_run
//! # use std::time::Duration;
//! if let Some(vm) = flannel_tests::vm::Vm::for_test("my_test") {
//!     let run = vm.run(&flannel_tests::bin_path("vm-wireguard-lab"), &[], Duration::from_secs(600));
//!     assert_eq!(run.rc, Some(0), "{}", run.out);
//! }
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set inside the VM for the job (`1`).
pub const IN_VM_ENV: &str = "FLANNEL_IN_VM";

/// How many times longer the lab's waits are: 5 inside the test VM (software emulation runs the
/// debug binaries several times slower, and more so on a busy machine), else 1.
pub fn slowdown() -> u32 {
    if std::env::var(IN_VM_ENV).is_ok_and(|v| v == "1") {
        5
    } else {
        1
    }
}

/// The prepared VM (kernel, first stage, module loader).
#[derive(Debug, Clone)]
pub struct Vm {
    dir: PathBuf,
}

/// How a job in the VM ended.
#[derive(Debug)]
pub struct VmRun {
    /// The job's exit code; `None` when it did not finish (the VM crashed or ran out of time).
    pub rc: Option<i32>,
    /// What the job printed (stdout and stderr).
    pub out: String,
    /// The VM's console (kernel messages).
    pub console: String,
    /// How long the VM ran, boot included.
    pub elapsed: Duration,
}

impl VmRun {
    /// The job's output and the end of the console, for an assertion message.
    pub fn report(&self) -> String {
        let console: Vec<&str> = self.console.lines().collect();
        let tail = console[console.len().saturating_sub(30)..].join("\n");
        format!(
            "exit code {:?} after {:.0?}\n---- job output ----\n{}\n---- console (last 30 lines) ----\n{tail}",
            self.rc, self.elapsed, self.out
        )
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Vm {
    /// The VM in `$FLANNEL_TEST_VM_DIR` (default `/var/lib/flannel-test-vm`), when it is prepared
    /// and qemu is installed.
    pub fn find() -> Option<Self> {
        let dir = std::env::var_os("FLANNEL_TEST_VM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/flannel-test-vm"));
        let ready = ["vmlinuz", "initrd.gz", "modprobe", "version"]
            .iter()
            .all(|f| dir.join(f).exists());
        let qemu = Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (ready && qemu).then_some(Self { dir })
    }

    /// The VM for `test`: `None` (with the skip printed) without root or a prepared VM.
    ///
    /// # Panics
    /// When the test cannot run and `FLANNEL_REQUIRE_ROOT_TESTS=1`.
    pub fn for_test(test: &str) -> Option<Self> {
        if !crate::require_root(test) {
            return None;
        }
        match Self::find() {
            Some(vm) => Some(vm),
            None => {
                crate::skip(
                    test,
                    "needs the test VM: run scripts/test-vm prepare (Debian packages qemu-system-x86, kmod, cpio)",
                );
                None
            }
        }
    }

    /// Runs the lab binary `lab` (a binary of this crate that checks step by step and ends by
    /// printing `all checks passed`) in the VM for `test`, and asserts that it passed. Skips (with
    /// the reason printed) where [`Vm::for_test`] does.
    ///
    /// # Panics
    /// When the lab fails, does not finish within 15 minutes, or the VM cannot run.
    pub fn run_lab(test: &str, lab: &str) {
        let Some(vm) = Self::for_test(test) else {
            return;
        };
        let run = vm.run(&crate::bin_path(lab), &[], Duration::from_secs(900));
        println!("{}", run.out);
        assert_eq!(
            run.rc,
            Some(0),
            "{lab} in the VM (kernel {}): {}",
            vm.kernel(),
            run.report()
        );
        assert!(run.out.contains("all checks passed"), "{}", run.report());
    }

    /// The kernel release the VM runs.
    pub fn kernel(&self) -> String {
        std::fs::read_to_string(self.dir.join("version"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Boots the VM, runs `program` with `args` in it as root (with [`IN_VM_ENV`] and
    /// `FLANNEL_REQUIRE_ROOT_TESTS=1` set, in the current directory), and powers it off. The VM is
    /// stopped (by its PID) when it runs longer than `limit`.
    ///
    /// # Panics
    /// When qemu cannot be started or the job directory cannot be made.
    pub fn run(&self, program: &Path, args: &[&str], limit: Duration) -> VmRun {
        // The job directory is on the host's disk, next to the binaries, where the VM writes the
        // job's output.
        let base = std::env::current_exe()
            .ok()
            .and_then(|e| e.ancestors().nth(2).map(|d| d.join("vm-jobs")))
            .unwrap_or_else(|| PathBuf::from("target/vm-jobs"));
        std::fs::create_dir_all(&base).expect("vm-jobs directory");
        let job =
            crate::cleanup::create_dir(|| tempfile::Builder::new().prefix("job").tempdir_in(&base))
                .expect("job directory");
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let mut script = String::new();
        let _ = writeln!(
            script,
            "mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
             mount -t tmpfs run /run\nmkdir /run/tmp\n\
             echo {m} > /proc/sys/kernel/modprobe\nip link set lo up\n\
             # /dev/net/tun appears only once tun is loaded: nothing loads it on demand\n\
             {m} tun\n\
             export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
             TMPDIR=/run/tmp {IN_VM_ENV}=1 FLANNEL_REQUIRE_ROOT_TESTS=1 RUST_BACKTRACE=1\ncd {}",
            quote(&cwd.display().to_string()),
            m = quote(&self.dir.join("modprobe").display().to_string()),
        );
        let mut line = quote(&program.display().to_string());
        for a in args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        let _ = writeln!(script, "{line}");
        std::fs::write(job.path().join("job.sh"), script).expect("job.sh");
        let console = job.path().join("console");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg,thread=multi", "-smp", "2", "-m", "2048"])
            // No network device at all: nothing the job does leaves the VM.
            .args([
                "-nic",
                "none",
                "-display",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(self.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(self.dir.join("initrd.gz"))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet flannel.job={}",
                job.path().display()
            ))
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=passthrough,multidevs=remap",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let started = Instant::now();
        let mut child = crate::cleanup::spawn(&mut cmd).expect("start qemu-system-x86_64");
        let deadline = started + limit;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let read = |f: &str| std::fs::read_to_string(job.path().join(f)).unwrap_or_default();
        VmRun {
            rc: read("rc").trim().parse().ok(),
            out: read("out"),
            console: std::fs::read_to_string(&console).unwrap_or_default(),
            elapsed: started.elapsed(),
        }
    }
}
