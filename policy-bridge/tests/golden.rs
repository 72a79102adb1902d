//! Every file in deploy/examples/ gives exactly the result its comment
//! states, resolved against tests/fixtures/cluster.yaml.

mod common;

use std::collections::BTreeSet;

use common::{engine_with, id_of, read, status_of};
use policy_bridge::{AuthRule, Direction, PortRange, Protocol, Remote, Verdict};

fn run(example: &str) -> policy_bridge::Engine {
    engine_with(&[
        &read("tests/fixtures/cluster.yaml"),
        &read(&format!("../deploy/examples/{example}")),
    ])
}

#[test]
fn every_example_is_covered_and_matches_the_shared_copy() {
    let dir = common::manifest_dir().join("../deploy/examples");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cluster-wide-auth.yaml",
            "egress-requires-auth.yaml",
            "l4-no-auth.yaml",
            "l7-not-enforced.yaml",
            "payment-requires-auth.yaml",
            "reserved-peer-rejected.yaml",
        ],
        "a new example needs a golden test here"
    );
}

#[test]
fn payment_requires_auth() {
    let e = run("payment-requires-auth.yaml");
    let s = e.state();
    let want = AuthRule {
        local: id_of(s, "production", "payment-service"),
        remote: Remote::Identity(id_of(s, "production", "order-service")),
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        ports: PortRange::single(8080),
    };
    assert_eq!(s.rules, BTreeSet::from([want]));
    let st = e.status();
    let p = status_of(&st, "require-mutual-auth");
    assert_eq!(
        (p.verdict, p.required_rules),
        (Verdict::Accepted, 1),
        "{p:#?}"
    );
    // The staging order-service is another namespace: not a peer.
    let staging = id_of(s, "staging", "order-service");
    assert!(
        s.rules
            .iter()
            .all(|r| r.remote != Remote::Identity(staging))
    );
}

#[test]
fn egress_requires_auth() {
    let e = run("egress-requires-auth.yaml");
    let s = e.state();
    let want = AuthRule {
        local: id_of(s, "production", "order-service"),
        remote: Remote::Identity(id_of(s, "production", "payment-service")),
        direction: Direction::Egress,
        protocol: Protocol::Tcp,
        ports: PortRange::single(8080),
    };
    assert_eq!(s.rules, BTreeSet::from([want]));
    let db = id_of(s, "production", "database");
    assert!(
        s.rules
            .iter()
            .all(|r| r.remote != Remote::Identity(db) && r.local != db)
    );
    assert_eq!(
        status_of(&e.status(), "order-egress").verdict,
        Verdict::Accepted
    );
}

#[test]
fn l4_no_auth() {
    let e = run("l4-no-auth.yaml");
    assert!(e.state().rules.is_empty(), "{:#?}", e.state().rules);
    let st = e.status();
    let p = status_of(&st, "backend-l4-policy");
    assert_eq!(p.verdict, Verdict::Accepted);
    assert!(p.errors.is_empty() && p.notes.is_empty(), "{p:#?}");
    assert_eq!(p.required_rules, 0);
}

#[test]
fn l7_not_enforced() {
    let e = run("l7-not-enforced.yaml");
    assert!(e.state().rules.is_empty());
    let st = e.status();
    let p = status_of(&st, "api-l7");
    assert!(p.errors.is_empty(), "not an error: {p:#?}");
    assert_eq!(p.notes.len(), 1, "{p:#?}");
    assert_eq!(p.notes[0].path, "spec.ingress[0].toPorts[0].rules");
    assert!(
        p.notes[0].message.contains("HTTP")
            && p.notes[0].message.contains("not enforced by meshauth")
    );
    assert_ne!(p.verdict, Verdict::Rejected);
}

#[test]
fn reserved_peer_rejected() {
    let e = run("reserved-peer-rejected.yaml");
    assert!(
        e.state().rules.is_empty(),
        "nothing may be dropped because of it"
    );
    let st = e.status();
    let p = status_of(&st, "world-with-auth");
    assert_eq!(p.verdict, Verdict::Rejected);
    assert_eq!(p.errors.len(), 1, "{p:#?}");
    assert_eq!(
        p.errors[0].path, "spec.ingress[0]",
        "the error names the rule"
    );
    assert!(p.errors[0].message.contains("world"), "{}", p.errors[0]);
}

#[test]
fn cluster_wide_auth() {
    let e = run("cluster-wide-auth.yaml");
    let s = e.state();
    let outside: BTreeSet<u32> = s
        .identities
        .values()
        .filter(|i| {
            !i.labels
                .contains("k8s:io.kubernetes.pod.namespace=kube-system")
        })
        .map(|i| i.id)
        .collect();
    assert!(outside.len() >= 9, "fixture identities: {outside:?}");
    let want: BTreeSet<AuthRule> = outside
        .iter()
        .map(|&local| AuthRule {
            local,
            remote: Remote::AnyCluster,
            direction: Direction::Ingress,
            protocol: Protocol::Any,
            ports: PortRange::ANY,
        })
        .collect();
    assert_eq!(s.rules, want);
    let dns = s
        .identities
        .values()
        .find(|i| i.labels.contains("k8s:k8s-app=kube-dns"))
        .expect("coredns identity")
        .id;
    assert!(
        s.rules.iter().all(|r| r.local != dns),
        "kube-system is excluded"
    );
}

#[test]
fn fixture_cluster_resolves_to_identities_endpoints_and_nodes() {
    let e = engine_with(&[&read("tests/fixtures/cluster.yaml")]);
    let s = e.state();
    // Two payment pods with different pod-template-hash share one identity.
    let pay = id_of(s, "production", "payment-service");
    let eps: Vec<_> = s
        .endpoints
        .values()
        .filter(|ep| ep.identity == pay)
        .collect();
    assert_eq!(eps.len(), 3, "two pods, one dual-stack: {eps:#?}");
    assert!(eps.iter().any(|ep| ep.ip.is_ipv6()));
    let labels = &s.identities[&pay].labels;
    assert!(labels.contains("k8s:io.cilium.k8s.policy.serviceaccount=payment-sa"));
    assert!(labels.contains("k8s:io.cilium.k8s.namespace.labels.env=prod"));
    assert!(!labels.iter().any(|l| l.contains("pod-template-hash")));
    assert!(s.identities.keys().all(|&id| id >= 256));
    // hostNetwork and pending pods get no endpoint.
    assert!(
        !s.endpoints
            .values()
            .any(|ep| ep.pod.contains("kube-proxy") || ep.pod.contains("pending"))
    );
    assert!(!s.endpoints.contains_key(&"192.168.0.1".parse().unwrap()));
    assert_eq!(
        s.nodes["node-a"].handshake_addr,
        "192.168.0.1".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(s.nodes["node-b"].wireguard_key.as_deref(), Some("a2V5LWI="));
}
