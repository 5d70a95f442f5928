//! strongSwan's IKE daemon, charon: started by flanneld as upstream's is, and told over VICI (its
//! control socket) the pre-shared key and one connection per peer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use flannel_core::BackendError;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::peers::{REQID, Tunnel};

/// Where charon listens for VICI, as upstream's `unix:///var/run/charon.vici` (charon's default).
pub const VICI_SOCKET: &str = "/var/run/charon.vici";

/// The places upstream looks for charon, in its order (`findExecPath`).
pub const CHARON_PATHS: [&str; 5] = [
    "/usr/lib/strongswan/charon", // Alpine, Arch, upstream's container image
    "/usr/lib/ipsec/charon",      // Debian, Ubuntu
    "/usr/libexec/strongswan/charon", // CentOS, RHEL
    "/usr/libexec/ipsec/charon",  // openSUSE, SLES
    "charon",                     // $PATH
];

/// The IKE proposal of upstream's connections.
pub const IKE_PROPOSAL: &str = "aes256-sha256-modp4096";

/// How long a VICI request may take.
const VICI_TIMEOUT: Duration = Duration::from_secs(10);

/// How long charon may take to open its control socket after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn error(message: String) -> BackendError {
    BackendError::Other(message)
}

/// The first charon of [`CHARON_PATHS`] that exists as an executable file.
pub fn find_charon() -> Result<PathBuf, BackendError> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    for c in CHARON_PATHS {
        if c.contains('/') {
            if executable(Path::new(c)) {
                return Ok(PathBuf::from(c));
            }
        } else if let Some(p) = path_dirs.iter().map(|d| d.join(c)).find(|p| executable(p)) {
            return Ok(p);
        }
    }
    Err(error(format!(
        "the ipsec backend needs strongSwan's IKE daemon charon, found at none of {}: install it \
         (Debian/Ubuntu: strongswan-charon, strongswan-swanctl and libstrongswan-standard-plugins) \
         or choose another backend",
        CHARON_PATHS.join(", ")
    )))
}

/// charon's answer to a command that changes something.
#[derive(Debug, Deserialize)]
struct Outcome {
    success: bool,
    #[serde(default)]
    errmsg: Option<String>,
}

impl Outcome {
    fn check(self, what: &str) -> Result<(), BackendError> {
        if self.success {
            Ok(())
        } else {
            Err(error(format!(
                "charon refused {what}: {}",
                self.errmsg.as_deref().unwrap_or("no reason given")
            )))
        }
    }
}

/// (No `Debug`: it holds the key.)
#[derive(Serialize)]
struct SharedKey<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    data: &'a str,
    owners: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Auth {
    auth: &'static str,
}

#[derive(Debug, Serialize)]
struct Child {
    local_ts: Vec<String>,
    remote_ts: Vec<String>,
    esp_proposals: Vec<String>,
    start_action: &'static str,
    close_action: &'static str,
    dpd_action: &'static str,
    mode: &'static str,
    reqid: String,
    rekey_time: &'static str,
    policies: bool,
}

#[derive(Debug, Serialize)]
struct Conn {
    local_addrs: Vec<String>,
    remote_addrs: Vec<String>,
    proposals: Vec<String>,
    version: &'static str,
    keyingtries: &'static str,
    encap: bool,
    local: Auth,
    remote: Auth,
    children: BTreeMap<String, Child>,
}

#[derive(Debug, Serialize)]
struct Name<'a> {
    name: &'a str,
}

/// A `terminate` request: the IKE_SAs of one connection, without waiting for the peer's answer
/// (a departed peer may never give one).
#[derive(Debug, Serialize)]
struct Terminate<'a> {
    ike: &'a str,
    force: bool,
}

