//! `meshauth demo`: a three-node cluster in network namespaces on this
//! machine, with real `meshauth agent`s enforcing in the kernel, spire-dev
//! as SPIRE (one agent socket per node), and the example policies from
//! `deploy/examples/`. Narrated; every step checks what it shows; exits
//! non-zero if any expectation did not hold; removes everything on exit and
//! on Ctrl-C.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::PodProcess;
use crate::testbed::{Testbed, TestbedOptions, is_root};
use auth_agent::api::flows::render_line;
use auth_agent::api::types::{AuthEntry, FlowRecord};

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// SVID lifetime; short, so rotation and expiry happen while you watch.
    pub ttl: Duration,
    /// Run on real SPIRE (`spire-server`, `spire-agent` in this directory)
    /// instead of spire-dev.
    pub spire_bin: Option<std::path::PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(8),
            spire_bin: None,
        }
    }
}

const PAYMENT_POLICY: &str = include_str!("../../deploy/examples/payment-requires-auth.yaml");
const CLUSTER_POLICY: &str = include_str!("../../deploy/examples/cluster-wide-auth.yaml");

struct Checks {
    results: Vec<(String, bool, String)>,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool, detail: impl Into<String>) -> bool {
        let detail = detail.into();
        println!(
            "    {} {what}{}",
            if ok { "✔" } else { "✘" },
            if detail.is_empty() {
                String::new()
            } else {
                format!(" — {detail}")
            }
        );
        self.results.push((what.to_string(), ok, detail));
        ok
    }
}

fn step(n: u32, title: &str) {
    println!("\n==> {n}. {title}");
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Runs the demo; `Ok(true)` when every expectation held.
pub async fn run(opts: DemoOptions) -> Result<bool> {
    if !is_root() {
        bail!(
            "the demo builds network namespaces, cgroups and BPF programs: run it as root (sudo -E cargo run --release --bin meshauth -- demo)"
        );
    }
    let started = Instant::now();
    let mut checks = Checks {
        results: Vec::new(),
    };
    let mut tb = Testbed::start(TestbedOptions {
        prefix: "demo".into(),
        svid_ttl: opts.ttl,
        log: "info".into(),
        spire_bin: opts.spire_bin.clone(),
        ..TestbedOptions::default()
    })
    .await
    .context("building the demo cluster")?;
    let outcome = tokio::select! {
        r = scenario(&mut tb, &opts, &mut checks) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\nInterrupted: removing the demo cluster.");
            tb.teardown();
            return Ok(false);
        }
    };
    let logs = tb.paths("node-b").log;
    tb.teardown();
    if let Err(e) = outcome {
        println!("\nThe demo stopped: {e:#}");
        println!("(agent logs were in {})", logs.display());
        return Ok(false);
    }
    println!("\n==> Summary ({:.0} s)", started.elapsed().as_secs_f64());
    let failed = checks.results.iter().filter(|(_, ok, _)| !ok).count();
    for (what, ok, _) in &checks.results {
        println!("    {} {what}", if *ok { "✔" } else { "✘" });
    }
    println!(
        "    {} of {} expectations held. Namespaces, cgroups and BPF pins removed.",
        checks.results.len() - failed,
        checks.results.len()
    );
    Ok(failed == 0)
}

