//! Running one of the operator's commands: `sh -c <command>` with the lease's values in its
//! environment, data on stdin, its stdout and stderr together as one output (as Go's
//! `CombinedOutput`), and limits Go's backend does not have: a timeout after which the command's whole
//! process group is killed, and a cap on the output kept.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long a command may run before it is killed (with every process of its process group).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The most output (stdout and stderr) kept of a command; the rest is read and dropped.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// How long the output is still read after the command exited: a child it left running in the
/// background may hold the output open; it is not waited for.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// `sh` could not be started or waited for.
    #[error("cannot run `{command}` with sh: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command exited with a failure.
    #[error("`{command}` failed ({status}); output: {output}")]
    Failed {
        /// The command.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its output, trimmed.
        output: String,
    },
    /// The command ran longer than allowed and was killed.
    #[error(
        "`{command}` did not finish within {timeout:?} and was killed with its process group; output so far: {output}"
    )]
    TimedOut {
        /// The command.
        command: String,
        /// The limit.
        timeout: Duration,
        /// Its output until then, trimmed.
        output: String,
    },
}

impl CommandError {
    /// A short word for metrics: `failed` or `timed_out` (`failed` for a spawn error too).
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::TimedOut { .. } => "timed_out",
            CommandError::Spawn { .. } | CommandError::Failed { .. } => "failed",
        }
    }
}

/// Runs `command` through `sh -c` with `env` added to flanneld's environment and `stdin` followed by
/// a newline on its standard input (as upstream writes it), and returns its output (stdout and stderr
/// interleaved, trimmed, at most [`MAX_OUTPUT`] bytes kept).
///
/// The command runs in a process group of its own; the whole group is killed after `timeout`, and
/// when this future is dropped before the command ended (flanneld stopping). What a command that
/// ended left running in the background is left alone.
///
/// # Errors
/// [`CommandError`]: it could not start, it failed, or it timed out.
pub async fn run_command(
    command: &str,
    env: &[(&str, String)],
    stdin: &str,
    timeout: Duration,
) -> Result<String, CommandError> {
    let spawn_err = |source| CommandError::Spawn {
        command: command.to_string(),
        source,
    };
    let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
    let mut child = {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::from(writer.try_clone().map_err(spawn_err)?))
            .stderr(Stdio::from(writer))
            .process_group(0)
            .kill_on_drop(true);
        cmd.spawn().map_err(spawn_err)?
        // `cmd` goes here, and with it this process's copies of the output's write end: the read
        // end sees its end when the command (and whatever it started) closed theirs.
    };
    // Until the command's status is in, dropping this future (a shutdown) ends its whole group.
    let mut group = GroupGuard(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    );
    // Written beside the wait, so a command that reads nothing (or little) cannot block us; a
    // command that exits without reading makes this fail, which is fine.
    let input = child.stdin.take().map(|mut pipe| {
        let data = format!("{stdin}\n");
        tokio::spawn(async move {
            let _ = pipe.write_all(data.as_bytes()).await;
        })
    });
    let mut out =
        tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into()).map_err(spawn_err)?;

    let deadline = Instant::now() + timeout;
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut status: Option<ExitStatus> = None;
    let mut output_closed = false;
    let mut stop_reading = deadline;
    while status.is_none() || !output_closed {
        tokio::select! {
            s = child.wait(), if status.is_none() => {
                status = Some(s.map_err(spawn_err)?);
                // Done: what it left running in the background is the command's business.
                group.0 = None;
                stop_reading = (Instant::now() + OUTPUT_GRACE).min(deadline);
            }
            n = out.read(&mut buf), if !output_closed => match n {
                Ok(0) | Err(_) => output_closed = true,
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            },
            () = tokio::time::sleep_until(stop_reading) => {
                if status.is_some() {
                    break;
                }
                group.kill();
                let _ = child.wait().await;
                if let Some(input) = input {
                    input.abort();
                }
                return Err(CommandError::TimedOut {
                    command: command.to_string(),
                    timeout,
                    output: trimmed(&kept),
                });
            }
        }
    }
    if let Some(input) = input {
        input.abort();
    }
    // The loop ends only once the status is in.
    let status = status.ok_or_else(|| spawn_err(std::io::Error::other("no exit status")))?;
    let output = trimmed(&kept);
    if status.success() {
        Ok(output)
    } else {
        Err(CommandError::Failed {
            command: command.to_string(),
            status,
            output,
        })
    }
}

