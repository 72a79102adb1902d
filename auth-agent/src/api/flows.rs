//! Flow events from the datapath, in Hubble's shape, fanned out to every
//! `meshauth observe`: the agent is the ring buffer's one reader and keeps
//! the latest flows for clients that ask for history.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use auth_ebpf::events::FlowEvent;
use auth_ebpf::reason;
use auth_ebpf::types::Direction;
use policy_bridge::DesiredState;
use tokio::sync::broadcast;

use super::types::{
    CiliumEventType, Flow, FlowEndpoint, FlowIp, FlowL4, FlowPorts, FlowRecord, Icmp,
};

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A `google.protobuf.Timestamp` as protojson writes it (and so
/// `hubble observe -o json`): RFC 3339 in UTC with a `Z`, and 0, 3, 6 or 9
/// fractional digits — as few as the nanoseconds need.
pub fn proto_timestamp(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t).to_offset(time::UtcOffset::UTC);
    let secs = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let base = t
        .format(&secs)
        .unwrap_or_else(|_| t.unix_timestamp().to_string());
    let nanos = t.nanosecond();
    let frac = if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    format!("{base}{frac}Z")
}

/// Cilium's monitor message types (`pkg/monitor/api/types.go`), Hubble's
/// `event_type.type`.
pub mod message_type {
    /// `MessageTypeDrop`.
    pub const DROP: i32 = 1;
    /// `MessageTypeTrace`.
    pub const TRACE: i32 = 4;
    /// `MessageTypePolicyVerdict`.
    pub const POLICY_VERDICT: i32 = 5;
}

/// Cilium's trace observation points (`pkg/monitor/api/types.go`), a trace
/// event's `event_type.sub_type`.
pub mod trace_point {
    /// `TraceToLxc`: delivered to the endpoint (cgroup ingress).
    pub const TO_LXC: i32 = 0;
    /// `TraceFromLxc`: sent by the endpoint (cgroup egress).
    pub const FROM_LXC: i32 = 5;
}

/// The flow's verdict: Hubble's `Verdict` enum name.
pub fn verdict(e: &FlowEvent) -> &'static str {
    if !e.forwarded {
        "DROPPED"
    } else if e.reason == reason::PASS_AUDIT {
        "AUDIT"
    } else {
        "FORWARDED"
    }
}

fn endpoint(d: &DesiredState, identity: u32, ip: IpAddr) -> FlowEndpoint {
    let (namespace, pod_name) = d
        .endpoints
        .get(&ip)
        .and_then(|e| e.pod.split_once('/'))
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
        .unwrap_or_default();
    FlowEndpoint {
        identity,
        namespace,
        pod_name,
        labels: d
            .identities
            .get(&identity)
            .map(|i| i.labels.iter().cloned().collect())
            .unwrap_or_default(),
    }
}

