//! [`VmError`]: why a VM could not run a command to its end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Accel;

/// Why a VM could not run a command to its end.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A program, kernel or module the VM needs is not installed.
    #[error("missing {what}: {fix}")]
    Missing {
        /// What is missing, and where it was looked for.
        what: String,
        /// How to install it.
        fix: &'static str,
    },
    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: String,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A program could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
    /// An argument that cannot be passed to the guest.
    #[error("{what} {value:?}: {reason}")]
    InvalidArg {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
        /// What would be right.
        reason: &'static str,
    },
    /// The command did not end within the timeout; qemu was killed.
    #[error(
        "the VM did not finish within {timeout:?} ({accel}); qemu killed; last console lines:\n{tail}"
    )]
    Timeout {
        /// The timeout.
        timeout: Duration,
        /// The accelerator used.
        accel: Accel,
        /// The last console lines.
        tail: String,
    },
    /// qemu exited without the command's exit marker: kernel panic, failed
    /// `/init`, qemu error.
    #[error(
        "the VM ended without the command's exit status (qemu {qemu_status}{qemu_stderr}); last console lines:\n{tail}"
    )]
    NoExitStatus {
        /// qemu's exit status.
        qemu_status: String,
        /// What qemu wrote to stderr, if anything (prefixed with `: `).
        qemu_stderr: String,
        /// The last console lines.
        tail: String,
    },
}

impl VmError {
    pub(crate) fn io(action: &str, path: &Path, source: std::io::Error) -> Self {
        VmError::Io {
            action: action.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }
}
