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
//!
//! Delegated mode (per pod): every agent also has an admin socket whose
//! authorized delegate is [`DELEGATE_ID`], an entry on each node that
//! selects the node's meshauth agent (`unix:uid:0`); the identities'
//! entries select their pods' uid instead, and registering one waits until
//! the agent serves it to a process of that uid (`spire-agent api fetch`
//! run as that user: the socket's directories are opened for traversal).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spire_dev::{DevConfig, EntrySpec, Selector, SpiffeId, SpireDev};

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

/// The SPIFFE ID of meshauth's node agents, SPIRE's authorized delegate in
/// delegated mode.
pub const DELEGATE_ID: &str = "spiffe://meshauth.local/meshauth/agent";

fn identity_id(identity: u32) -> String {
    format!("spiffe://{TRUST_DOMAIN}/identity/{identity}")
}

/// The uid a `unix:uid:N` selector names, unless it is root's (this
/// process): who to ask whether the entry is served.
fn served_to(selectors: &[String]) -> Option<u32> {
    selectors
        .iter()
        .find_map(|s| s.strip_prefix("unix:uid:")?.parse().ok())
        .filter(|&u| u != 0)
}

/// Lets other users through every directory from `path`'s parent up to
/// and including `top` (search permission only: nothing becomes listable
/// or readable).
fn open_for_traversal(path: &Path, top: &Path) -> Result<(), TestbedError> {
    use std::os::unix::fs::PermissionsExt as _;
    let top_parent = top.parent().unwrap_or(top);
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == top_parent || d.as_os_str().is_empty() {
            break;
        }
        let meta = std::fs::metadata(d)
            .map_err(|e| TestbedError::Failed(format!("stat {}: {e}", d.display())))?;
        let mode = meta.permissions().mode() | 0o011;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
            .map_err(|e| TestbedError::Failed(format!("chmod {}: {e}", d.display())))?;
        dir = d.parent();
    }
    Ok(())
}

/// Real SPIRE: the server and one agent per node.
#[derive(Debug)]
pub struct RealSpire {
    server: SpireServer,
    agents: BTreeMap<String, SpireAgent>,
    /// Admin sockets by node (delegated mode only).
    admin: BTreeMap<String, PathBuf>,
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

