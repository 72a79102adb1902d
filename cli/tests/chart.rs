//! The Helm chart (deploy/helm/meshauth) checked with the real tools, built
//! from the Go module proxy by scripts/build-k8s-tools
//! (`MESHAUTH_K8S_TOOLS_BIN`): `helm lint --strict`, `helm template` with
//! the default, existing-SPIRE, bundled, HA and per-pod values, the agent's
//! rendered configuration accepted by the agent itself, the bundled SPIRE's
//! configuration byte for byte what `meshauth spire render` writes, the
//! refusals (sqlite3 with replicas, values outside the schema), `promtool`
//! on the alerts, and checkov on every rendered object. Fails, never skips,
//! without the tools.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tools() -> PathBuf {
    let dir = std::env::var_os("MESHAUTH_K8S_TOOLS_BIN").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "MESHAUTH_K8S_TOOLS_BIN is not set: run the README's test command (scripts/test), which builds helm, promtool, kube-apiserver and etcd with scripts/build-k8s-tools"
        )
    });
    assert!(
        dir.join("helm").is_file(),
        "no helm in MESHAUTH_K8S_TOOLS_BIN={}",
        dir.display()
    );
    dir
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/meshauth")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `helm template` with `--set` pairs: the rendered documents, or the
/// failure's output.
fn template(sets: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    let mut cmd = Command::new(tools().join("helm"));
    cmd.args(["template", "rel", "--namespace", "meshauth-system"])
        .arg(chart());
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = run(&mut cmd);
    if !out.status.success() {
        return Err(text(&out));
    }
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(docs(&yaml))
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    yaml.split("\n---")
        .filter_map(|d| {
            let v: serde_json::Value = serde_norway::from_str(d)
                .unwrap_or_else(|e| panic!("rendered YAML does not parse ({e}):\n{d}"));
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let have: Vec<String> = docs
                .iter()
                .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
                .collect();
            panic!("no {kind} {name} among {have:?}")
        })
}

const HA: &[&str] = &[
    "spire.mode=bundled",
    "spire.bundled.server.replicas=3",
    "spire.bundled.server.datastore=postgres",
    "spire.bundled.server.postgres.secretName=spire-db",
];

/// The value sets every check runs on.
fn value_sets() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("default", vec![]),
        (
            "existing SPIRE",
            vec![
                "spire.mode=existing",
                "spire.socketDir=/run/spire/agent-sockets",
                "trustDomain=prod.example",
            ],
        ),
        ("bundled", vec!["spire.mode=bundled"]),
        ("HA", HA.to_vec()),
        (
            "per pod",
            vec!["spire.mode=bundled", "spire.svidMode=delegated-pods"],
        ),
        (
            "monitoring",
            vec![
                "metrics.serviceMonitor.enabled=true",
                "metrics.prometheusRule.enabled=true",
                "metrics.dashboard.enabled=true",
            ],
        ),
    ]
}

#[test]
fn helm_lint_strict_passes_for_every_value_set() {
    for (what, sets) in value_sets() {
        let mut cmd = Command::new(tools().join("helm"));
        cmd.args(["lint", "--strict"]).arg(chart());
        for s in &sets {
            cmd.args(["--set", s]);
        }
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "helm lint --strict ({what}):\n{}",
            text(&out)
        );
    }
}

