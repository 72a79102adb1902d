//! One conformance suite, run against spire-dev and against real SPIRE
//! (1.13.3, from scripts/build-spire): everything meshauth relies on from
//! the SPIFFE Workload API, observed the same way on both and compared.
//!
//! - A call without the `workload.spiffe.io` header: the code and message.
//! - A caller no entry matches: the code and message.
//! - An X509SVIDResponse: its shape (one SVID per entry; the leaf first in
//!   `x509_svid`, its URI SAN the SPIFFE ID, a PKCS#8 key that matches it;
//!   `bundle` the trust domain's CA certificates, concatenated DER).
//! - FetchX509Bundles: keyed by the trust domain ID, the same CAs.
//! - Rotation: a new SVID arrives on the open stream when about half of the
//!   certificate's validity (NotBefore to NotAfter) is left — SPIRE's rule,
//!   which spire-dev did not follow (it renewed at half of the TTL from
//!   issuance, ignoring the 10 s backdate).
//! - The last entry removed: the open stream ends with "no identity issued".
//! - The Delegated Identity API: an unauthorized caller's refusal; SVIDs by
//!   selectors and by PID (the `unix` attestor's uid; a dead PID attests to
//!   nothing); selectors and a PID together, or neither, refused.
//!
//! Fails, never skips, without the SPIRE binaries.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use meshauth_tests::real_spire::{SpireAgent, SpireServer, own_uid, settings, spire_bin};
use meshauth_tests::{Sleeper, dead_pid};
use spire_dev::{DevConfig, EntrySpec, SpiffeId, SpireDev};
use spire_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spire_proto::workload::{X509BundlesRequest, X509svidRequest, X509svidResponse};
use tonic::transport::Channel;
use x509_parser::prelude::*;

const TD: &str = "meshauth.local";
const NODE: &str = "n1";
/// The SVID lifetime both run with: short, to see a rotation.
const TTL: Duration = Duration::from_secs(10);

/// spire-dev, or SPIRE's server and one agent, with the same entries.
enum Backend {
    Dev {
        dev: SpireDev,
        _dir: tempfile::TempDir,
    },
    Real {
        server: Box<SpireServer>,
        _agent: Box<SpireAgent>,
        socket: PathBuf,
        parent: String,
        _dir: tempfile::TempDir,
    },
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("meshauth-conf-")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"))
}

impl Backend {
    async fn dev() -> Self {
        let dir = tempdir();
        let mut cfg = DevConfig::new(dir.path().join("spire"));
        cfg.default_ttl = TTL;
        cfg.nodes = vec![NODE.into()];
        cfg.control_socket = false;
        let dev = SpireDev::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("spire-dev: {e}"));
        Self::Dev { dev, _dir: dir }
    }

    fn real() -> Self {
        let bin = spire_bin();
        let dir = tempdir();
        let mut st = settings(dir.path(), TD).unwrap_or_else(|e| panic!("{e}"));
        st.server.svid_ttl = TTL;
        st.agent.sync_interval = Some(Duration::from_millis(500));
        let server = SpireServer::start(&bin, &st).unwrap_or_else(|e| panic!("{e}"));
        let alias = format!("spiffe://{TD}/meshauth/node/{NODE}");
        let token = server.join_token(&alias).unwrap_or_else(|e| panic!("{e}"));
        let agent = SpireAgent::start(&bin, &server, &st, &token).unwrap_or_else(|e| panic!("{e}"));
        let socket = agent.workload_socket().to_owned();
        Self::Real {
            server: Box::new(server),
            _agent: Box::new(agent),
            socket,
            parent: alias,
            _dir: dir,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Dev { .. } => "spire-dev",
            Self::Real { .. } => "SPIRE 1.13.3",
        }
    }

    fn socket(&self) -> PathBuf {
        match self {
            Self::Dev { dev, .. } => dev
                .agent(NODE)
                .unwrap_or_else(|e| panic!("{e}"))
                .workload_socket()
                .to_owned(),
            Self::Real { socket, .. } => socket.clone(),
        }
    }

    /// Registers identity `n` for this process on the node; the entry ID.
    fn register(&self, n: u32) -> String {
        let sid = format!("spiffe://{TD}/identity/{n}");
        match self {
            Self::Dev { dev, .. } => {
                let id = SpiffeId::parse(&sid).unwrap_or_else(|e| panic!("{e}"));
                dev.add_entry(EntrySpec::new(NODE, id))
                    .unwrap_or_else(|e| panic!("{e}"))
                    .id
                    .clone()
            }
            Self::Real { server, parent, .. } => server
                .create_entry(parent, &sid, &[&format!("unix:uid:{}", own_uid())])
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }

    fn unregister(&self, id: &str) {
        match self {
            Self::Dev { dev, .. } => drop(dev.remove_entry(id).unwrap_or_else(|e| panic!("{e}"))),
            Self::Real { server, .. } => server.delete_entry(id).unwrap_or_else(|e| panic!("{e}")),
        }
    }
}

