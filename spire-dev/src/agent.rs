//! A node agent: holds the SVIDs of the entries parented to its node, renews
//! each as SPIRE does (once less than half of its validity is left), and
//! serves them on its Workload API socket and its Delegated Identity API
//! (admin) socket.
//!
//! The Workload API caller is treated as matching every entry of the node
//! (spire-dev does no workload attestation). While the server is in outage the
//! agent keeps serving what it holds, even past NotAfter: a client must check
//! expiry itself, as it must with a real SPIRE agent that cannot reach its
//! server. When the server comes back the agent syncs by itself.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;

use crate::ca::{Svid, unix_secs};
use crate::delegated_api::DelegatedIdentityService;
use crate::entries::Entry;
use crate::server::{ServerError, SpireServer};
use crate::socket::{self, SocketError};
use crate::uds_authority;
use crate::workload_api::WorkloadApiService;

mod sync;

/// How long a stopping gRPC server may take to close its connections.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Errors of a node agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Binding one of the agent's sockets failed (the socket error names the path).
    #[error("node agent {node}: {source}")]
    Socket {
        /// The node.
        node: String,
        /// The socket error.
        source: SocketError,
    },
}

/// Where a node agent listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentPaths {
    /// The SPIFFE Workload API socket (`.../agent.sock`).
    pub workload: PathBuf,
    /// The Delegated Identity API socket (`.../admin.sock`).
    pub admin: PathBuf,
}

impl AgentPaths {
    /// `<dir>/agents/<node>/agent.sock` and `<dir>/agents/<node>/admin.sock`.
    pub fn under(dir: &Path, node: &str) -> Self {
        let base = dir.join("agents").join(node);
        Self {
            workload: base.join("agent.sock"),
            admin: base.join("admin.sock"),
        }
    }
}

/// One SVID an agent holds, with the entry it was issued for.
#[derive(Debug, Clone)]
pub struct HeldSvid {
    /// The registration entry.
    pub entry: Entry,
    /// The SVID and its key.
    pub svid: Arc<Svid>,
}

/// Everything an agent serves at one moment.
#[derive(Debug, Clone, Default)]
pub struct AgentSnapshot {
    /// The trust domain.
    pub trust_domain: String,
    /// The SVIDs, in entry registration order.
    pub svids: Vec<HeldSvid>,
    /// The trust bundle (DER roots).
    pub bundle: Vec<Vec<u8>>,
    /// Bumped on every change.
    pub version: u64,
}

/// A served identity, for listings and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IdentityInfo {
    /// The entry ID.
    pub entry_id: String,
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// NotAfter, Unix seconds.
    pub not_after: i64,
    /// NotAfter, RFC 3339.
    pub not_after_rfc3339: String,
    /// Whether NotAfter has passed (possible only during an outage or while down).
    pub expired: bool,
    /// The CA generation that signed it.
    pub ca_generation: u64,
}

impl IdentityInfo {
    fn of(held: &HeldSvid, now: SystemTime) -> Self {
        Self {
            entry_id: held.entry.id.clone(),
            spiffe_id: held.svid.spiffe_id.to_string(),
            serial: held.svid.serial.clone(),
            not_after: held.svid.not_after_unix(),
            not_after_rfc3339: rfc3339(held.svid.not_after),
            expired: held.svid.is_expired_at(now),
            ca_generation: held.svid.ca_generation,
        }
    }
}

/// Formats a time as RFC 3339 (UTC).
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs(t))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_secs(t).to_string())
}

/// State shared by the agent handle, its sync task and its services.
#[derive(Debug)]
pub(crate) struct Shared {
    node: String,
    server: SpireServer,
    state: watch::Sender<Arc<AgentSnapshot>>,
    /// Serializes syncs (the background task and explicit `sync_now` calls).
    sync_lock: Mutex<()>,
    /// Whether the agent is up; the sync task pauses while down.
    up: watch::Sender<bool>,
    /// SPIRE's `authorized_delegates` for the admin socket (None: every
    /// caller may use it, spire-dev's lax default).
    pub(crate) authorized_delegates: Option<Vec<String>>,
}

/// The servers of an agent that is up.
#[derive(Debug)]
struct Serving {
    /// Set to true to end open streams and stop both servers.
    down: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// A running node agent. Dropping it stops its tasks; [`NodeAgent::shutdown`]
/// also removes its sockets and waits for its servers.
#[derive(Debug)]
pub struct NodeAgent {
    shared: Arc<Shared>,
    paths: AgentPaths,
    serving: tokio::sync::Mutex<Option<Serving>>,
    sync_task: JoinHandle<()>,
}

impl NodeAgent {
    /// Starts the agent of `node`: syncs with `server` once (so the first
    /// Workload API message carries the SVIDs), starts the renewal task, and
    /// serves on `paths`. Must be called inside a tokio runtime.
    pub async fn start(
        server: &SpireServer,
        node: &str,
        paths: AgentPaths,
        authorized_delegates: Option<Vec<String>>,
    ) -> Result<Self, AgentError> {
        let shared = Arc::new(Shared {
            node: node.to_owned(),
            server: server.clone(),
            state: watch::Sender::new(Arc::new(AgentSnapshot {
                trust_domain: server.trust_domain().to_owned(),
                ..AgentSnapshot::default()
            })),
            sync_lock: Mutex::new(()),
            up: watch::Sender::new(true),
            authorized_delegates,
        });
        sync::sync_once(&shared);
        let sync_task = tokio::spawn(sync::run(shared.clone()));
        let agent = Self {
            shared,
            paths,
            serving: tokio::sync::Mutex::new(None),
            sync_task,
        };
        let serving = agent.serve()?;
        *agent.serving.lock().await = Some(serving);
        Ok(agent)
    }

