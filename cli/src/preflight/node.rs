//! The node: privileges, the agent's ports, WireGuard.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use super::{Check, Host, Status, kernel};

const CAPS: &str = "capabilities";
const WIREGUARD: &str = "WireGuard";
/// The handshake port check's name.
pub const HANDSHAKE_PORT: &str = "handshake port";
/// The metrics port check's name.
pub const METRICS_PORT: &str = "metrics port";

/// Capability numbers (`linux/capability.h`).
pub mod cap {
    /// CAP_NET_ADMIN.
    pub const NET_ADMIN: u32 = 12;
    /// CAP_SYS_ADMIN.
    pub const SYS_ADMIN: u32 = 21;
    /// CAP_BPF (5.8+).
    pub const BPF: u32 = 39;
}

/// The effective capability set from a `/proc/<pid>/status` text.
pub fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// CAP_BPF or CAP_SYS_ADMIN (loading programs, creating maps) and
/// CAP_NET_ADMIN (cgroup_skb programs, WireGuard over netlink), from the
/// `CapEff` line of a `/proc/self/status` text; FAIL naming what is missing.
pub fn capabilities(status: &str) -> Check {
    let Some(eff) = cap_eff(status) else {
        return Check::fail(
            CAPS,
            "no CapEff line in /proc/self/status",
            "run preflight as root on the node",
        );
    };
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut held = Vec::new();
    for (c, name) in [
        (cap::BPF, "CAP_BPF"),
        (cap::SYS_ADMIN, "CAP_SYS_ADMIN"),
        (cap::NET_ADMIN, "CAP_NET_ADMIN"),
    ] {
        if has(c) {
            held.push(name);
        }
    }
    let mut missing = Vec::new();
    if !has(cap::BPF) && !has(cap::SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !has(cap::NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    let held = if held.is_empty() {
        "none of CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN".to_string()
    } else {
        held.join(", ")
    };
    if missing.is_empty() {
        Check::ok(CAPS, format!("effective {eff:016x}: {held}"))
    } else {
        Check::fail(
            CAPS,
            format!(
                "missing {} (effective {eff:016x}: {held})",
                missing.join(", ")
            ),
            format!(
                "run as root, or grant {} (the DaemonSet's securityContext.capabilities.add)",
                missing.join(", ")
            ),
        )
    }
}

/// Inodes of the sockets listening on TCP `port` in a `/proc/net/tcp` or
/// `/proc/net/tcp6` text.
pub fn listening_inodes(proc_net_tcp: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == LISTEN)
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Processes holding one of `inodes` open: `pid (comm)`.
fn holders(host: &Host, inodes: &[u64]) -> Vec<String> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir(host.path("/proc")) else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|t| wanted.iter().any(|w| t.as_os_str() == w.as_str()))
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    out
}

/// Binds TCP `0.0.0.0:<port>` and releases it; `severity` if it cannot be
/// bound, naming the process holding it when `/proc` shows one.
pub fn port(host: &Host, name: &'static str, port: u16, severity: Status) -> Check {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let result = TcpListener::bind(addr).map(drop);
    let held_by = match &result {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let mut inodes = Vec::new();
            for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
                inodes.extend(listening_inodes(&host.read(f).unwrap_or_default(), port));
            }
            holders(host, &inodes)
        }
        _ => Vec::new(),
    };
    port_check(name, addr, &result, &held_by, severity)
}

/// The port check from the bind's result and who holds the port.
pub fn port_check(
    name: &'static str,
    addr: SocketAddr,
    bind: &io::Result<()>,
    held_by: &[String],
    severity: Status,
) -> Check {
    let flag = if name == METRICS_PORT {
        "--metrics-port"
    } else {
        "--handshake-port"
    };
    let (found, fix) = match bind {
        Ok(()) => return Check::ok(name, format!("TCP {addr} free")),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => (
            if held_by.is_empty() {
                format!("TCP {addr} in use")
            } else {
                format!("TCP {addr} in use by {}", held_by.join(", "))
            },
            format!(
                "stop what listens on port {}, or choose another port ({flag} here and in the agent's config)",
                addr.port()
            ),
        ),
        Err(e) => (
            format!("cannot bind TCP {addr}: {e}"),
            format!("run as root or choose another port ({flag})"),
        ),
    };
    match severity {
        Status::Fail => Check::fail(name, found, fix),
        _ => Check::warn(name, found, fix),
    }
}

