//! Every way out cleans up: a process-wide record of what the harness started and made (child
//! processes, network namespaces, directories), so that SIGINT, SIGTERM, SIGHUP and a panic in a
//! program that cannot unwind cleanly (the demo, and any release build: its panics abort) still
//! stop every process and delete every namespace.
//!
//! The normal path is the drop guards ([`crate::netns::Netns`], [`crate::lab::Lab`],
//! [`crate::etcd::EtcdServer`]); they record what they make here and forget it when they remove it.
//! [`clean_up_on_signals`] (installed by the first namespace or etcd the harness makes) and
//! [`clean_up_and_exit`] handle the rest.
//!
//! Processes are ended only by PID and only while they are still our children: before a signal is
//! sent, `waitpid(pid, WNOHANG)` must not answer `ECHILD`, so a PID that was reaped and reused by a
//! stranger is never signalled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Made {
    pids: Vec<u32>,
    namespaces: Vec<String>,
    dirs: Vec<PathBuf>,
}

static MADE: Mutex<Made> = Mutex::new(Made {
    pids: Vec::new(),
    namespaces: Vec::new(),
    dirs: Vec::new(),
});

fn made() -> MutexGuard<'static, Made> {
    // A panic while the record was held leaves it consistent (plain pushes and removals).
    MADE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a child process (call right after spawning it; prefer [`spawn`], which cannot race a
/// signal's cleanup).
pub fn track_process(pid: u32) {
    made().pids.push(pid);
}

/// Spawns `cmd` and records the child in one step, under the record's lock: a signal's cleanup
/// either sees the child or runs (and exits) before the child exists, never in between.
pub fn spawn(cmd: &mut std::process::Command) -> std::io::Result<Child> {
    let mut m = made();
    let child = cmd.spawn()?;
    m.pids.push(child.id());
    Ok(child)
}

/// Creates a namespace with `create` and records it in one step (see [`spawn`]).
pub fn create_netns<E>(
    name: &str,
    create: impl FnOnce() -> Result<String, E>,
) -> Result<String, E> {
    let mut m = made();
    let out = create()?;
    m.namespaces.push(name.to_string());
    Ok(out)
}

/// Creates a temporary directory with `create` and records it in one step (see [`spawn`]).
pub fn create_dir(
    create: impl FnOnce() -> std::io::Result<tempfile::TempDir>,
) -> std::io::Result<tempfile::TempDir> {
    let mut m = made();
    let dir = create()?;
    m.dirs.push(dir.path().to_path_buf());
    Ok(dir)
}

/// Forgets a namespace that was deleted.
pub fn forget_netns(name: &str) {
    made().namespaces.retain(|n| n != name);
}

/// Forgets a directory (its owner removes it).
pub fn forget_dir(dir: &Path) {
    made().dirs.retain(|d| d != dir);
}

/// Whether `pid` is still a child of ours that has not been reaped (running or a zombie). Reaps it
/// when it is a zombie, so the answer is then false.
fn still_ours(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a PID; it only inspects (or reaps) our own children.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    r == 0
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a PID that `still_ours` just confirmed is our unreaped child.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Stops a child the harness started: SIGTERM, up to `grace` for it to exit, then SIGKILL; reaps it
/// and forgets its PID. `grace` zero kills at once.
pub fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let pid = child.id();
    let deadline = Instant::now() + grace;
    if !grace.is_zero() {
        {
            let _held = made();
            if let Ok(Some(s)) = child.try_wait() {
                drop(_held);
                forget_process(pid);
                return Some(s);
            }
            signal(pid, libc::SIGTERM);
        }
        while Instant::now() < deadline {
            {
                let _held = made();
                if let Ok(Some(s)) = child.try_wait() {
                    drop(_held);
                    forget_process(pid);
                    return Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = {
        let _held = made();
        let _ = child.kill();
        child.wait().ok()
    };
    forget_process(pid);
    status
}

/// Forgets a child that was reaped by its owner.
pub fn forget_process(pid: u32) {
    made().pids.retain(|p| *p != pid);
}

fn clean_up(m: &mut Made) {
    let pids: Vec<u32> = m.pids.drain(..).filter(|p| still_ours(*p)).collect();
    for p in &pids {
        signal(*p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut left = pids;
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|p| still_ours(*p));
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in left.into_iter().filter(|p| still_ours(*p)) {
        signal(p, libc::SIGKILL);
        let mut status = 0;
        // SAFETY: reaping our own child, which was just killed.
        unsafe { libc::waitpid(p as i32, &mut status, 0) };
    }
    // Newest first: pods and hosts before the switch they hang off.
    for ns in m.namespaces.drain(..).rev() {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .output();
    }
    for d in m.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Stops every process the harness started, deletes every namespace and directory it made, and exits
/// the process with `code`. The record stays locked until the exit, so no guard in another thread
/// can touch a reaped PID meanwhile. Use it where unwinding cannot be trusted (a panic hook, a signal).
pub fn clean_up_and_exit(code: i32) -> ! {
    let mut m = made();
    clean_up(&mut m);
    std::process::exit(code)
}

/// Installs (once per process) a thread that turns SIGINT, SIGTERM and SIGHUP into
/// [`clean_up_and_exit`] with the exit code 128 + signal, after one line on stderr. In a build whose
/// panics abort (the release profile, which the benchmarks use) no drop guard runs after a panic,
/// so a panic hook cleans up there too; where panics unwind (tests) the guards do it, and one
/// failing test must not end the others.
pub fn clean_up_on_signals() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if cfg!(panic = "abort") {
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                report(info);
                let _ = writeln!(
                    std::io::stderr(),
                    "panic: stopping every process and deleting every namespace the lab made"
                );
                clean_up_and_exit(101);
            }));
        }
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "warning: cannot watch for signals ({e}); an interrupted run may leave namespaces behind"
                );
                return;
            }
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = writeln!(
                    std::io::stderr(),
                    "\nsignal {sig}: stopping every process and deleting every namespace the lab made"
                );
                clean_up_and_exit(128 + sig);
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stranger_pid_is_not_ours() {
        // PID 1 is never our child: it must not be signalled.
        assert!(!still_ours(1));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        track_process(child.id());
        assert!(still_ours(child.id()));
        let status = stop_child(&mut child, Duration::from_millis(500)).expect("reaped");
        assert!(!status.success(), "ended by a signal");
        assert!(!made().pids.contains(&child.id()));
        assert!(!still_ours(child.id()));
    }
}
