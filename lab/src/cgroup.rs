//! Cgroup v2 chores: kill a subtree, remove it.

use std::path::Path;
use std::time::{Duration, Instant};

/// Kills every process in a cgroup subtree (`cgroup.kill`) and waits up to
/// 2 s until it is empty.
pub(super) fn kill_cgroup(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match std::fs::read_to_string(dir.join("cgroup.events")) {
            Ok(ev) if ev.lines().any(|l| l == "populated 1") => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => return,
        }
    }
}

/// Removes a cgroup and its children, deepest first.
pub(super) fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
