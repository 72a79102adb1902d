//! Real SPIRE as child processes: SPIRE's own `spire-server` and
//! `spire-agent` (built by `scripts/build-spire`, version pinned in
//! `tools/spire/go.mod`), configured by what spire-config renders — so
//! every start is also a check that SPIRE accepts those files (each is run
//! through `validate` first).
//!
//! Processes are killed (SIGKILL) and reaped when their handle drops. Every
//! wait has a deadline, polls an observable condition (SPIRE's healthcheck
//! command), notices a process that exited, and fails with that process's
//! log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use spire_config::{DataStore, Deployment, Settings, render_agent, render_server};

/// How long SPIRE gets to become healthy (a busy 2-core machine included).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two healthcheck probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// `tools/spire/go.mod`, which pins the SPIRE version.
const TOOLS_GO_MOD: &str = include_str!("../../tools/spire/go.mod");

/// What went wrong running SPIRE.
#[derive(Debug, thiserror::Error)]
pub enum SpireError {
    /// The binaries are missing or are another version.
    #[error("{0}")]
    Binaries(String),
    /// A file could not be written or read.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The settings could not be rendered.
    #[error("rendering {file}: {message}")]
    Render {
        /// Which file.
        file: &'static str,
        /// Why.
        message: String,
    },
    /// A SPIRE command failed.
    #[error("{command} failed ({status}):\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A SPIRE process exited or did not get healthy in time.
    #[error("{process} {what}; its log ({log}):\n{text}")]
    Process {
        /// spire-server or spire-agent.
        process: &'static str,
        /// What happened.
        what: String,
        /// The log file.
        log: PathBuf,
        /// The log.
        text: String,
    },
    /// SPIRE printed something this harness cannot read.
    #[error("{0}")]
    Unexpected(String),
}

pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SpireError {
    let path = path.to_owned();
    move |source| SpireError::Io {
        action,
        path,
        source,
    }
}

/// The SPIRE version `tools/spire/go.mod` requires, without the `v`.
pub fn pinned_version() -> Option<String> {
    TOOLS_GO_MOD.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("github.com/spiffe/spire"))
            .then(|| w.next().map(|v| v.trim_start_matches('v').to_owned()))
            .flatten()
    })
}

/// The directory holding `spire-server` and `spire-agent`: `dir` if given,
/// else `MESHAUTH_SPIRE_BIN`, else the stable path `scripts/build-spire`
/// maintains (`${MESHAUTH_TOOLS_CACHE:-/var/cache/meshauth-tools}/spire-current/bin`).
/// An error naming the fix when the binaries are missing or are not the
/// pinned version.
pub fn spire_bin(dir: Option<&Path>) -> Result<PathBuf, SpireError> {
    let dir = match (dir, std::env::var_os("MESHAUTH_SPIRE_BIN")) {
        (Some(d), _) => d.to_owned(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => std::env::var_os("MESHAUTH_TOOLS_CACHE")
            .map_or_else(|| PathBuf::from("/var/cache/meshauth-tools"), PathBuf::from)
            .join("spire-current/bin"),
    };
    for name in ["spire-server", "spire-agent"] {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(SpireError::Binaries(format!(
                "{} is missing: run scripts/build-spire (scripts/install-test-deps runs it) \
                 and pass the directory it prints (MESHAUTH_SPIRE_BIN, or --spire-bin)",
                p.display()
            )));
        }
    }
    let want = pinned_version()
        .ok_or_else(|| SpireError::Binaries("tools/spire/go.mod pins no SPIRE version".into()))?;
    let out = run(Command::new(dir.join("spire-server")).arg("--version"))?;
    // The version goes to stderr (mitchellh/cli); accept either stream.
    let got = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if got.trim() != want {
        return Err(SpireError::Binaries(format!(
            "{}/spire-server is version {:?}, not {want} (tools/spire/go.mod): \
             run scripts/build-spire again",
            dir.display(),
            got.trim()
        )));
    }
    Ok(dir)
}

/// Runs `cmd` to completion, capturing its output.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, SpireError> {
    cmd.output().map_err(|e| SpireError::Command {
        command: format!("{cmd:?}"),
        status: "not started".into(),
        output: e.to_string(),
    })
}

