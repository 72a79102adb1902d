//! `meshauth agent`: svid-cache, policy-bridge, the datapath, the auth
//! manager and the handshake server wired together, with metrics, health
//! and the local API.
//!
//! Start order: SVID source and policy source first (they need nothing),
//! then the datapath (loaded, attached — pinned maps and links are reused,
//! so a restart changes nothing the kernel holds), health and API, then —
//! once policy has synced — the datapath maps, the handshake server and the
//! auth manager (which reads the auth map back first: starting it on an
//! empty desired state would collect every entry). Shutdown leaves the
//! programs attached and the maps pinned: a restarted agent loses no
//! authentication.

pub mod backend;
pub mod health;
pub mod metrics;
mod tasks;

use tasks::{Stop, Tasks};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use auth_ebpf::{Datapath, DatapathError, LoadOptions};
use policy_bridge::{DesiredState, NodeInfo, Subscription};
use prometheus_client::registry::Registry;
use svid_cache::{
    CacheConfig, DelegatedIdentityConfig, SourceError, SourceHandle, SourceState, SvidCache,
    SystemClock, TrustDomain, WorkloadApiConfig, spawn_delegated_identity, spawn_workload_api,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::api::FlowHub;
use crate::auth::manager::{AuthManager, ManagerConfig, ManagerError, ManagerInputs};
use crate::auth::metrics::ManagerMetrics;
use crate::auth::rotation::forward_rotations;
use crate::auth::schedule::{ScheduleError, spawn_sweep_schedule};
use crate::auth::store::{BpfAuthStore, Pair, StoreError};
use crate::auth::{AuthFailure, Authenticated, Authenticator};
use crate::config::{Config, IdentitySource, Mode, PolicySource};
use crate::datapath_sync::{DatapathSync, SyncError};
use crate::handshake::{
    ClientOptions, HandshakeClient, HandshakeError, HandshakeServer, Metrics, ServerOptions,
};
use crate::nodes::{NodeTable, NodeTableError};

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
    /// A setting asks for something this build cannot do.
    #[error("{0}")]
    Unsupported(&'static str),
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

/// The initiator, counting outcomes.
#[derive(Debug)]
struct Counting {
    inner: HandshakeClient,
    counts: Arc<Counts>,
}

impl Authenticator for Counting {
    fn authenticate(
        &self,
        local: u32,
        remote: u32,
        node: NodeInfo,
    ) -> futures::future::BoxFuture<'static, Result<Authenticated, AuthFailure>> {
        let fut = self.inner.authenticate(local, remote, node);
        let counts = self.counts.clone();
        Box::pin(async move {
            let r = fut.await;
            match &r {
                Ok(_) => counts.initiated_ok.fetch_add(1, Ordering::Relaxed),
                Err(_) => counts.initiated_failed.fetch_add(1, Ordering::Relaxed),
            };
            r
        })
    }
}

fn selectors(v: &[String]) -> Vec<(String, String)> {
    v.iter()
        .filter_map(|s| s.split_once(':'))
        .map(|(t, v)| (t.to_string(), v.to_string()))
        .collect()
}

/// Starts the SVID source.
fn start_identity_source(
    config: &Config,
    cache: &SvidCache,
    token: &CancellationToken,
) -> SourceHandle {
    match &config.identity_source {
        IdentitySource::WorkloadApi { socket } => spawn_workload_api(
            WorkloadApiConfig::new(socket.clone()),
            cache.clone(),
            token.clone(),
        ),
        IdentitySource::DelegatedIdentity {
            socket,
            selectors: s,
        } => spawn_delegated_identity(
            DelegatedIdentityConfig::new(socket.clone(), selectors(s)),
            cache.clone(),
            token.clone(),
        ),
    }
}

/// Starts the policy source; its task goes to `tasks` (it has no drain
/// token: it is aborted at shutdown).
async fn start_policy_source(
    config: &Config,
    tasks: &mut Tasks,
) -> Result<Subscription, AgentError> {
    match &config.policy_source {
        PolicySource::Directory { path } => {
            let mut cfg = policy_bridge::source::files::FilesConfig::new(path.clone());
            cfg.interval = config.policy_poll_interval;
            cfg.identity_file = Some(config.state_dir.join("identities.json"));
            cfg.identity_quarantine = config.identity_quarantine;
            let (sub, task) = policy_bridge::source::files::spawn(cfg)?;
            tasks.adopt("policy_source", Stop::Abort, task);
            Ok(sub)
        }
        PolicySource::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| AgentError::Kube(e.to_string()))?;
            let (sub, task) = policy_bridge::source::kube::spawn(
                client,
                policy_bridge::source::kube::KubeConfig {
                    identity_quarantine: config.identity_quarantine,
                    ..Default::default()
                },
            )
            .await;
            tasks.adopt("policy_source", Stop::Abort, task);
            Ok(sub)
        }
    }
}

