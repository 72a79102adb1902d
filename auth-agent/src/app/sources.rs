//! Start phase: the SVID source and the policy source (they need nothing),
//! and the node table.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use policy_bridge::Subscription;
use svid_cache::{
    CacheConfig, DelegatedIdentityConfig, DelegatedPodsConfig, SourceError, SourceHandle,
    SourceState, SourceStatus, SvidCache, TrustDomain, WorkloadApiConfig, spawn_delegated_identity,
    spawn_delegated_pods, spawn_workload_api,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pod_svids::PodSvids;
use super::tasks::{Stop, Tasks};
use super::{AgentError, Readiness, Start};
use crate::config::{Config, IdentitySource, PolicySource};
use crate::nodes::NodeTable;

/// What the sources phase started, for the phases after it.
#[derive(Debug)]
pub(super) struct Sources {
    /// The SVIDs the SVID source delivered.
    pub(super) cache: SvidCache,
    /// The SVID source's status (connected, last error).
    pub(super) status: watch::Receiver<SourceStatus>,
    /// The policy source's snapshots.
    pub(super) subscription: Subscription,
    /// Node names ↔ datapath node ids, read back from the state directory.
    pub(super) nodes: NodeTable,
    /// The per-pod source's pods (`delegated-pods` only).
    pub(super) pod_svids: Option<PodSvids>,
    /// True while this agent holds the policy status Lease (Kubernetes
    /// with `policy-status-lease` set).
    pub(super) status_leader: Option<watch::Receiver<bool>>,
}

/// Starts the SVID source (with the cache's expiry task and the watch that
/// sets readiness), then the policy source, and opens the node table.
pub(super) async fn start(s: &mut Start<'_>) -> Result<Sources, AgentError> {
    let config = s.config;
    // Identities.
    let td = TrustDomain::new(&config.trust_domain)
        .map_err(|e| AgentError::TrustDomain(config.trust_domain.clone(), e))?;
    let cache = SvidCache::with_clock(
        CacheConfig {
            trust_domain: td,
            ..CacheConfig::default()
        },
        std::sync::Arc::new(crate::clock::AgentClock),
    );
    s.tasks.adopt(
        "svid_expiry",
        Stop::Token,
        cache.spawn_expiry(s.token.clone()),
    );
    let (source, pod_svids) = start_identity_source(config, &cache, s.token);
    let status = source.watch_status();
    s.tasks.spawn("svid_source", Stop::Token, source.join());
    watch_source(
        s.tasks,
        status.clone(),
        cache.clone(),
        s.ready.clone(),
        s.token.clone(),
    );

    // Cluster state.
    let (subscription, status_leader) = start_policy_source(config, s.tasks, s.token).await?;
    let nodes = NodeTable::open(&config.state_dir.join("nodes.json"), &config.node_name)?;
    Ok(Sources {
        cache,
        status,
        subscription,
        nodes,
        status_leader,
        pod_svids,
    })
}

fn selectors(v: &[String]) -> Vec<(String, String)> {
    v.iter()
        .filter_map(|s| s.split_once(':'))
        .map(|(t, v)| (t.to_string(), v.to_string()))
        .collect()
}

/// Starts the SVID source; the per-pod source's pods when it is that one.
fn start_identity_source(
    config: &Config,
    cache: &SvidCache,
    token: &CancellationToken,
) -> (SourceHandle, Option<PodSvids>) {
    match &config.identity_source {
        IdentitySource::WorkloadApi { socket } => (
            spawn_workload_api(
                WorkloadApiConfig::new(socket.clone()),
                cache.clone(),
                token.clone(),
            ),
            None,
        ),
        IdentitySource::DelegatedIdentity {
            socket,
            selectors: s,
        } => (
            spawn_delegated_identity(
                DelegatedIdentityConfig::new(socket.clone(), selectors(s)),
                cache.clone(),
                token.clone(),
            ),
            None,
        ),
        IdentitySource::DelegatedPods { socket } => {
            let (targets, rx) = watch::channel(None);
            let (handle, subscriptions) = spawn_delegated_pods(
                DelegatedPodsConfig::new(socket.clone()),
                rx,
                cache.clone(),
                token.clone(),
            );
            let pods = PodSvids {
                targets,
                subscriptions,
                unresolved: watch::channel(Default::default()).0,
            };
            (handle, Some(pods))
        }
    }
}

/// Starts the policy source; its task goes to `tasks` (it has no drain
/// token: it is aborted at shutdown).
async fn start_policy_source(
    config: &Config,
    tasks: &mut Tasks,
    token: &CancellationToken,
) -> Result<(Subscription, Option<watch::Receiver<bool>>), AgentError> {
    match &config.policy_source {
        PolicySource::Directory { path } => {
            let mut cfg = policy_bridge::source::files::FilesConfig::new(path.clone());
            cfg.interval = config.policy_poll_interval;
            cfg.identity_file = Some(config.state_dir.join("identities.json"));
            cfg.identity_quarantine = config.identity_quarantine;
            // A manifest written in place is read once it has not changed
            // for half a second, not half written.
            cfg.settle = std::time::Duration::from_millis(500);
            let (sub, task) = policy_bridge::source::files::spawn(cfg)?;
            tasks.adopt("policy_source", Stop::Abort, task);
            Ok((sub, None))
        }
        PolicySource::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| AgentError::Kube(e.to_string()))?;
            let cfg = policy_bridge::source::kube::KubeConfig {
                identity_quarantine: config.identity_quarantine,
                ..Default::default()
            };
            let Some((ns, name)) = &config.policy_status_lease else {
                let (sub, task) = policy_bridge::source::kube::spawn(client, cfg).await;
                tasks.adopt("policy_source", Stop::Abort, task);
                return Ok((sub, None));
            };
            let mut status =
                policy_bridge::source::kube::StatusConfig::new(ns, name, &config.node_name);
            status.lease.duration = config.policy_status_lease_duration;
            let (sub, task, writer) =
                policy_bridge::source::kube::spawn_with_status(client, cfg, status).await;
            tasks.adopt("policy_source", Stop::Abort, task);
            let leading = writer.leading();
            // At shutdown the Lease is released, so another agent writes
            // status at once (a rolling update hands over without a gap).
            let token = token.clone();
            tasks.spawn("policy_status", Stop::Token, async move {
                token.cancelled().await;
                writer.shutdown(std::time::Duration::from_secs(2)).await;
            });
            Ok((sub, Some(leading)))
        }
    }
}

