//! ns/packet of the datapath via BPF_PROG_TEST_RUN with repeat, beside a
//! baseline program doing one hash lookup, all in the same run. Root.
//!
//!   cargo bench -p auth-ebpf --bench datapath [-- REPEAT RUNS]
//!
//! Each row is the median over RUNS of the kernel's average time per run of
//! REPEAT repetitions (the kernel measures it; no user-space timing).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use auth_ebpf::maps::auth::{AUTH_TYPE_MTLS, AuthMap};
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::testing::{L4, TestPinDir, frame};
use auth_ebpf::types::{AuthKey, Direction};
use auth_ebpf::{Datapath, LoadOptions};
use aya::programs::{CgroupSkb, TestRun, TestRunOptions};

static BASELINE: &[u8] = aya::include_bytes_aligned!("../bpf/test/baseline.o");

const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 1);
const WILDCARD_PEER: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 2);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
    let repeat: u32 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);

    // An ACK of an established flow from `peer` to LOCAL.
    let ack_from = |peer: Ipv4Addr, dport: u16| {
        frame(
            IpAddr::V4(peer),
            IpAddr::V4(LOCAL),
            L4::Tcp {
                sport: 40000,
                dport,
                flags: 0x10,
            },
            64,
        )
    };
    let pkt = ack_from(REMOTE, 8080);
    let measure = |f: &dyn Fn() -> Duration| -> f64 {
        median((0..runs).map(|_| f().as_nanos() as f64).collect())
    };

    // Baseline: one hash lookup.
    let mut base = aya::Ebpf::load(BASELINE).expect("load baseline");
    let prog: &mut CgroupSkb = base
        .program_mut("baseline_ingress")
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("load baseline program");
    let run_base = || {
        prog.test_run(TestRunOptions {
            data_in: Some(&pkt),
            repeat,
            ..Default::default()
        })
        .expect("baseline test run")
        .duration
    };
    let baseline = measure(&run_base);

    // meshauth, three states of the maps.
    let pins = TestPinDir::new("bench");
    let dp = Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ..LoadOptions::default()
    })
    .expect("load datapath");
    let mut ipc = Ipcache::open(pins.path()).unwrap();
    ipc.insert(Prefix::host(LOCAL.into()), 256, 0).unwrap();
    ipc.insert(Prefix::host(REMOTE.into()), 257, 4).unwrap();
    // Some unrelated state so lookups are not into near-empty maps.
    for i in 0..1000u32 {
        let ip = Ipv4Addr::from(0x0a14_0000 + i);
        ipc.insert(Prefix::host(ip.into()), 1000 + i, (i % 50) as u16)
            .unwrap();
    }
    let run_on = |pkt: &[u8]| {
        dp.test_run(Direction::Ingress, pkt, repeat)
            .expect("datapath test run")
            .duration
    };
    let run_dp = || run_on(&pkt);
    let no_policy = measure(&run_dp);

    // Unrelated rules and authenticated pairs, so the policy and auth
    // lookups are not into near-empty maps either: 100 other local
    // identities with 20 rules each (exact port, any port of a protocol,
    // any port; named and any remote), 10 more rules of the local identity
    // itself, and 10,000 authenticated pairs.
    let mut pol = PolicyMap::open(pins.path()).unwrap();
    let direction = |i: u32| {
        if i.is_multiple_of(2) {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    };
    for local in 2000..2100u32 {
        for i in 0..20u32 {
            let (port, proto) = match i % 4 {
                0 | 1 => (8000 + i as u16, 6),
                2 => (0, 17),
                _ => (0, 0),
            };
            let remote = if i % 5 == 0 { 0 } else { 3000 + i };
            pol.insert(
                PolicyRule {
                    local,
                    remote,
                    port,
                    proto,
                    direction: direction(i),
                },
                AUTH_TYPE_MTLS,
            )
            .unwrap();
        }
    }
    for i in 0..10u32 {
        pol.insert(
            PolicyRule {
                local: 256,
                remote: 300 + i,
                port: 9000 + i as u16,
                proto: 6,
                direction: direction(i),
            },
            AUTH_TYPE_MTLS,
        )
        .unwrap();
    }
    let mut auth = AuthMap::open(pins.path()).unwrap();
    let later = SystemTime::now() + Duration::from_secs(3600);
    for i in 0..10_000u32 {
        let key = AuthKey {
            local_id: 2000 + i % 100,
            remote_id: 3000 + i / 100,
            remote_node_id: (i % 50) as u16,
            auth_type: AUTH_TYPE_MTLS,
            pad: 0,
        };
        auth.insert(key, later).unwrap();
    }
    pol.insert(
        PolicyRule {
            local: 256,
            remote: 257,
            port: 8080,
            proto: 6,
            direction: Direction::Ingress,
        },
        AUTH_TYPE_MTLS,
    )
    .unwrap();
    let miss = measure(&run_dp);

    auth.insert(
        AuthKey {
            local_id: 256,
            remote_id: 257,
            remote_node_id: 4,
            auth_type: AUTH_TYPE_MTLS,
            pad: 0,
        },
        SystemTime::now() + Duration::from_secs(3600),
    )
    .unwrap();
    let hit = measure(&run_dp);
    let mut cfg = auth_ebpf::maps::config::ConfigMap::open(pins.path()).unwrap();
    cfg.set(&auth_ebpf::maps::config::DatapathConfig {
        socket_cache: false,
        ..Default::default()
    })
    .unwrap();
    let hit_uncached = measure(&run_dp);

    // The least specific rule: any cluster identity, any port and protocol
    // (the policy's last probe), for another peer on the same node.
    ipc.insert(Prefix::host(WILDCARD_PEER.into()), 258, 4)
        .unwrap();
    pol.insert(
        PolicyRule {
            local: 256,
            remote: 0,
            port: 0,
            proto: 0,
            direction: Direction::Ingress,
        },
        AUTH_TYPE_MTLS,
    )
    .unwrap();
    auth.insert(
        AuthKey {
            local_id: 256,
            remote_id: 258,
            remote_node_id: 4,
            auth_type: AUTH_TYPE_MTLS,
            pad: 0,
        },
        later,
    )
    .unwrap();
    let wildcard_pkt = ack_from(WILDCARD_PEER, 7000);
    let wildcard_uncached = measure(&|| run_on(&wildcard_pkt));

    println!(
        "datapath ns/packet (BPF_PROG_TEST_RUN, cgroup_skb ingress, IPv4 TCP, repeat {repeat}, median of {runs})"
    );
    println!("| case | ns/packet | × baseline |");
    println!("| --- | ---: | ---: |");
    for (name, v) in [
        ("baseline: one hash lookup", baseline),
        ("meshauth, no policy", no_policy),
        (
            "meshauth, auth required + hit (socket's cached verdict)",
            hit,
        ),
        (
            "meshauth, auth required + hit, socket cache off (every lookup)",
            hit_uncached,
        ),
        (
            "meshauth, auth required by an any-remote any-port rule + hit, socket cache off",
            wildcard_uncached,
        ),
        ("meshauth, auth required + miss (drop 189)", miss),
    ] {
        println!("| {name} | {v:.1} | {:.2} |", v / baseline);
    }
}
