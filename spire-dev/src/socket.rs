//! Unix socket files: binding (replacing a stale socket, never another kind of
//! file) and removal.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Errors about socket files.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// `create_dir_all` failed for the socket directory `path`.
    #[error("create_dir_all({path}): {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `UnixListener::bind` failed for `path`.
    #[error("UnixListener::bind({path}): {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `remove_file` of the stale socket `path` failed.
    #[error("remove_file({path}) (stale socket): {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `path` exists and is not a socket; spire-dev will not replace it.
    #[error("bind({path}): exists and is not a socket; remove it or choose another --dir")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
}

/// Binds a unix listener at `path`, creating its directory and replacing a
/// stale socket left by an earlier run.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Removes the socket file at `path` if it is there (errors are logged).
pub fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "remove_file(socket)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replaces_stale_socket_but_not_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("a/b/x.sock");
        let first = bind(&sock).expect("first bind");
        drop(first);
        let _second = bind(&sock).expect("rebind over stale socket");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"data").expect("write");
        assert!(matches!(bind(&file), Err(SocketError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).expect("still there"), b"data");
        remove(&sock);
        assert!(!sock.exists());
        remove(&sock);
    }
}
