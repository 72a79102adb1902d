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
            "production/require-mutual-auth: accepted (1 rule(s) requiring authentication enforced)"
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
