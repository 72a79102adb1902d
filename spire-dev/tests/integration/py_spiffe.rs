//! py-spiffe, an independent Workload API client, reads what spire-dev issues.
//! Needs MESHAUTH_TEST_PYTHON (set by scripts/test); fails, never skips.

use std::path::PathBuf;

use serde_json::Value;

use crate::support::*;

fn python() -> PathBuf {
    match std::env::var_os("MESHAUTH_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "MESHAUTH_TEST_PYTHON is not set: run scripts/install-test-deps and set it to \
             target/test-venv/bin/python (scripts/test does both)"
        ),
    }
}

#[tokio::test]
async fn py_spiffe_fetches_the_issued_svids_and_bundle() {
    let d = start(
        &["a", "b"],
        vec![
            entry("a", "/identity/256"),
            entry("a", "/identity/257"),
            entry("b", "/identity/999"),
        ],
    )
    .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py_spiffe_fetch.py");
    let py = python();
    let out = tokio::process::Command::new(&py)
        .arg(&script)
        .arg(d.workload_socket("a"))
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), out)
        .await
        .expect("py-spiffe script timed out")
        .unwrap_or_else(|e| panic!("running {} {}: {e}", py.display(), script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "py-spiffe script failed ({}): {stderr}",
        out.status
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "script output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    let issued = d.dev.agent("a").expect("agent").identities();
    let got: Vec<(String, String, i64)> = v["svids"]
        .as_array()
        .expect("svids array")
        .iter()
        .map(|s| {
            assert_eq!(s["chain_len"], 1);
            assert_eq!(s["key_curve"], "secp256r1", "P-256 key: {s}");
            (
                s["spiffe_id"].as_str().expect("id").to_owned(),
                s["serial"].as_str().expect("serial").to_owned(),
                s["not_after"].as_i64().expect("not_after"),
            )
        })
        .collect();
    let want: Vec<(String, String, i64)> = issued
        .iter()
        .map(|i| (i.spiffe_id.clone(), i.serial.clone(), i.not_after))
        .collect();
    assert_eq!(
        got, want,
        "py-spiffe sees exactly what spire-dev issued for node a"
    );

    let ca_serials: Vec<String> = d
        .dev
        .server()
        .bundle()
        .iter()
        .map(|c| serial_hex(c))
        .collect();
    assert_eq!(
        v["bundles"],
        serde_json::json!({ "meshauth.local": ca_serials }),
        "bundle as py-spiffe reads it"
    );
}
