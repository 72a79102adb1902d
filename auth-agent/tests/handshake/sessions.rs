//! `meshauth/2` sessions: pairs after the first proved over one connection,
//! interoperation with `meshauth/1` agents, idle sessions closed, and every
//! check on a proof attacked by an initiator that holds a valid SVID and an
//! open session (and by a responder whose answers do not hold).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use auth_agent::handshake::proof::{self, Signer, Statement};
use auth_agent::handshake::protocol::{self, Hello, Message, Proof, Version};
use auth_agent::handshake::{HandshakeError, Metrics, Role};
use meshauth_test_support::certs::{Ca, HOUR, TD, base_time, td};
use policy_bridge::{AuthRule, Direction, Endpoint, Identity, PortRange, Protocol, Remote};
use rustls::SignatureScheme;
use rustls::pki_types::ServerName;
use svid_cache::Svid;
use tokio::net::TcpListener;

use super::*;

/// A second identity on node-a that must authenticate to 257.
const L2: u32 = 259;

fn desired_two() -> DesiredState {
    let mut d = desired(None, None);
    d.identities.insert(
        L2,
        Identity {
            id: L2,
            labels: BTreeSet::from([format!("k8s:app=w{L2}")]),
        },
    );
    let ip: IpAddr = "10.0.1.2".parse().expect("ip");
    d.endpoints.insert(
        ip,
        Endpoint {
            ip,
            identity: L2,
            node: "node-a".into(),
            pod: format!("default/w{L2}"),
        },
    );
    for (local, remote, direction) in [(L2, R, Direction::Egress), (R, L2, Direction::Ingress)] {
        d.rules.insert(AuthRule {
            local,
            remote: Remote::Identity(remote),
            direction,
            protocol: Protocol::Tcp,
            ports: PortRange::ANY,
        });
    }
    d
}

fn svid(leaf: &Leaf) -> Svid {
    Svid::build(&leaf.input(), &td(), None, base_time())
        .unwrap_or_else(|e| panic!("SVID of {}: {e}", leaf.spiffe_id))
}

fn node_b() -> NodeInfo {
    node_info("node-b", B_IP, None)
}

/// SVIDs of L and L2 (node-a) and R (node-b), of different lifetimes.
fn leaves(ca: &Ca) -> (Leaf, Leaf, Leaf) {
    (
        ca.svid(L, base_time(), HOUR),
        ca.svid(L2, base_time(), 2 * HOUR),
        ca.svid(R, base_time(), 3 * HOUR),
    )
}

/// node-b's responder holding R's SVID, and node-a's initiator holding L's
/// and L2's, toward it.
async fn responder_and_initiator(
    ca: &Ca,
    (l, l2, r): (&Leaf, &Leaf, &Leaf),
) -> (Responder, HandshakeClient) {
    let resp = Responder::start(cache_with(ca, &[r]), desired_two(), |_| {}).await;
    let client = initiator(
        cache_with(ca, &[l, l2]),
        resp.addr.port(),
        Metrics::default(),
    );
    (resp, client)
}

/// The pairs the responder's store holds, as (local, remote).
fn stored(resp: &Responder) -> BTreeSet<(u32, u32)> {
    resp.store
        .snapshot()
        .keys()
        .map(|p| (p.local, p.remote))
        .collect()
}

/// Waits until `cond` holds (polling), or panics naming `what`.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn pairs_after_the_first_are_proved_over_one_pipelined_session() {
    let ca = Ca::root("meshauth test CA");
    let (l, l2, r) = leaves(&ca);
    let (mut resp, client) = responder_and_initiator(&ca, (&l, &l2, &r)).await;

    let first = client.handshake(L, R, &node_b()).await.expect("first pair");
    let second = client
        .handshake(L2, R, &node_b())
        .await
        .expect("second pair");
    assert_eq!(resp.metrics.accepted.get(), 1, "one connection for both");
    assert_eq!(client.open_sessions(), 1);
    // Each pair's expiry is the earlier of its own two leaves.
    assert_eq!(first.expiry, svid(&l).not_after());
    assert_eq!(second.expiry, svid(&l2).not_after());
    assert_eq!(second.peer_node, "node-b");
    for what in ["opening pair", "proved pair"] {
        let o = resp.next_outcome(what).await;
        let a = o.result.as_ref().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(a.stored, "{what}: {a:?}");
    }
    assert_eq!(stored(&resp), BTreeSet::from([(R, L), (R, L2)]));
    let expiry_l2 = resp
        .store
        .snapshot()
        .into_iter()
        .find(|(p, _)| p.remote == L2)
        .map(|(_, t)| t);
    assert_eq!(expiry_l2, Some(svid(&l2).not_after()));

    // 64 proofs at once go over the same session, answered by number.
    let results = futures::future::join_all((0..64).map(|i| {
        let c = client.clone();
        async move {
            c.handshake(if i % 2 == 0 { L } else { L2 }, R, &node_b())
                .await
        }
    }))
    .await;
    for (i, r) in results.iter().enumerate() {
        r.as_ref()
            .unwrap_or_else(|e| panic!("proof {i} of 64 failed: {e}"));
    }
    assert_eq!(resp.metrics.accepted.get(), 1, "still one connection");
    assert_eq!(resp.metrics.count(Role::Responder, "ok"), 66);
    resp.stop().await;
}

