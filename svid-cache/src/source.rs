//! Sources of SVIDs: one owning worker per source that connects, streams full
//! states into the cache, and reconnects with jittered exponential backoff.
//!
//! - [`workload::spawn_workload_api`]: the SPIFFE Workload API (the `spiffe` crate's client).
//! - [`delegated::spawn_delegated_identity`]: SPIRE's Delegated Identity API.
//! - [`delegated_pods::spawn_delegated_pods`]: the same API, one subscription
//!   per pod by PID.
//!
//! Each returns a [`SourceHandle`] whose [`SourceStatus`] (a `watch`) says at any
//! time whether the source is connecting, connected or disconnected and why.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::CacheError;

pub mod delegated;
pub mod delegated_pods;
mod supervisor;
pub mod workload;

/// Why a source is disconnected or why a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The socket file does not exist.
    #[error("connect {path}: socket missing (no such file); is the SPIRE agent running?")]
    SocketMissing {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket exists but nobody accepts connections on it.
    #[error("connect {path}: connection refused; the socket exists but nothing listens on it")]
    ConnectionRefused {
        /// The socket path.
        path: PathBuf,
    },
    /// Connecting failed for another reason.
    #[error("connect {path}: {reason}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error chain.
        reason: String,
    },
    /// Connecting and opening the stream(s) did not finish in time: something
    /// accepts on the socket (or queues the connection) but does not answer.
    #[error(
        "{call} on {path}: no answer within {after:?} (connect and open the stream); is the SPIRE agent hung?"
    )]
    ConnectTimeout {
        /// The RPC.
        call: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The connect timeout.
        after: Duration,
    },
    /// The peer does not speak HTTP/2 gRPC (garbage on the socket).
    #[error("{call} on {path}: protocol error, the peer does not speak gRPC over HTTP/2: {detail}")]
    Protocol {
        /// The RPC.
        call: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The error chain.
        detail: String,
    },
    /// The RPC failed with a gRPC status.
    #[error("{call} on {path}: gRPC status {code}: {message}")]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The gRPC code.
        code: String,
        /// The status message and its causes.
        message: String,
    },
    /// The server answered "no identity issued": it serves no SVID to this caller (full state: empty).
    #[error(
        "{call} on {path}: no identity issued (PermissionDenied); no registration entry matches this caller"
    )]
    NoIdentityIssued {
        /// The RPC.
        call: &'static str,
        /// The socket path.
        path: PathBuf,
    },
    /// The server ended the stream.
    #[error("{call} on {path}: the server closed the stream")]
    StreamEnded {
        /// The RPC.
        call: &'static str,
        /// The socket path.
        path: PathBuf,
    },
    /// A message could not be decoded into SVIDs/bundles (malformed certificate, key, bundle, SPIFFE ID); it was rejected as a whole.
    #[error("{call} on {path}: message rejected, cache unchanged: {reason}")]
    MalformedMessage {
        /// The RPC.
        call: &'static str,
        /// The socket path.
        path: PathBuf,
        /// What was malformed.
        reason: String,
    },
    /// The cache rejected a message's content; it kept what it had.
    #[error("{call} on {path}: {source}")]
    Rejected {
        /// The RPC.
        call: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The cache's reason.
        #[source]
        source: Box<CacheError>,
    },
}

impl SourceError {
    /// Whether this error rejected one message but left the stream usable.
    pub fn is_message_rejection(&self) -> bool {
        matches!(self, Self::MalformedMessage { .. } | Self::Rejected { .. })
    }

    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::SocketMissing { .. } => "socket_missing",
            Self::ConnectionRefused { .. } => "connection_refused",
            Self::Connect { .. } => "connect",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Protocol { .. } => "protocol",
            Self::Rpc { .. } => "rpc",
            Self::NoIdentityIssued { .. } => "no_identity_issued",
            Self::StreamEnded { .. } => "stream_ended",
            Self::MalformedMessage { .. } => "malformed_message",
            Self::Rejected { .. } => "rejected",
        }
    }
}

/// Where a source stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceState {
    /// Connecting for the first time.
    Connecting,
    /// The server accepted the stream(s); messages are applied as they arrive.
    Connected {
        /// When the current stream was opened.
        since: SystemTime,
    },
    /// The last stream ended or could not be opened; retrying with backoff.
    /// Stored SVIDs are kept until they expire.
    Disconnected {
        /// When the source was last connected or, if never, first failed.
        since: SystemTime,
        /// The latest failure.
        error: Arc<SourceError>,
    },
}

