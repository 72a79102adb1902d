//! spire-dev: a SPIRE-compatible development server for meshauth's demo and
//! tests (never production).
//!
//! One [`server::SpireServer`] (an rcgen ECDSA P-256 root CA and registration
//! entries) and one [`agent::NodeAgent`] per node. Each agent holds the
//! X.509-SVIDs of the entries parented to its node, renews them as SPIRE
//! does (once less than half of NotBefore..NotAfter is left), and serves
//! them on
//! - the SPIFFE Workload API ([`workload_api`]) at `<dir>/agents/<node>/agent.sock`,
//!   wire-compatible with a SPIRE agent (the caller is treated as matching every
//!   entry of the node: no workload attestation), and
//! - SPIRE's Delegated Identity API ([`delegated_api`]) at
//!   `<dir>/agents/<node>/admin.sock`, matching entries by selectors.
//!
//! [`dev::SpireDev`] runs the whole thing under a directory and exposes the
//! switches (server outage, agent down/up, CA rotation and pruning, entries
//! added and removed at runtime), also over a newline-delimited JSON control
//! socket ([`control`]) that `spire-dev ctl` speaks.
//!
//! During a server outage agents keep serving what they hold, even after it
//! expired: clients must refuse expired SVIDs themselves.
//!
//! ```no_run
//! # async fn demo() -> Result<(), spire_dev::DevError> {
//! use spire_dev::{DevConfig, EntrySpec, SpiffeId, SpireDev};
//! let mut config = DevConfig::new("/tmp/spire-dev");
//! config.nodes = vec!["node-a".into()];
//! let dev = SpireDev::start(config).await?;
//! let id = SpiffeId::parse_in(dev.server().trust_domain(), "/identity/256").expect("valid");
//! dev.add_entry(EntrySpec::new("node-a", id))?;
//! let socket = dev.agent("node-a")?.workload_socket().to_owned();
//! dev.set_outage(true);
//! dev.shutdown().await;
//! # let _ = socket; Ok(()) }
//! ```

pub mod agent;
pub mod ca;
pub mod cli;
pub mod control;
pub mod delegated_api;
pub mod dev;
pub mod entries;
pub mod server;
pub mod socket;
pub mod spiffe_id;
mod stream;
mod uds_authority;
pub mod workload_api;

pub use agent::{AgentPaths, AgentSnapshot, HeldSvid, IdentityInfo, NodeAgent};
pub use ca::{CertificateAuthority, Svid};
pub use control::{ControlReply, ControlRequest};
pub use dev::{DevConfig, DevError, DevStatus, NodeStatus, SpireDev};
pub use entries::{Entry, EntrySpec, Selector, SpiffeId};
pub use server::{ServerConfig, SpireServer};
