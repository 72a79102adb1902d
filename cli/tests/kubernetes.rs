//! The chart and the agent against a real kube-apiserver (and etcd), built
//! from the Go module proxy by scripts/build-k8s-tools: every object the
//! chart renders is accepted (server-side dry-run), its CRDs are installed
//! for real and refuse invalid objects, and the agents' ServiceAccount may
//! do what the chart's RBAC says and nothing else. Fails, never skips,
//! without the tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use meshauth_lab::kube_real::{KubeApiServer, k8s_tools_bin};

const NS: &str = "meshauth-system";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/meshauth")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("meshauth-kube-")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"))
}

async fn start() -> (KubeApiServer, tempfile::TempDir) {
    let bin = k8s_tools_bin().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempdir();
    let api = KubeApiServer::start(&bin, &dir.path().join("k8s"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{} ready in {:?}",
        api.version().unwrap_or_default(),
        api.started_in
    );
    (api, dir)
}

/// `helm template` of the chart with `sets`, as YAML documents.
fn helm_template(sets: &[&str], include_crds: bool) -> Vec<serde_json::Value> {
    let bin = k8s_tools_bin().unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin.join("helm"));
    cmd.args(["template", "rel", "--namespace", NS]).arg(chart());
    if include_crds {
        cmd.arg("--include-crds");
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("helm: {e}"));
    assert!(
        out.status.success(),
        "helm template {sets:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split("\n---")
        .filter_map(|d| {
            let v: serde_json::Value =
                serde_norway::from_str(d).unwrap_or_else(|e| panic!("{e}:\n{d}"));
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// The API resource of `doc`'s kind, from discovery.
fn resource_of(discovery: &Discovery, doc: &serde_json::Value) -> (ApiResource, ApiCapabilities) {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    discovery
        .groups()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.versioned_resources(version))
        .find(|(r, _)| r.kind == kind)
        .unwrap_or_else(|| panic!("the API server does not serve {api_version} {kind}"))
}

/// Server-side apply of `doc` (dry-run: nothing stored). The API server's
/// answer on refusal.
async fn apply(
    client: &kube::Client,
    discovery: &Discovery,
    doc: &serde_json::Value,
    dry_run: bool,
) -> Result<(), String> {
    let (ar, caps) = resource_of(discovery, doc);
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            doc["metadata"]["namespace"].as_str().unwrap_or(NS),
            &ar,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    let mut pp = PatchParams::apply("meshauth-test").force();
    pp.dry_run = dry_run;
    api.patch(name, &pp, &Patch::Apply(doc))
        .await
        .map(drop)
        .map_err(|e| format!("{} {name}: {e}", doc["kind"]))
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    api.create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

/// The chart's CRDs installed for real, then every object of every value
/// set accepted by the API server (server-side dry-run: schema, defaults,
/// admission, RBAC objects and the admission policy's CEL compiled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rendered_object_is_accepted_by_a_real_api_server() {
    let (api, _dir) = start().await;
    let client = api.admin_client().await.unwrap_or_else(|e| panic!("{e}"));
    create_namespace(&client, NS).await;
    // The CRDs (and the monitoring CRDs the optional objects need).
    let crds: Vec<serde_json::Value> = helm_template(&[], true)
        .into_iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .chain(monitoring_crds())
        .collect();
    assert!(crds.len() >= 3, "the chart's CRDs: {}", crds.len());
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for crd in &crds {
        apply(&client, &discovery, crd, false)
            .await
            .unwrap_or_else(|e| panic!("installing a CRD: {e}"));
    }
    wait_established(&client, &crds).await;
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sets: [&[&str]; 5] = [
        &[],
        &["spire.mode=bundled"],
        &[
            "spire.mode=bundled",
            "spire.bundled.server.replicas=3",
            "spire.bundled.server.datastore=postgres",
            "spire.bundled.server.postgres.secretName=spire-db",
        ],
        &["spire.mode=bundled", "spire.svidMode=delegated-pods"],
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
            "metrics.dashboard.enabled=true",
        ],
    ];
    let mut checked = 0;
    for sets in sets {
        for doc in helm_template(sets, false) {
            apply(&client, &discovery, &doc, true)
                .await
                .unwrap_or_else(|e| panic!("{sets:?}: the API server refused {e}"));
            checked += 1;
        }
    }
    println!("{checked} rendered objects accepted (dry-run)");
    assert!(checked > 40, "{checked}");
}

/// The PrometheusRule and ServiceMonitor CRDs, from the prometheus-operator
/// module scripts/build-k8s-tools fetched (`crds/` beside the tools).
fn monitoring_crds() -> Vec<serde_json::Value> {
    let dir = k8s_tools_bin()
        .unwrap_or_else(|e| panic!("{e}"))
        .join("../crds");
    let mut out = Vec::new();
    for f in ["monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml"] {
        let p = dir.join(f);
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/build-k8s-tools copies it)", p.display()));
        out.push(serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}")));
    }
    out
}

async fn wait_established(client: &kube::Client, crds: &[serde_json::Value]) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        let cond = kube::runtime::wait::conditions::is_crd_established();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            kube::runtime::wait::await_condition(api.clone(), name, cond),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not established in 30 s"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
