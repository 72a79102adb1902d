//! A cluster of real `meshauth agent` processes on a [`crate::Lab`]:
//! one agent per node (in the node's namespace, attached to the node's pods
//! cgroup, maps pinned in its own bpffs directory), spire-dev with one
//! agent socket per node, and a manifest directory (Nodes, Namespace, Pods,
//! policies) every agent reads. Used by `meshauth demo`, the multi-node
//! tests and the latency bench.
//!
//! Identities: in directory mode each agent allocates identity numbers in
//! its own state file. The testbed allocates them first (same compiler, same
//! file) and seeds every agent's state with that file, so all agree;
//! SPIRE entries are made per (identity, node that runs it) — a node only
//! ever gets the keys of its own workloads.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use policy_bridge::source::files::{FilesConfig, FilesSource};

mod spire;
pub use spire::{RealSpire, Spire, TRUST_DOMAIN, node_alias};

use crate::{Lab, LabError, LabOptions, NodeInfo, PodInfo};
use auth_agent::api::ApiClient;
use auth_agent::api::types::{AgentStatus, AuthEntry};

/// The namespace every testbed pod runs in.
pub const NAMESPACE: &str = "production";

/// Testbed failures.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The lab failed.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// SPIRE (spire-dev or real) failed.
    #[error("SPIRE: {0}")]
    Spire(String),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Compiling the manifests failed.
    #[error("compiling the manifests: {0}")]
    Compile(String),
    /// Something did not happen in time, or is unknown.
    #[error("{0}")]
    Failed(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TestbedError + 'a {
    move |source| TestbedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Testbed settings.
#[derive(Debug, Clone)]
pub struct TestbedOptions {
    /// Lab prefix (1..=8 of `[a-z0-9]`).
    pub prefix: String,
    /// Node names.
    pub nodes: Vec<String>,
    /// SVID lifetime.
    pub svid_ttl: Duration,
    /// The `meshauth` binary (None: this executable).
    pub meshauth_bin: Option<PathBuf>,
    /// How often agents re-read the manifest directory.
    pub poll_interval: Duration,
    /// `MESHAUTH_LOG` for the agents.
    pub log: String,
    /// Lab `<net>`.
    pub net: u8,
    /// More agent flags.
    pub agent_args: Vec<String>,
    /// Run agents as this `meshauth-agent` binary instead of `meshauth
    /// agent` (the same code; the bench compares the two processes).
    pub agent_bin: Option<PathBuf>,
    /// Run real SPIRE from this directory (`spire-server`, `spire-agent`,
    /// the version `tools/spire/go.mod` pins) instead of spire-dev.
    pub spire_bin: Option<PathBuf>,
    /// Real SPIRE's CA lifetime (None: six SVID lifetimes, at least a day);
    /// short, to see CA rotations.
    pub spire_ca_ttl: Option<Duration>,
    /// How the agents get their SVIDs.
    pub svid_mode: SvidMode,
    /// Run the agents with only these capabilities (e.g. `BPF`,
    /// `NET_ADMIN`): the rest dropped from their bounding set, as a
    /// container runtime does for `capabilities: {drop: [ALL], add: …}`.
    /// `None`: root's full set.
    pub agent_capabilities: Option<Vec<String>>,
}

/// How the testbed's agents get their SVIDs from SPIRE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SvidMode {
    /// The Workload API: the entries select the node's meshauth agent
    /// (root), which receives every SVID registered on its node.
    #[default]
    WorkloadApi,
    /// The Delegated Identity API per pod (`--identity-source
    /// delegated-pods`): each app's pods run as a uid of their own
    /// (`securityContext.runAsUser` in the manifest), the entries select
    /// that uid, and the agent — SPIRE's authorized delegate — subscribes
    /// by the PID of a process in each pod.
    DelegatedPods,
}

/// The first uid the testbed gives an app's pods in [`SvidMode::DelegatedPods`].
pub const FIRST_APP_UID: u32 = 20001;