/// The state of a source plus counters, published through a `watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// Connecting, connected or disconnected.
    pub state: SourceState,
    /// The latest error of any kind (including rejected messages while connected), and when.
    pub last_error: Option<(SystemTime, Arc<SourceError>)>,
    /// Messages applied to the cache.
    pub updates_applied: u64,
    /// Messages rejected (malformed, or refused by the cache).
    pub updates_rejected: u64,
    /// Streams opened after the first.
    pub reconnects: u64,
}

impl Default for SourceStatus {
    fn default() -> Self {
        Self {
            state: SourceState::Connecting,
            last_error: None,
            updates_applied: 0,
            updates_rejected: 0,
            reconnects: 0,
        }
    }
}

impl SourceStatus {
    /// Whether the source is connected.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, SourceState::Connected { .. })
    }
}

/// The running worker of a source.
#[derive(Debug)]
pub struct SourceHandle {
    name: &'static str,
    status: watch::Receiver<SourceStatus>,
    task: JoinHandle<()>,
}

impl SourceHandle {
    pub(crate) fn new(
        name: &'static str,
        status: watch::Receiver<SourceStatus>,
        task: JoinHandle<()>,
    ) -> Self {
        Self { name, status, task }
    }

    /// The source's name (`"workload_api"`, `"delegated_identity"`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The current status.
    pub fn status(&self) -> SourceStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch_status(&self) -> watch::Receiver<SourceStatus> {
        self.status.clone()
    }

    /// Waits for the worker to stop (after its shutdown token is cancelled).
    pub async fn join(self) {
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// Reconnect timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The first delay ceiling.
    pub initial: Duration,
    /// The largest delay ceiling.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Jittered exponential backoff: the ceiling doubles from `initial` to `max`;
/// each delay is drawn uniformly from `[ceiling/2, ceiling]` ("equal jitter"), so
/// many agents restarting together do not reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    ceiling: Duration,
    rng: StdRng,
}

impl Backoff {
    /// A backoff seeded from the OS.
    pub fn new(config: BackoffConfig) -> Self {
        Self::with_rng(config, StdRng::from_os_rng())
    }

    /// A backoff with a given random generator (tests seed it).
    pub fn with_rng(config: BackoffConfig, rng: StdRng) -> Self {
        Self {
            config,
            ceiling: config.initial,
            rng,
        }
    }

    /// The next delay; raises the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling.min(self.config.max);
        self.ceiling = (ceiling * 2).min(self.config.max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.random_range(nanos / 2..=nanos))
    }

    /// The current ceiling (the largest value the next delay can take).
    pub fn ceiling(&self) -> Duration {
        self.ceiling.min(self.config.max)
    }

    /// Back to `initial` (after a good message).
    pub fn reset(&mut self) {
        self.ceiling = self.config.initial;
    }
}

/// Turns a transport failure into a [`SourceError`] naming what failed: a missing
/// socket, a refused connection, protocol garbage, or a gRPC status.
pub(crate) fn classify_transport(
    call: &'static str,
    path: &Path,
    status_code: Option<String>,
    status_message: Option<&str>,
    err: &(dyn StdError + 'static),
) -> SourceError {
    let mut chain = Vec::new();
    let mut io_kind = None;
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
        }
        let text = e.to_string();
        if chain.last() != Some(&text) && !text.is_empty() {
            chain.push(text);
        }
        cur = e.source();
    }
    let detail = chain.join(": ");
    let path = path.to_owned();
    match io_kind {
        Some(std::io::ErrorKind::NotFound) => return SourceError::SocketMissing { path },
        Some(std::io::ErrorKind::ConnectionRefused) => {
            return SourceError::ConnectionRefused { path };
        }
        _ => {}
    }
    let lower = detail.to_ascii_lowercase();
    if lower.contains("http2")
        || lower.contains("h2 protocol")
        || lower.contains("frame")
        || lower.contains("invalid http")
        || lower.contains("preface")
    {
        return SourceError::Protocol { call, path, detail };
    }
    match (status_code, io_kind) {
        (Some(code), _) => SourceError::Rpc {
            call,
            path,
            code,
            message: match status_message {
                Some(m) if !detail.contains(m) => format!("{m}: {detail}"),
                _ => detail,
            },
        },
        (None, _) => SourceError::Connect {
            path,
            reason: detail,
        },
    }
}

