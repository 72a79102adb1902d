//! The container image (`scripts/build-image`): an OCI layout that umoci
//! unpacks (checking every digest), reproducible, and whose binaries run
//! under runc on nothing but the image's own files — the agent as the
//! DaemonSet runs it (its entrypoint, the chart's rendered config, a
//! read-only root), `meshauth` found on PATH as the bundled SPIRE's
//! reconciler container names it, as uid 10001. Fails, never skips, without
//! umoci, runc or helm.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?}: {e} (scripts/install-test-deps installs umoci and runc)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {}\n{text}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The two binaries as the test build made them: `meshauth` is this
/// package's; `meshauth-agent` is built (up to date: nothing to do) beside it.
fn bins() -> PathBuf {
    let meshauth = PathBuf::from(env!("CARGO_BIN_EXE_meshauth"));
    let dir = meshauth
        .parent()
        .unwrap_or_else(|| panic!("no target dir"))
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).current_dir(workspace()).args([
        "build",
        "-q",
        "-p",
        "auth-agent",
        "--bin",
        "meshauth-agent",
    ]));
    assert!(dir.join("meshauth-agent").is_file(), "{}", dir.display());
    dir
}

fn build(bins: &Path, out: &Path) -> String {
    let text = run(Command::new("bash")
        .arg(workspace().join("scripts/build-image"))
        .arg("--bins")
        .arg(bins)
        .arg("--out")
        .arg(out)
        .args(["--tag", "test"]));
    std::fs::read_to_string(out.join("index.json"))
        .unwrap_or_else(|e| panic!("{e}; build-image said {text}"))
}

/// The agent's config.yaml from the chart's rendered ConfigMap.
fn chart_config() -> String {
    let helm = meshauth_lab::kube_real::k8s_tools_bin()
        .unwrap_or_else(|e| panic!("{e}"))
        .join("helm");
    let text = run(Command::new(helm)
        .args(["template", "rel", "--namespace", "meshauth-system"])
        .arg(workspace().join("deploy/helm/meshauth")));
    text.split("\n---")
        .filter_map(|d| serde_norway::from_str::<serde_json::Value>(d).ok())
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "rel-meshauth-agent")
        .and_then(|d| d["data"]["config.yaml"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no agent ConfigMap rendered"))
}

/// Runs `args` in the unpacked image with runc (root read-only, `mounts`
/// bound read-only, as `uid`); its stdout.
fn run_in_image(
    bundle: &Path,
    id: &str,
    args: &[&str],
    env: &[&str],
    mounts: &[(&Path, &str)],
    uid: u32,
) -> String {
    let path = bundle.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    c["process"]["args"] = serde_json::json!(args);
    c["process"]["terminal"] = false.into();
    c["process"]["user"] = serde_json::json!({"uid": uid, "gid": uid});
    if let Some(e) = c["process"]["env"].as_array_mut() {
        e.extend(env.iter().map(|v| serde_json::Value::from(*v)));
    }
    c["root"]["readonly"] = true.into();
    if let Some(m) = c["mounts"].as_array_mut() {
        for (src, dst) in mounts {
            m.push(serde_json::json!({
                "destination": dst, "type": "bind",
                "source": src, "options": ["rbind", "ro"]}));
        }
    }
    std::fs::write(&path, c.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let _ = Command::new("runc").args(["delete", "-f", id]).output();
    let out = Command::new("runc")
        .args(["run", "-b"])
        .arg(bundle)
        .arg(id)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("runc: {e} (scripts/install-test-deps installs it)"));
    let _ = Command::new("runc").args(["delete", "-f", id]).output();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} in the image: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_image_runs_the_agent_and_the_reconciler_on_its_own_files() {
    assert!(
        meshauth_lab::testbed::is_root(),
        "this test needs root (runc)"
    );
    let bins = bins();
    let dir = tempfile::Builder::new()
        .prefix("meshauth-image-")
        .tempdir()
        .unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let index = build(&bins, &a);
    assert_eq!(
        index,
        build(&bins, &b),
        "the same inputs give the same image"
    );
    let index: serde_json::Value = serde_json::from_str(&index).unwrap_or_else(|e| panic!("{e}"));
    let manifest = &index["manifests"][0];
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.ref.name"],
        "test"
    );
    println!("image {}", manifest["digest"]);

    // umoci checks every blob's digest and size while unpacking.
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:test", a.display()))
        .arg(&bundle));
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bundle.join("config.json")).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        base["process"]["args"],
        serde_json::json!(["/usr/local/bin/meshauth-agent"]),
        "the DaemonSet gives no command: the entrypoint is the agent"
    );
    let pristine =
        std::fs::read_to_string(bundle.join("config.json")).unwrap_or_else(|e| panic!("{e}"));

    // The agent, as the DaemonSet runs it: the chart's config file.
    let cfg = dir.path().join("config");
    std::fs::create_dir_all(&cfg).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(cfg.join("config.yaml"), chart_config()).unwrap_or_else(|e| panic!("{e}"));
    let id = format!("meshauth-image-test-{}", std::process::id());
    let printed = run_in_image(
        &bundle,
        &id,
        &[
            "/usr/local/bin/meshauth-agent",
            "--config=/etc/meshauth/config.yaml",
            "--check-config",
        ],
        &["NODE_NAME=node-a"],
        &[(&cfg, "/etc/meshauth")],
        0,
    );
    let effective: serde_json::Value =
        serde_json::from_str(&printed).unwrap_or_else(|e| panic!("{e}: {printed}"));
    assert_eq!(effective["node_name"], "node-a");
    assert_eq!(effective["bpf_pin_dir"], "/sys/fs/bpf/meshauth");
    assert_eq!(
        effective["policy_status_lease"],
        serde_json::json!(["meshauth-system", "rel-meshauth-policy-status"])
    );

    // The reconciler container: command `meshauth`, found on the image's
    // PATH, as the server pod's uid.
    std::fs::write(bundle.join("config.json"), &pristine).unwrap_or_else(|e| panic!("{e}"));
    let help = run_in_image(
        &bundle,
        &id,
        &["meshauth", "spire", "reconcile", "--help"],
        &[],
        &[],
        10001,
    );
    assert!(help.contains("--kubernetes"), "{help}");
}
