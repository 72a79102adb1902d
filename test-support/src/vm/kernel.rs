//! The guest kernel: the newest `/boot/vmlinuz-<release>` whose
//! `/lib/modules/<release>` has WireGuard, and its modules with their
//! dependencies (from `modules.dep`), uncompressed for the initramfs.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{INSTALL_FIX, VmError};

/// The modules the initramfs loads before it can mount the host's root:
/// PCI virtio transport, 9p over virtio, overlayfs for a writable root, and
/// the virtio RNG. Everything else is loaded later by the host's `modprobe`.
pub(crate) const BOOT_MODULES: &[&str] =
    &["virtio_pci", "virtio_rng", "9pnet_virtio", "9p", "overlay"];

/// A kernel image and its module tree.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// `uname -r` inside the guest, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// `/boot/vmlinuz-<release>`.
    pub image: PathBuf,
    /// `/lib/modules/<release>`.
    pub modules: PathBuf,
}

impl Kernel {
    /// The newest kernel under `boot` with a WireGuard module under `lib_modules`.
    pub fn find(boot: &Path, lib_modules: &Path) -> Result<Self, VmError> {
        let entries = std::fs::read_dir(lib_modules).map_err(|e| VmError::Missing {
            what: format!("a kernel module tree ({}: {e})", lib_modules.display()),
            fix: INSTALL_FIX,
        })?;
        let mut found: Vec<Kernel> = Vec::new();
        let mut rejected = Vec::new();
        for entry in entries.flatten() {
            let release = entry.file_name().to_string_lossy().into_owned();
            let kernel = Kernel {
                image: boot.join(format!("vmlinuz-{release}")),
                modules: entry.path(),
                release,
            };
            let dep =
                std::fs::read_to_string(kernel.modules.join("modules.dep")).unwrap_or_default();
            if !kernel.image.is_file() {
                rejected.push(format!("{}: no {}", kernel.release, kernel.image.display()));
            } else if !dep.lines().any(|l| {
                l.split(':')
                    .next()
                    .is_some_and(|m| module_name(m) == "wireguard")
            }) {
                rejected.push(format!(
                    "{}: no wireguard.ko in modules.dep",
                    kernel.release
                ));
            } else {
                found.push(kernel);
            }
        }
        found.sort_by_key(|k| version_key(&k.release));
        found.pop().ok_or_else(|| VmError::Missing {
            what: format!(
                "a kernel with WireGuard (/boot/vmlinuz-<release> and wireguard.ko in /lib/modules/<release>; {})",
                if rejected.is_empty() { "none installed".to_string() } else { rejected.join(", ") }
            ),
            fix: INSTALL_FIX,
        })
    }

