//! `meshauth spire reconcile`: keeps the SPIRE server's registration
//! entries as meshauth wants them, through the Entry API on the server's
//! admin socket (run it beside spire-server, as spire-controller-manager
//! runs).
//!
//! The identities and where their pods run come from the same manifest
//! directory the agents read, through the same policy engine (so identity
//! numbers agree). `--once` reconciles once and exits (0 clean, 1 some
//! entries refused, 2 the command failed); otherwise it reconciles on every
//! change of the directory and every `--resync`, which is what puts back
//! entries deleted or changed by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use policy_bridge::state::DesiredState;
use spire_config::entries::{
    Entry, Scope, Selection, Selector, Wanted, delegate_entries, desired, uid_refusals,
};
use spire_config::entry_api::{EntryClient, Report, reconcile};

/// `meshauth spire reconcile`.
#[derive(clap::Args, Debug)]
pub struct ReconcileArgs {
    /// The trust domain.
    #[arg(long)]
    pub trust_domain: String,
    /// The manifest directory the agents read (Pods, Nodes, policies).
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub manifests: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API server instead (in-cluster
    /// credentials, or KUBECONFIG): Pods, Nodes, Namespaces, the policy
    /// kinds and the MeshIdentity objects the agents allocate. Read only:
    /// a label set without a MeshIdentity yet gets no entry until an agent
    /// allocates it.
    #[arg(long)]
    pub kubernetes: bool,
    /// The identity state file (as an agent's `identities.json`); without
    /// it identities are numbered afresh, in the order the agents number
    /// them from the same directory.
    #[arg(long)]
    pub identity_file: Option<PathBuf>,
    /// The SPIRE server's admin socket (its `socket_path`).
    #[arg(long, default_value = "/run/spire/server/private/api.sock")]
    pub server_socket: PathBuf,
    /// `per-node` (least privilege: a node gets an identity only while it
    /// runs a pod of it) or `cluster-wide` (every node gets every identity).
    #[arg(long, default_value = "per-node", value_parser = ["per-node", "cluster-wide"])]
    pub scope: String,
    /// How nodes' SPIRE agents are attested, which sets the default
    /// `--node-parent`: `standalone` (join tokens aliased
    /// `spiffe://{trust_domain}/meshauth/node/{node}`) or `kubernetes`
    /// (k8s_psat: `spiffe://{trust_domain}/spire/agent/k8s_psat/{cluster}/{node_uid}`).
    #[arg(long, default_value = "standalone", value_parser = ["standalone", "kubernetes"])]
    pub deployment: String,
    /// Kubernetes: the cluster's name, as in the k8s_psat attestor.
    #[arg(long, default_value = "meshauth")]
    pub cluster: String,
    /// The parent of a node's entries (its SPIRE agent, or an alias of it);
    /// `{trust_domain}`, `{node}`, `{node_uid}` (the Node's metadata.uid)
    /// and `{cluster}` are replaced. Default: by `--deployment`.
    #[arg(long)]
    pub node_parent: Option<String>,
    /// `cluster-wide`: the alias every node's agent matches.
    #[arg(long, default_value = "spiffe://{trust_domain}/meshauth/nodes")]
    pub cluster_alias: String,
    /// What the entries select: `agent` (meshauth's agent process, which
    /// fetches its node's SVIDs on the Workload API) or `pods` (the pods
    /// themselves, for the agent's `--identity-source delegated-pods`: on
    /// Kubernetes by namespace and labels, standalone by the uid their
    /// containers run as, `securityContext.runAsUser`).
    #[arg(long, default_value = "agent", value_parser = ["agent", "pods"])]
    pub select: String,
    /// With `--select pods`: also register meshauth's own agents, on every
    /// node, as this SPIFFE ID (selected by `--agent-selector`) — the
    /// SPIRE agents' `authorized_delegates`.
    #[arg(long)]
    pub delegate_id: Option<String>,
    /// A selector meshauth's agent process matches on its node (Workload
    /// API mode), `type:value`; repeatable.
    #[arg(long = "agent-selector", default_values_t = ["unix:uid:0".to_owned(), "unix:path:/usr/local/bin/meshauth-agent".to_owned()])]
    pub agent_selectors: Vec<String>,
    /// X.509-SVID TTL of meshauth's entries (Go duration; 0: the server's
    /// default).
    #[arg(long, default_value = "0")]
    pub svid_ttl: String,
    /// Reconcile once and exit.
    #[arg(long)]
    pub once: bool,
    /// Without `--once`: reconcile at least this often (Go duration), to
    /// put back what was changed by hand.
    #[arg(long, default_value = "30s")]
    pub resync: String,
    /// ListEntries page size.
    #[arg(long, default_value_t = spire_config::entry_api::DEFAULT_PAGE_SIZE)]
    pub page_size: i32,
}

/// The settings, checked: every problem at once.
struct Plan {
    scope: Scope,
    node_parent: String,
    selection: Selection,
    /// meshauth's agents as delegates: their SPIFFE ID and selectors.
    delegate: Option<(String, BTreeSet<Selector>)>,
    svid_ttl: u32,
    resync: Duration,
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    match s.split_once(':') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok(Selector::new(k, v)),
        _ => Err(format!(
            "--agent-selector {s:?}: want type:value (e.g. unix:uid:0)"
        )),
    }
}

