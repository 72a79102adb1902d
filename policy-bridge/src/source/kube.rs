//! Kubernetes source: kube-rs watchers for Pods, Namespaces, Nodes, the four
//! policy kinds and MeshIdentity, feeding the engine; identities allocated
//! cluster-wide as MeshIdentity objects.
//!
//! - Each kind has its own watcher (list, then watch; on a watch error the
//!   watcher backs off and relists, and objects missing from the relist are
//!   deleted). Policies are watched as dynamic objects and parsed here, so
//!   one malformed policy is reported in its status instead of breaking the
//!   list for every other policy.
//! - A policy kind whose CRD is not installed (the list answers 404) is
//!   skipped with one log line.
//! - Allocation: a new label set takes the lowest free number N and creates
//!   MeshIdentity `N`. If the create conflicts (another node took N), the
//!   existing object is read: same labels → use N; other labels → record it
//!   and try the next number. Every node thus agrees; if two numbers ever
//!   carry one label set, all nodes use the lowest (see [`crate::identity`]).
//!   Allocation waits for the first MeshIdentity list, so a restarted agent
//!   reuses the numbers already in the cluster.
//! - Identities unused for the grace period are freed, not deleted: the
//!   object gets `spec.freedAt` (Unix seconds) and stays, so no node can
//!   create it for another label set, until the quarantine (longest SVID
//!   lifetime + margin, [`crate::identity`]) is over; then it is deleted,
//!   with the freed version as precondition (a 404 or 409 is fine: every
//!   node sees every pod, so every node reaches the same conclusion). The
//!   same label set coming back clears `freedAt` and keeps its number.
//!   Deleting a MeshIdentity by hand skips the quarantine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

mod lease;
mod status;

pub use lease::{Elector, LeaseConfig};
use status::{PolicyRef, Refs};
pub use status::{StatusConfig, StatusWriter};

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::Client;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use tokio::task::JoinHandle;

use super::{Publisher, Subscription};
use crate::engine::{Allocation, Change, Engine, EngineConfig, EngineError};
use crate::identity::{IdentityError, IdentityTable, from_unix_seconds, unix_seconds};
use crate::labels::LabelSet;
use crate::model::crd::{MeshIdentity, MeshIdentitySpec};
use crate::model::{Object, ObjectKey, ObjectKind, PolicyKind, key_of, parse_value};

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// An API call failed.
    #[error("{call}: {source}")]
    Api {
        /// What was called.
        call: String,
        /// kube's error.
        source: kube::Error,
    },
    /// Allocation found no free number.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The engine refused a change.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Too many conflicts in a row.
    #[error("allocating an identity for {0}: gave up after repeated conflicts")]
    Conflicts(LabelSet),
}

/// Settings of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// Engine settings (allocation is always deferred to MeshIdentity objects).
    pub engine: EngineConfig,
    /// How long an unused identity is kept before it is freed.
    pub identity_grace: Duration,
    /// How long a freed identity stays quarantined before its object is
    /// deleted: at least the longest SVID lifetime plus margin.
    pub identity_quarantine: Duration,
    /// How often pending allocations are retried and unused identities collected.
    pub housekeeping: Duration,
    /// Never write: identities are only read from the MeshIdentity objects
    /// the agents allocate (a pod whose label set has none yet has no
    /// identity), and none is freed or deleted. For readers beside the
    /// agents, such as the registration reconciler.
    pub read_only: bool,
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            identity_grace: Duration::from_secs(15 * 60),
            identity_quarantine: crate::identity::DEFAULT_QUARANTINE,
            housekeeping: Duration::from_secs(5),
            read_only: false,
        }
    }
}

/// Which watcher an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Feed {
    Pods,
    Namespaces,
    Nodes,
    Policy(PolicyKind),
    Identities,
}

/// A MeshIdentity, read.
#[derive(Debug, Clone)]
struct IdObject {
    id: u32,
    labels: LabelSet,
    freed_at: Option<SystemTime>,
    resource_version: Option<String>,
}

