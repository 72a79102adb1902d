//! Policy semantics beyond the shipped examples: Cilium's mutual-auth docs
//! example, namespace rules, CCNP with matchExpressions, egress and ingress,
//! meshauth's own kinds, `specs`, ports, service accounts, rejected peers.

mod common;

use std::collections::BTreeSet;

use common::{engine_with, id_of, read, status_of};
use policy_bridge::{AuthRule, Direction, PortRange, Protocol, Remote, Verdict};

fn cluster() -> String {
    read("tests/fixtures/cluster.yaml")
}

fn rule(
    local: u32,
    remote: u32,
    direction: Direction,
    protocol: Protocol,
    ports: PortRange,
) -> AuthRule {
    AuthRule {
        local,
        remote: Remote::Identity(remote),
        direction,
        protocol,
        ports,
    }
}

#[test]
fn cilium_docs_mutual_auth_example() {
    let e = engine_with(&[
        &read("tests/fixtures/cilium-docs/workloads.yaml"),
        &read("tests/fixtures/cilium-docs/cnp-with-mutual-auth.yaml"),
        &read("tests/fixtures/cilium-docs/cnp-without-mutual-auth.yaml"),
    ]);
    let s = e.state();
    let echo = id_of(s, "default", "echo");
    let worker = id_of(s, "default", "pod-worker");
    assert_eq!(
        s.rules,
        BTreeSet::from([rule(
            echo,
            worker,
            Direction::Ingress,
            Protocol::Tcp,
            PortRange::single(8080)
        )])
    );
    let st = e.status();
    let with = status_of(&st, "mutual-auth-echo");
    assert_eq!(with.verdict, Verdict::PartiallyEnforced);
    assert_eq!(
        (with.required_rules, with.notes.len(), with.errors.len()),
        (1, 1, 0)
    );
    let without = status_of(&st, "no-mutual-auth-echo");
    assert_eq!(without.required_rules, 0);
}

const NS_CASES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: same-ns, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: payment-service}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: order-service}}]
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: named-ns, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: database}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: order-service, io.kubernetes.pod.namespace: staging}}]
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ns-labels-only, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: cache}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.env: staging}}]
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ns-labels-any-ns, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  ingress:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.namespace.labels.env: staging}
      matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}]
    authentication: {mode: required}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: subject-other-ns, namespace: staging}
spec:
  endpointSelector: {matchLabels: {app: order-service, io.kubernetes.pod.namespace: production}}
  egress:
  - toEndpoints: [{}]
    authentication: {mode: required}
"#;

#[test]
fn namespace_semantics() {
    let e = engine_with(&[&cluster(), NS_CASES]);
    let s = e.state();
    let pay = id_of(s, "production", "payment-service");
    let order_p = id_of(s, "production", "order-service");
    let order_s = id_of(s, "staging", "order-service");
    let db = id_of(s, "production", "database");
    let cache = id_of(s, "production", "cache");
    let front = id_of(s, "production", "frontend");
    let any = PortRange::ANY;
    let i = Direction::Ingress;
    let want = BTreeSet::from([
        // same-ns: only production's order-service, not staging's.
        rule(pay, order_p, i, Protocol::Any, any),
        // named-ns: staging's, because the selector names the namespace.
        rule(db, order_s, i, Protocol::Any, any),
        // ns-labels-any-ns: namespace labels with an explicit namespace Exists.
        rule(front, order_s, i, Protocol::Any, any),
        // subject-other-ns: the subject stays in staging; `{}` = staging's pods.
        rule(order_s, order_s, Direction::Egress, Protocol::Any, any),
    ]);
    // ns-labels-only: namespace labels alone stay inside production, where
    // env=staging matches nothing: no rule for cache.
    assert!(s.rules.iter().all(|r| r.local != cache));
    assert_eq!(s.rules, want);
    let st = e.status();
    let sub = status_of(&st, "subject-other-ns");
    assert!(
        sub.notes.iter().any(|n| n.path == "spec.endpointSelector"),
        "{sub:#?}"
    );
}

const CCNP_EXPR: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: orders-talk-to-payments}
spec:
  endpointSelector:
    matchExpressions:
    - {key: app, operator: In, values: [order-service]}
    - {key: io.cilium.k8s.namespace.labels.env, operator: NotIn, values: [prod]}
  egress:
  - toEndpoints:
    - matchExpressions:
      - {key: k8s:app, operator: In, values: [payment-service, database]}
      - {key: k8s:io.cilium.k8s.policy.serviceaccount, operator: DoesNotExist}
    - matchExpressions:
      - {key: any:io.cilium.k8s.policy.serviceaccount, operator: In, values: [payment-sa]}
    authentication: {mode: required}
    toPorts:
    - ports:
      - {port: "8000", endPort: 8100, protocol: TCP}
      - {port: "53", protocol: UDP}
"#;

