//! BPF_PROG_TEST_RUN cases for what a pod's owner can send: extension-header
//! chains, forged replies, spoofed sources, and floods of drops. Each one
//! got past, or cost the agent, before the fix it tests (see the commit).
//! Root; real kernel. Under test_run the packet's socket is a dummy one in
//! this test process's own cgroup, so the endpoints map is keyed by it.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use auth_ebpf::events::EventReader;
use auth_ebpf::maps::config::DatapathConfig;
use auth_ebpf::maps::endpoints::{Endpoint, EndpointMap};
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use auth_ebpf::testing::{L4, frame, ipv6_chain, proto};
use auth_ebpf::types::Direction::{self, Egress, Ingress};
use common::*;
use meshauth_test_support::netns::cgroup2_root;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;

fn count(f: &Fixture, code: u8, dir: Direction) -> u64 {
    MetricsReader::open(f.pins.path())
        .expect("metrics")
        .packets(code, dir)
        .expect("metrics read")
}

fn syn6(headers: &[u8], dport: u16) -> Vec<u8> {
    ipv6_chain(
        REMOTE_V6,
        LOCAL_V6,
        headers,
        L4::Tcp {
            sport: 40000,
            dport,
            flags: SYN,
        },
    )
}

#[test]
fn walkable_extension_header_chains_are_judged_by_their_transport_header() {
    let f = Fixture::new("xh-walk");
    f.require(Ingress, 8080, proto::TCP);
    for chain in [
        &[][..],
        &[60],
        &[0, 43, 60],
        &[0, 51, 60],
        &[44, 60],
        &[60, 60, 60, 60, 60],
        &[0, 43, 44, 51, 60, 60, 60, 60],
    ] {
        assert!(
            !f.run(Ingress, &syn6(chain, 8080)),
            "SYN behind {chain:?} must be judged as TCP to 8080 and dropped"
        );
        // ... and a port without a rule passes: the ports were read right.
        assert!(
            f.run(Ingress, &syn6(chain, 9090)),
            "SYN behind {chain:?} to a port without a rule"
        );
    }
    assert_eq!(count(&f, reason::DROP_AUTH_REQUIRED, Ingress), 7);
    assert_eq!(count(&f, reason::DROP_INVALID_EXTHDR, Ingress), 0);
}

