//! The agent's answers to the local API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use auth_ebpf::maps::auth::AuthMap;
use auth_ebpf::maps::ipcache::Ipcache;
use auth_ebpf::maps::policy::PolicyMap;
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use policy_bridge::Subscription;
use svid_cache::{SourceState, SourceStatus, SvidCache};
use tokio::sync::watch;

use super::{Counts, Readiness};
use crate::api::flows::rfc3339;
use crate::api::types::{
    AgentStatus, AuthEntry, DatapathStatus, HandshakeCounts, IdentityEntry, PeerStatus,
    PolicySummary, SpireStatus,
};
use crate::api::{Backend, FlowHub};
use crate::config::{Config, IdentitySource, Mode, PolicySource};
use crate::nodes::NodeTable;

/// What the API reads.
#[derive(Debug)]
pub struct AgentBackend {
    pub(crate) config: Config,
    pub(crate) started: SystemTime,
    pub(crate) cgroup: PathBuf,
    pub(crate) cache: SvidCache,
    pub(crate) source: watch::Receiver<SourceStatus>,
    pub(super) pod_svids: Option<super::pod_svids::PodSvids>,
    pub(crate) subscription: Subscription,
    pub(crate) nodes: NodeTable,
    pub(crate) ready: Arc<Readiness>,
    pub(crate) counts: Arc<Counts>,
    pub(crate) hub: FlowHub,
    pub(crate) wireguard: Arc<std::sync::OnceLock<crate::wireguard::manager::WireGuardHandle>>,
}

fn spire(
    config: &Config,
    s: &SourceStatus,
    cache: &SvidCache,
    pods: Option<&super::pod_svids::PodSvids>,
) -> SpireStatus {
    let (source, socket) = match &config.identity_source {
        IdentitySource::WorkloadApi { socket } => ("workload_api", socket),
        IdentitySource::DelegatedIdentity { socket, .. } => ("delegated_identity", socket),
        IdentitySource::DelegatedPods { socket } => ("delegated_identity_pods", socket),
    };
    let (state, since) = match &s.state {
        SourceState::Connecting => ("connecting", None),
        SourceState::Connected { since } => ("connected", Some(rfc3339(*since))),
        SourceState::Disconnected { since, .. } => ("disconnected", Some(rfc3339(*since))),
    };
    SpireStatus {
        source: source.to_string(),
        socket: socket.display().to_string(),
        state: state.to_string(),
        since,
        last_error: s.last_error.as_ref().map(|(_, e)| e.to_string()),
        outage: matches!(s.state, SourceState::Disconnected { .. }),
        svids: cache.len(),
        next_expiry: cache.next_expiry().map(rfc3339),
        reconnects: s.reconnects,
        overdue_svids: overdue(cache, auth_ebpf::clock::agent_now()),
        pods: pods.map(|p| p.status()).unwrap_or_default(),
    }
}

/// SVIDs past 3/4 of their lifetime at `now`.
pub(crate) fn overdue(cache: &SvidCache, now: SystemTime) -> usize {
    cache
        .identities()
        .into_iter()
        .filter_map(|id| cache.get(id))
        .filter(|s| {
            let life = s
                .not_after()
                .duration_since(s.not_before())
                .unwrap_or_default();
            now.duration_since(s.not_before()).unwrap_or_default() > life * 3 / 4
        })
        .count()
}

impl AgentBackend {
    fn auth_entries(&self) -> Result<Vec<(auth_ebpf::types::AuthKey, SystemTime)>, String> {
        AuthMap::open(&self.config.bpf_pin_dir)
            .and_then(|m| m.entries())
            .map_err(|e| e.to_string())
    }
}