/// The agent's configuration file as the chart renders it is accepted by
/// the agent (`--check-config`), and says what the values say.
#[test]
fn the_rendered_agent_config_is_the_agents() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (what, sets, source, socket) in [
        (
            "default",
            vec![],
            "workload_api",
            "/run/spire/sockets/agent.sock",
        ),
        (
            "per pod",
            vec!["spire.svidMode=delegated-pods"],
            "delegated_pods",
            "/run/spire/admin/admin.sock",
        ),
    ] {
        let docs = template(&sets).unwrap_or_else(|e| panic!("{what}: {e}"));
        let cm = find(&docs, "ConfigMap", "rel-meshauth-agent");
        let config = cm["data"]["config.yaml"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no config.yaml in {cm}"));
        let file = dir.path().join(format!("{}.yaml", what.replace(' ', "-")));
        std::fs::write(&file, config).unwrap_or_else(|e| panic!("{e}"));
        let out = run(Command::new(env!("CARGO_BIN_EXE_meshauth"))
            .args(["agent", "--check-config", "--config"])
            .arg(&file)
            .env("NODE_NAME", "node-a"));
        assert!(
            out.status.success(),
            "{what}: the agent refuses the chart's configuration:\n{}\n--- config.yaml ---\n{config}",
            text(&out)
        );
        let effective: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
        let src = &effective["identity_source"];
        assert_eq!(src["kind"], source, "{what}: {src}");
        assert_eq!(src["socket"], socket, "{what}");
        assert_eq!(effective["policy_source"]["kind"], "kubernetes", "{what}");
        assert_eq!(effective["handshake_listen"], "0.0.0.0:4250", "{what}");

        // The DaemonSet runs the agent with that file, unprivileged, with
        // only the capabilities values.yaml states.
        let ds = find(&docs, "DaemonSet", "rel-meshauth-agent");
        let pod = &ds["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["args"][0], "--config=/etc/meshauth/config.yaml");
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(
            sc["capabilities"]["add"],
            serde_json::json!(["BPF", "NET_ADMIN"])
        );
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(
            pod["hostPID"].as_bool().unwrap_or(false),
            what == "per pod",
            "{what}: the host's PIDs only for per-pod SVIDs"
        );
    }
}

/// `meshauth spire render` with the settings the chart's values stand for.
fn render(args: &[&str]) -> BTreeMap<String, String> {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = run(Command::new(env!("CARGO_BIN_EXE_meshauth"))
        .args(["spire", "render", "--deployment", "kubernetes", "--out"])
        .arg(dir.path())
        .args(args));
    assert!(
        out.status.success(),
        "meshauth spire render: {}",
        text(&out)
    );
    ["server.conf", "agent.conf"]
        .iter()
        .map(|f| {
            (
                (*f).to_owned(),
                std::fs::read_to_string(dir.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}")),
            )
        })
        .collect()
}

/// The bundled SPIRE's server.conf and agent.conf are byte for byte what
/// `meshauth spire render` writes for the same settings: one source of
/// truth for SPIRE's configuration.
#[test]
fn bundled_spire_config_is_byte_identical_to_meshauth_spire_render() {
    let common = [
        "--cluster",
        "meshauth",
        "--agent-service-account",
        "meshauth-system:rel-meshauth-spire-agent",
        "--bundle-configmap",
        "meshauth-system/rel-meshauth-spire-bundle",
        "--server-address",
        "rel-meshauth-spire-server.meshauth-system.svc",
        "--trust-domain",
    ];
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        (
            "bundled",
            vec!["spire.mode=bundled"],
            [&common[..], &["meshauth.local"]].concat(),
        ),
        (
            "HA with TTLs",
            [
                HA,
                &[
                    "trustDomain=prod.example",
                    "spire.bundled.server.caTTL=48h",
                    "spire.bundled.server.svidTTL=30m",
                    "spire.bundled.server.agentTTL=2h",
                ],
            ]
            .concat(),
            [
                &common[..],
                &[
                    "prod.example",
                    "--server-replicas",
                    "3",
                    "--datastore",
                    "postgres",
                    "--datastore-file",
                    "/run/spire/datastore/datastore.hcl",
                    "--ca-ttl",
                    "48h",
                    "--svid-ttl",
                    "30m",
                    "--agent-ttl",
                    "2h",
                ],
            ]
            .concat(),
        ),
        (
            "per pod",
            vec!["spire.mode=bundled", "spire.svidMode=delegated-pods"],
            [
                &common[..],
                &[
                    "meshauth.local",
                    "--admin-socket",
                    "/run/spire/admin/admin.sock",
                    "--authorized-delegate",
                    "spiffe://meshauth.local/meshauth/agent",
                ],
            ]
            .concat(),
        ),
    ];
    for (what, sets, args) in cases {
        let docs = template(&sets).unwrap_or_else(|e| panic!("{what}: {e}"));
        let want = render(&args);
        for (cm, file) in [
            ("rel-meshauth-spire-server", "server.conf"),
            ("rel-meshauth-spire-agent", "agent.conf"),
        ] {
            let got = find(&docs, "ConfigMap", cm)["data"][file]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no {file}"))
                .to_owned();
            assert!(
                got == want[file],
                "{what}: the chart's {file} differs from meshauth spire render's:\n--- chart ---\n{got}\n--- render ---\n{}",
                want[file]
            );
        }
    }
}

