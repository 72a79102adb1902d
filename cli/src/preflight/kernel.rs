//! The kernel: release, build configuration, BTF, the BPF JIT.

use std::io::Read as _;
use std::path::Path;

use super::{Check, Host};

/// The release check's name.
pub const VERSION: &str = "kernel version";
const CONFIG: &str = "kernel config";
const BTF: &str = "BTF";
const JIT: &str = "BPF JIT";

/// Oldest kernel the datapath runs on (bpf_links for cgroups, ring buffers,
/// `bpf_ktime_get_boot_ns`).
pub const MINIMUM: (u32, u32) = (5, 10);
/// Kernel recommended (the LTS the datapath is tested on most).
pub const RECOMMENDED: (u32, u32) = (6, 1);

/// Options the datapath cannot do without: BPF itself, the syscall, the JIT,
/// and cgroup BPF (its programs attach to the pods' cgroup).
pub const REQUIRED_CONFIG: &[&str] = &[
    "CONFIG_BPF",
    "CONFIG_BPF_SYSCALL",
    "CONFIG_BPF_JIT",
    "CONFIG_CGROUP_BPF",
];
/// Options wanted but not needed: kernel BTF (inspection with bpftool, and
/// the programs' BTF checked against the kernel's).
pub const RECOMMENDED_CONFIG: &[&str] = &["CONFIG_DEBUG_INFO_BTF"];

/// `(major, minor, patch)` from a release such as `6.18.44-fc-v669` or
/// `5.15.0-91-generic`; the patch defaults to 0 (`6.1-rc3`).
pub fn parse_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release.trim().split('.');
    let number = |s: Option<&str>| -> Option<u32> {
        let s = s?;
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s[..end].parse().ok()
    };
    let major = number(parts.next())?;
    let minor = number(parts.next())?;
    let patch = number(parts.next()).unwrap_or(0);
    Some((major, minor, patch))
}

/// The release against [`MINIMUM`] (FAIL below) and [`RECOMMENDED`] (warn below).
pub fn version(release: &str) -> Check {
    let Some((major, minor, _)) = parse_release(release) else {
        return Check::warn(
            VERSION,
            format!("cannot parse kernel release {release:?}"),
            format!(
                "make sure the kernel is {}.{} or newer ({}.{}+ recommended)",
                MINIMUM.0, MINIMUM.1, RECOMMENDED.0, RECOMMENDED.1
            ),
        );
    };
    if (major, minor) < MINIMUM {
        Check::fail(
            VERSION,
            format!(
                "{release}: older than {}.{}, the oldest the datapath runs on",
                MINIMUM.0, MINIMUM.1
            ),
            format!(
                "upgrade the kernel to {}.{}+ ({}.{}+ recommended)",
                MINIMUM.0, MINIMUM.1, RECOMMENDED.0, RECOMMENDED.1
            ),
        )
    } else if (major, minor) < RECOMMENDED {
        Check::warn(
            VERSION,
            format!(
                "{release}: supported, older than the recommended {}.{}",
                RECOMMENDED.0, RECOMMENDED.1
            ),
            format!(
                "upgrade the kernel to {}.{}+ when you can",
                RECOMMENDED.0, RECOMMENDED.1
            ),
        )
    } else {
        Check::ok(VERSION, release.to_string())
    }
}

/// The kernel config text and where it came from, or every place tried and why it failed.
pub type ConfigText = Result<(String, String), Vec<String>>;

/// Reads `/proc/config.gz` (gzip), else `/boot/config-<release>`.
pub fn read_config(host: &Host, release: &str) -> ConfigText {
    let mut tried = Vec::new();
    let gz = host.path("/proc/config.gz");
    match std::fs::File::open(&gz).and_then(|f| {
        let mut text = String::new();
        flate2::read::GzDecoder::new(f).read_to_string(&mut text)?;
        Ok(text)
    }) {
        Ok(text) => return Ok(("/proc/config.gz".into(), text)),
        Err(e) => tried.push(format!("/proc/config.gz: {e}")),
    }
    let boot = format!("/boot/config-{release}");
    match host.read(&boot) {
        Ok(text) => Ok((boot, text)),
        Err(e) => {
            tried.push(format!("{boot}: {e}"));
            Err(tried)
        }
    }
}

/// Whether `option` is built in or a module (`=y` / `=m`) in a config text.
pub fn config_enabled(text: &str, option: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(option)
            .and_then(|rest| rest.strip_prefix('='))
            .is_some_and(|v| v == "y" || v == "m")
    })
}

