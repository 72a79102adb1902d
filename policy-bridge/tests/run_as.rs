//! The uids a pod's containers run as (`securityContext.runAsUser`), kept
//! in the desired state for the registration reconciler: the container's
//! over the pod's, containers that say nothing left out, gone with the pod.

use std::collections::BTreeSet;

use policy_bridge::model::parse_documents;
use policy_bridge::{Change, Engine, EngineConfig};

fn apply(eng: &mut Engine, yaml: &str) {
    for o in parse_documents(yaml, "test") {
        eng.apply(Change::Upsert(o.unwrap())).unwrap();
    }
    eng.commit();
}

fn pod(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ns, uid: u-{name}, labels: {{app: {name}}}}}\nspec:\n  nodeName: n1\n{spec}status: {{phase: Running, podIPs: [{{ip: 10.1.0.{}}}]}}\n",
        name.len()
    )
}

#[test]
fn run_as_users_come_from_the_spec_container_over_pod() {
    let mut eng = Engine::new(EngineConfig::default(), Default::default());
    apply(
        &mut eng,
        &[
            pod("a", "  securityContext: {runAsUser: 1000}\n"),
            pod(
                "bb",
                "  securityContext: {runAsUser: 1000}\n  containers:\n  - {name: x, image: i, securityContext: {runAsUser: 2000}}\n  - {name: y, image: i}\n",
            ),
            pod("ccc", "  containers:\n  - {name: x, image: i}\n"),
            pod("dddd", "  securityContext: {runAsUser: -5}\n"),
        ]
        .join("---\n"),
    );
    let s = eng.state();
    assert_eq!(s.pod_run_as["ns/a"], BTreeSet::from([1000]));
    assert_eq!(
        s.pod_run_as["ns/bb"],
        BTreeSet::from([1000, 2000]),
        "x its own, y the pod's"
    );
    assert!(
        !s.pod_run_as.contains_key("ns/ccc"),
        "the image's user: unknown"
    );
    assert!(!s.pod_run_as.contains_key("ns/dddd"), "not a uid");
    eng.apply(Change::Delete(
        parse_documents(&pod("a", ""), "test")
            .remove(0)
            .unwrap()
            .key(),
    ))
    .unwrap();
    eng.commit();
    assert!(
        !eng.state().pod_run_as.contains_key("ns/a"),
        "gone with the pod"
    );
}