/// What shows whether WireGuard is available.
#[derive(Debug, Clone, Default)]
pub struct WireguardEvidence {
    /// `/sys/module/wireguard` exists (loaded, or built in with parameters).
    pub loaded: bool,
    /// `CONFIG_WIREGUARD` from the kernel config: `Some('y')`, `Some('m')`,
    /// `Some('n')` (not set), `None` (config not read).
    pub config: Option<char>,
    /// A `wireguard.ko*` file under `/lib/modules/<release>`.
    pub module_file: Option<PathBuf>,
    /// The modules directory looked in.
    pub modules_dir: PathBuf,
}

impl WireguardEvidence {
    /// Reads it from the machine (`config` is the kernel config text, if read).
    pub fn gather(host: &Host, release: &str, config: Option<&str>) -> Self {
        let modules_dir = host.path(&format!("/lib/modules/{release}"));
        Self {
            loaded: host.path("/sys/module/wireguard").exists(),
            config: config.map(|t| {
                if kernel::config_enabled(t, "CONFIG_WIREGUARD") {
                    if t.lines().any(|l| l == "CONFIG_WIREGUARD=y") {
                        'y'
                    } else {
                        'm'
                    }
                } else {
                    'n'
                }
            }),
            module_file: find_module(&modules_dir, "wireguard.ko", 8),
            modules_dir,
        }
    }
}

/// The first file named `<stem>` or `<stem>.<compression>` under `dir`.
fn find_module(dir: &Path, stem: &str, depth: u32) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    let mut subdirs = Vec::new();
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ty = e.file_type().ok()?;
        if ty.is_dir() {
            subdirs.push(e.path());
        } else if name == stem || name.starts_with(&format!("{stem}.")) {
            return Some(e.path());
        }
    }
    subdirs.iter().find_map(|d| find_module(d, stem, depth - 1))
}

