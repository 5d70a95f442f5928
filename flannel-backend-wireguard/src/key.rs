//! WireGuard keys: Curve25519 keys in standard base64, as `wg genkey`/`wg pubkey` write them, and the
//! node's private key file (`/run/flannel/wgkey`, or `WIREGUARD_KEY_FILE` as upstream reads it).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Where the private key lives unless `WIREGUARD_KEY_FILE` says otherwise (upstream's path).
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";

/// A WireGuard public key or pre-shared key: 32 bytes, written as 44 characters of standard base64.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

/// A key that is not 32 bytes of standard base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a WireGuard key (32 bytes in standard base64, 44 characters, as `wg genkey` writes)"
)]
pub struct BadKey(pub String);

impl FromStr for Key {
    type Err = BadKey;

    fn from_str(s: &str) -> Result<Self, BadKey> {
        let bad = || BadKey(s.chars().take(60).collect());
        let bytes = STANDARD.decode(s.trim()).map_err(|_| bad())?;
        Ok(Self(
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| bad())?,
        ))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// The node's private key. Its `Debug` output does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

impl PrivateKey {
    /// A new key from the operating system's random source, clamped as `wg genkey` clamps it.
    pub fn generate() -> Result<Self, KeyFileError> {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).map_err(|e| KeyFileError::Random(e.to_string()))?;
        Ok(Self::from_bytes(b))
    }

    /// The key with these bytes (clamped: Curve25519 ignores the bits clamping clears, and `wg`
    /// writes keys clamped).
    pub fn from_bytes(mut b: [u8; 32]) -> Self {
        b[0] &= 248;
        b[31] = (b[31] & 127) | 64;
        Self(b)
    }

    /// The key's bytes, for the device configuration.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The public key (`wg pubkey`).
    pub fn public_key(&self) -> Key {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Key(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// The key as `wg genkey` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for PrivateKey {
    type Err = BadKey;

    fn from_str(s: &str) -> Result<Self, BadKey> {
        s.parse::<Key>()
            .map(|k| Self::from_bytes(k.0))
            .map_err(|_| BadKey("(the private key)".into()))
    }
}

/// The key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or writing the file failed.
    #[error("{action} the WireGuard key file {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error(
        "the WireGuard key file {0} does not hold a key (44 characters of base64, as `wg genkey` writes): \
         replace it with the node's key, or delete it to have a new key made (peers learn the new public \
         key from this node's lease)"
    )]
    Corrupt(PathBuf),
    /// The operating system gave no random bytes.
    #[error("no random bytes for a new WireGuard key: {0}")]
    Random(String),
}

/// The key file to use: `WIREGUARD_KEY_FILE` when given (lab hosts share one filesystem; upstream
/// reads the same variable), else [`DEFAULT_KEY_FILE`].
pub fn key_file(env: Option<std::ffi::OsString>) -> PathBuf {
    env.filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_KEY_FILE), PathBuf::from)
}

/// Reads the node's private key from `path`, or makes one and stores it there (mode 0600, its
/// directory created). A restart thus keeps the key, and with it the peers' configuration of this
/// node. Two processes starting at once agree on one key: the file appears whole or not at all
/// (written aside, then linked into place), and the one that loses the race reads the winner's.
pub fn load_or_create(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let io = |action, source| KeyFileError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => return text.parse().map_err(|_| KeyFileError::Corrupt(path.into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading", e)),
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    let key = PrivateKey::generate()?;
    let mut tag = [0u8; 8];
    getrandom::fill(&mut tag).map_err(|e| KeyFileError::Random(e.to_string()))?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let name = path
        .file_name()
        .map_or("wgkey".into(), |n| n.to_string_lossy());
    let aside = dir.join(format!(".{name}.{tag}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        .map_err(|e| io("creating a file beside", e))?;
    let linked = file
        .write_all(format!("{}\n", key.to_base64()).as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::hard_link(&aside, path));
    let _ = std::fs::remove_file(&aside);
    match linked {
        Ok(()) => Ok(key),
        // Another process made the key first: use that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(path)
            .map_err(|e| io("reading", e))?
            .parse()
            .map_err(|_| KeyFileError::Corrupt(path.into())),
        Err(e) => Err(io("writing", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn public_key_matches_wg_pubkey() {
        // RFC 7748 section 6.1, Alice's key pair (the private key is already clamped by X25519).
        let private = PrivateKey::from_bytes(
            <[u8; 32]>::try_from(
                (0..32)
                    .map(|i| {
                        u8::from_str_radix(
                            &"77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
                                [2 * i..2 * i + 2],
                            16,
                        )
                        .unwrap()
                    })
                    .collect::<Vec<u8>>()
                    .as_slice(),
            )
            .unwrap(),
        );
        let public = private.public_key();
        let hex: String = public.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert_eq!(public.to_string().len(), 44);
        assert_eq!(public.to_string().parse::<Key>().unwrap(), public);
    }

    #[test]
    fn keys_are_44_characters_of_base64() {
        for bad in [
            "",
            "abc",
            "not base64 at all!!",
            &"A".repeat(43),
            &"A".repeat(48),
        ] {
            assert!(bad.parse::<Key>().is_err(), "{bad:?}");
        }
        let k: Key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .unwrap();
        assert_eq!(
            k.to_string(),
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
        );
        let e = "abc".parse::<Key>().unwrap_err().to_string();
        assert!(e.contains("44 characters"), "{e}");
    }

    #[test]
    fn generated_keys_are_clamped_and_differ() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        assert_ne!(a, b);
        let bytes = a.to_bytes();
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
        assert!(
            !format!("{a:?}").contains(&a.to_base64()),
            "Debug hides the key"
        );
    }

    #[test]
    fn the_key_file_is_made_once_0600_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wgkey");
        let first = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path).unwrap();
        assert_eq!(first, again, "a restart keeps the key");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "nothing left aside"
        );
        // A key written by `wg genkey` (no clamping needed, trailing newline) is read as is.
        std::fs::write(&path, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        assert_eq!(
            load_or_create(&path).unwrap().to_base64(),
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
        );
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        std::fs::write(&path, "garbage").unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(
            e.contains("does not hold a key") && e.contains("delete it"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "garbage",
            "never overwritten"
        );
    }

    #[test]
    fn racing_starts_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        let keys: Vec<PrivateKey> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn key_file_location() {
        assert_eq!(key_file(None), PathBuf::from(DEFAULT_KEY_FILE));
        assert_eq!(key_file(Some("".into())), PathBuf::from(DEFAULT_KEY_FILE));
        assert_eq!(
            key_file(Some("/run/h1/wgkey".into())),
            PathBuf::from("/run/h1/wgkey")
        );
    }
}
