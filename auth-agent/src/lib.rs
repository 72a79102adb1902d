//! The meshauth node agent: what runs on a production node, as
//! `meshauth-agent` (the DaemonSet's binary). The operator CLI and the demo
//! are in `meshauth-cli`, the network-namespace lab in `meshauth-lab`.
//!
//! - [`daemon`]: the entry point both binaries run (flags → config → [`app`]).
//! - [`app`]: everything wired together, start order and shutdown.
//! - [`flags`], [`config`]: flags, environment and file into one `Config`.
//! - [`api`]: the local API (unix socket) the CLI talks to, flows, and the
//!   CLI's client of it.
//! - [`nodes`]: node names ↔ datapath node ids, persisted across restarts.
//! - [`auth`]: the auth map behind a trait, and the auth manager.
//! - [`datapath_sync`]: desired state into the ipcache and policy maps.
//! - [`handshake`]: the `meshauth/1` mutual TLS handshake (server and client).
//! - [`wireguard`]: node-to-node encryption (so far the node's key).

pub mod api;
pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod datapath_sync;
pub mod flags;
pub mod handshake;
pub mod nodes;
pub mod wireguard;
