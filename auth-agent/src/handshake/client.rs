//! The initiator: local identity `L` proves itself to identity `R` on node
//! `Y`, at `Y`'s handshake address and nowhere else.
//!
//! With sessions on, the first pair toward a node opens a `meshauth/2`
//! session (a full mutual TLS handshake authenticating that pair); while the
//! session is young and busy, further pairs toward the node are proved over
//! it ([`super::proof`]), pipelined: several proofs may await their answers
//! at once. A session the responder closed, or one quiet for longer than the
//! reuse window, is not used again; a proof whose session closed before it
//! was answered is retried once on a fresh one. A responder that only speaks
//! `meshauth/1` gets one handshake per pair, as before.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use policy_bridge::NodeInfo;
use rustls::SignatureScheme;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use svid_cache::{SpiffeServerVerifier, SvidCache};
use tokio::io::{AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tracing::{Instrument as _, debug, info, info_span};

use super::metrics::{Metrics, Role};
use super::proof::{self, Signer, Statement};
use super::protocol::{self, Hello, Message, Version};
use super::server::{from_protocol, kind};
use super::{
    DEFAULT_PORT, DEFAULT_SESSION_MAX_AGE, DEFAULT_SESSION_REUSE_WINDOW, DEFAULT_TIMEOUT,
    HandshakeError,
};
use crate::auth::{AuthFailure, Authenticated, Authenticator};

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

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
    /// Whether `meshauth/2` sessions are offered (else only `meshauth/1`).
    pub sessions: bool,
    /// A session quiet for this long is not used for another proof.
    pub session_reuse_window: Duration,
    /// A session this old is not used for another proof.
    pub session_max_age: Duration,
}

impl ClientOptions {
    /// Port 4250, 5 s timeouts, kernel-chosen source address, WireGuard
    /// off, sessions on (reused within 1 s of their last answer, for 9 min).
    pub fn new(cache: SvidCache, local_node: impl Into<String>) -> Self {
        Self {
            cache,
            local_node: local_node.into(),
            port: DEFAULT_PORT,
            source_addr: None,
            connect_timeout: DEFAULT_TIMEOUT,
            handshake_timeout: DEFAULT_TIMEOUT,
            wireguard_key: super::StatedKey::default(),
            sessions: true,
            session_reuse_window: DEFAULT_SESSION_REUSE_WINDOW,
            session_max_age: DEFAULT_SESSION_MAX_AGE - Duration::from_secs(60),
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

/// Open sessions by peer node name.
type Sessions = std::sync::Mutex<std::collections::HashMap<String, Arc<Session>>>;

/// The initiator. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HandshakeClient {
    opts: Arc<ClientOptions>,
    metrics: Metrics,
    configs: Arc<ConfigCache>,
    sessions: Arc<Sessions>,
}

impl HandshakeClient {
    /// A client with these options, counting into `metrics`.
    pub fn new(opts: ClientOptions, metrics: Metrics) -> Self {
        Self {
            opts: Arc::new(opts),
            metrics,
            configs: Arc::default(),
            sessions: Arc::default(),
        }
    }

    /// How many sessions are open (for tests and status).
    pub fn open_sessions(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
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
        config.alpn_protocols = if self.opts.sessions {
            vec![Version::V2.alpn().to_vec(), Version::V1.alpn().to_vec()]
        } else {
            vec![Version::V1.alpn().to_vec()]
        };
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
        if self.opts.sessions {
            for _ in 0..2 {
                let Some(session) = self.reusable(node) else {
                    break;
                };
                match session.prove(self, local, remote, node).await {
                    Err(HandshakeError::SessionClosed { reason, .. }) => {
                        debug!(reason, "session closed before answering; retrying");
                        self.forget(&session);
                    }
                    other => return other,
                }
            }
        }
        let (authenticated, session) = self.open(local, remote, node).await?;
        if let Some(session) = session {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let keep = sessions
                .get(&node.name)
                .is_none_or(|s| !s.usable(node, &self.opts));
            if keep {
                sessions.insert(node.name.clone(), session);
            }
            // Otherwise another pair opened one first; this one is dropped
            // (the responder sees the connection end).
        }
        Ok(authenticated)
    }

    /// The session toward `node` that may carry another proof, if any.
    fn reusable(&self, node: &NodeInfo) -> Option<Arc<Session>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get(&node.name)?.clone();
        if session.usable(node, &self.opts) {
            Some(session)
        } else {
            sessions.remove(&node.name);
            None
        }
    }

    /// Forgets `session` if it is still the one kept for its node.
    fn forget(&self, session: &Arc<Session>) {
        forget(&self.sessions, session);
    }

    /// A full handshake authenticating `(local, remote)`; with `meshauth/2`
    /// negotiated, also the session it opened.
    async fn open(
        &self,
        local: u32,
        remote: u32,
        node: &NodeInfo,
    ) -> Result<(Authenticated, Option<Arc<Session>>), HandshakeError> {
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
            let Some(version) = conn.alpn_protocol().and_then(Version::from_alpn) else {
                return Err(HandshakeError::AlpnMismatch {
                    got: conn
                        .alpn_protocol()
                        .map(|p| vec![String::from_utf8_lossy(p).into_owned()])
                        .unwrap_or_default(),
                });
            };
            let td = cache.trust_domain();
            let (_, peer_not_after) = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| super::verified_leaf(td, leaf))
                .ok_or(HandshakeError::Tls {
                    stage: "reading the server certificate",
                    source: rustls::Error::NoCertificatesPresented,
                })?;
            protocol::write_as(
                &mut tls,
                version,
                &Message::Hello(Hello {
                    node: self.opts.local_node.clone(),
                    local,
                    remote,
                    wireguard_key: self.opts.wireguard_key.current(),
                }),
            )
            .await
            .map_err(from_protocol)?;
            let reply = match protocol::read_as(&mut tls, version)
                .await
                .map_err(from_protocol)?
            {
                Message::Hello(h) => h,
                Message::Refused { label, message, .. } => {
                    return Err(HandshakeError::PeerRefused { label, message });
                }
                other => {
                    return Err(HandshakeError::UnexpectedMessage {
                        got: kind(&other),
                        during: "as the responder's hello",
                    });
                }
            };
            super::check_statement(&reply, remote, local, node)?;
            let session = match version {
                Version::V1 => {
                    let _ = tls.shutdown().await;
                    None
                }
                Version::V2 => {
                    let exporter = proof::exporter(tls.get_ref().1)?;
                    Some(Session::start(
                        tls,
                        addr,
                        node,
                        exporter,
                        Arc::downgrade(&self.sessions),
                    ))
                }
            };
            Ok((
                Authenticated {
                    expiry: own.not_after().min(peer_not_after),
                    peer_node: reply.node,
                    peer_wireguard_key: reply.wireguard_key,
                },
                session,
            ))
        };
        tokio::time::timeout(after, exchange)
            .await
            .unwrap_or(Err(HandshakeError::Timeout { peer: addr, after }))
    }
}

