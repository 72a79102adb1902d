//! meshauth's own CRDs: MeshAuthPolicy, ClusterMeshAuthPolicy (Cilium's policy
//! shape, for clusters without Cilium or whose Cilium CRDs dropped
//! `authentication`) and MeshIdentity (cluster-wide identity allocation).
//! `deploy/helm/meshauth/crds/*.yaml` are generated from these types; a test keeps them in sync.

use kube::CustomResource;
use kube::core::{ApiResource, GroupVersionKind};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::policy::PolicySpec;

/// Spec of a namespaced [`MeshAuthPolicy`]: a Cilium policy spec.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "meshauth.io",
    version = "v1alpha1",
    kind = "MeshAuthPolicy",
    plural = "meshauthpolicies",
    shortname = "map",
    namespaced,
    status = "PolicyStatusBody",
    printcolumn = r#"{"name":"Verdict","type":"string","jsonPath":".status.verdict"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.coverage.compiledRules"}"#,
    printcolumn = r#"{"name":"Pairs","type":"integer","jsonPath":".status.coverage.pairs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "Which flows between workloads must be mutually authenticated (namespaced; Cilium's policy shape)."
)]
#[serde(transparent)]
pub struct MeshAuthPolicySpec(pub PolicySpec);

/// Spec of a cluster-scoped [`ClusterMeshAuthPolicy`].
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "meshauth.io",
    version = "v1alpha1",
    kind = "ClusterMeshAuthPolicy",
    plural = "clustermeshauthpolicies",
    shortname = "cmap",
    status = "PolicyStatusBody",
    printcolumn = r#"{"name":"Verdict","type":"string","jsonPath":".status.verdict"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.coverage.compiledRules"}"#,
    printcolumn = r#"{"name":"Pairs","type":"integer","jsonPath":".status.coverage.pairs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "Which flows between workloads must be mutually authenticated (cluster-wide; Cilium's policy shape)."
)]
#[serde(transparent)]
pub struct ClusterMeshAuthPolicySpec(pub PolicySpec);

/// Spec of a [`MeshIdentity`]: the object's name is the identity number
/// (decimal), so the API server's name uniqueness makes allocation agree
/// across nodes.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "meshauth.io",
    version = "v1alpha1",
    kind = "MeshIdentity",
    plural = "meshidentities",
    printcolumn = r#"{"name":"Labels","type":"string","jsonPath":".spec.labels"}"#,
    doc = "A security identity: its number (the object's name) and canonical label set."
)]
pub struct MeshIdentitySpec {
    /// Canonical labels (`k8s:<key>=<value>`, sorted).
    pub labels: Vec<String>,
    /// Set when no pod uses the identity any more: the Unix time (seconds)
    /// it was freed. The number stays quarantined — the object is kept, so
    /// no other label set can take it — until every SVID that could carry
    /// it has expired; then the object is deleted. Cleared when the same
    /// label set comes back.
    #[serde(default, rename = "freedAt", skip_serializing_if = "Option::is_none")]
    pub freed_at: Option<u64>,
}

/// The four policy kinds meshauth reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    /// cilium.io/v2 CiliumNetworkPolicy (namespaced).
    CiliumNetworkPolicy,
    /// cilium.io/v2 CiliumClusterwideNetworkPolicy.
    CiliumClusterwideNetworkPolicy,
    /// meshauth.io/v1alpha1 MeshAuthPolicy (namespaced).
    MeshAuthPolicy,
    /// meshauth.io/v1alpha1 ClusterMeshAuthPolicy.
    ClusterMeshAuthPolicy,
}

impl PolicyKind {
    /// Every kind.
    pub const ALL: [Self; 4] = [
        Self::CiliumNetworkPolicy,
        Self::CiliumClusterwideNetworkPolicy,
        Self::MeshAuthPolicy,
        Self::ClusterMeshAuthPolicy,
    ];

    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Self::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            Self::MeshAuthPolicy => "MeshAuthPolicy",
            Self::ClusterMeshAuthPolicy => "ClusterMeshAuthPolicy",
        }
    }

    /// The kind for an `apiVersion` / `kind` pair.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.as_str() == kind)
    }

    /// The `apiVersion` objects of this kind carry.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::CiliumNetworkPolicy | Self::CiliumClusterwideNetworkPolicy => "cilium.io/v2",
            Self::MeshAuthPolicy | Self::ClusterMeshAuthPolicy => "meshauth.io/v1alpha1",
        }
    }

    /// True for the cluster-scoped kinds (selectors are cluster-wide).
    pub fn is_clusterwide(self) -> bool {
        matches!(
            self,
            Self::CiliumClusterwideNetworkPolicy | Self::ClusterMeshAuthPolicy
        )
    }

    /// True when objects of this kind may carry `specs` as well as `spec`.
    pub fn allows_specs(self) -> bool {
        matches!(
            self,
            Self::CiliumNetworkPolicy | Self::CiliumClusterwideNetworkPolicy
        )
    }

    /// The API resource, for dynamic watches.
    pub fn api_resource(self) -> ApiResource {
        let (group, version) = self
            .api_version()
            .split_once('/')
            .unwrap_or(("", self.api_version()));
        let plural = match self {
            Self::CiliumNetworkPolicy => "ciliumnetworkpolicies",
            Self::CiliumClusterwideNetworkPolicy => "ciliumclusterwidenetworkpolicies",
            Self::MeshAuthPolicy => "meshauthpolicies",
            Self::ClusterMeshAuthPolicy => "clustermeshauthpolicies",
        };
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, self.as_str()),
            plural,
        )
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `.status` of [`MeshAuthPolicy`] and [`ClusterMeshAuthPolicy`], written
/// through the status subresource by the one agent holding the policy status
/// Lease: what `meshauth policy status` reports, for `kubectl get` and
/// `kubectl describe`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatusBody {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// accepted, partially-enforced or rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<crate::status::Verdict>,
    /// Rule entries with `authentication.mode: required` that compiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_rules: Option<u64>,
    /// What those rules cover in the cluster now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<StatusCoverage>,
    /// Errors (rejected rules, invalid fields), each with its field path.
    #[serde(default)]
    pub errors: Vec<StatusProblem>,
    /// Accepted parts meshauth does not enforce.
    #[serde(default)]
    pub notes: Vec<StatusProblem>,
    /// The node whose agent wrote this status (the Lease holder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_by: Option<String>,
    /// `Enforced`: True when everything meshauth is responsible for in the
    /// policy is enforced.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<StatusCondition>,
}

/// [`crate::status::Coverage`] in the object's status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusCoverage {
    /// Compiled rules requiring authentication.
    pub compiled_rules: u64,
    /// Running pods with an address on either end of a covered pair.
    pub pods: u64,
    /// Identity pairs the rules require authentication for.
    pub pairs: u64,
    /// Auth rules in the datapath (pairs × ports).
    pub datapath_rules: u64,
}

/// One error or note, with its field path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StatusProblem {
    /// Field path (`spec.ingress[0]`).
    pub path: String,
    /// What and why.
    pub message: String,
}

/// A condition in the shape of `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    /// The condition's type (`Enforced`).
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// CamelCase reason: Accepted, PartiallyEnforced or Rejected.
    pub reason: String,
    /// In words.
    pub message: String,
    /// The generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
}
