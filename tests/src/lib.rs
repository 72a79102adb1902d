//! Shared helpers for meshauth's cross-crate tests: a spire-dev deployment in a
//! tempdir, an [`SvidCache`] fed by one of its node agents, and waiting for cache
//! events and source states with timeouts (a test panics with what it waited
//! for, never hangs).
//!
//! Everything is real: unix sockets under the tempdir, certificates from
//! spire-dev's CA, the svid-cache sources speaking gRPC to the agents.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spire_dev::{DevConfig, Entry, EntrySpec, IdentityInfo, Selector, SpiffeId, SpireDev};
use svid_cache::{
    CacheChanges, CacheConfig, CacheEvent, DelegatedIdentityConfig, DelegatedPodsConfig,
    PodSubscription, PodTargets, RemovalReason, SourceError, SourceHandle, SourceState,
    SourceStatus, Svid, SvidCache, TrustDomain, WorkloadApiConfig, spawn_delegated_identity,
    spawn_delegated_pods, spawn_workload_api,
};
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The trust domain of meshauth (spire-dev's and svid-cache's default).
pub const TD: &str = "meshauth.local";
/// How long a test waits for something that should happen soon.
pub const WAIT: Duration = Duration::from_secs(10);

pub use meshauth_test_support::init_tracing;

pub mod real_spire;

/// `spiffe://<trust_domain><path>`.
pub fn spiffe_id(trust_domain: &str, path: &str) -> SpiffeId {
    SpiffeId::parse_in(trust_domain, path)
        .unwrap_or_else(|e| panic!("SPIFFE ID {path} in {trust_domain}: {e}"))
}

/// An entry for `spiffe://meshauth.local/identity/<identity>` on `node`, with
/// entry ID `e-<identity>`.
pub fn identity_entry(node: &str, identity: u32) -> EntrySpec {
    EntrySpec::new(node, spiffe_id(TD, &format!("/identity/{identity}")))
        .with_id(format!("e-{identity}"))
}

/// [`identity_entry`] with selectors given as `type:value`.
pub fn selector_entry(node: &str, identity: u32, selectors: &[&str]) -> EntrySpec {
    selectors
        .iter()
        .fold(identity_entry(node, identity), |e, s| {
            e.with_selector(Selector::parse(s).unwrap_or_else(|err| panic!("selector {s}: {err}")))
        })
}

/// A process running as `uid` (`sleep`), killed when dropped: a "pod" to
/// attest by PID.
#[derive(Debug)]
pub struct Sleeper(std::process::Child);

