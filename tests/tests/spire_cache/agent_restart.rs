//! The node agent goes away (its sockets removed) and comes back: the source
//! says why it is disconnected, the cache keeps its valid SVIDs, and the source
//! reconnects by itself.

use std::sync::Arc;

use meshauth_tests::{
    Deployment, Node, TD, connected_since, disconnected_with, identity_entry, summarize,
};
use svid_cache::SourceError;

#[tokio::test]
async fn agent_down_keeps_svids_and_agent_up_reconnects() {
    let dep = Deployment::start(TD, &["node-a"], vec![identity_entry("node-a", 256)]).await;
    let mut a = Node::workload(&dep, "node-a");
    let first = a.events.next("first fetch").await;
    assert_eq!(summarize(&first), ["bundle(1)", "added 256"]);
    let since = connected_since(&a.wait_connected("first fetch").await);
    let svid = a.svid(256);

    assert!(
        dep.dev.agent_down("node-a").await.expect("agent_down"),
        "agent was up"
    );
    let socket = dep.workload_socket("node-a");
    assert!(!socket.exists(), "agent_down removes {}", socket.display());
    let status = a
        .wait_status("disconnected: socket missing", |s| {
            disconnected_with(s, |e| matches!(e, SourceError::SocketMissing { .. }))
        })
        .await;
    assert!(status.last_error.is_some(), "{status:?}");
    assert!(
        Arc::ptr_eq(&a.svid(256), &svid),
        "valid SVID kept while down"
    );
    assert!(a.cache.bundle().is_some(), "bundle kept while down");
    a.events.assert_none_pending("while the agent is down");

    // Registered while the agent is down: it gets it when it comes back.
    dep.add(identity_entry("node-a", 257));
    assert!(
        dep.dev.agent_up("node-a").await.expect("agent_up"),
        "agent was down"
    );
    let changes = a.events.next("state after reconnecting").await;
    assert_eq!(
        summarize(&changes),
        ["added 257"],
        "the reconnect delivers the new entry and leaves 256 as it was"
    );
    assert!(Arc::ptr_eq(&a.svid(256), &svid), "same SVID for 256");
    let status = a
        .wait_status("reconnected", |s| s.is_connected() && s.reconnects >= 1)
        .await;
    assert!(
        connected_since(&status) > since,
        "a new stream: {status:?}, first connected {since:?}"
    );

    // Later changes flow on the new stream.
    dep.add(identity_entry("node-a", 258));
    let changes = a.events.next("entry added after the reconnect").await;
    assert_eq!(summarize(&changes), ["added 258"]);
    assert_eq!(a.cache.identities(), [256, 257, 258]);
    dep.dev.shutdown().await;
}
