//! Where cluster state comes from — a watched directory ([`files`]) or
//! Kubernetes ([`kube`]) — and how the result is published: a
//! `tokio::sync::watch` of [`Snapshot`]s (state, the diff from the previous
//! snapshot, policy status, load errors). [`Subscription`] turns it into an
//! exact stream of diffs even for a slow reader.

pub mod files;
pub mod kube;

use std::sync::Arc;

use tokio::sync::watch;

use crate::engine::Engine;
use crate::state::{DesiredState, StateDiff};
use crate::status::PolicyStatus;

/// One published state.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one per publication.
    pub generation: u64,
    /// The desired state.
    pub state: Arc<DesiredState>,
    /// From the previous generation to this one.
    pub diff: Arc<StateDiff>,
    /// Every policy's status.
    pub policies: Arc<Vec<PolicyStatus>>,
    /// Input that could not be read (files, objects), newest first kept.
    pub errors: Arc<Vec<String>>,
    /// True once the source has read everything once.
    pub synced: bool,
}

/// Owns the watch sender.
#[derive(Debug)]
pub(crate) struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Publisher {
    pub(crate) fn new() -> (Self, Subscription) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        (Self { tx }, Subscription::new(rx))
    }

    /// Publishes if anything a reader sees changed.
    pub(crate) fn publish(
        &self,
        engine: &Engine,
        diff: StateDiff,
        errors: Vec<String>,
        synced: bool,
    ) {
        let policies = engine.status();
        let cur = self.tx.borrow().clone();
        if diff.is_empty()
            && *cur.policies == policies
            && *cur.errors == errors
            && cur.synced == synced
        {
            return;
        }
        let state = if diff.is_empty() {
            cur.state.clone()
        } else {
            Arc::new(engine.state().clone())
        };
        self.tx.send_replace(Arc::new(Snapshot {
            generation: cur.generation + 1,
            state,
            diff: Arc::new(diff),
            policies: Arc::new(policies),
            errors: Arc::new(errors),
            synced,
        }));
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A reader of published snapshots.
#[derive(Debug, Clone)]
pub struct Subscription {
    rx: watch::Receiver<Arc<Snapshot>>,
    seen: Arc<Snapshot>,
}

impl Subscription {
    fn new(rx: watch::Receiver<Arc<Snapshot>>) -> Self {
        let seen = rx.borrow().clone();
        Self { rx, seen }
    }

    /// The newest snapshot (does not mark it seen).
    pub fn current(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// Waits for the next snapshot and returns it with the exact diff from
    /// the one this subscription saw last (computed if generations were
    /// skipped). `None` when the source has stopped.
    pub async fn next(&mut self) -> Option<(Arc<Snapshot>, StateDiff)> {
        self.rx.changed().await.ok()?;
        let new = self.rx.borrow_and_update().clone();
        let diff = if new.generation == self.seen.generation + 1 {
            (*new.diff).clone()
        } else {
            StateDiff::between(&self.seen.state, &new.state)
        };
        self.seen = new.clone();
        Some((new, diff))
    }

    /// Waits until the source has read everything once; returns that snapshot.
    pub async fn synced(&mut self) -> Option<Arc<Snapshot>> {
        let s = self.rx.wait_for(|s| s.synced).await.ok()?.clone();
        Some(s)
    }
}
