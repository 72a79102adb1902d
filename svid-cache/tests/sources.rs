//! Sources against small fake servers on unix sockets in a tempdir: first fetch,
//! rotation, reconnect after the server goes away and comes back, garbage on
//! the socket, malformed certificates, "no identity issued".

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use meshauth_test_support::certs::{Ca, HOUR, Leaf, TD, base_time};
use spire_proto::delegatedidentity::delegated_identity_server::{
    DelegatedIdentity, DelegatedIdentityServer,
};
use spire_proto::delegatedidentity::{
    FetchJwtsviDsRequest, FetchJwtsviDsResponse, SubscribeToJwtBundlesRequest,
    SubscribeToJwtBundlesResponse, SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse,
    SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse, X509svidWithKey,
};
use spire_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use spire_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use svid_cache::{
    BackoffConfig, CacheConfig, DelegatedIdentityConfig, SourceError, SourceHandle, SourceState,
    SourceStatus, SvidCache, WorkloadApiConfig, fetch_x509_svid_ids, spawn_delegated_identity,
    spawn_workload_api,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const WAIT: Duration = Duration::from_secs(15);

fn backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    }
}

/// What the fake Workload API answers: a full state, or an error status.
#[derive(Clone)]
enum Reply {
    State(X509svidResponse),
    Denied(&'static str),
}

fn concat(chain: &[rustls_pki_types::CertificateDer<'static>]) -> Vec<u8> {
    chain.iter().flat_map(|c| c.as_ref().to_vec()).collect()
}

fn workload_state(root: &Ca, leaves: &[&Leaf]) -> Reply {
    Reply::State(X509svidResponse {
        svids: leaves
            .iter()
            .map(|l| X509svid {
                spiffe_id: l.spiffe_id.clone(),
                x509_svid: concat(&l.chain),
                x509_svid_key: l.key.clone(),
                bundle: root.der().to_vec(),
                hint: String::new(),
            })
            .collect(),
        ..Default::default()
    })
}

struct FakeWorkload {
    state: watch::Receiver<Reply>,
    kill: CancellationToken,
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for FakeWorkload {
    type FetchX509SVIDStream = BoxStream<'static, Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = BoxStream<'static, Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = BoxStream<'static, Result<JwtBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        if request
            .metadata()
            .get(spire_proto::WORKLOAD_HEADER_KEY)
            .is_none()
        {
            return Err(Status::invalid_argument("missing security header"));
        }
        let stream = WatchStream::new(self.state.clone())
            .map(|r| match r {
                Reply::State(s) => Ok(s),
                Reply::Denied(m) => Err(Status::permission_denied(m)),
            })
            .take_until(self.kill.clone().cancelled_owned());
        Ok(Response::new(stream.boxed()))
    }
    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A running fake server; `stop` ends its streams, stops it and removes the socket.
struct Running {
    kill: CancellationToken,
    task: JoinHandle<()>,
    path: PathBuf,
}

impl Running {
    async fn stop(self) {
        self.kill.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("fake server did not stop")
            .unwrap();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_workload(path: &Path, state: watch::Receiver<Reply>) -> Running {
    let listener = UnixListener::bind(path).unwrap();
    let kill = CancellationToken::new();
    let svc = SpiffeWorkloadApiServer::new(FakeWorkload {
        state,
        kill: kill.clone(),
    });
    let shutdown = kill.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await
            .unwrap();
    });
    Running {
        kill,
        task,
        path: path.to_owned(),
    }
}

async fn wait_status(
    h: &SourceHandle,
    what: &str,
    pred: impl FnMut(&SourceStatus) -> bool,
) -> SourceStatus {
    let mut rx = h.watch_status();
    match tokio::time::timeout(WAIT, rx.wait_for(pred)).await {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("timed out waiting for {what}; status: {:?}", h.status()),
    }
}

async fn wait_ids(cache: &SvidCache, want: &[u32]) {
    let mut rx = cache.watch_generation();
    let ok = tokio::time::timeout(WAIT, async {
        loop {
            if cache.identities() == want {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "timed out waiting for identities {want:?}; have {:?}",
        cache.identities()
    );
}

fn disconnected_with(s: &SourceStatus, f: impl Fn(&SourceError) -> bool) -> bool {
    matches!(&s.state, SourceState::Disconnected { error, .. } if f(error))
}

#[tokio::test]
async fn workload_api_first_fetch_rotation_and_no_identity_issued() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let now = base_time();
    let root = Ca::root("root");
    let (a, b) = (root.svid(300, now, HOUR), root.svid(301, now, HOUR));
    let (tx, rx) = watch::channel(workload_state(&root, &[&a, &b]));
    let server = serve_workload(&sock, rx);

    let cache = SvidCache::new(CacheConfig::default());
    let shutdown = CancellationToken::new();
    let mut config = WorkloadApiConfig::new(&sock);
    config.backoff = backoff();
    let h = spawn_workload_api(config, cache.clone(), shutdown.clone());
    wait_ids(&cache, &[300, 301]).await;
    let st = wait_status(&h, "connected", |s| {
        s.is_connected() && s.updates_applied == 1
    })
    .await;
    assert_eq!(st.last_error, None);
    assert_eq!(cache.get(300).unwrap().leaf(), &a.chain[0]);
    assert_eq!(cache.bundle().unwrap().authorities(), &[root.der()]);

    // The server rotates 301 and drops 300.
    let b2 = root.svid(301, now, 2 * HOUR);
    tx.send(workload_state(&root, &[&b2])).unwrap();
    wait_ids(&cache, &[301]).await;
    assert_eq!(cache.get(301).unwrap().leaf(), &b2.chain[0]);

    // "no identity issued": the full state is empty.
    tx.send(Reply::Denied("no identity issued")).unwrap();
    wait_ids(&cache, &[]).await;
    let st = wait_status(&h, "no identity issued", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::NoIdentityIssued { .. }))
    })
    .await;
    assert!(st.state != SourceState::Connecting);

    // And it recovers when entries appear.
    tx.send(workload_state(&root, &[&a])).unwrap();
    wait_ids(&cache, &[300]).await;
    wait_status(&h, "connected again", |s| s.is_connected()).await;

    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn workload_api_reconnects_after_the_server_goes_away_and_keeps_svids_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let now = base_time();
    let root = Ca::root("root");
    let a = root.svid(300, now, HOUR);
    let (tx, rx) = watch::channel(workload_state(&root, &[&a]));
    let server = serve_workload(&sock, rx.clone());

    let cache = SvidCache::new(CacheConfig::default());
    let shutdown = CancellationToken::new();
    let mut config = WorkloadApiConfig::new(&sock);
    config.backoff = backoff();
    let h = spawn_workload_api(config, cache.clone(), shutdown.clone());
    wait_ids(&cache, &[300]).await;
    wait_status(&h, "connected", |s| s.is_connected()).await;

    // The server goes away and its socket with it.
    server.stop().await;
    let st = wait_status(&h, "socket missing", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::SocketMissing { .. }))
    })
    .await;
    let SourceState::Disconnected { error, .. } = &st.state else {
        unreachable!()
    };
    assert!(error.to_string().contains("socket missing"), "{error}");
    assert_eq!(
        cache.identities(),
        vec![300],
        "a disconnect keeps valid SVIDs"
    );

    // It comes back with a new state.
    let b = root.svid(301, now, HOUR);
    tx.send(workload_state(&root, &[&a, &b])).unwrap();
    let server = serve_workload(&sock, rx);
    wait_ids(&cache, &[300, 301]).await;
    let st = wait_status(&h, "reconnected", |s| s.is_connected()).await;
    assert_eq!(st.reconnects, 1);

    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn garbage_on_the_socket_is_a_protocol_error_and_the_cache_keeps_what_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let now = base_time();
    let root = Ca::root("root");
    let a = root.svid(300, now, HOUR);
    let (_tx, rx) = watch::channel(workload_state(&root, &[&a]));
    let server = serve_workload(&sock, rx);

    let cache = SvidCache::new(CacheConfig::default());
    let shutdown = CancellationToken::new();
    let mut config = WorkloadApiConfig::new(&sock);
    config.backoff = backoff();
    let h = spawn_workload_api(config, cache.clone(), shutdown.clone());
    wait_ids(&cache, &[300]).await;
    server.stop().await;

    // Something that is not a gRPC server takes the socket.
    let listener = UnixListener::bind(&sock).unwrap();
    let junk = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = conn
                    .write_all(b"\x00\x00\x12\x09garbage that is not http/2 at all\r\n\r\n")
                    .await;
                let mut buf = [0u8; 1024];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let st = wait_status(&h, "protocol error", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::Protocol { .. }))
    })
    .await;
    eprintln!("garbage socket: {:?}", st.state);
    assert_eq!(cache.identities(), vec![300]);
    assert!(!h.status().is_connected());

    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    junk.abort();
}

