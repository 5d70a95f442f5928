//! The read side of WireGuard's cross-platform userspace interface
//! (<https://www.wireguard.com/xplatform/>) for a userspace device, so that `wg show flannel-wg`
//! works as it does on a kernel device: a Unix stream socket `<device>.sock` in
//! `/var/run/wireguard` (or [`RUN_DIR_ENV`]), root only, answering `get=1` with the device's key,
//! port and peers (endpoints, allowed IPs, latest handshake, transfer, keep-alive). flanneld owns
//! the device's configuration (it follows the leases), so `set=1` is refused with `EPERM`
//! (negated, as wireguard-go answers):
//! `wg set` reports "Operation not permitted".
//!
//! Requests are untrusted bytes: [`RequestReader`] reads them as they arrive, keeping only the
//! first line (fuzz target `wireguard_uapi`), and the server bounds how long it waits. [`serve`]
//! keeps the socket there: it binds it again if its file is removed, and waits for a name another
//! process serves.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Where the sockets go unless [`RUN_DIR_ENV`] says otherwise (where `wg` looks for them).
pub const RUN_DIR: &str = "/var/run/wireguard";
/// The environment variable naming another directory for the sockets (lab hosts share one
/// filesystem; `wg` then needs that directory mounted at [`RUN_DIR`]).
pub const RUN_DIR_ENV: &str = "FLANNEL_WIREGUARD_RUN_DIR";
/// The longest first line read (`get=1` and `set=1` are 5 bytes); a `set`'s body is read to its
/// end but not kept.
const MAX_LINE: usize = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the server checks that its socket file is still there (and still its own).
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// A request on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `get=1`: the device's configuration and state.
    Get,
    /// `set=1`: a change (refused: flanneld owns the configuration).
    Set,
}

/// A request that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The connection ended before the empty line that ends a request.
    #[error("the request ended before its empty line")]
    Incomplete,
    /// The first line is not `get=1` or `set=1` (or `get=1` has a body).
    #[error("unknown operation (expected get=1 or set=1)")]
    Unknown,
}

/// Reads a request as its bytes arrive, keeping no more than its first line: the first line names
/// the operation (an unknown one is known as soon as its line ends), `get=1` is followed by the
/// empty line at once, and a `set=1`'s body is passed over to its empty line. A verdict, once
/// given, does not change with more bytes.
#[derive(Debug, Default)]
pub struct RequestReader {
    first: Vec<u8>,
    op: Option<Request>,
    after_newline: bool,
    verdict: Option<Result<Request, RequestError>>,
}

impl RequestReader {
    /// Takes the next bytes; the verdict once the request is whole (or cannot be one).
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Result<Request, RequestError>> {
        for &b in bytes {
            if self.verdict.is_some() {
                break;
            }
            self.verdict = self.step(b);
        }
        self.verdict.clone()
    }

    fn step(&mut self, b: u8) -> Option<Result<Request, RequestError>> {
        let newline = b == b'\n';
        let ended = newline && self.after_newline;
        self.after_newline = newline;
        match self.op {
            None if newline => {
                self.op = Some(match self.first.as_slice() {
                    b"get=1" => Request::Get,
                    b"set=1" => Request::Set,
                    _ => return Some(Err(RequestError::Unknown)),
                });
                None
            }
            None if self.first.len() >= MAX_LINE => Some(Err(RequestError::Unknown)),
            None => {
                self.first.push(b);
                None
            }
            Some(op) if ended => Some(Ok(op)),
            Some(Request::Get) => Some(Err(RequestError::Unknown)),
            Some(Request::Set) => None,
        }
    }
}

/// Reads a whole request (see [`RequestReader`]).
///
/// # Errors
/// [`RequestError::Unknown`] for an unknown operation, [`RequestError::Incomplete`] while the
/// request has not ended.
pub fn parse_request(bytes: &[u8]) -> Result<Request, RequestError> {
    RequestReader::default()
        .feed(bytes)
        .unwrap_or(Err(RequestError::Incomplete))
}

