//! Every check refuses with its own error and metric label, on both sides;
//! garbage and bad messages are refused and the responder keeps serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use auth_agent::auth::Authenticator as _;
use auth_agent::auth::store::{AuthStore as _, Pair};
use auth_agent::handshake::protocol::{self, Hello, Message};
use auth_agent::handshake::{HandshakeError, Metrics, Role};
use meshauth_test_support::certs::{Ca, HOUR, LeafSpec, TD, base_time};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;

use super::*;

struct Bad {
    leaves: Ca,
    other_ca: Ca,
}

impl Bad {
    fn new() -> Self {
        Self {
            leaves: Ca::root("meshauth test CA"),
            other_ca: Ca::root("someone else's CA"),
        }
    }

    /// The bad chains every side is tested with, as (case, leaf, label).
    fn chains(&self, identity: u32) -> Vec<(&'static str, Leaf, &'static str)> {
        let ca = &self.leaves;
        let now = base_time();
        let spec = |f: &dyn Fn(&mut LeafSpec)| {
            let mut s = LeafSpec::identity(TD, identity, now, HOUR);
            f(&mut s);
            ca.issue(&s)
        };
        let good = ca.svid(identity, now, HOUR);
        let stranger = ca.svid(999, now, HOUR);
        vec![
            (
                "two URI SANs",
                spec(&|s| s.uris.push(format!("spiffe://{TD}/identity/4242"))),
                "multiple_uri_sans",
            ),
            ("CA leaf", spec(&|s| s.is_ca = true), "leaf_is_ca"),
            (
                "other trust domain",
                ca.issue(&LeafSpec::identity("other.example", identity, now, HOUR)),
                "foreign_trust_domain",
            ),
            (
                "expired",
                spec(&|s| {
                    s.not_before = now - 2 * HOUR;
                    s.not_after = now - HOUR;
                }),
                "expired",
            ),
            (
                "not yet valid",
                spec(&|s| {
                    s.not_before = now + HOUR;
                    s.not_after = now + 2 * HOUR;
                }),
                "not_yet_valid",
            ),
            (
                "chain from another CA",
                self.other_ca.svid(identity, now, HOUR),
                "untrusted_chain",
            ),
            (
                "valid SVID plus an extra non-CA certificate (substitution)",
                good.with_extra(stranger.chain[0].clone()),
                "non_ca_in_chain",
            ),
        ]
    }
}

