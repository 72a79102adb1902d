//! Differential testing of the datapath: random map contents and random,
//! malformed and odd packets (IPv4 and IPv6, options, extension header
//! chains, fragments, truncations, odd protocols, flipped bytes, replies of
//! earlier packets) go both to the real programs through
//! `BPF_PROG_TEST_RUN` and to the reference model
//! (`auth_ebpf::testing::model`); each packet's verdict and counted reason
//! must agree. Every disagreement fails the test, printed with the packet in
//! hex and the maps it met.
//!
//! The test command runs a short deterministic run (fixed seed). A long
//! run: `MESHAUTH_DIFF_SECS=600 cargo test -p auth-ebpf --test differential
//! -- --nocapture` (random seeds, printed); `MESHAUTH_DIFF_SEED=N` replays
//! one round.
//!
//! The test process moves itself into a cgroup of its own, three levels
//! deep, so that the source check's walk up the sending socket's cgroups
//! (the test run's socket is made in the caller's cgroup) meets pods the
//! random endpoints map marks at those levels; it moves back at the end.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use auth_ebpf::maps::auth::AuthMap;
use auth_ebpf::maps::config::{ConfigMap, DatapathConfig, Mode};
use auth_ebpf::maps::endpoints::{Endpoint, EndpointMap};
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use auth_ebpf::testing::TestPinDir;
use auth_ebpf::testing::model::{Model, ModelAuthKey, ModelConfig, ModelRule, Outcome, parse};
use auth_ebpf::types::{AuthKey, Direction};
use auth_ebpf::{Datapath, LoadOptions};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// The test process in a cgroup of its own: `<cgroup2>/meshauth-diff-<pid>/a/b`.
struct OwnCgroup {
    mount: PathBuf,
    original: String,
    dirs: Vec<PathBuf>,
    /// Cgroup ids of levels 1, 2, … down to the process's cgroup.
    ancestors: Vec<u64>,
}

impl OwnCgroup {
    fn enter() -> Self {
        let mount = auth_ebpf::attach::cgroup2_mounts()
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no cgroup2 mount"));
        let original = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            .unwrap_or_else(|| panic!("no cgroup v2 line in /proc/self/cgroup"));
        let top = mount.join(format!("meshauth-diff-{}", std::process::id()));
        let dirs = vec![top.clone(), top.join("a"), top.join("a/b")];
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        }
        let procs = dirs[2].join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| panic!("moving into {}: {e}", procs.display()));
        let now = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let path = now
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or_default()
            .to_owned();
        // Levels count from the hierarchy's root: every component of the
        // path is one level.
        let mut ancestors = Vec::new();
        let mut p = mount.clone();
        for comp in path
            .trim_start_matches('/')
            .split('/')
            .filter(|c| !c.is_empty())
        {
            p = p.join(comp);
            ancestors.push(
                std::fs::metadata(&p)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                    .ino(),
            );
        }
        assert!(
            ancestors.len() >= 3,
            "the process is not in its own cgroup: {path}"
        );
        Self {
            mount,
            original,
            dirs,
            ancestors,
        }
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let back = self
            .mount
            .join(self.original.trim_start_matches('/'))
            .join("cgroup.procs");
        let _ = std::fs::write(back, std::process::id().to_string());
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

const IDS: &[u32] = &[0, 1, 2, 255, 256, 257, 258, 259, 260, u32::MAX];
const PORTS: &[u16] = &[0, 53, 80, 443, 8080, 40000, 40001, 65535];

fn v4_pool() -> Vec<IpAddr> {
    [
        [10, 1, 0, 1],
        [10, 1, 0, 2],
        [10, 1, 0, 3],
        [10, 2, 0, 1],
        [10, 2, 0, 2],
        [127, 0, 0, 1],
        [169, 254, 1, 1],
        [0, 0, 0, 0],
        [192, 168, 7, 7],
    ]
    .into_iter()
    .map(|o| IpAddr::V4(Ipv4Addr::from(o)))
    .collect()
}

fn v6_pool() -> Vec<IpAddr> {
    [
        "fd00::1",
        "fd00::2",
        "fd00::3",
        "fd00:1::1",
        "fd00:1::2",
        "::1",
        "fe80::1",
        "::",
        "2001:db8::7",
    ]
    .into_iter()
    .map(|s| IpAddr::V6(s.parse::<Ipv6Addr>().unwrap_or(Ipv6Addr::LOCALHOST)))
    .collect()
}

