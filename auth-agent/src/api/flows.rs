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

use super::types::{Flow, FlowEndpoint, FlowIp, FlowL4, FlowPorts, FlowRecord, Icmp};

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The flow's verdict word.
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

/// One datapath event as `hubble observe -o json` would print it.
pub fn to_record(e: &FlowEvent, d: &DesiredState, node: &str) -> FlowRecord {
    let local = endpoint(d, e.local_identity, e.local.0);
    let remote = endpoint(d, e.remote_identity, e.remote.0);
    let (src, dst, sport, dport, source, destination) = match e.direction {
        Direction::Egress => (e.local.0, e.remote.0, e.local.1, e.remote.1, local, remote),
        Direction::Ingress => (e.remote.0, e.local.0, e.remote.1, e.local.1, remote, local),
    };
    let ports = FlowPorts {
        source_port: sport,
        destination_port: dport,
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
        // The datapath reports an echo's identifier in one port slot.
        1 => FlowL4 {
            icmpv4: Some(Icmp {
                echo_id: sport.max(dport),
            }),
            ..FlowL4::default()
        },
        58 => FlowL4 {
            icmpv6: Some(Icmp {
                echo_id: sport.max(dport),
            }),
            ..FlowL4::default()
        },
        _ => FlowL4::default(),
    };
    let time = rfc3339(e.time);
    FlowRecord {
        flow: Flow {
            time: time.clone(),
            verdict: verdict(e).to_string(),
            drop_reason: if e.forwarded { 0 } else { e.reason },
            drop_reason_desc: e.reason_desc().to_string(),
            ip: FlowIp {
                source: src.to_string(),
                destination: dst.to_string(),
                ip_version: if src.is_ipv4() { "IPv4" } else { "IPv6" }.to_string(),
            },
            l4,
            source,
            destination,
            node_name: node.to_string(),
            traffic_direction: match e.direction {
                Direction::Egress => "EGRESS",
                Direction::Ingress => "INGRESS",
            }
            .to_string(),
            auth_type: if e.auth_type != 0 {
                "SPIRE"
            } else {
                "DISABLED"
            }
            .to_string(),
            kind: "L3_L4".to_string(),
            len: e.len,
        },
        node_name: node.to_string(),
        time,
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
    let end = |e: &FlowEndpoint, ip: &str, port: Option<u16>| {
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
    let reason = if f.verdict == "FORWARDED" {
        String::new()
    } else {
        format!("{} ", f.drop_reason_desc)
    };
    format!(
        "{time}: {} -> {} {reason}{} ({proto}) on {}",
        end(&f.source, &f.ip.source, sport),
        end(&f.destination, &f.ip.destination, dport),
        f.verdict,
        f.node_name
    )
}

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
    fn a_dropped_egress_flow_has_hubbles_field_names() {
        let r = to_record(
            &event(false, reason::DROP_AUTH_REQUIRED, Direction::Egress),
            &state(),
            "node-a",
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["flow"]["verdict"], "DROPPED");
        assert_eq!(v["flow"]["drop_reason"], 189);
        assert_eq!(v["flow"]["drop_reason_desc"], "Authentication required");
        assert_eq!(v["flow"]["IP"]["source"], "10.99.1.2");
        assert_eq!(v["flow"]["IP"]["destination"], "10.99.2.2");
        assert_eq!(v["flow"]["IP"]["ipVersion"], "IPv4");
        assert_eq!(v["flow"]["l4"]["TCP"]["destination_port"], 8080);
        assert_eq!(v["flow"]["source"]["identity"], 256);
        assert_eq!(v["flow"]["source"]["pod_name"], "order-1");
        assert_eq!(v["flow"]["source"]["namespace"], "shop");
        assert_eq!(v["flow"]["destination"]["identity"], 257);
        assert_eq!(v["flow"]["traffic_direction"], "EGRESS");
        assert_eq!(v["flow"]["auth_type"], "SPIRE");
        assert_eq!(v["node_name"], "node-a");
        assert_eq!(v["time"], "2027-01-15T08:00:00Z");
        let back: FlowRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        let line = render_line(&r);
        assert!(
            line.contains("shop/order-1 10.99.1.2:41234 (ID:256) -> 10.99.2.2:8080 (ID:257) Authentication required DROPPED (TCP)"),
            "{line}"
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
