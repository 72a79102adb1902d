//! Rotation: the agent renews a short-lived SVID when half of its validity
//! is left (SPIRE's rule); the cache sees
//! `Rotated` for that identity only, before the old SVID expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshauth_tests::{Deployment, Node, TD, WAIT, identity_entry, leaf, summarize, svid_in};

/// spire-dev backdates NotBefore by this much (`spire_dev::ca::SVID_BACKDATE`).
const BACKDATE: Duration = spire_dev::ca::SVID_BACKDATE;

#[tokio::test]
async fn renewal_at_half_life_arrives_as_rotated() {
    let ttl = Duration::from_secs(4);
    let dep = Deployment::start(
        TD,
        &["node-a"],
        vec![
            identity_entry("node-a", 256).with_ttl(ttl),
            identity_entry("node-a", 257),
        ],
    )
    .await;
    let mut a = Node::workload(&dep, "node-a");
    let first = a.events.next("first fetch").await;
    assert_eq!(summarize(&first), ["bundle(1)", "added 256", "added 257"]);
    let old = a.svid(256);
    let old_leaf = leaf(&old);
    let long_lived = a.svid(257);
    let issued = old.not_before() + BACKDATE;
    assert_eq!(
        old.not_after().duration_since(issued).ok(),
        Some(ttl),
        "the SVID lives its entry's TTL: {old:?}"
    );

    // Nothing else may happen before the rotation (no early expiry, no other identity).
    let changes = a.events.next_within("rotation of 256", ttl + WAIT).await;
    let now = SystemTime::now();
    assert_eq!(summarize(&changes), ["rotated 256"], "only 256 is renewed");
    // SPIRE's rule: renewed once less than half of NotBefore..NotAfter is
    // left (4 s TTL + 10 s backdate: at once), never sooner than
    // spire-dev's floor after issuance.
    let half_left = old.not_after() - (ttl + BACKDATE) / 2;
    let due = half_left.max(issued + spire_dev::ca::MIN_RENEWAL_AGE);
    assert!(
        now >= due,
        "renewed when half of the validity was left, not before: {now:?} vs due {due:?}"
    );
    assert!(
        now < old.not_after(),
        "renewed while the old SVID was still valid (NotAfter {:?}, now {now:?})",
        old.not_after()
    );

    let new = svid_in(&changes, 256).expect("the Rotated event carries the SVID");
    let new_leaf = leaf(&new);
    assert_ne!(new_leaf.serial, old_leaf.serial, "a new certificate");
    assert!(new_leaf.not_after > old_leaf.not_after, "a later NotAfter");
    assert_eq!(new_leaf.spiffe_id, old_leaf.spiffe_id);
    assert_eq!(
        new_leaf.serial,
        dep.held("node-a", 256).serial,
        "what the agent serves"
    );
    assert!(
        Arc::ptr_eq(&a.svid(256), &new),
        "get() returns the rotated SVID"
    );
    assert!(
        Arc::ptr_eq(&a.svid(257), &long_lived),
        "the long-lived SVID is kept as it was"
    );
    let status = a
        .wait_status("rotation counted", |s| s.updates_applied >= 2)
        .await;
    assert_eq!(
        (
            status.updates_applied,
            status.updates_rejected,
            status.reconnects
        ),
        (2, 0, 0),
        "one message per agent change, on one stream: {status:?}"
    );
    dep.dev.shutdown().await;
}
