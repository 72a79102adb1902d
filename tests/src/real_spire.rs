//! Real SPIRE for tests: `spire-server` and `spire-agent` as built by
//! `scripts/build-spire` (SPIRE's own code, pinned in `tools/spire/go.mod`),
//! run as child processes under a tempdir, with configs written per test.
//!
//! Both processes are killed when their handle drops (also while a failing
//! test unwinds). Every wait has a deadline, polls an observable condition
//! (a healthcheck command), notices a process that exited, and panics with
//! that process's log.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long SPIRE gets to become healthy (a busy 2-core machine included).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two healthcheck probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The directory holding `spire-server` and `spire-agent`:
/// `MESHAUTH_SPIRE_BIN` if set (scripts/test sets it), otherwise the stable
/// path `scripts/build-spire` maintains. Panics with the fix when the
/// binaries are missing or are not the version `tools/spire/go.mod` pins.
pub fn spire_bin() -> PathBuf {
    let dir = match std::env::var_os("MESHAUTH_SPIRE_BIN") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("MESHAUTH_TOOLS_CACHE")
                .map_or_else(|| PathBuf::from("/var/cache/meshauth-tools"), PathBuf::from);
            cache.join("spire-current/bin")
        }
    };
    for name in ["spire-server", "spire-agent"] {
        let p = dir.join(name);
        assert!(
            p.is_file(),
            "{} is missing (MESHAUTH_SPIRE_BIN={:?}): run scripts/install-test-deps \
             (or scripts/build-spire) to build SPIRE, and set MESHAUTH_SPIRE_BIN to the \
             directory it prints",
            p.display(),
            std::env::var_os("MESHAUTH_SPIRE_BIN"),
        );
    }
    let want = pinned_version();
    let out = run(Command::new(dir.join("spire-server")).arg("--version"));
    // The version goes to stderr (mitchellh/cli); accept either stream.
    let got = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        got.trim(),
        want,
        "{}/spire-server --version is not the version tools/spire/go.mod pins: \
         run scripts/install-test-deps (or scripts/build-spire) again",
        dir.display()
    );
    dir
}

/// The SPIRE version `tools/spire/go.mod` requires, without the `v`.
pub fn pinned_version() -> String {
    let go_mod = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/spire/go.mod");
    let text = std::fs::read_to_string(&go_mod)
        .unwrap_or_else(|e| panic!("reading {}: {e}", go_mod.display()));
    text.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .collect::<Vec<_>>()
                .get(..2)
                .map(<[_]>::to_vec)
        })
        .find(|w| w[0] == "github.com/spiffe/spire")
        .map(|w| w[1].trim_start_matches('v').to_owned())
        .unwrap_or_else(|| {
            panic!(
                "no github.com/spiffe/spire requirement in {}",
                go_mod.display()
            )
        })
}

/// Runs `cmd` to completion, capturing its output.
fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `cmd`; panics with its output unless it exits 0; returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{cmd:?} printed non-UTF-8: {e}"))
}

