//! Desired state → the datapath's ipcache and policy maps.
//!
//! Every pod address in the cluster goes into the ipcache (the remote end of
//! a flow can be anywhere), with the node id of the node that runs it; node
//! addresses go in as host (this node) or remote-node (the others). Auth
//! rules go into the policy map for the identities that have an endpoint on
//! this node (the programs look policy up by the local end). Changes are
//! applied as a diff against what the maps hold, in an order that never
//! opens a hole: new addresses, then new rules, then removed rules, then
//! removed addresses. On start the maps are read back, so an agent restart
//! rewrites nothing that is already right.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use auth_ebpf::DatapathError;
use auth_ebpf::maps::auth::AUTH_TYPE_MTLS;
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::types::Direction;
use policy_bridge::{DesiredState, Remote};

use crate::nodes::NodeTable;

/// Reserved identity of this node's own addresses (Cilium's numbering).
pub const ID_HOST: u32 = 1;
/// Reserved identity of other nodes' addresses.
pub const ID_REMOTE_NODE: u32 = 6;

/// Port ranges wider than this are enforced on every port of the pair
/// (more authentication, never less) instead of one map entry per port.
pub const MAX_EXPANDED_RANGE: u32 = 1024;

/// Datapath sync errors.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A map operation failed; the maps keep what was written before it.
    #[error("datapath sync: {0}")]
    Datapath(#[from] DatapathError),
}

/// What one [`DatapathSync::apply`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Ipcache entries written (new or changed).
    pub ipcache_written: usize,
    /// Ipcache entries removed.
    pub ipcache_removed: usize,
    /// Policy entries written.
    pub policy_written: usize,
    /// Policy entries removed.
    pub policy_removed: usize,
    /// Endpoints skipped because their node is not known yet.
    pub endpoints_without_node: usize,
}

/// The ipcache the desired state implies: address → (identity, node id).
pub fn ipcache_for(d: &DesiredState, nodes: &NodeTable) -> (BTreeMap<Prefix, (u32, u16)>, usize) {
    let mut out = BTreeMap::new();
    let mut skipped = 0;
    // Node addresses first (hostNetwork workloads use them): host for this
    // node, remote-node for the others. Never enforced, but known — so in
    // strict mode a miss on the local end really is a pod not learned yet.
    let local = nodes.local_name();
    for n in d.nodes.values() {
        let Some(id) = nodes.id_of(&n.name) else {
            continue;
        };
        let identity = if n.name == local {
            ID_HOST
        } else {
            ID_REMOTE_NODE
        };
        for a in &n.addresses {
            out.insert(Prefix::host(*a), (identity, id));
        }
    }
    for e in d.endpoints.values() {
        match nodes.id_of(&e.node) {
            Some(id) => {
                out.insert(Prefix::host(e.ip), (e.identity, id));
            }
            None => skipped += 1,
        }
    }
    (out, skipped)
}

/// The policy entries the desired state implies for `local_node`.
pub fn policy_for(d: &DesiredState, local_node: &str) -> BTreeSet<PolicyRule> {
    let local_ids = d.identities_on(local_node);
    let mut out = BTreeSet::new();
    for r in &d.rules {
        if !local_ids.contains(&r.local) {
            continue;
        }
        let remote = match r.remote {
            Remote::Identity(id) => id,
            Remote::AnyCluster => 0,
        };
        let direction = match r.direction {
            policy_bridge::Direction::Ingress => Direction::Ingress,
            policy_bridge::Direction::Egress => Direction::Egress,
        };
        let proto = r.protocol.number();
        let span = u32::from(r.ports.end.max(r.ports.start)) - u32::from(r.ports.start) + 1;
        let ports: Vec<u16> = if r.ports.is_any() || span > MAX_EXPANDED_RANGE {
            if !r.ports.is_any() {
                tracing::info!(
                    local = r.local,
                    start = r.ports.start,
                    end = r.ports.end,
                    "port range wider than {MAX_EXPANDED_RANGE}: enforced on every port of the pair"
                );
            }
            vec![0]
        } else {
            (r.ports.start..=r.ports.end.max(r.ports.start)).collect()
        };
        for port in ports {
            out.insert(PolicyRule {
                local: r.local,
                remote,
                port,
                proto,
                direction,
            });
        }
    }
    out
}

/// Keeps the ipcache and policy maps equal to the desired state.
#[derive(Debug)]
pub struct DatapathSync {
    pin_dir: PathBuf,
    nodes: NodeTable,
    ipcache: BTreeMap<Prefix, (u32, u16)>,
    policy: BTreeSet<PolicyRule>,
}

impl DatapathSync {
    /// Reads what the pinned maps hold now.
    pub fn open(pin_dir: &Path, nodes: NodeTable) -> Result<Self, SyncError> {
        let ipcache = Ipcache::open(pin_dir)?
            .entries()?
            .into_iter()
            .map(|(p, v)| (p, (v.identity, v.node_id)))
            .collect();
        let policy = PolicyMap::open(pin_dir)?
            .entries()?
            .into_iter()
            .filter(|(_, t)| *t == AUTH_TYPE_MTLS)
            .map(|(r, _)| r)
            .collect();
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            nodes,
            ipcache,
            policy,
        })
    }

    /// Makes the maps match `d` (the node table must already be synced with
    /// `d.nodes`).
    pub fn apply(&mut self, d: &DesiredState) -> Result<SyncReport, SyncError> {
        let (want_ipc, skipped) = ipcache_for(d, &self.nodes);
        let want_pol = policy_for(d, &self.nodes.local_name());
        let mut report = SyncReport {
            endpoints_without_node: skipped,
            ..SyncReport::default()
        };
        let mut ipc = Ipcache::open(&self.pin_dir)?;
        let mut pol = PolicyMap::open(&self.pin_dir)?;

        for (prefix, v) in &want_ipc {
            if self.ipcache.get(prefix) != Some(v) {
                ipc.insert(*prefix, v.0, v.1)?;
                self.ipcache.insert(*prefix, *v);
                report.ipcache_written += 1;
            }
        }
        for rule in want_pol.difference(&self.policy.clone()) {
            pol.insert(*rule, AUTH_TYPE_MTLS)?;
            self.policy.insert(*rule);
            report.policy_written += 1;
        }
        for rule in self.policy.clone().difference(&want_pol) {
            pol.remove(rule)?;
            self.policy.remove(rule);
            report.policy_removed += 1;
        }
        let gone: Vec<Prefix> = self
            .ipcache
            .keys()
            .filter(|p| !want_ipc.contains_key(p))
            .copied()
            .collect();
        for prefix in gone {
            ipc.remove(prefix)?;
            self.ipcache.remove(&prefix);
            report.ipcache_removed += 1;
        }
        Ok(report)
    }
}
