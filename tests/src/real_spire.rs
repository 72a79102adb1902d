//! Real SPIRE for tests: the process harness is `meshauth_lab::spire_real`
//! (which the lab's real-SPIRE mode uses too); this adds what tests want
//! on top: the binaries found or a panic naming the fix (tests fail, never
//! skip, without them), and the uid the unix attestor sees.

use std::path::{Path, PathBuf};

pub use meshauth_lab::spire_real::{
    SpireAgent, SpireError, SpireServer, agent_settings, pinned_version, settings,
};

/// The directory holding `spire-server` and `spire-agent`
/// (`MESHAUTH_SPIRE_BIN`, which scripts/test sets, or the cache
/// scripts/build-spire keeps); panics with the fix when they are missing
/// or are not the pinned version.
pub fn spire_bin() -> PathBuf {
    meshauth_lab::spire_real::spire_bin(None).unwrap_or_else(|e| panic!("{e}"))
}

/// A server under `dir` with the harness's settings ([`settings`]).
pub fn start_server(bin: &Path, dir: &Path, trust_domain: &str) -> anyhow::Result<SpireServer> {
    Ok(SpireServer::start(bin, &settings(dir, trust_domain)?)?)
}

/// The effective user id of this process (the owner of `/proc/self`), which
/// SPIRE's unix workload attestor sees as `unix:uid:<uid>`.
pub fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .unwrap_or_else(|e| panic!("stat /proc/self: {e}"))
        .uid()
}

/// A tempdir for one test's SPIRE (`meshauth-spire-…`).
pub fn spire_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("meshauth-spire-")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir for SPIRE: {e}"))
}