fn random_addr(rng: &mut StdRng, v6: bool) -> IpAddr {
    if rng.random_bool(0.1) {
        return if v6 {
            IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
        } else {
            IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
        };
    }
    let pool = if v6 { v6_pool() } else { v4_pool() };
    *pool.choose(rng).unwrap_or(&pool[0])
}

/// Random map contents, written to the real maps and the model alike.
/// What packets aim at: the rules, and each identity's host addresses.
#[derive(Default)]
struct Targets {
    rules: Vec<ModelRule>,
    hosts: BTreeMap<u32, Vec<IpAddr>>,
}

fn setup(rng: &mut StdRng, pins: &TestPinDir, ancestors: &[u64]) -> (Model, String, Targets) {
    let path = pins.path();
    let mut desc = String::new();
    let mut model = Model::default();
    model.ancestors = ancestors.to_vec();
    let cfg = ModelConfig {
        audit: rng.random_bool(0.2),
        drop_unknown_local: rng.random_bool(0.3),
        check_source: rng.random_bool(0.4),
    };
    model.config = cfg;
    ConfigMap::open(path)
        .and_then(|mut c| {
            c.set(&DatapathConfig {
                mode: if cfg.audit {
                    Mode::Audit
                } else {
                    Mode::Enforce
                },
                drop_unknown_local: cfg.drop_unknown_local,
                check_source: cfg.check_source,
                socket_cache: rng.random_bool(0.5),
                ..DatapathConfig::default()
            })
        })
        .unwrap_or_else(|e| panic!("config: {e}"));
    let _ = writeln!(desc, "config: {cfg:?}");

    let mut ipc = Ipcache::open(path).unwrap_or_else(|e| panic!("{e}"));
    let mut prefixes: Vec<Prefix> = v4_pool()
        .into_iter()
        .chain(v6_pool())
        .filter(|_| rng.random_bool(0.7))
        .map(Prefix::host)
        .collect();
    for (a, len) in [
        ("10.1.0.0", 16),
        ("10.0.0.0", 8),
        ("0.0.0.0", 0),
        ("fd00::", 16),
        ("fd00:1::", 32),
        ("::", 0),
    ] {
        if rng.random_bool(0.3) {
            prefixes.push(Prefix {
                addr: a.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                len,
            });
        }
    }
    let mut present: Vec<(u32, u16)> = Vec::new();
    let mut targets = Targets::default();
    for p in prefixes {
        let id = if rng.random_bool(0.6) {
            rng.random_range(256..261)
        } else {
            *IDS.choose(rng).unwrap_or(&256)
        };
        let node = rng.random_range(0..4u16);
        present.push((id, node));
        ipc.insert(p, id, node).unwrap_or_else(|e| panic!("{e}"));
        if p == Prefix::host(p.addr) {
            targets.hosts.entry(id).or_default().push(p.addr);
        }
        model.ipcache_insert(p, id, node);
        let _ = writeln!(desc, "ipcache {p} → {id} node {node}");
    }

    let mut pol = PolicyMap::open(path).unwrap_or_else(|e| panic!("{e}"));
    // Mostly rules between identities the ipcache holds, so that packets
    // meet them; some between any identities.
    let some_id = |rng: &mut StdRng| {
        if rng.random_bool(0.8) && !present.is_empty() {
            present.choose(rng).map_or(256, |(id, _)| *id)
        } else {
            *IDS.choose(rng).unwrap_or(&256)
        }
    };
    let mut rules = Vec::new();
    for _ in 0..rng.random_range(0..25) {
        let rule = ModelRule {
            local: some_id(rng),
            remote: if rng.random_bool(0.3) {
                0
            } else {
                some_id(rng)
            },
            port: *[0u16, 0, 80, 80, 8080, 53, 40000, 65535]
                .choose(rng)
                .unwrap_or(&0),
            proto: *[0u8, 0, 6, 6, 17, 1, 58, 132].choose(rng).unwrap_or(&6),
            direction: if rng.random_bool(0.5) {
                Direction::Ingress
            } else {
                Direction::Egress
            },
        };
        // Often the same pair again at other specificities (any port, any
        // protocol, any cluster identity) with other auth types, so that
        // precedence decides.
        let mut family = vec![rule];
        if rng.random_bool(0.5) {
            for _ in 0..rng.random_range(1..4) {
                let mut r = rule;
                match rng.random_range(0..4) {
                    0 => r.port = 0,
                    1 => (r.port, r.proto) = (0, 0),
                    2 => r.remote = 0,
                    _ => r.port = *[80u16, 8080, 53].choose(rng).unwrap_or(&80),
                }
                family.push(r);
            }
        }
        for rule in family {
            let auth_type = *[0u8, 1, 1, 1, 2].choose(rng).unwrap_or(&1);
            pol.insert(
                PolicyRule {
                    local: rule.local,
                    remote: rule.remote,
                    port: rule.port,
                    proto: rule.proto,
                    direction: rule.direction,
                },
                auth_type,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            model.policy.insert(rule, auth_type);
            rules.push((rule, auth_type));
            targets.rules.push(rule);
            let _ = writeln!(desc, "policy {rule:?} → auth type {auth_type}");
        }
    }

    let mut auth = AuthMap::open(path).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..rng.random_range(0..30) {
        // Mostly the pairs the rules ask for, on the node the ipcache says.
        let k = match (rules.choose(rng), present.choose(rng)) {
            (Some((rule, t)), Some((remote, node))) if rng.random_bool(0.8) && *t != 0 => {
                ModelAuthKey {
                    local: rule.local,
                    remote: if rule.remote == 0 {
                        *remote
                    } else {
                        rule.remote
                    },
                    node: *node,
                    auth_type: *t,
                }
            }
            _ => ModelAuthKey {
                local: *IDS.choose(rng).unwrap_or(&256),
                remote: *IDS.choose(rng).unwrap_or(&257),
                node: rng.random_range(0..4),
                auth_type: *[1u8, 2].choose(rng).unwrap_or(&1),
            },
        };
        let valid = rng.random_bool(0.7);
        let expiry = if valid {
            SystemTime::now() + Duration::from_secs(3600)
        } else {
            SystemTime::now() - Duration::from_secs(3600)
        };
        auth.insert(
            AuthKey {
                local_id: k.local,
                remote_id: k.remote,
                remote_node_id: k.node,
                auth_type: k.auth_type,
                pad: 0,
            },
            expiry,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        model.auth.insert(k, valid);
        let _ = writeln!(desc, "auth {k:?} valid {valid}");
    }

    // Pods at the levels of the process's cgroups, owning some addresses.
    let mut eps = EndpointMap::open(path).unwrap_or_else(|e| panic!("{e}"));
    for &cgroup in ancestors {
        if !rng.random_bool(0.4) {
            continue;
        }
        let addresses: Vec<IpAddr> = v4_pool()
            .into_iter()
            .chain(v6_pool())
            .filter(|_| rng.random_bool(0.25))
            .collect();
        eps.insert(&Endpoint {
            cgroup,
            identity: 256,
            addresses: addresses.clone(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        model.endpoints.insert((cgroup, None));
        for a in &addresses {
            model.endpoints.insert((cgroup, Some(*a)));
        }
        let _ = writeln!(desc, "endpoint cgroup {cgroup} owns {addresses:?}");
    }
    (model, desc, targets)
}

/// One packet as it was sent, to answer it later.
#[derive(Clone, Copy)]
struct Sent {
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    direction: Direction,
}

fn l4_bytes(rng: &mut StdRng, proto: u8, sport: u16, dport: u16, reply: bool) -> Vec<u8> {
    let mut b = Vec::new();
    match proto {
        6 => {
            let flags = if reply {
                *[0x12u8, 0x10, 0x02, 0x11].choose(rng).unwrap_or(&0x12)
            } else {
                *[0x02u8, 0x02, 0x10, 0x12, 0x18, 0x11, 0x04, rng.random()]
                    .choose(rng)
                    .unwrap_or(&2)
            };
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&rng.random::<[u8; 8]>());
            b.extend_from_slice(&[0x50, flags]);
            b.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        }
        17 => {
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&[0, 8, 0, 0]);
        }
        1 | 58 => {
            let (req, rep) = if proto == 1 { (8u8, 0u8) } else { (128, 129) };
            let t = if reply {
                rep
            } else {
                *[req, req, rep, 3, 1, 135, rng.random()]
                    .choose(rng)
                    .unwrap_or(&req)
            };
            // An echo's identifier rides in the port the requester used.
            let id = if reply { dport } else { sport };
            b.extend_from_slice(&[t, 0, 0, 0]);
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&[0, 1]);
        }
        _ => {
            let n = rng.random_range(0..16);
            b.extend((0..n).map(|_| rng.random::<u8>()));
        }
    }
    b
}

/// A random packet (an Ethernet frame) and the direction to judge it in.
/// A packet of a flow a rule covers: from and to host addresses of its
/// identities, on its port and protocol, in its direction.
fn aimed(rng: &mut StdRng, t: &Targets) -> Option<Sent> {
    let rule = t.rules.choose(rng)?;
    let local = *t.hosts.get(&rule.local)?.choose(rng)?;
    let remote_id = if rule.remote == 0 {
        *t.hosts
            .keys()
            .filter(|id| **id >= 256)
            .collect::<Vec<_>>()
            .choose(rng)?
    } else {
        &rule.remote
    };
    let remote = *t
        .hosts
        .get(remote_id)?
        .iter()
        .filter(|a| a.is_ipv6() == local.is_ipv6())
        .collect::<Vec<_>>()
        .choose(rng)?;
    let proto = match rule.proto {
        0 => *[6u8, 17, 1].choose(rng)?,
        p => p,
    };
    let port = match rule.port {
        0 => *PORTS.choose(rng)?,
        p => p,
    };
    let other = *PORTS.choose(rng)?;
    let (src, dst, sport, dport) = match rule.direction {
        Direction::Egress => (local, *remote, other, port),
        Direction::Ingress => (*remote, local, other, port),
    };
    Some(Sent {
        v6: local.is_ipv6(),
        src,
        dst,
        proto,
        sport,
        dport,
        direction: rule.direction,
    })
}

fn packet(rng: &mut StdRng, history: &mut Vec<Sent>, targets: &Targets) -> (Direction, Vec<u8>) {
    let reply_of = (!history.is_empty() && rng.random_bool(0.3))
        .then(|| *history.choose(rng).unwrap_or(&history[0]));
    let s = match reply_of {
        Some(p) => Sent {
            v6: p.v6,
            src: p.dst,
            dst: p.src,
            proto: p.proto,
            sport: p.dport,
            dport: p.sport,
            direction: match p.direction {
                Direction::Egress => Direction::Ingress,
                Direction::Ingress => Direction::Egress,
            },
        },
        None if rng.random_bool(0.4) => match aimed(rng, targets) {
            Some(s) => s,
            None => random_sent(rng),
        },
        None => random_sent(rng),
    };
    finish(rng, history, s, reply_of.is_some())
}

fn random_sent(rng: &mut StdRng) -> Sent {
    let v6 = rng.random_bool(0.5);
    Sent {
        v6,
        src: random_addr(rng, v6),
        dst: random_addr(rng, v6),
        proto: *[6u8, 6, 6, 17, 17, 1, 58, 132, 47, rng.random()]
            .choose(rng)
            .unwrap_or(&6),
        sport: *PORTS.choose(rng).unwrap_or(&40000),
        dport: *[80u16, 80, 8080, 53, 443, 40000, 0, 65535]
            .choose(rng)
            .unwrap_or(&80),
        direction: if rng.random_bool(0.5) {
            Direction::Ingress
        } else {
            Direction::Egress
        },
    }
}

fn finish(rng: &mut StdRng, history: &mut Vec<Sent>, s: Sent, reply: bool) -> (Direction, Vec<u8>) {
    if history.len() > 64 {
        history.remove(0);
    }
    history.push(s);
    let l4 = l4_bytes(rng, s.proto, s.sport, s.dport, reply);
    let payload: Vec<u8> = (0..rng.random_range(0..24)).map(|_| rng.random()).collect();
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    if s.v6 {
        f.extend_from_slice(&[0x86, 0xdd]);
        // Extension headers: none mostly; sometimes a chain of random
        // types and lengths, fragment headers with random offsets.
        let mut exts: Vec<(u8, Vec<u8>)> = Vec::new();
        if rng.random_bool(0.3) {
            for _ in 0..rng.random_range(1..11) {
                let t = *[0u8, 43, 44, 51, 60, 60, 135, 139, 140, 59]
                    .choose(rng)
                    .unwrap_or(&60);
                let body = match t {
                    44 => {
                        let off: u16 = if rng.random_bool(0.5) {
                            0
                        } else {
                            rng.random::<u16>() & 0xfff8
                        };
                        let mut b = vec![0, 0];
                        b.extend_from_slice(&(off | u16::from(rng.random_bool(0.5))).to_be_bytes());
                        b.extend_from_slice(&rng.random::<[u8; 4]>());
                        b
                    }
                    51 => {
                        let l = rng.random_range(1..4u8);
                        let mut b = vec![0, l];
                        b.resize((usize::from(l) + 2) * 4, 0);
                        b
                    }
                    _ => {
                        let l = rng.random_range(0..3u8);
                        let mut b = vec![0, l];
                        b.resize((usize::from(l) + 1) * 8, 0);
                        b
                    }
                };
                exts.push((t, body));
            }
        }
        let first = exts.first().map_or(s.proto, |(t, _)| *t);
        let mut chain = Vec::new();
        for i in 0..exts.len() {
            let next = exts.get(i + 1).map_or(s.proto, |(t, _)| *t);
            let mut body = exts[i].1.clone();
            body[0] = next;
            chain.extend(body);
        }
        let plen = (chain.len() + l4.len() + payload.len()) as u16;
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&plen.to_be_bytes());
        f.extend_from_slice(&[first, 64]);
        for a in [s.src, s.dst] {
            match a {
                IpAddr::V6(v) => f.extend_from_slice(&v.octets()),
                IpAddr::V4(v) => f.extend_from_slice(&v.to_ipv6_mapped().octets()),
            }
        }
        f.extend(chain);
    } else {
        f.extend_from_slice(&[0x08, 0x00]);
        let ihl: u8 = if rng.random_bool(0.1) {
            rng.random_range(0..16)
        } else {
            5
        };
        let frag: u16 = if rng.random_bool(0.15) {
            rng.random::<u16>()
        } else if rng.random_bool(0.1) {
            0x4000 // don't fragment
        } else {
            0
        };
        let opts = usize::from(ihl.max(5)) * 4 - 20;
        let total = (20 + opts + l4.len() + payload.len()) as u16;
        f.extend_from_slice(&[0x40 | ihl, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 1]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, s.proto, 0, 0]);
        for a in [s.src, s.dst] {
            match a {
                IpAddr::V4(v) => f.extend_from_slice(&v.octets()),
                IpAddr::V6(v) => f.extend_from_slice(&v.octets()[12..]),
            }
        }
        f.extend((0..opts).map(|_| rng.random::<u8>()));
    }
    f.extend(l4);
    f.extend(payload);
    // Damage: a few flipped bytes, a truncation, another EtherType.
    if rng.random_bool(0.08) {
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(14..f.len());
            f[i] ^= rng.random_range(1..=255u8);
        }
    }
    if rng.random_bool(0.03) {
        let t = *[0x0806u16, 0x8100, 0x88cc, 0x0042, rng.random()]
            .choose(rng)
            .unwrap_or(&0x0806);
        f[12..14].copy_from_slice(&t.to_be_bytes());
    }
    // Truncated anywhere after the fixed IP header: BPF_PROG_TEST_RUN
    // refuses (EINVAL) an IP packet shorter than that, as the stack never
    // hands one to a socket.
    if rng.random_bool(0.15) {
        let min = 14
            + match u16::from_be_bytes([f[12], f[13]]) {
                0x0800 => 20,
                0x86dd => 40,
                _ => 0,
            };
        let n = rng.random_range(min..=f.len());
        f.truncate(n);
    }
    (s.direction, f)
}

