//! WireGuard between nodes on a real kernel. This machine's kernel has no
//! WireGuard, so [`wireguard_on_a_real_kernel`] boots Debian's kernel in
//! qemu (`meshauth_test_support::vm`, the host's root read-only over 9p)
//! and runs this same test binary inside it, where the `#[ignore]`d
//! [`inside_the_vm`] test does the work: three lab nodes with real
//! `meshauth-agent`s, spire-dev and pods, then
//!
//! 1. each agent's interface as `wg show all dump` (wireguard-tools, an
//!    independent reader) prints it equals what the agent reports and what
//!    the node table asks for;
//!    A peer removed by hand (`wg set … remove`) is put back;
//! 2. pod-to-pod TCP across nodes works, and a capture on the underlay
//!    bridge sees WireGuard's UDP 51871, never a pod address in an outer
//!    header and never the plaintext marker the pods send;
//! 3. an agent restarted under a flowing stream loses no round trip;
//! 4. a key rotated through `meshauth wireguard rotate-key` is followed by
//!    the peers and traffic is back within the bound;
//! 5. `wireguard: false` removes the interface, rules, routes and the
//!    published key, and peers drop the node;
//! 6. a node publishing a key it does not hold: handshakes toward it fail
//!    as `wireguard_key_mismatch` and are counted;
//! 7. a node removed: its peer is gone on the others;
//! 8. Nodes with keys joining and leaving (200 changes, 100 ms apart): the
//!    interface follows, and no stale peer is left.
//!
//! Run alone: `scripts/vm-test` or `cargo test -p meshauth-cli --test
//! wireguard_vm`. Needs root, qemu, busybox-static, linux-image-amd64 and
//! wireguard-tools (`scripts/install-test-deps`); fails, never skips.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use auth_agent::api::types::AgentStatus;
use meshauth_lab::testbed::{Testbed, TestbedOptions};

#[path = "wireguard_vm/capture.rs"]
mod capture;

const INNER: &str = "inside_the_vm";

/// The host side: boots the VM and runs [`inside_the_vm`] there.
#[test]
fn wireguard_on_a_real_kernel() {
    let exe = std::env::current_exe().unwrap();
    let vm = meshauth_test_support::vm::VmBuilder::new()
        .unwrap_or_else(|e| panic!("the VM harness cannot start: {e}"))
        .memory_mib(3072)
        .timeout(Duration::from_secs(1500))
        .env("RUST_BACKTRACE", "1")
        .env("MESHAUTH_AGENT_BIN", agent_bin().display().to_string());
    let out = vm
        .run(&[
            exe.to_str().unwrap(),
            "--ignored",
            "--exact",
            INNER,
            "--nocapture",
            "--test-threads=1",
        ])
        .unwrap_or_else(|e| panic!("running the WireGuard test in the VM: {e}"));
    eprintln!(
        "WireGuard test in the VM ({}, kernel {}): status {}, boot {:?}, total {:?}",
        out.accel,
        vm.kernel_release(),
        out.status,
        out.boot_time,
        out.total_time
    );
    assert_eq!(
        out.status, 0,
        "the WireGuard test failed in the VM:\n{}",
        out.output
    );
    assert!(
        out.output.contains("test result: ok. 1 passed"),
        "the inner test did not run:\n{}",
        out.output
    );
}

/// `meshauth-agent`, built beside `meshauth` by `cargo test --workspace`.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHAUTH_AGENT_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_BIN_EXE_meshauth")).with_file_name("meshauth-agent");
    assert!(
        p.exists(),
        "{} is missing: build it (cargo build -p auth-agent --bin meshauth-agent)",
        p.display()
    );
    p
}

const POLICY: &str = r#"apiVersion: cilium.io/v2
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
"#;

const MARKER: &str = "MESHAUTH-PLAINTEXT-MARKER-7f3a";
/// How long traffic may stop after a key rotation.
const ROTATION_BOUND: Duration = Duration::from_secs(10);

fn wg_args(on: bool) -> Vec<String> {
    vec![
        "--wireguard".into(),
        on.to_string(),
        "--wireguard-refresh".into(),
        "1s".into(),
    ]
}

/// `wg show all dump` in `node`'s namespace: interface → (public key,
/// port) and its peers: public key → (endpoint, allowed IPs). The private
/// key is compared with the key file, never printed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Dump {
    public: String,
    port: u16,
    peers: BTreeMap<String, (String, BTreeSet<String>)>,
}