#[tokio::test]
async fn agents_with_and_without_sessions_interoperate() {
    let ca = Ca::root("meshauth test CA");
    let (l, l2, r) = (
        ca.svid(L, base_time(), HOUR),
        ca.svid(L2, base_time(), HOUR),
        ca.svid(R, base_time(), HOUR),
    );
    // (responder offers sessions, initiator offers sessions, connections for 3 pairs)
    for (server_v2, client_v2, connections, sessions) in [
        (false, true, 3, 0),
        (true, false, 3, 0),
        (true, true, 1, 1),
        (false, false, 3, 0),
    ] {
        let case = format!("responder sessions {server_v2}, initiator sessions {client_v2}");
        let resp = Responder::start(cache_with(&ca, &[&r]), desired_two(), |o| {
            o.sessions = server_v2
        })
        .await;
        let mut opts = ClientOptions::new(cache_with(&ca, &[&l, &l2]), "node-a");
        opts.port = resp.addr.port();
        opts.source_addr = Some(A_IP);
        opts.sessions = client_v2;
        let client = HandshakeClient::new(opts, Metrics::default());
        for local in [L, L2, L] {
            client
                .handshake(local, R, &node_b())
                .await
                .unwrap_or_else(|e| panic!("{case}: ({local}, {R}): {e}"));
        }
        assert_eq!(resp.metrics.accepted.get(), connections, "{case}");
        assert_eq!(client.open_sessions(), sessions, "{case}");
        assert_eq!(stored(&resp), BTreeSet::from([(R, L), (R, L2)]), "{case}");
        resp.stop().await;
    }
}

#[tokio::test]
async fn a_quiet_session_is_closed_and_the_next_pair_opens_another() {
    let ca = Ca::root("meshauth test CA");
    let (l, r) = (ca.svid(L, base_time(), HOUR), ca.svid(R, base_time(), HOUR));
    let resp = Responder::start(cache_with(&ca, &[&r]), desired(None, None), |o| {
        o.session_idle_timeout = Duration::from_millis(150);
    })
    .await;
    let mut opts = ClientOptions::new(cache_with(&ca, &[&l]), "node-a");
    opts.port = resp.addr.port();
    opts.source_addr = Some(A_IP);
    // Longer than the responder's idle timeout: the initiator learns of the
    // close from the stream, not from its own clock.
    opts.session_reuse_window = Duration::from_secs(60);
    let client = HandshakeClient::new(opts, Metrics::default());
    client.handshake(L, R, &node_b()).await.expect("opening");
    assert_eq!(client.open_sessions(), 1);
    until("the responder closes the quiet session", || {
        client.open_sessions() == 0
    })
    .await;
    client
        .handshake(L, R, &node_b())
        .await
        .expect("after close");
    assert_eq!(resp.metrics.accepted.get(), 2);
    assert_eq!(client.open_sessions(), 1);
    resp.stop().await;
}

/// A hand-built initiator on node-a's address with a session it opened as
/// `opener` (a valid SVID): what an attacker who owns a pod's identity on
/// node-a can reach.
struct RawSession {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    exporter: [u8; 32],
}

