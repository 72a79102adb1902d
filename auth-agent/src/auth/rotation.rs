//! SVID changes as the auth manager needs them: svid-cache's change events
//! mapped to "this local identity has a new SVID" and "SPIRE no longer
//! serves this identity here".

use std::collections::BTreeSet;
use std::sync::Arc;

use svid_cache::{CacheChanges, CacheEvent, RemovalReason};
use tokio::sync::{broadcast, mpsc};

/// A change of a local identity's SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidChange {
    /// The identity's first SVID (at start, or after none): its pairs
    /// without a live entry are authenticated at once (one that failed for
    /// want of an SVID is retried); live entries — read back after a
    /// restart — are kept, their expiry bounded by the SVID they were
    /// proved with.
    Added(u32),
    /// A rotated SVID: its pairs are authenticated again at once, so their
    /// expiry follows the new certificate.
    Rotated(u32),
    /// SPIRE no longer serves the identity to this node (its entry was
    /// deleted, or moved to other nodes): its pairs are collected at once
    /// rather than at their expiry.
    Revoked(u32),
}

/// Forwards svid-cache's changes as [`SvidChange`]s until either side
/// closes. If events were missed, every identity then cached is sent as rotated
/// (re-authenticating a pair needlessly is harmless, missing a rotation is
/// not) and every identity seen before but no longer cached as revoked.
pub fn forward_rotations(
    cache: svid_cache::SvidCache,
    tx: mpsc::Sender<SvidChange>,
) -> tokio::task::JoinHandle<()> {
    let mut rx: broadcast::Receiver<Arc<CacheChanges>> = cache.subscribe();
    tokio::spawn(async move {
        let mut known: BTreeSet<u32> = cache.identities().into_iter().collect();
        loop {
            let changes: Vec<SvidChange> = match rx.recv().await {
                Ok(changes) => changes
                    .events
                    .iter()
                    .filter_map(|e| match e {
                        CacheEvent::Added { identity, .. } => {
                            known.insert(*identity);
                            Some(SvidChange::Added(*identity))
                        }
                        CacheEvent::Rotated { identity, .. } => {
                            known.insert(*identity);
                            Some(SvidChange::Rotated(*identity))
                        }
                        CacheEvent::Removed { identity, reason } => {
                            known.remove(identity);
                            // An expired SVID's pairs expired with it: the
                            // sweep collects them.
                            (*reason == RemovalReason::NoLongerServed)
                                .then_some(SvidChange::Revoked(*identity))
                        }
                        CacheEvent::BundleChanged { .. } => None,
                    })
                    .collect(),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "missed SVID events; treating every identity as rotated"
                    );
                    let now: BTreeSet<u32> = cache.identities().into_iter().collect();
                    let out = known
                        .difference(&now)
                        .map(|i| SvidChange::Revoked(*i))
                        .chain(now.iter().map(|i| SvidChange::Rotated(*i)))
                        .collect();
                    known = now;
                    out
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            for c in changes {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
        }
    })
}
