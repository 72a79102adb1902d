//! Real rustls TLS 1.3 handshakes between a client config (client resolver +
//! server verifier) and a server config (SNI resolver + client verifier), over
//! an in-memory pipe.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::SystemTime;

use meshauth_test_support::certs::{Ca, HOUR, Leaf, MINUTE, base_time, bundle};
use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::ServerName;
use svid_cache::{
    CacheConfig, ServerCertResolver, SpiffeClientVerifier, SvidCache, TokioClock, Update,
    VerifyError, tls,
};

#[derive(Debug)]
enum Side {
    Client,
    Server,
}

/// A node's cache holding `leaves` and trusting `trust`.
fn node(now: SystemTime, trust: &[&Ca], leaves: &[&Leaf]) -> SvidCache {
    let cache = SvidCache::with_clock(
        CacheConfig::default(),
        Arc::new(TokioClock::starting_at(now)),
    );
    cache
        .apply(Update {
            svids: Some(leaves.iter().map(|l| l.input()).collect()),
            bundle: Some(bundle(trust)),
        })
        .unwrap();
    cache
}

/// Runs the handshake to completion, then one message each way.
fn handshake(
    client_cache: &SvidCache,
    local: u32,
    remote: u32,
    sni_identity: u32,
    server: (ServerCertResolver, SpiffeClientVerifier),
) -> Result<(ClientConnection, ServerConnection), (Side, rustls::Error)> {
    let client_cfg = tls::client_config(client_cache, local, remote).unwrap();
    let server_cfg = tls::server_config(server.0, server.1).unwrap();
    let name = ServerName::try_from(client_cache.trust_domain().server_name(sni_identity)).unwrap();
    let mut c = ClientConnection::new(Arc::new(client_cfg), name).unwrap();
    let mut s = ServerConnection::new(Arc::new(server_cfg)).unwrap();
    for _ in 0..16 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().map_err(|e| (Side::Server, e))?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().map_err(|e| (Side::Client, e))?;
        }
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    // Data flows both ways.
    c.writer().write_all(b"meshauth/1 hello").unwrap();
    let mut buf = Vec::new();
    c.write_tls(&mut buf).unwrap();
    s.read_tls(&mut &buf[..]).unwrap();
    s.process_new_packets().map_err(|e| (Side::Server, e))?;
    let mut got = [0u8; 16];
    s.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"meshauth/1 hello");
    Ok((c, s))
}

fn verify_error(side: &Side, e: &rustls::Error) -> VerifyError {
    VerifyError::from_rustls(e)
        .unwrap_or_else(|| panic!("{side:?} failed with a non-SPIFFE error: {e:?}"))
        .clone()
}

struct Pair {
    now: SystemTime,
    root: Ca,
    client: SvidCache,
    server: SvidCache,
}

/// Node X runs identity 300 (client), node Y runs 400 and 401 (server).
fn pair() -> Pair {
    let now = base_time();
    let root = Ca::root("root");
    let client = node(now, &[&root], &[&root.svid(300, now, HOUR)]);
    let server = node(
        now,
        &[&root],
        &[&root.svid(400, now, HOUR), &root.svid(401, now, HOUR)],
    );
    Pair {
        now,
        root,
        client,
        server,
    }
}

fn accept_known(p: &Pair, known: &'static [u32]) -> (ServerCertResolver, SpiffeClientVerifier) {
    (
        ServerCertResolver::new(p.server.clone()),
        SpiffeClientVerifier::known(p.server.clone(), move |n| known.contains(&n)),
    )
}

