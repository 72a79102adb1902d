//! The SPIRE server model: one trust domain's CA, the registration entries,
//! and the outage switch. Node agents ([`crate::agent::NodeAgent`]) talk to it
//! through [`SpireServer::node_view`] and [`SpireServer::mint`], which fail with
//! [`ServerError::Unavailable`] while the outage switch is on; administration
//! (entries, CA rotation) keeps working during an outage, like a datastore
//! edited while the server's agent API is unreachable.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::ca::{CaError, CertificateAuthority, Svid};
use crate::entries::{Entries, Entry, EntryError, EntrySpec, SpiffeId};

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "meshauth.local";
/// Default SVID TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `SpireServer::<call>` was refused for node `node` because the outage switch is on.
    #[error("SpireServer::{call}(node {node}): server unavailable (outage switch on)")]
    Unavailable {
        /// The refused call.
        call: &'static str,
        /// The node agent that asked.
        node: String,
    },
    /// `SpireServer::new` got an invalid trust domain `value`.
    #[error("SpireServer::new: invalid trust domain {value:?}: {source}")]
    TrustDomain {
        /// The offending trust domain.
        value: String,
        /// Why it is invalid.
        source: EntryError,
    },
    /// An entry operation failed (the entry error names the call and value).
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The CA failed (the CA error names the call and value).
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Trust domain name (`meshauth.local`).
    pub trust_domain: String,
    /// TTL of SVIDs whose entry sets none.
    pub default_ttl: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            default_ttl: DEFAULT_TTL,
        }
    }
}

/// What a node agent learns from the server in one sync.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// The entries parented to the node, in registration order.
    pub entries: Vec<Entry>,
    /// The trust bundle (DER roots).
    pub bundle: Vec<Vec<u8>>,
    /// The signing CA's generation.
    pub ca_generation: u64,
}

#[derive(Debug)]
struct State {
    ca: CertificateAuthority,
    entries: Entries,
    outage: bool,
}

#[derive(Debug)]
struct Inner {
    config: ServerConfig,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
}

/// A handle on the SPIRE server model; clones share the server.
#[derive(Debug, Clone)]
pub struct SpireServer {
    inner: Arc<Inner>,
}