impl RawSession {
    async fn open(addr: SocketAddr, opener: &Leaf, opener_id: u32) -> Self {
        let mut config = raw_client_config(Some(opener), false);
        config.alpn_protocols = vec![b"meshauth/2".to_vec()];
        let tcp = tcp_from(A_IP, addr).await;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(format!("{R}.{TD}")).expect("sni"), tcp)
            .await
            .expect("TLS with a valid SVID");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"meshauth/2"[..]));
        protocol::write_as(
            &mut tls,
            Version::V2,
            &Message::Hello(Hello {
                node: "node-a".into(),
                local: opener_id,
                remote: R,
                wireguard_key: None,
            }),
        )
        .await
        .expect("hello");
        let reply = protocol::read_as(&mut tls, Version::V2)
            .await
            .expect("reply");
        assert!(matches!(reply, Message::Hello(_)), "{reply:?}");
        let exporter = tls
            .get_ref()
            .1
            .export_keying_material([0u8; 32], proof::EXPORTER_LABEL, None)
            .expect("exporter");
        Self { tls, exporter }
    }

    fn statement(&self, id: u64, l: u32, r: u32) -> Statement<'_> {
        Statement {
            exporter: &self.exporter,
            id,
            initiator: l,
            responder: r,
            initiator_node: "node-a",
            responder_node: "node-b",
        }
    }

    /// A valid proof of (`signer`'s identity, R) numbered `id`.
    fn valid(&self, id: u64, signer: &Leaf, l: u32) -> Proof {
        proof::make(
            Signer::Initiator,
            &self.statement(id, l, R),
            &svid(signer),
            None,
            None,
        )
        .expect("signing")
        .0
    }

    /// Sends `m`; returns the answer, or `None` when the session ended.
    async fn send(&mut self, m: &Message) -> Option<Message> {
        protocol::write_as(&mut self.tls, Version::V2, m)
            .await
            .ok()?;
        tokio::time::timeout(WAIT, protocol::read_as(&mut self.tls, Version::V2))
            .await
            .expect("an answer or the end within WAIT")
            .ok()
    }
}

/// Signs `message` with `leaf`'s key.
fn sign_with(leaf: &Leaf, message: &[u8]) -> String {
    use base64::Engine as _;
    let (_, sig) = svid_cache::proof::sign(svid(leaf).certified_key(), message).expect("sign");
    base64::engine::general_purpose::STANDARD.encode(sig)
}

fn b64(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der)
}