impl Sleeper {
    pub fn as_uid(uid: u32) -> Self {
        use std::os::unix::process::CommandExt as _;
        let child = std::process::Command::new("sleep")
            .arg("600")
            .uid(uid)
            .gid(uid)
            .spawn()
            .unwrap_or_else(|e| panic!("sleep as uid {uid}: {e}"));
        Self(child)
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A PID no process has: a child that has exited and been reaped.
pub fn dead_pid() -> i32 {
    let mut c = std::process::Command::new("true")
        .spawn()
        .unwrap_or_else(|e| panic!("true: {e}"));
    let pid = c.id();
    c.wait().unwrap_or_else(|e| panic!("{e}"));
    i32::try_from(pid).unwrap_or_else(|e| panic!("{e}"))
}

/// A spire-dev deployment under its own tempdir (removed on drop).
#[derive(Debug)]
pub struct Deployment {
    /// The deployment.
    pub dev: SpireDev,
    _dir: tempfile::TempDir,
}

impl Deployment {
    /// Starts `nodes` (plus every node an entry names) in `trust_domain`, with
    /// `entries` registered, no control socket.
    pub async fn start(trust_domain: &str, nodes: &[&str], entries: Vec<EntrySpec>) -> Self {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("meshauth-tests-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir for spire-dev: {e}"));
        let mut config = DevConfig::new(dir.path());
        config.trust_domain = trust_domain.to_owned();
        config.nodes = nodes.iter().map(|n| (*n).to_owned()).collect();
        config.entries = entries;
        config.control_socket = false;
        let dev = SpireDev::start(config.clone())
            .await
            .unwrap_or_else(|e| panic!("SpireDev::start({config:?}): {e}"));
        Self { dev, _dir: dir }
    }

    /// The Workload API socket of `node`'s agent.
    pub fn workload_socket(&self, node: &str) -> PathBuf {
        self.dev
            .agent(node)
            .unwrap_or_else(|e| panic!("{e}"))
            .workload_socket()
            .to_owned()
    }

    /// The Delegated Identity API (admin) socket of `node`'s agent.
    pub fn admin_socket(&self, node: &str) -> PathBuf {
        self.dev
            .agent(node)
            .unwrap_or_else(|e| panic!("{e}"))
            .admin_socket()
            .to_owned()
    }

    /// Registers `spec`; the agents hold its SVID on return (unless in outage or down).
    pub fn add(&self, spec: EntrySpec) -> Entry {
        self.dev
            .add_entry(spec.clone())
            .unwrap_or_else(|e| panic!("add_entry({spec:?}): {e}"))
    }

    /// Removes entry `id`; the agents drop its SVID on return.
    pub fn remove(&self, id: &str) -> Entry {
        self.dev
            .remove_entry(id)
            .unwrap_or_else(|e| panic!("remove_entry({id}): {e}"))
    }

    /// What `node`'s agent serves for `identity` in meshauth.local.
    pub fn held(&self, node: &str, identity: u32) -> IdentityInfo {
        let want = format!("spiffe://{TD}/identity/{identity}");
        let held = self
            .dev
            .agent(node)
            .unwrap_or_else(|e| panic!("{e}"))
            .identities();
        held.iter()
            .find(|i| i.spiffe_id == want)
            .cloned()
            .unwrap_or_else(|| panic!("agent {node} holds no SVID for {want}; it holds {held:?}"))
    }

    /// The DER roots the server's bundle holds now, the signing one first.
    pub fn bundle(&self) -> Vec<Vec<u8>> {
        self.dev.server().bundle()
    }
}

/// Which API of an agent a [`Node`] reads.
#[derive(Debug, Clone)]
pub enum Api {
    /// The Workload API socket.
    Workload(PathBuf),
    /// The Delegated Identity API socket, with `(type, value)` selectors.
    Delegated(PathBuf, Vec<(String, String)>),
    /// The Delegated Identity API socket, one subscription per pod of the
    /// targets.
    DelegatedPods(PathBuf, watch::Receiver<Option<PodTargets>>),
}

/// A cache of trust domain [`TD`] (or another) fed by one source, with its
/// expiry timer, and a subscription taken before the source started. Dropping
/// it stops the source and the timer.
#[derive(Debug)]
pub struct Node {
    /// The cache.
    pub cache: SvidCache,
    /// Its source.
    pub source: SourceHandle,
    /// Every change message since the start.
    pub events: Events,
    /// The pods' subscriptions ([`Api::DelegatedPods`] only).
    pub pods: Option<watch::Receiver<BTreeMap<String, PodSubscription>>>,
    shutdown: CancellationToken,
}

impl Node {
    /// A cache of `trust_domain` fed by `api`.
    pub fn start_in(trust_domain: &str, api: Api) -> Self {
        let cache = SvidCache::new(CacheConfig {
            trust_domain: TrustDomain::new(trust_domain)
                .unwrap_or_else(|e| panic!("cache trust domain: {e}")),
            ..CacheConfig::default()
        });
        let events = Events::new(cache.subscribe());
        let shutdown = CancellationToken::new();
        cache.spawn_expiry(shutdown.clone());
        let mut pods = None;
        let source = match api {
            Api::DelegatedPods(path, targets) => {
                let (h, p) = spawn_delegated_pods(
                    DelegatedPodsConfig::new(path),
                    targets,
                    cache.clone(),
                    shutdown.clone(),
                );
                pods = Some(p);
                h
            }
            Api::Workload(path) => spawn_workload_api(
                WorkloadApiConfig::new(path),
                cache.clone(),
                shutdown.clone(),
            ),
            Api::Delegated(path, selectors) => spawn_delegated_identity(
                DelegatedIdentityConfig::new(path, selectors),
                cache.clone(),
                shutdown.clone(),
            ),
        };
        Self {
            cache,
            source,
            events,
            pods,
            shutdown,
        }
    }

