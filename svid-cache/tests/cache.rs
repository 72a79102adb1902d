//! The cache: diffing full states into events, ignoring foreign SVIDs, rejecting
//! malformed updates whole, and expiry under a controlled clock.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshauth_test_support::certs::{Ca, HOUR, Leaf, LeafSpec, TD, base_time, bundle};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use svid_cache::{
    CacheChanges, CacheConfig, CacheError, CacheEvent, RemovalReason, SvidCache, SvidError,
    TokioClock, TrustDomain, Update, VerifyError,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

fn cache_at(now: SystemTime) -> SvidCache {
    SvidCache::with_clock(
        CacheConfig::default(),
        Arc::new(TokioClock::starting_at(now)),
    )
}

fn full(leaves: &[&Leaf], b: Option<svid_cache::TrustBundle>) -> Update {
    Update {
        svids: Some(leaves.iter().map(|l| l.input()).collect()),
        bundle: b,
    }
}

/// Events as comparable tuples: (kind, identity).
fn summary(c: &CacheChanges) -> Vec<(&'static str, Option<u32>)> {
    c.events
        .iter()
        .map(|e| {
            let kind = match e {
                CacheEvent::Added { .. } => "added",
                CacheEvent::Rotated { .. } => "rotated",
                CacheEvent::Removed {
                    reason: RemovalReason::NoLongerServed,
                    ..
                } => "removed",
                CacheEvent::Removed {
                    reason: RemovalReason::Expired,
                    ..
                } => "expired",
                CacheEvent::BundleChanged { .. } => "bundle",
            };
            (kind, e.identity())
        })
        .collect()
}

#[tokio::test]
async fn full_states_diff_into_added_rotated_removed_and_bundle_changed() {
    let now = base_time();
    let root = Ca::root("root");
    let cache = cache_at(now);
    let mut rx = cache.subscribe();
    assert!(cache.get(300).is_none());
    assert_eq!(*cache.watch_generation().borrow(), 0);

    let a = root.svid(300, now, HOUR);
    let b = root.svid(301, now, HOUR);
    let c = root.svid(302, now, HOUR);
    let changes = cache
        .apply(full(&[&a, &b, &c], Some(bundle(&[&root]))))
        .unwrap();
    assert_eq!(
        summary(&changes),
        vec![
            ("bundle", None),
            ("added", Some(300)),
            ("added", Some(301)),
            ("added", Some(302)),
        ]
    );
    assert_eq!(changes.generation, 1);
    assert_eq!(rx.recv().await.unwrap().generation, 1);
    assert_eq!(cache.identities(), vec![300, 301, 302]);
    let held = cache.get(301).unwrap();
    assert_eq!(held.leaf(), &b.chain[0]);
    assert_eq!(held.not_after(), now + HOUR);
    let signer = cache
        .certified_key(300)
        .unwrap()
        .key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256]);
    assert!(signer.is_some());

    // The same state again: no event, the stored entries are reused as they are.
    let again = cache
        .apply(full(&[&a, &b, &c], Some(bundle(&[&root]))))
        .unwrap();
    assert!(again.events.is_empty());
    assert_eq!(again.generation, 1);
    assert!(Arc::ptr_eq(&held, &cache.get(301).unwrap()));
    assert!(matches!(
        rx.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    ));

    // 301 rotates, 302 goes away, 303 arrives, the bundle gains a CA.
    let b2 = root.svid(301, now, 2 * HOUR);
    let d = root.svid(303, now, HOUR);
    let next_ca = Ca::root("next");
    let changes = cache
        .apply(full(&[&a, &b2, &d], Some(bundle(&[&root, &next_ca]))))
        .unwrap();
    assert_eq!(
        summary(&changes),
        vec![
            ("bundle", None),
            ("rotated", Some(301)),
            ("removed", Some(302)),
            ("added", Some(303)),
        ]
    );
    assert_eq!(changes.generation, 2);
    assert_eq!(*cache.watch_generation().borrow(), 2);
    assert_eq!(cache.get(301).unwrap().leaf(), &b2.chain[0]);
    assert!(cache.get(302).is_none());
    assert_eq!(cache.bundle().unwrap().authorities().len(), 2);

    // An update with only a bundle leaves the SVIDs alone.
    let changes = cache
        .apply(Update {
            svids: None,
            bundle: Some(bundle(&[&next_ca])),
        })
        .unwrap();
    assert_eq!(summary(&changes), vec![("bundle", None)]);
    assert_eq!(cache.identities(), vec![300, 301, 303]);
}

