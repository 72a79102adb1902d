//! Real SPIRE for tests: `spire-server` and `spire-agent` as built by
//! `scripts/build-spire` (SPIRE's own code, pinned in `tools/spire/go.mod`),
//! run as child processes under a tempdir, configured by what spire-config
//! renders (so every start is also a check that SPIRE accepts those files).
//!
//! Both processes are killed when their handle drops (also while a failing
//! test unwinds). Every wait has a deadline, polls an observable condition
//! (a healthcheck command), notices a process that exited, and panics with
//! that process's log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use spire_config::{DataStore, Deployment, Settings, render_agent, render_server};

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
        // Appended to, so a restarted process's log follows the old one.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
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

/// The settings the harness runs SPIRE with: standalone (join_token, unix
/// attestor), everything under `dir`, loopback only, free ports, CA TTL 1h,
/// X.509-SVID TTL 10m. Tests change what they need before starting.
pub fn settings(dir: &Path, trust_domain: &str) -> Settings {
    let mut st = Settings::new(trust_domain, Deployment::Standalone);
    let server = dir.join("server");
    let data = server.join("data");
    st.server.bind_address = std::net::IpAddr::from([127, 0, 0, 1]);
    st.server.bind_port = free_port();
    st.server.socket_path = server.join("api.sock");
    st.server.datastore = DataStore::Sqlite3 {
        path: data.join("datastore.sqlite3"),
    };
    st.server.data_dir = data;
    st.server.ca_ttl = Duration::from_secs(3600);
    st.server.svid_ttl = Duration::from_secs(600);
    st.server.health_port = free_port();
    let agent = dir.join("agent");
    st.agent.server_address = "127.0.0.1".into();
    st.agent.server_port = st.server.bind_port;
    st.agent.data_dir = agent.join("data");
    st.agent.socket_path = agent.join("workload").join("api.sock");
    st.agent.trust_bundle_path = agent.join("bootstrap-bundle.pem");
    st.agent.health_port = free_port();
    st
}

/// Writes `text` to `path` with mode 0600 (SPIRE configs can hold secrets).
fn write_private(path: &Path, text: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Runs `spire-server run -config <config>` (log next to the config) and
/// waits for a passing healthcheck on `socket`.
fn run_server(bin: &Path, config: &Path, socket: &Path) -> (Proc, Duration) {
    let log = config.with_file_name("server.log");
    let start = Instant::now();
    let mut proc = Proc::spawn(
        "spire-server",
        Command::new(bin.join("spire-server"))
            .args(["run", "-config"])
            .arg(config),
        log,
    );
    let health = || {
        run(Command::new(bin.join("spire-server"))
            .args(["healthcheck", "-socketPath"])
            .arg(socket))
        .status
        .success()
    };
    proc.wait_until("a passing healthcheck", START_TIMEOUT, health);
    (proc, start.elapsed())
}

/// A running `spire-server` configured by spire-config's
/// [`render_server`]: sqlite datastore, disk key manager, the join_token
/// node attestor, listening on 127.0.0.1.
#[derive(Debug)]
pub struct SpireServer {
    bin: PathBuf,
    settings: Settings,
    config: PathBuf,
    proc: Proc,
    /// From `spire-server run` to the first passing healthcheck.
    pub started_in: Duration,
}

impl SpireServer {
    /// [`SpireServer::start_with`] the harness's [`settings`].
    pub fn start(bin: &Path, dir: &Path, trust_domain: &str) -> Self {
        Self::start_with(bin, &settings(dir, trust_domain))
    }

    /// Renders `<data_dir>/../server.conf` from `st` with spire-config,
    /// checks it with `spire-server validate`, starts the server and waits
    /// until `spire-server healthcheck` passes.
    pub fn start_with(bin: &Path, st: &Settings) -> Self {
        let root =
            mkdir(st.server.socket_path.parent().unwrap_or_else(|| {
                panic!("socket path {:?} has no parent", st.server.socket_path)
            }));
        mkdir(&st.server.data_dir);
        let config = root.join("server.conf");
        let text = render_server(st).unwrap_or_else(|e| panic!("rendering server.conf: {e}"));
        write_private(&config, &text);
        run_ok(
            Command::new(bin.join("spire-server"))
                .args(["validate", "-config"])
                .arg(&config),
        );
        let (proc, started_in) = run_server(bin, &config, &st.server.socket_path);
        Self {
            bin: bin.to_owned(),
            settings: st.clone(),
            config,
            proc,
            started_in,
        }
    }

    /// Starts the server again with the same configuration and datastore
    /// (after [`SpireServer::kill`], or as a restart: a running server is
    /// killed first); waits for a passing healthcheck.
    pub fn restart(&mut self) {
        self.kill();
        let (proc, started_in) =
            run_server(&self.bin, &self.config, &self.settings.server.socket_path);
        self.proc = proc;
        self.started_in = started_in;
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// The settings it was started with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The server's admin socket (the Entry API).
    pub fn socket(&self) -> &Path {
        &self.settings.server.socket_path
    }

    /// Runs `spire-server <sub> -socketPath <admin socket> <args>`; panics
    /// unless it succeeds; returns its stdout.
    pub fn cli(&self, sub: &[&str], args: &[&str]) -> String {
        run_ok(
            Command::new(self.bin.join("spire-server"))
                .args(sub)
                .arg("-socketPath")
                .arg(&self.settings.server.socket_path)
                .args(args),
        )
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.settings.trust_domain
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
            self.settings.trust_domain
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

/// A running `spire-agent` configured by spire-config's [`render_agent`],
/// attested with a join token (given on the command line, so the config
/// holds no secret), with the unix workload attestor.
#[derive(Debug)]
pub struct SpireAgent {
    socket: PathBuf,
    proc: Proc,
    /// From `spire-agent run` to the first passing healthcheck.
    pub started_in: Duration,
}

impl SpireAgent {
    /// [`SpireAgent::start_with`] the server's settings.
    pub fn start(bin: &Path, _dir: &Path, server: &SpireServer, token: &str) -> Self {
        Self::start_with(bin, server, server.settings(), token)
    }

    /// Writes the agent's config (rendered from `st`, next to its data dir)
    /// and the server's bundle as the bootstrap bundle, checks the config
    /// with `spire-agent validate`, starts the agent with `token` and waits
    /// until `spire-agent healthcheck` passes.
    pub fn start_with(bin: &Path, server: &SpireServer, st: &Settings, token: &str) -> Self {
        let a = &st.agent;
        let root = mkdir(
            a.data_dir
                .parent()
                .unwrap_or_else(|| panic!("agent data dir {:?} has no parent", a.data_dir)),
        );
        mkdir(&a.data_dir);
        for p in [Some(&a.socket_path), a.admin_socket_path.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(d) = p.parent() {
                mkdir(d);
            }
        }
        write(&a.trust_bundle_path, &server.bundle_pem());
        let config = root.join("agent.conf");
        let text = render_agent(st).unwrap_or_else(|e| panic!("rendering agent.conf: {e}"));
        write_private(&config, &text);
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
                .arg(&config)
                .args(["-joinToken", token]),
            root.join("agent.log"),
        );
        let socket = a.socket_path.clone();
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