fn wg_dump(tb: &Testbed, node: &str) -> Option<Dump> {
    let info = tb.node(node).unwrap().clone();
    let out = tb
        .lab()
        .command(&info, "wg")
        .args(["show", "all", "dump"])
        .output()
        .expect("running wg (wireguard-tools)");
    assert!(
        out.status.success(),
        "wg show all dump on {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut dump: Option<Dump> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            f[0], "meshauth_wg0",
            "an interface meshauth does not own on {node}"
        );
        match f.len() {
            5 => {
                let key_file = tb.paths(node).state_dir.join("wireguard.key");
                let file = std::fs::read_to_string(&key_file).unwrap_or_default();
                assert!(
                    f[1] == file.trim(),
                    "{node}: the interface's private key is not the key file's"
                );
                dump = Some(Dump {
                    public: f[2].into(),
                    port: f[3].parse().unwrap(),
                    ..Dump::default()
                });
            }
            9 => {
                let d = dump.as_mut().expect("peer line before the interface line");
                let allowed = f[4]
                    .split(',')
                    .filter(|s| *s != "(none)" && !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                d.peers.insert(f[1].into(), (f[3].into(), allowed));
            }
            n => panic!("{node}: unexpected wg dump line with {n} fields"),
        }
    }
    dump
}

async fn status(tb: &Testbed, node: &str) -> AgentStatus {
    tb.status(node)
        .await
        .unwrap_or_else(|e| panic!("status of {node}: {e}"))
}

/// What node `peer`'s WireGuard peer must allow: its addresses and pod CIDRs.
fn expected_allowed(tb: &Testbed, peer: &str) -> BTreeSet<String> {
    let n = tb.node(peer).unwrap();
    [
        format!("{}/32", n.ipv4),
        format!("{}/128", n.ipv6),
        n.pod_cidr_v4.to_string(),
        n.pod_cidr_v6.to_string(),
    ]
    .into()
}

/// Waits until `node`'s agent reports `want` peers (by node name).
async fn wait_peers(tb: &Testbed, node: &str, want: &[&str]) -> AgentStatus {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    tb.wait_for(
        &format!("{node}'s WireGuard peers {want:?}"),
        Duration::from_secs(60),
        || async {
            let s = tb.status(node).await.ok()?;
            let w = s.wireguard.as_ref()?;
            let have: BTreeSet<String> = w.peers.iter().map(|p| p.node.clone()).collect();
            (have == want).then_some(s)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tb.log_tail(node, 30)))
}

