//! The SPIFFE Workload API on a node agent's socket, with the tonic client.

use std::collections::BTreeSet;
use std::time::Duration;

use spire_proto::workload::{JwtsvidRequest, X509svidRequest};
use tonic::{Code, Request};

use crate::support::*;

#[tokio::test]
async fn missing_header_is_invalid_argument() {
    let d = start(&["a"], vec![entry("a", "/identity/1")]).await;
    let mut c = workload(&d.workload_socket("a")).await;
    let err = c
        .fetch_x509svid(Request::new(X509svidRequest {}))
        .await
        .expect_err("FetchX509SVID without the security header must fail");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), "security header missing from request");

    let mut req = Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        spire_proto::WORKLOAD_HEADER_KEY,
        "false".parse().expect("value"),
    );
    let err = c
        .fetch_x509svid(req)
        .await
        .expect_err("header value false must fail");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn no_entries_is_permission_denied() {
    let d = start(&["a"], vec![entry("b", "/identity/1")]).await;
    let mut c = workload(&d.workload_socket("a")).await;
    let err = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .expect_err("no entry on node a");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), spire_proto::NO_IDENTITY_ISSUED);
    let err = c
        .fetch_x509_bundles(with_header(spire_proto::workload::X509BundlesRequest {}))
        .await
        .expect_err("bundles without identity");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), spire_proto::NO_IDENTITY_ISSUED);
}

#[tokio::test]
async fn first_message_is_immediate_full_state_of_this_node_only() {
    let d = start(
        &["a", "b"],
        vec![
            entry("a", "/identity/256"),
            entry("b", "/identity/300"),
            entry("a", "/identity/257"),
        ],
    )
    .await;
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    // No timed assertion: the SVIDs live 1 h, so nothing but the subscription
    // itself can send a message within `next`'s hang bound ([`WAIT`], 30 s) — a server
    // that waited for a rotation (at half the TTL) would time out here.
    let first = next("first FetchX509SVID message", &mut s).await;

    let ids: Vec<&str> = first.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://meshauth.local/identity/256",
            "spiffe://meshauth.local/identity/257"
        ],
        "node a serves exactly its own entries, in registration order"
    );
    let served: Vec<String> = ids_serials(&first).into_iter().map(|(_, s)| s).collect();
    assert_eq!(served, d.serials("a"), "serials match what the agent holds");
    let bundle = d.dev.server().bundle().concat();
    for svid in &first.svids {
        assert_eq!(svid.bundle, bundle, "bundle of {}", svid.spiffe_id);
        // The key is PKCS#8 for the leaf's public key.
        let key = rcgen::KeyPair::try_from(svid.x509_svid_key.as_slice())
            .unwrap_or_else(|e| panic!("PKCS#8 key of {}: {e}", svid.spiffe_id));
        let leaf = split_certs(&svid.x509_svid).remove(0);
        let cert = parse(&leaf);
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw(),
            "key of {} matches its certificate",
            svid.spiffe_id
        );
    }
    assert!(first.federated_bundles.is_empty());

    let mut b = fetch_bundles(&mut c).await;
    let bundles = next("first FetchX509Bundles message", &mut b).await;
    assert_eq!(
        bundles.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://meshauth.local"]
    );
    assert_eq!(bundles.bundles["spiffe://meshauth.local"], bundle);
}

#[tokio::test]
async fn renews_at_half_life_with_a_new_key() {
    let ttl = Duration::from_secs(2);
    let d = start(&["a"], vec![entry_ttl("a", "/identity/1", ttl)]).await;
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    let first = next("first message", &mut s).await;
    let renewed = next("renewal message", &mut s).await;
    let now = std::time::SystemTime::now();
    let old_leaf = split_certs(&first.svids[0].x509_svid).remove(0);
    let old_not_after = parse(&old_leaf).validity().not_after.to_datetime();
    assert!(
        time::OffsetDateTime::from(now) < old_not_after,
        "renewal must come before the old SVID expires (at half-life), not after"
    );
    assert_ne!(ids_serials(&first), ids_serials(&renewed), "new serial");
    assert_ne!(
        first.svids[0].x509_svid_key, renewed.svids[0].x509_svid_key,
        "new key"
    );
    assert_eq!(renewed.svids[0].spiffe_id, first.svids[0].spiffe_id);
    // And again: the agent keeps renewing.
    let third = next("second renewal", &mut s).await;
    assert_ne!(ids_serials(&third), ids_serials(&renewed));
}

#[tokio::test]
async fn entry_add_and_remove_send_messages_and_last_removal_denies() {
    let d = start(&["a"], vec![entry("a", "/identity/1")]).await;
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    let first = next("first message", &mut s).await;
    assert_eq!(first.svids.len(), 1);

    let added = d
        .dev
        .add_entry(entry("a", "/identity/2"))
        .unwrap_or_else(|e| panic!("add_entry: {e}"));
    let m = next("message after entry add", &mut s).await;
    let ids: BTreeSet<String> = m.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            "spiffe://meshauth.local/identity/1".to_owned(),
            "spiffe://meshauth.local/identity/2".to_owned()
        ])
    );
    // The unchanged SVID keeps its serial.
    assert_eq!(ids_serials(&m)[0], ids_serials(&first)[0]);

    let first_entry = d.dev.server().entries()[0].id.clone();
    d.dev
        .remove_entry(&first_entry)
        .unwrap_or_else(|e| panic!("remove_entry: {e}"));
    let m = next("message after entry remove", &mut s).await;
    let ids: Vec<&str> = m.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://meshauth.local/identity/2"]);

    d.dev
        .remove_entry(&added.id)
        .unwrap_or_else(|e| panic!("remove_entry: {e}"));
    let err = next_item("status after removing the last entry", &mut s)
        .await
        .expect_err("no identity left");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), spire_proto::NO_IDENTITY_ISSUED);
}

#[tokio::test]
async fn jwt_methods_are_unimplemented() {
    let d = start(&["a"], vec![entry("a", "/identity/1")]).await;
    let mut c = workload(&d.workload_socket("a")).await;
    let err = c
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: String::new(),
        }))
        .await
        .expect_err("JWT");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    let err = c
        .fetch_jwt_bundles(with_header(spire_proto::workload::JwtBundlesRequest {}))
        .await
        .expect_err("JWT bundles");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

#[tokio::test]
async fn concurrent_streams_are_served_independently() {
    let d = start(&["a"], vec![entry("a", "/identity/1")]).await;
    let sock = d.workload_socket("a");
    let mut c1 = workload(&sock).await;
    let mut c2 = c1.clone();
    let mut c3 = workload(&sock).await;
    let (mut s1, mut s2, mut s3) = tokio::join!(
        fetch_svids(&mut c1),
        fetch_svids(&mut c2),
        fetch_svids(&mut c3)
    );
    let (m1, m2, m3) = tokio::join!(
        next("stream 1 first", &mut s1),
        next("stream 2 first", &mut s2),
        next("stream 3 first", &mut s3)
    );
    assert_eq!(ids_serials(&m1), ids_serials(&m2));
    assert_eq!(ids_serials(&m1), ids_serials(&m3));
    drop(s3);
    d.dev
        .add_entry(entry("a", "/identity/2"))
        .unwrap_or_else(|e| panic!("add_entry: {e}"));
    let (u1, u2) = tokio::join!(
        next("stream 1 update", &mut s1),
        next("stream 2 update", &mut s2)
    );
    assert_eq!(u1.svids.len(), 2);
    assert_eq!(ids_serials(&u1), ids_serials(&u2));
}