/// A SYN behind one destination-options header of `units` 8-byte units
/// beyond its first 8 (PadN filling it), so its TCP header starts at
/// 40 + 8 × (units + 1) bytes into the packet.
fn syn6_behind_long_options(units: u8, dport: u16) -> Vec<u8> {
    let short = syn6(&[60], dport);
    let (head, rest) = short.split_at(14 + 40);
    let (opts, tcp) = rest.split_at(8);
    let mut out = head.to_vec();
    let len = 8 * (usize::from(units) + 1);
    // PadN covering the header after its two bytes: type 1, length, zeros
    // (at most 255 data bytes each, so as many as it takes).
    let mut body = Vec::new();
    let mut left = len - 2;
    while left > 0 {
        let n = left.min(257);
        body.push(1);
        body.push((n - 2) as u8);
        body.resize(body.len() + n - 2, 0);
        left -= n;
    }
    out.extend_from_slice(&[opts[0], units]);
    out.extend_from_slice(&body);
    out.extend_from_slice(tcp);
    let payload_len = (out.len() - 14 - 40) as u16;
    out[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// A TCP SYN over IPv4 whose header carries `words` 4-byte words of
/// options (NOPs), so its TCP header starts at 20 + 4 × `words`.
fn syn4_with_options(words: u8, dport: u16) -> Vec<u8> {
    let plain = tcp(Ingress, dport, SYN);
    let (head, l4) = plain.split_at(14 + 20);
    let mut out = head.to_vec();
    out.resize(out.len() + 4 * usize::from(words), 1);
    out.extend_from_slice(l4);
    out[14] = 0x40 | (5 + words);
    let total = (out.len() - 14) as u16;
    out[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
    out
}

/// Headers where nearly every packet has them (the transport header right
/// after a 20-byte IPv4 or 40-byte IPv6 header) are read in place; any
/// other offset is copied with `bpf_skb_load_bytes` (`pkt_load` in
/// parse.h). A TCP header behind IPv4 options, or behind a 1,128-byte
/// IPv6 destination-options header, is still read: its port decides. Under
/// test_run every packet is linear, so this is the copying path's test.
#[test]
fn a_transport_header_at_any_offset_is_judged_by_its_port() {
    let f = Fixture::new("xh-far");
    f.require(Ingress, 8080, proto::TCP);
    let mut cases = Vec::new();
    for words in [0u8, 1, 10] {
        cases.push((
            format!("IPv4, TCP at {}", 20 + 4 * words as usize),
            syn4_with_options(words, 8080),
            syn4_with_options(words, 9090),
        ));
    }
    for units in [0u8, 2, 140] {
        cases.push((
            format!("IPv6, TCP at {}", 40 + 8 * (units as usize + 1)),
            syn6_behind_long_options(units, 8080),
            syn6_behind_long_options(units, 9090),
        ));
    }
    for (what, to_8080, to_9090) in &cases {
        assert!(
            !f.run(Ingress, to_8080),
            "{what}: a SYN to 8080 must be dropped"
        );
        assert!(f.run(Ingress, to_9090), "{what}: a SYN to 9090 has no rule");
    }
    assert_eq!(syn6_behind_long_options(140, 80).len(), 14 + 40 + 1128 + 20);
    assert_eq!(
        count(&f, reason::DROP_AUTH_REQUIRED, Ingress),
        cases.len() as u64
    );
    assert_eq!(count(&f, reason::DROP_INVALID, Ingress), 0);
}

/// Before the fix a chain of 5 or more headers was judged as protocol 60
/// with ports 0 and passed.
#[test]
fn unwalkable_extension_header_chains_drop_156() {
    let f = Fixture::new("xh-long");
    f.require(Ingress, 8080, proto::TCP);
    f.authenticate(REMOTE_NODE, in_an_hour());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut events = EventReader::open(f.pins.path()).expect("events");
    for chain in [
        &[60u8; 9][..],
        &[60; 16],
        &[0, 43, 44, 51, 60, 60, 60, 60, 60],
    ] {
        assert!(
            !f.run(Ingress, &syn6(chain, 8080)),
            "{} headers must drop, even for an authenticated pair",
            chain.len()
        );
        assert!(
            !f.run(Ingress, &syn6(chain, 9090)),
            "and on a port without a rule"
        );
    }
    // "No next header": nothing to judge by.
    assert!(!f.run(Ingress, &syn6(&[60, 59], 8080)));
    assert!(!f.run(Egress, &syn6(&[59], 8080)));
    assert_eq!(count(&f, reason::DROP_INVALID_EXTHDR, Ingress), 7);
    assert_eq!(count(&f, reason::DROP_INVALID_EXTHDR, Egress), 1);
    let ev = events.drain_now();
    assert!(
        ev.iter()
            .any(|e| e.reason == reason::DROP_INVALID_EXTHDR && !e.forwarded),
        "observe shows the drop: {ev:?}"
    );
    assert_eq!(
        reason::description(reason::DROP_INVALID_EXTHDR),
        "Invalid IPv6 extension header"
    );
}

/// Case (1) of the review: after a packet slipped through, the server's
/// SYN-ACK created a tracked flow, and the client's later SYN on the same
/// tuple passed as its "reply". Only opening packets create flows now.
#[test]
fn a_syn_ack_does_not_create_a_tracked_flow() {
    let f = Fixture::new("ct-synack");
    f.require(Ingress, 8080, proto::TCP);
    // The local pod (the server) sends a SYN-ACK to the remote's port
    // 40000: no egress rule, it passes.
    let synack = frame(
        IpAddr::V4(LOCAL_V4),
        IpAddr::V4(REMOTE_V4),
        L4::Tcp {
            sport: 8080,
            dport: 40000,
            flags: SYN_ACK,
        },
        0,
    );
    assert!(f.run(Egress, &synack));
    // The remote's SYN and later segments on that tuple are judged.
    assert!(!f.run(Ingress, &tcp(Ingress, 8080, SYN)), "SYN not a reply");
    assert!(!f.run(Ingress, &tcp(Ingress, 8080, ACK)), "ACK not a reply");
    assert_eq!(count(&f, reason::PASS_REPLY, Ingress), 0);
    assert_eq!(count(&f, reason::DROP_AUTH_REQUIRED, Ingress), 2);
}

/// A SYN on the reverse tuple of a tracked flow opens a new connection: it
/// is judged, not passed as a reply.
#[test]
fn a_syn_is_never_a_reply() {
    let f = Fixture::new("ct-syn");
    f.require(Ingress, 0, proto::TCP);
    // The local pod opens local:8080 → remote:40000 (no egress rule).
    let out = frame(
        IpAddr::V4(LOCAL_V4),
        IpAddr::V4(REMOTE_V4),
        L4::Tcp {
            sport: 8080,
            dport: 40000,
            flags: SYN,
        },
        0,
    );
    assert!(f.run(Egress, &out));
    assert!(
        f.run(Ingress, &tcp(Ingress, 8080, SYN_ACK)),
        "its SYN-ACK is a reply"
    );
    assert!(
        !f.run(Ingress, &tcp(Ingress, 8080, SYN)),
        "a SYN from the remote on that tuple is not"
    );
}

/// A tracked flow is keyed by the direction of its first packet: a flow
/// the pod received does not make the pod's own packets in the same
/// direction replies.
#[test]
fn tracked_flows_keep_their_direction() {
    let f = Fixture::new("ct-dir");
    f.require(Egress, 8080, proto::UDP);
    // The local pod receives remote:8080 → local:40000 (no ingress rule):
    // tracked as an ingress flow.
    let inbound = frame(
        IpAddr::V4(REMOTE_V4),
        IpAddr::V4(LOCAL_V4),
        L4::Udp {
            sport: 8080,
            dport: 40000,
        },
        4,
    );
    assert!(f.run(Ingress, &inbound));
    // Its reply, local:40000 → remote:8080 on egress, is a reply ...
    let reply = frame(
        IpAddr::V4(LOCAL_V4),
        IpAddr::V4(REMOTE_V4),
        L4::Udp {
            sport: 40000,
            dport: 8080,
        },
        4,
    );
    assert!(f.run(Egress, &reply), "reply of a received flow");
    assert_eq!(count(&f, reason::PASS_REPLY, Egress), 1);
    // ... but a packet the pod sends in the flow's own direction is not:
    // an egress packet remote:8080 → local:40000 (a forged source the pod
    // puts on the wire) must not be taken for the tracked flow's reply.
    let forged = frame(
        IpAddr::V4(REMOTE_V4),
        IpAddr::V4(LOCAL_V4),
        L4::Udp {
            sport: 8080,
            dport: 40000,
        },
        4,
    );
    f.run(Egress, &forged);
    assert_eq!(count(&f, reason::PASS_REPLY, Egress), 1, "no second reply");
}

/// test_run's dummy socket belongs to the caller's cgroup, and the source
/// check walks the cgroups below the root, as pods are. A test runner in
/// the root cgroup therefore runs the test `name` again in a child process
/// placed in a fresh cgroup first: true in that child (run the body), false
/// in the parent once the child passed.
fn in_own_cgroup(name: &str) -> bool {
    const ENV: &str = "MESHAUTH_TEST_IN_CGROUP";
    if std::env::var_os(ENV).is_some() {
        return true;
    }
    let root = cgroup2_root();
    let cg = root.join(format!("meshauth-test-src-{}-{name}", std::process::id()));
    std::fs::create_dir(&cg).unwrap_or_else(|e| panic!("{}: {e}", cg.display()));
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
            cg.display()
        ))
        .arg(std::env::current_exe().expect("current exe"))
        .args([name, "--exact", "--test-threads=1"])
        .env(ENV, "1")
        .output()
        .expect("re-running the test in a cgroup");
    let _ = std::fs::remove_dir(&cg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} in its own cgroup: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// The cgroup v2 id of this process's cgroup: the dummy socket test_run
/// gives the packet belongs to it.
fn own_cgroup_id() -> u64 {
    let line = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = line
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup");
    let root = cgroup2_root();
    let dir = root.join(rel.trim_start_matches('/'));
    std::fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .ino()
}

fn with_source_check(tag: &str) -> Fixture {
    Fixture::with_config(
        tag,
        DatapathConfig {
            check_source: true,
            ..DatapathConfig::default()
        },
    )
}

fn udp_from(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    frame(
        src,
        dst,
        L4::Udp {
            sport: 5000,
            dport: 5353,
        },
        4,
    )
}

#[test]
fn a_known_pod_may_send_only_from_its_own_addresses() {
    if !in_own_cgroup("a_known_pod_may_send_only_from_its_own_addresses") {
        return;
    }
    let f = with_source_check("src-known");
    EndpointMap::open(f.pins.path())
        .unwrap()
        .insert(&Endpoint {
            cgroup: own_cgroup_id(),
            identity: LOCAL_ID,
            addresses: vec![LOCAL_V4.into(), LOCAL_V6.into()],
        })
        .unwrap();
    let world4: IpAddr = Ipv4Addr::new(192, 0, 2, 9).into();
    assert!(f.run(Egress, &udp_from(LOCAL_V4.into(), REMOTE_V4.into())));
    assert!(f.run(Egress, &udp_from(LOCAL_V6.into(), REMOTE_V6.into())));
    // Another pod's address (an identity), and an address nobody owns.
    assert!(!f.run(Egress, &udp_from(REMOTE_V4.into(), LOCAL_V4.into())));
    assert!(!f.run(Egress, &udp_from(REMOTE_V6.into(), LOCAL_V6.into())));
    assert!(!f.run(Egress, &udp_from(world4, REMOTE_V4.into())));
    assert_eq!(count(&f, reason::DROP_INVALID_SOURCE_IP, Egress), 3);
    // Link-scope sources never leave the pod's link: not checked.
    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    let ll: IpAddr = "fe80::1".parse::<Ipv6Addr>().unwrap().into();
    assert!(f.run(Egress, &udp_from(lo, lo)));
    assert!(f.run(Egress, &udp_from(ll, REMOTE_V6.into())));
    // Ingress is not source-checked here (the sender's node does it).
    assert!(f.run(Ingress, &udp_from(REMOTE_V4.into(), LOCAL_V4.into())));
    // The check comes before the socket cache: a cached pass for the real
    // source does not carry a spoofed one.
    assert!(!f.run(Egress, &udp_from(REMOTE_V4.into(), LOCAL_V4.into())));
    assert_eq!(count(&f, reason::DROP_INVALID_SOURCE_IP, Egress), 4);
    // Removing the pod's address takes its right away.
    EndpointMap::open(f.pins.path())
        .unwrap()
        .remove_address(own_cgroup_id(), LOCAL_V4.into())
        .unwrap();
    assert!(!f.run(Egress, &udp_from(LOCAL_V4.into(), REMOTE_V4.into())));
}

#[test]
fn an_unknown_sender_may_not_claim_a_cluster_pods_address() {
    let f = with_source_check("src-unknown");
    // Nothing registered for this cgroup: a pod the agent has not learned
    // of, or a hostNetwork pod.
    assert!(
        !f.run(Egress, &udp_from(LOCAL_V4.into(), REMOTE_V4.into())),
        "a cluster pod's address"
    );
    let world4: IpAddr = Ipv4Addr::new(192, 0, 2, 9).into();
    assert!(f.run(Egress, &udp_from(world4, REMOTE_V4.into())), "world");
    assert_eq!(count(&f, reason::DROP_INVALID_SOURCE_IP, Egress), 1);
}

#[test]
fn without_the_source_check_nothing_is_checked() {
    let f = Fixture::new("src-off");
    assert!(f.run(Egress, &udp_from(REMOTE_V4.into(), LOCAL_V4.into())));
    assert_eq!(count(&f, reason::DROP_INVALID_SOURCE_IP, Egress), 0);
}

/// Before the fix every dropped packet put one event in the ring buffer.
#[test]
fn drop_events_are_rate_limited_per_flow_and_counters_stay_exact() {
    let f = Fixture::new("ev-flow");
    f.require(Ingress, 8080, proto::TCP);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut events = EventReader::open(f.pins.path()).expect("events");
    let r =
        f.dp.test_run(Ingress, &tcp(Ingress, 8080, SYN), 1000)
            .unwrap();
    assert_eq!(r.return_value, 0);
    // A flood from random source ports at one port is one flow.
    for sport in 0..100u16 {
        let pkt = frame(
            IpAddr::V4(REMOTE_V4),
            IpAddr::V4(LOCAL_V4),
            L4::Tcp {
                sport: 30000 + sport,
                dport: 8080,
                flags: SYN,
            },
            0,
        );
        assert!(!f.run(Ingress, &pkt));
    }
    let ev = events.drain_now();
    assert_eq!(ev.len(), 1, "one event for the flow within the interval");
    assert_eq!(count(&f, reason::DROP_AUTH_REQUIRED, Ingress), 1100);
    assert_eq!(
        count(&f, reason::EVENT_FLOW_EVENT_SUPPRESSED, Ingress),
        1099
    );
    // Another port is another flow.
    f.require(Ingress, 8081, proto::TCP);
    assert!(!f.run(Ingress, &tcp(Ingress, 8081, SYN)));
    let ev = events.drain_now();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].local.1, 8081);
}

#[test]
fn flow_events_have_a_per_cpu_budget() {
    let f = Fixture::with_config(
        "ev-budget",
        DatapathConfig {
            event_interval: Duration::ZERO,
            event_budget: 10,
            ..DatapathConfig::default()
        },
    );
    f.require(Ingress, 0, proto::TCP);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut events = EventReader::open(f.pins.path()).expect("events");
    // No per-flow limit: 100 drops within one second on one CPU (test_run
    // runs the repetitions on the calling CPU) meet the budget.
    let r =
        f.dp.test_run(Ingress, &tcp(Ingress, 8080, SYN), 100)
            .unwrap();
    assert_eq!(r.return_value, 0);
    assert_eq!(events.drain_now().len(), 10);
    assert_eq!(count(&f, reason::DROP_AUTH_REQUIRED, Ingress), 100);
    assert_eq!(count(&f, reason::EVENT_FLOW_EVENT_SUPPRESSED, Ingress), 90);
}
