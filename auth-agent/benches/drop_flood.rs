//! What a flood of dropped packets at an auth-required port costs the
//! agent: the real datapath (BPF_PROG_TEST_RUN, paced to RATE packets/s
//! for SECS seconds) drops every packet with 189, and the agent's flow
//! pipeline (the same steps as `app::tasks::spawn_flow_events`: ring buffer
//! → `to_record` → the `observe` hub) runs on its own thread, whose CPU
//! time is measured with CLOCK_THREAD_CPUTIME_ID. Same run, three rows:
//! - baseline: one event per dropped packet (the datapath before flow
//!   events were rate-limited: event interval 0, no budget);
//! - one flow: the default limits (one event per flow and second, 1,000
//!   per CPU and second), every packet from one source address;
//! - many flows: the default limits, each batch from another address.
//!
//! `cargo bench -p auth-agent --bench drop_flood` (root). Env: `RATE`
//! (default 100000), `SECS` (default 3).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use auth_agent::api::flows::{FlowHub, to_record};
use auth_ebpf::events::EventReader;
use auth_ebpf::maps::auth::AUTH_TYPE_MTLS;
use auth_ebpf::maps::config::DatapathConfig;
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use auth_ebpf::testing::{L4, TestPinDir, frame};
use auth_ebpf::types::Direction;
use auth_ebpf::{Datapath, LoadOptions};
use policy_bridge::DesiredState;

const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 1);
const LOCAL_ID: u32 = 256;
const REMOTE_ID: u32 = 257;
const BATCH: u32 = 1000;

struct Row {
    name: &'static str,
    packets: u64,
    dropped: u64,
    events: u64,
    suppressed: u64,
    cpu: Duration,
    wall: Duration,
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn run(name: &'static str, config: DatapathConfig, many_flows: bool, rate: u64, secs: u64) -> Row {
    let pins = TestPinDir::new("bench-flood");
    let dp = Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        config,
        auth_capacity: None,
        ipcache_capacity: None,
    })
    .expect("loading the datapath (root)");
    let mut ipc = Ipcache::open(pins.path()).unwrap();
    ipc.insert(Prefix::host(IpAddr::V4(LOCAL)), LOCAL_ID, 0)
        .unwrap();
    ipc.insert(
        Prefix {
            addr: IpAddr::V4(Ipv4Addr::new(10, 211, 0, 0)),
            len: 16,
        },
        REMOTE_ID,
        2,
    )
    .unwrap();
    PolicyMap::open(pins.path())
        .unwrap()
        .insert(
            PolicyRule {
                local: LOCAL_ID,
                remote: REMOTE_ID,
                port: 8080,
                proto: 6,
                direction: Direction::Ingress,
            },
            AUTH_TYPE_MTLS,
        )
        .unwrap();

    // The agent's flow pipeline on its own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let pin_dir = pins.path().to_path_buf();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut events = EventReader::open(&pin_dir).unwrap();
                let hub = FlowHub::new(4096);
                let state = DesiredState::default();
                let start = thread_cpu();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let batch =
                        tokio::time::timeout(Duration::from_millis(100), events.next_batch()).await;
                    if let Ok(batch) = batch {
                        for e in &batch.unwrap() {
                            hub.push(to_record(e, &state, "node-a"));
                            n += 1;
                        }
                    }
                }
                (n, thread_cpu() - start)
            })
        })
    };

    // The flood: BATCH packets every BATCH/rate seconds, on schedule.
    let period = Duration::from_secs_f64(BATCH as f64 / rate as f64);
    let batches = rate * secs / u64::from(BATCH);
    let t0 = Instant::now();
    for i in 0..batches {
        let src = if many_flows {
            Ipv4Addr::new(10, 211, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
        } else {
            Ipv4Addr::new(10, 211, 1, 1)
        };
        let pkt = frame(
            IpAddr::V4(src),
            IpAddr::V4(LOCAL),
            L4::Tcp {
                sport: 30000 + (i % 30000) as u16,
                dport: 8080,
                flags: 0x02,
            },
            0,
        );
        let r = dp.test_run(Direction::Ingress, &pkt, BATCH).unwrap();
        assert_eq!(r.return_value, 0, "the flood is dropped");
        let next = t0 + period * (i as u32 + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let wall = t0.elapsed();
    // Let the reader drain what is in the ring, then stop it.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (events, cpu) = reader.join().unwrap();
    let m = MetricsReader::open(pins.path()).unwrap();
    Row {
        name,
        packets: batches * u64::from(BATCH),
        dropped: m
            .packets(reason::DROP_AUTH_REQUIRED, Direction::Ingress)
            .unwrap(),
        events,
        suppressed: m
            .packets(reason::EVENT_FLOW_EVENT_SUPPRESSED, Direction::Ingress)
            .unwrap(),
        cpu,
        wall,
    }
}

fn main() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rate = env("RATE", 100_000);
    let secs = env("SECS", 3);
    let before = DatapathConfig {
        event_interval: Duration::ZERO,
        event_budget: 0,
        ..DatapathConfig::default()
    };
    let rows = [
        run("baseline: an event per drop", before, false, rate, secs),
        run(
            "rate-limited, one flow",
            DatapathConfig::default(),
            false,
            rate,
            secs,
        ),
        run(
            "rate-limited, a new flow per batch",
            DatapathConfig::default(),
            true,
            rate,
            secs,
        ),
    ];
    println!(
        "Drop flood at {rate} packets/s for {secs} s (batches of {BATCH}), agent flow pipeline CPU"
    );
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>10} {:>12} {:>9}",
        "condition", "packets", "dropped", "events", "suppressed", "reader CPU", "CPU %"
    );
    for r in &rows {
        println!(
            "{:<36} {:>9} {:>9} {:>9} {:>10} {:>9.1} ms {:>8.1}%",
            r.name,
            r.packets,
            r.dropped,
            r.events,
            r.suppressed,
            r.cpu.as_secs_f64() * 1e3,
            100.0 * r.cpu.as_secs_f64() / r.wall.as_secs_f64()
        );
    }
}
