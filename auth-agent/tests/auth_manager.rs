//! The auth manager's logic under paused tokio time, with an in-memory auth
//! store and a scripted authenticator.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use auth_agent::auth::manager::{AuthManager, ManagerConfig, ManagerInputs, ManagerMetrics};
use auth_agent::auth::rotation::SvidChange;
use auth_agent::auth::store::{AuthStore, MemoryAuthStore, Pair, StoreError};
use auth_agent::auth::{AuthFailure, Authenticated, Authenticator};
use auth_agent::nodes::NodeTable;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use policy_bridge::{
    AuthRule, DesiredState, Direction, Endpoint, Identity, NodeInfo, PortRange, Protocol, Remote,
};
use svid_cache::{Clock, TokioClock};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const HOUR: Duration = Duration::from_secs(3600);

/// One handshake the fake saw.
#[derive(Debug, Clone)]
struct Call {
    local: u32,
    remote: u32,
    node: String,
    at: Instant,
}

/// A scripted authenticator: succeeds with expiry = now + lifetime after
/// `delay`, unless a failure is queued for the pair.
#[derive(Debug)]
struct Fake {
    clock: Arc<dyn Clock>,
    lifetime: Duration,
    delay: Duration,
    calls: Mutex<Vec<Call>>,
    failures: Mutex<HashMap<(u32, u32), u32>>,
    /// Refusals by the peer's agent still to answer, per pair.
    refusals: Mutex<HashMap<(u32, u32), u32>>,
    in_flight: Mutex<(usize, usize)>,
    down: Mutex<HashSet<String>>,
    /// Nodes whose agents state another WireGuard key than published.
    key_mismatch: Mutex<HashSet<String>>,
}

impl Fake {
    fn new(clock: Arc<dyn Clock>) -> Arc<Self> {
        Self::with(clock, HOUR, Duration::from_millis(10))
    }

    fn with(clock: Arc<dyn Clock>, lifetime: Duration, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            clock,
            lifetime,
            delay,
            calls: Mutex::new(Vec::new()),
            failures: Mutex::new(HashMap::new()),
            refusals: Mutex::new(HashMap::new()),
            in_flight: Mutex::new((0, 0)),
            down: Mutex::new(HashSet::new()),
            key_mismatch: Mutex::new(HashSet::new()),
        })
    }

    fn fail(&self, local: u32, remote: u32, times: u32) {
        self.failures.lock().unwrap().insert((local, remote), times);
    }

    fn refuse(&self, local: u32, remote: u32, times: u32) {
        self.refusals.lock().unwrap().insert((local, remote), times);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn max_concurrent(&self) -> usize {
        self.in_flight.lock().unwrap().1
    }
}

/// The manager's handle on the fake.
struct FakeAuth(Arc<Fake>);

impl Authenticator for FakeAuth {
    fn authenticate(
        &self,
        local: u32,
        remote: u32,
        node: NodeInfo,
    ) -> BoxFuture<'static, Result<Authenticated, AuthFailure>> {
        let me = self.0.clone();
        async move {
            me.calls.lock().unwrap().push(Call {
                local,
                remote,
                node: node.name.clone(),
                at: Instant::now(),
            });
            {
                let mut f = me.in_flight.lock().unwrap();
                f.0 += 1;
                f.1 = f.1.max(f.0);
            }
            tokio::time::sleep(me.delay).await;
            me.in_flight.lock().unwrap().0 -= 1;
            let fail = {
                let mut f = me.failures.lock().unwrap();
                match f.get_mut(&(local, remote)) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        true
                    }
                    _ => false,
                }
            };
            if me.down.lock().unwrap().contains(&node.name) {
                return Err(AuthFailure {
                    label: "connect",
                    message: "no route to host (scripted: node down)".into(),
                });
            }
            if fail {
                return Err(AuthFailure {
                    label: "connect",
                    message: "connection refused (scripted)".into(),
                });
            }
            let refused = {
                let mut f = me.refusals.lock().unwrap();
                match f.get_mut(&(local, remote)) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        true
                    }
                    _ => false,
                }
            };
            if refused {
                return Err(AuthFailure {
                    label: "peer_refused",
                    message: "responder refused: no local endpoint (scripted)".into(),
                });
            }
            if me.key_mismatch.lock().unwrap().contains(&node.name) {
                return Err(AuthFailure {
                    label: "wireguard_key_mismatch",
                    message: "the peer states another key (scripted)".into(),
                });
            }
            Ok(Authenticated {
                expiry: me.clock.now() + me.lifetime,
                peer_node: node.name,
                peer_wireguard_key: None,
            })
        }
        .boxed()
    }
}

