//! Real SPIRE ⇄ svid-cache: SPIRE's own spire-server and spire-agent (built
//! by scripts/build-spire, version pinned in tools/spire/go.mod) issue an
//! X.509-SVID that meshauth's Workload API client puts in its cache, wired
//! as meshauth-agent wires it (auth-agent/src/app/sources.rs).
//!
//! Needs the SPIRE binaries (MESHAUTH_SPIRE_BIN, set by scripts/test);
//! fails, never skips, when they are missing.

use std::time::{Duration, Instant, SystemTime};

use meshauth_tests::real_spire::{SpireAgent, SpireServer, own_uid, spire_bin};
use meshauth_tests::{TD, init_tracing, leaf};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use svid_cache::{CacheConfig, SvidCache, TrustDomain, WorkloadApiConfig, spawn_workload_api};
use tokio_util::sync::CancellationToken;

/// The identity the test registers: `spiffe://meshauth.local/identity/4242`,
/// the only SPIFFE ID shape svid-cache keeps.
const IDENTITY: u32 = 4242;
/// The configured `default_x509_svid_ttl`.
const SVID_TTL: Duration = Duration::from_secs(600);
/// How long the first SVID may take: the agent syncs entries every 5 s, the
/// source reconnects with backoff (at most 10 s) after "no identity issued".
const FIRST_SVID_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn svid_cache_gets_an_x509_svid_from_real_spire() {
    init_tracing();
    let bin = spire_bin();
    let dir = tempfile::Builder::new()
        .prefix("meshauth-spire-")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir for SPIRE: {e}"));

    let server = SpireServer::start(&bin, dir.path(), TD);
    println!("spire-server healthy after {:?}", server.started_in);

    let token = server.join_token(&format!("spiffe://{TD}/node/n1"));
    let agent = SpireAgent::start(&bin, dir.path(), &server, &token);
    println!("spire-agent healthy after {:?}", agent.started_in);

    // One entry svid-cache keeps, one it must ignore (not an /identity/<N> path).
    let uid = own_uid();
    let selector = format!("unix:uid:{uid}");
    let parent = server.join_token_agent_id(&token);
    let spiffe_id = format!("spiffe://{TD}/identity/{IDENTITY}");
    let entry_start = Instant::now();
    server.create_entry(&parent, &spiffe_id, &[&selector]);
    server.create_entry(
        &parent,
        &format!("spiffe://{TD}/ns/default/sa/test"),
        &[&selector],
    );

    // Exactly as meshauth-agent starts its Workload API source.
    let cache = SvidCache::new(CacheConfig {
        trust_domain: TrustDomain::new(TD).unwrap_or_else(|e| panic!("trust domain {TD}: {e}")),
        ..CacheConfig::default()
    });
    let token_stop = CancellationToken::new();
    let expiry = cache.spawn_expiry(token_stop.clone());
    let source = spawn_workload_api(
        WorkloadApiConfig::new(agent.workload_socket()),
        cache.clone(),
        token_stop.clone(),
    );
    let mut generation = cache.watch_generation();
    let got = tokio::time::timeout(FIRST_SVID_TIMEOUT, async {
        loop {
            if let Some(svid) = cache.get(IDENTITY) {
                return svid;
            }
            generation
                .changed()
                .await
                .unwrap_or_else(|e| panic!("cache generation watch closed: {e}"));
        }
    })
    .await;
    let svid = got.unwrap_or_else(|_| {
        panic!(
            "no SVID for {spiffe_id} in the cache within {FIRST_SVID_TIMEOUT:?} \
             (selector {selector}, parent {parent}); source status {:?}\nagent log:\n{}",
            source.status(),
            agent.log()
        )
    });
    let first_svid = entry_start.elapsed();
    println!("first SVID in the cache {first_svid:?} after the entry was created");

    // The SVID: SPIRE's certificate for that SPIFFE ID, ~10 minutes left.
    let l = leaf(&svid);
    assert_eq!(l.spiffe_id, spiffe_id, "URI SAN of the SVID SPIRE issued");
    assert_eq!(cache.trust_domain().as_str(), TD);
    let left = svid
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_else(|e| panic!("SVID already expired: {e}"));
    assert!(
        left > SVID_TTL - Duration::from_secs(60) && left <= SVID_TTL + Duration::from_secs(5),
        "NotAfter {:?} is {left:?} ahead; expected about {SVID_TTL:?} (default_x509_svid_ttl)",
        svid.not_after()
    );
    assert_eq!(
        cache.identities(),
        [IDENTITY],
        "the cache keeps /identity/<N> only, not /ns/default/sa/test"
    );

    // The bundle: exactly the server's CA certificates.
    let bundle = cache.bundle().expect("a trust bundle with the first SVID");
    assert_eq!(bundle.trust_domain().as_str(), TD);
    let pem = server.bundle_pem();
    let want: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap_or_else(|e| panic!("`spire-server bundle show` PEM: {e}\n{pem}")))
        .map(|c| c.to_vec())
        .collect();
    let got: Vec<Vec<u8>> = bundle.authorities().iter().map(|c| c.to_vec()).collect();
    assert!(!want.is_empty(), "empty bundle from spire-server: {pem}");
    assert_eq!(got, want, "cache bundle = `spire-server bundle show`");

    let status = source.status();
    assert!(
        status.is_connected(),
        "source after the first SVID: {status:?}"
    );
    println!(
        "timings: server {:?}, agent {:?}, first SVID {first_svid:?}",
        server.started_in, agent.started_in
    );

    token_stop.cancel();
    source.join().await;
    expiry.await.unwrap_or_else(|e| panic!("expiry task: {e}"));
}
