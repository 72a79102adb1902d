//! Peer verification as the handshake does it — through the rustls
//! verifiers (`SpiffeServerVerifier`, `SpiffeClientVerifier`) backed by a
//! cache, its remembered chains and its clock: every rejection case has its
//! own variant; good chains pass; a bad chain is refused uncached and after
//! a good chain was remembered.

#[path = "verify/production.rs"]
mod production;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshauth_test_support::certs::{
    Ca, ExtendedKeyUsagePurpose, HOUR, KeyUsagePurpose, LeafSpec, TD, base_time, bundle,
};
use production::{ManualClock, production_verify, verifier_cache};
use rustls_pki_types::CertificateDer;
use svid_cache::{Expectation, ExpectedIdentity, PeerRole, VerifyError, verify_peer};

/// One fresh (uncached) production verification at `now` against a bundle of `cas`.
fn verify_at(
    chain: &[CertificateDer<'static>],
    cas: &[&Ca],
    now: SystemTime,
    expect: &Expectation,
) -> Result<(), VerifyError> {
    production_verify(&verifier_cache(cas, ManualClock::new(now)), chain, expect)
}

fn exact(role: PeerRole, n: u32) -> Expectation {
    Expectation {
        role,
        identity: ExpectedIdentity::Exact(n),
    }
}

#[test]
fn accepts_a_good_svid_from_the_root_and_through_an_intermediate() {
    let now = base_time();
    let root = Ca::root("root");
    let inter = root.intermediate("intermediate");
    let direct = root.svid(300, now, HOUR);
    verify_at(&direct.chain, &[&root], now, &exact(PeerRole::Client, 300)).unwrap();
    verify_at(&direct.chain, &[&root], now, &exact(PeerRole::Server, 300)).unwrap();
    let cache = verifier_cache(&[&root], ManualClock::new(now));
    let peer = svid_cache::SpiffeClientVerifier::exact(cache, 300)
        .verify(&direct.chain)
        .unwrap();
    assert_eq!(peer.identity, 300);
    assert_eq!(peer.spiffe_id, format!("spiffe://{TD}/identity/300"));
    assert_eq!(peer.not_after, now + HOUR);

    let via = inter.svid(301, now, HOUR);
    assert_eq!(via.chain.len(), 2);
    verify_at(
        &via.chain,
        &[&root],
        now,
        &Expectation {
            role: PeerRole::Client,
            identity: ExpectedIdentity::Known(Arc::new(|n| n > 300)),
        },
    )
    .unwrap();
    verify_at(&via.chain, &[&root], now, &exact(PeerRole::Server, 301)).unwrap();
}

#[test]
fn each_bad_chain_gets_its_own_variant() {
    let now = base_time();
    let root = Ca::root("root");
    let other = Ca::root("other CA");
    let ok = |spec: LeafSpec| root.issue(&spec).chain;
    let good = LeafSpec::identity(TD, 5, now, HOUR);
    let check = |chain: &[CertificateDer<'static>], expect: &Expectation| {
        verify_at(chain, &[&root], now, expect).unwrap_err()
    };
    let e5 = exact(PeerRole::Server, 5);

    assert_eq!(check(&[], &e5), VerifyError::NoCertificate);

    let mut two = good.clone();
    two.uris.push(format!("spiffe://{TD}/identity/6"));
    assert!(matches!(
        check(&ok(two), &e5),
        VerifyError::MultipleUriSans { count: 2, .. }
    ));

    let mut none = good.clone();
    none.uris.clear();
    assert_eq!(check(&ok(none), &e5), VerifyError::NoUriSan);

    let not_spiffe = LeafSpec::uri("https://meshauth.local/identity/5", now, HOUR);
    assert!(matches!(
        check(&ok(not_spiffe), &e5),
        VerifyError::InvalidSpiffeId { .. }
    ));

    let mut ca_leaf = good.clone();
    ca_leaf.is_ca = true;
    assert!(matches!(
        check(&ok(ca_leaf), &e5),
        VerifyError::LeafIsCa { .. }
    ));

    let foreign = LeafSpec::identity("other.org", 5, now, HOUR);
    assert!(matches!(
        check(&ok(foreign), &e5),
        VerifyError::ForeignTrustDomain { ref expected, .. } if expected == TD
    ));

    let path = LeafSpec::uri(&format!("spiffe://{TD}/ns/default/sa/web"), now, HOUR);
    assert!(matches!(
        check(&ok(path), &e5),
        VerifyError::NotIdentityPath { .. }
    ));

    let mut expired = good.clone();
    expired.not_before = now - 2 * HOUR;
    expired.not_after = now - Duration::from_secs(1);
    assert!(matches!(
        check(&ok(expired), &e5),
        VerifyError::Expired { not_after, .. } if not_after == now - Duration::from_secs(1)
    ));

    let mut future = good.clone();
    future.not_before = now + Duration::from_secs(600);
    future.not_after = now + 2 * HOUR;
    assert!(matches!(
        check(&ok(future), &e5),
        VerifyError::NotYetValid { .. }
    ));

    let untrusted = other.issue(&good).chain;
    let err = check(&untrusted, &e5);
    assert!(
        matches!(err, VerifyError::UntrustedChain { ref reason, .. } if reason.contains("UnknownIssuer")),
        "{err}"
    );

    // Certificate substitution: a valid leaf followed by another (non-CA) leaf.
    let mut substituted = ok(good.clone());
    substituted.push(root.svid(6, now, HOUR).chain[0].clone());
    assert_eq!(
        check(&substituted, &e5),
        VerifyError::NonCaInChain { index: 1 }
    );

    assert_eq!(
        check(&ok(good.clone()), &exact(PeerRole::Server, 6)),
        VerifyError::UnexpectedIdentity {
            expected: 6,
            actual: 5
        }
    );
    let known = Expectation {
        role: PeerRole::Client,
        identity: ExpectedIdentity::Known(Arc::new(|n| n == 6)),
    };
    assert_eq!(
        check(&ok(good.clone()), &known),
        VerifyError::UnknownIdentity { identity: 5 }
    );

    let garbage = vec![rustls_pki_types::CertificateDer::from(
        b"not a cert".to_vec(),
    )];
    assert!(matches!(
        check(&garbage, &e5),
        VerifyError::Malformed { index: 0, .. }
    ));
}

#[test]
fn intermediate_from_another_ca_does_not_chain() {
    let now = base_time();
    let root = Ca::root("root");
    let other_root = Ca::root("other");
    let other = other_root.intermediate("other intermediate");
    let leaf = other.svid(5, now, HOUR);
    let err = verify_at(&leaf.chain, &[&root], now, &exact(PeerRole::Client, 5)).unwrap_err();
    assert!(matches!(err, VerifyError::UntrustedChain { .. }), "{err}");
    // The same chain verifies once its root is in the bundle (CA rotation).
    verify_at(
        &leaf.chain,
        &[&root, &other_root],
        now,
        &exact(PeerRole::Client, 5),
    )
    .unwrap();
}

#[test]
fn extended_key_usage_is_required_if_present() {
    let now = base_time();
    let root = Ca::root("root");
    let mut client_only = LeafSpec::identity(TD, 5, now, HOUR);
    client_only.eku = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let chain = root.issue(&client_only).chain;
    verify_at(&chain, &[&root], now, &exact(PeerRole::Client, 5)).unwrap();
    let err = verify_at(&chain, &[&root], now, &exact(PeerRole::Server, 5)).unwrap_err();
    assert!(matches!(err, VerifyError::UntrustedChain { .. }), "{err}");

    let mut no_eku = LeafSpec::identity(TD, 5, now, HOUR);
    no_eku.eku.clear();
    let chain = root.issue(&no_eku).chain;
    verify_at(&chain, &[&root], now, &exact(PeerRole::Server, 5)).unwrap();
}

#[test]
fn errors_convert_through_rustls_and_have_labels() {
    let e = VerifyError::UnknownIdentity { identity: 9 };
    let r = e.clone().into_rustls();
    assert_eq!(VerifyError::from_rustls(&r), Some(&e));
    assert_eq!(e.label(), "unknown_identity");
    assert_eq!(
        VerifyError::from_rustls(&rustls::Error::NoCertificatesPresented),
        None
    );
}

/// The SPIFFE X.509-SVID rules and every certificate's validity period hold
/// on the remembered-chain path exactly as on the full path: each forged
/// chain is refused by a fresh verifier and by one that has just verified
/// (and remembered) a good chain; and a remembered good chain stops
/// counting once its intermediate expires.
#[test]
fn spiffe_rules_hold_uncached_and_after_a_good_chain_was_remembered() {
    let now = base_time();
    let root = Ca::root("root");
    let ca_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let inter = root.intermediate_with(
        "short-lived intermediate",
        now - HOUR,
        now + 10 * 60 * Duration::from_secs(1),
        ca_usages.clone(),
    );
    let expired_inter = root.intermediate_with(
        "expired intermediate",
        now - 2 * HOUR,
        now - Duration::from_secs(1),
        ca_usages,
    );
    let future_inter = root.intermediate_with(
        "intermediate not yet valid",
        now + 5 * 60 * Duration::from_secs(1),
        now + 2 * HOUR,
        vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ],
    );
    let no_sign_inter = root.intermediate_with(
        "intermediate without keyCertSign",
        now - HOUR,
        now + HOUR,
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
    );
    let good_spec = LeafSpec::identity(TD, 5, now, HOUR);
    let good = inter.issue(&good_spec).chain;

    let mut ca_leaf = good_spec.clone();
    ca_leaf.is_ca = true;
    let mut no_digital_signature = good_spec.clone();
    no_digital_signature.key_usages = Some(vec![
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ]);
    let mut no_key_usage = good_spec.clone();
    no_key_usage.key_usages = Some(Vec::new());
    let mut cert_sign_leaf = good_spec.clone();
    cert_sign_leaf.key_usages = Some(vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ]);
    let mut two_uris = good_spec.clone();
    two_uris.uris.push(format!("spiffe://{TD}/identity/6"));

    type Check = fn(&VerifyError) -> bool;
    let forged: Vec<(&str, Vec<CertificateDer<'static>>, Check)> = vec![
        (
            "expired intermediate",
            expired_inter.issue(&good_spec).chain,
            |e| matches!(e, VerifyError::IntermediateExpired { index: 1, .. }),
        ),
        (
            "intermediate not yet valid",
            future_inter.issue(&good_spec).chain,
            |e| matches!(e, VerifyError::IntermediateNotYetValid { index: 1, .. }),
        ),
        ("CA leaf", inter.issue(&ca_leaf).chain, |e| {
            matches!(e, VerifyError::LeafIsCa { .. })
        }),
        (
            "leaf without digitalSignature",
            inter.issue(&no_digital_signature).chain,
            |e| matches!(e, VerifyError::LeafKeyUsage { reason, .. } if reason.contains("digitalSignature missing")),
        ),
        (
            "leaf without keyUsage",
            inter.issue(&no_key_usage).chain,
            |e| matches!(e, VerifyError::LeafKeyUsage { reason, .. } if reason.contains("no keyUsage")),
        ),
        (
            "leaf with keyCertSign",
            inter.issue(&cert_sign_leaf).chain,
            |e| matches!(e, VerifyError::LeafKeyUsage { reason, .. } if reason.contains("keyCertSign")),
        ),
        ("two URI SANs", inter.issue(&two_uris).chain, |e| {
            matches!(e, VerifyError::MultipleUriSans { count: 2, .. })
        }),
        (
            "intermediate without keyCertSign",
            no_sign_inter.issue(&good_spec).chain,
            |e| matches!(e, VerifyError::CaKeyUsage { index: 1 }),
        ),
    ];

    for role in [PeerRole::Server, PeerRole::Client] {
        let expect = exact(role, 5);
        // Uncached: a fresh verifier per chain.
        for (what, chain, check) in &forged {
            let e = verify_at(chain, &[&root], now, &expect)
                .expect_err(&format!("{role:?}, uncached: {what} must be refused"));
            assert!(check(&e), "{role:?}, uncached: {what}: wrong error {e}");
            // The pure function agrees.
            let pure = verify_peer(chain, &bundle(&[&root]), now, &expect).unwrap_err();
            assert_eq!(
                pure, e,
                "{role:?}: verify_peer and the verifier disagree on {what}"
            );
        }
        // After a good chain was verified twice (the second time remembered).
        let clock = ManualClock::new(now);
        let cache = verifier_cache(&[&root], clock.clone());
        production_verify(&cache, &good, &expect).expect("good chain");
        production_verify(&cache, &good, &expect).expect("good chain, remembered");
        for (what, chain, check) in &forged {
            let e = production_verify(&cache, chain, &expect)
                .expect_err(&format!("{role:?}, cached: {what} must be refused"));
            assert!(check(&e), "{role:?}, cached: {what}: wrong error {e}");
        }
        // The remembered good chain still counts while every certificate is valid…
        clock.set(now + 9 * 60 * Duration::from_secs(1));
        production_verify(&cache, &good, &expect)
            .expect("good chain before the intermediate expires");
        // …and not once its intermediate expired, though the leaf has 50 minutes left.
        clock.set(now + 10 * 60 * Duration::from_secs(1));
        let e = production_verify(&cache, &good, &expect)
            .expect_err("a remembered chain whose intermediate expired must be refused");
        assert!(
            matches!(e, VerifyError::IntermediateExpired { index: 1, .. }),
            "{role:?}: {e}"
        );
    }
}
