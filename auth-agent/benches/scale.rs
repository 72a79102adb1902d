//! Scale beyond one machine, by simulation: one agent's view of a large
//! cluster, in-process. For each cluster size it compiles the whole cluster
//! (pods, namespaces, nodes, one policy per workload, and a hub policy
//! every identity must authenticate to), then takes what one agent holds:
//! the ipcache, its policy entries and the pairs it must keep
//! authenticated — for a typical node and for the hub's node — against the
//! datapath maps' capacities; and it runs the real auth manager through one
//! simulated hour (tokio's paused clock) with a zero-cost authenticator, to
//! count the handshakes of pre-authentication and re-authentication and to
//! measure the manager's own CPU and memory. The handshakes' CPU is their
//! count times the measured cost of one (BENCHMARKS.md, "meshauth/1
//! handshakes on one core": 2,451/s/core, about 408 µs), as the issue asks:
//! handshakes faked at their measured cost.
//!
//! The first row (500 nodes, 5,000 identities) is the same-run baseline.
//!
//! `cargo bench -p auth-agent --bench scale` (`MESHAUTH_SCALE=small` runs
//! only the baseline row).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use auth_agent::auth::manager::{AuthManager, ManagerConfig, ManagerInputs, ManagerMetrics};
use auth_agent::auth::store::MemoryAuthStore;
use auth_agent::auth::{AuthFailure, Authenticated, Authenticator};
use auth_agent::nodes::NodeTable;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use policy_bridge::model::parse_documents;
use policy_bridge::{Change, DesiredState, Engine, EngineConfig};
use svid_cache::{Clock, TokioClock};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live_mib() -> f64 {
    LIVE.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

/// This process's CPU time (user + system, from /proc/self/stat; 10 ms
/// ticks).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// Datapath map capacities (auth-ebpf/bpf/lib/*.h).
const IPCACHE_MAX: usize = 65_536;
const POLICY_MAX: usize = 65_536;
const AUTH_MAX: usize = 131_072;
/// The measured CPU of one meshauth/1 handshake (both sides' TLS 1.3 and
/// message exchange on one core).
const HANDSHAKE_CPU: Duration = Duration::from_micros(408);
const SVID_TTL: Duration = Duration::from_secs(3600);
const NAMESPACES: usize = 100;
const PODS_PER_IDENTITY: usize = 2;

struct Size {
    nodes: usize,
    identities: usize,
}

/// The cluster as YAML: `identities` workloads of two pods each, spread
/// over the nodes (workload w on nodes w and w + nodes/2), one policy per
/// workload (w's ingress on 8080 requires authentication from w + 1), and
/// the hub: workload 0, on node0 and node{nodes/2}, requires authentication
/// from every cluster identity (a CiliumClusterwideNetworkPolicy).
fn cluster(s: &Size) -> String {
    let mut y = String::with_capacity(s.identities * 1200);
    for ns in 0..NAMESPACES {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{ns}}}\n"
        );
    }
    for n in 0..s.nodes {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node{n}}}\nstatus: {{addresses: [{{type: InternalIP, address: 172.{}.{}.{}}}]}}\n",
            16 + n / 65536,
            (n / 256) % 256,
            n % 256
        );
    }
    let mut ip = 0usize;
    for w in 0..s.identities {
        let ns = w % NAMESPACES;
        for r in 0..PODS_PER_IDENTITY {
            let node = (w + r * (s.nodes / 2)) % s.nodes;
            ip += 1;
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: w{w}-{r}, namespace: ns{ns}, labels: {{app: w{w}}}}}\nspec: {{nodeName: node{node}, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.{}.{}.{}}}]}}\n",
                ip / 65536,
                (ip / 256) % 256,
                ip % 256
            );
        }
        let peer = (w + 1) % s.identities;
        let _ = write!(
            y,
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{w}, namespace: ns{ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: w{w}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: w{peer}, io.kubernetes.pod.namespace: ns{}}}}}]\n    authentication: {{mode: required}}\n    toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n",
            peer % NAMESPACES
        );
    }
    y.push_str("---\napiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: hub}\nspec:\n  endpointSelector: {matchLabels: {app: w0, io.kubernetes.pod.namespace: ns0}}\n  ingress:\n  - fromEndpoints: [{}]\n    authentication: {mode: required}\n    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n");
    y
}

struct Zero(Arc<dyn Clock>);

impl Authenticator for Zero {
    fn authenticate(
        &self,
        _local: u32,
        _remote: u32,
        node: policy_bridge::NodeInfo,
    ) -> BoxFuture<'static, Result<Authenticated, AuthFailure>> {
        let expiry = self.0.now() + SVID_TTL;
        async move {
            Ok(Authenticated {
                expiry,
                peer_node: node.name,
                peer_wireguard_key: None,
            })
        }
        .boxed()
    }
}

struct Hour {
    pairs: usize,
    handshakes: u64,
    manager_cpu: Duration,
    manager_mib: f64,
}

