//! The agent as a process on a lab cluster: metrics, liveness and readiness
//! on 9964; SIGTERM leaves the programs attached and the maps pinned, and the
//! restarted agent resumes; a second agent on the node is refused.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use meshauth_lab::testbed::{Testbed, TestbedOptions};

const POLICY: &str = include_str!("../../deploy/examples/payment-requires-auth.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_metrics_and_a_graceful_restart_that_loses_nothing() {
    assert!(
        meshauth_lab::testbed::is_root(),
        "this test needs root (network namespaces, cgroups, BPF)"
    );
    let mut tb = Testbed::start(TestbedOptions {
        prefix: "ag1".into(),
        nodes: vec!["node-a".into(), "node-b".into()],
        meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
        ..TestbedOptions::default()
    })
    .await
    .unwrap();
    tb.add_pod("node-a", "order-1", "order-service").unwrap();
    tb.add_pod("node-b", "payment-1", "payment-service")
        .unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    let order = tb.register("order-1").unwrap();
    let payment = tb.register("payment-1").unwrap();
    tb.start_agents().await.unwrap();
    let before = tb
        .wait_for(
            "the pair authenticated",
            Duration::from_secs(10),
            || async {
                let e = tb.auth_entries("node-b").await.ok()?;
                e.iter()
                    .any(|e| e.local == payment && e.remote == order)
                    .then_some(e)
            },
        )
        .await
        .unwrap();

    // A second agent on node-b is refused at its API socket, before it
    // touches the running agent's datapath (loading would rewrite the
    // config map and bump its generation).
    let paths = tb.paths("node-b");
    let generation = || {
        auth_ebpf::maps::config::ConfigMap::open(&paths.pin_dir)
            .expect("config map")
            .generation()
            .expect("generation")
    };
    let gen_before = generation();
    let out = Command::new(env!("CARGO_BIN_EXE_meshauth"))
        .arg("agent")
        .args(["--node-name", "node-b", "--policy-source"])
        .arg(tb.manifests())
        .arg("--bpf-pin-dir")
        .arg(&paths.pin_dir)
        .arg("--pods-cgroup")
        .arg(&tb.node("node-b").unwrap().pods_cgroup)
        .arg("--api-socket")
        .arg(&paths.api_socket)
        .arg("--state-dir")
        .arg(&paths.state_dir)
        .args([
            "--handshake-listen",
            "127.0.0.1:14250",
            "--metrics-listen",
            "127.0.0.1:19964",
        ])
        .output()
        .expect("running a second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second agent must not start: {err}"
    );
    assert!(
        err.contains("another meshauth agent"),
        "the refusal names the reason: {err}"
    );
    assert_eq!(
        generation(),
        gen_before,
        "the second agent did not reload the running agent's datapath"
    );

    let (code, body) = tb.http_get("node-b", "/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("policy synced: true"), "{body}");
    let (code, _) = tb.http_get("node-b", "/healthz").unwrap();
    assert_eq!(code, 200);
    let (code, _) = tb.http_get("node-b", "/nope").unwrap();
    assert_eq!(code, 404);

    // Traffic, then the metrics: verdicts by reason, the pair's handshake
    // on both sides (node-b initiates: the rule is payment's ingress).
    let pay = tb.pod("payment-1").unwrap().clone();
    let ord = tb.pod("order-1").unwrap().clone();
    let mut server = tb.lab().start_pod_process(&pay).unwrap();
    server.serve(8080).unwrap();
    let mut client = tb.lab().start_pod_process(&ord).unwrap();
    client
        .open("c1", IpAddr::from(pay.ipv4), 8080, Duration::from_secs(1))
        .unwrap();
    let (code, metrics) = tb.http_get("node-b", "/metrics").unwrap();
    assert_eq!(code, 200);
    for needle in [
        "meshauth_ready 1".to_string(),
        "meshauth_auth_map_entries 1".to_string(),
        format!("meshauth_svid_expiration_timestamp_seconds{{identity=\"{payment}\"}}"),
        "meshauth_spire_source_state{state=\"connected\"} 1".to_string(),
        "meshauth_handshake_handshakes_total{role=\"initiator\",result=\"ok\"} 1".to_string(),
        "meshauth_datapath_packets_total{verdict=\"forwarded\",reason=\"authenticated\",direction=\"ingress\"}".to_string(),
        "meshauth_auth_entries 1".to_string(),
        "meshauth_datapath_signals_total{outcome=\"lost\",direction=\"ingress\"} 0".to_string(),
        "# EOF".to_string(),
    ] {
        assert!(metrics.contains(&needle), "{needle} not in:\n{metrics}");
    }
    let (_, metrics_a) = tb.http_get("node-a", "/metrics").unwrap();
    assert!(
        metrics_a
            .contains("meshauth_handshake_handshakes_total{role=\"responder\",result=\"ok\"} 1"),
        "{metrics_a}"
    );

    // SIGTERM: clean exit, programs stay attached, maps stay pinned.
    let st = tb.terminate_agent("node-b", Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "exit status {st:?}\n{}",
        tb.log_tail("node-b", 20)
    );
    let paths = tb.paths("node-b");
    assert!(
        !paths.api_socket.exists(),
        "the API socket is removed on exit"
    );
    let links =
        auth_ebpf::Datapath::pinned_links(&paths.pin_dir, &tb.node("node-b").unwrap().pods_cgroup)
            .unwrap();
    assert_eq!(links, 2, "both programs stay attached");
    client
        .ping("c1", Duration::from_secs(1))
        .expect("the established flow keeps flowing with the agent stopped");
    client
        .connect(IpAddr::from(pay.ipv4), 8080, Duration::from_secs(1))
        .expect("a new connection passes on the pinned entry");

    tb.start_agent("node-b").unwrap();
    tb.wait_ready("node-b", Duration::from_secs(20))
        .await
        .unwrap();
    let after = tb.auth_entries("node-b").await.unwrap();
    assert_eq!(
        after
            .iter()
            .map(|e| (e.local, e.remote, &e.node, &e.expiry))
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|e| (e.local, e.remote, &e.node, &e.expiry))
            .collect::<Vec<_>>(),
        "the restarted agent reads the auth map back unchanged"
    );
    client.ping("c1", Duration::from_secs(1)).unwrap();
    let s = tb.status("node-b").await.unwrap();
    assert_eq!(
        s.datapath.auth_required_drops, 0,
        "nothing dropped across the restart"
    );
}

