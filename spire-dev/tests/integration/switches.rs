//! The switches: server outage, agent down/up, CA rotation and pruning.

use std::time::{Duration, SystemTime};

use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn outage_keeps_svids_past_expiry_and_recovery_reissues() {
    let ttl = Duration::from_secs(2);
    let d = start(&["a"], vec![entry_ttl("a", "/identity/1", ttl)]).await;
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    let first = next("first message", &mut s).await;
    let before = ids_serials(&first);

    assert!(!d.dev.set_outage(true), "outage was off");
    // Added during the outage: registered, but not issued.
    d.dev
        .add_entry(entry_ttl("a", "/identity/2", ttl))
        .unwrap_or_else(|e| panic!("add_entry during outage: {e}"));
    // Nothing renewed or issued for longer than the whole TTL.
    assert_quiet(
        "stream during outage",
        &mut s,
        ttl + Duration::from_millis(1500),
    )
    .await;
    let held = d.dev.agent("a").expect("agent").identities();
    assert_eq!(held.len(), 1, "the entry added in the outage is not issued");
    assert_eq!(held[0].serial, before[0].1, "same SVID held");
    assert!(held[0].expired, "the held SVID is past NotAfter: {held:?}");

    // A new client still gets the expired SVID: the client must check expiry.
    let mut c2 = workload(&d.workload_socket("a")).await;
    let mut s2 = fetch_svids(&mut c2).await;
    let stale = next("message from a fresh stream during outage", &mut s2).await;
    assert_eq!(ids_serials(&stale), before);
    let leaf = split_certs(&stale.svids[0].x509_svid).remove(0);
    assert!(
        parse(&leaf).validity().not_after.to_datetime()
            < time::OffsetDateTime::from(SystemTime::now()),
        "served SVID is expired"
    );

    // Recovery: the agent syncs by itself.
    assert!(d.dev.set_outage(false), "outage was on");
    let m = next("message after recovery", &mut s).await;
    let after = ids_serials(&m);
    assert_eq!(after.len(), 2, "new entry issued on recovery: {after:?}");
    assert_eq!(after[0].0, before[0].0);
    assert_ne!(after[0].1, before[0].1, "expired SVID renewed on recovery");
    let leaf = split_certs(&m.svids[0].x509_svid).remove(0);
    assert!(
        parse(&leaf).validity().not_after.to_datetime()
            > time::OffsetDateTime::from(SystemTime::now()),
        "renewed SVID valid"
    );
}

#[tokio::test]
async fn outage_without_library_sync_recovers_through_the_agent_task() {
    // The server switch alone (no SpireDev::sync_agents): the agent's own task
    // must notice the recovery.
    let ttl = Duration::from_secs(2);
    let d = start(&["a"], vec![entry_ttl("a", "/identity/1", ttl)]).await;
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    let first = next("first message", &mut s).await;
    d.dev.server().set_outage(true);
    d.dev
        .server()
        .add_entry(entry_ttl("a", "/identity/2", ttl))
        .unwrap_or_else(|e| panic!("add_entry: {e}"));
    assert_quiet("stream during outage", &mut s, Duration::from_millis(1500)).await;
    d.dev.server().set_outage(false);
    let m = next("message after recovery", &mut s).await;
    assert_eq!(m.svids.len(), 2);
    assert_eq!(m.svids[0].spiffe_id, first.svids[0].spiffe_id);
}

#[tokio::test]
async fn agent_down_removes_sockets_and_ends_streams_then_up_serves_again() {
    let d = start(
        &["a", "b"],
        vec![entry("a", "/identity/1"), entry("b", "/identity/2")],
    )
    .await;
    let sock = d.workload_socket("a");
    let admin = d.admin_socket("a");
    let mut c = workload(&sock).await;
    let mut s = fetch_svids(&mut c).await;
    let first = next("first message", &mut s).await;

    assert!(d.dev.agent_down("a").await.expect("agent_down"), "was up");
    assert!(!sock.exists(), "workload socket removed");
    assert!(!admin.exists(), "admin socket removed");
    match next_item("stream end after agent down", &mut s).await {
        Ok(None) => {}
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(Some(m)) => panic!("unexpected message after agent down: {m:?}"),
    }
    assert!(
        tokio::net::UnixStream::connect(&sock).await.is_err(),
        "nothing listens on a down agent's path"
    );
    // Node b is unaffected.
    let mut cb = workload(&d.workload_socket("b")).await;
    let mut sb = fetch_svids(&mut cb).await;
    next("node b still serves", &mut sb).await;

    assert!(d.dev.agent_up("a").await.expect("agent_up"), "was down");
    assert!(
        sock.exists() && admin.exists(),
        "sockets back on the same paths"
    );
    let mut c = workload(&sock).await;
    let mut s = fetch_svids(&mut c).await;
    let again = next("first message after agent up", &mut s).await;
    assert_eq!(again.svids[0].spiffe_id, first.svids[0].spiffe_id);
    assert!(
        !d.dev.agent_up("a").await.expect("agent_up twice"),
        "already up"
    );
}

#[tokio::test]
async fn ca_rotation_reissues_from_new_ca_and_prune_drops_old() {
    let d = start(
        &["a"],
        vec![entry("a", "/identity/1"), entry("a", "/identity/2")],
    )
    .await;
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    let mut b = fetch_bundles(&mut c).await;
    let first = next("first message", &mut s).await;
    let first_bundle = next("first bundle", &mut b).await;
    let old_ca = split_certs(&first.svids[0].bundle);
    assert_eq!(old_ca.len(), 1);
    assert_eq!(
        first_bundle.bundles["spiffe://meshauth.local"],
        old_ca.concat(),
        "both streams agree"
    );

    assert_eq!(d.dev.rotate_ca().expect("rotate_ca"), 2);
    let m = next("message after rotation", &mut s).await;
    let bundle = split_certs(&m.svids[0].bundle);
    assert_eq!(bundle.len(), 2, "new + previous CA");
    assert_eq!(bundle[1], old_ca[0], "previous CA kept");
    assert_ne!(bundle[0], old_ca[0], "new CA first");
    let new_subject = subject(&bundle[0]);
    for (svid, (_, old_serial)) in m.svids.iter().zip(ids_serials(&first)) {
        let leaf = split_certs(&svid.x509_svid).remove(0);
        assert_eq!(
            issuer(&leaf),
            new_subject,
            "{} signed by the new CA",
            svid.spiffe_id
        );
        assert_ne!(
            serial_hex(&leaf),
            old_serial,
            "{} re-issued",
            svid.spiffe_id
        );
    }
    let bm = next("bundle message after rotation", &mut b).await;
    assert_eq!(split_certs(&bm.bundles["spiffe://meshauth.local"]).len(), 2);

    assert_eq!(d.dev.prune_ca(), 1);
    let m2 = next("message after prune", &mut s).await;
    let pruned = split_certs(&m2.svids[0].bundle);
    assert_eq!(pruned, vec![bundle[0].clone()], "only the new CA left");
    assert_eq!(ids_serials(&m2), ids_serials(&m), "prune does not re-issue");
    let bm = next("bundle message after prune", &mut b).await;
    assert_eq!(split_certs(&bm.bundles["spiffe://meshauth.local"]), pruned);
}

#[tokio::test]
async fn agent_down_keeps_the_others_and_unknown_node_is_an_error() {
    let d = start(&["a"], vec![]).await;
    let err = d.dev.agent_down("nope").await.expect_err("unknown node");
    let msg = err.to_string();
    assert!(msg.contains("nope") && msg.contains("\"a\""), "{msg}");
}
