//! A whole development deployment under one directory: the server, one node
//! agent per node (`<dir>/agents/<node>/{agent,admin}.sock`) and optionally the
//! control socket (`<dir>/control.sock`), with the switches tests and the demo
//! flip. Every switch syncs the agents that are up before it returns, so its
//! effect is visible on the agents' sockets when the call completes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::{AgentError, AgentPaths, IdentityInfo, NodeAgent};
use crate::control::ControlServer;
use crate::entries::{Entry, EntrySpec};
use crate::server::{DEFAULT_TRUST_DOMAIN, DEFAULT_TTL, ServerConfig, ServerError, SpireServer};
use crate::socket::SocketError;

/// Errors of the deployment.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// `SpireDev::<call>` named node `node`, which has no agent.
    #[error("SpireDev::{call}: unknown node {node:?}; nodes are {known:?}")]
    UnknownNode {
        /// The call.
        call: &'static str,
        /// The unknown node.
        node: String,
        /// The nodes that exist.
        known: Vec<String>,
    },
    /// `SpireDev::start` got node name `node`, unusable as a directory name.
    #[error("SpireDev::start: invalid node name {node:?}; use letters, digits, '-', '_', '.'")]
    InvalidNode {
        /// The offending name.
        node: String,
    },
    /// A server call failed (the server error names the call and value).
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A node agent failed (the agent error names the node and path).
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Binding the control socket failed (the socket error names the path).
    #[error("control socket: {0}")]
    Control(#[from] SocketError),
}

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevConfig {
    /// Directory holding the sockets.
    pub dir: PathBuf,
    /// Trust domain name.
    pub trust_domain: String,
    /// TTL of SVIDs whose entry sets none.
    pub default_ttl: Duration,
    /// Nodes to run an agent for; every node named by an entry gets one too.
    pub nodes: Vec<String>,
    /// Entries registered before the agents start.
    pub entries: Vec<EntrySpec>,
    /// Whether to serve `<dir>/control.sock`.
    pub control_socket: bool,
    /// SPIRE's `authorized_delegates` for every agent's admin socket: a
    /// caller may use the Delegated Identity API only if its node holds an
    /// SVID for one of these SPIFFE IDs (spire-dev's callers match every
    /// entry of their node), refused as SPIRE refuses otherwise. None:
    /// every caller may (spire-dev's lax default).
    pub authorized_delegates: Option<Vec<String>>,
}

impl DevConfig {
    /// Defaults: trust domain `meshauth.local`, TTL 1h, no nodes, no entries,
    /// control socket on.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            default_ttl: DEFAULT_TTL,
            nodes: Vec::new(),
            entries: Vec::new(),
            control_socket: true,
            authorized_delegates: None,
        }
    }
}

/// The state of one node agent, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: String,
    /// Whether its agent is up.
    pub up: bool,
    /// Workload API socket.
    pub workload_socket: PathBuf,
    /// Delegated Identity API socket.
    pub admin_socket: PathBuf,
    /// The identities it serves (or would serve, when down).
    pub identities: Vec<IdentityInfo>,
}

/// The state of the whole deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevStatus {
    /// Trust domain.
    pub trust_domain: String,
    /// Whether the server outage switch is on.
    pub outage: bool,
    /// The signing CA's generation.
    pub ca_generation: u64,
    /// How many CAs the bundle holds.
    pub bundle_cas: usize,
    /// Registration entries.
    pub entries: Vec<Entry>,
    /// Node agents.
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug)]
pub(crate) struct DevInner {
    dir: PathBuf,
    server: SpireServer,
    agents: BTreeMap<String, NodeAgent>,
    control: tokio::sync::Mutex<Option<ControlServer>>,
}

/// A running deployment; clones share it.
#[derive(Debug, Clone)]
pub struct SpireDev {
    inner: Arc<DevInner>,
}