/// charon's answer to `terminate`.
#[derive(Debug, Deserialize)]
struct Terminated {
    success: bool,
    #[serde(default)]
    matches: u32,
    #[serde(default)]
    errmsg: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Conns {
    #[serde(default)]
    conns: Vec<String>,
}

/// The connection upstream loads for a tunnel (`LoadConnection`): IKEv2 with a pre-shared key
/// between the two public IPs, one CHILD_SA in tunnel mode between the two subnets with request
/// id [`REQID`] and no policies of charon's (flanneld installs them), started at once, retried
/// forever.
fn conn(t: &Tunnel, esp_proposal: &str, encap: bool) -> BTreeMap<String, Conn> {
    let child = Child {
        local_ts: vec![t.local.subnet.to_string()],
        remote_ts: vec![t.remote.subnet.to_string()],
        esp_proposals: vec![esp_proposal.to_string()],
        start_action: "start",
        close_action: "trap",
        dpd_action: "restart",
        mode: "tunnel",
        reqid: REQID.to_string(),
        rekey_time: "1h",
        policies: false,
    };
    let c = Conn {
        local_addrs: vec![t.local.ip.to_string()],
        remote_addrs: vec![t.remote.ip.to_string()],
        proposals: vec![IKE_PROPOSAL.to_string()],
        version: "2",
        keyingtries: "0",
        encap,
        local: Auth { auth: "psk" },
        remote: Auth { auth: "psk" },
        children: BTreeMap::from([(t.child_name(), child)]),
    };
    BTreeMap::from([(t.conn_name(), c)])
}

/// The charon flanneld talks to: its own child, or one that already ran on the host (a charon
/// left from an earlier flanneld, or the host's strongSwan), reached on [`VICI_SOCKET`].
#[derive(Debug)]
pub struct Charon {
    exec: PathBuf,
    socket: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Charon {
    /// A charon to run from `exec`, reached at `socket`. Nothing starts before [`Charon::ensure`].
    pub fn new(exec: PathBuf, socket: PathBuf) -> Self {
        Self {
            exec,
            socket,
            child: None,
        }
    }

    async fn client(&self) -> Result<rsvici::Client, BackendError> {
        match tokio::time::timeout(VICI_TIMEOUT, rsvici::unix::connect(&self.socket)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(error(format!(
                "cannot reach charon at {}: {e}",
                self.socket.display()
            ))),
            Err(_) => Err(error(format!(
                "charon at {} did not answer in {} s",
                self.socket.display(),
                VICI_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn request<T: Serialize, U: serde::de::DeserializeOwned>(
        &self,
        cmd: &str,
        msg: T,
    ) -> Result<U, BackendError> {
        let mut c = self.client().await?;
        match tokio::time::timeout(VICI_TIMEOUT, c.request(cmd, msg)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(error(format!("charon's answer to {cmd}: {e}"))),
            Err(_) => Err(error(format!(
                "charon did not answer {cmd} in {} s",
                VICI_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Whether charon answers on its control socket.
    pub async fn answers(&self) -> bool {
        #[derive(Deserialize)]
        struct Version {
            #[allow(dead_code)]
            daemon: String,
        }
        self.request::<_, Version>("version", ()).await.is_ok()
    }

    /// Makes sure a charon answers: starts one when none does (again when the last one exited)
    /// and waits for its control socket. True when it started one (which then knows nothing of
    /// the key and the connections).
    pub async fn ensure(&mut self) -> Result<bool, BackendError> {
        if self.answers().await {
            return Ok(false);
        }
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(None) => {
                    // Ours, running, not answering (still starting, or hung): give it time below.
                }
                Ok(Some(status)) => {
                    warn!(%status, "charon exited; starting it again");
                    self.child = None;
                }
                Err(e) => return Err(error(format!("cannot check charon: {e}"))),
            }
        }
        if self.child.is_none() {
            let mut cmd = tokio::process::Command::new(&self.exec);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                // Killed, not stopped, when flanneld stops: charon then leaves its SAs in the
                // kernel, and the pods' traffic flows until the next flanneld's charon has
                // negotiated new ones (a stopped charon would delete them first).
                .kill_on_drop(true);
            // SAFETY: prctl is async-signal-safe and touches only the new process.
            unsafe {
                // And when flanneld dies without dropping it (a crash, SIGKILL): the kernel
                // kills charon when the thread that started it (a runtime thread) ends.
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().map_err(|e| {
                error(format!(
                    "cannot start charon ({}): {e}",
                    self.exec.display()
                ))
            })?;
            info!(charon = %self.exec.display(), pid = child.id(), "started charon");
            self.child = Some(child);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.answers().await {
                return Ok(true);
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                // charon refuses to start while another runs; that one may just be opening its
                // socket.
                if self.answers().await {
                    return Ok(true);
                }
                return Err(error(format!(
                    "charon ({}) exited ({status}) without answering on {}: see its messages above",
                    self.exec.display(),
                    self.socket.display()
                )));
            }
            if Instant::now() > deadline {
                // A charon of ours that hangs is ended, so that the next pass starts a new one.
                if let Some(mut child) = self.child.take() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                return Err(error(format!(
                    "charon does not answer on {} after {} s",
                    self.socket.display(),
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Loads the cluster's pre-shared key for IKE with any peer.
    pub async fn load_shared_key(&self, psk: &str) -> Result<(), BackendError> {
        let key = SharedKey {
            id: "flannel",
            kind: "IKE",
            data: psk,
            owners: Vec::new(),
        };
        self.request::<_, Outcome>("load-shared", key)
            .await?
            .check("the pre-shared key")
    }

    /// The names of the connections charon has loaded.
    pub async fn conns(&self) -> Result<BTreeSet<String>, BackendError> {
        let c: Conns = self.request("get-conns", ()).await?;
        Ok(c.conns.into_iter().collect())
    }

    /// Loads (and so starts) the connection of `t`.
    pub async fn load_conn(
        &self,
        t: &Tunnel,
        esp_proposal: &str,
        encap: bool,
    ) -> Result<(), BackendError> {
        self.request::<_, Outcome>("load-conn", conn(t, esp_proposal, encap))
            .await?
            .check(&format!("the connection {}", t.conn_name()))
    }

    /// Unloads the connection `name`.
    pub async fn unload_conn(&self, name: &str) -> Result<(), BackendError> {
        self.request::<_, Outcome>("unload-conn", Name { name })
            .await?
            .check(&format!("unloading the connection {name}"))
    }

    /// Ends the IKE_SAs (and so the CHILD_SAs and their kernel SAs) of the connection `name`,
    /// without waiting for the peer. `unload-conn` leaves them up: with upstream's settings
    /// (`dpd_action` restart, `keyingtries` 0) a rekey that times out would start them again
    /// towards a peer that has left, for ever. Returns how many IKE_SAs there were; none is not
    /// an error.
    pub async fn terminate_ike(&self, name: &str) -> Result<u32, BackendError> {
        let t: Terminated = self
            .request(
                "terminate",
                Terminate {
                    ike: name,
                    force: true,
                },
            )
            .await?;
        if t.success || t.matches == 0 {
            return Ok(t.matches);
        }
        Err(error(format!(
            "charon could not end the IKE_SAs of {name}: {}",
            t.errmsg.as_deref().unwrap_or("no reason given")
        )))
    }
}
