//! The read side of WireGuard's cross-platform userspace interface
//! (<https://www.wireguard.com/xplatform/>) for a userspace device, so that `wg show flannel-wg`
//! works as it does on a kernel device: a Unix stream socket `<device>.sock` in
//! `/var/run/wireguard` (or [`RUN_DIR_ENV`]), root only, answering `get=1` with the device's key,
//! port and peers (endpoints, allowed IPs, latest handshake, transfer, keep-alive). flanneld owns
//! the device's configuration (it follows the leases), so `set=1` is refused with `EPERM`
//! (negated, as wireguard-go answers):
//! `wg set` reports "Operation not permitted".
//!
//! Requests are untrusted bytes: [`parse_request`] reads them (fuzz target `wireguard_uapi`), and
//! the server bounds what it reads and how long it waits.

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
/// The longest request read; `get=1` is 7 bytes.
const MAX_REQUEST: usize = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The first line is not `get=1` or `set=1`.
    #[error("unknown operation (expected get=1 or set=1)")]
    Unknown,
}

/// Reads a request: its first line names the operation; the rest (a `set`'s body) is not read.
/// `Incomplete` until the request's empty line (`\n\n`) is in `bytes`.
///
/// # Errors
/// [`RequestError`] for an unknown operation or an unfinished request.
pub fn parse_request(bytes: &[u8]) -> Result<Request, RequestError> {
    let end = bytes
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or(RequestError::Incomplete)?;
    let first = bytes[..=end].split(|&b| b == b'\n').next().unwrap_or(&[]);
    match first {
        b"get=1" => Ok(Request::Get),
        b"set=1" => Ok(Request::Set),
        _ => Err(RequestError::Unknown),
    }
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

/// A bound socket; removed when dropped.
#[derive(Debug)]
pub struct Socket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
    Ok(Socket { listener, path })
}

/// Answers requests on `socket`, one connection at a time, with `describe()` for `get=1`.
pub async fn serve(socket: Socket, describe: impl Fn() -> DeviceInfo) {
    loop {
        let Ok((mut conn, _)) = socket.listener.accept().await else {
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
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match parse_request(&buf) {
            Err(RequestError::Incomplete) if buf.len() < MAX_REQUEST => {}
            other => return other,
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(RequestError::Incomplete),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
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
        assert_eq!(parse_request(b""), Err(RequestError::Incomplete));
        assert_eq!(parse_request(b"get=2\n\n"), Err(RequestError::Unknown));
        assert_eq!(parse_request(b"\n\n"), Err(RequestError::Unknown));
        assert_eq!(parse_request(b"get=1 \n\n"), Err(RequestError::Unknown));
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

    #[tokio::test]
    async fn the_socket_answers_and_refuses_changes_and_a_live_one_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let sock = bind(dir.path(), "wgtest0").await.unwrap();
        let path = sock.path.clone();
        let info = DeviceInfo {
            private_key: [3; 32],
            listen_port: 4242,
            peers: vec![],
        };
        let task = tokio::spawn({
            let info = info.clone();
            async move { serve(sock, move || info.clone()).await }
        });
        let ask = |req: &'static [u8]| {
            let path = path.clone();
            async move {
                let mut c = UnixStream::connect(&path).await.unwrap();
                c.write_all(req).await.unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).await.unwrap();
                out
            }
        };
        assert_eq!(ask(b"get=1\n\n").await, format_get(&info));
        assert_eq!(ask(b"set=1\nlisten_port=1\n\n").await, "errno=-1\n\n");
        assert_eq!(ask(b"nonsense\n\n").await, "errno=-22\n\n");
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
}
