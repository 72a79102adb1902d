//! Binding the local API socket safely: a second agent on the node must not
//! take over the first one's socket, and nobody but its owner may connect.
//!
//! - The directory is created 0700 when missing; an existing one must be
//!   owned by this user and not writable by group or others (else anyone
//!   could replace the socket), or binding is refused.
//! - An existing socket that answers belongs to a running agent: refused,
//!   naming the path. One that refuses connections is stale and replaced;
//!   anything else at the path (a regular file, a directory) is left alone
//!   and refused.
//! - The socket is bound under a fresh 0700 directory beside the final
//!   path, made 0600 there, and then renamed into place without replacing
//!   anything (`RENAME_NOREPLACE`), so it is never reachable with a wider
//!   mode and two agents starting at once cannot replace each other's.

use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why the API socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another agent answers on the socket.
    #[error(
        "local API socket {path}: another meshauth agent is running and answers on it; stop it first, or give this agent another --api-socket"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path.
    #[error("local API socket {path}: exists and is not a socket ({kind}); not replacing it")]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What is there.
        kind: &'static str,
    },
    /// The directory is not ours alone.
    #[error(
        "local API socket directory {dir}: owner uid {uid}, mode {mode:04o}; it must be owned by uid {expected_uid} and not writable by group or others (chown {expected_uid} and chmod 0700 it)"
    )]
    UnsafeDir {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
        /// This process's effective uid.
        expected_uid: u32,
    },
    /// A system call failed.
    #[error("local API socket: {call} {path}: {source}")]
    Io {
        /// The call.
        call: &'static str,
        /// The path it was given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(call: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BindError + 'a {
    move |source| BindError::Io {
        call,
        path: path.to_owned(),
        source,
    }
}

/// Binds the API socket at `path` (see the module documentation).
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    into_tokio(bind_std(path)?, path)
}

fn bind_std(path: &Path) -> Result<std::os::unix::net::UnixListener, BindError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("mkdir", dir))?;
    }
    check_dir(dir)?;
    // A few rounds: another agent may bind, or leave a stale socket, between
    // our look and our rename.
    for _ in 0..3 {
        remove_if_stale(path)?;
        let staging = tempfile::Builder::new()
            .prefix(".meshauth-api-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(dir)
            .map_err(io_err("mkdir", dir))?;
        let tmp = staging.path().join("sock");
        let std_listener =
            std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err("bind", &tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", &tmp))?;
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp,
            rustix::fs::CWD,
            path,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => return Err(io_err("rename", path)(e.into())),
        }
        return Ok(std_listener);
    }
    Err(BindError::InUse {
        path: path.to_owned(),
    })
}

/// Removes the socket file on drop, if the socket at the path is still the
/// one this agent bound (never another agent's): it holds a duplicate of
/// the listening socket and checks that a connection to the path arrives on it.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl SocketGuard {
    fn is_ours(&self) -> bool {
        if self.listener.set_nonblocking(true).is_err() {
            return false;
        }
        // Drain connections that were already queued, then probe.
        while self.listener.accept().is_ok() {}
        let Ok(_probe) = std::os::unix::net::UnixStream::connect(&self.path) else {
            return false;
        };
        self.listener.accept().is_ok()
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// [`bind`], plus the guard that removes the socket when the agent stops.
pub fn bind_guarded(path: &Path) -> Result<(UnixListener, SocketGuard), BindError> {
    let std_listener = bind_std(path)?;
    let guard = SocketGuard {
        path: path.to_owned(),
        listener: std_listener.try_clone().map_err(io_err("dup", path))?,
    };
    Ok((into_tokio(std_listener, path)?, guard))
}

fn into_tokio(l: std::os::unix::net::UnixListener, path: &Path) -> Result<UnixListener, BindError> {
    l.set_nonblocking(true)
        .map_err(io_err("set_nonblocking", path))?;
    UnixListener::from_std(l).map_err(io_err("listen", path))
}

/// Refuses a directory someone else could write to.
fn check_dir(dir: &Path) -> Result<(), BindError> {
    let meta = std::fs::metadata(dir).map_err(io_err("stat", dir))?;
    let expected_uid = rustix::process::geteuid().as_raw();
    let mode = meta.permissions().mode() & 0o7777;
    if meta.uid() != expected_uid || mode & 0o022 != 0 {
        return Err(BindError::UnsafeDir {
            dir: dir.to_owned(),
            uid: meta.uid(),
            mode,
            expected_uid,
        });
    }
    Ok(())
}

/// Removes a socket nobody answers on; refuses a live one or a non-socket.
fn remove_if_stale(path: &Path) -> Result<(), BindError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symbolic link"
        } else if ft.is_file() {
            "a regular file"
        } else {
            "a special file"
        };
        return Err(BindError::NotASocket {
            path: path.to_owned(),
            kind,
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket.path = %path.display(), "replacing a stale local API socket (nothing answers on it)");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("unlink", path)(e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("connect", path)(e)),
    }
}
