//! `meshauth preflight`: checks a node before install and says what to fix.
//!
//! Every check is a [`Check`]: a status (ok / warn / FAIL), what was found and,
//! on warn or FAIL, what to do. The checks are pure functions of what was
//! read from the machine (a kernel release, a kernel config text, a
//! mountinfo, `/proc/self/status`, …), so the tests feed them fixture text;
//! [`run`] reads the real machine through a [`Host`] and adds the functional
//! probes: loading the real datapath into a temporary bpffs directory, one
//! `FetchX509SVID` call on the SPIRE agent's socket, binding the ports.
//!
//! - [`kernel`]: release, config, BTF, JIT.
//! - [`mounts`]: bpffs, cgroup v2, the pods' cgroup.
//! - [`datapath`]: the datapath load probe.
//! - [`node`]: capabilities, ports, WireGuard.
//! - [`spire`]: the Workload API probe.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub mod datapath;
pub mod kernel;
pub mod mounts;
pub mod node;
pub mod spire;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// meshauth works, with less (no WireGuard, an old kernel, …); `fix` says how to get it all.
    Warn,
    /// meshauth will not work on this node until `fix` is done.
    Fail,
}

impl Status {
    /// `ok`, `warn` or `FAIL` (upper case so it stands out).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked (`kernel version`, `SPIRE socket`, …).
    pub name: &'static str,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to do (on warn and FAIL).
    pub fix: Option<String>,
}

impl Check {
    /// Nothing to do.
    pub fn ok(name: &'static str, found: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            found: found.into(),
            fix: None,
        }
    }

    /// Works, with less.
    pub fn warn(name: &'static str, found: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Warn,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }

    /// Will not work.
    pub fn fail(name: &'static str, found: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Every check, in the order they ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether no check failed (warnings allowed): the exit code.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// One line per check (`status  name  found; fix: …`) and a summary line.
    pub fn render_text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            let _ = write!(
                out,
                "{:<4}  {:<width$}  {}",
                c.status.as_str(),
                c.name,
                c.found
            );
            if let Some(fix) = &c.fix {
                let _ = write!(out, "; fix: {fix}");
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{} ok, {} warn, {} FAIL",
            self.count(Status::Ok),
            self.count(Status::Warn),
            self.count(Status::Fail)
        );
        out
    }

    /// `{"passed": bool, "checks": [{name, status, found, fix}]}`.
    pub fn render_json(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            passed: bool,
            checks: &'a [Check],
        }
        serde_json::to_string_pretty(&Out {
            passed: self.passed(),
            checks: &self.checks,
        })
        .expect("a report serializes")
    }
}

/// Where the machine's files are read from: `/` on a node; a fixture tree in
/// tests. `/proc`, `/sys`, `/boot` and `/lib/modules` are taken under it.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Self::new("/")
    }
}

impl Host {
    /// The machine's files under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `path` (absolute, as on a node) under the root.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Reads a text file under the root.
    pub fn read(&self, path: &str) -> std::io::Result<String> {
        std::fs::read_to_string(self.path(path))
    }
}

/// What to check against.
#[derive(Debug, Clone)]
pub struct Options {
    /// The SPIRE agent's Workload API socket.
    pub spire_socket: PathBuf,
    /// The pods' cgroup, if given; detected otherwise.
    pub pods_cgroup: Option<PathBuf>,
    /// The handshake port (TCP, all addresses).
    pub handshake_port: u16,
    /// The metrics and health port (TCP, all addresses).
    pub metrics_port: u16,
    /// Where bpffs must be mounted (the datapath pins under `<bpffs>/meshauth`).
    pub bpffs: PathBuf,
    /// How long the SPIRE agent gets to answer.
    pub spire_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            spire_socket: PathBuf::from(auth_agent::config::DEFAULT_SPIRE_SOCKET),
            pods_cgroup: None,
            handshake_port: 4250,
            metrics_port: 9964,
            bpffs: PathBuf::from("/sys/fs/bpf"),
            spire_timeout: Duration::from_secs(3),
        }
    }
}

/// The socket path from a `SPIFFE_ENDPOINT_SOCKET`-style value
/// (`unix:///path`, `unix:/path` or a bare path).
pub fn socket_path(value: &str) -> PathBuf {
    let p = value
        .strip_prefix("unix://")
        .or_else(|| value.strip_prefix("unix:"))
        .unwrap_or(value);
    PathBuf::from(p)
}

