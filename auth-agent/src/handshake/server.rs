//! The responder: accepts `meshauth/1` handshakes and writes the reverse
//! pair `(R, L, node X)` to the auth map.
//!
//! Per connection, in order: the source address must hold fewer than
//! `max_per_source` connections and fewer than `max_concurrent` handshakes
//! must run (else the connection is closed at once, counted in
//! `connections_refused_total{limit}`); the source address must belong to a
//! known node (else the socket is closed before any TLS); the ClientHello must
//! name `<R>.<td>` by SNI, offer ALPN `meshauth/1`, and `R` must have a local
//! endpoint and a valid SVID here (else an `access_denied` alert); then TLS
//! 1.3 with a mandatory client SVID of a known identity `L`; then the message
//! exchange. The TLS handshake (first byte to Finished) is bounded by the
//! short TLS timeout, the whole of it by the handshake timeout, so a peer
//! that sends nothing, or one byte at a time, holds its slot briefly.
//!
//! Refusals are counted in metrics every time and logged at most once per
//! peer address and interval ([`LogThrottle`]).
//!
//! On shutdown the listener closes, handshakes in flight get the drain
//! period to finish, and those still running are then cancelled (outcome
//! `shutting_down`); [`HandshakeServer::run`] returns when all have ended.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use policy_bridge::{DesiredState, NodeInfo};
use rustls::server::{Acceptor, ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use svid_cache::{ServerCertResolver, SpiffeClientVerifier, SvidCache};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::metrics::{Limit, Metrics, Role};
use super::proof::{self, Signer, Statement};
use super::protocol::{self, Hello, Message, Proof, ProtocolError, Version};
use super::throttle::{DEFAULT_MAX_PEERS, LogThrottle};
use super::{
    DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_PER_SOURCE, DEFAULT_REFUSAL_LOG_INTERVAL, DEFAULT_TIMEOUT,
    DEFAULT_TLS_TIMEOUT, HandshakeError,
};
use crate::auth::store::{AuthStore, Pair};
use crate::nodes::NodeTable;

/// What the responder needs.
#[derive(Clone)]
pub struct ServerOptions {
    /// Where to listen (the node's handshake address, port 4250).
    pub listen: SocketAddr,
    /// This node's SVIDs and trust bundle.
    pub cache: SvidCache,
    /// Known nodes: who may connect, and their names and WireGuard keys.
    pub nodes: NodeTable,
    /// The desired state: which identities run here, which are known, which
    /// pairs are required.
    pub desired: watch::Receiver<Arc<DesiredState>>,
    /// Where authenticated pairs go.
    pub store: Arc<dyn AuthStore>,
    /// Bound on TLS plus the message exchange.
    pub handshake_timeout: Duration,
    /// Bound on the TLS handshake alone (first byte of the ClientHello to
    /// Finished); shorter than `handshake_timeout`.
    pub tls_timeout: Duration,
    /// Handshakes served at once; connections beyond it are closed.
    pub max_concurrent: usize,
    /// Connections from one source address at once; connections beyond it
    /// are closed.
    pub max_per_source: usize,
    /// A refusal is logged at most once per peer address and interval.
    pub refusal_log_interval: Duration,
    /// On shutdown, how long handshakes in flight may still finish before
    /// they are cancelled.
    pub drain_timeout: Duration,
    /// This node's WireGuard public key, when WireGuard is on.
    pub wireguard_key: super::StatedKey,
    /// Whether `meshauth/2` sessions are offered (else only `meshauth/1`).
    pub sessions: bool,
    /// A session with no proof for this long is closed.
    pub session_idle_timeout: Duration,
    /// A session is closed this long after it opened, even if busy.
    pub session_max_age: Duration,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("listen", &self.listen)
            .field("local_node", &self.nodes.local_name())
            .field("handshake_timeout", &self.handshake_timeout)
            .field("tls_timeout", &self.tls_timeout)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_per_source", &self.max_per_source)
            .field("refusal_log_interval", &self.refusal_log_interval)
            .field("drain_timeout", &self.drain_timeout)
            .field("wireguard", &self.wireguard_key.current().is_some())
            .field("sessions", &self.sessions)
            .field("session_idle_timeout", &self.session_idle_timeout)
            .field("session_max_age", &self.session_max_age)
            .finish_non_exhaustive()
    }
}