    /// Waits until `node`'s agent serves `identity` (`present`) or not, to
    /// a process running as `uid` (`None`: this one, root).
    fn wait_served(
        &self,
        node: &str,
        identity: u32,
        uid: Option<u32>,
        present: bool,
    ) -> Result<(), TestbedError> {
        let want = identity_id(identity);
        let deadline = Instant::now() + ENTRY_TIMEOUT;
        let agent = self
            .agents
            .get(node)
            .ok_or_else(|| TestbedError::Failed(format!("no SPIRE agent for {node}")))?;
        loop {
            let served = agent.served_as(uid).map_err(spire_err)?;
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
    /// Starts spire-dev, or real SPIRE from `bin`, under `dir` for `nodes`;
    /// `delegated`: with admin sockets and meshauth's agents as delegates.
    pub async fn start(
        dir: &Path,
        nodes: &[String],
        svid_ttl: Duration,
        bin: Option<&Path>,
        ca_ttl: Option<Duration>,
        delegated: bool,
    ) -> Result<Self, TestbedError> {
        let Some(bin) = bin else {
            let mut cfg = DevConfig::new(dir.to_owned());
            cfg.default_ttl = svid_ttl;
            cfg.nodes = nodes.to_vec();
            if delegated {
                cfg.authorized_delegates = Some(vec![DELEGATE_ID.to_owned()]);
            }
            let dev = SpireDev::start(cfg).await.map_err(spire_err)?;
            if delegated {
                let sid = SpiffeId::parse(DELEGATE_ID).map_err(spire_err)?;
                for n in nodes {
                    dev.add_entry(
                        EntrySpec::new(n.clone(), sid.clone())
                            .with_selector(Selector::new("unix", "uid:0")),
                    )
                    .map_err(spire_err)?;
                }
            }
            return Ok(Self::Dev(dev));
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
            if delegated {
                st.agent.authorized_delegates = vec![DELEGATE_ID.to_owned()];
                // Each node's agent gets its own below; the settings are
                // checked as a whole.
                st.agent.admin_socket_path = Some(dir.join("admin").join("admin.sock"));
            }
            let server = SpireServer::start(&bin, &st).map_err(spire_err)?;
            let mut agents = BTreeMap::new();
            let mut admin = BTreeMap::new();
            for n in &nodes {
                let mut ast = st.clone();
                let adir = dir.join("agents").join(n);
                agent_settings(&mut ast, &adir).map_err(spire_err)?;
                if delegated {
                    let sock = adir.join("admin").join("admin.sock");
                    ast.agent.admin_socket_path = Some(sock.clone());
                    admin.insert(n.clone(), sock);
                }
                let token = server.join_token(&node_alias(n)).map_err(spire_err)?;
                let agent = SpireAgent::start(&bin, &server, &ast, &token).map_err(spire_err)?;
                if delegated {
                    // Pods' users reach the Workload API, as in a cluster.
                    open_for_traversal(&ast.agent.socket_path, dir.parent().unwrap_or(&dir))?;
                    server
                        .create_entry(&node_alias(n), DELEGATE_ID, &["unix:uid:0"])
                        .map_err(spire_err)?;
                }
                agents.insert(n.clone(), agent);
            }
            let real = RealSpire {
                server,
                agents,
                admin,
            };
            for n in real.admin.keys() {
                let deadline = Instant::now() + ENTRY_TIMEOUT;
                while !real.served(n)?.iter().any(|s| s == DELEGATE_ID) {
                    if Instant::now() > deadline {
                        return Err(TestbedError::Failed(format!(
                            "{n}'s SPIRE agent does not serve {DELEGATE_ID} after {ENTRY_TIMEOUT:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Ok(Self::Real(Box::new(real)))
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

    /// The admin socket (Delegated Identity API) of `node`'s agent.
    pub fn admin_socket(&self, node: &str) -> Result<PathBuf, TestbedError> {
        match self {
            Self::Dev(d) => Ok(d.agent(node).map_err(spire_err)?.admin_socket().to_owned()),
            Self::Real(r) => r.admin.get(node).cloned().ok_or_else(|| {
                TestbedError::Failed(format!("{node}'s SPIRE agent has no admin socket"))
            }),
        }
    }

    /// Registers `identity` on `node` with `selectors` (`type:value`); the
    /// node's SPIRE agent serves it on return (to root, or to the uid a
    /// `unix:uid` selector names). The entry's ID.
    pub fn add_entry(
        &self,
        identity: u32,
        node: &str,
        selectors: &[String],
    ) -> Result<String, TestbedError> {
        match self {
            Self::Dev(d) => {
                let sid = SpiffeId::parse(&identity_id(identity)).map_err(spire_err)?;
                let mut spec = EntrySpec::new(node.to_owned(), sid);
                for s in selectors {
                    spec = spec.with_selector(Selector::parse(s).map_err(spire_err)?);
                }
                d.add_entry(spec).map(|e| e.id.clone()).map_err(spire_err)
            }
            Self::Real(r) => {
                let sel: Vec<&str> = selectors.iter().map(String::as_str).collect();
                let id = r
                    .server
                    .create_entry(&node_alias(node), &identity_id(identity), &sel)
                    .map_err(spire_err)?;
                r.wait_served(node, identity, served_to(selectors), true)?;
                Ok(id)
            }
        }
    }

    /// Removes entry `id` (`identity` on `node`, with `selectors`); the
    /// node's SPIRE agent no longer serves it on return.
    pub fn remove_entry(
        &self,
        id: &str,
        identity: u32,
        node: &str,
        selectors: &[String],
    ) -> Result<(), TestbedError> {
        match self {
            Self::Dev(d) => d.remove_entry(id).map(drop).map_err(spire_err),
            Self::Real(r) => {
                r.server.delete_entry(id).map_err(spire_err)?;
                r.wait_served(node, identity, served_to(selectors), false)
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
