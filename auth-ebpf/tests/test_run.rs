//! One BPF_PROG_TEST_RUN test per datapath path, on the real kernel (root).
//! Cilium's PKTGEN/SETUP/CHECK shape: build a packet, set maps, run, check
//! the verdict and the maps.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use auth_ebpf::events::EventReader;
use auth_ebpf::maps::config::{DatapathConfig, EventMask, Mode};
use auth_ebpf::maps::policy::PolicyRule;
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use auth_ebpf::signals::SignalReader;
use auth_ebpf::testing::{L4, frame, ipv4_fragment, proto};
use auth_ebpf::types::Direction::{Egress, Ingress};
use common::*;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn no_policy_passes_and_is_counted() {
    let f = Fixture::new("nopolicy");
    assert!(
        f.run(Ingress, &tcp(Ingress, 8080, SYN)),
        "no policy must pass"
    );
    assert!(
        f.run(Egress, &tcp(Egress, 8080, SYN)),
        "no policy must pass"
    );
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::PASS_NO_POLICY, Ingress).unwrap(), 1);
    assert_eq!(m.packets(reason::PASS_NO_POLICY, Egress).unwrap(), 1);
    assert_eq!(m.packets(reason::DROP_AUTH_REQUIRED, Ingress).unwrap(), 0);
}

#[test]
fn required_without_entry_drops_189_and_signals_once() {
    let f = Fixture::new("noentry");
    f.require(Ingress, 8080, proto::TCP);
    let rt = runtime();
    let _g = rt.enter();
    let mut signals = SignalReader::open(f.pins.path()).expect("signals");
    let mut events = EventReader::open(f.pins.path()).expect("events");

    assert!(
        !f.run(Ingress, &tcp(Ingress, 8080, SYN)),
        "must drop without an auth entry"
    );

    let got = signals.drain_now();
    assert_eq!(got.len(), 1, "exactly one signal: {got:?}");
    assert_eq!(got[0].key, key(REMOTE_NODE));
    let ev = events.drain_now();
    assert_eq!(ev.len(), 1, "one drop event: {ev:?}");
    assert!(!ev[0].forwarded);
    assert_eq!(ev[0].reason, reason::DROP_AUTH_REQUIRED);
    assert_eq!(ev[0].reason_desc(), "Authentication required");
    assert_eq!(ev[0].local, (IpAddr::V4(LOCAL_V4), 8080));
    assert_eq!(ev[0].remote, (IpAddr::V4(REMOTE_V4), 40000));
    assert_eq!(
        (ev[0].local_identity, ev[0].remote_identity),
        (LOCAL_ID, REMOTE_ID)
    );
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::DROP_AUTH_REQUIRED, Ingress).unwrap(), 1);
}

#[test]
fn live_entry_passes() {
    let f = Fixture::new("live");
    f.require(Ingress, 8080, proto::TCP);
    f.authenticate(REMOTE_NODE, in_an_hour());
    assert!(
        f.run(Ingress, &tcp(Ingress, 8080, SYN)),
        "live entry must pass"
    );
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::PASS_AUTHENTICATED, Ingress).unwrap(), 1);
}

#[test]
fn expired_entry_drops() {
    let f = Fixture::new("expired");
    f.require(Ingress, 8080, proto::TCP);
    f.authenticate(REMOTE_NODE, SystemTime::now() - Duration::from_secs(1));
    assert!(
        !f.run(Ingress, &tcp(Ingress, 8080, SYN)),
        "expired entry must drop"
    );
    // Replacing it in place with a live expiry lets the same flow through.
    f.authenticate(REMOTE_NODE, in_an_hour());
    assert!(f.run(Ingress, &tcp(Ingress, 8080, ACK)));
}

/// Sends the same authenticated packet until it drops, each run bracketed
/// by BOOTTIME readings; returns (packets that passed, the BOOTTIME before
/// the first drop). Panics if a packet passed although it was sent after
/// `expiry`, dropped although it ran entirely before, or nothing dropped
/// within 5 s.
fn run_until_dropped(f: &Fixture, pkt: &[u8], expiry: u64) -> (u64, u64) {
    use auth_ebpf::clock::boottime_now_ns;
    let give_up = boottime_now_ns() + 5_000_000_000;
    let mut passed = 0;
    loop {
        let before = boottime_now_ns();
        let pass = f.run(Ingress, pkt);
        let after = boottime_now_ns();
        if pass {
            assert!(
                before < expiry,
                "passed {} ns after the entry expired",
                before - expiry
            );
            passed += 1;
        } else {
            assert!(
                after >= expiry,
                "dropped {} ns before the entry expired",
                expiry - after
            );
            return (passed, before);
        }
        assert!(before < give_up, "still passing 5 s on");
    }
}