/// The real auth manager as `node` for one simulated hour.
fn one_hour(d: &DesiredState, node: &str) -> Hour {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let before = live_mib();
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(SystemTime::now()));
        let nodes = NodeTable::in_memory(node);
        nodes
            .sync(&d.nodes)
            .unwrap_or_else(|e| panic!("node table: {e}"));
        let store = Arc::new(MemoryAuthStore::default());
        let metrics = ManagerMetrics::default();
        let mgr = AuthManager::new(
            ManagerConfig::default(),
            Arc::new(Zero(clock.clone())),
            store.clone(),
            nodes,
            clock,
            metrics.clone(),
        );
        let (_desired_tx, desired) = watch::channel(Arc::new(d.clone()));
        let (_s, signals) = mpsc::channel(16);
        let (_r, rotations) = mpsc::channel(16);
        let (_w, sweep) = mpsc::channel(1);
        let token = CancellationToken::new();
        let started = cpu();
        let task = tokio::spawn({
            let token = token.clone();
            async move {
                let _ = mgr
                    .run(
                        ManagerInputs {
                            desired,
                            signals,
                            rotations,
                            sweep,
                        },
                        token,
                    )
                    .await;
            }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let mib = live_mib() - before;
        token.cancel();
        let _ = task.await;
        Hour {
            pairs: store.snapshot().len(),
            handshakes: metrics.handshakes("ok"),
            manager_cpu: cpu().saturating_sub(started),
            manager_mib: mib,
        }
    })
}

fn main() {
    let sizes: Vec<Size> = match std::env::var("MESHAUTH_SCALE").as_deref() {
        Ok("small") => vec![Size {
            nodes: 500,
            identities: 5_000,
        }],
        _ => vec![
            Size {
                nodes: 500,
                identities: 5_000,
            },
            Size {
                nodes: 5_000,
                identities: 50_000,
            },
        ],
    };
    println!(
        "scale simulation: one agent's view; {PODS_PER_IDENTITY} pods per identity; one policy per workload plus a hub every identity authenticates to; SVID TTL 1 h, re-authentication at 2/3; handshake CPU {} µs each (measured)\n",
        HANDSHAKE_CPU.as_micros()
    );
    let mut rows = Vec::new();
    for s in &sizes {
        let base = live_mib();
        let text = cluster(s);
        let t = Instant::now();
        let c0 = cpu();
        let mut e = Engine::new(EngineConfig::default(), Default::default());
        for r in parse_documents(&text, "scale") {
            let o = r.unwrap_or_else(|e| panic!("scale input: {e:?}"));
            e.apply(Change::Upsert(o)).unwrap_or_else(|e| panic!("{e}"));
        }
        e.commit();
        let compile = t.elapsed();
        let compile_cpu = cpu().saturating_sub(c0);
        drop(text);
        let d = e.state().clone();
        drop(e);
        let state_mib = live_mib() - base;
        let hub = "node0";
        let typical = format!("node{}", s.nodes / 4 + 1);
        for (what, node) in [("typical node", typical.as_str()), ("hub's node", hub)] {
            let nodes = NodeTable::in_memory(node);
            nodes
                .sync(&d.nodes)
                .unwrap_or_else(|e| panic!("node table: {e}"));
            let (ipcache, _) = auth_agent::datapath_sync::ipcache_for(&d, &nodes);
            let policy = auth_agent::datapath_sync::policy_for(&d, node);
            let required = d.required_pairs(node).len();
            let h = one_hour(&d, node);
            rows.push((
                format!("{} nodes, {} identities, {}", s.nodes, s.identities, what),
                compile,
                compile_cpu,
                state_mib,
                ipcache.len(),
                policy.len(),
                required,
                h,
            ));
        }
    }
    println!(
        "| cluster, agent | compile (wall / CPU, s) | desired state MiB | ipcache entries (cap {IPCACHE_MAX}) | policy entries (cap {POLICY_MAX}) | pairs required (auth map cap {AUTH_MAX}) | pairs written after 1 h | handshakes in 1 h (pre-auth + re-auth) | handshake CPU s/h (× 408 µs) | manager CPU s/h | manager MiB |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut breaks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (label, compile, ccpu, mib, ipc, pol, req, h) in &rows {
        println!(
            "| {label} | {:.1} / {:.1} | {mib:.0} | {ipc} | {pol} | {req} | {} | {} | {:.1} | {:.2} | {:.1} |",
            compile.as_secs_f64(),
            ccpu.as_secs_f64(),
            h.pairs,
            h.handshakes,
            (HANDSHAKE_CPU * h.handshakes as u32).as_secs_f64(),
            h.manager_cpu.as_secs_f64(),
            h.manager_mib
        );
        let b = breaks.entry(label.clone()).or_default();
        if *ipc > IPCACHE_MAX {
            b.push(format!("ipcache needs {ipc} > {IPCACHE_MAX}"));
        }
        if *pol > POLICY_MAX {
            b.push(format!("policy map needs {pol} > {POLICY_MAX}"));
        }
        if *req > AUTH_MAX {
            b.push(format!("auth map needs {req} > {AUTH_MAX}"));
        }
    }
    println!();
    for (label, b) in breaks {
        if b.is_empty() {
            println!("{label}: every map fits");
        } else {
            println!("{label}: BREAKS: {}", b.join("; "));
        }
    }
}
