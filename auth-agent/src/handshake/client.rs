//! The initiator: local identity `L` proves itself to identity `R` on node
//! `Y`, at `Y`'s handshake address and nowhere else.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use policy_bridge::NodeInfo;
use rustls::SignatureScheme;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use svid_cache::SvidCache;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{Instrument as _, debug, info, info_span};

use super::metrics::{Metrics, Role};
use super::protocol::{self, Hello, Message};
use super::server::from_protocol;
use super::{ALPN, DEFAULT_PORT, DEFAULT_TIMEOUT, HandshakeError};
use crate::auth::{AuthFailure, Authenticated, Authenticator};

/// What the initiator needs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// This node's SVIDs and trust bundle.
    pub cache: SvidCache,
    /// This node's name, as stated in the message.
    pub local_node: String,
    /// The peers' handshake port.
    pub port: u16,
    /// Source address to connect from (the node's own handshake address),
    /// so the responder recognises the node; `None` lets the kernel choose.
    pub source_addr: Option<IpAddr>,
    /// Bound on the TCP connect.
    pub connect_timeout: Duration,
    /// Bound on TLS plus the message exchange.
    pub handshake_timeout: Duration,
    /// This node's WireGuard public key, when WireGuard is on.
    pub wireguard_key: super::StatedKey,
}

impl ClientOptions {
    /// Port 4250, 5 s timeouts, kernel-chosen source address, WireGuard off.
    pub fn new(cache: SvidCache, local_node: impl Into<String>) -> Self {
        Self {
            cache,
            local_node: local_node.into(),
            port: DEFAULT_PORT,
            source_addr: None,
            connect_timeout: DEFAULT_TIMEOUT,
            handshake_timeout: DEFAULT_TIMEOUT,
            wireguard_key: super::StatedKey::default(),
        }
    }
}

/// Presents one fixed SVID (the one read from the cache when the handshake
/// started, so its NotAfter is the one the expiry is computed from).
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client configs by (local, remote), each for the local SVID it presents.
type ConfigCache = std::sync::Mutex<
    std::collections::HashMap<(u32, u32), (Arc<svid_cache::Svid>, Arc<rustls::ClientConfig>)>,
>;

/// Most client configs kept; the cache starts afresh when full.
const CONFIG_CACHE_MAX: usize = 4096;

/// The `meshauth/1` initiator. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HandshakeClient {
    opts: Arc<ClientOptions>,
    metrics: Metrics,
    configs: Arc<ConfigCache>,
}

impl HandshakeClient {
    /// A client with these options, counting into `metrics`.
    pub fn new(opts: ClientOptions, metrics: Metrics) -> Self {
        Self {
            opts: Arc::new(opts),
            metrics,
            configs: Arc::default(),
        }
    }

    /// The rustls config for (local, remote) presenting `own`: built once
    /// and reused until the local SVID changes (the verifier reads the
    /// bundle at handshake time, so it never goes stale).
    fn config_for(
        &self,
        local: u32,
        remote: u32,
        own: &Arc<svid_cache::Svid>,
    ) -> Result<Arc<rustls::ClientConfig>, HandshakeError> {
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((svid, config)) = configs.get(&(local, remote))
            && Arc::ptr_eq(svid, own)
        {
            return Ok(config.clone());
        }
        let cache = &self.opts.cache;
        let mut config =
            svid_cache::tls::client_config(cache, local, remote).map_err(HandshakeError::Config)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = Resumption::disabled();
        config.client_auth_cert_resolver = Arc::new(FixedClientCert(own.certified_key().clone()));
        let config = Arc::new(config);
        if configs.len() >= CONFIG_CACHE_MAX {
            configs.clear();
        }
        configs.insert((local, remote), (own.clone(), config.clone()));
        Ok(config)
    }

