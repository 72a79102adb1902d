//! spire-dev ⇄ svid-cache: node agents of a spire-dev deployment feed caches
//! over real unix sockets; the caches' SVIDs carry a mutual TLS handshake.
//!
//! One test binary, so the scenarios (most of which wait on certificate time)
//! run in parallel.

mod agent_restart;
mod delegated;
mod delegated_pods;
mod first_fetch;
mod foreign;
mod mtls;
mod outage;
mod removal;
mod rotation;
