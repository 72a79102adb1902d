//! `verify_peer`: every rejection case has its own variant; good chains pass.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Ca, HOUR, LeafSpec, TD, base_time, bundle};
use rcgen::ExtendedKeyUsagePurpose;
use svid_cache::{Expectation, ExpectedIdentity, PeerRole, VerifyError, verify_peer};

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
    let b = bundle(&[&root]);
    let direct = root.svid(300, now, HOUR);
    let peer = verify_peer(&direct.chain, &b, now, &exact(PeerRole::Client, 300)).unwrap();
    assert_eq!(peer.identity, 300);
    assert_eq!(peer.spiffe_id, format!("spiffe://{TD}/identity/300"));
    assert_eq!(peer.not_after, now + HOUR);

    let via = inter.svid(301, now, HOUR);
    assert_eq!(via.chain.len(), 2);
    let peer = verify_peer(
        &via.chain,
        &b,
        now,
        &Expectation {
            role: PeerRole::Server,
            identity: ExpectedIdentity::Known(Arc::new(|n| n > 300)),
        },
    )
    .unwrap();
    assert_eq!(peer.identity, 301);
}

#[test]
fn each_bad_chain_gets_its_own_variant() {
    let now = base_time();
    let root = Ca::root("root");
    let other = Ca::root("other CA");
    let b = bundle(&[&root]);
    let ok = |spec: LeafSpec| root.issue(&spec).chain;
    let good = LeafSpec::identity(TD, 5, now, HOUR);
    let check =
        |chain: &[_], expect: &Expectation| verify_peer(chain, &b, now, expect).unwrap_err();
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
    let err = verify_peer(
        &leaf.chain,
        &bundle(&[&root]),
        now,
        &exact(PeerRole::Client, 5),
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::UntrustedChain { .. }), "{err}");
    // The same chain verifies once its root is in the bundle (CA rotation).
    let peer = verify_peer(
        &leaf.chain,
        &bundle(&[&root, &other_root]),
        now,
        &exact(PeerRole::Client, 5),
    )
    .unwrap();
    assert_eq!(peer.identity, 5);
}

#[test]
fn extended_key_usage_is_required_if_present() {
    let now = base_time();
    let root = Ca::root("root");
    let b = bundle(&[&root]);
    let mut client_only = LeafSpec::identity(TD, 5, now, HOUR);
    client_only.eku = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let chain = root.issue(&client_only).chain;
    verify_peer(&chain, &b, now, &exact(PeerRole::Client, 5)).unwrap();
    let err = verify_peer(&chain, &b, now, &exact(PeerRole::Server, 5)).unwrap_err();
    assert!(matches!(err, VerifyError::UntrustedChain { .. }), "{err}");

    let mut no_eku = LeafSpec::identity(TD, 5, now, HOUR);
    no_eku.eku.clear();
    let chain = root.issue(&no_eku).chain;
    verify_peer(&chain, &b, now, &exact(PeerRole::Server, 5)).unwrap();
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