/// One peer as `get=1` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its public key.
    pub public_key: [u8; 32],
    /// The preshared key, if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Where it is (last heard from, or as configured).
    pub endpoint: SocketAddr,
    /// Its allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// When its latest handshake completed, if ever.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// Its persistent keep-alive interval, if any.
    pub keepalive: Option<Duration>,
}

/// The device as `get=1` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's private key.
    pub private_key: [u8; 32],
    /// Its UDP port.
    pub listen_port: u16,
    /// Its peers.
    pub peers: Vec<PeerInfo>,
}

fn hex(key: &[u8; 32]) -> String {
    key.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The answer to `get=1`, ending with `errno=0` and the empty line.
pub fn format_get(dev: &DeviceInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", hex(&dev.private_key));
    let _ = writeln!(s, "listen_port={}", dev.listen_port);
    for p in &dev.peers {
        let _ = writeln!(s, "public_key={}", hex(&p.public_key));
        if let Some(psk) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", hex(psk));
        }
        let _ = writeln!(s, "protocol_version=1");
        let _ = writeln!(s, "endpoint={}", p.endpoint);
        let since = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let keepalive = p.keepalive.map_or(0, |d| d.as_secs());
        let _ = writeln!(s, "persistent_keepalive_interval={keepalive}");
        for net in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={net}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}

/// The socket path of `device` in `dir`.
pub fn socket_path(dir: &Path, device: &str) -> PathBuf {
    dir.join(format!("{device}.sock"))
}

/// The directory for the sockets: [`RUN_DIR_ENV`] or [`RUN_DIR`].
pub fn run_dir() -> PathBuf {
    std::env::var_os(RUN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(RUN_DIR), PathBuf::from)
}

/// A bound socket; its file is removed when dropped (if it is still this socket's).
#[derive(Debug)]
pub struct Socket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's device and inode, to tell it from a file someone put in its place.
    file: (u64, u64),
}

impl Socket {
    /// Whether the socket's file is still there and still this socket's: `wg` finds the device
    /// only by that name.
    pub fn is_current(&self) -> bool {
        file_id(&self.path).is_ok_and(|id| id == self.file)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if self.is_current() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Binds `device`'s socket in `dir` (made 0700 if missing), replacing a stale socket file but never
/// one that a live process answers on (then `AddrInUse`: someone else serves that device name).
///
/// # Errors
/// When the directory or the socket cannot be made.
pub async fn bind(dir: &Path, device: &str) -> io::Result<Socket> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = socket_path(dir, device);
    if UnixStream::connect(&path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} answers already", path.display()),
        ));
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let file = file_id(&path)?;
    Ok(Socket {
        listener,
        path,
        file,
    })
}

/// Keeps `device`'s socket in `dir` answering, with `describe()` for `get=1`: binds it (and
/// tries again every few seconds while it cannot: the directory cannot be made, or another
/// process serves that name), answers one connection at a time, and binds it anew when its file
/// is removed or replaced (`wg` finds devices only by their socket files). Runs until dropped.
pub async fn serve(dir: PathBuf, device: String, describe: impl Fn() -> DeviceInfo) {
    serve_checking(dir, device, describe, CHECK_EVERY).await;
}

async fn serve_checking(
    dir: PathBuf,
    device: String,
    describe: impl Fn() -> DeviceInfo,
    check_every: Duration,
) {
    let mut failing = false;
    loop {
        match bind(&dir, &device).await {
            Ok(socket) => {
                if failing {
                    tracing::info!(device, path = %socket.path.display(), "WireGuard control socket bound");
                }
                failing = false;
                answer_while_current(&socket, &describe, check_every).await;
                tracing::warn!(device, path = %socket.path.display(),
                    "the WireGuard control socket's file was removed or replaced; binding it again");
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(device, dir = %dir.display(), error = %e,
                        "no WireGuard control socket (`wg show` does not see this device); trying again every {}s",
                        check_every.as_secs());
                }
                failing = true;
                tokio::time::sleep(check_every).await;
            }
        }
    }
}