/// The value of `meshauth_handshake_handshakes_total{role=..,result="ok"}` on `node`.
fn handshakes_ok(tb: &Testbed, node: &str, role: &str) -> u64 {
    let (_, m) = tb.http_get(node, "/metrics").unwrap();
    let needle = format!("meshauth_handshake_handshakes_total{{role=\"{role}\",result=\"ok\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// The node table file is lost between two starts while node-a leaves, so
/// the new table gives node-a's old id to node-c. The entry read back for
/// (payment, order, that id) was authenticated against node-a; it must not
/// count for node-c: it is dropped at start and node-c is authenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_node_table_drops_resumed_entries_toward_reassigned_ids() {
    assert!(
        meshauth_lab::testbed::is_root(),
        "this test needs root (network namespaces, cgroups, BPF)"
    );
    let mut tb = Testbed::start(TestbedOptions {
        prefix: "ag2".into(),
        nodes: vec!["node-a".into(), "node-b".into(), "node-c".into()],
        meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
        ..TestbedOptions::default()
    })
    .await
    .unwrap();
    tb.add_pod("node-a", "order-1", "order-service").unwrap();
    tb.add_pod("node-c", "order-2", "order-service").unwrap();
    tb.add_pod("node-b", "payment-1", "payment-service")
        .unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    let order = tb.register("order-1").unwrap();
    assert_eq!(tb.register("order-2").unwrap(), order);
    let payment = tb.register("payment-1").unwrap();
    tb.start_agents().await.unwrap();
    let before = tb
        .wait_for(
            "payment authenticated toward both order nodes",
            Duration::from_secs(15),
            || async {
                let e = tb.auth_entries("node-b").await.ok()?;
                let nodes: Vec<_> = e
                    .iter()
                    .filter(|e| e.local == payment && e.remote == order)
                    .map(|e| (e.node_id, e.node.clone()))
                    .collect();
                (nodes.len() == 2).then_some(nodes)
            },
        )
        .await
        .unwrap();
    let a_id = before
        .iter()
        .find(|(_, n)| n.as_deref() == Some("node-a"))
        .map(|(id, _)| *id)
        .expect("an entry toward node-a");
    let c_handshakes = handshakes_ok(&tb, "node-c", "responder");
    assert!(
        c_handshakes >= 1,
        "node-c answered node-b before the restart"
    );

    // node-b stops; its node table is lost; node-a leaves the cluster.
    let st = tb.terminate_agent("node-b", Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "{}",
        tb.log_tail("node-b", 20)
    );
    std::fs::remove_file(tb.paths("node-b").state_dir.join("nodes.json")).unwrap();
    tb.remove_node("node-a").unwrap();

    tb.start_agent("node-b").unwrap();
    tb.wait_ready("node-b", Duration::from_secs(20))
        .await
        .unwrap();
    // node-c now holds node-a's old id (the new table numbers from 1).
    let after = tb
        .wait_for(
            "node-c authenticated afresh by the restarted node-b",
            Duration::from_secs(15),
            || async { (handshakes_ok(&tb, "node-c", "responder") > c_handshakes).then_some(()) },
        )
        .await;
    assert!(
        after.is_ok(),
        "the entry read back toward id {a_id} (node-a's) was kept for node-c: no new handshake with node-c\n{}",
        tb.log_tail("node-b", 30)
    );
    let entries = tb
        .wait_for(
            "node-b's entry toward node-c written",
            Duration::from_secs(15),
            || async {
                let e = tb.auth_entries("node-b").await.ok()?;
                e.iter()
                    .any(|e| e.local == payment && e.remote == order)
                    .then_some(e)
            },
        )
        .await
        .unwrap();
    let toward: Vec<_> = entries
        .iter()
        .filter(|e| e.local == payment && e.remote == order)
        .map(|e| (e.node_id, e.node.clone()))
        .collect();
    assert_eq!(toward.len(), 1, "{toward:?}");
    assert_eq!(toward[0].1.as_deref(), Some("node-c"), "{toward:?}");
    assert!(
        entries.iter().all(|e| e.node.is_some()),
        "no entry toward an id the table does not know: {entries:?}"
    );
    let (_, metrics) = tb.http_get("node-b", "/metrics").unwrap();
    assert!(
        metrics.contains("meshauth_node_table_write_failures_total 0"),
        "{metrics}"
    );
}
