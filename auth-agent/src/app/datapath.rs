//! Start phase: the datapath, loaded and attached. Pinned maps and links
//! are reused, so a restart changes nothing the kernel holds.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use auth_ebpf::{Datapath, LoadOptions};

use super::{AgentError, Start};
use crate::config::{Config, Mode};

/// Loads the datapath with the configured mode and checks, attaches it to
/// the pods' cgroup (the configured one or the one detected), and marks the
/// datapath ready. Returns the datapath, to hold for the agent's lifetime
/// (dropping it leaves programs attached and maps pinned), and the cgroup.
pub(super) fn load_and_attach(s: &Start<'_>) -> Result<(Datapath, PathBuf), AgentError> {
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
    datapath.attach(&cgroup)?;
    s.ready.datapath.store(true, Ordering::Relaxed);
    tracing::info!(cgroup = %cgroup.display(), "datapath attached");
    Ok((datapath, cgroup))
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
