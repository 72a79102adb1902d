//! `meshauth lab-exec`: join a cgroup, then a network namespace, then exec.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use super::LabError;

/// Moves this process into `cgroup` (so every socket it and its exec'd
/// program open belongs to it), this thread into `netns`, and execs `cmd`.
/// Returns only on failure.
pub fn exec_in(netns: &Path, cgroup: Option<&Path>, cmd: &[OsString]) -> LabError {
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
    let e = Command::new(program).args(args).exec();
    LabError::sys("exec", Path::new(program).display(), e)
}
