//! Network-namespace harness: one netns per pod (and per node where a test
//! needs one), veth pairs, a cgroup v2 per pod, and pod processes (peer.py)
//! placed in their cgroup before they open any socket. Everything is removed
//! on drop, also when the test panics. Traffic stays inside namespaces the
//! test created.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique tag: interface names are limited to 15 bytes.
pub fn uniq() -> String {
    format!(
        "{:x}{}",
        std::process::id() % 0xffff,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(cmd: &str) {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("running `{cmd}`: {e}"));
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace made with `ip netns add`.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("ma-{tag}-{}", uniq());
        sh(&format!("ip netns add {name}"));
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) {
        sh(&format!("ip -n {} {args}", self.name));
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) {
        sh(&format!("ip netns exec {} {cmd}", self.name));
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair `a_if` in `a` ↔ `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    sh(&format!(
        "ip link add {a_if} netns {} type veth peer name {b_if} netns {}",
        a.name, b.name
    ));
    a.ip(&format!("link set {a_if} up"));
    b.ip(&format!("link set {b_if} up"));
}

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
        // Children first; kill their processes (cgroup.kill, kernel ≥ 5.14).
        if let Ok(rd) = std::fs::read_dir(&self.path) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    let _ = std::fs::write(p.join("cgroup.kill"), "1");
                    for _ in 0..50 {
                        if std::fs::remove_dir(&p).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A pod's process: peer.py in the pod's cgroup and netns.
#[derive(Debug)]
pub struct Pod {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pub name: String,
}

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/peer.py");

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

/// Runs `f` on a thread that has entered `ns`'s network namespace (setns is
/// per thread), and returns its result.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// The ifindex of `dev` in `ns`.
pub fn ifindex(ns: &Netns, dev: &str) -> u32 {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-o", "link", "show", "dev", dev])
        .output()
        .expect("ip link show");
    let s = String::from_utf8_lossy(&out.stdout);
    s.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex for {dev} in {}: {s}", ns.name))
}
