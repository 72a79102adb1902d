//! SVID rotations as the auth manager needs them: svid-cache's change
//! events mapped to "this local identity has a new SVID".

use std::sync::Arc;

use svid_cache::{CacheChanges, CacheEvent};
use tokio::sync::{broadcast, mpsc};

/// Forwards svid-cache's changes as "this identity has a new SVID" until
/// either side closes. If events were missed, every identity then cached is
/// sent (re-authenticating a pair needlessly is harmless, missing a
/// rotation is not).
pub fn forward_rotations(
    cache: svid_cache::SvidCache,
    tx: mpsc::Sender<u32>,
) -> tokio::task::JoinHandle<()> {
    let mut rx: broadcast::Receiver<Arc<CacheChanges>> = cache.subscribe();
    tokio::spawn(async move {
        loop {
            let ids: Vec<u32> = match rx.recv().await {
                Ok(changes) => changes
                    .events
                    .iter()
                    .filter_map(|e| match e {
                        CacheEvent::Rotated { identity, .. }
                        | CacheEvent::Added { identity, .. } => Some(*identity),
                        _ => None,
                    })
                    .collect(),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "missed SVID events; treating every identity as rotated"
                    );
                    cache.identities()
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            for id in ids {
                if tx.send(id).await.is_err() {
                    return;
                }
            }
        }
    })
}
