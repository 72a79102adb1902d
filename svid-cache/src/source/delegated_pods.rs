//! SPIRE's Delegated Identity API, one subscription per pod: the SPIRE agent
//! attests a process of the pod by its PID (its workload attestors, as if
//! the pod had called the Workload API itself) and streams the SVIDs of the
//! entries that select it. The node agent so holds a key only while a pod
//! of that identity runs on its node and SPIRE agrees that it does.
//!
//! - The targets (pod → a PID of it, and the identity the pod has in the
//!   policy) come from a `watch`; the caller follows pods and their
//!   processes. `None` means "not known yet": nothing is applied until they
//!   are, so a starting agent never applies an empty state it would only
//!   have to undo.
//! - A subscription only counts its pod's own identity: whatever else SPIRE
//!   serves on it (a PID recycled by another pod's process, an entry whose
//!   selectors match more than the pod) is ignored and shown in
//!   [`PodSubscription::ignored`]. So a pod can never bring the node agent
//!   an identity the policy does not give it.
//! - One HTTP/2 connection carries the bundle stream and every pod's
//!   stream. The bundle stream failing, or a pod's stream ending or failing
//!   as the whole agent does (unavailable, not an authorized delegate), ends
//!   the session and the supervisor reconnects with backoff; any other
//!   failure of one pod's stream retries that pod alone, keeping its SVID.
//! - A full state is applied once the bundle and every pod subscribed at
//!   the start of the session have answered (or `connect_timeout` passed),
//!   then on every change. A pod that leaves takes its SVID with it unless
//!   another pod of the same identity still has it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use spire_proto::delegatedidentity::delegated_identity_client::DelegatedIdentityClient;
use spire_proto::delegatedidentity::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use super::delegated::{parse_bundle, parse_svids};
use super::supervisor::{self, Connector, Session};
use super::{
    BackoffConfig, DEFAULT_MAX_MESSAGE_BYTES, SourceError, SourceHandle, classify_status,
    uds_channel,
};
use crate::bundle::TrustBundle;
use crate::cache::{SvidCache, Update};
use crate::identity::TrustDomain;
use crate::svid::SvidInput;

const CALL_SVIDS: &str = "SubscribeToX509SVIDs";
const CALL_BUNDLES: &str = "SubscribeToX509Bundles";
const CALL: &str = "DelegatedIdentity";
/// First retry of one pod's failed subscription; doubles up to
/// [`POD_RETRY_MAX`].
const POD_RETRY_MIN: Duration = Duration::from_millis(500);
const POD_RETRY_MAX: Duration = Duration::from_secs(30);

/// A pod the node agent subscribes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodTarget {
    /// A process of the pod, in the SPIRE agent's PID namespace.
    pub pid: u32,
    /// The pod's identity in the policy: the only SVID taken from its
    /// subscription.
    pub identity: u32,
}

/// Pods by key (`namespace/name`).
pub type PodTargets = BTreeMap<String, PodTarget>;

/// One pod's subscription, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSubscription {
    /// The PID subscribed with.
    pub pid: u32,
    /// The identity expected.
    pub identity: u32,
    /// SPIRE answered on this subscription at least once.
    pub answered: bool,
    /// SPIRE serves the pod's identity on it.
    pub serves_identity: bool,
    /// SPIFFE IDs SPIRE served on it that are not the pod's identity.
    pub ignored: Vec<String>,
    /// The latest failure of this pod's stream (retried), if any.
    pub error: Option<String>,
}

/// Settings of a per-pod Delegated Identity API source.
#[derive(Debug, Clone)]
pub struct DelegatedPodsConfig {
    /// The SPIRE agent's admin socket.
    pub socket_path: PathBuf,
    /// Reconnect timing.
    pub backoff: BackoffConfig,
    /// Bound on connecting and opening the bundle stream, and on waiting for
    /// the first answers of a session's pods.
    pub connect_timeout: Duration,
    /// Largest message accepted from the agent.
    pub max_message_bytes: usize,
}