/// One datapath event as `hubble observe -o json` would print it: a drop is
/// a Cilium drop notification (`event_type` 1 / the reason, `drop_reason`
/// and `drop_reason_desc` set, `is_reply` unknown), a pass a trace
/// notification (`event_type` 4 / the observation point), an audit-mode pass
/// a policy verdict (`event_type` 5, `auth_type` `SPIRE`).
pub fn to_record(e: &FlowEvent, d: &DesiredState, node: &str) -> FlowRecord {
    let local = endpoint(d, e.local_identity, e.local.0);
    let remote = endpoint(d, e.remote_identity, e.remote.0);
    let (src, dst, sport, dport, source, destination) = match e.direction {
        Direction::Egress => (e.local.0, e.remote.0, e.local.1, e.remote.1, local, remote),
        Direction::Ingress => (e.remote.0, e.local.0, e.remote.1, e.local.1, remote, local),
    };
    let ports = FlowPorts {
        source_port: sport.into(),
        destination_port: dport.into(),
    };
    // The datapath puts an echo's identifier in the requester's port slot
    // (request: source, reply: destination) and zeroes both otherwise.
    let icmp = |request: u32, reply: u32| Icmp {
        kind: match (sport, dport) {
            (s, 0) if s != 0 => request,
            (0, d) if d != 0 => reply,
            _ => 0,
        },
        code: 0,
    };
    let l4 = match e.proto {
        6 => FlowL4 {
            tcp: Some(ports),
            ..FlowL4::default()
        },
        17 => FlowL4 {
            udp: Some(ports),
            ..FlowL4::default()
        },
        1 => FlowL4 {
            icmpv4: Some(icmp(8, 0)),
            ..FlowL4::default()
        },
        58 => FlowL4 {
            icmpv6: Some(icmp(128, 129)),
            ..FlowL4::default()
        },
        _ => FlowL4::default(),
    };
    let verdict = verdict(e);
    let reply = e.reason == reason::PASS_REPLY;
    // Hubble's direction is the connection's: a reply leaving the pod
    // belongs to an ingress connection.
    let direction = match (e.direction, reply) {
        (Direction::Egress, false) | (Direction::Ingress, true) => "EGRESS",
        (Direction::Ingress, false) | (Direction::Egress, true) => "INGRESS",
    };
    let (event_type, trace_point, is_reply, auth_type) = match verdict {
        "DROPPED" => (
            CiliumEventType {
                kind: message_type::DROP,
                sub_type: e.reason.into(),
            },
            "",
            None,
            "",
        ),
        "AUDIT" => (
            CiliumEventType {
                kind: message_type::POLICY_VERDICT,
                sub_type: 0,
            },
            "",
            Some(false),
            if e.auth_type != 0 { "SPIRE" } else { "" },
        ),
        _ => {
            let (sub_type, point) = match e.direction {
                Direction::Egress => (trace_point::FROM_LXC, "FROM_ENDPOINT"),
                Direction::Ingress => (trace_point::TO_LXC, "TO_ENDPOINT"),
            };
            (
                CiliumEventType {
                    kind: message_type::TRACE,
                    sub_type,
                },
                point,
                Some(reply),
                "",
            )
        }
    };
    let dropped = !e.forwarded;
    let time = proto_timestamp(e.time);
    FlowRecord {
        flow: Flow {
            time: time.clone(),
            verdict: verdict.to_string(),
            drop_reason: if dropped { e.reason.into() } else { 0 },
            auth_type: auth_type.to_string(),
            ip: FlowIp {
                source: src.to_string(),
                destination: dst.to_string(),
                ip_version: if src.is_ipv4() { "IPv4" } else { "IPv6" }.to_string(),
                encrypted: false,
            },
            l4,
            source,
            destination,
            kind: "L3_L4".to_string(),
            node_name: node.to_string(),
            event_type,
            traffic_direction: direction.to_string(),
            trace_observation_point: trace_point.to_string(),
            drop_reason_desc: if dropped {
                reason::hubble_name(e.reason).to_string()
            } else {
                String::new()
            },
            is_reply,
        },
        node_name: node.to_string(),
        time,
    }
}

/// The words for a flow's reason in the text form: the drop reason's
/// description ("Authentication required"), or the audit-mode note.
fn reason_words(f: &Flow) -> Option<&'static str> {
    match f.verdict.as_str() {
        "DROPPED" => Some(
            u8::try_from(f.drop_reason)
                .map(reason::description)
                .unwrap_or("Unknown reason"),
        ),
        "AUDIT" => Some(reason::description(reason::PASS_AUDIT)),
        _ => None,
    }
}

/// Keeps the latest flows and broadcasts new ones.
#[derive(Debug, Clone)]
pub struct FlowHub {
    inner: Arc<Mutex<VecDeque<Arc<FlowRecord>>>>,
    tx: broadcast::Sender<Arc<FlowRecord>>,
    keep: usize,
}

