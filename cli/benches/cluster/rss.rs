//! Section 3: one real `meshauth agent` (on a one-node lab; the other 99
//! nodes are data only) with 1,000 identities and 100 nodes in desired
//! state, against the same agent with an empty cluster (just its Node).
//!
//! Loaded input: 99 Node objects with unroutable InternalIPs
//! (10.200.0.0/24), 1,000 pods each with its own `app` label (1,000
//! identities), 10 of them on the agent's node, the rest spread over the
//! 99 others; one CiliumClusterwideNetworkPolicy requiring auth from any
//! cluster endpoint to every endpoint on 8080/TCP (1,000 rules) and one
//! CiliumNetworkPolicy per app requiring auth from the next app on
//! 9090/TCP (1,000 rules). The local identities get SVIDs from spire-dev.
//! With every pair required, the agent tries to pre-authenticate its 10
//! identities with every remote one on every node — handshakes to
//! addresses without a route, which fail at once and are retried with
//! backoff; that churn is part of what is measured.
//!
//! RSS is read from /proc/<pid>/status once the agent is ready and its
//! status shows the full desired state, and again 10 s later (VmHWM: the
//! peak so far; RssAnon: heap and stacks; RssFile: the binary's pages and
//! other mapped files).
//!
//! The loaded case runs twice, same run: the production binary
//! `meshauth-agent`, and `meshauth agent` — the same agent code inside the
//! all-in-one `meshauth` binary (CLI, demo, lab, spire-dev, rcgen), as the
//! agent ran before the binaries were split. `meshauth-agent` is taken from
//! `MESHAUTH_AGENT_BIN`, else from beside the `meshauth` binary cargo built
//! (`cargo build --release --bin meshauth-agent` first).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use meshauth_lab::testbed::{NAMESPACE, Testbed};
use policy_bridge::source::files::{FilesConfig, FilesSource};

const NODE: &str = "node-a";
const FAKE_NODES: usize = 99;
const PODS: usize = 1000;
const LOCAL_PODS: usize = 10;
const SETTLE: Duration = Duration::from_secs(10);

/// Which binary runs the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// `meshauth-agent`.
    Agent,
    /// `meshauth agent`.
    AllInOne,
    /// `OLD_MESHAUTH_BIN agent`: the binary built before the split (and
    /// before the files source kept digests instead of objects).
    Old,
}

impl Binary {
    fn name(self) -> &'static str {
        match self {
            Self::Agent => "meshauth-agent",
            Self::AllInOne => "meshauth agent",
            Self::Old => "meshauth agent, before the split",
        }
    }
}

/// The `meshauth-agent` binary to measure.
pub fn agent_bin() -> anyhow::Result<std::path::PathBuf> {
    let path = match std::env::var_os("MESHAUTH_AGENT_BIN") {
        Some(p) => p.into(),
        None => {
            std::path::Path::new(env!("CARGO_BIN_EXE_meshauth")).with_file_name("meshauth-agent")
        }
    };
    anyhow::ensure!(
        path.is_file(),
        "{}: no meshauth-agent binary; build it first (cargo build --release --bin meshauth-agent) or set MESHAUTH_AGENT_BIN",
        path.display()
    );
    Ok(path)
}

#[derive(Debug, Clone)]
pub struct Row {
    pub case: &'static str,
    pub binary: Binary,
    pub identities: usize,
    pub endpoints: usize,
    pub nodes: usize,
    pub rules: usize,
    pub svids: usize,
    pub ready_after: Duration,
    pub rss_ready_kib: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub handshakes_failed: u64,
    pub ipcache: usize,
    pub policy_map: usize,
}

pub async fn run() -> anyhow::Result<Vec<Row>> {
    let mut rows = vec![
        measure(false, Binary::Agent).await?,
        measure(true, Binary::Agent).await?,
        measure(true, Binary::AllInOne).await?,
    ];
    if std::env::var_os("OLD_MESHAUTH_BIN").is_some() {
        rows.push(measure(true, Binary::Old).await?);
    }
    Ok(rows)
}