async fn answer_while_current(
    socket: &Socket,
    describe: &impl Fn() -> DeviceInfo,
    check_every: Duration,
) {
    let mut check = tokio::time::interval(check_every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            accepted = socket.listener.accept() => accepted,
            _ = check.tick() => {
                if !socket.is_current() {
                    return;
                }
                continue;
            }
        };
        let Ok((mut conn, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let request = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut conn)).await;
        let answer = match request {
            Ok(Ok(Request::Get)) => format_get(&describe()),
            // As wireguard-go answers, and wg reads: a failure is a negated errno.
            Ok(Ok(Request::Set)) => format!("errno={}\n\n", -libc::EPERM),
            Ok(Err(RequestError::Unknown)) => format!("errno={}\n\n", -libc::EINVAL),
            // Nothing to answer a client that said nothing whole.
            Ok(Err(RequestError::Incomplete)) | Err(_) => continue,
        };
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, conn.write_all(answer.as_bytes())).await;
    }
}

async fn read_request(conn: &mut UnixStream) -> Result<Request, RequestError> {
    let mut reader = RequestReader::default();
    let mut chunk = [0u8; 4096];
    loop {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(RequestError::Incomplete),
            Ok(n) => {
                if let Some(verdict) = reader.feed(&chunk[..n]) {
                    return verdict;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_by_their_first_line() {
        assert_eq!(parse_request(b"get=1\n\n"), Ok(Request::Get));
        assert_eq!(
            parse_request(b"set=1\nprivate_key=00\n\n"),
            Ok(Request::Set)
        );
        assert_eq!(parse_request(b"get=1\n"), Err(RequestError::Incomplete));
        assert_eq!(
            parse_request(b"set=1\nport=1\n"),
            Err(RequestError::Incomplete)
        );
        assert_eq!(parse_request(b""), Err(RequestError::Incomplete));
        assert_eq!(parse_request(b"get=2\n\n"), Err(RequestError::Unknown));
        assert_eq!(parse_request(b"\n\n"), Err(RequestError::Unknown));
        assert_eq!(parse_request(b"get=1 \n\n"), Err(RequestError::Unknown));
        // An unknown operation is known when its line ends; get=1 has no body.
        assert_eq!(parse_request(b"nonsense\n"), Err(RequestError::Unknown));
        assert_eq!(parse_request(b"get=1\nx=1\n\n"), Err(RequestError::Unknown));
        // A first line longer than any operation is not waited on.
        assert_eq!(
            parse_request(&[b'a'; MAX_LINE + 1]),
            Err(RequestError::Unknown)
        );
    }

    #[test]
    fn a_request_read_in_pieces_is_read_as_whole_and_a_long_set_is_not_kept() {
        for whole in [
            &b"get=1\n\n"[..],
            b"set=1\na=1\nb=2\n\n",
            b"bad\n",
            b"get=1\n",
        ] {
            let mut r = RequestReader::default();
            let mut verdict = None;
            for b in whole {
                verdict = r.feed(std::slice::from_ref(b));
            }
            assert_eq!(
                verdict.unwrap_or(Err(RequestError::Incomplete)),
                parse_request(whole)
            );
        }
        // wg set with many peers: a body far longer than any first line, in chunks.
        let mut r = RequestReader::default();
        assert_eq!(r.feed(b"set=1\n"), None);
        for _ in 0..1000 {
            assert_eq!(r.feed(&[b'x'; 1000]), None);
            assert_eq!(r.feed(b"\n"), None);
        }
        assert!(r.first.len() <= MAX_LINE);
        assert_eq!(r.feed(b"\nget=1\n\n"), Some(Ok(Request::Set)));
    }

    #[test]
    fn get_answers_as_the_protocol_says() {
        let dev = DeviceInfo {
            private_key: [0xab; 32],
            listen_port: 51820,
            peers: vec![PeerInfo {
                public_key: [1; 32],
                preshared_key: None,
                endpoint: "192.0.2.7:51820".parse().unwrap(),
                allowed_ips: vec!["10.5.3.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()],
                last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
                keepalive: Some(Duration::from_secs(25)),
            }],
        };
        let text = format_get(&dev);
        let expected = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nprotocol_version=1\n\
             endpoint=192.0.2.7:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\ntx_bytes=20\nrx_bytes=10\n\
             persistent_keepalive_interval=25\nallowed_ip=10.5.3.0/24\nallowed_ip=fd00::/64\n\
             errno=0\n\n",
            "ab".repeat(32),
            "01".repeat(32)
        );
        assert_eq!(text, expected);
        let none = DeviceInfo {
            peers: vec![PeerInfo {
                last_handshake: None,
                keepalive: None,
                preshared_key: Some([2; 32]),
                ..dev.peers[0].clone()
            }],
            ..dev
        };
        let text = format_get(&none);
        assert!(text.contains("last_handshake_time_sec=0\n"), "{text}");
        assert!(text.contains("persistent_keepalive_interval=0\n"), "{text}");
        assert!(text.contains(&format!("preshared_key={}\n", "02".repeat(32))));
    }

    async fn ask(path: &Path, req: &[u8]) -> String {
        let mut c = UnixStream::connect(path).await.unwrap();
        c.write_all(req).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    fn info() -> DeviceInfo {
        DeviceInfo {
            private_key: [3; 32],
            listen_port: 4242,
            peers: vec![],
        }
    }

    /// Waits (boundedly) until `path` answers `get=1` as `info()`.
    async fn answers(path: &Path) -> bool {
        for _ in 0..200 {
            if let Ok(mut c) = UnixStream::connect(path).await {
                let mut out = String::new();
                if c.write_all(b"get=1\n\n").await.is_ok()
                    && c.read_to_string(&mut out).await.is_ok()
                    && out == format_get(&info())
                {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn the_socket_answers_and_refuses_changes_and_a_live_one_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "wgtest0");
        let task = tokio::spawn(serve(dir.path().into(), "wgtest0".into(), info));
        assert!(answers(&path).await);
        assert_eq!(
            ask(&path, b"set=1\nlisten_port=1\n\n").await,
            "errno=-1\n\n"
        );
        assert_eq!(ask(&path, b"nonsense\n").await, "errno=-22\n\n");
        // `wg set` with a long body is read to its end and refused, not left hanging.
        let mut long = b"set=1\n".to_vec();
        for i in 0..5000 {
            long.extend_from_slice(
                format!("public_key={i:064x}\nallowed_ip=10.0.0.0/8\n").as_bytes(),
            );
        }
        long.push(b'\n');
        assert_eq!(ask(&path, &long).await, "errno=-1\n\n");
        let e = bind(dir.path(), "wgtest0").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        task.abort();
        let _ = task.await;
        // The server is gone (its socket file removed with it): the name is free again.
        assert!(!path.exists());
        let again = bind(dir.path(), "wgtest0").await.unwrap();
        drop(again);
        // A stale socket file (no one answering) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        bind(dir.path(), "wgtest0").await.unwrap();
    }

    #[tokio::test]
    async fn a_removed_socket_file_is_bound_again_and_a_taken_name_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "wgtest1");
        // Someone else answers on the name first: the server waits for it.
        let other = bind(dir.path(), "wgtest1").await.unwrap();
        let check = Duration::from_millis(20);
        let task = tokio::spawn(serve_checking(
            dir.path().into(),
            "wgtest1".into(),
            info,
            check,
        ));
        tokio::time::sleep(check * 5).await;
        assert!(other.is_current(), "a live socket was taken");
        drop(other);
        assert!(answers(&path).await, "not bound once the name was free");
        // Removed behind its back (as `rm -rf /run/wireguard` would): bound again.
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert!(answers(&path).await, "not bound again after its file went");
        task.abort();
        let _ = task.await;
        assert!(!path.exists());
    }
}
