//! First fetch: a cache connected to one node agent gets exactly that node's
//! identities, as `Added` events with the bundle, and nothing of other nodes.

use meshauth_tests::{Deployment, Node, TD, identity_entry, leaf, summarize};

#[tokio::test]
async fn a_cache_gets_exactly_the_identities_of_its_node() {
    let dep = Deployment::start(
        TD,
        &["node-a", "node-b"],
        vec![
            identity_entry("node-a", 256),
            identity_entry("node-b", 257),
            identity_entry("node-a", 300),
            identity_entry("node-b", 301),
        ],
    )
    .await;
    let mut a = Node::workload(&dep, "node-a");
    let mut b = Node::workload(&dep, "node-b");

    // The first message is the agent's full state: the bundle and both SVIDs, at once.
    let first = a.events.next("node-a's first fetch").await;
    assert_eq!(first.generation, 1, "first change of a new cache");
    assert_eq!(
        summarize(&first),
        ["bundle(1)", "added 256", "added 300"],
        "node-a's first fetch"
    );
    let first = b.events.next("node-b's first fetch").await;
    assert_eq!(
        summarize(&first),
        ["bundle(1)", "added 257", "added 301"],
        "node-b's first fetch"
    );
    assert_eq!(a.cache.identities(), [256, 300]);
    assert_eq!(b.cache.identities(), [257, 301]);

    // The bundle is the server's; each SVID is the very certificate the agent serves.
    for node in [&a, &b] {
        let bundle = node.cache.bundle().expect("bundle after the first fetch");
        let authorities: Vec<Vec<u8>> = bundle.authorities().iter().map(|c| c.to_vec()).collect();
        assert_eq!(authorities, dep.bundle(), "cache bundle = server bundle");
    }
    for (node, cache, identity) in [
        ("node-a", &a, 256),
        ("node-a", &a, 300),
        ("node-b", &b, 257),
        ("node-b", &b, 301),
    ] {
        let got = leaf(&cache.svid(identity));
        let held = dep.held(node, identity);
        assert_eq!(got.serial, held.serial, "identity {identity} on {node}");
        assert_eq!(got.spiffe_id, held.spiffe_id);
    }
    // The worker counts a message once the cache has applied (and published) it.
    let status = a
        .wait_status("first message counted", |s| s.updates_applied >= 1)
        .await;
    assert_eq!(
        (
            status.updates_applied,
            status.updates_rejected,
            status.reconnects
        ),
        (1, 0, 0),
        "{status:?}"
    );

    // Later entries reach only their node: add one to node-b, then one to
    // node-a; node-a's next change is its own entry only.
    dep.add(identity_entry("node-b", 302));
    dep.add(identity_entry("node-a", 303));
    let next = a.events.next("node-a's entry 303").await;
    assert_eq!(
        summarize(&next),
        ["added 303"],
        "node-a sees only its own entry"
    );
    let next = b.events.next("node-b's entry 302").await;
    assert_eq!(
        summarize(&next),
        ["added 302"],
        "node-b sees only its own entry"
    );
    assert_eq!(a.cache.identities(), [256, 300, 303]);
    assert_eq!(b.cache.identities(), [257, 301, 302]);
    a.events.assert_none_pending("node-a after 303");
    b.events.assert_none_pending("node-b after 302");
    dep.dev.shutdown().await;
}