/// One item of a watcher, already converted.
#[derive(Debug)]
enum Item {
    Object(Result<Object, (ObjectKey, crate::model::ModelError)>),
    /// A policy, with what the status writer needs of its object.
    Policy(
        Result<Object, (ObjectKey, crate::model::ModelError)>,
        PolicyRef,
    ),
    Identity(Option<IdObject>, String),
}

impl Item {
    fn key(&self) -> Option<ObjectKey> {
        match self {
            Self::Object(Ok(o)) | Self::Policy(Ok(o), _) => Some(o.key()),
            Self::Object(Err((k, _))) | Self::Policy(Err((k, _)), _) => Some(k.clone()),
            Self::Identity(..) => None,
        }
    }
}

#[derive(Debug)]
enum Msg {
    Init,
    InitItem(Item),
    InitDone,
    Apply(Item),
    Delete(Item),
    Error(String),
}

type Feeds = Pin<Box<dyn Stream<Item = (Feed, Msg)> + Send>>;

fn feed<K, F>(api: Api<K>, which: Feed, convert: F) -> Feeds
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(K) -> Item + Send + Sync + 'static,
{
    let backoff = WatchBackoff::default();
    let failures = backoff.failures.clone();
    watcher::watcher(api, watcher::Config::default())
        .inspect(move |ev| {
            // "Too old resource version": the API server is up and wants a
            // relist (it restarted, or the watch fell behind): at once,
            // not after the backoff an outage built up.
            if let Err(watcher::Error::WatchError(e)) = ev
                && e.code == 410
            {
                failures.store(0, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .backoff(backoff)
        .map(move |ev| {
            let msg = match ev {
                Ok(Event::Init) => Msg::Init,
                Ok(Event::InitApply(o)) => Msg::InitItem(convert(o)),
                Ok(Event::InitDone) => Msg::InitDone,
                Ok(Event::Apply(o)) => Msg::Apply(convert(o)),
                Ok(Event::Delete(o)) => Msg::Delete(convert(o)),
                Err(e) => Msg::Error(e.to_string()),
            };
            (which, msg)
        })
        .boxed()
}

/// Delays between a watch's retries: 0.8 s doubling to 30 s, each
/// jittered between half and all of it, so thousands of agents do not all
/// return at once after an outage. Back to 0.8 s as soon as the watch
/// delivers anything or the API server answers "too old resource version"
/// (kube-runtime's default backoff resets only after 120 s without an
/// error, so that answer, which a restarted API server gives to every
/// watch, waited out the backoff the outage had built up).
#[derive(Debug, Default)]
struct WatchBackoff {
    /// Failures since the last success (shared: a 410 resets it).
    failures: Arc<std::sync::atomic::AtomicU32>,
}

/// The first delay of [`WatchBackoff`].
const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(800);

/// The largest delay of [`WatchBackoff`].
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        let failures = self.failures.fetch_add(1, Relaxed);
        let base = WATCH_BACKOFF_FIRST
            .saturating_mul(1u32 << failures.min(16))
            .min(WATCH_BACKOFF_MAX);
        Some(base.mul_f64(rand::random_range(0.5..=1.0)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

fn policy_item(kind: PolicyKind, o: DynamicObject) -> Item {
    let mut v = serde_json::to_value(&o).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), kind.api_version().into());
        m.insert("kind".into(), kind.as_str().into());
    }
    let key = key_of(&v).unwrap_or(ObjectKey {
        kind: ObjectKind::Policy(kind),
        namespace: o.metadata.namespace.clone(),
        name: o.metadata.name.clone().unwrap_or_default(),
    });
    let r = PolicyRef {
        uid: o.metadata.uid.clone().unwrap_or_default(),
        generation: o.metadata.generation,
        status: match kind {
            PolicyKind::MeshAuthPolicy | PolicyKind::ClusterMeshAuthPolicy => {
                v.get("status").cloned()
            }
            _ => None,
        },
    };
    Item::Policy(parse_value(v, "kubernetes").map_err(|e| (key, e)), r)
}

fn identity_item(o: MeshIdentity) -> Item {
    let name = o.metadata.name.clone().unwrap_or_default();
    let parsed = name.parse::<u32>().ok().and_then(|id| {
        LabelSet::from_canonical(o.spec.labels.iter().map(String::as_str))
            .ok()
            .map(|labels| IdObject {
                id,
                labels,
                freed_at: o.spec.freed_at.map(from_unix_seconds),
                resource_version: o.metadata.resource_version.clone(),
            })
    });
    Item::Identity(parsed, name)
}

fn api_err(call: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
    let call = call.into();
    move |source| KubeError::Api { call, source }
}

/// True if the kind's CRD answers; false (after one log line) on 404.
async fn installed(client: &Client, kind: PolicyKind) -> bool {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            tracing::info!(kind = %kind, "CRD not installed; policies of this kind are skipped");
            false
        }
        Err(e) => {
            // Not a clear "absent": watch it and let the watcher retry.
            tracing::warn!(kind = %kind, error = %e, "checking for the CRD failed; watching anyway");
            true
        }
    }
}

/// Starts the Kubernetes source. The returned subscription reports
/// `synced` once every watched kind has been listed once.
pub async fn spawn(client: Client, cfg: KubeConfig) -> (Subscription, JoinHandle<()>) {
    let (sub, task, _) = start(client, cfg).await;
    (sub, task)
}

/// [`spawn`], and the policy status writer beside it: it competes for the
/// Lease and, while it holds it, writes every policy's status
/// ([`status`]).
pub async fn spawn_with_status(
    client: Client,
    cfg: KubeConfig,
    status: StatusConfig,
) -> (Subscription, JoinHandle<()>, StatusWriter) {
    let (sub, task, refs) = start(client.clone(), cfg).await;
    let writer = status::spawn(client, status, sub.clone(), refs);
    (sub, task, writer)
}

async fn start(
    client: Client,
    cfg: KubeConfig,
) -> (
    Subscription,
    JoinHandle<()>,
    tokio::sync::watch::Receiver<Arc<Refs>>,
) {
    let mut feeds: Vec<Feeds> = vec![
        feed(Api::<Pod>::all(client.clone()), Feed::Pods, |p| {
            Item::Object(Ok(Object::Pod(Box::new(p))))
        }),
        feed(
            Api::<Namespace>::all(client.clone()),
            Feed::Namespaces,
            |n| Item::Object(Ok(Object::Namespace(Box::new(n)))),
        ),
        feed(Api::<Node>::all(client.clone()), Feed::Nodes, |n| {
            Item::Object(Ok(Object::Node(Box::new(n))))
        }),
        feed(
            Api::<MeshIdentity>::all(client.clone()),
            Feed::Identities,
            identity_item,
        ),
    ];
    // Kinds skipped as not installed are not waited for.
    let mut expected: BTreeSet<Feed> =
        BTreeSet::from([Feed::Pods, Feed::Namespaces, Feed::Nodes, Feed::Identities]);
    for kind in PolicyKind::ALL {
        if installed(&client, kind).await {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource());
            feeds.push(feed(api, Feed::Policy(kind), move |o| policy_item(kind, o)));
            expected.insert(Feed::Policy(kind));
        }
    }
    let (publisher, sub) = Publisher::new();
    let mut engine_cfg = cfg.engine.clone();
    engine_cfg.allocation = Allocation::Deferred;
    let mut driver = Driver {
        engine: Engine::new(engine_cfg, IdentityTable::new()),
        ids: Api::all(client),
        known: HashMap::new(),
        init: HashMap::new(),
        synced: BTreeSet::new(),
        expected,
        identity_objects: BTreeMap::new(),
        freed: BTreeMap::new(),
        errors: Vec::new(),
        policy_refs: Refs::new(),
        refs_dirty: false,
        cfg,
    };
    let (refs_tx, refs_rx) = tokio::sync::watch::channel(Arc::new(Refs::new()));
    let task = tokio::spawn(async move {
        let mut all = futures::stream::select_all(feeds);
        let mut tick = tokio::time::interval(driver.cfg.housekeeping);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                next = all.next() => match next {
                    Some((which, msg)) => driver.handle(which, msg),
                    None => return,
                },
                _ = tick.tick() => driver.collect().await,
            }
            driver.allocate_pending().await;
            let synced = driver.expected.iter().all(|f| driver.synced.contains(f));
            let diff = driver.engine.commit();
            if std::mem::take(&mut driver.refs_dirty) {
                refs_tx.send_replace(Arc::new(driver.policy_refs.clone()));
            }
            publisher.publish(&driver.engine, diff, driver.errors.clone(), synced);
            if publisher.is_closed() {
                return;
            }
        }
    });
    (sub, task, refs_rx)
}

