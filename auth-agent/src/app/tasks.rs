//! The agent's long-running tasks: each runs until the token is cancelled
//! and marks the agent unhealthy if its input fails. [`Tasks`] holds every
//! handle so shutdown joins them all within a grace period.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use auth_ebpf::events::EventReader;
use auth_ebpf::signals::SignalReader;
use futures::StreamExt as _;
use policy_bridge::{DesiredState, Subscription};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Counts, Liveness};
use crate::api::FlowHub;
use crate::auth::store::Pair;
use crate::datapath_sync::DatapathSync;
use crate::handshake::Outcome;
use crate::nodes::NodeTable;

/// How a task is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// It holds the drain token and returns once it is cancelled.
    Token,
    /// It has no token (a policy source, a forwarder): aborted at shutdown.
    Abort,
}

/// The agent's task handles, joined at shutdown.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    handles: Vec<(&'static str, Stop, JoinHandle<()>)>,
}

/// How shutdown went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Joined {
    /// Tasks that returned (or, for [`Stop::Abort`], were stopped) in time.
    pub finished: Vec<&'static str>,
    /// Tasks that panicked.
    pub panicked: Vec<&'static str>,
    /// Tasks still running after the grace period, then aborted.
    pub aborted: Vec<&'static str>,
}

impl Tasks {
    /// Spawns `fut` as `name`.
    pub(crate) fn spawn(
        &mut self,
        name: &'static str,
        stop: Stop,
        fut: impl Future<Output = ()> + Send + 'static,
    ) {
        self.adopt(name, stop, tokio::spawn(fut));
    }

    /// Takes an already spawned task.
    pub(crate) fn adopt(&mut self, name: &'static str, stop: Stop, handle: JoinHandle<()>) {
        self.handles.push((name, stop, handle));
    }

    /// After the drain token was cancelled: aborts the [`Stop::Abort`]
    /// tasks, waits up to `grace` for the others, aborts what is left, and
    /// waits for every task to be gone.
    pub(crate) async fn join(self, grace: Duration) -> Joined {
        let deadline = tokio::time::Instant::now() + grace;
        let mut joined = Joined::default();
        for (_, stop, h) in &self.handles {
            if *stop == Stop::Abort {
                h.abort();
            }
        }
        for (name, _, mut h) in self.handles {
            let r = match tokio::time::timeout_at(deadline, &mut h).await {
                Ok(r) => r,
                Err(_) => {
                    h.abort();
                    joined.aborted.push(name);
                    let _ = h.await;
                    continue;
                }
            };
            match r {
                Err(e) if e.is_panic() => {
                    tracing::error!(task = name, "task panicked");
                    joined.panicked.push(name);
                }
                _ => joined.finished.push(name),
            }
        }
        if !joined.aborted.is_empty() {
            tracing::warn!(tasks = ?joined.aborted, ?grace, "tasks still running after the shutdown grace period were aborted");
        }
        joined
    }
}

/// Datapath flow events → Hubble-shaped records in the hub (`observe`).
pub(super) fn spawn_flow_events(
    tasks: &mut Tasks,
    mut events: EventReader,
    sub: Subscription,
    hub: FlowHub,
    node: String,
    token: CancellationToken,
    live: Arc<Liveness>,
) {
    tasks.spawn("flow_events", Stop::Token, async move {
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
    tasks: &mut Tasks,
    mut subscription: Subscription,
    nodes: NodeTable,
    mut sync: DatapathSync,
    desired_tx: watch::Sender<Arc<DesiredState>>,
    token: CancellationToken,
    live: Arc<Liveness>,
) {
    tasks.spawn("policy_sync", Stop::Token, async move {
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
    tasks: &mut Tasks,
    mut outcomes: broadcast::Receiver<Arc<Outcome>>,
    counts: Arc<Counts>,
    token: CancellationToken,
) {
    tasks.spawn("served_counts", Stop::Token, async move {
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
    tasks: &mut Tasks,
    reader: SignalReader,
    tx: mpsc::Sender<Pair>,
    token: CancellationToken,
    live: Arc<Liveness>,
) {
    let stream = reader.into_stream();
    tasks.spawn("signals", Stop::Token, async move {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Sets its flag when dropped (a task's future is dropped when it ends
    /// or is aborted).
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_task_is_joined_and_one_ignoring_the_token_is_aborted_after_the_grace() {
        let token = CancellationToken::new();
        let mut tasks = Tasks::default();
        let wrote = Arc::new(AtomicBool::new(false));
        {
            let (t, wrote) = (token.clone(), wrote.clone());
            tasks.spawn("cooperative", Stop::Token, async move {
                t.cancelled().await;
                // Finishing its work takes a while, within the grace.
                tokio::time::sleep(Duration::from_secs(1)).await;
                wrote.store(true, Ordering::SeqCst);
            });
        }
        let stuck_dropped = Arc::new(AtomicBool::new(false));
        let guard = Dropped(stuck_dropped.clone());
        tasks.spawn("stuck", Stop::Token, async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        let tokenless_dropped = Arc::new(AtomicBool::new(false));
        let guard = Dropped(tokenless_dropped.clone());
        tasks.spawn("tokenless", Stop::Abort, async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        {
            let t = token.clone();
            tasks.spawn("panics", Stop::Token, async move {
                t.cancelled().await;
                panic!("a task failing at shutdown");
            });
        }

        token.cancel();
        let started = tokio::time::Instant::now();
        let joined = tasks.join(Duration::from_secs(5)).await;
        assert_eq!(joined.finished, ["cooperative", "tokenless"]);
        assert_eq!(joined.panicked, ["panics"]);
        assert_eq!(joined.aborted, ["stuck"]);
        assert!(
            wrote.load(Ordering::SeqCst),
            "the cooperative task finished its work"
        );
        assert!(stuck_dropped.load(Ordering::SeqCst) && tokenless_dropped.load(Ordering::SeqCst));
        // The paused clock: shutdown took the grace period, not more.
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