/// A store that also counts removals, to show re-authentication replaces
/// entries in place.
#[derive(Debug, Default)]
struct Recording {
    inner: MemoryAuthStore,
    removed: Mutex<Vec<Pair>>,
}

impl AuthStore for Recording {
    fn upsert(&self, pair: Pair, expiry: SystemTime) -> Result<(), StoreError> {
        self.inner.upsert(pair, expiry)
    }
    fn remove(&self, pair: Pair) -> Result<bool, StoreError> {
        self.removed.lock().unwrap().push(pair);
        self.inner.remove(pair)
    }
    fn entries(&self) -> Result<Vec<(Pair, SystemTime)>, StoreError> {
        self.inner.entries()
    }
}

/// Node a (local) runs 256; node b runs 257 and 258; 256 must authenticate
/// with 257 and 258.
fn state() -> DesiredState {
    let mut d = common::state_of(
        &[("a", "10.1.0.1"), ("b", "10.1.0.2")],
        &[
            ("10.2.0.1", 256, "a"),
            ("10.2.1.1", 257, "b"),
            ("10.2.1.2", 258, "b"),
        ],
    );
    for r in [257, 258] {
        d.rules
            .insert(common::rule(256, r, Direction::Egress, 8080));
    }
    d
}

/// [`state`] plus node c (10.1.0.3) with one pod for each identity of
/// `ids`, each required from 256 on 8080.
fn state_with_node_c(ids: std::ops::Range<u32>) -> DesiredState {
    let mut d = state();
    d.nodes.insert(
        "c".into(),
        common::state_of(&[("c", "10.1.0.3")], &[]).nodes["c"].clone(),
    );
    for (i, id) in ids.enumerate() {
        let ip = format!("10.2.2.{}", i + 1);
        d.endpoints.insert(
            ip.parse().unwrap(),
            policy_bridge::Endpoint {
                ip: ip.parse().unwrap(),
                identity: id,
                node: "c".into(),
                pod: format!("ns/p{id}"),
            },
        );
        d.rules
            .insert(common::rule(256, id, Direction::Egress, 8080));
    }
    d
}

struct Harness {
    desired: watch::Sender<Arc<DesiredState>>,
    signals: mpsc::Sender<Pair>,
    rotations: mpsc::Sender<SvidChange>,
    sweep: mpsc::Sender<()>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics: ManagerMetrics,
    nodes: NodeTable,
}

fn start<S: AuthStore>(
    fake: Arc<Fake>,
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    config: ManagerConfig,
    nodes: NodeTable,
    initial: DesiredState,
) -> Harness {
    let (desired, desired_rx) = watch::channel(Arc::new(initial));
    let (signals, signals_rx) = mpsc::channel(64);
    let (rotations, rotations_rx) = mpsc::channel(64);
    let (sweep, sweep_rx) = mpsc::channel(4);
    let metrics = ManagerMetrics::default();
    let shutdown = CancellationToken::new();
    let mgr = AuthManager::new(
        config,
        Arc::new(FakeAuth(fake)),
        store,
        nodes.clone(),
        clock,
        metrics.clone(),
    );
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        mgr.run(
            ManagerInputs {
                desired: desired_rx,
                signals: signals_rx,
                rotations: rotations_rx,
                sweep: sweep_rx,
            },
            token,
        )
        .await
        .expect("manager");
    });
    Harness {
        desired,
        signals,
        rotations,
        sweep,
        shutdown,
        task,
        metrics,
        nodes,
    }
}

impl Harness {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }

    fn pair(&self, local: u32, remote: u32, node: &str) -> Pair {
        Pair {
            local,
            remote,
            node: self.nodes.id_of(node).expect("known node"),
        }
    }
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(TokioClock::starting_at(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ))
}