#[tokio::test]
async fn a_malformed_certificate_is_rejected_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let now = base_time();
    let root = Ca::root("root");
    let a = root.svid(300, now, HOUR);
    let (tx, rx) = watch::channel(workload_state(&root, &[&a]));
    let server = serve_workload(&sock, rx);

    let cache = SvidCache::new(CacheConfig::default());
    let shutdown = CancellationToken::new();
    let mut config = WorkloadApiConfig::new(&sock);
    config.backoff = backoff();
    let h = spawn_workload_api(config, cache.clone(), shutdown.clone());
    wait_ids(&cache, &[300]).await;
    let held = cache.get(300).unwrap();

    // A rotation of 300 plus a 301 whose certificate is garbage.
    let Reply::State(mut bad) = workload_state(
        &root,
        &[&root.svid(300, now, HOUR), &root.svid(301, now, HOUR)],
    ) else {
        unreachable!()
    };
    bad.svids[1].x509_svid = b"\x30\x82\x01\x00 definitely not DER".to_vec();
    tx.send(Reply::State(bad)).unwrap();
    let st = wait_status(&h, "rejection", |s| s.updates_rejected == 1).await;
    let (_, err) = st.last_error.clone().unwrap();
    assert!(
        matches!(*err, SourceError::MalformedMessage { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("cache unchanged"), "{err}");
    assert!(st.is_connected(), "a bad message does not drop the stream");
    assert!(Arc::ptr_eq(&held, &cache.get(300).unwrap()));
    assert_eq!(cache.identities(), vec![300]);

    // The next good message is applied.
    let b = root.svid(301, now, HOUR);
    tx.send(workload_state(&root, &[&a, &b])).unwrap();
    wait_ids(&cache, &[300, 301]).await;

    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    server.stop().await;
}

// ---- Delegated Identity API ----

/// The two streams of the fake have their own channels, as in SPIRE.
#[derive(Clone)]
struct DelegatedState {
    svids: watch::Receiver<Option<SubscribeToX509sviDsResponse>>,
    bundles: watch::Receiver<Option<SubscribeToX509BundlesResponse>>,
}

struct FakeDelegated {
    state: DelegatedState,
    selectors_seen: Arc<Mutex<Vec<(String, String)>>>,
    kill: CancellationToken,
}

#[tonic::async_trait]
impl DelegatedIdentity for FakeDelegated {
    type SubscribeToX509SVIDsStream =
        BoxStream<'static, Result<SubscribeToX509sviDsResponse, Status>>;
    type SubscribeToX509BundlesStream =
        BoxStream<'static, Result<SubscribeToX509BundlesResponse, Status>>;
    type SubscribeToJWTBundlesStream =
        BoxStream<'static, Result<SubscribeToJwtBundlesResponse, Status>>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: Request<SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        *self.selectors_seen.lock().unwrap() = request
            .into_inner()
            .selectors
            .into_iter()
            .map(|s| (s.r#type, s.value))
            .collect();
        let s = WatchStream::new(self.state.svids.clone())
            .filter_map(|s| async move { s.map(Ok) })
            .take_until(self.kill.clone().cancelled_owned());
        Ok(Response::new(s.boxed()))
    }
    async fn subscribe_to_x509_bundles(
        &self,
        _: Request<SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        let s = WatchStream::new(self.state.bundles.clone())
            .filter_map(|s| async move { s.map(Ok) })
            .take_until(self.kill.clone().cancelled_owned());
        Ok(Response::new(s.boxed()))
    }
    async fn fetch_jwtsvi_ds(
        &self,
        _: Request<FetchJwtsviDsRequest>,
    ) -> Result<Response<FetchJwtsviDsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn subscribe_to_jwt_bundles(
        &self,
        _: Request<SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

fn serve_delegated(
    path: &Path,
    state: DelegatedState,
    selectors_seen: Arc<Mutex<Vec<(String, String)>>>,
) -> Running {
    let listener = UnixListener::bind(path).unwrap();
    let kill = CancellationToken::new();
    let svc = DelegatedIdentityServer::new(FakeDelegated {
        state,
        selectors_seen,
        kill: kill.clone(),
    });
    let shutdown = kill.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await
            .unwrap();
    });
    Running {
        kill,
        task,
        path: path.to_owned(),
    }
}

fn delegated_svids(leaves: &[&Leaf]) -> SubscribeToX509sviDsResponse {
    SubscribeToX509sviDsResponse {
        x509_svids: leaves
            .iter()
            .map(|l| {
                let path = l.spiffe_id.strip_prefix(&format!("spiffe://{TD}")).unwrap();
                X509svidWithKey {
                    x509_svid: Some(spire_proto::types::X509svid {
                        cert_chain: l.chain.iter().map(|c| c.to_vec()).collect(),
                        id: Some(spire_proto::types::Spiffeid {
                            trust_domain: TD.to_owned(),
                            path: path.to_owned(),
                        }),
                        expires_at: 0,
                        hint: String::new(),
                    }),
                    x509_svid_key: l.key.clone(),
                }
            })
            .collect(),
        federates_with: Vec::new(),
    }
}

fn delegated_bundles(cas: &[&Ca]) -> SubscribeToX509BundlesResponse {
    SubscribeToX509BundlesResponse {
        ca_certificates: [
            (
                TD.to_owned(),
                cas.iter().flat_map(|c| c.der().to_vec()).collect(),
            ),
            ("other.org".to_owned(), Ca::root("other").der().to_vec()),
        ]
        .into_iter()
        .collect(),
    }
}

#[tokio::test]
async fn delegated_identity_merges_svids_and_bundles_and_rejects_malformed_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let now = base_time();
    let root = Ca::root("root");
    let (a, b) = (root.svid(300, now, HOUR), root.svid(301, now, HOUR));
    // SVIDs first, the bundle later: nothing is applied before both arrive.
    let (svids_tx, svids_rx) = watch::channel(Some(delegated_svids(&[&a, &b])));
    let (bundles_tx, bundles_rx) = watch::channel(None);
    let rx = DelegatedState {
        svids: svids_rx,
        bundles: bundles_rx,
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = serve_delegated(&sock, rx.clone(), seen.clone());

    let cache = SvidCache::new(CacheConfig::default());
    let shutdown = CancellationToken::new();
    let mut config = DelegatedIdentityConfig::new(
        &sock,
        vec![
            ("k8s".into(), "ns:default".into()),
            ("unix".into(), "uid:0".into()),
        ],
    );
    config.backoff = backoff();
    let h = spawn_delegated_identity(config, cache.clone(), shutdown.clone());
    wait_status(&h, "connected", |s| s.is_connected()).await;
    assert!(cache.is_empty(), "nothing applied before the bundle");

    bundles_tx.send_replace(Some(delegated_bundles(&[&root])));
    wait_ids(&cache, &[300, 301]).await;
    // Positive marker instead of a sleep: the SVIDs were sent before the
    // bundle, so an update made of them alone would have been counted (as
    // applied or rejected) before the one the bundle completed.
    let st = wait_status(&h, "the update counted", |s| s.updates_applied >= 1).await;
    assert_eq!(
        (st.updates_applied, st.updates_rejected),
        (1, 0),
        "one update, SVIDs and bundle together; nothing applied before the bundle"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            ("k8s".to_owned(), "ns:default".to_owned()),
            ("unix".to_owned(), "uid:0".to_owned())
        ]
    );

    // CA rotation: SVIDs from a new CA arrive before the bundle that trusts it.
    // They are refused first, then accepted when the bundle follows.
    let next = Ca::root("next");
    let b2 = next.svid(301, now, HOUR);
    svids_tx.send_replace(Some(delegated_svids(&[&a, &b2])));
    let st = wait_status(&h, "untrusted rotation refused", |s| {
        s.updates_rejected == 1
    })
    .await;
    let (_, err) = st.last_error.unwrap();
    assert!(matches!(*err, SourceError::Rejected { .. }), "{err}");
    assert_eq!(cache.get(301).unwrap().leaf(), &b.chain[0]);
    bundles_tx.send_replace(Some(delegated_bundles(&[&root, &next])));
    let mut gen_rx = cache.watch_generation();
    tokio::time::timeout(
        WAIT,
        gen_rx.wait_for(|_| cache.get(301).is_some_and(|s| s.leaf() == &b2.chain[0])),
    )
    .await
    .expect("rotation applied with the new bundle")
    .unwrap();

    // A malformed certificate: the whole message is refused, the cache unchanged.
    let mut bad = delegated_svids(&[&a, &b2, &root.svid(302, now, HOUR)]);
    bad.x509_svids[2].x509_svid.as_mut().unwrap().cert_chain[0] = b"garbage".to_vec();
    svids_tx.send_replace(Some(bad));
    let st = wait_status(&h, "malformed refused", |s| s.updates_rejected == 2).await;
    let (_, err) = st.last_error.unwrap();
    assert!(err.to_string().contains("SVID #2"), "{err}");
    assert!(err.to_string().contains("does not parse as X.509"), "{err}");
    assert_eq!(cache.identities(), vec![300, 301]);

    // The server goes away: disconnected, SVIDs kept; it comes back: reconnected.
    server.stop().await;
    wait_status(&h, "disconnected", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::SocketMissing { .. }))
    })
    .await;
    assert_eq!(cache.identities(), vec![300, 301]);
    svids_tx.send_replace(Some(delegated_svids(&[&a])));
    let server = serve_delegated(&sock, rx, seen);
    wait_ids(&cache, &[300]).await;
    assert_eq!(
        wait_status(&h, "reconnected", |s| s.is_connected())
            .await
            .reconnects,
        1
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn one_fetch_names_the_svids_or_says_why_there_are_none() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let e = fetch_x509_svid_ids(&sock).await.unwrap_err();
    assert!(matches!(e, SourceError::SocketMissing { .. }), "{e}");

    let now = base_time();
    let root = Ca::root("root");
    let (a, b) = (root.svid(300, now, HOUR), root.svid(301, now, HOUR));
    let (tx, rx) = watch::channel(workload_state(&root, &[&a, &b]));
    let server = serve_workload(&sock, rx);
    let ids = tokio::time::timeout(WAIT, fetch_x509_svid_ids(&sock))
        .await
        .expect("answer in time")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ids,
        [
            format!("spiffe://{TD}/identity/300"),
            format!("spiffe://{TD}/identity/301")
        ]
    );

    tx.send(Reply::Denied("no identity issued")).unwrap();
    let e = tokio::time::timeout(WAIT, fetch_x509_svid_ids(&sock))
        .await
        .expect("answer in time")
        .unwrap_err();
    assert!(matches!(e, SourceError::NoIdentityIssued { .. }), "{e}");
    server.stop().await;
}