impl ServerOptions {
    /// Options with the default timeouts (5 s overall, 1 s for TLS, 5 s of
    /// drain), limits (256 at once, 16 per source address) and refusal log
    /// interval (60 s), WireGuard off, sessions on (closed after 2 s idle or
    /// 10 min).
    pub fn new(
        listen: SocketAddr,
        cache: SvidCache,
        nodes: NodeTable,
        desired: watch::Receiver<Arc<DesiredState>>,
        store: Arc<dyn AuthStore>,
    ) -> Self {
        Self {
            listen,
            cache,
            nodes,
            desired,
            store,
            handshake_timeout: DEFAULT_TIMEOUT,
            tls_timeout: DEFAULT_TLS_TIMEOUT,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
            refusal_log_interval: DEFAULT_REFUSAL_LOG_INTERVAL,
            drain_timeout: DEFAULT_TIMEOUT,
            wireguard_key: super::StatedKey::default(),
            sessions: true,
            session_idle_timeout: super::DEFAULT_SESSION_IDLE_TIMEOUT,
            session_max_age: super::DEFAULT_SESSION_MAX_AGE,
        }
    }
}

/// A handshake the responder completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// `(R, L, node id of X)`.
    pub pair: Pair,
    /// The initiator's node.
    pub peer_node: String,
    /// The earlier leaf NotAfter.
    pub expiry: SystemTime,
    /// Whether the pair was written (only pairs the desired state requires are).
    pub stored: bool,
}

/// How one connection ended.
#[derive(Debug)]
pub struct Outcome {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The result.
    pub result: Result<Accepted, HandshakeError>,
}

/// What the desired state says, precomputed per snapshot.
#[derive(Debug, Default)]
struct View {
    local_ids: HashSet<u32>,
    known: HashSet<u32>,
    required: HashSet<(u32, u32, String)>,
}

/// Derives the [`View`] of the current desired state, once per snapshot.
#[derive(Debug)]
struct ViewCell {
    rx: watch::Receiver<Arc<DesiredState>>,
    local: String,
    cached: Mutex<Option<(Arc<DesiredState>, Arc<View>)>>,
}

impl ViewCell {
    fn current(&self) -> Arc<View> {
        let desired = self.rx.borrow().clone();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((d, v)) = &*cached
            && Arc::ptr_eq(d, &desired)
        {
            return v.clone();
        }
        let view = Arc::new(View {
            local_ids: desired.identities_on(&self.local).into_iter().collect(),
            known: desired.identities.keys().copied().collect(),
            required: desired.required_pairs(&self.local).into_iter().collect(),
        });
        *cached = Some((desired, view.clone()));
        view
    }
}

/// Serves one fixed SVID (the one chosen from the ClientHello).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Serves nothing: rustls answers with an `access_denied` alert.
#[derive(Debug)]
struct Refuse;

