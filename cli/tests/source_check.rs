//! The agent's side of the source check: real `meshauth agent` processes on
//! lab nodes find each local pod's cgroup by its `metadata.uid` and keep
//! the endpoints map (cgroup → the pod's addresses) in step with the pods.
//! What the datapath does with the map is tested in
//! auth-ebpf/tests/attacks_netns.rs.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use auth_ebpf::maps::endpoints::EndpointMap;
use meshauth_lab::testbed::{Testbed, TestbedOptions};

const POLICY: &str = include_str!("../../deploy/examples/payment-requires-auth.yaml");

fn opts(prefix: &str, net: u8) -> TestbedOptions {
    assert!(
        meshauth_lab::testbed::is_root(),
        "this test needs root (network namespaces, cgroups, BPF)"
    );
    TestbedOptions {
        prefix: prefix.into(),
        meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
        net,
        ..TestbedOptions::default()
    }
}

/// The pods `node`'s endpoints map holds: (cgroup, identity, addresses).
fn endpoints(tb: &Testbed, node: &str) -> Vec<(u64, u32, Vec<IpAddr>)> {
    EndpointMap::open(&tb.paths(node).pin_dir)
        .expect("endpoints map")
        .entries()
        .expect("endpoints read")
        .into_iter()
        .map(|e| (e.cgroup, e.identity, e.addresses))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_pods_own_their_addresses_by_cgroup_and_lose_them_when_gone() {
    let mut tb = Testbed::start(opts("srcchk", 58)).await.unwrap();
    let order = tb.add_pod("node-a", "order-a", "order-service").unwrap();
    let pay = tb.add_pod("node-b", "pay-b", "payment-service").unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    let order_id = tb.register("order-a").unwrap();
    tb.register("pay-b").unwrap();
    tb.start_agents().await.unwrap();

    let order_cg = std::fs::metadata(&order.cgroup).unwrap().ino();
    let want = vec![(
        order_cg,
        order_id,
        vec![IpAddr::V4(order.ipv4), IpAddr::V6(order.ipv6)],
    )];
    let got = tb
        .wait_for("node-a's endpoints map", Duration::from_secs(10), || {
            let got = endpoints(&tb, "node-a");
            let want = want.clone();
            async move { (got == want).then_some(got) }
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: node-a holds {:?}\n{}",
                endpoints(&tb, "node-a"),
                tb.log_tail("node-a", 20)
            )
        });
    assert_eq!(got.len(), 1, "only node-a's own pod, not pay-b: {got:?}");
    let pay_cg = std::fs::metadata(&pay.cgroup).unwrap().ino();
    assert!(
        endpoints(&tb, "node-b").iter().any(|e| e.0 == pay_cg),
        "node-b registers pay-b"
    );

    // The pod goes: its cgroup loses its addresses.
    tb.remove_pod("order-a").unwrap();
    tb.wait_for(
        "order-a gone from node-a's map",
        Duration::from_secs(10),
        || {
            let empty = endpoints(&tb, "node-a").is_empty();
            async move { empty.then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", endpoints(&tb, "node-a")));
}
