//! What the local API returns: one serializable type per endpoint, shared
//! by the agent (which fills them) and the CLI (which renders them).

use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// This node.
    pub node: String,
    /// The agent's version.
    pub version: String,
    /// `enforce` or `audit`.
    pub mode: String,
    /// When the agent started (RFC 3339).
    pub started: String,
    /// What readiness waits for.
    pub ready: Readiness,
    /// The SPIRE source.
    pub spire: SpireStatus,
    /// The datapath.
    pub datapath: DatapathStatus,
    /// The policy source.
    pub policy: PolicySummary,
    /// Known peer nodes.
    pub peers: Vec<PeerStatus>,
    /// Handshakes since start.
    pub handshakes: HandshakeCounts,
    /// WireGuard, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<crate::wireguard::manager::WireGuardStatus>,
}

/// Readiness: every part must be true.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Programs loaded and attached to the pods' cgroup.
    pub datapath: bool,
    /// The SPIRE source answered once (SVIDs or "no identity issued").
    pub svids: bool,
    /// The policy source read everything once.
    pub policy: bool,
}

impl Readiness {
    /// All parts ready.
    pub fn all(&self) -> bool {
        self.datapath && self.svids && self.policy
    }
}

/// The SPIRE source as the agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpireStatus {
    /// `workload_api`, `delegated_identity` or `delegated_identity_pods`.
    pub source: String,
    /// The socket.
    pub socket: String,
    /// `connecting`, `connected` or `disconnected`.
    pub state: String,
    /// Since when (RFC 3339).
    pub since: Option<String>,
    /// The latest error.
    pub last_error: Option<String>,
    /// True while disconnected: the agent keeps using cached SVIDs until
    /// they expire and cannot rotate them.
    pub outage: bool,
    /// SVIDs held.
    pub svids: usize,
    /// The earliest NotAfter of the SVIDs held (RFC 3339).
    pub next_expiry: Option<String>,
    /// Streams reopened after the first.
    pub reconnects: u64,
    /// SVIDs past 3/4 of their lifetime and not yet rotated (SPIRE rotates
    /// at half): the SPIRE server is likely unreachable from the agent.
    #[serde(default)]
    pub overdue_svids: usize,
    /// `delegated_identity_pods`: every pod of this node, with its
    /// subscription.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodSvidStatus>,
}

/// One pod's SVID subscription (`delegated_identity_pods`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSvidStatus {
    /// `namespace/name`.
    pub pod: String,
    /// The PID SPIRE attests (none: no process found).
    pub pid: Option<u32>,
    /// The pod's identity.
    pub identity: Option<u32>,
    /// `serving` (SPIRE serves the pod's identity), `not_served` (SPIRE
    /// answered without it: no entry selects the pod), `waiting`,
    /// `failing` (retried), or `unresolved` (not subscribed; see `error`).
    pub state: String,
    /// SPIFFE IDs SPIRE served for the pod that are not its identity
    /// (ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<String>,
    /// Why it fails, or why it is unresolved.
    pub error: Option<String>,
}

/// The datapath.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatapathStatus {
    /// bpffs directory of the pins.
    pub pin_dir: String,
    /// The cgroup the programs are attached to.
    pub cgroup: String,
    /// Pinned links on that cgroup (2 when attached).
    pub links: usize,
    /// Auth map entries.
    pub auth_entries: usize,
    /// Auth map capacity.
    pub auth_capacity: u32,
    /// Ipcache entries.
    pub ipcache_entries: usize,
    /// Policy map entries.
    pub policy_entries: usize,
    /// Packets dropped for "Authentication required" since load.
    pub auth_required_drops: u64,
}

/// The policy source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySummary {
    /// `kubernetes` or the directory.
    pub source: String,
    /// Snapshot generation.
    pub generation: u64,
    /// Read everything once.
    pub synced: bool,
    /// Policies seen.
    pub policies: usize,
    /// Policies rejected.
    pub rejected: usize,
    /// Identities, endpoints, auth rules in the desired state.
    pub identities: usize,
    /// Endpoints (pod addresses).
    pub endpoints: usize,
    /// Auth rules.
    pub rules: usize,
    /// Input that could not be read.
    pub errors: Vec<String>,
}

/// One peer node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Node name.
    pub node: String,
    /// Datapath node id.
    pub id: u16,
    /// Handshake address.
    pub address: String,
    /// Authenticated pairs with identities on that node.
    pub pairs: usize,
}

/// Handshake counts by role and outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeCounts {
    /// Initiated, succeeded.
    pub initiated_ok: u64,
    /// Initiated, failed.
    pub initiated_failed: u64,
    /// Served, succeeded.
    pub served_ok: u64,
    /// Served, failed.
    pub served_failed: u64,
}

/// `GET /v1/auth`: one auth map entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthEntry {
    /// Local identity.
    pub local: u32,
    /// Remote identity.
    pub remote: u32,
    /// Remote node id (0 = this node).
    pub node_id: u16,
    /// Remote node name, when known.
    pub node: Option<String>,
    /// Expiry (RFC 3339).
    pub expiry: String,
    /// Seconds left (negative: expired, waiting for the sweep).
    pub remaining_seconds: i64,
}