#[tokio::test]
async fn svids_of_other_trust_domains_and_paths_are_ignored() {
    let now = base_time();
    let root = Ca::root("root");
    let cache = cache_at(now);
    let ours = root.svid(7, now, HOUR);
    let foreign = root.issue(&LeafSpec::identity("other.org", 8, now, HOUR));
    let workload = root.issue(&LeafSpec::uri(
        &format!("spiffe://{TD}/ns/default/sa/web"),
        now,
        HOUR,
    ));
    let changes = cache
        .apply(full(&[&foreign, &ours, &workload], Some(bundle(&[&root]))))
        .unwrap();
    assert_eq!(
        summary(&changes),
        vec![("bundle", None), ("added", Some(7))]
    );
    assert_eq!(cache.identities(), vec![7]);
}

#[tokio::test]
async fn a_configured_trust_domain_is_used() {
    let now = base_time();
    let root = Ca::root("root");
    let td = TrustDomain::new("cluster.example").unwrap();
    let cache = SvidCache::with_clock(
        CacheConfig {
            trust_domain: td.clone(),
            ..CacheConfig::default()
        },
        Arc::new(TokioClock::starting_at(now)),
    );
    let default_td = root.svid(7, now, HOUR);
    let configured = root.issue(&LeafSpec::identity("cluster.example", 9, now, HOUR));
    let b = svid_cache::TrustBundle::new(td, vec![root.der()]).unwrap();
    cache
        .apply(full(&[&default_td, &configured], Some(b)))
        .unwrap();
    assert_eq!(cache.identities(), vec![9]);
    // A bundle of the wrong trust domain is refused.
    let err = cache
        .apply(Update {
            svids: None,
            bundle: Some(bundle(&[&root])),
        })
        .unwrap_err();
    assert!(matches!(err, CacheError::BundleTrustDomain { .. }), "{err}");
}

/// Builds a state holding 300 and 301, then checks that `bad` is rejected with
/// an error matching `check` and that nothing changed.
fn rejected_whole(root: &Ca, now: SystemTime, bad: Update, check: impl Fn(&CacheError) -> bool) {
    let cache = cache_at(now);
    let a = root.svid(300, now, HOUR);
    let b = root.svid(301, now, HOUR);
    cache.apply(full(&[&a, &b], Some(bundle(&[root])))).unwrap();
    let before: Vec<_> = cache
        .identities()
        .iter()
        .map(|&n| cache.get(n).unwrap())
        .collect();
    let bundle_before = cache.bundle().unwrap();
    let mut rx = cache.subscribe();

    let err = cache.apply(bad).unwrap_err();
    assert!(check(&err), "unexpected error: {err}");
    assert!(err.to_string().contains("cache unchanged"), "{err}");
    let after: Vec<_> = cache
        .identities()
        .iter()
        .map(|&n| cache.get(n).unwrap())
        .collect();
    assert_eq!(before.len(), after.len());
    for (x, y) in before.iter().zip(&after) {
        assert!(Arc::ptr_eq(x, y));
    }
    assert!(Arc::ptr_eq(&bundle_before, &cache.bundle().unwrap()));
    assert!(rx.try_recv().is_err());
    assert_eq!(*cache.watch_generation().borrow(), 1);
}