struct Driver {
    cfg: KubeConfig,
    engine: Engine,
    ids: Api<MeshIdentity>,
    known: HashMap<Feed, BTreeSet<ObjectKey>>,
    init: HashMap<Feed, Vec<Item>>,
    synced: BTreeSet<Feed>,
    expected: BTreeSet<Feed>,
    identity_objects: BTreeMap<u32, LabelSet>,
    /// Freed (quarantined) objects with the resource version seen.
    freed: BTreeMap<u32, Option<String>>,
    errors: Vec<String>,
    /// Every policy object's uid, generation and stored status.
    policy_refs: Refs,
    refs_dirty: bool,
}

impl Driver {
    fn handle(&mut self, which: Feed, msg: Msg) {
        match msg {
            Msg::Init => {
                self.init.insert(which, Vec::new());
            }
            Msg::InitItem(item) => self.init.entry(which).or_default().push(item),
            Msg::InitDone => {
                let items = self.init.remove(&which).unwrap_or_default();
                if which == Feed::Identities {
                    let now: BTreeSet<u32> = items
                        .iter()
                        .filter_map(|i| match i {
                            Item::Identity(Some(o), _) => Some(o.id),
                            _ => None,
                        })
                        .collect();
                    let gone: Vec<u32> = self
                        .identity_objects
                        .keys()
                        .filter(|id| !now.contains(id))
                        .copied()
                        .collect();
                    for id in gone {
                        self.identity_removed(id);
                    }
                } else {
                    let now: BTreeSet<ObjectKey> = items.iter().filter_map(Item::key).collect();
                    let gone: Vec<ObjectKey> = self
                        .known
                        .get(&which)
                        .into_iter()
                        .flatten()
                        .filter(|k| !now.contains(k))
                        .cloned()
                        .collect();
                    for k in gone {
                        self.delete(which, k);
                    }
                }
                // Namespaces before pods matters little here: a namespace
                // update re-derives its pods' identities.
                for item in items {
                    self.apply(which, item);
                }
                self.synced.insert(which);
            }
            Msg::Apply(item) => self.apply(which, item),
            Msg::Delete(item) => match item {
                Item::Identity(Some(o), _) => self.identity_removed(o.id),
                Item::Identity(None, _) => {}
                other => {
                    if let Some(k) = other.key() {
                        self.delete(which, k);
                    }
                }
            },
            Msg::Error(e) => {
                tracing::warn!(feed = ?which, error = %e, "watch failed; retrying with backoff and relisting");
            }
        }
    }

