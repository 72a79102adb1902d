//! Two agents with SVIDs from spire-dev's node agents; openssl against the
//! responder; the real pinned auth map.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use auth_agent::auth::store::{AuthStore, BpfAuthStore, MemoryAuthStore, Pair};
use auth_agent::handshake::{Metrics, Role};
use meshauth_test_support::certs::{Ca, HOUR, TD, base_time};
use spire_dev::{DevConfig, EntrySpec, SpiffeId, SpireDev};
use svid_cache::{SvidCache, WorkloadApiConfig, spawn_workload_api};
use tokio_util::sync::CancellationToken;

use super::*;

pub(super) struct Cluster {
    pub(super) dev: SpireDev,
    pub(super) a: SvidCache,
    pub(super) b: SvidCache,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn wait_for(cache: &SvidCache, ids: &[u32], node: &str) {
    let mut generation = cache.watch_generation();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ids.iter().all(|id| cache.get(*id).is_some()) {
        tokio::time::timeout_at(deadline, generation.changed())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{node}: SVIDs {ids:?} not in the cache within {WAIT:?}; it holds {:?}",
                    cache.identities()
                )
            })
            .expect("cache alive");
    }
}

/// spire-dev with node-a (256) and node-b (257, 258); one cache per node,
/// fed by that node's agent over the Workload API.
pub(super) async fn cluster() -> Cluster {
    init_tracing();
    let dir = tempfile::Builder::new()
        .prefix("meshauth-handshake-")
        .tempdir()
        .expect("tempdir");
    let mut config = DevConfig::new(dir.path());
    config.nodes = vec!["node-a".into(), "node-b".into()];
    config.control_socket = false;
    config.entries = [("node-a", L), ("node-b", R), ("node-b", NO_ENDPOINT)]
        .into_iter()
        .map(|(node, id)| {
            EntrySpec::new(
                node,
                SpiffeId::parse(&format!("spiffe://{TD}/identity/{id}")).expect("SPIFFE ID"),
            )
        })
        .collect();
    let dev = SpireDev::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting spire-dev: {e}"));
    let shutdown = CancellationToken::new();
    let feed = |node: &str| {
        let cache = SvidCache::new(svid_cache::CacheConfig::default());
        cache.spawn_expiry(shutdown.clone());
        let socket = dev
            .agent(node)
            .unwrap_or_else(|e| panic!("{e}"))
            .workload_socket()
            .to_owned();
        spawn_workload_api(
            WorkloadApiConfig::new(socket),
            cache.clone(),
            shutdown.clone(),
        );
        cache
    };
    let (a, b) = (feed("node-a"), feed("node-b"));
    wait_for(&a, &[L], "node-a").await;
    wait_for(&b, &[R, NO_ENDPOINT], "node-b").await;
    Cluster {
        dev,
        a,
        b,
        shutdown,
        _dir: dir,
    }
}

