//! Pairs authenticated per second on one core: responder and initiator in
//! one process on a current-thread tokio runtime, over loopback, with P-256
//! SVIDs from an rcgen CA. The baseline is `meshauth/1` (sessions off on
//! both sides: a full mutual TLS handshake per pair); then `meshauth/2`,
//! where pairs after a session's first are proved over it. Each is run
//! sequentially, with 16 in flight, and paced (open loop) at 3,000 pairs/s,
//! latency counted from each pair's scheduled start. Prints a table beside
//! `openssl speed -seconds 3 ecdsap256` from the same run as the ceiling.
//!
//! `cargo bench -p auth-agent --bench handshake` (`HANDSHAKES=n` per run,
//! default 3000; `PLOT=path.svg` draws the latency distributions,
//! `LATENCIES=path` writes every latency as CSV).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_agent::auth::store::MemoryAuthStore;
use auth_agent::handshake::{
    ClientOptions, HandshakeClient, HandshakeServer, Metrics, ServerOptions,
};
use auth_agent::nodes::NodeTable;
use futures::FutureExt as _;
use futures::stream::{FuturesUnordered, StreamExt as _};
use policy_bridge::NodeInfo;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[path = "common/handshake_fixture.rs"]
mod fixture;
#[path = "common/plot.rs"]
mod plot;
use fixture::*;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `openssl speed -seconds 3 ecdsap256`: (sign/s, verify/s).
fn openssl_speed() -> Option<(f64, f64)> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-seconds", "3", "ecdsap256"])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // "256 bits ecdsa (nistp256)   0.0000s   0.0001s  40000.0  13000.0"
    match nums.as_slice() {
        [.., sign, verify] => Some((*sign, *verify)),
        _ => None,
    }
}

/// One run's latencies (sorted) and wall time.
struct Run {
    name: String,
    short: String,
    lat: Vec<Duration>,
    took: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.lat.len() as f64 / self.took.as_secs_f64()
    }
}

async fn sequential(
    client: &HandshakeClient,
    peer: &NodeInfo,
    n: usize,
) -> (Vec<Duration>, Duration) {
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        client.handshake(L, R, peer).await.expect("handshake");
        lat.push(t.elapsed());
    }
    (lat, t0.elapsed())
}

async fn in_flight(
    client: &HandshakeClient,
    peer: &NodeInfo,
    n: usize,
    depth: usize,
) -> (Vec<Duration>, Duration) {
    let t0 = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut started = 0;
    let mut lat = Vec::with_capacity(n);
    while started < n || !inflight.is_empty() {
        while started < n && inflight.len() < depth {
            let (c, p) = (client.clone(), peer.clone());
            inflight.push(async move {
                let t = Instant::now();
                c.handshake(L, R, &p).await.expect("handshake");
                t.elapsed()
            });
            started += 1;
        }
        if let Some(t) = inflight.next().await {
            lat.push(t);
        }
    }
    (lat, t0.elapsed())
}

/// `n` pairs started at `rate`/s whatever the answers; each latency runs
/// from the pair's scheduled start (so queueing counts). The pacer yields
/// instead of sleeping: tokio's timer has 1 ms granularity, which would
/// bunch the starts and add up to 1 ms to each latency.
async fn paced(
    client: &HandshakeClient,
    peer: &NodeInfo,
    n: usize,
    rate: f64,
) -> (Vec<Duration>, Duration) {
    let t0 = Instant::now();
    let mut tasks = FuturesUnordered::new();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let at = t0 + Duration::from_secs_f64(i as f64 / rate);
        while Instant::now() < at {
            while let Some(Some(done)) = tasks.next().now_or_never() {
                lat.push(done);
            }
            tokio::task::yield_now().await;
        }
        let (c, p) = (client.clone(), peer.clone());
        tasks.push(async move {
            c.handshake(L, R, &p).await.expect("handshake");
            at.elapsed()
        });
    }
    while let Some(done) = tasks.next().await {
        lat.push(done);
    }
    (lat, t0.elapsed())
}