impl ResolvesServerCert for Refuse {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// Who may hold a connection: at most `per_source` per address, and at most
/// `global` in all.
#[derive(Debug)]
struct Admission {
    global: Arc<Semaphore>,
    per_source: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's share of both limits, given back on drop.
#[derive(Debug)]
struct Ticket {
    admission: Arc<Admission>,
    source: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    fn new(global: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            global: Arc::new(Semaphore::new(global.max(1))),
            per_source: per_source.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `source`, or names the limit it hit. The
    /// per-source limit is checked first, so one address cannot use up the
    /// global one.
    fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Ticket, Limit> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(source).or_insert(0);
        if *n >= self.per_source {
            return Err(Limit::PerSource);
        }
        let Ok(permit) = self.global.clone().try_acquire_owned() else {
            if *n == 0 {
                held.remove(&source);
            }
            return Err(Limit::Global);
        };
        *n += 1;
        Ok(Ticket {
            admission: self.clone(),
            source,
            _permit: permit,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = self
            .admission
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

struct Shared {
    opts: ServerOptions,
    local_name: String,
    view: Arc<ViewCell>,
    template: rustls::ServerConfig,
    refuse: Arc<rustls::ServerConfig>,
    metrics: Metrics,
    outcomes: broadcast::Sender<Arc<Outcome>>,
    admission: Arc<Admission>,
    log_throttle: LogThrottle,
}

/// The `meshauth/1` responder, bound and ready to [`run`](Self::run).
pub struct HandshakeServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HandshakeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeServer")
            .field("listener", &self.listener)
            .field("options", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

impl HandshakeServer {
    /// Binds the listener and builds the TLS configuration.
    pub async fn bind(opts: ServerOptions, metrics: Metrics) -> Result<Self, HandshakeError> {
        let local_name = opts.nodes.local_name();
        let view = Arc::new(ViewCell {
            rx: opts.desired.clone(),
            local: local_name.clone(),
            cached: Mutex::new(None),
        });
        let (serve, known) = (view.clone(), view.clone());
        let mut template = svid_cache::tls::server_config(
            ServerCertResolver::new(opts.cache.clone())
                .with_filter(move |id| serve.current().local_ids.contains(&id)),
            SpiffeClientVerifier::known(opts.cache.clone(), move |id| {
                known.current().known.contains(&id)
            }),
        )
        .map_err(HandshakeError::Config)?;
        template.alpn_protocols = if opts.sessions {
            vec![Version::V2.alpn().to_vec(), Version::V1.alpn().to_vec()]
        } else {
            vec![Version::V1.alpn().to_vec()]
        };
        template.send_tls13_tickets = 0;
        template.session_storage = Arc::new(NoServerSessionStorage {});
        let mut refuse = template.clone();
        refuse.cert_resolver = Arc::new(Refuse);
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| HandshakeError::Io {
                    stage: "binding the handshake listener",
                    source,
                })?;
        let (outcomes, _) = broadcast::channel(256);
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                admission: Admission::new(opts.max_concurrent, opts.max_per_source),
                log_throttle: LogThrottle::new(opts.refusal_log_interval, DEFAULT_MAX_PEERS),
                opts,
                local_name,
                view,
                template,
                refuse: Arc::new(refuse),
                metrics,
                outcomes,
            }),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.opts.listen)
    }

    /// Every connection's outcome from now on (for tests, status and logs).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Outcome>> {
        self.shared.outcomes.subscribe()
    }

    /// Serves until `shutdown` is cancelled, then closes the listener, lets
    /// the handshakes in flight finish for up to the drain timeout, cancels
    /// those still running, and returns once every one has ended.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let Self { listener, shared } = self;
        let addr = listener.local_addr().unwrap_or(shared.opts.listen);
        info!(%addr, node = %shared.local_name, "handshake server listening");
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            shared.metrics.accepted.inc();
            let ticket = match shared.admission.admit(peer.ip()) {
                Ok(t) => t,
                Err(limit) => {
                    drop(tcp);
                    shared.refuse_unserved(peer, limit);
                    continue;
                }
            };
            let (shared, cancel, stopping) = (shared.clone(), cancel.clone(), shutdown.clone());
            tasks.spawn(async move {
                shared.serve(tcp, peer, cancel, stopping).await;
                drop(ticket);
            });
        }
        // New connections are refused by the kernel from here on.
        drop(listener);
        tasks.close();
        let drain = shared.opts.drain_timeout;
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            info!(
                in_flight = tasks.len(),
                ?drain,
                "handshakes still in flight after the drain period; cancelling them"
            );
            cancel.cancel();
            tasks.wait().await;
        }
        info!(node = %shared.local_name, "handshake server stopped");
    }

    /// Spawns [`run`](Self::run) on the current runtime.
    pub fn spawn(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }
}

