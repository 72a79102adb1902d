//! [`LabError`]: what went wrong in the lab.

use std::path::{Path, PathBuf};

/// What went wrong in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{call} ({what}): {source}")]
    Sys {
        /// The call.
        call: &'static str,
        /// Its argument.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op} ({what}): {source}")]
    Netlink {
        /// The request.
        op: &'static str,
        /// Its object.
        what: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// A helper thread panicked.
    #[error("thread panicked: {0}")]
    Thread(String),
    /// A bad name or argument.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Something named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A pod process answered `fail`, answered nonsense, or died.
    #[error("pod {pod}: `{command}`: {reason}")]
    Pod {
        /// The pod.
        pod: String,
        /// The command sent.
        command: String,
        /// What failed.
        reason: String,
    },
}

impl LabError {
    pub(super) fn io(action: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn sys(
        call: &'static str,
        what: impl std::fmt::Display,
        source: std::io::Error,
    ) -> Self {
        Self::Sys {
            call,
            what: what.to_string(),
            source,
        }
    }
}