#[test]
fn ccnp_with_match_expressions_egress_ranges_and_service_accounts() {
    let e = engine_with(&[&cluster(), CCNP_EXPR]);
    let s = e.state();
    let order_s = id_of(s, "staging", "order-service");
    let pay = id_of(s, "production", "payment-service");
    let mut want = BTreeSet::new();
    // First peer selector: every identity has a serviceaccount label, so
    // DoesNotExist selects nothing; the second selects payment-sa (cross-namespace: CCNP).
    for (proto, ports) in [
        (
            Protocol::Tcp,
            PortRange {
                start: 8000,
                end: 8100,
            },
        ),
        (Protocol::Udp, PortRange::single(53)),
    ] {
        want.insert(rule(order_s, pay, Direction::Egress, proto, ports));
    }
    assert_eq!(s.rules, want);
    assert_eq!(
        status_of(&e.status(), "orders-talk-to-payments").verdict,
        Verdict::Accepted
    );
}

const MESHAUTH_KINDS: &str = r#"
apiVersion: meshauth.io/v1alpha1
kind: MeshAuthPolicy
metadata: {name: payments, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: payment-service}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: order-service}}]
    authentication: {mode: required}
    toPorts: [{ports: [{port: "8443", protocol: TCP}]}]
---
apiVersion: meshauth.io/v1alpha1
kind: ClusterMeshAuthPolicy
metadata: {name: staging-orders}
spec:
  endpointSelector: {matchLabels: {io.kubernetes.pod.namespace: staging}}
  egress:
  - toEndpoints: [{matchLabels: {app: payment-service}}]
    authentication: {mode: required}
"#;

#[test]
fn meshauth_policy_kinds() {
    let e = engine_with(&[&cluster(), MESHAUTH_KINDS]);
    let s = e.state();
    let pay = id_of(s, "production", "payment-service");
    let order_p = id_of(s, "production", "order-service");
    let order_s = id_of(s, "staging", "order-service");
    assert_eq!(
        s.rules,
        BTreeSet::from([
            rule(
                pay,
                order_p,
                Direction::Ingress,
                Protocol::Tcp,
                PortRange::single(8443)
            ),
            rule(
                order_s,
                pay,
                Direction::Egress,
                Protocol::Any,
                PortRange::ANY
            ),
        ])
    );
    let st = e.status();
    assert_eq!(st.len(), 2);
    assert!(st.iter().all(|p| p.verdict == Verdict::Accepted), "{st:#?}");
    assert_eq!(st[0].kind, "MeshAuthPolicy");
}

const MIXED: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mixed, namespace: production}
specs:
- endpointSelector: {matchLabels: {app: payment-service}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: order-service}}]
    authentication: {mode: required}
    toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "http", protocol: TCP}]}]
  - fromCIDR: [10.0.0.0/8]
    authentication: {mode: required}
  - fromEndpoints: [{matchLabels: {"reserved:host": ""}}]
    authentication: {mode: required}
  - toPorts: [{ports: [{port: "9000"}]}]
    authentication: {mode: required}
- endpointSelector: {matchLabels: {app: database}}
  egress:
  - toEntities: [world]
  - toFQDNs: [{matchName: example.com}]
    authentication: {mode: required}
  ingressDeny:
  - fromEntities: [world]
  authentcation: {mode: required}
"#;

#[test]
fn partial_enforcement_names_every_rejected_rule() {
    let e = engine_with(&[&cluster(), MIXED]);
    let s = e.state();
    let pay = id_of(s, "production", "payment-service");
    let order_p = id_of(s, "production", "order-service");
    assert_eq!(
        s.rules,
        BTreeSet::from([rule(
            pay,
            order_p,
            Direction::Ingress,
            Protocol::Tcp,
            PortRange::single(8080)
        )])
    );
    let st = e.status();
    let p = status_of(&st, "mixed");
    assert_eq!(p.verdict, Verdict::PartiallyEnforced);
    let err_paths: Vec<&str> = p.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        err_paths,
        [
            "specs[0].ingress[0].toPorts[0].ports[1]",
            "specs[0].ingress[1]",
            "specs[0].ingress[2]",
            "specs[0].ingress[3]",
            "specs[1].egress[1]",
        ],
        "{p:#?}"
    );
    assert!(p.errors[0].message.contains("named port"));
    assert!(p.errors[1].message.contains("fromCIDR"));
    assert!(p.errors[2].message.contains("reserved"));
    let note_paths: BTreeSet<&str> = p.notes.iter().map(|n| n.path.as_str()).collect();
    assert!(
        note_paths.contains("specs[1].ingressDeny"),
        "{note_paths:?}"
    );
    assert!(
        note_paths.contains("specs[1].egress[0].toEntities"),
        "{note_paths:?}"
    );
    assert!(
        note_paths.contains("specs[1].authentcation"),
        "typos are reported: {note_paths:?}"
    );
}

#[test]
fn status_renders_for_the_cli() {
    let e = engine_with(&[
        &cluster(),
        &read("../deploy/examples/reserved-peer-rejected.yaml"),
    ]);
    let text = policy_bridge::status::render_text(&e.status());
    assert!(
        text.contains("CiliumNetworkPolicy production/world-with-auth: rejected"),
        "{text}"
    );
    assert!(
        text.contains("error: spec.ingress[0]: rule rejected"),
        "{text}"
    );
    let json = policy_bridge::status::render_json(&e.status()).unwrap();
    assert!(json.contains("\"verdict\": \"rejected\""), "{json}");
}
