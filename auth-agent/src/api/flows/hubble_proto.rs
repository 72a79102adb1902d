//! Our flow JSON checked against Hubble's schema.
//!
//! The tables are copied from Cilium's `api/v1/flow/flow.proto`
//! (github.com/cilium/cilium, read at commit 04bbfcb5ddb0c31cd0f130cb4e1f0f5e6e6ec768)
//! and `api/v1/observer/observer.proto` (`GetFlowsResponse`: `flow` = 1,
//! `node_name` = 1000, `time` = 1001): field names as protojson writes them
//! with `UseProtoNames: true` (what `hubble observe -o json` uses), enum
//! value names with their numbers. Enums are written by name and the zero
//! value is never written.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use auth_ebpf::events::FlowEvent;
use auth_ebpf::reason;
use auth_ebpf::types::Direction;
use serde_json::Value;

use super::to_record;

/// `message GetFlowsResponse` (observer.proto), the flow member.
const GET_FLOWS_RESPONSE: &[&str] = &["flow", "node_status", "lost_events", "node_name", "time"];

/// `message Flow`.
const FLOW: &[&str] = &[
    "time",
    "uuid",
    "verdict",
    "drop_reason",
    "auth_type",
    "ethernet",
    "IP",
    "l4",
    "source",
    "destination",
    "Type",
    "node_name",
    "source_names",
    "destination_names",
    "l7",
    "reply",
    "event_type",
    "source_service",
    "destination_service",
    "traffic_direction",
    "policy_match_type",
    "trace_observation_point",
    "drop_reason_desc",
    "is_reply",
    "debug_capture_point",
    "interface",
    "proxy_port",
    "trace_context",
    "sock_xlate_point",
    "socket_cookie",
    "cgroup_id",
    "Summary",
];
/// `message Endpoint`.
const ENDPOINT: &[&str] = &[
    "ID",
    "identity",
    "namespace",
    "labels",
    "pod_name",
    "workloads",
];
/// `message IP`.
const IP: &[&str] = &["source", "destination", "ipVersion", "encrypted"];
/// `message Layer4` (oneof protocol).
const LAYER4: &[&str] = &["TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP"];
/// `message TCP`.
const TCP: &[&str] = &["source_port", "destination_port", "flags"];
/// `message UDP`.
const UDP: &[&str] = &["source_port", "destination_port"];
/// `message ICMPv4` and `message ICMPv6`.
const ICMP: &[&str] = &["type", "code"];
/// `message CiliumEventType`.
const CILIUM_EVENT_TYPE: &[&str] = &["type", "sub_type"];

/// `enum Verdict`.
const VERDICT: &[(&str, i32)] = &[
    ("VERDICT_UNKNOWN", 0),
    ("FORWARDED", 1),
    ("DROPPED", 2),
    ("ERROR", 3),
    ("AUDIT", 4),
    ("REDIRECTED", 5),
    ("TRACED", 6),
    ("TRANSLATED", 7),
];
/// `enum FlowType`.
const FLOW_TYPE: &[(&str, i32)] = &[("UNKNOWN_TYPE", 0), ("L3_L4", 1), ("L7", 2), ("SOCK", 3)];
/// `enum AuthType`.
const AUTH_TYPE: &[(&str, i32)] = &[("DISABLED", 0), ("SPIRE", 1), ("TEST_ALWAYS_FAIL", 2)];
/// `enum IPVersion`.
const IP_VERSION: &[(&str, i32)] = &[("IP_NOT_USED", 0), ("IPv4", 1), ("IPv6", 2)];
/// `enum TrafficDirection`.
const TRAFFIC_DIRECTION: &[(&str, i32)] = &[
    ("TRAFFIC_DIRECTION_UNKNOWN", 0),
    ("INGRESS", 1),
    ("EGRESS", 2),
];
/// `enum TraceObservationPoint`, the values a cgroup datapath can be at.
const TRACE_OBSERVATION_POINT: &[(&str, i32)] = &[
    ("UNKNOWN_POINT", 0),
    ("TO_ENDPOINT", 101),
    ("FROM_ENDPOINT", 5),
];
/// `enum DropReason`: the zero value and the codes around meshauth's.
const DROP_REASON: &[(&str, i32)] = &[
    ("DROP_REASON_UNKNOWN", 0),
    ("INVALID_SOURCE_MAC", 130),
    ("INVALID_DESTINATION_MAC", 131),
    ("INVALID_SOURCE_IP", 132),
    ("POLICY_DENIED", 133),
    ("INVALID_PACKET_DROPPED", 134),
    ("CT_TRUNCATED_OR_INVALID_HEADER", 135),
    ("INVALID_IPV6_EXTENSION_HEADER", 156),
    ("IP_FRAGMENTATION_NOT_SUPPORTED", 157),
    ("POLICY_DENY", 181),
    ("AUTH_REQUIRED", 189),
    ("CT_NO_MAP_FOUND", 190),
];

fn keys_in(v: &Value, allowed: &[&str], what: &str) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {v}"));
    for k in o.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "{what} has no field {k:?} in flow.proto: {v}"
        );
    }
}

fn enum_value(v: &Value, field: &str, values: &[(&str, i32)], what: &str) -> Option<i32> {
    let x = v.get(field)?;
    let name = x
        .as_str()
        .unwrap_or_else(|| panic!("{what}.{field} is an enum, written by name: {x}"));
    let n = values
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{what}.{field} = {name:?} is no value of its enum"))
        .1;
    assert_ne!(
        n, 0,
        "{what}.{field}: protojson leaves out the zero value {name:?}"
    );
    Some(n)
}

