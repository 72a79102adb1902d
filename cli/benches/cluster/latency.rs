//! Section 1: pod-to-pod request/response latency, order-1 on node-a to
//! payment-1 on node-b, in three conditions on the same lab and pod pair:
//! (a) no agents, nothing attached; (b) agents running and attached, pods
//! known, no policy; (c) auth required (TCP and UDP 8080) and the pair
//! pre-authenticated. Rounds of (a, b, c) so drift and noise show.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use meshauth_lab::testbed::Testbed;
use meshauth_lab::{PodInfo, PodProcess, Proto};

use crate::stats::{range, summarize};
use crate::{Settings, wait_status};

/// The policy of deploy/examples plus the same rule for UDP.
pub const POLICY: &str = include_str!("../../../deploy/examples/payment-requires-auth.yaml");
const POLICY_UDP: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: require-mutual-auth-udp
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: payment-service
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: order-service
      authentication:
        mode: required
      toPorts:
        - ports:
            - port: \"8080\"
              protocol: UDP
";

pub const PORT: u16 = 8080;
pub const ORDER_NODE: &str = "node-a";
pub const PAYMENT_NODE: &str = "node-b";

/// The lab, the pod pair and its workloads.
pub struct Cluster {
    pub tb: Testbed,
    pub client: PodProcess,
    pub _server: PodProcess,
    pub payment: PodInfo,
    pub order_id: u32,
    pub payment_id: u32,
    /// Nodes without pods, for new pods (section 2).
    pub spare: Vec<String>,
    pub policy: bool,
    pub agents: bool,
}

impl Cluster {
    /// node-a (order-1), node-b (payment-1), `connect_repeats` empty nodes;
    /// no agents running, no policy.
    pub async fn start(s: &Settings) -> anyhow::Result<Self> {
        let spare: Vec<String> = (1..=s.connect_repeats)
            .map(|i| format!("node-c{i}"))
            .collect();
        let mut nodes = vec![ORDER_NODE, PAYMENT_NODE];
        nodes.extend(spare.iter().map(String::as_str));
        let mut tb = Testbed::start(crate::options("bcl", &nodes))
            .await
            .context("starting the testbed")?;
        tb.add_pod(ORDER_NODE, "order-1", "order-service")?;
        let payment = tb.add_pod(PAYMENT_NODE, "payment-1", "payment-service")?;
        let order_id = tb.register("order-1")?;
        let payment_id = tb.register("payment-1")?;
        let mut server = tb.lab().start_pod_process(&payment)?;
        server.serve(PORT)?;
        let client = tb.lab().start_pod_process(tb.pod("order-1")?)?;
        Ok(Self {
            tb,
            client,
            _server: server,
            payment,
            order_id,
            payment_id,
            spare,
            policy: false,
            agents: false,
        })
    }

    pub fn payment_ip(&self) -> IpAddr {
        self.payment.ipv4.into()
    }

    /// Writes or removes the policy; with `wait`, until node-b's agent
    /// holds the rules (and, written, the pre-authenticated entry).
    pub async fn set_policy(&mut self, on: bool) -> anyhow::Result<()> {
        if on == self.policy {
            return Ok(());
        }
        if on {
            self.tb.write("policy.yaml", POLICY)?;
            self.tb.write("policy-udp.yaml", POLICY_UDP)?;
        } else {
            self.tb.unlink("policy.yaml")?;
            self.tb.unlink("policy-udp.yaml")?;
        }
        self.policy = on;
        if self.agents {
            self.wait_policy().await?;
        }
        Ok(())
    }

    async fn wait_policy(&self) -> anyhow::Result<()> {
        let on = self.policy;
        let t = Duration::from_secs(20);
        for n in [ORDER_NODE, PAYMENT_NODE] {
            wait_status(&self.tb, n, "policy rules", t, |s| {
                s.policy.synced
                    && s.policy.rejected == 0
                    && s.policy.rules == if on { 2 } else { 0 }
            })
            .await?;
        }
        if on {
            let (p, o) = (self.payment_id, self.order_id);
            self.tb
                .wait_for("node-b holds (payment, order, node-a)", t, || async {
                    let e = self.tb.auth_entries(PAYMENT_NODE).await.ok()?;
                    e.iter()
                        .any(|e| {
                            e.local == p && e.remote == o && e.node.as_deref() == Some(ORDER_NODE)
                        })
                        .then_some(())
                })
                .await?;
        }
        Ok(())
    }

    /// Starts (fresh datapath) or stops (datapath removed) the agents of
    /// node-a and node-b.
    pub async fn set_agents(&mut self, on: bool) -> anyhow::Result<()> {
        if on == self.agents {
            return Ok(());
        }
        for n in [ORDER_NODE, PAYMENT_NODE] {
            if on {
                self.tb.start_agent(n)?;
            } else {
                self.tb.stop_agent(n)?;
            }
        }
        self.agents = on;
        if on {
            for n in [ORDER_NODE, PAYMENT_NODE] {
                self.tb.wait_ready(n, Duration::from_secs(30)).await?;
            }
            self.wait_policy().await?;
        }
        Ok(())
    }
}

