//! The auth manager: keeps the auth map holding exactly the pairs policy
//! requires, authenticated and not expired.
//!
//! Inputs: the desired state (rules, endpoints, nodes), auth-required
//! signals from the datapath, SVID rotations from svid-cache, and sweep ticks
//! (a cron schedule). One task owns all state; handshakes run as child tasks
//! and report back.
//!
//! - Pre-authentication: every pair the desired state requires from this
//!   node is authenticated as soon as it appears, before a packet needs it.
//! - Signals are de-duplicated: one handshake in flight per pair, none for a
//!   pair that already has a live entry.
//! - Failure backs off per pair, exponentially with jitter.
//! - Re-authentication at a fraction (2/3) of the pair's lifetime, and at
//!   once when the local identity's SVID rotates; the entry is replaced in
//!   place, so no flow meets a gap.
//! - GC: an entry no longer required (identity, endpoint, node or rule gone)
//!   is removed when the desired state changes; expired entries on each sweep.
//! - Restart: the pinned map is read back and re-authentication resumes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use policy_bridge::DesiredState;
use rand::Rng as _;
use svid_cache::Clock;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

// Re-exported: [`AuthManager::new`] takes them, and callers name them here.
pub use super::metrics::ManagerMetrics;
use super::store::{AuthStore, Pair, StoreError};
use super::{AuthFailure, Authenticated, Authenticator};
use crate::handshake::throttle::{DEFAULT_MAX_PEERS, LogThrottle};
use crate::nodes::{NodeTable, NodeTableError};

/// Retries after a peer's refusal that come before the usual backoff.
const PEER_REFUSED_FAST_RETRIES: u32 = 6;

/// The first of them; each next one doubles.
const PEER_REFUSED_FIRST_RETRY: Duration = Duration::from_millis(10);

/// How the manager behaves.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Re-authenticate when this fraction of a pair's lifetime has passed.
    pub reauth_fraction: f64,
    /// First retry delay after a failed handshake.
    pub backoff_initial: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Handshakes in flight at once.
    pub max_in_flight: usize,
    /// Cron expression (6 fields, seconds first) of the expired-entry sweep.
    pub sweep_cron: String,
    /// Failed handshakes are logged at most once per peer node and failure
    /// kind in this interval (metrics count every one).
    pub failure_log_interval: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            reauth_fraction: 2.0 / 3.0,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_in_flight: 32,
            sweep_cron: "0 * * * * *".to_string(),
            failure_log_interval: Duration::from_secs(60),
        }
    }
}

/// Why the manager stopped.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Reading the pinned auth map back at start failed.
    #[error("reading the auth map back at start: {0}")]
    Resume(#[source] StoreError),
    /// The node table could not be saved.
    #[error("node table: {0}")]
    Nodes(#[from] NodeTableError),
}

/// The manager's inputs.
#[derive(Debug)]
pub struct ManagerInputs {
    /// The desired state (the agent's policy bridge publishes it).
    pub desired: watch::Receiver<Arc<DesiredState>>,
    /// Auth-required signals, as pairs (the datapath's reader maps them).
    pub signals: mpsc::Receiver<Pair>,
    /// Local identities whose SVID changed
    /// ([`forward_rotations`](super::rotation::forward_rotations) maps
    /// svid-cache's events to these).
    pub rotations: mpsc::Receiver<super::rotation::SvidChange>,
    /// Sweep ticks ([`spawn_sweep_schedule`](super::schedule::spawn_sweep_schedule)
    /// sends them on the cron schedule).
    pub sweep: mpsc::Receiver<()>,
}

/// A pair's entry as the manager knows it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    expiry: SystemTime,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    next: Instant,
}

/// The auth manager. See the module docs.
pub struct AuthManager<A: Authenticator, S: AuthStore> {
    config: ManagerConfig,
    authenticator: Arc<A>,
    store: Arc<S>,
    nodes: NodeTable,
    clock: Arc<dyn Clock>,
    metrics: ManagerMetrics,