/// Runs `cmd`; an error with its output unless it exits 0; its stdout.
fn run_ok(cmd: &mut Command) -> Result<String, SpireError> {
    let out = run(cmd)?;
    if !out.status.success() {
        return Err(SpireError::Command {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            output: format!(
                "stdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process killed (and reaped) on drop, its output appended to a
/// log file (so a restarted process's log follows the old one).
#[derive(Debug)]
pub(crate) struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
    ) -> Result<Self, SpireError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io("opening", log))?;
        let err = out.try_clone().map_err(io("opening", log))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| SpireError::Command {
                command: format!("{cmd:?}"),
                status: "not started".into(),
                output: e.to_string(),
            })?;
        Ok(Self {
            name,
            child: Some(child),
            log: log.to_owned(),
        })
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn failed(&self, what: String) -> SpireError {
        SpireError::Process {
            process: self.name,
            what,
            log: self.log.clone(),
            text: self.log_text(),
        }
    }

    /// Polls `ready` until it holds; an error with the log when the
    /// process exits or `timeout` passes. Returns how long it took.
    pub(crate) fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<Duration, SpireError> {
        let start = Instant::now();
        loop {
            if ready() {
                return Ok(start.elapsed());
            }
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait().map_err(io("waiting on", &self.log))?,
                None => return Err(self.failed(format!("is not running, so not {what}"))),
            };
            if let Some(status) = exited {
                return Err(self.failed(format!("exited ({status}) before {what}")));
            }
            if start.elapsed() >= timeout {
                return Err(self.failed(format!("did not get to {what} within {timeout:?}")));
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
    }

    /// An error with the log if the process has exited (or was killed).
    pub(crate) fn check_running(&mut self, what: &str) -> Result<(), SpireError> {
        let exited = match self.child.as_mut() {
            Some(c) => c.try_wait().map_err(io("waiting on", &self.log))?,
            None => return Err(self.failed(format!("is not running, so not {what}"))),
        };
        match exited {
            Some(status) => Err(self.failed(format!("exited ({status}) before {what}"))),
            None => Ok(()),
        }
    }

    /// SIGKILL and reap (nothing if already stopped).
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Already exited is fine; kill then fails with "invalid input".
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1 (the listener is closed before SPIRE binds
/// it).
pub(crate) fn free_port() -> Result<u16, SpireError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(io("binding 127.0.0.1:0", Path::new("127.0.0.1:0")))?;
    Ok(l.local_addr()
        .map_err(io("local_addr of", Path::new("127.0.0.1:0")))?
        .port())
}

pub(crate) fn mkdir(p: &Path) -> Result<(), SpireError> {
    std::fs::create_dir_all(p).map_err(io("creating", p))
}

/// Writes `text` to `path` with mode 0600 (SPIRE configs can hold secrets).
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), SpireError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("creating", path))?;
    f.write_all(text.as_bytes()).map_err(io("writing", path))
}

/// Settings for a server and one agent under `dir`: standalone (join_token,
/// unix attestor), loopback only, free ports, CA TTL 1h, X.509-SVID TTL
/// 10m, agent SVIDs 1h. Change what you need before starting; [`agent_settings`] gives
/// further agents their own directories and ports.
pub fn settings(dir: &Path, trust_domain: &str) -> Result<Settings, SpireError> {
    let mut st = Settings::new(trust_domain, Deployment::Standalone);
    let server = dir.join("server");
    let data = server.join("data");
    st.server.bind_address = std::net::IpAddr::from([127, 0, 0, 1]);
    st.server.bind_port = free_port()?;
    st.server.socket_path = server.join("api.sock");
    st.server.datastore = DataStore::Sqlite3 {
        path: data.join("datastore.sqlite3"),
    };
    st.server.data_dir = data;
    st.server.ca_ttl = Duration::from_secs(3600);
    st.server.svid_ttl = Duration::from_secs(600);
    st.server.agent_ttl = Some(st.server.ca_ttl);
    st.server.health_port = free_port()?;
    st.agent.server_address = "127.0.0.1".into();
    st.agent.server_port = st.server.bind_port;
    agent_settings(&mut st, &dir.join("agent"))?;
    Ok(st)
}

/// Points `st`'s agent part at `dir` (data, `workload/api.sock`, bootstrap
/// bundle) with a free health port.
pub fn agent_settings(st: &mut Settings, dir: &Path) -> Result<(), SpireError> {
    st.agent.data_dir = dir.join("data");
    st.agent.socket_path = dir.join("workload").join("api.sock");
    st.agent.trust_bundle_path = dir.join("bootstrap-bundle.pem");
    st.agent.health_port = free_port()?;
    Ok(())
}