impl Shared {
    fn publish(&self, outcome: Outcome) {
        let _ = self.outcomes.send(Arc::new(outcome));
    }

    /// A connection closed at accept because `limit` was reached.
    fn refuse_unserved(&self, peer: SocketAddr, limit: Limit) {
        self.metrics
            .refused_connections
            .get_or_create(&super::metrics::LimitLabels { limit })
            .inc();
        let error = match limit {
            Limit::PerSource => HandshakeError::SourceOverloaded {
                limit: self.opts.max_per_source,
                peer,
            },
            Limit::Global => HandshakeError::Overloaded {
                limit: self.opts.max_concurrent,
                peer,
            },
        };
        if let Some(suppressed) = self.log_throttle.allow(peer.ip()) {
            warn!(peer.addr = %peer, reason = error.label(), error = %error, suppressed, "connection limit reached; connection closed unserved");
        }
        self.publish(Outcome {
            peer,
            result: Err(error),
        });
    }

    /// Serves one connection: the handshake, then its session if it opened
    /// one. `stopping` ends an idle session; `cancel` ends work in flight.
    async fn serve(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        cancel: CancellationToken,
        stopping: CancellationToken,
    ) {
        let started = Instant::now();
        let in_flight = self.metrics.in_flight(Role::Responder);
        let span = info_span!("handshake", role = "responder", peer.addr = %peer);
        let result = async {
            let Some((node_id, node)) = self.opts.nodes.by_address(peer.ip()) else {
                drop(tcp);
                return Err(HandshakeError::UnknownPeerAddress { addr: peer.ip() });
            };
            let _ = tcp.set_nodelay(true);
            let after = self.opts.handshake_timeout;
            tokio::select! {
                _ = cancel.cancelled() => Err(HandshakeError::ShuttingDown { peer }),
                r = tokio::time::timeout(after, self.exchange(tcp, peer, node_id, node)) => {
                    r.unwrap_or(Err(HandshakeError::Timeout { peer, after }))
                }
            }
        }
        .instrument(span.clone())
        .await;
        let (result, session) = match result {
            Ok((accepted, session)) => (Ok(accepted), session),
            Err(e) => (Err(e), None),
        };
        self.finish(peer, &span, started.elapsed(), result);
        drop(in_flight);
        if let Some(session) = session {
            let span = info_span!("session", role = "responder", peer.addr = %peer, node = %session.node.name);
            self.session(session, cancel, stopping)
                .instrument(span)
                .await;
        }
    }

    /// Records, logs and publishes one handshake's or proof's outcome.
    fn finish(
        &self,
        peer: SocketAddr,
        span: &tracing::Span,
        took: Duration,
        result: Result<Accepted, HandshakeError>,
    ) {
        let _enter = span.enter();
        match &result {
            Ok(a) => debug!(
                local = a.pair.local, remote = a.pair.remote, node = %a.peer_node,
                stored = a.stored, took_us = took.as_micros() as u64,
                "handshake accepted"
            ),
            Err(e) => {
                if let Some(suppressed) = self.log_throttle.allow(peer.ip()) {
                    // The peer in the line itself, not only in the span: a
                    // subscriber that drops spans still says who it was.
                    info!(
                        peer.addr = %peer,
                        reason = e.label(),
                        error = %e,
                        suppressed,
                        "handshake refused"
                    );
                }
            }
        }
        self.metrics.record(
            Role::Responder,
            result.as_ref().map_or_else(|e| e.label(), |_| "ok"),
            took,
        );
        self.publish(Outcome { peer, result });
    }