/// The sum of the samples of `name` whose labels contain `labels`.
fn metric(tb: &Testbed, node: &str, name: &str, labels: &str) -> f64 {
    let (_, body) = tb.http_get(node, "/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn manifest(tb: &Testbed, node: &str) -> String {
    std::fs::read_to_string(tb.manifests().join(format!("node-{node}.yaml"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the VM that wireguard_on_a_real_kernel boots"]
async fn inside_the_vm() {
    assert!(meshauth_lab::testbed::is_root(), "needs root");
    assert!(
        std::path::Path::new("/sys/module/wireguard").exists()
            || std::fs::read_to_string("/proc/modules")
                .unwrap_or_default()
                .contains("wireguard"),
        "this kernel has no WireGuard module loaded"
    );
    let mut tb = Testbed::start(TestbedOptions {
        prefix: "wg".into(),
        meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
        agent_bin: Some(agent_bin()),
        net: 61,
        log: "info,auth_agent::auth=debug".into(),
        ..TestbedOptions::default()
    })
    .await
    .unwrap();
    tb.add_pod("node-a", "order-a", "order-service").unwrap();
    tb.add_pod("node-b", "pay-b", "payment-service").unwrap();
    tb.add_pod("node-c", "pay-c", "payment-service").unwrap();
    tb.write("policy.yaml", POLICY).unwrap();
    for p in ["order-a", "pay-b", "pay-c"] {
        tb.register(p).unwrap();
    }
    for n in ["node-a", "node-b", "node-c"] {
        tb.set_agent_args(n, wg_args(true));
    }
    // Emulated CPUs are slow (loading the datapath alone can take 20 s on
    // a busy host): readiness gets more time than the testbed's default.
    for n in ["node-a", "node-b", "node-c"] {
        tb.start_agent(n).unwrap();
    }
    for n in ["node-a", "node-b", "node-c"] {
        tb.wait_ready(n, Duration::from_secs(180)).await.unwrap();
    }

    // 1. Each interface as wg prints it = what the agent reports = the
    //    node table.
    for (n, others) in [
        ("node-a", ["node-b", "node-c"]),
        ("node-b", ["node-a", "node-c"]),
        ("node-c", ["node-a", "node-b"]),
    ] {
        let s = wait_peers(&tb, n, &others).await;
        let w = s.wireguard.unwrap();
        assert!(w.published, "{n}: key not published: {:?}", w.publish_error);
        assert!(
            manifest(&tb, n).contains(&w.public_key),
            "{n}'s key is not in its node manifest"
        );
        let d = wg_dump(&tb, n).unwrap_or_else(|| panic!("{n}: no meshauth_wg0"));
        assert_eq!(d.public, w.public_key, "{n}");
        assert_eq!(d.port, 51871, "{n}");
        assert_eq!(
            w.mtu,
            1500 - 80,
            "{n}: the lab's veth MTU minus WireGuard's 80"
        );
        let mut from_status = BTreeMap::new();
        for p in &w.peers {
            let node = tb.node(&p.node).unwrap();
            assert_eq!(
                p.endpoint.as_deref(),
                Some(format!("{}:51871", node.ipv4).as_str())
            );
            assert_eq!(
                p.allowed_ips.iter().cloned().collect::<BTreeSet<_>>(),
                expected_allowed(&tb, &p.node),
                "{n} → {}",
                p.node
            );
            from_status.insert(
                p.public_key.clone(),
                (
                    p.endpoint.clone().unwrap(),
                    p.allowed_ips.iter().cloned().collect(),
                ),
            );
        }
        assert_eq!(
            d.peers, from_status,
            "{n}: wg show dump differs from the agent's status"
        );
        eprintln!(
            "{n}: wg show all dump equals the agent's {} peers",
            d.peers.len()
        );
    }

    // 1b. A peer removed by hand is put back (drift repair).
    let b_key = status(&tb, "node-b").await.wireguard.unwrap().public_key;
    let a_info = tb.node("node-a").unwrap().clone();
    let out = tb
        .lab()
        .command(&a_info, "wg")
        .args(["set", "meshauth_wg0", "peer", &b_key, "remove"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg set … remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tb.wait_for(
        "node-a's peer for node-b put back",
        Duration::from_secs(30),
        || async {
            wg_dump(&tb, "node-a")
                .unwrap()
                .peers
                .contains_key(&b_key)
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert!(metric(&tb, "node-a", "meshauth_wireguard_drift_repairs_total", "") >= 1.0);

    // 2. Pod TCP across nodes, over WireGuard only.
    let pay_b = tb.pod("pay-b").unwrap().clone();
    let order_a = tb.pod("order-a").unwrap().clone();
    let mut server = tb.lab().start_pod_process(&pay_b).unwrap();
    server.serve(8080).unwrap();
    let mut client = tb.lab().start_pod_process(&order_a).unwrap();
    let cap = capture::Capture::start(tb.lab().fabric_netns());
    let retry = client
        .connect_retry(IpAddr::V4(pay_b.ipv4), 8080, Duration::from_secs(20))
        .unwrap_or_else(|e| {
            panic!(
                "order-a → pay-b over WireGuard: {e}\n{}",
                tb.log_tail("node-a", 30)
            )
        });
    for addr in [IpAddr::V4(pay_b.ipv4), IpAddr::V6(pay_b.ipv6)] {
        client
            .send_text(addr, 8080, MARKER, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("sending the marker to {addr}: {e}"));
    }
    let seen = cap.stop();
    eprintln!(
        "underlay: {seen:?} (first connect after {} failed attempts)",
        retry.failed_attempts
    );
    assert!(!seen.marker, "the plaintext marker crossed the underlay");
    assert!(
        seen.udp_wireguard > 0,
        "no WireGuard UDP seen on the underlay: {seen:?}"
    );
    let pods: Vec<IpAddr> = [&pay_b, &order_a]
        .iter()
        .flat_map(|p| [IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)])
        .collect();
    for ip in &pods {
        assert!(
            !seen.addresses.contains(ip),
            "pod address {ip} in an outer header: {seen:?}"
        );
    }
    let allowed_other: BTreeSet<&str> = ["tcp/4250", "arp", "icmpv6", "udp/51871"].into();
    for kind in seen.kinds.keys() {
        assert!(
            allowed_other.contains(kind.as_str()),
            "unexpected traffic on the underlay: {kind} ({seen:?})"
        );
    }

    // 3. An agent restarted under a flowing stream loses nothing. A round
    // trip counts as lost when its echo is not back within 150 ms under
    // KVM; under TCG (an emulated CPU, some 10x slower, busy with the
    // agent's start) within 1 s — still far below WireGuard's 5 s retry,
    // so a dropped packet or a torn-down peer would still show.
    let emulated =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .map(|c| c.trim() != "kvm-clock")
            .unwrap_or(true);
    let echo_within = if emulated {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(150)
    };
    eprintln!("round trips count as lost after {echo_within:?} (emulated CPU: {emulated})");
    client
        .stream(
            "s",
            IpAddr::V4(pay_b.ipv4),
            8080,
            Duration::from_millis(10),
            echo_within,
        )
        .unwrap();
    let before = status(&tb, "node-b").await;
    tb.terminate_agent("node-b", Duration::from_secs(10))
        .expect("node-b's agent stops on SIGTERM");
    tb.start_agent("node-b").unwrap();
    tb.wait_ready("node-b", Duration::from_secs(180))
        .await
        .unwrap();
    let after = wait_peers(&tb, "node-b", &["node-a", "node-c"]).await;
    assert_eq!(
        after.wireguard.as_ref().unwrap().public_key,
        before.wireguard.as_ref().unwrap().public_key,
        "the key survives a restart"
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = client.stream_stop("s").unwrap();
    eprintln!("stream across node-b's agent restart: {st:?}");
    assert!(st.ok > 50, "the stream did not flow: {st:?}");
    assert_eq!(
        st.failed, 0,
        "round trips lost across the agent restart: {st:?}"
    );

    // 4. Key rotation: peers follow, traffic back within the bound.
    let old = status(&tb, "node-a").await.wireguard.unwrap().public_key;
    let rotated_at = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_meshauth"))
        .args(["wireguard", "rotate-key", "--api-socket"])
        .arg(&tb.paths("node-a").api_socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rotate-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout)
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(printed, old);
    let back = client
        .connect_retry(IpAddr::V4(pay_b.ipv4), 8080, Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!(
                "traffic after the rotation: {e}\n{}",
                tb.log_tail("node-b", 30)
            )
        });
    let gap = rotated_at.elapsed();
    eprintln!(
        "key rotation: traffic back after {gap:?} ({} failed attempts)",
        back.failed_attempts
    );
    assert!(
        gap <= ROTATION_BOUND,
        "traffic took {gap:?} to come back after the rotation (bound {ROTATION_BOUND:?})"
    );
    assert_eq!(wg_dump(&tb, "node-a").unwrap().public, printed);
    tb.wait_for(
        "node-b's peer for node-a under the new key",
        Duration::from_secs(30),
        || async {
            wg_dump(&tb, "node-b")
                .unwrap()
                .peers
                .contains_key(&printed)
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert!(
        !wg_dump(&tb, "node-b").unwrap().peers.contains_key(&old),
        "the old key's peer stayed"
    );
    assert!(metric(&tb, "node-a", "meshauth_wireguard_key_rotations_total", "") >= 1.0);

    // 5. wireguard: false on node-c removes everything it set up.
    tb.terminate_agent("node-c", Duration::from_secs(10))
        .unwrap();
    tb.set_agent_args("node-c", wg_args(false));
    tb.start_agent("node-c").unwrap();
    tb.wait_ready("node-c", Duration::from_secs(180))
        .await
        .unwrap();
    tb.wait_for(
        "node-c's interface and published key removed",
        Duration::from_secs(30),
        || async {
            (wg_dump(&tb, "node-c").is_none()
                && !manifest(&tb, "node-c").contains("wireguard-public-key"))
            .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tb.log_tail("node-c", 30)));
    assert!(status(&tb, "node-c").await.wireguard.is_none());
    let a = wait_peers(&tb, "node-a", &["node-b"]).await;
    assert!(
        a.wireguard
            .unwrap()
            .refused
            .get("node-c")
            .is_some_and(|r| r.contains("no WireGuard key"))
    );

    // 6. node-c "publishes" a key it does not hold.
    let forged = status(&tb, "node-b").await.wireguard.unwrap().public_key; // a real key, b's
    let mut fake = forged.into_bytes();
    fake[0] = if fake[0] == b'A' { b'B' } else { b'A' };
    let fake = String::from_utf8(fake).unwrap();
    let text = manifest(&tb, "node-c").replacen(
        "metadata:\n",
        &format!("metadata:\n  annotations:\n    meshauth.io/wireguard-public-key: \"{fake}\"\n"),
        1,
    );
    tb.write("node-node-c.yaml", &text).unwrap();
    tb.wait_for(
        "handshakes toward node-c failing on the key",
        Duration::from_secs(60),
        || async {
            (metric(
                &tb,
                "node-a",
                "meshauth_handshake_handshakes_total",
                "result=\"wireguard_key_mismatch\"",
            ) > 0.0)
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n--- node-c ---\n{}",
            tb.log_tail("node-a", 60),
            tb.log_tail("node-c", 30)
        )
    });
    assert!(status(&tb, "node-a").await.handshakes.initiated_failed > 0);
    // What node-c's agent proved before no longer binds: its pairs go.
    tb.wait_for(
        "node-a's pairs toward node-c removed",
        Duration::from_secs(30),
        || async {
            let e = tb.auth_entries("node-a").await.ok()?;
            (!e.iter().any(|e| e.node.as_deref() == Some("node-c"))).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tb.log_tail("node-a", 60)));
    assert!(
        metric(
            &tb,
            "node-a",
            "meshauth_auth_entries_removed_total",
            "wireguard_key_mismatch"
        ) > 0.0
    );

    // 7. node-c removed: its peer goes on the others.
    tb.remove_node("node-c").unwrap();
    wait_peers(&tb, "node-a", &["node-b"]).await;
    wait_peers(&tb, "node-b", &["node-a"]).await;
    assert_eq!(wg_dump(&tb, "node-b").unwrap().peers.len(), 1);
    assert_eq!(wg_dump(&tb, "node-a").unwrap().peers.len(), 1);

    // 8. Node churn: 200 joins and leaves of Nodes publishing WireGuard
    //    keys, one every 100 ms plus the time a manifest write takes (up to
    //    eight Nodes at a time, each with its own key and an unused address
    //    on the lab's underlay; an emulated CPU stretches the run). node-a's
    //    interface follows them, and once they are gone it holds node-b
    //    alone — no stale peer — and traffic still flows.
    let churn = |k: u8| {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.encode([k + 1; 32]);
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: churn-{k}\n  annotations:\n    meshauth.io/wireguard-public-key: \"{key}\"\nspec:\n  podCIDR: 10.61.{}.0/24\n  podCIDRs:\n    - 10.61.{}.0/24\nstatus:\n  addresses:\n    - type: InternalIP\n      address: 10.61.0.{}\n",
            100 + k,
            100 + k,
            100 + k
        )
    };
    let start = Instant::now();
    let (mut joins, mut most) = (0, 0);
    let mut present = BTreeSet::new();
    for i in 0..200u32 {
        let k = (i % 8) as u8;
        let file = format!("node-churn-{k}.yaml");
        if present.remove(&k) {
            tb.unlink(&file).unwrap();
        } else {
            tb.write(&file, &churn(k)).unwrap();
            present.insert(k);
            joins += 1;
        }
        if i % 20 == 0 {
            most = most.max(wg_dump(&tb, "node-a").map_or(0, |d| d.peers.len()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for k in std::mem::take(&mut present) {
        tb.unlink(&format!("node-churn-{k}.yaml")).unwrap();
    }
    eprintln!(
        "churn: {joins} joins and as many leaves in {:?}; node-a held up to {most} peers",
        start.elapsed()
    );
    assert!(
        most > 1,
        "node-a never followed a churning node ({most} peers)"
    );
    let s = wait_peers(&tb, "node-a", &["node-b"]).await;
    assert_eq!(s.wireguard.unwrap().peers.len(), 1);
    let d = wg_dump(&tb, "node-a").unwrap();
    assert_eq!(
        d.peers.len(),
        1,
        "node-a's interface after the churn: {:?}",
        d.peers
    );
    // And traffic between the remaining nodes still flows.
    client
        .connect_retry(IpAddr::V4(pay_b.ipv4), 8080, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("order-a → pay-b after the churn: {e}"));
}
