//! A pod's process: peer.py in the pod's cgroup and netns, driven one
//! command line at a time (the commands are listed at the top of peer.py).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::Netns;

/// peer.py, next to this file: run from its path so the pod's python
/// reports errors with file and line.
const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/netns/peer.py");

/// A pod's process: peer.py in the pod's cgroup and netns.
#[derive(Debug)]
pub struct Pod {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pub name: String,
}

impl Pod {
    /// Starts the process: the shell writes its own pid into the cgroup
    /// (from the root mount namespace, where the cgroup tree is visible),
    /// then execs into the netns: every socket is created in the cgroup.
    pub fn spawn(name: &str, ns: &Netns, cgroup: &Path) -> Self {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net={} python3 -u {PEER}",
            cgroup.display(),
            ns.path().display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning pod {name}: {e}"));
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            name: name.to_string(),
        }
    }

    /// Sends one command and returns its one-line answer.
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}")
            .unwrap_or_else(|e| panic!("pod {}: writing {line}: {e}", self.name));
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("pod {}: no answer to `{line}`: {e}", self.name))
    }

    /// Sends a command that must answer "ok".
    pub fn ok(&mut self, line: &str) {
        let got = self.cmd(line);
        assert_eq!(got, "ok", "pod {}: `{line}`", self.name);
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
