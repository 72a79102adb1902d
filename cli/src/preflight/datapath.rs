//! The functional probe: the real datapath loads on this kernel.
//!
//! The embedded object is loaded exactly as the agent loads it (maps created
//! and pinned, config written, both cgroup_skb programs through the
//! verifier), but under a temporary directory on bpffs, never the agent's
//! `meshauth/` pins, and nothing is attached. The directory and its pins are
//! removed and the programs closed before the check returns, also when
//! loading fails part way.

use std::path::{Path, PathBuf};

use auth_ebpf::{Datapath, LoadOptions};

use super::Check;

const NAME: &str = "datapath load";
const FIX: &str = "see the kernel version, kernel config and capabilities lines; \
                   run preflight as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)";

/// Removes the probe's pin directory (and every pin in it) when dropped.
#[derive(Debug)]
struct ProbeDir(PathBuf);

impl Drop for ProbeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "removing the preflight pin directory");
        }
    }
}

const PREFIX: &str = "meshauth-preflight-";

/// Where the probe pins under `bpffs`: unique to this process.
pub fn probe_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("{PREFIX}{}", std::process::id()))
}

/// Removes probe directories of preflight runs that no longer exist (killed
/// mid-probe, so their drop guard never ran); returns how many.
pub fn sweep_stale(bpffs: &Path, proc_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(bpffs) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !proc_dir.join(pid.to_string()).exists())
        })
        .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
        .count()
}

/// Loads the datapath into [`probe_dir`] and removes it again (first
/// sweeping what killed runs left, see [`sweep_stale`]).
pub fn probe(bpffs: &Path) -> Check {
    let swept = sweep_stale(bpffs, Path::new("/proc"));
    if swept > 0 {
        tracing::info!(count = swept, "removed probe directories of earlier runs");
    }
    let dir = ProbeDir(probe_dir(bpffs));
    let opts = LoadOptions {
        pin_dir: dir.0.clone(),
        ..LoadOptions::default()
    };
    let result = Datapath::load(&opts).map(|dp| {
        let maps = dp.layout_report().maps.len();
        drop(dp);
        maps
    });
    drop(dir);
    match result {
        Ok(maps) => Check::ok(
            NAME,
            format!(
                "the meshauth datapath loads on this kernel ({maps} maps, 2 programs verified; \
                 probe pins under {} removed)",
                bpffs.display()
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!(
                "the meshauth datapath does not load: {}",
                first_line(&e.to_string())
            ),
            FIX,
        ),
    }
}

/// The probe was not run (bpffs is missing, so there is nowhere to pin).
pub fn not_run(bpffs: &Path) -> Check {
    Check::warn(
        NAME,
        format!("not run: no bpffs at {}", bpffs.display()),
        "mount bpffs (see the bpffs line) and run preflight again",
    )
}

/// The first line of an error, at most 300 characters (a verifier log can
/// run to thousands of lines; the agent's log has all of it).
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    match line.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::Status;

    #[test]
    fn a_directory_that_is_not_bpffs_fails_and_is_cleaned_up() {
        let root = tempfile::tempdir().unwrap();
        let c = probe(root.path());
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.found.contains("not on a bpffs mount"), "{c:?}");
        assert!(
            !probe_dir(root.path()).exists(),
            "the probe directory is removed"
        );
    }

    #[test]
    fn stale_probe_directories_of_dead_runs_are_swept() {
        let bpffs = tempfile::tempdir().unwrap();
        let proc_dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(proc_dir.path().join("77")).unwrap();
        for name in [
            "meshauth-preflight-77",
            "meshauth-preflight-78",
            "meshauth",
            "meshauth-preflight-x",
        ] {
            std::fs::create_dir(bpffs.path().join(name)).unwrap();
        }
        assert_eq!(sweep_stale(bpffs.path(), proc_dir.path()), 1);
        let mut left: Vec<String> = std::fs::read_dir(bpffs.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["meshauth", "meshauth-preflight-77", "meshauth-preflight-x"]
        );
    }

    #[test]
    fn long_errors_are_cut() {
        assert_eq!(first_line("a\nb"), "a");
        let long = "x".repeat(400);
        assert_eq!(first_line(&long).chars().count(), 301);
    }
}