/// An entry is judged by the coarse clock only while far from its expiry
/// (`bpf/lib/clock.h`); around the expiry BOOTTIME decides, so no packet
/// passes after it and none drops before it. Packets are sent back to back
/// across the expiry, with and without the socket cache (whose deadline is
/// on the coarse clock too).
#[test]
fn no_packet_passes_after_its_entrys_expiry() {
    for socket_cache in [false, true] {
        let f = Fixture::with_config(
            "expiry-edge",
            DatapathConfig {
                socket_cache,
                ..DatapathConfig::default()
            },
        );
        f.require(Ingress, 8080, proto::TCP);
        let expiry = SystemTime::now() + Duration::from_millis(300);
        f.authenticate(REMOTE_NODE, expiry);
        let expiry_boot = auth_ebpf::clock::system_to_boottime_ns(expiry);
        let (passed, dropped_at) = run_until_dropped(&f, &tcp(Ingress, 8080, ACK), expiry_boot);
        println!(
            "socket cache {socket_cache}: {passed} packets passed, the first drop {} µs after the expiry",
            dropped_at.saturating_sub(expiry_boot) / 1000
        );
        assert!(passed > 100, "only {passed} packets before the expiry");
    }
}

/// The datapath trusts the suspended time the agent wrote (`suspended_ns`
/// in the config): with a stale one, as between a resume and the agent's
/// next look (at most a second; `clock::bump_generation_on_resume`), the
/// coarse estimate of BOOTTIME lags by the time asleep and an entry that
/// expired within it still passes. The agent's update ends that; so does a
/// config without a suspended time, or one too large, where BOOTTIME
/// decides every packet.
#[test]
fn the_coarse_clock_counts_the_suspended_time_the_agent_wrote() {
    use auth_ebpf::clock::suspended_ns;
    let f = Fixture::with_config(
        "suspended",
        DatapathConfig {
            socket_cache: false,
            ..DatapathConfig::default()
        },
    );
    f.require(Ingress, 8080, proto::TCP);
    let pkt = tcp(Ingress, 8080, ACK);
    let written = f.config().suspended_ns().expect("config");
    let now = suspended_ns();
    assert!(
        written.is_some_and(|w| w.abs_diff(now) < 1_000_000),
        "loading wrote the suspended time: {written:?} vs {now}"
    );

    f.authenticate(REMOTE_NODE, SystemTime::now() - Duration::from_secs(2));
    assert!(!f.run(Ingress, &pkt), "expired 2 s ago");

    // As if the machine had slept 10 s since the agent's last write.
    let stale = suspended_ns().wrapping_sub(10_000_000_000);
    f.config().resumed(stale).expect("config");
    assert!(
        f.run(Ingress, &pkt),
        "with the suspended time 10 s short the entry looks 8 s from expiry"
    );
    let generation = f.config().generation().expect("generation");
    let now = suspended_ns();
    assert_eq!(f.config().resumed(now).expect("config"), generation + 1);
    assert_eq!(f.config().suspended_ns().expect("config"), Some(now));
    assert!(
        !f.run(Ingress, &pkt),
        "the agent's update closes the window"
    );

    // Too large, or not written: BOOTTIME decides.
    for (what, value) in [
        ("an hour too much", now + 3_600_000_000_000),
        ("not written", u64::MAX),
    ] {
        f.config().resumed(value).expect("config");
        f.authenticate(REMOTE_NODE, SystemTime::now() - Duration::from_secs(2));
        assert!(!f.run(Ingress, &pkt), "{what}: expired 2 s ago");
        f.authenticate(REMOTE_NODE, in_an_hour());
        assert!(f.run(Ingress, &pkt), "{what}: live for an hour");
    }
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::DROP_AUTH_REQUIRED, Ingress).unwrap(), 4);
    assert_eq!(m.packets(reason::PASS_AUTHENTICATED, Ingress).unwrap(), 3);
}

#[test]
fn entry_for_another_node_drops() {
    let f = Fixture::new("othernode");
    f.require(Ingress, 8080, proto::TCP);
    f.authenticate(REMOTE_NODE + 1, in_an_hour());
    assert!(
        !f.run(Ingress, &tcp(Ingress, 8080, SYN)),
        "an entry for another node must not count"
    );
}