    /// Authenticates `(local, remote)` with `node`'s agent.
    pub async fn handshake(
        &self,
        local: u32,
        remote: u32,
        node: &NodeInfo,
    ) -> Result<Authenticated, HandshakeError> {
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight(Role::Initiator);
        let span = info_span!("handshake", role = "initiator", local, remote, node = %node.name);
        let result = self.run(local, remote, node).instrument(span.clone()).await;
        let took = started.elapsed();
        let _enter = span.enter();
        match &result {
            Ok(a) => debug!(took_us = took.as_micros() as u64, expiry = ?a.expiry, "authenticated"),
            Err(e) => info!(reason = e.label(), error = %e, "handshake failed"),
        }
        self.metrics.record(
            Role::Initiator,
            result.as_ref().map_or_else(|e| e.label(), |_| "ok"),
            took,
        );
        result
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, HandshakeError> {
        let connect = async {
            let socket = match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            }?;
            if let Some(ip) = self.opts.source_addr {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            socket.connect(addr).await
        };
        let after = self.opts.connect_timeout;
        let tcp = tokio::time::timeout(after, connect)
            .await
            .map_err(|_| HandshakeError::ConnectTimeout { addr, after })?
            .map_err(|source| HandshakeError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn run(
        &self,
        local: u32,
        remote: u32,
        node: &NodeInfo,
    ) -> Result<Authenticated, HandshakeError> {
        let cache = &self.opts.cache;
        let own = cache
            .get(local)
            .ok_or(HandshakeError::NoSvid { identity: local })?;
        let sni = ServerName::try_from(cache.trust_domain().server_name(remote)).map_err(|e| {
            HandshakeError::UnknownSni {
                sni: Some(format!("{}: {e}", cache.trust_domain().server_name(remote))),
                trust_domain: cache.trust_domain().to_string(),
            }
        })?;

        // The node's handshake address: never any other address of it.
        // Connected first: an unreachable node costs no TLS config.
        let addr = SocketAddr::new(node.handshake_addr, self.opts.port);
        let tcp = self.connect(addr).await?;
        let config = self.config_for(local, remote, &own)?;
        let after = self.opts.handshake_timeout;
        let exchange = async {
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(sni, tcp)
                .await
                .map_err(|e| HandshakeError::from_io("TLS handshake", e))?;
            let conn = tls.get_ref().1;
            if conn.alpn_protocol() != Some(ALPN) {
                return Err(HandshakeError::AlpnMismatch {
                    got: conn
                        .alpn_protocol()
                        .map(|p| vec![String::from_utf8_lossy(p).into_owned()])
                        .unwrap_or_default(),
                });
            }
            let td = cache.trust_domain();
            let (_, peer_not_after) = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| super::verified_leaf(td, leaf))
                .ok_or(HandshakeError::Tls {
                    stage: "reading the server certificate",
                    source: rustls::Error::NoCertificatesPresented,
                })?;
            protocol::write(
                &mut tls,
                &Message::Hello(Hello {
                    node: self.opts.local_node.clone(),
                    local,
                    remote,
                    wireguard_key: self.opts.wireguard_key.current(),
                }),
            )
            .await
            .map_err(from_protocol)?;
            let reply = match protocol::read(&mut tls).await.map_err(from_protocol)? {
                Message::Hello(h) => h,
                Message::Refused { label, message } => {
                    return Err(HandshakeError::PeerRefused { label, message });
                }
            };
            let _ = tls.shutdown().await;
            super::check_statement(&reply, remote, local, node)?;
            Ok(Authenticated {
                expiry: own.not_after().min(peer_not_after),
                peer_node: reply.node,
                peer_wireguard_key: reply.wireguard_key,
            })
        };
        tokio::time::timeout(after, exchange)
            .await
            .unwrap_or(Err(HandshakeError::Timeout { peer: addr, after }))
    }
}

impl Authenticator for HandshakeClient {
    fn authenticate(
        &self,
        local: u32,
        remote: u32,
        node: NodeInfo,
    ) -> futures::future::BoxFuture<'static, Result<Authenticated, AuthFailure>> {
        let this = self.clone();
        async move {
            this.handshake(local, remote, &node)
                .await
                .map_err(AuthFailure::from)
        }
        .boxed()
    }
}