impl FlowHub {
    /// A hub remembering the latest `keep` flows.
    pub fn new(keep: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(keep))),
            tx,
            keep,
        }
    }

    /// Adds a flow.
    pub fn push(&self, r: FlowRecord) {
        let r = Arc::new(r);
        {
            let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() == self.keep {
                q.pop_front();
            }
            q.push_back(r.clone());
        }
        let _ = self.tx.send(r);
    }

    /// How many clients are following new flows (lets a caller wait until a
    /// follower is attached instead of guessing with a sleep).
    pub fn followers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// The latest flows, oldest first, and a receiver of the next ones
    /// (taken together, so no flow falls between them).
    pub fn recent_and_subscribe(
        &self,
    ) -> (Vec<Arc<FlowRecord>>, broadcast::Receiver<Arc<FlowRecord>>) {
        let q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (q.iter().cloned().collect(), self.tx.subscribe())
    }
}

/// Which flows a client wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Only this verdict (`DROPPED`, `FORWARDED`, `AUDIT`).
    pub verdict: Option<String>,
    /// Only flows involving this identity.
    pub identity: Option<u32>,
}

impl FlowFilter {
    /// Whether `r` passes.
    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.verdict
            .as_ref()
            .is_none_or(|v| v.eq_ignore_ascii_case(&r.flow.verdict))
            && self
                .identity
                .is_none_or(|id| r.flow.source.identity == id || r.flow.destination.identity == id)
    }
}

/// One line for people, like `hubble observe` prints:
/// `Nov 26 14:50:01.123: shop/order-1:41234 (ID:256) -> shop/payment-1:8080 (ID:257) Authentication required DROPPED (TCP)`.
pub fn render_line(r: &FlowRecord) -> String {
    let f = &r.flow;
    let time = time::OffsetDateTime::parse(&f.time, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| {
            let fmt = time::macros::format_description!(
                "[month repr:short] [day] [hour]:[minute]:[second].[subsecond digits:3]"
            );
            t.format(&fmt).ok()
        })
        .unwrap_or_else(|| f.time.clone());
    let (proto, sport, dport) = match (&f.l4.tcp, &f.l4.udp) {
        (Some(p), _) => ("TCP", Some(p.source_port), Some(p.destination_port)),
        (_, Some(p)) => ("UDP", Some(p.source_port), Some(p.destination_port)),
        _ if f.l4.icmpv4.is_some() => ("ICMPv4", None, None),
        _ if f.l4.icmpv6.is_some() => ("ICMPv6", None, None),
        _ => ("IP", None, None),
    };
    let end = |e: &FlowEndpoint, ip: &str, port: Option<u32>| {
        let who = if e.pod_name.is_empty() {
            ip.to_string()
        } else {
            format!("{}/{}", e.namespace, e.pod_name)
        };
        let addr = match port {
            Some(p) if ip.contains(':') => format!("[{ip}]:{p}"),
            Some(p) => format!("{ip}:{p}"),
            None => ip.to_string(),
        };
        if e.pod_name.is_empty() {
            format!("{addr} (ID:{})", e.identity)
        } else {
            format!("{who} {addr} (ID:{})", e.identity)
        }
    };
    let reason = reason_words(f).map(|w| format!("{w} ")).unwrap_or_default();
    format!(
        "{time}: {} -> {} {reason}{} ({proto}) on {}",
        end(&f.source, &f.ip.source, sport),
        end(&f.destination, &f.ip.destination, dport),
        f.verdict,
        f.node_name
    )
}