fn counters(m: &MetricsReader) -> BTreeMap<(u8, u8), u64> {
    m.read()
        .unwrap_or_else(|e| panic!("metrics: {e}"))
        .into_iter()
        .filter(|c| !reason::is_event(c.reason))
        .map(|c| {
            let d = match c.direction {
                Direction::Ingress => 1,
                Direction::Egress => 2,
            };
            ((c.reason, d), c.packets)
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One round: a fresh datapath, random maps, `packets` random packets.
/// Returns the disagreements, described.
fn round(
    seed: u64,
    packets: usize,
    ancestors: &[u64],
) -> (Vec<String>, BTreeMap<Option<u8>, usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let pins = TestPinDir::new("diff");
    let dp = Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        config: DatapathConfig::default(),
        auth_capacity: None,
        ipcache_capacity: None,
    })
    .unwrap_or_else(|e| panic!("loading the datapath: {e}"));
    let (mut model, desc, targets) = setup(&mut rng, &pins, ancestors);
    let metrics = MetricsReader::open(pins.path()).unwrap_or_else(|e| panic!("{e}"));
    let mut history = Vec::new();
    let mut bad = Vec::new();
    let mut seen: BTreeMap<Option<u8>, usize> = BTreeMap::new();
    for i in 0..packets {
        let (dir, frame) = packet(&mut rng, &mut history, &targets);
        let want: Outcome = model.run(dir, &frame);
        let before = counters(&metrics);
        let r = dp.test_run(dir, &frame, 1).unwrap_or_else(|e| {
            panic!(
                "test run of {dir:?} {} ({} bytes): {e} ({:?})",
                hex(&frame),
                frame.len(),
                std::error::Error::source(&e).map(ToString::to_string)
            )
        });
        let after = counters(&metrics);
        let changed: Vec<u8> = after
            .iter()
            .filter(|(k, v)| before.get(k).copied().unwrap_or(0) != **v)
            .map(|((r, _), _)| *r)
            .collect();
        let got = Outcome {
            pass: r.return_value == 1,
            reason: match changed[..] {
                [] => None,
                [one] => Some(one),
                _ => Some(0),
            },
        };
        *seen.entry(want.reason).or_default() += 1;
        if got != want {
            bad.push(format!(
                "seed {seed} packet {i}: {dir:?} {}\n  parsed by the model: {:?}\n  model: {want:?}\n  kernel: {got:?} (return {}, counters changed: {changed:?})\n  maps:\n{}",
                hex(&frame),
                parse(dir, &frame),
                r.return_value,
                desc.lines().map(|l| format!("    {l}\n")).collect::<String>()
            ));
            if bad.len() >= 3 {
                break;
            }
        }
    }
    (bad, seen)
}

#[test]
fn the_datapath_agrees_with_its_model_on_random_maps_and_packets() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (BPF, cgroups)"
    );
    auth_ebpf::testing::ensure_bpffs();
    let cg = OwnCgroup::enter();
    let secs: u64 = std::env::var("MESHAUTH_DIFF_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let replay: Option<u64> = std::env::var("MESHAUTH_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok());
    let started = Instant::now();
    let mut seeds: Vec<u64> = match replay {
        Some(s) => vec![s],
        None => (0..24).map(|i| 0x5eed_0000 + i).collect(),
    };
    let mut failures = Vec::new();
    let mut total = 0usize;
    let mut reasons: BTreeMap<Option<u8>, usize> = BTreeMap::new();
    let mut rounds = 0;
    let mut next_random = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    loop {
        let seed = match seeds.pop() {
            Some(s) => s,
            None if started.elapsed() < Duration::from_secs(secs) => {
                next_random = next_random
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1);
                next_random
            }
            None => break,
        };
        let (bad, seen) = round(seed, 400, &cg.ancestors);
        rounds += 1;
        total += seen.values().sum::<usize>();
        for (k, v) in seen {
            *reasons.entry(k).or_default() += v;
        }
        failures.extend(bad);
        if failures.len() >= 3 {
            break;
        }
    }
    let names: Vec<String> = reasons
        .iter()
        .map(|(r, n)| match r {
            Some(r) => format!("{r}: {n}"),
            None => format!("not IP: {n}"),
        })
        .collect();
    println!(
        "{rounds} rounds, {total} packets in {:?}; by reason: {}",
        started.elapsed(),
        names.join(", ")
    );
    assert!(
        failures.is_empty(),
        "the datapath and its model disagree:\n{}",
        failures.join("\n")
    );
    // Every path was taken, so the agreement covers it.
    let hit: HashSet<Option<u8>> = reasons.keys().copied().collect();
    for want in [
        Some(reason::PASS_NO_POLICY),
        Some(reason::PASS_AUTHENTICATED),
        Some(reason::PASS_REPLY),
        Some(reason::PASS_AUDIT),
        Some(reason::PASS_NOT_ENFORCED),
        Some(reason::DROP_INVALID),
        Some(reason::DROP_INVALID_SOURCE_IP),
        Some(reason::DROP_INVALID_EXTHDR),
        Some(reason::DROP_POLICY_DENIED),
        Some(reason::DROP_AUTH_REQUIRED),
        None,
    ] {
        assert!(
            replay.is_some() || hit.contains(&want),
            "no packet took the path of {want:?}: {}",
            names.join(", ")
        );
    }
}