/// `GET /v1/identities`: one identity of the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityEntry {
    /// The number.
    pub id: u32,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Canonical labels.
    pub labels: Vec<String>,
    /// Its pods on this node.
    pub local_pods: Vec<String>,
    /// Nodes running it.
    pub nodes: Vec<String>,
    /// NotAfter of the SVID this node holds for it (RFC 3339), if any.
    pub svid_expiry: Option<String>,
}

// The flow types below serialize exactly as `hubble observe -o json` prints
// a flow: Go's protojson with `UseProtoNames: true` over Cilium's
// `api/v1/flow/flow.proto` — proto field names, enums as their value names,
// fields in declaration order, zero values (0, "", false, the zero enum
// value, unset messages) left out, a `google.protobuf.BoolValue` written as
// a bare bool when set.

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// One end of a flow: Hubble's `Endpoint` (`ID`, the Cilium endpoint id, and
/// `workloads` are Cilium's and never set here).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FlowEndpoint {
    /// Security identity (0, unknown, is left out like any zero value).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub identity: u32,
    /// Namespace of the pod, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Identity labels (`k8s:app=order`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Pod name, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
}

/// Hubble's `IP` message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FlowIp {
    /// Source address.
    #[serde(default)]
    pub source: String,
    /// Destination address.
    #[serde(default)]
    pub destination: String,
    /// `IPVersion` enum name: `IPv4` or `IPv6`.
    #[serde(rename = "ipVersion", default)]
    pub ip_version: String,
    /// WireGuard-encrypted (never set by the cgroup datapath, which sees
    /// packets before encryption).
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypted: bool,
}

/// Ports of a TCP or UDP flow (Hubble's `TCP` / `UDP` messages; `TCP.flags`
/// is left out: the datapath's flow event carries no TCP flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FlowPorts {
    /// Source port.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub source_port: u32,
    /// Destination port.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub destination_port: u32,
}

/// Hubble's `Layer4` (a oneof: one member is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FlowL4 {
    /// TCP ports.
    #[serde(rename = "TCP", default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<FlowPorts>,
    /// UDP ports.
    #[serde(rename = "UDP", default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<FlowPorts>,
    /// ICMPv4.
    #[serde(rename = "ICMPv4", default, skip_serializing_if = "Option::is_none")]
    pub icmpv4: Option<Icmp>,
    /// ICMPv6.
    #[serde(rename = "ICMPv6", default, skip_serializing_if = "Option::is_none")]
    pub icmpv6: Option<Icmp>,
}

impl FlowL4 {
    /// No member set (protojson leaves the message out).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Hubble's `ICMPv4` / `ICMPv6` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Icmp {
    /// ICMP type (8/0 echo request/reply; 128/129 for ICMPv6).
    #[serde(rename = "type", default, skip_serializing_if = "is_zero_u32")]
    pub kind: u32,
    /// ICMP code.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub code: u32,
}

/// Hubble's `CiliumEventType`: the monitor message type the flow came from
/// (1 drop, 4 trace, 5 policy verdict) and its sub-type (the drop reason for
/// drops, the observation point for traces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CiliumEventType {
    /// Cilium's `MessageType*`.
    #[serde(rename = "type", default, skip_serializing_if = "is_zero_i32")]
    pub kind: i32,
    /// Drop reason or trace observation point.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub sub_type: i32,
}

/// One flow: Hubble's `Flow` message, the fields meshauth can fill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When (`google.protobuf.Timestamp` in JSON: RFC 3339, UTC, 0/3/6/9
    /// fractional digits).
    pub time: String,
    /// `Verdict` enum name: `FORWARDED`, `DROPPED` or `AUDIT`.
    pub verdict: String,
    /// Hubble's drop reason code (189 = authentication required); left out
    /// (0) unless dropped.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub drop_reason: u32,
    /// `AuthType` enum name, set on policy-verdict events only (`AUDIT`
    /// flows: `SPIRE`), as Hubble does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub auth_type: String,
    /// Addresses.
    #[serde(rename = "IP")]
    pub ip: FlowIp,
    /// Ports; left out (an unset message) for a protocol without them.
    #[serde(default, skip_serializing_if = "FlowL4::is_empty")]
    pub l4: FlowL4,
    /// Sending end.
    pub source: FlowEndpoint,
    /// Receiving end.
    pub destination: FlowEndpoint,
    /// `FlowType` enum name: always `L3_L4`.
    #[serde(rename = "Type")]
    pub kind: String,
    /// The node that saw it.
    pub node_name: String,
    /// The originating event's type.
    pub event_type: CiliumEventType,
    /// `TrafficDirection` enum name: `INGRESS` or `EGRESS`, of the connection
    /// seen from the local pod.
    pub traffic_direction: String,
    /// `TraceObservationPoint` enum name, for forwarded (trace) flows:
    /// `TO_ENDPOINT` (delivered to the pod) or `FROM_ENDPOINT` (sent by it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_observation_point: String,
    /// `DropReason` enum name (`AUTH_REQUIRED`); left out unless dropped.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub drop_reason_desc: String,
    /// Whether the packet is a reply; left out for drops (Hubble: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_reply: Option<bool>,
}

/// One line of `GET /v1/flows`: `{"flow": …, "node_name": …, "time": …}`
/// as `hubble observe -o json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// The flow.
    pub flow: Flow,
    /// The node that saw it.
    pub node_name: String,
    /// When.
    pub time: String,
}
