//! `meshauth lab-exec`: join a cgroup, then a network namespace, then exec.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use super::LabError;

/// Moves this process into `cgroup` (so every socket it and its exec'd
/// program open belongs to it), this thread into `netns`, and execs `cmd`
/// — as `uid` (gid the same, no supplementary groups) when given, after
/// joining both. Returns only on failure.
pub fn exec_in(
    netns: &Path,
    cgroup: Option<&Path>,
    uid: Option<u32>,
    cmd: &[OsString],
) -> LabError {
    let Some((program, args)) = cmd.split_first() else {
        return LabError::Invalid("lab-exec: no command after --".into());
    };
    if let Some(cg) = cgroup {
        let procs = cg.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            return LabError::io("writing", procs, e);
        }
    }
    if let Err(e) = super::netns::enter(netns) {
        return e;
    }
    let mut c = Command::new(program);
    c.args(args);
    if let Some(uid) = uid {
        // std drops the supplementary groups when root sets a uid.
        c.uid(uid).gid(uid);
    }
    let e = c.exec();
    LabError::sys("exec", Path::new(program).display(), e)
}
