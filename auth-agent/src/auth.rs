//! Authentication of identity pairs: where verified pairs are stored
//! ([`store`]), the manager that decides which pairs to authenticate and
//! when ([`manager`]), its metrics ([`metrics`]), and two of its inputs:
//! SVID rotations ([`rotation`]) and the expired-entry sweep's schedule
//! ([`schedule`]).

pub mod manager;
pub mod metrics;
pub mod rotation;
pub mod schedule;
pub mod store;

use std::time::SystemTime;

use policy_bridge::NodeInfo;

/// What a successful handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The earlier of the two leaves' NotAfter: the pair's entry must not
    /// outlive either SVID.
    pub expiry: SystemTime,
    /// The peer node's name as it stated it (checked against the node table).
    pub peer_node: String,
    /// The peer's WireGuard public key, when WireGuard is on.
    pub peer_wireguard_key: Option<String>,
}

/// Why authenticating a pair failed, with a stable label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthFailure {
    /// Metric label of the failed check (`"unexpected_identity"`, `"connect"`, …).
    pub label: &'static str,
    /// What failed, for logs.
    pub message: String,
}

/// Runs the initiator side of a handshake: `local` (on this node) proves
/// itself to `remote` on `node` and checks `remote`'s proof.
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates one pair.
    fn authenticate(
        &self,
        local: u32,
        remote: u32,
        node: NodeInfo,
    ) -> futures::future::BoxFuture<'static, Result<Authenticated, AuthFailure>>;
}