/// Lets the manager run until it is idle at the current instant.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(start_paused = true)]
async fn pre_authenticates_every_required_pair_before_any_packet() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    let store = Arc::new(MemoryAuthStore::default());
    let t0 = clock.now();
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    settle().await;
    let entries = store.snapshot();
    let (p257, p258) = (h.pair(256, 257, "b"), h.pair(256, 258, "b"));
    assert_eq!(
        entries.keys().copied().collect::<Vec<_>>(),
        vec![p257, p258]
    );
    for e in entries.values() {
        // The fake's handshake takes 10 ms and returns now + 1 h.
        assert_eq!(
            *e,
            t0 + Duration::from_millis(10) + HOUR,
            "expiry is the handshake's"
        );
    }
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "one handshake per pair: {calls:?}");
    assert!(calls.iter().all(|c| c.local == 256 && c.node == "b"));
    assert_eq!(h.metrics.handshakes("ok"), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn signals_are_deduplicated_and_unrequired_pairs_ignored() {
    let clock = clock();
    let fake = Fake::with(clock.clone(), HOUR, Duration::from_secs(2));
    let store = Arc::new(MemoryAuthStore::default());
    let mut d = state();
    d.rules.clear();
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        d,
    );
    settle().await;
    assert!(fake.calls().is_empty(), "no rule, no handshake");
    // A signal for a pair no rule requires is not acted on.
    let p = h.pair(256, 257, "b");
    h.signals.send(p).await.unwrap();
    settle().await;
    assert!(fake.calls().is_empty());
    assert_eq!(h.metrics.signals("not_required"), 1);

    // With the rule, pre-authentication starts; signals meanwhile are deduplicated.
    h.desired.send(Arc::new(state())).unwrap();
    settle().await;
    for _ in 0..5 {
        h.signals.send(p).await.unwrap();
    }
    settle().await;
    let n257 = fake.calls().iter().filter(|c| c.remote == 257).count();
    assert_eq!(n257, 1, "one handshake in flight per pair");
    assert_eq!(h.metrics.signals("deduplicated"), 5);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(store.snapshot().contains_key(&p));
    // A live entry: still no second handshake.
    h.signals.send(p).await.unwrap();
    settle().await;
    assert_eq!(fake.calls().iter().filter(|c| c.remote == 257).count(), 1);
    h.stop().await;
}

