//! What meshauth's tests share, so that each crate's tests build on one copy:
//!
//! - [`certs`] (feature `certs`): certificate authorities and SVIDs generated
//!   per test with rcgen — real chains and SPIFFE URI SANs, and the bad ones
//!   (two SANs, CA leaf, foreign trust domain, expired, substituted chain) —
//!   and the svid-cache values made from them.
//! - [`netns`] (feature `netns`): network namespaces, veth pairs, a cgroup v2
//!   per pod and pod processes, all removed on drop. Needs root.
//! - [`vm`] (feature `vm`): runs a command in a qemu VM booting the host's
//!   Debian kernel (kernel WireGuard), with the host's root shared
//!   read-only. Needs root, qemu, busybox-static and linux-image-amd64.
//! - [`init_tracing`] (feature `tracing`): logs to the test output.
//!
//! A dev-dependency only: nothing here is linked into what runs on a node.

#[cfg(feature = "certs")]
pub mod certs;
#[cfg(feature = "netns")]
pub mod netns;
#[cfg(feature = "vm")]
pub mod vm;

/// Logs to the test output when `RUST_LOG` is set (e.g.
/// `RUST_LOG=svid_cache=debug`); a second call does nothing.
#[cfg(feature = "tracing")]
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}