fn forget(sessions: &Sessions, session: &Arc<Session>) {
    let mut sessions = sessions.lock().unwrap_or_else(|e| e.into_inner());
    if sessions
        .get(&session.node)
        .is_some_and(|s| Arc::ptr_eq(s, session))
    {
        sessions.remove(&session.node);
    }
}

/// Answers awaited in a session, by proof number.
type Pending = std::collections::HashMap<u64, oneshot::Sender<Message>>;

/// What a session's reader and its users share.
#[derive(Debug, Default)]
struct SessionState {
    pending: Pending,
    /// Why the session ended, once it has.
    closed: Option<String>,
    /// When the last answer arrived (or the session opened).
    last_answer: Option<Instant>,
}

/// The writing side of a session: the stream and the next proof number,
/// under one lock so that numbers go out in order.
#[derive(Debug)]
struct Writer {
    tls: Option<WriteHalf<ClientTls>>,
    next_id: u64,
}

/// An open `meshauth/2` session toward one node.
#[derive(Debug)]
struct Session {
    peer: SocketAddr,
    node: String,
    opened: Instant,
    exporter: [u8; 32],
    writer: tokio::sync::Mutex<Writer>,
    state: Arc<std::sync::Mutex<SessionState>>,
    reader: tokio::task::AbortHandle,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    /// Splits the stream and starts the task that reads answers.
    fn start(
        tls: ClientTls,
        peer: SocketAddr,
        node: &NodeInfo,
        exporter: [u8; 32],
        pool: std::sync::Weak<Sessions>,
    ) -> Arc<Self> {
        let (read, write) = tokio::io::split(tls);
        let state = Arc::new(std::sync::Mutex::new(SessionState {
            last_answer: Some(Instant::now()),
            ..SessionState::default()
        }));
        Arc::new_cyclic(|me: &std::sync::Weak<Session>| {
            let reader = tokio::spawn(
                read_answers(read, state.clone(), me.clone(), pool)
                    .instrument(info_span!("session", role = "initiator", node = %node.name)),
            )
            .abort_handle();
            Session {
                peer,
                node: node.name.clone(),
                opened: Instant::now(),
                exporter,
                writer: tokio::sync::Mutex::new(Writer {
                    tls: Some(write),
                    next_id: 1,
                }),
                state,
                reader,
            }
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another proof toward `node` may go over this session.
    fn usable(&self, node: &NodeInfo, opts: &ClientOptions) -> bool {
        let state = self.state();
        state.closed.is_none()
            && self.node == node.name
            && self.peer.ip() == node.handshake_addr
            && self.opened.elapsed() < opts.session_max_age
            && (!state.pending.is_empty()
                || state
                    .last_answer
                    .is_some_and(|t| t.elapsed() < opts.session_reuse_window))
    }

    /// Proves `(local, remote)` over this session and checks the answer.
    async fn prove(
        &self,
        client: &HandshakeClient,
        local: u32,
        remote: u32,
        node: &NodeInfo,
    ) -> Result<Authenticated, HandshakeError> {
        let opts = &client.opts;
        let cache = &opts.cache;
        let own = cache
            .get(local)
            .ok_or(HandshakeError::NoSvid { identity: local })?;
        let closed = |reason: String| HandshakeError::SessionClosed {
            peer: self.peer,
            reason,
        };
        let after = opts.handshake_timeout;
        let timeout = HandshakeError::Timeout {
            peer: self.peer,
            after,
        };
        let deadline = tokio::time::Instant::now() + after;
        let (id, signature, rx) = {
            let mut writer = tokio::time::timeout_at(deadline, self.writer.lock())
                .await
                .map_err(|_| closed("no turn to write before the timeout".into()))?;
            let id = writer.next_id;
            let statement = Statement {
                exporter: &self.exporter,
                id,
                initiator: local,
                responder: remote,
                initiator_node: &opts.local_node,
                responder_node: &node.name,
            };
            let (request, signature) = proof::make(
                Signer::Initiator,
                &statement,
                &own,
                opts.wireguard_key.current(),
                None,
            )?;
            let (tx, rx) = oneshot::channel();
            {
                let mut state = self.state();
                if let Some(reason) = &state.closed {
                    return Err(closed(reason.clone()));
                }
                state.pending.insert(id, tx);
            }
            writer.next_id += 1;
            let Some(tls) = writer.tls.as_mut() else {
                return Err(closed("the session's stream is gone".into()));
            };
            let written = tokio::time::timeout_at(
                deadline,
                protocol::write_as(tls, Version::V2, &Message::Prove(request)),
            )
            .await;
            if !matches!(written, Ok(Ok(()))) {
                writer.tls = None;
                let reason = match written {
                    Ok(Err(e)) => format!("writing the proof: {e}"),
                    _ => "writing the proof timed out".into(),
                };
                let mut state = self.state();
                state.pending.remove(&id);
                state.closed.get_or_insert(reason.clone());
                return Err(closed(reason));
            }
            (id, signature, rx)
        };
        let answer = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => {
                let reason = self
                    .state()
                    .closed
                    .clone()
                    .unwrap_or_else(|| "closed".into());
                return Err(closed(reason));
            }
            Err(_) => {
                self.state().pending.remove(&id);
                return Err(timeout);
            }
        };
        let p = match answer {
            Message::Proven(p) => p,
            Message::Refused { label, message, .. } => {
                return Err(HandshakeError::PeerRefused { label, message });
            }
            other => {
                return Err(HandshakeError::UnexpectedMessage {
                    got: kind(&other),
                    during: "as the answer to a proof",
                });
            }
        };
        let decoded = proof::decode(&p)?;
        let verified = SpiffeServerVerifier::new(cache.clone(), remote)
            .verify(&decoded.chain)
            .map_err(HandshakeError::PeerCertificate)?;
        let statement = Statement {
            exporter: &self.exporter,
            id,
            initiator: local,
            responder: remote,
            initiator_node: &opts.local_node,
            responder_node: &node.name,
        };
        proof::check(
            Signer::Responder,
            &statement,
            &p,
            &decoded,
            Some(&signature),
        )?;
        super::check_wireguard_key(node, &p.wireguard_key)?;
        Ok(Authenticated {
            expiry: own.not_after().min(verified.not_after),
            peer_node: p.node,
            peer_wireguard_key: p.wireguard_key,
        })
    }
}

/// Reads a session's answers and hands each to the proof awaiting it; when
/// the stream ends or breaks the protocol, marks the session closed, fails
/// every proof still waiting and removes the session from the pool.
async fn read_answers(
    mut read: ReadHalf<ClientTls>,
    state: Arc<std::sync::Mutex<SessionState>>,
    me: std::sync::Weak<Session>,
    pool: std::sync::Weak<Sessions>,
) {
    let reason = loop {
        let message = match protocol::read_as(&mut read, Version::V2).await {
            Ok(m) => m,
            Err(protocol::ProtocolError::Truncated {
                got: 0,
                part: "length prefix",
                ..
            }) => break "closed by the responder".to_owned(),
            Err(e) => break format!("reading an answer: {e}"),
        };
        let id = match &message {
            Message::Proven(p) => Some(p.id),
            Message::Refused { id, .. } => *id,
            _ => None,
        };
        let Some(id) = id else {
            break format!("the responder sent a {} message", kind(&message));
        };
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        state.last_answer = Some(Instant::now());
        match state.pending.remove(&id) {
            Some(tx) => {
                let _ = tx.send(message);
            }
            None => debug!(id, "answer to no proof in flight (its proof timed out)"),
        }
    };
    debug!(reason, "session ended");
    {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        state.closed.get_or_insert(reason);
        // Dropping the senders fails every proof still waiting.
        state.pending.clear();
    }
    if let (Some(session), Some(pool)) = (me.upgrade(), pool.upgrade()) {
        forget(&pool, &session);
        // The write half goes with the session: the socket is closed once
        // no proof holds the session any more.
        if let Ok(mut writer) = session.writer.try_lock() {
            writer.tls = None;
        }
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
