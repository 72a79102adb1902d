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
    let _one_at_a_time = API_SERVERS.lock().await;
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
    let _one_at_a_time = API_SERVERS.lock().await;
    use k8s_openapi::api::core::v1::{Node, Pod, Secret};
    let (api, dir) = start().await;
    let admin = api.admin_client().await.unwrap_or_else(|e| panic!("{e}"));
    create_namespace(&admin, NS).await;
    install_chart(&admin, &[]).await;

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
    let token = agent_token(&admin, "node-a", false).await;
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

/// A test cluster: the API server with the chart installed, a lab of
/// `nodes` whose namespaces reach the API server at 127.0.0.1:6443
/// (forwarded), spire-dev with admin sockets, and helpers to make Kubernetes
/// objects as kubelet and the control plane would.
struct Cluster {
    api: KubeApiServer,
    admin: kube::Client,
    lab: meshauth_lab::Lab,
    spire: spire_dev::SpireDev,
    dir: tempfile::TempDir,
    _forwarders: Vec<meshauth_lab::forward::Forwarder>,
    agents: std::collections::BTreeMap<String, std::process::Child>,
    config: PathBuf,
    /// Flags every agent gets after the chart's config file.
    agent_flags: Vec<String>,
    /// The lab's prefix: part of every path the cluster's agents own, so
    /// clusters of tests running at once share nothing.
    prefix: String,
}

const APP_NS: &str = "production";

