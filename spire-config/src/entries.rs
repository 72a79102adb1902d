//! The registration entries meshauth wants, and the plan from the entries
//! a SPIRE server holds — pure functions; the Entry API client applies the
//! plan ([`crate::entry_api`]).
//!
//! - Identity `N` is `spiffe://<td>/identity/N`.
//! - Least privilege (default): one entry per (identity, node that runs a
//!   pod of it), parented to that node's SPIRE agent, so a node only ever
//!   receives keys for identities it runs; the entry goes when the last pod
//!   leaves the node. Cluster-wide (opt-in): one entry per identity,
//!   parented to a node alias every agent matches.
//! - Selectors: in Workload API mode the entries select meshauth's own agent
//!   process on the node (it fetches every SVID of its node); in Delegated
//!   Identity mode they select the pods: on Kubernetes by namespace and
//!   labels (`k8s:ns`, `k8s:pod-label`), without it by the uid their
//!   containers run as (`unix:uid`, from `securityContext.runAsUser`). A uid
//!   that two identities' pods share where one entry would reach both (the
//!   same node, or anywhere for cluster-wide entries), and root's, select
//!   nothing: the `unix` attestor could not tell those workloads apart.
//! - meshauth's entries carry IDs of their own (`meshauth-<hash>` of what
//!   the entry says), so creating one twice is `ALREADY_EXISTS`, and entries
//!   without that prefix — someone else's — are never touched.

use std::collections::{BTreeMap, BTreeSet};

/// Entry IDs meshauth creates start with this.
pub const ID_PREFIX: &str = "meshauth-";
/// SPIRE's batch limit the plan keeps to.
pub const MAX_BATCH: usize = 200;

/// A selector, `type:value` (`k8s:ns:payments`: type `k8s`, value
/// `ns:payments`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// The attestor (`unix`, `k8s`).
    pub kind: String,
    /// What it matches.
    pub value: String,
}

impl Selector {
    /// `kind:value`.
    pub fn new(kind: &str, value: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        }
    }
}

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    /// Its ID.
    pub id: String,
    /// The SPIFFE ID it issues.
    pub spiffe_id: String,
    /// The agent (or node alias) it is issued through.
    pub parent_id: String,
    /// What a workload must match.
    pub selectors: BTreeSet<Selector>,
    /// X.509-SVID TTL in seconds (0: the server's default).
    pub x509_svid_ttl: u32,
    /// Fields meshauth never sets, found set on the server (`admin=true`,
    /// `dns_name=…`): empty on every entry meshauth wants, so an entry
    /// widened by hand differs and is put back.
    pub extras: BTreeSet<String>,
}

/// Who gets an identity's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One entry per node running a pod of the identity, parented to that
    /// node's agent (`agent_ids`: node → its agent's SPIFFE ID).
    PerNode {
        /// Node name → SPIFFE ID of its SPIRE agent.
        agent_ids: BTreeMap<String, String>,
    },
    /// One entry per identity, parented to a node alias every agent
    /// matches.
    ClusterWide {
        /// The alias's SPIFFE ID.
        alias: String,
    },
}

/// Which workloads the entries select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// meshauth's agent process (Workload API mode), e.g. `unix:uid:0` and
    /// `unix:path:/usr/bin/meshauth-agent`, or `k8s:ns:meshauth` and
    /// `k8s:sa:meshauth-agent`.
    Agent(BTreeSet<Selector>),
    /// The pods themselves (Delegated Identity mode), from the identity's
    /// labels.
    Pods,
    /// The pods themselves by the uids they run as (Delegated Identity
    /// mode without Kubernetes): (identity, node) → uids of its pods there.
    PodsByUid(BTreeMap<(u32, String), BTreeSet<u32>>),
}

/// Why some (node, uid) selects nothing in [`Selection::PodsByUid`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum UidRefusal {
    /// Pods of several identities run as the uid where one entry would
    /// reach them all (`node` empty: cluster-wide entries).
    Shared {
        /// The node, or empty for the whole cluster.
        node: String,
        /// The uid.
        uid: u32,
        /// The identities whose pods run as it.
        identities: BTreeSet<u32>,
    },
    /// Pods run as root: every root process would get the identity.
    Root {
        /// The node, or empty for the whole cluster.
        node: String,
        /// The identities whose pods run as root.
        identities: BTreeSet<u32>,
    },
}

impl std::fmt::Display for UidRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = |n: &str| {
            if n.is_empty() {
                "in the cluster".to_owned()
            } else {
                format!("on node {n}")
            }
        };
        match self {
            Self::Shared {
                node,
                uid,
                identities,
            } => write!(
                f,
                "uid {uid} {}: pods of identities {identities:?} run as it; SPIRE's unix attestor cannot tell them apart, so none gets an entry selecting it",
                place(node)
            ),
            Self::Root { node, identities } => write!(
                f,
                "uid 0 {}: pods of identities {identities:?} run as root; an entry selecting unix:uid:0 would give every root process their identity, so none is made",
                place(node)
            ),
        }
    }
}