    fn serve(&self) -> Result<Serving, AgentError> {
        let sock_err = |source| AgentError::Socket {
            node: self.shared.node.clone(),
            source,
        };
        let workload = socket::bind(&self.paths.workload).map_err(sock_err)?;
        let admin = match socket::bind(&self.paths.admin) {
            Ok(l) => l,
            Err(e) => {
                socket::remove(&self.paths.workload);
                return Err(sock_err(e));
            }
        };
        let (down, down_rx) = watch::channel(false);
        let wl = WorkloadApiService::new(&self.shared, down_rx.clone()).into_server();
        let dl = DelegatedIdentityService::new(&self.shared, down_rx.clone()).into_server();
        let tasks = vec![
            spawn_server(
                &self.shared.node,
                "workload",
                tonic::transport::Server::builder().add_service(wl),
                workload,
                down_rx.clone(),
            ),
            spawn_server(
                &self.shared.node,
                "admin",
                tonic::transport::Server::builder().add_service(dl),
                admin,
                down_rx,
            ),
        ];
        tracing::info!(node = %self.shared.node, workload = %self.paths.workload.display(), admin = %self.paths.admin.display(), "node agent serving");
        Ok(Serving { down, tasks })
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// The agent's socket paths.
    pub fn paths(&self) -> &AgentPaths {
        &self.paths
    }

    /// The Workload API socket path.
    pub fn workload_socket(&self) -> &Path {
        &self.paths.workload
    }

    /// The Delegated Identity API socket path.
    pub fn admin_socket(&self) -> &Path {
        &self.paths.admin
    }

    /// Whether the agent is up (serving).
    pub fn is_up(&self) -> bool {
        *self.shared.up.borrow()
    }

    /// What the agent serves now.
    pub fn snapshot(&self) -> Arc<AgentSnapshot> {
        self.shared.state.borrow().clone()
    }

    /// A receiver of the agent's state, which changes on every renewal, entry
    /// change and bundle change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AgentSnapshot>> {
        self.shared.state.subscribe()
    }

    /// The identities the agent serves now.
    pub fn identities(&self) -> Vec<IdentityInfo> {
        let now = SystemTime::now();
        self.snapshot()
            .svids
            .iter()
            .map(|h| IdentityInfo::of(h, now))
            .collect()
    }

    /// Syncs with the server now (instead of waiting for the renewal task);
    /// does nothing while the agent is down or the server is in outage.
    pub fn sync_now(&self) {
        if self.is_up() {
            sync::sync_once(&self.shared);
        }
    }

    /// Takes the agent down: ends open streams, stops both servers, removes the
    /// sockets, and pauses syncing. Returns false when it was already down.
    pub async fn down(&self) -> bool {
        let mut serving = self.serving.lock().await;
        let Some(s) = serving.take() else {
            return false;
        };
        self.shared.up.send_replace(false);
        s.down.send_replace(true);
        for mut task in s.tasks {
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                tracing::warn!(node = %self.shared.node, "server did not stop in time; aborting it");
                task.abort();
            }
        }
        socket::remove(&self.paths.workload);
        socket::remove(&self.paths.admin);
        tracing::warn!(node = %self.shared.node, "node agent down");
        true
    }

    /// Brings the agent back up on the same paths, after syncing with the
    /// server. Returns false when it was already up.
    pub async fn up(&self) -> Result<bool, AgentError> {
        let mut serving = self.serving.lock().await;
        if serving.is_some() {
            return Ok(false);
        }
        sync::sync_once(&self.shared);
        *serving = Some(self.serve()?);
        self.shared.up.send_replace(true);
        tracing::info!(node = %self.shared.node, "node agent up");
        Ok(true)
    }

    /// Stops the agent and removes its sockets.
    pub async fn shutdown(self) {
        self.down().await;
        self.sync_task.abort();
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.sync_task.abort();
        if let Ok(mut serving) = self.serving.try_lock()
            && let Some(s) = serving.take()
        {
            s.down.send_replace(true);
            socket::remove(&self.paths.workload);
            socket::remove(&self.paths.admin);
        }
    }
}

fn spawn_server(
    node: &str,
    api: &'static str,
    router: tonic::transport::server::Router,
    listener: tokio::net::UnixListener,
    mut down: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let node = node.to_owned();
    tokio::spawn(async move {
        let stop = async move {
            let _ = down.wait_for(|d| *d).await;
        };
        // Every connection goes through the :authority shim (see uds_authority).
        let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(uds_authority::wrap));
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(node, api, error = %e, "gRPC server failed");
        }
    })
}

impl Shared {
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<AgentSnapshot>> {
        self.state.subscribe()
    }
}

/// Whether `err` is the outage refusal.
fn is_unavailable(err: &ServerError) -> bool {
    matches!(err, ServerError::Unavailable { .. })
}