    fn apply(&mut self, which: Feed, item: Item) {
        let item = match item {
            Item::Policy(o, r) => {
                let key = match &o {
                    Ok(o) => o.key(),
                    Err((k, _)) => k.clone(),
                };
                if self.policy_refs.get(&key) != Some(&r) {
                    self.policy_refs.insert(key, r);
                    self.refs_dirty = true;
                }
                Item::Object(o)
            }
            other => other,
        };
        let result = match item {
            Item::Identity(Some(o), _) => {
                self.identity_objects.insert(o.id, o.labels.clone());
                match o.freed_at {
                    None => {
                        self.freed.remove(&o.id);
                        self.engine.identity_allocated(o.id, o.labels)
                    }
                    Some(at) => {
                        self.freed.insert(o.id, o.resource_version.clone());
                        match self.engine.identity_quarantined(o.id, o.labels, at) {
                            Ok(true) => Ok(()),
                            Ok(false) if self.cfg.read_only => Ok(()),
                            Ok(false) => {
                                // Pods here still use it: take it back.
                                let (ids, id) = (self.ids.clone(), o.id);
                                tokio::spawn(async move {
                                    if let Err(e) = unfree(&ids, id, o.resource_version).await {
                                        tracing::warn!(identity = id, error = %e, "taking back a freed identity still in use");
                                    }
                                });
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
            }
            Item::Identity(None, name) => {
                tracing::warn!(
                    name,
                    "ignoring MeshIdentity whose name is not a number or whose labels are not canonical"
                );
                Ok(())
            }
            Item::Object(Ok(o)) => {
                self.known.entry(which).or_default().insert(o.key());
                self.engine.apply(Change::Upsert(o))
            }
            Item::Object(Err((k, e))) => {
                tracing::warn!(object = %k, error = %e, "invalid object");
                self.engine.apply(Change::Invalid(k, e))
            }
            Item::Policy(..) => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "applying a change failed");
        }
    }

    fn delete(&mut self, which: Feed, key: ObjectKey) {
        if let Some(set) = self.known.get_mut(&which) {
            set.remove(&key);
        }
        if self.policy_refs.remove(&key).is_some() {
            self.refs_dirty = true;
        }
        if let Err(e) = self.engine.apply(Change::Delete(key)) {
            tracing::warn!(error = %e, "applying a deletion failed");
        }
    }

    fn identity_removed(&mut self, id: u32) {
        self.freed.remove(&id);
        let labels = self.identity_objects.remove(&id);
        match self.engine.identity_deleted(id) {
            Ok(true) => {}
            Ok(false) => {
                // Still in use here: put it back (create; a conflict means
                // someone already did).
                if let Some(l) = labels {
                    self.identity_objects.insert(id, l.clone());
                    let ids = self.ids.clone();
                    tokio::spawn(async move {
                        let _ = ids
                            .create(&PostParams::default(), &identity_object(id, &l))
                            .await;
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "identity deletion"),
        }
    }

    async fn allocate_pending(&mut self) {
        // Not before every kind has been listed once: a pod seen before its
        // namespace would get an identity for a label set without the
        // namespace's labels, allocated cluster-wide for nothing (found
        // against a real API server: three such objects per start).
        if self.cfg.read_only || !self.expected.iter().all(|f| self.synced.contains(f)) {
            return;
        }
        for labels in self.engine.pending_identities() {
            if let Err(e) = allocate(
                &self.ids,
                &mut self.engine,
                &mut self.identity_objects,
                &mut self.freed,
                &labels,
            )
            .await
            {
                tracing::warn!(error = %e, "identity allocation failed; will retry");
                push_error(&mut self.errors, e.to_string());
                return;
            }
        }
    }

    async fn collect(&mut self) {
        if self.cfg.read_only {
            return;
        }
        let wall = SystemTime::now();
        let gone = self
            .engine
            .collect_identities(Instant::now(), self.cfg.identity_grace, wall);
        for (id, _) in gone {
            let patch = serde_json::json!({ "spec": { "freedAt": unix_seconds(wall) } });
            match self
                .ids
                .patch(
                    &id.to_string(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(o) => {
                    self.freed.insert(id, o.metadata.resource_version);
                    tracing::info!(identity = id, quarantine = ?self.cfg.identity_quarantine, "freed unused identity into quarantine");
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(identity = id, error = %e, "marking unused identity freed")
                }
            }
        }
        for id in self
            .engine
            .release_quarantined(wall, self.cfg.identity_quarantine)
        {
            let rv = self.freed.remove(&id).flatten();
            self.identity_objects.remove(&id);
            let dp = DeleteParams {
                preconditions: rv.map(|rv| Preconditions {
                    resource_version: Some(rv),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match self.ids.delete(&id.to_string(), &dp).await {
                Ok(_) => tracing::info!(identity = id, "quarantine over; identity deleted"),
                // Gone already, or taken back / changed since it was freed.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => tracing::warn!(identity = id, error = %e, "deleting a freed identity"),
            }
        }
    }
}

/// Clears `freedAt` (the identity is used again), only on the version seen.
async fn unfree(
    api: &Api<MeshIdentity>,
    id: u32,
    resource_version: Option<String>,
) -> Result<MeshIdentity, kube::Error> {
    let mut patch = serde_json::json!({ "spec": { "freedAt": null } });
    if let Some(rv) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
    }
    api.patch(
        &id.to_string(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
}

fn push_error(errors: &mut Vec<String>, e: String) {
    errors.insert(0, e);
    errors.truncate(16);
}

fn identity_object(id: u32, labels: &LabelSet) -> MeshIdentity {
    MeshIdentity {
        metadata: ObjectMeta {
            name: Some(id.to_string()),
            ..ObjectMeta::default()
        },
        spec: MeshIdentitySpec {
            labels: labels.canonical().into_iter().collect(),
            freed_at: None,
        },
    }
}

/// Creates MeshIdentity objects until one for `labels` exists (conflict-retry).
/// A number quarantined with exactly `labels` is taken back first (its
/// `freedAt` cleared). `freed` holds the resource version of each freed
/// object seen.
async fn allocate(
    api: &Api<MeshIdentity>,
    engine: &mut Engine,
    known: &mut BTreeMap<u32, LabelSet>,
    freed: &mut BTreeMap<u32, Option<String>>,
    labels: &LabelSet,
) -> Result<u32, KubeError> {
    if let Some(id) = engine.table().quarantined_for(labels) {
        match unfree(api, id, freed.get(&id).cloned().flatten()).await {
            Ok(_) => {
                freed.remove(&id);
                known.insert(id, labels.clone());
                engine.identity_allocated(id, labels.clone())?;
                return Ok(id);
            }
            // Deleted or changed meanwhile: the watch will tell; allocate afresh.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(api_err(format!("take back MeshIdentity {id}"))(e)),
        }
    }
    for _ in 0..64 {
        let mut id = engine.table().lowest_free()?;
        while known.contains_key(&id) {
            id += 1;
        }
        match api
            .create(&PostParams::default(), &identity_object(id, labels))
            .await
        {
            Ok(_) => {
                known.insert(id, labels.clone());
                engine.identity_allocated(id, labels.clone())?;
                return Ok(id);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let existing = api
                    .get(&id.to_string())
                    .await
                    .map_err(api_err(format!("get MeshIdentity {id}")))?;
                match LabelSet::from_canonical(existing.spec.labels.iter().map(String::as_str)) {
                    Ok(theirs) if existing.spec.freed_at.is_some() => {
                        // Freed and still quarantined: never ours unless the
                        // labels are ours (then take it back).
                        known.insert(id, theirs.clone());
                        let at = existing.spec.freed_at.map(from_unix_seconds);
                        engine.identity_quarantined(
                            id,
                            theirs.clone(),
                            at.unwrap_or_else(SystemTime::now),
                        )?;
                        if &theirs == labels
                            && unfree(api, id, existing.metadata.resource_version.clone())
                                .await
                                .is_ok()
                        {
                            freed.remove(&id);
                            engine.identity_allocated(id, theirs)?;
                            return Ok(id);
                        }
                        freed.insert(id, existing.metadata.resource_version.clone());
                    }
                    Ok(theirs) => {
                        known.insert(id, theirs.clone());
                        engine.identity_allocated(id, theirs.clone())?;
                        if &theirs == labels {
                            return Ok(id);
                        }
                    }
                    Err(_) => {
                        known.insert(id, LabelSet::default());
                    }
                }
            }
            Err(e) => return Err(api_err(format!("create MeshIdentity {id}"))(e)),
        }
    }
    Err(KubeError::Conflicts(labels.clone()))
}

#[cfg(test)]
mod watch_backoff_tests {
    use kube::runtime::utils::Backoff as _;

    use super::*;

    #[test]
    fn doubles_to_thirty_seconds_jittered_and_starts_over_after_a_success() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| b.next().unwrap_or_default()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = WATCH_BACKOFF_FIRST
                .saturating_mul(1 << i)
                .min(WATCH_BACKOFF_MAX);
            assert!(
                *d >= base / 2 && *d <= base,
                "delay {i}: {d:?} for {base:?}"
            );
        }
        b.reset();
        let d = b.next().unwrap_or_default();
        assert!(d <= WATCH_BACKOFF_FIRST, "after a success: {d:?}");
    }
}
