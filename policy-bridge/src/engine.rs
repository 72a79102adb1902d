//! The incremental compiler: cluster objects in, [`DesiredState`] and
//! [`StateDiff`]s out.
//!
//! Work is proportional to the change. Policies compile to selectors once
//! (identity-independent, [`crate::compile`]); a selector cache maps each
//! distinct selector to the identities it selects; auth rules are
//! reference-counted, so a new identity only touches the selectors that
//! match it and the rules that use those selectors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};

use crate::compile::{CompiledPolicy, Peer, compile_policy};
use crate::identity::{IdentityError, IdentityTable};
use crate::labels::LabelSet;
use crate::model::{ModelError, Object, ObjectKey, ObjectKind, PolicyObject};
use crate::selector::Selector;
use crate::state::{AuthRule, DesiredState, Endpoint, Identity, NodeInfo, Remote, StateDiff};
use crate::status::PolicyStatus;

mod track;
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
    rule_counts: HashMap<AuthRule, u32>,
    state: DesiredState,
    tracker: Tracker,
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
            rule_counts: HashMap::new(),
            state: DesiredState::default(),
            tracker: Tracker::default(),
        }
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

    /// Every policy's status, sorted by kind, namespace, name.
    pub fn status(&self) -> Vec<PolicyStatus> {
        let keys: BTreeSet<&ObjectKey> = self.policies.keys().chain(self.invalid.keys()).collect();
        keys.into_iter()
            .map(|k| {
                PolicyStatus::of(
                    self.policies.get(k),
                    k,
                    self.invalid.get(k).map(String::as_str),
                )
            })
            .collect()
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

    // ---- namespaces and pods ----

    fn upsert_namespace(&mut self, ns: &Namespace) -> Result<(), EngineError> {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        self.set_namespace(&name, Some(labels))
    }

    fn set_namespace(
        &mut self,
        name: &str,
        labels: Option<BTreeMap<String, String>>,
    ) -> Result<(), EngineError> {
        let old = self.namespaces.get(name);
        if old == labels.as_ref() {
            return Ok(());
        }
        match labels {
            Some(l) => self.namespaces.insert(name.to_string(), l),
            None => self.namespaces.remove(name),
        };
        let pods: Vec<String> = self
            .ns_pods
            .get(name)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for p in pods {
            let key = (name.to_string(), p);
            if let Some(entry) = self.pods.get(&key).cloned() {
                self.set_pod(key, Some(entry))?;
            }
        }
        Ok(())
    }

    fn upsert_pod(&mut self, pod: &Pod) -> Result<(), EngineError> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        ips.sort();
        ips.dedup();
        let entry = PodEntry {
            namespace: ns.clone(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ips,
            running: phase == "Running",
            wants_identity: !host_network && phase != "Succeeded" && phase != "Failed",
            ..PodEntry::default()
        };
        self.set_pod((ns, name), Some(entry))
    }

    /// Replaces a pod's entry (`None` = deleted) and updates identities,
    /// endpoints and rules.
    fn set_pod(&mut self, key: (String, String), new: Option<PodEntry>) -> Result<(), EngineError> {
        let old = self.pods.remove(&key);
        let new = match new {
            Some(mut e) => {
                e.label_set = e.wants_identity.then(|| {
                    let empty = BTreeMap::new();
                    let nsl = self.namespaces.get(&e.namespace).unwrap_or(&empty);
                    LabelSet::for_pod(&e.labels, &e.namespace, &e.service_account, nsl)
                });
                e.identity = match &e.label_set {
                    None => None,
                    Some(ls) => self.resolve(ls)?,
                };
                e.endpoints = if e.identity.is_some() && e.running && !e.node.is_empty() {
                    e.ips.clone()
                } else {
                    Vec::new()
                };
                Some(e)
            }
            None => None,
        };
        let (old_ls, old_id, old_eps) = old
            .as_ref()
            .map(|o| (o.label_set.clone(), o.identity, o.endpoints.clone()))
            .unwrap_or_default();
        let (new_ls, new_id) = new
            .as_ref()
            .map(|n| (n.label_set.clone(), n.identity))
            .unwrap_or_default();
        if old_ls != new_ls {
            if let Some(ls) = &old_ls
                && let Some(set) = self.labels_pods.get_mut(ls)
            {
                set.remove(&key);
                if set.is_empty() {
                    self.labels_pods.remove(ls);
                    self.pending.remove(ls);
                }
            }
            if let Some(ls) = &new_ls {
                self.labels_pods
                    .entry(ls.clone())
                    .or_default()
                    .insert(key.clone());
            }
        }
        for ip in &old_eps {
            if self
                .state
                .endpoints
                .get(ip)
                .is_some_and(|e| e.pod == pod_name(&key))
            {
                self.tracker.endpoint(&self.state, *ip);
                self.state.endpoints.remove(ip);
            }
        }
        if old_id != new_id {
            if let Some(id) = new_id {
                self.acquire(id);
            }
            if let Some(id) = old_id {
                self.release(id);
            }
        }
        match new {
            Some(n) => {
                for ip in &n.endpoints {
                    self.tracker.endpoint(&self.state, *ip);
                    self.state.endpoints.insert(
                        *ip,
                        Endpoint {
                            ip: *ip,
                            identity: n.identity.expect("endpoints only with an identity"),
                            node: n.node.clone(),
                            pod: pod_name(&key),
                        },
                    );
                }
                self.ns_pods
                    .entry(key.0.clone())
                    .or_default()
                    .insert(key.1.clone());
                self.pods.insert(key, n);
            }
            None => {
                if let Some(set) = self.ns_pods.get_mut(&key.0) {
                    set.remove(&key.1);
                }
            }
        }
        Ok(())
    }

    fn resolve(&mut self, ls: &LabelSet) -> Result<Option<u32>, EngineError> {
        if let Some(id) = self.table.get(ls) {
            return Ok(Some(id));
        }
        match self.cfg.allocation {
            Allocation::Local => {
                let id = self
                    .table
                    .allocate(ls)
                    .map_err(|source| EngineError::Identity {
                        labels: ls.clone(),
                        source,
                    })?;
                self.table_dirty = true;
                Ok(Some(id))
            }
            Allocation::Deferred => {
                self.pending.insert(ls.clone());
                Ok(None)
            }
        }
    }

    /// Records an identity allocated elsewhere (a MeshIdentity object) and
    /// gives waiting pods their identity.
    pub fn identity_allocated(&mut self, id: u32, labels: LabelSet) -> Result<(), EngineError> {
        if self.table.labels(id) == Some(&labels) && !self.pending.contains(&labels) {
            return Ok(());
        }
        self.table
            .insert(id, labels.clone())
            .map_err(|source| EngineError::Identity {
                labels: labels.clone(),
                source,
            })?;
        self.pending.remove(&labels);
        self.refresh_label_set(&labels)
    }

    /// Records that an identity object disappeared. Returns false (and keeps
    /// it) if pods still use it — the caller should re-create it.
    pub fn identity_deleted(&mut self, id: u32) -> Result<bool, EngineError> {
        if self.id_users.get(&id).copied().unwrap_or(0) > 0 {
            return Ok(false);
        }
        if let Some(labels) = self.table.remove(id) {
            // A duplicate with a higher number may now be in effect.
            self.refresh_label_set(&labels)?;
        }
        Ok(true)
    }

    fn refresh_label_set(&mut self, labels: &LabelSet) -> Result<(), EngineError> {
        let pods: Vec<(String, String)> = self
            .labels_pods
            .get(labels)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for key in pods {
            if let Some(e) = self.pods.get(&key).cloned() {
                self.set_pod(key, Some(e))?;
            }
        }
        Ok(())
    }

    /// Collects identities unused for `grace`; returns them (the caller
    /// deletes their persisted form).
    pub fn collect_identities(&mut self, now: Instant, grace: Duration) -> Vec<(u32, LabelSet)> {
        let gone = self.table.collect(now, grace);
        if !gone.is_empty() {
            self.table_dirty = true;
        }
        gone
    }

    fn acquire(&mut self, id: u32) {
        let n = self.id_users.entry(id).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.table.mark_used(id);
            self.identity_appeared(id);
        }
    }

    fn release(&mut self, id: u32) {
        let Some(n) = self.id_users.get_mut(&id) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.id_users.remove(&id);
            self.identity_gone(id);
            self.table.mark_unused(id, Instant::now());
        }
    }

    fn identity_appeared(&mut self, id: u32) {
        let Some(labels) = self.table.labels(id).cloned() else {
            return;
        };
        self.tracker.identity(&self.state, id);
        self.state.identities.insert(
            id,
            Identity {
                id,
                labels: labels.canonical(),
            },
        );
        for (k, v) in labels.iter() {
            self.label_index
                .entry((k.to_string(), v.to_string()))
                .or_default()
                .insert(id);
        }
        let mut users = BTreeSet::new();
        for (sel, entry) in self.selectors.iter_mut() {
            if sel.matches(&labels) {
                entry.ids.insert(id);
                users.extend(entry.users.iter().cloned());
            }
        }
        self.present.insert(id, labels);
        for (pk, idx) in users {
            self.pairs_with(&pk, idx, id, 1);
        }
    }

    fn identity_gone(&mut self, id: u32) {
        let Some(labels) = self.present.get(&id).cloned() else {
            return;
        };
        let users: BTreeSet<(ObjectKey, usize)> = self
            .selectors
            .values()
            .filter(|e| e.ids.contains(&id))
            .flat_map(|e| e.users.iter().cloned())
            .collect();
        for (pk, idx) in users {
            self.pairs_with(&pk, idx, id, -1);
        }
        for e in self.selectors.values_mut() {
            e.ids.remove(&id);
        }
        for (k, v) in labels.iter() {
            let key = (k.to_string(), v.to_string());
            if let Some(s) = self.label_index.get_mut(&key) {
                s.remove(&id);
                if s.is_empty() {
                    self.label_index.remove(&key);
                }
            }
        }
        self.present.remove(&id);
        self.tracker.identity(&self.state, id);
        self.state.identities.remove(&id);
    }

    // ---- nodes ----

    fn upsert_node(&mut self, node: &Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let key = ObjectKey {
            kind: ObjectKind::Node,
            namespace: None,
            name: name.clone(),
        };
        self.tracker.node(&self.state, &name);
        match node_info(node, &self.cfg) {
            Ok(info) => {
                self.state.nodes.insert(name, info);
            }
            Err(msg) => {
                self.state.nodes.remove(&name);
                self.invalid.insert(key, msg);
            }
        }
    }

    // ---- policies ----

    fn upsert_policy(&mut self, p: &PolicyObject) -> Result<(), EngineError> {
        let compiled = compile_policy(p);
        if self.policies.get(&compiled.key) == Some(&compiled) {
            return Ok(());
        }
        self.remove_policy(&compiled.key);
        let key = compiled.key.clone();
        for (idx, r) in compiled.rules.iter().enumerate() {
            self.use_selector(&r.subject, &key, idx);
            if let Peer::Selector(s) = &r.peer {
                self.use_selector(s, &key, idx);
            }
        }
        self.policies.insert(key.clone(), compiled);
        for idx in 0..self.policies[&key].rules.len() {
            self.all_pairs(&key, idx, 1);
        }
        Ok(())
    }

    fn remove_policy(&mut self, key: &ObjectKey) {
        let Some(n) = self.policies.get(key).map(|c| c.rules.len()) else {
            return;
        };
        for idx in 0..n {
            self.all_pairs(key, idx, -1);
        }
        let compiled = self.policies.remove(key).expect("checked above");
        for (idx, r) in compiled.rules.iter().enumerate() {
            self.unuse_selector(&r.subject, key, idx);
            if let Peer::Selector(s) = &r.peer {
                self.unuse_selector(s, key, idx);
            }
        }
    }

    fn use_selector(&mut self, sel: &Selector, key: &ObjectKey, idx: usize) {
        if !self.selectors.contains_key(sel) {
            let candidates: Box<dyn Iterator<Item = u32>> = match sel.index_hint() {
                Some((k, v)) => Box::new(
                    self.label_index
                        .get(&(k.to_string(), v.to_string()))
                        .into_iter()
                        .flatten()
                        .copied(),
                ),
                None => Box::new(self.present.keys().copied()),
            };
            let ids = candidates
                .filter(|id| sel.matches(&self.present[id]))
                .collect();
            self.selectors.insert(
                sel.clone(),
                SelEntry {
                    ids,
                    users: BTreeSet::new(),
                },
            );
        }
        let e = self.selectors.get_mut(sel).expect("inserted above");
        e.users.insert((key.clone(), idx));
    }

    fn unuse_selector(&mut self, sel: &Selector, key: &ObjectKey, idx: usize) {
        if let Some(e) = self.selectors.get_mut(sel) {
            e.users.remove(&(key.clone(), idx));
            if e.users.is_empty() {
                self.selectors.remove(sel);
            }
        }
    }

    /// Adds (`delta` = 1) or removes (-1) every rule of a compiled rule.
    fn all_pairs(&mut self, key: &ObjectKey, idx: usize, delta: i32) {
        let r = &self.policies[key].rules[idx];
        let locals = &self.selectors[&r.subject].ids;
        let remotes: Vec<Remote> = match &r.peer {
            Peer::AnyCluster => vec![Remote::AnyCluster],
            Peer::Selector(s) => self.selectors[s]
                .ids
                .iter()
                .map(|&i| Remote::Identity(i))
                .collect(),
        };
        let mut out = Vec::new();
        for &l in locals {
            for &rem in &remotes {
                for &(protocol, ports) in &r.ports {
                    out.push(AuthRule {
                        local: l,
                        remote: rem,
                        direction: r.direction,
                        protocol,
                        ports,
                    });
                }
            }
        }
        self.count(out, delta);
    }

    /// Adds or removes the rules of a compiled rule that involve `id`
    /// (which the selector cache already lists).
    fn pairs_with(&mut self, key: &ObjectKey, idx: usize, id: u32, delta: i32) {
        let Some(r) = self.policies.get(key).and_then(|p| p.rules.get(idx)) else {
            return;
        };
        let locals = &self.selectors[&r.subject].ids;
        let peer_ids = match &r.peer {
            Peer::AnyCluster => None,
            Peer::Selector(s) => Some(&self.selectors[s].ids),
        };
        let mut pairs = Vec::new();
        if locals.contains(&id) {
            match peer_ids {
                None => pairs.push((id, Remote::AnyCluster)),
                Some(ids) => pairs.extend(ids.iter().map(|&p| (id, Remote::Identity(p)))),
            }
        }
        if let Some(ids) = peer_ids
            && ids.contains(&id)
        {
            pairs.extend(
                locals
                    .iter()
                    .filter(|&&l| l != id)
                    .map(|&l| (l, Remote::Identity(id))),
            );
        }
        let mut out = Vec::new();
        for (local, remote) in pairs {
            for &(protocol, ports) in &r.ports {
                out.push(AuthRule {
                    local,
                    remote,
                    direction: r.direction,
                    protocol,
                    ports,
                });
            }
        }
        self.count(out, delta);
    }

    fn count(&mut self, rules: Vec<AuthRule>, delta: i32) {
        for rule in rules {
            if delta > 0 {
                let n = self.rule_counts.entry(rule).or_insert(0);
                *n += 1;
                if *n == 1 {
                    self.tracker.rule(&self.state, rule);
                    self.state.rules.insert(rule);
                }
            } else if let Some(n) = self.rule_counts.get_mut(&rule) {
                *n -= 1;
                if *n == 0 {
                    self.rule_counts.remove(&rule);
                    self.tracker.rule(&self.state, rule);
                    self.state.rules.remove(&rule);
                }
            }
        }
    }
}