#[tokio::test]
async fn a_missing_socket_is_reported_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SvidCache::new(CacheConfig::default());
    let shutdown = CancellationToken::new();
    let mut config = WorkloadApiConfig::new(dir.path().join("nothing.sock"));
    config.backoff = backoff();
    let h = spawn_workload_api(config, cache, shutdown.clone());
    assert_eq!(h.name(), "workload_api");
    let st = wait_status(&h, "socket missing", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::SocketMissing { .. }))
    })
    .await;
    assert_eq!(st.updates_applied, 0);

    // A socket file nobody listens on: connection refused.
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut config = WorkloadApiConfig::new(&path);
    config.backoff = backoff();
    let h2 = spawn_workload_api(
        config,
        SvidCache::new(CacheConfig::default()),
        shutdown.clone(),
    );
    let st = wait_status(&h2, "refused", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::ConnectionRefused { .. }))
    })
    .await;
    let SourceState::Disconnected { error, .. } = st.state else {
        unreachable!()
    };
    assert!(error.to_string().contains("connection refused"), "{error}");

    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    tokio::time::timeout(WAIT, h2.join()).await.unwrap();
}

#[tokio::test]
async fn workload_api_full_states_above_4_mib_are_received_and_the_cap_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let now = base_time();
    let root = Ca::root("root");
    let a = root.svid(300, now, HOUR);
    // 4,500 copies of one SVID: a message of about 5 MB, above tonic's
    // default 4 MiB cap (the spiffe crate's client stops there).
    let Reply::State(one) = workload_state(&root, &[&a]) else {
        unreachable!()
    };
    let big = X509svidResponse {
        svids: std::iter::repeat_n(one.svids[0].clone(), 4500).collect(),
        ..Default::default()
    };
    let size = prost::Message::encoded_len(&big);
    assert!(size > 4 * 1024 * 1024, "message is only {size} bytes");
    let (_tx, rx) = watch::channel(Reply::State(big));
    let server = serve_workload(&sock, rx);

    let cache = SvidCache::new(CacheConfig::default());
    let shutdown = CancellationToken::new();
    let mut config = WorkloadApiConfig::new(&sock);
    config.backoff = backoff();
    let h = spawn_workload_api(config, cache.clone(), shutdown.clone());
    wait_ids(&cache, &[300]).await;
    assert_eq!(h.status().last_error, None);

    // With a 1 MiB cap the same state is refused with an error that says so,
    // and nothing is cached.
    let small = SvidCache::new(CacheConfig::default());
    let mut config = WorkloadApiConfig::new(&sock);
    config.backoff = backoff();
    config.max_message_bytes = 1024 * 1024;
    let h2 = spawn_workload_api(config, small.clone(), shutdown.clone());
    let st = wait_status(&h2, "refused as too large", |s| s.last_error.is_some()).await;
    let (_, err) = st.last_error.unwrap();
    assert!(
        err.to_string().contains("message length too large"),
        "{err}"
    );
    assert!(small.is_empty());

    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    tokio::time::timeout(WAIT, h2.join()).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_spire_socket_that_never_answers_is_a_connect_timeout_and_the_source_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    // Listening, never accepting: connects succeed (queued), nothing answers.
    let silent = UnixListener::bind(&sock).unwrap();
    let cache = SvidCache::new(CacheConfig::default());
    let shutdown = CancellationToken::new();
    let mut config = WorkloadApiConfig::new(&sock);
    config.backoff = backoff();
    config.connect_timeout = Duration::from_millis(300);
    let h = spawn_workload_api(config, cache.clone(), shutdown.clone());
    let st = wait_status(&h, "connect timeout", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::ConnectTimeout { .. }))
    })
    .await;
    let SourceState::Disconnected { error, .. } = &st.state else {
        unreachable!()
    };
    assert_eq!(error.label(), "connect_timeout");
    let msg = error.to_string();
    assert!(
        msg.contains(&sock.display().to_string()) && msg.contains("no answer within 300ms"),
        "{msg}"
    );

    // The backoff loop goes on: a SPIRE agent that answers is picked up.
    drop(silent);
    std::fs::remove_file(&sock).unwrap();
    let now = base_time();
    let root = Ca::root("root");
    let a = root.svid(300, now, HOUR);
    let (_tx, rx) = watch::channel(workload_state(&root, &[&a]));
    let server = serve_workload(&sock, rx);
    wait_ids(&cache, &[300]).await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_delegated_api_that_accepts_and_never_answers_the_http2_preface_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // Accepts and reads everything, writes nothing.
    let mute = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let shutdown = CancellationToken::new();
    let mut config = DelegatedIdentityConfig::new(&sock, vec![("k8s".into(), "ns:default".into())]);
    config.backoff = backoff();
    config.connect_timeout = Duration::from_millis(300);
    let h = spawn_delegated_identity(
        config,
        SvidCache::new(CacheConfig::default()),
        shutdown.clone(),
    );
    let st = wait_status(&h, "connect timeout", |s| {
        disconnected_with(s, |e| matches!(e, SourceError::ConnectTimeout { .. }))
    })
    .await;
    eprintln!("mute delegated API: {:?}", st.state);
    shutdown.cancel();
    tokio::time::timeout(WAIT, h.join()).await.unwrap();
    mute.abort();
}