#[test]
fn audit_mode_passes_and_reports() {
    let cfg = DatapathConfig {
        mode: Mode::Audit,
        ..DatapathConfig::default()
    };
    let f = Fixture::with_config("audit", cfg);
    f.require(Egress, 8080, proto::TCP);
    let rt = runtime();
    let _g = rt.enter();
    let mut events = EventReader::open(f.pins.path()).expect("events");
    let mut signals = SignalReader::open(f.pins.path()).expect("signals");

    assert!(
        f.run(Egress, &tcp(Egress, 8080, SYN)),
        "audit mode must pass"
    );

    let ev = events.drain_now();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(ev[0].forwarded);
    assert_eq!(ev[0].reason, reason::PASS_AUDIT);
    assert_eq!(ev[0].direction, Egress);
    assert_eq!(
        signals.drain_now().len(),
        1,
        "audit still signals so the pair gets authenticated"
    );
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::PASS_AUDIT, Egress).unwrap(), 1);
}

#[test]
fn reply_of_tracked_flow_passes_unchecked() {
    let f = Fixture::new("reply");
    // Both directions of the local pod need auth with the remote, any port.
    f.require(Egress, 0, 0);
    f.require(Ingress, 0, 0);
    f.authenticate(REMOTE_NODE, in_an_hour());
    // The local pod opens a flow: forward, authenticated, tracked.
    assert!(f.run(Egress, &tcp(Egress, 8080, SYN)));
    // The auth entry goes away.
    assert!(f.auth().remove(&key(REMOTE_NODE)).unwrap());
    // The reply (remote:8080 → local:40000) is not re-checked ...
    let reply = frame(
        IpAddr::V4(REMOTE_V4),
        IpAddr::V4(LOCAL_V4),
        L4::Tcp {
            sport: 8080,
            dport: 40000,
            flags: SYN_ACK,
        },
        0,
    );
    assert!(f.run(Ingress, &reply), "reply of a tracked flow must pass");
    // ... but the next forward packet is, and drops.
    assert!(
        !f.run(Egress, &tcp(Egress, 8080, ACK)),
        "forward packets are checked every time"
    );
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::PASS_REPLY, Ingress).unwrap(), 1);
    assert_eq!(m.packets(reason::DROP_AUTH_REQUIRED, Egress).unwrap(), 1);
}

#[test]
fn signals_are_rate_limited_per_key() {
    let f = Fixture::new("ratelimit");
    f.require(Ingress, 8080, proto::TCP);
    let rt = runtime();
    let _g = rt.enter();
    let mut signals = SignalReader::open(f.pins.path()).expect("signals");

    let r =
        f.dp.test_run(Ingress, &tcp(Ingress, 8080, SYN), 1000)
            .expect("test run x1000");
    assert_eq!(r.return_value, 0, "all 1000 dropped");
    let got = signals.drain_now();
    assert_eq!(
        got.len(),
        1,
        "1000 packets within the 1 s interval give one signal, got {}",
        got.len()
    );
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(
        m.packets(reason::DROP_AUTH_REQUIRED, Ingress).unwrap(),
        1000
    );
    assert_eq!(m.packets(reason::EVENT_SIGNAL_SENT, Ingress).unwrap(), 1);
    assert_eq!(
        m.packets(reason::EVENT_SIGNAL_RATE_LIMITED, Ingress)
            .unwrap(),
        999,
        "the datapath counts what became of each auth-required packet's signal"
    );
    assert_eq!(m.packets(reason::EVENT_SIGNAL_LOST, Ingress).unwrap(), 0);

    // A second key (another remote node) is limited on its own.
    let mut ipc = auth_ebpf::maps::ipcache::Ipcache::open(f.pins.path()).unwrap();
    let other = Ipv4Addr::new(10, 200, 2, 1);
    ipc.insert(
        auth_ebpf::maps::ipcache::Prefix::host(other.into()),
        REMOTE_ID,
        9,
    )
    .unwrap();
    let pkt = frame(
        other.into(),
        LOCAL_V4.into(),
        L4::Tcp {
            sport: 1,
            dport: 8080,
            flags: SYN,
        },
        0,
    );
    assert!(!f.run(Ingress, &pkt));
    let got = signals.drain_now();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key.remote_node_id, 9);

    // After the interval the same key signals again.
    f.config()
        .set(&DatapathConfig {
            signal_interval: Duration::from_millis(50),
            ..DatapathConfig::default()
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(60));
    assert!(!f.run(Ingress, &tcp(Ingress, 8080, SYN)));
    assert_eq!(
        signals.drain_now().len(),
        1,
        "a new signal after the interval"
    );
}

