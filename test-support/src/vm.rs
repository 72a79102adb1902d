//! Runs a command inside a qemu VM that boots the host's Debian kernel (one
//! with `wireguard.ko`), so that tests can use kernel WireGuard, which the
//! host kernel may not have.
//!
//! virtme-style: the guest's root is the host's root, shared read-only over
//! virtio-9p under a tmpfs overlay (writes stay in the guest), so every host
//! binary — the test binary, `meshauth`, `wg`, python — is at the same path
//! with its libraries. The initramfs is generated here: static busybox, the
//! modules that mount 9p, and an `/init` that mounts proc, sysfs, devtmpfs,
//! devpts, a fresh `/run`, cgroup2 at `/sys/fs/cgroup` and bpffs at
//! `/sys/fs/bpf`, loads `wireguard` through the host's `modprobe` (module
//! autoloading uses it too), and runs the command in the caller's working
//! directory with exactly the environment given. The command's output
//! (serial console) is streamed to stderr and captured. The share is cached
//! in the guest (`cache=loose`): write what the command needs before
//! [`VmBuilder::run`]; host changes during the run may not be seen.
//!
//! KVM is used when it actually runs the guest, else TCG
//! (`MESHAUTH_VM_ACCEL=kvm|tcg` forces one). Needs root (9p shares `/` as
//! is), `qemu-system-x86_64`, `busybox` (static), a kernel in `/boot` with
//! its modules; `scripts/install-test-deps` installs them.
//!
//! ```no_run
//! use meshauth_test_support::vm::VmBuilder;
//! let out = VmBuilder::new().unwrap().run(&["wg", "show"]).unwrap();
//! assert_eq!(out.status, 0, "{}", out.output);
//! ```

mod error;
mod host;
mod initramfs;
mod kernel;
mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

pub use error::VmError;
pub use qemu::Accel;

use host::{find_in_path, is_static_elf};
use initramfs::{Cpio, InitParams};
use kernel::{BOOT_MODULES, Kernel};
use qemu::Qemu;

/// What to run when something the VM needs is missing.
pub const INSTALL_FIX: &str = "run scripts/install-test-deps (apt-get install qemu-system-x86 linux-image-amd64 busybox-static wireguard-tools)";

/// The console lines an error shows.
const TAIL_LINES: usize = 60;
/// How long qemu may take to power off after the command ended.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);
/// The 9p message size: large reads of big test binaries (512000 is the
/// most virtio transports accept).
const MSIZE: u32 = 512_000;
/// The environment every command starts from; [`VmBuilder::env`] adds to it
/// and overrides it.
const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
];

/// What the command did.
#[derive(Debug, Clone)]
pub struct VmOutput {
    /// Its exit status (128 + n when killed by signal n; 125 when the
    /// working directory does not exist in the guest; 127 when the program
    /// is not found).
    pub status: i32,
    /// Its stdout and stderr, interleaved as on a terminal (and any kernel
    /// message printed meanwhile), `\r` removed.
    pub output: String,
    /// From starting qemu to the command's start.
    pub boot_time: Duration,
    /// From starting qemu to its exit.
    pub total_time: Duration,
    /// The accelerator used.
    pub accel: Accel,
}

/// Configures and runs a VM; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct VmBuilder {
    qemu: PathBuf,
    busybox: PathBuf,
    kernel: Kernel,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    accel: Option<Accel>,
}

