//! Leftovers of runs killed before they could drop their lab.

use std::path::{Path, PathBuf};

use super::cgroup::{kill_cgroup, remove_cgroup_tree};
use super::netns;

/// Removes what earlier runs with this prefix left behind (killed before
/// they could drop their lab): namespaces `/run/netns/<prefix>-<pid>x<n>-*`
/// and cgroups `meshauth-lab-<prefix>-<pid>x<n>` whose process is gone
/// (or is this one: a lab it leaked).
/// Returns what it removed.
pub(super) fn cleanup_stale(prefix: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let stale = |rest: &str| -> bool {
        let uniq = rest.split('-').next().unwrap_or("");
        let Some((pid, seq)) = uniq.split_once('x') else {
            return false;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), seq.parse::<u32>()) else {
            return false;
        };
        pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists()
    };
    if let Ok(rd) = std::fs::read_dir(netns::NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(&format!("{prefix}-"))
                && stale(rest)
            {
                netns::remove(&e.path());
                removed.push(e.path());
            }
        }
    }
    for mount in auth_ebpf::attach::cgroup2_mounts() {
        let Ok(rd) = std::fs::read_dir(&mount) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(&format!("meshauth-lab-{prefix}-"))
                && stale(rest)
            {
                kill_cgroup(&e.path());
                remove_cgroup_tree(&e.path());
                removed.push(e.path());
            }
        }
    }
    removed
}
