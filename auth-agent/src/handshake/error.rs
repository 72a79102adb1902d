//! What can go wrong in a handshake or a pair proof, one variant per check.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rustls::AlertDescription;
use svid_cache::VerifyError;

use super::protocol::ProtocolError;
use crate::auth::AuthFailure;
use crate::auth::store::StoreError;

/// Why a handshake failed. [`HandshakeError::label`] names the failed check
/// for metrics (`meshauth_handshake_handshakes_total{result=...}`).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The TCP connection to the peer's handshake address failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection did not complete in time.
    #[error("connect to {addr}: no answer within {after:?}")]
    ConnectTimeout {
        /// The address dialled.
        addr: SocketAddr,
        /// The connect timeout.
        after: Duration,
    },
    /// TLS plus the message exchange did not finish in time.
    #[error("handshake with {peer} did not finish within {after:?}")]
    Timeout {
        /// The peer's address.
        peer: SocketAddr,
        /// The handshake timeout.
        after: Duration,
    },
    /// The peer's certificate chain failed SPIFFE verification (the inner
    /// error's label is this error's label: `expired`, `leaf_is_ca`, …).
    #[error("peer certificate rejected: {0}")]
    PeerCertificate(#[source] VerifyError),
    /// The peer offered only TLS 1.2 or older, or refused TLS 1.3.
    #[error("TLS protocol version refused (meshauth/1 is TLS 1.3 only): {reason}")]
    ProtocolVersion {
        /// What rustls said.
        reason: String,
    },
    /// The client sent no certificate; client authentication is mandatory.
    #[error("the client presented no certificate; meshauth/1 requires the client's SVID")]
    NoClientCertificate,
    /// The SNI is missing or is not `<N>.<trust domain>`.
    #[error("SNI {sni:?} is not <identity>.{trust_domain}")]
    UnknownSni {
        /// The SNI sent, if any.
        sni: Option<String>,
        /// The trust domain served.
        trust_domain: String,
    },
    /// The requested identity has no endpoint on this node.
    #[error("identity {identity} has no local endpoint on node {node}; not serving its SVID")]
    NoLocalEndpoint {
        /// The identity named by the SNI.
        identity: u32,
        /// This node.
        node: String,
    },
    /// This node holds no valid SVID for an identity it must present.
    #[error("no valid SVID for identity {identity} on this node")]
    NoSvid {
        /// The identity.
        identity: u32,
    },
    /// The connection came from an address that belongs to no known node.
    #[error("peer address {addr} belongs to no known node; refused before TLS")]
    UnknownPeerAddress {
        /// The source address.
        addr: IpAddr,
    },
    /// The peer did not offer or select ALPN `meshauth/1`.
    #[error("ALPN mismatch: peer offered/selected {got:?}, meshauth/1 is required")]
    AlpnMismatch {
        /// The protocols offered (server side) or selected (client side), lossy UTF-8.
        got: Vec<String>,
    },
    /// The peer sent a TLS alert that ended the handshake.
    #[error("peer ended the TLS handshake with alert {alert:?}")]
    PeerAlert {
        /// The alert.
        alert: AlertDescription,
    },
    /// Any other TLS failure (garbage instead of TLS, bad record, …).
    #[error("{stage}: TLS: {source}")]
    Tls {
        /// Where (`reading the ClientHello`, `TLS handshake`, …).
        stage: &'static str,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// Reading or writing the connection failed (reset, closed mid-handshake).
    #[error("{stage}: {source}")]
    Io {
        /// Where (`tls handshake`, …).
        stage: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The protocol message could not be read or written.
    #[error("meshauth/1 message: {0}")]
    Message(#[source] ProtocolError),
    /// The peer's message states identities other than the verified ones.
    #[error("peer's message states {field} = {stated}, but the TLS session established {expected}")]
    IdentityMismatch {
        /// `local` or `remote`.
        field: &'static str,
        /// The value stated.
        stated: u32,
        /// The value established by the certificates and SNI.
        expected: u32,
    },
    /// The peer's stated node name is not the node it is.
    #[error("peer states node {stated:?}, but it is node {expected:?}")]
    NodeMismatch {
        /// The node by address (responder) or by dialling (initiator).
        expected: String,
        /// The node name in the message.
        stated: String,
    },
    /// The peer's WireGuard key differs from the key its node published.
    #[error("node {node} published WireGuard key {published}, but its agent states {stated:?}")]
    WireGuardKeyMismatch {
        /// The peer node.
        node: String,
        /// The published key.
        published: String,
        /// The key in the message.
        stated: Option<String>,
    },
    /// The responder refused our message.
    #[error("responder refused: {message} [{label}]")]
    PeerRefused {
        /// The responder's label.
        label: String,
        /// The responder's message.
        message: String,
    },
    /// The concurrency limit was reached; the connection was closed unserved.
    #[error("{limit} handshakes in flight; connection from {peer} refused")]
    Overloaded {
        /// The limit.
        limit: usize,
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The peer's address already holds as many connections as one source
    /// may; the connection was closed unserved.
    #[error("{limit} connections from {} in flight (the per-source limit); connection from {peer} refused", peer.ip())]
    SourceOverloaded {
        /// The per-source limit.
        limit: usize,
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The peer did not complete the TLS handshake (ClientHello to Finished)
    /// within the TLS deadline, which is shorter than the overall timeout.
    #[error("{peer} did not complete the TLS handshake within {after:?}")]
    TlsTimeout {
        /// The peer's address.
        peer: SocketAddr,
        /// The TLS deadline.
        after: Duration,
    },
    /// The agent is shutting down: the handshake was cancelled after the
    /// drain period.
    #[error("handshake with {peer} cancelled: the agent is shutting down")]
    ShuttingDown {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// Writing the pair to the auth map failed.
    #[error("writing the auth entry: {0}")]
    Store(#[source] StoreError),
    /// Building a TLS configuration failed.
    #[error("TLS config: {0}")]
    Config(#[source] svid_cache::tls::TlsError),
    /// A `meshauth/2` proof could not be signed, or its signature did not verify.
    #[error("pair proof: {0}")]
    Proof(#[source] svid_cache::proof::ProofError),
    /// A `meshauth/2` proof is not well formed (chain, encoding, id).
    #[error("pair proof malformed: {reason}")]
    ProofMalformed {
        /// What is wrong.
        reason: String,
    },
    /// A `meshauth/2` proof reused or went back on a request number.
    #[error("pair proof number {id} after {last}: numbers must increase within a session")]
    ProofReplayed {
        /// The number sent.
        id: u64,
        /// The last number seen.
        last: u64,
    },
    /// A message that has no place at this point of the exchange.
    #[error("unexpected {got} message {during}")]
    UnexpectedMessage {
        /// The message's type.
        got: &'static str,
        /// Where in the exchange.
        during: &'static str,
    },
    /// The session ended before the answer to a proof arrived.
    #[error("the meshauth/2 session with {peer} closed before answering: {reason}")]
    SessionClosed {
        /// The peer's address.
        peer: SocketAddr,
        /// Why, as far as known.
        reason: String,
    },
}

impl HandshakeError {
    /// A short stable label for metrics and for the manager's backoff logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Timeout { .. } => "timeout",
            Self::PeerCertificate(v) => v.label(),
            Self::ProtocolVersion { .. } => "tls12_refused",
            Self::NoClientCertificate => "no_client_certificate",
            Self::UnknownSni { .. } => "unknown_sni",
            Self::NoLocalEndpoint { .. } => "no_local_endpoint",
            Self::NoSvid { .. } => "no_svid",
            Self::UnknownPeerAddress { .. } => "unknown_peer_address",
            Self::AlpnMismatch { .. } => "alpn_mismatch",
            Self::PeerAlert { alert } => alert_label(*alert),
            Self::Tls { .. } => "tls",
            Self::Io { .. } => "io",
            Self::Message(p) => p.label(),
            Self::IdentityMismatch { .. } => "message_identity_mismatch",
            Self::NodeMismatch { .. } => "node_name_mismatch",
            Self::WireGuardKeyMismatch { .. } => "wireguard_key_mismatch",
            Self::PeerRefused { .. } => "peer_refused",
            Self::Overloaded { .. } => "overloaded",
            Self::SourceOverloaded { .. } => "source_overloaded",
            Self::TlsTimeout { .. } => "tls_timeout",
            Self::ShuttingDown { .. } => "shutting_down",
            Self::Store(_) => "store",
            Self::Config(_) => "config",
            Self::Proof(p) => match p {
                svid_cache::proof::ProofError::BadSignature { .. } => "proof_signature_invalid",
                svid_cache::proof::ProofError::UnsupportedScheme { .. } => "proof_scheme",
                svid_cache::proof::ProofError::Certificate(_) => "proof_malformed",
                svid_cache::proof::ProofError::NoScheme
                | svid_cache::proof::ProofError::Sign(_) => "proof_sign",
            },
            Self::ProofMalformed { .. } => "proof_malformed",
            Self::ProofReplayed { .. } => "proof_replayed",
            Self::UnexpectedMessage { .. } => "message_unexpected",
            Self::SessionClosed { .. } => "session_closed",
        }
    }

    /// Classifies a rustls error seen on our side of the handshake.
    pub(crate) fn from_rustls(stage: &'static str, err: rustls::Error) -> Self {
        if let Some(v) = VerifyError::from_rustls(&err) {
            return Self::PeerCertificate(v.clone());
        }
        match err {
            rustls::Error::NoCertificatesPresented => Self::NoClientCertificate,
            rustls::Error::PeerIncompatible(p) => match p {
                rustls::PeerIncompatible::Tls12NotOffered
                | rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
                | rustls::PeerIncompatible::SupportedVersionsExtensionRequired
                | rustls::PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig => {
                    Self::ProtocolVersion {
                        reason: format!("{p:?}"),
                    }
                }
                other => Self::Tls {
                    stage,
                    source: rustls::Error::PeerIncompatible(other),
                },
            },
            rustls::Error::AlertReceived(alert) => Self::PeerAlert { alert },
            rustls::Error::NoApplicationProtocol => Self::AlpnMismatch { got: Vec::new() },
            other => Self::Tls {
                stage,
                source: other,
            },
        }
    }

    /// Classifies an I/O error from tokio-rustls (which carries rustls errors inside).
    pub(crate) fn from_io(stage: &'static str, err: std::io::Error) -> Self {
        if let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return Self::from_rustls(stage, tls.clone());
        }
        Self::Io { stage, source: err }
    }
}

/// Labels for alerts a peer sends to end a handshake.
fn alert_label(alert: AlertDescription) -> &'static str {
    match alert {
        AlertDescription::ProtocolVersion => "peer_refused_version",
        AlertDescription::NoApplicationProtocol => "alpn_mismatch",
        AlertDescription::AccessDenied | AlertDescription::UnrecognisedName => "peer_refused",
        AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateRevoked
        | AlertDescription::UnknownCA
        | AlertDescription::DecryptError => "peer_rejected_certificate",
        AlertDescription::CertificateRequired => "peer_requires_certificate",
        _ => "peer_alert",
    }
}

impl From<HandshakeError> for AuthFailure {
    fn from(e: HandshakeError) -> Self {
        AuthFailure {
            label: e.label(),
            message: e.to_string(),
        }
    }
}
