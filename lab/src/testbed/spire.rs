//! The testbed's SPIRE: spire-dev in-process (the default: fast, with an
//! outage switch), or real `spire-server` and one real `spire-agent` per
//! node ([`crate::spire_real`]).
//!
//! Real SPIRE: each node's agent is attested with a join token whose alias
//! is `spiffe://meshauth.local/meshauth/node/<node>`; an identity's entry on
//! a node is parented to that alias and selects `unix:uid:0` (the node's
//! meshauth agent, which runs as root), so a node's Workload API serves only
//! the identities registered on that node. Agents sync every 500 ms; their
//! own SVIDs last 12 h (SPIRE's default, the workload SVID TTL, would
//! strand a join-token agent in any outage longer than that). The outage
//! is the server killed (SIGKILL) and started again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spire_dev::{DevConfig, EntrySpec, SpiffeId, SpireDev};

use super::TestbedError;
use crate::spire_real::{SpireAgent, SpireServer, agent_settings, settings};

/// The trust domain of the testbed.
pub const TRUST_DOMAIN: &str = "meshauth.local";
/// How long a registration or removal may take to reach a node's agent.
const ENTRY_TIMEOUT: Duration = Duration::from_secs(30);

fn spire_err(e: impl std::fmt::Display) -> TestbedError {
    TestbedError::Spire(e.to_string())
}

/// The alias a node's SPIRE agent gets from its join token.
pub fn node_alias(node: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/meshauth/node/{node}")
}

fn identity_id(identity: u32) -> String {
    format!("spiffe://{TRUST_DOMAIN}/identity/{identity}")
}

/// Real SPIRE: the server and one agent per node.
#[derive(Debug)]
pub struct RealSpire {
    server: SpireServer,
    agents: BTreeMap<String, SpireAgent>,
}

impl RealSpire {
    /// The server.
    pub fn server(&self) -> &SpireServer {
        &self.server
    }

    /// The server, to kill or restart it.
    pub fn server_mut(&mut self) -> &mut SpireServer {
        &mut self.server
    }

    /// `node`'s agent, to kill or restart it.
    pub fn agent_mut(&mut self, node: &str) -> Option<&mut SpireAgent> {
        self.agents.get_mut(node)
    }

    /// The SPIFFE IDs `node`'s agent serves to its meshauth agent, read
    /// with SPIRE's own client (`spire-agent api fetch x509`, as root, which
    /// the entries select).
    pub fn served(&self, node: &str) -> Result<Vec<String>, TestbedError> {
        let agent = self
            .agents
            .get(node)
            .ok_or_else(|| TestbedError::Failed(format!("no SPIRE agent for {node}")))?;
        agent.served().map_err(spire_err)
    }

