//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use policy_bridge::model::parse_documents;
use policy_bridge::{Change, DesiredState, Engine, EngineConfig, PolicyStatus};

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(rel: &str) -> String {
    let p = manifest_dir().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// An engine fed with these YAML texts (in order); panics on any bad document.
pub fn engine_with(texts: &[&str]) -> Engine {
    let mut e = Engine::new(EngineConfig::default(), Default::default());
    for (i, t) in texts.iter().enumerate() {
        for r in parse_documents(t, &format!("text {i}")) {
            let o = r.unwrap_or_else(|e| panic!("fixture {i}: {}", e.error));
            e.apply(Change::Upsert(o)).expect("apply");
        }
    }
    e.commit();
    e
}

/// The identity of the pods in `ns` with label app=`app` (exactly one).
pub fn id_of(s: &DesiredState, ns: &str, app: &str) -> u32 {
    let want_ns = format!("k8s:io.kubernetes.pod.namespace={ns}");
    let want_app = format!("k8s:app={app}");
    let ids: Vec<u32> = s
        .identities
        .values()
        .filter(|i| i.labels.contains(&want_ns) && i.labels.contains(&want_app))
        .map(|i| i.id)
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "identities for {ns}/app={app}: {ids:?} in {:#?}",
        s.identities
    );
    ids[0]
}

pub fn status_of<'a>(st: &'a [PolicyStatus], name: &str) -> &'a PolicyStatus {
    st.iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for {name}: {st:#?}"))
}
