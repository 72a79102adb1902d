//! The agent (`meshauth-agent`; `meshauth agent` in the demo): svid-cache,
//! policy-bridge, the datapath, the auth manager and the handshake server
//! wired together, with metrics, health and the local API.
//!
//! Start order: the API socket first (one agent per node: a second agent is
//! refused there, before it touches the first one's datapath, pins or
//! state), then SVID source and policy source (they need nothing), then the
//! datapath (loaded, attached — pinned maps and links are reused, so a
//! restart changes nothing the kernel holds), health and API, then — once
//! policy has synced — the datapath maps, the handshake server and the auth
//! manager (which reads the auth map back first: starting it on an empty
//! desired state would collect every entry). [`run`] starts them in that
//! order, one call per phase, each phase in its own module: `sources`,
//! `datapath`, `serve`, `policy`, `encryption`, `authentication`. Shutdown leaves the
//! programs attached and the maps pinned: a restarted agent loses no
//! authentication.

mod authentication;
pub mod backend;
mod datapath;
mod encryption;
pub mod health;
pub mod metrics;
mod pod_svids;
mod policy;
mod serve;
mod sources;
mod tasks;

use tasks::Tasks;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use auth_ebpf::DatapathError;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::auth::manager::ManagerError;
use crate::auth::metrics::ManagerMetrics;
use crate::auth::schedule::ScheduleError;
use crate::auth::store::StoreError;
use crate::config::Config;
use crate::datapath_sync::SyncError;
use crate::handshake::{HandshakeError, Metrics};
use crate::nodes::NodeTableError;

