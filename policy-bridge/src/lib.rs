//! Cluster state → meshauth's desired state.
//!
//! - [`model`]: the objects read (Pods, Namespaces, Nodes, CiliumNetworkPolicy,
//!   CiliumClusterwideNetworkPolicy, MeshAuthPolicy, ClusterMeshAuthPolicy)
//!   and their parsing with field-path errors.
//! - [`labels`], [`selector`]: canonical identity labels and Cilium's
//!   selector semantics. [`identity`]: allocation and its persistence.
//! - [`compile`]: a policy → rules requiring authentication; [`engine`]:
//!   the incremental compiler producing [`DesiredState`] and [`StateDiff`].
//! - [`source`]: a watched directory of YAML, or Kubernetes (kube-rs).
//! - [`status`]: per-policy accepted / partially enforced / rejected.
//! - [`state`] holds the output types every consumer (the auth manager, the
//!   datapath sync, the CLI) reads.

pub mod compile;
pub mod engine;
pub mod identity;
pub mod labels;
pub mod model;
pub mod prefix;
pub mod selector;
pub mod source;
pub mod state;
pub mod status;

pub use engine::{Allocation, Change, Engine, EngineConfig};
pub use prefix::{IpPrefix, PrefixError};
pub use source::{Snapshot, Subscription};
pub use state::{
    AuthRule, DesiredState, Direction, Endpoint, Identity, NodeInfo, PortRange, Protocol, Remote,
    StateDiff,
};
pub use status::{PolicyStatus, Verdict};

/// Parses YAML text (any of the kinds read) and compiles it on its own: the
/// desired state, every policy's status, and every document that could not
/// be read. For `meshauth policy check`-style tooling and for fuzzing; never
/// panics on any input.
pub fn compile_text(text: &str, origin: &str) -> (DesiredState, Vec<PolicyStatus>, Vec<String>) {
    let mut engine = Engine::new(EngineConfig::default(), identity::IdentityTable::new());
    let mut errors = Vec::new();
    for r in model::parse_documents(text, origin) {
        let change = match r {
            Ok(o) => Change::Upsert(o),
            Err(inv) => {
                errors.push(inv.error.to_string());
                match inv.key {
                    Some(k) => Change::Invalid(*k, inv.error),
                    None => continue,
                }
            }
        };
        if let Err(e) = engine.apply(change) {
            errors.push(e.to_string());
        }
    }
    engine.commit();
    let status = engine.status();
    (engine.state().clone(), status, errors)
}
