//! `meshauth policy status --dir`: the example policies with a cluster
//! fixture, as text and JSON, and the exit code scripts rely on.

use std::path::Path;
use std::process::Command;

fn run(dir: &Path, json: bool) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshauth"));
    cmd.args(["policy", "status", "--dir"]).arg(dir);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().expect("running meshauth");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn dir_with(examples: &[&str]) -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        root.join("policy-bridge/tests/fixtures/cluster.yaml"),
        dir.path().join("cluster.yaml"),
    )
    .expect("cluster fixture");
    for e in examples {
        std::fs::copy(root.join("deploy/examples").join(e), dir.path().join(e)).expect("example");
    }
    dir
}

#[test]
fn accepted_policies_exit_zero() {
    let dir = dir_with(&["payment-requires-auth.yaml", "l7-not-enforced.yaml"]);
    let (code, out) = run(dir.path(), false);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "production/require-mutual-auth: accepted (1 compiled rule requiring authentication, enforced for 3 running pod(s) in 1 identity pair(s), 1 datapath rule(s))"
        ),
        "{out}"
    );
    assert!(
        out.contains("production/api-l7: partially enforced"),
        "{out}"
    );
    assert!(
        out.contains("not enforced:"),
        "the HTTP rule is named: {out}"
    );
}

#[test]
fn a_rejected_policy_is_named_and_exits_one() {
    let dir = dir_with(&["payment-requires-auth.yaml", "reserved-peer-rejected.yaml"]);
    let (code, out) = run(dir.path(), false);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("production/world-with-auth: rejected"),
        "{out}"
    );
    assert!(
        out.contains("fromEntities"),
        "the rule is named by its path: {out}"
    );

    let (code, json) = run(dir.path(), true);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let rejected: Vec<&str> = v["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .filter(|p| p["verdict"] == "rejected")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(rejected, vec!["world-with-auth"]);
    assert_eq!(v["load_errors"].as_array().map(Vec::len), Some(0));
}

#[test]
fn an_unreadable_document_is_a_load_error() {
    let dir = dir_with(&["payment-requires-auth.yaml"]);
    std::fs::write(
        dir.path().join("broken.yaml"),
        "kind: CiliumNetworkPolicy\nspec: [\n",
    )
    .unwrap();
    let (code, out) = run(dir.path(), false);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("load error:") && out.contains("broken.yaml"),
        "{out}"
    );
    assert!(
        out.contains("require-mutual-auth: accepted"),
        "the good file still counts: {out}"
    );
}

fn policy(name: &str, subject: &str, peer: &str, mode: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: production\nspec:\n  endpointSelector:\n    matchLabels:\n      app: {subject}\n  ingress:\n    - fromEndpoints:\n        - matchLabels:\n            app: {peer}\n      authentication:\n        mode: {mode}\n      toPorts:\n        - ports:\n            - port: \"8080\"\n              protocol: TCP\n"
    )
}

#[test]
fn a_policy_that_selects_no_pod_says_nothing_is_enforced() {
    let dir = dir_with(&["payment-requires-auth.yaml"]);
    std::fs::write(
        dir.path().join("ghost.yaml"),
        policy("ghost", "no-such-app", "order-service", "required"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("no-peer.yaml"),
        policy("no-peer", "payment-service", "no-such-peer", "required"),
    )
    .unwrap();
    let (code, out) = run(dir.path(), false);
    assert_eq!(code, 0, "valid policies: {out}");
    for name in ["ghost", "no-peer"] {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("production/{name}:")))
            .unwrap_or_else(|| panic!("{name} listed: {out}"));
        assert!(
            line.contains("selects no pod: nothing enforced") && !line.contains("enforced for"),
            "{line}"
        );
    }
    let (_, json) = run(dir.path(), true);
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let ghost = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "ghost")
        .expect("ghost");
    assert_eq!(ghost["coverage"]["compiled_rules"], 1, "{ghost}");
    assert_eq!(ghost["coverage"]["pairs"], 0, "{ghost}");
    assert_eq!(ghost["coverage"]["pods"], 0, "{ghost}");
}

#[test]
fn a_standalone_pod_without_a_phase_is_rejected_naming_the_file_and_field() {
    let dir = dir_with(&["payment-requires-auth.yaml"]);
    std::fs::write(
        dir.path().join("order-2.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: order-2\n  namespace: production\n  labels:\n    app: order-service\nspec:\n  nodeName: node-b\nstatus:\n  podIP: 10.0.2.99\n",
    )
    .unwrap();
    let (code, out) = run(dir.path(), false);
    assert_eq!(
        code, 1,
        "a pod that would silently never be enforced fails the check: {out}"
    );
    let err = out
        .lines()
        .find(|l| l.starts_with("load error:"))
        .unwrap_or_else(|| panic!("a load error: {out}"));
    assert!(
        err.contains("order-2.yaml")
            && err.contains("production/order-2")
            && err.contains("status.phase"),
        "{err}"
    );
}

#[test]
fn a_parse_error_is_printed_once_and_lists_only_what_meshauth_accepts() {
    let dir = dir_with(&["payment-requires-auth.yaml"]);
    std::fs::write(
        dir.path().join("typo.yaml"),
        policy("typo", "payment-service", "order-service", "requried"),
    )
    .unwrap();
    let (code, out) = run(dir.path(), false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("production/typo: rejected"), "{out}");
    assert_eq!(
        out.matches("requried").count(),
        1,
        "the parse error once, not again as a load error: {out}"
    );
    assert!(
        out.contains("`required` or `disabled`") && !out.contains("test-always-fail"),
        "only the modes meshauth accepts: {out}"
    );
}