/// What the machine showed without its config: the fallback when the
/// config cannot be read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Evidence {
    /// The datapath's cgroup_skb programs loaded (CONFIG_BPF, CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF).
    pub datapath_loaded: bool,
    /// `/proc/sys/net/core/bpf_jit_enable` exists (CONFIG_BPF_JIT).
    pub jit_sysctl: bool,
    /// `/sys/kernel/btf/vmlinux` is readable (CONFIG_DEBUG_INFO_BTF).
    pub vmlinux_btf: bool,
}

/// The required options (FAIL naming each one missing) and the recommended
/// ones (warn). An unreadable config is a warn that lists what the machine
/// showed instead.
pub fn config(text: &ConfigText, evidence: &Evidence) -> Check {
    let (source, text) = match text {
        Ok(t) => t,
        Err(tried) => {
            let mut shown = Vec::new();
            if evidence.datapath_loaded {
                shown.push("BPF, BPF_SYSCALL, CGROUP_BPF (the datapath loaded)");
            }
            if evidence.jit_sysctl {
                shown.push("BPF_JIT (bpf_jit_enable exists)");
            }
            if evidence.vmlinux_btf {
                shown.push("DEBUG_INFO_BTF (vmlinux BTF present)");
            }
            let shown = if shown.is_empty() {
                "no functional evidence of BPF support either".to_string()
            } else {
                format!("functional evidence: {}", shown.join("; "))
            };
            return Check::warn(
                CONFIG,
                format!(
                    "could not read kernel config ({}); {shown}",
                    tried.join(", ")
                ),
                "load the configs module (modprobe configs) or install /boot/config-$(uname -r) \
                 to check the options; the datapath probe line is the functional answer",
            );
        }
    };
    let missing = |options: &[&'static str]| -> Vec<&'static str> {
        options
            .iter()
            .copied()
            .filter(|o| !config_enabled(text, o))
            .collect()
    };
    let (required, recommended) = (missing(REQUIRED_CONFIG), missing(RECOMMENDED_CONFIG));
    if !required.is_empty() {
        let mut all = required.clone();
        all.extend(&recommended);
        return Check::fail(
            CONFIG,
            format!("{source}: {} not set", required.join(", ")),
            format!("use a kernel built with {}=y", all.join("=y, ")),
        );
    }
    if !recommended.is_empty() {
        return Check::warn(
            CONFIG,
            format!(
                "{source}: required options set; {} not set",
                recommended.join(", ")
            ),
            format!("use a kernel built with {}=y", recommended.join("=y, ")),
        );
    }
    let mut all: Vec<&str> = REQUIRED_CONFIG.to_vec();
    all.extend(RECOMMENDED_CONFIG);
    Check::ok(CONFIG, format!("{source}: {} set", all.join(", ")))
}

/// Kernel BTF at `path` (`/sys/kernel/btf/vmlinux`) is readable.
pub fn btf(path: &Path) -> Check {
    match std::fs::File::open(path) {
        Ok(_) => Check::ok(BTF, format!("{} readable", path.display())),
        Err(e) => Check::warn(
            BTF,
            format!("{}: {e}", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (the datapath loads without it; \
             bpftool and BTF-based inspection do not work)",
        ),
    }
}

/// `/proc/sys/net/core/bpf_jit_enable`: 1 (or 2, JIT with debug output) is
/// on; 0 interprets every packet (warn); absent means no JIT in the kernel.
pub fn jit(value: Option<&str>) -> Check {
    match value.map(str::trim) {
        Some("1") => Check::ok(JIT, "enabled (net.core.bpf_jit_enable=1)"),
        Some("2") => Check::warn(
            JIT,
            "enabled with debug output (net.core.bpf_jit_enable=2)",
            "sysctl -w net.core.bpf_jit_enable=1",
        ),
        Some("0") => Check::warn(
            JIT,
            "disabled (net.core.bpf_jit_enable=0): every packet runs in the interpreter",
            "sysctl -w net.core.bpf_jit_enable=1",
        ),
        Some(other) => Check::warn(
            JIT,
            format!("unexpected net.core.bpf_jit_enable={other:?}"),
            "sysctl -w net.core.bpf_jit_enable=1",
        ),
        None => Check::warn(
            JIT,
            "/proc/sys/net/core/bpf_jit_enable missing: no BPF JIT in this kernel",
            "use a kernel built with CONFIG_BPF_JIT=y",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::Status;

    const FULL: &str = "\
# Automatically generated file; DO NOT EDIT.
CONFIG_BPF=y
CONFIG_BPF_SYSCALL=y
CONFIG_BPF_JIT=y
CONFIG_BPF_JIT_ALWAYS_ON=y
CONFIG_CGROUP_BPF=y
CONFIG_DEBUG_INFO_BTF=y
CONFIG_WIREGUARD=m
";

    fn text(t: &str) -> ConfigText {
        Ok(("/proc/config.gz".into(), t.into()))
    }

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18, 44)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15, 0)));
        assert_eq!(parse_release("6.1-rc3\n"), Some((6, 1, 0)));
        assert_eq!(parse_release("6.18"), Some((6, 18, 0)));
        assert_eq!(parse_release("x.y"), None);
        assert_eq!(parse_release(""), None);
    }

    #[test]
    fn versions_fail_below_5_10_and_warn_below_6_1() {
        let c = version("5.4.0");
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(
            c.found.contains("5.4.0") && c.found.contains("5.10"),
            "{c:?}"
        );
        assert!(c.fix.unwrap().contains("upgrade"));
        assert_eq!(version("5.10.0").status, Status::Warn);
        let c = version("5.15");
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.fix.unwrap().contains("6.1"));
        assert_eq!(version("6.1.0").status, Status::Ok);
        let c = version("6.18");
        assert_eq!((c.status, c.found.as_str()), (Status::Ok, "6.18"));
        assert_eq!(version("linux").status, Status::Warn);
    }

    #[test]
    fn a_full_config_is_ok() {
        let c = config(&text(FULL), &Evidence::default());
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.found.starts_with("/proc/config.gz:"), "{c:?}");
    }

    #[test]
    fn a_missing_required_option_fails_naming_it() {
        let t = FULL.replace("CONFIG_BPF_JIT=y\n", "# CONFIG_BPF_JIT is not set\n");
        let c = config(&text(&t), &Evidence::default());
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert_eq!(c.found, "/proc/config.gz: CONFIG_BPF_JIT not set");
        assert!(c.fix.unwrap().contains("CONFIG_BPF_JIT=y"));
        // CONFIG_BPF_JIT_ALWAYS_ON=y alone does not count as CONFIG_BPF_JIT.
        assert!(!config_enabled(&t, "CONFIG_BPF_JIT"));
    }

    #[test]
    fn missing_btf_only_warns() {
        let t = FULL.replace("CONFIG_DEBUG_INFO_BTF=y\n", "");
        let c = config(&text(&t), &Evidence::default());
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.found.contains("CONFIG_DEBUG_INFO_BTF not set"), "{c:?}");
    }

    #[test]
    fn an_unreadable_config_warns_and_lists_the_functional_evidence() {
        let tried = Err(vec![
            "/proc/config.gz: No such file or directory (os error 2)".to_string(),
            "/boot/config-6.1.0: No such file or directory (os error 2)".to_string(),
        ]);
        let c = config(
            &tried,
            &Evidence {
                datapath_loaded: true,
                jit_sysctl: true,
                vmlinux_btf: false,
            },
        );
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.found.starts_with("could not read kernel config"), "{c:?}");
        assert!(c.found.contains("/boot/config-6.1.0"), "{c:?}");
        assert!(c.found.contains("the datapath loaded"), "{c:?}");
        assert!(c.found.contains("BPF_JIT"), "{c:?}");
        assert!(!c.found.contains("DEBUG_INFO_BTF"), "{c:?}");
    }

    #[test]
    fn config_is_read_gzipped_from_proc_or_plain_from_boot() {
        use std::io::Write as _;
        let root = tempfile::tempdir().unwrap();
        let host = Host::new(root.path());
        assert_eq!(read_config(&host, "6.1.0").unwrap_err().len(), 2);

        std::fs::create_dir_all(root.path().join("boot")).unwrap();
        std::fs::write(root.path().join("boot/config-6.1.0"), "CONFIG_BPF=y\n").unwrap();
        let (source, t) = read_config(&host, "6.1.0").unwrap();
        assert_eq!(
            (source.as_str(), t.as_str()),
            ("/boot/config-6.1.0", "CONFIG_BPF=y\n")
        );

        std::fs::create_dir_all(root.path().join("proc")).unwrap();
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(root.path().join("proc/config.gz")).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(FULL.as_bytes()).unwrap();
        gz.finish().unwrap();
        let (source, t) = read_config(&host, "6.1.0").unwrap();
        assert_eq!((source.as_str(), t.as_str()), ("/proc/config.gz", FULL));
    }

    #[test]
    fn jit_values() {
        assert_eq!(jit(Some("1\n")).status, Status::Ok);
        let c = jit(Some("0\n"));
        assert_eq!(c.status, Status::Warn);
        assert_eq!(
            c.fix.as_deref(),
            Some("sysctl -w net.core.bpf_jit_enable=1")
        );
        assert_eq!(jit(None).status, Status::Warn);
    }

    #[test]
    fn btf_missing_warns() {
        let c = btf(Path::new("/nonexistent/vmlinux"));
        assert_eq!(c.status, Status::Warn);
        assert!(c.found.starts_with("/nonexistent/vmlinux: "), "{c:?}");
    }
}