fn main() {
    let n: usize = std::env::var("HANDSHAKES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let runs = rt.block_on(async {
        let mut runs = Vec::new();
        for sessions in [false, true] {
            let (cache_a, cache_b) = caches();
            let d = desired(&[]);
            let nodes = NodeTable::in_memory("node-b");
            nodes.sync(&d.nodes).expect("nodes");
            let (_tx, rx) = watch::channel(Arc::new(d.clone()));
            let store = Arc::new(MemoryAuthStore::default());
            let mut opts = ServerOptions::new(SocketAddr::new(B, 0), cache_b, nodes, rx, store);
            opts.max_concurrent = 4096;
            // Paced beyond its capacity, meshauth/1 holds more than the
            // default 16 connections from one node.
            opts.max_per_source = 4096;
            opts.sessions = sessions;
            let server = HandshakeServer::bind(opts, Metrics::default())
                .await
                .expect("bind");
            let port = server.local_addr().port();
            let shutdown = CancellationToken::new();
            let task = server.spawn(shutdown.clone());
            let mut copts = ClientOptions::new(cache_a, "node-a");
            copts.port = port;
            copts.source_addr = Some(A);
            copts.sessions = sessions;
            let client = HandshakeClient::new(copts, Metrics::default());
            let peer = d.nodes["node-b"].clone();
            let (name, short) = if sessions {
                ("meshauth/2 (session, pair proofs)", "meshauth/2")
            } else {
                (
                    "baseline: meshauth/1 (full handshake per pair)",
                    "meshauth/1 (baseline)",
                )
            };

            for _ in 0..200 {
                client
                    .handshake(L, R, &peer)
                    .await
                    .expect("warm-up handshake");
            }
            let (lat, took) = sequential(&client, &peer, n).await;
            runs.push(Run {
                name: format!("{name}, sequential"),
                short: format!("{short}, sequential"),
                lat,
                took,
            });
            let (lat, took) = in_flight(&client, &peer, n, 16).await;
            runs.push(Run {
                name: format!("{name}, 16 in flight"),
                short: format!("{short}, 16 in flight"),
                lat,
                took,
            });
            let (lat, took) = paced(&client, &peer, n, 3000.0).await;
            runs.push(Run {
                name: format!("{name}, paced at 3,000/s"),
                short: format!("{short}, paced at 3,000/s"),
                lat,
                took,
            });
            shutdown.cancel();
            let _ = task.await;
        }
        runs
    });
    let us = |d: Duration| d.as_secs_f64() * 1e6;

    println!(
        "Pairs authenticated on one core (current-thread runtime, client + server in one process, loopback, P-256 SVIDs)"
    );
    println!();
    println!("| run | pairs | pairs/s | p50 | p99 | max |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for run in &runs {
        let mut lat = run.lat.clone();
        lat.sort();
        println!(
            "| {} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs |",
            run.name,
            lat.len(),
            run.rate(),
            us(percentile(&lat, 0.5)),
            us(percentile(&lat, 0.99)),
            us(*lat.last().expect("latencies")),
        );
    }
    if let Ok(path) = std::env::var("PLOT") {
        let series: Vec<_> = runs
            .iter()
            .map(|r| (r.short.clone(), r.lat.clone()))
            .collect();
        let svg = plot::cdf_svg(
            "Pairs authenticated on one core: latency distribution",
            &series,
        );
        std::fs::write(&path, svg).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    if let Ok(path) = std::env::var("LATENCIES") {
        let mut csv = String::from("run,latency_us\n");
        for run in &runs {
            for l in &run.lat {
                csv.push_str(&format!("{},{:.1}\n", run.name, us(*l)));
            }
        }
        std::fs::write(&path, csv).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    match openssl_speed() {
        Some((sign, verify)) => {
            let two = 1.0 / (2.0 / sign + 2.0 / verify);
            let four = 1.0 / (2.0 / sign + 4.0 / verify);
            println!(
                "| openssl speed ecdsap256 | | sign {sign:.0}/s, verify {verify:.0}/s | | | |"
            );
            println!(
                "| ceiling: 2 signs + 2 verifies (a pair proof, both sides) | | {two:.0} | | | |"
            );
            println!(
                "| ceiling: 2 signs + 4 verifies (CertificateVerify + chain, both sides) | | {four:.0} | | | |"
            );
        }
        None => {
            println!("| openssl speed ecdsap256 | unavailable (openssl not installed?) | | | | |")
        }
    }
}
