//! Real `meshauth agent` processes on three lab nodes with spire-dev:
//! pre-authentication, real traffic, drops counted from the datapath.

use std::net::IpAddr;
use std::time::Duration;

use auth_agent::testbed::{Testbed, TestbedOptions};

const POLICY: &str = include_str!("../../deploy/examples/payment-requires-auth.yaml");

fn opts(prefix: &str) -> TestbedOptions {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
        "this test needs root (network namespaces, cgroups, BPF)"
    );
    TestbedOptions {
        prefix: prefix.into(),
        meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
        ..TestbedOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preauthenticated_pairs_pass_their_first_packets() {
    let mut tb = Testbed::start(opts("mn1")).await.unwrap();
    tb.add_pod("node-a", "order-1", "order-service").unwrap();
    tb.add_pod("node-b", "payment-1", "payment-service")
        .unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    let order = tb.register("order-1").unwrap();
    let payment = tb.register("payment-1").unwrap();
    tb.start_agents().await.unwrap();

    let entries = tb
        .wait_for(
            "node-b holds (payment, order, node-a)",
            Duration::from_secs(10),
            || async {
                let e = tb.auth_entries("node-b").await.ok()?;
                e.iter()
                    .any(|e| {
                        e.local == payment
                            && e.remote == order
                            && e.node.as_deref() == Some("node-a")
                    })
                    .then_some(e)
            },
        )
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");

    let pay = tb.pod("payment-1").unwrap().clone();
    let ord = tb.pod("order-1").unwrap().clone();
    let mut server = tb.lab().start_pod_process(&pay).unwrap();
    server.serve(8080).unwrap();
    let mut client = tb.lab().start_pod_process(&ord).unwrap();
    for addr in [IpAddr::from(pay.ipv4), IpAddr::from(pay.ipv6)] {
        client
            .connect(addr, 8080, Duration::from_millis(500))
            .unwrap_or_else(|e| panic!("{addr}: {e}\n{}", tb.log_tail("node-b", 20)));
    }
    let s = tb.status("node-b").await.unwrap();
    assert_eq!(
        s.datapath.auth_required_drops, 0,
        "pre-authenticated: no drop"
    );
    assert!(s.datapath.policy_entries >= 1);
}
