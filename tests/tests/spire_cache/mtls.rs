//! Mutual TLS 1.3 over loopback TCP between two caches fed by two node agents:
//! node-a runs identity 256 (client), node-b runs 257 (server). The rustls
//! configs are svid-cache's; the certificates are spire-dev's.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use meshauth_tests::{Deployment, Node, TD, identity_entry, leaf_of};
use rustls::{ClientConnection, ProtocolVersion, ServerConnection};
use rustls_pki_types::ServerName;
use svid_cache::{ServerCertResolver, SpiffeClientVerifier, SvidCache, VerifyError, tls};

/// Socket read/write timeout: a stuck handshake fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What one side saw: the peer's leaf SPIFFE ID and the message it received.
#[derive(Debug)]
struct Outcome {
    peer_spiffe_id: String,
    peer_leaf: Vec<u8>,
    received: Vec<u8>,
}

#[tokio::test]
async fn mutual_tls_between_caches_of_two_nodes() {
    let dep = Deployment::start(
        TD,
        &["node-a", "node-b"],
        vec![identity_entry("node-a", 256), identity_entry("node-b", 257)],
    )
    .await;
    let mut a = Node::workload(&dep, "node-a");
    let mut b = Node::workload(&dep, "node-b");
    a.events.next("node-a's SVIDs").await;
    b.events.next("node-b's SVIDs").await;
    assert_eq!(a.cache.identities(), [256]);
    assert_eq!(b.cache.identities(), [257]);

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    let listener = Arc::new(listener);
    // The server of node-b accepts clients of known identities: 256 only.
    let server_config = Arc::new(
        tls::server_config(
            ServerCertResolver::new(b.cache.clone()),
            SpiffeClientVerifier::known(b.cache.clone(), |id| id == 256),
        )
        .expect("server config"),
    );

    // 256 → 257, expecting 257: succeeds both ways.
    let server = serve_one(&listener, &server_config);
    let client = connect(addr, &a.cache, 256, 257, 257);
    let (client, server) = (join(client).await, join(server).await);
    let client = client.unwrap_or_else(|e| panic!("client 256 → 257: {e:?}"));
    let server = server.unwrap_or_else(|e| panic!("server 257 ← 256: {e:?}"));
    assert_eq!(
        client.peer_spiffe_id,
        "spiffe://meshauth.local/identity/257"
    );
    assert_eq!(
        client.peer_leaf,
        b.svid(257).leaf().to_vec(),
        "node-b's SVID"
    );
    assert_eq!(client.received, b"pong from 257");
    assert_eq!(
        server.peer_spiffe_id,
        "spiffe://meshauth.local/identity/256"
    );
    assert_eq!(
        server.peer_leaf,
        a.svid(256).leaf().to_vec(),
        "node-a's SVID"
    );
    assert_eq!(server.received, b"ping from 256");

    // Expecting 258 from a server that is 257: the client refuses the server's
    // certificate with svid-cache's reason.
    let server = serve_one(&listener, &server_config);
    let client = connect(addr, &a.cache, 256, 258, 257);
    let err = join(client)
        .await
        .expect_err("a client expecting 258 must not accept 257");
    assert_eq!(
        verify_error(&err),
        Some(VerifyError::UnexpectedIdentity {
            expected: 258,
            actual: 257
        }),
        "client error: {err:?}"
    );
    let server_err = join(server)
        .await
        .expect_err("the server must not complete a handshake the client aborted");
    assert!(
        matches!(
            tls_error(&server_err),
            Some(rustls::Error::AlertReceived(_))
        ),
        "server sees the client's alert: {server_err:?}"
    );

    // The server refuses a client it does not know: node-b's own 257 as client.
    let server = serve_one(&listener, &server_config);
    let client = connect(addr, &b.cache, 257, 257, 257);
    let server_err = join(server).await.expect_err("257 is not a known client");
    assert_eq!(
        verify_error(&server_err),
        Some(VerifyError::UnknownIdentity { identity: 257 }),
        "server error: {server_err:?}"
    );
    join(client)
        .await
        .expect_err("the refused client cannot exchange data");
    dep.dev.shutdown().await;
}

type Side = tokio::task::JoinHandle<io::Result<Outcome>>;

async fn join(side: Side) -> io::Result<Outcome> {
    tokio::time::timeout(IO_TIMEOUT * 2, side)
        .await
        .expect("TLS side finished in time")
        .expect("TLS side did not panic")
}

/// Accepts one connection, completes the handshake, reads a ping, answers a pong.
fn serve_one(listener: &Arc<TcpListener>, config: &Arc<rustls::ServerConfig>) -> Side {
    let (listener, config) = (listener.clone(), config.clone());
    tokio::task::spawn_blocking(move || {
        let (mut sock, _) = listener.accept()?;
        timeouts(&sock)?;
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        check_tls13(conn.protocol_version())?;
        let peer = peer_leaf(conn.peer_certificates())?;
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let mut received = [0u8; 13];
        tls.read_exact(&mut received)?;
        tls.write_all(b"pong from 257")?;
        tls.flush()?;
        conn.send_close_notify();
        conn.complete_io(&mut sock)?;
        Ok(Outcome {
            peer_spiffe_id: leaf_of(&peer).spiffe_id,
            peer_leaf: peer,
            received: received.to_vec(),
        })
    })
}

/// Connects as `local` expecting `remote`, with SNI `<sni>.meshauth.local`; sends
/// a ping, reads the pong.
fn connect(
    addr: std::net::SocketAddr,
    cache: &SvidCache,
    local: u32,
    remote: u32,
    sni: u32,
) -> Side {
    let config = Arc::new(tls::client_config(cache, local, remote).expect("client config"));
    let name = ServerName::try_from(cache.trust_domain().server_name(sni)).expect("server name");
    tokio::task::spawn_blocking(move || {
        let mut sock = TcpStream::connect(addr)?;
        timeouts(&sock)?;
        let mut conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        check_tls13(conn.protocol_version())?;
        let peer = peer_leaf(conn.peer_certificates())?;
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        tls.write_all(format!("ping from {local}").as_bytes())?;
        tls.flush()?;
        let mut received = [0u8; 13];
        tls.read_exact(&mut received)?;
        Ok(Outcome {
            peer_spiffe_id: leaf_of(&peer).spiffe_id,
            peer_leaf: peer,
            received: received.to_vec(),
        })
    })
}

fn timeouts(sock: &TcpStream) -> io::Result<()> {
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))
}

fn check_tls13(version: Option<ProtocolVersion>) -> io::Result<()> {
    match version {
        Some(ProtocolVersion::TLSv1_3) => Ok(()),
        other => Err(io::Error::other(format!(
            "negotiated {other:?}, not TLS 1.3"
        ))),
    }
}

fn peer_leaf(certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> io::Result<Vec<u8>> {
    certs
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| io::Error::other("peer presented no certificate"))
}

/// The rustls error inside an I/O error from `complete_io` or a TLS stream.
fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// svid-cache's reason inside such an error.
fn verify_error(e: &io::Error) -> Option<VerifyError> {
    VerifyError::from_rustls(tls_error(e)?).cloned()
}