impl DelegatedPodsConfig {
    /// Default backoff and message cap for `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            backoff: BackoffConfig::default(),
            connect_timeout: super::DEFAULT_CONNECT_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Starts the worker subscribing per pod of `targets` on the Delegated
/// Identity API at `config.socket_path`, until `shutdown` is cancelled.
/// Returns the source's handle and a `watch` of its pods' subscriptions.
pub fn spawn_delegated_pods(
    config: DelegatedPodsConfig,
    targets: watch::Receiver<Option<PodTargets>>,
    cache: SvidCache,
    shutdown: CancellationToken,
) -> (
    SourceHandle,
    watch::Receiver<BTreeMap<String, PodSubscription>>,
) {
    let (status_tx, status_rx) = watch::channel(BTreeMap::new());
    let connector = PodsConnector {
        trust_domain: cache.trust_domain().clone(),
        path: config.socket_path,
        targets,
        status: status_tx,
        max_message_bytes: config.max_message_bytes,
        first_answers: config.connect_timeout,
    };
    let handle = supervisor::spawn(
        "delegated_identity_pods",
        connector,
        cache,
        config.backoff,
        config.connect_timeout,
        shutdown,
    );
    (handle, status_rx)
}

struct PodsConnector {
    trust_domain: TrustDomain,
    path: PathBuf,
    targets: watch::Receiver<Option<PodTargets>>,
    status: watch::Sender<BTreeMap<String, PodSubscription>>,
    max_message_bytes: usize,
    first_answers: Duration,
}

impl Connector for PodsConnector {
    const CALL: &'static str = CALL;

    fn path(&self) -> &Path {
        &self.path
    }

    async fn connect(&mut self) -> Result<Session, SourceError> {
        let path = self.path.clone();
        let channel = uds_channel(CALL_BUNDLES, &path).await?;
        let mut client =
            DelegatedIdentityClient::new(channel).max_decoding_message_size(self.max_message_bytes);
        let bundles = client
            .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
            .await
            .map_err(|s| classify_status(CALL_BUNDLES, &path, &s))?
            .into_inner();
        let (out, rx) = mpsc::channel(8);
        let (results_tx, results) = mpsc::channel(64);
        let session = PodSession {
            client,
            td: self.trust_domain.clone(),
            path,
            status: self.status.clone(),
            out,
            results_tx,
            subs: HashMap::new(),
            tasks: JoinSet::new(),
            latest: BTreeMap::new(),
            bundle: None,
            targets_known: false,
            waiting: BTreeSet::new(),
            wait_until: None,
            first_answers: self.first_answers,
            emitted: false,
            dirty: true,
            next_gen: 0,
        };
        tokio::spawn(session.run(bundles, results, self.targets.clone()));
        Ok(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
                .boxed(),
        )
    }
}

/// What a pod's stream task reports: (pod, subscription generation, message).
type PodResult = (
    String,
    u64,
    Result<SubscribeToX509sviDsResponse, SourceError>,
);

struct Sub {
    target: PodTarget,
    generation: u64,
    status: PodSubscription,
    failures: u32,
    retry_at: Option<Instant>,
    task: tokio::task::AbortHandle,
}

struct PodSession {
    client: DelegatedIdentityClient<Channel>,
    td: TrustDomain,
    path: PathBuf,
    status: watch::Sender<BTreeMap<String, PodSubscription>>,
    out: mpsc::Sender<Result<Update, SourceError>>,
    results_tx: mpsc::Sender<PodResult>,
    subs: HashMap<String, Sub>,
    tasks: JoinSet<()>,
    /// Each pod's latest SVID of its own identity (if SPIRE serves it).
    latest: BTreeMap<String, SvidInput>,
    bundle: Option<Option<TrustBundle>>,
    targets_known: bool,
    /// Pods subscribed before the session's first full state that have not
    /// answered yet, and until when they are waited for.
    waiting: BTreeSet<String>,
    wait_until: Option<Instant>,
    first_answers: Duration,
    /// Whether this session has sent a full state.
    emitted: bool,
    dirty: bool,
    next_gen: u64,
}

/// Whether a pod stream's failure is the whole agent's (end the session).
fn fails_the_session(e: &SourceError) -> bool {
    match e {
        SourceError::Rpc { code, .. } => [
            Code::Unavailable,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Unknown,
        ]
        .iter()
        .any(|c| code == &format!("{c:?}")),
        SourceError::NoIdentityIssued { .. }
        | SourceError::StreamEnded { .. }
        | SourceError::SocketMissing { .. }
        | SourceError::ConnectionRefused { .. }
        | SourceError::Connect { .. }
        | SourceError::Protocol { .. } => true,
        _ => false,
    }
}

impl PodSession {
    async fn run(
        mut self,
        mut bundles: Streaming<SubscribeToX509BundlesResponse>,
        mut results: mpsc::Receiver<PodResult>,
        mut targets: watch::Receiver<Option<PodTargets>>,
    ) {
        let t = targets.borrow_and_update().clone();
        self.sync_targets(t);
        loop {
            let first_deadline = self.wait_until.unwrap_or_else(Instant::now);
            let retry_at = self.subs.values().filter_map(|s| s.retry_at).min();
            let step = tokio::select! {
                () = self.out.closed() => return,
                r = targets.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let t = targets.borrow_and_update().clone();
                    self.sync_targets(t);
                    Ok(())
                }
                m = bundles.next() => self.on_bundle(m),
                Some((pod, generation, m)) = results.recv() => self.on_pod(pod, generation, m),
                () = tokio::time::sleep_until(first_deadline), if !self.waiting.is_empty() => {
                    tracing::warn!(
                        pods = ?self.waiting,
                        "SPIRE has not answered for these pods yet; applying the others"
                    );
                    self.waiting.clear();
                    Ok(())
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or(first_deadline)), if retry_at.is_some() => {
                    self.retry_due();
                    Ok(())
                }
            };
            let sent = match step {
                Ok(()) => self.emit().await,
                Err(e) => {
                    let fatal = !e.is_message_rejection();
                    let sent = self.out.send(Err(e)).await.is_ok();
                    if fatal {
                        return;
                    }
                    sent
                }
            };
            if !sent {
                return;
            }
        }
    }

