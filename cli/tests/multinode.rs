//! Real `meshauth agent` processes on three lab nodes, each scenario once
//! with spire-dev and once with real SPIRE (SPIRE 1.13.3's server and one
//! agent per node, entries per identity × node):
//! pre-authentication, real traffic (TCP and UDP, IPv4 and IPv6, same node
//! and cross node), drops counted from the datapath, policy changes, a node
//! leaving, and an agent killed under traffic.
//!
//! Each test has its own lab prefix and network number; the testbed's Drop
//! removes everything, also when an assertion fails.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use auth_agent::api::types::{AgentStatus, AuthEntry, FlowRecord};
use meshauth_lab::testbed::{SvidMode, Testbed, TestbedOptions};
use meshauth_lab::{PodInfo, PodProcess};

const POLICY: &str = include_str!("../../deploy/examples/payment-requires-auth.yaml");

/// payment-service accepts order-service and refund-service on TCP 8080 and
/// UDP 5353 only after mutual authentication (ingress rule, enforced on
/// payment's node); order-service must authenticate before it sends there
/// (egress rule, enforced on order's node). inventory-service is in no rule.
const TWO_WAY_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: payment-ingress
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: payment-service
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: order-service
        - matchLabels:
            app: refund-service
      authentication:
        mode: required
      toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
            - port: "5353"
              protocol: UDP
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: order-egress
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: order-service
  egress:
    - toEndpoints:
        - matchLabels:
            app: payment-service
      authentication:
        mode: required
      toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
            - port: "5353"
              protocol: UDP
"#;

const ORDER: &str = "order-service";
const PAYMENT: &str = "payment-service";

/// The testbed for one run of a scenario: spire-dev, or real SPIRE
/// (`spire-server` and one `spire-agent` per node, from the binaries
/// scripts/build-spire makes; the test fails, never skips, without them).
fn opts(prefix: &str, net: u8, real_spire: bool) -> TestbedOptions {
    opts_with(prefix, net, real_spire, SvidMode::WorkloadApi)
}

/// [`opts`] with the agents' SVID mode.
fn opts_with(prefix: &str, net: u8, real_spire: bool, svid_mode: SvidMode) -> TestbedOptions {
    assert!(
        meshauth_lab::testbed::is_root(),
        "this test needs root (network namespaces, cgroups, BPF)"
    );
    TestbedOptions {
        prefix: prefix.into(),
        meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
        net,
        spire_bin: real_spire
            .then(|| meshauth_lab::spire_real::spire_bin(None).unwrap_or_else(|e| panic!("{e}"))),
        svid_mode,
        ..TestbedOptions::default()
    }
}

