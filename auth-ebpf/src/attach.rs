//! Attaching the programs to the pods' cgroup v2 as pinned bpf_links.
//!
//! Links are pinned under `<pin_dir>/links/<cgroup inode>/<direction>_<gen>`
//! (bpffs refuses names with a dot),
//! so they outlive the agent: a restart (or a crash) leaves enforcement in
//! place. Re-attaching attaches the new program first, pins it as the next
//! generation, then releases the older links: cgroup bpf_links are
//! multi-attach, so for a moment both run (a packet passes only if both
//! pass it) and no packet meets an unenforced cgroup. The new programs must
//! not be attached before their maps hold the node's state: an agent that
//! finds links pinned attaches only after its first policy sync.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkbAttachType};

use crate::error::DatapathError;
use crate::loader::{Datapath, program_mut, program_name};
use crate::types::Direction;

const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Candidate names of the cgroup holding all pods, by kubelet's cgroup
/// driver: systemd (`kubepods.slice`) and cgroupfs (`kubepods`).
pub const KUBELET_POD_CGROUPS: &[&str] = &["kubepods.slice", "kubepods"];

/// The cgroup v2 mount points of this machine, from `/proc/self/mountinfo`.
pub fn cgroup2_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| cgroup2_mounts_in(&info))
        .unwrap_or_default()
}

/// The cgroup v2 mount points listed in a mountinfo text.
pub fn cgroup2_mounts_in(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            if fstype != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(left.split_whitespace().nth(4)?))
        })
        .collect()
}

/// Finds the pods' cgroup: the first of [`KUBELET_POD_CGROUPS`] under any
/// cgroup v2 mount.
pub fn detect_pods_cgroup() -> Result<PathBuf, DatapathError> {
    detect_pods_cgroup_in(&cgroup2_mounts())
}

/// [`detect_pods_cgroup`] over given cgroup v2 mount points.
pub fn detect_pods_cgroup_in(mounts: &[PathBuf]) -> Result<PathBuf, DatapathError> {
    let mut tried = Vec::new();
    for mount in mounts {
        for name in KUBELET_POD_CGROUPS {
            let p = mount.join(name);
            if p.is_dir() {
                return Ok(p);
            }
            tried.push(p.display().to_string());
        }
    }
    if tried.is_empty() {
        tried.push("(no cgroup2 mount in /proc/self/mountinfo)".to_string());
    }
    Err(DatapathError::NoPodsCgroup {
        tried: tried.join(", "),
    })
}

/// Where one cgroup's links are pinned.
fn links_dir(pin_dir: &Path, cgroup: &Path) -> Result<PathBuf, DatapathError> {
    let ino = std::fs::metadata(cgroup)
        .map_err(DatapathError::io("stat", cgroup))?
        .ino();
    Ok(pin_dir.join("links").join(ino.to_string()))
}

