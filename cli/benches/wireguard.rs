//! WireGuard, measured on a kernel that has it: this machine's kernel does
//! not, so the bench boots Debian's kernel in qemu (the same harness as the
//! VM tests) and runs itself inside. Same run, same VM:
//!
//! 1. programming 1,000 peers onto an empty interface with the agent's
//!    planner and netlink code, against `wg setconf` (wireguard-tools)
//!    writing the same 1,000 peers; then one node joining the 1,000-node
//!    table: the agent's incremental step against a full rewrite of the
//!    1,001 peers as a replace-everything reconciler does (`wg setconf`) —
//!    time, netlink messages, peers touched;
//! 2. pod-to-pod TCP throughput and request/response latency across two
//!    lab nodes with real agents, WireGuard off and then on (ratio).
//!
//! `cargo bench -p meshauth-cli --bench wireguard` (root). Environment:
//! `RR_N` round trips per run (2000), `BULK_MB` per transfer (32),
//! `REPEATS` per condition (3), `SECTIONS` (`peers,traffic`).

#[path = "cluster/stats.rs"]
#[allow(
    dead_code,
    reason = "shared with the cluster bench, which uses all of it"
)]
mod stats;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use auth_agent::wireguard::key::{self, PublicKey};
use auth_agent::wireguard::netlink::Kernel;
use auth_agent::wireguard::plan::{self, Step};
use meshauth_lab::testbed::{Testbed, TestbedOptions};
use policy_bridge::{DesiredState, IpPrefix, NodeInfo};

const INNER: &str = "MESHAUTH_WG_BENCH_INNER";

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() -> ExitCode {
    if std::env::var_os(INNER).is_some() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(inner());
        return ExitCode::SUCCESS;
    }
    let exe = std::env::current_exe().unwrap();
    let mut vm = meshauth_test_support::vm::VmBuilder::new()
        .unwrap_or_else(|e| panic!("the VM harness cannot start: {e}"))
        .memory_mib(3072)
        .timeout(Duration::from_secs(3000))
        .env(INNER, "1");
    for k in ["RR_N", "BULK_MB", "REPEATS", "SECTIONS"] {
        if let Ok(v) = std::env::var(k) {
            vm = vm.env(k, v);
        }
    }
    let out = vm
        .run(&[exe.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("running the bench in the VM: {e}"));
    if out.status == 0 {
        // The tables, on stdout (scripts/bench takes stdout into
        // BENCHMARKS.md; the harness echoed the guest live on stderr).
        println!("```text\n{}", out.output.trim_matches('\n'));
        println!(
            "(VM: {}, kernel {}, boot {:?}, total {:?})\n```",
            out.accel,
            vm.kernel_release(),
            out.boot_time,
            out.total_time
        );
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "(VM: {}, kernel {}, boot {:?}, total {:?})",
            out.accel,
            vm.kernel_release(),
            out.boot_time,
            out.total_time
        );
        eprintln!("{}", out.output);
        ExitCode::FAILURE
    }
}

async fn inner() {
    let sections = std::env::var("SECTIONS").unwrap_or_else(|_| "peers,traffic".into());
    println!(
        "meshauth WireGuard bench, inside qemu ({} CPUs), kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    if sections.contains("peers") {
        peers().await;
    }
    if sections.contains("traffic") {
        traffic().await;
    }
}

/// A node table of `n` remote nodes (each with one address and one /24 of
/// pods) plus the local one.
fn table(n: u16, own: &PublicKey) -> BTreeMap<String, NodeInfo> {
    let mut out = BTreeMap::new();
    out.insert(
        "local".to_owned(),
        NodeInfo {
            name: "local".into(),
            handshake_addr: "10.255.255.254".parse().unwrap(),
            addresses: ["10.255.255.254".parse().unwrap()].into(),
            wireguard_key: Some(own.to_string()),
            pod_cidrs: Default::default(),
        },
    );
    for i in 0..n {
        let ip: IpAddr = format!("10.1.{}.{}", i / 250, i % 250 + 1).parse().unwrap();
        let k = key::ephemeral().unwrap().public_key();
        out.insert(
            format!("n{i:04}"),
            NodeInfo {
                name: format!("n{i:04}"),
                handshake_addr: ip,
                addresses: [ip].into(),
                wireguard_key: Some(k.to_string()),
                pod_cidrs: [IpPrefix::new(
                    format!("10.{}.{}.0", 100 + i / 250, i % 250)
                        .parse()
                        .unwrap(),
                    24,
                )
                .unwrap()]
                .into(),
            },
        );
    }
    out
}

/// Applies `steps` as the manager does.
async fn apply(k: &Kernel, index: u32, steps: &[Step], throwaway: &PublicKey) {
    if let Err((at, e)) = k.apply(steps, index, throwaway).await {
        panic!("step {at} ({:?}): {e}", steps[at]);
    }
}

