//! Section 2: time to the first successful connection (connect + one echo,
//! attempts of 20 ms at most, one every 10 ms) from order-1 on node-a.
//!
//! - known: payment-1, known to every agent; under the policy the pair is
//!   pre-authenticated.
//! - new pod: a payment-service pod on a node where payment never ran
//!   (one empty node per repeat, so no agent holds anything for it): lab
//!   pod up and serving, SPIRE entry for (payment, node) registered (the
//!   node's SPIRE agent holds the SVID on return), then its manifest is
//!   written and order-1 starts connecting at once.
//!
//! Each without policy (baseline) and with auth required. For new pods a
//! watcher polls the new node's agent API every 2 ms and notes when it has
//! the pod (the manifest directory read; agents poll it every 100 ms) and
//! when the auth entry (payment, order, node-a) is in its map.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use auth_agent::api::ApiClient;
use auth_agent::api::types::{AgentStatus, AuthEntry};

use crate::latency::{Cluster, ORDER_NODE, PORT};
use crate::stats::{median, ms};

const DEADLINE: Duration = Duration::from_secs(5);

/// One attempt series.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub time: Duration,
    pub failed: u64,
    /// New pods: publish → the node's agent lists the endpoint.
    pub seen: Option<Duration>,
    /// New pods: publish → the auth entry is in the node's map.
    pub entry: Option<Duration>,
    /// New pods: publish → first success (bench clock).
    pub total: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct Results {
    pub base_known: Vec<Sample>,
    pub base_new: Vec<Sample>,
    pub auth_known: Vec<Sample>,
    pub auth_new: Vec<Sample>,
}

pub async fn run(c: &mut Cluster, s: &crate::Settings) -> anyhow::Result<Results> {
    let mut r = Results::default();
    c.set_agents(true).await?;
    c.set_policy(false).await?;
    for n in c.spare.clone() {
        c.tb.start_agent(&n)?;
    }
    for n in c.spare.clone() {
        c.tb.wait_ready(&n, Duration::from_secs(30)).await?;
    }
    let k = s.connect_repeats;
    r.base_known = known(c, k)?;
    for i in 0..k {
        let node = c.spare[i].clone();
        let name = format!("pay-base-{i}");
        let base = c.tb.status(&node).await?.policy.endpoints;
        r.base_new.push(new_pod(c, &node, &name, false).await?);
        // Leave the node as it was: no payment pod, no SVID.
        c.tb.remove_pod(&name)?;
        c.tb.unregister_identity(c.payment_id, &node)?;
        crate::wait_status(
            &c.tb,
            &node,
            "pod and SVID gone",
            Duration::from_secs(10),
            |st| st.spire.svids == 0 && st.policy.endpoints == base,
        )
        .await?;
    }
    c.set_policy(true).await?;
    r.auth_known = known(c, k)?;
    for i in 0..k {
        let node = c.spare[i].clone();
        let name = format!("pay-new-{i}");
        r.auth_new.push(new_pod(c, &node, &name, true).await?);
    }
    Ok(r)
}

fn known(c: &mut Cluster, k: usize) -> anyhow::Result<Vec<Sample>> {
    let to = c.payment_ip();
    (0..k)
        .map(|_| {
            let r = tokio::task::block_in_place(|| c.client.connect_retry(to, PORT, DEADLINE))
                .context("connecting to payment-1")?;
            Ok(Sample {
                time: r.time_to_success,
                failed: r.failed_attempts,
                seen: None,
                entry: None,
                total: None,
            })
        })
        .collect()
}

async fn new_pod(c: &mut Cluster, node: &str, name: &str, auth: bool) -> anyhow::Result<Sample> {
    let info = c.tb.add_lab_pod(node, name)?;
    let mut server = c.tb.lab().start_pod_process(&info)?;
    server.serve(PORT)?;
    c.tb.register_identity(c.payment_id, node)?;
    let before = c.tb.status(node).await?;
    let api = c.tb.api(node);
    let (p, o) = (c.payment_id, c.order_id);
    let t0 = Instant::now();
    let watcher = tokio::spawn(watch(api, before, p, o, auth, t0));
    c.tb.publish_pod(name, "payment-service")?;
    let to = info.ipv4.into();
    let r = tokio::task::block_in_place(|| c.client.connect_retry(to, PORT, DEADLINE))
        .with_context(|| format!("connecting to the new pod {name} on {node}"))?;
    let total = t0.elapsed();
    let (seen, entry) = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .context("the API watcher did not finish")??;
    drop(server);
    Ok(Sample {
        time: r.time_to_success,
        failed: r.failed_attempts,
        seen,
        entry,
        total: Some(total),
    })
}