/// A gRPC channel over the unix socket at `path`.
async fn uds_channel(path: &Path) -> Channel {
    use hyper_util::rt::TokioIo;
    use tokio::net::UnixStream;
    use tonic::transport::{Endpoint, Uri};
    let p = path.to_owned();
    Endpoint::from_static("http://spire-agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()))
}

async fn client(path: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(uds_channel(path).await)
}

fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        spire_proto::WORKLOAD_HEADER_KEY,
        tonic::metadata::MetadataValue::from_static(spire_proto::WORKLOAD_HEADER_VALUE),
    );
    r
}

/// An error as compared across backends.
fn status_of(s: &tonic::Status) -> (tonic::Code, String) {
    (s.code(), s.message().to_owned())
}

/// Splits concatenated DER certificates.
fn split(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der)
            .unwrap_or_else(|e| panic!("certificate {} of the chain: {e}", out.len()));
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

/// What one X509SVIDResponse says, in the terms meshauth relies on.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    spiffe_ids: Vec<String>,
    /// Per SVID: certificates in `x509_svid`, the leaf's URI SANs, whether
    /// the leaf is a CA, whether the key parses as PKCS#8 and matches the
    /// leaf's public key.
    svids: Vec<(usize, Vec<String>, bool, bool)>,
    /// Per SVID: the bundle's certificates are all CAs.
    bundle_is_cas: bool,
    /// Federated bundles.
    federated: usize,
}

fn shape(m: &X509svidResponse) -> Shape {
    let mut svids = Vec::new();
    let mut bundle_is_cas = true;
    for s in &m.svids {
        let chain = split(&s.x509_svid);
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap_or_else(|e| panic!("{e}"));
        let uris = meshauth_tests::uri_sans(&leaf);
        let key_matches = ring_key_matches(&s.x509_svid_key, leaf.public_key().raw);
        svids.push((chain.len(), uris, leaf.is_ca(), key_matches));
        for ca in split(&s.bundle) {
            let (_, c) = X509Certificate::from_der(&ca).unwrap_or_else(|e| panic!("{e}"));
            bundle_is_cas &= c.is_ca();
        }
    }
    Shape {
        spiffe_ids: m.svids.iter().map(|s| s.spiffe_id.clone()).collect(),
        svids,
        bundle_is_cas,
        federated: m.federated_bundles.len(),
    }
}

/// Whether the PKCS#8 key's public half is the certificate's
/// SubjectPublicKeyInfo key (compared through rustls's key loading).
fn ring_key_matches(pkcs8: &[u8], spki: &[u8]) -> bool {
    use rustls::crypto::ring::sign::any_supported_type;
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(pkcs8.to_vec().into());
    match any_supported_type(&key) {
        Ok(signing) => signing.public_key().is_some_and(|pk| pk.as_ref() == spki),
        Err(_) => false,
    }
}

/// Everything the suite observes on one backend.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    no_header: (tonic::Code, String),
    unknown_caller: (tonic::Code, String),
    first: Shape,
    bundles_keys: Vec<String>,
    bundles_match: bool,
    /// The renewal's time as a fraction of the first SVID's validity, in
    /// tenths (compared as a range below, not for equality).
    rotated_at_tenths: Option<u64>,
    after_rotation: Shape,
    last_entry_removed: (tonic::Code, String),
}

