//! deploy/helm/meshauth/crds/*.yaml (the chart's CRDs) are kube's CustomResourceExt::crd() output for the Rust
//! types. Regenerate with `UPDATE_CRDS=1 cargo test -p policy-bridge --test crds`.

mod common;

use kube::CustomResourceExt;
use policy_bridge::model::crd::{ClusterMeshAuthPolicy, MeshAuthPolicy, MeshIdentity};

fn check(
    file: &str,
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) {
    let text = format!(
        "# Generated from policy-bridge's Rust types (tests/crds.rs); do not edit.\n{}",
        serde_norway::to_string(&crd).unwrap()
    );
    let path = common::manifest_dir()
        .join("../deploy/helm/meshauth/crds")
        .join(file);
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == text,
        "{} is stale; rerun with UPDATE_CRDS=1",
        path.display()
    );
}

#[test]
fn crd_manifests_match_the_types() {
    check("meshauthpolicies.yaml", MeshAuthPolicy::crd());
    check("clustermeshauthpolicies.yaml", ClusterMeshAuthPolicy::crd());
    check("meshidentities.yaml", MeshIdentity::crd());
    let c = ClusterMeshAuthPolicy::crd();
    assert_eq!(c.spec.scope, "Cluster");
    assert_eq!(MeshAuthPolicy::crd().spec.scope, "Namespaced");
    let schema = serde_json::to_value(&MeshAuthPolicy::crd().spec.versions[0].schema).unwrap();
    let ingress = schema
        .pointer("/openAPIV3Schema/properties/spec/properties/ingress/items/properties")
        .expect("spec.ingress items");
    assert!(ingress.get("authentication").is_some() && ingress.get("fromEndpoints").is_some());
}

#[test]
fn a_meshauth_policy_manifest_parses_as_the_crd_type() {
    let yaml = r#"
apiVersion: meshauth.io/v1alpha1
kind: MeshAuthPolicy
metadata: {name: p, namespace: ns}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: b}}]
    authentication: {mode: required}
"#;
    let typed: MeshAuthPolicy = serde_norway::from_str(yaml).unwrap();
    let ingress = typed.spec.0.ingress.as_ref().unwrap();
    assert_eq!(ingress.len(), 1);
    assert!(ingress[0].authentication.is_some());
}