impl Default for TestbedOptions {
    fn default() -> Self {
        Self {
            prefix: "tb".into(),
            nodes: vec!["node-a".into(), "node-b".into(), "node-c".into()],
            svid_ttl: Duration::from_secs(3600),
            meshauth_bin: None,
            poll_interval: Duration::from_millis(100),
            log: "info".into(),
            net: 42,
            agent_args: Vec::new(),
            agent_bin: None,
            spire_bin: None,
            spire_ca_ttl: None,
            svid_mode: SvidMode::WorkloadApi,
            agent_capabilities: None,
        }
    }
}

#[derive(Debug)]
struct PodRecord {
    node: String,
    /// Its `app` label, once published.
    app: Option<String>,
    /// [`SvidMode::DelegatedPods`]: the pod's container, a process running
    /// as the app's uid from publication on (a running pod has one; it is
    /// what SPIRE attests by PID). Killed with the pod's cgroup.
    container: Option<Child>,
}

/// The running testbed. Drop removes everything (agents, namespaces,
/// cgroups, pinned programs and maps).
#[derive(Debug)]
pub struct Testbed {
    opts: TestbedOptions,
    lab: Lab,
    root: tempfile::TempDir,
    spire: Spire,
    pin_root: PathBuf,
    agents: BTreeMap<String, Child>,
    /// Per-node agent flags ([`Testbed::set_agent_args`]).
    node_args: BTreeMap<String, Vec<String>>,
    node_env: BTreeMap<String, Vec<(String, String)>>,
    pods: BTreeMap<String, PodRecord>,
    /// SPIRE entries by (identity, node): their ID and selectors.
    entries: BTreeMap<(u32, String), (String, Vec<String>)>,
    /// The uid each app's pods run as ([`SvidMode::DelegatedPods`]).
    app_uids: BTreeMap<String, u32>,
    compiler: FilesSource,
    torn_down: bool,
}

/// Where an agent's things are.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    /// Its local API socket.
    pub api_socket: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its bpffs pin directory.
    pub pin_dir: PathBuf,
}

