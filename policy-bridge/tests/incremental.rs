//! The incremental engine agrees with a from-scratch compile after every
//! change of a long random sequence (pods relabelled, moved, deleted,
//! namespaces relabelled, policies added and removed), and each diff turns
//! the previous state into the next.

mod common;

use std::collections::BTreeSet;

use policy_bridge::model::parse_documents;
use policy_bridge::{Change, DesiredState, Engine, EngineConfig, StateDiff};

/// Rules with identity numbers replaced by label sets (numbers depend on allocation order).
fn semantic(s: &DesiredState) -> BTreeSet<String> {
    let name = |id: u32| {
        s.identities
            .get(&id)
            .map(|i| format!("{:?}", i.labels))
            .unwrap_or(format!("?{id}"))
    };
    s.rules
        .iter()
        .map(|r| {
            let remote = match r.remote {
                policy_bridge::Remote::Identity(i) => name(i),
                policy_bridge::Remote::AnyCluster => "any".into(),
            };
            format!(
                "{} {remote} {:?} {:?} {:?}",
                name(r.local),
                r.direction,
                r.protocol,
                r.ports
            )
        })
        .collect()
}

fn apply_diff(s: &mut DesiredState, d: &StateDiff) {
    for i in &d.identities_removed {
        s.identities.remove(i);
    }
    for i in &d.identities_upserted {
        s.identities.insert(i.id, i.clone());
    }
    for e in &d.endpoints_removed {
        s.endpoints.remove(e);
    }
    for e in &d.endpoints_upserted {
        s.endpoints.insert(e.ip, e.clone());
    }
    for n in &d.nodes_removed {
        s.nodes.remove(n);
    }
    for n in &d.nodes_upserted {
        s.nodes.insert(n.name.clone(), n.clone());
    }
    for r in &d.rules_removed {
        s.rules.remove(r);
    }
    s.rules.extend(d.rules_added.iter().copied());
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pod(ns: &str, name: &str, app: &str, tier: &str, ip: u64, running: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}, tier: {tier}}}}}\nspec: {{nodeName: node-{}, containers: []}}\nstatus: {{phase: {}, podIPs: [{{ip: 10.9.{}.{}}}]}}\n",
        ip % 3,
        if running { "Running" } else { "Pending" },
        ip / 200,
        ip % 200
    )
}

fn policy(i: u64, r: &mut Rng) -> String {
    let apps = ["a", "b", "c", "d"];
    let a = apps[r.pick(4) as usize];
    let b = apps[r.pick(4) as usize];
    let ns = ["x", "y"][r.pick(2) as usize];
    match r.pick(4) {
        0 => format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: {ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: {a}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: {b}}}}}]\n    authentication: {{mode: required}}\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"
        ),
        1 => format!(
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: p{i}}}\nspec:\n  endpointSelector: {{matchExpressions: [{{key: tier, operator: In, values: [front, back]}}]}}\n  egress:\n  - toEndpoints: [{{matchExpressions: [{{key: app, operator: NotIn, values: [{a}]}}]}}]\n    authentication: {{mode: required}}\n"
        ),
        2 => format!(
            "apiVersion: meshauth.io/v1alpha1\nkind: ClusterMeshAuthPolicy\nmetadata: {{name: p{i}}}\nspec:\n  endpointSelector: {{matchLabels: {{io.cilium.k8s.namespace.labels.team: {b}}}}}\n  ingress:\n  - fromEndpoints: [{{}}]\n    authentication: {{mode: required}}\n"
        ),
        _ => format!(
            "apiVersion: meshauth.io/v1alpha1\nkind: MeshAuthPolicy\nmetadata: {{name: p{i}, namespace: {ns}}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toEndpoints: [{{matchLabels: {{tier: back}}}}, {{matchLabels: {{app: {b}, io.kubernetes.pod.namespace: y}}}}]\n    authentication: {{mode: required}}\n"
        ),
    }
}

fn objects(yaml: &str) -> Vec<policy_bridge::model::Object> {
    parse_documents(yaml, "gen")
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

#[test]
fn incremental_matches_from_scratch() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut eng = Engine::new(EngineConfig::default(), Default::default());
    let mut mirror = DesiredState::default();
    let mut current: std::collections::BTreeMap<String, String> = Default::default();
    let nodes = "apiVersion: v1\nkind: Node\nmetadata: {name: node-0}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.1}]}\n";
    current.insert("node".into(), nodes.into());
    for step in 0..400u64 {
        let yaml = match rng.pick(10) {
            0..=4 => {
                let n = rng.pick(30);
                let ns = ["x", "y"][(n % 2) as usize];
                let y = pod(
                    ns,
                    &format!("pod{n}"),
                    ["a", "b", "c", "d"][rng.pick(4) as usize],
                    ["front", "back", "db"][rng.pick(3) as usize],
                    n,
                    rng.pick(5) != 0,
                );
                Some((format!("pod{n}"), y))
            }
            5 => {
                let ns = ["x", "y"][rng.pick(2) as usize];
                let team = ["a", "b", "c"][rng.pick(3) as usize];
                Some((
                    format!("ns-{ns}"),
                    format!(
                        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{team: {team}}}}}\n"
                    ),
                ))
            }
            6..=7 => {
                let i = rng.pick(12);
                Some((format!("policy{i}"), policy(i, &mut rng)))
            }
            _ => {
                let keys: Vec<String> = current.keys().cloned().collect();
                let k = keys[rng.pick(keys.len() as u64) as usize].clone();
                let text = current.remove(&k).unwrap();
                for o in objects(&text) {
                    eng.apply(Change::Delete(o.key())).unwrap();
                }
                None
            }
        };
        if let Some((k, y)) = yaml {
            // Same key, maybe another object name (policies): delete the old one first.
            if let Some(old) = current.insert(k, y.clone()) {
                for o in objects(&old) {
                    if objects(&y).iter().all(|n| n.key() != o.key()) {
                        eng.apply(Change::Delete(o.key())).unwrap();
                    }
                }
            }
            for o in objects(&y) {
                eng.apply(Change::Upsert(o)).unwrap();
            }
        }
        let d = eng.commit();
        apply_diff(&mut mirror, &d);
        assert_eq!(
            &mirror,
            eng.state(),
            "step {step}: the diff reproduces the state"
        );
        let texts: Vec<&str> = current.values().map(String::as_str).collect();
        let fresh = common::engine_with(&texts);
        assert_eq!(
            semantic(fresh.state()),
            semantic(eng.state()),
            "step {step}"
        );
        assert_eq!(
            fresh.state().endpoints.len(),
            eng.state().endpoints.len(),
            "step {step}"
        );
        assert_eq!(
            fresh.state().identities.len(),
            eng.state().identities.len(),
            "step {step}"
        );
    }
    assert!(
        !eng.state().rules.is_empty(),
        "the sequence exercised rules"
    );
}
