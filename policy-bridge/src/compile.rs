//! One policy object → compiled rules (selectors, direction, ports) plus
//! what meshauth could not enforce. Identity-independent: the engine
//! resolves selectors to identities.
//!
//! Only rules with `authentication.mode: required` produce auth rules.
//! A required rule whose peers are entities, CIDRs, nodes, FQDNs, services
//! or `reserved:` labels is rejected with an error naming the rule — those
//! peers have no SPIFFE identity, and enforcing would drop them forever.

use serde::Serialize;
use serde_json::Value;

use crate::model::policy::{
    AuthenticationMode, EgressRule, EndpointSelector, IngressRule, PolicySpec, PortRule,
};
use crate::model::{ObjectKey, PolicyObject};
use crate::selector::{Scope, Selector, SelectorError};
use crate::state::{Direction, PortRange, Protocol};

/// Errors compiling one port entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// A named port (`http`): meshauth's datapath matches numbers only.
    #[error("named port {0:?} is not supported by meshauth; use the port number")]
    Named(String),
    /// Outside 0–65535.
    #[error("port {0:?} is out of range (0-65535)")]
    OutOfRange(String),
    /// `endPort` below `port` or above 65535.
    #[error("endPort {end} is invalid for port {start} (needs port <= endPort <= 65535)")]
    BadEnd {
        /// Start.
        start: u16,
        /// End given.
        end: i64,
    },
    /// SCTP or an unknown protocol.
    #[error("protocol {0:?} is not supported by meshauth (TCP, UDP or ANY)")]
    Protocol(String),
}

/// A finding about a policy, at a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    /// Field path (`spec.ingress[0]`).
    pub path: String,
    /// What and why.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The peer side of a compiled rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Any cluster identity (`{}` in a clusterwide policy).
    AnyCluster,
    /// The identities a selector selects.
    Selector(Selector),
}

/// One (subject, peer, direction, ports) requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledRule {
    /// Local workloads.
    pub subject: Selector,
    /// Remote workloads.
    pub peer: Peer,
    /// Direction seen from the subject.
    pub direction: Direction,
    /// Protocol and port ranges (at least one).
    pub ports: Vec<(Protocol, PortRange)>,
    /// Where it came from (`spec.ingress[0].fromEndpoints[1]`).
    pub path: String,
}

/// A compiled policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// Which policy.
    pub key: ObjectKey,
    /// Rules requiring authentication.
    pub rules: Vec<CompiledRule>,
    /// Rules rejected (with the rule's path).
    pub errors: Vec<Problem>,
    /// Accepted parts meshauth does not enforce.
    pub notes: Vec<Problem>,
    /// Number of `required` rules that compiled.
    pub required_rules: usize,
}

/// Compiles a policy object.
pub fn compile_policy(p: &PolicyObject) -> CompiledPolicy {
    let scope = if p.kind.is_clusterwide() {
        Scope::Cluster
    } else {
        Scope::Namespace(p.namespace.clone().unwrap_or_else(|| "default".into()))
    };
    let mut c = CompiledPolicy {
        key: p.key(),
        rules: Vec::new(),
        errors: Vec::new(),
        notes: Vec::new(),
        required_rules: 0,
    };
    for (path, spec) in &p.specs {
        compile_spec(&mut c, path, spec, &scope);
    }
    c
}

