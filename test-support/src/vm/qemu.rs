//! The qemu process: which accelerator works here, its command line, and a
//! guard that kills it when dropped.

use std::fmt;
use std::io::{BufRead as _, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use super::VmError;

/// How qemu runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm` (`-cpu host`).
    Kvm,
    /// qemu's own emulator, multi-threaded (`-cpu max`): slower, works anywhere.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl Accel {
    /// The `-accel` and `-cpu` arguments.
    pub(crate) fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }

    /// `MESHAUTH_VM_ACCEL=kvm|tcg` if set, else KVM when it boots `kernel`,
    /// else TCG. Probed once per host boot (remembered in the temp dir).
    pub(crate) fn detect(qemu: &Path, kernel: &Path) -> Result<Accel, VmError> {
        static DETECTED: OnceLock<Accel> = OnceLock::new();
        match std::env::var("MESHAUTH_VM_ACCEL").as_deref() {
            Ok("kvm") => return Ok(Accel::Kvm),
            Ok("tcg") => return Ok(Accel::Tcg),
            Ok(other) => {
                return Err(VmError::InvalidArg {
                    what: "MESHAUTH_VM_ACCEL",
                    value: other.to_string(),
                    reason: "must be `kvm` or `tcg`",
                });
            }
            Err(_) => {}
        }
        Ok(*DETECTED.get_or_init(|| {
            // Remembered per host boot, so that each test binary does not
            // pay for the probe again.
            let cache = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|id| std::env::temp_dir().join(format!("meshauth-vm-accel-{}", id.trim())));
            let cached = cache.as_ref().and_then(|c| std::fs::read_to_string(c).ok());
            let (accel, why) = match cached.as_deref().and_then(|c| c.split_once('\n')) {
                Some(("kvm", why)) => (Accel::Kvm, format!("{why} (probed earlier in this boot)")),
                Some(("tcg", why)) => (Accel::Tcg, format!("{why} (probed earlier in this boot)")),
                _ => {
                    let (accel, why) = probe_kvm(qemu, kernel);
                    if let Some(c) = &cache {
                        let _ = std::fs::write(c, format!("{accel}\n{why}"));
                    }
                    (accel, why)
                }
            };
            eprintln!("meshauth-vm: using {accel}: {why}; MESHAUTH_VM_ACCEL=kvm|tcg forces one");
            accel
        }))
    }
}

/// How long a KVM guest may take to boot to the missing root (about 1 s).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `/dev/kvm` can exist and open while the guest hangs early or dies on an
/// "emulation failure" (nested virtualisation that does not work): boot the
/// kernel without a root under KVM and wait for it to get to the end, the
/// panic for want of a root file system.
fn probe_kvm(qemu: &Path, kernel: &Path) -> (Accel, String) {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return (Accel::Tcg, format!("/dev/kvm: {e}"));
    }
    let mut cmd = Command::new(qemu);
    cmd.args(Accel::Kvm.args())
        .args([
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=7"]);
    let mut qemu = match Qemu::spawn(cmd) {
        Ok(q) => q,
        Err(e) => return (Accel::Tcg, format!("probing KVM: {e}")),
    };
    let deadline = Instant::now() + KVM_PROBE_TIMEOUT;
    while let Some(line) = qemu.next_line(deadline) {
        if line.contains("Kernel panic") {
            return (Accel::Kvm, "the kernel boots under KVM".into());
        }
    }
    let err = qemu.stderr();
    (
        Accel::Tcg,
        format!(
            "/dev/kvm opens but the kernel did not boot under KVM within {KVM_PROBE_TIMEOUT:?}{}",
            if err.trim().is_empty() {
                String::new()
            } else {
                format!(" (qemu: {})", err.trim())
            }
        ),
    )
}

/// A running qemu whose serial console arrives line by line; killed on drop.
#[derive(Debug)]
pub(crate) struct Qemu {
    child: Child,
    lines: Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Qemu {
    /// Starts `cmd` with the console (serial on stdio) read by a thread.
    pub fn spawn(mut cmd: Command) -> Result<Self, VmError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| VmError::Spawn { program, source })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf);
                if tx
                    .send(line.trim_end_matches(['\n', '\r']).to_string())
                    .is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Ok(Self {
            child,
            lines,
            stderr: Some(stderr),
        })
    }

    /// The next console line, or `None` at `deadline` or when qemu has
    /// closed its console (exited).
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        self.lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    }

    /// Waits up to `grace` for qemu to exit by itself, then kills it; its
    /// exit status.
    pub fn finish(&mut self, grace: Duration) -> String {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    self.kill();
                    return "killed".into();
                }
            }
        }
    }

    /// What qemu wrote to stderr; kills it first so that the pipe closes.
    pub fn stderr(&mut self) -> String {
        self.kill();
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}