    /// A meshauth.local cache fed by `node`'s Workload API.
    pub fn workload(dep: &Deployment, node: &str) -> Self {
        Self::start_in(TD, Api::Workload(dep.workload_socket(node)))
    }

    /// A meshauth.local cache fed by `node`'s Delegated Identity API with
    /// selectors `type:value`.
    pub fn delegated(dep: &Deployment, node: &str, selectors: &[&str]) -> Self {
        let selectors = selectors
            .iter()
            .map(|s| {
                let (t, v) = s
                    .split_once(':')
                    .unwrap_or_else(|| panic!("selector {s}: expected type:value"));
                (t.to_owned(), v.to_owned())
            })
            .collect();
        Self::start_in(TD, Api::Delegated(dep.admin_socket(node), selectors))
    }

    /// A meshauth.local cache fed by `node`'s Delegated Identity API, one
    /// subscription per pod; the sender sets the pods.
    pub fn delegated_pods(
        dep: &Deployment,
        node: &str,
    ) -> (Self, watch::Sender<Option<PodTargets>>) {
        let (tx, rx) = watch::channel(None);
        (
            Self::start_in(TD, Api::DelegatedPods(dep.admin_socket(node), rx)),
            tx,
        )
    }

    /// Waits until the pods' subscriptions satisfy `pred`.
    pub async fn wait_pods(
        &self,
        what: &str,
        mut pred: impl FnMut(&BTreeMap<String, PodSubscription>) -> bool,
    ) -> BTreeMap<String, PodSubscription> {
        let mut rx = self
            .pods
            .clone()
            .unwrap_or_else(|| panic!("{what}: not a per-pod source"));
        let last = self.pods.clone().unwrap_or_else(|| panic!("{what}"));
        match tokio::time::timeout(WAIT, rx.wait_for(|p| pred(p))).await {
            Ok(Ok(p)) => p.clone(),
            Ok(Err(_)) => panic!("waiting for {what}: the source worker stopped"),
            Err(_) => panic!(
                "waiting for {what}: not reached within {WAIT:?}; pods are {:?}, source {:?}",
                last.borrow(),
                self.source.status()
            ),
        }
    }

    /// The SVID of `identity`, or a panic naming what the cache holds.
    pub fn svid(&self, identity: u32) -> Arc<Svid> {
        self.cache.get(identity).unwrap_or_else(|| {
            panic!(
                "cache has no valid SVID for identity {identity}; it holds {:?}",
                self.cache.identities()
            )
        })
    }

    /// Waits until the source's status satisfies `pred`.
    pub async fn wait_status(
        &self,
        what: &str,
        pred: impl FnMut(&SourceStatus) -> bool,
    ) -> SourceStatus {
        let mut rx = self.source.watch_status();
        match tokio::time::timeout(WAIT, rx.wait_for(pred)).await {
            Ok(Ok(status)) => status.clone(),
            Ok(Err(_)) => panic!("waiting for {what}: the source worker stopped"),
            Err(_) => panic!(
                "waiting for {what}: not reached within {WAIT:?}; status is {:?}",
                self.source.status()
            ),
        }
    }

    /// Waits until the source is connected.
    pub async fn wait_connected(&self, what: &str) -> SourceStatus {
        self.wait_status(what, SourceStatus::is_connected).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A cache subscription that remembers nothing, panics on lag, and waits with
/// [`WAIT`] as the timeout.
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Arc<CacheChanges>>,
}

impl Events {
    /// Wraps a receiver.
    pub fn new(rx: broadcast::Receiver<Arc<CacheChanges>>) -> Self {
        Self { rx }
    }

    /// The next change message.
    pub async fn next(&mut self, what: &str) -> Arc<CacheChanges> {
        self.next_within(what, WAIT).await
    }

    /// The next change message, waiting at most `limit`.
    pub async fn next_within(&mut self, what: &str, limit: Duration) -> Arc<CacheChanges> {
        match tokio::time::timeout(limit, self.rx.recv()).await {
            Ok(Ok(changes)) => changes,
            Ok(Err(e)) => panic!("waiting for {what}: cache subscription failed: {e}"),
            Err(_) => panic!("waiting for {what}: no cache change within {limit:?}"),
        }
    }