    wanted: BTreeSet<Pair>,
    known_nodes: BTreeMap<String, (u16, policy_bridge::NodeInfo)>,
    entries: BTreeMap<Pair, Entry>,
    due: BTreeSet<(Instant, Pair)>,
    due_at: HashMap<Pair, Instant>,
    backoff: HashMap<Pair, Backoff>,
    /// Nodes whose handshake port could not be reached, with their backoff:
    /// while one is backing off, its pairs are parked and a single pair
    /// probes it when the backoff ends (a node down costs one connect per
    /// backoff step, not one per pair).
    node_backoff: HashMap<u16, Backoff>,
    parked: HashMap<u16, BTreeSet<Pair>>,
    probing: HashSet<u16>,
    in_flight: HashSet<Pair>,
    /// Pairs whose peer node changed (address, WireGuard key) while their
    /// handshake was in flight: its result speaks for the old node, so it is
    /// dropped and the pair tried again.
    superseded: HashSet<Pair>,
    waiting: VecDeque<Pair>,
    /// Authenticated pairs that did not fit in a full auth map: tried again
    /// as soon as an entry is removed (and on their backoff meanwhile).
    waiting_for_room: BTreeSet<Pair>,
    tasks: JoinSet<(Pair, Result<Authenticated, AuthFailure>)>,
    /// Failed handshakes logged per (peer node, check).
    failure_log: LogThrottle<(u16, &'static str)>,
}

impl<A: Authenticator, S: AuthStore> std::fmt::Debug for AuthManager<A, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthManager")
            .field("wanted", &self.wanted.len())
            .field("entries", &self.entries.len())
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl<A: Authenticator, S: AuthStore> AuthManager<A, S> {
    /// A manager writing to `store`, authenticating with `authenticator`.
    pub fn new(
        config: ManagerConfig,
        authenticator: Arc<A>,
        store: Arc<S>,
        nodes: NodeTable,
        clock: Arc<dyn Clock>,
        metrics: ManagerMetrics,
    ) -> Self {
        Self {
            failure_log: LogThrottle::new(config.failure_log_interval, DEFAULT_MAX_PEERS),
            config,
            authenticator,
            store,
            nodes,
            clock,
            metrics,
            wanted: BTreeSet::new(),
            known_nodes: BTreeMap::new(),
            entries: BTreeMap::new(),
            due: BTreeSet::new(),
            due_at: HashMap::new(),
            waiting_for_room: BTreeSet::new(),
            backoff: HashMap::new(),
            node_backoff: HashMap::new(),
            parked: HashMap::new(),
            probing: HashSet::new(),
            in_flight: HashSet::new(),
            superseded: HashSet::new(),
            waiting: VecDeque::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Runs until `shutdown`. Reads the auth map back first.
    pub async fn run(
        mut self,
        mut inputs: ManagerInputs,
        shutdown: CancellationToken,
    ) -> Result<(), ManagerError> {
        self.resume()?;
        let first = inputs.desired.borrow_and_update().clone();
        self.apply_desired(&first)?;
        let mut signals_open = true;
        let mut rotations_open = true;
        let mut sweep_open = true;
        loop {
            let next_due = self.due.first().map(|(t, _)| *t);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = inputs.desired.changed() => {
                    if changed.is_err() { break; }
                    let d = inputs.desired.borrow_and_update().clone();
                    self.apply_desired(&d)?;
                }
                s = inputs.signals.recv(), if signals_open => match s {
                    Some(pair) => self.on_signal(pair),
                    None => signals_open = false,
                },
                r = inputs.rotations.recv(), if rotations_open => match r {
                    Some(super::rotation::SvidChange::Added(identity)) => self.on_added(identity),
                    Some(super::rotation::SvidChange::Rotated(identity)) => self.on_rotation(identity),
                    Some(super::rotation::SvidChange::Revoked(identity)) => self.on_revoked(identity),
                    None => rotations_open = false,
                },
                t = inputs.sweep.recv(), if sweep_open => match t {
                    Some(()) => self.sweep(),
                    None => sweep_open = false,
                },
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    match done {
                        Ok((pair, result)) => self.complete(pair, result),
                        Err(e) => tracing::error!(error = %e, "handshake task failed"),
                    }
                }
                _ = sleep_until_opt(next_due) => self.fire_due(),
            }
        }
        self.tasks.abort_all();
        Ok(())
    }

    /// Reads the pinned map back: live entries are kept and scheduled for
    /// re-authentication, expired ones removed.
    fn resume(&mut self) -> Result<(), ManagerError> {
        let now = self.clock.now();
        for (pair, expiry) in self.store.entries().map_err(ManagerError::Resume)? {
            if expiry <= now {
                self.remove_entry(pair, "expired");
                continue;
            }
            self.entries.insert(pair, Entry { expiry });
            self.schedule_reauth(pair, expiry);
        }
        self.metrics.set_entries(self.entries.len());
        tracing::info!(entries = self.entries.len(), "auth map read back");
        Ok(())
    }

    /// Which nodes left and which changed (address, key) since the last
    /// desired state. Computed here, not from [`NodeTable::sync`]'s answer:
    /// the agent shares the table and syncs it before the manager sees the
    /// state, so that answer would usually be empty.
    fn node_changes(&mut self, d: &DesiredState) -> (HashSet<u16>, HashSet<u16>) {
        let mut removed = HashSet::new();
        let mut changed = HashSet::new();
        let mut now = BTreeMap::new();
        for (name, info) in &d.nodes {
            let Some(id) = self.nodes.id_of(name) else {
                continue;
            };
            if let Some((old_id, old)) = self.known_nodes.get(name)
                && (*old_id != id || old != info)
            {
                changed.insert(id);
            }
            now.insert(name.clone(), (id, info.clone()));
        }
        for (name, (id, _)) in &self.known_nodes {
            if !now.contains_key(name) {
                removed.insert(*id);
            }
        }
        self.known_nodes = now;
        (removed, changed)
    }

    fn apply_desired(&mut self, d: &DesiredState) -> Result<(), ManagerError> {
        let changes = self.nodes.sync(&d.nodes)?;
        let (mut removed_nodes, mut changed_nodes) = self.node_changes(d);
        removed_nodes.extend(changes.removed.iter().map(|(_, id)| *id));
        changed_nodes.extend(changes.changed.iter().map(|(_, id)| *id));
        for id in removed_nodes.iter().chain(&changed_nodes) {
            // A gone node's state goes; a changed one (new address) is tried afresh.
            self.node_backoff.remove(id);
            self.probing.remove(id);
            for p in self.parked.remove(id).unwrap_or_default() {
                self.unschedule(p);
                self.backoff.remove(&p);
                if self.wanted.contains(&p) {
                    self.schedule(p, Instant::now());
                }
            }
        }
        let local = self.nodes.local_name();
        let wanted: BTreeSet<Pair> = d
            .required_pairs(&local)
            .into_iter()
            .filter_map(|(l, r, node)| {
                Some(Pair {
                    local: l,
                    remote: r,
                    node: self.nodes.id_of(&node)?,
                })
            })
            .collect();
        let stale: BTreeSet<Pair> = self
            .entries
            .keys()
            .copied()
            .chain(self.untracked().into_iter().map(|(p, _)| p))
            .filter(|p| !wanted.contains(p))
            .collect();
        for p in stale {
            let reason = if removed_nodes.contains(&p.node) {
                "node_removed"
            } else {
                "not_required"
            };
            self.remove_entry(p, reason);
        }
        // Node keys changed: what was authenticated against the old key is re-done.
        self.wanted = wanted;
        self.waiting.retain(|p| self.wanted.contains(p));
        let todo: Vec<(Pair, bool)> = self
            .wanted
            .iter()
            .filter_map(|p| {
                if changed_nodes.contains(&p.node) {
                    // Also a pair in flight: checked against the old node.
                    Some((*p, true))
                } else if !self.entries.contains_key(p) {
                    Some((*p, false))
                } else {
                    None
                }
            })
            .collect();
        for (p, now) in todo {
            self.request(p, now);
        }
        Ok(())
    }

    fn on_signal(&mut self, pair: Pair) {
        if !self.wanted.contains(&pair) {
            self.metrics.signal("not_required");
            tracing::debug!(%pair, "signal for a pair no rule of this node requires");
            return;
        }
        let live = self
            .entries
            .get(&pair)
            .is_some_and(|e| e.expiry > self.clock.now());
        if live || self.in_flight.contains(&pair) {
            self.metrics.signal("deduplicated");
            return;
        }
        self.metrics.signal("accepted");
        self.request(pair, false);
    }

    /// The identity's first SVID: its pairs without a live entry now.
    fn on_added(&mut self, identity: u32) {
        self.on_new_svid(identity, false);
    }

    fn on_rotation(&mut self, identity: u32) {
        // A new local SVID: re-authenticate now, so the entry's expiry
        // follows the new certificate (and a pair that failed for want of
        // an SVID is retried at once).
        self.on_new_svid(identity, true);
    }

    /// Asks for the identity's pairs, clearing their backoff; `force` also
    /// redoes pairs with a live entry.
    fn on_new_svid(&mut self, identity: u32, force: bool) {
        let pairs: Vec<Pair> = self
            .wanted
            .iter()
            .filter(|p| p.local == identity)
            .copied()
            .collect();
        for p in pairs {
            self.backoff.remove(&p);
            self.request(p, force);
        }
    }

    /// SPIRE no longer serves `identity` here: every entry with it as the
    /// local side goes now (the pairs stay wanted: they are authenticated
    /// again if an SVID comes back).
    fn on_revoked(&mut self, identity: u32) {
        let pairs: BTreeSet<Pair> = self
            .entries
            .keys()
            .copied()
            .chain(self.untracked().into_iter().map(|(p, _)| p))
            .filter(|p| p.local == identity)
            .collect();
        for p in pairs {
            self.remove_entry(p, "svid_revoked");
        }
        // A handshake under way proved the old SVID: its result is not
        // written (the pair is tried again, and fails without an SVID).
        let flying: Vec<Pair> = self
            .in_flight
            .iter()
            .filter(|p| p.local == identity)
            .copied()
            .collect();
        self.superseded.extend(flying);
    }

    fn sweep(&mut self) {
        let now = self.clock.now();
        let expired: BTreeSet<Pair> = self
            .entries
            .iter()
            .map(|(p, e)| (*p, e.expiry))
            .chain(self.untracked())
            .filter(|(_, expiry)| *expiry <= now)
            .map(|(p, _)| p)
            .collect();
        for p in expired {
            self.remove_entry(p, "expired");
            if self.wanted.contains(&p) {
                self.request(p, false);
            }
        }
    }

    /// Entries of the map this manager did not write: the handshake server
    /// writes the responder's side of the pairs it accepts. GC and the sweep
    /// must see them too, or they would outlive their rule.
    fn untracked(&self) -> Vec<(Pair, SystemTime)> {
        match self.store.entries() {
            Ok(all) => all
                .into_iter()
                .filter(|(p, _)| !self.entries.contains_key(p))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "reading the auth map");
                Vec::new()
            }
        }
    }

    /// Asks for a handshake of `pair`. `force` re-authenticates even a pair
    /// with a live entry.
    fn request(&mut self, pair: Pair, force: bool) {
        if !self.wanted.contains(&pair) {
            return;
        }
        if self.in_flight.contains(&pair) {
            if force {
                self.superseded.insert(pair);
            }
            return;
        }
        if !force
            && self
                .entries
                .get(&pair)
                .is_some_and(|e| e.expiry > self.clock.now() && self.due_at.contains_key(&pair))
        {
            return;
        }
        if let Some(b) = self.backoff.get(&pair)
            && b.next > Instant::now()
        {
            let next = b.next;
            self.schedule(pair, next);
            return;
        }
        if let Some(nb) = self.node_backoff.get(&pair.node) {
            // The node was unreachable: one probe at a time, the rest wait.
            let next = nb.next;
            if next > Instant::now() || self.probing.contains(&pair.node) {
                self.unschedule(pair);
                let parked = self.parked.entry(pair.node).or_default();
                let first = parked.is_empty();
                parked.insert(pair);
                if first && !self.probing.contains(&pair.node) {
                    // This pair probes the node when its backoff ends.
                    self.schedule(pair, next);
                }
                return;
            }
            self.probing.insert(pair.node);
            if let Some(parked) = self.parked.get_mut(&pair.node) {
                parked.remove(&pair);
            }
        }
        if self.in_flight.len() >= self.config.max_in_flight {
            if !self.waiting.contains(&pair) {
                self.waiting.push_back(pair);
            }
            return;
        }
        self.start(pair);
    }

    fn start(&mut self, pair: Pair) {
        let Some(node) = self
            .nodes
            .name_of(pair.node)
            .and_then(|n| self.nodes.info(&n))
        else {
            tracing::warn!(%pair, "no node information for the pair's node; not authenticating");
            return;
        };
        self.unschedule(pair);
        self.in_flight.insert(pair);
        self.metrics.set_in_flight(self.in_flight.len());
        let fut = self
            .authenticator
            .authenticate(pair.local, pair.remote, node);
        self.tasks.spawn(async move { (pair, fut.await) });
    }

    /// The node of a finished handshake answered (or not): ends or extends
    /// its backoff; an answer releases the pairs parked for it.
    fn node_outcome(&mut self, node: u16, reachable: bool) {
        let was_probe = self.probing.remove(&node);
        if reachable {
            if self.node_backoff.remove(&node).is_some() {
                tracing::info!(node, "node reachable again; resuming its pairs");
            }
            for p in self.parked.remove(&node).unwrap_or_default() {
                self.request(p, false);
            }
            return;
        }
        let failures = match self.node_backoff.get(&node) {
            None => 1,
            Some(b) if was_probe => b.failures + 1,
            // Another handshake already in flight when the node went away:
            // the backoff it set stands.
            Some(_) => return,
        };
        let next = Instant::now() + self.backoff_delay(failures);
        if failures == 1 {
            tracing::warn!(
                node,
                "node unreachable; its pairs wait while one probes it with backoff"
            );
        }
        self.node_backoff.insert(node, Backoff { failures, next });
        if let Some(p) = self.parked.get(&node).and_then(|s| s.first().copied()) {
            self.schedule(p, next);
        }
    }

    fn backoff_delay(&self, failures: u32) -> Duration {
        let base = self
            .config
            .backoff_initial
            .saturating_mul(1u32 << (failures.max(1) - 1).min(16))
            .min(self.config.backoff_max);
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn complete(&mut self, pair: Pair, result: Result<Authenticated, AuthFailure>) {
        let reachable =
            !matches!(&result, Err(f) if f.label == "connect" || f.label == "connect_timeout");
        self.in_flight.remove(&pair);
        self.metrics.set_in_flight(self.in_flight.len());
        let result = if self.superseded.remove(&pair) {
            // Checked against the node as it was: not written, done again.
            tracing::debug!(%pair, "the peer node changed during the handshake; authenticating again");
            self.metrics.handshake("superseded");
            self.request(pair, true);
            None
        } else {
            Some(result)
        };
        match result {
            None => {}
            Some(Ok(auth)) => {
                self.metrics.handshake("ok");
                self.backoff.remove(&pair);
                if !self.wanted.contains(&pair) {
                    tracing::debug!(%pair, "authenticated a pair no longer required; not writing it");
                } else if auth.expiry <= self.clock.now() {
                    tracing::warn!(%pair, "handshake gave an already expired pair; not writing it");
                } else {
                    match self.store.upsert(pair, auth.expiry) {
                        Ok(()) => {
                            self.entries.insert(
                                pair,
                                Entry {
                                    expiry: auth.expiry,
                                },
                            );
                            self.metrics.set_entries(self.entries.len());
                            self.schedule_reauth(pair, auth.expiry);
                            if self.waiting_for_room.remove(&pair)
                                && self.waiting_for_room.is_empty()
                            {
                                tracing::info!(
                                    "the auth map had room again: every pair that waited for it is written"
                                );
                            }
                            tracing::info!(%pair, peer.node = %auth.peer_node, "authenticated");
                        }
                        Err(e) if e.is_full() => {
                            // Nothing stored is lost; the pair waits for
                            // room (an entry removed) or its backoff.
                            self.metrics.store_failure("full");
                            if self.waiting_for_room.is_empty() {
                                tracing::error!(%pair, error = %e, waiting = 1, "the auth map is full: the pair is authenticated but cannot be written; it is written as soon as an entry is removed (raise auth-map-capacity)");
                            }
                            self.waiting_for_room.insert(pair);
                            self.fail(pair, "store");
                        }
                        Err(e) => {
                            self.metrics.store_failure("error");
                            tracing::error!(%pair, error = %e, "writing the auth entry failed");
                            self.fail(pair, "store");
                        }
                    }
                }
            }
            Some(Err(f)) => {
                self.metrics.handshake(f.label);
                if let Some(suppressed) = self.failure_log.allow((pair.node, f.label)) {
                    tracing::warn!(%pair, check = f.label, error = %f.message, suppressed, "handshake failed");
                }
                if f.label == "wireguard_key_mismatch" && self.entries.contains_key(&pair) {
                    // The peer no longer holds the key its node published:
                    // what it proved before does not bind this path.
                    self.remove_entry(pair, "wireguard_key_mismatch");
                }
                self.fail(pair, f.label);
            }
        }
        self.node_outcome(pair.node, reachable);
        while self.in_flight.len() < self.config.max_in_flight {
            let Some(p) = self.waiting.pop_front() else {
                break;
            };
            // Through `request`: a pair that queued before its node went
            // unreachable is parked, not dialled.
            self.request(p, false);
        }
    }

    fn fail(&mut self, pair: Pair, label: &str) {
        if !self.wanted.contains(&pair) {
            self.backoff.remove(&pair);
            return;
        }
        let failures = self.backoff.get(&pair).map_or(0, |b| b.failures) + 1;
        // The peer's agent answered and refused: most often it has not yet
        // learned the pod this pair is for (both agents watch the same
        // change, a few milliseconds apart). The first retries come fast (10,
        // 20, 40, 80, 160, 320 ms), then
        // the usual backoff.
        let delay = if label == "peer_refused" && failures <= PEER_REFUSED_FAST_RETRIES {
            PEER_REFUSED_FIRST_RETRY.saturating_mul(1 << (failures - 1))
        } else if label == "peer_refused" {
            self.backoff_delay(failures - PEER_REFUSED_FAST_RETRIES)
        } else {
            self.backoff_delay(failures)
        };
        let next = Instant::now() + delay;
        self.backoff.insert(pair, Backoff { failures, next });
        self.schedule(pair, next);
    }

    fn schedule_reauth(&mut self, pair: Pair, expiry: SystemTime) {
        let now = self.clock.now();
        let left = expiry.duration_since(now).unwrap_or_default();
        let at = Instant::now() + left.mul_f64(self.config.reauth_fraction.clamp(0.0, 1.0));
        self.schedule(pair, at);
    }

    fn schedule(&mut self, pair: Pair, at: Instant) {
        self.unschedule(pair);
        self.due.insert((at, pair));
        self.due_at.insert(pair, at);
    }

    fn unschedule(&mut self, pair: Pair) {
        if let Some(t) = self.due_at.remove(&pair) {
            self.due.remove(&(t, pair));
        }
    }

    fn fire_due(&mut self) {
        let now = Instant::now();
        while let Some(&(t, pair)) = self.due.first() {
            if t > now {
                break;
            }
            self.due.pop_first();
            self.due_at.remove(&pair);
            self.request(pair, true);
        }
    }

    fn remove_entry(&mut self, pair: Pair, reason: &str) {
        let removed = match self.store.remove(pair) {
            Ok(removed) => {
                self.metrics.remove(reason);
                tracing::info!(%pair, reason, "auth entry removed");
                removed
            }
            Err(e) => {
                tracing::error!(%pair, error = %e, "removing the auth entry failed");
                false
            }
        };
        self.entries.remove(&pair);
        self.unschedule(pair);
        self.backoff.remove(&pair);
        self.waiting_for_room.remove(&pair);
        self.metrics.set_entries(self.entries.len());
        if removed {
            self.room_made();
        }
    }

    /// An entry left the map: the pairs that did not fit are tried again
    /// now, not at the end of their backoff.
    fn room_made(&mut self) {
        let waiting: Vec<Pair> = self
            .waiting_for_room
            .iter()
            .copied()
            .filter(|p| self.wanted.contains(p))
            .collect();
        self.waiting_for_room.retain(|p| self.wanted.contains(p));
        for p in waiting {
            self.backoff.remove(&p);
            self.request(p, false);
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