/// Every scenario runs three times, each in its own lab:
/// `<scenario>::spire_dev`, `<scenario>::real_spire` (SPIRE 1.13, the
/// reference) and `<scenario>::real_spire_delegated_pods` (SPIRE 1.13, the
/// agents subscribing per pod by PID on the Delegated Identity API, each
/// app's pods running as their own uid).
macro_rules! both {
    ($scenario:ident, $prefix:literal, $real_prefix:literal, $net:literal) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn spire_dev() {
                super::$scenario(super::opts($prefix, $net, false)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn real_spire() {
                super::$scenario(super::opts($real_prefix, $net + 100, true)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn real_spire_delegated_pods() {
                super::$scenario(super::opts_with(
                    concat!($real_prefix, "d"),
                    $net + 150,
                    true,
                    super::SvidMode::DelegatedPods,
                ))
                .await;
            }
        }
    };
}

both!(
    preauthenticated_pairs_pass_their_first_packets,
    "mn1",
    "mn1rs",
    51
);
both!(
    steady_state_every_first_packet_passes_and_unissued_identity_is_dropped,
    "mnsteady",
    "mnsters",
    52
);
both!(
    a_new_pod_that_connects_at_once_gets_through,
    "mnnewpod",
    "mnnewrs",
    53
);
both!(
    strict_mode_holds_an_unknown_pod_until_it_is_known_and_authenticated,
    "mnstrict",
    "mnstrrs",
    57
);
both!(policy_removed_and_restored, "mnpolicy", "mnpolrs", 54);
both!(a_removed_node_is_forgotten, "mnnode", "mnnodrs", 55);
both!(an_agent_killed_under_traffic, "mnkill", "mnkilrs", 56);

/// order-a on node-a and pay-b on node-b under [`TWO_WAY_POLICY`], agents
/// running, the pair authenticated on both ends; returns the testbed, the
/// two identities and node-b's entries.
async fn order_and_payment(o: TestbedOptions) -> (Testbed, u32, u32, Vec<AuthEntry>) {
    let mut tb = Testbed::start(o).await.unwrap();
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    tb.write("policy.yaml", TWO_WAY_POLICY).unwrap();
    let order = tb.register("order-a").unwrap();
    let payment = tb.register("pay-b").unwrap();
    tb.start_agents().await.unwrap();
    wait_entries(&tb, "node-a", &[(order, payment, "node-b")]).await;
    let b = wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    (tb, order, payment, b)
}

/// Polls stream `id` "s" of `c` until `done` holds (10 s at most).
fn stream_until(
    c: &mut meshauth_lab::PodProcess,
    what: &str,
    mut done: impl FnMut(&meshauth_lab::StreamStats) -> bool,
) -> meshauth_lab::StreamStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.stream_stats("s").unwrap();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: not within 10 s: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `node`'s agent log since its latest start (from its last "auth map read
/// back" line).
fn restarted_log(tb: &Testbed, node: &str) -> String {
    let text = std::fs::read_to_string(tb.paths(node).log).unwrap_or_default();
    let start = text.rfind("auth map read back").unwrap_or(0);
    text[start..].to_string()
}

/// The last log lines of every agent, for panic messages.
fn logs(tb: &Testbed) -> String {
    let mut out = String::new();
    for n in tb.lab().nodes() {
        out.push_str(&format!(
            "\n--- agent {} ---\n{}",
            n.name,
            tb.log_tail(&n.name, 15)
        ));
    }
    out
}

/// An expected auth entry: (local identity, remote identity, remote node).
type Want = (u32, u32, &'static str);

fn key(e: &AuthEntry) -> (u32, u32, String) {
    (e.local, e.remote, e.node.clone().unwrap_or_default())
}

/// Waits until `node`'s auth map holds exactly `want`.
async fn wait_entries(tb: &Testbed, node: &str, want: &[Want]) -> Vec<AuthEntry> {
    let want: BTreeSet<(u32, u32, String)> = want
        .iter()
        .map(|(l, r, n)| (*l, *r, (*n).to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let last = match tb.auth_entries(node).await {
            Ok(e) => {
                let keys: BTreeSet<_> = e.iter().map(key).collect();
                if keys == want {
                    return e;
                }
                Ok(e)
            }
            Err(e) => Err(e.to_string()),
        };
        if Instant::now() > deadline {
            panic!(
                "{node} does not hold exactly {want:?} within 15 s; last seen {last:?}{}",
                logs(tb)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn drops(tb: &Testbed, node: &str) -> u64 {
    tb.status(node)
        .await
        .unwrap_or_else(|e| panic!("status of {node}: {e}{}", logs(tb)))
        .datapath
        .auth_required_drops
}

async fn assert_no_drops(tb: &Testbed, what: &str) {
    for n in tb.lab().nodes() {
        let d = drops(tb, &n.name).await;
        assert_eq!(d, 0, "{what}: {} dropped {d} packets{}", n.name, logs(tb));
    }
}

const T: Duration = Duration::from_millis(1000);

/// First TCP connection and first UDP request to `server`, over IPv4 and
/// IPv6; each must succeed.
fn all_first_packets(tb: &Testbed, client: &mut PodProcess, server: &PodInfo) {
    for addr in [IpAddr::from(server.ipv4), IpAddr::from(server.ipv6)] {
        client.connect(addr, 8080, T).unwrap_or_else(|e| {
            panic!(
                "{} -> {} TCP {addr}:8080: {e}{}",
                client.pod(),
                server.name,
                logs(tb)
            )
        });
        client.udp(addr, 5353, T).unwrap_or_else(|e| {
            panic!(
                "{} -> {} UDP {addr}:5353: {e}{}",
                client.pod(),
                server.name,
                logs(tb)
            )
        });
    }
}

fn serve(tb: &Testbed, pod: &str) -> (PodInfo, PodProcess) {
    let info = tb.pod(pod).unwrap().clone();
    let mut p = tb.lab().start_pod_process(&info).unwrap();
    p.serve(8080).unwrap();
    p.serve(5353).unwrap();
    (info, p)
}

fn client(tb: &Testbed, pod: &str) -> PodProcess {
    let info = tb.pod(pod).unwrap().clone();
    tb.lab().start_pod_process(&info).unwrap()
}

async fn preauthenticated_pairs_pass_their_first_packets(o: TestbedOptions) {
    let mut tb = Testbed::start(o).await.unwrap();
    tb.add_pod("node-a", "order-1", ORDER).unwrap();
    tb.add_pod("node-b", "payment-1", PAYMENT).unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    let order = tb.register("order-1").unwrap();
    let payment = tb.register("payment-1").unwrap();
    tb.start_agents().await.unwrap();

    wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;

    let pay = tb.pod("payment-1").unwrap().clone();
    let ord = tb.pod("order-1").unwrap().clone();
    let mut server = tb.lab().start_pod_process(&pay).unwrap();
    server.serve(8080).unwrap();
    let mut client = tb.lab().start_pod_process(&ord).unwrap();
    for addr in [IpAddr::from(pay.ipv4), IpAddr::from(pay.ipv6)] {
        client
            .connect(addr, 8080, Duration::from_millis(500))
            .unwrap_or_else(|e| panic!("{addr}: {e}{}", logs(&tb)));
    }
    let s = tb.status("node-b").await.unwrap();
    assert_eq!(
        s.datapath.auth_required_drops, 0,
        "pre-authenticated: no drop"
    );
    assert!(s.datapath.policy_entries >= 1);
}

/// Three nodes, two directions of rules, TCP and UDP over both families,
/// same node and cross node: every first packet passes once the expected
/// entries are in place; a pair no rule covers passes; a covered pair whose
/// identity SPIRE never issued is dropped, counted and reported as a flow.
async fn steady_state_every_first_packet_passes_and_unissued_identity_is_dropped(
    o: TestbedOptions,
) {
    let mut tb = Testbed::start(o).await.unwrap();
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-a", "refund-a", "refund-service").unwrap();
    tb.add_pod("node-a", "inv-a", "inventory-service").unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    tb.add_pod("node-c", "order-c", ORDER).unwrap();
    tb.add_pod("node-c", "pay-c", PAYMENT).unwrap();
    tb.write("policy.yaml", TWO_WAY_POLICY).unwrap();
    let order = tb.register("order-a").unwrap();
    assert_eq!(tb.register("order-c").unwrap(), order);
    let payment = tb.register("pay-b").unwrap();
    assert_eq!(tb.register("pay-c").unwrap(), payment);
    tb.register("inv-a").unwrap();
    // refund-service: covered by the policy, never registered with SPIRE.
    let refund = tb.identity_of("refund-a").unwrap();
    tb.start_agents().await.unwrap();

    wait_entries(
        &tb,
        "node-a",
        &[(order, payment, "node-b"), (order, payment, "node-c")],
    )
    .await;
    wait_entries(
        &tb,
        "node-b",
        &[(payment, order, "node-a"), (payment, order, "node-c")],
    )
    .await;
    wait_entries(
        &tb,
        "node-c",
        &[
            (order, payment, "node-b"),
            (order, payment, "node-c"),
            (payment, order, "node-a"),
            (payment, order, "node-c"),
        ],
    )
    .await;
    for n in ["node-a", "node-b", "node-c"] {
        let s = tb.status(n).await.unwrap();
        assert!(s.datapath.policy_entries >= 1, "{n}: {:?}", s.datapath);
    }

    let (pay_b, _sb) = serve(&tb, "pay-b");
    let (pay_c, _sc) = serve(&tb, "pay-c");
    let (inv_a, _si) = serve(&tb, "inv-a");
    let mut order_a = client(&tb, "order-a");
    let mut order_c = client(&tb, "order-c");
    // Cross node a→b, a→c, c→b; same node c→c.
    all_first_packets(&tb, &mut order_a, &pay_b);
    all_first_packets(&tb, &mut order_a, &pay_c);
    all_first_packets(&tb, &mut order_c, &pay_b);
    all_first_packets(&tb, &mut order_c, &pay_c);
    assert_no_drops(&tb, "pre-authenticated pairs").await;

    // Not covered by any rule: inventory → payment (payment's rule names
    // order and refund only) and order → inventory (order's rule names
    // payment only). No authentication needed.
    let mut inv = client(&tb, "inv-a");
    all_first_packets(&tb, &mut inv, &pay_b);
    all_first_packets(&tb, &mut order_a, &inv_a);
    assert_no_drops(&tb, "pairs no rule covers").await;

    // Covered, but SPIRE has no entry for refund-service: node-b can never
    // authenticate (payment, refund, node-a), so the SYN is dropped.
    let mut refund_c = client(&tb, "refund-a");
    let err = refund_c
        .connect(pay_b.ipv4.into(), 8080, Duration::from_millis(300))
        .expect_err("refund-service has no SVID: its connection must be dropped");
    println!("refund-a -> pay-b without an SVID: {err}");
    let d = drops(&tb, "node-b").await;
    assert!(d > 0, "node-b counted no drop{}", logs(&tb));
    for n in ["node-a", "node-c"] {
        assert_eq!(drops(&tb, n).await, 0, "{n} is not on that path");
    }
    let api = tb.api("node-b");
    let flow = tb
        .wait_for(
            "a DROPPED refund → payment flow on node-b",
            Duration::from_secs(5),
            || {
                let api = api.clone();
                async move {
                    let mut found = None;
                    api.stream_lines("/v1/flows?verdict=DROPPED&last=4096", |l| {
                        if let Ok(r) = serde_json::from_str::<FlowRecord>(l)
                            && r.flow.source.identity == refund
                            && r.flow.destination.identity == payment
                        {
                            found = Some(r);
                        }
                        true
                    })
                    .await
                    .ok()?;
                    found
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
    let f = &flow.flow;
    assert_eq!(f.verdict, "DROPPED");
    assert_eq!(f.drop_reason_desc, "AUTH_REQUIRED", "{f:?}");
    assert_eq!(f.drop_reason, 189, "{f:?}");
    assert_eq!(f.node_name, "node-b");
    assert_eq!(f.traffic_direction, "INGRESS", "{f:?}");
    assert_eq!(
        (f.event_type.kind, f.event_type.sub_type),
        (1, 189),
        "{f:?}"
    );
    assert_eq!(f.ip.destination, pay_b.ipv4.to_string(), "{f:?}");
    assert_eq!(f.l4.tcp.map(|p| p.destination_port), Some(8080), "{f:?}");
    assert_eq!(f.source.pod_name, "refund-a", "{f:?}");
    // The other pairs still pass, and still without a drop.
    all_first_packets(&tb, &mut order_a, &pay_b);
    assert_eq!(drops(&tb, "node-b").await, d, "only refund's packets drop");
}

/// A pod of an existing app starts on a node that never ran that app and
/// connects at once, retrying like an impatient client: it gets through
/// within seconds, nothing restarted.
async fn a_new_pod_that_connects_at_once_gets_through(o: TestbedOptions) {
    let (mut tb, order, payment, _) = order_and_payment(o).await;
    let (pay_b, _server) = serve(&tb, "pay-b");

    // order-service has never run on node-c.
    tb.add_pod("node-c", "order-c", ORDER).unwrap();
    assert_eq!(tb.register("order-c").unwrap(), order);
    let mut c = client(&tb, "order-c");
    let started = Instant::now();
    let r = c
        .connect_retry(pay_b.ipv4.into(), 8080, Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!(
                "order-c never reached pay-b (after {:?}): {e}{}",
                started.elapsed(),
                logs(&tb)
            )
        });
    let drops_b = drops(&tb, "node-b").await;
    let drops_c = drops(&tb, "node-c").await;
    println!(
        "new pod order-c -> pay-b: {} failed attempts, first success after {:?}; \
         auth-required drops: node-b {drops_b}, node-c {drops_c}",
        r.failed_attempts, r.time_to_success
    );
    // Now both ends hold the pair, and a fresh connection passes at once.
    wait_entries(
        &tb,
        "node-b",
        &[(payment, order, "node-a"), (payment, order, "node-c")],
    )
    .await;
    wait_entries(&tb, "node-c", &[(order, payment, "node-b")]).await;
    let before = (drops(&tb, "node-b").await, drops(&tb, "node-c").await);
    all_first_packets(&tb, &mut c, &pay_b);
    let after = (drops(&tb, "node-b").await, drops(&tb, "node-c").await);
    assert_eq!(before, after, "authenticated: no more drops");
    assert_eq!(drops(&tb, "node-a").await, 0);
}

/// Strict mode (`--unknown-pods drop`): a pod whose address the agents do
/// not know yet gets nothing through (133 "Policy denied", seen in observe)
/// (the default mode lets it pass unenforced: BENCHMARKS.md); once published
/// and registered it authenticates and connects.
async fn strict_mode_holds_an_unknown_pod_until_it_is_known_and_authenticated(
    mut o: TestbedOptions,
) {
    o.nodes = vec!["node-a".into(), "node-b".into()];
    o.agent_args = vec!["--unknown-pods".into(), "drop".into()];
    let (mut tb, order, payment, _) = order_and_payment(o).await;
    let (pay_b, _server) = serve(&tb, "pay-b");
    let mut known = client(&tb, "order-a");
    all_first_packets(&tb, &mut known, &pay_b);

    // A pod in the lab that no manifest names yet.
    tb.add_lab_pod("node-a", "order-new").unwrap();
    let mut c = client(&tb, "order-new");
    let r = c.connect(pay_b.ipv4.into(), 8080, Duration::from_millis(300));
    assert!(
        r.is_err(),
        "an unknown pod must not get through in strict mode"
    );
    let mut flows = Vec::new();
    tb.api("node-a")
        .stream_lines("/v1/flows?verdict=DROPPED&last=50", |l| {
            flows.push(serde_json::from_str::<FlowRecord>(l).unwrap());
            true
        })
        .await
        .unwrap();
    let new_ip = tb.pod("order-new").unwrap().ipv4.to_string();
    assert!(
        flows.iter().any(|f| f.flow.drop_reason == 133
            && f.flow.ip.source == new_ip
            && f.flow.drop_reason_desc == "POLICY_DENIED"),
        "{flows:?}"
    );

    // Published and registered: known, authenticated, through.
    tb.publish_pod("order-new", ORDER).unwrap();
    assert_eq!(tb.register("order-new").unwrap(), order);
    let r = c
        .connect_retry(pay_b.ipv4.into(), 8080, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("order-new never got through: {e}{}", logs(&tb)));
    println!(
        "strict: order-new -> pay-b after publication: {} failed attempts, {:?}",
        r.failed_attempts, r.time_to_success
    );
    let entries = tb.auth_entries("node-a").await.unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.local == order && e.remote == payment),
        "it got through because the pair is authenticated: {entries:?}"
    );
}

/// Removing the policy collects the pair's entries on both nodes and the
/// traffic passes without a rule; restoring it authenticates the pair again
/// before traffic needs it.
async fn policy_removed_and_restored(o: TestbedOptions) {
    let (tb, order, payment, _) = order_and_payment(o).await;
    let (pay_b, _server) = serve(&tb, "pay-b");
    let mut c = client(&tb, "order-a");
    all_first_packets(&tb, &mut c, &pay_b);
    assert_no_drops(&tb, "with the policy").await;

    tb.unlink("policy.yaml").unwrap();
    wait_entries(&tb, "node-a", &[]).await;
    wait_entries(&tb, "node-b", &[]).await;
    for n in ["node-a", "node-b"] {
        let s = tb.status(n).await.unwrap();
        assert_eq!(s.policy.rules, 0, "{n}: {:?}", s.policy);
    }
    all_first_packets(&tb, &mut c, &pay_b);
    assert_no_drops(&tb, "without a policy").await;

    let hs_a = tb.status("node-a").await.unwrap().handshakes;
    let hs_b = tb.status("node-b").await.unwrap().handshakes;
    tb.write("policy.yaml", TWO_WAY_POLICY).unwrap();
    let a = wait_entries(&tb, "node-a", &[(order, payment, "node-b")]).await;
    let b = wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    assert!(a[0].remaining_seconds > 0 && b[0].remaining_seconds > 0);
    // Each node also initiates its own pair: a fresh handshake on both. (The
    // responder's write may come first; a node that found the other's
    // handshake port closed at start retries after its node backoff.)
    for (n, before) in [("node-a", hs_a), ("node-b", hs_b)] {
        tb.wait_for(
            &format!("{n} initiates a fresh handshake"),
            Duration::from_secs(5),
            || async {
                let now = tb.status(n).await.ok()?.handshakes;
                (now.initiated_ok > before.initiated_ok).then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {before:?}{}", logs(&tb)));
    }
    all_first_packets(&tb, &mut c, &pay_b);
    assert_no_drops(&tb, "policy restored, re-authenticated").await;
}

/// A node leaves: the others collect the entries of pairs on it, forget it
/// as a peer, and drop its pods' addresses from the ipcache; what remains
/// keeps working.
async fn a_removed_node_is_forgotten(o: TestbedOptions) {
    let mut tb = Testbed::start(o).await.unwrap();
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    tb.add_pod("node-c", "order-c", ORDER).unwrap();
    tb.add_pod("node-c", "pay-c", PAYMENT).unwrap();
    tb.write("policy.yaml", TWO_WAY_POLICY).unwrap();
    let order = tb.register("order-a").unwrap();
    let payment = tb.register("pay-b").unwrap();
    tb.register("order-c").unwrap();
    tb.register("pay-c").unwrap();
    tb.start_agents().await.unwrap();
    wait_entries(
        &tb,
        "node-a",
        &[(order, payment, "node-b"), (order, payment, "node-c")],
    )
    .await;
    wait_entries(
        &tb,
        "node-b",
        &[(payment, order, "node-a"), (payment, order, "node-c")],
    )
    .await;
    let mut before = Vec::new();
    for n in ["node-a", "node-b"] {
        let s = tb.status(n).await.unwrap();
        assert!(
            s.peers.iter().any(|p| p.node == "node-c" && p.pairs == 1),
            "{n}: {:?}",
            s.peers
        );
        before.push(s.datapath.ipcache_entries);
    }

    tb.remove_node("node-c").unwrap();
    wait_entries(&tb, "node-a", &[(order, payment, "node-b")]).await;
    wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    for (n, before) in ["node-a", "node-b"].into_iter().zip(before) {
        let s = tb
            .wait_for(
                &format!("{n} forgets node-c"),
                Duration::from_secs(5),
                || async {
                    let s = tb.status(n).await.ok()?;
                    (!s.peers.iter().any(|p| p.node == "node-c")).then_some(s)
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
        let peers: Vec<&str> = s.peers.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(peers.len(), 1, "{n}: {peers:?}");
        // Four pods and three nodes with an IPv4 and an IPv6 address each;
        // node-c and its two pods left.
        assert_eq!(before, 14, "{n}");
        assert_eq!(s.datapath.ipcache_entries, 8, "{n}: ipcache {before} → 8");
    }
    let (pay_b, _server) = serve(&tb, "pay-b");
    let mut c = client(&tb, "order-a");
    all_first_packets(&tb, &mut c, &pay_b);
    assert_no_drops(&tb, "after node-c left").await;
}

/// `kill -9` of payment's agent under traffic: the established flow keeps
/// flowing and new connections pass (programs stay attached, maps pinned);
/// the restarted agent reads the auth map back and keeps the entries as
/// they were, without a new handshake.
async fn an_agent_killed_under_traffic(o: TestbedOptions) {
    let (mut tb, order, payment, before) = order_and_payment(o).await;
    let (pay_b, _server) = serve(&tb, "pay-b");
    let mut c = client(&tb, "order-a");
    c.stream(
        "s",
        pay_b.ipv4.into(),
        8080,
        Duration::from_millis(20),
        Duration::from_millis(500),
    )
    .unwrap();
    let s0 = stream_until(&mut c, "the stream started", |s| s.ok > 0);
    assert_eq!(s0.failed, 0, "{s0:?}");

    tb.kill_agent("node-b");
    assert!(!tb.agent_running("node-b"));
    // 50 more round trips while the agent is dead (about a second at 20 ms),
    // counted by the stream, not assumed from a sleep.
    let s1 = stream_until(&mut c, "the stream kept going", |s| {
        s.ok >= s0.ok + 50 || s.failed > 0
    });
    println!("stream while node-b's agent is dead: {s0:?} → {s1:?}");
    assert_eq!(s1.failed, 0, "{s1:?}{}", logs(&tb));
    // A new connection needs the pinned auth entry on node-b.
    all_first_packets(&tb, &mut c, &pay_b);

    tb.start_agent("node-b").unwrap();
    let st = tb
        .wait_ready("node-b", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(st.datapath.links, 2, "re-attached once: {:?}", st.datapath);
    let after = wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    assert_eq!(
        after[0].expiry, before[0].expiry,
        "the entry read back as it was"
    );
    assert_eq!(after[0].node_id, before[0].node_id);
    // A fresh entry is not authenticated again: re-authentication is due at
    // 2/3 of its lifetime (an hour). Positive marker first: order-service
    // starts on node-c, which node-b must pre-authenticate; once that entry
    // is there, node-b's manager has reconciled a state that also required
    // the read-back pair, so a handshake for it would have been logged.
    tb.add_pod("node-c", "order-c", ORDER).unwrap();
    assert_eq!(tb.register("order-c").unwrap(), order);
    wait_entries(
        &tb,
        "node-b",
        &[(payment, order, "node-a"), (payment, order, "node-c")],
    )
    .await;
    // Neither an "authenticated" (which names the peer node) nor a "handshake
    // failed" (which names the pair, node id included) for the node-a pair.
    let since_restart = restarted_log(&tb, "node-b");
    let node_a = format!("node {})", before[0].node_id);
    assert!(
        since_restart.starts_with("auth map read back"),
        "the restarted agent's log: {since_restart}"
    );
    assert!(
        !since_restart
            .lines()
            .any(|l| (l.contains("authenticated") && l.contains("node-a"))
                || (l.contains("handshake failed") && l.contains(&node_a))),
        "the read-back pair was not authenticated again:\n{since_restart}"
    );
    assert_eq!(st.handshakes.initiated_ok, 0, "{:?}", st.handshakes);
    assert_eq!(
        tb.auth_entries("node-b").await.unwrap()[0].expiry,
        before[0].expiry
    );
    // Drops are counted by the pinned datapath since it was loaded.
    assert_no_drops(&tb, "across the kill and restart").await;
    all_first_packets(&tb, &mut c, &pay_b);
    let s2 = c.stream_stop("s").unwrap();
    println!("stream after the restart: {s2:?}");
    assert_eq!(s2.failed, 0, "{s2:?}{}", logs(&tb));
    assert!(s2.ok > s1.ok, "{s1:?} → {s2:?}");
    assert_no_drops(&tb, "after the restart").await;
}

// ---------------------------------------------------------------------------
// Chaos on real SPIRE: timelines with short TTLs (SVIDs of 10 s).

/// SPIRE's CLI and health probes block; off the runtime's threads.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// order-a → pay-b (payment's ingress requires authentication; node-b
/// enforces), on real SPIRE with 10 s SVIDs, both nodes' agents up and
/// node-b holding the pair. The testbed, payment's pod, a client in
/// order-a and payment's server process.
async fn chaos_pair(
    prefix: &str,
    net: u8,
    ca_ttl: Option<Duration>,
) -> (Testbed, PodInfo, PodProcess, PodProcess) {
    let mut o = opts(prefix, net, true);
    o.nodes = vec!["node-a".into(), "node-b".into()];
    o.svid_ttl = Duration::from_secs(10);
    o.spire_ca_ttl = ca_ttl;
    let mut tb = Testbed::start(o).await.unwrap();
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    let order = blocking(|| tb.register("order-a")).unwrap();
    let payment = blocking(|| tb.register("pay-b")).unwrap();
    tb.start_agents().await.unwrap();
    wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    let (pay, server) = serve(&tb, "pay-b");
    let c = client(&tb, "order-a");
    (tb, pay, c, server)
}

fn parse_time(s: &str) -> SystemTime {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("RFC 3339 time {s:?}: {e}"));
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(t.unix_timestamp_nanos()).unwrap())
}

/// The earliest NotAfter of the SVIDs `node`'s agent holds.
async fn svid_not_after(tb: &Testbed, node: &str) -> Option<SystemTime> {
    let s = tb.status(node).await.ok()?;
    s.spire.next_expiry.as_deref().map(parse_time)
}

/// Expiry of node-b's entry for the pair.
async fn pair_expiry(tb: &Testbed) -> Option<SystemTime> {
    let e = tb.auth_entries("node-b").await.ok()?;
    e.iter()
        .filter(|e| e.node.as_deref() == Some("node-a"))
        .map(|e| parse_time(&e.expiry))
        .min()
}

fn secs(t: SystemTime, since: SystemTime) -> f64 {
    match t.duration_since(since) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Polls new connections every 100 ms until one succeeds; how long it took.
fn until_connects(c: &mut PodProcess, to: IpAddr, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if c.connect(to, 8080, Duration::from_millis(300)).is_ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The SPIRE server SIGKILLed for less than the SVIDs' lifetime and started
/// again: an established stream and the datapath see nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_short_server_outage_drops_nothing() {
    let (mut tb, pay, mut c, _server) = chaos_pair("chshort", 161, None).await;
    c.stream(
        "s",
        pay.ipv4.into(),
        8080,
        Duration::from_millis(20),
        Duration::from_millis(500),
    )
    .unwrap();
    let s0 = stream_until(&mut c, "the stream started", |s| s.ok > 0);
    let before = svid_not_after(&tb, "node-b").await.unwrap();
    tb.spire_mut().set_outage(true).unwrap();
    // 3 s of round trips (150 at 20 ms), counted, while the server is dead:
    // less than the 5 s an SVID has left at least (SPIRE rotates at half).
    let s1 = stream_until(&mut c, "the stream during the outage", |s| {
        s.ok >= s0.ok + 150 || s.failed > 0
    });
    blocking(|| tb.spire_mut().set_outage(false)).unwrap();
    // Until node-b holds an SVID issued after the server came back.
    tb.wait_for("a fresh SVID on node-b", Duration::from_secs(20), || {
        let tb = &tb;
        async move { svid_not_after(tb, "node-b").await.filter(|t| *t > before) }
    })
    .await
    .unwrap();
    let s2 = c.stream_stop("s").unwrap();
    println!("short outage: {s0:?} → {s1:?} → {s2:?}");
    assert_eq!(s2.failed, 0, "{s2:?}{}", logs(&tb));
    assert_no_drops(&tb, "a short SPIRE server outage").await;
}

/// The SPIRE server SIGKILLed for longer than the SVIDs live: new flows pass
/// until the SVIDs' NotAfter (±1 s), are dropped after it while the server
/// is away, and pass again within 5 s of its return.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_long_server_outage_drops_at_not_after_and_recovers() {
    let (mut tb, pay, mut c, _server) = chaos_pair("chlong", 162, None).await;
    let to = IpAddr::from(pay.ipv4);
    c.connect(to, 8080, T).unwrap();
    tb.spire_mut().set_outage(true).unwrap();
    let killed = SystemTime::now();
    // The entry's expiry, once no fresh SVID can arrive: bounded by the
    // SVIDs' NotAfter on both nodes.
    let mut attempts: Vec<(SystemTime, bool)> = Vec::new();
    let mut expiry = None;
    let mut not_after = None;
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut failed_since: Option<Instant> = None;
    while Instant::now() < deadline {
        if let Some(e) = pair_expiry(&tb).await {
            expiry = Some(e);
        }
        // The SVIDs' NotAfter while they are held (they leave the caches
        // when they expire).
        if let (Some(a), Some(b)) = (
            svid_not_after(&tb, "node-a").await,
            svid_not_after(&tb, "node-b").await,
        ) {
            not_after = Some(a.min(b));
        }
        let at = SystemTime::now();
        let ok = blocking(|| c.connect(to, 8080, Duration::from_millis(300))).is_ok();
        attempts.push((at, ok));
        if !ok && failed_since.is_none() {
            failed_since = Some(Instant::now());
        }
        // Dropped for two more seconds: "until fresh SVIDs arrive".
        if failed_since.is_some_and(|f| f.elapsed() > Duration::from_secs(2)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expiry = expiry.expect("node-b held the pair's entry during the outage");
    let first_fail = attempts.iter().find(|(_, ok)| !ok).map(|(t, _)| *t);
    let timeline: Vec<String> = attempts
        .iter()
        .map(|(t, ok)| format!("{:+.1}{}", secs(*t, killed), if *ok { "✓" } else { "✗" }))
        .collect();
    println!(
        "long outage: entry expiry {:+.2} s, SVIDs' NotAfter {:?}, attempts {}",
        secs(expiry, killed),
        not_after.map(|n| secs(n, killed)),
        timeline.join(" ")
    );
    let n = not_after.expect("the SVIDs' NotAfter was seen during the outage");
    {
        assert!(
            secs(expiry, n).abs() <= 1.0,
            "the entry expires with the SVIDs: entry {:+.2} s, NotAfter {:+.2} s",
            secs(expiry, killed),
            secs(n, killed)
        );
    }
    let first_fail =
        first_fail.unwrap_or_else(|| panic!("never dropped: {timeline:?}{}", logs(&tb)));
    assert!(
        secs(first_fail, expiry).abs() <= 1.0,
        "first drop {:+.2} s vs the SVIDs' expiry {:+.2} s (after the kill): {timeline:?}",
        secs(first_fail, killed),
        secs(expiry, killed)
    );
    assert!(
        attempts
            .iter()
            .all(|(t, ok)| *ok || secs(*t, expiry) > -1.0),
        "a flow was dropped before the SVIDs expired: {timeline:?}"
    );
    assert!(
        attempts
            .iter()
            .all(|(t, ok)| !*ok || secs(*t, expiry) < 1.0),
        "a flow passed after the SVIDs expired: {timeline:?}"
    );
    assert!(
        drops(&tb, "node-b").await > 0,
        "the drops are counted by the datapath"
    );
    blocking(|| tb.spire_mut().set_outage(false)).unwrap();
    let returned = Instant::now();
    // SPIRE's part: both nodes' SPIRE agents reconnect to the server (their
    // gRPC backoff grew during the outage) and serve fresh SVIDs again.
    let spire = tb.spire().real().unwrap();
    blocking(|| {
        while ["node-a", "node-b"]
            .iter()
            .any(|n| spire.served(n).map_or(true, |s| s.is_empty()))
        {
            assert!(
                returned.elapsed() < Duration::from_secs(30),
                "SPIRE's agents serve nothing 30 s after the server's return"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let spire_back = returned.elapsed();
    // meshauth's part: from fresh SVIDs to a flow through the datapath.
    let back = blocking(|| until_connects(&mut c, to, Duration::from_secs(15)));
    println!(
        "after the server's return: SPIRE's agents serve again in {spire_back:?}, traffic back {back:?} after that ({:?} in all)",
        returned.elapsed()
    );
    let back =
        back.unwrap_or_else(|| panic!("no traffic 15 s after SPIRE served again{}", logs(&tb)));
    assert!(
        back <= Duration::from_secs(5),
        "traffic back {back:?} after SPIRE's agents served fresh SVIDs (bound 5 s)"
    );
}

/// node-b's spire-agent killed: node-b keeps its SVIDs and entries until
/// they expire (flows pass until then), and its agent reconnects to the
/// Workload API when the spire-agent returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_dead_spire_agent_keeps_entries_until_expiry_then_reconnects() {
    let (mut tb, pay, mut c, _server) = chaos_pair("chagent", 163, None).await;
    let to = IpAddr::from(pay.ipv4);
    let reconnects = tb.status("node-b").await.unwrap().spire.reconnects;
    tb.spire_mut()
        .real_mut()
        .unwrap()
        .agent_mut("node-b")
        .unwrap()
        .kill();
    let killed = SystemTime::now();
    let not_after = svid_not_after(&tb, "node-b").await.unwrap();
    let expiry = pair_expiry(&tb).await.unwrap();
    assert!(
        expiry <= not_after,
        "the entry does not outlive node-b's SVID"
    );
    // Until shortly before node-b's SVID expires: an entry stays, never
    // beyond that SVID (re-authentications driven by node-a, whose SVIDs
    // still rotate, may move it up to there), and flows pass.
    while secs(SystemTime::now(), not_after) < -1.0 {
        let e = pair_expiry(&tb).await;
        assert!(
            e.is_some_and(|e| e >= expiry && e <= not_after),
            "node-b's entry is kept, within its SVID's life: {e:?} (first {expiry:?}, NotAfter {not_after:?})"
        );
        blocking(|| c.connect(to, 8080, Duration::from_millis(300))).unwrap_or_else(|e| {
            panic!(
                "{:+.1} s after the kill: {e}{}",
                secs(SystemTime::now(), killed),
                logs(&tb)
            )
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // After expiry: dropped.
    tb.wait_for("a drop after expiry", Duration::from_secs(5), || {
        let ok = blocking(|| c.connect(to, 8080, Duration::from_millis(300))).is_ok();
        async move { (!ok).then_some(()) }
    })
    .await
    .unwrap();
    let s = tb.status("node-b").await.unwrap();
    assert_ne!(s.spire.state, "connected", "{:?}", s.spire);
    blocking(|| {
        tb.spire_mut()
            .real_mut()
            .unwrap()
            .agent_mut("node-b")
            .unwrap()
            .restart()
    })
    .unwrap();
    let restarted = Instant::now();
    let back =
        blocking(|| until_connects(&mut c, to, Duration::from_secs(30))).unwrap_or_else(|| {
            panic!(
                "no traffic 30 s after the spire-agent returned{}",
                logs(&tb)
            )
        });
    let s = tb.status("node-b").await.unwrap();
    println!(
        "spire-agent back: traffic after {back:?}, source {} ({} reconnects)",
        s.spire.state, s.spire.reconnects
    );
    assert!(restarted.elapsed() >= back);
    assert_eq!(s.spire.state, "connected", "{:?}", s.spire);
    assert!(s.spire.reconnects > reconnects, "{:?}", s.spire);
}

/// A real CA rotation (CA TTL 1 m: prepared at 30 s, active at 50 s): the
/// new CA reaches the bundles, SVIDs are issued under it, and a stream of
/// round trips across the activation sees no failure and no drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_ca_rotation_drops_nothing() {
    let (tb, pay, mut c, _server) = chaos_pair("chca", 164, Some(Duration::from_secs(60))).await;
    c.stream(
        "s",
        pay.ipv4.into(),
        8080,
        Duration::from_millis(20),
        Duration::from_millis(500),
    )
    .unwrap();
    let log = |tb: &Testbed| tb.spire().real().unwrap().server().log();
    let count = |text: &str, what: &str| text.matches(what).count();
    let start = Instant::now();
    tb.wait_for(
        "a second X509 CA activated",
        Duration::from_secs(90),
        || {
            let l = log(&tb);
            async move { (count(&l, "X509 CA activated") >= 2).then_some(()) }
        },
    )
    .await
    .unwrap();
    println!("CA rotated after {:?}", start.elapsed());
    assert!(count(&log(&tb), "X509 CA prepared") >= 2);
    // SVIDs under the new CA reach both nodes (rotation at half of 10 s),
    // and the pair is authenticated with them.
    let activated = SystemTime::now();
    tb.wait_for(
        "SVIDs issued after the activation",
        Duration::from_secs(15),
        || {
            let tb = &tb;
            async move {
                let a = svid_not_after(tb, "node-a").await?;
                let b = svid_not_after(tb, "node-b").await?;
                (a > activated + Duration::from_secs(5) && b > activated + Duration::from_secs(5))
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    let bundle = tb.spire().real().unwrap().server().bundle_pem().unwrap();
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() >= 2,
        "old and new CA in the bundle:\n{bundle}"
    );
    let s = c.stream_stop("s").unwrap();
    println!("across the CA rotation: {s:?}");
    assert!(s.ok > 1000, "{s:?}");
    assert_eq!(s.failed, 0, "{s:?}{}", logs(&tb));
    assert_no_drops(&tb, "across a CA rotation").await;
}

/// An entry deleted in SPIRE: the SVID leaves node-b's cache and the pairs
/// that needed it are collected from node-b's auth map.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_an_entry_deleted_collects_its_pairs() {
    let (mut tb, _pay, _c, _server) = chaos_pair("chentry", 165, None).await;
    let payment = blocking(|| tb.identity_of("pay-b")).unwrap();
    let held = tb.status("node-b").await.unwrap().spire.svids;
    assert_eq!(held, 1);
    blocking(|| tb.unregister_identity(payment, "node-b")).unwrap();
    let gone = Instant::now();
    tb.wait_for("node-b's SVID gone", Duration::from_secs(10), || {
        let tb = &tb;
        async move { (tb.status("node-b").await.ok()?.spire.svids == 0).then_some(()) }
    })
    .await
    .unwrap();
    let svid_gone = gone.elapsed();
    let expiry = pair_expiry(&tb).await;
    wait_entries(&tb, "node-b", &[]).await;
    let collected = SystemTime::now();
    println!(
        "after the entry's deletion (SPIRE's agent no longer serving it): SVID gone from node-b's cache in {svid_gone:?}, pair collected in {:?}",
        gone.elapsed()
    );
    // At once, not when the entry would have expired (it was collected at
    // expiry, up to an SVID lifetime later, before revocations were seen).
    if let Some(expiry) = expiry {
        assert!(
            secs(collected, expiry) < -1.0,
            "collected {:+.1} s from its expiry: not before it",
            secs(collected, expiry)
        );
    }
    assert!(
        gone.elapsed() < Duration::from_secs(3),
        "collected {:?} after the SVID left the cache",
        gone.elapsed()
    );
}

/// The per-pod Delegated Identity mode on real SPIRE: a node's agent holds
/// an identity's key only while a pod of it runs on the node (SPIRE's entry
/// alone is not enough), and only the pods' own identities — a pod whose
/// process SPIRE attests as another identity's brings nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delegated_pods_a_nodes_keys_follow_its_pods() {
    let mut tb = Testbed::start(opts_with("mndelkey", 208, true, SvidMode::DelegatedPods))
        .await
        .unwrap();
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    // refund-service runs as order-service's uid: SPIRE (its unix
    // attestor) serves refund-a's PID order's SVID.
    let order_uid = tb.app_uid(ORDER);
    tb.set_app_uid("refund-service", order_uid);
    tb.add_pod("node-a", "refund-a", "refund-service").unwrap();
    tb.write("policy.yaml", TWO_WAY_POLICY).unwrap();
    let order = blocking(|| tb.register("order-a")).unwrap();
    let payment = blocking(|| tb.register("pay-b")).unwrap();
    let refund = tb.identity_of("refund-a").unwrap();
    // order-service may also run on node-c (an entry there), but no pod
    // of it does yet.
    blocking(|| tb.register_identity(order, "node-c")).unwrap();
    tb.start_agents().await.unwrap();
    wait_entries(&tb, "node-a", &[(order, payment, "node-b")]).await;

    let a = tb.status("node-a").await.unwrap();
    assert_eq!(a.spire.source, "delegated_identity_pods");
    let by_pod = |s: &AgentStatus, pod: &str| {
        s.spire
            .pods
            .iter()
            .find(|p| p.pod == format!("production/{pod}"))
            .cloned()
            .unwrap_or_else(|| panic!("{pod} not in {:?}", s.spire.pods))
    };
    let o = by_pod(&a, "order-a");
    assert_eq!(
        (o.state.as_str(), o.identity),
        ("serving", Some(order)),
        "{o:?}"
    );
    let container = std::fs::read_to_string(format!("/proc/{}/status", o.pid.unwrap())).unwrap();
    assert!(
        container
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&order_uid.to_string())),
        "SPIRE attested order-a's process, running as its uid: {container}"
    );
    let r = by_pod(&a, "refund-a");
    assert_eq!(r.state, "not_served", "{r:?}");
    assert_eq!(r.identity, Some(refund));
    assert_eq!(
        r.ignored,
        [format!("spiffe://meshauth.local/identity/{order}")],
        "SPIRE served refund-a's PID order's SVID; not taken as refund's"
    );
    assert_eq!(a.spire.svids, 1, "node-a holds order's key only");
    // Registered on node-c, no pod there: node-c holds nothing.
    assert_eq!(tb.status("node-c").await.unwrap().spire.svids, 0);

    // refund-a has no SVID of its own: its connection to payment is dropped.
    let (pay_b, _server) = serve(&tb, "pay-b");
    let mut refund_a = client(&tb, "refund-a");
    refund_a
        .connect(pay_b.ipv4.into(), 8080, Duration::from_millis(300))
        .expect_err("refund-service has no SVID: dropped");
    assert!(drops(&tb, "node-b").await > 0);

    // The last order pod leaves node-a: the key leaves with it, though
    // SPIRE's entry for node-a stays.
    tb.remove_pod("order-a").unwrap();
    tb.wait_for("node-a's order key gone", Duration::from_secs(10), || {
        let tb = &tb;
        async move { (tb.status("node-a").await.ok()?.spire.svids == 0).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));

    // Moving the pod moves the key: order-c on node-c.
    tb.add_pod("node-c", "order-c", ORDER).unwrap();
    wait_entries(&tb, "node-c", &[(order, payment, "node-b")]).await;
    let c = tb.status("node-c").await.unwrap();
    assert_eq!(by_pod(&c, "order-c").state, "serving");
    assert_eq!(c.spire.svids, 1);
    let mut order_c = client(&tb, "order-c");
    order_c
        .connect(pay_b.ipv4.into(), 8080, Duration::from_millis(500))
        .unwrap_or_else(|e| panic!("order-c → pay-b: {e}{}", logs(&tb)));
}

/// `meshauth spire reconcile --select pods` makes the entries the per-pod
/// mode needs on real SPIRE from the manifests alone: each identity's pods
/// selected by the uid they run as, on the nodes that run them; a uid two
/// identities' pods share on a node is refused and named (SPIRE could not
/// tell them apart). The agents then authenticate with those entries only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delegated_pods_with_entries_from_the_reconciler() {
    let mut tb = Testbed::start(opts_with("mndelrec", 209, true, SvidMode::DelegatedPods))
        .await
        .unwrap();
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    let inv_uid = tb.app_uid("inventory-service");
    tb.set_app_uid("refund-service", inv_uid);
    tb.add_pod("node-c", "inv-c", "inventory-service").unwrap();
    tb.add_pod("node-c", "refund-c", "refund-service").unwrap();
    tb.write("policy.yaml", TWO_WAY_POLICY).unwrap();
    let order = tb.identity_of("order-a").unwrap();
    let payment = tb.identity_of("pay-b").unwrap();
    let server = tb.spire().real().unwrap().server().socket().to_owned();
    let manifests = tb.manifests();
    let out = blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshauth"))
            .args(["spire", "reconcile", "--once", "--select", "pods"])
            .args(["--trust-domain", "meshauth.local"])
            .arg("--manifests")
            .arg(&manifests)
            .arg("--identity-file")
            .arg(manifests.parent().unwrap().join("identities.json"))
            .arg("--server-socket")
            .arg(&server)
            .output()
            .unwrap()
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("uid {inv_uid} on node node-c")),
        "the shared uid is named: {stderr}"
    );
    let entries = blocking(|| {
        tb.spire()
            .real()
            .unwrap()
            .server()
            .cli(&["entry", "show"], &[])
            .unwrap()
    });
    let ours: Vec<&str> = entries
        .split("\n\n")
        .filter(|e| e.contains("/identity/"))
        .collect();
    assert_eq!(
        ours.len(),
        2,
        "order on node-a, payment on node-b:\n{entries}"
    );
    for (identity, node, uid) in [
        (order, "node-a", tb.app_uid(ORDER)),
        (payment, "node-b", tb.app_uid(PAYMENT)),
    ] {
        assert!(
            ours.iter()
                .any(|e| e.contains(&format!("/identity/{identity}\n"))
                    && e.contains(&format!("/meshauth/node/{node}\n"))
                    && e.contains(&format!("unix:uid:{uid}"))),
            "identity {identity} on {node} selecting uid {uid}:\n{entries}"
        );
    }

    tb.start_agents().await.unwrap();
    wait_entries(&tb, "node-a", &[(order, payment, "node-b")]).await;
    wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    let (pay_b, _server) = serve(&tb, "pay-b");
    let mut order_a = client(&tb, "order-a");
    all_first_packets(&tb, &mut order_a, &pay_b);
    assert_no_drops(&tb, "entries from the reconciler").await;
    assert_eq!(tb.status("node-c").await.unwrap().spire.svids, 0);
}

/// The capabilities the chart gives the agent container (read from the
/// rendered DaemonSet, so chart and proof cannot drift).
fn chart_capabilities() -> Vec<String> {
    let tools = meshauth_lab::kube_real::k8s_tools_bin().unwrap_or_else(|e| panic!("{e}"));
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/meshauth");
    let out = std::process::Command::new(tools.join("helm"))
        .args(["template", "rel", "--show-only", "templates/daemonset.yaml"])
        .arg(&chart)
        .output()
        .unwrap_or_else(|e| panic!("helm: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds: serde_json::Value =
        serde_norway::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    sc["capabilities"]["add"]
        .as_array()
        .unwrap_or_else(|| panic!("no capabilities in {sc}"))
        .iter()
        .map(|c| c.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The agents run with only the capabilities the chart grants (every other
/// one dropped from their bounding set, as the container runtime does) and
/// still load, attach and pin the datapath, authenticate ahead of need, and
/// pass the first packets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_need_only_the_charts_capabilities() {
    let caps = chart_capabilities();
    println!("the chart's capabilities: {caps:?}");
    let mut o = opts("mncaps", 210, false);
    o.agent_capabilities = Some(caps.clone());
    let mut tb = Testbed::start(o).await.unwrap();
    tb.add_pod("node-a", "order-1", ORDER).unwrap();
    tb.add_pod("node-b", "payment-1", PAYMENT).unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    let order = tb.register("order-1").unwrap();
    let payment = tb.register("payment-1").unwrap();
    tb.start_agents().await.unwrap();
    // The agent really runs with those alone.
    let pid = tb.agent_pid("node-b").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let bit = |name: &str| match name {
        "NET_ADMIN" => 1u64 << 12,
        "SYS_ADMIN" => 1 << 21,
        "PERFMON" => 1 << 38,
        "BPF" => 1 << 39,
        other => panic!("capability {other} not in this test's table"),
    };
    let want: u64 = caps.iter().map(|c| bit(c)).fold(0, |a, b| a | b);
    assert_eq!(
        eff, want,
        "the agent's effective capabilities: {eff:#x}, want {want:#x} ({caps:?})"
    );

    wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    let pay = tb.pod("payment-1").unwrap().clone();
    let ord = tb.pod("order-1").unwrap().clone();
    let mut server = tb.lab().start_pod_process(&pay).unwrap();
    server.serve(8080).unwrap();
    let mut client = tb.lab().start_pod_process(&ord).unwrap();
    for addr in [IpAddr::from(pay.ipv4), IpAddr::from(pay.ipv6)] {
        client
            .connect(addr, 8080, Duration::from_millis(500))
            .unwrap_or_else(|e| panic!("{addr}: {e}{}", logs(&tb)));
    }
    assert_no_drops(&tb, "agents with the chart's capabilities only").await;
}

const THREE_CLIENTS_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: payment-ingress
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: payment-service
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: order-service
        - matchLabels:
            app: refund-service
        - matchLabels:
            app: billing-service
      authentication:
        mode: required
      toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
"#;

/// Chaos: node-b's auth map holds two pairs (`--auth-map-capacity 2`) and
/// needs three. The agent keeps running, keeps both entries it wrote (their
/// traffic passes), counts and logs the pair that did not fit (its traffic
/// drops, "Authentication required"), and writes that pair as soon as room
/// is made — a client pod leaving frees one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_full_auth_map_keeps_its_entries_and_takes_the_next_pair_when_room_is_made() {
    let mut tb = Testbed::start(opts("mnfull", 61, false)).await.unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    for (pod, app) in [
        ("order-a", ORDER),
        ("refund-a", "refund-service"),
        ("billing-a", "billing-service"),
    ] {
        tb.add_pod("node-a", pod, app).unwrap();
    }
    tb.write("policy.yaml", THREE_CLIENTS_POLICY).unwrap();
    let payment = tb.register("pay-b").unwrap();
    let clients: Vec<(String, u32)> = ["order-a", "refund-a", "billing-a"]
        .iter()
        .map(|p| ((*p).to_string(), tb.register(p).unwrap()))
        .collect();
    tb.set_agent_args("node-b", vec!["--auth-map-capacity".into(), "2".into()]);
    tb.start_agents().await.unwrap();

    // Two pairs written, the third counted as not fitting.
    let full = tb
        .wait_for(
            "node-b's auth map full",
            Duration::from_secs(20),
            || async {
                let e = tb.auth_entries("node-b").await.ok()?;
                let (_, metrics) = tb.http_get("node-b", "/metrics").ok()?;
                let failed = metrics
                    .lines()
                    .find(|l| {
                        l.starts_with("meshauth_auth_entry_writes_failed_total")
                            && l.contains("reason=\"full\"")
                    })
                    .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .unwrap_or(0.0);
                (e.len() == 2 && failed >= 1.0).then_some(e)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
    assert!(tb.agent_running("node-b"), "{}", logs(&tb));
    assert!(
        std::fs::read_to_string(tb.paths("node-b").log)
            .unwrap_or_default()
            .contains("the auth map is full"),
        "{}",
        logs(&tb)
    );
    let written: BTreeSet<u32> = full.iter().map(|e| e.remote).collect();
    let (left_out, _) = clients
        .iter()
        .find(|(_, id)| !written.contains(id))
        .cloned()
        .unwrap_or_else(|| panic!("a client left out: {full:?}"));
    let (pay_info, _server) = serve(&tb, "pay-b");
    for (pod, id) in &clients {
        let mut c = client(&tb, pod);
        let r = c.connect(pay_info.ipv4.into(), 8080, T);
        if written.contains(id) {
            r.unwrap_or_else(|e| panic!("{pod} (written) → pay-b: {e}{}", logs(&tb)));
        } else {
            r.expect_err("the pair that did not fit is dropped");
        }
    }
    assert!(drops(&tb, "node-b").await > 0);
    // Some time later the two entries are still there (nothing lost).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still: BTreeSet<u32> = tb
        .auth_entries("node-b")
        .await
        .unwrap()
        .iter()
        .map(|e| e.remote)
        .collect();
    assert_eq!(still, written);

    // Room: a written client leaves; the pair left out goes in at once.
    let (gone, _) = clients
        .iter()
        .find(|(p, _)| *p != left_out)
        .cloned()
        .unwrap_or_else(|| panic!("a written client"));
    let removed = Instant::now();
    tb.remove_pod(&gone).unwrap();
    let left_id = clients
        .iter()
        .find(|(p, _)| *p == left_out)
        .map(|(_, id)| *id)
        .unwrap_or(0);
    tb.wait_for(
        "the left-out pair written once there is room",
        Duration::from_secs(10),
        || async {
            let e = tb.auth_entries("node-b").await.ok()?;
            e.iter()
                .any(|e| e.remote == left_id && e.local == payment)
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
    println!(
        "the pair left out was written {:?} after a client pod left",
        removed.elapsed()
    );
    let mut c = client(&tb, &left_out);
    c.connect(pay_info.ipv4.into(), 8080, T)
        .unwrap_or_else(|e| panic!("{left_out} → pay-b after room was made: {e}{}", logs(&tb)));
}

/// Chaos: the policy source becomes unreadable — a policy file half
/// written (a writer that does not rename into place), then the whole
/// manifest directory gone. Each time the agents say so in their status,
/// keep the last good desired state (the entries stay, nothing is
/// collected, traffic passes), and converge when the source returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_an_unreadable_policy_source_keeps_the_last_good_state() {
    let (tb, order, payment, _) = order_and_payment(opts("mnsrc", 62, false)).await;
    let (pay_b, _server) = serve(&tb, "pay-b");
    let mut c = client(&tb, "order-a");
    c.connect(pay_b.ipv4.into(), 8080, T)
        .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
    let errors_say = |what: &'static str| {
        let tb = &tb;
        async move {
            for n in ["node-a", "node-b"] {
                tb.wait_for(
                    &format!("{n}'s status names the {what}"),
                    Duration::from_secs(10),
                    || async {
                        let s = tb.status(n).await.ok()?;
                        s.policy
                            .errors
                            .iter()
                            .any(|e| e.contains(what))
                            .then_some(())
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{e}{}", logs(tb)));
            }
        }
    };
    let unchanged = |when: &'static str| {
        let tb = &tb;
        async move {
            let a: BTreeSet<_> = tb
                .auth_entries("node-a")
                .await
                .unwrap()
                .iter()
                .map(key)
                .collect();
            let b: BTreeSet<_> = tb
                .auth_entries("node-b")
                .await
                .unwrap()
                .iter()
                .map(key)
                .collect();
            assert_eq!(
                a,
                [(order, payment, "node-b".to_string())].into(),
                "node-a {when}{}",
                logs(tb)
            );
            assert_eq!(
                b,
                [(payment, order, "node-a".to_string())].into(),
                "node-b {when}{}",
                logs(tb)
            );
        }
    };

    // Half a file, written in place: cut inside a quoted port.
    let half = &TWO_WAY_POLICY[..TWO_WAY_POLICY
        .find("\"8080\"")
        .map_or(TWO_WAY_POLICY.len() / 3, |i| i + 3)];
    std::fs::write(tb.manifests().join("policy.yaml"), half).unwrap();
    errors_say("policy.yaml").await;
    unchanged("with policy.yaml half written").await;
    c.connect(pay_b.ipv4.into(), 8080, T)
        .unwrap_or_else(|e| panic!("with policy.yaml half written: {e}{}", logs(&tb)));

    // The whole directory gone.
    let away = tb.manifests().with_extension("away");
    std::fs::rename(tb.manifests(), &away).unwrap();
    errors_say("manifests").await;
    unchanged("with the manifest directory gone").await;
    c.connect(pay_b.ipv4.into(), 8080, T)
        .unwrap_or_else(|e| panic!("with the directory gone: {e}{}", logs(&tb)));
    assert_no_drops(&tb, "while the source was unreadable").await;
    for n in ["node-a", "node-b"] {
        let log = std::fs::read_to_string(tb.paths(n).log).unwrap_or_default();
        assert!(
            !log.contains("auth entry removed"),
            "{n} collected an entry while its source was unreadable:\n{log}"
        );
    }

    // Back, and a change made meanwhile is followed: only the ingress
    // policy now, so node-a (egress) no longer holds its pair.
    std::fs::rename(&away, tb.manifests()).unwrap();
    let ingress_only = TWO_WAY_POLICY
        .split("\n---\n")
        .next()
        .unwrap_or_default()
        .to_string();
    tb.write("policy.yaml", &ingress_only).unwrap();
    wait_entries(&tb, "node-a", &[]).await;
    wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    for n in ["node-a", "node-b"] {
        tb.wait_for(
            &format!("{n}'s source errors cleared"),
            Duration::from_secs(10),
            || async {
                tb.status(n)
                    .await
                    .ok()?
                    .policy
                    .errors
                    .is_empty()
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
    }
    c.connect(pay_b.ipv4.into(), 8080, T)
        .unwrap_or_else(|e| panic!("after the source returned: {e}{}", logs(&tb)));
}

/// Chaos: a policy file rewritten in place by a slow writer. Its first
/// half is valid YAML meaning something else (the ingress rule without its
/// `authentication`, the egress policy missing); read then, it would
/// collect both pairs. The agents read a file only once it has not changed
/// for half a second: nothing is collected, no packet dropped, and the
/// finished file (a second port) is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_policy_file_written_in_place_is_not_taken_half_written() {
    let (tb, order, payment, _) = order_and_payment(opts("mnslow", 63, false)).await;
    let (pay_b, _server) = serve(&tb, "pay-b");
    let mut c = client(&tb, "order-a");
    c.connect(pay_b.ipv4.into(), 8080, T)
        .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
    let path = tb.manifests().join("policy.yaml");
    let prefix = &TWO_WAY_POLICY[..TWO_WAY_POLICY.find("authentication").unwrap_or(0)];
    let gen_a = tb.status("node-a").await.unwrap().policy.generation;
    let gen_b = tb.status("node-b").await.unwrap().policy.generation;
    std::fs::write(&path, prefix).unwrap();
    // The writer takes 300 ms (three of the agents' 100 ms polls).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let finished = TWO_WAY_POLICY.replace("port: \"5353\"", "port: \"5354\"");
    std::fs::write(&path, &finished).unwrap();
    // Followed once settled: the desired state moves on.
    for (n, before) in [("node-a", gen_a), ("node-b", gen_b)] {
        tb.wait_for(
            &format!("{n} reads the finished file"),
            Duration::from_secs(10),
            || async {
                let s = tb.status(n).await.ok()?;
                (s.policy.generation > before && s.policy.rules > 0).then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
    }
    wait_entries(&tb, "node-a", &[(order, payment, "node-b")]).await;
    wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    for n in ["node-a", "node-b"] {
        let log = std::fs::read_to_string(tb.paths(n).log).unwrap_or_default();
        assert!(
            !log.contains("auth entry removed"),
            "{n} took the half-written file:\n{log}"
        );
    }
    c.connect(pay_b.ipv4.into(), 8080, T)
        .unwrap_or_else(|e| panic!("after the rewrite: {e}{}", logs(&tb)));
    assert_no_drops(&tb, "while the file was being written").await;
}

/// A gauge or counter of `node`'s agent, from its metrics.
fn metric(tb: &Testbed, node: &str, name: &str) -> Option<f64> {
    let (_, metrics) = tb.http_get(node, "/metrics").ok()?;
    metrics
        .lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// node-b's agent runs with its wall clock under libfaketime (LD_PRELOAD;
/// its monotonic and boot clocks, and the kernel's, are real). While a
/// stream of round trips crosses node-b's enforcement with 10 s SVIDs
/// (rotated every 5 s, re-authenticated at 2/3 of their life), the clock
/// is stepped 1 h ahead, then 1 h behind where it started: the agent
/// reports each step, the stream loses nothing, and node-b's entry keeps
/// being renewed with expiries inside the SVIDs' real lifetime. Before the
/// agent kept its own time, the step ahead made every 10 s SVID look
/// expired and the pair was dropped within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_wall_clock_stepped_an_hour_changes_nothing() {
    let faketime = std::path::Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1");
    assert!(
        faketime.exists(),
        "{} is missing: scripts/install-test-deps installs libfaketime",
        faketime.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("node-b-clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let mut o = opts("chclock", 166, true);
    o.nodes = vec!["node-a".into(), "node-b".into()];
    o.svid_ttl = Duration::from_secs(10);
    let mut tb = Testbed::start(o).await.unwrap();
    tb.set_agent_env(
        "node-b",
        vec![
            ("LD_PRELOAD".into(), faketime.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                clock.display().to_string(),
            ),
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
            ("DONT_FAKE_MONOTONIC".into(), "1".into()),
        ],
    );
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    let order = blocking(|| tb.register("order-a")).unwrap();
    let payment = blocking(|| tb.register("pay-b")).unwrap();
    tb.start_agents().await.unwrap();
    wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    let (pay, _server) = serve(&tb, "pay-b");
    let mut c = client(&tb, "order-a");
    c.stream(
        "s",
        pay.ipv4.into(),
        8080,
        Duration::from_millis(20),
        Duration::from_millis(500),
    )
    .unwrap();
    stream_until(&mut c, "the stream started", |s| s.ok > 0);
    for (step, seconds) in [("+1h", 3600.0), ("-1h", -3600.0)] {
        std::fs::write(&clock, format!("{step}\n")).unwrap();
        // The agent sees the step (so its wall clock really moved).
        let seen = tb
            .wait_for(
                "node-b reports the step",
                Duration::from_secs(10),
                || async {
                    let s = metric(&tb, "node-b", "meshauth_wall_clock_step_seconds")?;
                    ((s - seconds).abs() < 5.0).then_some(s)
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
        let at = SystemTime::now();
        let before = c.stream_stats("s").unwrap();
        // 8 s of round trips: SVID rotations (every 5 s) and the
        // re-authentications they cause, on the stepped clock.
        let after = stream_until(&mut c, "8 s of round trips after the step", |s| {
            s.ok >= before.ok + 400 || s.failed > before.failed
        });
        assert_eq!(after.failed, 0, "step {step}: {after:?}{}", logs(&tb));
        let expiry = pair_expiry(&tb)
            .await
            .unwrap_or_else(|| panic!("step {step}: no entry on node-b{}", logs(&tb)));
        let now = SystemTime::now();
        println!(
            "step {step}: reported {seen:.1} s; entry expires {:.1} s after the step, {:.1} s from now; {after:?}",
            secs(expiry, at),
            secs(expiry, now)
        );
        // Renewed after the step by SVIDs issued after it (10 s lives, 5 s
        // rotation), and never beyond a real SVID lifetime from now.
        assert!(
            secs(expiry, at) > 6.0,
            "step {step}: the entry was not renewed after the step{}",
            logs(&tb)
        );
        assert!(
            secs(expiry, now) <= 11.0,
            "step {step}: the entry outlives its SVIDs{}",
            logs(&tb)
        );
    }
    let s = c.stream_stop("s").unwrap();
    assert_eq!(s.failed, 0, "{s:?}{}", logs(&tb));
    assert_no_drops(&tb, "wall clock steps of ±1 h").await;
    let log = tb.log_tail("node-b", 400);
    assert!(
        log.contains("the system clock stepped since the agent started"),
        "{log}"
    );
}

/// Payment requires authentication from order on UDP 8080.
const UDP_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: require-mutual-auth-udp
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: payment-service
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: order-service
      authentication:
        mode: required
      toPorts:
        - ports:
            - port: "8080"
              protocol: UDP
"#;

/// CPU time (user + system, every thread) of process `pid`.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks = f[11] + f[12];
    let hz = rustix::param::clock_ticks_per_second();
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// The sum of every series of `name` in `node`'s metrics.
fn metric_sum(tb: &Testbed, node: &str, name: &str) -> f64 {
    let (_, metrics) = tb
        .http_get(node, "/metrics")
        .unwrap_or_else(|e| panic!("metrics of {node}: {e}"));
    metrics
        .lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// node-a's agent never runs (its handshake port refuses), and order-a
/// floods pay-b with 100,000 UDP datagrams a second for 10 s on a port
/// that requires authentication: node-b's datapath drops and counts every
/// datagram that reached it, its agent keeps backing off the handshake to
/// node-a (1, 2, 4, 8 s: at most five attempts in the window), and the
/// agent spends under 5 % of a core on all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_flood_toward_an_unreachable_peer_costs_the_agent_little() {
    let mut o = opts("chflood", 167, false);
    o.nodes = vec!["node-a".into(), "node-b".into()];
    let mut tb = Testbed::start(o).await.unwrap();
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    tb.write("policy.yaml", UDP_POLICY).unwrap();
    blocking(|| tb.register("order-a")).unwrap();
    blocking(|| tb.register("pay-b")).unwrap();
    tb.start_agent("node-b").unwrap();
    let (pay, mut server) = serve(&tb, "pay-b");
    let mut c = client(&tb, "order-a");
    // Ready, and the pre-authentication toward node-a has failed.
    tb.wait_for(
        "node-b's first handshake toward node-a fails",
        Duration::from_secs(20),
        || async {
            let failed: f64 = {
                let (_, m) = tb.http_get("node-b", "/metrics").ok()?;
                m.lines()
                    .filter(|l| {
                        l.starts_with("meshauth_auth_handshakes_initiated_total")
                            && !l.contains("result=\"ok\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum()
            };
            (failed >= 1.0).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}{}", logs(&tb)));
    let pid = tb.agent_pid("node-b").expect("node-b's agent runs");
    let (cpu0, hs0, drops0) = (
        process_cpu(pid),
        metric_sum(&tb, "node-b", "meshauth_auth_handshakes_initiated_total"),
        drops(&tb, "node-b").await,
    );
    let window = Duration::from_secs(10);
    let started = Instant::now();
    let sent = blocking(|| c.flood(pay.ipv4.into(), 8080, 100_000, window)).unwrap();
    let took = started.elapsed();
    // Every datagram the kernel took is dropped and counted (the last
    // ones may still be on their way).
    let dropped = tb
        .wait_for("every datagram counted", Duration::from_secs(5), || async {
            let d = drops(&tb, "node-b").await - drops0;
            (d == sent).then_some(d)
        })
        .await;
    let (cpu1, hs1) = (
        process_cpu(pid),
        metric_sum(&tb, "node-b", "meshauth_auth_handshakes_initiated_total"),
    );
    let cpu = (cpu1 - cpu0).as_secs_f64() / took.as_secs_f64();
    let (_, udp_served) = blocking(|| server.served(8080)).unwrap();
    println!(
        "flood: {sent} datagrams in {took:?} ({:.0}/s); node-b dropped {dropped:?}; \
         handshake attempts in the window {}; agent CPU {:.2} % of a core; served {udp_served}",
        sent as f64 / took.as_secs_f64(),
        hs1 - hs0,
        cpu * 100.0
    );
    assert!(
        sent as f64 >= 0.9 * 100_000.0 * window.as_secs_f64(),
        "the flood fell short: {sent}"
    );
    dropped.unwrap_or_else(|e| panic!("{sent} sent: {e}{}", logs(&tb)));
    assert_eq!(udp_served, 0, "a datagram got through");
    assert!(
        hs1 - hs0 <= 5.0,
        "{} handshake attempts toward the unreachable node in 10 s{}",
        hs1 - hs0,
        logs(&tb)
    );
    assert!(
        cpu < 0.05,
        "node-b's agent used {:.1} % of a core",
        cpu * 100.0
    );
}

/// Chaos 1: node-b's agent upgraded under traffic to a build whose maps are
/// laid out otherwise, then rolled back. The build that starts finds the
/// maps pinned by another layout version (the marker set as that agent
/// leaves it: an older version on the upgrade, a newer one on the
/// rollback) and other capacities (the auth map and the ipcache resized):
/// the auth map is migrated, the other maps are recreated empty. Through
/// both, order-a's established connection to pay-b keeps its round trips
/// (none fails), new connections pass at once, node-b's entry is carried
/// over (not authenticated again), and refund-a — covered by the rule,
/// never given an SVID — floods pay-b the whole time without one datagram
/// getting through. The rollback also puts node-b in strict mode, where a
/// program running on an empty ipcache would drop every pod's packets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_an_upgrade_to_another_map_layout_and_its_rollback_drop_nothing() {
    let mut o = opts("chupgr", 168, false);
    o.nodes = vec!["node-a".into(), "node-b".into()];
    let mut tb = Testbed::start(o).await.unwrap();
    tb.add_pod("node-a", "order-a", ORDER).unwrap();
    tb.add_pod("node-a", "refund-a", "refund-service").unwrap();
    tb.add_pod("node-b", "pay-b", PAYMENT).unwrap();
    tb.write("policy.yaml", TWO_WAY_POLICY).unwrap();
    let order = tb.register("order-a").unwrap();
    let payment = tb.register("pay-b").unwrap();
    tb.start_agents().await.unwrap();
    let before = wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
    let (pay_b, mut server) = serve(&tb, "pay-b");
    server.serve(5353).unwrap();
    let mut c = client(&tb, "order-a");
    c.stream(
        "s",
        pay_b.ipv4.into(),
        8080,
        Duration::from_millis(20),
        Duration::from_millis(500),
    )
    .unwrap();
    let mut last = stream_until(&mut c, "the stream started", |s| s.ok > 0);

    // The attacker: UDP to payment's port 5353 at 10,000/s, in bursts of 250 ms
    // until told to stop.
    let mut refund = client(&tb, "refund-a");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let to = IpAddr::from(pay_b.ipv4);
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += refund
                    .flood(to, 5353, 10_000, Duration::from_millis(250))
                    .unwrap();
            }
            sent
        })
    };

    let pin_dir = tb.paths("node-b").pin_dir;
    // UDP datagrams pay-b may receive on 5353: order-a's own requests.
    let mut order_udp = 0;
    // Before anything changes: a second of the flood dropped, none through.
    tb.wait_for("the flood dropped", Duration::from_secs(10), || {
        let pin_dir = &pin_dir;
        async move { (pinned_auth_required_drops(pin_dir) >= 2_000).then_some(()) }
    })
    .await
    .unwrap();
    let (_, udp) = server.served(5353).unwrap();
    assert_eq!(
        udp - order_udp,
        0,
        "refund-a's datagrams got through before the upgrade"
    );
    let now = auth_ebpf::layout::LAYOUT_VERSION;
    let steps: [(&str, u32, Vec<String>, u32); 2] = [
        (
            "upgrade",
            now - 1,
            vec![
                "--auth-map-capacity".into(),
                "65536".into(),
                "--ipcache-capacity".into(),
                "32768".into(),
            ],
            65536,
        ),
        (
            "rollback",
            now + 1,
            vec!["--unknown-pods".into(), "drop".into()],
            131072,
        ),
    ];
    for (step, pinned, args, auth_capacity) in steps {
        let drops_before = drops(&tb, "node-b").await;
        let (_, udp) = server.served(5353).unwrap();
        assert_eq!(
            udp - order_udp,
            0,
            "before the {step}: refund-a's datagrams got through"
        );
        assert!(
            tb.terminate_agent("node-b", Duration::from_secs(10))
                .is_some_and(|st| st.success()),
            "{step}: node-b's agent did not stop cleanly{}",
            logs(&tb)
        );
        // With no agent running, the programs left attached keep enforcing:
        // at least 200 more of the flood's datagrams dropped, none through.
        let stopped = pinned_auth_required_drops(&pin_dir);
        tb.wait_for(
            "the flood dropped with no agent",
            Duration::from_secs(10),
            || {
                let pin_dir = &pin_dir;
                async move { (pinned_auth_required_drops(pin_dir) >= stopped + 200).then_some(()) }
            },
        )
        .await
        .unwrap();
        let (_, udp) = server.served(5353).unwrap();
        assert_eq!(
            udp - order_udp,
            0,
            "{step}: refund-a's datagrams got through with no agent"
        );
        auth_ebpf::testing::set_pinned_layout_version(&pin_dir, pinned).unwrap();
        let log_len = std::fs::metadata(tb.paths("node-b").log).unwrap().len() as usize;
        tb.set_agent_args("node-b", args);
        tb.start_agent("node-b").unwrap();
        let st = tb
            .wait_ready("node-b", Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{step}: {e}{}", logs(&tb)));
        let log = std::fs::read_to_string(tb.paths("node-b").log).unwrap();
        let log = &log[log_len..];
        assert!(
            log.contains("migrating pinned auth map")
                && log.contains(&format!("layout version {pinned} != {now}")),
            "{step}: the maps of layout {pinned} were not migrated:\n{log}"
        );
        assert_eq!(st.datapath.links, 2, "{step}: {:?}\n{log}", st.datapath);
        assert_eq!(st.datapath.auth_capacity, auth_capacity, "{step}");
        assert_eq!(
            auth_ebpf::testing::pinned_layout_version(&pin_dir),
            Some(now),
            "{step}"
        );
        // 50 round trips on the established connection after the new agent
        // is ready, none failed.
        let ready = c.stream_stats("s").unwrap();
        let s = stream_until(&mut c, step, |s| s.ok >= ready.ok + 50 || s.failed > 0);
        println!("{step}: pinned layout {pinned} → {now}; stream {last:?} → {s:?}");
        assert_eq!(s.failed, 0, "{step}: {s:?}{}", logs(&tb));
        last = s;
        all_first_packets(&tb, &mut c, &pay_b);
        // order-a's two UDP requests (IPv4, IPv6) on 5353.
        order_udp += 2;
        let after = wait_entries(&tb, "node-b", &[(payment, order, "node-a")]).await;
        assert_eq!(
            after[0].expiry, before[0].expiry,
            "{step}: the entry was carried over, not authenticated again"
        );
        // The flood reaches the new datapath and is dropped there.
        let d = drops(&tb, "node-b").await;
        println!("{step}: node-b's drops {drops_before} before, {d} since the new agent loaded");
        let (_, udp) = server.served(5353).unwrap();
        assert_eq!(
            udp - order_udp,
            0,
            "{step}: refund-a's datagrams got through\n{log}"
        );
        let other = drops_other_than_auth_required(&tb, "node-b");
        assert!(
            other.is_empty(),
            "{step}: node-b dropped {other:?}{}",
            logs(&tb)
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    let s = c.stream_stop("s").unwrap();
    let (_, udp) = server.served(5353).unwrap();
    println!(
        "refund-a sent {sent} datagrams; pay-b received {} of them; stream {s:?}",
        udp - order_udp
    );
    assert!(sent > 0);
    assert_eq!(udp - order_udp, 0, "refund-a's datagrams got through");
    assert_eq!(s.failed, 0, "{s:?}{}", logs(&tb));
    assert!(
        drops(&tb, "node-b").await > 0,
        "the flood was not dropped by node-b's datapath"
    );
}

/// `node`'s drop counters other than "Authentication required"'s, as
/// `reason/direction: packets` (empty when there are none).
fn drops_other_than_auth_required(tb: &Testbed, node: &str) -> Vec<String> {
    let auth_required = auth_ebpf::reason::label(auth_ebpf::reason::DROP_AUTH_REQUIRED);
    let (_, metrics) = tb
        .http_get(node, "/metrics")
        .unwrap_or_else(|e| panic!("metrics of {node}: {e}"));
    metrics
        .lines()
        .filter(|l| l.starts_with("meshauth_drops_total{"))
        .filter(|l| !l.contains(&format!("reason=\"{auth_required}\"")))
        .filter(|l| l.rsplit(' ').next().is_some_and(|n| n != "0"))
        .map(str::to_string)
        .collect()
}

/// "Authentication required" drops counted in the metrics map pinned under
/// `pin_dir` (read without the agent).
fn pinned_auth_required_drops(pin_dir: &std::path::Path) -> u64 {
    auth_ebpf::metrics::MetricsReader::open(pin_dir)
        .and_then(|m| m.read())
        .unwrap_or_else(|e| panic!("metrics pinned under {}: {e}", pin_dir.display()))
        .iter()
        .filter(|c| c.reason == auth_ebpf::reason::DROP_AUTH_REQUIRED)
        .map(|c| c.packets)
        .sum()
}
