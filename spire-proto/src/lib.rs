//! Generated wire types for the identity APIs meshauth speaks.
//!
//! The `.proto` files under `proto/` are copied unchanged from the SPIFFE
//! Workload API (`workload.proto`) and the SPIRE API SDK (Apache-2.0), so the
//! generated stubs are wire-compatible with a real SPIRE agent. Both client
//! and server stubs are generated: `spire-dev` serves them, `svid-cache`
//! consumes the Delegated Identity API with them, and spire-config's
//! reconciler is a client of the Entry API.

#![allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]

/// The SPIFFE Workload API (no protobuf package: gRPC paths are
/// `/SpiffeWorkloadAPI/<Method>`).
pub mod workload {
    tonic::include_proto!("_");
}

/// SPIRE's protobuf packages, nested as their package names so the generated
/// cross-package paths resolve.
pub mod spire {
    pub mod api {
        /// `spire.api.types`
        pub mod types {
            tonic::include_proto!("spire.api.types");
        }
        pub mod server {
            pub mod entry {
                /// `spire.api.server.entry.v1`
                pub mod v1 {
                    tonic::include_proto!("spire.api.server.entry.v1");
                }
            }
        }
        pub mod agent {
            pub mod delegatedidentity {
                /// `spire.api.agent.delegatedidentity.v1`
                pub mod v1 {
                    tonic::include_proto!("spire.api.agent.delegatedidentity.v1");
                }
            }
        }
    }
}

/// SPIRE's Delegated Identity API (`spire.api.agent.delegatedidentity.v1`).
pub use spire::api::agent::delegatedidentity::v1 as delegatedidentity;
/// SPIRE's Entry API (`spire.api.server.entry.v1`), on the server's admin
/// socket: registration entries.
pub use spire::api::server::entry::v1 as entry;
/// SPIRE API types (`spire.api.types`).
pub use spire::api::types;

/// The header every Workload API call must carry (`workload.spiffe.io: true`).
pub const WORKLOAD_HEADER_KEY: &str = "workload.spiffe.io";
/// The value of [`WORKLOAD_HEADER_KEY`].
pub const WORKLOAD_HEADER_VALUE: &str = "true";
/// The status message SPIRE uses when no registration entry matches the caller.
pub const NO_IDENTITY_ISSUED: &str = "no identity issued";
