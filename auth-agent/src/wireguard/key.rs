//! The node's WireGuard private key: generated once from the kernel's
//! random source, kept in the state directory (mode 0600, not on tmpfs, so
//! a reboot keeps it), reused across restarts, never logged.
//!
//! The file holds the key as `wg genkey` writes it (base64 of 32 bytes and
//! a newline), so `wg pubkey < wireguard.key` shows the public key the node
//! publishes. A file that is unreadable, malformed, all zero or readable by
//! anyone but its owner is an error naming the file; it is never replaced
//! (a new key would break every peer's configuration silently).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The key file's name in the state directory.
pub const KEY_FILE: &str = "wireguard.key";

/// Why the key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, writing or checking `path` failed.
    #[error("WireGuard key {path}: {what}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// `path` does not hold one base64 key of 32 bytes.
    #[error(
        "WireGuard key {path}: {reason}; expected one base64 key of 32 bytes as `wg genkey` writes it (the file is left as it is)"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `path` holds the all-zero key, which WireGuard treats as no key.
    #[error("WireGuard key {path}: the all-zero key is refused")]
    AllZero {
        /// The file.
        path: PathBuf,
    },
    /// `path` is readable or writable by others than its owner.
    #[error(
        "WireGuard key {path}: mode {mode:04o}, readable or writable by others than its owner; the key may be known — remove the file to generate a new one"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// A WireGuard (X25519) private key. Its `Debug` shows no key material.
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// The public key that goes with it.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// The raw key, for the kernel (netlink) only.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

/// A WireGuard public key; displayed and parsed as base64, as `wg` and the
/// node annotation write it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Why a published public key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    /// Not base64 of 32 bytes.
    #[error("{0:?} is not a WireGuard public key (base64 of 32 bytes)")]
    Malformed(String),
    /// The all-zero key (WireGuard's "no key").
    #[error("the all-zero key is refused")]
    AllZero,
}

impl std::str::FromStr for PublicKey {
    type Err = PublicKeyError;

    fn from_str(s: &str) -> Result<Self, PublicKeyError> {
        let raw = BASE64
            .decode(s.trim())
            .map_err(|_| PublicKeyError::Malformed(s.to_owned()))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| PublicKeyError::Malformed(s.to_owned()))?;
        if bytes == [0; 32] {
            return Err(PublicKeyError::AllZero);
        }
        Ok(Self(bytes))
    }
}

/// A new key for `<state_dir>/wireguard.key`, replacing the one there
/// (written 0600 beside it and renamed into place, so a crash leaves the
/// old key or the new one, never neither).
pub fn rotate(state_dir: &Path) -> Result<PrivateKey, KeyError> {
    let path = state_dir.join(KEY_FILE);
    let key = generate(&path)?;
    write(state_dir, &path, &key)?;
    Ok(key)
}

/// A key from 32 random bytes, not written anywhere (the throwaway peer the
/// interface uses to release AllowedIPs).
pub fn ephemeral() -> Result<PrivateKey, KeyError> {
    generate(Path::new("<ephemeral>"))
}

/// The node's key from `<state_dir>/wireguard.key`, generated and written
/// (mode 0600, atomically) when the file does not exist. Returns the key
/// and whether it was created now.
pub fn load_or_create(state_dir: &Path) -> Result<(PrivateKey, bool), KeyError> {
    let path = state_dir.join(KEY_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if !meta.is_file() {
                return Err(KeyError::Malformed {
                    path,
                    reason: "not a regular file".into(),
                });
            }
            if mode & 0o077 != 0 {
                return Err(KeyError::Exposed { path, mode });
            }
            let text = std::fs::read_to_string(&path).map_err(|source| KeyError::Io {
                path: path.clone(),
                what: "reading",
                source,
            })?;
            Ok((parse(&path, &text)?, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate(&path)?;
            write(state_dir, &path, &key)?;
            Ok((key, true))
        }
        Err(source) => Err(KeyError::Io {
            path,
            what: "checking",
            source,
        }),
    }
}

fn parse(path: &Path, text: &str) -> Result<PrivateKey, KeyError> {
    let malformed = |reason: String| KeyError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let raw = BASE64
        .decode(text.trim_end_matches('\n'))
        .map_err(|e| malformed(format!("not base64 ({e})")))?;
    let bytes: [u8; 32] = raw
        .try_into()
        .map_err(|v: Vec<u8>| malformed(format!("{} bytes", v.len())))?;
    if bytes == [0; 32] {
        return Err(KeyError::AllZero {
            path: path.to_path_buf(),
        });
    }
    Ok(PrivateKey(x25519_dalek::StaticSecret::from(bytes)))
}

fn generate(path: &Path) -> Result<PrivateKey, KeyError> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
                .map_err(|e| KeyError::Io {
                    path: path.to_path_buf(),
                    what: "getting random bytes",
                    source: e.into(),
                })?;
    }
    // Clamped as `wg genkey` does; X25519 clamps on use anyway.
    bytes[0] &= 248;
    bytes[31] = (bytes[31] & 127) | 64;
    Ok(PrivateKey(x25519_dalek::StaticSecret::from(bytes)))
}

