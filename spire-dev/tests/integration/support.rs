//! Helpers: start a deployment in a tempdir, gRPC clients over unix sockets,
//! awaiting stream messages with a timeout, certificate parsing.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use spire_dev::{DevConfig, EntrySpec, Selector, SpiffeId, SpireDev};
use spire_proto::delegatedidentity::delegated_identity_client::DelegatedIdentityClient;
use spire_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spire_proto::workload::{X509BundlesRequest, X509svidRequest, X509svidResponse};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status, Streaming};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The trust domain every test uses.
pub const TD: &str = "meshauth.local";
/// How long a test waits for something that should happen before failing.
///
/// A guard, not a target: a passing test never waits this long. It is generous
/// because CI runs on two loaded cores with a cold page cache, where a debug
/// binary started with `RUST_BACKTRACE=1` spent over 5 s symbolizing the
/// backtrace of its flag error (stop 22's failure).
pub const WAIT: Duration = Duration::from_secs(30);

/// A running deployment and the tempdir holding its sockets.
pub struct Dev {
    pub dev: SpireDev,
    /// Keeps the socket directory alive.
    pub _dir: tempfile::TempDir,
}

impl Dev {
    pub fn workload_socket(&self, node: &str) -> PathBuf {
        self.dev
            .agent(node)
            .unwrap_or_else(|e| panic!("agent {node}: {e}"))
            .workload_socket()
            .to_owned()
    }

    pub fn admin_socket(&self, node: &str) -> PathBuf {
        self.dev
            .agent(node)
            .unwrap_or_else(|e| panic!("agent {node}: {e}"))
            .admin_socket()
            .to_owned()
    }

    /// Serials the agent of `node` holds, in order.
    pub fn serials(&self, node: &str) -> Vec<String> {
        self.dev
            .agent(node)
            .unwrap_or_else(|e| panic!("agent {node}: {e}"))
            .identities()
            .into_iter()
            .map(|i| i.serial)
            .collect()
    }
}

/// The SPIFFE ID `spiffe://meshauth.local<path>`.
pub fn id(path: &str) -> SpiffeId {
    SpiffeId::parse_in(TD, path).unwrap_or_else(|e| panic!("SPIFFE ID {path}: {e}"))
}

/// An entry for `path` on `node`.
pub fn entry(node: &str, path: &str) -> EntrySpec {
    EntrySpec::new(node, id(path))
}

/// An entry with a TTL.
pub fn entry_ttl(node: &str, path: &str, ttl: Duration) -> EntrySpec {
    entry(node, path).with_ttl(ttl)
}

/// An entry with selectors `type:value`.
pub fn entry_sel(node: &str, path: &str, selectors: &[&str]) -> EntrySpec {
    selectors.iter().fold(entry(node, path), |e, s| {
        e.with_selector(Selector::parse(s).unwrap_or_else(|err| panic!("selector {s}: {err}")))
    })
}

/// Starts a deployment with `nodes` and `entries` (control socket on).
pub async fn start(nodes: &[&str], entries: Vec<EntrySpec>) -> Dev {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = DevConfig::new(dir.path());
    config.nodes = nodes.iter().map(|n| (*n).to_owned()).collect();
    config.entries = entries;
    let dev = SpireDev::start(config)
        .await
        .unwrap_or_else(|e| panic!("SpireDev::start: {e}"));
    Dev { dev, _dir: dir }
}

/// A channel to the unix socket at `path` (connects at once).
pub async fn channel(path: &Path) -> Channel {
    let path = path.to_owned();
    let shown = path.display().to_string();
    Endpoint::try_from("http://[::1]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap_or_else(|e| panic!("connect {shown}: {e}"))
}

/// A Workload API client on `path`.
pub async fn workload(path: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(channel(path).await)
}

/// A Delegated Identity API client on `path`.
pub async fn delegated(path: &Path) -> DelegatedIdentityClient<Channel> {
    DelegatedIdentityClient::new(channel(path).await)
}

/// `msg` with the `workload.spiffe.io: true` header.
pub fn with_header<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        spire_proto::WORKLOAD_HEADER_KEY,
        spire_proto::WORKLOAD_HEADER_VALUE
            .parse()
            .expect("header value"),
    );
    req
}

/// Opens FetchX509SVID (with the header).
pub async fn fetch_svids(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> Streaming<X509svidResponse> {
    client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_or_else(|s| panic!("FetchX509SVID: {s:?}"))
        .into_inner()
}

/// Opens FetchX509Bundles (with the header).
pub async fn fetch_bundles(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> Streaming<spire_proto::workload::X509BundlesResponse> {
    client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap_or_else(|s| panic!("FetchX509Bundles: {s:?}"))
        .into_inner()
}

/// Runs `fut` with the [`WAIT`] timeout, panicking with `what` on timeout.
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// The next message of `stream` within [`WAIT`]; panics on error, end or timeout.
pub async fn next<T>(what: &str, stream: &mut Streaming<T>) -> T {
    match within(what, stream.message()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("{what}: stream ended"),
        Err(s) => panic!("{what}: stream error {s:?}"),
    }
}

/// The next item of `stream` (message, end or status) within [`WAIT`].
pub async fn next_item<T>(what: &str, stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
    within(what, stream.message()).await
}

/// Asserts `stream` yields nothing for `quiet`.
pub async fn assert_quiet<T: std::fmt::Debug>(
    what: &str,
    stream: &mut Streaming<T>,
    quiet: Duration,
) {
    if let Ok(item) = tokio::time::timeout(quiet, stream.message()).await {
        panic!("{what}: expected no message for {quiet:?}, got {item:?}");
    }
}

/// (SPIFFE ID, leaf serial hex) of each SVID in a response.
pub fn ids_serials(resp: &X509svidResponse) -> Vec<(String, String)> {
    resp.svids
        .iter()
        .map(|s| {
            let certs = split_certs(&s.x509_svid);
            (s.spiffe_id.clone(), serial_hex(&certs[0]))
        })
        .collect()
}

/// Splits concatenated DER certificates.
pub fn split_certs(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der)
            .unwrap_or_else(|e| panic!("parsing certificate #{} of a DER chain: {e}", out.len()));
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

/// Parses one DER certificate.
pub fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) =
        X509Certificate::from_der(der).unwrap_or_else(|e| panic!("parsing certificate: {e}"));
    assert!(
        rest.is_empty(),
        "{} trailing bytes after the certificate",
        rest.len()
    );
    cert
}

/// The serial of a DER certificate as lowercase hex.
pub fn serial_hex(der: &[u8]) -> String {
    parse(der).tbs_certificate.serial.to_str_radix(16)
}

/// The subject of a DER certificate, as a string.
pub fn subject(der: &[u8]) -> String {
    parse(der).subject().to_string()
}

/// The issuer of a DER certificate, as a string.
pub fn issuer(der: &[u8]) -> String {
    parse(der).issuer().to_string()
}