impl Backend for AgentBackend {
    fn status(&self) -> Result<AgentStatus, String> {
        let pin = &self.config.bpf_pin_dir;
        let auth = self.auth_entries()?;
        let capacity = AuthMap::open(pin).map(|m| m.capacity()).unwrap_or(0);
        let ipcache_entries = Ipcache::open(pin)
            .and_then(|m| m.entries())
            .map(|e| e.len())
            .map_err(|e| e.to_string())?;
        let policy_entries = PolicyMap::open(pin)
            .and_then(|m| m.entries())
            .map(|e| e.len())
            .map_err(|e| e.to_string())?;
        // One read of the counters (each `packets` call would read them all).
        let drops = MetricsReader::open(pin)
            .and_then(|m| m.read())
            .map(|counters| {
                counters
                    .iter()
                    .filter(|c| c.reason == reason::DROP_AUTH_REQUIRED)
                    .map(|c| c.packets)
                    .sum()
            })
            .unwrap_or(0);
        let links = auth_ebpf::Datapath::pinned_links(pin, &self.cgroup).unwrap_or(0);
        let snap = self.subscription.current();
        let mut pairs_by_node: BTreeMap<u16, usize> = BTreeMap::new();
        for (k, _) in &auth {
            *pairs_by_node.entry(k.remote_node_id).or_default() += 1;
        }
        let peers = snap
            .state
            .nodes
            .values()
            .filter(|n| n.name != self.config.node_name)
            .map(|n| {
                let id = self.nodes.id_of(&n.name).unwrap_or(u16::MAX);
                PeerStatus {
                    node: n.name.clone(),
                    id,
                    address: n.handshake_addr.to_string(),
                    pairs: pairs_by_node.get(&id).copied().unwrap_or(0),
                }
            })
            .collect();
        let c = &self.counts;
        Ok(AgentStatus {
            node: self.config.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            mode: match self.config.mode {
                Mode::Enforce => "enforce",
                Mode::Audit => "audit",
            }
            .to_string(),
            started: rfc3339(self.started),
            ready: self.ready.get(),
            spire: spire(
                &self.config,
                &self.source.borrow(),
                &self.cache,
                self.pod_svids.as_ref(),
            ),
            datapath: DatapathStatus {
                pin_dir: pin.display().to_string(),
                cgroup: self.cgroup.display().to_string(),
                links,
                auth_entries: auth.len(),
                auth_capacity: capacity,
                ipcache_entries,
                policy_entries,
                auth_required_drops: drops,
            },
            policy: PolicySummary {
                source: match &self.config.policy_source {
                    PolicySource::Kubernetes => "kubernetes".to_string(),
                    PolicySource::Directory { path } => path.display().to_string(),
                },
                generation: snap.generation,
                synced: snap.synced,
                policies: snap.policies.len(),
                rejected: snap
                    .policies
                    .iter()
                    .filter(|p| p.verdict == policy_bridge::status::Verdict::Rejected)
                    .count(),
                identities: snap.state.identities.len(),
                endpoints: snap.state.endpoints.len(),
                rules: snap.state.rules.len(),
                errors: snap.errors.to_vec(),
            },
            peers,
            handshakes: HandshakeCounts {
                initiated_ok: c.initiated_ok.load(Ordering::Relaxed),
                initiated_failed: c.initiated_failed.load(Ordering::Relaxed),
                served_ok: c.served_ok.load(Ordering::Relaxed),
                served_failed: c.served_failed.load(Ordering::Relaxed),
            },
            wireguard: self.wireguard.get().map(|w| (**w.status.borrow()).clone()),
        })
    }

    fn rotate_wireguard_key(&self) -> futures::future::BoxFuture<'static, Result<String, String>> {
        let handle = self.wireguard.get().cloned();
        Box::pin(async move {
            match handle {
                Some(h) => h.rotate().await,
                None => Err("WireGuard is off on this node (wireguard: false)".to_owned()),
            }
        })
    }

    fn auth(&self) -> Result<Vec<AuthEntry>, String> {
        let now = auth_ebpf::clock::agent_now();
        let mut out: Vec<AuthEntry> = self
            .auth_entries()?
            .into_iter()
            .map(|(k, expiry)| {
                let remaining = match expiry.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                };
                AuthEntry {
                    local: k.local_id,
                    remote: k.remote_id,
                    node_id: k.remote_node_id,
                    node: self.nodes.name_of(k.remote_node_id),
                    // The map keeps CLOCK_BOOTTIME nanoseconds; NotAfter is whole seconds.
                    expiry: rfc3339(round_to_second(expiry)),
                    remaining_seconds: remaining,
                }
            })
            .collect();
        out.sort_by_key(|e| (e.local, e.remote, e.node_id));
        Ok(out)
    }

    fn identities(&self) -> Vec<IdentityEntry> {
        let snap = self.subscription.current();
        let d = &snap.state;
        let td = self.cache.trust_domain();
        d.identities
            .values()
            .map(|i| {
                let local_pods: BTreeSet<String> = d
                    .endpoints
                    .values()
                    .filter(|e| e.identity == i.id && e.node == self.config.node_name)
                    .map(|e| e.pod.clone())
                    .collect();
                IdentityEntry {
                    id: i.id,
                    spiffe_id: td.spiffe_id(i.id),
                    labels: i.labels.iter().cloned().collect(),
                    local_pods: local_pods.into_iter().collect(),
                    nodes: d.nodes_of(i.id).into_iter().map(String::from).collect(),
                    svid_expiry: self.cache.get(i.id).map(|s| rfc3339(s.not_after())),
                }
            })
            .collect()
    }

    fn policies(&self, json: bool) -> String {
        let snap = self.subscription.current();
        if json {
            policy_bridge::status::render_json(&snap.policies).unwrap_or_else(|e| e.to_string())
        } else {
            let mut out = policy_bridge::status::render_text(&snap.policies);
            for e in snap.errors.iter() {
                out.push_str(&format!("input error: {e}\n"));
            }
            out
        }
    }

    fn flows(&self) -> &FlowHub {
        &self.hub
    }
}

/// `t` rounded to the nearest whole second.
fn round_to_second(t: SystemTime) -> SystemTime {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(std::time::Duration::from_millis(500));
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(d.as_secs())
}