#[test]
fn mutual_handshake_succeeds_and_both_sides_see_the_right_identity() {
    let p = pair();
    let (c, s) = handshake(&p.client, 300, 400, 400, accept_known(&p, &[300])).unwrap();
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let server_leaf = &c.peer_certificates().unwrap()[0];
    assert_eq!(server_leaf, p.server.get(400).unwrap().leaf());
    let client_leaf = &s.peer_certificates().unwrap()[0];
    assert_eq!(client_leaf, p.client.get(300).unwrap().leaf());
    assert_eq!(s.server_name(), Some("400.meshauth.local"));

    // The SNI picks the certificate: 401 is served when asked for.
    let (c, _) = handshake(&p.client, 300, 401, 401, accept_known(&p, &[300])).unwrap();
    assert_eq!(
        &c.peer_certificates().unwrap()[0],
        p.server.get(401).unwrap().leaf()
    );

    // An exact client expectation works too.
    let exact = (
        ServerCertResolver::new(p.server.clone()),
        SpiffeClientVerifier::exact(p.server.clone(), 300),
    );
    handshake(&p.client, 300, 400, 400, exact).unwrap();
}

#[test]
fn client_rejects_a_server_that_is_not_the_expected_identity() {
    let p = pair();
    // Asks for 401 by SNI but expects 400: the server presents 401.
    let (side, e) = handshake(&p.client, 300, 400, 401, accept_known(&p, &[300])).unwrap_err();
    assert!(matches!(side, Side::Client));
    assert_eq!(
        verify_error(&side, &e),
        VerifyError::UnexpectedIdentity {
            expected: 400,
            actual: 401
        }
    );
}

#[test]
fn server_rejects_unknown_and_unexpected_clients() {
    let p = pair();
    let (side, e) = handshake(&p.client, 300, 400, 400, accept_known(&p, &[999])).unwrap_err();
    assert!(matches!(side, Side::Server), "{side:?} {e:?}");
    assert_eq!(
        verify_error(&side, &e),
        VerifyError::UnknownIdentity { identity: 300 }
    );

    let exact = (
        ServerCertResolver::new(p.server.clone()),
        SpiffeClientVerifier::exact(p.server.clone(), 301),
    );
    let (side, e) = handshake(&p.client, 300, 400, 400, exact).unwrap_err();
    assert_eq!(
        verify_error(&side, &e),
        VerifyError::UnexpectedIdentity {
            expected: 301,
            actual: 300
        }
    );
}

#[test]
fn server_rejects_a_client_from_another_ca() {
    let p = pair();
    let rogue = Ca::root("rogue");
    // The rogue node trusts everyone, but the server only trusts its own root.
    let client = node(p.now, &[&rogue, &p.root], &[&rogue.svid(300, p.now, HOUR)]);
    let (side, e) = handshake(&client, 300, 400, 400, accept_known(&p, &[300])).unwrap_err();
    assert!(matches!(side, Side::Server));
    assert!(matches!(
        verify_error(&side, &e),
        VerifyError::UntrustedChain { .. }
    ));
}

#[test]
fn client_rejects_a_server_from_another_ca() {
    let p = pair();
    let rogue = Ca::root("rogue");
    let rogue_server = node(p.now, &[&rogue, &p.root], &[&rogue.svid(400, p.now, HOUR)]);
    let server = (
        ServerCertResolver::new(rogue_server.clone()),
        SpiffeClientVerifier::known(rogue_server, |_| true),
    );
    let (side, e) = handshake(&p.client, 300, 400, 400, server).unwrap_err();
    assert!(matches!(side, Side::Client));
    assert!(matches!(
        verify_error(&side, &e),
        VerifyError::UntrustedChain { .. }
    ));
}

#[test]
fn a_client_without_a_valid_svid_presents_nothing_and_is_refused() {
    let p = pair();
    // The client asks to present 302, which it does not hold.
    let (side, e) = handshake(&p.client, 302, 400, 400, accept_known(&p, &[300])).unwrap_err();
    assert!(matches!(side, Side::Server));
    assert_eq!(e, rustls::Error::NoCertificatesPresented);
}

#[test]
fn the_server_serves_nothing_for_a_foreign_or_filtered_sni() {
    let p = pair();
    // 402 is not held by the server.
    let (side, _) = handshake(&p.client, 300, 402, 402, accept_known(&p, &[300])).unwrap_err();
    assert!(matches!(side, Side::Server));
    // 400 is held but filtered out (no local endpoint).
    let filtered = (
        ServerCertResolver::new(p.server.clone()).with_filter(|n| n != 400),
        SpiffeClientVerifier::known(p.server.clone(), |_| true),
    );
    let (side, _) = handshake(&p.client, 300, 400, 400, filtered).unwrap_err();
    assert!(matches!(side, Side::Server));
}

