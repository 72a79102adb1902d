//! Start phase: the datapath, loaded and attached. Pinned maps and links
//! are reused, so a restart changes nothing the kernel holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use auth_ebpf::{Datapath, LoadOptions};

use super::{AgentError, Start};
use crate::config::{Config, Mode};

/// Loads the datapath with the configured mode and checks and finds the
/// pods' cgroup (the configured one or the one detected). Attaches at once
/// when no programs are attached there yet (a first start); otherwise the
/// programs an earlier agent left attached keep enforcing with their maps
/// until [`attach`] after the first policy sync — a new build's maps may have been recreated
/// empty (another layout), and programs attached to them would pass or drop
/// everything until the first policy sync refilled them. Returns the
/// datapath, to hold for the agent's lifetime (dropping it leaves programs
/// attached and maps pinned), the cgroup, and whether attaching waits.
pub(super) fn load_and_attach(s: &Start<'_>) -> Result<(Datapath, PathBuf, bool), AgentError> {
    let config = s.config;
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: config.bpf_pin_dir.clone(),
        config: datapath_config(config),
        auth_capacity: Some(config.auth_map_capacity),
        ipcache_capacity: Some(config.ipcache_capacity),
    })?;
    tracing::info!(layout = ?datapath.layout_report(), pin_dir = %config.bpf_pin_dir.display(), "datapath loaded");
    let cgroup = match &config.pods_cgroup {
        Some(c) => c.clone(),
        None => auth_ebpf::attach::detect_pods_cgroup()?,
    };
    let attached = Datapath::pinned_links(&config.bpf_pin_dir, &cgroup).unwrap_or(0);
    if attached == 0 {
        attach(s, &mut datapath, &cgroup)?;
        return Ok((datapath, cgroup, false));
    }
    tracing::info!(cgroup = %cgroup.display(), links = attached, "programs already attached: they stay until the first policy sync has filled this build's maps");
    Ok((datapath, cgroup, true))
}

/// Attaches the loaded programs (replacing those left attached) and marks
/// the datapath ready.
pub(super) fn attach(
    s: &Start<'_>,
    datapath: &mut Datapath,
    cgroup: &Path,
) -> Result<(), AgentError> {
    datapath.attach(cgroup)?;
    s.ready.datapath.store(true, Ordering::Relaxed);
    tracing::info!(cgroup = %cgroup.display(), "datapath attached");
    Ok(())
}

/// The datapath's settings from the agent's.
fn datapath_config(config: &Config) -> auth_ebpf::maps::config::DatapathConfig {
    auth_ebpf::maps::config::DatapathConfig {
        mode: match config.mode {
            Mode::Enforce => auth_ebpf::maps::config::Mode::Enforce,
            Mode::Audit => auth_ebpf::maps::config::Mode::Audit,
        },
        drop_unknown_local: config.drop_unknown_pods,
        check_source: config.source_check,
        ..Default::default()
    }
}
