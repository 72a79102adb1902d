//! `meshauth lab-exec`: join a cgroup, then a network namespace, then exec.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use super::LabError;

/// Moves this process into `cgroup` (so every socket it and its exec'd
/// program open belongs to it), this thread into `netns`, and execs `cmd`
/// — as `uid` (gid the same, no supplementary groups) when given, after
/// joining both; a program given by path then runs even where the uid cannot
/// reach it (`/root/…`). Returns only on failure.
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
    let mut c = match uid {
        Some(_) if program.as_encoded_bytes().contains(&b'/') => {
            // The uid may not search the program's directories (a checkout
            // under /root, mode 0700): root opens it here and it is exec'd
            // through the descriptor, which closes on exec. The file itself
            // must still be executable by the uid. ELF programs only: a
            // script would find its interpreter's path closed.
            let file = match std::fs::File::open(program) {
                Ok(f) => f,
                Err(e) => return LabError::io("opening", Path::new(program), e),
            };
            let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
            let mut c = Command::new(format!("/proc/self/fd/{fd}"));
            c.arg0(program);
            c
        }
        _ => Command::new(program),
    };
    c.args(args);
    if let Some(uid) = uid {
        // std drops the supplementary groups when root sets a uid.
        c.uid(uid).gid(uid);
    }
    let e = c.exec();
    LabError::sys("exec", Path::new(program).display(), e)
}