    /// Subscribes new pods (and pods whose PID changed), drops pods gone.
    fn sync_targets(&mut self, targets: Option<PodTargets>) {
        let Some(targets) = targets else {
            return;
        };
        if !self.targets_known {
            self.targets_known = true;
            self.wait_until = Some(Instant::now() + self.first_answers);
        }
        let gone: Vec<String> = self
            .subs
            .keys()
            .filter(|k| !targets.contains_key(*k))
            .cloned()
            .collect();
        for pod in gone {
            if let Some(s) = self.subs.remove(&pod) {
                s.task.abort();
            }
            self.waiting.remove(&pod);
            if self.latest.remove(&pod).is_some() {
                self.dirty = true;
            }
        }
        for (pod, target) in targets {
            let old = self.subs.get(&pod).map(|s| s.target);
            if old == Some(target) {
                continue;
            }
            // Another identity now: the old one's SVID is not this pod's.
            if old.is_some_and(|o| o.identity != target.identity)
                && self.latest.remove(&pod).is_some()
            {
                self.dirty = true;
            }
            if !self.emitted {
                self.waiting.insert(pod.clone());
            }
            self.subscribe(pod, target, 0);
        }
        self.publish_status();
    }

    /// (Re)starts `pod`'s stream.
    fn subscribe(&mut self, pod: String, target: PodTarget, failures: u32) {
        if let Some(old) = self.subs.remove(&pod) {
            old.task.abort();
        }
        self.next_gen += 1;
        let generation = self.next_gen;
        let task = self.tasks.spawn(pod_stream(
            self.client.clone(),
            pod.clone(),
            generation,
            target.pid,
            self.path.clone(),
            self.results_tx.clone(),
        ));
        self.subs.insert(
            pod,
            Sub {
                target,
                generation,
                status: PodSubscription {
                    pid: target.pid,
                    identity: target.identity,
                    answered: false,
                    serves_identity: false,
                    ignored: Vec::new(),
                    error: None,
                },
                failures,
                retry_at: None,
                task,
            },
        );
    }

    fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, PodTarget, u32)> = self
            .subs
            .iter()
            .filter(|(_, s)| s.retry_at.is_some_and(|t| t <= now))
            .map(|(k, s)| (k.clone(), s.target, s.failures))
            .collect();
        for (pod, target, failures) in due {
            tracing::debug!(%pod, pid = target.pid, "subscribing again");
            self.subscribe(pod, target, failures);
        }
        self.publish_status();
    }

    fn on_bundle(
        &mut self,
        m: Option<Result<SubscribeToX509BundlesResponse, tonic::Status>>,
    ) -> Result<(), SourceError> {
        match m {
            Some(Ok(m)) => {
                let b = parse_bundle(m, &self.td, &self.path)?;
                self.bundle = Some(b);
                self.dirty = true;
                Ok(())
            }
            Some(Err(s)) => Err(classify_status(CALL_BUNDLES, &self.path, &s)),
            None => Err(SourceError::StreamEnded {
                call: CALL_BUNDLES,
                path: self.path.clone(),
            }),
        }
    }

    fn on_pod(
        &mut self,
        pod: String,
        generation: u64,
        m: Result<SubscribeToX509sviDsResponse, SourceError>,
    ) -> Result<(), SourceError> {
        let Some(sub) = self
            .subs
            .get_mut(&pod)
            .filter(|s| s.generation == generation)
        else {
            return Ok(()); // a stream since replaced or dropped
        };
        let m = match m {
            Ok(m) => m,
            Err(e) if fails_the_session(&e) => return Err(e),
            Err(e) => {
                // This pod alone: retry it later, keep its SVID meanwhile.
                sub.failures += 1;
                let delay = POD_RETRY_MIN
                    .saturating_mul(1 << sub.failures.min(6))
                    .min(POD_RETRY_MAX);
                tracing::warn!(%pod, pid = sub.target.pid, error = %e, ?delay, "pod's SVID subscription failed; retrying it");
                sub.status.error = Some(e.to_string());
                sub.retry_at = Some(Instant::now() + delay);
                self.waiting.remove(&pod);
                self.publish_status();
                return Ok(());
            }
        };
        let svids = parse_svids(m, &self.path)?;
        let want = sub.target.identity;
        let mut own = None;
        let mut ignored = Vec::new();
        for s in svids {
            match self.td.parse_spiffe_id(&s.spiffe_id) {
                Ok(n) if n == want => own = Some(s),
                _ => ignored.push(s.spiffe_id),
            }
        }
        if !ignored.is_empty() && ignored != sub.status.ignored {
            tracing::warn!(%pod, pid = sub.target.pid, identity = want, ?ignored,
                "SPIRE served this pod SVIDs of other identities; ignored");
        }
        sub.failures = 0;
        sub.status.answered = true;
        sub.status.serves_identity = own.is_some();
        sub.status.ignored = ignored;
        sub.status.error = None;
        self.waiting.remove(&pod);
        let changed = match (&own, self.latest.get(&pod)) {
            (Some(a), Some(b)) => a.cert_chain != b.cert_chain,
            (None, None) => false,
            _ => true,
        };
        if changed {
            match own {
                Some(s) => self.latest.insert(pod, s),
                None => self.latest.remove(&pod),
            };
            self.dirty = true;
        }
        self.publish_status();
        Ok(())
    }

    /// Sends the full state when something changed and it is complete.
    /// False when the session is gone.
    async fn emit(&mut self) -> bool {
        if !self.dirty || !self.targets_known || !self.waiting.is_empty() {
            return true;
        }
        let Some(bundle) = self.bundle.clone() else {
            return true;
        };
        self.dirty = false;
        self.emitted = true;
        let mut svids: Vec<SvidInput> = Vec::new();
        for s in self.latest.values() {
            if !svids.iter().any(|o| o.cert_chain == s.cert_chain) {
                svids.push(s.clone());
            }
        }
        self.out
            .send(Ok(Update {
                svids: Some(svids),
                bundle,
            }))
            .await
            .is_ok()
    }

    fn publish_status(&self) {
        let now: BTreeMap<String, PodSubscription> = self
            .subs
            .iter()
            .map(|(k, s)| (k.clone(), s.status.clone()))
            .collect();
        self.status.send_if_modified(|cur| {
            if *cur == now {
                false
            } else {
                *cur = now;
                true
            }
        });
    }
}

/// One pod's stream, forwarded to the session until it ends.
async fn pod_stream(
    mut client: DelegatedIdentityClient<Channel>,
    pod: String,
    generation: u64,
    pid: u32,
    path: PathBuf,
    tx: mpsc::Sender<PodResult>,
) {
    let Ok(pid_arg) = i32::try_from(pid) else {
        let e = SourceError::MalformedMessage {
            call: CALL_SVIDS,
            path,
            reason: format!("pod {pod}: PID {pid} out of range"),
        };
        let _ = tx.send((pod, generation, Err(e))).await;
        return;
    };
    let stream = client
        .subscribe_to_x509svi_ds(SubscribeToX509sviDsRequest {
            selectors: Vec::new(),
            pid: pid_arg,
        })
        .await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(s) => {
            let _ = tx
                .send((pod, generation, Err(classify_status(CALL_SVIDS, &path, &s))))
                .await;
            return;
        }
    };
    loop {
        let item = match stream.next().await {
            Some(Ok(m)) => Ok(m),
            Some(Err(s)) => Err(classify_status(CALL_SVIDS, &path, &s)),
            None => Err(SourceError::StreamEnded {
                call: CALL_SVIDS,
                path: path.clone(),
            }),
        };
        let last = item.is_err();
        if tx.send((pod.clone(), generation, item)).await.is_err() || last {
            return;
        }
    }
}
