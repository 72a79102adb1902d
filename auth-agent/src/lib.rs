//! The meshauth node agent and its CLI.
//!
//! - [`nodes`]: node names ↔ datapath node ids, persisted across restarts.
//! - [`auth`]: the auth map behind a trait, and the auth manager.
//! - [`demo`]: `meshauth demo`.

pub mod auth;
pub mod demo;
pub mod nodes;
