//! Start phase: the first full policy read, into the datapath maps. Until
//! it is done nothing below it starts — the auth manager on an empty
//! desired state would collect every entry read back.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use policy_bridge::DesiredState;
use tokio::sync::watch;

use super::sources::Sources;
use super::tasks;
use super::{AgentError, Start};
use crate::datapath_sync::DatapathSync;

/// Waits for the policy source's first full read, syncs the node table and
/// the datapath maps to it, marks policy ready, and keeps them synced
/// (policy sync task). Returns the desired state as it changes.
pub(super) async fn first_sync(
    s: &mut Start<'_>,
    sources: &mut Sources,
    cgroup: &Path,
) -> Result<watch::Receiver<Arc<DesiredState>>, AgentError> {
    let config = s.config;
    let (desired_tx, desired_rx) = watch::channel(Arc::new(DesiredState::default()));
    tracing::info!("waiting for the first policy sync");
    let first = tokio::select! {
        _ = s.token.cancelled() => return Err(AgentError::Interrupted),
        snapshot = sources.subscription.synced() => snapshot.ok_or(AgentError::Interrupted)?,
    };
    let mut sync = DatapathSync::open(&config.bpf_pin_dir, sources.nodes.clone())?;
    if config.source_check {
        sync = sync.with_source_check(cgroup);
    }
    sources.nodes.sync(&first.state.nodes)?;
    let report = sync.apply(&first.state)?;
    tracing::info!(
        ?report,
        generation = first.generation,
        "policy synced into the datapath"
    );
    desired_tx.send_replace(first.state.clone());
    s.ready.policy.store(true, Ordering::Relaxed);
    tasks::spawn_policy_sync(
        s.tasks,
        sources.subscription.clone(),
        sources.nodes.clone(),
        sync,
        desired_tx,
        s.token.clone(),
        s.live.clone(),
    );
    Ok(desired_rx)
}
