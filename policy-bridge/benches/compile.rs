//! 1,000 policies × 10,000 pods: full compile from scratch and one pod's
//! label change applied incrementally, beside a baseline of only parsing the
//! same YAML (serde). Prints a Markdown table.
//!
//! `cargo bench -p policy-bridge --bench compile`

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy_bridge::model::{Object, parse_documents};
use policy_bridge::{Change, Engine, EngineConfig};

const NAMESPACES: usize = 10;
const APPS: usize = 1_000;
const PODS_PER_APP: usize = 10;
const POLICIES: usize = 1_000;
const RUNS: usize = 5;

fn pod(app: usize, replica: usize, version: &str) -> String {
    let ns = app % NAMESPACES;
    let n = app * PODS_PER_APP + replica;
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app{app}-{replica}\n  namespace: ns{ns}\n  labels:\n    app: app{app}\n    version: {version}\n    pod-template-hash: h{replica}\nspec:\n  nodeName: node{}\n  serviceAccountName: sa{app}\n  containers: [{{name: c, image: i}}]\nstatus:\n  phase: Running\n  podIPs:\n  - ip: 10.{}.{}.{}\n",
        n % 50,
        n / 65536,
        (n / 256) % 256,
        n % 256
    )
}

fn policy(i: usize) -> String {
    let ns = i % NAMESPACES;
    // Peers in the same namespace: app numbers ≡ ns (mod NAMESPACES).
    let peer = (i + NAMESPACES) % APPS;
    match i % 10 {
        9 => format!(
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: ccnp{i}\nspec:\n  endpointSelector:\n    matchExpressions:\n    - {{key: app, operator: In, values: [app{i}, app{peer}]}}\n  egress:\n  - toEndpoints:\n    - matchExpressions:\n      - {{key: io.cilium.k8s.policy.serviceaccount, operator: In, values: [sa{}]}}\n    authentication: {{mode: required}}\n",
            (i + 1) % APPS
        ),
        _ => format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p{i}\n  namespace: ns{ns}\nspec:\n  endpointSelector:\n    matchLabels: {{app: app{i}}}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {{app: app{peer}}}\n    authentication: {{mode: required}}\n    toPorts:\n    - ports:\n      - {{port: \"8080\", protocol: TCP}}\n      rules:\n        http: [{{method: GET}}]\n"
        ),
    }
}

fn corpus() -> String {
    let mut s = String::new();
    for ns in 0..NAMESPACES {
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns{ns}\n  labels: {{team: t{ns}}}\n"
        );
    }
    for n in 0..50 {
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node{n}\nstatus:\n  addresses: [{{type: InternalIP, address: 192.168.{}.{}}}]\n",
            n / 256,
            n % 256
        );
    }
    for app in 0..APPS {
        for r in 0..PODS_PER_APP {
            s.push_str("---\n");
            s.push_str(&pod(app, r, "v1"));
        }
    }
    for i in 0..POLICIES {
        s.push_str("---\n");
        s.push_str(&policy(i));
    }
    s
}

fn parse(text: &str) -> Vec<Object> {
    parse_documents(text, "bench")
        .into_iter()
        .map(|r| r.expect("bench input parses"))
        .collect()
}

fn compile(objects: Vec<Object>) -> Engine {
    let mut e = Engine::new(EngineConfig::default(), Default::default());
    for o in objects {
        e.apply(Change::Upsert(o)).expect("apply");
    }
    e.commit();
    e
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let text = corpus();
    let mut parse_only = Vec::new();
    let mut compile_only = Vec::new();
    let mut full = Vec::new();
    let mut incr = Vec::new();
    let mut incr_snap = Vec::new();
    let mut sizes = (0, 0, 0);
    for run in 0..RUNS {
        let t = Instant::now();
        let objects = parse(&text);
        parse_only.push(t.elapsed());

        let t = Instant::now();
        let mut engine = compile(objects);
        compile_only.push(t.elapsed());

        let t = Instant::now();
        let e2 = compile(parse(&text));
        full.push(t.elapsed());
        drop(e2);

        let s = engine.state();
        sizes = (s.identities.len(), s.endpoints.len(), s.rules.len());
        // One pod's label change: app{k}-0 gets version v2 → a new identity
        // that every selector on app{k} must pick up.
        let k = 17 + run;
        let changed = parse(&pod(k, 0, "v2")).remove(0);
        let t = Instant::now();
        engine.apply(Change::Upsert(changed)).expect("apply");
        let diff = engine.commit();
        incr.push(t.elapsed());
        assert!(
            !diff.rules_added.is_empty() && !diff.identities_upserted.is_empty(),
            "{diff:?}"
        );
        let back = parse(&pod(k, 0, "v1")).remove(0);
        engine.apply(Change::Upsert(back)).expect("apply");
        engine.commit();
        let changed = parse(&pod(k, 1, "v3")).remove(0);
        let t = Instant::now();
        engine.apply(Change::Upsert(changed)).expect("apply");
        let diff = engine.commit();
        let snap = Arc::new(engine.state().clone());
        incr_snap.push(t.elapsed());
        assert!(!diff.is_empty() && !snap.rules.is_empty());
    }
    let (ids, eps, rules) = sizes;
    println!(
        "policy-bridge compile benchmark: {POLICIES} policies, {} pods ({APPS} workloads in {NAMESPACES} namespaces), median of {RUNS} runs, ms",
        APPS * PODS_PER_APP
    );
    println!(
        "state: {ids} identities, {eps} endpoints, {rules} auth rules; input {} KiB of YAML\n",
        text.len() / 1024
    );
    println!(
        "| baseline: parse YAML only (serde) | compile parsed objects | full: parse + compile from scratch | one pod's labels changed: apply + diff | same + publish snapshot (clone state) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.3} | {:.3} |",
        median(parse_only),
        median(compile_only),
        median(full),
        median(incr),
        median(incr_snap)
    );
}
