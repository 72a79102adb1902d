//! Full-state updates from spire-dev to a ready cache, and memory per cached
//! identity. A bench binary (not a test): prints a table with the baseline
//! from the same run.
//!
//!   cargo bench -p svid-cache --bench full_state [-- SIZES...]   (default 1000 10000)
//!
//! Baseline: the `spiffe` crate's own Workload API client fetching and
//! parsing the same full state (`fetch_x509_context`) — what any Workload
//! API client pays — against the same spire-dev socket.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use spire_dev::{DevConfig, EntrySpec, SpiffeId, SpireDev};
use svid_cache::{
    CacheConfig, SvidCache, SvidInput, TrustBundle, TrustDomain, Update, WorkloadApiConfig,
    spawn_workload_api,
};
use tokio_util::sync::CancellationToken;

/// Counts live heap bytes, to measure what the cache holds.
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
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const RUNS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn wait_for(cache: &SvidCache, pred: impl Fn(&SvidCache) -> bool) {
    let mut generation = cache.watch_generation();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !pred(cache) {
        tokio::time::timeout_at(deadline, generation.changed())
            .await
            .expect("cache did not reach the expected state within 120 s")
            .expect("cache dropped");
    }
}

struct Row {
    n: usize,
    issue: Duration,
    raw: Duration,
    baseline: String,
    initial: Duration,
    one_added: Duration,
    all_rotated: Duration,
    per_identity_overhead: f64,
    cert_key_per_identity: f64,
}