/// Why the agent could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The trust domain is not valid.
    #[error("trust domain {0:?}: {1}")]
    TrustDomain(String, svid_cache::IdentityError),
    /// The state directory cannot be created.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The node table failed.
    #[error(transparent)]
    Nodes(#[from] NodeTableError),
    /// Checking the auth entries read back against the node table failed.
    #[error(transparent)]
    Resume(#[from] crate::nodes::resume::ResumeError),
    /// Loading or attaching the datapath failed.
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    /// The datapath maps could not be synced.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// The auth map could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The manifest directory source failed to start.
    #[error("policy source: {0}")]
    Files(#[from] policy_bridge::source::files::FilesError),
    /// No Kubernetes client could be built.
    #[error("kubernetes client: {0}")]
    Kube(String),
    /// The handshake server could not start.
    #[error("handshake server: {0}")]
    Handshake(#[from] HandshakeError),
    /// The local API socket could not be bound.
    #[error(transparent)]
    ApiSocket(#[from] crate::api::socket::BindError),
    /// A listener could not be bound.
    #[error("{what} on {addr}: {source}")]
    Listen {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The sweep schedule could not be set up.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The auth manager stopped.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// WireGuard could not start.
    #[error("wireguard: {0}")]
    WireGuard(#[from] crate::wireguard::manager::WireGuardError),
    /// Shut down before policy synced.
    #[error("shut down before the first policy sync")]
    Interrupted,
}

/// Readiness parts, set as the agent comes up.
#[derive(Debug, Default)]
pub struct Readiness {
    datapath: AtomicBool,
    svids: AtomicBool,
    policy: AtomicBool,
}

impl Readiness {
    /// The parts now.
    pub fn get(&self) -> crate::api::types::Readiness {
        crate::api::types::Readiness {
            datapath: self.datapath.load(Ordering::Relaxed),
            svids: self.svids.load(Ordering::Relaxed),
            policy: self.policy.load(Ordering::Relaxed),
        }
    }
}

/// Liveness: healthy until a task the agent cannot do without fails.
#[derive(Debug, Default)]
pub struct Liveness {
    failed: Mutex<Option<String>>,
}

impl Liveness {
    /// Marks the agent unhealthy (the first reason is kept).
    pub fn fail(&self, why: impl Into<String>) {
        let why = why.into();
        tracing::error!(reason = %why, "agent unhealthy");
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    /// Why the agent is unhealthy, if it is.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Handshakes by outcome, for `meshauth status`.
#[derive(Debug, Default)]
pub struct Counts {
    pub(crate) initiated_ok: AtomicU64,
    pub(crate) initiated_failed: AtomicU64,
    pub(crate) served_ok: AtomicU64,
    pub(crate) served_failed: AtomicU64,
}

/// Runs the agent until `shutdown` is cancelled, then stops it: the drain
/// token is cancelled, the handshake server lets handshakes in flight finish
/// for half the grace period and cancels the rest, and every task is joined
/// within `shutdown_grace` (those still running after it are aborted).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    tracing::info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        version = env!("CARGO_PKG_VERSION"),
        "meshauth agent starting"
    );
    let token = shutdown.child_token();
    let mut tasks = Tasks::default();
    let mut api_socket = None;
    let result = run_inner(&config, &token, &mut tasks, &mut api_socket).await;
    token.cancel();
    let joined = tasks.join(config.shutdown_grace).await;
    tracing::info!(
        finished = joined.finished.len(),
        panicked = ?joined.panicked,
        aborted = ?joined.aborted,
        "agent tasks joined"
    );
    // Programs stay attached and maps pinned; only the API socket goes, and
    // only if it is the one this agent bound.
    drop(api_socket);
    match &result {
        Ok(()) => tracing::info!("meshauth agent stopped; programs stay attached, maps pinned"),
        Err(e) => tracing::error!(error = %e, "meshauth agent failed"),
    }
    result
}

/// What every start phase uses: the settings, the drain token, the task set
/// (joined at shutdown), and the agent's state as health and the API report
/// it.
#[derive(Debug)]
struct Start<'a> {
    config: &'a Config,
    token: &'a CancellationToken,
    tasks: &'a mut Tasks,
    ready: Arc<Readiness>,
    live: Arc<Liveness>,
    counts: Arc<Counts>,
    /// Set once WireGuard is up (the API reads its status and rotates).
    wireguard: Arc<std::sync::OnceLock<crate::wireguard::manager::WireGuardHandle>>,
}

/// Starts the agent phase by phase, in the order of the module docs, then
/// runs the auth manager until `token` is cancelled.
async fn run_inner(
    config: &Config,
    token: &CancellationToken,
    tasks: &mut Tasks,
    api_socket: &mut Option<crate::api::socket::SocketGuard>,
) -> Result<(), AgentError> {
    create_state_dir(config)?;
    // One agent per node: the API socket is taken first, so a second agent
    // is refused before it touches the first one's datapath, pins or state.
    let (api, guard) = crate::api::socket::bind_guarded(&config.api_socket)?;
    *api_socket = Some(guard);
    let mut s = Start {
        config,
        token,
        tasks,
        ready: Arc::new(Readiness::default()),
        live: Arc::new(Liveness::default()),
        counts: Arc::new(Counts::default()),
        wireguard: Arc::default(),
    };
    let mut registry = Registry::with_prefix("meshauth");
    let hs_metrics = Metrics::register(registry.sub_registry_with_prefix("handshake"));
    let mgr_metrics = ManagerMetrics::register(registry.sub_registry_with_prefix("auth"));
    let wg_metrics = crate::wireguard::manager::WgMetrics::register(
        registry.sub_registry_with_prefix("wireguard"),
    );

    let mut sources = sources::start(&mut s).await?;
    let (mut datapath, cgroup, attach_waits) = datapath::load_and_attach(&s)?;
    serve::start(&mut s, api, registry, &sources, &cgroup).await?;
    let desired = policy::first_sync(&mut s, &mut sources, &cgroup).await?;
    if attach_waits {
        datapath::attach(&s, &mut datapath, &cgroup)?;
    }
    if let Some(pods) = &sources.pod_svids {
        pod_svids::spawn_tracker(
            s.tasks,
            pods.clone(),
            desired.clone(),
            config.node_name.clone(),
            cgroup.clone(),
            s.token.clone(),
        );
    }
    let wireguard_key = encryption::start(&mut s, &desired, wg_metrics).await?;
    let manager = authentication::start(
        &mut s,
        &sources,
        desired,
        hs_metrics,
        mgr_metrics,
        wireguard_key,
    )
    .await?;

    let released = crate::daemon::release_free_heap();
    tracing::info!(node = %config.node_name, released, "meshauth agent running");
    let r = manager.run(token).await;
    if let Err(e) = &r {
        s.live.fail(format!("auth manager: {e}"));
    }
    drop(datapath);
    Ok(r?)
}

/// Creates the state directory (owner only) if it is missing.
fn create_state_dir(config: &Config) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .map_err(|source| AgentError::StateDir {
            path: config.state_dir.clone(),
            source,
        })
}

/// Waits for SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
