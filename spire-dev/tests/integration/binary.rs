//! The `spire-dev` binary: `serve` in a child process, driven by `ctl`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_spire-dev");

/// Runs `spire-dev ctl --control <ctl> -o json <args>`; returns (success, stdout JSON or text, stderr).
async fn ctl(control: &Path, json: bool, args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("ctl").arg("--control").arg(control);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = within(&format!("spire-dev ctl {args:?}"), cmd.args(args).output())
        .await
        .unwrap_or_else(|e| panic!("running spire-dev ctl {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn ctl_json(control: &Path, args: &[&str]) -> Value {
    let (ok, out, err) = ctl(control, true, args).await;
    assert!(ok, "spire-dev ctl {args:?} failed: {err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("ctl {args:?} output not JSON ({e}): {out}"))
}

fn serials_of(list: &Value, node: &str) -> Vec<String> {
    list["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("node {node} in {list}"))["identities"]
        .as_array()
        .expect("identities")
        .iter()
        .map(|i| i["serial"].as_str().expect("serial").to_owned())
        .collect()
}

#[tokio::test]
async fn serve_and_ctl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--dir"])
        .arg(dir.path())
        .args([
            "--node",
            "a",
            "--entry",
            "a=/identity/1",
            "--entry",
            "b=spiffe://meshauth.local/identity/2,selector=k8s:ns:x,ttl=30s",
            "--ttl",
            "10m",
        ])
        .env("SPIRE_DEV_LOG", "error")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {BIN}: {e}"));
    let pid = child.id().expect("pid");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut banner = String::new();
    within("spire-dev serve to print its control socket", async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("control socket:") {
                return;
            }
        }
        panic!("spire-dev exited early; stdout: {banner}");
    })
    .await;
    let control = dir.path().join("control.sock");
    let sock_a: PathBuf = dir.path().join("agents/a/agent.sock");
    let sock_b: PathBuf = dir.path().join("agents/b/agent.sock");
    for p in [
        &control,
        &sock_a,
        &sock_b,
        &dir.path().join("agents/a/admin.sock"),
    ] {
        assert!(p.exists(), "{} exists", p.display());
    }

    // The banner lists each node's identities with their serials.
    let list = ctl_json(&control, &["list"]).await;
    let a = serials_of(&list, "a");
    let b = serials_of(&list, "b");
    assert_eq!((a.len(), b.len()), (1, 1), "{list}");
    assert!(
        banner.contains("spiffe://meshauth.local/identity/1") && banner.contains(&a[0]),
        "{banner}"
    );
    assert!(banner.contains(&b[0]), "{banner}");
    assert_eq!(list["entries"][1]["ttl"], "30s");
    assert_eq!(list["entries"][1]["selectors"][0]["type"], "k8s");

    // What the Workload API serves matches the listing.
    let mut c = workload(&sock_a).await;
    let mut s = fetch_svids(&mut c).await;
    let m = next("workload message from the binary", &mut s).await;
    assert_eq!(
        ids_serials(&m),
        vec![(
            "spiffe://meshauth.local/identity/1".to_owned(),
            a[0].clone()
        )]
    );

    // Outage: an entry added now is not issued until recovery.
    let v = ctl_json(&control, &["outage", "on"]).await;
    assert_eq!(
        (v["was"].as_bool(), v["now"].as_bool()),
        (Some(false), Some(true)),
        "{v}"
    );
    let v = ctl_json(
        &control,
        &[
            "entry",
            "add",
            "--node",
            "a",
            "--spiffe-id",
            "/identity/3",
            "--selector",
            "k8s:ns:y",
            "--ttl",
            "20s",
        ],
    )
    .await;
    let new_id = v["entry"]["id"].as_str().expect("entry id").to_owned();
    assert_eq!(
        v["entry"]["spiffe_id"],
        "spiffe://meshauth.local/identity/3"
    );
    let list = ctl_json(&control, &["list"]).await;
    assert_eq!(list["outage"], true);
    assert_eq!(
        serials_of(&list, "a"),
        a,
        "nothing issued during the outage"
    );
    ctl_json(&control, &["outage", "off"]).await;
    let list = ctl_json(&control, &["list"]).await;
    assert_eq!(
        serials_of(&list, "a").len(),
        2,
        "issued on recovery: {list}"
    );
    let m = next("workload message after recovery", &mut s).await;
    assert_eq!(m.svids.len(), 2);

    // CA rotation and prune.
    let v = ctl_json(&control, &["rotate-ca"]).await;
    assert_eq!(
        (v["generation"].as_u64(), v["bundle_cas"].as_u64()),
        (Some(2), Some(2)),
        "{v}"
    );
    let m = next("workload message after rotation", &mut s).await;
    assert_eq!(split_certs(&m.svids[0].bundle).len(), 2);
    let v = ctl_json(&control, &["prune-ca"]).await;
    assert_eq!(
        (v["dropped"].as_u64(), v["bundle_cas"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );

    // SPIRE's two steps: prepared (in the bundle, not signing), activated.
    let before = serials_of(&ctl_json(&control, &["list"]).await, "a");
    let v = ctl_json(&control, &["prepare-ca"]).await;
    assert_eq!(
        (v["generation"].as_u64(), v["bundle_cas"].as_u64()),
        (Some(3), Some(2)),
        "{v}"
    );
    // (The prune's message may come first.)
    let mut m = next("workload message after prepare", &mut s).await;
    if split_certs(&m.svids[0].bundle).len() == 1 {
        m = next("workload message after prepare", &mut s).await;
    }
    assert_eq!(split_certs(&m.svids[0].bundle).len(), 2);
    assert_eq!(
        serials_of(&ctl_json(&control, &["list"]).await, "a"),
        before,
        "prepared: nothing re-issued"
    );
    let v = ctl_json(&control, &["activate-ca"]).await;
    assert_eq!(v["generation"].as_u64(), Some(3), "{v}");
    let after = serials_of(&ctl_json(&control, &["list"]).await, "a");
    assert!(
        after.iter().all(|s| !before.contains(s)),
        "activated: every SVID re-issued ({before:?} → {after:?})"
    );

    // Agent down and up.
    let v = ctl_json(&control, &["agent", "down", "b"]).await;
    assert_eq!(v["up"], false);
    assert!(!sock_b.exists(), "agent b socket removed");
    let (ok, text, _) = ctl(&control, false, &["list"]).await;
    assert!(
        ok && text.contains("node b (down)") && text.contains("node a (up)"),
        "{text}"
    );
    ctl_json(&control, &["agent", "up", "b"]).await;
    assert!(sock_b.exists(), "agent b socket back");

    // Entry removal, and errors reported with a failing exit status.
    let v = ctl_json(&control, &["entry", "remove", &new_id]).await;
    assert_eq!(v["entry"]["id"], new_id.as_str());
    let (ok, _, err) = ctl(&control, true, &["entry", "remove", &new_id]).await;
    assert!(!ok, "removing a removed entry fails");
    assert!(
        err.contains(&new_id) && err.contains("no such entry"),
        "{err}"
    );
    let (ok, _, err) = ctl(&control, true, &["agent", "down", "zz"]).await;
    assert!(!ok && err.contains("unknown node"), "{err}");

    // SIGTERM: sockets removed, clean exit.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = within("spire-dev to exit on SIGTERM", child.wait())
        .await
        .expect("wait");
    assert!(exit.success(), "exit status {exit}");
    for p in [
        &control,
        &sock_a,
        &sock_b,
        &dir.path().join("agents/b/admin.sock"),
    ] {
        assert!(!p.exists(), "{} removed on SIGTERM", p.display());
    }
}

#[tokio::test]
async fn serve_reports_every_bad_entry_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--dir"])
        .arg(dir.path())
        .args(["--entry", "noequals", "--entry", "a=/x,selector=bad"])
        .output();
    let out = within("spire-dev serve with bad flags", out)
        .await
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("noequals") && err.contains("selector=bad"),
        "both reported: {err}"
    );
}