impl VmBuilder {
    /// Finds qemu, static busybox and the newest kernel with WireGuard; 2048
    /// MiB, min(host cores, 2) CPUs, a 10-minute timeout, the caller's
    /// current directory.
    pub fn new() -> Result<Self, VmError> {
        let qemu = find_in_path("qemu-system-x86_64").ok_or_else(|| VmError::Missing {
            what: "qemu-system-x86_64 (not in PATH)".into(),
            fix: INSTALL_FIX,
        })?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| VmError::Missing {
                what: "busybox (/bin/busybox)".into(),
                fix: INSTALL_FIX,
            })?;
        if !is_static_elf(&busybox) {
            return Err(VmError::Missing {
                what: format!(
                    "a static busybox ({} is dynamically linked)",
                    busybox.display()
                ),
                fix: INSTALL_FIX,
            });
        }
        let kernel = Kernel::find(Path::new("/boot"), Path::new("/lib/modules"))?;
        let cwd = std::env::current_dir().map_err(|e| VmError::io("reading", Path::new("."), e))?;
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            qemu,
            busybox,
            kernel,
            memory_mib: 2048,
            cpus: host_cpus.min(2) as u32,
            timeout: Duration::from_secs(600),
            env: Vec::new(),
            cwd,
            accel: None,
        })
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Guest CPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    /// How long boot, command and power-off may take together.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets an environment variable for the command (on top of `PATH`,
    /// `HOME=/root`, `LANG=C.UTF-8`; nothing else is inherited).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// The command's working directory (a host path, seen at the same path).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = dir.into();
        self
    }

    /// Forces an accelerator instead of probing (see [`Accel`]).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = Some(accel);
        self
    }

    /// The guest kernel's release (`uname -r` inside the VM).
    pub fn kernel_release(&self) -> &str {
        &self.kernel.release
    }

    /// Boots the VM, runs `argv` (looked up in the guest's `PATH`) and
    /// powers off. A non-zero exit status is not an error; no exit status
    /// (panic, timeout, qemu failure) is.
    pub fn run<S: AsRef<str>>(&self, argv: &[S]) -> Result<VmOutput, VmError> {
        let argv: Vec<String> = argv.iter().map(|a| a.as_ref().to_string()).collect();
        let env = self.command_env()?;
        if argv.is_empty() {
            return Err(VmError::InvalidArg {
                what: "argv",
                value: String::new(),
                reason: "needs a program",
            });
        }
        let cwd = self.cwd.to_str().ok_or_else(|| VmError::InvalidArg {
            what: "cwd",
            value: self.cwd.display().to_string(),
            reason: "must be UTF-8",
        })?;
        let boot_image = self.kernel.boot_image();
        let accel = match self.accel {
            Some(a) => a,
            None => Accel::detect(&self.qemu, &boot_image)?,
        };

        let dir = tempfile::Builder::new()
            .prefix("meshauth-vm-")
            .tempdir()
            .map_err(|e| {
                VmError::io(
                    "creating a temporary directory in",
                    &std::env::temp_dir(),
                    e,
                )
            })?;
        let nonce = nonce();
        let start_marker = format!("MESHAUTH-VM-START-{nonce}");
        let exit_marker = format!("MESHAUTH-VM-EXIT-{nonce}=");
        let initrd = dir.path().join("initramfs.cpio");
        let image = self.initramfs(&argv, cwd, &env, &start_marker, &exit_marker)?;
        std::fs::write(&initrd, image).map_err(|e| VmError::io("writing", &initrd, e))?;

        let mut cmd = Command::new(&self.qemu);
        cmd.args(accel.args())
            .args([
                "-smp",
                &self.cpus.to_string(),
                "-m",
                &self.memory_mib.to_string(),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&boot_image)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1 mitigations=off"])
            .args([
                "-fsdev",
                "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            ])
            .args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"])
            .args(["-device", "virtio-rng-pci"]);

        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut qemu = Qemu::spawn(cmd)?;
        let mut console: Vec<String> = Vec::new();
        let mut output: Vec<String> = Vec::new();
        let mut boot_time = None;
        // Blank lines are echoed when a line follows: the last one before
        // the marker is /init's.
        let mut held_blank = 0;
        let tail =
            |console: &[String]| console[console.len().saturating_sub(TAIL_LINES)..].join("\n");
        loop {
            let Some(line) = qemu.next_line(deadline) else {
                if Instant::now() >= deadline {
                    return Err(VmError::Timeout {
                        timeout: self.timeout,
                        accel,
                        tail: tail(&console),
                    });
                }
                let qemu_status = qemu.finish(POWEROFF_GRACE);
                let err = qemu.stderr();
                return Err(VmError::NoExitStatus {
                    qemu_status,
                    qemu_stderr: if err.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", err.trim())
                    },
                    tail: tail(&console),
                });
            };
            console.push(line.clone());
            if boot_time.is_none() {
                if line.contains(&start_marker) {
                    boot_time = Some(started.elapsed());
                }
                continue;
            }
            if let Some((before, status)) = line.split_once(&exit_marker) {
                if !before.is_empty() {
                    output.push(before.to_string());
                } else if output.last().is_some_and(String::is_empty) {
                    output.pop(); // the newline /init prints before the marker
                }
                let status = status.trim().parse().unwrap_or(-1);
                qemu.finish(POWEROFF_GRACE);
                return Ok(VmOutput {
                    status,
                    output: output.join("\n"),
                    boot_time: boot_time.unwrap_or_default(),
                    total_time: started.elapsed(),
                    accel,
                });
            }
            if line.is_empty() {
                held_blank += 1;
            } else {
                eprint!("{}", "\n".repeat(held_blank));
                eprintln!("{line}");
                held_blank = 0;
            }
            output.push(line);
        }
    }

    /// [`BASE_ENV`] with the caller's variables, checked.
    fn command_env(&self) -> Result<Vec<(String, String)>, VmError> {
        let mut env: Vec<(String, String)> = BASE_ENV
            .iter()
            .filter(|(k, _)| !self.env.iter().any(|(key, _)| key == k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in &self.env {
            if k.is_empty() || k.contains(['=', '\0']) {
                return Err(VmError::InvalidArg {
                    what: "env key",
                    value: k.clone(),
                    reason: "must be non-empty, without `=` or NUL",
                });
            }
            if v.contains('\0') {
                return Err(VmError::InvalidArg {
                    what: "env value",
                    value: v.clone(),
                    reason: "must not contain NUL",
                });
            }
            env.push((k.clone(), v.clone()));
        }
        Ok(env)
    }

    fn initramfs(
        &self,
        argv: &[String],
        cwd: &str,
        env: &[(String, String)],
        start_marker: &str,
        exit_marker: &str,
    ) -> Result<Vec<u8>, VmError> {
        let mut cpio = Cpio::default();
        for d in ["bin", "dev", "modules"] {
            cpio.dir(d);
        }
        cpio.char_device("dev/console", 5, 1);
        let busybox =
            std::fs::read(&self.busybox).map_err(|e| VmError::io("reading", &self.busybox, e))?;
        cpio.file("bin/busybox", 0o755, &busybox);
        let mut names = Vec::new();
        for (name, data) in self.kernel.boot_modules(BOOT_MODULES)? {
            cpio.file(&format!("modules/{name}"), 0o644, &data);
            names.push(name);
        }
        let init = initramfs::init_script(&InitParams {
            modules: &names,
            env,
            start_marker,
            exit_marker,
            mount_tag: "hostroot",
            msize: MSIZE,
        });
        cpio.file("init", 0o755, init.as_bytes());
        cpio.file(
            "cmd.sh",
            0o644,
            initramfs::command_script(cwd, argv).as_bytes(),
        );
        Ok(cpio.finish())
    }
}

/// Unique per run: the markers must not match anything the command prints.
fn nonce() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{:x}{:x}{:x}",
        std::process::id(),
        nanos,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_env_is_refused_before_booting() {
        let vm = VmBuilder::new().expect("VM prerequisites").env("A=B", "x");
        let err = vm.run(&["true"]).expect_err("a key with `=`");
        assert!(err.to_string().contains("env key \"A=B\""), "{err}");
    }
}
