//! Finding a pod's cgroup by its UID.
//!
//! kubelet names each pod's cgroup after the pod's `metadata.uid`: with the
//! systemd driver `kubepods[-<qos>].slice/kubepods-<qos>-pod<uid with _>.slice`,
//! with the cgroupfs driver `kubepods/<qos>/pod<uid>`. The pod's containers
//! are cgroups below it. The cgroup v2 id the datapath sees
//! (`bpf_skb_ancestor_cgroup_id`) is the inode number of that directory.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// How deep below the pods cgroup pod cgroups are looked for (kubepods →
/// qos → pod is 2; one more for layouts that nest a slice).
const MAX_DEPTH: usize = 3;

/// The UID a cgroup directory name carries, if it names a pod's cgroup:
/// the part after the last `pod`, without `.slice`, with systemd's `_`
/// turned back into `-`.
pub fn uid_of_dir(name: &str) -> Option<String> {
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let at = name.rfind("pod")?;
    let uid = &name[at + 3..];
    if uid.len() < 8
        || !uid
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
    {
        return None;
    }
    Some(uid.replace('_', "-").to_ascii_lowercase())
}

/// Pod UID → cgroup id, from scans of the pods cgroup.
#[derive(Debug)]
pub struct PodCgroups {
    root: PathBuf,
    by_uid: HashMap<String, (u64, PathBuf)>,
}

impl PodCgroups {
    /// Looks under `root`, the cgroup the programs are attached to.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            by_uid: HashMap::new(),
        }
    }

    /// The cgroup id of the pod with `uid` as of the last scan, if its
    /// directory is still that cgroup (not removed, not recreated). Call
    /// [`PodCgroups::rescan`] when a pod is missing.
    pub fn lookup(&self, uid: &str) -> Option<u64> {
        let (id, path) = self.by_uid.get(&uid.to_ascii_lowercase())?;
        std::fs::metadata(path)
            .is_ok_and(|m| m.ino() == *id)
            .then_some(*id)
    }

    /// The directory of the pod with `uid` as of the last scan, if it is
    /// still that cgroup.
    pub fn path(&self, uid: &str) -> Option<&Path> {
        let (id, path) = self.by_uid.get(&uid.to_ascii_lowercase())?;
        std::fs::metadata(path)
            .is_ok_and(|m| m.ino() == *id)
            .then_some(path.as_path())
    }

    /// Reads the tree again.
    pub fn rescan(&mut self) {
        self.by_uid.clear();
        let mut stack = vec![(self.root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if !meta.is_dir() {
                    continue;
                }
                let path = e.path();
                match e.file_name().to_str().and_then(uid_of_dir) {
                    // A pod's cgroup: its children are its containers.
                    Some(uid) => {
                        self.by_uid.insert(uid, (meta.ino(), path));
                    }
                    None if depth + 1 < MAX_DEPTH => stack.push((path, depth + 1)),
                    None => {}
                }
            }
        }
    }

    /// Forgets pods not in `keep` (their pods are gone).
    pub fn retain(&mut self, keep: &std::collections::BTreeSet<String>) {
        self.by_uid.retain(|uid, _| keep.contains(uid));
    }
}

/// The processes in cgroup `dir` and its children (a pod's containers),
/// lowest PID first. Empty when the cgroup is gone.
pub fn pids_in(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_names() {
        assert_eq!(
            uid_of_dir("kubepods-burstable-pod1b2c3d4e_5f60_4a7b_8c9d_0e1f2a3b4c5d.slice")
                .as_deref(),
            Some("1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d")
        );
        assert_eq!(
            uid_of_dir("pod1B2C3D4E-5F60-4A7B-8C9D-0E1F2A3B4C5D").as_deref(),
            Some("1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d")
        );
        assert_eq!(
            uid_of_dir("kubepods-pod0e1f2a3b_4c5d_4a7b_8c9d_1b2c3d4e5f60.slice").as_deref(),
            Some("0e1f2a3b-4c5d-4a7b-8c9d-1b2c3d4e5f60")
        );
        for not_a_pod in [
            "kubepods.slice",
            "kubepods-burstable.slice",
            "besteffort",
            "cri-containerd-0123456789abcdef.scope",
            "podx",
        ] {
            assert_eq!(uid_of_dir(not_a_pod), None, "{not_a_pod}");
        }
    }

    #[test]
    fn finds_pods_by_uid_at_any_qos_depth_and_follows_recreation() {
        let root = tempfile::tempdir().unwrap();
        let a = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d";
        let b = "0e1f2a3b-4c5d-4a7b-8c9d-1b2c3d4e5f60";
        let a_dir = root.path().join(format!("pod{a}"));
        let b_dir = root.path().join("kubepods-burstable.slice").join(format!(
            "kubepods-burstable-pod{}.slice",
            b.replace('-', "_")
        ));
        std::fs::create_dir_all(a_dir.join("container")).unwrap();
        std::fs::create_dir_all(&b_dir).unwrap();
        let mut pc = PodCgroups::new(root.path());
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(pc.lookup(a), None, "nothing before the first scan");
        pc.rescan();
        assert_eq!(pc.lookup(a), Some(ino(&a_dir)));
        assert_eq!(pc.lookup(&b.to_ascii_uppercase()), Some(ino(&b_dir)));
        assert_eq!(pc.lookup("ffffffff-0000-4000-8000-000000000000"), None);
        // The pod's cgroup goes and comes back (another directory): the
        // cached id is not trusted.
        std::fs::remove_dir_all(&a_dir).unwrap();
        assert_eq!(pc.lookup(a), None);
        std::fs::create_dir(&a_dir).unwrap();
        pc.rescan();
        assert_eq!(pc.lookup(a), Some(ino(&a_dir)));
    }
}
