//! Network namespaces: made by `unshare(CLONE_NEWNET)` on a thread of their
//! own and kept by a bind mount under `/run/netns` (where `ip netns` sees
//! them); entered per thread (setns is per thread).

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use super::LabError;

/// Where named network namespaces live (as with `ip netns`).
pub const NETNS_DIR: &str = "/run/netns";

/// Creates the network namespace `/run/netns/<name>` with loopback up and
/// IPv6 duplicate address detection off (addresses usable at once).
pub fn create(name: &str) -> Result<PathBuf, LabError> {
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| LabError::io("creating", NETNS_DIR, e))?;
    let path = Path::new(NETNS_DIR).join(name);
    std::fs::File::create_new(&path).map_err(|e| LabError::io("creating", &path, e))?;
    let mount_on = path.clone();
    let made = std::thread::scope(|s| {
        s.spawn(|| -> Result<(), LabError> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| LabError::sys("unshare(CLONE_NEWNET)", name, e.into()))?;
            rustix::mount::mount_bind("/proc/thread-self/ns/net", &mount_on)
                .map_err(|e| LabError::sys("bind mount", mount_on.display(), e.into()))?;
            // The new namespace's own /proc/sys/net (it follows the thread).
            sysctl("net/ipv6/conf/all/accept_dad", "0")?;
            sysctl("net/ipv6/conf/default/accept_dad", "0")?;
            Ok(())
        })
        .join()
        .map_err(|_| LabError::Thread(format!("creating netns {name}")))?
    });
    if let Err(e) = made {
        remove(&path);
        return Err(e);
    }
    super::netlink::in_ns(&path, |h| async move {
        let lo = super::netlink::ifindex(&h, "lo").await?;
        super::netlink::link_up(&h, lo).await
    })?;
    Ok(path)
}

/// Removes a namespace made by [`create`]: unmount and unlink. Idempotent.
pub fn remove(path: &Path) {
    let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
    let _ = std::fs::remove_file(path);
}

/// Writes `/proc/sys/<key>` of the calling thread's network namespace.
pub fn sysctl(key: &str, value: &str) -> Result<(), LabError> {
    let p = Path::new("/proc/sys").join(key);
    std::fs::write(&p, value).map_err(|e| LabError::io("writing", &p, e))
}

/// Runs `f` on a new thread that has entered the network namespace at `path`.
pub fn run_in<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, LabError> + Send,
) -> Result<T, LabError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(path)?;
            f()
        })
        .join()
        .map_err(|_| LabError::Thread(format!("in netns {}", path.display())))?
    })
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> Result<(), LabError> {
    let file = std::fs::File::open(path).map_err(|e| LabError::io("opening", path, e))?;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| LabError::sys("setns", path.display(), e.into()))
}