/// A port free on both 127.0.0.1 and 127.0.0.2.
pub(super) fn shared_port() -> u16 {
    for _ in 0..20 {
        let a = std::net::TcpListener::bind(SocketAddr::new(A_IP, 0)).expect("bind");
        let port = a.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(SocketAddr::new(B_IP, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2 after 20 tries");
}

pub(super) fn not_after_of(dev: &SpireDev, node: &str, id: u32) -> SystemTime {
    let want = format!("spiffe://{TD}/identity/{id}");
    let held = dev
        .agent(node)
        .unwrap_or_else(|e| panic!("{e}"))
        .identities();
    let info = held
        .iter()
        .find(|i| i.spiffe_id == want)
        .unwrap_or_else(|| panic!("{node} holds no {want}: {held:?}"));
    SystemTime::UNIX_EPOCH + Duration::from_secs(info.not_after as u64)
}

#[tokio::test]
async fn two_agents_authenticate_a_pair_and_both_stores_hold_it() {
    let c = cluster().await;
    let port = shared_port();
    let d = desired(None, None);
    let store_a = Arc::new(MemoryAuthStore::default());
    let store_b = Arc::new(MemoryAuthStore::default());
    let resp_a = Responder::start_with(
        "node-a",
        c.a.clone(),
        d.clone(),
        store_a.clone(),
        store_a.clone(),
        SocketAddr::new(A_IP, port),
        |_| {},
    )
    .await;
    let mut resp_b = Responder::start_with(
        "node-b",
        c.b.clone(),
        d.clone(),
        store_b.clone(),
        store_b.clone(),
        SocketAddr::new(B_IP, port),
        |_| {},
    )
    .await;

    // node-a's initiator (what the auth manager does: authenticate, then write (L, R, Y)).
    let metrics = Metrics::default();
    let client = initiator(c.a.clone(), port, metrics.clone());
    let node_b = d.nodes["node-b"].clone();
    let auth = client
        .handshake(L, R, &node_b)
        .await
        .unwrap_or_else(|e| panic!("256@node-a -> 257@node-b: {e}"));
    let y = resp_a.nodes.id_of("node-b").expect("node-b id on node-a");
    store_a
        .upsert(
            Pair {
                local: L,
                remote: R,
                node: y,
            },
            auth.expiry,
        )
        .expect("store");

    let expected = not_after_of(&c.dev, "node-a", L).min(not_after_of(&c.dev, "node-b", R));
    let from_caches =
        c.a.get(L)
            .expect("own SVID")
            .not_after()
            .min(c.b.get(R).expect("R").not_after());
    assert_eq!(
        expected, from_caches,
        "spire-dev and the caches agree on the SVIDs"
    );
    assert_eq!(
        auth.expiry, expected,
        "initiator's expiry = the earlier leaf NotAfter"
    );
    assert_eq!(auth.peer_node, "node-b");
    assert_eq!(auth.peer_wireguard_key, None);

    let outcome = resp_b.next_outcome("256 -> 257").await;
    let accepted = outcome
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("responder: {e}"));
    assert_eq!(outcome.peer.ip(), A_IP);
    assert!(accepted.stored, "(257, 256, node-a) is required on node-b");
    let x = resp_b.nodes.id_of("node-a").expect("node-a id on node-b");
    assert_eq!(
        store_b.snapshot(),
        BTreeMap::from([(
            Pair {
                local: R,
                remote: L,
                node: x
            },
            expected
        )]),
        "responder holds (R, L, X)"
    );
    assert_eq!(
        store_a.snapshot(),
        BTreeMap::from([(
            Pair {
                local: L,
                remote: R,
                node: y
            },
            expected
        )]),
        "initiator holds (L, R, Y)"
    );
    assert_eq!(metrics.count(Role::Initiator, "ok"), 1);
    assert_eq!(resp_b.metrics.count(Role::Responder, "ok"), 1);

    // The reverse direction over node-a's responder works the same way.
    let mut opts = auth_agent::handshake::ClientOptions::new(c.b.clone(), "node-b");
    opts.port = port;
    opts.source_addr = Some(B_IP);
    let back = auth_agent::handshake::HandshakeClient::new(opts, Metrics::default())
        .handshake(R, L, &d.nodes["node-a"])
        .await
        .unwrap_or_else(|e| panic!("257@node-b -> 256@node-a: {e}"));
    assert_eq!(back.expiry, expected);
    assert_eq!(
        store_a.snapshot().len(),
        1,
        "(L, R, Y) is rewritten in place: {:?}",
        store_a.snapshot()
    );
    resp_a.stop().await;
    resp_b.stop().await;
}

fn write_secret(path: &Path, contents: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn pem_of(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d.clone())))
        .collect()
}

