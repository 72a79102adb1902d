//! Handshakes from a legitimate node while another node's address holds N
//! idle connections to the handshake port (`cargo bench -p auth-agent
//! --bench handshake_flood`; `FLOOD=n` idle connections, default 1000;
//! `HANDSHAKES=n` legitimate handshakes per run, default 300).
//!
//! node-b's responder listens on 127.0.0.2 with the default limits. node-c
//! (127.0.0.3, a known node, so its connections pass the address check)
//! keeps `FLOOD` connections open that send nothing: each one the server
//! closes is opened again at once. node-a (127.0.0.1) runs `HANDSHAKES`
//! sequential handshakes, each bounded by the 5 s handshake timeout. Three
//! runs in one process, printed as one table:
//!
//! - baseline: no flood;
//! - flood, defaults: per-source limit 16, TLS deadline 1 s;
//! - flood, limits off: per-source limit off and the TLS deadline equal to
//!   the overall timeout, which is how the responder behaved before.
//!
//! A multi-thread runtime with two workers (the bench machine has 2 vCPUs).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use auth_agent::auth::store::MemoryAuthStore;
use auth_agent::handshake::{
    ClientOptions, HandshakeClient, HandshakeServer, Limit, Metrics, ServerOptions,
};
use auth_agent::nodes::NodeTable;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[path = "common/handshake_fixture.rs"]
mod fixture;
use fixture::*;

const FLOODER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

#[derive(Clone, Copy, PartialEq)]
enum Run {
    Baseline,
    FloodDefaults,
    FloodLimitsOff,
}

impl Run {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline: no flood",
            Self::FloodDefaults => "flood, defaults (16 per source, TLS 1 s)",
            Self::FloodLimitsOff => "flood, limits off (as before: global 256 only, TLS = 5 s)",
        }
    }
}

struct Row {
    run: Run,
    ok: usize,
    total: usize,
    lat: Vec<Duration>,
    failures: BTreeMap<&'static str, usize>,
    flood_connects: u64,
    refused_per_source: u64,
    refused_global: u64,
}

/// One flooding connection, opened again each time the server closes it,
/// until `stop`.
async fn flooder(port: u16, stop: CancellationToken, connects: Arc<AtomicU64>) {
    let mut buf = [0u8; 64];
    while !stop.is_cancelled() {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(FLOODER, 0))
            .expect("bind 127.0.0.3");
        let mut tcp = match socket.connect(SocketAddr::new(B, port)).await {
            Ok(t) => t,
            Err(_) => {
                // Out of ports or backlog full: try again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        connects.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tcp.read(&mut buf) => {}
        }
    }
}

async fn run(which: Run, flood: usize, n: usize) -> Row {
    let (cache_a, cache_b) = caches();
    let d = desired(&[("node-c", FLOODER)]);
    let nodes = NodeTable::in_memory("node-b");
    nodes.sync(&d.nodes).expect("nodes");
    let (_tx, rx) = watch::channel(Arc::new(d.clone()));
    let store = Arc::new(MemoryAuthStore::default());
    let mut opts = ServerOptions::new(SocketAddr::new(B, 0), cache_b, nodes, rx, store);
    if which == Run::FloodLimitsOff {
        opts.max_per_source = usize::MAX;
        opts.tls_timeout = opts.handshake_timeout;
    }
    let metrics = Metrics::default();
    let server = HandshakeServer::bind(opts, metrics.clone())
        .await
        .expect("bind");
    let port = server.local_addr().port();
    let shutdown = CancellationToken::new();
    let task = server.spawn(shutdown.clone());

    let stop = CancellationToken::new();
    let connects = Arc::new(AtomicU64::new(0));
    let mut flooders = tokio::task::JoinSet::new();
    if which != Run::Baseline {
        for _ in 0..flood {
            flooders.spawn(flooder(port, stop.clone(), connects.clone()));
        }
        // The flood is in place once the server has accepted every connection once.
        while metrics.accepted.get() < flood as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    let mut copts = ClientOptions::new(cache_a, "node-a");
    copts.port = port;
    copts.source_addr = Some(A);
    let client = HandshakeClient::new(copts, Metrics::default());
    let peer = d.nodes["node-b"].clone();
    let mut lat = Vec::with_capacity(n);
    let mut failures = BTreeMap::new();
    for _ in 0..n {
        let t = Instant::now();
        match client.handshake(L, R, &peer).await {
            Ok(_) => lat.push(t.elapsed()),
            Err(e) => *failures.entry(e.label()).or_default() += 1,
        }
    }
    stop.cancel();
    while flooders.join_next().await.is_some() {}
    shutdown.cancel();
    let _ = task.await;
    lat.sort();
    Row {
        run: which,
        ok: lat.len(),
        total: n,
        lat,
        failures,
        flood_connects: connects.load(Ordering::Relaxed),
        refused_per_source: metrics.refused(Limit::PerSource),
        refused_global: metrics.refused(Limit::Global),
    }
}

fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (flood, n) = (env("FLOOD", 1000), env("HANDSHAKES", 300));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows: Vec<Row> = rt.block_on(async {
        let mut rows = Vec::new();
        for which in [Run::Baseline, Run::FloodDefaults, Run::FloodLimitsOff] {
            rows.push(run(which, flood, n).await);
        }
        rows
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "meshauth/1 handshakes from node-a (127.0.0.1) while node-c (127.0.0.3) holds {flood} idle connections to the responder (reopened when closed); {n} sequential handshakes per run; 2 tokio workers"
    );
    println!();
    println!(
        "| run | ok / total | success | p50 | p99 | max | failures | flood connects | closed per source | closed global |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |");
    for r in &rows {
        let pct = |p: f64| {
            if r.lat.is_empty() {
                "-".to_owned()
            } else {
                let i = ((r.lat.len() as f64 - 1.0) * p).round() as usize;
                format!("{:.2} ms", ms(r.lat[i.min(r.lat.len() - 1)]))
            }
        };
        println!(
            "| {} | {} / {} | {:.1} % | {} | {} | {} | {:?} | {} | {} | {} |",
            r.run.name(),
            r.ok,
            r.total,
            100.0 * r.ok as f64 / r.total as f64,
            pct(0.5),
            pct(0.99),
            pct(1.0),
            r.failures,
            r.flood_connects,
            r.refused_per_source,
            r.refused_global,
        );
    }
}
