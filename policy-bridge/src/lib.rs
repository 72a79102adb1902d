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
pub mod selector;
pub mod source;
pub mod state;
pub mod status;

pub use engine::{Allocation, Change, Engine, EngineConfig};
pub use source::{Snapshot, Subscription};
pub use state::{
    AuthRule, DesiredState, Direction, Endpoint, Identity, NodeInfo, PortRange, Protocol, Remote,
    StateDiff,
};
pub use status::{PolicyStatus, Verdict};