#[tokio::test]
async fn malformed_updates_are_rejected_whole_and_the_cache_keeps_what_it_had() {
    let now = base_time();
    let root = Ca::root("root");
    let other = Ca::root("other");
    let good = root.svid(302, now, HOUR);

    // Garbage certificate bytes in the second SVID; the first would be a valid rotation.
    let mut garbage = root.svid(301, now, HOUR).input();
    garbage.cert_chain = vec![CertificateDer::from(b"\x30\x03garbage".to_vec())];
    rejected_whole(
        &root,
        now,
        Update {
            svids: Some(vec![good.input(), garbage]),
            bundle: None,
        },
        |e| {
            matches!(
                e,
                CacheError::Svid {
                    index: 1,
                    source: SvidError::Chain {
                        source: VerifyError::Malformed { .. },
                        ..
                    }
                }
            )
        },
    );

    // A key that is not a key.
    let mut bad_key = root.svid(301, now, HOUR).input();
    bad_key.private_key = PrivatePkcs8KeyDer::from(vec![0x30, 0x01, 0x00]);
    rejected_whole(
        &root,
        now,
        Update {
            svids: Some(vec![good.input(), bad_key]),
            bundle: None,
        },
        |e| {
            matches!(
                e,
                CacheError::Svid {
                    index: 1,
                    source: SvidError::PrivateKey { .. }
                }
            )
        },
    );

    // The key of another SVID.
    let mut wrong_key = root.svid(301, now, HOUR).input();
    wrong_key.private_key = PrivatePkcs8KeyDer::from(good.key.clone());
    rejected_whole(
        &root,
        now,
        Update {
            svids: Some(vec![wrong_key]),
            bundle: None,
        },
        |e| {
            matches!(
                e,
                CacheError::Svid {
                    source: SvidError::KeyMismatch { .. },
                    ..
                }
            )
        },
    );

    // The source says 301 but the certificate is 302's.
    let mut mislabeled = good.input();
    mislabeled.spiffe_id = format!("spiffe://{TD}/identity/301");
    rejected_whole(
        &root,
        now,
        Update {
            svids: Some(vec![mislabeled]),
            bundle: None,
        },
        |e| {
            matches!(
                e,
                CacheError::Svid {
                    source: SvidError::SpiffeIdMismatch { .. },
                    ..
                }
            )
        },
    );

    // Signed by a CA outside the bundle.
    rejected_whole(
        &root,
        now,
        full(&[&good, &other.svid(303, now, HOUR)], None),
        |e| {
            matches!(
                e,
                CacheError::Svid {
                    index: 1,
                    source: SvidError::Chain {
                        source: VerifyError::UntrustedChain { .. },
                        ..
                    }
                }
            )
        },
    );

    // A CA certificate as leaf, and two URI SANs.
    let mut ca_leaf = LeafSpec::identity(TD, 304, now, HOUR);
    ca_leaf.is_ca = true;
    rejected_whole(&root, now, full(&[&root.issue(&ca_leaf)], None), |e| {
        matches!(
            e,
            CacheError::Svid {
                source: SvidError::Chain {
                    source: VerifyError::LeafIsCa { .. },
                    ..
                },
                ..
            }
        )
    });
    let mut two = LeafSpec::identity(TD, 305, now, HOUR);
    two.uris.push(format!("spiffe://{TD}/identity/306"));
    rejected_whole(&root, now, full(&[&root.issue(&two)], None), |e| {
        matches!(
            e,
            CacheError::Svid {
                source: SvidError::Chain {
                    source: VerifyError::MultipleUriSans { .. },
                    ..
                },
                ..
            }
        )
    });
}

#[tokio::test]
async fn svids_need_a_bundle_to_be_checked_against() {
    let now = base_time();
    let root = Ca::root("root");
    let cache = cache_at(now);
    let err = cache
        .apply(full(&[&root.svid(1, now, HOUR)], None))
        .unwrap_err();
    assert!(
        matches!(err, CacheError::NoTrustBundle { count: 1, .. }),
        "{err}"
    );
    assert!(cache.is_empty());
}

#[tokio::test]
async fn an_empty_full_state_removes_everything() {
    let now = base_time();
    let root = Ca::root("root");
    let cache = cache_at(now);
    cache
        .apply(full(
            &[&root.svid(1, now, HOUR), &root.svid(2, now, HOUR)],
            Some(bundle(&[&root])),
        ))
        .unwrap();
    let changes = cache.apply(full(&[], None)).unwrap();
    assert_eq!(
        summary(&changes),
        vec![("removed", Some(1)), ("removed", Some(2))]
    );
    assert!(cache.is_empty());
    assert!(cache.bundle().is_some(), "the bundle stays");
}