/// Runs `<tool> run -config <config>` (log beside the config) and waits
/// for `<tool> healthcheck -socketPath <socket>` to pass.
fn run_healthy(
    name: &'static str,
    bin: &Path,
    config: &Path,
    extra: &[&str],
    socket: &Path,
) -> Result<(Proc, Duration), SpireError> {
    let log = config.with_extension("log");
    let start = Instant::now();
    let mut proc = Proc::spawn(
        name,
        Command::new(bin.join(name))
            .args(["run", "-config"])
            .arg(config)
            .args(extra),
        &log,
    )?;
    let health = || {
        run(Command::new(bin.join(name))
            .args(["healthcheck", "-socketPath"])
            .arg(socket))
        .is_ok_and(|o| o.status.success())
    };
    proc.wait_until("a passing healthcheck", START_TIMEOUT, health)?;
    Ok((proc, start.elapsed()))
}

/// Renders one file, writes it 0600 and runs SPIRE's `validate` on it.
fn prepare(
    bin: &Path,
    tool: &str,
    file: &'static str,
    text: Result<String, spire_config::SettingsError>,
    path: &Path,
) -> Result<(), SpireError> {
    let text = text.map_err(|e| SpireError::Render {
        file,
        message: e.to_string(),
    })?;
    write_private(path, &text)?;
    run_ok(
        Command::new(bin.join(tool))
            .args(["validate", "-config"])
            .arg(path),
    )
    .map(drop)
}

/// A running `spire-server` configured by spire-config.
#[derive(Debug)]
pub struct SpireServer {
    bin: PathBuf,
    settings: Settings,
    config: PathBuf,
    proc: Proc,
    /// From the last `spire-server run` to its first passing healthcheck.
    pub started_in: Duration,
}

impl SpireServer {
    /// Renders `server.conf` (beside the admin socket) from `st`, checks it
    /// with `spire-server validate`, starts the server and waits until its
    /// healthcheck passes.
    pub fn start(bin: &Path, st: &Settings) -> Result<Self, SpireError> {
        let root = st.server.socket_path.parent().unwrap_or(Path::new("/"));
        mkdir(root)?;
        mkdir(&st.server.data_dir)?;
        let config = root.join("server.conf");
        prepare(
            bin,
            "spire-server",
            "server.conf",
            render_server(st),
            &config,
        )?;
        let (proc, started_in) =
            run_healthy("spire-server", bin, &config, &[], &st.server.socket_path)?;
        Ok(Self {
            bin: bin.to_owned(),
            settings: st.clone(),
            config,
            proc,
            started_in,
        })
    }

