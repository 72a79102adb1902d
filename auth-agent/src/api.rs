//! The agent's local API: HTTP/1.1 with JSON on a unix socket (mode 0600),
//! for the CLI (`meshauth status`, `observe`, `auth list`, `identity list`,
//! `policy status`).
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /v1/status` | [`types::AgentStatus`] |
//! | `GET /v1/auth` | `[`[`types::AuthEntry`]`]` |
//! | `GET /v1/identities` | `[`[`types::IdentityEntry`]`]` |
//! | `GET /v1/policies?o=text\|json` | the policies' status, rendered |
//! | `GET /v1/flows?verdict=DROPPED&identity=N&last=N&follow=true` | one [`types::FlowRecord`] per line |

pub mod client;
pub mod flows;
pub mod render;
pub mod server;
pub mod socket;
pub mod types;

pub use client::{ApiClient, ApiError, ObserveArgs, observe, policy_status_live};
pub use flows::{FlowFilter, FlowHub};
pub use server::Backend;