#[cfg(test)]
mod hubble_proto;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn event(forwarded: bool, reason: u8, direction: Direction) -> FlowEvent {
        FlowEvent {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            direction,
            local: ("10.99.1.2".parse().unwrap(), 41234),
            remote: ("10.99.2.2".parse().unwrap(), 8080),
            local_identity: 256,
            remote_identity: 257,
            remote_node_id: 1,
            proto: 6,
            forwarded,
            reason,
            auth_type: 1,
            len: 60,
        }
    }

    fn state() -> DesiredState {
        let mut d = DesiredState::default();
        d.endpoints.insert(
            "10.99.1.2".parse().unwrap(),
            policy_bridge::Endpoint {
                ip: "10.99.1.2".parse().unwrap(),
                identity: 256,
                node: "node-a".into(),
                pod: "shop/order-1".into(),
            },
        );
        d.identities.insert(
            256,
            policy_bridge::Identity {
                id: 256,
                labels: BTreeSet::from(["k8s:app=order".to_string()]),
            },
        );
        d
    }

    #[test]
    fn a_dropped_egress_flow_is_exactly_hubbles_json() {
        let mut e = event(false, reason::DROP_AUTH_REQUIRED, Direction::Egress);
        e.time += Duration::from_nanos(123_456_789);
        let r = to_record(&e, &state(), "node-a");
        let v = serde_json::to_value(&r).unwrap();
        // What `hubble observe -o json` prints for Cilium's drop 189 of the
        // same packet (protojson, proto names, zero values left out).
        let want = serde_json::json!({
            "flow": {
                "time": "2027-01-15T08:00:00.123456789Z",
                "verdict": "DROPPED",
                "drop_reason": 189,
                "IP": {"source": "10.99.1.2", "destination": "10.99.2.2", "ipVersion": "IPv4"},
                "l4": {"TCP": {"source_port": 41234, "destination_port": 8080}},
                "source": {
                    "identity": 256,
                    "namespace": "shop",
                    "labels": ["k8s:app=order"],
                    "pod_name": "order-1"
                },
                "destination": {"identity": 257},
                "Type": "L3_L4",
                "node_name": "node-a",
                "event_type": {"type": 1, "sub_type": 189},
                "traffic_direction": "EGRESS",
                "drop_reason_desc": "AUTH_REQUIRED"
            },
            "node_name": "node-a",
            "time": "2027-01-15T08:00:00.123456789Z"
        });
        assert_eq!(v, want, "{}", serde_json::to_string_pretty(&v).unwrap());
        let back: FlowRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        let line = render_line(&r);
        assert!(
            line.contains("shop/order-1 10.99.1.2:41234 (ID:256) -> 10.99.2.2:8080 (ID:257) Authentication required DROPPED (TCP)"),
            "{line}"
        );
    }

    #[test]
    fn a_forwarded_flow_is_a_trace_without_drop_fields() {
        let r = to_record(
            &event(true, reason::PASS_AUTHENTICATED, Direction::Egress),
            &state(),
            "node-a",
        );
        let v = serde_json::to_value(&r).unwrap();
        let f = v["flow"].as_object().unwrap();
        assert!(!f.contains_key("drop_reason"), "{v}");
        assert!(!f.contains_key("drop_reason_desc"), "{v}");
        assert!(!f.contains_key("auth_type"), "{v}");
        assert_eq!(v["flow"]["verdict"], "FORWARDED");
        assert_eq!(
            v["flow"]["event_type"],
            serde_json::json!({"type": 4, "sub_type": 5})
        );
        assert_eq!(v["flow"]["trace_observation_point"], "FROM_ENDPOINT");
        assert_eq!(v["flow"]["is_reply"], false);
        let line = render_line(&r);
        assert!(line.contains("(ID:257) FORWARDED (TCP)"), "{line}");

        // Delivered to the pod: TraceToLxc, whose sub_type 0 is left out.
        let r = to_record(
            &event(true, reason::PASS_REPLY, Direction::Ingress),
            &state(),
            "node-a",
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["flow"]["event_type"], serde_json::json!({"type": 4}));
        assert_eq!(v["flow"]["trace_observation_point"], "TO_ENDPOINT");
        assert_eq!(v["flow"]["is_reply"], true);
        assert_eq!(
            v["flow"]["traffic_direction"], "EGRESS",
            "a reply's direction is its connection's"
        );
    }

    #[test]
    fn an_audit_flow_is_a_policy_verdict_and_says_so_in_words() {
        let r = to_record(
            &event(true, reason::PASS_AUDIT, Direction::Egress),
            &state(),
            "node-a",
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["flow"]["verdict"], "AUDIT");
        assert_eq!(v["flow"]["auth_type"], "SPIRE");
        assert_eq!(v["flow"]["event_type"], serde_json::json!({"type": 5}));
        assert!(v["flow"].get("drop_reason_desc").is_none(), "{v}");
        assert!(
            render_line(&r).contains("Authentication required (audit mode) AUDIT"),
            "{}",
            render_line(&r)
        );
    }

    #[test]
    fn timestamps_have_protojsons_0_3_6_or_9_fractional_digits() {
        let t = |ns: u64| {
            proto_timestamp(
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(1_800_000_000)
                    + Duration::from_nanos(ns),
            )
        };
        assert_eq!(t(0), "2027-01-15T08:00:00Z");
        assert_eq!(t(500_000_000), "2027-01-15T08:00:00.500Z");
        assert_eq!(t(1_000), "2027-01-15T08:00:00.000001Z");
        assert_eq!(t(1), "2027-01-15T08:00:00.000000001Z");
    }

    #[test]
    fn icmp_echo_gets_its_type() {
        let mut e = event(false, reason::DROP_AUTH_REQUIRED, Direction::Egress);
        e.proto = 1;
        e.local.1 = 77; // the requester's slot: an echo request
        e.remote.1 = 0;
        let v = serde_json::to_value(to_record(&e, &state(), "n")).unwrap();
        assert_eq!(v["flow"]["l4"], serde_json::json!({"ICMPv4": {"type": 8}}));
        e.proto = 58;
        let v = serde_json::to_value(to_record(&e, &state(), "n")).unwrap();
        assert_eq!(
            v["flow"]["l4"],
            serde_json::json!({"ICMPv6": {"type": 128}})
        );
    }

    #[test]
    fn an_ingress_flow_has_the_remote_as_source() {
        let r = to_record(
            &event(true, reason::PASS_AUTHENTICATED, Direction::Ingress),
            &state(),
            "node-a",
        );
        assert_eq!(r.flow.verdict, "FORWARDED");
        assert_eq!(r.flow.drop_reason, 0);
        assert_eq!(r.flow.ip.source, "10.99.2.2");
        assert_eq!(r.flow.source.identity, 257);
        assert_eq!(r.flow.l4.tcp.unwrap().source_port, 8080);
        assert!(r.flow.drop_reason_desc.is_empty());
        assert_eq!(r.flow.traffic_direction, "INGRESS");
    }

    #[test]
    fn the_filter_and_the_hub_keep_what_was_asked() {
        let hub = FlowHub::new(2);
        for (fwd, reason) in [
            (false, reason::DROP_AUTH_REQUIRED),
            (true, reason::PASS_AUTHENTICATED),
            (false, reason::DROP_AUTH_REQUIRED),
        ] {
            hub.push(to_record(
                &event(fwd, reason, Direction::Egress),
                &state(),
                "n",
            ));
        }
        let (recent, _rx) = hub.recent_and_subscribe();
        assert_eq!(recent.len(), 2, "keeps the latest 2");
        assert_eq!(recent[0].flow.verdict, "FORWARDED");
        let f = FlowFilter {
            verdict: Some("dropped".into()),
            identity: None,
        };
        let kept: Vec<_> = recent.iter().filter(|r| f.matches(r)).collect();
        assert_eq!(kept.len(), 1);
        let f = FlowFilter {
            verdict: None,
            identity: Some(999),
        };
        assert!(!f.matches(&recent[0]));
    }
}