async fn scenario(tb: &mut Testbed, opts: &DemoOptions, c: &mut Checks) -> Result<()> {
    step(
        1,
        "A three-node cluster in network namespaces, one SPIRE agent socket per node",
    );
    match tb.spire().real() {
        Some(_) => println!(
            "    SPIRE: real SPIRE {} (spire-server, one spire-agent per node)",
            crate::spire_real::pinned_version().unwrap_or_default()
        ),
        None => println!("    SPIRE: spire-dev (embedded; --spire-bin DIR runs real SPIRE)"),
    }
    for n in tb.lab().nodes() {
        println!(
            "    {:<7} {} / {}  pods {}",
            n.name, n.ipv4, n.ipv6, n.pod_cidr_v4.addr
        );
    }
    let order = tb.add_pod("node-a", "order-1", "order-service")?;
    let payment = tb.add_pod("node-b", "payment-1", "payment-service")?;
    let inventory = tb.add_pod("node-c", "inventory-1", "inventory-service")?;
    tb.write("payment-requires-auth.yaml", PAYMENT_POLICY)?;
    tb.write("cluster-wide-auth.yaml", CLUSTER_POLICY)?;
    let order_id = tb.register("order-1")?;
    let payment_id = tb.register("payment-1")?;
    let inventory_id = tb.identity_of("inventory-1")?;
    println!(
        "    pods: production/order-1 on node-a ({}, identity {order_id}), production/payment-1 on node-b ({}, identity {payment_id}),",
        order.ipv4, payment.ipv4
    );
    println!(
        "          production/inventory-1 on node-c ({}, identity {inventory_id}) — registered with SPIRE: order and payment only",
        inventory.ipv4
    );
    println!("    policies (deploy/examples): payment-requires-auth.yaml, cluster-wide-auth.yaml");
    let (report, _) = policy_bridge::source::files::status_report(&tb.manifests(), false)?;
    for l in report.lines() {
        println!("      {l}");
    }
    println!(
        "    SVID lifetime {} s (SPIRE renews an SVID once less than half of its validity, 10 s backdate included, is left: with a TTL this short, at every sync)",
        opts.ttl.as_secs()
    );

    step(
        2,
        "One meshauth agent per node: eBPF on the node's pods cgroup, SVIDs from its SPIRE agent",
    );
    tb.start_agents().await?;
    for n in ["node-a", "node-b", "node-c"] {
        let s = tb.status(n).await?;
        println!(
            "    {n}: ready; {} SVID(s) from SPIRE, {} links attached, {} auth rule(s) in the datapath",
            s.spire.svids, s.datapath.links, s.datapath.policy_entries
        );
    }
    let (a, b, cc) = (
        tb.status("node-a").await?,
        tb.status("node-b").await?,
        tb.status("node-c").await?,
    );
    c.check(
        "each node holds only its own workloads' keys",
        a.spire.svids == 1 && b.spire.svids == 1 && cc.spire.svids == 0,
        format!(
            "node-a {}, node-b {}, node-c {}",
            a.spire.svids, b.spire.svids, cc.spire.svids
        ),
    );

    step(
        3,
        "Pre-authentication: the agents authenticate order → payment before any packet",
    );
    let want = |e: &AuthEntry| e.local == payment_id && e.remote == order_id;
    let entries = tb
        .wait_for("the pair's auth entry", Duration::from_secs(10), || async {
            let e = tb.auth_entries("node-b").await.ok()?;
            e.iter().any(want).then_some(e)
        })
        .await;
    match &entries {
        Ok(e) => {
            println!("    meshauth auth list (node-b):");
            for l in auth_agent::api::render::render_auth(e).lines() {
                println!("      {l}");
            }
        }
        Err(e) => println!("    {e}"),
    }
    c.check(
        "node-b holds (payment, order, node-a) before any traffic",
        entries.is_ok(),
        "mutual TLS 1.3 between the nodes' agents, each presenting its workload's SVID",
    );

    step(4, "order-1 → payment-1:8080 (TCP), authentication required");
    let mut server = blocking(|| tb.lab().start_pod_process(&payment))?;
    blocking(|| server.serve(8080))?;
    let mut client = blocking(|| tb.lab().start_pod_process(&order))?;
    let mut ok = 0;
    for addr in [IpAddr::from(payment.ipv4), IpAddr::from(payment.ipv6)] {
        match blocking(|| client.connect(addr, 8080, Duration::from_millis(500))) {
            Ok(t) => {
                ok += 1;
                println!(
                    "    {addr}: connected and echoed in {:.2} ms",
                    t.as_secs_f64() * 1e3
                )
            }
            Err(e) => println!("    {addr}: {e}"),
        }
    }
    let drops = tb.status("node-b").await?.datapath.auth_required_drops;
    c.check(
        "the authenticated flow passes at once, over IPv4 and IPv6",
        ok == 2 && drops == 0,
        format!("{ok}/2 connected, {drops} packets dropped"),
    );

    step(
        5,
        "inventory-1 → payment-1:8080: inventory has no SVID, so the pair cannot authenticate",
    );
    let mut intruder = blocking(|| tb.lab().start_pod_process(&inventory))?;
    let r = blocking(|| intruder.connect(payment.ipv4.into(), 8080, Duration::from_millis(1500)));
    println!(
        "    connect: {}",
        match &r {
            Ok(_) => "succeeded".to_string(),
            Err(e) => format!("failed ({e})"),
        }
    );
    let flows = dropped_flows(tb, "node-b").await;
    println!("    meshauth observe --verdict DROPPED (node-b):");
    for f in flows.iter().rev().take(3).rev() {
        println!("      {}", render_line(f));
    }
    let from_inventory = flows.iter().any(|f| {
        f.flow.ip.source == inventory.ipv4.to_string() && f.flow.drop_reason_desc == "AUTH_REQUIRED"
    });
    c.check(
        "the unauthenticated flow is dropped with \"Authentication required\"",
        r.is_err() && from_inventory,
        format!("{} drop(s) seen", flows.len()),
    );

    outage(tb, c, &mut client, &payment).await?;
    Ok(())
}

