//! X.509-SVIDs and trust bundles from SPIRE, kept per numeric identity, with
//! rotation events, source health, and the rustls pieces that use them.
//!
//! # Shape
//!
//! - A [`SvidCache`] holds the current SVID of every identity `N` whose SPIFFE ID is
//!   `spiffe://<trust domain>/identity/<N>`, plus the trust domain's [`TrustBundle`].
//!   It is updated from full-state messages ([`SvidCache::apply`]) which it diffs
//!   into [`CacheEvent`]s: `Added`, `Rotated`, `Removed { reason }`, `BundleChanged`,
//!   published to [`SvidCache::subscribe`] receivers. A malformed message is
//!   rejected as a whole and changes nothing. Lookups never return an expired SVID,
//!   and the expiry timer ([`SvidCache::spawn_expiry`]) emits
//!   `Removed { reason: Expired }` when a NotAfter passes. Time comes from a
//!   [`Clock`], so tests control it.
//! - Sources feed the cache: [`spawn_workload_api`] (SPIFFE Workload API) or
//!   [`spawn_delegated_identity`] (SPIRE's Delegated Identity API). Each is one
//!   worker that reconnects with jittered exponential backoff (100 ms → 10 s) and
//!   publishes its [`SourceStatus`] through a `watch`; a disconnect keeps every
//!   still-valid SVID.
//! - [`tls`] has the rustls resolvers ([`ClientCertResolver`] for a fixed local
//!   identity, [`ServerCertResolver`] by SNI `<N>.<td>`) and SPIFFE verifiers
//!   ([`SpiffeServerVerifier`], [`SpiffeClientVerifier`]); they reject with a
//!   [`VerifyError`] carried inside rustls' `CertificateError::Other`.
//!   [`verify_peer`] is the same check as a pure function.
//!
//! # Use
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use svid_cache::{CacheConfig, SvidCache, WorkloadApiConfig, spawn_workload_api, tls};
//! use tokio_util::sync::CancellationToken;
//!
//! let shutdown = CancellationToken::new();
//! let cache = SvidCache::new(CacheConfig::default());
//! cache.spawn_expiry(shutdown.clone());
//! let source = spawn_workload_api(
//!     WorkloadApiConfig::new("/run/spire/sockets/agent.sock"),
//!     cache.clone(),
//!     shutdown.clone(),
//! );
//! let mut events = cache.subscribe();
//! // ... later: a TLS 1.3 client presenting identity 300, requiring the server to be 400.
//! let config = tls::client_config(&cache, 300, 400)?;
//! # let _ = (source.status(), events.recv().await, config);
//! # Ok(())
//! # }
//! ```

pub mod bundle;
pub mod cache;
pub mod clock;
pub mod fuzzing;
pub mod identity;
pub mod proof;
pub mod source;
pub mod svid;
pub mod tls;
pub mod verify;

pub use bundle::{BundleError, TrustBundle};
pub use cache::{
    CacheChanges, CacheConfig, CacheError, CacheEvent, RemovalReason, SvidCache, Update,
};
pub use clock::{Clock, SystemClock, TokioClock};
pub use identity::{DEFAULT_TRUST_DOMAIN, IdentityError, TrustDomain};
pub use source::delegated::{DelegatedIdentityConfig, spawn_delegated_identity};
pub use source::delegated_pods::{
    DelegatedPodsConfig, PodSubscription, PodTarget, PodTargets, spawn_delegated_pods,
};
pub use source::workload::{WorkloadApiConfig, fetch_x509_svid_ids, spawn_workload_api};
pub use source::{
    Backoff, BackoffConfig, DEFAULT_CONNECT_TIMEOUT, SourceError, SourceHandle, SourceState,
    SourceStatus,
};
pub use svid::{Svid, SvidError, SvidInput};
pub use tls::{ClientCertResolver, ServerCertResolver, SpiffeClientVerifier, SpiffeServerVerifier};
pub use verify::{Expectation, ExpectedIdentity, PeerRole, VerifiedPeer, VerifyError, verify_peer};
