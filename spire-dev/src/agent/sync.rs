//! The agent's sync with the server: issue SVIDs for new entries, drop removed
//! ones, renew when half of the validity is left or when the CA rotated, follow the bundle. A task
//! runs it whenever the server changes or the next renewal is due.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::agent::{AgentSnapshot, HeldSvid, Shared, is_unavailable, rfc3339};

/// Wait after a failed issuance before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// What a sync leaves to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Wake at this time (the earliest renewal).
    At(SystemTime),
    /// Nothing to renew; wait for a server change.
    Idle,
    /// The server is in outage; wait for it to change.
    ServerDown,
    /// Something failed; try again after [`RETRY`].
    Retry,
}

/// One sync with the server; publishes a new snapshot if anything changed.
pub(super) fn sync_once(shared: &Shared) -> Next {
    let _guard = shared.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
    let node = shared.node.as_str();
    let view = match shared.server.node_view(node) {
        Ok(v) => v,
        Err(e) if is_unavailable(&e) => {
            tracing::debug!(node, "server unavailable; keeping held SVIDs");
            return Next::ServerDown;
        }
        Err(e) => {
            tracing::warn!(node, error = %e, "sync failed");
            return Next::Retry;
        }
    };
    let current = shared.state.borrow().clone();
    let now = SystemTime::now();
    let mut changed = current.bundle != view.bundle;
    let mut outcome = None;
    let mut svids = Vec::with_capacity(view.entries.len());
    for entry in view.entries {
        let held = current.svids.iter().find(|h| h.entry == entry);
        let due = match held {
            None => Some("issued"),
            Some(h) if h.svid.ca_generation != view.ca_generation => Some("reissued (CA rotated)"),
            Some(h) if h.svid.is_expired_at(now) => Some("renewed (expired)"),
            Some(h) if now >= h.svid.renew_at() => Some("renewed"),
            Some(_) => None,
        };
        let Some(what) = due else {
            svids.extend(held.cloned());
            continue;
        };
        match shared.server.mint(&entry) {
            Ok(svid) => {
                tracing::info!(
                    node,
                    entry.id = %entry.id,
                    spiffe_id = %svid.spiffe_id,
                    serial = %svid.serial,
                    not_after = %rfc3339(svid.not_after),
                    "SVID {what}"
                );
                svids.push(HeldSvid {
                    entry,
                    svid: Arc::new(svid),
                });
                changed = true;
            }
            Err(e) => {
                if is_unavailable(&e) {
                    outcome = Some(Next::ServerDown);
                } else {
                    tracing::warn!(node, entry.id = %entry.id, error = %e, "SVID issuance failed");
                    outcome.get_or_insert(Next::Retry);
                }
                svids.extend(held.cloned());
            }
        }
    }
    for gone in current
        .svids
        .iter()
        .filter(|h| !svids.iter().any(|n| n.entry.id == h.entry.id))
    {
        tracing::info!(node, entry.id = %gone.entry.id, spiffe_id = %gone.svid.spiffe_id, serial = %gone.svid.serial, "SVID dropped (entry removed)");
        changed = true;
    }
    let next = outcome.unwrap_or_else(|| {
        svids
            .iter()
            .map(|h| h.svid.renew_at())
            .min()
            .map_or(Next::Idle, Next::At)
    });
    if changed {
        shared.state.send_replace(Arc::new(AgentSnapshot {
            trust_domain: current.trust_domain.clone(),
            svids,
            bundle: view.bundle,
            version: current.version + 1,
        }));
    }
    next
}

/// The agent's sync task: syncs whenever the server changes, the next renewal
/// is due, or the agent comes back up; pauses while the agent is down.
pub(super) async fn run(shared: Arc<Shared>) {
    let mut changes = shared.server.subscribe();
    let mut up = shared.up.subscribe();
    loop {
        if !*up.borrow_and_update() {
            if up.changed().await.is_err() {
                return;
            }
            continue;
        }
        changes.borrow_and_update();
        let next = sync_once(&shared);
        let sleep = match next {
            Next::At(t) => Some(t.duration_since(SystemTime::now()).unwrap_or_default()),
            Next::Retry => Some(RETRY),
            Next::Idle | Next::ServerDown => None,
        };
        let timer = async {
            match sleep {
                // Precise wake-up: renewal on time even for TTLs of seconds.
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = up.changed() => if r.is_err() { return },
            () = timer => {}
        }
    }
}
