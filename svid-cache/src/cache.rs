//! The SVID cache: the current SVID of every identity plus the trust bundle,
//! updated from full-state messages, diffed into events.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bundle::TrustBundle;
use crate::clock::{Clock, SystemClock};
use crate::identity::{IdentityError, TrustDomain};
use crate::svid::{Svid, SvidError, SvidInput};

/// Below this many SVIDs to build, an update is built on the calling thread.
const PARALLEL_BUILD_MIN: usize = 64;

/// Errors from applying an update. The cache is unchanged when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// One SVID of the update is malformed or untrusted; the whole update was rejected.
    #[error("SvidCache::apply: update rejected, cache unchanged: SVID #{index}: {source}")]
    Svid {
        /// Position of the SVID in the update.
        index: usize,
        /// What was wrong with it.
        #[source]
        source: SvidError,
    },
    /// The update's trust bundle is for another trust domain.
    #[error(
        "SvidCache::apply: update rejected, cache unchanged: trust bundle is for {got}, the cache serves {expected}"
    )]
    BundleTrustDomain {
        /// The bundle's trust domain.
        got: String,
        /// The configured trust domain.
        expected: String,
    },
    /// The update holds SVIDs of the trust domain but no bundle is known to check them against.
    #[error(
        "SvidCache::apply: update rejected, cache unchanged: {count} SVIDs of {trust_domain} but no trust bundle of {trust_domain} to verify them against"
    )]
    NoTrustBundle {
        /// How many SVIDs needed checking.
        count: usize,
        /// The configured trust domain.
        trust_domain: String,
    },
}

/// A full-state update from a source. `None` leaves that part as it is.
#[derive(Debug, Clone, Default)]
pub struct Update {
    /// Every SVID the source serves now; identities missing here are removed.
    pub svids: Option<Vec<SvidInput>>,
    /// The trust bundle of the configured trust domain.
    pub bundle: Option<TrustBundle>,
}

/// Why an identity's SVID was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemovalReason {
    /// The source no longer serves it.
    NoLongerServed,
    /// Its NotAfter passed.
    Expired,
}

/// One change to the cache.
#[derive(Debug, Clone)]
pub enum CacheEvent {
    /// An identity got its first SVID.
    Added {
        /// The identity.
        identity: u32,
        /// Its SVID.
        svid: Arc<Svid>,
    },
    /// An identity's SVID was replaced by a different certificate.
    Rotated {
        /// The identity.
        identity: u32,
        /// The new SVID.
        svid: Arc<Svid>,
    },
    /// An identity's SVID was removed.
    Removed {
        /// The identity.
        identity: u32,
        /// Why.
        reason: RemovalReason,
    },
    /// The trust bundle changed.
    BundleChanged {
        /// The new bundle.
        bundle: Arc<TrustBundle>,
    },
}

impl CacheEvent {
    /// The identity concerned, if any.
    pub fn identity(&self) -> Option<u32> {
        match self {
            Self::Added { identity, .. }
            | Self::Rotated { identity, .. }
            | Self::Removed { identity, .. } => Some(*identity),
            Self::BundleChanged { .. } => None,
        }
    }
}

/// The events of one applied update (or expiry sweep), in one message.
#[derive(Debug, Clone)]
pub struct CacheChanges {
    /// The cache generation after this change (starts at 1, +1 per change).
    pub generation: u64,
    /// What changed.
    pub events: Vec<CacheEvent>,
}

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The trust domain whose `/identity/<N>` SVIDs are kept.
    pub trust_domain: TrustDomain,
    /// How many change messages a slow subscriber may fall behind before it lags.
    pub event_capacity: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            trust_domain: TrustDomain::default(),
            event_capacity: 256,
        }
    }
}

/// The SVIDs of every identity the sources serve, keyed by numeric identity, and
/// the trust bundle. Cheap to clone (all clones share state).
///
/// Lookups never return an SVID past its NotAfter. Writers are the source
/// worker ([`SvidCache::apply`]) and the expiry timer ([`SvidCache::spawn_expiry`]).
///
/// Feed one cache from one source: every update is a full state, so a second
/// source on the same cache would remove the first one's identities as "no
/// longer served". Use one cache per source.
#[derive(Clone, Debug)]
pub struct SvidCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    trust_domain: TrustDomain,
    clock: Arc<dyn Clock>,
    state: RwLock<State>,
    /// Serialises writers, so an update is built against a state that cannot move.
    write: Mutex<()>,
    events: broadcast::Sender<Arc<CacheChanges>>,
    generation: watch::Sender<u64>,
    expiry_changed: Notify,
    /// Peer chains already verified against the current bundle.
    paths: crate::verify::PathCache,
}

