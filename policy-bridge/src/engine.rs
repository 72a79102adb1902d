//! The incremental compiler: cluster objects in, [`DesiredState`] and
//! [`StateDiff`]s out.
//!
//! Work is proportional to the change. Policies compile to selectors once
//! (identity-independent, [`crate::compile`]); a selector cache maps each
//! distinct selector to the identities it selects; auth rules are
//! reference-counted, so a new identity only touches the selectors that
//! match it and the rules that use those selectors.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use crate::compile::{CompiledPolicy, Peer};
use crate::identity::{IdentityError, IdentityTable};
use crate::labels::LabelSet;
use crate::model::{ModelError, Object, ObjectKey, ObjectKind};
use crate::selector::Selector;
use crate::state::{AuthRule, DesiredState, Remote, StateDiff};
use crate::status::{Coverage, PolicyStatus};

mod node;
mod pods;
mod rules;
mod track;
pub use node::node_info;
use track::Tracker;

/// Default annotation that overrides a node's handshake address.
pub const HANDSHAKE_ADDRESS_ANNOTATION: &str = "meshauth.io/handshake-address";
/// Default annotation carrying a node's WireGuard public key.
pub const WIREGUARD_KEY_ANNOTATION: &str = "meshauth.io/wireguard-public-key";

/// Errors applying a change.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Allocating an identity failed.
    #[error("allocating an identity for {labels}: {source}")]
    Identity {
        /// The label set.
        labels: LabelSet,
        /// Why.
        source: IdentityError,
    },
}

/// How new label sets get numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Allocate in the local table right away (standalone).
    Local,
    /// Leave them pending; the caller allocates (cluster-wide, e.g. through
    /// MeshIdentity objects) and reports back with
    /// [`Engine::identity_allocated`].
    Deferred,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Annotation overriding a node's handshake address.
    pub handshake_annotation: String,
    /// Annotation carrying a node's WireGuard public key.
    pub wireguard_annotation: String,
    /// How identities are allocated.
    pub allocation: Allocation,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            handshake_annotation: HANDSHAKE_ADDRESS_ANNOTATION.into(),
            wireguard_annotation: WIREGUARD_KEY_ANNOTATION.into(),
            allocation: Allocation::Local,
        }
    }
}

/// One change to the cluster state.
#[derive(Clone, Debug)]
pub enum Change {
    /// An object was created or updated.
    Upsert(Object),
    /// An object was deleted.
    Delete(ObjectKey),
    /// The newest version of an object could not be read; the previous
    /// one (if any) stays in force.
    Invalid(ObjectKey, ModelError),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PodEntry {
    namespace: String,
    labels: BTreeMap<String, String>,
    service_account: String,
    node: String,
    ips: Vec<IpAddr>,
    uid: String,
    /// The uids its containers run as, where the spec says
    /// (`securityContext.runAsUser`, the container's over the pod's).
    run_as: BTreeSet<u32>,
    running: bool,
    wants_identity: bool,
    /// Derived.
    label_set: Option<LabelSet>,
    identity: Option<u32>,
    endpoints: Vec<IpAddr>,
}

#[derive(Debug, Default)]
struct SelEntry {
    ids: BTreeSet<u32>,
    users: BTreeSet<(ObjectKey, usize)>,
}

/// The incremental compiler.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    table: IdentityTable,
    table_dirty: bool,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    pods: HashMap<(String, String), PodEntry>,
    ns_pods: HashMap<String, BTreeSet<String>>,
    labels_pods: HashMap<LabelSet, BTreeSet<(String, String)>>,
    id_users: HashMap<u32, usize>,
    pending: BTreeSet<LabelSet>,
    present: BTreeMap<u32, LabelSet>,
    label_index: HashMap<(String, String), BTreeSet<u32>>,
    policies: BTreeMap<ObjectKey, CompiledPolicy>,
    invalid: BTreeMap<ObjectKey, String>,
    selectors: HashMap<Selector, SelEntry>,
    /// The selectors in use by a `(key, value)` every identity they select
    /// must carry ([`Selector::index_hint`]), and those without one: a new
    /// identity is matched against the selectors its labels can satisfy,
    /// not against every selector.
    sel_by_hint: HashMap<(String, String), HashSet<Selector>>,
    sel_unhinted: HashSet<Selector>,
    rule_counts: HashMap<AuthRule, u32>,
    state: DesiredState,
    tracker: Tracker,
    /// The time changes are applied at (`None`: the real clock), for
    /// identity collection.
    now: Option<std::time::Instant>,
}

impl Engine {
    /// A new engine with an identity table (loaded from wherever it persists).
    pub fn new(cfg: EngineConfig, table: IdentityTable) -> Self {
        Self {
            cfg,
            table,
            table_dirty: false,
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            ns_pods: HashMap::new(),
            labels_pods: HashMap::new(),
            id_users: HashMap::new(),
            pending: BTreeSet::new(),
            present: BTreeMap::new(),
            label_index: HashMap::new(),
            policies: BTreeMap::new(),
            invalid: BTreeMap::new(),
            selectors: HashMap::new(),
            sel_by_hint: HashMap::new(),
            sel_unhinted: HashSet::new(),
            rule_counts: HashMap::new(),
            state: DesiredState::default(),
            tracker: Tracker::default(),
            now: None,
        }
    }