/// The (node, uid) pairs [`Selection::PodsByUid`] refuses to select, and
/// why (the node is empty for cluster-wide entries).
pub fn uid_refusals(
    run_as: &BTreeMap<(u32, String), BTreeSet<u32>>,
    scope: &Scope,
) -> Vec<UidRefusal> {
    let mut by_uid: BTreeMap<(String, u32), BTreeSet<u32>> = BTreeMap::new();
    for ((identity, node), uids) in run_as {
        let node = match scope {
            Scope::ClusterWide { .. } => String::new(),
            Scope::PerNode { .. } => node.clone(),
        };
        for uid in uids {
            by_uid
                .entry((node.clone(), *uid))
                .or_default()
                .insert(*identity);
        }
    }
    by_uid
        .into_iter()
        .filter_map(|((node, uid), identities)| match uid {
            0 => Some(UidRefusal::Root { node, identities }),
            _ if identities.len() > 1 => Some(UidRefusal::Shared {
                node,
                uid,
                identities,
            }),
            _ => None,
        })
        .collect()
}

/// The inputs: identities (number → canonical labels), where their pods
/// run, and how entries are made.
#[derive(Debug, Clone)]
pub struct Wanted<'a> {
    /// The trust domain.
    pub trust_domain: &'a str,
    /// Identity number → its labels (`k8s:app=payment`,
    /// `k8s:io.kubernetes.pod.namespace=prod`).
    pub identities: &'a BTreeMap<u32, BTreeSet<String>>,
    /// Identity number → nodes running a pod of it.
    pub placements: &'a BTreeMap<u32, BTreeSet<String>>,
    /// Who gets the entries.
    pub scope: &'a Scope,
    /// What they select.
    pub selection: &'a Selection,
    /// SVID TTL (0: server default).
    pub x509_svid_ttl: u32,
}

const NAMESPACE_LABEL: &str = "k8s:io.kubernetes.pod.namespace";
const SERVICE_ACCOUNT_LABEL: &str = "k8s:io.cilium.k8s.policy.serviceaccount";
/// Labels an identity carries that are not the pod's own labels and that
/// SPIRE's k8s attestor has no selector for: the namespace's labels (the
/// namespace itself is selected) and the cluster's name.
const NOT_POD_LABELS: [&str; 2] = [
    "k8s:io.cilium.k8s.namespace.labels.",
    "k8s:io.cilium.k8s.policy.cluster",
];

/// The pods' selectors for an identity's labels, as SPIRE's k8s workload
/// attestor names what it sees: `k8s:ns:<ns>` for the namespace label,
/// `k8s:sa:<sa>` for the service account label, and
/// `k8s:pod-label:<key>:<value>` for the pod's own labels. Namespace labels
/// and the cluster label (no such selector) and labels of other sources
/// (not `k8s:`) are left out.
pub fn pod_selectors(labels: &BTreeSet<String>) -> BTreeSet<Selector> {
    labels
        .iter()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            if k == NAMESPACE_LABEL {
                return Some(Selector::new("k8s", &format!("ns:{v}")));
            }
            if k == SERVICE_ACCOUNT_LABEL {
                return Some(Selector::new("k8s", &format!("sa:{v}")));
            }
            if NOT_POD_LABELS.iter().any(|p| k.starts_with(p)) {
                return None;
            }
            let key = k.strip_prefix("k8s:")?;
            Some(Selector::new("k8s", &format!("pod-label:{key}:{v}")))
        })
        .collect()
}

