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
async fn a_pid_is_attested_by_its_uid_and_bad_requests_are_refused_as_spire_does() {
    let me = std::process::id() as i32;
    let uid = std::fs::read_to_string(format!("/proc/{me}/status"))
        .expect("status")
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|r| r.split_whitespace().nth(1).map(str::to_owned))
        })
        .flatten()
        .expect("Uid line");
    let d = start(
        &["a"],
        vec![
            entry_sel("a", "/identity/1", &[&format!("unix:uid:{uid}")]),
            entry_sel("a", "/identity/2", &["unix:uid:4000000000"]),
        ],
    )
    .await;
    let mut c = delegated(&d.admin_socket("a")).await;
    let mut s = c
        .subscribe_to_x509svi_ds(request(&[], me))
        .await
        .unwrap_or_else(|e| panic!("by pid: {e:?}"))
        .into_inner();
    let m = next("first message by pid", &mut s).await;
    let paths: Vec<_> = m
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
    assert_eq!(paths, ["/identity/1"], "only this process's uid matches");

    // A PID nobody has attests to nothing: an empty list, not an error.
    let mut s = c
        .subscribe_to_x509svi_ds(request(&[], i32::MAX))
        .await
        .unwrap_or_else(|e| panic!("dead pid: {e:?}"))
        .into_inner();
    let m = next("first message for a dead pid", &mut s).await;
    assert!(m.x509_svids.is_empty(), "{:?}", m.x509_svids.len());

    for (selectors, pid) in [(&[][..], 0), (&["k8s:ns:one"][..], me)] {
        let err = c
            .subscribe_to_x509svi_ds(request(selectors, pid))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(err.message(), spire_dev::delegated_api::SELECTORS_OR_PID);
    }
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