async fn s_client(resp: &Responder, dir: &Path, with_cert: bool) -> String {
    let mut cmd = tokio::process::Command::new("timeout");
    cmd.arg("10")
        .arg("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(resp.addr.to_string())
        .arg("-tls1_3")
        .arg("-alpn")
        .arg("meshauth/1")
        .arg("-servername")
        .arg(format!("{R}.{TD}"))
        .arg("-CAfile")
        .arg(dir.join("ca.pem"));
    if with_cert {
        cmd.arg("-cert")
            .arg(dir.join("svid.pem"))
            .arg("-key")
            .arg(dir.join("svid.key"));
    } else {
        // In TLS 1.3 the server's refusal arrives after the client's Finished:
        // keep reading until the server closes, so s_client sees the alert.
        cmd.arg("-ign_eof");
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running openssl s_client (is openssl installed?): {e}"));
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn openssl_s_client_completes_tls_13_with_a_spire_svid_and_is_refused_without_one() {
    let c = cluster().await;
    let mut resp = Responder::start(c.b.clone(), desired(None, None), |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = c
        .dev
        .agent("node-a")
        .unwrap_or_else(|e| panic!("{e}"))
        .snapshot();
    let want = format!("spiffe://{TD}/identity/{L}");
    let held = snapshot
        .svids
        .iter()
        .find(|h| h.svid.spiffe_id.to_string() == want)
        .unwrap_or_else(|| panic!("node-a's agent holds no {want}"));
    write_secret(
        &dir.path().join("svid.pem"),
        &pem_of("CERTIFICATE", &held.svid.cert_chain),
    );
    write_secret(
        &dir.path().join("svid.key"),
        &pem_of(
            "PRIVATE KEY",
            std::slice::from_ref(&held.svid.private_key_pkcs8),
        ),
    );
    std::fs::write(
        dir.path().join("ca.pem"),
        pem_of("CERTIFICATE", &c.dev.server().bundle()),
    )
    .expect("write bundle");

    let out = s_client(&resp, dir.path(), true).await;
    // The responder sends no session tickets, so s_client prints no
    // "SSL-Session: Protocol  : ..." block; its "New, TLSv1.3" line is the
    // negotiated protocol.
    for want in [
        "New, TLSv1.3, Cipher is",
        "Verify return code: 0 (ok)",
        "ALPN protocol: meshauth/1",
    ] {
        assert!(out.contains(want), "s_client output lacks {want:?}:\n{out}");
    }
    // s_client sends no meshauth/1 message (stdin is /dev/null): TLS, including
    // the client certificate, passed and the responder waited for the message.
    let o = resp.next_outcome("s_client with a SVID").await;
    let e = o.result.as_ref().expect_err("s_client sent no message");
    assert_eq!(e.label(), "message_truncated", "TLS must have passed: {e}");

    let out = s_client(&resp, dir.path(), false).await;
    let o = resp.next_outcome("s_client without a certificate").await;
    let e = o
        .result
        .as_ref()
        .expect_err("accepted without a client certificate");
    assert_eq!(e.label(), "no_client_certificate", "{e}\ns_client:\n{out}");
    assert!(
        out.contains("alert certificate required") || out.contains("alert number 116"),
        "s_client should report the certificate_required alert:\n{out}"
    );
    assert!(resp.store.snapshot().is_empty());
    resp.stop().await;
}

/// Root: the responder writes into the real pinned eBPF auth map.
#[tokio::test]
async fn responder_writes_the_pinned_auth_map() {
    let pins = auth_ebpf::testing::TestPinDir::new("handshake");
    let _dp = auth_ebpf::Datapath::load(&auth_ebpf::LoadOptions {
        pin_dir: pins.path().to_owned(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("loading the datapath (needs root and bpffs): {e}"));
    let store = Arc::new(
        BpfAuthStore::open(pins.path())
            .unwrap_or_else(|e| panic!("opening the pinned auth map: {e}")),
    );
    let ca = Ca::root("meshauth test CA");
    let (l, r) = (
        ca.svid(L, base_time(), 2 * HOUR),
        ca.svid(R, base_time(), HOUR),
    );
    let mut resp = Responder::start_with(
        "node-b",
        cache_with(&ca, &[&r]),
        desired(None, None),
        Arc::new(MemoryAuthStore::default()),
        store.clone(),
        SocketAddr::new(B_IP, 0),
        |_| {},
    )
    .await;
    let client = initiator(cache_with(&ca, &[&l]), resp.addr.port(), Metrics::default());
    let auth = client
        .handshake(L, R, &node_info("node-b", B_IP, None))
        .await
        .unwrap_or_else(|e| panic!("handshake: {e}"));
    let o = resp.next_outcome("handshake").await;
    assert!(o.result.is_ok(), "{:?}", o.result);
    let x = resp.nodes.id_of("node-a").expect("node-a id");
    let entries = store.entries().expect("reading the pinned map");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (pair, expiry) = entries[0];
    assert_eq!(
        pair,
        Pair {
            local: R,
            remote: L,
            node: x
        }
    );
    let r_not_after = cache_with(&ca, &[&r]).get(R).expect("R").not_after();
    assert_eq!(
        auth.expiry, r_not_after,
        "the earlier NotAfter is R's (1 h vs 2 h)"
    );
    let skew = expiry
        .duration_since(r_not_after)
        .unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_millis(50),
        "map expiry {expiry:?} vs NotAfter {r_not_after:?} (boottime round trip)"
    );
    resp.stop().await;
}