#[tokio::test]
async fn responder_refuses_each_bad_client_with_its_own_label() {
    let bad = Bad::new();
    let ca = &bad.leaves;
    let (l, r, r2) = (
        ca.svid(L, base_time(), HOUR),
        ca.svid(R, base_time(), HOUR),
        ca.svid(NO_ENDPOINT, base_time(), HOUR),
    );
    let mut resp = Responder::start(cache_with(ca, &[&r, &r2]), desired(None, None), |_| {}).await;
    let sni = format!("{R}.{TD}");

    let mut cases: Vec<(String, rustls::ClientConfig, IpAddr, String, u32, &str)> = bad
        .chains(L)
        .into_iter()
        .map(|(case, leaf, label)| {
            (
                case.to_owned(),
                raw_client_config(Some(&leaf), false),
                A_IP,
                sni.clone(),
                L,
                label,
            )
        })
        .collect();
    let mut h2 = raw_client_config(Some(&l), false);
    h2.alpn_protocols = vec![b"h2".to_vec()];
    cases.extend([
        (
            "a valid SVID of an identity the desired state does not know".into(),
            raw_client_config(Some(&ca.svid(999, base_time(), HOUR)), false),
            A_IP,
            sni.clone(),
            999,
            "unknown_identity",
        ),
        (
            "TLS 1.2 client".into(),
            raw_client_config(Some(&l), true),
            A_IP,
            sni.clone(),
            L,
            "tls12_refused",
        ),
        (
            "no client certificate".into(),
            raw_client_config(None, false),
            A_IP,
            sni.clone(),
            L,
            "no_client_certificate",
        ),
        (
            "unknown SNI".into(),
            raw_client_config(Some(&l), false),
            A_IP,
            format!("{R}.other.example"),
            L,
            "unknown_sni",
        ),
        (
            "SNI of an identity without a local endpoint".into(),
            raw_client_config(Some(&l), false),
            A_IP,
            format!("{NO_ENDPOINT}.{TD}"),
            L,
            "no_local_endpoint",
        ),
        (
            "peer address of no known node".into(),
            raw_client_config(Some(&l), false),
            STRANGER_IP,
            sni.clone(),
            L,
            "unknown_peer_address",
        ),
        (
            "ALPN h2 only".into(),
            h2,
            A_IP,
            sni.clone(),
            L,
            "alpn_mismatch",
        ),
    ]);

    for (case, config, src, sni, local, label) in cases {
        raw_attempt(config, src, resp.addr, &sni, local).await;
        let outcome = resp.next_outcome(&case).await;
        assert_eq!(
            outcome.peer.ip(),
            src,
            "{case}: outcome of another connection"
        );
        match &outcome.result {
            Ok(a) => panic!("{case}: the responder accepted it: {a:?}"),
            Err(e) => {
                assert_eq!(e.label(), label, "{case}: wrong check failed: {e}");
                println!("{case}: refused: {e}");
            }
        }
        assert_eq!(
            resp.metrics.count(Role::Responder, label),
            1,
            "{case}: handshakes_total{{role=responder,result={label}}}"
        );
    }
    assert!(
        resp.store.snapshot().is_empty(),
        "no refused handshake wrote an entry: {:?}",
        resp.store.snapshot()
    );

    // The same server still authenticates a good client.
    let metrics = Metrics::default();
    let client = initiator(cache_with(ca, &[&l]), resp.addr.port(), metrics.clone());
    let ok = client
        .handshake(L, R, &node_info("node-b", B_IP, None))
        .await
        .unwrap_or_else(|e| panic!("good handshake after the refusals: {e}"));
    let outcome = resp.next_outcome("good handshake").await;
    let accepted = outcome
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("responder: {e}"));
    assert_eq!(
        accepted.pair,
        Pair {
            local: R,
            remote: L,
            node: resp.nodes.id_of("node-a").expect("node-a id")
        }
    );
    assert_eq!(ok.expiry, accepted.expiry);
    assert_eq!(metrics.count(Role::Initiator, "ok"), 1);
    resp.stop().await;
}