#[test]
fn most_specific_policy_first() {
    let f = Fixture::new("specific");
    let mut pol = f.policy();
    // Port 8080/TCP needs auth; nothing else with REMOTE_ID does.
    f.require(Ingress, 8080, proto::TCP);
    assert!(!f.run(Ingress, &tcp(Ingress, 8080, SYN)));
    assert!(
        f.run(Ingress, &tcp(Ingress, 9090, SYN)),
        "other ports are not covered"
    );
    // Any cluster identity (remote 0), any port: covers cluster peers, not the world.
    pol.insert(
        PolicyRule {
            local: LOCAL_ID,
            remote: 0,
            port: 0,
            proto: 0,
            direction: Ingress,
        },
        1,
    )
    .unwrap();
    assert!(
        !f.run(Ingress, &tcp(Ingress, 9090, SYN)),
        "any-remote rule covers cluster peers"
    );
    let world = Ipv4Addr::new(192, 0, 2, 10); // no ipcache entry: world
    let pkt = frame(
        world.into(),
        LOCAL_V4.into(),
        L4::Tcp {
            sport: 1,
            dport: 9090,
            flags: SYN,
        },
        0,
    );
    assert!(
        f.run(Ingress, &pkt),
        "the world has no identity to authenticate; not covered"
    );
    // An exact rule that requires nothing beats the any-remote rule.
    pol.insert(
        PolicyRule {
            local: LOCAL_ID,
            remote: REMOTE_ID,
            port: 9090,
            proto: proto::TCP,
            direction: Ingress,
        },
        0,
    )
    .unwrap();
    assert!(f.run(Ingress, &tcp(Ingress, 9090, SYN)), "exact rule first");
}

#[test]
fn reserved_local_identity_is_not_enforced() {
    let f = Fixture::new("reserved");
    f.require(Ingress, 0, 0);
    // The local end is an address without an ipcache entry (a hostNetwork pod).
    let pkt = frame(
        REMOTE_V4.into(),
        Ipv4Addr::new(192, 0, 2, 1).into(),
        L4::Tcp {
            sport: 1,
            dport: 8080,
            flags: SYN,
        },
        0,
    );
    assert!(f.run(Ingress, &pkt));
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::PASS_NOT_ENFORCED, Ingress).unwrap(), 1);
}

#[test]
fn strict_mode_drops_unknown_pod_addresses_but_not_host_ones() {
    let cfg = DatapathConfig {
        drop_unknown_local: true,
        ..DatapathConfig::default()
    };
    let f = Fixture::with_config("strict", cfg);
    f.require(Ingress, 8080, proto::TCP);
    let to = |local: Ipv4Addr| {
        frame(
            REMOTE_V4.into(),
            local.into(),
            L4::Tcp {
                sport: 1,
                dport: 9999,
                flags: SYN,
            },
            0,
        )
    };
    // A pod the agent has not learned of yet: no ipcache entry.
    let unknown = Ipv4Addr::new(192, 0, 2, 1);
    assert!(
        !f.run(Ingress, &to(unknown)),
        "unknown pod address: dropped"
    );
    // A hostNetwork workload: the node's address, in the ipcache as host.
    let host = Ipv4Addr::new(192, 0, 2, 2);
    let mut ipc = auth_ebpf::maps::ipcache::Ipcache::open(f.pins.path()).unwrap();
    ipc.insert(auth_ebpf::maps::ipcache::Prefix::host(host.into()), 1, 0)
        .unwrap();
    assert!(f.run(Ingress, &to(host)), "host address: not enforced");
    // A known pod with no rule for this port passes as before.
    assert!(f.run(Ingress, &tcp(Ingress, 9999, SYN)));
    // Once the pod is known the same address passes (the insert bumped the
    // generation, so nothing cached stands in the way).
    ipc.insert(
        auth_ebpf::maps::ipcache::Prefix::host(unknown.into()),
        LOCAL_ID,
        0,
    )
    .unwrap();
    assert!(
        f.run(Ingress, &to(unknown)),
        "now known: no rule on 9999, passes"
    );
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::DROP_POLICY_DENIED, Ingress).unwrap(), 1);
    assert_eq!(m.packets(reason::PASS_NOT_ENFORCED, Ingress).unwrap(), 1);
    assert_eq!(
        reason::description(133),
        "Policy denied (pod address not yet known to meshauth)"
    );

    // Audit mode never drops for it.
    let audit = Fixture::with_config(
        "strictaudit",
        DatapathConfig {
            drop_unknown_local: true,
            mode: Mode::Audit,
            ..DatapathConfig::default()
        },
    );
    assert!(audit.run(Ingress, &to(unknown)));
}

