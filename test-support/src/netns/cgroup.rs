//! A cgroup v2 subtree per test, a child per pod.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::uniq;

/// The cgroup v2 mount of this machine.
pub fn cgroup2_root() -> PathBuf {
    auth_ebpf::attach::cgroup2_mounts()
        .into_iter()
        .next()
        .expect("this test needs a cgroup v2 mount (none in /proc/self/mountinfo)")
}

/// A cgroup v2 subtree for one test (the "kubepods" of the test), with a
/// child per pod. Drop kills what runs in it and removes it.
#[derive(Debug)]
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let path = cgroup2_root().join(format!("meshauth-test-{tag}-{}", uniq()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// A child cgroup (one pod).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
        p
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Children first (a cgroup with children cannot be removed).
        if let Ok(rd) = std::fs::read_dir(&self.path) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    kill_and_remove(&p);
                }
            }
        }
        kill_and_remove(&self.path);
    }
}

/// Kills what runs in the cgroup `dir` (cgroup.kill, kernel ≥ 5.14) and
/// removes it once its processes are gone (for up to a second).
fn kill_and_remove(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
