//! The policy spec shared by CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
//! MeshAuthPolicy and ClusterMeshAuthPolicy: Cilium's `spec` shape.
//!
//! Fields meshauth enforces are typed. Fields it accepts but does not enforce
//! (L7 rules, deny rules, CIDR/entity/FQDN peers, ICMP) are kept as raw JSON so
//! the compiler can name them in the policy's status. Anything unknown lands in
//! `extra` and is reported too, so a typo such as `authentcation` can never
//! silently turn authentication off.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Schema for raw JSON kept verbatim (`x-kubernetes-preserve-unknown-fields`).
fn preserve(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema for a list of raw JSON objects.
fn preserve_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
    })
}

/// One policy spec (a CNP's `spec` or one entry of its `specs`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Pods the rules apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_selector: Option<EndpointSelector>,
    /// Nodes the rules apply to (host policies; not enforced by meshauth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<EndpointSelector>,
    /// Rules for traffic into the selected pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Rules for traffic out of the selected pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    /// Deny rules (Cilium's business; reported as not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub ingress_deny: Option<Vec<Value>>,
    /// Deny rules (Cilium's business; reported as not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub egress_deny: Option<Vec<Value>>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Policy labels (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub labels: Option<Vec<Value>>,
    /// Default-deny switches (Cilium's business).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve")]
    pub enable_default_deny: Option<Value>,
    /// Fields meshauth does not know; reported in status.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub extra: BTreeMap<String, Value>,
}

/// A Kubernetes label selector with Cilium's key syntax (`k8s:`, `any:` sources).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSelector {
    /// Key = value requirements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Set-based requirements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// One set-based requirement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// The label key (optionally with a source prefix).
    pub key: String,
    /// The operator.
    pub operator: SelectorOperator,
    /// Values for `In` / `NotIn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// Label selector operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    /// The value is one of `values`.
    In,
    /// The key is absent or its value is none of `values`.
    NotIn,
    /// The key is present.
    Exists,
    /// The key is absent.
    DoesNotExist,
}

/// `authentication:` of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Authentication {
    /// The mode.
    pub mode: AuthenticationMode,
}

/// Authentication modes Cilium defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuthenticationMode {
    /// Mutual authentication required.
    Required,
    /// No authentication.
    Disabled,
    /// Cilium's test mode; meshauth treats it as an error.
    TestAlwaysFail,
}

impl AuthenticationMode {
    /// The modes meshauth accepts, as an error lists them (Cilium's
    /// `test-always-fail` is read, then rejected with its own message).
    pub const ACCEPTED: &'static str = "`required` or `disabled`";
}

impl<'de> Deserialize<'de> for AuthenticationMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "required" => Ok(Self::Required),
            "disabled" => Ok(Self::Disabled),
            "test-always-fail" => Ok(Self::TestAlwaysFail),
            other => Err(serde::de::Error::custom(format!(
                "unknown authentication mode `{other}`, expected {}",
                Self::ACCEPTED
            ))),
        }
    }
}

/// An ingress rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Peer pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    /// Deprecated `fromRequires` (not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_requires: Option<Vec<EndpointSelector>>,
    /// Reserved entities (world, host, cluster, all, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<String>>,
    /// CIDR peers.
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<Vec<String>>,
    /// CIDR set peers.
    #[serde(
        default,
        rename = "fromCIDRSet",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "preserve_list")]
    pub from_cidr_set: Option<Vec<Value>>,
    /// Node peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_nodes: Option<Vec<EndpointSelector>>,
    /// Cloud-provider groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub from_groups: Option<Vec<Value>>,
    /// Ports (and L7 rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    /// ICMP rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub icmps: Option<Vec<Value>>,
    /// Authentication requirement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// Unknown fields; reported in status.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub extra: BTreeMap<String, Value>,
}

/// An egress rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Peer pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    /// Deprecated `toRequires` (not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_requires: Option<Vec<EndpointSelector>>,
    /// Reserved entities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<String>>,
    /// CIDR peers.
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<String>>,
    /// CIDR set peers.
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub to_cidr_set: Option<Vec<Value>>,
    /// Node peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_nodes: Option<Vec<EndpointSelector>>,
    /// DNS name peers.
    #[serde(default, rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub to_fqdns: Option<Vec<Value>>,
    /// Service peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub to_services: Option<Vec<Value>>,
    /// Cloud-provider groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub to_groups: Option<Vec<Value>>,
    /// Ports (and L7 rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    /// ICMP rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list")]
    pub icmps: Option<Vec<Value>>,
    /// Authentication requirement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// Unknown fields; reported in status.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub extra: BTreeMap<String, Value>,
}

/// One `toPorts` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    /// Ports; absent or empty = all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortProtocol>>,
    /// L7 rules (HTTP, Kafka, DNS, …): Envoy's business, not meshauth's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve")]
    pub rules: Option<Value>,
    /// TLS, listener and other proxy fields (not enforced).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub extra: BTreeMap<String, Value>,
}

/// A port, an optional end of range, and a protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// A number (`"8080"`, `"0"` = any) or a named port. YAML numbers are
    /// accepted too.
    #[serde(default, deserialize_with = "port_string")]
    pub port: String,
    /// Last port of a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
    /// `TCP`, `UDP`, `SCTP` or `ANY` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// Accepts `port: 8080` as well as `port: "8080"`.
fn port_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P {
        S(String),
        N(i64),
    }
    Ok(match P::deserialize(d) {
        Ok(P::S(s)) => s,
        Ok(P::N(n)) => n.to_string(),
        Err(_) => return Err(serde::de::Error::custom("expected a port number or name")),
    })
}
