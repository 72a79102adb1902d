//! The handshake: mutual TLS 1.3 between two nodes' agents, each presenting
//! the X.509-SVID of its own workload identity, then one small versioned
//! message each way ([`protocol`]). ALPN picks the version: `meshauth/2`
//! keeps the connection open as a session over which further pairs are
//! proved with SVID signatures bound to the session ([`proof`]);
//! `meshauth/1` (what agents before sessions speak, and the fallback) ends
//! after one pair. Both sides offer both, so old and new agents interoperate
//! through a rolling upgrade.
//!
//! - [`server`]: the responder. Listens on TCP 4250, refuses peers whose
//!   source address is no known node (before TLS), serves identity `R`'s SVID
//!   for SNI `<R>.<td>` only when `R` has a local endpoint, verifies the
//!   client's SVID, exchanges messages, and writes `(R, L, node X)` to the
//!   auth map with expiry = the earlier leaf NotAfter.
//! - [`client`]: the initiator, an [`crate::auth::Authenticator`]. Dials the
//!   peer node's handshake address (never another), presents SVID(`L`),
//!   requires the server to be exactly `R`, and returns what it established.
//! - [`HandshakeError`]: one variant per check; [`HandshakeError::label`]
//!   is the metric label. [`Metrics`] are `meshauth_handshake_*`.
//!
//! TLS session resumption is off on both sides: every handshake verifies
//! both certificates afresh, and every proof verifies the signer's chain.

pub mod client;
mod error;
pub mod metrics;
pub mod proof;
pub mod protocol;
pub mod server;
mod stated_key;
pub mod throttle;

use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use svid_cache::TrustDomain;

pub use client::{ClientOptions, HandshakeClient};
pub use error::HandshakeError;
pub use metrics::{Limit, Metrics, Role};
pub use server::{Accepted, HandshakeServer, Outcome, ServerOptions};
pub use stated_key::StatedKey;

/// The ALPN protocol id of the one-pair handshake (`meshauth/1`).
pub const ALPN: &[u8] = b"meshauth/1";

/// The ALPN protocol id of sessions (`meshauth/2`).
pub const ALPN_V2: &[u8] = b"meshauth/2";

/// Default TCP port of the handshake server.
pub const DEFAULT_PORT: u16 = 4250;

/// Default connect and handshake timeouts.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default number of handshakes the responder runs at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 256;

/// Default number of connections the responder holds from one source
/// address at once (a node's agent needs a few: one per pair it is
/// authenticating with this node at that moment).
pub const DEFAULT_MAX_PER_SOURCE: usize = 16;

/// Default bound on the responder's TLS handshake (ClientHello to
/// Finished), shorter than [`DEFAULT_TIMEOUT`] so that a peer sending
/// nothing or one byte at a time frees its slot quickly.
pub const DEFAULT_TLS_TIMEOUT: Duration = Duration::from_secs(1);

/// Default time after which the responder closes a session that proved
/// nothing (short: an idle session holds one of the connection slots).
pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Default time after which the initiator stops sending proofs over a
/// session that has been quiet, and opens a new one instead (shorter than
/// the responder's idle timeout, so it does not race the responder's close).
pub const DEFAULT_SESSION_REUSE_WINDOW: Duration = Duration::from_secs(1);

/// Default longest life of a session (the responder closes it then; the
/// initiator stops using it a minute earlier).
pub const DEFAULT_SESSION_MAX_AGE: Duration = Duration::from_secs(600);

/// Default interval in which a refusal is logged at most once per peer.
pub const DEFAULT_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The identity and NotAfter of a leaf that rustls' SPIFFE verifier has
/// already accepted (so it parses, and its one URI SAN is an identity of `td`).
pub(crate) fn verified_leaf(
    td: &TrustDomain,
    leaf: &CertificateDer<'_>,
) -> Option<(u32, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).ok()?);
    let san = cert.subject_alternative_name().ok()??;
    let identity = san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => td.parse_spiffe_id(u).ok(),
        _ => None,
    })?;
    Some((identity, not_after))
}

/// Checks what a peer stated in its hello: the identities (`local` is the
/// peer's own, `remote` the one it talks to), its node's name, and its
/// WireGuard key against the one the node published.
pub(crate) fn check_statement(
    hello: &protocol::Hello,
    local: u32,
    remote: u32,
    node: &policy_bridge::NodeInfo,
) -> Result<(), HandshakeError> {
    for (field, stated, expected) in [
        ("local", hello.local, local),
        ("remote", hello.remote, remote),
    ] {
        if stated != expected {
            return Err(HandshakeError::IdentityMismatch {
                field,
                stated,
                expected,
            });
        }
    }
    if hello.node != node.name {
        return Err(HandshakeError::NodeMismatch {
            expected: node.name.clone(),
            stated: hello.node.clone(),
        });
    }
    check_wireguard_key(node, &hello.wireguard_key)
}

/// Checks the WireGuard key a peer stated against the one its node published.
fn check_wireguard_key(
    node: &policy_bridge::NodeInfo,
    stated: &Option<String>,
) -> Result<(), HandshakeError> {
    match &node.wireguard_key {
        Some(published) if stated.as_ref() != Some(published) => {
            Err(HandshakeError::WireGuardKeyMismatch {
                node: node.name.clone(),
                published: published.clone(),
                stated: stated.clone(),
            })
        }
        _ => Ok(()),
    }
}
