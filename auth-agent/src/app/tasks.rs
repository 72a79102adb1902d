//! The agent's long-running tasks: each runs until the token is cancelled
//! and marks the agent unhealthy if its input fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use auth_ebpf::events::EventReader;
use auth_ebpf::signals::SignalReader;
use futures::StreamExt as _;
use policy_bridge::{DesiredState, Subscription};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Counts, Liveness};
use crate::api::FlowHub;
use crate::auth::store::Pair;
use crate::datapath_sync::DatapathSync;
use crate::handshake::Outcome;
use crate::nodes::NodeTable;

/// Datapath flow events → Hubble-shaped records in the hub (`observe`).
pub(super) fn spawn_flow_events(
    mut events: EventReader,
    sub: Subscription,
    hub: FlowHub,
    node: String,
    token: CancellationToken,
    live: Arc<Liveness>,
) {
    tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                _ = token.cancelled() => return,
                b = events.next_batch() => b,
            };
            match batch {
                Ok(batch) => {
                    let snap = sub.current();
                    for e in &batch {
                        hub.push(crate::api::flows::to_record(e, &snap.state, &node));
                    }
                }
                Err(e) => {
                    live.fail(format!("reading flow events: {e}"));
                    return;
                }
            }
        }
    });
}

/// Each policy snapshot after the first: node table, datapath maps, then
/// the desired state for the manager and the handshake server.
pub(super) fn spawn_policy_sync(
    mut subscription: Subscription,
    nodes: NodeTable,
    mut sync: DatapathSync,
    desired_tx: watch::Sender<Arc<DesiredState>>,
    token: CancellationToken,
    live: Arc<Liveness>,
) {
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = token.cancelled() => return,
                n = subscription.next() => n,
            };
            let Some((snap, _diff)) = next else {
                live.fail("the policy source stopped");
                return;
            };
            if let Err(e) = nodes.sync(&snap.state.nodes) {
                tracing::error!(error = %e, "node table");
            }
            match sync.apply(&snap.state) {
                Ok(r) => {
                    tracing::debug!(report = ?r, generation = snap.generation, "datapath synced")
                }
                // The maps keep what they held; the next snapshot retries.
                Err(e) => {
                    tracing::error!(error = %e, generation = snap.generation, "datapath sync failed")
                }
            }
            desired_tx.send_replace(snap.state.clone());
        }
    });
}

/// Counts the handshakes the responder finished, for `meshauth status`.
pub(super) fn spawn_served_counts(
    mut outcomes: broadcast::Receiver<Arc<Outcome>>,
    counts: Arc<Counts>,
    token: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let o = tokio::select! {
                _ = token.cancelled() => return,
                o = outcomes.recv() => o,
            };
            match o {
                Ok(o) => {
                    match &o.result {
                        Ok(_) => counts.served_ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => counts.served_failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
}

/// Auth-required signals from the datapath → pairs for the manager.
pub(super) fn spawn_signals(
    reader: SignalReader,
    tx: mpsc::Sender<Pair>,
    token: CancellationToken,
    live: Arc<Liveness>,
) {
    let stream = reader.into_stream();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let batch = tokio::select! {
                _ = token.cancelled() => return,
                b = stream.next() => b,
            };
            match batch {
                Some(Ok(batch)) => {
                    for s in batch {
                        let pair = Pair {
                            local: s.key.local_id,
                            remote: s.key.remote_id,
                            node: s.key.remote_node_id,
                        };
                        if tx.send(pair).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    live.fail(format!("reading auth signals: {e}"));
                    return;
                }
                None => return,
            }
        }
    });
}