#[test]
fn settings_that_cannot_work_are_refused_by_name() {
    let e = template(&["spire.mode=bundled", "spire.bundled.server.replicas=2"])
        .expect_err("sqlite3 with 2 replicas");
    assert!(e.contains("sqlite3, which one server alone may use"), "{e}");
    let e = template(&[
        "spire.mode=bundled",
        "spire.bundled.server.datastore=postgres",
    ])
    .expect_err("postgres without a Secret");
    assert!(e.contains("postgres.secretName is empty"), "{e}");
    let e = template(&[
        "spire.svidMode=delegated-pods",
        "spire.adminSocketDir=/run/spire/sockets",
    ])
    .expect_err("admin socket beside the Workload API socket");
    assert!(e.contains("the Workload API socket's directory"), "{e}");
    for (set, field) in [
        ("agent.mode=block", "mode"),
        ("spire.svidMode=delegated", "svidMode"),
        ("agent.metricsPort=70000", "metricsPort"),
        ("agent.identityQuarantine=soon", "identityQuarantine"),
    ] {
        let e = template(&[set]).expect_err(set);
        assert!(
            e.contains("values don't meet the specifications of the schema") && e.contains(field),
            "{set}: {e}"
        );
    }
}

#[test]
fn promtool_checks_the_alerts_and_fires_each_on_synthetic_series() {
    let promtool = tools().join("promtool");
    let rules = chart().join("files/alerts.rules.yaml");
    let out = run(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        text(&out)
    );
    let tests = chart().join("../tests/alerts.test.yaml");
    let out = run(Command::new(&promtool).args(["test", "rules"]).arg(&tests));
    println!("{}", text(&out));
    assert!(out.status.success(), "promtool test rules:\n{}", text(&out));
    // Every alert of the file has a test that fires it.
    let test_text = std::fs::read_to_string(&tests).unwrap_or_else(|e| panic!("{e}"));
    let rules_text = std::fs::read_to_string(&rules).unwrap_or_else(|e| panic!("{e}"));
    for line in rules_text.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                test_text.contains(&format!("alertname: {name}")),
                "alert {name} has no promtool test"
            );
        }
    }
    // The PrometheusRule carries the file unchanged.
    let docs = template(&["metrics.prometheusRule.enabled=true"]).unwrap_or_else(|e| panic!("{e}"));
    let pr = find(&docs, "PrometheusRule", "rel-meshauth");
    let file: serde_json::Value =
        serde_norway::from_str(&rules_text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pr["spec"], file);
}

/// checkov (PyPI) over every object the chart renders, for every value
/// set: no failed check that the chart does not justify in place.
#[test]
fn checkov_finds_nothing_unjustified() {
    let python = std::env::var("MESHAUTH_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("MESHAUTH_TEST_PYTHON is not set: run the README's test command (scripts/test)")
    });
    let checkov = Path::new(&python).with_file_name("checkov");
    assert!(
        checkov.is_file(),
        "no checkov beside {python}: scripts/install-test-deps installs it"
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (what, sets) in value_sets() {
        let mut cmd = Command::new(tools().join("helm"));
        cmd.args(["template", "rel", "--namespace", "meshauth-system"])
            .arg(chart());
        for s in &sets {
            cmd.args(["--set", s]);
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "{what}: {}", text(&out));
        let file = dir.path().join(format!("{}.yaml", what.replace(' ', "-")));
        std::fs::write(&file, &out.stdout).unwrap_or_else(|e| panic!("{e}"));
        let out = run(Command::new(&checkov)
            .args([
                "--quiet",
                "--compact",
                "--framework",
                "kubernetes",
                "-o",
                "json",
                "-f",
            ])
            .arg(&file));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{what}: checkov's output is not JSON ({e}): {}", text(&out))
        });
        let failed: Vec<String> = report["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{} {} ({})", c["check_id"], c["check_name"], c["resource"]))
            .collect();
        let summary = &report["summary"];
        println!("checkov ({what}): {summary}");
        assert!(
            failed.is_empty(),
            "checkov ({what}) found {} unjustified problem(s):\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
        assert!(
            summary["passed"].as_u64().unwrap_or(0) > 0,
            "{what}: checkov checked nothing: {summary}"
        );
    }
}