/// A refusal by the peer's agent (most often: it has not yet learned the
/// pod the pair is for) is retried after 10, 20, 40, 80, 160 and 320 ms,
/// then with the usual backoff from 1 s: a new pod's pair is not held a second
/// behind a watch that is a few milliseconds late.
#[tokio::test(start_paused = true)]
async fn a_peer_refusal_is_retried_fast_then_backs_off() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    fake.refuse(256, 257, 8);
    let store = Arc::new(MemoryAuthStore::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let at = call_times(&fake, 257);
    assert_eq!(at.len(), 9, "8 refusals then success");
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    // Each gap is the delay plus the fake's 10 ms handshake.
    for (i, ms) in [10u64, 20, 40, 80, 160, 320].into_iter().enumerate() {
        let want = Duration::from_millis(ms + 10);
        assert!(
            gaps[i] >= want && gaps[i] <= want + Duration::from_millis(5),
            "fast retry {i}: {:?}, want {want:?}",
            gaps[i]
        );
    }
    // Then the usual backoff, jittered in [base/2, base]: 1 s, 2 s.
    for (i, base) in [(6, 1u64), (7, 2)] {
        let base = Duration::from_secs(base);
        assert!(
            gaps[i] >= base / 2 && gaps[i] <= base + Duration::from_millis(100),
            "gap {i} = {:?} for base {base:?}",
            gaps[i]
        );
    }
    assert!(store.snapshot().contains_key(&h.pair(256, 257, "b")));
    assert_eq!(h.metrics.handshakes("peer_refused"), 8);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_per_pair() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    fake.fail(256, 257, 4);
    let store = Arc::new(MemoryAuthStore::default());
    let config = ManagerConfig {
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        ..ManagerConfig::default()
    };
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        config,
        NodeTable::in_memory("a"),
        state(),
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    let at = call_times(&fake, 257);
    assert_eq!(at.len(), 5, "4 failures then success");
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    // Jittered in [base/2, base] plus the 10 ms handshake: 1 s, 2 s, 4 s, 8 s bases.
    for (i, g) in gaps.iter().enumerate() {
        let base = Duration::from_secs(1 << i);
        assert!(
            *g >= base / 2 && *g <= base + Duration::from_millis(100),
            "gap {i} = {g:?} for base {base:?}"
        );
    }
    assert!(store.snapshot().contains_key(&h.pair(256, 257, "b")));
    assert_eq!(h.metrics.handshakes("connect"), 4);
    // The other pair was not held back by 257's failures.
    assert_eq!(fake.calls().iter().filter(|c| c.remote == 258).count(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn reauthenticates_at_two_thirds_of_the_lifetime_in_place() {
    let clock = clock();
    let fake = Fake::with(
        clock.clone(),
        Duration::from_secs(30 * 60),
        Duration::from_millis(10),
    );
    let store = Arc::new(Recording::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    settle().await;
    let p = h.pair(256, 257, "b");
    let first = store.inner.snapshot()[&p];
    tokio::time::sleep(Duration::from_secs(19 * 60)).await;
    assert_eq!(
        fake.calls().iter().filter(|c| c.remote == 257).count(),
        1,
        "not before 2/3"
    );
    tokio::time::sleep(Duration::from_secs(2 * 60)).await;
    assert_eq!(
        fake.calls().iter().filter(|c| c.remote == 257).count(),
        2,
        "re-authenticated at 20 min"
    );
    let second = store.inner.snapshot()[&p];
    assert!(
        second > first,
        "expiry moved forward: {first:?} -> {second:?}"
    );
    assert!(
        store.removed.lock().unwrap().is_empty(),
        "replaced in place, never removed"
    );
    // And again, indefinitely.
    tokio::time::sleep(Duration::from_secs(25 * 60)).await;
    assert!(fake.calls().iter().filter(|c| c.remote == 257).count() >= 3);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rotated_local_svid_reauthenticates_its_pairs_at_once() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    let store = Arc::new(MemoryAuthStore::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    settle().await;
    assert_eq!(fake.calls().len(), 2);
    h.rotations.send(SvidChange::Rotated(256)).await.unwrap();
    settle().await;
    assert_eq!(fake.calls().len(), 4, "both pairs of 256 re-authenticated");
    h.rotations.send(SvidChange::Rotated(999)).await.unwrap();
    settle().await;
    assert_eq!(
        fake.calls().len(),
        4,
        "an unrelated identity changes nothing"
    );
    // A first SVID (Added) does not redo pairs with a live entry: after a
    // restart they were read back, bounded by the SVID they were proved
    // with.
    h.rotations.send(SvidChange::Added(256)).await.unwrap();
    settle().await;
    assert_eq!(fake.calls().len(), 4, "live entries are kept on Added");
    h.stop().await;
}

/// SPIRE stops serving a local identity (its entry deleted): every pair
/// with it as the local side is collected at once, not at expiry; other
/// identities' pairs stay; nothing is written again until an SVID is back.
#[tokio::test(start_paused = true)]
async fn a_revoked_local_svid_collects_its_pairs_at_once() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    let store = Arc::new(MemoryAuthStore::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    settle().await;
    assert_eq!(store.snapshot().len(), 2, "both pairs of 256 written");
    h.rotations.send(SvidChange::Revoked(999)).await.unwrap();
    settle().await;
    assert_eq!(
        store.snapshot().len(),
        2,
        "an unrelated identity changes nothing"
    );
    h.rotations.send(SvidChange::Revoked(256)).await.unwrap();
    settle().await;
    assert!(
        store.snapshot().is_empty(),
        "256's pairs collected at once: {:?}",
        store.snapshot()
    );
    assert_eq!(h.metrics.removed("svid_revoked"), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn gc_on_rule_endpoint_and_node_removal_and_expired_sweep() {
    let clock = clock();
    let fake = Fake::with(
        clock.clone(),
        Duration::from_secs(600),
        Duration::from_millis(10),
    );
    let store = Arc::new(MemoryAuthStore::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    settle().await;
    let (p257, p258) = (h.pair(256, 257, "b"), h.pair(256, 258, "b"));
    assert_eq!(store.snapshot().len(), 2);

    // Rule for 258 removed.
    let mut d = state();
    d.rules.retain(|r| r.remote != Remote::Identity(258));
    h.desired.send(Arc::new(d.clone())).unwrap();
    settle().await;
    assert_eq!(
        store.snapshot().keys().copied().collect::<Vec<_>>(),
        vec![p257]
    );
    assert_eq!(h.metrics.removed("not_required"), 1);

    // Rule back: re-authenticated.
    h.desired.send(Arc::new(state())).unwrap();
    settle().await;
    assert!(store.snapshot().contains_key(&p258));

    // The local endpoint of 256 goes away: nothing on this node needs its pairs.
    let mut d = state();
    d.endpoints.retain(|_, e| e.identity != 256);
    h.desired.send(Arc::new(d)).unwrap();
    settle().await;
    assert!(store.snapshot().is_empty());
    h.desired.send(Arc::new(state())).unwrap();
    settle().await;
    assert_eq!(store.snapshot().len(), 2);

    // Node b leaves the cluster (with its pods).
    let mut d = state();
    d.nodes.remove("b");
    d.endpoints.retain(|_, e| e.node != "b");
    h.desired.send(Arc::new(d)).unwrap();
    settle().await;
    assert!(store.snapshot().is_empty());
    assert_eq!(h.metrics.removed("node_removed"), 2);

    // Expired sweep: handshakes fail from now on, entries run out, the sweep
    // removes them.
    h.desired.send(Arc::new(state())).unwrap();
    settle().await;
    assert_eq!(store.snapshot().len(), 2);
    fake.fail(256, 257, 1000);
    fake.fail(256, 258, 1000);
    tokio::time::sleep(Duration::from_secs(601)).await;
    h.sweep.send(()).await.unwrap();
    settle().await;
    assert!(store.snapshot().is_empty(), "{:?}", store.snapshot());
    assert_eq!(h.metrics.removed("expired"), 2);
    h.stop().await;
}

/// The handshake server writes the responder's side of a pair into the map
/// without the manager: GC and the sweep must collect such entries too.
#[tokio::test(start_paused = true)]
async fn gc_and_sweep_collect_entries_the_handshake_server_wrote() {
    let clock = clock();
    let fake = Fake::with(
        clock.clone(),
        Duration::from_secs(600),
        Duration::from_millis(10),
    );
    // The manager's own handshakes for both pairs keep failing (the peer's
    // server is not up yet, say).
    fake.fail(256, 257, 1000);
    fake.fail(256, 258, 1000);
    let store = Arc::new(MemoryAuthStore::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    settle().await;
    assert!(store.snapshot().is_empty());
    let (p257, p258) = (h.pair(256, 257, "b"), h.pair(256, 258, "b"));
    // The peer authenticated both pairs towards us; our server wrote them.
    store
        .upsert(p257, clock.now() + Duration::from_secs(600))
        .unwrap();
    store
        .upsert(p258, clock.now() + Duration::from_secs(60))
        .unwrap();

    // Rule for 257 removed: its entry goes, though the manager never wrote it.
    let mut d = state();
    d.rules.retain(|r| r.remote != Remote::Identity(257));
    h.desired.send(Arc::new(d)).unwrap();
    settle().await;
    assert_eq!(
        store.snapshot().keys().copied().collect::<Vec<_>>(),
        vec![p258]
    );
    assert_eq!(h.metrics.removed("not_required"), 1);

    // 258's entry runs out: the sweep removes it.
    tokio::time::sleep(Duration::from_secs(61)).await;
    h.sweep.send(()).await.unwrap();
    settle().await;
    assert!(store.snapshot().is_empty(), "{:?}", store.snapshot());
    assert_eq!(h.metrics.removed("expired"), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn resumes_from_the_map_after_a_restart() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    let store = Arc::new(MemoryAuthStore::default());
    let nodes = NodeTable::in_memory("a");
    nodes.sync(&state().nodes).unwrap();
    let b = nodes.id_of("b").unwrap();
    // What a previous run left: one live entry (20 min left), one expired.
    let live = Pair {
        local: 256,
        remote: 257,
        node: b,
    };
    let dead = Pair {
        local: 256,
        remote: 258,
        node: b,
    };
    store
        .upsert(live, clock.now() + Duration::from_secs(20 * 60))
        .unwrap();
    store
        .upsert(dead, clock.now() - Duration::from_secs(1))
        .unwrap();

    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        nodes,
        state(),
    );
    settle().await;
    let calls = fake.calls();
    assert_eq!(
        calls.iter().filter(|c| c.remote == 258).count(),
        1,
        "the expired pair is re-done"
    );
    assert_eq!(
        calls.iter().filter(|c| c.remote == 257).count(),
        0,
        "the live one is kept as it is"
    );
    assert!(store.snapshot().contains_key(&live));
    // Its re-authentication resumes: at 2/3 of the 20 minutes left.
    tokio::time::sleep(Duration::from_secs(14 * 60)).await;
    assert_eq!(fake.calls().iter().filter(|c| c.remote == 257).count(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn handshakes_in_flight_are_limited() {
    let clock = clock();
    let fake = Fake::with(clock.clone(), HOUR, Duration::from_secs(1));
    let store = Arc::new(MemoryAuthStore::default());
    let mut d = state();
    for r in 300..310u32 {
        let ip: IpAddr = format!("10.2.2.{}", r - 290).parse().unwrap();
        d.identities.insert(
            r,
            Identity {
                id: r,
                labels: BTreeSet::from([format!("k8s:app=y{r}")]),
            },
        );
        d.endpoints.insert(
            ip,
            Endpoint {
                ip,
                identity: r,
                node: "b".into(),
                pod: format!("ns/q{r}"),
            },
        );
        d.rules.insert(AuthRule {
            local: 256,
            remote: Remote::Identity(r),
            direction: Direction::Egress,
            protocol: Protocol::Any,
            ports: PortRange::ANY,
        });
    }
    let config = ManagerConfig {
        max_in_flight: 3,
        ..ManagerConfig::default()
    };
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        config,
        NodeTable::in_memory("a"),
        d,
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        store.snapshot().len(),
        12,
        "all pairs authenticated in the end"
    );
    assert_eq!(fake.max_concurrent(), 3, "never more than 3 at once");
    h.stop().await;
}

/// The agent shares its node table with the manager and syncs it before the
/// manager sees a desired state: node removals and key changes must still
/// be recognised (collected as `node_removed`; re-authenticated at once).
#[tokio::test(start_paused = true)]
async fn node_changes_are_seen_when_the_agent_syncs_the_shared_table_first() {
    let clock = clock();
    let fake = Fake::with(
        clock.clone(),
        Duration::from_secs(600),
        Duration::from_millis(10),
    );
    let store = Arc::new(MemoryAuthStore::default());
    let nodes = NodeTable::in_memory("a");
    nodes.sync(&state().nodes).unwrap();
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        nodes.clone(),
        state(),
    );
    settle().await;
    assert_eq!(fake.calls().len(), 2);

    // Node b publishes a WireGuard key: the agent syncs the table first.
    let mut d = state();
    d.nodes.get_mut("b").unwrap().wireguard_key = Some("a2V5".into());
    nodes.sync(&d.nodes).unwrap();
    h.desired.send(Arc::new(d.clone())).unwrap();
    settle().await;
    assert_eq!(
        fake.calls().len(),
        4,
        "both pairs re-authenticated against the new key"
    );

    // Node b leaves; again the table is synced before the manager looks.
    d.nodes.remove("b");
    d.endpoints.retain(|_, e| e.node != "b");
    nodes.sync(&d.nodes).unwrap();
    h.desired.send(Arc::new(d)).unwrap();
    settle().await;
    assert!(store.snapshot().is_empty());
    assert_eq!(h.metrics.removed("node_removed"), 2);
    assert_eq!(h.metrics.removed("not_required"), 0);
    h.stop().await;
}

/// A node's key changing while a handshake with it is in flight: that
/// handshake checked the old key, so its result is not written and the
/// pair is authenticated again against the new one. (Before, the change was
/// ignored while the handshake ran, and the result written as if it had
/// attested the new key.)
#[tokio::test(start_paused = true)]
async fn a_node_change_during_a_handshake_is_authenticated_again() {
    let clock = clock();
    let fake = Fake::with(clock.clone(), HOUR, Duration::from_secs(1));
    let store = Arc::new(MemoryAuthStore::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.calls().len(), 2, "both pairs in flight");
    let mut d = state();
    d.nodes.get_mut("b").unwrap().wireguard_key = Some("a2V5".into());
    h.desired.send(Arc::new(d)).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        fake.calls().len(),
        4,
        "each pair authenticated again after the in-flight one ended"
    );
    assert_eq!(h.metrics.handshakes("superseded"), 2);
    assert_eq!(store.snapshot().len(), 2);
    h.stop().await;
}

/// A peer that no longer holds the key its node published loses its pairs
/// at once, not at their expiry.
#[tokio::test(start_paused = true)]
async fn a_wireguard_key_mismatch_removes_the_pairs_at_once() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    let store = Arc::new(MemoryAuthStore::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        state(),
    );
    settle().await;
    assert_eq!(store.snapshot().len(), 2);
    fake.key_mismatch.lock().unwrap().insert("b".into());
    let mut d = state();
    d.nodes.get_mut("b").unwrap().wireguard_key = Some("Zm9yZ2Vk".into());
    h.desired.send(Arc::new(d)).unwrap();
    settle().await;
    assert!(
        store.snapshot().is_empty(),
        "pairs toward the node kept: {:?}",
        store.snapshot()
    );
    assert_eq!(h.metrics.removed("wireguard_key_mismatch"), 2);
    assert_eq!(h.metrics.handshakes("wireguard_key_mismatch"), 2);
    h.stop().await;
}

/// A node that cannot be reached costs one probe per backoff step, not one
/// connect per pair; when it answers again every parked pair goes ahead.
#[tokio::test(start_paused = true)]
async fn an_unreachable_node_is_probed_once_per_backoff_step() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    let d = state_with_node_c(300..310);
    fake.down.lock().unwrap().insert("c".into());
    let store = Arc::new(MemoryAuthStore::default());
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        d,
    );
    tokio::time::sleep(Duration::from_secs(40)).await;
    let to_c = |fake: &Fake| fake.calls().iter().filter(|c| c.node == "c").count();
    let tried = to_c(&fake);
    // The first round (10 pairs start together), then one probe at each
    // step of 1, 2, 4, 8, 16 s (jittered down to half): at most 10 + 7.
    assert!(
        (11..=17).contains(&tried),
        "10 pairs, node down for 40 s: {tried} connects"
    );
    assert_eq!(
        store.snapshot().len(),
        2,
        "node b's pairs are not held back by node c"
    );

    fake.down.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(65)).await;
    let c_pairs = store.snapshot().keys().filter(|p| p.remote >= 300).count();
    assert_eq!(
        c_pairs, 10,
        "every parked pair authenticated once c answered"
    );
    assert!(
        to_c(&fake) <= tried + 10 + 1,
        "after recovery each pair handshakes once: {} after {tried}",
        to_c(&fake)
    );
    h.stop().await;
}

/// Every log line of this test binary. Installed once as the global
/// subscriber: a thread-local one misses callsites another test thread
/// registered first while no subscriber was set.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn global() -> &'static Logs {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let w = logs.clone();
            tracing::subscriber::set_global_default(
                tracing_subscriber::fmt()
                    .with_ansi(false)
                    .with_writer(move || w.clone())
                    .finish(),
            )
            .expect("the only global subscriber of this test binary");
            logs
        })
    }

    /// Lines containing every one of `needles`.
    fn lines(&self, needles: &[&str]) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }
}

