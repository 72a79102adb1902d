//! The per-pod Delegated Identity source against spire-dev's admin socket:
//! pods are processes running as their own uid (what the `unix` attestor
//! tells apart); the source subscribes by PID, takes only each pod's own
//! identity, and lets an SVID go with the last pod of it.

use std::collections::BTreeMap;

use meshauth_tests::{Deployment, Node, Sleeper, TD, dead_pid, removed, selector_entry, summarize};
use svid_cache::{PodTarget, PodTargets, RemovalReason};

fn pid(p: &Sleeper) -> u32 {
    u32::try_from(p.pid()).unwrap_or_else(|e| panic!("{e}"))
}

fn targets(pods: &[(&str, u32, u32)]) -> Option<PodTargets> {
    Some(
        pods.iter()
            .map(|&(name, pid, identity)| (name.to_owned(), PodTarget { pid, identity }))
            .collect::<BTreeMap<_, _>>(),
    )
}

#[tokio::test]
async fn each_pod_brings_only_its_own_identity_and_takes_it_away() {
    let dep = Deployment::start(
        TD,
        &["node-a", "node-b"],
        vec![
            selector_entry("node-a", 256, &["unix:uid:20001"]),
            selector_entry("node-a", 257, &["unix:uid:20002"]),
            // A workload no pod of the policy is.
            selector_entry("node-a", 259, &["unix:uid:20003"]),
            // Same selector, other node: never served by node-a's agent.
            selector_entry("node-b", 258, &["unix:uid:20001"]),
        ],
    )
    .await;
    let frontend = Sleeper::as_uid(20001);
    let backend = Sleeper::as_uid(20002);
    let intruder = Sleeper::as_uid(20003);
    let (mut a, set) = Node::delegated_pods(&dep, "node-a");
    a.wait_connected("per-pod source connected").await;

    // Targets not known yet: nothing applied. Then the first full state
    // carries the bundle and the pod's SVID together (no empty state first).
    set.send_replace(targets(&[("default/frontend-1", pid(&frontend), 256)]));
    let first = a.events.next("first per-pod state").await;
    assert_eq!(summarize(&first), ["bundle(1)", "added 256"]);

    set.send_replace(targets(&[
        ("default/frontend-1", pid(&frontend), 256),
        ("default/backend-1", pid(&backend), 257),
    ]));
    let next = a.events.next("backend's SVID").await;
    assert_eq!(summarize(&next), ["added 257"]);

    // A pod that claims identity 257 but whose process SPIRE attests as
    // 259's (a recycled PID, or a pod running as another workload's uid),
    // and one whose identity has no entry at all, on frontend's PID: SPIRE
    // serves them 259 and 256; neither brings anything (259 never enters
    // the cache), and both are shown.
    set.send_replace(targets(&[
        ("default/frontend-1", pid(&frontend), 256),
        ("default/backend-1", pid(&backend), 257),
        ("default/impostor", pid(&intruder), 257),
        ("default/unregistered", pid(&frontend), 999),
    ]));
    let pods = a
        .wait_pods("the impostor's and the unregistered pod's answers", |p| {
            ["default/impostor", "default/unregistered"]
                .iter()
                .all(|k| p.get(*k).is_some_and(|s| s.answered))
        })
        .await;
    for (pod, served) in [("default/impostor", 259), ("default/unregistered", 256)] {
        assert!(!pods[pod].serves_identity, "{pod}: {:?}", pods[pod]);
        assert_eq!(
            pods[pod].ignored,
            [format!("spiffe://{TD}/identity/{served}")],
            "{pod}"
        );
    }
    assert!(pods["default/frontend-1"].serves_identity);
    assert_eq!(a.cache.identities(), [256, 257]);

    // A dead PID attests to nothing: answered, nothing served, no error.
    set.send_replace(targets(&[
        ("default/frontend-1", pid(&frontend), 256),
        ("default/backend-1", pid(&backend), 257),
        ("default/gone", u32::try_from(dead_pid()).unwrap_or(1), 257),
    ]));
    let pods = a
        .wait_pods("the dead PID's answer", |p| {
            p.get("default/gone").is_some_and(|s| s.answered)
        })
        .await;
    let gone = &pods["default/gone"];
    assert!(
        !gone.serves_identity && gone.ignored.is_empty() && gone.error.is_none(),
        "{gone:?}"
    );
    assert!(
        !pods.contains_key("default/impostor"),
        "dropped with its pod"
    );

    // A second pod of 256: the first leaving keeps 256; the last leaving
    // takes it away (no longer served).
    let frontend2 = Sleeper::as_uid(20001);
    set.send_replace(targets(&[
        ("default/frontend-1", pid(&frontend), 256),
        ("default/frontend-2", pid(&frontend2), 256),
        ("default/backend-1", pid(&backend), 257),
    ]));
    a.wait_pods("frontend-2 served", |p| {
        p.get("default/frontend-2")
            .is_some_and(|s| s.serves_identity)
    })
    .await;
    set.send_replace(targets(&[
        ("default/frontend-2", pid(&frontend2), 256),
        ("default/backend-1", pid(&backend), 257),
    ]));
    a.wait_pods("frontend-1 unsubscribed", |p| {
        !p.contains_key("default/frontend-1")
    })
    .await;
    set.send_replace(targets(&[("default/backend-1", pid(&backend), 257)]));
    let gone = a.events.next("256 removed").await;
    assert_eq!(
        summarize(&gone),
        [removed(256, RemovalReason::NoLongerServed)]
    );
    assert_eq!(a.cache.identities(), [257]);
    let status = a.source.status();
    assert_eq!(status.updates_rejected, 0, "{status:?}");
    assert!(status.is_connected(), "{status:?}");
}
