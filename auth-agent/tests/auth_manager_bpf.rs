//! The auth manager against the real pinned auth map (root): entries land
//! in the kernel map with the handshake's expiry, are read back by a new
//! manager after a restart, and are removed when no longer required.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use auth_agent::auth::manager::{AuthManager, ManagerConfig, ManagerInputs, ManagerMetrics};
use auth_agent::auth::store::{BpfAuthStore, Pair};
use auth_agent::auth::{AuthFailure, Authenticated, Authenticator};
use auth_agent::nodes::NodeTable;
use auth_ebpf::maps::auth::AuthMap;
use auth_ebpf::testing::TestPinDir;
use auth_ebpf::{Datapath, LoadOptions};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use policy_bridge::{DesiredState, Direction, NodeInfo};
use svid_cache::SystemClock;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Succeeds at once with a fixed expiry; records the remote identity of
/// every handshake asked for.
struct Fixed(SystemTime, Arc<Mutex<Vec<u32>>>);

impl Authenticator for Fixed {
    fn authenticate(
        &self,
        _: u32,
        remote: u32,
        node: NodeInfo,
    ) -> BoxFuture<'static, Result<Authenticated, AuthFailure>> {
        self.1.lock().unwrap().push(remote);
        let expiry = self.0;
        async move {
            Ok(Authenticated {
                expiry,
                peer_node: node.name,
                peer_wireguard_key: None,
            })
        }
        .boxed()
    }
}

fn state(with_rule: bool) -> DesiredState {
    let mut d = common::state_of(
        &[("a", "10.9.0.1"), ("b", "10.9.0.2")],
        &[
            ("10.9.1.1", 256, "a"),
            ("10.9.2.1", 257, "b"),
            ("10.9.2.2", 258, "b"),
        ],
    );
    if with_rule {
        d.rules
            .insert(common::rule(256, 257, Direction::Ingress, 8080));
    }
    d
}

struct Running {
    desired: watch::Sender<Arc<DesiredState>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _inputs: (
        mpsc::Sender<Pair>,
        mpsc::Sender<auth_agent::auth::rotation::SvidChange>,
        mpsc::Sender<()>,
    ),
    /// Remote identities of the handshakes the manager asked for.
    calls: Arc<Mutex<Vec<u32>>>,
}

fn run(pins: &TestPinDir, nodes: NodeTable, expiry: SystemTime, d: DesiredState) -> Running {
    let store = Arc::new(BpfAuthStore::open(pins.path()).expect("open auth map"));
    let (desired, desired_rx) = watch::channel(Arc::new(d));
    let (s_tx, s_rx) = mpsc::channel(8);
    let (r_tx, r_rx) = mpsc::channel(8);
    let (w_tx, w_rx) = mpsc::channel(8);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mgr = AuthManager::new(
        ManagerConfig::default(),
        Arc::new(Fixed(expiry, calls.clone())),
        store,
        nodes,
        Arc::new(SystemClock),
        ManagerMetrics::default(),
    );
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        mgr.run(
            ManagerInputs {
                desired: desired_rx,
                signals: s_rx,
                rotations: r_rx,
                sweep: w_rx,
            },
            token,
        )
        .await
        .expect("manager");
    });
    Running {
        desired,
        shutdown,
        task,
        _inputs: (s_tx, r_tx, w_tx),
        calls,
    }
}

async fn wait_for(
    pins: &TestPinDir,
    what: &str,
    pred: impl Fn(&[(auth_ebpf::types::AuthKey, SystemTime)]) -> bool,
) {
    // Polls the map (the condition itself); the deadline only bounds a hang.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let entries = AuthMap::open(pins.path()).unwrap().entries().unwrap();
        if pred(&entries) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "timed out waiting for {what}: {:?}",
        AuthMap::open(pins.path()).unwrap().entries()
    );
}

#[tokio::test]
async fn manager_writes_resumes_and_collects_on_the_pinned_map() {
    let pins = TestPinDir::new("manager");
    let _dp = Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ..LoadOptions::default()
    })
    .expect("load datapath");
    let dir = tempfile::tempdir().unwrap();
    let nodes_file = dir.path().join("nodes.json");
    let expiry = SystemTime::now() + Duration::from_secs(3600);

    let m = run(
        &pins,
        NodeTable::open(&nodes_file, "a").unwrap(),
        expiry,
        state(true),
    );
    wait_for(&pins, "the pre-authenticated pair", |e| e.len() == 1).await;
    let (k, t) = AuthMap::open(pins.path()).unwrap().entries().unwrap()[0];
    assert_eq!(
        (k.local_id, k.remote_id, k.remote_node_id, k.auth_type),
        (256, 257, 1, 1)
    );
    let d = t.duration_since(expiry).unwrap_or_else(|e| e.duration());
    assert!(
        d < Duration::from_millis(5),
        "expiry as the handshake said: {d:?}"
    );
    m.shutdown.cancel();
    m.task.await.unwrap();

    // A new manager (agent restart) reads the map back: the entry stays, no
    // new handshake is needed (its expiry is unchanged).
    let later = expiry + Duration::from_secs(600);
    let m = run(
        &pins,
        NodeTable::open(&nodes_file, "a").unwrap(),
        later,
        state(true),
    );
    // Positive marker: a second pair is required; once its entry is in the
    // map the manager has reconciled the state that also held the first
    // pair, so had it wanted to redo that one it would have asked by now.
    let mut both = state(true);
    both.rules
        .insert(common::rule(256, 258, Direction::Ingress, 8080));
    m.desired.send(Arc::new(both)).unwrap();
    wait_for(&pins, "the second pair", |e| e.len() == 2).await;
    assert_eq!(
        *m.calls.lock().unwrap(),
        vec![258],
        "only the new pair was authenticated; the read-back one resumed"
    );
    let entries = AuthMap::open(pins.path()).unwrap().entries().unwrap();
    let first = entries
        .iter()
        .find(|(k, _)| k.remote_id == 257)
        .expect("the read-back entry");
    let d = first
        .1
        .duration_since(expiry)
        .unwrap_or_else(|e| e.duration());
    assert!(d < Duration::from_millis(5), "resumed, not re-done: {d:?}");

    // The rule goes: the entry is collected from the kernel map.
    m.desired.send(Arc::new(state(false))).unwrap();
    wait_for(&pins, "the entries to be collected", |e| e.is_empty()).await;
    m.shutdown.cancel();
    m.task.await.unwrap();
}
