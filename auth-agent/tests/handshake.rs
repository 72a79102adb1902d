//! The `meshauth/1` handshake over real sockets with real certificates.
//!
//! Layout on loopback: node-a (the initiator X) is 127.0.0.1, node-b (the
//! responder Y) is 127.0.0.2, 127.0.0.3 hosts hand-built "attacker" servers,
//! and 127.0.0.9 belongs to no node. Identity 256 runs on node-a, 257 on
//! node-b; 258 is known and node-b holds its SVID, but it has no endpoint.

#[path = "handshake/flood.rs"]
mod flood;
#[path = "handshake/manager.rs"]
mod manager;
#[path = "handshake/refusals.rs"]
mod refusals;
#[path = "handshake/sessions.rs"]
mod sessions;
#[path = "handshake/shutdown.rs"]
mod shutdown;
#[path = "handshake/spire.rs"]
mod spire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use auth_agent::auth::store::{AuthStore, MemoryAuthStore};
use auth_agent::handshake::{
    ClientOptions, HandshakeClient, HandshakeServer, Metrics, Outcome, ServerOptions,
};
use auth_agent::nodes::NodeTable;
use meshauth_test_support::certs::{Leaf, cache_with};
use meshauth_test_support::init_tracing;
use policy_bridge::{
    AuthRule, DesiredState, Direction, Endpoint, Identity, NodeInfo, PortRange, Protocol, Remote,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use svid_cache::SvidCache;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

pub const A_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
pub const B_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
pub const ATTACKER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
pub const STRANGER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
pub const L: u32 = 256;
pub const R: u32 = 257;
pub const NO_ENDPOINT: u32 = 258;
pub const WAIT: Duration = Duration::from_secs(10);

pub fn node_info(name: &str, ip: IpAddr, wireguard_key: Option<&str>) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        handshake_addr: ip,
        addresses: BTreeSet::from([ip]),
        wireguard_key: wireguard_key.map(str::to_owned),
        pod_cidrs: Default::default(),
    }
}

