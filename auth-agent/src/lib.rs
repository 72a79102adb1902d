//! The meshauth node agent and its CLI.
//!
//! - [`app`]: `meshauth agent`, everything wired together.
//! - [`api`]: the local API (unix socket) the CLI talks to, and flows.
//! - [`cli`]: subcommands that need no running agent (`policy status`).
//! - [`config`]: the agent's configuration from flags, environment and file.
//! - [`nodes`]: node names ↔ datapath node ids, persisted across restarts.
//! - [`auth`]: the auth map behind a trait, and the auth manager.
//! - [`datapath_sync`]: desired state into the ipcache and policy maps.
//! - [`handshake`]: the `meshauth/1` mutual TLS handshake (server and client).
//! - [`demo`]: `meshauth demo`.
//! - [`preflight`]: `meshauth preflight`, what to fix on a node before install.
//! - [`testbed`]: real agents on a lab cluster with spire-dev (demo, tests, bench).
//! - [`lab`]: a multi-node cluster in network namespaces (demo, tests, bench).

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath_sync;
pub mod demo;
pub mod flags;
pub mod handshake;
pub mod lab;
pub mod nodes;
pub mod preflight;
pub mod testbed;