fn pod_name(key: &(String, String)) -> String {
    format!("{}/{}", key.0, key.1)
}

/// A node's table entry. The handshake address is the annotation's if set
/// (it must parse), otherwise the first InternalIP that is IPv4, otherwise
/// the first InternalIP. A node with neither is an error (no entry).
pub fn node_info(node: &Node, cfg: &EngineConfig) -> Result<NodeInfo, String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let ann = node.metadata.annotations.as_ref();
    let addrs = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let mut addresses = BTreeSet::new();
    let mut internal = Vec::new();
    for a in addrs.into_iter().flatten() {
        if let Ok(ip) = a.address.parse::<IpAddr>() {
            addresses.insert(ip);
            if a.type_ == "InternalIP" {
                internal.push(ip);
            }
        }
    }
    let handshake_addr = match ann.and_then(|a| a.get(&cfg.handshake_annotation)) {
        Some(v) => {
            let ip = v.trim().parse::<IpAddr>().map_err(|_| {
                format!(
                    "metadata.annotations[{}]: {v:?} is not an IP address",
                    cfg.handshake_annotation
                )
            })?;
            addresses.insert(ip);
            ip
        }
        None => internal
            .iter()
            .find(|ip| ip.is_ipv4())
            .or_else(|| internal.first())
            .copied()
            .ok_or_else(|| {
                format!(
                    "status.addresses: no InternalIP and no {} annotation",
                    cfg.handshake_annotation
                )
            })?,
    };
    Ok(NodeInfo {
        name,
        handshake_addr,
        addresses,
        wireguard_key: ann
            .and_then(|a| a.get(&cfg.wireguard_annotation))
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty()),
    })
}
