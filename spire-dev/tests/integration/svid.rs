//! X.509-SVID properties, checked by parsing what the Workload API serves.

use std::time::Duration;

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

use crate::support::*;

#[tokio::test]
async fn svid_is_a_spiffe_leaf_with_the_entry_ttl() {
    let ttl = Duration::from_secs(90);
    let d = start(&["a"], vec![entry_ttl("a", "/identity/4242", ttl)]).await;
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    let m = next("first message", &mut s).await;
    assert_eq!(m.svids.len(), 1);
    let svid = &m.svids[0];
    let chain = split_certs(&svid.x509_svid);
    assert_eq!(chain.len(), 1, "leaf signed by the root directly");
    let cert = parse(&chain[0]);

    // ECDSA P-256 key.
    let spki = &cert.public_key().algorithm;
    assert_eq!(spki.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY, "EC public key");
    let curve = spki
        .parameters
        .as_ref()
        .expect("EC parameters")
        .as_oid()
        .expect("named curve");
    assert_eq!(curve, OID_EC_P256, "P-256 curve");

    // Exactly one URI SAN, the entry's SPIFFE ID; no other SAN.
    let san = cert
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN present");
    let names = &san.value.general_names;
    assert_eq!(names.len(), 1, "exactly one SAN: {names:?}");
    assert!(
        matches!(
            names[0],
            GeneralName::URI("spiffe://meshauth.local/identity/4242")
        ),
        "{names:?}"
    );
    assert_eq!(svid.spiffe_id, "spiffe://meshauth.local/identity/4242");

    // KeyUsage digitalSignature only, critical.
    let ku = cert.key_usage().expect("KU parses").expect("KU present");
    assert!(ku.value.digital_signature(), "digitalSignature");
    assert_eq!(ku.value.flags, 1, "digitalSignature only: {}", ku.value);
    assert!(ku.critical, "KeyUsage critical");

    // BasicConstraints present, not a CA.
    let bc = cert
        .basic_constraints()
        .expect("BC parses")
        .expect("BC present");
    assert!(!bc.value.ca, "leaf must not be a CA");

    // EKU serverAuth + clientAuth.
    let eku = cert
        .extended_key_usage()
        .expect("EKU parses")
        .expect("EKU present");
    assert!(
        eku.value.server_auth && eku.value.client_auth,
        "{:?}",
        eku.value
    );

    // Validity: NotAfter = issuance + TTL, NotBefore backdated by SVID_BACKDATE.
    let v = cert.validity();
    let life = v.not_after.timestamp() - v.not_before.timestamp();
    let want = i64::try_from((ttl + spire_dev::ca::SVID_BACKDATE).as_secs()).expect("secs");
    assert_eq!(life, want, "NotAfter - NotBefore = TTL + backdate");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let remaining = v.not_after.timestamp() - now;
    assert!(
        (88..=90).contains(&remaining),
        "NotAfter about TTL from now, got {remaining}s"
    );
    assert!(v.not_before.timestamp() < now, "NotBefore in the past");

    // Issued by the trust domain's CA, which has the AKI/SKI link.
    let bundle = split_certs(&svid.bundle);
    assert_eq!(bundle.len(), 1);
    assert_eq!(cert.issuer(), parse(&bundle[0]).subject());
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.clone(),
            _ => None,
        })
        .expect("AKI present");
    let ca = parse(&bundle[0]);
    let ski = ca
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.clone()),
            _ => None,
        })
        .expect("CA SKI present");
    assert_eq!(aki.0, ski.0, "AKI of the leaf = SKI of the CA");
    assert!(ca.is_ca(), "bundle cert is a CA");
}

#[tokio::test]
async fn default_ttl_is_one_hour() {
    let d = start(&["a"], vec![entry("a", "/identity/1")]).await;
    let info = &d.dev.agent("a").expect("agent").identities()[0];
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (3598..=3600).contains(&(info.not_after - now)),
        "default TTL 1h, got {}s",
        info.not_after - now
    );
}