#[tokio::test]
async fn proofs_that_try_to_get_past_the_checks_are_refused() {
    let ca = Ca::root("meshauth test CA");
    let other_ca = Ca::root("someone else's CA");
    let (l, l2, r, r2) = (
        ca.svid(L, base_time(), HOUR),
        ca.svid(L2, base_time(), HOUR),
        ca.svid(R, base_time(), HOUR),
        ca.svid(NO_ENDPOINT, base_time(), HOUR),
    );
    let mut resp = Responder::start(cache_with(&ca, &[&r, &r2]), desired_two(), |_| {}).await;
    // The attacker owns 256's SVID; 259's certificate is public, its key is not.
    let mut s = RawSession::open(resp.addr, &l, L).await;
    let mut other = RawSession::open(resp.addr, &l, L).await;
    for what in ["session 1", "session 2"] {
        resp.next_outcome(what).await.result.as_ref().expect(what);
    }
    // Opening stored (257, 256); nothing else may be stored below.
    let opened = BTreeSet::from([(R, L)]);
    assert_eq!(stored(&resp), opened);

    // Each case: a proof built to get past one check, the label it must get.
    let forged = other_ca.svid(L2, base_time(), HOUR);
    let mut cases: Vec<(&str, Proof, &str)> = Vec::new();
    // Relayed: a genuine proof made for another session (a relay between
    // two TLS sessions cannot make its exporter match).
    let mut relayed = other.valid(1, &l, L);
    relayed.id = 1;
    cases.push((
        "a proof from another session",
        relayed,
        "proof_signature_invalid",
    ));
    // 259's public chain, signed with 256's key.
    let mut p = s.valid(2, &l, L2);
    p.chain = l2.chain.iter().map(|c| b64(c)).collect();
    cases.push((
        "259's chain signed with 256's key",
        p,
        "proof_signature_invalid",
    ));
    // A chain and key of 259 from another CA, signed consistently.
    let p = proof::make(
        Signer::Initiator,
        &s.statement(3, L2, R),
        &svid(&forged),
        None,
        None,
    )
    .expect("forged")
    .0;
    cases.push(("a forged 259 from another CA", p, "untrusted_chain"));
    // Stating 259 while proving with 256's own chain and key.
    let mut p = s.valid(4, &l, L);
    p.local = L2;
    cases.push((
        "stating 259 with 256's chain",
        p,
        "message_identity_mismatch",
    ));
    // Claiming to be another node.
    let mut p = s.valid(5, &l, L);
    p.node = "node-b".into();
    cases.push(("stating another node", p, "node_name_mismatch"));
    // A signature over another request number (to be replayed later).
    let mut p = s.valid(7, &l, L);
    p.id = 6;
    cases.push((
        "a signature for another number",
        p,
        "proof_signature_invalid",
    ));
    // Re-signed with the exporter left out (all zeros).
    let mut p = s.valid(8, &l, L);
    let zeros = [0u8; 32];
    let st = Statement {
        exporter: &zeros,
        ..s.statement(8, L, R)
    };
    p.signature = sign_with(
        &l,
        &proof::transcript(Signer::Initiator, &st, None, &l.chain[0], None),
    );
    cases.push((
        "signed without the session's exporter",
        p,
        "proof_signature_invalid",
    ));
    // The responder's context: a proof crafted to be read as the other role.
    let mut p = s.valid(9, &l, L);
    p.signature = sign_with(
        &l,
        &proof::transcript(
            Signer::Responder,
            &s.statement(9, L, R),
            None,
            &l.chain[0],
            None,
        ),
    );
    cases.push((
        "signed in the responder's role",
        p,
        "proof_signature_invalid",
    ));
    // An identity with no endpoint on node-b.
    let p = proof::make(
        Signer::Initiator,
        &s.statement(10, L, NO_ENDPOINT),
        &svid(&l),
        None,
        None,
    )
    .expect("sign")
    .0;
    cases.push((
        "a pair toward an identity not on node-b",
        p,
        "no_local_endpoint",
    ));
    // Malformed proofs.
    let mut p = s.valid(11, &l, L);
    p.chain.clear();
    cases.push(("an empty chain", p, "proof_malformed"));
    let mut p = s.valid(12, &l, L);
    p.chain = vec![p.chain[0].clone(); 5];
    cases.push(("a chain of five", p, "proof_malformed"));
    let mut p = s.valid(13, &l, L);
    p.chain[0] = "not base64!".into();
    cases.push(("a chain that is not base64", p, "proof_malformed"));
    let mut p = s.valid(14, &l, L);
    p.signature = "%%".into();
    cases.push(("a signature that is not base64", p, "proof_malformed"));
    let mut p = s.valid(15, &l, L);
    p.scheme = u16::from(SignatureScheme::RSA_PKCS1_SHA256);
    cases.push(("a TLS 1.2-only scheme", p, "proof_scheme"));
    let mut p = s.valid(16, &l, L);
    p.chain = vec![b64(b"\x30\x03\x02\x01\x00")];
    cases.push(("a chain of garbage DER", p, "malformed"));

    for (case, p, label) in cases {
        let id = p.id;
        let answer = s.send(&Message::Prove(p)).await;
        match &answer {
            Some(Message::Refused {
                id: Some(got),
                label: l,
                message,
            }) => {
                assert_eq!(*got, id, "{case}: refusal for another number");
                assert_eq!(l, label, "{case}: refused for another reason: {message}");
                println!("{case}: refused: {message}");
            }
            other => panic!("{case}: expected a refusal labelled {label}, got {other:?}"),
        }
        let o = resp.next_outcome(case).await;
        let e = o.result.as_ref().expect_err(case);
        assert_eq!(e.label(), label, "{case}: {e}");
    }
    assert_eq!(stored(&resp), opened, "nothing written by a refused proof");

    // The session survived the refusals: a valid proof still passes.
    let answer = s.send(&Message::Prove(s.valid(20, &l, L))).await;
    assert!(
        matches!(answer, Some(Message::Proven(ref p)) if p.id == 20),
        "{answer:?}"
    );
    let o = resp.next_outcome("valid proof").await;
    assert!(o.result.as_ref().expect("valid proof").stored);

    // A replayed (or lower) number ends the session.
    let replay = s.valid(20, &l, L);
    let answer = s.send(&Message::Prove(replay)).await;
    assert!(
        matches!(&answer, Some(Message::Refused { label, .. }) if label == "proof_replayed"),
        "{answer:?}"
    );
    let e = resp.next_outcome("replay").await;
    assert_eq!(
        e.result.as_ref().expect_err("replay").label(),
        "proof_replayed"
    );
    assert!(
        s.send(&Message::Prove(s.valid(21, &l, L))).await.is_none(),
        "the session ended after a replay"
    );

    // A hello inside a session ends it too.
    let hello = Message::Hello(Hello {
        node: "node-a".into(),
        local: L,
        remote: R,
        wireguard_key: None,
    });
    let answer = other.send(&hello).await;
    assert!(
        matches!(&answer, Some(Message::Refused { label, .. }) if label == "message_unexpected"),
        "{answer:?}"
    );
    assert!(
        other
            .send(&Message::Prove(other.valid(1, &l, L)))
            .await
            .is_none()
    );
    resp.stop().await;
}