/// Follows the SVID source: readiness, and the outage story in the logs.
fn watch_source(
    tasks: &mut Tasks,
    mut rx: watch::Receiver<svid_cache::SourceStatus>,
    cache: SvidCache,
    ready: Arc<Readiness>,
    token: CancellationToken,
) {
    tasks.spawn("svid_source_watch", Stop::Token, async move {
        let mut was_connected = false;
        loop {
            let s = rx.borrow_and_update().clone();
            let answered = s.updates_applied > 0
                || s.is_connected()
                || s.last_error
                    .as_ref()
                    .is_some_and(|(_, e)| matches!(**e, SourceError::NoIdentityIssued { .. }));
            if answered && !ready.svids.swap(true, Ordering::Relaxed) {
                tracing::info!(svids = cache.len(), "SPIRE answered");
            }
            match &s.state {
                SourceState::Connected { .. } if !was_connected => {
                    was_connected = true;
                    tracing::info!(svids = cache.len(), "SPIRE source connected");
                }
                SourceState::Disconnected { error, .. } if was_connected => {
                    was_connected = false;
                    tracing::warn!(
                        error = %error,
                        svids = cache.len(),
                        next_expiry = ?cache.next_expiry().map(crate::api::flows::rfc3339),
                        "SPIRE unreachable: cached SVIDs stay in use until they expire; no rotation until it is back"
                    );
                }
                _ => {}
            }
            tokio::select! {
                _ = token.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    });
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

async fn run_inner(
    config: &Config,
    token: &CancellationToken,
    tasks: &mut Tasks,
    api_socket: &mut Option<crate::api::socket::SocketGuard>,
) -> Result<(), AgentError> {
    if config.wireguard {
        // Refuse rather than run unencrypted when encryption was asked for.
        return Err(AgentError::Unsupported(
            "wireguard: true — WireGuard management is not built into this agent yet; set wireguard: false (node-to-node traffic is then not encrypted by meshauth)",
        ));
    }
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(|source| AgentError::StateDir {
                path: config.state_dir.clone(),
                source,
            })?;
    }
    // One agent per node: the API socket is taken first, so a second agent
    // is refused before it touches the first one's datapath, pins or state.
    let (api, guard) = crate::api::socket::bind_guarded(&config.api_socket)?;
    *api_socket = Some(guard);
    let ready = Arc::new(Readiness::default());
    let live = Arc::new(Liveness::default());
    let counts = Arc::new(Counts::default());
    let mut registry = Registry::with_prefix("meshauth");
    let hs_metrics = Metrics::register(registry.sub_registry_with_prefix("handshake"));
    let mgr_metrics = ManagerMetrics::register(registry.sub_registry_with_prefix("auth"));

    // Identities.
    let td = TrustDomain::new(&config.trust_domain)
        .map_err(|e| AgentError::TrustDomain(config.trust_domain.clone(), e))?;
    let cache = SvidCache::new(CacheConfig {
        trust_domain: td,
        ..CacheConfig::default()
    });
    tasks.adopt(
        "svid_expiry",
        Stop::Token,
        cache.spawn_expiry(token.clone()),
    );
    let source = start_identity_source(config, &cache, token);
    let source_status = source.watch_status();
    tasks.spawn("svid_source", Stop::Token, source.join());
    watch_source(
        tasks,
        source_status.clone(),
        cache.clone(),
        ready.clone(),
        token.clone(),
    );

    // Cluster state.
    let mut subscription = start_policy_source(config, tasks).await?;
    let nodes = NodeTable::open(&config.state_dir.join("nodes.json"), &config.node_name)?;

    // Datapath.
    let dp_config = auth_ebpf::maps::config::DatapathConfig {
        mode: match config.mode {
            Mode::Enforce => auth_ebpf::maps::config::Mode::Enforce,
            Mode::Audit => auth_ebpf::maps::config::Mode::Audit,
        },
        drop_unknown_local: config.drop_unknown_pods,
        check_source: config.source_check,
        ..Default::default()
    };
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: config.bpf_pin_dir.clone(),
        config: dp_config,
        auth_capacity: None,
    })?;
    tracing::info!(layout = ?datapath.layout_report(), pin_dir = %config.bpf_pin_dir.display(), "datapath loaded");
    let cgroup = match &config.pods_cgroup {
        Some(c) => c.clone(),
        None => auth_ebpf::attach::detect_pods_cgroup()?,
    };
    datapath.attach(&cgroup)?;
    ready.datapath.store(true, Ordering::Relaxed);
    tracing::info!(cgroup = %cgroup.display(), "datapath attached");
    let pin_dir = config.bpf_pin_dir.clone();

    // Flows, health, API.
    let hub = FlowHub::new(4096);
    let (desired_tx, desired_rx) = watch::channel(Arc::new(DesiredState::default()));
    registry.register_collector(Box::new(metrics::AgentCollector {
        pin_dir: pin_dir.clone(),
        cache: cache.clone(),
        source: source_status.clone(),
        nodes: nodes.clone(),
        ready: ready.clone(),
    }));
    let registry = Arc::new(Mutex::new(registry));
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| AgentError::Listen {
            what: "metrics and health",
            addr: config.metrics_listen.to_string(),
            source,
        })?;
    tasks.spawn(
        "health",
        Stop::Token,
        health::serve(
            listener,
            health::Health {
                registry,
                ready: ready.clone(),
                live: live.clone(),
            },
            token.clone(),
        ),
    );
    let backend = Arc::new(backend::AgentBackend {
        config: config.clone(),
        started: SystemTime::now(),
        cgroup: cgroup.clone(),
        cache: cache.clone(),
        source: source_status.clone(),
        subscription: subscription.clone(),
        nodes: nodes.clone(),
        ready: ready.clone(),
        counts: counts.clone(),
        hub: hub.clone(),
    });
    tasks.spawn(
        "api",
        Stop::Token,
        crate::api::server::serve(api, backend, token.clone()),
    );

    // Events → observe.
    tasks::spawn_flow_events(
        tasks,
        auth_ebpf::events::EventReader::open(&pin_dir)?,
        subscription.clone(),
        hub.clone(),
        config.node_name.clone(),
        token.clone(),
        live.clone(),
    );

    // Wait for the first full policy read.
    tracing::info!("waiting for the first policy sync");
    let first = tokio::select! {
        _ = token.cancelled() => return Err(AgentError::Interrupted),
        s = subscription.synced() => s.ok_or(AgentError::Interrupted)?,
    };
    let mut sync = DatapathSync::open(&pin_dir, nodes.clone())?;
    if config.source_check {
        sync = sync.with_source_check(&cgroup);
    }
    nodes.sync(&first.state.nodes)?;
    let report = sync.apply(&first.state)?;
    tracing::info!(
        ?report,
        generation = first.generation,
        "policy synced into the datapath"
    );
    desired_tx.send_replace(first.state.clone());
    ready.policy.store(true, Ordering::Relaxed);
    tasks::spawn_policy_sync(
        tasks,
        subscription.clone(),
        nodes.clone(),
        sync,
        desired_tx,
        token.clone(),
        live.clone(),
    );

    // Authentication.
    let store = Arc::new(BpfAuthStore::open(&pin_dir)?);
    // Before anything reads or writes the map: drop entries read back whose
    // node id the node table cannot vouch for (table lost or replaced).
    let resumed = crate::nodes::resume::vouch_resumed_entries(&pin_dir, &*store, &nodes)?;
    tracing::info!(
        ?resumed,
        "auth entries read back checked against the node table"
    );
    let mut server_opts = ServerOptions::new(
        config.handshake_listen,
        cache.clone(),
        nodes.clone(),
        desired_rx.clone(),
        store.clone(),
    );
    server_opts.handshake_timeout = config.handshake_timeout;
    server_opts.max_concurrent = config.max_concurrent_handshakes;
    server_opts.tls_timeout = config.handshake_tls_timeout;
    server_opts.max_per_source = config.max_handshakes_per_source;
    // Half the grace: cancelled handshakes still have time to end before
    // the tasks' grace runs out.
    server_opts.drain_timeout = config.shutdown_grace / 2;
    let server = HandshakeServer::bind(server_opts, hs_metrics.clone()).await?;
    tracing::info!(listen = %server.local_addr(), "handshake server listening");
    tasks::spawn_served_counts(tasks, server.subscribe(), counts.clone(), token.clone());
    tasks.adopt("handshake_server", Stop::Token, server.spawn(token.clone()));

    let mut client_opts = ClientOptions::new(cache.clone(), config.node_name.clone());
    client_opts.port = config.handshake_listen.port();
    client_opts.connect_timeout = config.connect_timeout;
    client_opts.handshake_timeout = config.handshake_timeout;
    if !config.handshake_listen.ip().is_unspecified() {
        client_opts.source_addr = Some(config.handshake_listen.ip());
    }
    let client = Counting {
        inner: HandshakeClient::new(client_opts, hs_metrics),
        counts: counts.clone(),
    };

    let (signal_tx, signal_rx) = mpsc::channel::<Pair>(4096);
    tasks::spawn_signals(
        tasks,
        auth_ebpf::signals::SignalReader::open(&pin_dir)?,
        signal_tx,
        token.clone(),
        live.clone(),
    );
    let (rot_tx, rot_rx) = mpsc::channel(1024);
    tasks.adopt(
        "svid_rotations",
        Stop::Abort,
        forward_rotations(cache.clone(), rot_tx),
    );
    let (sweep_tx, sweep_rx) = mpsc::channel(4);
    tasks.adopt(
        "sweep_schedule",
        Stop::Token,
        spawn_sweep_schedule(&config.sweep_cron, sweep_tx, token.clone()).await?,
    );
    {
        let pin_dir = pin_dir.clone();
        let token = token.clone();
        tasks.spawn("suspend_watch", Stop::Token, async move {
            tokio::select! {
                _ = token.cancelled() => {}
                r = auth_ebpf::clock::bump_generation_on_resume(pin_dir, Duration::from_secs(1)) => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "suspend watch stopped");
                    }
                }
            }
        });
    }
    let manager = AuthManager::new(
        ManagerConfig {
            reauth_fraction: config.reauth_fraction,
            sweep_cron: config.sweep_cron.clone(),
            ..ManagerConfig::default()
        },
        Arc::new(client),
        store,
        nodes.clone(),
        Arc::new(SystemClock),
        mgr_metrics,
    );
    tracing::info!(node = %config.node_name, "meshauth agent running");
    let r = manager
        .run(
            ManagerInputs {
                desired: desired_rx,
                signals: signal_rx,
                rotations: rot_rx,
                sweep: sweep_rx,
            },
            token.clone(),
        )
        .await;
    if let Err(e) = &r {
        live.fail(format!("auth manager: {e}"));
    }
    drop(datapath);
    Ok(r?)
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
