//! The lab's hidden helpers: `meshauth lab-exec` (run a command in a pod's
//! cgroup and netns) and `meshauth lab-pod` (a pod's workload).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Network namespace file to enter.
    #[arg(long)]
    netns: PathBuf,
    /// Cgroup v2 directory to join first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Run the command as this uid (and gid), with no supplementary
    /// groups: a pod's own user.
    #[arg(long)]
    uid: Option<u32>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<OsString>,
}

/// Replaces this process with the command; returns only on failure.
pub fn exec(args: &ExecArgs) -> ExitCode {
    let e = meshauth_lab::exec::exec_in(&args.netns, args.cgroup.as_deref(), args.uid, &args.cmd);
    eprintln!("meshauth lab-exec: {e}");
    ExitCode::from(127)
}

pub fn pod() -> ExitCode {
    match meshauth_lab::pod::run_stdio() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshauth lab-pod: {e}");
            ExitCode::FAILURE
        }
    }
}