/// How the hand-built responder answers proofs.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Signed over another request number.
    OtherNumber,
    /// Signed without the initiator's signature in the transcript.
    UnboundToRequest,
    /// With the SVID of another identity than the one asked for.
    OtherIdentity,
    /// A refusal.
    Refuse,
}

/// A responder on the attacker's address with 257's SVID (and 258's) that
/// opens sessions properly and answers proofs as `mode` says.
async fn bad_responder(
    r: Leaf,
    r2: Leaf,
    mode: Answer,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(r.chain.clone(), r.private_key())
    .expect("cert");
    config.alpn_protocols = vec![b"meshauth/2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(SocketAddr::new(ATTACKER_IP, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let Ok(Message::Hello(h)) = protocol::read_as(&mut tls, Version::V2).await else {
                continue;
            };
            let reply = Message::Hello(Hello {
                node: "node-b".into(),
                local: R,
                remote: h.local,
                wireguard_key: None,
            });
            let _ = protocol::write_as(&mut tls, Version::V2, &reply).await;
            let exporter = tls
                .get_ref()
                .1
                .export_keying_material([0u8; 32], proof::EXPORTER_LABEL, None)
                .expect("exporter");
            while let Ok(Message::Prove(p)) = protocol::read_as(&mut tls, Version::V2).await {
                use base64::Engine as _;
                let their_sig = base64::engine::general_purpose::STANDARD
                    .decode(&p.signature)
                    .expect("sig");
                let st = |id| Statement {
                    exporter: &exporter,
                    id,
                    initiator: p.local,
                    responder: R,
                    initiator_node: "node-a",
                    responder_node: "node-b",
                };
                let answer = match mode {
                    Answer::OtherNumber => {
                        let mut a = proof::make(
                            Signer::Responder,
                            &st(p.id + 1),
                            &svid(&r),
                            None,
                            Some(&their_sig),
                        )
                        .expect("sign")
                        .0;
                        a.id = p.id;
                        Message::Proven(a)
                    }
                    Answer::UnboundToRequest => Message::Proven(
                        proof::make(Signer::Responder, &st(p.id), &svid(&r), None, None)
                            .expect("sign")
                            .0,
                    ),
                    Answer::OtherIdentity => {
                        let mut a = proof::make(
                            Signer::Responder,
                            &st(p.id),
                            &svid(&r2),
                            None,
                            Some(&their_sig),
                        )
                        .expect("sign")
                        .0;
                        a.local = R;
                        Message::Proven(a)
                    }
                    Answer::Refuse => Message::Refused {
                        id: Some(p.id),
                        label: "no_local_endpoint".into(),
                        message: "no".into(),
                    },
                };
                let _ = protocol::write_as(&mut tls, Version::V2, &answer).await;
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn the_initiator_refuses_answers_that_do_not_hold() {
    init_tracing();
    let ca = Ca::root("meshauth test CA");
    let (l, r, r2) = (
        ca.svid(L, base_time(), HOUR),
        ca.svid(R, base_time(), HOUR),
        ca.svid(NO_ENDPOINT, base_time(), HOUR),
    );
    for (mode, label) in [
        (Answer::OtherNumber, "proof_signature_invalid"),
        (Answer::UnboundToRequest, "proof_signature_invalid"),
        (Answer::OtherIdentity, "unexpected_identity"),
        (Answer::Refuse, "peer_refused"),
    ] {
        let (addr, server) = bad_responder(r.clone(), r2.clone(), mode).await;
        let metrics = Metrics::default();
        let client = initiator(cache_with(&ca, &[&l]), addr.port(), metrics.clone());
        let node = node_info("node-b", ATTACKER_IP, None);
        client
            .handshake(L, R, &node)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: opening the session: {e}"));
        let e = client
            .handshake(L, R, &node)
            .await
            .map(|a| panic!("{mode:?}: the initiator accepted the answer: {a:?}"))
            .unwrap_err();
        assert!(!matches!(e, HandshakeError::SessionClosed { .. }), "{e}");
        assert_eq!(e.label(), label, "{mode:?}: {e}");
        assert_eq!(metrics.count(Role::Initiator, label), 1, "{mode:?}");
        println!("{mode:?}: refused: {e}");
        server.abort();
    }
}

/// A session is bound to the address it was opened to: once node-b's
/// handshake address changes, the next pair opens a connection to the new
/// address (where another responder answers) instead of being proved over
/// the session to the old one.
#[tokio::test]
async fn a_session_is_not_reused_once_the_nodes_address_changed() {
    let ca = Ca::root("meshauth test CA");
    let (l, l2, r) = leaves(&ca);
    let old = Responder::start(cache_with(&ca, &[&r]), desired_two(), |_| {}).await;
    let moved_ip: IpAddr = "127.0.0.4".parse().expect("ip");
    let store = Arc::new(MemoryAuthStore::default());
    let moved = Responder::start_with(
        "node-b",
        cache_with(&ca, &[&r]),
        desired_two(),
        store.clone(),
        store,
        SocketAddr::new(moved_ip, old.addr.port()),
        |_| {},
    )
    .await;
    let client = initiator(
        cache_with(&ca, &[&l, &l2]),
        old.addr.port(),
        Metrics::default(),
    );
    client.handshake(L, R, &node_b()).await.expect("first pair");
    assert_eq!(client.open_sessions(), 1);
    // Within the reuse window, at the same address: proved over the session.
    client
        .handshake(L2, R, &node_b())
        .await
        .expect("second pair");
    assert_eq!(old.metrics.accepted.get(), 1);

    let node_b_moved = node_info("node-b", moved_ip, None);
    client
        .handshake(L2, R, &node_b_moved)
        .await
        .expect("the pair at node-b's new address");
    assert_eq!(
        moved.metrics.accepted.get(),
        1,
        "a connection to the new address"
    );
    assert_eq!(old.metrics.accepted.get(), 1, "nothing more to the old one");
    assert_eq!(old.metrics.count(Role::Responder, "ok"), 2);
    assert_eq!(moved.metrics.count(Role::Responder, "ok"), 1);
    assert_eq!(stored(&moved), BTreeSet::from([(R, L2)]));
    old.stop().await;
    moved.stop().await;
}

/// The responder re-checks, for every proof, that the session's source
/// address still belongs to the node it opened with: once node-a has left
/// node-b's table, a proof over node-a's open session ends the session
/// (`unknown_peer_address`), the initiator's one retry on a fresh
/// connection is refused at accept, and nothing is stored for the pair.
#[tokio::test]
async fn a_session_whose_node_left_is_closed_at_its_next_proof() {
    let ca = Ca::root("meshauth test CA");
    let (l, l2, r) = leaves(&ca);
    let (mut resp, client) = responder_and_initiator(&ca, (&l, &l2, &r)).await;
    client.handshake(L, R, &node_b()).await.expect("first pair");
    let o = resp.next_outcome("opening pair").await;
    assert!(o.result.is_ok(), "{:?}", o.result);
    assert_eq!(client.open_sessions(), 1);

    // node-a leaves node-b's view of the cluster.
    let mut left = desired_two();
    left.nodes.remove("node-a");
    resp.nodes.sync(&left.nodes).expect("node table sync");

    let err = client
        .handshake(L2, R, &node_b())
        .await
        .expect_err("a pair from a node that left");
    let o = resp.next_outcome("the proof over the session").await;
    match &o.result {
        Err(e) => assert_eq!(e.label(), "unknown_peer_address", "{e}"),
        Ok(a) => panic!("the proof was accepted: {a:?}"),
    }
    println!("initiator: {err}");
    assert_eq!(stored(&resp), BTreeSet::from([(R, L)]), "nothing for L2");
    assert!(
        resp.metrics.count(Role::Responder, "unknown_peer_address") >= 1,
        "counted"
    );
    resp.stop().await;
}