#[derive(Debug, Default)]
struct State {
    svids: HashMap<u32, Arc<Svid>>,
    bundle: Option<Arc<TrustBundle>>,
    next_expiry: Option<SystemTime>,
}

impl SvidCache {
    /// An empty cache using the system clock.
    pub fn new(config: CacheConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// An empty cache using `clock`.
    pub fn with_clock(config: CacheConfig, clock: Arc<dyn Clock>) -> Self {
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        Self {
            inner: Arc::new(Inner {
                trust_domain: config.trust_domain,
                clock,
                state: RwLock::default(),
                write: Mutex::new(()),
                events,
                generation: watch::Sender::new(0),
                expiry_changed: Notify::new(),
                paths: crate::verify::PathCache::default(),
            }),
        }
    }

    /// The trust domain served.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// The clock used for expiry.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Change messages from now on. A receiver that lags (`RecvError::Lagged`)
    /// should resynchronise from [`SvidCache::identities`] / [`SvidCache::get`].
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CacheChanges>> {
        self.inner.events.subscribe()
    }

    /// The generation counter: 0 until the first change, then +1 per change.
    pub fn watch_generation(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// The SVID of `identity`, if held and not expired.
    pub fn get(&self, identity: u32) -> Option<Arc<Svid>> {
        let now = self.inner.clock.now();
        self.read()
            .svids
            .get(&identity)
            .filter(|s| s.is_valid_at(now))
            .cloned()
    }

    /// The rustls chain and key of `identity`, if held and not expired.
    pub fn certified_key(&self, identity: u32) -> Option<Arc<CertifiedKey>> {
        self.get(identity).map(|s| s.certified_key().clone())
    }

    /// The trust bundle, once one has arrived.
    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.read().bundle.clone()
    }

    /// The verified-chain cache the TLS verifiers share.
    pub(crate) fn path_cache(&self) -> &crate::verify::PathCache {
        &self.inner.paths
    }

    /// Identities holding an unexpired SVID, sorted.
    pub fn identities(&self) -> Vec<u32> {
        let now = self.inner.clock.now();
        let mut ids: Vec<u32> = self
            .read()
            .svids
            .values()
            .filter(|s| s.is_valid_at(now))
            .map(|s| s.identity())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// How many SVIDs are stored (including any expired one the timer has not swept yet).
    pub fn len(&self) -> usize {
        self.read().svids.len()
    }

    /// Whether no SVID is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The earliest NotAfter of the stored SVIDs.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.read().next_expiry
    }

    /// Applies a full-state update: diffs it against the cache and publishes the
    /// events. On error nothing changes.
    ///
    /// SVIDs of other trust domains or other paths are ignored (warned once per
    /// SPIFFE ID per update). An SVID whose chain is byte-identical to the stored
    /// one is kept without re-parsing (a key cannot change without its
    /// certificate: it must match the leaf's public key). New and changed SVIDs
    /// are validated and their signing keys built, in parallel for large updates.
    /// SVIDs already expired are not stored. This is CPU work: call it from
    /// `spawn_blocking` in async code.
    pub fn apply(&self, update: Update) -> Result<Arc<CacheChanges>, CacheError> {
        let _writer = self.writer();
        let now = self.inner.clock.now();
        let td = &self.inner.trust_domain;
        if let Some(b) = &update.bundle
            && b.trust_domain() != td
        {
            return Err(CacheError::BundleTrustDomain {
                got: b.trust_domain().to_string(),
                expected: td.to_string(),
            });
        }

        // Build phase, under the read lock: lookups keep going.
        let state = self.read();
        let mut events = Vec::new();
        let new_bundle = match update.bundle {
            Some(b)
                if state
                    .bundle
                    .as_ref()
                    .is_some_and(|old| old.same_authorities(&b)) =>
            {
                None
            }
            Some(b) => Some(Arc::new(b)),
            None => None,
        };
        let next_svids = match &update.svids {
            Some(inputs) => {
                let bundle = new_bundle.as_deref().or(state.bundle.as_deref());
                Some(self.build_next(&state.svids, inputs, bundle, now)?)
            }
            None => None,
        };
        drop(state);

        // Swap phase, under the write lock: no parsing, no signing, only moves.
        let mut state = self.write_state();
        if let Some(bundle) = new_bundle {
            info!(
                trust_domain = %td,
                authorities = bundle.authorities().len(),
                "trust bundle changed"
            );
            state.bundle = Some(bundle.clone());
            events.push(CacheEvent::BundleChanged { bundle });
        }
        if let Some(next) = next_svids {
            diff(&state.svids, &next, now, &mut events);
            state.svids = next;
        }
        state.next_expiry = state.svids.values().map(|s| s.not_after()).min();
        drop(state);
        self.inner.expiry_changed.notify_one();
        Ok(self.publish(events))
    }

    /// Removes every SVID whose NotAfter has passed, publishing `Removed { Expired }`.
    /// The expiry timer calls this; it is public for callers that run their own.
    pub fn sweep_expired(&self) -> Arc<CacheChanges> {
        let _writer = self.writer();
        let now = self.inner.clock.now();
        let mut events = Vec::new();
        let mut state = self.write_state();
        if state.next_expiry.is_some_and(|t| t <= now) {
            state.svids.retain(|&identity, svid| {
                let keep = svid.is_valid_at(now);
                if !keep {
                    warn!(identity, not_after = ?svid.not_after(), "SVID expired; removed");
                    events.push(CacheEvent::Removed {
                        identity,
                        reason: RemovalReason::Expired,
                    });
                }
                keep
            });
            state.next_expiry = state.svids.values().map(|s| s.not_after()).min();
        }
        drop(state);
        events.sort_by_key(|e| e.identity());
        self.publish(events)
    }

    /// Runs the expiry timer until `shutdown`: sleeps until the earliest NotAfter,
    /// sweeps, repeats; wakes early when an update changes the earliest NotAfter.
    pub async fn run_expiry(self, shutdown: CancellationToken) {
        loop {
            self.sweep_expired();
            let changed = self.inner.expiry_changed.notified();
            let next = self.next_expiry();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(self.inner.clock.deadline(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = changed => {}
                () = sleep => {}
            }
        }
    }

    /// Spawns [`SvidCache::run_expiry`] on the current tokio runtime.
    pub fn spawn_expiry(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().run_expiry(shutdown))
    }

    fn build_next(
        &self,
        current: &HashMap<u32, Arc<Svid>>,
        inputs: &[SvidInput],
        bundle: Option<&TrustBundle>,
        now: SystemTime,
    ) -> Result<HashMap<u32, Arc<Svid>>, CacheError> {
        let td = &self.inner.trust_domain;
        let mut next: HashMap<u32, Arc<Svid>> = HashMap::with_capacity(inputs.len());
        let mut to_build: Vec<usize> = Vec::new();
        for (index, input) in inputs.iter().enumerate() {
            let identity = match td.parse_spiffe_id(&input.spiffe_id) {
                Ok(n) => n,
                Err(e) => {
                    log_ignored(&e);
                    continue;
                }
            };
            match current.get(&identity) {
                Some(old) if old.same_chain(&input.cert_chain) => {
                    insert_latest(&mut next, old.clone());
                }
                _ => to_build.push(index),
            }
        }
        if !to_build.is_empty() && bundle.is_none() {
            return Err(CacheError::NoTrustBundle {
                count: to_build.len(),
                trust_domain: td.to_string(),
            });
        }
        for svid in build_all(inputs, &to_build, td, bundle, now)? {
            insert_latest(&mut next, Arc::new(svid));
        }
        next.retain(|&identity, svid| {
            let keep = svid.is_valid_at(now);
            if !keep {
                warn!(identity, not_after = ?svid.not_after(), "source served an expired SVID; not stored");
            }
            keep
        });
        Ok(next)
    }

    fn publish(&self, events: Vec<CacheEvent>) -> Arc<CacheChanges> {
        let mut generation = *self.inner.generation.borrow();
        if !events.is_empty() {
            generation += 1;
            self.inner.generation.send_replace(generation);
        }
        let changes = Arc::new(CacheChanges { generation, events });
        if !changes.events.is_empty() {
            debug!(
                generation,
                events = changes.events.len(),
                "svid cache changed"
            );
            // No receivers is fine.
            let _ = self.inner.events.send(changes.clone());
        }
        changes
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-written: every
        // mutation is a single assignment or retain; recover the guard.
        self.inner
            .state
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.inner
            .write
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

fn log_ignored(e: &IdentityError) {
    match e {
        IdentityError::ForeignTrustDomain { spiffe_id, .. } => {
            warn!(%spiffe_id, "ignoring SVID of another trust domain");
        }
        IdentityError::NotIdentityPath { spiffe_id, .. } => {
            warn!(%spiffe_id, "ignoring SVID whose path is not /identity/<N>");
        }
        other => warn!(error = %other, "ignoring SVID with an invalid SPIFFE ID"),
    }
}

/// Two SVIDs for one identity (two registration entries): keep the one that lives longer.
fn insert_latest(next: &mut HashMap<u32, Arc<Svid>>, svid: Arc<Svid>) {
    match next.entry(svid.identity()) {
        Entry::Vacant(v) => {
            v.insert(svid);
        }
        Entry::Occupied(mut o) => {
            debug!(
                identity = svid.identity(),
                "source served two SVIDs for one identity; keeping the later NotAfter"
            );
            if svid.not_after() > o.get().not_after() {
                o.insert(svid);
            }
        }
    }
}

fn build_all(
    inputs: &[SvidInput],
    indices: &[usize],
    td: &TrustDomain,
    bundle: Option<&TrustBundle>,
    now: SystemTime,
) -> Result<Vec<Svid>, CacheError> {
    let build = |chunk: &[usize]| -> Result<Vec<Svid>, CacheError> {
        chunk
            .iter()
            .map(|&index| {
                Svid::build(&inputs[index], td, bundle, now)
                    .map_err(|source| CacheError::Svid { index, source })
            })
            .collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if indices.len() < PARALLEL_BUILD_MIN || threads < 2 {
        return build(indices);
    }
    let chunk = indices.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|c| scope.spawn(move || build(c)))
            .collect();
        let mut out = Vec::with_capacity(indices.len());
        let mut first_err: Option<CacheError> = None;
        for h in handles {
            match h.join() {
                Ok(Ok(v)) => out.extend(v),
                Ok(Err(e)) => {
                    // Report the error of the lowest index.
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}

/// Events turning `old` into `new`, sorted by identity.
fn diff(
    old: &HashMap<u32, Arc<Svid>>,
    new: &HashMap<u32, Arc<Svid>>,
    now: SystemTime,
    out: &mut Vec<CacheEvent>,
) {
    let start = out.len();
    for (&identity, svid) in new {
        match old.get(&identity) {
            None => {
                debug!(identity, not_after = ?svid.not_after(), "SVID added");
                out.push(CacheEvent::Added {
                    identity,
                    svid: svid.clone(),
                });
            }
            Some(prev) if !Arc::ptr_eq(prev, svid) => {
                debug!(identity, not_after = ?svid.not_after(), "SVID rotated");
                out.push(CacheEvent::Rotated {
                    identity,
                    svid: svid.clone(),
                });
            }
            Some(_) => {}
        }
    }
    for (&identity, prev) in old {
        if !new.contains_key(&identity) {
            let reason = if prev.is_valid_at(now) {
                RemovalReason::NoLongerServed
            } else {
                RemovalReason::Expired
            };
            debug!(identity, ?reason, "SVID removed");
            out.push(CacheEvent::Removed { identity, reason });
        }
    }
    out[start..].sort_by_key(|e| e.identity());
    let (mut added, mut rotated, mut removed) = (0, 0, 0);
    for e in &out[start..] {
        match e {
            CacheEvent::Added { .. } => added += 1,
            CacheEvent::Rotated { .. } => rotated += 1,
            CacheEvent::Removed { .. } => removed += 1,
            CacheEvent::BundleChanged { .. } => {}
        }
    }
    if added + rotated + removed > 0 {
        info!(added, rotated, removed, total = new.len(), "SVIDs updated");
    }
}
