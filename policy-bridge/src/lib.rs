//! Cluster state → meshauth's desired state.
//!
//! [`state`] holds the output types every consumer (the auth manager, the
//! datapath sync, the CLI) reads: identities, endpoints (the ipcache's
//! source), nodes, and auth rules.

pub mod state;

pub use state::{
    AuthRule, DesiredState, Direction, Endpoint, Identity, NodeInfo, PortRange, Protocol, Remote,
    StateDiff,
};