/// A stable ID for what an entry says (FNV-1a, 64 bits, hex).
fn entry_id(spiffe_id: &str, parent_id: &str, selectors: &BTreeSet<Selector>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |s: &str| {
        for b in s.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(spiffe_id);
    eat(parent_id);
    for s in selectors {
        eat(&s.kind);
        eat(&s.value);
    }
    format!("{ID_PREFIX}{h:016x}")
}

/// The entries meshauth wants.
pub fn desired(w: &Wanted<'_>) -> BTreeMap<String, Entry> {
    if let Selection::PodsByUid(run_as) = w.selection {
        return desired_by_uid(w, run_as);
    }
    let mut out = BTreeMap::new();
    for (n, labels) in w.identities {
        let spiffe_id = format!("spiffe://{}/identity/{n}", w.trust_domain);
        let selectors = match w.selection {
            Selection::Agent(s) => s.clone(),
            Selection::Pods => pod_selectors(labels),
            Selection::PodsByUid(_) => unreachable!("handled above"),
        };
        if selectors.is_empty() {
            continue;
        }
        let parents: Vec<String> = match w.scope {
            Scope::ClusterWide { alias } => vec![alias.clone()],
            Scope::PerNode { agent_ids } => w
                .placements
                .get(n)
                .into_iter()
                .flatten()
                .filter_map(|node| agent_ids.get(node).cloned())
                .collect(),
        };
        for parent_id in parents {
            let id = entry_id(&spiffe_id, &parent_id, &selectors);
            out.insert(
                id.clone(),
                Entry {
                    id,
                    spiffe_id: spiffe_id.clone(),
                    parent_id,
                    selectors: selectors.clone(),
                    x509_svid_ttl: w.x509_svid_ttl,
                    extras: BTreeSet::new(),
                },
            );
        }
    }
    out
}

/// [`desired`] for [`Selection::PodsByUid`]: one entry per (identity,
/// parent, uid of its pods), except the uids [`uid_refusals`] names.
fn desired_by_uid(
    w: &Wanted<'_>,
    run_as: &BTreeMap<(u32, String), BTreeSet<u32>>,
) -> BTreeMap<String, Entry> {
    let refused: BTreeSet<(String, u32)> = uid_refusals(run_as, w.scope)
        .into_iter()
        .flat_map(|r| match r {
            UidRefusal::Shared { node, uid, .. } => vec![(node, uid)],
            UidRefusal::Root { node, .. } => vec![(node, 0)],
        })
        .collect();
    let mut out = BTreeMap::new();
    for ((n, node), uids) in run_as {
        if !w.identities.contains_key(n) {
            continue;
        }
        let (parent_id, scope_node) = match w.scope {
            Scope::ClusterWide { alias } => (alias.clone(), String::new()),
            Scope::PerNode { agent_ids } => match agent_ids.get(node) {
                Some(p) => (p.clone(), node.clone()),
                None => continue,
            },
        };
        let spiffe_id = format!("spiffe://{}/identity/{n}", w.trust_domain);
        for uid in uids {
            if refused.contains(&(scope_node.clone(), *uid)) {
                continue;
            }
            let selectors = BTreeSet::from([Selector::new("unix", &format!("uid:{uid}"))]);
            let id = entry_id(&spiffe_id, &parent_id, &selectors);
            out.insert(
                id.clone(),
                Entry {
                    id,
                    spiffe_id: spiffe_id.clone(),
                    parent_id: parent_id.clone(),
                    selectors,
                    x509_svid_ttl: w.x509_svid_ttl,
                    extras: BTreeSet::new(),
                },
            );
        }
    }
    out
}

/// The entries of meshauth's own agents in Delegated Identity mode: one per
/// parent (each node's agent, or the cluster alias), `delegate` (the SPIFFE
/// ID the SPIRE agents list in `authorized_delegates`) for the workloads
/// `selectors` match (meshauth's agent pods).
pub fn delegate_entries<'a>(
    delegate: &str,
    parents: impl IntoIterator<Item = &'a String>,
    selectors: &BTreeSet<Selector>,
    x509_svid_ttl: u32,
) -> BTreeMap<String, Entry> {
    parents
        .into_iter()
        .map(|parent_id| {
            let id = entry_id(delegate, parent_id, selectors);
            (
                id.clone(),
                Entry {
                    id,
                    spiffe_id: delegate.to_owned(),
                    parent_id: parent_id.clone(),
                    selectors: selectors.clone(),
                    x509_svid_ttl,
                    extras: BTreeSet::new(),
                },
            )
        })
        .collect()
}

/// What to send to the Entry API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries to create.
    pub create: Vec<Entry>,
    /// meshauth's entries changed by hand, put back.
    pub update: Vec<Entry>,
    /// meshauth's entries nobody wants, by ID.
    pub delete: Vec<String>,
    /// Entries of others left alone.
    pub foreign: usize,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }

    /// Creations in batches of at most [`MAX_BATCH`].
    pub fn create_batches(&self) -> impl Iterator<Item = &[Entry]> {
        self.create.chunks(MAX_BATCH)
    }

    /// Updates in batches of at most [`MAX_BATCH`].
    pub fn update_batches(&self) -> impl Iterator<Item = &[Entry]> {
        self.update.chunks(MAX_BATCH)
    }

    /// Deletions in batches of at most [`MAX_BATCH`].
    pub fn delete_batches(&self) -> impl Iterator<Item = &[String]> {
        self.delete.chunks(MAX_BATCH)
    }
}

/// The plan from the server's entries (`existing`, every page of
/// ListEntries) to `desired`: only meshauth's entries (by ID prefix) are
/// updated or deleted.
pub fn plan(existing: &[Entry], desired: &BTreeMap<String, Entry>) -> Plan {
    let mut p = Plan::default();
    let mut seen = BTreeSet::new();
    for e in existing {
        if !e.id.starts_with(ID_PREFIX) {
            p.foreign += 1;
            continue;
        }
        seen.insert(e.id.as_str());
        match desired.get(&e.id) {
            None => p.delete.push(e.id.clone()),
            Some(want) if want != e => p.update.push(want.clone()),
            Some(_) => {}
        }
    }
    p.create = desired
        .values()
        .filter(|e| !seen.contains(e.id.as_str()))
        .cloned()
        .collect();
    p
}

#[cfg(test)]
mod tests;