/// Writes `key` to a new 0600 file beside `path` and renames it into place,
/// so the key file is never seen half-written or with a wider mode.
fn write(dir: &Path, path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| KeyError::Io {
            path: p,
            what,
            source,
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("creating the directory", dir))?;
    let staging = dir.join(format!(".{KEY_FILE}.new"));
    let _ = std::fs::remove_file(&staging);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(io("creating", &staging))?;
    let text = format!("{}\n", BASE64.encode(key.to_bytes()));
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("writing", &staging))?;
    std::fs::rename(&staging, path).map_err(io("renaming into place", path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_replaces_the_file_with_a_new_0600_key() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, _) = load_or_create(dir.path()).unwrap();
        let k2 = rotate(dir.path()).unwrap();
        assert_ne!(k1.public_key(), k2.public_key());
        let (k3, created) = load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(
            k3.public_key(),
            k2.public_key(),
            "the rotated key is what a restart reads"
        );
        let meta = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no staging file left: {names:?}");
    }

    #[test]
    fn published_keys_parse_and_zero_or_garbage_is_refused() {
        let (k, _) = load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let p = k.public_key();
        assert_eq!(p.to_string().parse::<PublicKey>().unwrap(), p);
        assert_eq!(format!(" {p}\n").parse::<PublicKey>().unwrap(), p);
        assert_eq!(
            BASE64.encode([0u8; 32]).parse::<PublicKey>().unwrap_err(),
            PublicKeyError::AllZero
        );
        for bad in [
            "",
            "not base64!",
            &BASE64.encode([1u8; 31]),
            &BASE64.encode([1u8; 33]),
        ] {
            assert!(
                matches!(bad.parse::<PublicKey>(), Err(PublicKeyError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn created_once_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (k1, created) = load_or_create(&state).unwrap();
        assert!(created);
        let meta = std::fs::metadata(state.join(KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let (k2, created) = load_or_create(&state).unwrap();
        assert!(!created, "the existing key is reused");
        assert_eq!(k1.public_key(), k2.public_key());
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        // Two nodes never get the same key.
        let (other, _) = load_or_create(&dir.path().join("other")).unwrap();
        assert_ne!(other.public_key(), k1.public_key());
    }

    /// `wg` (wireguard-tools) is an independent reader of the file and
    /// computes the same public key.
    #[test]
    fn wg_reads_the_file_and_derives_the_same_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = load_or_create(dir.path()).unwrap();
        let file = std::fs::File::open(dir.path().join(KEY_FILE)).unwrap();
        let out = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(file)
            .output()
            .unwrap_or_else(|e| {
                panic!("running wg (install wireguard-tools: scripts/install-test-deps): {e}")
            });
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            key.public_key().to_string()
        );
    }

    #[test]
    fn bad_files_are_errors_naming_the_file_and_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let put = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let zero = format!("{}\n", BASE64.encode([0u8; 32]));
        let short = format!("{}\n", BASE64.encode([7u8; 16]));
        let good = format!("{}\n", BASE64.encode([7u8; 32]));
        for (text, mode, want) in [
            ("not base64!\n", 0o600, "not base64"),
            (short.as_str(), 0o600, "16 bytes"),
            (zero.as_str(), 0o600, "all-zero key is refused"),
            (good.as_str(), 0o644, "mode 0644"),
            (good.as_str(), 0o620, "mode 0620"),
        ] {
            put(text, mode);
            let e = load_or_create(dir.path()).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains(KEY_FILE),
                "{text:?} {mode:o}: {e}"
            );
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                text,
                "left as it was"
            );
        }
        put(&good, 0o600);
        assert!(load_or_create(dir.path()).is_ok());
    }

    #[test]
    fn no_key_material_in_debug_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = load_or_create(dir.path()).unwrap();
        let secret = BASE64.encode(key.to_bytes());
        let shown = format!("{key:?}");
        assert!(
            !shown.contains(&secret) && shown.contains("redacted"),
            "{shown}"
        );
        std::fs::set_permissions(
            dir.path().join(KEY_FILE),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let e = load_or_create(dir.path()).unwrap_err();
        assert!(!format!("{e} {e:?}").contains(&secret));
    }
}