    /// The uncompressed `.ko` files for `names` and everything they depend
    /// on, in load order (dependencies first), as (file name, contents).
    /// Modules built into the kernel are left out.
    pub fn boot_modules(&self, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>, VmError> {
        let dep_path = self.modules.join("modules.dep");
        let dep =
            std::fs::read_to_string(&dep_path).map_err(|e| VmError::io("reading", &dep_path, e))?;
        let builtin =
            std::fs::read_to_string(self.modules.join("modules.builtin")).unwrap_or_default();
        let deps = parse_modules_dep(&dep);
        let mut order = Vec::new();
        for name in names {
            if !deps.contains_key(*name) {
                if builtin.lines().any(|l| module_name(l) == *name) {
                    continue;
                }
                return Err(VmError::Missing {
                    what: format!(
                        "kernel module {name} for {} (not in {})",
                        self.release,
                        dep_path.display()
                    ),
                    fix: INSTALL_FIX,
                });
            }
            visit(name, &deps, &mut order);
        }
        order
            .into_iter()
            .map(|rel| {
                let path = self.modules.join(rel);
                let data = read_module(&path)?;
                Ok((format!("{}.ko", module_name(rel)), data))
            })
            .collect()
    }

    /// What qemu boots: the uncompressed ELF `vmlinux` inside the bzImage
    /// (qemu starts it through PVH, skipping the in-guest decompression,
    /// which takes seconds under TCG), extracted once into the temp dir;
    /// the bzImage itself when it cannot be extracted.
    pub fn boot_image(&self) -> PathBuf {
        let Ok(meta) = std::fs::metadata(&self.image) else {
            return self.image.clone();
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let cached = std::env::temp_dir().join(format!(
            "meshauth-vm-vmlinux-{}-{}-{mtime}",
            self.release,
            meta.len()
        ));
        if cached.is_file() {
            return cached;
        }
        let Some(elf) = std::fs::read(&self.image)
            .ok()
            .and_then(|b| extract_vmlinux(&b))
        else {
            return self.image.clone();
        };
        // A file of our own renamed into place: parallel tests may extract
        // at the same time, and qemu must never see a partial image.
        let written = tempfile::NamedTempFile::new_in(std::env::temp_dir()).and_then(|mut f| {
            f.write_all(&elf)?;
            f.persist(&cached).map_err(|e| e.error)
        });
        if written.is_ok() {
            return cached;
        }
        self.image.clone()
    }
}

/// The ELF kernel compressed inside a bzImage: the first xz, zstd or gzip
/// stream that decompresses to an ELF file.
fn extract_vmlinux(bz_image: &[u8]) -> Option<Vec<u8>> {
    const FORMATS: &[(&[u8], &str)] = &[
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x1f\x8b\x08", "gzip"),
    ];
    for (magic, tool) in FORMATS {
        let Some(at) = bz_image.windows(magic.len()).position(|w| w == *magic) else {
            continue;
        };
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take()?;
        let data = bz_image[at..].to_vec();
        // Trailing bytes after the stream make the tool complain: its
        // output is checked instead of its status.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output().ok()?;
        let _ = writer.join();
        if out.stdout.starts_with(b"\x7fELF") {
            return Some(out.stdout);
        }
    }
    None
}

/// Module name → (its relative path, the relative paths it depends on).
fn parse_modules_dep(text: &str) -> HashMap<String, (&str, Vec<&str>)> {
    text.lines()
        .filter_map(|line| {
            let (path, deps) = line.split_once(':')?;
            Some((module_name(path), (path, deps.split_whitespace().collect())))
        })
        .collect()
}

/// Depth-first: a module's dependencies before the module, each once.
fn visit<'a>(
    name: &str,
    deps: &HashMap<String, (&'a str, Vec<&'a str>)>,
    order: &mut Vec<&'a str>,
) {
    let Some((path, needs)) = deps.get(name) else {
        return;
    };
    if order.contains(path) {
        return;
    }
    for need in needs {
        visit(&module_name(need), deps, order);
    }
    order.push(path);
}

/// `kernel/net/9p/9pnet_virtio.ko.xz` → `9pnet_virtio`; `virtio-rng` → `virtio_rng`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// A module file, decompressed when it ends in `.xz`, `.zst` or `.gz`.
fn read_module(path: &Path) -> Result<Vec<u8>, VmError> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return std::fs::read(path).map_err(|e| VmError::io("reading", path, e)),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|source| VmError::Spawn {
            program: tool.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmError::io(
            &format!(
                "`{tool} -dc` ({}: {})",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            path,
            std::io::Error::other("decompression failed"),
        ));
    }
    Ok(out.stdout)
}

/// `6.1.0-57-amd64` → `[6, 1, 0, 57]`, so that 6.10 sorts after 6.9.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/netfs/netfs.ko.xz:
kernel/fs/fscache/fscache.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/fscache/fscache.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio.ko.xz:
";

    #[test]
    fn dependencies_load_first_and_once() {
        let deps = parse_modules_dep(DEP);
        let mut order = Vec::new();
        visit("9p", &deps, &mut order);
        visit("virtio_rng", &deps, &mut order);
        visit("netfs", &deps, &mut order);
        let names: Vec<_> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            ["9pnet", "netfs", "fscache", "9p", "virtio", "virtio_rng"]
        );
    }

    #[test]
    fn newest_release_wins() {
        let mut r = ["6.10.1-amd64", "6.9.12-amd64", "6.1.0-57-amd64"];
        r.sort_by_key(|r| version_key(r));
        assert_eq!(r.last(), Some(&"6.10.1-amd64"));
    }
}
