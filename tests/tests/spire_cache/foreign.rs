//! SVIDs the cache must not keep: another trust domain (a spire-dev deployment
//! of `other.example`), and paths of meshauth.local that are not
//! `/identity/<N>` (mixed with a valid one on one node). Nothing foreign is
//! cached, nothing is rejected as a whole, the source stays up.

use meshauth_tests::{
    Api, Deployment, Node, TD, WAIT, identity_entry, selector_entry, spiffe_id, summarize,
};
use spire_dev::EntrySpec;

const OTHER: &str = "other.example";

#[tokio::test]
async fn foreign_trust_domain_and_non_identity_paths_are_ignored() {
    // meshauth.local, one node mixing a valid identity with paths that are not.
    let mixed = Deployment::start(
        TD,
        &["node-a"],
        vec![
            EntrySpec::new("node-a", spiffe_id(TD, "/ns/x/sa/y")),
            identity_entry("node-a", 256),
            EntrySpec::new("node-a", spiffe_id(TD, "/identity/007")),
            EntrySpec::new("node-a", spiffe_id(TD, "/identity/4294967296")),
        ],
    )
    .await;
    let mut a = Node::workload(&mixed, "node-a");
    let first = a.events.next("mixed node's first fetch").await;
    assert_eq!(summarize(&first), ["bundle(1)", "added 256"]);
    assert_eq!(a.cache.identities(), [256]);
    assert_eq!(a.cache.len(), 1, "nothing else stored");
    let status = a
        .wait_status("mixed node's message counted", |s| s.updates_applied >= 1)
        .await;
    assert_eq!(
        (status.updates_applied, status.updates_rejected),
        (1, 0),
        "{status:?}"
    );

    // other.example: identity paths, but of another trust domain.
    let other = Deployment::start(
        OTHER,
        &["node-a"],
        vec![
            EntrySpec::new("node-a", spiffe_id(OTHER, "/identity/256"))
                .with_selector(spire_dev::Selector::new("k8s", "ns:a")),
            EntrySpec::new("node-a", spiffe_id(OTHER, "/identity/257")),
        ],
    )
    .await;
    // Control: a cache of other.example takes them, so the deployment works.
    let mut control = Node::start_in(OTHER, Api::Workload(other.workload_socket("node-a")));
    let first = control.events.next("other.example cache").await;
    assert_eq!(summarize(&first), ["bundle(1)", "added 256", "added 257"]);

    // meshauth.local caches on other.example's agent, through both APIs.
    let wl = Node::workload(&other, "node-a");
    let dl = Node::delegated(&other, "node-a", &["k8s:ns:a"]);
    for (api, node) in [("workload", &wl), ("delegated", &dl)] {
        let status = node
            .wait_status(&format!("{api}: a foreign state applied"), |s| {
                s.updates_applied >= 1
            })
            .await;
        assert!(status.is_connected(), "{api}: {status:?}");
        assert_eq!(status.updates_rejected, 0, "{api}: {status:?}");
        assert!(
            node.cache.is_empty(),
            "{api}: {:?}",
            node.cache.identities()
        );
        assert!(
            node.cache.bundle().is_none(),
            "{api}: no meshauth.local bundle"
        );
        assert_eq!(
            *node.cache.watch_generation().borrow(),
            0,
            "{api}: no change"
        );
    }

    // More foreign SVIDs later: applied, ignored, the sources carry on.
    other.add(
        EntrySpec::new("node-a", spiffe_id(OTHER, "/identity/258"))
            .with_selector(spire_dev::Selector::new("k8s", "ns:a")),
    );
    for (api, node) in [("workload", &wl), ("delegated", &dl)] {
        let status = node
            .wait_status(&format!("{api}: second foreign state"), |s| {
                s.updates_applied >= 2
            })
            .await;
        assert!(status.is_connected(), "{api}: {status:?}");
        assert_eq!(status.reconnects, 0, "{api}: {status:?}");
        assert!(node.cache.is_empty(), "{api}");
    }
    control
        .events
        .until("other.example cache gets 258", WAIT, |seen| {
            seen.iter().any(|c| summarize(c) == ["added 258"])
        })
        .await;

    // The meshauth.local node is unaffected by all of it.
    mixed.add(selector_entry("node-a", 259, &[]));
    let changes = a.events.next("a later valid identity").await;
    assert_eq!(summarize(&changes), ["added 259"]);
    assert_eq!(a.cache.identities(), [256, 259]);
    mixed.dev.shutdown().await;
    other.dev.shutdown().await;
}
