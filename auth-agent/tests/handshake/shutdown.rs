//! Shutdown of the responder: the listener closes, a handshake in flight
//! finishes, one that does not finish within the drain period is cancelled,
//! and the server's task ends.

use auth_agent::handshake::metrics::RoleLabels;
use auth_agent::handshake::protocol::{self, Hello, Message};
use auth_agent::handshake::{Metrics, Role};
use meshauth_test_support::certs::{Ca, HOUR, TD, base_time};
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt as _;

use super::*;

fn in_flight(m: &Metrics) -> i64 {
    m.in_flight
        .get_or_create(&RoleLabels {
            role: Role::Responder,
        })
        .get()
}

/// Waits until nothing listens on `addr` any more (each probe that still
/// gets in is closed at once).
async fn until_refused(addr: SocketAddr) {
    let refused = async {
        loop {
            let s = TcpSocket::new_v4().expect("socket");
            s.bind(SocketAddr::new(A_IP, 0)).expect("bind");
            match s.connect(addr).await {
                Ok(probe) => drop(probe),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                // Queued in the backlog as the listener closed.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("probe connect to {addr}: {e}"),
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, refused)
        .await
        .expect("the listener closes on shutdown");
}

#[tokio::test]
async fn a_handshake_stuck_at_shutdown_is_cancelled_after_the_drain_period() {
    let ca = Ca::root("meshauth test CA");
    let r = ca.svid(R, base_time(), HOUR);
    let mut resp = Responder::start(cache_with(&ca, &[&r]), desired(None, None), |o| {
        // Only the drain period can end this connection within WAIT.
        o.handshake_timeout = Duration::from_secs(60);
        o.tls_timeout = Duration::from_secs(60);
        o.drain_timeout = Duration::from_millis(200);
    })
    .await;
    let mut idle = tcp_from(A_IP, resp.addr).await;
    let idle_addr = idle.local_addr().expect("addr");
    let served = async {
        while in_flight(&resp.metrics) < 1 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, served)
        .await
        .expect("the idle connection is being served");

    resp.shutdown.cancel();
    let o = resp.next_outcome("idle connection at shutdown").await;
    assert_eq!(o.peer, idle_addr);
    let e = o.result.as_ref().expect_err("served");
    assert_eq!(e.label(), "shutting_down", "{e}");
    assert_eq!(
        resp.metrics.count(Role::Responder, "shutting_down"),
        1,
        "counted"
    );
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, idle.read(&mut buf))
        .await
        .expect("the server closes the cancelled connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(in_flight(&resp.metrics), 0);
    resp.stop().await;
}

#[tokio::test]
async fn a_handshake_in_flight_at_shutdown_finishes_and_new_connections_are_refused() {
    let ca = Ca::root("meshauth test CA");
    let (l, r) = (ca.svid(L, base_time(), HOUR), ca.svid(R, base_time(), HOUR));
    let mut resp = Responder::start(cache_with(&ca, &[&r]), desired(None, None), |o| {
        o.drain_timeout = Duration::from_secs(30);
    })
    .await;
    // TLS done; the hello is sent only after shutdown has begun.
    let tcp = tcp_from(A_IP, resp.addr).await;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(raw_client_config(Some(&l), false)))
        .connect(ServerName::try_from(format!("{R}.{TD}")).expect("sni"), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS with a valid SVID: {e}"));

    resp.shutdown.cancel();
    until_refused(resp.addr).await;

    protocol::write(
        &mut tls,
        &Message::Hello(Hello {
            node: "node-a".into(),
            local: L,
            remote: R,
            wireguard_key: None,
        }),
    )
    .await
    .expect("hello");
    match tokio::time::timeout(WAIT, protocol::read(&mut tls)).await {
        Ok(Ok(Message::Hello(h))) => assert_eq!((h.node.as_str(), h.local), ("node-b", R)),
        other => panic!("the responder's hello after shutdown began: {other:?}"),
    }
    // Skip the probes' outcomes: the handshake's is the successful one.
    let ok = loop {
        let o = resp.next_outcome("the in-flight handshake").await;
        if let Ok(a) = &o.result {
            break a.clone();
        }
    };
    assert!(ok.stored);
    assert_eq!(resp.store.entries().expect("entries").len(), 1);
    resp.stop().await;
}