/// A hand-built TLS 1.3 server on 127.0.0.3 presenting `leaf` to every client.
async fn attacker_server(leaf: &Leaf) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(leaf.chain.clone(), leaf.private_key())
    .unwrap_or_else(|e| panic!("attacker server cert {}: {e}", leaf.spiffe_id));
    config.alpn_protocols = vec![b"meshauth/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(SocketAddr::new(ATTACKER_IP, 0))
        .await
        .expect("bind attacker server");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let _ = protocol::read(&mut tls).await;
                let _ = tls.shutdown().await;
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn initiator_refuses_each_bad_server_with_its_own_label() {
    init_tracing();
    let bad = Bad::new();
    let ca = &bad.leaves;
    let metrics = Metrics::default();
    let own = ca.svid(L, base_time(), HOUR);
    let mut cases = bad.chains(R);
    cases.push((
        "a valid SVID of another identity than the one dialled",
        ca.svid(NO_ENDPOINT, base_time(), HOUR),
        "unexpected_identity",
    ));
    for (case, leaf, label) in cases {
        let (addr, server) = attacker_server(&leaf).await;
        let client = initiator(cache_with(ca, &[&own]), addr.port(), metrics.clone());
        let node = node_info("node-b", ATTACKER_IP, None);
        let e = client
            .handshake(L, R, &node)
            .await
            .map(|a| panic!("{case}: the initiator accepted the server: {a:?}"))
            .unwrap_err();
        assert!(
            matches!(e, HandshakeError::PeerCertificate(_)),
            "{case}: {e:?}"
        );
        assert_eq!(e.label(), label, "{case}: wrong check failed: {e}");
        assert_eq!(metrics.count(Role::Initiator, label), 1, "{case}: metric");
        // Through the Authenticator interface the label is the same.
        let f = client.authenticate(L, R, node).await.expect_err(case);
        assert_eq!(f.label, label, "{case}: AuthFailure {f:?}");
        server.abort();
        println!("{case}: refused: {e}");
    }
}

/// A hand-built client that completes TLS as 256 and then sends `bytes`.
async fn after_tls(resp: &Responder, leaf: &Leaf, bytes: &[u8]) -> Option<Message> {
    let tcp = tcp_from(A_IP, resp.addr).await;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(raw_client_config(Some(leaf), false)))
        .connect(ServerName::try_from(format!("{R}.{TD}")).expect("sni"), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS with a valid SVID: {e}"));
    tls.write_all(bytes).await.expect("write");
    tls.flush().await.expect("flush");
    tokio::time::timeout(WAIT, protocol::read(&mut tls))
        .await
        .expect("reply in time")
        .ok()
}

fn hello_frame(node: &str, local: u32, remote: u32, wg: Option<&str>) -> Vec<u8> {
    protocol::encode(&Message::Hello(Hello {
        node: node.into(),
        local,
        remote,
        wireguard_key: wg.map(str::to_owned),
    }))
    .expect("encode")
}

#[tokio::test]
async fn garbage_and_bad_messages_get_clear_errors_and_the_server_keeps_serving() {
    let ca = Ca::root("meshauth test CA");
    let (l, r) = (ca.svid(L, base_time(), HOUR), ca.svid(R, base_time(), HOUR));
    let mut resp = Responder::start(
        cache_with(&ca, &[&r]),
        desired(Some("wg-key-of-a"), None),
        |_| {},
    )
    .await;

    // Not TLS at all.
    let mut tcp = tcp_from(A_IP, resp.addr).await;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: node-b\r\n\r\n")
        .await
        .expect("write");
    let outcome = resp.next_outcome("HTTP instead of a ClientHello").await;
    let e = outcome.result.as_ref().expect_err("HTTP accepted");
    println!("HTTP instead of a ClientHello: {e}");
    assert_eq!(e.label(), "tls", "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
    drop(tcp);

    let mut oversized = 0xffff_ffffu32.to_be_bytes().to_vec();
    oversized.extend_from_slice(b"garbage");
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "an oversized message",
            oversized,
            "message_oversized",
            "4294967295 bytes announced",
        ),
        (
            "a garbage message",
            b"\x00\x00\x00\x05hello".to_vec(),
            "message_malformed",
            "first bytes \"hello\"",
        ),
        (
            "a hello stating another node",
            hello_frame("node-z", L, R, Some("wg-key-of-a")),
            "node_name_mismatch",
            "\"node-z\"",
        ),
        (
            "a hello stating another identity",
            hello_frame("node-a", 4242, R, Some("wg-key-of-a")),
            "message_identity_mismatch",
            "local = 4242",
        ),
        (
            "a hello without the published WireGuard key",
            hello_frame("node-a", L, R, None),
            "wireguard_key_mismatch",
            "wg-key-of-a",
        ),
    ];
    for (case, bytes, label, text) in cases {
        let reply = after_tls(&resp, &l, &bytes).await;
        let outcome = resp.next_outcome(case).await;
        let e = outcome
            .result
            .as_ref()
            .map(|a| panic!("{case}: accepted: {a:?}"))
            .unwrap_err();
        println!("{case}: {e}");
        assert_eq!(e.label(), label, "{case}: {e}");
        assert!(e.to_string().contains(text), "{case}: {e}");
        match reply {
            Some(Message::Refused {
                label: l2, message, ..
            }) => {
                assert_eq!(l2, label, "{case}: refusal sent to the client: {message}")
            }
            other => panic!("{case}: the client got {other:?}, not a refusal"),
        }
    }
    assert!(resp.store.entries().expect("entries").is_empty());

    // And a well-behaved initiator still gets through.
    let mut client_opts =
        auth_agent::handshake::ClientOptions::new(cache_with(&ca, &[&l]), "node-a");
    client_opts.port = resp.addr.port();
    client_opts.source_addr = Some(A_IP);
    client_opts.wireguard_key = auth_agent::handshake::StatedKey::fixed(Some("wg-key-of-a".into()));
    let client = auth_agent::handshake::HandshakeClient::new(client_opts, Metrics::default());
    client
        .handshake(L, R, &node_info("node-b", B_IP, None))
        .await
        .unwrap_or_else(|e| panic!("good handshake after the garbage: {e}"));
    assert!(resp.next_outcome("good").await.result.is_ok());
    assert_eq!(resp.store.entries().expect("entries").len(), 1);
    resp.stop().await;
}

