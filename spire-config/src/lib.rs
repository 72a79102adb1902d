//! SPIRE's side of a meshauth deployment: typed settings rendered into the
//! SPIRE server's and agent's configuration files (HCL, as SPIRE 1.13 reads
//! them), for two deployments:
//!
//! - **standalone**: `join_token` node attestation, the `unix` workload
//!   attestor;
//! - **Kubernetes**: `k8s_psat` node attestation, the `k8s` workload
//!   attestor.
//!
//! The datastore is SPIRE's `sql` plugin: sqlite3 for one server, postgres
//! for several (sqlite3 with more than one replica is refused: each replica
//! would keep its own database and mint its own CA). The agent's admin
//! socket (the Delegated Identity API) is never in or under the Workload API
//! socket's directory, and names meshauth's SPIFFE ID in
//! `authorized_delegates`. Health checks are on for both.
//!
//! [`entries`] computes the registration entries meshauth wants and the
//! plan from what a SPIRE server holds (least privilege by default);
//! [`entry_api`] applies it through SPIRE's Entry API.
//!
//! [`Settings::validate`] reports every problem at once; [`render_server`]
//! and [`render_agent`] build the files through an HCL writer, so they are
//! well-formed by construction.

pub mod entries;
pub mod entry_api;
mod render;
mod settings;

pub use render::{render_agent, render_server, render_sql_plugin_data};
pub use settings::{AgentSettings, DataStore, Deployment, ServerSettings, Settings, SettingsError};
