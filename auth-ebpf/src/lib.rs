//! meshauth's kernel datapath.
//!
//! C programs under `bpf/` (cgroup_skb ingress and egress on the cgroup v2
//! holding all pods) drop forward packets between identities that policy
//! says must authenticate, with reason 189 "Authentication required", until
//! the agent writes a live entry for the pair into the auth map. This crate
//! loads the committed object with aya, pins and migrates the maps, attaches
//! the programs as pinned links, and gives typed access to every map and
//! ring buffer.
//!
//! ```no_run
//! use auth_ebpf::{Datapath, LoadOptions};
//! let mut dp = Datapath::load(&LoadOptions::default())?;
//! dp.attach(&auth_ebpf::attach::detect_pods_cgroup()?)?;
//! # Ok::<(), auth_ebpf::DatapathError>(())
//! ```

pub mod attach;
pub mod clock;
mod error;
pub mod events;
pub mod layout;
mod loader;
pub mod maps;
pub mod metrics;
pub mod reason;
mod ringbuf;
pub mod signals;
pub mod testing;
pub mod types;

pub use error::DatapathError;
pub use loader::{DEFAULT_PIN_DIR, Datapath, EGRESS_PROGRAM, INGRESS_PROGRAM, LoadOptions, OBJECT};
