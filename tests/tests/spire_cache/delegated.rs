//! The Delegated Identity API source against spire-dev's admin socket: exactly
//! the node's entries whose selectors the request contains; CA rotation
//! arrives as `BundleChanged` plus `Rotated`; pruning as `BundleChanged` alone.

use std::time::SystemTime;

use meshauth_tests::{
    Deployment, Node, TD, WAIT, all_events, leaf, selector_entry, summarize, summarize_all, svid_in,
};
use rustls_pki_types::CertificateDer;
use svid_cache::{
    CacheError, CacheEvent, Expectation, ExpectedIdentity, PeerRole, SourceError, SvidError,
    TrustBundle, TrustDomain, VerifyError, verify_peer,
};

#[tokio::test]
async fn selectors_pick_entries_and_ca_rotation_rotates_them() {
    let dep = Deployment::start(
        TD,
        &["node-a", "node-b"],
        vec![
            selector_entry("node-a", 256, &["k8s:ns:a"]),
            selector_entry("node-a", 257, &["k8s:ns:b"]),
            selector_entry("node-a", 258, &["k8s:ns:a", "k8s:sa:x"]),
            selector_entry("node-a", 259, &["k8s:ns:a", "k8s:sa:y"]),
            // Same selectors, other node: never served by node-a's agent.
            selector_entry("node-b", 260, &["k8s:ns:a"]),
        ],
    )
    .await;
    let mut a = Node::delegated(&dep, "node-a", &["k8s:ns:a", "k8s:sa:x"]);
    let first = a.events.next("first delegated state").await;
    assert_eq!(
        summarize(&first),
        ["bundle(1)", "added 256", "added 258"],
        "entries whose selectors are all in the request, of node-a only"
    );
    assert_eq!(a.cache.identities(), [256, 258]);
    for identity in [256, 258] {
        assert_eq!(
            leaf(&a.svid(identity)).serial,
            dep.held("node-a", identity).serial
        );
    }
    let status = a.wait_connected("delegated source connected").await;
    assert_eq!(status.updates_rejected, 0, "{status:?}");
    let old_root = dep.bundle().remove(0);

    // CA rotation: the agent re-issues everything from the new CA and serves new
    // + old roots; the two streams of the source may deliver in either order.
    assert_eq!(dep.dev.rotate_ca().expect("rotate_ca"), 2);
    let seen = a
        .events
        .until("bundle change and both rotations", WAIT, |seen| {
            let all: Vec<_> = all_events(seen).collect();
            all.iter()
                .any(|e| matches!(e, CacheEvent::BundleChanged { .. }))
                && [256, 258].iter().all(|n| {
                    all.iter()
                        .any(|e| matches!(e, CacheEvent::Rotated { identity, .. } if identity == n))
                })
        })
        .await;
    let mut kinds: Vec<String> = seen.iter().flat_map(|c| summarize(c)).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["bundle(2)", "rotated 256", "rotated 258"],
        "exactly one bundle change and one rotation each: {:?}",
        summarize_all(&seen)
    );
    // The source applies each stream's latest message with the other's latest:
    // when the SVIDs of the new CA come before the bundle carrying it, that one
    // update is refused as untrusted and the next one (with the bundle) is taken.
    let status = a.source.status();
    assert!(
        status.is_connected() && status.reconnects == 0,
        "{status:?}"
    );
    match status.updates_rejected {
        0 => {}
        1 => assert!(
            status
                .last_error
                .as_ref()
                .is_some_and(|(_, e)| untrusted_svid(e)),
            "the only refusal is the new SVIDs before their bundle: {status:?}"
        ),
        _ => panic!("at most one refused update per rotation: {status:?}"),
    }
    let roots = dep.bundle();
    let bundle = a.cache.bundle().expect("bundle");
    let authorities: Vec<Vec<u8>> = bundle.authorities().iter().map(|c| c.to_vec()).collect();
    assert_eq!(authorities, roots, "new root first, then the old one");
    assert_eq!(roots[1], old_root);
    for identity in [256, 258] {
        let rotated = seen
            .iter()
            .find_map(|c| svid_in(c, identity))
            .expect("rotated SVID");
        assert_eq!(
            leaf(&rotated).serial,
            dep.held("node-a", identity).serial,
            "identity {identity}"
        );
        assert_eq!(
            dep.held("node-a", identity).ca_generation,
            2,
            "issued by the new CA"
        );
        // Chains to the new root alone, not to the old one.
        let chain = rotated.cert_chain();
        assert_eq!(verify(chain, &roots[0]), Ok(identity));
        assert!(
            matches!(
                verify(chain, &old_root),
                Err(VerifyError::UntrustedChain { .. })
            ),
            "identity {identity} must not chain to the old root"
        );
    }

    // Pruning the old root: a bundle change, the SVIDs stay as they are.
    assert_eq!(dep.dev.prune_ca(), 1);
    let changes = a.events.next("prune").await;
    assert_eq!(summarize(&changes), ["bundle(1)"]);
    assert_eq!(a.cache.identities(), [256, 258]);
    dep.dev.shutdown().await;
}

/// Whether `e` is the cache refusing an SVID whose chain does not reach the bundle.
fn untrusted_svid(e: &SourceError) -> bool {
    let SourceError::Rejected { source, .. } = e else {
        return false;
    };
    matches!(
        &**source,
        CacheError::Svid {
            source: SvidError::Chain {
                source: VerifyError::UntrustedChain { .. },
                ..
            },
            ..
        }
    )
}

/// Verifies `chain` as a client of meshauth.local against `root` alone.
fn verify(chain: &[CertificateDer<'static>], root: &[u8]) -> Result<u32, VerifyError> {
    let td = TrustDomain::new(TD).expect("trust domain");
    let bundle = TrustBundle::new(td, vec![CertificateDer::from(root.to_vec())])
        .expect("bundle of one root");
    let expect = Expectation {
        role: PeerRole::Client,
        identity: ExpectedIdentity::Known(std::sync::Arc::new(|_| true)),
    };
    verify_peer(chain, &bundle, SystemTime::now(), &expect).map(|p| p.identity)
}