fn valid_node(node: &str) -> bool {
    !node.is_empty()
        && node != "."
        && node != ".."
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl SpireDev {
    /// Creates the server, registers `config.entries`, starts one agent per
    /// node and the control socket. Must be called inside a tokio runtime.
    pub async fn start(config: DevConfig) -> Result<Self, DevError> {
        let server = SpireServer::new(ServerConfig {
            trust_domain: config.trust_domain.clone(),
            default_ttl: config.default_ttl,
        })?;
        let mut nodes = config.nodes.clone();
        nodes.extend(config.entries.iter().map(|e| e.node.clone()));
        nodes.dedup();
        if let Some(bad) = nodes.iter().find(|n| !valid_node(n)) {
            return Err(DevError::InvalidNode { node: bad.clone() });
        }
        for spec in config.entries {
            server.add_entry(spec)?;
        }
        let mut agents = BTreeMap::new();
        for node in nodes {
            if agents.contains_key(&node) {
                continue;
            }
            let agent = NodeAgent::start(
                &server,
                &node,
                AgentPaths::under(&config.dir, &node),
                config.authorized_delegates.clone(),
            )
            .await?;
            agents.insert(node, agent);
        }
        let dev = Self {
            inner: Arc::new(DevInner {
                dir: config.dir,
                server,
                agents,
                control: tokio::sync::Mutex::new(None),
            }),
        };
        if config.control_socket {
            let control = ControlServer::start(&dev.control_socket(), Arc::downgrade(&dev.inner))?;
            *dev.inner.control.lock().await = Some(control);
        }
        Ok(dev)
    }

    pub(crate) fn from_inner(inner: Arc<DevInner>) -> Self {
        Self { inner }
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// `<dir>/control.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.inner.dir.join("control.sock")
    }

    /// The server.
    pub fn server(&self) -> &SpireServer {
        &self.inner.server
    }

    /// The node names, sorted.
    pub fn nodes(&self) -> Vec<String> {
        self.inner.agents.keys().cloned().collect()
    }

    /// The agent of `node`.
    pub fn agent(&self, node: &str) -> Result<&NodeAgent, DevError> {
        self.agent_for("agent", node)
    }

    fn agent_for(&self, call: &'static str, node: &str) -> Result<&NodeAgent, DevError> {
        self.inner
            .agents
            .get(node)
            .ok_or_else(|| DevError::UnknownNode {
                call,
                node: node.to_owned(),
                known: self.nodes(),
            })
    }

    /// Syncs every agent that is up with the server now.
    pub fn sync_agents(&self) {
        for agent in self.inner.agents.values() {
            agent.sync_now();
        }
    }

    /// Registers an entry; the agents of its node hold the SVID on return
    /// (unless the server is in outage or the agent is down).
    pub fn add_entry(&self, spec: EntrySpec) -> Result<Entry, DevError> {
        let entry = self.inner.server.add_entry(spec)?;
        if !self.inner.agents.contains_key(&entry.node) {
            tracing::warn!(node = %entry.node, entry.id = %entry.id, "entry parented to a node without an agent");
        }
        self.sync_agents();
        Ok(entry)
    }

    /// Removes an entry; agents drop its SVID before this returns (unless in
    /// outage or down).
    pub fn remove_entry(&self, id: &str) -> Result<Entry, DevError> {
        let entry = self.inner.server.remove_entry(id)?;
        self.sync_agents();
        Ok(entry)
    }

    /// Turns the server outage on or off; returns the previous value. Turning
    /// it off syncs the agents (new entries issued, removed ones dropped, due or
    /// expired SVIDs renewed).
    pub fn set_outage(&self, on: bool) -> bool {
        let was = self.inner.server.set_outage(on);
        self.sync_agents();
        was
    }

    /// Rotates the CA; every agent that is up re-issues all its SVIDs from the
    /// new CA and serves a bundle of new + previous CAs. Returns the generation.
    pub fn rotate_ca(&self) -> Result<u64, DevError> {
        let generation = self.inner.server.rotate_ca()?;
        self.sync_agents();
        Ok(generation)
    }

    /// Prepares the next CA as SPIRE does before a rotation: every agent
    /// that is up serves it in the bundle at once; SVIDs stay under the
    /// current CA until [`Self::activate_ca`]. Returns its generation.
    pub fn prepare_ca(&self) -> Result<u64, DevError> {
        let generation = self.inner.server.prepare_ca()?;
        self.sync_agents();
        Ok(generation)
    }

    /// Activates the prepared CA: agents re-issue every SVID under it.
    /// Returns the generation.
    pub fn activate_ca(&self) -> Result<u64, DevError> {
        let generation = self.inner.server.activate_ca()?;
        self.sync_agents();
        Ok(generation)
    }

    /// Drops previous CAs from the bundle; returns how many were dropped.
    pub fn prune_ca(&self) -> usize {
        let dropped = self.inner.server.prune_ca();
        self.sync_agents();
        dropped
    }

    /// Takes the agent of `node` down (sockets removed, streams ended).
    /// Returns false when it was already down.
    pub async fn agent_down(&self, node: &str) -> Result<bool, DevError> {
        Ok(self.agent_for("agent_down", node)?.down().await)
    }

    /// Brings the agent of `node` back up on the same paths. Returns false when
    /// it was already up.
    pub async fn agent_up(&self, node: &str) -> Result<bool, DevError> {
        Ok(self.agent_for("agent_up", node)?.up().await?)
    }

    /// The state of everything.
    pub fn status(&self) -> DevStatus {
        let server = &self.inner.server;
        DevStatus {
            trust_domain: server.trust_domain().to_owned(),
            outage: server.outage(),
            ca_generation: server.ca_generation(),
            bundle_cas: server.bundle().len(),
            entries: server.entries(),
            nodes: self
                .inner
                .agents
                .values()
                .map(|a| NodeStatus {
                    node: a.node().to_owned(),
                    up: a.is_up(),
                    workload_socket: a.workload_socket().to_owned(),
                    admin_socket: a.admin_socket().to_owned(),
                    identities: a.identities(),
                })
                .collect(),
        }
    }

    /// Stops the control socket and every agent, removing all sockets.
    pub async fn shutdown(&self) {
        if let Some(control) = self.inner.control.lock().await.take() {
            control.stop().await;
        }
        for agent in self.inner.agents.values() {
            agent.down().await;
        }
    }
}