/// Follows the SVID source: readiness, and the outage story in the logs.
fn watch_source(
    tasks: &mut Tasks,
    mut rx: watch::Receiver<SourceStatus>,
    cache: SvidCache,
    ready: Arc<Readiness>,
    token: CancellationToken,
) {
    tasks.spawn("svid_source_watch", Stop::Token, async move {
        let mut was_connected = false;
        loop {
            let s = rx.borrow_and_update().clone();
            let answered = s.updates_applied > 0
                || s.is_connected()
                || s.last_error
                    .as_ref()
                    .is_some_and(|(_, e)| matches!(**e, SourceError::NoIdentityIssued { .. }));
            if answered && !ready.svids.swap(true, Ordering::Relaxed) {
                tracing::info!(svids = cache.len(), "SPIRE answered");
            }
            match &s.state {
                SourceState::Connected { .. } if !was_connected => {
                    was_connected = true;
                    tracing::info!(svids = cache.len(), "SPIRE source connected");
                }
                SourceState::Disconnected { error, .. } if was_connected => {
                    was_connected = false;
                    tracing::warn!(
                        error = %error,
                        svids = cache.len(),
                        next_expiry = ?cache.next_expiry().map(crate::api::flows::rfc3339),
                        "SPIRE unreachable: cached SVIDs stay in use until they expire; no rotation until it is back"
                    );
                }
                _ => {}
            }
            tokio::select! {
                _ = token.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    });
}
