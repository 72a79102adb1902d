//! Full mutual `meshauth/1` handshakes per second on one core: responder and
//! initiator in one process on a current-thread tokio runtime, over
//! loopback, with P-256 SVIDs from an rcgen CA. Prints a table beside
//! `openssl speed -seconds 3 ecdsap256` from the same run as the ceiling.
//!
//! `cargo bench -p auth-agent --bench handshake` (`HANDSHAKES=n` for the
//! sequential count, default 3000).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_agent::auth::store::MemoryAuthStore;
use auth_agent::handshake::{
    ClientOptions, HandshakeClient, HandshakeServer, Metrics, ServerOptions,
};
use auth_agent::nodes::NodeTable;
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[path = "common/handshake_fixture.rs"]
mod fixture;
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

fn main() {
    let n: usize = std::env::var("HANDSHAKES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (seq, conc, conc_n, conc_took) = rt.block_on(async {
        let (cache_a, cache_b) = caches();
        let d = desired(&[]);
        let nodes = NodeTable::in_memory("node-b");
        nodes.sync(&d.nodes).expect("nodes");
        let (_tx, rx) = watch::channel(Arc::new(d.clone()));
        let store = Arc::new(MemoryAuthStore::default());
        let mut opts = ServerOptions::new(SocketAddr::new(B, 0), cache_b, nodes, rx, store);
        opts.max_concurrent = 1024;
        let server = HandshakeServer::bind(opts, Metrics::default())
            .await
            .expect("bind");
        let port = server.local_addr().port();
        let shutdown = CancellationToken::new();
        let task = server.spawn(shutdown.clone());
        let mut copts = ClientOptions::new(cache_a, "node-a");
        copts.port = port;
        copts.source_addr = Some(A);
        let client = HandshakeClient::new(copts, Metrics::default());
        let peer = d.nodes["node-b"].clone();

        for _ in 0..200 {
            client
                .handshake(L, R, &peer)
                .await
                .expect("warm-up handshake");
        }
        let mut lat = Vec::with_capacity(n);
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            client.handshake(L, R, &peer).await.expect("handshake");
            lat.push(t.elapsed());
        }
        let seq_took = t0.elapsed();
        lat.sort();

        // 16 in flight on the same core.
        let conc_n = n;
        let t0 = Instant::now();
        let mut inflight = FuturesUnordered::new();
        let mut started = 0;
        let mut conc_lat = Vec::with_capacity(conc_n);
        while started < conc_n || !inflight.is_empty() {
            while started < conc_n && inflight.len() < 16 {
                let (c, p) = (client.clone(), peer.clone());
                inflight.push(async move {
                    let t = Instant::now();
                    c.handshake(L, R, &p).await.expect("handshake");
                    t.elapsed()
                });
                started += 1;
            }
            if let Some(t) = inflight.next().await {
                conc_lat.push(t);
            }
        }
        let conc_took = t0.elapsed();
        conc_lat.sort();
        shutdown.cancel();
        let _ = task.await;
        ((lat, seq_took), conc_lat, conc_n, conc_took)
    });
    let ((lat, seq_took), conc_lat) = (seq, conc);
    let rate = lat.len() as f64 / seq_took.as_secs_f64();
    let conc_rate = conc_n as f64 / conc_took.as_secs_f64();
    let us = |d: Duration| d.as_secs_f64() * 1e6;

    println!(
        "meshauth/1 full mutual handshakes, one core (current-thread runtime, client + server in one process, loopback, P-256 SVIDs)"
    );
    println!();
    println!("| run | handshakes | handshakes/s | p50 | p99 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| sequential (1 in flight) | {} | {:.0} | {:.0} µs | {:.0} µs |",
        lat.len(),
        rate,
        us(percentile(&lat, 0.5)),
        us(percentile(&lat, 0.99))
    );
    println!(
        "| 16 in flight | {} | {:.0} | {:.0} µs | {:.0} µs |",
        conc_n,
        conc_rate,
        us(percentile(&conc_lat, 0.5)),
        us(percentile(&conc_lat, 0.99))
    );
    match openssl_speed() {
        Some((sign, verify)) => {
            let two = 1.0 / (2.0 / sign + 2.0 / verify);
            let four = 1.0 / (2.0 / sign + 4.0 / verify);
            println!("| openssl speed ecdsap256 | | sign {sign:.0}/s, verify {verify:.0}/s | | |");
            println!("| ceiling: 2 signs + 2 verifies (ECDHE not counted) | | {two:.0} | | |");
            println!(
                "| ceiling: 2 signs + 4 verifies (CertificateVerify + chain, both sides) | | {four:.0} | | |"
            );
        }
        None => {
            println!("| openssl speed ecdsap256 | unavailable (openssl not installed?) | | | |")
        }
    }
}