impl CompiledPolicy {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
    fn note(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.notes.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// A rule of either direction, as the compiler needs it.
struct RuleView<'a> {
    direction: Direction,
    endpoints: Option<&'a Vec<EndpointSelector>>,
    endpoints_field: &'static str,
    /// Peers without SPIFFE identity that are present: (field, summary).
    non_identity: Vec<(&'static str, String)>,
    to_ports: Option<&'a Vec<PortRule>>,
    icmps: bool,
    mode: Option<AuthenticationMode>,
    extra: Vec<&'a String>,
}

fn summary<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn push<T: Serialize>(out: &mut Vec<(&'static str, String)>, field: &'static str, v: &Option<T>) {
    if let Some(v) = v {
        out.push((field, summary(v)));
    }
}

impl<'a> From<&'a IngressRule> for RuleView<'a> {
    fn from(r: &'a IngressRule) -> Self {
        let mut n = Vec::new();
        push(&mut n, "fromEntities", &r.from_entities);
        push(&mut n, "fromCIDR", &r.from_cidr);
        push(&mut n, "fromCIDRSet", &r.from_cidr_set);
        push(&mut n, "fromNodes", &r.from_nodes);
        push(&mut n, "fromGroups", &r.from_groups);
        push(&mut n, "fromRequires", &r.from_requires);
        Self {
            direction: Direction::Ingress,
            endpoints: r.from_endpoints.as_ref(),
            endpoints_field: "fromEndpoints",
            non_identity: n,
            to_ports: r.to_ports.as_ref(),
            icmps: r.icmps.is_some(),
            mode: r.authentication.as_ref().map(|a| a.mode),
            extra: r.extra.keys().collect(),
        }
    }
}

impl<'a> From<&'a EgressRule> for RuleView<'a> {
    fn from(r: &'a EgressRule) -> Self {
        let mut n = Vec::new();
        push(&mut n, "toEntities", &r.to_entities);
        push(&mut n, "toCIDR", &r.to_cidr);
        push(&mut n, "toCIDRSet", &r.to_cidr_set);
        push(&mut n, "toNodes", &r.to_nodes);
        push(&mut n, "toGroups", &r.to_groups);
        push(&mut n, "toFQDNs", &r.to_fqdns);
        push(&mut n, "toServices", &r.to_services);
        push(&mut n, "toRequires", &r.to_requires);
        Self {
            direction: Direction::Egress,
            endpoints: r.to_endpoints.as_ref(),
            endpoints_field: "toEndpoints",
            non_identity: n,
            to_ports: r.to_ports.as_ref(),
            icmps: r.icmps.is_some(),
            mode: r.authentication.as_ref().map(|a| a.mode),
            extra: r.extra.keys().collect(),
        }
    }
}

fn compile_spec(c: &mut CompiledPolicy, path: &str, spec: &PolicySpec, scope: &Scope) {
    for k in spec.extra.keys() {
        c.note(
            format!("{path}.{k}"),
            "unknown field; not enforced by meshauth",
        );
    }
    if spec.ingress_deny.is_some() {
        c.note(
            format!("{path}.ingressDeny"),
            "deny rules are not enforced by meshauth",
        );
    }
    if spec.egress_deny.is_some() {
        c.note(
            format!("{path}.egressDeny"),
            "deny rules are not enforced by meshauth",
        );
    }
    let subject = match (&spec.endpoint_selector, &spec.node_selector) {
        (Some(es), _) => match Selector::subject(es, scope) {
            Ok((s, dropped)) => {
                if dropped {
                    c.note(
                        format!("{path}.endpointSelector"),
                        "a namespaced policy applies only in its own namespace; the other namespace requirement was ignored",
                    );
                }
                Some(s)
            }
            Err(e) => {
                c.error(format!("{path}.endpointSelector"), selector_msg(e));
                None
            }
        },
        (None, Some(_)) => None,
        (None, None) => {
            c.error(
                format!("{path}.endpointSelector"),
                "required (or nodeSelector for a host policy)",
            );
            None
        }
    };
    let host_policy = spec.endpoint_selector.is_none() && spec.node_selector.is_some();
    if host_policy {
        c.note(
            format!("{path}.nodeSelector"),
            "host policies are not enforced by meshauth",
        );
    }
    let rules: Vec<(String, RuleView<'_>)> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| (format!("{path}.ingress[{i}]"), RuleView::from(r)))
        .chain(
            spec.egress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| (format!("{path}.egress[{i}]"), RuleView::from(r))),
        )
        .collect();
    for (rpath, r) in rules {
        compile_rule(c, &rpath, &r, subject.as_ref(), host_policy, scope);
    }
}

fn selector_msg(e: SelectorError) -> String {
    e.to_string()
}

fn compile_rule(
    c: &mut CompiledPolicy,
    path: &str,
    r: &RuleView<'_>,
    subject: Option<&Selector>,
    host_policy: bool,
    scope: &Scope,
) {
    for k in &r.extra {
        c.note(
            format!("{path}.{k}"),
            "unknown field; not enforced by meshauth",
        );
    }
    for (j, pr) in r.to_ports.iter().flat_map(|v| v.iter()).enumerate() {
        if let Some(rules) = &pr.rules {
            let kinds: Vec<String> = match rules {
                Value::Object(m) => m.keys().map(|k| k.to_uppercase()).collect(),
                _ => vec!["L7".into()],
            };
            c.note(
                format!("{path}.toPorts[{j}].rules"),
                format!(
                    "{} rules are not enforced by meshauth (L7 is the proxy's job)",
                    kinds.join("/")
                ),
            );
        }
        for k in pr.extra.keys() {
            c.note(
                format!("{path}.toPorts[{j}].{k}"),
                "not enforced by meshauth",
            );
        }
    }
    let required = match r.mode {
        Some(AuthenticationMode::Required) => true,
        Some(AuthenticationMode::TestAlwaysFail) => {
            c.error(
                format!("{path}.authentication.mode"),
                "test-always-fail is Cilium's test mode; meshauth supports required or disabled",
            );
            return;
        }
        Some(AuthenticationMode::Disabled) | None => false,
    };
    if !required {
        for (field, v) in &r.non_identity {
            c.note(
                format!("{path}.{field}"),
                format!("{field} {v} without authentication is not enforced by meshauth"),
            );
        }
        return;
    }
    if !r.non_identity.is_empty() {
        let what: Vec<String> = r
            .non_identity
            .iter()
            .map(|(f, v)| format!("{f} {v}"))
            .collect();
        c.error(
            path.to_string(),
            format!(
                "rule rejected: authentication is required from {}, which has no SPIFFE identity; use {} with pod selectors",
                what.join(" and "),
                r.endpoints_field
            ),
        );
        return;
    }
    if host_policy {
        c.error(path.to_string(), "rule rejected: the local end of a host policy is the host, which has no SPIFFE identity");
        return;
    }
    if r.icmps {
        c.error(
            format!("{path}.icmps"),
            "rule rejected: ICMP cannot be authenticated",
        );
        return;
    }
    let Some(subject) = subject else {
        return;
    };
    let Some(endpoints) = r.endpoints.filter(|v| !v.is_empty()) else {
        c.error(
            path.to_string(),
            format!(
                "rule rejected: authentication is required but {} is missing or empty, so the peer would be anyone (including the world)",
                r.endpoints_field
            ),
        );
        return;
    };
    let mut peers = Vec::new();
    for (k, es) in endpoints.iter().enumerate() {
        let ppath = format!("{path}.{}[{k}]", r.endpoints_field);
        match Selector::peer(es, scope) {
            Ok(s) if s.has_reserved() => {
                c.error(
                    path.to_string(),
                    format!("rule rejected: {ppath} selects a reserved identity {s}, which has no SPIFFE identity"),
                );
                return;
            }
            Ok(s) if s.is_any_cluster() => peers.push((ppath, Peer::AnyCluster)),
            Ok(s) => peers.push((ppath, Peer::Selector(s))),
            Err(e) => {
                c.error(ppath, format!("rule rejected: {e}"));
                return;
            }
        }
    }
    let Some(ports) = compile_ports(c, path, r.to_ports) else {
        return;
    };
    c.required_rules += 1;
    for (ppath, peer) in peers {
        c.rules.push(CompiledRule {
            subject: subject.clone(),
            peer,
            direction: r.direction,
            ports: ports.clone(),
            path: ppath,
        });
    }
}

/// The rule's ports; `None` when every entry was invalid (the errors say why).
fn compile_ports(
    c: &mut CompiledPolicy,
    path: &str,
    to_ports: Option<&Vec<PortRule>>,
) -> Option<Vec<(Protocol, PortRange)>> {
    let mut out = Vec::new();
    let mut bad = 0;
    for (j, pr) in to_ports.iter().flat_map(|v| v.iter()).enumerate() {
        for (m, pp) in pr.ports.iter().flatten().enumerate() {
            match parse_port(&pp.port, pp.end_port, pp.protocol.as_deref()) {
                Ok(p) => out.push(p),
                Err(e) => {
                    bad += 1;
                    c.error(format!("{path}.toPorts[{j}].ports[{m}]"), e.to_string());
                }
            }
        }
    }
    if out.is_empty() && bad > 0 {
        return None;
    }
    if out.is_empty() {
        out.push((Protocol::Any, PortRange::ANY));
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// Parses one `ports` entry.
pub fn parse_port(
    port: &str,
    end: Option<i64>,
    proto: Option<&str>,
) -> Result<(Protocol, PortRange), PortError> {
    let protocol = match proto.map(str::to_ascii_uppercase).as_deref() {
        None | Some("ANY") | Some("") => Protocol::Any,
        Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some(_) => return Err(PortError::Protocol(proto.unwrap_or_default().to_string())),
    };
    let start: u16 = if port.is_empty() {
        0
    } else if port.bytes().all(|b| b.is_ascii_digit()) {
        port.parse()
            .map_err(|_| PortError::OutOfRange(port.to_string()))?
    } else if port.starts_with('-') {
        return Err(PortError::OutOfRange(port.to_string()));
    } else {
        return Err(PortError::Named(port.to_string()));
    };
    if start == 0 {
        return Ok((protocol, PortRange::ANY));
    }
    let range = match end {
        None => PortRange::single(start),
        Some(0) => PortRange::single(start),
        Some(e) if e >= i64::from(start) && e <= 65535 => PortRange {
            start,
            end: e as u16,
        },
        Some(e) => return Err(PortError::BadEnd { start, end: e }),
    };
    Ok((protocol, range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(
            parse_port("8080", None, Some("TCP")),
            Ok((Protocol::Tcp, PortRange::single(8080)))
        );
        assert_eq!(
            parse_port("0", None, Some("UDP")),
            Ok((Protocol::Udp, PortRange::ANY))
        );
        assert_eq!(
            parse_port("", None, None),
            Ok((Protocol::Any, PortRange::ANY))
        );
        assert_eq!(
            parse_port("8000", Some(8100), None),
            Ok((
                Protocol::Any,
                PortRange {
                    start: 8000,
                    end: 8100
                }
            ))
        );
        assert_eq!(
            parse_port("8000", Some(10), None),
            Err(PortError::BadEnd {
                start: 8000,
                end: 10
            })
        );
        assert_eq!(
            parse_port("http", None, None),
            Err(PortError::Named("http".into()))
        );
        assert_eq!(
            parse_port("70000", None, None),
            Err(PortError::OutOfRange("70000".into()))
        );
        assert_eq!(
            parse_port("1", None, Some("SCTP")),
            Err(PortError::Protocol("SCTP".into()))
        );
    }
}