    /// Change messages until one satisfies `done` (included), waiting at most `limit` in all.
    pub async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&[Arc<CacheChanges>]) -> bool,
    ) -> Vec<Arc<CacheChanges>> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut seen = Vec::new();
        while !done(&seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Ok(changes)) => seen.push(changes),
                Ok(Err(e)) => panic!("waiting for {what}: cache subscription failed: {e}"),
                Err(_) => panic!(
                    "waiting for {what}: not seen within {limit:?}; changes seen: {:?}",
                    summarize_all(&seen)
                ),
            }
        }
        seen
    }

    /// Asserts no change message is pending.
    pub fn assert_none_pending(&mut self, what: &str) {
        match self.rx.try_recv() {
            Err(TryRecvError::Empty) => {}
            Ok(changes) => panic!("{what}: unexpected cache change {:?}", summarize(&changes)),
            Err(e) => panic!("{what}: cache subscription failed: {e}"),
        }
    }
}

/// One event as text: `added 256`, `rotated 256`, `removed 256 (Expired)`, `bundle(2)`.
pub fn describe(event: &CacheEvent) -> String {
    match event {
        CacheEvent::Added { identity, .. } => format!("added {identity}"),
        CacheEvent::Rotated { identity, .. } => format!("rotated {identity}"),
        CacheEvent::Removed { identity, reason } => format!("removed {identity} ({reason:?})"),
        CacheEvent::BundleChanged { bundle } => format!("bundle({})", bundle.authorities().len()),
    }
}

/// A change message's events as text, in order.
pub fn summarize(changes: &CacheChanges) -> Vec<String> {
    changes.events.iter().map(describe).collect()
}

/// Several messages' events as text.
pub fn summarize_all(seen: &[Arc<CacheChanges>]) -> Vec<Vec<String>> {
    seen.iter().map(|c| summarize(c)).collect()
}

/// Every event of `seen`, flattened.
pub fn all_events(seen: &[Arc<CacheChanges>]) -> impl Iterator<Item = &CacheEvent> {
    seen.iter().flat_map(|c| c.events.iter())
}

/// `Removed { identity, reason }` as text, for comparing with [`summarize`].
pub fn removed(identity: u32, reason: RemovalReason) -> String {
    format!("removed {identity} ({reason:?})")
}

/// The SVID carried by an `Added`/`Rotated` event for `identity` in `changes`.
pub fn svid_in(changes: &CacheChanges, identity: u32) -> Option<Arc<Svid>> {
    changes.events.iter().find_map(|e| match e {
        CacheEvent::Added { identity: i, svid } | CacheEvent::Rotated { identity: i, svid }
            if *i == identity =>
        {
            Some(svid.clone())
        }
        _ => None,
    })
}

/// What a test reads from a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Serial, lowercase hex (spire-dev's `IdentityInfo::serial` format).
    pub serial: String,
    /// The only URI SAN.
    pub spiffe_id: String,
    /// NotAfter.
    pub not_after: SystemTime,
}

/// Parses an SVID's leaf.
pub fn leaf(svid: &Svid) -> Leaf {
    leaf_of(svid.leaf().as_ref())
}

/// Parses a DER leaf certificate.
pub fn leaf_of(der: &[u8]) -> Leaf {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .unwrap_or_else(|e| panic!("leaf certificate does not parse: {e}"));
    let serial = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .trim_start_matches('0')
        .to_owned();
    let uris = uri_sans(&cert);
    let [spiffe_id] = uris.as_slice() else {
        panic!("leaf has URI SANs {uris:?}; expected exactly one");
    };
    let not_after = cert.validity().not_after.timestamp();
    Leaf {
        serial,
        spiffe_id: spiffe_id.clone(),
        not_after: SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(not_after).expect("NotAfter after 1970")),
    }
}

/// Whether `status` is `Disconnected` with an error `pred` accepts.
pub fn disconnected_with(status: &SourceStatus, pred: impl Fn(&SourceError) -> bool) -> bool {
    matches!(&status.state, SourceState::Disconnected { error, .. } if pred(error))
}

/// When the source's current stream opened; panics when it is not connected.
pub fn connected_since(status: &SourceStatus) -> SystemTime {
    match status.state {
        SourceState::Connected { since } => since,
        ref other => panic!("source is not connected: {other:?} (status {status:?})"),
    }
}

/// A certificate's URI SANs, in order.
pub fn uri_sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}