impl SpireServer {
    /// Creates a server with a fresh CA and no entries.
    pub fn new(config: ServerConfig) -> Result<Self, ServerError> {
        SpiffeId::parse(&format!("spiffe://{}/x", config.trust_domain)).map_err(|source| {
            ServerError::TrustDomain {
                value: config.trust_domain.clone(),
                source,
            }
        })?;
        let ca = CertificateAuthority::new(&config.trust_domain)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State {
                    ca,
                    entries: Entries::default(),
                    outage: false,
                }),
                changes: watch::Sender::new(0),
            }),
        })
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.inner.config.trust_domain
    }

    /// The default SVID TTL.
    pub fn default_ttl(&self) -> Duration {
        self.inner.config.default_ttl
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is
        // a single assignment), so a poisoned lock is still usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever agents should sync (entries, CA, outage).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Registers an entry; agents of its node pick it up on their next sync.
    pub fn add_entry(&self, spec: EntrySpec) -> Result<Entry, ServerError> {
        let entry = {
            let mut st = self.state();
            st.entries.add(
                &self.inner.config.trust_domain,
                self.inner.config.default_ttl,
                spec,
            )?
        };
        tracing::info!(entry.id = %entry.id, spiffe_id = %entry.spiffe_id, node = %entry.node, "entry added");
        self.changed();
        Ok(entry)
    }

    /// Removes the entry `id`.
    pub fn remove_entry(&self, id: &str) -> Result<Entry, ServerError> {
        let entry = self.state().entries.remove(id)?;
        tracing::info!(entry.id = %entry.id, spiffe_id = %entry.spiffe_id, node = %entry.node, "entry removed");
        self.changed();
        Ok(entry)
    }

    /// All entries, in registration order.
    pub fn entries(&self) -> Vec<Entry> {
        self.state().entries.all()
    }

    /// Turns the outage switch on or off; returns the previous value. While
    /// on, agents keep what they hold and get nothing new; turning it off makes
    /// them sync.
    pub fn set_outage(&self, on: bool) -> bool {
        let was = std::mem::replace(&mut self.state().outage, on);
        if was != on {
            tracing::warn!(outage = on, "server outage switch");
            self.changed();
        }
        was
    }

    /// Whether the outage switch is on.
    pub fn outage(&self) -> bool {
        self.state().outage
    }

    /// Rotates the CA: a new root signs from now on, the previous roots stay in
    /// the bundle. Returns the new CA generation.
    pub fn rotate_ca(&self) -> Result<u64, ServerError> {
        let generation = self.state().ca.rotate()?;
        tracing::info!(ca.generation = generation, "CA rotated");
        self.changed();
        Ok(generation)
    }

    /// Prepares the next CA (SPIRE's "X509 CA prepared"): in the bundle,
    /// signing nothing yet. Returns its generation.
    pub fn prepare_ca(&self) -> Result<u64, ServerError> {
        let generation = self.state().ca.prepare()?;
        tracing::info!(ca.generation = generation, "X509 CA prepared");
        self.changed();
        Ok(generation)
    }

    /// Activates the prepared CA (SPIRE's "X509 CA activated"). Returns the
    /// new generation.
    pub fn activate_ca(&self) -> Result<u64, ServerError> {
        let generation = self.state().ca.activate()?;
        tracing::info!(ca.generation = generation, "X509 CA activated");
        self.changed();
        Ok(generation)
    }

    /// Drops previous CAs from the bundle; returns how many were dropped.
    pub fn prune_ca(&self) -> usize {
        let dropped = self.state().ca.prune();
        tracing::info!(dropped, "previous CAs pruned from the bundle");
        if dropped > 0 {
            self.changed();
        }
        dropped
    }

    /// The signing CA's generation (1 for the first root).
    pub fn ca_generation(&self) -> u64 {
        self.state().ca.generation()
    }

    /// The trust bundle: DER roots, the signing one first.
    pub fn bundle(&self) -> Vec<Vec<u8>> {
        self.state().ca.bundle()
    }

    /// Agent call: the entries of `node`, the bundle and the CA generation.
    pub fn node_view(&self, node: &str) -> Result<NodeView, ServerError> {
        let st = self.state();
        if st.outage {
            return Err(ServerError::Unavailable {
                call: "node_view",
                node: node.to_owned(),
            });
        }
        Ok(NodeView {
            entries: st.entries.for_node(node),
            bundle: st.ca.bundle(),
            ca_generation: st.ca.generation(),
        })
    }

    /// Agent call: signs a new SVID (fresh key) for `entry` with the entry's TTL.
    pub fn mint(&self, entry: &Entry) -> Result<Svid, ServerError> {
        let st = self.state();
        if st.outage {
            return Err(ServerError::Unavailable {
                call: "mint",
                node: entry.node.clone(),
            });
        }
        Ok(st.ca.issue(&entry.spiffe_id, entry.ttl)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_refuses_agent_calls_but_not_admin() {
        let s = SpireServer::new(ServerConfig::default()).expect("server");
        let id = SpiffeId::parse_in(s.trust_domain(), "/identity/1").expect("id");
        let e = s.add_entry(EntrySpec::new("n1", id.clone())).expect("add");
        assert_eq!(s.node_view("n1").expect("view").entries, vec![e.clone()]);
        assert!(!s.set_outage(true));
        assert!(matches!(
            s.node_view("n1"),
            Err(ServerError::Unavailable { .. })
        ));
        assert!(matches!(s.mint(&e), Err(ServerError::Unavailable { .. })));
        s.add_entry(EntrySpec::new("n1", id))
            .expect("admin works in outage");
        s.set_outage(false);
        assert_eq!(s.node_view("n1").expect("view").entries.len(), 2);
        assert_eq!(s.mint(&e).expect("mint").spiffe_id, e.spiffe_id);
    }

    #[test]
    fn rejects_bad_trust_domain() {
        let cfg = ServerConfig {
            trust_domain: "Bad TD".into(),
            ..ServerConfig::default()
        };
        assert!(matches!(
            SpireServer::new(cfg),
            Err(ServerError::TrustDomain { .. })
        ));
    }
}