/// A node that cannot be reached fails every probe; each failure is
/// counted, but logged once per node and failure kind per interval (with
/// how many were suppressed), so unreachable nodes cannot flood the log.
#[tokio::test(start_paused = true)]
async fn failed_handshakes_are_logged_once_per_node_and_interval_and_all_counted() {
    let logs = Logs::global();
    // Identities 700..710 are this test's alone.
    let ours = ["handshake failed", "pair=(256, 70"];
    let clock = clock();
    let fake = Fake::new(clock.clone());
    let d = state_with_node_c(700..710);
    fake.down.lock().unwrap().insert("c".into());
    let h = start(
        fake.clone(),
        Arc::new(MemoryAuthStore::default()),
        clock.clone(),
        ManagerConfig::default(),
        NodeTable::in_memory("a"),
        d,
    );
    tokio::time::sleep(Duration::from_secs(40)).await;
    let failed = h.metrics.handshakes("connect");
    assert!(
        failed >= 11,
        "node c down for 40 s: {failed} failures counted"
    );
    let lines = logs.lines(&ours);
    assert_eq!(
        lines.len(),
        1,
        "{failed} failures toward one node in 40 s, logged:\n{}",
        lines.join("\n")
    );
    assert!(lines[0].contains("suppressed=0"), "{}", lines[0]);

    // Probes go on at most 60 s apart (the largest backoff); after the
    // interval the next failure is logged, with the count.
    tokio::time::sleep(Duration::from_secs(150)).await;
    let lines = logs.lines(&ours);
    assert!(
        (2..=3).contains(&lines.len()),
        "190 s, 60 s interval:\n{}",
        lines.join("\n")
    );
    let suppressed: u64 = lines[1]
        .split("suppressed=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no suppressed= in {}", lines[1]));
    assert!(suppressed >= 1, "{}", lines[1]);
    h.stop().await;
}

