//! An entry removed in spire-dev: `Removed { NoLongerServed }`. Removing the
//! node's last entry ends the stream ("no identity issued"); a new entry is
//! picked up on the source's own reconnect.

use std::sync::Arc;

use meshauth_tests::{Deployment, Node, TD, disconnected_with, identity_entry, removed, summarize};
use svid_cache::{RemovalReason, SourceError};

#[tokio::test]
async fn removed_entries_leave_the_cache() {
    let dep = Deployment::start(
        TD,
        &["node-a"],
        vec![identity_entry("node-a", 256), identity_entry("node-a", 257)],
    )
    .await;
    let mut a = Node::workload(&dep, "node-a");
    let first = a.events.next("first fetch").await;
    assert_eq!(summarize(&first), ["bundle(1)", "added 256", "added 257"]);
    let kept = a.svid(256);

    dep.remove("e-257");
    let changes = a.events.next("removal of 257").await;
    assert_eq!(
        summarize(&changes),
        [removed(257, RemovalReason::NoLongerServed)]
    );
    assert!(a.cache.get(257).is_none(), "get(257) after removal");
    assert!(Arc::ptr_eq(&a.svid(256), &kept), "256 untouched");
    let status = a.wait_connected("still connected").await;
    assert_eq!(
        status.reconnects, 0,
        "the stream carried the removal: {status:?}"
    );

    // The last entry: the agent answers "no identity issued", which is a full
    // state too (empty), then keeps refusing.
    dep.remove("e-256");
    let changes = a.events.next("removal of 256").await;
    assert_eq!(
        summarize(&changes),
        [removed(256, RemovalReason::NoLongerServed)]
    );
    assert!(a.cache.get(256).is_none());
    assert!(a.cache.is_empty(), "{:?}", a.cache.identities());
    assert!(a.cache.bundle().is_some(), "the bundle stays");
    a.wait_status("disconnected: no identity issued", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::NoIdentityIssued { .. }))
    })
    .await;

    // A new entry for the node: the source finds it by reconnecting on its own.
    dep.add(identity_entry("node-a", 258));
    let changes = a.events.next("entry 258 after reconnecting").await;
    assert_eq!(summarize(&changes), ["added 258"]);
    let status = a
        .wait_status("connected again", |s| s.is_connected() && s.reconnects >= 1)
        .await;
    assert_eq!(status.updates_rejected, 0, "{status:?}");
    assert_eq!(a.cache.identities(), [258]);
    dep.dev.shutdown().await;
}