/// WireGuard: loaded, built in, or a module to load; warn (authentication
/// works without it) otherwise.
pub fn wireguard(ev: &WireguardEvidence) -> Check {
    if ev.loaded {
        return Check::ok(WIREGUARD, "wireguard module loaded");
    }
    if ev.config == Some('y') {
        return Check::ok(WIREGUARD, "built into the kernel (CONFIG_WIREGUARD=y)");
    }
    if let Some(file) = &ev.module_file {
        return Check::ok(
            WIREGUARD,
            format!(
                "module available at {}, loaded on first use (modprobe wireguard)",
                file.display()
            ),
        );
    }
    let config = match ev.config {
        Some('m') => "CONFIG_WIREGUARD=m but the module file is missing",
        Some(_) => "CONFIG_WIREGUARD not set",
        None => "kernel config not read",
    };
    Check::warn(
        WIREGUARD,
        format!(
            "WireGuard encryption unavailable: not loaded, {config}, no wireguard.ko* under {}",
            ev.modules_dir.display()
        ),
        "install/load the wireguard module (modprobe wireguard); authentication still works",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_STATUS: &str = "Name:\tmeshauth\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";

    #[test]
    fn root_has_every_capability() {
        let c = capabilities(ROOT_STATUS);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(
            c.found.contains("CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN"),
            "{c:?}"
        );
    }

    #[test]
    fn a_missing_capability_fails_naming_it() {
        // CAP_BPF and CAP_SYS_ADMIN, no CAP_NET_ADMIN.
        let eff = (1u64 << cap::BPF) | (1u64 << cap::SYS_ADMIN);
        let c = capabilities(&format!("CapEff:\t{eff:016x}\n"));
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.found.starts_with("missing CAP_NET_ADMIN "), "{c:?}");
        assert!(c.fix.unwrap().contains("CAP_NET_ADMIN"));

        // CAP_BPF alone stands for CAP_SYS_ADMIN.
        let eff = (1u64 << cap::BPF) | (1u64 << cap::NET_ADMIN);
        assert_eq!(
            capabilities(&format!("CapEff:\t{eff:016x}\n")).status,
            Status::Ok
        );

        let c = capabilities("CapEff:\t0000000000000000\n");
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.found
                .starts_with("missing CAP_BPF (or CAP_SYS_ADMIN), CAP_NET_ADMIN"),
            "{c:?}"
        );
        assert_eq!(capabilities("Name:\tx\n").status, Status::Fail);
    }

    #[test]
    fn listening_sockets_by_port() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:109A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:109A 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:26E4 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5151 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listening_inodes(tcp, 4250), [4242]);
        assert_eq!(listening_inodes(tcp, 9956), [5151]);
        assert_eq!(listening_inodes(tcp, 80), Vec::<u64>::new());
    }

    #[test]
    fn a_port_in_use_names_the_port_and_the_holder() {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 4250));
        let in_use = Err(io::Error::from(io::ErrorKind::AddrInUse));
        let c = port_check(
            HANDSHAKE_PORT,
            addr,
            &in_use,
            &["pid 7 (nc)".into()],
            Status::Fail,
        );
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.found, "TCP 0.0.0.0:4250 in use by pid 7 (nc)");
        assert!(c.fix.unwrap().contains("--handshake-port"));
        let c = port_check(METRICS_PORT, addr, &in_use, &[], Status::Warn);
        assert_eq!(
            (c.status, c.found.as_str()),
            (Status::Warn, "TCP 0.0.0.0:4250 in use")
        );
        assert_eq!(
            port_check(HANDSHAKE_PORT, addr, &Ok(()), &[], Status::Fail).status,
            Status::Ok
        );
    }

    #[test]
    fn a_held_port_is_found_on_this_machine() {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let p = l.local_addr().unwrap().port();
        let c = port(&Host::default(), HANDSHAKE_PORT, p, Status::Fail);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(
            c.found
                .contains(&format!("in use by pid {}", std::process::id())),
            "{c:?}"
        );
        drop(l);
        assert_eq!(
            port(&Host::default(), HANDSHAKE_PORT, p, Status::Fail).status,
            Status::Ok
        );
    }

    #[test]
    fn wireguard_loaded_built_in_module_or_warn() {
        let ev = |loaded, config, module_file: Option<&str>| WireguardEvidence {
            loaded,
            config,
            module_file: module_file.map(PathBuf::from),
            modules_dir: PathBuf::from("/lib/modules/6.1.0"),
        };
        assert_eq!(wireguard(&ev(true, None, None)).status, Status::Ok);
        assert_eq!(wireguard(&ev(false, Some('y'), None)).status, Status::Ok);
        let c = wireguard(&ev(
            false,
            Some('m'),
            Some("/lib/modules/6.1.0/kernel/drivers/net/wireguard/wireguard.ko.zst"),
        ));
        assert_eq!(c.status, Status::Ok);
        assert!(c.found.contains("wireguard.ko.zst"), "{c:?}");
        let c = wireguard(&ev(false, Some('n'), None));
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.found.starts_with("WireGuard encryption unavailable"),
            "{c:?}"
        );
        assert!(c.fix.unwrap().ends_with("authentication still works"));
    }

    #[test]
    fn wireguard_evidence_from_a_fixture_tree() {
        let root = tempfile::tempdir().unwrap();
        let host = Host::new(root.path());
        let ev = WireguardEvidence::gather(&host, "6.1.0", None);
        assert!(!ev.loaded && ev.module_file.is_none() && ev.config.is_none());
        let dir = root
            .path()
            .join("lib/modules/6.1.0/kernel/drivers/net/wireguard");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("wireguard.ko.xz"), b"").unwrap();
        let ev = WireguardEvidence::gather(&host, "6.1.0", Some("CONFIG_WIREGUARD=m\n"));
        assert_eq!(ev.config, Some('m'));
        assert_eq!(ev.module_file, Some(dir.join("wireguard.ko.xz")));
        std::fs::create_dir_all(root.path().join("sys/module/wireguard")).unwrap();
        assert!(WireguardEvidence::gather(&host, "6.1.0", None).loaded);
    }
}