    /// Applies the following changes at `now` (an identity no pod uses any
    /// more is unused from then); `None` returns to the real clock.
    pub fn set_now(&mut self, now: Option<std::time::Instant>) {
        self.now = now;
    }

    /// The current desired state.
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// The identity table.
    pub fn table(&self) -> &IdentityTable {
        &self.table
    }

    /// True (once) if the table changed since the last call.
    pub fn take_table_dirty(&mut self) -> bool {
        std::mem::take(&mut self.table_dirty)
    }

    /// Label sets waiting for a number ([`Allocation::Deferred`]).
    pub fn pending_identities(&self) -> Vec<LabelSet> {
        self.pending.iter().cloned().collect()
    }

    /// Every policy's status, sorted by kind, namespace, name, with what
    /// its rules cover now.
    pub fn status(&self) -> Vec<PolicyStatus> {
        let keys: BTreeSet<&ObjectKey> = self
            .policies
            .keys()
            .chain(
                self.invalid
                    .keys()
                    .filter(|k| matches!(k.kind, ObjectKind::Policy(_))),
            )
            .collect();
        keys.into_iter()
            .map(|k| {
                let c = self.policies.get(k);
                let mut s = PolicyStatus::of(c, k, self.invalid.get(k).map(String::as_str));
                if let Some(c) = c {
                    self.cover(c, &mut s.coverage);
                }
                s
            })
            .collect()
    }

    /// The pairs, datapath rules and pods a compiled policy covers now.
    fn cover(&self, c: &CompiledPolicy, out: &mut Coverage) {
        let mut pairs = BTreeSet::new();
        let mut rules = BTreeSet::new();
        for r in &c.rules {
            let locals = self.selectors.get(&r.subject).map(|e| &e.ids);
            let remotes: Vec<Remote> = match &r.peer {
                Peer::AnyCluster => vec![Remote::AnyCluster],
                Peer::Selector(s) => self
                    .selectors
                    .get(s)
                    .into_iter()
                    .flat_map(|e| e.ids.iter().map(|&i| Remote::Identity(i)))
                    .collect(),
            };
            for &l in locals.into_iter().flatten() {
                for &rem in &remotes {
                    pairs.insert((l, rem));
                    for &(protocol, ports) in &r.ports {
                        rules.insert(AuthRule {
                            local: l,
                            remote: rem,
                            direction: r.direction,
                            protocol,
                            ports,
                        });
                    }
                }
            }
        }
        let ids: BTreeSet<u32> = pairs
            .iter()
            .flat_map(|&(l, r)| {
                std::iter::once(l).chain(match r {
                    Remote::Identity(i) => Some(i),
                    Remote::AnyCluster => None,
                })
            })
            .collect();
        out.pairs = pairs.len();
        out.datapath_rules = rules.len();
        out.pods = self
            .pods
            .values()
            .filter(|p| p.running && !p.endpoints.is_empty())
            .filter(|p| p.identity.is_some_and(|i| ids.contains(&i)))
            .count();
    }

    /// Objects (any kind) whose newest version could not be read.
    pub fn invalid_objects(&self) -> &BTreeMap<ObjectKey, String> {
        &self.invalid
    }

    /// Applies one change. Call [`Self::commit`] to get the diff.
    pub fn apply(&mut self, change: Change) -> Result<(), EngineError> {
        match change {
            Change::Upsert(obj) => {
                self.invalid.remove(&obj.key());
                match obj {
                    Object::Pod(p) => self.upsert_pod(&p),
                    Object::Namespace(n) => self.upsert_namespace(&n),
                    Object::Node(n) => {
                        self.upsert_node(&n);
                        Ok(())
                    }
                    Object::Policy(p) => self.upsert_policy(&p),
                }
            }
            Change::Delete(key) => {
                self.invalid.remove(&key);
                match key.kind {
                    ObjectKind::Pod => {
                        let k = (key.namespace.unwrap_or_default(), key.name);
                        self.set_pod(k, None)
                    }
                    ObjectKind::Namespace => self.set_namespace(&key.name, None),
                    ObjectKind::Node => {
                        self.tracker.node(&self.state, &key.name);
                        self.state.nodes.remove(&key.name);
                        self.state.node_uids.remove(&key.name);
                        Ok(())
                    }
                    ObjectKind::Policy(_) => {
                        self.remove_policy(&key);
                        Ok(())
                    }
                }
            }
            Change::Invalid(key, err) => {
                self.invalid.insert(key, err.to_string());
                Ok(())
            }
        }
    }

    /// The changes since the previous commit.
    pub fn commit(&mut self) -> StateDiff {
        std::mem::take(&mut self.tracker).finish(&self.state)
    }
}
