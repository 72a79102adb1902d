//! What the host must have: programs in `PATH`, a static busybox.

use std::path::{Path, PathBuf};

/// The first `name` in `PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// An ELF file without a `PT_INTERP` program header (no dynamic loader).
pub(crate) fn is_static_elf(path: &Path) -> bool {
    let Ok(elf) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| u32_at(phoff + i * phentsize) != Some(3)) // PT_INTERP
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::INSTALL_FIX;

    #[test]
    fn static_and_dynamic_elf_are_told_apart() {
        assert!(
            !is_static_elf(Path::new("/bin/sh")),
            "/bin/sh is dynamic on Debian"
        );
        assert!(!is_static_elf(Path::new("/etc/hostname")), "not ELF");
        // The busybox the VM needs (busybox-static).
        assert!(is_static_elf(Path::new("/bin/busybox")), "{INSTALL_FIX}");
    }
}