    /// Checks the ClientHello; on refusal answers with an alert.
    fn choose(&self, hello: &ClientHello<'_>) -> Result<Arc<svid_cache::Svid>, HandshakeError> {
        let td = self.opts.cache.trust_domain();
        let sni = hello.server_name();
        let Some(identity) = sni.and_then(|n| td.parse_server_name(n)) else {
            return Err(HandshakeError::UnknownSni {
                sni: sni.map(str::to_owned),
                trust_domain: td.to_string(),
            });
        };
        let offered: Vec<&[u8]> = hello.alpn().map(|a| a.collect()).unwrap_or_default();
        let served = &self.template.alpn_protocols;
        if !offered.iter().any(|o| served.iter().any(|s| s == o)) {
            return Err(HandshakeError::AlpnMismatch {
                got: offered
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect(),
            });
        }
        if !self.view.current().local_ids.contains(&identity) {
            return Err(HandshakeError::NoLocalEndpoint {
                identity,
                node: self.local_name.clone(),
            });
        }
        self.opts
            .cache
            .get(identity)
            .ok_or(HandshakeError::NoSvid { identity })
    }

    async fn exchange(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        node_id: u16,
        node: NodeInfo,
    ) -> Result<(Accepted, Option<Session>), HandshakeError> {
        let tls_after = self.opts.tls_timeout;
        let tls_deadline = tokio::time::Instant::now() + tls_after;
        let tls_timeout = |_| HandshakeError::TlsTimeout {
            peer,
            after: tls_after,
        };
        let start = tokio::time::timeout_at(
            tls_deadline,
            LazyConfigAcceptor::new(Acceptor::default(), tcp),
        )
        .await
        .map_err(tls_timeout)?
        .map_err(|e| HandshakeError::from_io("reading the ClientHello", e))?;
        let svid = match self.choose(&start.client_hello()) {
            Ok(svid) => svid,
            Err(refusal) => {
                // Let rustls send the alert; the refusal is what we report.
                let _ =
                    tokio::time::timeout_at(tls_deadline, start.into_stream(self.refuse.clone()))
                        .await;
                return Err(refusal);
            }
        };
        let r = svid.identity();
        let mut config = self.template.clone();
        config.cert_resolver = Arc::new(Fixed(svid.certified_key().clone()));
        let mut tls = tokio::time::timeout_at(tls_deadline, start.into_stream(Arc::new(config)))
            .await
            .map_err(tls_timeout)?
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
        let td = self.opts.cache.trust_domain();
        let (l, peer_not_after) = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| super::verified_leaf(td, leaf))
            .ok_or(HandshakeError::NoClientCertificate)?;

        let checked = async {
            let hello = match protocol::read_as(&mut tls, version).await {
                Ok(Message::Hello(h)) => h,
                Ok(Message::Refused { label, message, .. }) => {
                    return Err(HandshakeError::PeerRefused { label, message });
                }
                Ok(other) => {
                    return Err(HandshakeError::UnexpectedMessage {
                        got: kind(&other),
                        during: "as the opening hello",
                    });
                }
                Err(e) => return Err(from_protocol(e)),
            };
            super::check_statement(&hello, l, r, &node)?;
            Ok(())
        }
        .await;
        if let Err(e) = checked {
            if !matches!(
                e,
                HandshakeError::Io { .. }
                    | HandshakeError::Tls { .. }
                    | HandshakeError::PeerAlert { .. }
            ) {
                let _ = protocol::write_as(&mut tls, version, &refused(None, &e)).await;
                let _ = tls.shutdown().await;
            }
            return Err(e);
        }