/// When the agent listed one more endpoint, and (with `auth`) when its
/// map held (payment, order, node-a); since `t0`.
async fn watch(
    api: ApiClient,
    before: AgentStatus,
    p: u32,
    o: u32,
    auth: bool,
    t0: Instant,
) -> (Option<Duration>, Option<Duration>) {
    let (mut seen, mut entry) = (None, None);
    while t0.elapsed() < Duration::from_secs(5) {
        if seen.is_none()
            && let Ok(s) = api.get_json::<AgentStatus>("/v1/status").await
            && s.policy.endpoints > before.policy.endpoints
        {
            seen = Some(t0.elapsed());
        }
        if auth
            && entry.is_none()
            && let Ok(e) = api.get_json::<Vec<AuthEntry>>("/v1/auth").await
            && e.iter()
                .any(|e| e.local == p && e.remote == o && e.node.as_deref() == Some(ORDER_NODE))
        {
            entry = Some(t0.elapsed());
        }
        if seen.is_some() && (entry.is_some() || !auth) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (seen, entry)
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map(ms).unwrap_or_else(|| "–".into())
}

pub fn print(r: &Results) {
    println!(
        "\n### 2. Time to the first successful connection (ms; attempts of ≤ 20 ms every 10 ms)\n"
    );
    println!(
        "| scenario | policy | runs | first success: median | max | failed attempts (per run) |"
    );
    println!("| --- | --- | ---: | ---: | ---: | --- |");
    let row = |name: &str, pol: &str, v: &[Sample]| {
        if v.is_empty() {
            return;
        }
        let t: Vec<Duration> = v.iter().map(|s| s.time).collect();
        let f: Vec<String> = v.iter().map(|s| s.failed.to_string()).collect();
        println!(
            "| {name} | {pol} | {} | {} | {} | {} |",
            v.len(),
            ms(median(&t)),
            ms(*t.iter().max().expect("runs")),
            f.join(", ")
        );
    };
    row(
        "A: known pod (steady state)",
        "none (baseline)",
        &r.base_known,
    );
    row(
        "A: known pod, pre-authenticated",
        "auth required",
        &r.auth_known,
    );
    row("B: new pod on a new node", "none (baseline)", &r.base_new);
    row("B: new pod on a new node", "auth required", &r.auth_new);
    println!(
        "\nNew pods, each run (ms from writing the manifest): the node's agent lists the pod / \
         auth entry in its map / first success (bench clock) / first success (pod clock, from \
         the first attempt), failed attempts\n"
    );
    println!(
        "| policy | run | agent has the pod | auth entry written | first success (bench) | first success (pod) | failed attempts |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (pol, v) in [("none", &r.base_new), ("auth required", &r.auth_new)] {
        for (i, s) in v.iter().enumerate() {
            println!(
                "| {pol} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                opt_ms(s.seen),
                opt_ms(s.entry),
                opt_ms(s.total),
                ms(s.time),
                s.failed
            );
        }
    }
    if !r.auth_new.is_empty() {
        let t: Vec<Duration> = r.auth_new.iter().map(|s| s.time).collect();
        let m = median(&t);
        println!(
            "\nGoal: first connection to a new peer ≤ 50 ms under an auth-required policy: {} \
             (median {} ms, max {} ms).",
            if t.iter().all(|d| *d <= Duration::from_millis(50)) {
                "met"
            } else if m <= Duration::from_millis(50) {
                "met at the median, NOT for every run"
            } else {
                "NOT met"
            },
            ms(m),
            ms(*t.iter().max().expect("runs"))
        );
    }
}
