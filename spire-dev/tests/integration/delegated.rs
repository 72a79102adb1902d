//! SPIRE's Delegated Identity API on the admin socket.

use spire_proto::delegatedidentity::{
    FetchJwtsviDsRequest, SubscribeToX509BundlesRequest, SubscribeToX509sviDsRequest,
};
use spire_proto::types::Selector;
use tonic::Code;

use crate::support::*;

fn sel(s: &str) -> Selector {
    let (t, v) = s.split_once(':').expect("type:value");
    Selector {
        r#type: t.into(),
        value: v.into(),
    }
}

fn request(selectors: &[&str], pid: i32) -> SubscribeToX509sviDsRequest {
    SubscribeToX509sviDsRequest {
        selectors: selectors.iter().map(|s| sel(s)).collect(),
        pid,
    }
}

#[tokio::test]
async fn subscribe_by_selectors_matches_subsets_and_follows_changes() {
    let d = start(
        &["a", "b"],
        vec![
            entry_sel("a", "/identity/1", &["k8s:ns:one", "k8s:sa:default"]),
            entry_sel("a", "/identity/2", &["k8s:ns:two"]),
            entry_sel("b", "/identity/3", &["k8s:ns:one"]),
        ],
    )
    .await;
    let mut c = delegated(&d.admin_socket("a")).await;
    let mut s = c
        .subscribe_to_x509svi_ds(request(&["k8s:ns:one", "k8s:sa:default", "k8s:pod:x"], 0))
        .await
        .unwrap_or_else(|e| panic!("SubscribeToX509SVIDs: {e:?}"))
        .into_inner();
    let m = next("first delegated message", &mut s).await;
    assert_eq!(
        m.x509_svids.len(),
        1,
        "only identity/1 matches (and only node a's)"
    );
    let w = &m.x509_svids[0];
    let svid = w.x509_svid.as_ref().expect("x509_svid");
    let id = svid.id.as_ref().expect("id");
    assert_eq!(
        (id.trust_domain.as_str(), id.path.as_str()),
        ("meshauth.local", "/identity/1")
    );
    assert_eq!(svid.cert_chain.len(), 1, "chain as separate DER certs");
    let info = &d.dev.agent("a").expect("agent").identities()[0];
    assert_eq!(serial_hex(&svid.cert_chain[0]), info.serial);
    assert_eq!(svid.expires_at, info.not_after);
    assert_eq!(
        parse(&svid.cert_chain[0]).validity().not_after.timestamp(),
        svid.expires_at
    );
    rcgen::KeyPair::try_from(w.x509_svid_key.as_slice())
        .unwrap_or_else(|e| panic!("PKCS#8 key: {e}"));

    // A partial selector set does not match identity/1.
    let mut partial = c
        .subscribe_to_x509svi_ds(request(&["k8s:ns:one"], 0))
        .await
        .unwrap_or_else(|e| panic!("SubscribeToX509SVIDs: {e:?}"))
        .into_inner();
    let m = next("partial selectors", &mut partial).await;
    assert!(m.x509_svids.is_empty(), "{:?}", m.x509_svids.len());

    // A new matching entry produces a message with both.
    d.dev
        .add_entry(entry_sel("a", "/identity/4", &["k8s:pod:x"]))
        .unwrap_or_else(|e| panic!("add_entry: {e}"));
    let m = next("delegated message after add", &mut s).await;
    let paths: Vec<String> = m
        .x509_svids
        .iter()
        .map(|w| {
            w.x509_svid
                .as_ref()
                .and_then(|s| s.id.as_ref())
                .expect("id")
                .path
                .clone()
        })
        .collect();
    assert_eq!(paths, ["/identity/1", "/identity/4"]);
}

#[tokio::test]
async fn pid_is_unimplemented_and_empty_is_invalid() {
    let d = start(&["a"], vec![entry_sel("a", "/identity/1", &["k8s:ns:one"])]).await;
    let mut c = delegated(&d.admin_socket("a")).await;
    let err = c
        .subscribe_to_x509svi_ds(request(&[], 1234))
        .await
        .expect_err("pid");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(
        err.message().contains("selectors only"),
        "{}",
        err.message()
    );
    let err = c
        .subscribe_to_x509svi_ds(request(&[], 0))
        .await
        .expect_err("empty");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .fetch_jwtsvi_ds(FetchJwtsviDsRequest {
            audience: vec!["x".into()],
            selectors: vec![sel("k8s:ns:one")],
            pid: 0,
        })
        .await
        .expect_err("jwt");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

#[tokio::test]
async fn bundles_follow_rotation() {
    let d = start(&["a"], vec![entry_sel("a", "/identity/1", &["k8s:ns:one"])]).await;
    let mut c = delegated(&d.admin_socket("a")).await;
    let mut s = c
        .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
        .await
        .unwrap_or_else(|e| panic!("SubscribeToX509Bundles: {e:?}"))
        .into_inner();
    let m = next("first bundles", &mut s).await;
    assert_eq!(
        m.ca_certificates["spiffe://meshauth.local"],
        d.dev.server().bundle().concat()
    );
    d.dev.rotate_ca().expect("rotate");
    let m = next("bundles after rotation", &mut s).await;
    assert_eq!(
        split_certs(&m.ca_certificates["spiffe://meshauth.local"]).len(),
        2
    );
}