fn pod_ip(i: usize, net: u8, local_index: u8) -> IpAddr {
    if i < LOCAL_PODS {
        Ipv4Addr::new(10, net, local_index, (i + 2) as u8).into()
    } else {
        Ipv4Addr::new(10, 201, (i / 256) as u8, (i % 256) as u8).into()
    }
}

fn fake_node(n: usize) -> String {
    format!("fake-node-{n:03}")
}

/// Writes the loaded cluster; returns the local pods' addresses.
fn write_cluster(tb: &Testbed) -> anyhow::Result<Vec<IpAddr>> {
    let node = tb.node(NODE)?.clone();
    let net = tb.lab().net();
    let mut nodes = String::new();
    for n in 1..=FAKE_NODES {
        let _ = write!(
            nodes,
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n    - type: InternalIP\n      address: 10.200.0.{n}\n",
            fake_node(n)
        );
    }
    tb.write("fake-nodes.yaml", &nodes)?;
    let mut local = Vec::new();
    for chunk in 0..PODS / 100 {
        let mut pods = String::new();
        for i in chunk * 100..(chunk + 1) * 100 {
            let ip = pod_ip(i, net, node.index);
            let on = if i < LOCAL_PODS {
                local.push(ip);
                NODE.to_string()
            } else {
                fake_node((i - LOCAL_PODS) % FAKE_NODES + 1)
            };
            let _ = write!(
                pods,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i:04}\n  namespace: {NAMESPACE}\n  labels:\n    app: app-{i:04}\nspec:\n  nodeName: {on}\n  serviceAccountName: app-{i:04}\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n    - ip: {ip}\n"
            );
        }
        tb.write(&format!("pods-{chunk:02}.yaml"), &pods)?;
    }
    let mut pol = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: all-require-auth\nspec:\n  endpointSelector: {}\n  ingress:\n    - fromEndpoints:\n        - {}\n      authentication:\n        mode: required\n      toPorts:\n        - ports:\n            - port: \"8080\"\n              protocol: TCP\n",
    );
    if std::env::var("RSS_NO_CLUSTERWIDE").is_ok() {
        pol.clear();
    }
    for i in 0..PODS {
        let next = (i + 1) % PODS;
        let _ = write!(
            pol,
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: app-{i:04}-from-app-{next:04}\n  namespace: {NAMESPACE}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: app-{i:04}\n  ingress:\n    - fromEndpoints:\n        - matchLabels:\n            app: app-{next:04}\n      authentication:\n        mode: required\n      toPorts:\n        - ports:\n            - port: \"9090\"\n              protocol: TCP\n"
        );
    }
    tb.write("policies.yaml", &pol)?;
    Ok(local)
}

/// VmRSS, VmHWM, RssAnon and RssFile of `pid`, KiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64, u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{path}: no {name}"))
    };
    Ok((
        field("VmRSS:")?,
        field("VmHWM:")?,
        field("RssAnon:")?,
        field("RssFile:")?,
    ))
}

