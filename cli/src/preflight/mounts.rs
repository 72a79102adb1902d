//! Mounts: bpffs for the pins, cgroup v2 and the pods' cgroup for the programs.

use std::path::{Path, PathBuf};

use auth_ebpf::attach::{KUBELET_POD_CGROUPS, detect_pods_cgroup_in};

use super::Check;

const BPFFS: &str = "bpffs";
const CGROUP2: &str = "cgroup v2";
const PODS: &str = "pods cgroup";

/// Mount points of filesystems of type `fstype` in a mountinfo text.
pub fn mounts_of(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != fstype {
                return None;
            }
            Some(PathBuf::from(left.split_whitespace().nth(4)?))
        })
        .collect()
}

/// bpffs (type `bpf`) mounted at `dir`; FAIL with the mount command otherwise.
pub fn bpffs(mountinfo: &str, dir: &Path) -> Check {
    let mounts = mounts_of(mountinfo, "bpf");
    if mounts.iter().any(|m| m == dir) {
        return Check::ok(BPFFS, format!("mounted at {}", dir.display()));
    }
    let elsewhere = if mounts.is_empty() {
        "no bpf filesystem in /proc/self/mountinfo".to_string()
    } else {
        format!(
            "bpf filesystem mounted only at {}",
            mounts
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Check::fail(
        BPFFS,
        format!("not mounted at {}: {elsewhere}", dir.display()),
        format!(
            "mount -t bpf bpf {} (and persist it: a bpffs line in /etc/fstab or the DaemonSet's hostPath mount)",
            dir.display()
        ),
    )
}

/// At least one cgroup v2 mount.
pub fn cgroup2(mounts: &[PathBuf]) -> Check {
    if mounts.is_empty() {
        return Check::fail(
            CGROUP2,
            "no cgroup2 filesystem in /proc/self/mountinfo",
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) or mount -t cgroup2 none /sys/fs/cgroup",
        );
    }
    Check::ok(CGROUP2, format!("mounted at {}", list(mounts)))
}

/// The pods' cgroup: `given` (the `--pods-cgroup` flag), which must be a
/// directory under a cgroup v2 mount, or the first of kubelet's names
/// (`kubepods.slice`, `kubepods`) under one.
pub fn pods_cgroup(mounts: &[PathBuf], given: Option<&Path>) -> Check {
    let Some(given) = given else {
        return match detect_pods_cgroup_in(mounts) {
            Ok(p) => Check::ok(PODS, format!("{} (detected)", p.display())),
            Err(_) => Check::fail(
                PODS,
                format!(
                    "no kubepods cgroup under {} (looked for {})",
                    if mounts.is_empty() {
                        "any cgroup v2 mount".to_string()
                    } else {
                        list(mounts)
                    },
                    KUBELET_POD_CGROUPS.join(", ")
                ),
                "set --pods-cgroup to the cgroup v2 directory holding all pods",
            ),
        };
    };
    if !given.is_dir() {
        return Check::fail(
            PODS,
            format!("--pods-cgroup {}: no such directory", given.display()),
            "set --pods-cgroup to the cgroup v2 directory holding all pods",
        );
    }
    if !mounts.iter().any(|m| given.starts_with(m)) {
        return Check::fail(
            PODS,
            format!(
                "--pods-cgroup {} is not under a cgroup v2 mount ({})",
                given.display(),
                if mounts.is_empty() {
                    "there is none".to_string()
                } else {
                    list(mounts)
                }
            ),
            "set --pods-cgroup to a directory under the cgroup v2 mount",
        );
    }
    Check::ok(PODS, format!("{} (--pods-cgroup)", given.display()))
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::Status;

    const MOUNTINFO: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
25 22 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
41 25 0:38 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    fn with_bpffs(at: &str) -> String {
        format!("{MOUNTINFO}42 25 0:39 / {at} rw,relatime shared:10 - bpf bpf rw,mode=700\n")
    }

    #[test]
    fn bpffs_at_the_expected_place_is_ok() {
        let c = bpffs(&with_bpffs("/sys/fs/bpf"), Path::new("/sys/fs/bpf"));
        assert_eq!(c.status, Status::Ok, "{c:?}");
    }

    #[test]
    fn mountinfo_without_bpf_fails_with_the_mount_command() {
        let c = bpffs(MOUNTINFO, Path::new("/sys/fs/bpf"));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.found.contains("no bpf filesystem"), "{c:?}");
        assert!(
            c.fix.unwrap().starts_with("mount -t bpf bpf /sys/fs/bpf"),
            "fix names the command"
        );
        let c = bpffs(&with_bpffs("/run/bpf"), Path::new("/sys/fs/bpf"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.found.contains("mounted only at /run/bpf"), "{c:?}");
    }

    #[test]
    fn cgroup2_mounts() {
        assert_eq!(
            mounts_of(MOUNTINFO, "cgroup2"),
            [PathBuf::from("/sys/fs/cgroup")]
        );
        assert_eq!(cgroup2(&mounts_of(MOUNTINFO, "cgroup2")).status, Status::Ok);
        let c = cgroup2(&[]);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("mount -t cgroup2"));
    }

    #[test]
    fn pods_cgroup_missing_fails_naming_the_mounts_and_the_flag() {
        let root = tempfile::tempdir().unwrap();
        let c = pods_cgroup(&[root.path().to_owned()], None);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert_eq!(
            c.found,
            format!(
                "no kubepods cgroup under {} (looked for kubepods.slice, kubepods)",
                root.path().display()
            )
        );
        assert!(c.fix.unwrap().contains("--pods-cgroup"));

        std::fs::create_dir(root.path().join("kubepods")).unwrap();
        let c = pods_cgroup(&[root.path().to_owned()], None);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.found.ends_with("/kubepods (detected)"), "{c:?}");
    }

    #[test]
    fn a_given_pods_cgroup_must_exist_under_a_cgroup2_mount() {
        let root = tempfile::tempdir().unwrap();
        let mounts = [root.path().to_owned()];
        let pods = root.path().join("pods");
        let c = pods_cgroup(&mounts, Some(&pods));
        assert_eq!(c.status, Status::Fail);
        assert!(c.found.contains("no such directory"), "{c:?}");
        std::fs::create_dir(&pods).unwrap();
        assert_eq!(pods_cgroup(&mounts, Some(&pods)).status, Status::Ok);
        let c = pods_cgroup(&[PathBuf::from("/sys/fs/cgroup")], Some(&pods));
        assert_eq!(c.status, Status::Fail);
        assert!(c.found.contains("not under a cgroup v2 mount"), "{c:?}");
    }
}
