//! The service manager's side of a restart: readiness (`READY=1`) and the file-descriptor store.
//!
//! Under systemd (`$NOTIFY_SOCKET` set), a backend can hand descriptors to the service manager with
//! [`store_fd`] (`FDSTORE=1`, needs `FileDescriptorStoreMax=` in the unit); systemd keeps them open
//! while flanneld restarts and passes them to the next flanneld (`LISTEN_FDS`, `LISTEN_FDNAMES`),
//! which takes them with [`take_stored_fd`]. Kernel objects held that way (a UDP socket, a TUN queue)
//! keep queueing packets while no flanneld runs, so a restart delays packets instead of dropping
//! them. Without systemd every function here does nothing.
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! let socket = match flannel_dataplane::systemd::take_stored_fd("flannel-udp") {
//!     Some(fd) => std::net::UdpSocket::from(fd),
//!     None => std::net::UdpSocket::bind("0.0.0.0:8285").unwrap(),
//! };
//! let _ = flannel_dataplane::systemd::store_fd("flannel-udp", socket.as_fd());
//! ```

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// More than any flanneld stores; a larger `LISTEN_FDS` is refused as corrupt.
const MAX_LISTEN_FDS: usize = 64;

/// Sends `state` (lines of `KEY=value`) with `fds` to `$NOTIFY_SOCKET`. `Ok(false)` when there is no
/// service manager to tell.
pub fn notify(state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(bytes)?,
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(&raw)]
    };
    let iov = [io::IoSlice::new(state.as_bytes())];
    sendmsg(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::empty(),
        Some(&addr),
    )?;
    Ok(true)
}

/// Tells the service manager that flanneld is ready (`Type=notify`); failures are logged.
pub fn ready() {
    if let Err(e) = notify("READY=1", &[]) {
        tracing::warn!(error = %e, "sd_notify READY=1 failed");
    }
}

/// Whether a service manager listens (`$NOTIFY_SOCKET` is set), so [`store_fd`] can keep anything.
pub fn manager_present() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Checks that `name` is a valid `FDNAME`: 1 to 255 printable ASCII characters, no `:`.
fn valid_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid file descriptor name {name:?}"),
        ))
    }
}

/// Asks the service manager to keep `fd` under `name` across restarts (`FDSTORE=1`). `Ok(false)`
/// without a service manager. systemd keeps one copy of a descriptor it already holds, and drops
/// stored descriptors unless the unit sets `FileDescriptorStoreMax=`.
pub fn store_fd(name: &str, fd: BorrowedFd<'_>) -> io::Result<bool> {
    valid_name(name)?;
    notify(&format!("FDSTORE=1\nFDNAME={name}"), &[fd])
}

/// Asks the service manager to close what it keeps under `name` (`FDSTOREREMOVE=1`).
pub fn remove_stored_fd(name: &str) -> io::Result<bool> {
    valid_name(name)?;
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
}

/// Closes the passed descriptors nobody took (stored by a backend this flanneld does not run, e.g.
/// udp's socket after the host moved to vxlan) and asks the service manager to drop its copies, so
/// they are not kept open, or inherited by the tools flanneld runs, for good. Returns their names.
/// Call it once the backend has taken what it needs.
pub fn release_unclaimed() -> Vec<String> {
    let unclaimed: Vec<(String, OwnedFd)> = match passed().lock() {
        Ok(mut map) => map.drain().collect(),
        Err(_) => Vec::new(),
    };
    let mut names = Vec::new();
    for (name, fd) in unclaimed {
        drop(fd);
        if let Err(e) = remove_stored_fd(&name) {
            tracing::warn!(error = %e, name, "asking the service manager to drop a descriptor failed");
        }
        names.push(name);
    }
    names.sort();
    names
}