/// The process group a running command's shell leads (processes it started), killed when this is
/// dropped while it is still set.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn trimmed(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env() -> Vec<(&'static str, String)> {
        vec![
            ("SUBNET", "10.5.3.0/24".to_string()),
            ("PUBLIC_IP", "172.20.0.13".to_string()),
        ]
    }

    #[tokio::test]
    async fn the_environment_stdin_and_both_outputs_reach_the_command() {
        let out = run_command(
            r#"read DATA; echo "$SUBNET via $PUBLIC_IP: $DATA"; echo warn >&2"#,
            &env(),
            "aa:bb",
            COMMAND_TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!(out, "10.5.3.0/24 via 172.20.0.13: aa:bb\nwarn");
    }

    #[tokio::test]
    async fn shell_syntax_works_and_values_are_not_code() {
        // Upstream's documented commands use quotes, `export`, `$(...)` and `&&`.
        let out = run_command(
            r#"export IP=$(echo "$SUBNET" | cut -d/ -f1) && echo "$IP""#,
            &env(),
            "",
            COMMAND_TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!(out, "10.5.3.0");
        // A value is data: a peer's text on stdin is never run.
        let out = run_command(
            r#"read DATA; echo "$DATA""#,
            &[],
            "$(echo pwned); exit 3",
            COMMAND_TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!(out, "$(echo pwned); exit 3");
    }

    #[tokio::test]
    async fn a_failure_keeps_its_status_and_output() {
        let e = run_command("echo no route >&2; exit 2", &[], "", COMMAND_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "failed");
        let text = e.to_string();
        assert!(
            text.contains("exit status: 2") && text.contains("no route"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_command_that_hangs_is_killed_with_its_children() {
        let dir = std::env::temp_dir().join(format!("flannel-ext-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("child.pid");
        let cmd = format!(
            "sleep 300 & echo $! > {}; echo started; wait",
            pidfile.display()
        );
        let e = run_command(&cmd, &[], "", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "timed_out");
        assert!(e.to_string().contains("started"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The backgrounded sleep went with the group.
        assert!(gone(pid), "the command's child {pid} still runs");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whether process `pid` is gone (or a zombie), given up to 2 s.
    fn gone(pid: i32) -> bool {
        (0..100).any(|_| {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
            if alive {
                std::thread::sleep(Duration::from_millis(20));
            }
            !alive
        })
    }

    #[tokio::test]
    async fn a_command_cancelled_by_a_shutdown_goes_with_its_children() {
        let dir = std::env::temp_dir().join(format!("flannel-ext-cancel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("child.pid");
        let cmd = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let mut run = Box::pin(run_command(&cmd, &[], "", COMMAND_TIMEOUT));
        // Let it start its child, then drop it, as a shutdown does.
        let started = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                tokio::select! {
                    _ = &mut run => panic!("the command ended on its own"),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {
                        if std::fs::read_to_string(&pidfile).is_ok_and(|p| !p.trim().is_empty()) {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        assert!(started.is_ok(), "the command never started its child");
        drop(run);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid), "the cancelled command's child {pid} still runs");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_background_child_holding_the_output_is_not_waited_for() {
        // `sleep` inherits the output pipe and keeps it open for longer than the timeout: waiting
        // for the output's end would time the command out.
        let out = run_command(
            "sleep 30 & echo $!; echo done",
            &[],
            "",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let (pid, done) = out.split_once('\n').unwrap();
        assert_eq!(done, "done");
        // Ours to end: the command started it and left it.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid.parse().unwrap()), Signal::SIGKILL);
    }

    #[tokio::test]
    async fn output_is_capped() {
        let out = run_command(
            "head -c 1000000 /dev/zero | tr '\\0' x",
            &[],
            "",
            COMMAND_TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!(out.len(), MAX_OUTPUT);
    }

    #[tokio::test]
    async fn a_command_that_ignores_stdin_is_fine() {
        let big = "y".repeat(1 << 20);
        let out = run_command("echo ignored", &[], &big, COMMAND_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(out, "ignored");
    }
}