#[tokio::test(start_paused = true)]
async fn an_expired_local_svid_is_not_presented() {
    let now = base_time();
    let root = Ca::root("root");
    let client = node(now, &[&root], &[&root.svid(300, now, 2 * MINUTE)]);
    let server = node(now, &[&root], &[&root.svid(400, now, HOUR)]);
    let accept = || {
        (
            ServerCertResolver::new(server.clone()),
            SpiffeClientVerifier::known(server.clone(), |_| true),
        )
    };
    handshake(&client, 300, 400, 400, accept()).unwrap();
    tokio::time::advance(2 * MINUTE).await;
    let (side, e) = handshake(&client, 300, 400, 400, accept()).unwrap_err();
    assert!(matches!(side, Side::Server));
    assert_eq!(e, rustls::Error::NoCertificatesPresented);
}

#[tokio::test(start_paused = true)]
async fn a_remembered_chain_still_expires_and_follows_the_bundle() {
    use rustls::client::danger::ServerCertVerifier as _;
    use svid_cache::SpiffeServerVerifier;

    let now = base_time();
    let root = Ca::root("root");
    let cache = node(now, &[&root], &[&root.svid(300, now, 3 * HOUR)]);
    let peer = root.svid(400, now, HOUR);
    let name = ServerName::try_from("400.meshauth.local").unwrap();
    let unix = rustls_pki_types::UnixTime::now();
    let verify = |expected: u32| {
        SpiffeServerVerifier::new(cache.clone(), expected).verify_server_cert(
            &peer.chain[0],
            &peer.chain[1..],
            &name,
            &[],
            unix,
        )
    };
    // Verified, then verified again (the second time from the remembered chain).
    verify(400).expect("first verification");
    verify(400).expect("second verification");
    // The identity is still checked on a remembered chain.
    let e = verify(401).unwrap_err();
    assert!(
        matches!(
            verify_error(&Side::Client, &e),
            VerifyError::UnexpectedIdentity {
                expected: 401,
                actual: 400
            }
        ),
        "{e:?}"
    );
    // Past the leaf's NotAfter the remembered chain does not count.
    tokio::time::advance(HOUR + std::time::Duration::from_secs(60)).await;
    let e = verify(400).unwrap_err();
    assert!(
        matches!(verify_error(&Side::Client, &e), VerifyError::Expired { .. }),
        "{e:?}"
    );
    // A new bundle without the old root: a remembered chain that is still
    // within every validity period is checked again, and refused.
    let lasting = root.svid(401, now + HOUR, HOUR);
    let verify_lasting = || {
        SpiffeServerVerifier::new(cache.clone(), 401).verify_server_cert(
            &lasting.chain[0],
            &lasting.chain[1..],
            &name,
            &[],
            unix,
        )
    };
    verify_lasting().expect("first verification of the lasting chain");
    verify_lasting().expect("the lasting chain, remembered");
    let root2 = Ca::root("root2");
    cache
        .apply(Update {
            svids: Some(vec![root2.svid(300, now + HOUR, HOUR).input()]),
            bundle: Some(bundle(&[&root2])),
        })
        .unwrap();
    let e = verify_lasting().unwrap_err();
    assert!(
        matches!(
            verify_error(&Side::Client, &e),
            VerifyError::UntrustedChain { .. }
        ),
        "a remembered chain must not outlive the bundle it was verified against: {e:?}"
    );
    // The old root back (a new bundle instance again): accepted again.
    cache
        .apply(Update {
            svids: Some(vec![root.svid(300, now + HOUR, HOUR).input()]),
            bundle: Some(bundle(&[&root])),
        })
        .unwrap();
    verify_lasting().expect("the lasting chain under its own root again");
}