#[tokio::test]
async fn two_svids_for_one_identity_keep_the_longer_lived() {
    let now = base_time();
    let root = Ca::root("root");
    let cache = cache_at(now);
    let short = root.svid(5, now, HOUR);
    let long = root.svid(5, now, 3 * HOUR);
    cache
        .apply(full(&[&long, &short], Some(bundle(&[&root]))))
        .unwrap();
    assert_eq!(cache.get(5).unwrap().not_after(), now + 3 * HOUR);
    assert_eq!(cache.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn expiry_removes_svids_and_lookups_never_return_expired_ones() {
    let now = base_time();
    let root = Ca::root("root");
    let cache = cache_at(now);
    let mut rx = cache.subscribe();
    let short = root.svid(10, now, Duration::from_secs(30));
    let long = root.svid(11, now, Duration::from_secs(90));
    cache
        .apply(full(&[&short, &long], Some(bundle(&[&root]))))
        .unwrap();
    assert_eq!(rx.recv().await.unwrap().events.len(), 3);
    assert_eq!(cache.next_expiry(), Some(now + Duration::from_secs(30)));

    // No timer yet: a lookup past NotAfter still returns nothing.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(cache.get(10).is_none());
    assert!(cache.certified_key(10).is_none());
    assert_eq!(cache.identities(), vec![11]);
    assert_eq!(cache.len(), 2, "not swept yet");

    // The timer sweeps it and tells subscribers.
    let shutdown = CancellationToken::new();
    let timer = cache.spawn_expiry(shutdown.clone());
    let changes = rx.recv().await.unwrap();
    assert_eq!(summary(&changes), vec![("expired", Some(10))]);
    assert_eq!(cache.len(), 1);

    // The next one fires by itself when its NotAfter arrives (paused time auto-advances).
    let started = tokio::time::Instant::now();
    let changes = rx.recv().await.unwrap();
    assert_eq!(summary(&changes), vec![("expired", Some(11))]);
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    assert!(cache.is_empty());
    assert_eq!(cache.next_expiry(), None);

    // An update with an earlier expiry wakes the timer.
    let t = now + Duration::from_secs(90);
    let again = root.svid(12, t, Duration::from_secs(20));
    cache.apply(full(&[&again], None)).unwrap();
    assert_eq!(
        summary(&rx.recv().await.unwrap()),
        vec![("added", Some(12))]
    );
    assert_eq!(
        summary(&rx.recv().await.unwrap()),
        vec![("expired", Some(12))]
    );

    shutdown.cancel();
    timer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn already_expired_svids_are_not_stored() {
    let now = base_time();
    let root = Ca::root("root");
    let cache = cache_at(now);
    let mut old = LeafSpec::identity(TD, 20, now, HOUR);
    old.not_before = now - 2 * HOUR;
    old.not_after = now - Duration::from_secs(5);
    let changes = cache
        .apply(full(
            &[&root.issue(&old), &root.svid(21, now, HOUR)],
            Some(bundle(&[&root])),
        ))
        .unwrap();
    assert_eq!(
        summary(&changes),
        vec![("bundle", None), ("added", Some(21))]
    );

    // A stored SVID that the source keeps re-sending after NotAfter is removed as expired.
    let s = root.svid(22, now, Duration::from_secs(10));
    cache.apply(full(&[&s], None)).unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    let changes = cache.apply(full(&[&s], None)).unwrap();
    assert_eq!(summary(&changes), vec![("expired", Some(22))]);
}

/// Not a benchmark (the lead's bench measures this properly): a smoke check that
/// a large update goes through the parallel build and stays linear.
#[tokio::test]
async fn a_large_update_applies_and_an_unchanged_one_is_cheap() {
    let now = base_time();
    let root = Ca::root("root");
    let cache = cache_at(now);
    let leaves: Vec<Leaf> = (1000..1500).map(|n| root.svid(n, now, HOUR)).collect();
    let refs: Vec<&Leaf> = leaves.iter().collect();
    let t = Instant::now();
    let changes = cache.apply(full(&refs, Some(bundle(&[&root])))).unwrap();
    let first = t.elapsed();
    assert_eq!(changes.events.len(), 501);
    let t = Instant::now();
    let changes = cache.apply(full(&refs, Some(bundle(&[&root])))).unwrap();
    let second = t.elapsed();
    assert!(changes.events.is_empty());
    assert_eq!(cache.len(), 500);
    eprintln!("500 identities: first apply {first:?}, unchanged re-apply {second:?}");
}