/// Pinned generations of one direction's link, oldest first.
fn pinned_generations(dir: &Path, direction: Direction) -> Vec<(u64, PathBuf)> {
    let prefix = format!("{}_", direction.as_str());
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let gen_ = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((gen_, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn check_cgroup2(path: &Path) -> Result<File, DatapathError> {
    let st = rustix::fs::statfs(path).map_err(|e| DatapathError::Io {
        call: "statfs",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    if st.f_type as u64 != CGROUP2_SUPER_MAGIC {
        return Err(DatapathError::Invalid {
            what: "cgroup (not on a cgroup v2 mount)",
            value: path.display().to_string(),
        });
    }
    File::open(path).map_err(DatapathError::io("open", path))
}

impl Datapath {
    /// Attaches both programs to `cgroup` (its whole subtree) as pinned
    /// links, replacing links an earlier agent left pinned for it: both new
    /// links first, then the old ones are released. When the load set aside
    /// a tracked-flow map of another layout, its flows are copied into the
    /// new map before the new programs run, and once more (those opened in
    /// between) before the old programs stop.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let file = check_cgroup2(cgroup)?;
        let dir = links_dir(self.pin_dir(), cgroup)?;
        std::fs::create_dir_all(&dir).map_err(DatapathError::io("mkdir", &dir))?;
        if let Some(ct) = &self.previous_ct {
            let n = ct.copy_into(self.pin_dir(), true)?;
            tracing::info!(flows = n, "tracked flows copied from the replaced map");
        }
        let mut replaced = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            let name = program_name(direction);
            let attach_type = match direction {
                Direction::Ingress => CgroupSkbAttachType::Ingress,
                Direction::Egress => CgroupSkbAttachType::Egress,
            };
            let old = pinned_generations(&dir, direction);
            let next = old.last().map_or(0, |(g, _)| g + 1);
            let prog = program_mut(&mut self.ebpf, name)?;
            let id = prog
                .attach(&file, attach_type, CgroupAttachMode::default())
                .map_err(DatapathError::program(name))?;
            let link = prog.take_link(id).map_err(DatapathError::program(name))?;
            let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
                path: cgroup.to_path_buf(),
                source,
            })?;
            let path = dir.join(format!("{}_{next}", direction.as_str()));
            fd_link.pin(&path).map_err(|source| DatapathError::Pin {
                path: path.clone(),
                source,
            })?;
            replaced.extend(old.into_iter().map(|(_, p)| p));
            tracing::info!(cgroup = %cgroup.display(), direction = direction.as_str(), pin = %path.display(), "attached");
        }
        if let Some(ct) = self.previous_ct.take() {
            let n = ct.copy_into(self.pin_dir(), false)?;
            tracing::info!(
                flows = n,
                "tracked flows opened meanwhile copied from the replaced map"
            );
        }
        for p in replaced {
            release_link(&p)?;
        }
        Ok(())
    }

    /// Detaches meshauth from `cgroup`: releases every pinned link for it.
    pub fn detach(pin_dir: &Path, cgroup: &Path) -> Result<usize, DatapathError> {
        let dir = links_dir(pin_dir, cgroup)?;
        let mut n = 0;
        for direction in [Direction::Ingress, Direction::Egress] {
            for (_, p) in pinned_generations(&dir, direction) {
                release_link(&p)?;
                n += 1;
            }
        }
        let _ = std::fs::remove_dir(&dir);
        Ok(n)
    }

    /// How many links are pinned for `cgroup` (per direction, summed).
    pub fn pinned_links(pin_dir: &Path, cgroup: &Path) -> Result<usize, DatapathError> {
        let dir = links_dir(pin_dir, cgroup)?;
        Ok([Direction::Ingress, Direction::Egress]
            .into_iter()
            .map(|d| pinned_generations(&dir, d).len())
            .sum())
    }
}

/// Unpins a link and drops it, which detaches it.
fn release_link(path: &Path) -> Result<(), DatapathError> {
    let pinned = PinnedLink::from_pin(path).map_err(|source| DatapathError::Link {
        path: path.to_path_buf(),
        source,
    })?;
    let link = pinned.unpin().map_err(DatapathError::io("unpin", path))?;
    drop(link);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,name=systemd
";

    #[test]
    fn finds_cgroup2_mounts_in_mountinfo() {
        assert_eq!(
            cgroup2_mounts_in(HYBRID),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert!(cgroup2_mounts_in("garbage line\n\n").is_empty());
    }

    #[test]
    fn detects_kubelet_layouts_in_order() {
        let root = tempfile::tempdir().unwrap();
        let mounts = vec![root.path().to_path_buf()];
        let err = detect_pods_cgroup_in(&mounts).unwrap_err().to_string();
        assert!(
            err.contains("kubepods.slice") && err.contains("kubepods"),
            "{err}"
        );
        std::fs::create_dir(root.path().join("kubepods")).unwrap();
        assert_eq!(
            detect_pods_cgroup_in(&mounts).unwrap(),
            root.path().join("kubepods")
        );
        std::fs::create_dir(root.path().join("kubepods.slice")).unwrap();
        assert_eq!(
            detect_pods_cgroup_in(&mounts).unwrap(),
            root.path().join("kubepods.slice"),
            "systemd driver layout first"
        );
        assert!(
            detect_pods_cgroup_in(&[])
                .unwrap_err()
                .to_string()
                .contains("no cgroup2 mount")
        );
    }
}