        let expiry = svid.not_after().min(peer_not_after);
        let pair = Pair {
            local: r,
            remote: l,
            node: node_id,
        };
        let stored = match self.store_if_required(pair, &node, expiry) {
            Ok(stored) => stored,
            Err(e) => {
                let _ = protocol::write_as(&mut tls, version, &refused(None, &e)).await;
                return Err(e);
            }
        };
        protocol::write_as(
            &mut tls,
            version,
            &Message::Hello(Hello {
                node: self.local_name.clone(),
                local: r,
                remote: l,
                wireguard_key: self.opts.wireguard_key.current(),
            }),
        )
        .await
        .map_err(from_protocol)?;
        let session = match version {
            Version::V1 => {
                let _ = tls.shutdown().await;
                None
            }
            Version::V2 => {
                let exporter = proof::exporter(tls.get_ref().1)?;
                Some(Session {
                    tls,
                    peer,
                    node_id,
                    node: node.clone(),
                    exporter,
                })
            }
        };
        Ok((
            Accepted {
                pair,
                peer_node: node.name,
                expiry,
                stored,
            },
            session,
        ))
    }

    /// Writes `pair` if the desired state requires it; says whether it did.
    fn store_if_required(
        &self,
        pair: Pair,
        node: &NodeInfo,
        expiry: SystemTime,
    ) -> Result<bool, HandshakeError> {
        let required =
            self.view
                .current()
                .required
                .contains(&(pair.local, pair.remote, node.name.clone()));
        if required {
            self.opts
                .store
                .upsert(pair, expiry)
                .map_err(HandshakeError::Store)?;
        } else {
            debug!(%pair, node = %node.name, "pair not required by the desired state; not written");
        }
        Ok(required)
    }

    /// Serves a `meshauth/2` session's proofs until the peer closes it, it
    /// idles past the idle timeout, it reaches its maximum age, a proof
    /// breaks the protocol, or the server shuts down.
    async fn session(
        &self,
        mut s: Session,
        cancel: CancellationToken,
        stopping: CancellationToken,
    ) {
        let opened = Instant::now();
        let idle = self.opts.session_idle_timeout;
        let mut last_id = 0u64;
        let why = loop {
            let Some(age_left) = self.opts.session_max_age.checked_sub(opened.elapsed()) else {
                break "maximum age reached";
            };
            let read = tokio::select! {
                _ = stopping.cancelled() => break "shutting down",
                r = tokio::time::timeout(idle.min(age_left), protocol::read_as(&mut s.tls, Version::V2)) => r,
            };
            let proof = match read {
                Err(_) => break "idle or maximum age reached",
                Ok(Err(ProtocolError::Truncated {
                    got: 0,
                    part: "length prefix",
                    ..
                })) => {
                    break "closed by the peer";
                }
                Ok(Err(e)) => {
                    let e = from_protocol(e);
                    let _ = protocol::write_as(&mut s.tls, Version::V2, &refused(None, &e)).await;
                    self.finish(s.peer, &tracing::Span::current(), Duration::ZERO, Err(e));
                    break "unreadable message";
                }
                Ok(Ok(Message::Prove(p))) => p,
                Ok(Ok(other)) => {
                    let e = HandshakeError::UnexpectedMessage {
                        got: kind(&other),
                        during: "in a session (only proofs are expected)",
                    };
                    let _ = protocol::write_as(&mut s.tls, Version::V2, &refused(None, &e)).await;
                    self.finish(s.peer, &tracing::Span::current(), Duration::ZERO, Err(e));
                    break "unexpected message";
                }
            };
            let started = Instant::now();
            let in_flight = self.metrics.in_flight(Role::Responder);
            let id = proof.id;
            let after = self.opts.handshake_timeout;
            let answered = tokio::select! {
                _ = cancel.cancelled() => Err((HandshakeError::ShuttingDown { peer: s.peer }, true)),
                r = tokio::time::timeout(after, self.prove(&mut s, &mut last_id, proof)) => {
                    r.unwrap_or(Err((HandshakeError::Timeout { peer: s.peer, after }, true)))
                }
            };
            drop(in_flight);
            let (result, fatal) = match answered {
                Ok(accepted) => (Ok(accepted), false),
                Err((e, fatal)) => {
                    if !matches!(
                        e,
                        HandshakeError::Io { .. } | HandshakeError::Timeout { .. }
                    ) {
                        let _ = protocol::write_as(&mut s.tls, Version::V2, &refused(Some(id), &e))
                            .await;
                    }
                    (Err(e), fatal)
                }
            };
            self.finish(s.peer, &tracing::Span::current(), started.elapsed(), result);
            if fatal {
                break "a proof broke the protocol";
            }
        };
        debug!(why, "session closed");
        let _ = tokio::time::timeout(Duration::from_millis(100), s.tls.shutdown()).await;
    }

    /// Checks one proof, writes its pair when required and answers with ours.
    /// An error says whether it ends the session.
    async fn prove(
        &self,
        s: &mut Session,
        last_id: &mut u64,
        p: Proof,
    ) -> Result<Accepted, (HandshakeError, bool)> {
        let fatal = |e| (e, true);
        let refuse = |e| (e, false);
        if p.id <= *last_id {
            return Err(fatal(HandshakeError::ProofReplayed {
                id: p.id,
                last: *last_id,
            }));
        }
        *last_id = p.id;
        // The node behind the address must still be the one the session opened with.
        let node = match self.opts.nodes.by_address(s.peer.ip()) {
            Some((id, n)) if id == s.node_id && n.name == s.node.name => n,
            _ => {
                return Err(fatal(HandshakeError::UnknownPeerAddress {
                    addr: s.peer.ip(),
                }));
            }
        };
        let (l, r) = (p.local, p.remote);
        let view = self.view.current();
        if !view.local_ids.contains(&r) {
            return Err(refuse(HandshakeError::NoLocalEndpoint {
                identity: r,
                node: self.local_name.clone(),
            }));
        }
        let svid = self
            .opts
            .cache
            .get(r)
            .ok_or(HandshakeError::NoSvid { identity: r })
            .map_err(refuse)?;
        let decoded = proof::decode(&p).map_err(refuse)?;
        let known = view.clone();
        let verified = SpiffeClientVerifier::known(self.opts.cache.clone(), move |id| {
            known.known.contains(&id)
        })
        .verify(&decoded.chain)
        .map_err(|e| refuse(HandshakeError::PeerCertificate(e)))?;
        if verified.identity != l {
            return Err(refuse(HandshakeError::IdentityMismatch {
                field: "local",
                stated: l,
                expected: verified.identity,
            }));
        }
        let statement = Statement {
            exporter: &s.exporter,
            id: p.id,
            initiator: l,
            responder: r,
            initiator_node: &node.name,
            responder_node: &self.local_name,
        };
        proof::check(Signer::Initiator, &statement, &p, &decoded, None).map_err(refuse)?;
        super::check_wireguard_key(&node, &p.wireguard_key).map_err(refuse)?;
        let expiry = svid.not_after().min(verified.not_after);
        let pair = Pair {
            local: r,
            remote: l,
            node: s.node_id,
        };
        let stored = self
            .store_if_required(pair, &node, expiry)
            .map_err(refuse)?;
        let (answer, _) = proof::make(
            Signer::Responder,
            &statement,
            &svid,
            self.opts.wireguard_key.current(),
            Some(&decoded.signature),
        )
        .map_err(refuse)?;
        protocol::write_as(&mut s.tls, Version::V2, &Message::Proven(answer))
            .await
            .map_err(|e| fatal(from_protocol(e)))?;
        Ok(Accepted {
            pair,
            peer_node: node.name,
            expiry,
            stored,
        })
    }
}

/// An open `meshauth/2` session on the responder.
struct Session {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    node_id: u16,
    node: NodeInfo,
    exporter: [u8; 32],
}

/// A refusal message for `e` (for proof `id` in a session).
fn refused(id: Option<u64>, e: &HandshakeError) -> Message {
    Message::Refused {
        id,
        label: e.label().to_owned(),
        message: e.to_string(),
    }
}

/// A message's type, for errors.
pub(crate) fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Refused { .. } => "refused",
        Message::Prove(_) => "prove",
        Message::Proven(_) => "proven",
    }
}

/// Protocol errors, with TLS alerts hidden in I/O errors brought out.
pub(crate) fn from_protocol(e: ProtocolError) -> HandshakeError {
    match e {
        ProtocolError::Io { call, source } => HandshakeError::from_io(call, source),
        other => HandshakeError::Message(other),
    }
}
