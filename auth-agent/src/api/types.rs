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
    /// `workload_api` or `delegated_identity`.
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

/// One end of a flow, Hubble's `Endpoint` fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    /// Security identity.
    pub identity: u32,
    /// Namespace of the pod, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Pod name, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    /// Identity labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Hubble's `IP` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowIp {
    /// Source address.
    pub source: String,
    /// Destination address.
    pub destination: String,
    /// `IPv4` or `IPv6`.
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
}

/// Ports of a TCP or UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPorts {
    /// Source port.
    pub source_port: u16,
    /// Destination port.
    pub destination_port: u16,
}

/// Hubble's `l4` block (one of its members is set).
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

/// ICMP echo (the only ICMP the datapath judges by flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmp {
    /// The echo identifier.
    pub echo_id: u16,
}

/// One flow, with Hubble's field names where they exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When (RFC 3339 with nanoseconds).
    pub time: String,
    /// `FORWARDED`, `DROPPED` or `AUDIT`.
    pub verdict: String,
    /// Hubble's drop reason code (189 = authentication required), 0 when forwarded.
    pub drop_reason: u8,
    /// The reason in words ("Authentication required").
    pub drop_reason_desc: String,
    /// Addresses.
    #[serde(rename = "IP")]
    pub ip: FlowIp,
    /// Ports.
    pub l4: FlowL4,
    /// Sending end.
    pub source: FlowEndpoint,
    /// Receiving end.
    pub destination: FlowEndpoint,
    /// The node that saw it.
    pub node_name: String,
    /// `INGRESS` or `EGRESS`, seen from the local pod.
    pub traffic_direction: String,
    /// `SPIRE` when policy required authentication, else `DISABLED`.
    pub auth_type: String,
    /// Always `L3_L4`.
    #[serde(rename = "Type")]
    pub kind: String,
    /// Packet length.
    pub len: u32,
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
