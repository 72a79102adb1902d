//! The auth manager driving the real handshake client against a real
//! responder: pre-authentication fills both nodes' stores, and removing the
//! rule collects the initiator's entry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use auth_agent::auth::manager::{AuthManager, ManagerConfig, ManagerInputs, ManagerMetrics};
use auth_agent::auth::store::{MemoryAuthStore, Pair};
use auth_agent::handshake::{Metrics, Role};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::spire::{cluster, not_after_of, shared_port};
use super::*;

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_manager_pre_authenticates_over_the_real_handshake_and_collects() {
    let c = cluster().await;
    let port = shared_port();
    let d = desired(None, None);
    let store_b = Arc::new(MemoryAuthStore::default());
    let resp_b = Responder::start_with(
        "node-b",
        c.b.clone(),
        d.clone(),
        store_b.clone(),
        store_b.clone(),
        SocketAddr::new(B_IP, port),
        |_| {},
    )
    .await;

    // node-a's agent: the manager with the real initiator.
    let store_a = Arc::new(MemoryAuthStore::default());
    let nodes_a = node_table("node-a", &d);
    let metrics = Metrics::default();
    let client = initiator(c.a.clone(), port, metrics.clone());
    let (desired_tx, desired_rx) = watch::channel(Arc::new(d.clone()));
    let (_signals, signals_rx) = mpsc::channel(8);
    let (_rotations, rotations_rx) = mpsc::channel(8);
    let (_sweep, sweep_rx) = mpsc::channel(8);
    let manager = AuthManager::new(
        ManagerConfig::default(),
        Arc::new(client),
        store_a.clone(),
        nodes_a.clone(),
        Arc::new(svid_cache::SystemClock),
        ManagerMetrics::default(),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(manager.run(
        ManagerInputs {
            desired: desired_rx,
            signals: signals_rx,
            rotations: rotations_rx,
            sweep: sweep_rx,
        },
        shutdown.clone(),
    ));

    let y = nodes_a.id_of("node-b").expect("node-b id");
    let x = resp_b.nodes.id_of("node-a").expect("node-a id");
    let forward = Pair {
        local: L,
        remote: R,
        node: y,
    };
    let reverse = Pair {
        local: R,
        remote: L,
        node: x,
    };
    wait_until("both entries", || {
        store_a.snapshot().contains_key(&forward) && store_b.snapshot().contains_key(&reverse)
    })
    .await;
    let expected = not_after_of(&c.dev, "node-a", L).min(not_after_of(&c.dev, "node-b", R));
    assert_eq!(store_a.snapshot()[&forward], expected, "initiator's expiry");
    assert_eq!(store_b.snapshot()[&reverse], expected, "responder's expiry");
    assert_eq!(
        metrics.count(Role::Initiator, "ok"),
        1,
        "one handshake, before any packet"
    );
    assert_eq!(resp_b.metrics.count(Role::Responder, "ok"), 1);

    // The rule goes away on node-a: its entry is collected.
    let mut without = d.clone();
    without.rules.clear();
    desired_tx.send(Arc::new(without)).expect("manager alive");
    wait_until("the entry to be collected", || {
        store_a.snapshot().is_empty()
    })
    .await;

    shutdown.cancel();
    task.await.expect("manager task").expect("manager");
    resp_b.stop().await;
}