/// The tests here run one at a time, each with its own API server: run
/// together on two cores (three of them with agents on every node and
/// SPIRE), a `spire reconcile --once` intermittently read the cluster
/// without a Node it had just created (not explained; see the closing notes
/// of 2026-12-01).
static API_SERVERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Cluster {
    async fn start(prefix: &str, nodes: &[&str]) -> Self {
        Self::start_on(prefix, 77, nodes).await
    }

    /// [`Cluster::start`] on lab network `net` (10.<net>.0.0/16), so two
    /// clusters can run at once.
    async fn start_on(prefix: &str, net: u8, nodes: &[&str]) -> Self {
        assert!(
            meshauth_lab::testbed::is_root(),
            "this test needs root (network namespaces, cgroups, BPF)"
        );
        meshauth_lab::testbed::ensure_bpffs().unwrap_or_else(|e| panic!("{e}"));
        let (api, dir) = start().await;
        let admin = api.admin_client().await.unwrap_or_else(|e| panic!("{e}"));
        create_namespace(&admin, NS).await;
        create_namespace(&admin, APP_NS).await;
        install_cilium_crds(&admin).await;
        install_chart(&admin, &["agent.wireguard.enabled=false"]).await;
        meshauth_lab::Lab::cleanup_stale(prefix);
        let mut lab = meshauth_lab::Lab::with_options(
            prefix,
            meshauth_lab::LabOptions {
                net,
                meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let api_addr: std::net::SocketAddr = api
            .url()
            .trim_start_matches("https://")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut forwarders = Vec::new();
        for n in nodes {
            let info = lab.add_node(n).unwrap_or_else(|e| panic!("{e}"));
            forwarders.push(
                meshauth_lab::forward::Forwarder::start(
                    &info.netns,
                    "127.0.0.1:6443".parse().unwrap_or_else(|e| panic!("{e}")),
                    api_addr,
                )
                .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        let mut cfg = spire_dev::DevConfig::new(dir.path().join("spire"));
        cfg.nodes = nodes.iter().map(|n| (*n).to_owned()).collect();
        cfg.control_socket = false;
        let spire = spire_dev::SpireDev::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The agents' configuration: the chart's ConfigMap, as the
        // DaemonSet mounts it.
        let docs = helm_template(&["agent.wireguard.enabled=false"], false);
        let cm = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "rel-meshauth-agent")
            .unwrap_or_else(|| panic!("no agent ConfigMap"));
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            cm["data"]["config.yaml"].as_str().unwrap_or_default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let me = Self {
            api,
            admin,
            lab,
            spire,
            dir,
            _forwarders: forwarders,
            agents: Default::default(),
            config,
            agent_flags: Vec::new(),
            prefix: prefix.to_owned(),
        };
        for n in nodes {
            me.create_node(n).await;
        }
        me
    }

    /// A Node object with the lab node's addresses and pod CIDRs (status
    /// through the status subresource, as kubelet reports it).
    async fn create_node(&self, name: &str) {
        use k8s_openapi::api::core::v1::Node;
        let info = self
            .lab
            .node(name)
            .unwrap_or_else(|| panic!("no lab node {name}"));
        let nodes: Api<Node> = Api::all(self.admin.clone());
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"podCIDR": info.pod_cidr_v4.to_string(),
                     "podCIDRs": [info.pod_cidr_v4.to_string(), info.pod_cidr_v6.to_string()]}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("node {name}: {e}"));
        let status = serde_json::json!({"status": {"addresses": [
            {"type": "InternalIP", "address": info.ipv4.to_string()},
            {"type": "InternalIP", "address": info.ipv6.to_string()}]}});
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("node {name} status: {e}"));
    }

    /// A Pod object of `app` on `node` (its ServiceAccount made if new),
    /// the lab pod named after the uid the API server gave it, and its
    /// addresses set through the status subresource.
    async fn add_pod(&mut self, node: &str, name: &str, app: &str) -> meshauth_lab::PodInfo {
        use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), APP_NS);
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": app}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        match sas.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("service account {app}: {e}"),
        }
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), APP_NS);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "serviceAccountName": app,
                     "containers": [{"name": "app", "image": app}]}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let pod = pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("pod {name}: {e}"));
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let info = self
            .lab
            .add_pod_with_uid(node, name, Some(&uid))
            .unwrap_or_else(|e| panic!("{e}"));
        let status = serde_json::json!({"status": {
            "phase": "Running", "podIP": info.ipv4.to_string(),
            "podIPs": [{"ip": info.ipv4.to_string()}, {"ip": info.ipv6.to_string()}]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("pod {name} status: {e}"));
        info
    }

    /// Starts `node`'s agent: the chart's config file, the lab's paths, and
    /// a token of the chart's ServiceAccount bound to an agent Pod object on
    /// the node, as kubelet would mount it.
    async fn start_agent(&mut self, node: &str) {
        let token = agent_token(&self.admin, node, true).await;
        // The node reaches the API server on its own loopback (forwarded).
        let kc = self.dir.path().join(format!("{node}.kubeconfig"));
        let ca = self.api.ca_file();
        std::fs::write(
            &kc,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
                ca.display()
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let info = self
            .lab
            .node(node)
            .unwrap_or_else(|| panic!("{node}"))
            .clone();
        let adir = self.dir.path().join("agents").join(node);
        std::fs::create_dir_all(&adir).unwrap_or_else(|e| panic!("{e}"));
        let log = std::fs::File::create(adir.join("agent.log")).unwrap_or_else(|e| panic!("{e}"));
        let spire = self
            .spire
            .agent(node)
            .unwrap_or_else(|e| panic!("{e}"))
            .workload_socket()
            .to_owned();
        let pins = self.pin_dir(node);
        let mut cmd = self.lab.command(&info, env!("CARGO_BIN_EXE_meshauth"));
        cmd.arg("agent")
            .arg("--config")
            .arg(&self.config)
            .args(["--node-name", node])
            .arg("--spire-socket")
            .arg(&spire)
            .arg("--bpf-pin-dir")
            .arg(&pins)
            .arg("--pods-cgroup")
            .arg(&info.pods_cgroup)
            .arg("--handshake-listen")
            .arg(format!("{}:4250", info.ipv4))
            .arg("--metrics-listen")
            .arg(format!("{}:9964", info.ipv4))
            .arg("--api-socket")
            .arg(adir.join("agent.sock"))
            .arg("--state-dir")
            .arg(adir.join("state"))
            .args(["--log-format", "plain"])
            .args(&self.agent_flags)
            .env("KUBECONFIG", &kc)
            .env("MESHAUTH_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("agent {node}: {e}"));
        self.agents.insert(node.to_owned(), child);
    }

    fn agent_api(&self, node: &str) -> auth_agent::api::client::ApiClient {
        auth_agent::api::client::ApiClient::new(
            self.dir.path().join("agents").join(node).join("agent.sock"),
        )
    }

    fn log(&self, node: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("agents").join(node).join("agent.log"))
                .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// `node`'s whole agent log.
    fn log_all(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("agents").join(node).join("agent.log"))
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        self.agents
            .keys()
            .map(|n| format!("\n--- agent {n} ---\n{}", self.log(n)))
            .collect()
    }

    /// The MeshIdentity objects: (number, labels).
    async fn identities(&self) -> Vec<(u32, Vec<String>)> {
        let ids: Api<DynamicObject> = Api::all_with(
            self.admin.clone(),
            &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                "meshauth.io",
                "v1alpha1",
                "MeshIdentity",
            )),
        );
        ids.list(&Default::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .items
            .into_iter()
            .map(|o| {
                let n = o
                    .metadata
                    .name
                    .clone()
                    .unwrap_or_default()
                    .parse()
                    .unwrap_or(0);
                let labels = o.data["spec"]["labels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().map(str::to_owned))
                    .collect();
                (n, labels)
            })
            .collect()
    }

    /// Waits until every agent gives `app`'s pods the same identity (one
    /// an agent allocated as a MeshIdentity); that identity.
    async fn identity_of(&self, app: &str) -> u32 {
        use auth_agent::api::types::IdentityEntry;
        let want = format!("k8s:app={app}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let mut seen = std::collections::BTreeSet::new();
            for n in self.agents.keys() {
                let ids: Vec<IdentityEntry> = self
                    .agent_api(n)
                    .get_json("/v1/identities")
                    .await
                    .unwrap_or_default();
                seen.insert(
                    ids.iter()
                        .find(|i| i.labels.contains(&want) && !i.nodes.is_empty())
                        .map(|i| i.id),
                );
            }
            if let [Some(id)] = seen.iter().collect::<Vec<_>>()[..] {
                return *id;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agents do not agree on an identity for {app} in 30 s: {seen:?}{}",
                self.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Waits until `node`'s auth map holds exactly `want` (local, remote,
    /// remote node).
    async fn wait_entries(&self, node: &str, want: &[(u32, u32, &str)]) {
        use auth_agent::api::types::AuthEntry;
        let want: std::collections::BTreeSet<(u32, u32, String)> = want
            .iter()
            .map(|(l, r, n)| (*l, *r, (*n).to_owned()))
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let got: Result<Vec<AuthEntry>, _> = self.agent_api(node).get_json("/v1/auth").await;
            if let Ok(e) = &got {
                let keys: std::collections::BTreeSet<_> = e
                    .iter()
                    .map(|e| (e.local, e.remote, e.node.clone().unwrap_or_default()))
                    .collect();
                if keys == want {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{node} does not hold {want:?} in 30 s; last {got:?}{}",
                self.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Where `node`'s agent pins its maps and links.
    fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from(format!(
            "/sys/fs/bpf/meshauth-k8s-{}-{}-{node}",
            self.prefix,
            std::process::id()
        ))
    }

    /// SIGTERM to `node`'s agent (as kubelet stops a pod), waited for.
    fn stop_agent(&mut self, node: &str) {
        let mut child = self
            .agents
            .remove(node)
            .unwrap_or_else(|| panic!("no agent on {node}"));
        let pid = rustix::process::Pid::from_raw(child.id() as i32)
            .unwrap_or_else(|| panic!("agent pid"));
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .unwrap_or_else(|e| panic!("SIGTERM: {e}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
        loop {
            if let Some(st) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
                println!("agent {node} stopped: {st}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "agent {node} did not stop within 40 s of SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The policy status Lease's holder, once `pred` holds for it.
    async fn wait_lease_holder(&self, pred: impl Fn(Option<&str>) -> bool) -> String {
        use k8s_openapi::api::coordination::v1::Lease;
        let leases: Api<Lease> = Api::namespaced(self.admin.clone(), NS);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
        loop {
            let holder = leases
                .get_opt("rel-meshauth-policy-status")
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
                .filter(|h| !h.is_empty());
            if pred(holder.as_deref())
                && let Some(h) = holder.clone()
            {
                return h;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the policy status Lease: holder {holder:?}{}",
                self.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Waits until the policy `kind`/`name` (in production when namespaced)
    /// satisfies `pred`; the object.
    async fn wait_policy(
        &self,
        kind: &str,
        name: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let (group, version) = if kind.starts_with("Cilium") {
            ("cilium.io", "v2")
        } else {
            ("meshauth.io", "v1alpha1")
        };
        let ar = ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> = if kind.contains("Cluster") {
            Api::all_with(self.admin.clone(), &ar)
        } else {
            Api::namespaced_with(self.admin.clone(), APP_NS, &ar)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
        loop {
            let o = api.get(name).await.unwrap_or_else(|e| panic!("{e}"));
            let v = serde_json::to_value(&o).unwrap_or_default();
            if pred(&v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{kind} {name}: never as expected; last {v:#}{}",
                self.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Waits for Events in `ns` about `name` (by meshauth) satisfying `pred`.
    async fn wait_events(
        &self,
        ns: &str,
        name: &str,
        pred: impl Fn(&[k8s_openapi::api::core::v1::Event]) -> bool,
    ) -> Vec<k8s_openapi::api::core::v1::Event> {
        use k8s_openapi::api::core::v1::Event;
        let events: Api<Event> = Api::namespaced(self.admin.clone(), ns);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
        loop {
            let got: Vec<Event> = events
                .list(
                    &kube::api::ListParams::default()
                        .fields(&format!("involvedObject.name={name}")),
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .items;
            if pred(&got) {
                return got;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "events about {name}: {got:#?}{}",
                self.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    async fn drops(&self, node: &str) -> u64 {
        let s: auth_agent::api::types::AgentStatus = self
            .agent_api(node)
            .get_json("/v1/status")
            .await
            .unwrap_or_else(|e| panic!("{node} status: {e}"));
        s.datapath.auth_required_drops
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.agents) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Every node's, not only the running agents': an agent stopped with
        // SIGTERM leaves its pins for the next one, as it should on a node.
        for info in self.lab.nodes() {
            let pins = self.pin_dir(&info.name);
            let _ = auth_ebpf::Datapath::detach(&pins, &info.pods_cgroup);
            let _ = std::fs::remove_dir_all(&pins);
        }
    }
}

/// Successful writes by the agents' ServiceAccount in `audit` whose
/// objectRef satisfies `pred`, counted by the node in the token.
fn agent_writers(
    audit: &[serde_json::Value],
    pred: impl Fn(&serde_json::Value) -> bool,
) -> std::collections::BTreeMap<String, usize> {
    let mut by_node = std::collections::BTreeMap::new();
    for e in audit {
        let ok = e["responseStatus"]["code"]
            .as_u64()
            .is_some_and(|c| (200..300).contains(&c));
        if e["stage"] == "ResponseComplete"
            && ok
            && e["user"]["username"] == format!("system:serviceaccount:{NS}:rel-meshauth-agent")
            && ["create", "update", "patch"].contains(&e["verb"].as_str().unwrap_or_default())
            && pred(&e["objectRef"])
        {
            let node = e["user"]["extra"]["authentication.kubernetes.io/node-name"][0]
                .as_str()
                .unwrap_or("(no node in the token)")
                .to_owned();
            *by_node.entry(node).or_insert(0) += 1;
        }
    }
    by_node
}

/// A token of the chart's agent ServiceAccount bound to an agent Pod object
/// on `node` (made if missing), as kubelet mounts it: the API server puts
/// the node's name into it.
async fn agent_token(admin: &kube::Client, node: &str, host_network: bool) -> String {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let sa = "rel-meshauth-agent";
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pod_name = format!("agent-{node}");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name},
        "spec": {"nodeName": node, "serviceAccountName": sa, "hostNetwork": host_network,
                 "containers": [{"name": "agent", "image": "meshauth-agent"}]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let pod = match pods.create(&PostParams::default(), &pod).await {
        Ok(p) => p,
        Err(kube::Error::Api(s)) if s.code == 409 => {
            pods.get(&pod_name).await.unwrap_or_else(|e| panic!("{e}"))
        }
        Err(e) => panic!("agent pod: {e}"),
    };
    let tr: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod_name,
                                    "uid": pod.metadata.uid}}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    Api::<ServiceAccount>::namespaced(admin.clone(), NS)
        .create_token_request(sa, &PostParams::default(), &tr)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest: {e}"))
        .status
        .unwrap_or_else(|| panic!("no token"))
        .token
}

/// Stand-ins for Cilium's two policy CRDs (tests/fixtures/cilium-crds.yaml).
async fn install_cilium_crds(admin: &kube::Client) {
    let text = include_str!("fixtures/cilium-crds.yaml");
    let crds: Vec<serde_json::Value> = text
        .split("\n---")
        .map(|d| serde_norway::from_str(d).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let discovery = Discovery::new(admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for crd in &crds {
        apply(admin, &discovery, crd, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_established(admin, &crds).await;
}

/// The chart installed for real (CRDs, then everything else).
async fn install_chart(admin: &kube::Client, sets: &[&str]) {
    let docs = helm_template(sets, true);
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
        apply(admin, &discovery, crd, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_established(admin, &crds).await;
    let discovery = Discovery::new(admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for d in docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        apply(admin, &discovery, d, false)
            .await
            .unwrap_or_else(|e| panic!("installing the chart: {e}"));
    }
}

const PAYMENT_POLICY: &str = r#"{
  "apiVersion": "meshauth.io/v1alpha1", "kind": "MeshAuthPolicy",
  "metadata": {"name": "payment-requires-auth", "namespace": "production"},
  "spec": {
    "endpointSelector": {"matchLabels": {"app": "payment-service"}},
    "ingress": [{
      "fromEndpoints": [{"matchLabels": {"app": "order-service"}}],
      "authentication": {"mode": "required"},
      "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]
    }]
  }
}"#;

const LEDGER_CNP: &str = r#"{
  "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
  "metadata": {"name": "ledger-requires-auth", "namespace": "production"},
  "spec": {
    "endpointSelector": {"matchLabels": {"app": "ledger"}},
    "ingress": [{
      "fromEndpoints": [{"matchLabels": {"app": "order-service"}}],
      "authentication": {"mode": "required"}
    }]
  }
}"#;

const WORLD_CNP: &str = r#"{
  "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
  "metadata": {"name": "world-with-auth", "namespace": "production"},
  "spec": {
    "endpointSelector": {"matchLabels": {"app": "public-api"}},
    "ingress": [{"fromEntities": ["world"], "authentication": {"mode": "required"}}]
  }
}"#;

const WORLD_MAP: &str = r#"{
  "apiVersion": "meshauth.io/v1alpha1", "kind": "MeshAuthPolicy",
  "metadata": {"name": "world-with-auth", "namespace": "production"},
  "spec": {
    "endpointSelector": {"matchLabels": {"app": "public-api"}},
    "ingress": [{"fromEntities": ["world"], "authentication": {"mode": "required"}}]
  }
}"#;

/// Three node namespaces with real agents in Kubernetes mode against a real
/// API server, with the chart's RBAC, ServiceAccount tokens and
/// configuration: three agents racing to allocate identities for the same
/// labels end with one MeshIdentity per label set; the pair is
/// pre-authenticated and the first packets pass; a covered pod SPIRE never
/// issued is dropped; the API server killed and started again mid-run, the
/// agents relist and converge — nothing collected wrongly, and a pod added
/// after the restart is authenticated too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_in_kubernetes_mode_against_a_real_api_server() {
    let _one_at_a_time = API_SERVERS.lock().await;
    let nodes = ["node-a", "node-b", "node-c"];
    let mut c = Cluster::start("k8sag", &nodes).await;
    // Pods first, then the agents: all three race to allocate the same
    // label sets (each agent sees every pod of the cluster).
    let order_a = c.add_pod("node-a", "order-a", "order-service").await;
    let pay_b = c.add_pod("node-b", "pay-b", "payment-service").await;
    let refund_a = c.add_pod("node-a", "refund-a", "refund-service").await;
    let policy: serde_json::Value = serde_json::from_str(&PAYMENT_POLICY.replace(
        "[{\"matchLabels\": {\"app\": \"order-service\"}}]",
        "[{\"matchLabels\": {\"app\": \"order-service\"}}, {\"matchLabels\": {\"app\": \"refund-service\"}}]",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let discovery = Discovery::new(c.admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    apply(&c.admin, &discovery, &policy, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for n in nodes {
        c.start_agent(n).await;
    }
    let order = c.identity_of("order-service").await;
    let payment = c.identity_of("payment-service").await;
    let refund = c.identity_of("refund-service").await;
    let ids = c.identities().await;
    let mut label_sets: Vec<&Vec<String>> = ids.iter().map(|(_, l)| l).collect();
    label_sets.sort();
    let before = label_sets.len();
    label_sets.dedup();
    assert_eq!(
        before,
        label_sets.len(),
        "three racing agents: exactly one MeshIdentity per label set: {ids:?}"
    );
    println!(
        "identities: order {order}, payment {payment}, refund {refund} ({} objects)",
        ids.len()
    );
    // Only the label sets in use: none for a pod an agent saw before its
    // namespace (it allocated three such, one per app, before it waited for
    // every kind's first list).
    assert_eq!(ids.len(), 3, "{ids:?}");

    // SPIRE issues order on node-a and payment on node-b; refund never.
    let sid = |n: u32| {
        spire_dev::SpiffeId::parse(&format!("spiffe://meshauth.local/identity/{n}"))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    c.spire
        .add_entry(spire_dev::EntrySpec::new("node-a", sid(order)))
        .unwrap_or_else(|e| panic!("{e}"));
    c.spire
        .add_entry(spire_dev::EntrySpec::new("node-b", sid(payment)))
        .unwrap_or_else(|e| panic!("{e}"));
    // The rule selects payment (ingress): node-b, which runs it, holds
    // the pair; node-a, whose pods the rule does not select, holds nothing.
    c.wait_entries("node-b", &[(payment, order, "node-a")])
        .await;
    c.wait_entries("node-a", &[]).await;

    let mut server = c
        .lab
        .start_pod_process(&pay_b)
        .unwrap_or_else(|e| panic!("{e}"));
    server.serve(8080).unwrap_or_else(|e| panic!("{e}"));
    let mut client = c
        .lab
        .start_pod_process(&order_a)
        .unwrap_or_else(|e| panic!("{e}"));
    for addr in [std::net::IpAddr::from(pay_b.ipv4), pay_b.ipv6.into()] {
        client
            .connect(addr, 8080, std::time::Duration::from_millis(500))
            .unwrap_or_else(|e| panic!("order-a → pay-b {addr}: {e}{}", c.logs()));
    }
    assert_eq!(c.drops("node-b").await, 0, "pre-authenticated: no drop");
    let mut refund_p = c
        .lab
        .start_pod_process(&refund_a)
        .unwrap_or_else(|e| panic!("{e}"));
    refund_p
        .connect(
            pay_b.ipv4.into(),
            8080,
            std::time::Duration::from_millis(300),
        )
        .expect_err("refund-service has no SVID: dropped");
    assert!(
        c.drops("node-b").await > 0,
        "refund's SYN counted as dropped"
    );

    // Policy status, written by exactly one agent: the Lease holder.
    for doc in [LEDGER_CNP, WORLD_CNP, WORLD_MAP] {
        let v: serde_json::Value = serde_json::from_str(doc).unwrap_or_else(|e| panic!("{e}"));
        apply(&c.admin, &discovery, &v, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let holder = c.wait_lease_holder(|h| h.is_some()).await;
    println!("policy status Lease held by {holder}");
    let status_managers = |v: &serde_json::Value| -> Vec<String> {
        v["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["subresource"] == "status")
            .filter_map(|m| m["manager"].as_str().map(str::to_owned))
            .collect()
    };
    let payment_policy = c
        .wait_policy("MeshAuthPolicy", "payment-requires-auth", |v| {
            v["status"]["verdict"] == "accepted"
                && v["status"]["coverage"]["pairs"].as_u64() >= Some(2)
        })
        .await;
    let st = &payment_policy["status"];
    assert_eq!(st["reportedBy"], holder.as_str(), "{st:#}");
    assert_eq!(
        st["observedGeneration"],
        payment_policy["metadata"]["generation"]
    );
    assert_eq!(st["conditions"][0]["type"], "Enforced");
    assert_eq!(st["conditions"][0]["status"], "True");
    assert_eq!(st["conditions"][0]["reason"], "Accepted");
    assert!(
        st["conditions"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("enforced for") && m.contains("identity pair")),
        "{st:#}"
    );
    assert_eq!(
        status_managers(&payment_policy),
        ["meshauth-agent"],
        "the status has one manager"
    );
    let rejected = c
        .wait_policy("MeshAuthPolicy", "world-with-auth", |v| {
            v["status"]["verdict"] == "rejected"
        })
        .await;
    let st = &rejected["status"];
    assert_eq!(st["conditions"][0]["status"], "False", "{st:#}");
    assert_eq!(st["conditions"][0]["reason"], "Rejected");
    assert!(
        st["errors"][0]["path"]
            .as_str()
            .is_some_and(|p| p.contains("ingress[0]")),
        "the error names the rule: {st:#}"
    );
    // `kubectl get map` shows the verdict (the API server's Table, as
    // kubectl asks for it).
    let req =
        http::Request::get("/apis/meshauth.io/v1alpha1/namespaces/production/meshauthpolicies")
            .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())
            .unwrap_or_else(|e| panic!("{e}"));
    let table: serde_json::Value = c.admin.request(req).await.unwrap_or_else(|e| panic!("{e}"));
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Name", "Verdict", "Rules", "Pairs", "Age"],
        "{table:#}"
    );
    let rows: Vec<(String, String)> = table["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["cells"][0].to_string(), r["cells"][1].to_string()))
        .collect();
    println!("kubectl get meshauthpolicies: {rows:?}");
    assert!(rows.contains(&("\"payment-requires-auth\"".into(), "\"accepted\"".into())));
    assert!(rows.contains(&("\"world-with-auth\"".into(), "\"rejected\"".into())));
    // Cilium's policies: never written; an Event each instead (what
    // `kubectl describe cnp` lists), by the holder.
    let cnp_uid = |name: &'static str| {
        let c = &c;
        async move {
            c.wait_policy("CiliumNetworkPolicy", name, |_| true).await["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    };
    let world_uid = cnp_uid("world-with-auth").await;
    let ledger_uid = cnp_uid("ledger-requires-auth").await;
    let ev = c
        .wait_events(APP_NS, "world-with-auth", |evs| {
            evs.iter().any(|e| {
                e.involved_object.kind.as_deref() == Some("CiliumNetworkPolicy")
                    && e.reason.as_deref() == Some("Rejected")
            })
        })
        .await;
    let ev = ev
        .iter()
        .find(|e| e.involved_object.kind.as_deref() == Some("CiliumNetworkPolicy"))
        .unwrap_or_else(|| panic!("no event"));
    assert_eq!(ev.involved_object.uid.as_deref(), Some(world_uid.as_str()));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert!(
        ev.message
            .as_deref()
            .is_some_and(|m| m.contains("rejected") && m.contains("ingress[0]")),
        "{ev:?}"
    );
    let ev = c
        .wait_events(APP_NS, "ledger-requires-auth", |evs| !evs.is_empty())
        .await;
    assert_eq!(
        ev[0].involved_object.uid.as_deref(),
        Some(ledger_uid.as_str())
    );
    assert_eq!(ev[0].reason.as_deref(), Some("Accepted"));
    assert_eq!(ev[0].type_.as_deref(), Some("Normal"));
    assert!(
        ev[0]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("selects no pod")),
        "{ev:?}"
    );
    let cilium_policy = c
        .wait_policy("CiliumNetworkPolicy", "world-with-auth", |_| true)
        .await;
    assert!(
        cilium_policy.get("status").is_none() && status_managers(&cilium_policy).is_empty(),
        "meshauth wrote into a Cilium policy: {cilium_policy:#}"
    );
    let all_events: Vec<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(c.admin.clone(), APP_NS)
            .list(&Default::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .items;
    let hosts: std::collections::BTreeSet<Option<String>> = all_events
        .iter()
        .filter(|e| e.reporting_component.as_deref() == Some("meshauth.io/agent"))
        .map(|e| e.source.as_ref().and_then(|s| s.host.clone()))
        .collect();
    assert_eq!(hosts, [Some(holder.clone())].into(), "events by one agent");
    // The API server's audit log: every status and Event write by an agent
    // token came from the holder's node.
    let audit = c.api.audit();
    let status_writers = agent_writers(&audit, |r| r["subresource"] == "status");
    let event_writers = agent_writers(&audit, |r| r["resource"] == "events");
    println!("status writes by node: {status_writers:?}; event writes: {event_writers:?}");
    assert_eq!(
        status_writers.keys().collect::<Vec<_>>(),
        [&holder],
        "policy status written by exactly one agent"
    );
    assert_eq!(event_writers.keys().collect::<Vec<_>>(), [&holder]);

    // The API server killed and started again on the same etcd: the
    // agents relist, keep their entries, and follow changes made after.
    c.api.kill_apiserver();
    let took = c.api.restart().await.unwrap_or_else(|e| panic!("{e}"));
    println!("API server back in {took:?}");
    c.wait_entries("node-b", &[(payment, order, "node-a")])
        .await;
    client
        .connect(
            pay_b.ipv4.into(),
            8080,
            std::time::Duration::from_millis(500),
        )
        .unwrap_or_else(|e| panic!("after the API server's restart: {e}{}", c.logs()));
    let order_c = c.add_pod("node-c", "order-c", "order-service").await;
    c.spire
        .add_entry(spire_dev::EntrySpec::new("node-c", sid(order)))
        .unwrap_or_else(|e| panic!("{e}"));
    c.wait_entries(
        "node-b",
        &[(payment, order, "node-a"), (payment, order, "node-c")],
    )
    .await;
    let mut client_c = c
        .lab
        .start_pod_process(&order_c)
        .unwrap_or_else(|e| panic!("{e}"));
    client_c
        .connect(
            pay_b.ipv4.into(),
            8080,
            std::time::Duration::from_millis(500),
        )
        .unwrap_or_else(|e| panic!("order-c → pay-b: {e}{}", c.logs()));
    let ids_after = c.identities().await;
    assert_eq!(
        ids_after.len(),
        ids.len(),
        "no identity allocated twice across the restart: {ids_after:?}"
    );

    // Exactly one agent ever led until now.
    let leaders: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| {
            c.log_all(n)
                .contains("leading: this agent writes policy status")
        })
        .collect();
    assert_eq!(leaders, [holder.as_str()], "{}", c.logs());
    // The leader stops (SIGTERM, as a rolling update does): it releases
    // the Lease, another agent takes it and writes the status from then on.
    let stopping = std::time::Instant::now();
    c.stop_agent(&holder);
    let audited_before = c.api.audit().len();
    let next = c
        .wait_lease_holder(|h| h.is_some_and(|h| h != holder))
        .await;
    let handed = stopping.elapsed();
    println!("policy status Lease handed from {holder} to {next} in {handed:?}");
    // Released, not expired: well within the 15 s lease duration.
    assert!(
        handed < std::time::Duration::from_secs(8),
        "the stopping leader did not release the Lease: {handed:?}"
    );
    apply(
        &c.admin,
        &discovery,
        &serde_json::from_str(&PAYMENT_POLICY.replace("\"8080\"", "\"8081\""))
            .unwrap_or_else(|e| panic!("{e}")),
        false,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let updated = c
        .wait_policy("MeshAuthPolicy", "payment-requires-auth", |v| {
            v["status"]["observedGeneration"] == v["metadata"]["generation"]
                && v["metadata"]["generation"].as_i64()
                    > payment_policy["metadata"]["generation"].as_i64()
        })
        .await;
    assert_eq!(updated["status"]["reportedBy"], next.as_str());
    let audit = c.api.audit();
    let after = agent_writers(&audit[audited_before..], |r| r["subresource"] == "status");
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        [&next],
        "one writer of the status after the hand-over"
    );

    // Taking the cluster down removes every node's pins, the stopped
    // leader's too (they were left behind on every run before).
    let pins: Vec<PathBuf> = nodes.iter().map(|n| c.pin_dir(n)).collect();
    assert!(
        pins[0].exists(),
        "{} exists while running",
        pins[0].display()
    );
    drop(c);
    let left: Vec<&PathBuf> = pins.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "pins left after the cluster: {left:?}");
}

/// `meshauth spire reconcile --kubernetes`, as the bundled SPIRE server's
/// reconciler runs it: it reads Pods, Nodes and the agents' MeshIdentity
/// objects from a real API server (an admin kubeconfig here) and makes the
/// entries in a real SPIRE server — a node's entries parented to its
/// k8s_psat agent ID by the Node's uid; a pod whose label set has no
/// MeshIdentity yet gets none (the reconciler never allocates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_reads_the_cluster_from_a_real_api_server() {
    let _one_at_a_time = API_SERVERS.lock().await;
    use k8s_openapi::api::core::v1::{Node, Pod};
    let (api, dir) = start().await;
    let admin = api.admin_client().await.unwrap_or_else(|e| panic!("{e}"));
    create_namespace(&admin, NS).await;
    create_namespace(&admin, "production").await;
    install_chart(&admin, &[]).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let mut uids = std::collections::BTreeMap::new();
    for n in ["node-a", "node-b"] {
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": n}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let node = nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        uids.insert(n, node.metadata.uid.unwrap_or_default());
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "production");
    for (name, app, node) in [("pay", "payment", "node-a"), ("ord", "order", "node-b")] {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "serviceAccountName": "default",
                     "containers": [{"name": "c", "image": "x"}]}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        // The namespace's default ServiceAccount (no controller-manager makes it).
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(admin.clone(), "production");
        let sa = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let _ = sas.create(&PostParams::default(), &sa).await;
        pods.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let ip = if name == "pay" {
            "10.1.0.5"
        } else {
            "10.2.0.5"
        };
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"phase": "Running", "podIP": ip}})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // The agents allocated payment's identity (with the label set they
    // compute); order's not yet.
    let ids: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "meshauth.io",
            "v1alpha1",
            "MeshIdentity",
        )),
    );
    let id: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "meshauth.io/v1alpha1", "kind": "MeshIdentity",
        "metadata": {"name": "300"},
        "spec": {"labels": [
            "k8s:app=payment",
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=production",
            "k8s:io.cilium.k8s.policy.serviceaccount=default",
            "k8s:io.kubernetes.pod.namespace=production"]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    ids.create(&PostParams::default(), &id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let bin = meshauth_tests::real_spire::spire_bin();
    let sdir = meshauth_tests::real_spire::spire_tempdir();
    let server = meshauth_tests::real_spire::start_server(&bin, sdir.path(), "meshauth.local")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = tokio::task::spawn_blocking({
        let kc = api.admin_kubeconfig();
        let sock = server.socket().to_owned();
        move || {
            Command::new(env!("CARGO_BIN_EXE_meshauth"))
                .args(["spire", "reconcile", "--kubernetes", "--once"])
                .args(["--trust-domain", "meshauth.local"])
                .args(["--deployment", "kubernetes", "--cluster", "prod"])
                .arg("--server-socket")
                .arg(sock)
                .env("KUBECONFIG", kc)
                .output()
                .unwrap_or_else(|e| panic!("{e}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{text}");
    let shown = server
        .cli(&["entry", "show"], &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let ours: Vec<&str> = shown
        .split("\n\n")
        .filter(|b| b.contains("meshauth-"))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "payment's entry only (order has no MeshIdentity yet):\n{shown}"
    );
    assert!(
        ours[0].contains("spiffe://meshauth.local/identity/300"),
        "{shown}"
    );
    assert!(
        ours[0].contains(&format!(
            "spiffe://meshauth.local/spire/agent/k8s_psat/prod/{}",
            uids["node-a"]
        )),
        "parented to node-a's k8s_psat agent by the Node's uid:\n{shown}"
    );
    // Read only: the reconciler allocated nothing.
    let after = ids
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after.items.len(), 1, "{:?}", after.items);
    drop(dir);
}

/// The policy status Lease against a real API server, with three agents'
/// ServiceAccount tokens: of three candidates racing, exactly one leads; a
/// leader that stops renewing is replaced only after the lease duration,
/// and had stopped counting itself leader before that (never two writers);
/// a released Lease is taken at the next round. The tokens may write
/// policy status and nothing of the policies themselves or of other Leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_agent_holds_the_policy_status_lease() {
    let _one_at_a_time = API_SERVERS.lock().await;
    use k8s_openapi::api::coordination::v1::Lease;
    use policy_bridge::source::kube::{Elector, LeaseConfig};
    use std::time::{Duration, Instant};
    let (api, dir) = start().await;
    let admin = api.admin_client().await.unwrap_or_else(|e| panic!("{e}"));
    create_namespace(&admin, NS).await;
    create_namespace(&admin, APP_NS).await;
    install_chart(&admin, &[]).await;
    let lease_name = "rel-meshauth-policy-status";
    let duration = Duration::from_secs(3);
    let mut electors = Vec::new();
    let mut clients = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        let token = agent_token(&admin, node, true).await;
        let kc = dir.path().join(format!("{node}.kubeconfig"));
        api.token_kubeconfig(&kc, &token)
            .unwrap_or_else(|e| panic!("{e}"));
        let client = meshauth_lab::kube_real::client_from(&kc)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        clients.push(client.clone());
        electors.push(Elector::new(
            client,
            LeaseConfig {
                namespace: NS.into(),
                name: lease_name.into(),
                holder: node.into(),
                duration,
            },
        ));
    }
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NS);
    let holder = || async {
        let l = leases
            .get(lease_name)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let s = l.spec.unwrap_or_default();
        (s.holder_identity, s.lease_transitions.unwrap_or(0))
    };
    let [a, b, c] = &mut electors[..] else {
        unreachable!()
    };
    // All three race for the Lease that does not exist yet.
    let (ra, rb, rc) = tokio::join!(a.round(), b.round(), c.round());
    let won: Vec<bool> = [ra, rb, rc]
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a round: {e}")))
        .collect();
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "one winner: {won:?}");
    let first = ["node-a", "node-b", "node-c"][won.iter().position(|w| *w).unwrap_or(0)];
    assert_eq!(holder().await, (Some(first.to_owned()), 0));
    // Rounds go on: the leader renews, the others stay out.
    for _ in 0..4 {
        for e in electors.iter_mut() {
            e.round().await.unwrap_or_else(|e| panic!("{e}"));
        }
        let leading: Vec<bool> = electors.iter().map(Elector::leading).collect();
        assert_eq!(leading.iter().filter(|l| **l).count(), 1, "{leading:?}");
    }
    assert_eq!(holder().await, (Some(first.to_owned()), 0));

    // The leader stops renewing (a crashed agent: no release).
    let li = ["node-a", "node-b", "node-c"]
        .iter()
        .position(|n| *n == first)
        .unwrap_or(0);
    let mut old = electors.remove(li);
    let stopped = Instant::now();
    let took = loop {
        let mut leaders = 0;
        for e in electors.iter_mut() {
            if e.round().await.unwrap_or_else(|e| panic!("{e}")) {
                leaders += 1;
            }
        }
        assert!(leaders <= 1, "two leaders at once");
        if leaders == 1 {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < duration * 3,
            "no follower took the abandoned Lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("a crashed leader's Lease was taken after {took:?} (duration {duration:?})");
    assert!(
        took >= duration,
        "taken before the lease duration: {took:?}"
    );
    assert!(
        !old.leading(),
        "the old leader still counted itself leader when another took over"
    );
    let (second, transitions) = holder().await;
    let second = second.unwrap_or_default();
    assert_ne!(second, first);
    assert_eq!(transitions, 1);
    // The old leader comes back: it does not take the Lease back.
    assert!(!old.round().await.unwrap_or_else(|e| panic!("{e}")));

    // The new leader releases it (shutdown): the other takes it at once.
    let si = electors
        .iter()
        .position(Elector::leading)
        .unwrap_or_else(|| panic!("no leader"));
    let mut leaving = electors.remove(si);
    leaving
        .release()
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    let released = Instant::now();
    let mut last = electors.remove(0);
    let mut rounds = 0;
    while !last.round().await.unwrap_or_else(|e| panic!("{e}")) {
        rounds += 1;
        assert!(rounds < 20, "a released Lease was not taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("a released Lease was taken after {:?}", released.elapsed());
    assert!(released.elapsed() < duration, "{:?}", released.elapsed());
    let (third, transitions) = holder().await;
    assert!(third.as_deref() != Some(second.as_str()) && third.as_deref() != Some(first));
    assert_eq!(transitions, 2);

    // What a token may write for policy status, and what it may not.
    let refused = |what: &str, r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {
            println!("refused as it must be: {what}: {}", s.message);
        }
        other => panic!("{what}: want 403, got {other:?}"),
    };
    let agent = clients[0].clone();
    refused(
        "reading a Lease of the control plane",
        Api::<Lease>::namespaced(agent.clone(), "kube-system")
            .get("kube-controller-manager")
            .await
            .map(drop),
    );
    let mut other = leases
        .get(lease_name)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    other.metadata.name = Some("another-lease".into());
    other.metadata.resource_version = None;
    leases
        .create(&PostParams::default(), &other)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut taken = Api::<Lease>::namespaced(admin.clone(), NS)
        .get("another-lease")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    taken
        .spec
        .get_or_insert_with(Default::default)
        .holder_identity = Some("node-a".into());
    refused(
        "taking another Lease in the release namespace",
        Api::<Lease>::namespaced(agent.clone(), NS)
            .replace("another-lease", &PostParams::default(), &taken)
            .await
            .map(drop),
    );
    let map = ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "meshauth.io",
        "v1alpha1",
        "MeshAuthPolicy",
    ));
    let policy: serde_json::Value =
        serde_json::from_str(PAYMENT_POLICY).unwrap_or_else(|e| panic!("{e}"));
    let discovery = Discovery::new(admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    apply(&admin, &discovery, &policy, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let as_agent: Api<DynamicObject> = Api::namespaced_with(agent.clone(), APP_NS, &map);
    as_agent
        .patch_status(
            "payment-requires-auth",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"verdict": "accepted"}})),
        )
        .await
        .unwrap_or_else(|e| panic!("the agent may write a policy's status: {e}"));
    refused(
        "changing a policy's spec",
        as_agent
            .patch(
                "payment-requires-auth",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"ingress": []}})),
            )
            .await
            .map(drop),
    );
    refused(
        "deleting a policy",
        as_agent
            .delete("payment-requires-auth", &Default::default())
            .await
            .map(drop),
    );
    let cnp = ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "cilium.io",
        "v2",
        "CiliumNetworkPolicy",
    ));
    refused(
        "writing a Cilium policy's status",
        Api::<DynamicObject>::namespaced_with(agent.clone(), APP_NS, &cnp)
            .patch_status(
                "any",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {}})),
            )
            .await
            .map(drop),
    );
}

/// A process run the way a container of the chart's pods would see the
/// machine: in a private mount namespace where `/run` and `/var/lib` are
/// empty and only the pod's volumes are mounted (host directory or file →
/// path in the container), with the env and uid the manifest gives.
struct PodProcess {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl PodProcess {
    fn start(
        name: &str,
        dir: &Path,
        mounts: &[(PathBuf, &str)],
        env: &[(&str, String)],
        uid: Option<u32>,
        argv: &[String],
    ) -> Self {
        let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut script =
            String::from("set -e\nmount -t tmpfs tmpfs /run\nmount -t tmpfs tmpfs /var/lib\n");
        for (src, dst) in mounts {
            if src.is_dir() {
                script.push_str(&format!("mkdir -p {}\n", q(dst)));
            } else {
                script.push_str(&format!(
                    "mkdir -p {} && touch {}\n",
                    q(Path::new(dst)
                        .parent()
                        .map_or("/", |p| p.to_str().unwrap_or("/"))),
                    q(dst)
                ));
            }
            script.push_str(&format!(
                "mount --bind {} {}\n",
                q(&src.display().to_string()),
                q(dst)
            ));
        }
        script.push_str("exec ");
        if let Some(u) = uid {
            script.push_str(&format!(
                "setpriv --reuid {u} --regid {u} --clear-groups --inh-caps=-all -- "
            ));
        }
        let argv: Vec<String> = argv.iter().map(|a| q(a)).collect();
        script.push_str(&argv.join(" "));
        script.push('\n');
        let path = dir.join(format!("{name}.sh"));
        std::fs::write(&path, script).unwrap_or_else(|e| panic!("{e}"));
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh"])
            .arg(&path)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        format!(
            "\n--- {} ---\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A ServiceAccount token for `sa` bound to a Pod object `pod` on `node`
/// (made if missing), for `audience`: what kubelet projects into a pod.
async fn pod_token(
    admin: &kube::Client,
    sa: &str,
    pod: &str,
    node: &str,
    audience: &str,
) -> String {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let p: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "c", "image": "x"}]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let p = match pods.create(&PostParams::default(), &p).await {
        Ok(p) => p,
        Err(kube::Error::Api(s)) if s.code == 409 => {
            pods.get(pod).await.unwrap_or_else(|e| panic!("{e}"))
        }
        Err(e) => panic!("pod {pod}: {e}"),
    };
    let tr: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [audience], "expirationSeconds": 7200,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod,
                                    "uid": p.metadata.uid}}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    Api::<ServiceAccount>::namespaced(admin.clone(), NS)
        .create_token_request(sa, &PostParams::default(), &tr)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {sa}: {e}"))
        .status
        .unwrap_or_else(|| panic!("no token"))
        .token
}

/// The bundled SPIRE (`spire.mode=bundled`) run from the chart's own
/// objects against a real API server — everything a kubelet would do but
/// run containers: the server with the rendered server.conf, as uid 10001,
/// with its ServiceAccount's token in-cluster; the reconciler container's
/// exact args beside it on the shared admin socket; a SPIRE agent with the
/// rendered agent.conf and a projected `spire-server` token. Shows: the
/// k8sbundle notifier fills the chart's bundle ConfigMap (its Role), the
/// agent trusts that bundle and attests by k8s_psat (the server's
/// TokenReview and pod/node reads, its ClusterRole), and the reconciler,
/// with only the server's token, parents the pods' entries to that agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_spire_runs_from_the_charts_objects() {
    let _one_at_a_time = API_SERVERS.lock().await;
    use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
    assert!(
        meshauth_lab::testbed::is_root(),
        "this test needs root (mount namespaces)"
    );
    let (api, dir) = start().await;
    let admin = api.admin_client().await.unwrap_or_else(|e| panic!("{e}"));
    create_namespace(&admin, NS).await;
    create_namespace(&admin, "production").await;
    let sets = ["spire.mode=bundled"];
    install_chart(&admin, &sets).await;
    let docs = helm_template(&sets, false);
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
            .clone()
    };
    let server_conf = find("ConfigMap", "rel-meshauth-spire-server")["data"]["server.conf"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let agent_conf = find("ConfigMap", "rel-meshauth-spire-agent")["data"]["agent.conf"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let sts = find("StatefulSet", "rel-meshauth-spire-server");
    let containers = sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let reconciler = containers
        .iter()
        .find(|c| c["name"] == "reconciler")
        .unwrap_or_else(|| panic!("no reconciler container"));
    let server_uid = sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        .as_u64()
        .unwrap_or_else(|| panic!("the server pod sets runAsUser")) as u32;

    // The node, and a pod of an app whose identity an agent allocated.
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let node_uid = Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .metadata
        .uid
        .unwrap_or_default();
    let sa = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), "production")
        .create(&PostParams::default(), &sa)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "production");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pay", "labels": {"app": "payment"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "default",
                 "containers": [{"name": "c", "image": "x"}]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    pods.patch_status(
        "pay",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Running", "podIP": "10.1.0.5"}})),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let id: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "meshauth.io/v1alpha1", "kind": "MeshIdentity",
        "metadata": {"name": "300"},
        "spec": {"labels": [
            "k8s:app=payment",
            "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=production",
            "k8s:io.cilium.k8s.policy.serviceaccount=default",
            "k8s:io.kubernetes.pod.namespace=production"]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    Api::<DynamicObject>::all_with(
        admin.clone(),
        &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "meshauth.io",
            "v1alpha1",
            "MeshIdentity",
        )),
    )
    .create(&PostParams::default(), &id)
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // The server pod's volumes: config, data, the admin socket (shared
    // with the reconciler) and the ServiceAccount token kubelet mounts.
    let root = dir.path().join("pods");
    let mk = |p: &str| {
        let d = root.join(p);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        d
    };
    let (s_config, s_data, s_admin, s_sa) = (
        mk("server/config"),
        mk("server/data"),
        mk("server/admin-socket"),
        mk("server/serviceaccount"),
    );
    std::fs::write(s_config.join("server.conf"), &server_conf).unwrap_or_else(|e| panic!("{e}"));
    let server_token = pod_token(
        &admin,
        "rel-meshauth-spire-server",
        "rel-meshauth-spire-server-0",
        "node-a",
        "https://kubernetes.default.svc",
    )
    .await;
    std::fs::write(s_sa.join("token"), &server_token).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(api.ca_file(), s_sa.join("ca.crt")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(s_sa.join("namespace"), NS).unwrap_or_else(|e| panic!("{e}"));
    for d in [&s_data, &s_admin, &s_sa] {
        Command::new("chown")
            .args(["-R", &format!("{server_uid}:{server_uid}")])
            .arg(d)
            .status()
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (host, port) = api
        .url()
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .unwrap_or_else(|| panic!("API server URL"));
    let in_cluster = [
        ("KUBERNETES_SERVICE_HOST", host),
        ("KUBERNETES_SERVICE_PORT", port),
    ];
    let spire = meshauth_lab::spire_real::spire_bin(None).unwrap_or_else(|e| panic!("{e}"));
    let server_mounts = [
        (s_config.clone(), "/run/spire/config"),
        (s_data.clone(), "/var/lib/spire/server"),
        (s_admin.clone(), "/run/spire/server/private"),
        (
            s_sa.clone(),
            "/var/run/secrets/kubernetes.io/serviceaccount",
        ),
    ];
    let mut server_args = vec![
        spire.join("spire-server").display().to_string(),
        "run".into(),
    ];
    server_args.extend(
        containers
            .iter()
            .find(|c| c["name"] == "spire-server")
            .and_then(|c| c["args"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned)),
    );
    let mut server = PodProcess::start(
        "spire-server",
        dir.path(),
        &server_mounts,
        &in_cluster,
        Some(server_uid),
        &server_args,
    );
    // The k8sbundle notifier publishes the bundle into the chart's ConfigMap.
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let bundle = loop {
        let cm = cms
            .get("rel-meshauth-spire-bundle")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(b) = cm.data.and_then(|d| d.get("bundle.crt").cloned())
            && b.contains("BEGIN CERTIFICATE")
        {
            break b;
        }
        assert!(server.running(), "spire-server exited{}", server.log());
        assert!(
            std::time::Instant::now() < deadline,
            "the bundle ConfigMap was not filled in 60 s{}",
            server.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    println!("k8sbundle wrote {} bytes of bundle", bundle.len());

    // The reconciler container: the chart's command and args, the
    // server's token, the shared admin socket.
    let mut rec_args = vec![env!("CARGO_BIN_EXE_meshauth").to_owned()];
    rec_args.extend(
        reconciler["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned)),
    );
    let mut rec = PodProcess::start(
        "reconciler",
        dir.path(),
        &[
            (s_admin.clone(), "/run/spire/server/private"),
            (
                s_sa.clone(),
                "/var/run/secrets/kubernetes.io/serviceaccount",
            ),
        ],
        &[
            in_cluster[0].clone(),
            in_cluster[1].clone(),
            ("MESHAUTH_LOG", "info".into()),
        ],
        Some(server_uid),
        &rec_args,
    );

    // The agent pod: its config, the bundle ConfigMap as kubelet mounts
    // it, a projected token for audience spire-server, a hosts entry for
    // the server's Service (no cluster DNS here).
    let (a_config, a_bundle, a_sockets, a_tokens, a_data, a_sa) = (
        mk("agent/config"),
        mk("agent/bundle"),
        mk("agent/sockets"),
        mk("agent/tokens"),
        mk("agent/data"),
        mk("agent/serviceaccount"),
    );
    std::fs::write(a_config.join("agent.conf"), &agent_conf).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(a_bundle.join("bundle.crt"), &bundle).unwrap_or_else(|e| panic!("{e}"));
    let agent_token = pod_token(
        &admin,
        "rel-meshauth-spire-agent",
        "rel-meshauth-spire-agent-x1",
        "node-a",
        "spire-server",
    )
    .await;
    std::fs::write(a_tokens.join("spire-agent"), &agent_token).unwrap_or_else(|e| panic!("{e}"));
    // automountServiceAccountToken: the agent's own token and the CA.
    let own = pod_token(
        &admin,
        "rel-meshauth-spire-agent",
        "rel-meshauth-spire-agent-x1",
        "node-a",
        "https://kubernetes.default.svc",
    )
    .await;
    std::fs::write(a_sa.join("token"), own).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(api.ca_file(), a_sa.join("ca.crt")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(a_sa.join("namespace"), NS).unwrap_or_else(|e| panic!("{e}"));
    let hosts = root.join("agent/hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 rel-meshauth-spire-server.meshauth-system.svc\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut agent_args = vec![
        spire.join("spire-agent").display().to_string(),
        "run".into(),
    ];
    agent_args.extend(
        find("DaemonSet", "rel-meshauth-spire-agent")["spec"]["template"]["spec"]["containers"][0]
            ["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned)),
    );
    let mut agent = PodProcess::start(
        "spire-agent",
        dir.path(),
        &[
            (a_config, "/run/spire/config"),
            (a_bundle, "/run/spire/bundle"),
            (a_sockets, "/run/spire/sockets"),
            (a_tokens, "/var/run/secrets/tokens"),
            (a_data, "/var/lib/spire/agent"),
            (a_sa, "/var/run/secrets/kubernetes.io/serviceaccount"),
            (hosts, "/etc/hosts"),
        ],
        &[("MY_NODE_NAME", "node-a".into())],
        None,
        &agent_args,
    );

    // The server lists the agent, attested by k8s_psat as node-a's (the
    // Node's uid), and holds payment's entry parented to it — written by
    // the reconciler with the server's token alone.
    let agent_id = format!("spiffe://meshauth.local/spire/agent/k8s_psat/meshauth/{node_uid}");
    let sock = s_admin.join("api.sock");
    let cli = |args: &[&str]| {
        let out = Command::new(spire.join("spire-server"))
            .args(args)
            .arg("-socketPath")
            .arg(&sock)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let agents = cli(&["agent", "list"]);
        let entries = cli(&["entry", "show", "-parentID", &agent_id]);
        if agents.contains(&agent_id) && entries.contains("spiffe://meshauth.local/identity/300") {
            println!("agents:\n{agents}\nentries under node-a's agent:\n{entries}");
            assert!(
                agents.contains("k8s_psat:agent_node_name:node-a")
                    || cli(&["agent", "show", "-spiffeID", &agent_id])
                        .contains("k8s_psat:agent_node_name:node-a"),
                "{agents}"
            );
            break;
        }
        let logs = format!("{}{}{}", server.log(), rec.log(), agent.log());
        for p in [&mut server, &mut rec, &mut agent] {
            assert!(p.running(), "{} exited{logs}", p.name);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no attested agent with payment's entry in 90 s\nagents: {agents}\nentries: {entries}{}{}{}",
            server.log(),
            rec.log(),
            agent.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    drop(agent);
    drop(rec);
    drop(server);
}

/// RSS in KiB and open file descriptors of process `pid`.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count();
    (rss, fds)
}

/// Node churn on a real API server: for 60 s, every 100 ms a Node joins
/// (its handshake address an unused one on the lab's node network, so
/// nothing answers) with an order-service pod that payment's policy makes
/// node-b authenticate, and the Node that joined a second earlier leaves
/// with its pod — 600 joins, 600 leaves, about ten nodes present at any
/// time, addresses reused every 100 joins. Afterwards node-b's agent holds
/// node-a as its only peer and (payment, order, node-a) as its only entry,
/// starts no more handshakes (once those begun have failed), its handshakes during the churn were at most
/// two per node that joined, its memory and file descriptors are where
/// they were, and order-a still reaches pay-b. (WireGuard peers: the host
/// has no WireGuard module, so this cluster runs without it; the VM tests
/// cover peer removal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_churn_leaves_no_stale_peers_or_entries_and_nothing_grows() {
    let _one_at_a_time = API_SERVERS.lock().await;
    use k8s_openapi::api::core::v1::{Node, Pod};
    let nodes = ["node-a", "node-b"];
    let mut c = Cluster::start_on("k8schurn", 78, &nodes).await;
    let order_a = c.add_pod("node-a", "order-a", "order-service").await;
    let pay_b = c.add_pod("node-b", "pay-b", "payment-service").await;
    let discovery = Discovery::new(c.admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let policy: serde_json::Value =
        serde_json::from_str(PAYMENT_POLICY).unwrap_or_else(|e| panic!("{e}"));
    apply(&c.admin, &discovery, &policy, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for n in nodes {
        c.start_agent(n).await;
    }
    let order = c.identity_of("order-service").await;
    let payment = c.identity_of("payment-service").await;
    let sid = |n: u32| {
        spire_dev::SpiffeId::parse(&format!("spiffe://meshauth.local/identity/{n}"))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    c.spire
        .add_entry(spire_dev::EntrySpec::new("node-a", sid(order)))
        .unwrap_or_else(|e| panic!("{e}"));
    c.spire
        .add_entry(spire_dev::EntrySpec::new("node-b", sid(payment)))
        .unwrap_or_else(|e| panic!("{e}"));
    c.wait_entries("node-b", &[(payment, order, "node-a")])
        .await;
    let status = |c: &Cluster| {
        let api = c.agent_api("node-b");
        async move {
            api.get_json::<auth_agent::api::types::AgentStatus>("/v1/status")
                .await
                .unwrap_or_else(|e| panic!("node-b status: {e}"))
        }
    };
    let pid = c.agents["node-b"].id();
    // Settled: a few seconds after the pair was written.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (rss0, fds0) = rss_and_fds(pid);
    let hs = |s: &auth_agent::api::types::AgentStatus| {
        s.handshakes.initiated_ok + s.handshakes.initiated_failed
    };
    let hs0 = hs(&status(&c).await);

    let node_api: Api<Node> = Api::all(c.admin.clone());
    let pod_api: Api<Pod> = Api::namespaced(c.admin.clone(), APP_NS);
    let net = 78u8;
    let joins = 600usize;
    let mut present = std::collections::VecDeque::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    let started = std::time::Instant::now();
    for k in 0..joins {
        tick.tick().await;
        let name = format!("churn-{k}");
        let slot = 100 + (k % 100) as u8;
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {
                "meshauth.io/handshake-address": format!("10.{net}.0.{slot}")}},
            "spec": {"podCIDR": format!("10.{net}.{slot}.0/24")}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        node_api
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("node {name}: {e}"));
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "order-service"}},
            "spec": {"nodeName": name, "serviceAccountName": "order-service",
                     "containers": [{"name": "app", "image": "order-service"}]}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        pod_api
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("pod {name}: {e}"));
        let st = serde_json::json!({"status": {"phase": "Running", "podIP": format!("10.{net}.{slot}.5")}});
        pod_api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&st))
            .await
            .unwrap_or_else(|e| panic!("pod {name} status: {e}"));
        present.push_back(name);
        // Each node stays about a second.
        while present.len() > 10 {
            let gone = present.pop_front().unwrap_or_default();
            pod_api
                .delete(&gone, &kube::api::DeleteParams::default().grace_period(0))
                .await
                .unwrap_or_else(|e| panic!("pod {gone}: {e}"));
            node_api
                .delete(&gone, &Default::default())
                .await
                .unwrap_or_else(|e| panic!("node {gone}: {e}"));
        }
    }
    for gone in present.drain(..) {
        pod_api
            .delete(&gone, &kube::api::DeleteParams::default().grace_period(0))
            .await
            .unwrap_or_else(|e| panic!("pod {gone}: {e}"));
        node_api
            .delete(&gone, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("node {gone}: {e}"));
    }
    let churn = started.elapsed();
    let hs_churn = hs(&status(&c).await) - hs0;

    // node-a is node-b's only peer again, and the pair its only entry.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = status(&c).await;
        let peers: Vec<&str> = s.peers.iter().map(|p| p.node.as_str()).collect();
        if peers == ["node-a"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-b's peers 30 s after the churn: {peers:?}{}",
            c.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    c.wait_entries("node-b", &[(payment, order, "node-a")])
        .await;
    // No handshakes toward nodes that left, once those begun during the
    // churn have ended (a handshake is counted when it ends; toward an
    // address nothing answers, that is when ARP gives up, about 3 s).
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let hs1 = hs(&status(&c).await);
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let hs2 = hs(&status(&c).await);
    let (rss1, fds1) = rss_and_fds(pid);
    println!(
        "churn: {joins} joins and leaves in {churn:?}; node-b started {hs_churn} handshakes during it, \
         {} in the 5 s after; RSS {rss0} → {rss1} KiB, fds {fds0} → {fds1}",
        hs2 - hs1
    );
    assert!(
        churn < std::time::Duration::from_secs(75),
        "the API calls fell behind: {churn:?}"
    );
    assert!(
        hs_churn <= 2 * joins as u64,
        "{hs_churn} handshakes for {joins} nodes{}",
        c.logs()
    );
    assert_eq!(hs2, hs1, "handshakes after the churn ended{}", c.logs());
    assert!(fds1 <= fds0 + 2, "file descriptors grew: {fds0} → {fds1}");
    assert!(rss1 <= rss0 + 16 * 1024, "memory grew: {rss0} → {rss1} KiB");
    let mut client = c
        .lab
        .start_pod_process(&order_a)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut server = c
        .lab
        .start_pod_process(&pay_b)
        .unwrap_or_else(|e| panic!("{e}"));
    server.serve(8080).unwrap_or_else(|e| panic!("{e}"));
    client
        .connect(
            pay_b.ipv4.into(),
            8080,
            std::time::Duration::from_millis(500),
        )
        .unwrap_or_else(|e| panic!("order-a → pay-b after the churn: {e}{}", c.logs()));
}

/// One sample of [`first_connection_bench`]: publication → first success;
/// when `entry` is given, publication → that pair in node-b's auth map, and
/// the first success is a connection made after that (before node-b knows
/// the pod, its packets are a stranger's, which no rule covers).
async fn first_connection(
    c: &mut Cluster,
    node: &str,
    name: &str,
    app: &str,
    to: std::net::IpAddr,
    entry: Option<(u32, u32)>,
) -> (std::time::Duration, Option<std::time::Duration>) {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let sas: Api<ServiceAccount> = Api::namespaced(c.admin.clone(), APP_NS);
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": app}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    match sas.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("service account {app}: {e}"),
    }
    let pods: Api<Pod> = Api::namespaced(c.admin.clone(), APP_NS);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "serviceAccountName": app,
                 "containers": [{"name": "app", "image": app}]}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("pod {name}: {e}"));
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    // The pod's cgroup and network exist before the API server says so,
    // as a container runtime has them before kubelet reports the IP.
    let info = c
        .lab
        .add_pod_with_uid(node, name, Some(&uid))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut client = c
        .lab
        .start_pod_process(&info)
        .unwrap_or_else(|e| panic!("{e}"));
    // Attempts of 5 ms, one every 2 ms, from just before the publication.
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let r = client.connect_retry_with(
            to,
            8080,
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(5),
            std::time::Duration::from_millis(2),
        );
        let _ = tx.send(std::time::Instant::now());
        (r, client)
    });
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": info.ipv4.to_string(),
        "podIPs": [{"ip": info.ipv4.to_string()}, {"ip": info.ipv6.to_string()}]}});
    let published = std::time::Instant::now();
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("pod {name} status: {e}"));
    let mut entered = None;
    if let Some((local, remote)) = entry {
        let api = c.agent_api("node-b");
        let deadline = published + std::time::Duration::from_secs(10);
        while entered.is_none() {
            let got: Vec<auth_agent::api::types::AuthEntry> =
                api.get_json("/v1/auth").await.unwrap_or_default();
            if got
                .iter()
                .any(|e| e.local == local && e.remote == remote && e.node.as_deref() == Some(node))
            {
                entered = Some(published.elapsed());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node-b never held ({local}, {remote}, {node}){}",
                c.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    let done = tokio::task::spawn_blocking(move || rx.recv())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (r, mut client) = worker.join().unwrap_or_else(|_| panic!("client thread"));
    r.unwrap_or_else(|e| panic!("{name} never connected: {e}{}", c.logs()));
    let connected = done.saturating_duration_since(published);
    if entered.is_none() {
        return (connected, None);
    }
    // A connection made with the pair in node-b's map: the first
    // authenticated one (the retries may have got through earlier as a
    // stranger's).
    client
        .connect(to, 8080, std::time::Duration::from_millis(100))
        .unwrap_or_else(|e| panic!("{name} with its pair authenticated: {e}{}", c.logs()));
    (published.elapsed(), entered)
}

/// `cargo bench -p meshauth-cli --bench k8s_connect` (benches/k8s_connect.rs
/// includes this file): time from a new pod's publication (its status, with
/// its IP, patched on the real API server) to its first successful
/// connection, agents in Kubernetes mode (watch-driven) with unknown pods
/// dropped (strict), each pod on a node where its app never ran. Same run,
/// same nodes: the baseline is an app no policy covers (the node's agent
/// must only learn the pod); then order-service, whose connection to
/// payment needs the pair (payment, order, that node) authenticated, its
/// SVID already on the node. Returns the table.
#[allow(dead_code)]
pub(crate) async fn first_connection_bench(repeats: usize) -> String {
    let spares: Vec<String> = (0..repeats).map(|i| format!("new-{i}")).collect();
    let mut names = vec!["node-a".to_owned(), "node-b".to_owned()];
    names.extend(spares.iter().cloned());
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut c = Cluster::start_on("k8sfc", 79, &refs).await;
    c.agent_flags = vec!["--unknown-pods".into(), "drop".into()];
    let _order_a = c.add_pod("node-a", "order-a", "order-service").await;
    let pay_b = c.add_pod("node-b", "pay-b", "payment-service").await;
    let discovery = Discovery::new(c.admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let policy: serde_json::Value =
        serde_json::from_str(PAYMENT_POLICY).unwrap_or_else(|e| panic!("{e}"));
    apply(&c.admin, &discovery, &policy, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for n in &names {
        c.start_agent(n).await;
    }
    let order = c.identity_of("order-service").await;
    let payment = c.identity_of("payment-service").await;
    let sid = |n: u32| {
        spire_dev::SpiffeId::parse(&format!("spiffe://meshauth.local/identity/{n}"))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    c.spire
        .add_entry(spire_dev::EntrySpec::new("node-a", sid(order)))
        .unwrap_or_else(|e| panic!("{e}"));
    c.spire
        .add_entry(spire_dev::EntrySpec::new("node-b", sid(payment)))
        .unwrap_or_else(|e| panic!("{e}"));
    c.wait_entries("node-b", &[(payment, order, "node-a")])
        .await;
    let mut server = c
        .lab
        .start_pod_process(&pay_b)
        .unwrap_or_else(|e| panic!("{e}"));
    server.serve(8080).unwrap_or_else(|e| panic!("{e}"));
    let to = std::net::IpAddr::from(pay_b.ipv4);
    let (mut base, mut auth, mut entries) = (Vec::new(), Vec::new(), Vec::new());
    for (i, node) in spares.iter().enumerate() {
        // order's SVID on the new node, before anything else happens there.
        c.spire
            .add_entry(spire_dev::EntrySpec::new(node, sid(order)))
            .unwrap_or_else(|e| panic!("{e}"));
        let api = c.agent_api(node);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let s: Option<auth_agent::api::types::AgentStatus> =
                api.get_json("/v1/status").await.ok();
            if s.is_some_and(|s| s.ready.all() && s.spire.svids >= 1) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{node}: not ready with order's SVID in 20 s{}",
                c.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (b, _) = first_connection(
            &mut c,
            node,
            &format!("refund-{i}"),
            "refund-service",
            to,
            None,
        )
        .await;
        base.push(b);
        let (a, e) = first_connection(
            &mut c,
            node,
            &format!("order-{i}"),
            "order-service",
            to,
            Some((payment, order)),
        )
        .await;
        auth.push(a);
        entries.push(e.unwrap_or_default());
    }
    let ms = |d: &std::time::Duration| d.as_secs_f64() * 1000.0;
    let row = |name: &str, v: &[std::time::Duration]| {
        let mut s: Vec<f64> = v.iter().map(ms).collect();
        s.sort_by(f64::total_cmp);
        format!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {} |",
            s.len(),
            s[s.len() / 2],
            s[0],
            s[s.len() - 1],
            s.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    [
        "New pod → first successful connection, agents in Kubernetes mode on a real kube-apiserver (ms from the pod status patch returning)".to_owned(),
        String::new(),
        "| case | pods | median | min | max | each |".into(),
        "| --- | ---: | ---: | ---: | ---: | --- |".into(),
        row("baseline: app without policy (the node's agent learns the pod)", &base),
        row(
            "order-service → payment, authentication required: first connection with the pair in node-b's map",
            &auth,
        ),
        row("  of which: publication → the pair in node-b's auth map", &entries),
    ]
    .join("\n")
}

/// The API server down for 45 s under traffic (chaos: the policy source
/// unavailable for longer than a restart): the agents keep their last good
/// desired state — the stream order-a → pay-b loses nothing, node-b keeps
/// exactly its entry, nothing is collected — and say the watch failed; once
/// the API server is back they relist (within the watchers' backoff, at
/// most 30 s) and follow a change made after it (a new order pod on node-c
/// gets its pair and connects).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_api_server_outage_keeps_the_last_good_state() {
    let _one_at_a_time = API_SERVERS.lock().await;
    let nodes = ["node-a", "node-b", "node-c"];
    let mut c = Cluster::start_on("k8sout", 80, &nodes).await;
    let order_a = c.add_pod("node-a", "order-a", "order-service").await;
    let pay_b = c.add_pod("node-b", "pay-b", "payment-service").await;
    let discovery = Discovery::new(c.admin.clone())
        .run()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let policy: serde_json::Value =
        serde_json::from_str(PAYMENT_POLICY).unwrap_or_else(|e| panic!("{e}"));
    apply(&c.admin, &discovery, &policy, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for n in nodes {
        c.start_agent(n).await;
    }
    let order = c.identity_of("order-service").await;
    let payment = c.identity_of("payment-service").await;
    let sid = |n: u32| {
        spire_dev::SpiffeId::parse(&format!("spiffe://meshauth.local/identity/{n}"))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    for (node, id) in [("node-a", order), ("node-b", payment), ("node-c", order)] {
        c.spire
            .add_entry(spire_dev::EntrySpec::new(node, sid(id)))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    c.wait_entries("node-b", &[(payment, order, "node-a")])
        .await;
    let mut server = c
        .lab
        .start_pod_process(&pay_b)
        .unwrap_or_else(|e| panic!("{e}"));
    server.serve(8080).unwrap_or_else(|e| panic!("{e}"));
    let mut client = c
        .lab
        .start_pod_process(&order_a)
        .unwrap_or_else(|e| panic!("{e}"));
    let to = std::net::IpAddr::from(pay_b.ipv4);
    client
        .stream(
            "s",
            to,
            8080,
            std::time::Duration::from_millis(50),
            std::time::Duration::from_millis(500),
        )
        .unwrap_or_else(|e| panic!("{e}"));

    c.api.kill_apiserver();
    let down = std::time::Instant::now();
    // The agents notice: their watches fail and retry.
    let deadline = down + std::time::Duration::from_secs(30);
    while !c.log_all("node-b").contains("watch failed; retrying") {
        assert!(
            std::time::Instant::now() < deadline,
            "node-b never reported its watches failing{}",
            c.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // 45 s down in all, checking along the way that nothing moves.
    while down.elapsed() < std::time::Duration::from_secs(45) {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        c.wait_entries("node-b", &[(payment, order, "node-a")])
            .await;
        for n in nodes {
            assert!(
                c.agents
                    .get_mut(n)
                    .is_some_and(|ch| ch.try_wait().ok().flatten().is_none()),
                "agent {n} exited during the outage{}",
                c.logs()
            );
        }
    }
    let during = client.stream_stats("s").unwrap_or_else(|e| panic!("{e}"));
    let took = c.api.restart().await.unwrap_or_else(|e| panic!("{e}"));
    println!(
        "API server down {:?} (back in {took:?}); stream during the outage: {during:?}",
        down.elapsed()
    );
    assert!(during.ok > 500, "{during:?}");
    assert_eq!(during.failed, 0, "{during:?}{}", c.logs());
    assert_eq!(c.drops("node-b").await, 0, "drops during the outage");

    // Back: a change made now is followed, once each watch's backoff
    // (kube-runtime's default: up to 30 s after a long outage, so that
    // thousands of agents do not all return at once) lets it relist.
    let order_c = c.add_pod("node-c", "order-c", "order-service").await;
    let back = std::time::Instant::now();
    let want = [
        (payment, order, "node-a".to_owned()),
        (payment, order, "node-c".to_owned()),
    ];
    loop {
        let got: Vec<auth_agent::api::types::AuthEntry> = c
            .agent_api("node-b")
            .get_json("/v1/auth")
            .await
            .unwrap_or_default();
        let keys: Vec<(u32, u32, String)> = got
            .iter()
            .map(|e| (e.local, e.remote, e.node.clone().unwrap_or_default()))
            .collect();
        if want.iter().all(|w| keys.contains(w)) && keys.len() == want.len() {
            break;
        }
        assert!(
            back.elapsed() < std::time::Duration::from_secs(45),
            "node-b did not follow the change within 45 s of the API server's return: {keys:?}{}",
            c.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    println!(
        "the change made after the return followed in {:?}",
        back.elapsed()
    );
    let mut client_c = c
        .lab
        .start_pod_process(&order_c)
        .unwrap_or_else(|e| panic!("{e}"));
    client_c
        .connect(to, 8080, std::time::Duration::from_millis(500))
        .unwrap_or_else(|e| panic!("order-c → pay-b after the outage: {e}{}", c.logs()));
    let after = client.stream_stop("s").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after.failed, 0, "{after:?}{}", c.logs());
    assert_eq!(c.drops("node-b").await, 0);
}