fn setconf_text(private: &str, d: &plan::Desired) -> String {
    let mut t = format!("[Interface]\nPrivateKey = {private}\nListenPort = 51872\n");
    for (k, p) in &d.peers {
        t.push_str(&format!(
            "\n[Peer]\nPublicKey = {k}\nEndpoint = {}\nAllowedIPs = {}\n",
            p.endpoint,
            p.allowed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    t
}

fn wg_setconf(ifname: &str, conf: &str) -> Duration {
    let path = std::env::temp_dir().join(format!("{ifname}.conf"));
    std::fs::write(&path, conf).unwrap();
    let t = Instant::now();
    let out = Command::new("wg")
        .args(["setconf", ifname])
        .arg(&path)
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "wg setconf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

async fn peers() {
    let own_key = key::ephemeral().unwrap();
    let own = own_key.public_key();
    let throwaway = key::ephemeral().unwrap().public_key();
    let mut nodes = table(1000, &own);
    let state = DesiredState::default();
    let before = plan::desired("local", &own, &nodes, &state, 51871);
    assert_eq!(before.peers.len(), 1000);

    // The agent's code on an empty interface.
    let k = Kernel::connect("mabench0").unwrap();
    k.check_support().await.unwrap();
    let _ = k.delete_link().await;
    let index = k.ensure_link(1420).await.unwrap();
    k.configure(&own_key, 51871).await.unwrap();
    let empty = BTreeMap::new();
    let steps = plan::steps(&empty, &Default::default(), &before, true);
    let m0 = k.messages_sent();
    let t = Instant::now();
    apply(&k, index, &steps, &throwaway).await;
    let full_ours = t.elapsed();
    let full_msgs = k.messages_sent() - m0;
    let dump = k.device().await.unwrap();
    assert_eq!(dump.peers.len(), 1000, "the kernel holds the 1,000 peers");

    // One node joins.
    let joiner = key::ephemeral().unwrap().public_key();
    nodes.insert(
        "zz-new".into(),
        NodeInfo {
            name: "zz-new".into(),
            handshake_addr: "10.2.0.1".parse().unwrap(),
            addresses: ["10.2.0.1".parse().unwrap()].into(),
            wireguard_key: Some(joiner.to_string()),
            pod_cidrs: ["10.200.0.0/24".parse().unwrap()].into(),
        },
    );
    let after = plan::desired("local", &own, &nodes, &state, 51871);
    let current: BTreeMap<PublicKey, plan::PeerState> = dump
        .peers
        .iter()
        .map(|(k, p)| (*k, p.state.clone()))
        .collect();
    let routes = k.routes().await.unwrap();
    let t_plan = Instant::now();
    let join_steps = plan::steps(&current, &routes, &after, true);
    let plan_time = t_plan.elapsed();
    let touched = join_steps
        .iter()
        .filter(|s| matches!(s, Step::Upsert { .. } | Step::Remove(_)))
        .count();
    let m0 = k.messages_sent();
    let t = Instant::now();
    apply(&k, index, &join_steps, &throwaway).await;
    let join_ours = t.elapsed() + plan_time;
    let join_msgs = k.messages_sent() - m0;
    assert_eq!(k.device().await.unwrap().peers.len(), 1001);
    let _ = k.delete_rules_and_routes().await;
    k.delete_link().await.unwrap();

    // Baseline: wireguard-tools writing the same peers (a replace-everything
    // reconciler rewrites all of them when one node joins).
    let b = Kernel::connect("mabench1").unwrap();
    let _ = b.delete_link().await;
    b.ensure_link(1420).await.unwrap();
    let private = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(own_key.to_bytes())
    };
    let full_wg = wg_setconf("mabench1", &setconf_text(&private, &before));
    let join_wg = wg_setconf("mabench1", &setconf_text(&private, &after));
    b.delete_link().await.unwrap();

    println!();
    println!("Programming WireGuard peers (netlink into the kernel)");
    println!(
        "{:<46} {:>10} {:>10} {:>14}",
        "", "time ms", "messages", "peers touched"
    );
    println!(
        "{:<46} {:>10} {:>10} {:>14}",
        "1,000 peers, empty interface: meshauth",
        stats::ms(full_ours),
        full_msgs,
        1000
    );
    println!(
        "{:<46} {:>10} {:>10} {:>14}",
        "1,000 peers, empty interface: wg setconf",
        stats::ms(full_wg),
        "-",
        1000
    );
    println!(
        "{:<46} {:>10} {:>10} {:>14}",
        "1 node joins 1,000: meshauth (incremental)",
        stats::ms(join_ours),
        join_msgs,
        touched
    );
    println!(
        "{:<46} {:>10} {:>10} {:>14}",
        "1 node joins 1,000: wg setconf (rewrite all)",
        stats::ms(join_wg),
        "-",
        1001
    );
    println!(
        "(meshauth's messages include the 1,000 routes, one per message, pipelined 64 deep; the join's are its peer entry, the keepalive reset and its route; wg setconf programs no routes)"
    );
    assert_eq!(touched, 1, "a join touches exactly one peer");
    assert!(
        join_ours <= Duration::from_secs(1),
        "join took {join_ours:?}"
    );
}

async fn traffic() {
    let rr_n: usize = env_or("RR_N", 2000);
    let bulk: u64 = env_or::<u64>("BULK_MB", 32) * 1024 * 1024;
    let repeats: usize = env_or("REPEATS", 3);
    let mut tb = Testbed::start(TestbedOptions {
        prefix: "wgb".into(),
        nodes: vec!["node-a".into(), "node-b".into()],
        meshauth_bin: Some(meshauth_bin()),
        net: 62,
        ..TestbedOptions::default()
    })
    .await
    .unwrap();
    tb.add_pod("node-a", "client", "client").unwrap();
    tb.add_pod("node-b", "server", "server").unwrap();
    let server_info = tb.pod("server").unwrap().clone();
    let client_info = tb.pod("client").unwrap().clone();
    let mut results: BTreeMap<&str, (Vec<f64>, Vec<stats::Summary>)> = BTreeMap::new();
    for (label, on) in [("plain", false), ("WireGuard", true)] {
        for n in ["node-a", "node-b"] {
            tb.set_agent_args(n, vec!["--wireguard".into(), on.to_string()]);
        }
        for n in ["node-a", "node-b"] {
            tb.terminate_agent(n, Duration::from_secs(10));
            tb.start_agent(n).unwrap();
        }
        for n in ["node-a", "node-b"] {
            tb.wait_ready(n, Duration::from_secs(60)).await.unwrap();
            tb.wait_for("WireGuard state", Duration::from_secs(60), || async {
                let s = tb.status(n).await.ok()?;
                match (&s.wireguard, on) {
                    (Some(w), true) if w.peers.len() == 1 => Some(()),
                    (None, false) => Some(()),
                    _ => None,
                }
            })
            .await
            .unwrap();
        }
        let mut server = tb.lab().start_pod_process(&server_info).unwrap();
        server.serve(9000).unwrap();
        let mut client = tb.lab().start_pod_process(&client_info).unwrap();
        let to = IpAddr::V4(server_info.ipv4);
        client
            .connect_retry(to, 9000, Duration::from_secs(20))
            .unwrap();
        let entry = results.entry(label).or_default();
        for _ in 0..repeats {
            let t = client
                .bulk(to, 9000, bulk, Duration::from_secs(300))
                .unwrap();
            // Bytes went both ways: each direction carried `bulk`.
            entry.0.push(bulk as f64 * 8.0 / t.as_secs_f64() / 1e6);
            let rr = client.rr(to, 9000, meshauth_lab::Proto::Tcp, rr_n).unwrap();
            entry.1.push(stats::summarize(&rr));
        }
    }
    println!();
    println!(
        "Pod-to-pod across two nodes (TCP echo; {repeats} runs each, {} MiB per transfer each way, {rr_n} round trips per RR run)",
        bulk / 1024 / 1024
    );
    println!(
        "{:<12} {:>22} {:>16} {:>16}",
        "", "throughput Mbit/s", "RR p50 µs", "RR p99 µs"
    );
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[(v.len() - 1) / 2]
    };
    let mut rows = BTreeMap::new();
    for (label, (tp, rr)) in &results {
        let p50: Vec<f64> = rr.iter().map(|s| s.p50).collect();
        let p99: Vec<f64> = rr.iter().map(|s| s.p99).collect();
        println!(
            "{:<12} {:>22} {:>16} {:>16}",
            label,
            format!("{:.0} ({})", med(tp), stats::range(tp.iter().copied())),
            format!("{:.0}", med(&p50)),
            format!("{:.0}", med(&p99))
        );
        rows.insert(*label, (med(tp), med(&p50), med(&p99)));
    }
    let (p, w) = (rows["plain"], rows["WireGuard"]);
    println!(
        "{:<12} {:>22} {:>16} {:>16}",
        "WG / plain",
        format!("{:.2}", w.0 / p.0),
        format!("{:.2}", w.1 / p.1),
        format!("{:.2}", w.2 / p.2)
    );
}

fn meshauth_bin() -> std::path::PathBuf {
    // cargo builds the package's binaries before its benches.
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_meshauth"))
}
