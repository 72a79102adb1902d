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
    cmd.args(["template", "rel", "--namespace", NS])
        .arg(chart());
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
    for f in [
        "monitoring.coreos.com_servicemonitors.yaml",
        "monitoring.coreos.com_prometheusrules.yaml",
    ] {
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

/// The chart installed for real (default values): a token of the agents'
/// ServiceAccount, bound to an agent pod on node-a as the kubelet would
/// mount it, may read the cluster and allocate identities, and may publish
/// node-a's WireGuard key — and nothing else: not write pods or read
/// secrets (RBAC), not touch another Node or any other field of its own
/// (the chart's ValidatingAdmissionPolicy). Invalid objects of the chart's
/// kinds are refused by their schemas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_token_may_do_what_the_chart_grants_and_nothing_else() {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::{Node, Pod, Secret, ServiceAccount};
    let (api, dir) = start().await;
    let admin = api.admin_client().await.unwrap_or_else(|e| panic!("{e}"));
    create_namespace(&admin, NS).await;
    let docs = helm_template(&[], true);
    let discovery = Discovery::new(admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let crds: Vec<_> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .cloned()
        .collect();
    for crd in &crds {
        apply(&admin, &discovery, crd, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_established(&admin, &crds).await;
    let discovery = Discovery::new(admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for d in docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        apply(&admin, &discovery, d, false)
            .await
            .unwrap_or_else(|e| panic!("installing the chart: {e}"));
    }

    // Two nodes, and the agent's pod on node-a (no kubelet runs it: it is
    // what the token is bound to).
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in ["node-a", "node-b"] {
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n, "labels": {"kubernetes.io/os": "linux"}}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("node {n}: {e}"));
    }
    let sa = "rel-meshauth-agent";
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent-node-a"},
        "spec": {"nodeName": "node-a", "serviceAccountName": sa,
                 "containers": [{"name": "agent", "image": "meshauth-agent"}]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("agent pod: {e}"));
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
    let tr: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "agent-node-a",
                                    "uid": pod.metadata.uid}}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let token = sas
        .create_token_request(sa, &PostParams::default(), &tr)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest: {e}"))
        .status
        .unwrap_or_else(|| panic!("no token"))
        .token;
    let kc = dir.path().join("agent.kubeconfig");
    api.token_kubeconfig(&kc, &token)
        .unwrap_or_else(|e| panic!("{e}"));
    let agent = meshauth_lab::kube_real::client_from(&kc)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Allowed: read the cluster, allocate an identity, publish its own key.
    let agent_pods: Api<Pod> = Api::all(agent.clone());
    agent_pods
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("the agent may list pods: {e}"));
    let ids: Api<DynamicObject> = Api::all_with(
        agent.clone(),
        &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "meshauth.io",
            "v1alpha1",
            "MeshIdentity",
        )),
    );
    let id: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "meshauth.io/v1alpha1", "kind": "MeshIdentity",
        "metadata": {"name": "256"},
        "spec": {"labels": ["k8s:app=payment", "k8s:io.kubernetes.pod.namespace=prod"]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    ids.create(&PostParams::default(), &id)
        .await
        .unwrap_or_else(|e| panic!("the agent may allocate an identity: {e}"));
    let agent_nodes: Api<Node> = Api::all(agent.clone());
    let key_patch = |key: &str| {
        Patch::Merge(serde_json::json!({"metadata": {"annotations": {
            "meshauth.io/wireguard-public-key": key}}}))
    };
    agent_nodes
        .patch("node-a", &PatchParams::default(), &key_patch("a2V5LWE="))
        .await
        .unwrap_or_else(|e| panic!("the agent may publish its own node's key: {e}"));

    // Refused, each with the API server's reason.
    let refused = |what: &str, r: Result<(), kube::Error>, code: u16, says: &str| match r {
        Err(kube::Error::Api(s)) if s.code == code && s.message.contains(says) => {
            println!("refused as it must be: {what}: {}", s.message);
        }
        other => panic!("{what}: want {code} ({says}), got {other:?}"),
    };
    let new_pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "evil"},
        "spec": {"containers": [{"name": "x", "image": "x"}]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    refused(
        "creating a pod",
        Api::<Pod>::namespaced(agent.clone(), NS)
            .create(&PostParams::default(), &new_pod)
            .await
            .map(drop),
        403,
        "cannot create resource \"pods\"",
    );
    refused(
        "reading secrets",
        Api::<Secret>::namespaced(agent.clone(), NS)
            .list(&Default::default())
            .await
            .map(drop),
        403,
        "cannot list resource \"secrets\"",
    );
    refused(
        "publishing a key on another node",
        agent_nodes
            .patch("node-b", &PatchParams::default(), &key_patch("a2V5LWI="))
            .await
            .map(drop),
        403,
        "may change only the Node its pod runs on",
    );
    refused(
        "labelling its own node",
        agent_nodes
            .patch(
                "node-a",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"role": "x"}}})),
            )
            .await
            .map(drop),
        403,
        "may change only the meshauth.io/wireguard-public-key annotation",
    );
    refused(
        "annotating its own node otherwise",
        agent_nodes
            .patch(
                "node-a",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"x": "y"}}})),
            )
            .await
            .map(drop),
        403,
        "may change only the meshauth.io/wireguard-public-key annotation",
    );
    refused(
        "cordoning its own node",
        agent_nodes
            .patch(
                "node-a",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
            )
            .await
            .map(drop),
        403,
        "may change only the meshauth.io/wireguard-public-key annotation",
    );
    refused(
        "deleting a node",
        agent_nodes
            .delete("node-b", &Default::default())
            .await
            .map(drop),
        403,
        "cannot delete resource \"nodes\"",
    );

    // The CRDs' schemas refuse invalid objects, naming the field.
    let admin_ids: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "meshauth.io",
            "v1alpha1",
            "MeshIdentity",
        )),
    );
    let bad: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "meshauth.io/v1alpha1", "kind": "MeshIdentity",
        "metadata": {"name": "257"}, "spec": {"labels": "k8s:app=x", "freedAt": -1}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    refused(
        "a MeshIdentity whose labels are not a list",
        admin_ids
            .create(&PostParams::default(), &bad)
            .await
            .map(drop),
        422,
        "spec.labels",
    );
    let policies: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        NS,
        &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "meshauth.io",
            "v1alpha1",
            "MeshAuthPolicy",
        )),
    );
    let bad: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "meshauth.io/v1alpha1", "kind": "MeshAuthPolicy",
        "metadata": {"name": "bad"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "x"}},
                 "ingress": [{"authentication": {"mode": 7}}]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    refused(
        "a MeshAuthPolicy whose authentication mode is not a string",
        policies
            .create(&PostParams::default(), &bad)
            .await
            .map(drop),
        422,
        "authentication.mode",
    );
}