fn check(a: &ReconcileArgs) -> Result<Plan, Vec<String>> {
    let mut errs = Vec::new();
    let td = &a.trust_domain;
    let fill = |t: &str| t.replace("{trust_domain}", td);
    let mut selectors = BTreeSet::new();
    for s in &a.agent_selectors {
        match parse_selector(s) {
            Ok(sel) => {
                selectors.insert(sel);
            }
            Err(e) => errs.push(e),
        }
    }
    if selectors.is_empty() {
        errs.push(
            "at least one --agent-selector: an entry without selectors is refused by SPIRE".into(),
        );
    }
    let template = a.node_parent.clone().unwrap_or_else(|| {
        if a.deployment == "kubernetes" {
            "spiffe://{trust_domain}/spire/agent/k8s_psat/{cluster}/{node_uid}".to_owned()
        } else {
            "spiffe://{trust_domain}/meshauth/node/{node}".to_owned()
        }
    });
    let node_parent = fill(&template).replace("{cluster}", &a.cluster);
    if a.scope == "per-node"
        && !node_parent.contains("{node}")
        && !node_parent.contains("{node_uid}")
    {
        errs.push(format!(
            "--node-parent {template:?} has neither {{node}} nor {{node_uid}}: every node's entries would have the same parent"
        ));
    }
    for (flag, t) in [
        ("--node-parent", &node_parent),
        ("--cluster-alias", &fill(&a.cluster_alias)),
    ] {
        if !t.starts_with(&format!("spiffe://{td}/")) {
            errs.push(format!(
                "{flag} {t:?}: want a SPIFFE ID in trust domain {td} (spiffe://{td}/…)"
            ));
        }
    }
    let dur =
        |flag: &str, v: &str, errs: &mut Vec<String>| match meshauth_duration::parse_duration(v) {
            Ok(d) => d,
            Err(e) => {
                errs.push(format!("{flag} {v:?}: {e}"));
                Duration::ZERO
            }
        };
    if a.delegate_id.is_some() && a.select != "pods" {
        errs.push("--delegate-id goes with --select pods (the agents subscribe for the pods as SPIRE's delegates)".into());
    }
    if let Some(d) = &a.delegate_id
        && !d.starts_with(&format!("spiffe://{td}/"))
    {
        errs.push(format!(
            "--delegate-id {d:?}: want a SPIFFE ID in trust domain {td} (spiffe://{td}/…)"
        ));
    }
    let svid_ttl = dur("--svid-ttl", &a.svid_ttl, &mut errs);
    let resync = dur("--resync", &a.resync, &mut errs);
    if !a.once && resync.is_zero() && errs.is_empty() {
        errs.push("--resync must be above zero".into());
    }
    let svid_ttl = u32::try_from(svid_ttl.as_secs()).unwrap_or_else(|_| {
        errs.push(format!("--svid-ttl {:?} is too long", a.svid_ttl));
        0
    });
    if a.page_size <= 0 {
        errs.push(format!("--page-size {}: at least 1", a.page_size));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let scope = if a.scope == "cluster-wide" {
        Scope::ClusterWide {
            alias: fill(&a.cluster_alias),
        }
    } else {
        Scope::PerNode {
            agent_ids: BTreeMap::new(),
        }
    };
    Ok(Plan {
        scope,
        node_parent,
        delegate: a.delegate_id.clone().map(|d| (d, selectors.clone())),
        selection: match (a.select.as_str(), a.deployment.as_str()) {
            ("agent", _) => Selection::Agent(selectors),
            (_, "kubernetes") => Selection::Pods,
            // Filled from the pods' uids at each reconcile.
            _ => Selection::PodsByUid(BTreeMap::new()),
        },
        svid_ttl,
        resync,
    })
}

/// The entries meshauth wants for `state`.
fn wanted(a: &ReconcileArgs, p: &Plan, state: &DesiredState) -> BTreeMap<String, Entry> {
    let identities: BTreeMap<u32, BTreeSet<String>> = state
        .identities
        .iter()
        .map(|(n, i)| (*n, i.labels.clone()))
        .collect();
    let mut placements: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for e in state.endpoints.values() {
        placements
            .entry(e.identity)
            .or_default()
            .insert(e.node.clone());
    }
    let mut skipped = BTreeSet::new();
    let scope = match &p.scope {
        Scope::PerNode { .. } => Scope::PerNode {
            // Every node's (the delegates' entries go to nodes without pods too).
            agent_ids: placements
                .values()
                .flatten()
                .chain(state.nodes.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter_map(|n| {
                    let id = p.node_parent.replace("{node}", n);
                    if !id.contains("{node_uid}") {
                        return Some((n.clone(), id));
                    }
                    match state.node_uids.get(n) {
                        Some(uid) => Some((n.clone(), id.replace("{node_uid}", uid))),
                        None => {
                            skipped.insert(n.clone());
                            None
                        }
                    }
                })
                .collect(),
        },
        other => other.clone(),
    };
    for n in &skipped {
        // Whether the Node object itself was seen tells a Node without a
        // uid from a node only named by its pods' spec.nodeName.
        let seen = if state.nodes.contains_key(n) {
            "its Node object is known"
        } else {
            "no Node object of that name is known, only pods placed on it"
        };
        eprintln!(
            "meshauth spire reconcile: node {n} has no metadata.uid ({seen}; {} Nodes with a uid): its SPIRE agent's ID is unknown, so it gets no entries",
            state.node_uids.len()
        );
    }
    let selection = match &p.selection {
        Selection::PodsByUid(_) => {
            let run_as = pods_run_as(state);
            for r in uid_refusals(&run_as, &scope) {
                eprintln!("meshauth spire reconcile: {r}");
            }
            Selection::PodsByUid(run_as)
        }
        other => other.clone(),
    };
    let mut out = desired(&Wanted {
        trust_domain: &a.trust_domain,
        identities: &identities,
        placements: &placements,
        scope: &scope,
        selection: &selection,
        x509_svid_ttl: p.svid_ttl,
    });
    if let Some((delegate, selectors)) = &p.delegate {
        let parents: Vec<&String> = match &scope {
            Scope::PerNode { agent_ids } => agent_ids.values().collect(),
            Scope::ClusterWide { alias } => vec![alias],
        };
        out.extend(delegate_entries(delegate, parents, selectors, p.svid_ttl));
    }
    out
}

/// (identity, node) → the uids its pods there run as; pods whose spec
/// names no uid are named (nothing can select them).
fn pods_run_as(state: &DesiredState) -> BTreeMap<(u32, String), BTreeSet<u32>> {
    let mut out: BTreeMap<(u32, String), BTreeSet<u32>> = BTreeMap::new();
    let mut unknown = BTreeSet::new();
    for e in state.endpoints.values() {
        match state.pod_run_as.get(&e.pod) {
            Some(uids) => out
                .entry((e.identity, e.node.clone()))
                .or_default()
                .extend(uids),
            None => {
                unknown.insert(e.pod.as_str());
            }
        }
    }
    for pod in unknown {
        eprintln!(
            "meshauth spire reconcile: pod {pod} names no uid (securityContext.runAsUser): SPIRE's unix attestor cannot select it, so it gets no entry"
        );
    }
    out
}

fn print_report(r: &Report) {
    println!("{r}");
    for f in &r.failed {
        println!("  refused: {f}");
    }
}

pub fn run(a: &ReconcileArgs) -> ExitCode {
    let plan = match check(a) {
        Ok(p) => p,
        Err(errs) => {
            return super::super::fail(
                "spire reconcile",
                &format!(
                    "{} invalid setting(s):\n  {}",
                    errs.len(),
                    errs.join("\n  ")
                ),
            );
        }
    };
    match super::super::block_on(run_async(a, &plan)) {
        Ok(code) | Err(code) => code,
    }
}

async fn connect(a: &ReconcileArgs) -> Result<EntryClient, String> {
    EntryClient::connect(&a.server_socket, Duration::from_secs(10))
        .await
        .map(|c| c.with_page_size(a.page_size))
        .map_err(|e| e.to_string())
}

/// The cluster state's subscription: the Kubernetes API (read only) or the
/// manifest directory.
async fn subscribe(
    a: &ReconcileArgs,
) -> Result<(policy_bridge::Subscription, tokio::task::JoinHandle<()>), String> {
    if a.kubernetes {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("Kubernetes client: {e}"))?;
        let cfg = policy_bridge::source::kube::KubeConfig {
            read_only: true,
            ..Default::default()
        };
        return Ok(policy_bridge::source::kube::spawn(client, cfg).await);
    }
    let dir = a.manifests.clone().unwrap_or_default();
    let mut cfg = policy_bridge::source::files::FilesConfig::new(dir);
    cfg.identity_file.clone_from(&a.identity_file);
    policy_bridge::source::files::spawn(cfg).map_err(|e| e.to_string())
}

async fn run_async(a: &ReconcileArgs, p: &Plan) -> ExitCode {
    use policy_bridge::source::files::{FilesConfig, FilesSource};
    if a.once && a.kubernetes {
        return run_once_kubernetes(a, p).await;
    }
    let mut cfg = FilesConfig::new(a.manifests.clone().unwrap_or_default());
    cfg.identity_file.clone_from(&a.identity_file);
    if a.once {
        let mut src = match FilesSource::new(cfg) {
            Ok(s) => s,
            Err(e) => return super::super::fail("spire reconcile", &e),
        };
        if let Err(e) = src.sync() {
            return super::super::fail("spire reconcile", &e);
        }
        for e in src.errors() {
            eprintln!("meshauth spire reconcile: {e}");
        }
        return reconcile_once(a, &wanted(a, p, src.engine().state())).await;
    }
    let (mut sub, _task) = match subscribe(a).await {
        Ok(s) => s,
        Err(e) => return super::super::fail("spire reconcile", &e),
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => return super::super::fail("spire reconcile", &format!("SIGTERM handler: {e}")),
    };
    let mut client: Option<EntryClient> = None;
    let mut state = sub.synced().await.map(|s| s.state.clone());
    loop {
        if let Some(st) = &state {
            if client.is_none() {
                match connect(a).await {
                    Ok(c) => client = Some(c),
                    Err(e) => eprintln!(
                        "meshauth spire reconcile: {e}; trying again in {:?}",
                        p.resync
                    ),
                }
            }
            if let Some(c) = client.as_mut() {
                match reconcile(c, &wanted(a, p, st)).await {
                    Ok(r) => print_report(&r),
                    Err(e) => {
                        eprintln!(
                            "meshauth spire reconcile: {e}; trying again in {:?}",
                            p.resync
                        );
                        client = None;
                    }
                }
            }
        }
        tokio::select! {
            next = sub.next() => match next {
                Some((snap, _)) => state = Some(snap.state.clone()),
                None => return super::super::fail("spire reconcile", &"the cluster state source stopped"),
            },
            () = tokio::time::sleep(p.resync) => {}
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            _ = term.recv() => return ExitCode::SUCCESS,
        }
    }
}

/// `--once --kubernetes`: one full read of the API server, one reconcile.
async fn run_once_kubernetes(a: &ReconcileArgs, p: &Plan) -> ExitCode {
    let (mut sub, _task) = match subscribe(a).await {
        Ok(s) => s,
        Err(e) => return super::super::fail("spire reconcile", &e),
    };
    let Some(snap) = sub.synced().await else {
        return super::super::fail("spire reconcile", &"the Kubernetes source stopped");
    };
    reconcile_once(a, &wanted(a, p, &snap.state)).await
}

/// `--once`: connect, reconcile `want`, print the report; exit 0 clean, 1
/// some entries refused, 2 failed.
async fn reconcile_once(a: &ReconcileArgs, want: &BTreeMap<String, Entry>) -> ExitCode {
    let mut client = match connect(a).await {
        Ok(c) => c,
        Err(e) => return super::super::fail("spire reconcile", &e),
    };
    match reconcile(&mut client, want).await {
        Ok(r) => {
            print_report(&r);
            if r.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => super::super::fail("spire reconcile", &e),
    }
}
