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
//!
//! With the source check on, the local pods' cgroups and addresses go into
//! the endpoints map (found by pod UID, [`pod_cgroups`]): a pod's cgroup
//! owns its addresses before they appear in the ipcache, and loses them
//! only after they left it.

pub mod pod_cgroups;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use auth_ebpf::DatapathError;
use auth_ebpf::maps::auth::AUTH_TYPE_MTLS;
use auth_ebpf::maps::endpoints::{Endpoint, EndpointMap};
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::types::Direction;
use policy_bridge::{DesiredState, Remote};

use crate::nodes::NodeTable;
use pod_cgroups::PodCgroups;

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
    /// Local pods written to the endpoints map (new or changed).
    pub pods_written: usize,
    /// Local pods removed from the endpoints map.
    pub pods_removed: usize,
    /// Local pods whose cgroup was not found (no UID, or no cgroup named
    /// after it): with the source check on, their traffic is dropped (132)
    /// until it is found.
    pub pods_without_cgroup: usize,
}

/// The local pods' cgroups and addresses the desired state implies.
fn endpoints_for(
    d: &DesiredState,
    local_node: &str,
    cgroups: &mut PodCgroups,
    missing: &mut Vec<String>,
) -> BTreeMap<u64, (u32, BTreeSet<IpAddr>)> {
    let mut by_pod: BTreeMap<&str, (u32, BTreeSet<IpAddr>)> = BTreeMap::new();
    for e in d.endpoints.values().filter(|e| e.node == local_node) {
        by_pod
            .entry(e.pod.as_str())
            .or_insert_with(|| (e.identity, BTreeSet::new()))
            .1
            .insert(e.ip);
    }
    let mut rescanned = false;
    let mut out = BTreeMap::new();
    for (pod, (identity, addrs)) in by_pod {
        let Some(uid) = d.pod_uids.get(pod) else {
            missing.push(pod.to_string());
            continue;
        };
        let mut found = cgroups.lookup(uid);
        if found.is_none() && !rescanned {
            cgroups.rescan();
            rescanned = true;
            found = cgroups.lookup(uid);
        }
        match found {
            Some(cg) => {
                out.insert(cg, (identity, addrs));
            }
            None => missing.push(pod.to_string()),
        }
    }
    out
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
    /// Set when the source check is on.
    cgroups: Option<PodCgroups>,
    endpoints: BTreeMap<u64, (u32, BTreeSet<IpAddr>)>,
    warned_without_cgroup: HashSet<String>,
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
        let endpoints = EndpointMap::open(pin_dir)?
            .entries()?
            .into_iter()
            .map(|e| (e.cgroup, (e.identity, e.addresses.into_iter().collect())))
            .collect();
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            nodes,
            ipcache,
            policy,
            cgroups: None,
            endpoints,
            warned_without_cgroup: HashSet::new(),
        })
    }

    /// Keeps the endpoints map too (the source check): the local pods'
    /// cgroups, found by UID under `pods_cgroup`, with their addresses.
    pub fn with_source_check(mut self, pods_cgroup: &Path) -> Self {
        self.cgroups = Some(PodCgroups::new(pods_cgroup));
        self
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
        let want_eps = match &mut self.cgroups {
            Some(cgroups) => {
                let mut missing = Vec::new();
                let want = endpoints_for(d, &self.nodes.local_name(), cgroups, &mut missing);
                report.pods_without_cgroup = missing.len();
                for pod in missing {
                    if self.warned_without_cgroup.insert(pod.clone()) {
                        tracing::warn!(%pod, "no cgroup found for this pod (by its metadata.uid): its traffic is dropped as a spoofed source (132) until it is");
                    }
                }
                Some(want)
            }
            None => None,
        };
        // A pod's cgroup owns its addresses before they become cluster
        // addresses in the ipcache.
        if let Some(want) = &want_eps {
            let mut eps = EndpointMap::open(&self.pin_dir)?;
            for (cg, (identity, addrs)) in want {
                let old = self.endpoints.get(cg);
                if old == Some(&(*identity, addrs.clone())) {
                    continue;
                }
                eps.insert(&Endpoint {
                    cgroup: *cg,
                    identity: *identity,
                    addresses: addrs.iter().copied().collect(),
                })?;
                if let Some((_, old_addrs)) = old {
                    for gone in old_addrs.difference(addrs) {
                        eps.remove_address(*cg, *gone)?;
                    }
                }
                self.endpoints.insert(*cg, (*identity, addrs.clone()));
                report.pods_written += 1;
            }
        }

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
        if let Some(want) = &want_eps {
            let mut eps = EndpointMap::open(&self.pin_dir)?;
            let gone: Vec<u64> = self
                .endpoints
                .keys()
                .filter(|cg| !want.contains_key(cg))
                .copied()
                .collect();
            for cg in gone {
                eps.remove(cg)?;
                self.endpoints.remove(&cg);
                report.pods_removed += 1;
            }
            if let Some(cgroups) = &mut self.cgroups {
                cgroups.retain(
                    &d.pod_uids
                        .values()
                        .map(|u| u.to_ascii_lowercase())
                        .collect(),
                );
            }
            let pods: HashSet<&str> = d.endpoints.values().map(|e| e.pod.as_str()).collect();
            self.warned_without_cgroup
                .retain(|pod| pods.contains(pod.as_str()));
        }
        Ok(report)
    }
}