/// A store of `cap` entries that refuses a new pair when full, as the
/// kernel's hash map does (the existing entries stay).
#[derive(Debug)]
struct Bounded {
    inner: MemoryAuthStore,
    cap: usize,
}

impl AuthStore for Bounded {
    fn upsert(&self, pair: Pair, expiry: SystemTime) -> Result<(), StoreError> {
        let now = self.inner.snapshot();
        if now.len() >= self.cap && !now.contains_key(&pair) {
            return Err(StoreError::Datapath(auth_ebpf::DatapathError::MapFull {
                name: "meshauth_auth",
                max_entries: self.cap as u32,
            }));
        }
        self.inner.upsert(pair, expiry)
    }
    fn remove(&self, pair: Pair) -> Result<bool, StoreError> {
        self.inner.remove(pair)
    }
    fn entries(&self) -> Result<Vec<(Pair, SystemTime)>, StoreError> {
        self.inner.entries()
    }
}

/// A full auth map: the pairs that fit are written and kept, the one that
/// does not is counted (`entry_writes_failed{reason="full"}`) and written
/// as soon as an entry leaves — not at the end of its (here one minute)
/// backoff.
#[tokio::test(start_paused = true)]
async fn a_full_map_keeps_its_entries_and_the_waiting_pair_goes_in_once_there_is_room() {
    let clock = clock();
    let fake = Fake::new(clock.clone());
    let store = Arc::new(Bounded {
        inner: MemoryAuthStore::default(),
        cap: 3,
    });
    let config = ManagerConfig {
        backoff_initial: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        ..ManagerConfig::default()
    };
    let d = state_with_node_c(259..261);
    let h = start(
        fake.clone(),
        store.clone(),
        clock.clone(),
        config,
        NodeTable::in_memory("a"),
        d.clone(),
    );
    settle().await;
    let wanted: BTreeSet<Pair> = [
        h.pair(256, 257, "b"),
        h.pair(256, 258, "b"),
        h.pair(256, 259, "c"),
        h.pair(256, 260, "c"),
    ]
    .into();
    let written: BTreeSet<Pair> = store.inner.snapshot().keys().copied().collect();
    assert_eq!(written.len(), 3, "three fit: {written:?}");
    assert!(written.is_subset(&wanted));
    let left_out = *wanted
        .difference(&written)
        .next()
        .unwrap_or_else(|| panic!("one pair left out"));
    assert!(h.metrics.store_failures("full") >= 1);
    // Later rounds keep the three (nothing stored is lost).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        store
            .inner
            .snapshot()
            .keys()
            .copied()
            .collect::<BTreeSet<_>>(),
        written
    );

    // One written pair stops being required: its entry goes, and the pair
    // left out goes in at once.
    let gone = *written
        .iter()
        .find(|p| **p != left_out)
        .unwrap_or_else(|| panic!("a written pair"));
    let mut smaller = d.clone();
    smaller
        .rules
        .retain(|r| r.remote != Remote::Identity(gone.remote));
    let removed_at = Instant::now();
    h.desired.send_replace(Arc::new(smaller));
    settle().await;
    let now: BTreeSet<Pair> = store.inner.snapshot().keys().copied().collect();
    assert!(
        now.contains(&left_out) && !now.contains(&gone),
        "after {:?}: {now:?} (left out {left_out}, gone {gone})",
        removed_at.elapsed()
    );
    assert!(removed_at.elapsed() < Duration::from_secs(1));
    h.stop().await;
}

/// When the fake handshaker was called toward `remote`, in order.
fn call_times(fake: &Fake, remote: u32) -> Vec<Instant> {
    fake.calls()
        .iter()
        .filter(|c| c.remote == remote)
        .map(|c| c.at)
        .collect()
}