/// A child process killed (and reaped) on drop, its output in a log file.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicating {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {cmd:?}: {e}"));
        Self { name, child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Polls `ready` until it holds; panics with the log when the process
    /// exits or `timeout` passes. Returns how long it took.
    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            if ready() {
                return start.elapsed();
            }
            if let Some(status) = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting on {}: {e}", self.name))
            {
                panic!(
                    "{} exited ({status}) before {what}; its log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not get to {what} within {timeout:?}; its log ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
            std::thread::sleep(PROBE_INTERVAL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Already exited is fine; the error of kill is then "invalid input".
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (the listener is closed before SPIRE binds it).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("local_addr of 127.0.0.1:0: {e}"))
        .port()
}

fn mkdir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    p.to_owned()
}

fn write(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

/// A running `spire-server` with a sqlite datastore, a disk key manager and
/// the join_token node attestor, listening on 127.0.0.1.
#[derive(Debug)]
pub struct SpireServer {
    bin: PathBuf,
    trust_domain: String,
    port: u16,
    socket: PathBuf,
    proc: Proc,
    /// From `spire-server run` to the first passing healthcheck.
    pub started_in: Duration,
}

impl SpireServer {
    /// Writes `<dir>/server/server.conf` for `trust_domain` (CA TTL 1h,
    /// X.509-SVID TTL 10m), starts the server and waits until
    /// `spire-server healthcheck` passes.
    pub fn start(bin: &Path, dir: &Path, trust_domain: &str) -> Self {
        let root = mkdir(&dir.join("server"));
        let data = mkdir(&root.join("data"));
        let socket = root.join("api.sock");
        let port = free_port();
        let config = root.join("server.conf");
        write(
            &config,
            &format!(
                r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "{trust_domain}"
    data_dir = "{data}"
    log_level = "DEBUG"
    ca_ttl = "1h"
    default_x509_svid_ttl = "10m"
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{data}/datastore.sqlite3"
        }}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{data}/keys.json"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
}}
"#,
                socket = socket.display(),
                data = data.display(),
            ),
        );
        run_ok(
            Command::new(bin.join("spire-server"))
                .args(["validate", "-config"])
                .arg(&config),
        );
        let start = Instant::now();
        let mut proc = Proc::spawn(
            "spire-server",
            Command::new(bin.join("spire-server"))
                .args(["run", "-config"])
                .arg(&config),
            root.join("server.log"),
        );
        let health = || {
            run(Command::new(bin.join("spire-server"))
                .args(["healthcheck", "-socketPath"])
                .arg(&socket))
            .status
            .success()
        };
        proc.wait_until("a passing healthcheck", START_TIMEOUT, health);
        Self {
            bin: bin.to_owned(),
            trust_domain: trust_domain.to_owned(),
            port,
            socket,
            proc,
            started_in: start.elapsed(),
        }
    }

    /// Runs `spire-server <sub> -socketPath <admin socket> <args>`; panics
    /// unless it succeeds; returns its stdout.
    pub fn cli(&self, sub: &[&str], args: &[&str]) -> String {
        run_ok(
            Command::new(self.bin.join("spire-server"))
                .args(sub)
                .arg("-socketPath")
                .arg(&self.socket)
                .args(args),
        )
    }

    /// The server's TCP port (agents connect here).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A new join token for an agent whose SPIFFE ID becomes
    /// `spiffe://<td>/spire/agent/join_token/<token>` (`spiffe_id` is
    /// registered as an alias of it).
    pub fn join_token(&self, spiffe_id: &str) -> String {
        let out = self.cli(&["token", "generate"], &["-spiffeID", spiffe_id]);
        out.lines()
            .find_map(|l| l.strip_prefix("Token:"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_else(|| panic!("no `Token:` line in `spire-server token generate`: {out}"))
    }

    /// The SPIFFE ID SPIRE gives the agent attested with `token`.
    pub fn join_token_agent_id(&self, token: &str) -> String {
        format!(
            "spiffe://{}/spire/agent/join_token/{token}",
            self.trust_domain
        )
    }

    /// The trust bundle, PEM (`spire-server bundle show`).
    pub fn bundle_pem(&self) -> String {
        self.cli(&["bundle", "show"], &[])
    }

    /// Registers `spiffe_id` under `parent_id` with `selectors` (`type:value`);
    /// returns the entry ID.
    pub fn create_entry(&self, parent_id: &str, spiffe_id: &str, selectors: &[&str]) -> String {
        let mut args = vec!["-parentID", parent_id, "-spiffeID", spiffe_id];
        for s in selectors {
            args.extend(["-selector", s]);
        }
        let out = self.cli(&["entry", "create"], &args);
        out.lines()
            .find_map(|l| l.strip_prefix("Entry ID"))
            .map(|t| t.trim_start_matches([' ', ':']).trim().to_owned())
            .unwrap_or_else(|| panic!("no `Entry ID` line in `spire-server entry create`: {out}"))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}

/// A running `spire-agent` attested with a join token, with the unix
/// workload attestor and an in-memory key manager.
#[derive(Debug)]
pub struct SpireAgent {
    socket: PathBuf,
    proc: Proc,
    /// From `spire-agent run` to the first passing healthcheck.
    pub started_in: Duration,
}

impl SpireAgent {
    /// Writes `<dir>/agent/agent.conf` (the server's bundle as the
    /// bootstrap bundle), starts the agent with `token` and waits until
    /// `spire-agent healthcheck` passes. The Workload API socket is
    /// `<dir>/agent/workload/api.sock`.
    pub fn start(bin: &Path, dir: &Path, server: &SpireServer, token: &str) -> Self {
        let root = mkdir(&dir.join("agent"));
        let data = mkdir(&root.join("data"));
        let socket = mkdir(&root.join("workload")).join("api.sock");
        let bundle = root.join("bootstrap-bundle.pem");
        write(&bundle, &server.bundle_pem());
        let config = root.join("agent.conf");
        write(
            &config,
            &format!(
                r#"agent {{
    data_dir = "{data}"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{td}"
    join_token = "{token}"
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#,
                data = data.display(),
                port = server.port(),
                socket = socket.display(),
                bundle = bundle.display(),
                td = server.trust_domain(),
            ),
        );
        run_ok(
            Command::new(bin.join("spire-agent"))
                .args(["validate", "-config"])
                .arg(&config),
        );
        let start = Instant::now();
        let mut proc = Proc::spawn(
            "spire-agent",
            Command::new(bin.join("spire-agent"))
                .args(["run", "-config"])
                .arg(&config),
            root.join("agent.log"),
        );
        let health = || {
            run(Command::new(bin.join("spire-agent"))
                .args(["healthcheck", "-socketPath"])
                .arg(&socket))
            .status
            .success()
        };
        proc.wait_until("a passing healthcheck", START_TIMEOUT, health);
        Self {
            socket,
            proc,
            started_in: start.elapsed(),
        }
    }

    /// The Workload API socket.
    pub fn workload_socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}

/// The effective user id of this process (the owner of `/proc/self`), which
/// SPIRE's unix workload attestor sees as `unix:uid:<uid>`.
pub fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .unwrap_or_else(|e| panic!("stat /proc/self: {e}"))
        .uid()
}