/// Runs every check on this machine.
pub async fn run(host: &Host, opts: &Options) -> Report {
    let mut checks = Vec::new();
    let release = host.read("/proc/sys/kernel/osrelease");
    let release = release.as_deref().map(str::trim);
    checks.push(match release {
        Ok(r) => kernel::version(r),
        Err(e) => Check::warn(
            kernel::VERSION,
            format!("could not read /proc/sys/kernel/osrelease: {e}"),
            "check /proc is mounted",
        ),
    });
    let release = release.unwrap_or("");

    let mountinfo = host.read("/proc/self/mountinfo").unwrap_or_default();
    let bpffs = mounts::bpffs(&mountinfo, &opts.bpffs);
    let bpffs_ok = bpffs.status == Status::Ok;
    let probe = if bpffs_ok {
        datapath::probe(&opts.bpffs)
    } else {
        datapath::not_run(&opts.bpffs)
    };
    let jit_text = host.read("/proc/sys/net/core/bpf_jit_enable").ok();
    let btf = kernel::btf(&host.path("/sys/kernel/btf/vmlinux"));

    let config = kernel::read_config(host, release);
    let evidence = kernel::Evidence {
        datapath_loaded: probe.status == Status::Ok,
        jit_sysctl: jit_text.is_some(),
        vmlinux_btf: btf.status == Status::Ok,
    };
    checks.push(kernel::config(&config, &evidence));
    checks.push(btf);
    checks.push(kernel::jit(jit_text.as_deref()));
    checks.push(bpffs);
    checks.push(probe);
    let cgroup2 = auth_ebpf::attach::cgroup2_mounts_in(&mountinfo);
    checks.push(mounts::cgroup2(&cgroup2));
    checks.push(mounts::pods_cgroup(&cgroup2, opts.pods_cgroup.as_deref()));
    checks.push(node::capabilities(
        &host.read("/proc/self/status").unwrap_or_default(),
    ));
    checks.push(node::wireguard(&node::WireguardEvidence::gather(
        host,
        release,
        config.as_ref().ok().map(|(_, text)| text.as_str()),
    )));
    checks.push(spire::probe(&opts.spire_socket, opts.spire_timeout).await);
    checks.push(node::port(
        host,
        node::HANDSHAKE_PORT,
        opts.handshake_port,
        Status::Fail,
    ));
    checks.push(node::port(
        host,
        node::METRICS_PORT,
        opts.metrics_port,
        Status::Warn,
    ));
    Report { checks }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn one_line_per_check_with_the_fix_and_a_summary() {
        let r = Report {
            checks: vec![
                Check::ok("kernel version", "6.18.4"),
                Check::warn("WireGuard", "not available", "load it"),
                Check::fail("bpffs", "not mounted", "mount -t bpf bpf /sys/fs/bpf"),
            ],
        };
        assert!(!r.passed());
        let text = r.render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ok    kernel version  6.18.4",
                "warn  WireGuard       not available; fix: load it",
                "FAIL  bpffs           not mounted; fix: mount -t bpf bpf /sys/fs/bpf",
                "1 ok, 1 warn, 1 FAIL",
            ]
        );
        let json: serde_json::Value = serde_json::from_str(&r.render_json()).unwrap();
        assert_eq!(json["passed"], false);
        assert_eq!(json["checks"][2]["status"], "fail");
        assert_eq!(json["checks"][0]["fix"], serde_json::Value::Null);
    }

    #[test]
    fn warnings_pass() {
        let r = Report {
            checks: vec![Check::warn("x", "y", "z")],
        };
        assert!(r.passed());
    }

    #[test]
    fn socket_values_like_spiffe_endpoint_socket() {
        for v in [
            "unix:///run/spire/sockets/agent.sock",
            "unix:/run/spire/sockets/agent.sock",
            "/run/spire/sockets/agent.sock",
        ] {
            assert_eq!(
                socket_path(v),
                Path::new("/run/spire/sockets/agent.sock"),
                "{v}"
            );
        }
    }

    #[test]
    fn host_paths_are_under_the_root() {
        let h = Host::new("/tmp/fixture");
        assert_eq!(
            h.path("/proc/config.gz"),
            Path::new("/tmp/fixture/proc/config.gz")
        );
    }
}