/// The conditions, in the order of a round.
pub const CONDITIONS: [(&str, &str); 3] = [
    ("a", "no meshauth (no agents, nothing attached)"),
    ("b", "meshauth attached, no policy"),
    ("c", "auth required, pre-authenticated"),
];

/// Samples per (condition, proto), one vector per run.
pub type Results = BTreeMap<(&'static str, &'static str), Vec<Vec<u64>>>;

fn protos() -> [(&'static str, Proto); 2] {
    [("TCP", Proto::Tcp), ("UDP", Proto::Udp)]
}

pub async fn run(c: &mut Cluster, s: &Settings) -> anyhow::Result<Results> {
    let mut out = Results::new();
    let to = c.payment_ip();
    for round in 0..s.rounds {
        for (cond, _) in CONDITIONS {
            match cond {
                "a" => {
                    c.set_policy(false).await?;
                    c.set_agents(false).await?;
                }
                "b" => {
                    c.set_policy(false).await?;
                    c.set_agents(true).await?;
                }
                _ => {
                    c.set_agents(true).await?;
                    c.set_policy(true).await?;
                }
            }
            // Let the agents settle after a transition (same for every condition).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let drops_before = drops(c).await;
            for (pname, proto) in protos() {
                tokio::task::block_in_place(|| c.client.rr(to, PORT, proto, s.warmup))
                    .with_context(|| format!("warm-up {pname} in ({cond})"))?;
            }
            for _ in 0..s.repeats {
                for (pname, proto) in protos() {
                    let v = tokio::task::block_in_place(|| c.client.rr(to, PORT, proto, s.rr_n))
                        .with_context(|| format!("{pname} round trips in ({cond})"))?;
                    out.entry((cond, pname)).or_default().push(v);
                }
            }
            let drops_after = drops(c).await;
            eprintln!(
                "round {round} ({cond}) done; node-b auth-required drops {drops_before:?} -> {drops_after:?}"
            );
            if drops_after != drops_before {
                anyhow::bail!("({cond}): packets dropped for auth during the runs");
            }
        }
    }
    Ok(out)
}

async fn drops(c: &Cluster) -> Option<u64> {
    if !c.agents {
        return None;
    }
    c.tb.status(PAYMENT_NODE)
        .await
        .ok()
        .map(|s| s.datapath.auth_required_drops)
}

pub fn print(r: &Results, s: &Settings) {
    println!(
        "\n### 1. Pod-to-pod request/response latency, node-a → node-b (µs)\n\n\
         {} rounds of (a, b, c), each condition {} runs × {} round trips per protocol and round \
         (after {} warm-up); one connection (TCP_NODELAY) or connected UDP socket per run, 8-byte echo.\n",
        s.rounds, s.repeats, s.rr_n, s.warmup
    );
    println!(
        "| condition | proto | round trips | p50 | p99 | p99.9 | mean | p50 per run (min–max) | p99 per run (min–max) |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (pname, _) in protos() {
        for (cond, label) in CONDITIONS {
            let Some(runs) = r.get(&(cond, pname)) else {
                continue;
            };
            let all: Vec<u64> = runs.iter().flatten().copied().collect();
            let t = summarize(&all);
            let per: Vec<_> = runs.iter().map(|v| summarize(v)).collect();
            println!(
                "| ({cond}) {label} | {pname} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
                t.n,
                t.p50,
                t.p99,
                t.p999,
                t.mean,
                range(per.iter().map(|x| x.p50)),
                range(per.iter().map(|x| x.p99)),
            );
        }
    }
    println!(
        "\n| proto | (b)−(a) p50 | (b)−(a) p99 | (c)−(a) p50 | goal p50 ≤ 10 µs | (c)−(a) p99 | goal p99 ≤ 30 µs |"
    );
    println!("| --- | ---: | ---: | ---: | --- | ---: | --- |");
    for (pname, _) in protos() {
        let sum = |cond| {
            r.get(&(cond, pname)).map(|runs| {
                let all: Vec<u64> = runs.iter().flatten().copied().collect();
                summarize(&all)
            })
        };
        let (Some(a), Some(b), Some(c)) = (sum("a"), sum("b"), sum("c")) else {
            continue;
        };
        let met = |d: f64, goal: f64| if d <= goal { "met" } else { "NOT met" };
        println!(
            "| {pname} | {:+.1} | {:+.1} | {:+.1} | {} | {:+.1} | {} |",
            b.p50 - a.p50,
            b.p99 - a.p99,
            c.p50 - a.p50,
            met(c.p50 - a.p50, 10.0),
            c.p99 - a.p99,
            met(c.p99 - a.p99, 30.0),
        );
    }
}
