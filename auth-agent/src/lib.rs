//! The meshauth node agent and its CLI.
//!
//! Today: `meshauth demo` ([`demo`]), which shows the identity supply
//! (spire-dev and svid-cache) on this machine. The agent proper (datapath
//! sync, auth manager, handshake, WireGuard) is being built.

pub mod demo;
