//! Real agent processes on a lab cluster (network namespaces,
//! veth, a bridge, cgroups; spire-dev in-process), measured from pod
//! workloads:
//!
//! 1. pod-to-pod request/response latency across two nodes without
//!    meshauth, with meshauth attached and no policy, and with auth required
//!    and pre-authenticated — same lab, same pod pair, interleaved rounds;
//! 2. time to the first successful connection under an auth-required
//!    policy: a known pre-authenticated peer and a new pod on a node where
//!    its workload did not run, each against the same measurement without
//!    policy;
//! 3. one agent's RSS with 1,000 identities and 100 nodes in desired state,
//!    against the same agent with an empty cluster, and against the same
//!    agent code run as `meshauth agent` (the all-in-one binary);
//! 4. the binaries' sizes.
//!
//! `cargo build --release --bin meshauth-agent && cargo bench -p
//! meshauth-cli --bench cluster` (root). Environment: `RR_N` round trips
//! per run (20000), `RR_WARMUP` (2000), `ROUNDS` of (a, b, c) (3),
//! `RR_REPEATS` runs per condition and round (2), `CONNECT_REPEATS` (5),
//! `SECTIONS` (`latency,connect,rss,size`), `MESHAUTH_AGENT_BIN`,
//! `OLD_MESHAUTH_BIN` (see the sections).

#[path = "cluster/connect.rs"]
mod connect;
#[path = "cluster/latency.rs"]
mod latency;
#[path = "cluster/rss.rs"]
mod rss;
#[path = "cluster/size.rs"]
mod size;
#[path = "cluster/stats.rs"]
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use meshauth_lab::testbed::{Testbed, TestbedOptions};

/// Bench settings from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rr_n: usize,
    pub warmup: usize,
    pub rounds: usize,
    pub repeats: usize,
    pub connect_repeats: usize,
    pub sections: Vec<String>,
}

fn env_num(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("{name}={v:?}: want a positive integer")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let sections: Vec<String> = std::env::var("SECTIONS")
            .unwrap_or_else(|_| "latency,connect,rss,size".into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(bad) = sections
            .iter()
            .find(|s| !["latency", "connect", "rss", "size"].contains(&s.as_str()))
        {
            anyhow::bail!("SECTIONS: unknown section {bad:?}; want latency, connect, rss, size");
        }
        Ok(Self {
            rr_n: env_num("RR_N", 20_000)?,
            warmup: env_num("RR_WARMUP", 2_000)?,
            rounds: env_num("ROUNDS", 3)?,
            repeats: env_num("RR_REPEATS", 2)?,
            connect_repeats: env_num("CONNECT_REPEATS", 5)?,
            sections,
        })
    }

    fn wants(&self, s: &str) -> bool {
        self.sections.iter().any(|x| x == s)
    }
}

/// Testbed options for this bench: the `meshauth` binary cargo built.
pub fn options(prefix: &str, nodes: &[&str]) -> TestbedOptions {
    TestbedOptions {
        prefix: prefix.into(),
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
        poll_interval: std::env::var("POLL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
            .unwrap_or(TestbedOptions::default().poll_interval),
        ..TestbedOptions::default()
    }
}

/// Polls `node`'s agent status every 20 ms until `ok` holds.
pub async fn wait_status(
    tb: &Testbed,
    node: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&auth_agent::api::types::AgentStatus) -> bool,
) -> anyhow::Result<auth_agent::api::types::AgentStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = tb.status(node).await;
        if let Ok(s) = &last
            && ok(s)
        {
            return Ok(s.clone());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "{node}: {what}: not within {timeout:?}; last status {last:?}; agent log:\n{}",
                tb.log_tail(node, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    if !is_root() {
        eprintln!(
            "cluster bench: needs root (network namespaces, cgroups, BPF); run it as root: \
             sudo -E cargo bench -p meshauth-cli --bench cluster"
        );
        return ExitCode::FAILURE;
    }
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let s = Settings::from_env()?;
    println!("cluster bench: {s:?}");
    if s.wants("latency") || s.wants("connect") {
        let mut c = latency::Cluster::start(&s).await?;
        if s.wants("latency") {
            let r = latency::run(&mut c, &s).await?;
            latency::print(&r, &s);
        }
        if s.wants("connect") {
            let r = connect::run(&mut c, &s).await?;
            connect::print(&r);
        }
        // Drop: agents, namespaces, cgroups and pins go.
    }
    if s.wants("rss") {
        let r = rss::run().await?;
        rss::print(&r);
    }
    if s.wants("size") {
        size::print(&size::run()?);
    }
    Ok(())
}