async fn dropped_flows(tb: &Testbed, node: &str) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    let _ = tb
        .api(node)
        .stream_lines("/v1/flows?verdict=DROPPED&last=50", |l| {
            if let Ok(r) = serde_json::from_str::<FlowRecord>(l) {
                out.push(r);
            }
            true
        })
        .await;
    out
}

async fn outage(
    tb: &mut Testbed,
    c: &mut Checks,
    client: &mut PodProcess,
    payment: &crate::PodInfo,
) -> Result<()> {
    step(6, "SPIRE server outage: SVIDs cannot rotate");
    tb.spire_mut().set_outage(true)?;
    let expiry = tb
        .auth_entries("node-b")
        .await?
        .iter()
        .filter(|e| e.node.as_deref() == Some("node-a"))
        .map(|e| e.remaining_seconds)
        .min()
        .unwrap_or(0);
    let svid_expiry = tb
        .status("node-b")
        .await?
        .spire
        .next_expiry
        .unwrap_or_default();
    println!(
        "    the pair's entry must not outlive the SVIDs: they expire at {svid_expiry} (~{expiry} s)"
    );
    let start = Instant::now();
    let mut passed_before = 0;
    let mut failed_before = 0;
    let mut first_drop: Option<Duration> = None;
    let mut said_overdue = false;
    // When the pair's entry expires, from the outage's start. Followed
    // until the first drop: an SVID issued just before the outage can reach
    // the agents after it began and extend the entry (with renewals every
    // second, as with TTLs this short, that is likely on a loaded machine).
    let mut expiry_at = Duration::from_secs(expiry.max(0) as u64);
    let addr: IpAddr = payment.ipv4.into();
    // (An entry that kept moving would be a bug: the loop ends at 60 s.)
    while start.elapsed() < (expiry_at + Duration::from_secs(4)).min(Duration::from_secs(60)) {
        if first_drop.is_none()
            && let Some(left) = tb
                .auth_entries("node-b")
                .await?
                .iter()
                .filter(|e| e.node.as_deref() == Some("node-a"))
                .map(|e| e.remaining_seconds)
                .min()
        {
            expiry_at = expiry_at.max(start.elapsed() + Duration::from_secs(left.max(0) as u64));
        }
        let r = blocking(|| client.connect(addr, 8080, Duration::from_millis(300)));
        let t = start.elapsed();
        let status = tb.status("node-b").await?;
        if status.spire.overdue_svids > 0 && !said_overdue {
            said_overdue = true;
            println!(
                "    t={:>4.1}s  meshauth status: WARNING {} SVID(s) past rotation time, still valid until {}",
                t.as_secs_f64(),
                status.spire.overdue_svids,
                status.spire.next_expiry.as_deref().unwrap_or("-")
            );
        }
        match r {
            Ok(_) if first_drop.is_none() => {
                passed_before += 1;
                println!(
                    "    t={:>4.1}s  order → payment passes (cached SVIDs still valid)",
                    t.as_secs_f64()
                );
            }
            Err(_) if first_drop.is_none() => {
                if t + Duration::from_secs(1) < expiry_at {
                    failed_before += 1;
                }
                first_drop = Some(t);
                println!(
                    "    t={:>4.1}s  order → payment DROPPED: the SVIDs expired, the entry with them",
                    t.as_secs_f64()
                );
            }
            _ => {}
        }
        if first_drop.is_some_and(|d| t > d + Duration::from_secs(1)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.check(
        "flows keep passing through the outage while the SVIDs are valid",
        passed_before > 0 && failed_before == 0,
        format!("{passed_before} connections passed"),
    );
    c.check(
        "the agent says the SVIDs are overdue for rotation",
        said_overdue,
        "",
    );
    c.check(
        "after the SVIDs expire, the flow is dropped",
        first_drop.is_some(),
        first_drop
            .map(|d| format!("first drop {:.1} s into the outage", d.as_secs_f64()))
            .unwrap_or_else(|| "never dropped".into()),
    );

    step(
        7,
        "SPIRE is back: fresh SVIDs, re-authentication, traffic recovers",
    );
    tb.spire_mut().set_outage(false)?;
    let back = Instant::now();
    let recovered = tb
        .wait_for("recovery", Duration::from_secs(20), || {
            let ok = blocking(|| client.connect(addr, 8080, Duration::from_millis(300))).is_ok();
            async move { ok.then_some(()) }
        })
        .await;
    let s = tb.status("node-b").await?;
    println!(
        "    node-b: SPIRE {}, {} SVID(s), next expiry {}",
        s.spire.state,
        s.spire.svids,
        s.spire.next_expiry.as_deref().unwrap_or("-")
    );
    c.check(
        "traffic recovers by itself when SPIRE returns",
        recovered.is_ok(),
        format!("in {:.1} s", back.elapsed().as_secs_f64()),
    );
    Ok(())
}