/// Default bound on connecting to the SPIRE agent's socket and opening the
/// stream(s): the agent is local, so an answer takes milliseconds; 10 s
/// leaves room for a loaded node.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default cap on one gRPC message from SPIRE. A full state carries each SVID
/// with its chain, key and bundle (about 1.2 KiB for a P-256 SVID and one
/// root), so 64 MiB holds some 50,000 identities; tonic's default (4 MiB,
/// which the `spiffe` crate cannot change) stops at about 3,400.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A gRPC channel over a unix socket (the URI is required by tonic and
/// unused: the connector dials the socket).
pub(crate) async fn uds_channel(
    call: &'static str,
    path: &Path,
) -> Result<tonic::transport::Channel, SourceError> {
    use hyper_util::rt::TokioIo;
    use tokio::net::UnixStream;
    use tonic::transport::{Endpoint, Uri};
    let connect_path = path.to_owned();
    Endpoint::from_static("http://spire-agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = connect_path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|e| classify_transport(call, path, None, None, &e))
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and
/// `bundle` encoding) by their outer SEQUENCE headers, without parsing them.
pub(crate) fn split_der(
    mut der: &[u8],
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let at = out.len();
        if der[0] != 0x30 || der.len() < 2 {
            return Err(format!("certificate {at}: not a DER SEQUENCE"));
        }
        let (header, len) = match der[1] {
            n if n < 0x80 => (2, usize::from(n)),
            0x81..=0x84 => {
                let k = usize::from(der[1] & 0x7f);
                if der.len() < 2 + k {
                    return Err(format!("certificate {at}: truncated length"));
                }
                let len = der[2..2 + k]
                    .iter()
                    .fold(0usize, |a, &b| a << 8 | usize::from(b));
                (2 + k, len)
            }
            _ => return Err(format!("certificate {at}: unsupported DER length form")),
        };
        let total = header
            .checked_add(len)
            .filter(|&t| t <= der.len())
            .ok_or_else(|| {
                format!(
                    "certificate {at}: {len} bytes announced, {} left",
                    der.len()
                )
            })?;
        out.push(rustls_pki_types::CertificateDer::from(
            der[..total].to_vec(),
        ));
        der = &der[total..];
    }
    Ok(out)
}

/// [`classify_transport`] for a tonic status.
pub(crate) fn classify_status(
    call: &'static str,
    path: &Path,
    status: &tonic::Status,
) -> SourceError {
    if status.code() == tonic::Code::PermissionDenied
        && status.message().contains(spire_proto::NO_IDENTITY_ISSUED)
    {
        return SourceError::NoIdentityIssued {
            call,
            path: path.to_owned(),
        };
    }
    classify_transport(
        call,
        path,
        Some(format!("{:?}", status.code())),
        Some(status.message()),
        status,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_grows_to_the_cap_within_jitter_bounds() {
        let mut b = Backoff::with_rng(config(), StdRng::seed_from_u64(7));
        let mut ceiling = Duration::from_millis(100);
        for _ in 0..12 {
            assert_eq!(b.ceiling(), ceiling);
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} not in [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(Duration::from_secs(10));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(10));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn backoff_is_jittered() {
        // Two workers seeded differently do not wait the same: at the cap, 20 draws
        // from [5 s, 10 s] are all distinct in practice, and differ between workers.
        let mut a = Backoff::with_rng(config(), StdRng::seed_from_u64(1));
        let mut b = Backoff::with_rng(config(), StdRng::seed_from_u64(2));
        let da: Vec<Duration> = (0..20).map(|_| a.next_delay()).collect();
        let db: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert_ne!(da, db);
        let capped: std::collections::HashSet<_> = da[8..].iter().collect();
        assert!(capped.len() > 6, "draws at the cap barely vary: {da:?}");
        // Grows: the mean of late delays is far above the early ones.
        assert!(da[10] > da[0] * 10);
    }

    #[test]
    fn transport_errors_name_the_cause() {
        let path = Path::new("/run/x.sock");
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(
            classify_transport("Fetch", path, None, None, &missing),
            SourceError::SocketMissing {
                path: path.to_owned()
            }
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            classify_transport("Fetch", path, None, None, &refused),
            SourceError::ConnectionRefused { .. }
        ));
        let st = tonic::Status::permission_denied("no identity issued");
        assert!(matches!(
            classify_status("Fetch", path, &st),
            SourceError::NoIdentityIssued { .. }
        ));
        let st = tonic::Status::unavailable("agent going away");
        let e = classify_status("Fetch", path, &st);
        assert!(e.to_string().contains("agent going away"), "{e}");
    }
}
