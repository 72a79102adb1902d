//! Server outage: the agent cannot renew and keeps serving what it holds, even
//! past NotAfter. The cache serves the SVID while it is valid, drops it at
//! NotAfter by its own timer (`Removed { Expired }`), refuses the expired SVID
//! the agent still serves, and takes the fresh one when the server is back —
//! all on one stream that never disconnects.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshauth_tests::{
    Deployment, Node, TD, WAIT, connected_since, identity_entry, leaf, removed, summarize,
};
use svid_cache::RemovalReason;

#[tokio::test]
async fn outage_expires_then_recovery_reissues_on_the_same_stream() {
    let ttl = Duration::from_secs(3);
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
    a.events.next("first fetch").await;
    let since = connected_since(&a.wait_connected("first fetch").await);

    assert!(!dep.dev.set_outage(true), "outage was off");
    // From here the agent holds one SVID for 256 until the outage ends; the cache
    // catches up with it if a renewal raced the switch.
    let held = dep.held("node-a", 256);
    if leaf(&a.svid(256)).serial != held.serial {
        let changes = a.events.next("renewal that raced the outage switch").await;
        assert_eq!(summarize(&changes), ["rotated 256"]);
    }
    let svid = a.svid(256);
    assert_eq!(
        leaf(&svid).serial,
        held.serial,
        "cache holds what the agent holds"
    );
    let long_lived = a.svid(257);
    // The worker counts a message after the cache published it: wait for the count.
    let applied = a
        .wait_status("messages counted", |s| s.updates_applied >= 1)
        .await
        .updates_applied;

    // Just before NotAfter (well past the half-life the agent could not renew at),
    // the cache still serves the same SVID, and nothing happened.
    tokio::time::sleep_until(deadline(svid.not_after() - Duration::from_millis(500))).await;
    assert!(
        Arc::ptr_eq(&a.svid(256), &svid),
        "still valid: served, not renewed"
    );
    a.events
        .assert_none_pending("before NotAfter during the outage");

    // At NotAfter the cache's timer removes it.
    let changes = a
        .events
        .next_within("expiry of 256", Duration::from_secs(3))
        .await;
    let now = SystemTime::now();
    assert_eq!(summarize(&changes), [removed(256, RemovalReason::Expired)]);
    assert!(now >= svid.not_after(), "not removed before NotAfter");
    assert!(a.cache.get(256).is_none(), "get() after NotAfter");
    assert_eq!(a.cache.identities(), [257]);
    assert!(Arc::ptr_eq(&a.svid(257), &long_lived), "257 kept");

    // ...while spire-dev's agent still serves the expired SVID.
    let still = dep.held("node-a", 256);
    assert_eq!(still.serial, held.serial);
    assert!(still.expired, "the agent serves an expired SVID: {still:?}");
    // A cache connecting now is served it too, and refuses to store it.
    let late = Node::workload(&dep, "node-a");
    late.wait_status("late cache applied the agent's state", |s| {
        s.updates_applied >= 1
    })
    .await;
    assert_eq!(late.cache.identities(), [257], "expired SVID not stored");
    assert_eq!(late.cache.len(), 1);

    // The source saw nothing during the outage and never disconnected.
    let status = a.source.status();
    assert_eq!(connected_since(&status), since, "same stream: {status:?}");
    assert_eq!(status.reconnects, 0, "{status:?}");
    assert_eq!(status.updates_applied, applied, "no message in the outage");

    // Recovery: the agent renews and the same stream delivers it.
    assert!(dep.dev.set_outage(false), "outage was on");
    let changes = a.events.next_within("SVID after recovery", WAIT).await;
    assert_eq!(summarize(&changes), ["added 256"]);
    let fresh = a.svid(256);
    assert_ne!(leaf(&fresh).serial, held.serial, "a new certificate");
    assert!(fresh.not_after() > SystemTime::now(), "valid");
    assert_eq!(leaf(&fresh).serial, dep.held("node-a", 256).serial);
    assert!(Arc::ptr_eq(&a.svid(257), &long_lived), "257 still kept");
    let status = a.source.status();
    assert_eq!(connected_since(&status), since, "same stream: {status:?}");
    assert_eq!(status.reconnects, 0, "{status:?}");
    dep.dev.shutdown().await;
}

/// The tokio instant at wall-clock time `at`.
fn deadline(at: SystemTime) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now + at.duration_since(SystemTime::now()).unwrap_or_default()
}