async fn measure(loaded: bool, binary: Binary) -> anyhow::Result<Row> {
    let mut opts = crate::options("brss", &[NODE]);
    // Kept until the testbed is dropped.
    let wrapper = tempfile::tempdir()?;
    match binary {
        Binary::Agent => opts.agent_bin = Some(agent_bin()?),
        Binary::AllInOne => {}
        Binary::Old => {
            let old = std::env::var("OLD_MESHAUTH_BIN").context("OLD_MESHAUTH_BIN")?;
            let script = wrapper.path().join("old-agent");
            std::fs::write(&script, format!("#!/bin/sh\nexec '{old}' agent \"$@\"\n"))?;
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            opts.agent_bin = Some(script);
        }
    }
    let mut tb = Testbed::start(opts)
        .await
        .context("starting the one-node testbed")?;
    let mut svids = 0;
    if loaded {
        let local = write_cluster(&tb)?;
        for ip in local {
            let id = tb.identity_at(ip)?;
            tb.register_identity(id, NODE)?;
            svids += 1;
        }
    }
    // What the agent must reach: the same compiler over the same directory.
    let mut expect = FilesSource::new(FilesConfig::new(tb.manifests()))?;
    expect.sync()?;
    let want = expect.engine().state().clone();
    let want_rejected = expect
        .engine()
        .status()
        .iter()
        .filter(|s| s.verdict == policy_bridge::Verdict::Rejected)
        .count();
    anyhow::ensure!(
        want_rejected == 0 && expect.errors().is_empty(),
        "the generated manifests do not compile cleanly: {} rejected, errors {:?}",
        want_rejected,
        expect.errors()
    );
    let started = Instant::now();
    tb.start_agent(NODE)?;
    tb.wait_ready(NODE, Duration::from_secs(60)).await?;
    let st = crate::wait_status(
        &tb,
        NODE,
        "the full desired state",
        Duration::from_secs(60),
        |s| {
            s.policy.synced
                && s.policy.rules == want.rules.len()
                && s.policy.endpoints == want.endpoints.len()
                && s.policy.identities >= want.identities.len()
                && s.spire.svids == svids
        },
    )
    .await?;
    let ready_after = started.elapsed();
    let pid = tb.agent_pid(NODE).context("the agent is not running")?;
    let (rss_ready_kib, ..) = memory(pid)?;
    tokio::time::sleep(SETTLE).await;
    let (rss_kib, hwm_kib, anon_kib, file_kib) = memory(pid)?;
    let end = tb.status(NODE).await?;
    anyhow::ensure!(
        tb.agent_running(NODE),
        "the agent exited:\n{}",
        tb.log_tail(NODE, 30)
    );
    Ok(Row {
        case: if loaded {
            "1,000 identities, 100 nodes, 2,000 rules"
        } else {
            "baseline: empty cluster (own Node only)"
        },
        binary,
        identities: st.policy.identities,
        endpoints: st.policy.endpoints,
        nodes: want.nodes.len(),
        rules: st.policy.rules,
        svids: st.spire.svids,
        ready_after,
        rss_ready_kib,
        rss_kib,
        hwm_kib,
        anon_kib,
        file_kib,
        handshakes_failed: end.handshakes.initiated_failed,
        ipcache: end.datapath.ipcache_entries,
        policy_map: end.datapath.policy_entries,
    })
    // Drop: agent killed, datapath detached, pins and cgroups removed.
}

pub fn print(rows: &[Row]) {
    println!(
        "\n### 3. Agent memory (MiB): one agent, RSS once ready with the full desired state and {} s later\n",
        SETTLE.as_secs()
    );
    println!(
        "| case | binary | identities | endpoints | nodes | rules | SVIDs | ready+synced after (s) | ipcache / policy map entries | failed handshakes in {} s | VmRSS at ready | VmRSS +{} s (anon + file) | VmHWM |",
        SETTLE.as_secs(),
        SETTLE.as_secs()
    );
    println!(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mib = |k: u64| k as f64 / 1024.0;
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {} / {} | {} | {:.1} | {:.1} ({:.1} + {:.1}) | {:.1} |",
            r.case,
            r.binary.name(),
            r.identities,
            r.endpoints,
            r.nodes,
            r.rules,
            r.svids,
            r.ready_after.as_secs_f64(),
            r.ipcache,
            r.policy_map,
            r.handshakes_failed,
            mib(r.rss_ready_kib),
            mib(r.rss_kib),
            mib(r.anon_kib),
            mib(r.file_kib),
            mib(r.hwm_kib),
        );
    }
    if let Some(l) = rows
        .iter()
        .find(|r| r.svids > 0 && r.binary == Binary::Agent)
    {
        let steady = mib(l.rss_kib);
        println!(
            "\nGoal: meshauth-agent steady RSS < 40 MiB with 1,000 identities, 100 nodes, 2,000 rules: {} ({:.1} MiB; peak {:.1} MiB).",
            if steady < 40.0 { "met" } else { "NOT met" },
            steady,
            mib(l.hwm_kib),
        );
    }
}