/// 256 on node-a, 257 on node-b, 258 known without endpoints; rules make
/// (256, 257) required from both sides.
pub fn desired(wg_a: Option<&str>, wg_b: Option<&str>) -> DesiredState {
    let mut d = DesiredState::default();
    for id in [L, R, NO_ENDPOINT] {
        d.identities.insert(
            id,
            Identity {
                id,
                labels: BTreeSet::from([format!("k8s:app=w{id}")]),
            },
        );
    }
    for (ip, identity, node) in [("10.0.1.1", L, "node-a"), ("10.0.2.1", R, "node-b")] {
        let ip: IpAddr = ip.parse().expect("ip");
        d.endpoints.insert(
            ip,
            Endpoint {
                ip,
                identity,
                node: node.into(),
                pod: format!("default/w{identity}"),
            },
        );
    }
    d.nodes = BTreeMap::from([
        ("node-a".into(), node_info("node-a", A_IP, wg_a)),
        ("node-b".into(), node_info("node-b", B_IP, wg_b)),
    ]);
    for (local, remote, direction) in [(L, R, Direction::Egress), (R, L, Direction::Ingress)] {
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

/// A node table of `local` knowing the nodes of `d`.
pub fn node_table(local: &str, d: &DesiredState) -> NodeTable {
    let t = NodeTable::in_memory(local);
    t.sync(&d.nodes)
        .unwrap_or_else(|e| panic!("node table sync: {e}"));
    t
}

/// A running responder and what the test needs to watch it.
#[derive(Debug)]
pub struct Responder {
    pub addr: SocketAddr,
    pub store: Arc<MemoryAuthStore>,
    pub metrics: Metrics,
    pub nodes: NodeTable,
    pub desired: watch::Sender<Arc<DesiredState>>,
    outcomes: broadcast::Receiver<Arc<Outcome>>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Responder {
    /// node-b's responder on 127.0.0.2 (any port) with `cache`, over a memory store.
    pub async fn start(
        cache: SvidCache,
        d: DesiredState,
        tweak: impl FnOnce(&mut ServerOptions),
    ) -> Self {
        let store = Arc::new(MemoryAuthStore::default());
        Self::start_with(
            "node-b",
            cache,
            d,
            store.clone(),
            store,
            SocketAddr::new(B_IP, 0),
            tweak,
        )
        .await
    }

    /// `local`'s responder on `listen`, writing to `store` (`memory` is what
    /// the test reads; pass the same store, or a spare one when `store` is
    /// another kind).
    pub async fn start_with(
        local: &str,
        cache: SvidCache,
        d: DesiredState,
        memory: Arc<MemoryAuthStore>,
        store: Arc<dyn AuthStore>,
        listen: SocketAddr,
        tweak: impl FnOnce(&mut ServerOptions),
    ) -> Self {
        init_tracing();
        let nodes = node_table(local, &d);
        let (desired, rx) = watch::channel(Arc::new(d));
        let mut opts = ServerOptions::new(listen, cache, nodes.clone(), rx, store);
        tweak(&mut opts);
        let metrics = Metrics::default();
        let server = HandshakeServer::bind(opts, metrics.clone())
            .await
            .unwrap_or_else(|e| panic!("binding the responder on {listen}: {e}"));
        let addr = server.local_addr();
        let outcomes = server.subscribe();
        let shutdown = CancellationToken::new();
        let task = Some(server.spawn(shutdown.clone()));
        Self {
            addr,
            store: memory,
            metrics,
            nodes,
            desired,
            outcomes,
            shutdown,
            task,
        }
    }

    /// The next connection's outcome (panics after [`WAIT`]).
    pub async fn next_outcome(&mut self, what: &str) -> Arc<Outcome> {
        tokio::time::timeout(WAIT, self.outcomes.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: no responder outcome within {WAIT:?}"))
            .unwrap_or_else(|e| panic!("{what}: outcome stream: {e}"))
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("responder stops within WAIT")
                .expect("responder task did not panic");
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// node-a's initiator, dialling `port` from 127.0.0.1.
pub fn initiator(cache: SvidCache, port: u16, metrics: Metrics) -> HandshakeClient {
    let mut opts = ClientOptions::new(cache, "node-a");
    opts.port = port;
    opts.source_addr = Some(A_IP);
    HandshakeClient::new(opts, metrics)
}

/// Accepts any server certificate: the hand-built "attacker" clients use it.
#[derive(Debug)]
pub struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A hand-built client config presenting `leaf` (or nothing), TLS 1.3 (or
/// 1.2 only), ALPN meshauth/1, trusting any server.
pub fn raw_client_config(leaf: Option<&Leaf>, tls12_only: bool) -> rustls::ClientConfig {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("protocol versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnything));
    let mut config = match leaf {
        Some(l) => builder
            .with_client_auth_cert(l.chain.clone(), l.private_key())
            .unwrap_or_else(|e| panic!("client cert {}: {e}", l.spiffe_id)),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"meshauth/1".to_vec()];
    config
}

/// A TCP connection from `src` to `dst`.
pub async fn tcp_from(src: IpAddr, dst: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(src, 0))
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    s.connect(dst)
        .await
        .unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"))
}

/// Runs a hand-built client from `src`: TLS with `sni`, then a valid hello
/// for (local, R), then reads whatever comes. Its own result is not the
/// point; the responder's outcome is.
pub async fn raw_attempt(
    config: rustls::ClientConfig,
    src: IpAddr,
    dst: SocketAddr,
    sni: &str,
    local: u32,
) {
    let tcp = tcp_from(src, dst).await;
    let name = ServerName::try_from(sni.to_owned()).expect("sni");
    let attempt = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        let hello = auth_agent::handshake::protocol::Message::Hello(
            auth_agent::handshake::protocol::Hello {
                node: "node-a".into(),
                local,
                remote: R,
                wireguard_key: None,
            },
        );
        auth_agent::handshake::protocol::write(&mut tls, &hello)
            .await
            .map_err(std::io::Error::other)?;
        let _ = auth_agent::handshake::protocol::read(&mut tls).await;
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(WAIT, attempt).await;
}