async fn run(n: usize) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = DevConfig::new(dir.path());
    cfg.control_socket = false;
    cfg.nodes = vec!["node-a".into()];
    cfg.entries = (0..n)
        .map(|i| {
            EntrySpec::new(
                "node-a",
                SpiffeId::parse(&format!("spiffe://meshauth.local/identity/{}", 256 + i)).unwrap(),
            )
        })
        .collect();
    let t = Instant::now();
    let dev = SpireDev::start(cfg).await.expect("spire-dev");
    let issue = t.elapsed();
    let agent = dev.agent("node-a").unwrap();
    let socket = agent.workload_socket().to_path_buf();

    // Baseline 1: receive and decode the full state, nothing else (raw
    // gRPC client from the same protos): the floor for any client.
    let mut raw = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let got = raw_fetch(&socket).await;
        assert_eq!(got, n);
        raw.push(t.elapsed());
    }
    // Baseline 2: the spiffe crate's client, fetch + parse. Its 4 MiB message
    // cap (not configurable) refuses larger full states.
    let mut base = Vec::new();
    let mut base_error = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
            .await
            .expect("spiffe client");
        match client.fetch_x509_context().await {
            Ok(ctx) => {
                assert_eq!(ctx.svids().len(), n);
                base.push(t.elapsed());
            }
            Err(e) => {
                base_error = Some(if e.to_string().contains("too large") {
                    "refused: over its 4 MiB cap".to_string()
                } else {
                    format!("failed: {e}")
                });
                break;
            }
        }
    }

    // meshauth: a fresh cache and source until all N are cached.
    let mut initial = Vec::new();
    for _ in 0..RUNS {
        let cache = SvidCache::new(CacheConfig::default());
        let token = CancellationToken::new();
        let t = Instant::now();
        let h = spawn_workload_api(
            WorkloadApiConfig::new(&socket),
            cache.clone(),
            token.clone(),
        );
        wait_for(&cache, |c| c.len() == n).await;
        initial.push(t.elapsed());
        token.cancel();
        h.join().await;
    }

    // A ready cache.
    let cache = SvidCache::new(CacheConfig::default());
    let token = CancellationToken::new();
    let h = spawn_workload_api(
        WorkloadApiConfig::new(&socket),
        cache.clone(),
        token.clone(),
    );
    wait_for(&cache, |c| c.len() == n).await;

    // One entry added: a full state of N+1 in which one identity is new.
    let mut snapshots = agent.subscribe();
    snapshots.borrow_and_update();
    dev.add_entry(EntrySpec::new(
        "node-a",
        SpiffeId::parse(&format!("spiffe://meshauth.local/identity/{}", 256 + n)).unwrap(),
    ))
    .expect("add entry");
    let published = Instant::now();
    wait_for(&cache, |c| c.len() == n + 1).await;
    let one_added = published.elapsed();

    // Every SVID re-issued (CA rotation): time from the agent publishing the
    // new full state to the cache holding all N+1 new certificates.
    let before: Vec<_> = cache
        .identities()
        .iter()
        .map(|&i| cache.get(i).unwrap())
        .collect();
    let mut snapshots = agent.subscribe();
    snapshots.borrow_and_update();
    let watcher = tokio::spawn(async move {
        snapshots.changed().await.expect("agent snapshot");
        Instant::now()
    });
    dev.rotate_ca().expect("rotate");
    let published = watcher.await.expect("watcher");
    wait_for(&cache, |c| {
        before.iter().all(|old| {
            c.get(old.identity())
                .is_some_and(|new| new.leaf().as_ref() != old.leaf().as_ref())
        })
    })
    .await;
    let all_rotated = published.elapsed();
    token.cancel();
    h.join().await;
    drop(before);

    // Memory: apply the agent's full state to an empty cache directly.
    // Everything allocated from `live0` on and still live after the update
    // is applied and dropped is held by the cache (the update's DER bytes
    // either moved into it or were freed).
    let snap = agent.snapshot();
    let cert_key: usize = snap
        .svids
        .iter()
        .map(|h| {
            h.svid.cert_chain.iter().map(Vec::len).sum::<usize>() + h.svid.private_key_pkcs8.len()
        })
        .sum();
    let empty = SvidCache::new(CacheConfig::default());
    let live0 = LIVE.load(Ordering::SeqCst);
    let td = TrustDomain::new("meshauth.local").unwrap();
    let bundle =
        TrustBundle::new(td, snap.bundle.iter().map(|c| c.clone().into()).collect()).unwrap();
    let inputs: Vec<SvidInput> = snap
        .svids
        .iter()
        .map(|h| SvidInput {
            spiffe_id: h.svid.spiffe_id.to_string(),
            cert_chain: h.svid.cert_chain.iter().map(|c| c.clone().into()).collect(),
            private_key: h.svid.private_key_pkcs8.clone().into(),
        })
        .collect();
    let count = inputs.len();
    let changes = empty
        .apply(Update {
            svids: Some(inputs),
            bundle: Some(bundle),
        })
        .expect("apply");
    drop(changes);
    let cache_bytes = LIVE.load(Ordering::SeqCst) - live0;
    assert_eq!(empty.len(), count);
    let per_identity = cache_bytes as f64 / count as f64;
    drop(empty);
    dev.shutdown().await;
    Row {
        n,
        issue,
        raw: median(raw),
        baseline: if base.is_empty() {
            base_error.unwrap_or_default()
        } else {
            ms(median(base))
        },
        initial: median(initial),
        one_added,
        all_rotated,
        per_identity_overhead: per_identity - cert_key as f64 / count as f64,
        cert_key_per_identity: cert_key as f64 / count as f64,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        sizes
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rows: Vec<Row> = sizes.iter().map(|&n| rt.block_on(run(n))).collect();
    println!(
        "svid-cache full-state updates from spire-dev (unix socket, P-256 SVIDs; times in ms, median of {RUNS} where repeated)"
    );
    println!(
        "| identities | spire-dev issue | baseline: gRPC receive+decode only | baseline: spiffe crate fetch+parse | meshauth: connect → ready cache | one added (full state N+1) | all rotated (full state N+1) | cache bytes/identity beyond cert+key | cert+key bytes/identity |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} |",
            r.n,
            ms(r.issue),
            ms(r.raw),
            r.baseline,
            ms(r.initial),
            ms(r.one_added),
            ms(r.all_rotated),
            r.per_identity_overhead,
            r.cert_key_per_identity
        );
    }
}

/// Receives the first FetchX509SVID message and decodes it, nothing more.
async fn raw_fetch(socket: &std::path::Path) -> usize {
    use spire_proto::workload::X509svidRequest;
    use spire_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let p = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .expect("connect");
    let mut client = SpiffeWorkloadApiClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        spire_proto::WORKLOAD_HEADER_KEY,
        tonic::metadata::MetadataValue::from_static(spire_proto::WORKLOAD_HEADER_VALUE),
    );
    let mut stream = client
        .fetch_x509svid(req)
        .await
        .expect("fetch")
        .into_inner();
    stream
        .message()
        .await
        .expect("message")
        .expect("a message")
        .svids
        .len()
}