#[tokio::test]
async fn initiator_checks_the_responders_statement() {
    let ca = Ca::root("meshauth test CA");
    let (l, r) = (ca.svid(L, base_time(), HOUR), ca.svid(R, base_time(), HOUR));
    let resp = Responder::start(
        cache_with(&ca, &[&r]),
        desired(None, Some("published-b")),
        |o| {
            o.wireguard_key = auth_agent::handshake::StatedKey::fixed(Some("rogue-b".into()));
        },
    )
    .await;
    let metrics = Metrics::default();
    let client = initiator(cache_with(&ca, &[&l]), resp.addr.port(), metrics.clone());

    let e = client
        .handshake(L, R, &node_info("node-b", B_IP, Some("published-b")))
        .await
        .expect_err("a WireGuard key other than the published one is accepted");
    assert_eq!(e.label(), "wireguard_key_mismatch", "{e}");
    assert!(
        e.to_string().contains("rogue-b") && e.to_string().contains("published-b"),
        "{e}"
    );

    // Dialling node-b's address while expecting node-c: the responder says node-b.
    let e = client
        .handshake(L, R, &node_info("node-c", B_IP, None))
        .await
        .expect_err("a responder stating another node name is accepted");
    assert_eq!(e.label(), "node_name_mismatch", "{e}");
    assert_eq!(metrics.count(Role::Initiator, "node_name_mismatch"), 1);
    resp.stop().await;
}

#[tokio::test]
async fn excess_connections_are_closed_and_idle_ones_time_out() {
    let ca = Ca::root("meshauth test CA");
    let (l, r) = (ca.svid(L, base_time(), HOUR), ca.svid(R, base_time(), HOUR));
    let mut resp = Responder::start(cache_with(&ca, &[&r]), desired(None, None), |o| {
        o.max_concurrent = 1;
        o.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    let idle = tcp_from(A_IP, resp.addr).await;
    // The first connection holds the one slot once the server accepted it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while resp.metrics.accepted.get() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never accepted the first connection"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = tcp_from(A_IP, resp.addr).await;
    let o = resp.next_outcome("second connection").await;
    assert_eq!(
        o.result.as_ref().map_err(|e| e.label()).unwrap_err(),
        "overloaded"
    );
    assert_eq!(o.peer, second.local_addr().expect("addr"));
    assert_eq!(
        resp.metrics.refused(auth_agent::handshake::Limit::Global),
        1
    );
    let o = resp.next_outcome("idle connection").await;
    assert_eq!(o.peer, idle.local_addr().expect("addr"));
    let e = o.result.as_ref().unwrap_err();
    assert_eq!(e.label(), "timeout", "{e}");
    drop((idle, second));
    // The permit is back: a real handshake is served.
    let client = initiator(cache_with(&ca, &[&l]), resp.addr.port(), Metrics::default());
    client
        .handshake(L, R, &node_info("node-b", B_IP, None))
        .await
        .unwrap_or_else(|e| panic!("handshake after the limit cleared: {e}"));
    resp.stop().await;
}

/// Log lines written through a subscriber the test owns.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self, containing: &str) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| l.contains(containing))
            .map(str::to_owned)
            .collect()
    }
}

// A current-thread runtime: the responder's tasks run on this thread, under
// the subscriber set here.
#[tokio::test(flavor = "current_thread")]
async fn refusals_from_one_peer_are_logged_once_per_interval_and_always_counted() {
    const N: usize = 50;
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let ca = Ca::root("meshauth test CA");
    let r = ca.svid(R, base_time(), HOUR);
    let mut resp = Responder::start(cache_with(&ca, &[&r]), desired(None, None), |o| {
        // Far longer than the test: every refusal below falls in one interval.
        o.refusal_log_interval = Duration::from_secs(3600);
    })
    .await;
    for i in 0..N {
        let mut tcp = tcp_from(A_IP, resp.addr).await;
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let o = resp.next_outcome(&format!("refusal {i}")).await;
        assert_eq!(o.result.as_ref().map_err(|e| e.label()).unwrap_err(), "tls");
    }
    // Another peer gets its own line.
    let _stranger = tcp_from(STRANGER_IP, resp.addr).await;
    let o = resp.next_outcome("stranger").await;
    assert_eq!(o.peer.ip(), STRANGER_IP);

    assert_eq!(
        resp.metrics.count(Role::Responder, "tls"),
        N as u64,
        "every refusal is counted"
    );
    let refused = logs.lines("handshake refused");
    assert_eq!(
        refused.len(),
        2,
        "one line for node-a's {N} refusals and one for the stranger's:\n{}",
        refused.join("\n")
    );
    assert!(
        refused[0].contains("127.0.0.1") && refused[1].contains("127.0.0.9"),
        "{refused:#?}"
    );
    resp.stop().await;
}