impl Testbed {
    /// Removes what a killed earlier run with `prefix` left behind.
    pub fn cleanup_stale(prefix: &str) {
        Lab::cleanup_stale(prefix);
        let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") else {
            return;
        };
        let me = std::process::id();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&format!("meshauth-tb-{prefix}-")) else {
                continue;
            };
            let pid: u32 = rest.parse().unwrap_or(0);
            if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Builds the lab (nodes only), starts spire-dev and writes the Nodes
    /// and the Namespace. Agents start with [`Self::start_agents`].
    pub async fn start(opts: TestbedOptions) -> Result<Self, TestbedError> {
        ensure_bpffs()?;
        Self::cleanup_stale(&opts.prefix);
        let mut lab = Lab::with_options(
            &opts.prefix,
            LabOptions {
                net: opts.net,
                meshauth_bin: opts.meshauth_bin.clone(),
            },
        )?;
        for n in &opts.nodes {
            lab.add_node(n)?;
        }
        let root = tempfile::Builder::new()
            .prefix(&format!("meshauth-{}-", opts.prefix))
            .tempdir()
            .map_err(io("creating", Path::new("/tmp")))?;
        for d in ["manifests", "spire", "agents"] {
            let p = root.path().join(d);
            std::fs::create_dir_all(&p).map_err(io("creating", &p))?;
        }
        let spire = Spire::start(
            &root.path().join("spire"),
            &opts.nodes,
            opts.svid_ttl,
            opts.spire_bin.as_deref(),
            opts.spire_ca_ttl,
            opts.svid_mode == SvidMode::DelegatedPods,
        )
        .await?;
        let mut fc = FilesConfig::new(root.path().join("manifests"));
        fc.identity_file = Some(root.path().join("identities.json"));
        let compiler = FilesSource::new(fc).map_err(|e| TestbedError::Compile(e.to_string()))?;
        let pin_root = PathBuf::from(format!(
            "/sys/fs/bpf/meshauth-tb-{}-{}",
            opts.prefix,
            std::process::id()
        ));
        let tb = Self {
            opts,
            lab,
            root,
            spire,
            pin_root,
            agents: BTreeMap::new(),
            node_args: BTreeMap::new(),
            node_env: BTreeMap::new(),
            pods: BTreeMap::new(),
            entries: BTreeMap::new(),
            app_uids: BTreeMap::new(),
            compiler,
            torn_down: false,
        };
        tb.write(
            "namespace.yaml",
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"),
        )?;
        for n in tb.lab.nodes() {
            tb.write(&format!("node-{}.yaml", n.name), &node_yaml(n))?;
        }
        Ok(tb)
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// SPIRE (spire-dev or real).
    pub fn spire(&self) -> &Spire {
        &self.spire
    }

    /// SPIRE, mutable (outage, killing real SPIRE's processes).
    pub fn spire_mut(&mut self) -> &mut Spire {
        &mut self.spire
    }

    /// The manifest directory.
    pub fn manifests(&self) -> PathBuf {
        self.root.path().join("manifests")
    }

    /// A node of the lab.
    pub fn node(&self, name: &str) -> Result<&NodeInfo, TestbedError> {
        self.lab
            .node(name)
            .ok_or_else(|| TestbedError::Failed(format!("no node {name}")))
    }

    /// A pod of the lab.
    pub fn pod(&self, name: &str) -> Result<&PodInfo, TestbedError> {
        self.lab
            .pod(name)
            .ok_or_else(|| TestbedError::Failed(format!("no pod {name}")))
    }

    /// Writes a manifest atomically (readers never see half a file).
    pub fn write(&self, file: &str, yaml: &str) -> Result<(), TestbedError> {
        let dir = self.manifests();
        let tmp = dir.join(format!(".{file}.tmp"));
        let dst = dir.join(file);
        std::fs::write(&tmp, yaml).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &dst).map_err(io("renaming", &dst))
    }

    /// Removes a manifest.
    pub fn unlink(&self, file: &str) -> Result<(), TestbedError> {
        let p = self.manifests().join(file);
        std::fs::remove_file(&p).map_err(io("removing", &p))
    }

    /// Adds a pod with label `app=<app>` (service account `<app>`) on
    /// `node` and publishes it (phase Running, both addresses).
    /// In [`SvidMode::DelegatedPods`] its processes run as the app's uid.
    pub fn add_pod(&mut self, node: &str, name: &str, app: &str) -> Result<PodInfo, TestbedError> {
        self.lab.add_pod(node, name)?;
        self.pods.insert(
            name.to_string(),
            PodRecord {
                node: node.to_string(),
                app: None,
                container: None,
            },
        );
        self.publish_pod(name, app)?;
        Ok(self.pod(name)?.clone())
    }

    /// Makes `app`'s pods run as `uid` from their publication on (two apps
    /// sharing a uid: what the `unix` attestor cannot tell apart).
    pub fn set_app_uid(&mut self, app: &str, uid: u32) {
        self.app_uids.insert(app.to_owned(), uid);
    }

    /// The uid `app`'s pods run as in [`SvidMode::DelegatedPods`] (one per
    /// app, from [`FIRST_APP_UID`] on, in order of first use).
    pub fn app_uid(&mut self, app: &str) -> u32 {
        let next = self
            .app_uids
            .values()
            .max()
            .map_or(FIRST_APP_UID, |u| u + 1);
        *self.app_uids.entry(app.to_owned()).or_insert(next)
    }

    /// Removes a pod (manifest first, then its namespace).
    pub fn remove_pod(&mut self, name: &str) -> Result<(), TestbedError> {
        self.unlink(&format!("pod-{name}.yaml"))?;
        let record = self.pods.remove(name);
        self.lab.remove_pod(name)?;
        if let Some(mut c) = record.and_then(|r| r.container) {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Removes a node: its pods and Node object from the manifests, its
    /// agent (killed), its namespaces.
    pub fn remove_node(&mut self, name: &str) -> Result<(), TestbedError> {
        let pods: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| p.node == name)
            .map(|(n, _)| n.clone())
            .collect();
        for p in &pods {
            self.unlink(&format!("pod-{p}.yaml"))?;
            if let Some(mut c) = self.pods.remove(p).and_then(|r| r.container) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.unlink(&format!("node-{name}.yaml"))?;
        self.kill_agent(name);
        let paths = self.paths(name);
        if let Some(n) = self.lab.node(name) {
            let _ = auth_ebpf::Datapath::detach(&paths.pin_dir, &n.pods_cgroup);
        }
        let _ = std::fs::remove_dir_all(&paths.pin_dir);
        self.lab.remove_node(name)?;
        Ok(())
    }

    /// The identity the agents give `pod` (allocating as they do).
    pub fn identity_of(&mut self, pod: &str) -> Result<u32, TestbedError> {
        self.compiler
            .sync()
            .map_err(|e| TestbedError::Compile(e.to_string()))?;
        let ip: IpAddr = self.pod(pod)?.ipv4.into();
        self.compiler
            .engine()
            .state()
            .endpoints
            .get(&ip)
            .map(|e| e.identity)
            .ok_or_else(|| TestbedError::Failed(format!("pod {pod} has no identity (yet)")))
    }

    /// Registers `pod`'s identity with SPIRE on the pod's node (once per
    /// identity and node); returns the identity.
    pub fn register(&mut self, pod: &str) -> Result<u32, TestbedError> {
        let id = self.identity_of(pod)?;
        let node = self
            .pods
            .get(pod)
            .map(|p| p.node.clone())
            .ok_or_else(|| TestbedError::Failed(format!("no pod {pod}")))?;
        self.register_identity(id, &node)?;
        Ok(id)
    }

    /// Where `node`'s agent keeps its things.
    pub fn paths(&self, node: &str) -> AgentPaths {
        let dir = self.root.path().join("agents").join(node);
        AgentPaths {
            api_socket: dir.join("agent.sock"),
            log: dir.join("agent.log"),
            state_dir: dir.join("state"),
            pin_dir: self.pin_root.join(node),
        }
    }

    /// The API of `node`'s agent.
    pub fn api(&self, node: &str) -> ApiClient {
        ApiClient::new(self.paths(node).api_socket)
    }

    /// Starts every node's agent and waits until all are ready.
    pub async fn start_agents(&mut self) -> Result<(), TestbedError> {
        let names: Vec<String> = self.lab.nodes().map(|n| n.name.clone()).collect();
        for n in &names {
            self.start_agent(n)?;
        }
        for n in &names {
            self.wait_ready(n, Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Starts `node`'s agent (again, after a kill: its state and pins stay).
    pub fn start_agent(&mut self, node: &str) -> Result<(), TestbedError> {
        // Seed the identity allocation (first start only).
        self.compiler
            .sync()
            .map_err(|e| TestbedError::Compile(e.to_string()))?;
        let paths = self.paths(node);
        std::fs::create_dir_all(&paths.state_dir).map_err(io("creating", &paths.state_dir))?;
        let ids = paths.state_dir.join("identities.json");
        if !ids.exists() {
            let src = self.root.path().join("identities.json");
            if src.exists() {
                std::fs::copy(&src, &ids).map_err(io("copying", &ids))?;
            }
        }
        let info = self.node(node)?.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(io("opening", &paths.log))?;
        let log2 = log.try_clone().map_err(io("opening", &paths.log))?;
        let (source, spire) = match self.opts.svid_mode {
            SvidMode::WorkloadApi => ("workload", self.spire.workload_socket(node)?),
            SvidMode::DelegatedPods => ("delegated-pods", self.spire.admin_socket(node)?),
        };
        let (bin, subcommand) = match &self.opts.agent_bin {
            Some(b) => (b.clone(), None),
            None => (self.lab.meshauth_bin().to_path_buf(), Some("agent")),
        };
        let mut cmd = match &self.opts.agent_capabilities {
            None => self.lab.command(&info, &bin),
            Some(caps) => {
                // After lab-exec has entered the node (which needs
                // CAP_SYS_ADMIN): setpriv drops every other capability from
                // the bounding set, so the agent execs with these alone.
                let list: Vec<String> = caps
                    .iter()
                    .map(|c| format!("+{}", c.to_ascii_lowercase()))
                    .collect();
                let set = format!("-all,{}", list.join(","));
                let mut c = self.lab.command(&info, "setpriv");
                c.arg(format!("--bounding-set={set}"))
                    .arg(format!("--inh-caps={set}"))
                    .arg("--")
                    .arg(&bin);
                c
            }
        };
        cmd.args(subcommand)
            .arg("--node-name")
            .arg(node)
            .arg("--identity-source")
            .arg(source)
            .arg("--spire-socket")
            .arg(spire)
            .arg("--policy-source")
            .arg(self.manifests())
            .arg("--policy-poll-interval")
            .arg(format!("{}ms", self.opts.poll_interval.as_millis()))
            .arg("--bpf-pin-dir")
            .arg(&paths.pin_dir)
            .arg("--pods-cgroup")
            .arg(&info.pods_cgroup)
            .arg("--handshake-listen")
            .arg(format!("{}:4250", info.ipv4))
            .arg("--metrics-listen")
            .arg(format!("{}:9964", info.ipv4))
            .arg("--api-socket")
            .arg(&paths.api_socket)
            .arg("--state-dir")
            .arg(&paths.state_dir)
            .arg("--connect-timeout")
            .arg("1s")
            .arg("--sweep-cron")
            .arg("*/5 * * * * *")
            .args(&self.opts.agent_args)
            .args(self.node_args.get(node).into_iter().flatten())
            .envs(
                self.node_env
                    .get(node)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k, v)),
            )
            .env("MESHAUTH_LOG", &self.opts.log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd.spawn().map_err(io("starting the agent", &bin))?;
        self.agents.insert(node.to_string(), child);
        Ok(())
    }

    /// Flags for `node`'s agent only, from its next start on (after
    /// [`TestbedOptions::agent_args`]; a flag must not be in both).
    pub fn set_agent_args(&mut self, node: &str, args: Vec<String>) {
        self.node_args.insert(node.to_owned(), args);
    }

    /// Environment variables for `node`'s agent only, from its next start on
    /// (e.g. `LD_PRELOAD` of libfaketime to step its wall clock).
    pub fn set_agent_env(&mut self, node: &str, env: Vec<(String, String)>) {
        self.node_env.insert(node.to_owned(), env);
    }

    /// `kill -9` of `node`'s agent.
    pub fn kill_agent(&mut self, node: &str) {
        if let Some(mut c) = self.agents.remove(node) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to `node`'s agent; waits for it to exit and returns its exit
    /// status (None if it had to be killed after `grace`).
    pub fn terminate_agent(
        &mut self,
        node: &str,
        grace: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut c = self.agents.remove(node)?;
        if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on `node`'s metrics and health address (inside the node's
    /// namespace); the status code and body.
    pub fn http_get(&self, node: &str, path: &str) -> Result<(u16, String), TestbedError> {
        use std::io::{Read as _, Write as _};
        let n = self.node(node)?;
        let addr = std::net::SocketAddr::from((n.ipv4, 9964));
        let path = path.to_string();
        crate::netns::run_in(&n.netns, move || {
            let err = |e: std::io::Error| LabError::sys("http", addr.to_string(), e);
            let mut s =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(err)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(err)?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: meshauth\r\nConnection: close\r\n\r\n"
            )
            .map_err(err)?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).map_err(err)?;
            Ok(buf)
        })
        .map_err(TestbedError::from)
        .and_then(|raw| {
            let code = raw
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| TestbedError::Failed(format!("not HTTP: {raw:.80}")))?;
            let body = raw
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Ok((code, body))
        })
    }

    /// Whether `node`'s agent process is still running.
    pub fn agent_running(&mut self, node: &str) -> bool {
        self.agents
            .get_mut(node)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until `node`'s agent reports ready.
    pub async fn wait_ready(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> Result<AgentStatus, TestbedError> {
        let deadline = Instant::now() + timeout;
        let api = self.api(node);
        let mut last;
        loop {
            match api.get_json::<AgentStatus>("/v1/status").await {
                Ok(s) if s.ready.all() => return Ok(s),
                Ok(s) => last = format!("{:?}", s.ready),
                Err(e) => last = e.to_string(),
            }
            if !self.agent_running(node) {
                return Err(TestbedError::Failed(format!(
                    "the agent of {node} exited; its log:\n{}",
                    self.log_tail(node, 30)
                )));
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Failed(format!(
                    "the agent of {node} not ready after {timeout:?}: {last}; its log:\n{}",
                    self.log_tail(node, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `n` lines of `node`'s agent log.
    pub fn log_tail(&self, node: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.paths(node).log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `node`'s auth map through its agent.
    pub async fn auth_entries(&self, node: &str) -> Result<Vec<AuthEntry>, TestbedError> {
        self.api(node)
            .get_json("/v1/auth")
            .await
            .map_err(|e| TestbedError::Failed(e.to_string()))
    }

    /// `node`'s status through its agent.
    pub async fn status(&self, node: &str) -> Result<AgentStatus, TestbedError> {
        self.api(node)
            .get_json("/v1/status")
            .await
            .map_err(|e| TestbedError::Failed(e.to_string()))
    }

    /// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
    pub async fn wait_for<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: F,
    ) -> Result<T, TestbedError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Failed(format!(
                    "{what}: not within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops everything; what Drop does.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for n in names {
            self.kill_agent(&n);
        }
        for p in self.pods.values_mut() {
            if let Some(c) = &mut p.container {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for n in self.lab.nodes() {
            let pin = self.pin_root.join(&n.name);
            let _ = auth_ebpf::Datapath::detach(&pin, &n.pods_cgroup);
        }
        let _ = std::fs::remove_dir_all(&self.pin_root);
        self.lab.teardown();
    }
}

/// Helpers for the cluster bench: pods published in two steps, SPIRE
/// entries by identity, agents stopped with their datapath.
impl Testbed {
    /// Adds a pod to the lab (namespace, cgroup, veth) without publishing
    /// it; [`Self::publish_pod`] writes its manifest later.
    pub fn add_lab_pod(&mut self, node: &str, name: &str) -> Result<PodInfo, TestbedError> {
        let info = self.lab.add_pod(node, name)?;
        self.pods.insert(
            name.to_string(),
            PodRecord {
                node: node.to_string(),
                app: None,
                container: None,
            },
        );
        Ok(info)
    }

    /// Publishes a pod added with [`Self::add_lab_pod`] (label `app=<app>`);
    /// in [`SvidMode::DelegatedPods`] its processes run as the app's uid
    /// from now on (`securityContext.runAsUser`).
    pub fn publish_pod(&mut self, name: &str, app: &str) -> Result<(), TestbedError> {
        let run_as = match self.opts.svid_mode {
            SvidMode::DelegatedPods => Some(self.app_uid(app)),
            SvidMode::WorkloadApi => None,
        };
        self.lab.set_run_as(name, run_as)?;
        let info = self.pod(name)?.clone();
        let container = match run_as {
            Some(_) if self.pods.get(name).is_some_and(|p| p.container.is_none()) => {
                Some(self.lab.spawn(&info, "sleep", ["infinity"])?)
            }
            _ => None,
        };
        if let Some(p) = self.pods.get_mut(name) {
            p.app = Some(app.to_owned());
            if container.is_some() {
                p.container = container;
            }
        }
        self.write(&format!("pod-{name}.yaml"), &pod_yaml(&info, app))
    }

    /// Registers `identity` with SPIRE on `node` (once per pair); the
    /// node's SPIRE agent holds the SVID on return.
    pub fn register_identity(&mut self, identity: u32, node: &str) -> Result<(), TestbedError> {
        if self.entries.contains_key(&(identity, node.to_string())) {
            return Ok(());
        }
        let selectors = self.selectors_for(identity)?;
        let id = self.spire.add_entry(identity, node, &selectors)?;
        self.entries
            .insert((identity, node.to_string()), (id, selectors));
        Ok(())
    }

    /// What `identity`'s entries select: the node's meshauth agent (root)
    /// in [`SvidMode::WorkloadApi`], the uid of the identity's app in
    /// [`SvidMode::DelegatedPods`].
    fn selectors_for(&mut self, identity: u32) -> Result<Vec<String>, TestbedError> {
        if self.opts.svid_mode == SvidMode::WorkloadApi {
            return Ok(vec!["unix:uid:0".to_owned()]);
        }
        let pods: Vec<(String, String)> = self
            .pods
            .iter()
            .filter_map(|(n, p)| Some((n.clone(), p.app.clone()?)))
            .collect();
        for (pod, app) in pods {
            if self.identity_of(&pod).ok() == Some(identity) {
                return Ok(vec![format!("unix:uid:{}", self.app_uid(&app))]);
            }
        }
        Err(TestbedError::Failed(format!(
            "no published pod has identity {identity}: its app's uid, which the entry selects, is unknown"
        )))
    }

    /// Removes the SPIRE entry of `identity` on `node`; the node's SPIRE
    /// agent has dropped the SVID on return.
    pub fn unregister_identity(&mut self, identity: u32, node: &str) -> Result<(), TestbedError> {
        let Some((id, selectors)) = self.entries.remove(&(identity, node.to_string())) else {
            return Err(TestbedError::Failed(format!(
                "identity {identity} is not registered on {node}"
            )));
        };
        self.spire.remove_entry(&id, identity, node, &selectors)
    }

    /// The identity the agents give the endpoint at `ip` (any published
    /// pod, also one without a lab namespace).
    pub fn identity_at(&mut self, ip: IpAddr) -> Result<u32, TestbedError> {
        self.compiler
            .sync()
            .map_err(|e| TestbedError::Compile(e.to_string()))?;
        self.compiler
            .engine()
            .state()
            .endpoints
            .get(&ip)
            .map(|e| e.identity)
            .ok_or_else(|| TestbedError::Failed(format!("no endpoint at {ip} (yet)")))
    }

    /// The process id of `node`'s agent, while it runs.
    pub fn agent_pid(&mut self, node: &str) -> Option<u32> {
        self.agent_running(node)
            .then(|| self.agents.get(node).map(Child::id))
            .flatten()
    }

    /// Stops `node`'s agent and removes its datapath: links released (the
    /// pods' cgroup is no longer attached), maps unpinned. Its state
    /// directory stays; [`Self::start_agent`] starts it afresh.
    pub fn stop_agent(&mut self, node: &str) -> Result<(), TestbedError> {
        self.kill_agent(node);
        let paths = self.paths(node);
        let cgroup = self.node(node)?.pods_cgroup.clone();
        if paths.pin_dir.exists() {
            auth_ebpf::Datapath::detach(&paths.pin_dir, &cgroup)
                .map_err(|e| TestbedError::Failed(format!("detaching {node}: {e}")))?;
            std::fs::remove_dir_all(&paths.pin_dir).map_err(io("removing", &paths.pin_dir))?;
        }
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Whether this process runs as root (the lab needs it: namespaces,
/// cgroups, BPF).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Mounts bpffs on `/sys/fs/bpf` when nothing mounted it (systemd does on a
/// normal Debian 12; a minimal system or container may not).
pub fn ensure_bpffs() -> Result<(), TestbedError> {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    let dir = Path::new("/sys/fs/bpf");
    let is_bpffs = || rustix::fs::statfs(dir).is_ok_and(|s| s.f_type as u64 == BPF_FS_MAGIC);
    if is_bpffs() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    rustix::mount::mount("bpf", dir, "bpf", rustix::mount::MountFlags::empty(), None).map_err(
        |e| TestbedError::Io {
            what: "mounting bpffs (mount -t bpf bpf /sys/fs/bpf) on",
            path: dir.to_path_buf(),
            source: e.into(),
        },
    )?;
    if is_bpffs() {
        Ok(())
    } else {
        Err(TestbedError::Failed(
            "/sys/fs/bpf is not bpffs after mounting it".into(),
        ))
    }
}

fn node_yaml(n: &NodeInfo) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nspec:\n  podCIDR: {}\n  podCIDRs:\n    - {}\n    - \"{}\"\nstatus:\n  addresses:\n    - type: InternalIP\n      address: {}\n    - type: InternalIP\n      address: \"{}\"\n",
        n.name, n.pod_cidr_v4, n.pod_cidr_v4, n.pod_cidr_v6, n.ipv4, n.ipv6
    )
}

fn pod_yaml(p: &PodInfo, app: &str) -> String {
    let security = p.run_as.map_or(String::new(), |u| {
        format!("  securityContext:\n    runAsUser: {u}\n    runAsGroup: {u}\n")
    });
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  uid: {uid}\n  labels:\n    app: {app}\nspec:\n  nodeName: {node}\n  serviceAccountName: {app}\n{security}status:\n  phase: Running\n  podIP: {v4}\n  podIPs:\n    - ip: {v4}\n    - ip: \"{v6}\"\n",
        name = p.name,
        uid = p.uid,
        node = p.node,
        v4 = p.ipv4,
        v6 = p.ipv6,
    )
}
