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
        // What the diff does not carry: a Node or Pod recreated under the
        // same name with a new uid, a Node without addresses (no table
        // entry, but its uid names its SPIRE agent), a pod's run-as uids.
        let new = engine.state();
        let untracked = cur.state.node_uids != new.node_uids
            || cur.state.pod_uids != new.pod_uids
            || cur.state.pod_run_as != new.pod_run_as;
        if diff.is_empty()
            && !untracked
            && *cur.policies == policies
            && *cur.errors == errors
            && cur.synced == synced
        {
            return;
        }
        let state = if diff.is_empty() && !untracked {
            cur.state.clone()
        } else {
            Arc::new(new.clone())
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Node;

    use super::*;
    use crate::engine::{Change, EngineConfig};
    use crate::model::Object;

    fn node(name: &str, uid: &str) -> Object {
        let n: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": uid}
        }))
        .expect("node");
        Object::Node(Box::new(n))
    }

    /// A change the diff does not carry is still published: a Node without
    /// addresses (no node table entry) brings only its uid, and a Node
    /// recreated under its name only a new uid. Before, the snapshot kept
    /// the old state: a reconciler read no uid for node-a (no entries for
    /// its SPIRE agent) until some other change came.
    #[test]
    fn a_change_only_of_uids_is_published() {
        let (publisher, sub) = Publisher::new();
        let mut engine = Engine::new(
            EngineConfig::default(),
            crate::identity::IdentityTable::new(),
        );
        let diff = engine.commit();
        publisher.publish(&engine, diff, Vec::new(), true);
        let first = sub.current().generation;

        engine
            .apply(Change::Upsert(node("node-a", "uid-1")))
            .expect("apply");
        let diff = engine.commit();
        assert!(
            diff.is_empty(),
            "a Node without addresses changes no table entry"
        );
        publisher.publish(&engine, diff, Vec::new(), true);
        let snap = sub.current();
        assert!(snap.generation > first);
        assert_eq!(
            snap.state.node_uids.get("node-a").map(String::as_str),
            Some("uid-1")
        );

        engine
            .apply(Change::Upsert(node("node-a", "uid-2")))
            .expect("apply");
        let diff = engine.commit();
        publisher.publish(&engine, diff, Vec::new(), true);
        assert_eq!(
            sub.current()
                .state
                .node_uids
                .get("node-a")
                .map(String::as_str),
            Some("uid-2")
        );
    }
}