/// Every key is a proto field, every enum a value name (not the zero one),
/// no zero number written.
fn check(v: &Value) {
    keys_in(v, GET_FLOWS_RESPONSE, "GetFlowsResponse");
    let f = &v["flow"];
    keys_in(f, FLOW, "Flow");
    assert_eq!(f["time"], v["time"], "the response's time is the flow's");
    assert_eq!(f["node_name"], v["node_name"]);
    enum_value(f, "verdict", VERDICT, "Flow").expect("a verdict");
    enum_value(f, "Type", FLOW_TYPE, "Flow").expect("a Type");
    enum_value(f, "auth_type", AUTH_TYPE, "Flow");
    enum_value(f, "traffic_direction", TRAFFIC_DIRECTION, "Flow").expect("a direction");
    enum_value(
        f,
        "trace_observation_point",
        TRACE_OBSERVATION_POINT,
        "Flow",
    );
    let desc = enum_value(f, "drop_reason_desc", DROP_REASON, "Flow");
    let code = f
        .get("drop_reason")
        .map(|c| c.as_i64().expect("a number") as i32);
    assert_eq!(desc, code, "drop_reason_desc names drop_reason: {f}");
    if f["verdict"] == "DROPPED" {
        assert!(code.is_some(), "a drop has its reason: {f}");
        assert_eq!(f["event_type"]["type"], 1, "MessageTypeDrop: {f}");
        assert_eq!(f["event_type"]["sub_type"].as_i64().map(|c| c as i32), code);
        assert!(f.get("is_reply").is_none(), "unknown for drops: {f}");
    }
    if f["verdict"] == "FORWARDED" {
        assert_eq!(f["event_type"]["type"], 4, "MessageTypeTrace: {f}");
        assert!(f["trace_observation_point"].is_string(), "{f}");
        assert!(f["is_reply"].is_boolean(), "{f}");
    }
    keys_in(&f["event_type"], CILIUM_EVENT_TYPE, "CiliumEventType");
    keys_in(&f["IP"], IP, "IP");
    enum_value(&f["IP"], "ipVersion", IP_VERSION, "IP").expect("an ipVersion");
    for end in ["source", "destination"] {
        keys_in(&f[end], ENDPOINT, end);
    }
    let Some(l4) = f.get("l4") else {
        return no_zero(v, "");
    };
    keys_in(l4, LAYER4, "Layer4");
    let l4 = l4.as_object().unwrap();
    assert_eq!(l4.len(), 1, "Layer4 is a oneof, left out when unset: {f}");
    for (k, fields) in [
        ("TCP", TCP),
        ("UDP", UDP),
        ("ICMPv4", ICMP),
        ("ICMPv6", ICMP),
    ] {
        if let Some(m) = l4.get(k) {
            keys_in(m, fields, k);
        }
    }
    no_zero(v, "");
}

/// No zero number or empty string anywhere: protojson leaves zero values out.
fn no_zero(v: &Value, at: &str) {
    match v {
        Value::Number(n) => assert_ne!(n.as_f64(), Some(0.0), "zero written at {at}"),
        Value::String(s) => assert!(!s.is_empty(), "empty string written at {at}"),
        Value::Object(o) => o.iter().for_each(|(k, v)| no_zero(v, &format!("{at}.{k}"))),
        Value::Array(a) => a.iter().for_each(|v| no_zero(v, at)),
        _ => {}
    }
}

fn event(proto: u8, v6: bool, direction: Direction, forwarded: bool, code: u8) -> FlowEvent {
    let (l, r) = if v6 {
        ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
    } else {
        ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap())
    };
    FlowEvent {
        time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_250),
        direction,
        local: (l, 40000),
        remote: (r, if proto == 1 || proto == 58 { 0 } else { 443 }),
        local_identity: 256,
        remote_identity: 257,
        remote_node_id: 1,
        proto,
        forwarded,
        reason: code,
        auth_type: 1,
        len: 60,
    }
}

#[test]
fn every_flow_we_write_fits_hubbles_schema() {
    let d = policy_bridge::DesiredState::default();
    let mut seen = BTreeMap::new();
    for proto in [6, 17, 1, 58, 132] {
        for v6 in [false, true] {
            for dir in [Direction::Egress, Direction::Ingress] {
                for (fwd, code) in [
                    (false, reason::DROP_AUTH_REQUIRED),
                    (false, reason::DROP_INVALID),
                    (false, reason::DROP_INVALID_SOURCE_IP),
                    (false, reason::DROP_INVALID_EXTHDR),
                    (false, reason::DROP_POLICY_DENIED),
                    (true, reason::PASS_AUTHENTICATED),
                    (true, reason::PASS_NO_POLICY),
                    (true, reason::PASS_REPLY),
                    (true, reason::PASS_AUDIT),
                ] {
                    let r = to_record(&event(proto, v6, dir, fwd, code), &d, "node-a");
                    let v = serde_json::to_value(&r).unwrap();
                    check(&v);
                    if proto == 132 {
                        assert!(
                            v["flow"].get("l4").is_none(),
                            "no ports known: l4 unset: {v}"
                        );
                    }
                    *seen.entry(v["flow"]["verdict"].to_string()).or_insert(0) += 1;
                }
            }
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "dropped, forwarded and audit flows checked: {seen:?}"
    );
}

#[test]
fn every_drop_code_meshauth_has_is_hubbles_number_for_its_name() {
    for (code, _, _) in reason::REASONS
        .iter()
        .filter(|(c, _, _)| reason::is_drop(*c))
    {
        let name = reason::hubble_name(*code);
        let n = DROP_REASON
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{code}: {name:?} is not in flow.proto's DropReason"))
            .1;
        assert_eq!(n, i32::from(*code), "{name}");
    }
}