async fn observe(b: &Backend) -> Observed {
    let socket = b.socket();
    let mut c = client(&socket).await;

    let no_header = status_of(
        &first_message(&mut c, false)
            .await
            .err()
            .unwrap_or_else(|| panic!("{}: a call without the header is answered", b.name())),
    );
    let unknown_caller = status_of(
        &first_message(&mut c, true)
            .await
            .err()
            .unwrap_or_else(|| panic!("{}: a caller without entries gets an SVID", b.name())),
    );

    let entry = b.register(4242);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut stream, first) = loop {
        if let Ok(got) = first_message(&mut c, true).await {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no SVID 30 s after registering",
            b.name()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first_leaf = split(&first.svids[0].x509_svid)[0].clone();

    let bundles = c
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap_or_else(|e| panic!("{}: FetchX509Bundles: {e}", b.name()))
        .into_inner()
        .message()
        .await
        .unwrap_or_else(|e| panic!("{}: FetchX509Bundles message: {e}", b.name()))
        .unwrap_or_else(|| panic!("{}: FetchX509Bundles ended", b.name()));
    let mut bundles_keys: Vec<String> = bundles.bundles.keys().cloned().collect();
    bundles_keys.sort();
    let bundles_match = bundles
        .bundles
        .get(&format!("spiffe://{TD}"))
        .is_some_and(|der| split(der) == split(&first.svids[0].bundle));

    // The next message with another certificate: the rotation.
    let rotated = tokio::time::timeout(TTL * 2, async {
        loop {
            match stream.message().await {
                Ok(Some(m)) if split(&m.svids[0].x509_svid)[0] != first_leaf => return Some(m),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("{}: no rotation within {:?}", b.name(), TTL * 2));
    // Measured from the first SVID's NotBefore would need clock alignment;
    // from its arrival is what a client sees (arrival ≤ a second after).
    // When it came, as a fraction of the first certificate's validity
    // (NotBefore to NotAfter, the backdate included): SPIRE's agent renews
    // when less than half of it is left (±10 % jitter), at a sync.
    let arrived = SystemTime::now();
    let (_, leaf) = X509Certificate::from_der(&first_leaf).unwrap_or_else(|e| panic!("{e}"));
    let (nb, na) = (
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    );
    let now = arrived
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let fraction = (now - nb as f64) / (na - nb) as f64;
    println!(
        "{}: first SVID valid {nb}..{na}, the next arrived at {now:.2} ({fraction:.2} of its validity)",
        b.name()
    );
    let rotated_at_tenths = Some((fraction * 10.0).round() as u64);

    b.unregister(&entry);
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return (tonic::Code::Ok, "stream ended".to_owned()),
                Err(s) => return status_of(&s),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{}: the stream went on 30 s after the last entry went",
            b.name()
        )
    });

    Observed {
        no_header,
        unknown_caller,
        first: shape(&first),
        bundles_keys,
        bundles_match,
        rotated_at_tenths,
        after_rotation: shape(&rotated),
        last_entry_removed: ended,
    }
}

type Client = SpiffeWorkloadApiClient<Channel>;

/// Opens FetchX509SVID (with or without the header) and reads its first
/// message: the stream and the message, or the error (of the call or of
/// the first message: servers differ in where they fail).
async fn first_message(
    c: &mut Client,
    header: bool,
) -> Result<(tonic::Streaming<X509svidResponse>, X509svidResponse), tonic::Status> {
    let req = if header {
        with_header(X509svidRequest {})
    } else {
        tonic::Request::new(X509svidRequest {})
    };
    let mut s = c.fetch_x509svid(req).await?.into_inner();
    let m = s
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("the stream ended without a message"))?;
    Ok((s, m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_dev_answers_the_workload_api_like_spire() {
    let dev = Backend::dev().await;
    let real = tokio::task::block_in_place(Backend::real);
    let (d, r) = (observe(&dev).await, observe(&real).await);
    println!("spire-dev: {d:#?}\nSPIRE:     {r:#?}");

    // What each must say.
    let me = format!("spiffe://{TD}/identity/4242");
    for (name, o) in [("spire-dev", &d), ("SPIRE", &r)] {
        assert_eq!(
            o.no_header,
            (
                tonic::Code::InvalidArgument,
                "security header missing from request".to_owned()
            ),
            "{name}"
        );
        assert_eq!(
            o.unknown_caller,
            (
                tonic::Code::PermissionDenied,
                "no identity issued".to_owned()
            ),
            "{name}"
        );
        assert_eq!(o.first.spiffe_ids, vec![me.clone()], "{name}");
        assert_eq!(o.first.svids[0].1, vec![me.clone()], "{name}: URI SAN");
        assert!(!o.first.svids[0].2, "{name}: the leaf is no CA");
        assert!(o.first.svids[0].3, "{name}: the key matches the leaf");
        assert!(o.first.bundle_is_cas, "{name}: the bundle holds CAs");
        assert_eq!(o.bundles_keys, vec![format!("spiffe://{TD}")], "{name}");
        assert!(
            o.bundles_match,
            "{name}: FetchX509Bundles = the SVID's bundle"
        );
        let at = o.rotated_at_tenths.unwrap_or(0);
        assert!(
            (4..=7).contains(&at),
            "{name}: renewed at {at}/10 of the validity, not about half"
        );
        assert_eq!(
            o.last_entry_removed.0,
            tonic::Code::PermissionDenied,
            "{name}"
        );
    }
    // And the two alike, field by field (the rotation time aside).
    assert_eq!(d.no_header, r.no_header);
    assert_eq!(d.unknown_caller, r.unknown_caller);
    assert_eq!(d.first, r.first, "X509SVIDResponse shapes differ");
    assert_eq!(d.after_rotation, r.after_rotation);
    assert_eq!(d.bundles_keys, r.bundles_keys);
    assert_eq!(d.last_entry_removed, r.last_entry_removed);
}

/// The admin socket's answer to SubscribeToX509SVIDs (selectors
/// `unix:uid:4001`): the refusal, or Ok with the SPIFFE IDs of the first
/// message.
async fn subscribe(admin: &Path) -> Result<Vec<String>, (tonic::Code, String)> {
    subscribe_with(admin, &["uid:4001"], 0).await
}

/// The admin socket's answer to SubscribeToX509SVIDs with `unix` selector
/// values and a PID (either may be empty/0).
async fn subscribe_with(
    admin: &Path,
    unix: &[&str],
    pid: i32,
) -> Result<Vec<String>, (tonic::Code, String)> {
    use spire_proto::delegatedidentity::SubscribeToX509sviDsRequest;
    use spire_proto::delegatedidentity::delegated_identity_client::DelegatedIdentityClient;
    let channel = uds_channel(admin).await;
    let mut c = DelegatedIdentityClient::new(channel);
    let req = SubscribeToX509sviDsRequest {
        selectors: unix
            .iter()
            .map(|v| spire_proto::types::Selector {
                r#type: "unix".into(),
                value: (*v).into(),
            })
            .collect(),
        pid,
    };
    let first = async {
        let mut s = c.subscribe_to_x509svi_ds(req).await?.into_inner();
        s.message()
            .await?
            .ok_or_else(|| tonic::Status::unknown("ended without a message"))
    };
    match first.await {
        Ok(m) => Ok(m
            .x509_svids
            .iter()
            .filter_map(|s| s.x509_svid.as_ref()?.id.as_ref())
            .map(|id| format!("spiffe://{}{}", id.trust_domain, id.path))
            .collect()),
        Err(s) => Err(status_of(&s)),
    }
}

/// Delegated Identity API refusal: a caller whose only identity is not an
/// authorized delegate is refused with SPIRE's code and message, by both;
/// once it holds the delegate's identity, both serve it the SVIDs of the
/// selectors it asked for, and the same by PID (a process running as uid
/// 4001 gets its entry, one running as 4002 nothing, a dead PID nothing);
/// both refuse selectors and a PID together, and neither, alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_dev_refuses_a_delegated_api_caller_like_spire() {
    let delegate = format!("spiffe://{TD}/meshauth/agent");
    let other = format!("spiffe://{TD}/ops/not-a-delegate");
    let pod = format!("spiffe://{TD}/identity/500");

    // spire-dev: its callers match every entry of their node.
    let dir = tempdir();
    let mut cfg = DevConfig::new(dir.path().join("spire"));
    cfg.nodes = vec![NODE.into()];
    cfg.control_socket = false;
    cfg.authorized_delegates = Some(vec![delegate.clone()]);
    let dev = SpireDev::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
    let add = |sid: &str, selectors: &[&str]| {
        let mut spec = EntrySpec::new(NODE, SpiffeId::parse(sid).unwrap_or_else(|e| panic!("{e}")));
        spec.selectors = selectors
            .iter()
            .map(|s| {
                let (k, v) = s.split_once(':').unwrap_or_else(|| panic!("{s}"));
                spire_dev::Selector::new(k.to_owned(), v.to_owned())
            })
            .collect();
        dev.add_entry(spec).unwrap_or_else(|e| panic!("{e}"));
    };
    add(&other, &["unix:uid:1"]);
    add(&pod, &["unix:uid:4001"]);
    let admin = dev
        .agent(NODE)
        .unwrap_or_else(|e| panic!("{e}"))
        .admin_socket()
        .to_owned();
    let dev_refused = subscribe(&admin).await;
    add(&delegate, &["unix:uid:1"]);
    let dev_served = subscribe(&admin).await;
    let pod_4001 = Sleeper::as_uid(4001);
    let pod_4002 = Sleeper::as_uid(4002);
    let by_pid = |admin: PathBuf| {
        let (a, b) = (pod_4001.pid(), pod_4002.pid());
        async move {
            vec![
                subscribe_with(&admin, &[], a).await,
                subscribe_with(&admin, &[], b).await,
                subscribe_with(&admin, &[], dead_pid()).await,
                subscribe_with(&admin, &["uid:4001"], a).await,
                subscribe_with(&admin, &[], 0).await,
            ]
        }
    };
    let dev_by_pid = by_pid(admin.clone()).await;

    // SPIRE: attests the caller (this process, by uid).
    let bin = spire_bin();
    let rdir = tempdir();
    let mut st = settings(rdir.path(), TD).unwrap_or_else(|e| panic!("{e}"));
    st.agent.admin_socket_path = Some(rdir.path().join("admin").join("admin.sock"));
    st.agent.authorized_delegates = vec![delegate.clone()];
    st.agent.sync_interval = Some(Duration::from_millis(500));
    let (server, agent) = tokio::task::block_in_place(|| {
        let server = SpireServer::start(&bin, &st).unwrap_or_else(|e| panic!("{e}"));
        let alias = format!("spiffe://{TD}/meshauth/node/{NODE}");
        let token = server.join_token(&alias).unwrap_or_else(|e| panic!("{e}"));
        let agent = SpireAgent::start(&bin, &server, &st, &token).unwrap_or_else(|e| panic!("{e}"));
        let me = format!("unix:uid:{}", own_uid());
        server
            .create_entry(&alias, &other, &[&me])
            .unwrap_or_else(|e| panic!("{e}"));
        server
            .create_entry(&alias, &pod, &["unix:uid:4001"])
            .unwrap_or_else(|e| panic!("{e}"));
        (server, agent)
    });
    let wait_served = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent
            .served()
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .any(|s| s == want)
        {
            assert!(
                Instant::now() < deadline,
                "SPIRE did not serve {want} in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    tokio::task::block_in_place(|| wait_served(&other));
    let real_admin = st.agent.admin_socket_path.clone().unwrap_or_default();
    let real_refused = subscribe(&real_admin).await;
    tokio::task::block_in_place(|| {
        let alias = format!("spiffe://{TD}/meshauth/node/{NODE}");
        server
            .create_entry(&alias, &delegate, &[&format!("unix:uid:{}", own_uid())])
            .unwrap_or_else(|e| panic!("{e}"));
        wait_served(&delegate);
    });
    let real_served = subscribe(&real_admin).await;
    let real_by_pid = by_pid(real_admin.clone()).await;

    println!("refused: spire-dev {dev_refused:?}, SPIRE {real_refused:?}");
    println!("served:  spire-dev {dev_served:?}, SPIRE {real_served:?}");
    assert_eq!(
        real_refused,
        Err((
            tonic::Code::PermissionDenied,
            "caller not configured as an authorized delegate".to_owned()
        ))
    );
    assert_eq!(dev_refused, real_refused, "the same refusal");
    assert_eq!(real_served, Ok(vec![pod.clone()]));
    assert_eq!(dev_served, real_served, "the same SVIDs once authorized");
    println!("by PID:  spire-dev {dev_by_pid:?}\n         SPIRE     {real_by_pid:?}");
    let refused = Err((
        tonic::Code::InvalidArgument,
        "must provide either selectors or non-zero PID, but not both".to_owned(),
    ));
    assert_eq!(
        real_by_pid,
        vec![
            Ok(vec![pod.clone()]),
            Ok(vec![]),
            Ok(vec![]),
            refused.clone(),
            refused
        ]
    );
    assert_eq!(dev_by_pid, real_by_pid, "the same answers by PID");
}

/// Who signed a leaf: its authority key identifier, or its issuer's name
/// when it carries none.
fn signer(leaf_der: &[u8]) -> String {
    let (_, c) = X509Certificate::from_der(leaf_der).unwrap_or_else(|e| panic!("{e}"));
    for ext in c.extensions() {
        if let ParsedExtension::AuthorityKeyIdentifier(aki) = ext.parsed_extension()
            && let Some(k) = &aki.key_identifier
        {
            return format!("{:02x?}", k.0);
        }
    }
    c.issuer().to_string()
}

/// (CAs in the bundle, whether the leaf is signed by the first SVID's
/// signer) of one message.
fn ca_state(m: &X509svidResponse, first_signer: &str) -> (usize, bool) {
    let s = &m.svids[0];
    (
        split(&s.bundle).len(),
        signer(&split(&s.x509_svid)[0]) == first_signer,
    )
}

/// Follows the stream until `done` holds for a message's state, recording
/// each new state; panics after `within`.
async fn follow_states(
    stream: &mut tonic::Streaming<X509svidResponse>,
    first_signer: &str,
    seen: &mut Vec<(usize, bool)>,
    within: Duration,
    done: impl Fn((usize, bool)) -> bool,
) {
    tokio::time::timeout(within, async {
        loop {
            let m = stream
                .message()
                .await
                .unwrap_or_else(|e| panic!("stream: {e}"))
                .unwrap_or_else(|| panic!("the stream ended"));
            let st = ca_state(&m, first_signer);
            if seen.last() != Some(&st) {
                seen.push(st);
            }
            if done(st) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not within {within:?}; states so far {seen:?}"));
}

/// A CA rotation as the Workload API shows it: first the next CA joins the
/// bundle while SVIDs stay under the old one (SPIRE's "prepared"), then
/// SVIDs come under the new CA with both CAs in the bundle ("activated") —
/// so a peer trusts the new CA before any SVID under it exists. spire-dev
/// (prepare_ca, activate_ca) and SPIRE (a 1 m CA: prepared at about 30 s,
/// activated at about 50 s) go through the same states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_dev_rotates_its_ca_like_spire() {
    // spire-dev.
    let dev = Backend::dev().await;
    let Backend::Dev { dev: d, .. } = &dev else {
        unreachable!()
    };
    dev.register(4242);
    let mut c = client(&dev.socket()).await;
    let (mut stream, first) = first_message(&mut c, true)
        .await
        .unwrap_or_else(|e| panic!("spire-dev: {e:?}"));
    let first_signer = signer(&split(&first.svids[0].x509_svid)[0]);
    let mut dev_states = vec![ca_state(&first, &first_signer)];
    d.prepare_ca().unwrap_or_else(|e| panic!("{e}"));
    follow_states(&mut stream, &first_signer, &mut dev_states, TTL * 2, |s| {
        s.0 == 2
    })
    .await;
    d.activate_ca().unwrap_or_else(|e| panic!("{e}"));
    follow_states(&mut stream, &first_signer, &mut dev_states, TTL * 2, |s| {
        !s.1
    })
    .await;

    // SPIRE, with a CA of one minute.
    let bin = spire_bin();
    let rdir = tempdir();
    let mut st = settings(rdir.path(), TD).unwrap_or_else(|e| panic!("{e}"));
    st.server.ca_ttl = Duration::from_secs(60);
    st.server.agent_ttl = Some(Duration::from_secs(60));
    st.server.svid_ttl = TTL;
    st.agent.sync_interval = Some(Duration::from_millis(500));
    let (server, agent) = tokio::task::block_in_place(|| {
        let server = SpireServer::start(&bin, &st).unwrap_or_else(|e| panic!("{e}"));
        let alias = format!("spiffe://{TD}/meshauth/node/{NODE}");
        let token = server.join_token(&alias).unwrap_or_else(|e| panic!("{e}"));
        let agent = SpireAgent::start(&bin, &server, &st, &token).unwrap_or_else(|e| panic!("{e}"));
        server
            .create_entry(
                &alias,
                &format!("spiffe://{TD}/identity/4242"),
                &[&format!("unix:uid:{}", own_uid())],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        (server, agent)
    });
    let mut c = client(agent.workload_socket()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut stream, first) = loop {
        if let Ok(got) = first_message(&mut c, true).await {
            break got;
        }
        assert!(Instant::now() < deadline, "SPIRE: no SVID in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first_signer = signer(&split(&first.svids[0].x509_svid)[0]);
    let mut real_states = vec![ca_state(&first, &first_signer)];
    follow_states(
        &mut stream,
        &first_signer,
        &mut real_states,
        Duration::from_secs(90),
        |s| !s.1,
    )
    .await;
    println!("CA rotation states: spire-dev {dev_states:?}, SPIRE {real_states:?}");
    println!(
        "SPIRE server log: {} prepared, {} activated",
        server.log().matches("X509 CA prepared").count(),
        server.log().matches("X509 CA activated").count()
    );
    let want = vec![(1, true), (2, true), (2, false)];
    assert_eq!(real_states, want, "SPIRE: prepared, then activated");
    assert_eq!(
        dev_states, real_states,
        "spire-dev rotates its CA like SPIRE"
    );
}