    /// Starts the server again with the same configuration and datastore
    /// (after [`SpireServer::kill`]; a running server is killed first);
    /// waits for a passing healthcheck.
    pub fn restart(&mut self) -> Result<(), SpireError> {
        self.kill();
        let (proc, started_in) = run_healthy(
            "spire-server",
            &self.bin,
            &self.config,
            &[],
            &self.settings.server.socket_path,
        )?;
        self.proc = proc;
        self.started_in = started_in;
        Ok(())
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Its pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The admin socket (the Entry API).
    pub fn socket(&self) -> &Path {
        &self.settings.server.socket_path
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.settings.trust_domain
    }

    /// Runs `spire-server <sub> -socketPath <admin socket> <args>`; its
    /// stdout, or an error with what it printed.
    pub fn cli(&self, sub: &[&str], args: &[&str]) -> Result<String, SpireError> {
        run_ok(
            Command::new(self.bin.join("spire-server"))
                .args(sub)
                .arg("-socketPath")
                .arg(&self.settings.server.socket_path)
                .args(args),
        )
    }

    /// A new join token; the agent attested with it gets `spiffe_id` as an
    /// alias (so entries parented to `spiffe_id` are its).
    pub fn join_token(&self, spiffe_id: &str) -> Result<String, SpireError> {
        let out = self.cli(&["token", "generate"], &["-spiffeID", spiffe_id])?;
        out.lines()
            .find_map(|l| l.strip_prefix("Token:"))
            .map(|t| t.trim().to_owned())
            .ok_or_else(|| {
                SpireError::Unexpected(format!(
                    "no `Token:` line in `spire-server token generate`: {out}"
                ))
            })
    }

    /// The SPIFFE ID SPIRE gives the agent attested with `token`.
    pub fn join_token_agent_id(&self, token: &str) -> String {
        format!(
            "spiffe://{}/spire/agent/join_token/{token}",
            self.settings.trust_domain
        )
    }

    /// The trust bundle, PEM (`spire-server bundle show`).
    pub fn bundle_pem(&self) -> Result<String, SpireError> {
        self.cli(&["bundle", "show"], &[])
    }

    /// Registers `spiffe_id` under `parent_id` with `selectors`
    /// (`type:value`); the entry ID.
    pub fn create_entry(
        &self,
        parent_id: &str,
        spiffe_id: &str,
        selectors: &[&str],
    ) -> Result<String, SpireError> {
        let mut args = vec!["-parentID", parent_id, "-spiffeID", spiffe_id];
        for s in selectors {
            args.extend(["-selector", s]);
        }
        let out = self.cli(&["entry", "create"], &args)?;
        out.lines()
            .find_map(|l| l.strip_prefix("Entry ID"))
            .map(|t| t.trim_start_matches([' ', ':']).trim().to_owned())
            .ok_or_else(|| {
                SpireError::Unexpected(format!(
                    "no `Entry ID` line in `spire-server entry create`: {out}"
                ))
            })
    }

    /// Deletes an entry by ID.
    pub fn delete_entry(&self, id: &str) -> Result<(), SpireError> {
        self.cli(&["entry", "delete"], &["-entryID", id]).map(drop)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}

/// A running `spire-agent` configured by spire-config, attested with a join
/// token. The token goes on the command line (`-joinToken`), where other
/// local users can read it in the process list while the agent runs: it is
/// used once, at attestation, and these are test and demo agents. Where
/// local users are not trusted, give it in the 0600 config instead.
#[derive(Debug)]
pub struct SpireAgent {
    bin: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    proc: Proc,
    /// From the last `spire-agent run` to its first passing healthcheck.
    pub started_in: Duration,
}

impl SpireAgent {
    /// Writes the agent's config (rendered from `st`, beside its data dir)
    /// and `server`'s bundle as the bootstrap bundle, checks the config with
    /// `spire-agent validate`, starts the agent with `token` and waits until
    /// its healthcheck passes.
    pub fn start(
        bin: &Path,
        server: &SpireServer,
        st: &Settings,
        token: &str,
    ) -> Result<Self, SpireError> {
        let a = &st.agent;
        let root = a.data_dir.parent().unwrap_or(Path::new("/"));
        mkdir(&a.data_dir)?;
        for p in [Some(&a.socket_path), a.admin_socket_path.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(d) = p.parent() {
                mkdir(d)?;
            }
        }
        let bundle = server.bundle_pem()?;
        std::fs::write(&a.trust_bundle_path, bundle)
            .map_err(io("writing", &a.trust_bundle_path))?;
        let config = root.join("agent.conf");
        prepare(bin, "spire-agent", "agent.conf", render_agent(st), &config)?;
        let (proc, started_in) = run_healthy(
            "spire-agent",
            bin,
            &config,
            &["-joinToken", token],
            &a.socket_path,
        )?;
        Ok(Self {
            bin: bin.to_owned(),
            config,
            socket: a.socket_path.clone(),
            proc,
            started_in,
        })
    }

    /// Starts the agent again after [`SpireAgent::kill`] (a running agent
    /// is killed first): it comes back with the SVID it was attested with,
    /// kept in its data dir, and needs no new token.
    pub fn restart(&mut self) -> Result<(), SpireError> {
        self.kill();
        let (proc, started_in) =
            run_healthy("spire-agent", &self.bin, &self.config, &[], &self.socket)?;
        self.proc = proc;
        self.started_in = started_in;
        Ok(())
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// The Workload API socket.
    pub fn workload_socket(&self) -> &Path {
        &self.socket
    }

    /// The SPIFFE IDs the agent serves this process, read with SPIRE's own
    /// client (`spire-agent api fetch x509`); empty when it serves none.
    pub fn served(&self) -> Result<Vec<String>, SpireError> {
        self.served_as(None)
    }

    /// The SPIFFE IDs the agent serves a process running as `uid` (gid the
    /// same; `None`: this process), read with `spire-agent api fetch x509`
    /// run as that user. The socket's directories must let it through.
    pub fn served_as(&self, uid: Option<u32>) -> Result<Vec<String>, SpireError> {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(self.bin.join("spire-agent"));
        cmd.args(["api", "fetch", "x509", "-timeout", "5s", "-socketPath"])
            .arg(&self.socket);
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let out = run(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("SPIFFE ID:"))
            .map(|s| s.trim().to_owned())
            .collect())
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}