#[test]
fn ipv6_udp_and_icmp_are_enforced() {
    let f = Fixture::new("v6");
    f.require(Ingress, 53, proto::UDP);
    f.require(Egress, 0, proto::ICMPV6);
    f.require(Egress, 0, proto::ICMP);
    let udp6 = frame(
        REMOTE_V6.into(),
        LOCAL_V6.into(),
        L4::Udp {
            sport: 5353,
            dport: 53,
        },
        16,
    );
    assert!(!f.run(Ingress, &udp6), "IPv6 UDP without entry drops");
    let ping6 = frame(
        LOCAL_V6.into(),
        REMOTE_V6.into(),
        L4::Echo {
            request: true,
            id: 7,
        },
        8,
    );
    assert!(!f.run(Egress, &ping6), "ICMPv6 echo without entry drops");
    let ping4 = frame(
        LOCAL_V4.into(),
        REMOTE_V4.into(),
        L4::Echo {
            request: true,
            id: 7,
        },
        8,
    );
    assert!(!f.run(Egress, &ping4), "ICMP echo without entry drops");

    f.authenticate(REMOTE_NODE, in_an_hour());
    assert!(f.run(Ingress, &udp6));
    assert!(f.run(Egress, &ping6));
    assert!(f.run(Egress, &ping4));
    // The echo reply is a reply of the tracked echo: passes with no ingress rule needed
    // and even after the entry is gone.
    f.auth().remove(&key(REMOTE_NODE)).unwrap();
    f.require(Ingress, 0, proto::ICMPV6);
    let pong6 = frame(
        REMOTE_V6.into(),
        LOCAL_V6.into(),
        L4::Echo {
            request: false,
            id: 7,
        },
        8,
    );
    assert!(
        f.run(Ingress, &pong6),
        "echo reply of a tracked echo passes"
    );
}

#[test]
fn non_first_fragment_is_judged_by_port_less_rules() {
    let f = Fixture::new("frag");
    f.require(Ingress, 8080, proto::TCP);
    let frag = ipv4_fragment(REMOTE_V4, LOCAL_V4, proto::TCP);
    assert!(
        f.run(Ingress, &frag),
        "a port rule cannot apply to a fragment without ports"
    );
    f.require(Ingress, 0, proto::TCP);
    assert!(!f.run(Ingress, &frag), "an any-port rule does");
}

#[test]
fn truncated_packet_drops_as_invalid() {
    let f = Fixture::new("invalid");
    let mut pkt = tcp(Ingress, 8080, SYN);
    pkt.truncate(14 + 20 + 2); // TCP header cut after the source port
    assert!(!f.run(Ingress, &pkt));
    let m = MetricsReader::open(f.pins.path()).expect("metrics");
    assert_eq!(m.packets(reason::DROP_INVALID, Ingress).unwrap(), 1);
}

#[test]
fn pass_events_only_when_asked() {
    let f = Fixture::new("events");
    let rt = runtime();
    let _g = rt.enter();
    let mut events = EventReader::open(f.pins.path()).expect("events");
    assert!(f.run(Ingress, &tcp(Ingress, 8080, SYN)));
    assert!(
        events.drain_now().is_empty(),
        "passes are not reported by default"
    );
    f.config()
        .set(&DatapathConfig {
            events: EventMask {
                drops: true,
                passes: true,
                audit: true,
            },
            ..DatapathConfig::default()
        })
        .unwrap();
    assert!(f.run(Ingress, &tcp(Ingress, 8081, SYN)));
    let ev = events.drain_now();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].reason, reason::PASS_NO_POLICY);
    assert_eq!(ev[0].local.1, 8081);
}

#[test]
fn signals_arrive_on_the_async_stream() {
    use futures::StreamExt as _;
    let f = Fixture::new("stream");
    f.require(Ingress, 8080, proto::TCP);
    let rt = runtime();
    rt.block_on(async {
        let mut stream = Box::pin(
            SignalReader::open(f.pins.path())
                .expect("signals")
                .into_stream(),
        );
        // Nothing yet: the stream waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), stream.next())
                .await
                .is_err(),
            "no signal before a drop"
        );
        assert!(!f.run(Ingress, &tcp(Ingress, 8080, SYN)));
        let batch = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a signal within 5 s")
            .expect("stream open")
            .expect("read ok");
        assert_eq!(
            batch.iter().map(|s| s.key).collect::<Vec<_>>(),
            vec![key(REMOTE_NODE)]
        );
    });
}
