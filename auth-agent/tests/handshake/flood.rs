//! One source address flooding the handshake port with idle connections and
//! with slow ones (a byte at a time) must not lock other nodes out: the
//! responder holds a few connections per source address, closes the excess
//! at once, and cuts a TLS handshake that does not finish by the TLS deadline.
//!
//! Layout: the flood comes from 127.0.0.3 (node-c, a known node: the
//! stronger case, its connections pass the address check), the legitimate
//! initiator is node-a on 127.0.0.1, the responder node-b on 127.0.0.2.

use auth_agent::auth::store::AuthStore as _;
use auth_agent::handshake::{Limit, Metrics, Role};
use meshauth_test_support::certs::{Ca, HOUR, base_time};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// node-a and node-b as in [`desired`], plus node-c on 127.0.0.3.
fn with_node_c() -> DesiredState {
    let mut d = desired(None, None);
    d.nodes
        .insert("node-c".into(), node_info("node-c", ATTACKER_IP, None));
    d
}

/// The first bytes of a TLS record announcing a 512-byte ClientHello.
const HELLO_START: [u8; 6] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];

/// Holds `tcp` open, sending nothing (`slow` false) or one byte every
/// 50 ms (`slow` true), until the server closes it; returns what the read
/// saw. Panics if the server has not closed it within [`WAIT`].
async fn hold_until_closed(mut tcp: TcpStream, slow: bool) -> &'static str {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut sent = 0usize;
    let mut buf = [0u8; 256];
    let closed = async {
        loop {
            tokio::select! {
                r = tcp.read(&mut buf) => match r {
                    Ok(0) => return "eof",
                    Ok(_) => {}
                    Err(_) => return "reset",
                },
                _ = tick.tick(), if slow => {
                    let byte = HELLO_START.get(sent).copied().unwrap_or(0);
                    sent += 1;
                    // A failed write means the server is gone; the read says how.
                    let _ = tcp.write_all(&[byte]).await;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, closed)
        .await
        .unwrap_or_else(|_| panic!("a flood connection was still open after {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_and_slow_connections_from_one_address_leaves_other_nodes_unaffected() {
    const IDLE: usize = 300;
    const SLOW: usize = 16;
    let ca = Ca::root("meshauth test CA");
    let (l, r) = (ca.svid(L, base_time(), HOUR), ca.svid(R, base_time(), HOUR));
    // Default limits and timeouts: 256 at once, 16 per source, TLS 1 s, 5 s overall.
    let resp = Responder::start(cache_with(&ca, &[&r]), with_node_c(), |_| {}).await;

    // The flood, from node-c's address.
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..IDLE + SLOW {
        let tcp = tcp_from(ATTACKER_IP, resp.addr).await;
        flood.spawn(hold_until_closed(tcp, i >= IDLE));
    }
    // Every flood connection has reached the accept loop.
    let accepted = async {
        while resp.metrics.accepted.get() < (IDLE + SLOW) as u64 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, accepted)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the responder accepted {} of {} flood connections within {WAIT:?}",
                resp.metrics.accepted.get(),
                IDLE + SLOW
            )
        });

    // node-a's handshakes go through while the flood holds what it may.
    let metrics = Metrics::default();
    let client = initiator(cache_with(&ca, &[&l]), resp.addr.port(), metrics.clone());
    for i in 0..20 {
        client
            .handshake(L, R, &node_info("node-b", B_IP, None))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "handshake {i} from node-a during the flood from {ATTACKER_IP}: {e} \
                     (refused per source: {}, globally: {})",
                    resp.metrics.refused(Limit::PerSource),
                    resp.metrics.refused(Limit::Global)
                )
            });
    }
    assert_eq!(metrics.count(Role::Initiator, "ok"), 20);
    assert_eq!(resp.store.entries().expect("entries").len(), 1);

    // Every flood connection is closed by the server: the excess at once,
    // the held ones at the TLS deadline.
    let mut how = BTreeMap::<&str, usize>::new();
    while let Some(r) = flood.join_next().await {
        *how.entry(r.expect("flood task")).or_default() += 1;
    }
    let per_source = resp.metrics.refused(Limit::PerSource);
    println!(
        "flood of {IDLE} idle + {SLOW} slow connections: closed by the server {how:?}; \
         refused per source {per_source}, globally {}, TLS timeouts {}",
        resp.metrics.refused(Limit::Global),
        resp.metrics.count(Role::Responder, "tls_timeout"),
    );
    assert!(per_source > 0, "the per-source limit closed nothing");
    assert_eq!(resp.metrics.refused(Limit::Global), 0);
    assert!(resp.metrics.count(Role::Responder, "tls_timeout") > 0);
    resp.stop().await;
}

#[tokio::test]
async fn a_client_hello_sent_a_byte_at_a_time_is_cut_at_the_tls_deadline() {
    let ca = Ca::root("meshauth test CA");
    let r = ca.svid(R, base_time(), HOUR);
    let mut resp = Responder::start(cache_with(&ca, &[&r]), desired(None, None), |o| {
        // Far beyond WAIT: only the TLS deadline can end this connection in time.
        o.handshake_timeout = Duration::from_secs(60);
        o.tls_timeout = Duration::from_millis(300);
    })
    .await;
    let tcp = tcp_from(A_IP, resp.addr).await;
    let src = tcp.local_addr().expect("addr");
    let slow = tokio::spawn(hold_until_closed(tcp, true));
    let o = resp.next_outcome("slow ClientHello").await;
    assert_eq!(o.peer, src);
    let e = o
        .result
        .as_ref()
        .expect_err("a byte-at-a-time ClientHello was served");
    assert_eq!(e.label(), "tls_timeout", "{e}");
    assert!(e.to_string().contains("300ms"), "{e}");
    slow.await.expect("slow client");
    resp.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_per_source_limit_are_closed_at_once_and_counted() {
    let ca = Ca::root("meshauth test CA");
    let (l, r) = (ca.svid(L, base_time(), HOUR), ca.svid(R, base_time(), HOUR));
    let mut resp = Responder::start(cache_with(&ca, &[&r]), with_node_c(), |o| {
        o.max_per_source = 2;
        o.handshake_timeout = Duration::from_secs(60);
        o.tls_timeout = Duration::from_secs(60);
    })
    .await;
    let held = [
        tcp_from(ATTACKER_IP, resp.addr).await,
        tcp_from(ATTACKER_IP, resp.addr).await,
    ];
    let third = tcp_from(ATTACKER_IP, resp.addr).await;
    let third_addr = third.local_addr().expect("addr");
    let o = resp.next_outcome("third connection from node-c").await;
    assert_eq!(o.peer, third_addr);
    let e = o.result.as_ref().expect_err("served beyond the limit");
    assert_eq!(e.label(), "source_overloaded", "{e}");
    assert!(e.to_string().contains("127.0.0.3"), "{e}");
    assert_eq!(hold_until_closed(third, false).await, "eof");
    assert_eq!(resp.metrics.refused(Limit::PerSource), 1);
    // Another address is not limited by node-c's connections.
    let client = initiator(cache_with(&ca, &[&l]), resp.addr.port(), Metrics::default());
    client
        .handshake(L, R, &node_info("node-b", B_IP, None))
        .await
        .unwrap_or_else(|e| panic!("node-a while node-c holds its limit: {e}"));
    drop(held);
    resp.stop().await;
}