    /// Waits until `node`'s agent serves `identity` (`present`) or not.
    fn wait_served(&self, node: &str, identity: u32, present: bool) -> Result<(), TestbedError> {
        let want = identity_id(identity);
        let deadline = Instant::now() + ENTRY_TIMEOUT;
        loop {
            let served = self.served(node)?;
            if served.contains(&want) == present {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Failed(format!(
                    "{node}'s SPIRE agent {} {want} after {ENTRY_TIMEOUT:?} (serves {served:?})",
                    if present {
                        "does not serve"
                    } else {
                        "still serves"
                    }
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// spire-dev or real SPIRE.
#[derive(Debug)]
pub enum Spire {
    /// spire-dev, in-process.
    Dev(SpireDev),
    /// SPIRE's own binaries.
    Real(Box<RealSpire>),
}

impl Spire {
    /// Starts spire-dev, or real SPIRE from `bin`, under `dir` for `nodes`.
    pub async fn start(
        dir: &Path,
        nodes: &[String],
        svid_ttl: Duration,
        bin: Option<&Path>,
        ca_ttl: Option<Duration>,
    ) -> Result<Self, TestbedError> {
        let Some(bin) = bin else {
            let mut cfg = DevConfig::new(dir.to_owned());
            cfg.default_ttl = svid_ttl;
            cfg.nodes = nodes.to_vec();
            return SpireDev::start(cfg).await.map(Self::Dev).map_err(spire_err);
        };
        let bin = crate::spire_real::spire_bin(Some(bin)).map_err(spire_err)?;
        let dir = dir.to_owned();
        let nodes = nodes.to_vec();
        // SPIRE's CLI and health probes block: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            let mut st = settings(&dir, TRUST_DOMAIN).map_err(spire_err)?;
            st.server.svid_ttl = svid_ttl;
            // A CA of at least six SVID lifetimes (SPIRE's rule for never
            // cutting an SVID short) and a day; agents' own SVIDs last
            // 12 h, so a server outage strands no (join-token) agent.
            st.server.ca_ttl =
                ca_ttl.unwrap_or_else(|| (svid_ttl * 6).max(Duration::from_secs(24 * 3600)));
            st.server.agent_ttl = Some(Duration::from_secs(12 * 3600).min(st.server.ca_ttl));
            st.agent.sync_interval = Some(Duration::from_millis(500));
            let server = SpireServer::start(&bin, &st).map_err(spire_err)?;
            let mut agents = BTreeMap::new();
            for n in &nodes {
                let mut ast = st.clone();
                agent_settings(&mut ast, &dir.join("agents").join(n)).map_err(spire_err)?;
                let token = server.join_token(&node_alias(n)).map_err(spire_err)?;
                let agent = SpireAgent::start(&bin, &server, &ast, &token).map_err(spire_err)?;
                agents.insert(n.clone(), agent);
            }
            Ok(Self::Real(Box::new(RealSpire { server, agents })))
        })
        .await
        .map_err(|e| TestbedError::Failed(format!("starting SPIRE: {e}")))?
    }

    /// The Workload API socket `node`'s meshauth agent uses.
    pub fn workload_socket(&self, node: &str) -> Result<PathBuf, TestbedError> {
        match self {
            Self::Dev(d) => Ok(d
                .agent(node)
                .map_err(spire_err)?
                .workload_socket()
                .to_owned()),
            Self::Real(r) => r
                .agents
                .get(node)
                .map(|a| a.workload_socket().to_owned())
                .ok_or_else(|| TestbedError::Failed(format!("no SPIRE agent for {node}"))),
        }
    }

    /// Registers `identity` on `node`; the node's SPIRE agent serves it on
    /// return. The entry's ID.
    pub fn add_entry(&self, identity: u32, node: &str) -> Result<String, TestbedError> {
        match self {
            Self::Dev(d) => {
                let sid = SpiffeId::parse(&identity_id(identity)).map_err(spire_err)?;
                d.add_entry(EntrySpec::new(node.to_owned(), sid))
                    .map(|e| e.id.clone())
                    .map_err(spire_err)
            }
            Self::Real(r) => {
                let id = r
                    .server
                    .create_entry(&node_alias(node), &identity_id(identity), &["unix:uid:0"])
                    .map_err(spire_err)?;
                r.wait_served(node, identity, true)?;
                Ok(id)
            }
        }
    }

    /// Removes entry `id` (`identity` on `node`); the node's SPIRE agent
    /// no longer serves it on return.
    pub fn remove_entry(&self, id: &str, identity: u32, node: &str) -> Result<(), TestbedError> {
        match self {
            Self::Dev(d) => d.remove_entry(id).map(drop).map_err(spire_err),
            Self::Real(r) => {
                r.server.delete_entry(id).map_err(spire_err)?;
                r.wait_served(node, identity, false)
            }
        }
    }

    /// SPIRE down (`true`) or back. spire-dev: its outage switch; real
    /// SPIRE: the server SIGKILLed, then started again on its datastore.
    pub fn set_outage(&mut self, down: bool) -> Result<(), TestbedError> {
        match self {
            Self::Dev(d) => {
                d.set_outage(down);
                Ok(())
            }
            Self::Real(r) if down => {
                r.server.kill();
                Ok(())
            }
            Self::Real(r) => r.server.restart().map_err(spire_err),
        }
    }

    /// Real SPIRE, if that is what runs.
    pub fn real(&self) -> Option<&RealSpire> {
        match self {
            Self::Real(r) => Some(r.as_ref()),
            Self::Dev(_) => None,
        }
    }

    /// Real SPIRE, mutable (kill and restart its processes).
    pub fn real_mut(&mut self) -> Option<&mut RealSpire> {
        match self {
            Self::Real(r) => Some(r.as_mut()),
            Self::Dev(_) => None,
        }
    }
}