/// The passed descriptors by name, parsed from the environment once; each can be taken once.
fn passed() -> &'static Mutex<HashMap<String, OwnedFd>> {
    static PASSED: OnceLock<Mutex<HashMap<String, OwnedFd>>> = OnceLock::new();
    PASSED.get_or_init(|| {
        let get = |k: &str| std::env::var(k).ok();
        let pid = std::process::id();
        let names = parse_listen_fds(
            get("LISTEN_PID").as_deref(),
            get("LISTEN_FDS").as_deref(),
            get("LISTEN_FDNAMES").as_deref(),
            pid,
        );
        let mut map = HashMap::new();
        for (i, name) in names.into_iter().enumerate() {
            let raw = LISTEN_FDS_START + i as RawFd;
            // Only descriptors that are open are ours to take.
            // SAFETY: F_GETFD on any number is harmless.
            if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
                continue;
            }
            // SAFETY: the service manager passed `raw` to this process (LISTEN_PID is ours) and
            // nothing else in flanneld claims descriptors it did not open; it is taken once.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let _ = nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            match name {
                Some(n) => {
                    map.insert(n, fd);
                }
                None => drop(fd),
            }
        }
        Mutex::new(map)
    })
}

/// The names of the descriptors passed to process `pid` (`None` for unnamed ones), from the values
/// of `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`. Empty when they are not for `pid` or are
/// malformed (untrusted input: never more than `MAX_LISTEN_FDS` (64)).
pub fn parse_listen_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    pid: u32,
) -> Vec<Option<String>> {
    // Plain decimal digits only (no sign, no spaces), as systemd writes them.
    fn number<T: std::str::FromStr>(s: Option<&str>) -> Option<T> {
        s.filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))?
            .parse()
            .ok()
    }
    let for_us = number::<u32>(listen_pid) == Some(pid);
    let count = number::<usize>(listen_fds);
    let (true, Some(count)) = (for_us, count) else {
        return Vec::new();
    };
    if count > MAX_LISTEN_FDS {
        return Vec::new();
    }
    let mut names: Vec<Option<String>> = names
        .map(|n| {
            n.split(':')
                .map(|s| (!s.is_empty()).then(|| s.to_string()))
                .collect()
        })
        .unwrap_or_default();
    names.resize(count, None);
    names
}

/// Takes the descriptor the service manager passed under `name`, if any (once).
pub fn take_stored_fd(name: &str) -> Option<OwnedFd> {
    passed().lock().ok()?.remove(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn listen_fds_are_for_our_pid_only_and_bounded() {
        let names = parse_listen_fds(Some("42"), Some("2"), Some("a:b"), 42);
        assert_eq!(names, [Some("a".into()), Some("b".into())]);
        assert!(parse_listen_fds(Some("41"), Some("2"), Some("a:b"), 42).is_empty());
        assert!(parse_listen_fds(None, Some("2"), None, 42).is_empty());
        assert!(parse_listen_fds(Some("42"), Some("x"), None, 42).is_empty());
        // A sign or spaces are not systemd's: refused (found by fuzzing: "+42" parsed as 42).
        assert!(parse_listen_fds(Some("+42"), Some("1"), None, 42).is_empty());
        assert!(parse_listen_fds(Some(" 42"), Some("1"), None, 42).is_empty());
        assert!(parse_listen_fds(Some("42"), Some("100000"), None, 42).is_empty());
        // Fewer names than descriptors, empty names: unnamed; more names: cut to the count.
        assert_eq!(
            parse_listen_fds(Some("42"), Some("3"), Some("a::c:d"), 42),
            [Some("a".into()), None, Some("c".into())]
        );
        assert_eq!(
            parse_listen_fds(Some("42"), Some("2"), None, 42),
            [None, None]
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("flannel-udp").is_ok());
        for bad in ["", "a:b", "a b", "a\nFDSTOREREMOVE=1"] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_stored_descriptor_reaches_the_notify_socket() {
        // A stand-in notify socket: the message and the descriptor arrive as systemd reads them.
        let dir = std::env::temp_dir().join(format!("flt{}-notify", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY (env): this test is the only one in the crate that touches NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = store_fd("flannel-udp", udp.as_fd());
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(sent.unwrap());
        let mut buf = [0u8; 256];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            listener.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .unwrap();
        let fds: Vec<RawFd> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(f) => Some(f),
                _ => None,
            })
            .flatten()
            .collect();
        let len = msg.bytes;
        assert_eq!(&buf[..len], b"FDSTORE=1\nFDNAME=flannel-udp");
        assert_eq!(fds.len(), 1);
        // SAFETY: the descriptor was just received and belongs to this test.
        let got = std::net::UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
        assert_eq!(got.local_addr().unwrap(), udp.local_addr().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
