//! What an attacker who owns a pod (CAP_NET_RAW, as many runtimes grant by
//! default) can send, tried against the real programs on the real kernel:
//! three pods on one node (a bridge in a node namespace), each pod in its own
//! network namespace and cgroup under a test "kubepods" the programs are
//! attached to. The attacker is `client`; `trusted` is authenticated with
//! `server`; `server` requires authentication on TCP 8080 and UDP 5353.
//! Root; raw sockets from peer.py. Traffic stays inside the test's own
//! namespaces.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use auth_ebpf::maps::auth::{AUTH_TYPE_MTLS, AuthMap};
use auth_ebpf::maps::config::DatapathConfig;
use auth_ebpf::maps::endpoints::{Endpoint, EndpointMap};
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use auth_ebpf::testing::TestPinDir;
use auth_ebpf::types::{AuthKey, Direction};
use auth_ebpf::{Datapath, LoadOptions};
use meshauth_test_support::netns::{Netns, Pod, TestCgroup, uniq, veth};

const CLIENT_ID: u32 = 400;
const SERVER_ID: u32 = 401;
const TRUSTED_ID: u32 = 402;
const CLIENT4: &str = "10.202.0.1";
const SERVER4: &str = "10.202.0.2";
const TRUSTED4: &str = "10.202.0.3";
const CLIENT6: &str = "fd00:202::1";
const SERVER6: &str = "fd00:202::2";
const TRUSTED6: &str = "fd00:202::3";

/// The node namespace with a bridge, and one namespace per pod on it.
struct Node {
    _node: Netns,
    pods: Vec<(&'static str, Netns)>,
    cg: TestCgroup,
}

impl Node {
    fn new(tag: &str) -> Self {
        let node = Netns::new(&format!("{tag}n"));
        node.ip("link add br0 type bridge");
        node.ip("link set br0 up");
        let mut pods = Vec::new();
        for (name, v4, v6) in [
            ("client", CLIENT4, CLIENT6),
            ("server", SERVER4, SERVER6),
            ("trusted", TRUSTED4, TRUSTED6),
        ] {
            let ns = Netns::new(&format!("{tag}{}", &name[..1]));
            let t = uniq();
            let (pod_if, host_if) = (format!("p{t}"), format!("h{t}"));
            veth(&ns, &pod_if, &node, &host_if);
            node.ip(&format!("link set {host_if} master br0"));
            ns.ip(&format!("addr add {v4}/24 dev {pod_if}"));
            ns.ip(&format!("addr add {v6}/64 dev {pod_if} nodad"));
            // Strict reverse-path filtering does not help: the spoofed
            // sources below are on the same link.
            ns.exec("sysctl -qw net.ipv4.conf.all.rp_filter=1");
            pods.push((name, ns));
        }
        let cg = TestCgroup::new(tag);
        Self {
            _node: node,
            pods,
            cg,
        }
    }

    fn ns(&self, name: &str) -> &Netns {
        &self.pods.iter().find(|(n, _)| *n == name).expect("pod").1
    }

    fn spawn(&self, name: &str) -> Pod {
        Pod::spawn(name, self.ns(name), &self.cg.child(name))
    }

    /// A process in `name`'s namespace whose cgroup the programs do not
    /// cover: what a pod on a node without meshauth, or any other sender,
    /// puts on the wire. Only the receiver's ingress program judges it.
    fn spawn_outsider(&self, name: &str, cg: &TestCgroup) -> Pod {
        Pod::spawn(name, self.ns(name), &cg.child(name))
    }

    /// Tells the datapath which cgroup owns which addresses, as the agent
    /// does for the pods it knows.
    fn register(&self, pins: &Path) {
        let mut eps = EndpointMap::open(pins).expect("endpoints map");
        for (name, id, v4, v6) in [
            ("client", CLIENT_ID, CLIENT4, CLIENT6),
            ("server", SERVER_ID, SERVER4, SERVER6),
            ("trusted", TRUSTED_ID, TRUSTED4, TRUSTED6),
        ] {
            let dir = self.cg.child(name);
            let cgroup = std::fs::metadata(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .ino();
            eps.insert(&Endpoint {
                cgroup,
                identity: id,
                addresses: vec![v4.parse().unwrap(), v6.parse().unwrap()],
            })
            .expect("endpoint insert");
        }
    }
}

/// The datapath as the agent runs it: source check on, every pod known.
fn production(node: &Node, pins: &TestPinDir) -> Datapath {
    let dp = load_and_attach(pins, &node.cg.path, true);
    node.register(pins.path());
    dp
}

fn load_and_attach(pins: &TestPinDir, cgroup: &Path, check_source: bool) -> Datapath {
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        config: DatapathConfig {
            check_source,
            ..DatapathConfig::default()
        },
        ..LoadOptions::default()
    })
    .unwrap_or_else(|e| panic!("load: {e}"));
    dp.attach(cgroup)
        .unwrap_or_else(|e| panic!("attach: {e}: {e:?}"));
    dp
}

/// Identities of the three pods, the server's rules (auth from the client
/// and from the trusted pod on TCP 8080 and UDP 5353), and the trusted
/// pod's authentication with the server.
fn desired_state(pins: &Path) {
    let mut ipc = Ipcache::open(pins).expect("ipcache");
    for (ip, id) in [
        (CLIENT4, CLIENT_ID),
        (CLIENT6, CLIENT_ID),
        (SERVER4, SERVER_ID),
        (SERVER6, SERVER_ID),
        (TRUSTED4, TRUSTED_ID),
        (TRUSTED6, TRUSTED_ID),
    ] {
        ipc.insert(Prefix::host(ip.parse::<IpAddr>().unwrap()), id, 0)
            .expect("ipcache insert");
    }
    let mut pol = PolicyMap::open(pins).expect("policy");
    for remote in [CLIENT_ID, TRUSTED_ID] {
        for (port, proto) in [(8080, 6), (5353, 17)] {
            pol.insert(
                PolicyRule {
                    local: SERVER_ID,
                    remote,
                    port,
                    proto,
                    direction: Direction::Ingress,
                },
                AUTH_TYPE_MTLS,
            )
            .expect("policy insert");
        }
    }
    AuthMap::open(pins)
        .unwrap()
        .insert(
            auth_key(SERVER_ID, TRUSTED_ID),
            SystemTime::now() + Duration::from_secs(600),
        )
        .unwrap();
}

fn auth_key(local: u32, remote: u32) -> AuthKey {
    AuthKey {
        local_id: local,
        remote_id: remote,
        remote_node_id: 0,
        auth_type: AUTH_TYPE_MTLS,
        pad: 0,
    }
}

/// Both directions.
fn count_all(pins: &Path, code: u8) -> u64 {
    count(pins, code, Direction::Ingress) + count(pins, code, Direction::Egress)
}

fn count(pins: &Path, code: u8, dir: Direction) -> u64 {
    MetricsReader::open(pins)
        .expect("metrics")
        .packets(code, dir)
        .expect("metrics read")
}

/// Polls `cond` until it holds or 10 s pass; returns whether it held.
fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A TCP SYN behind a chain of IPv6 Destination Options headers: a chain
/// the datapath can walk is judged like any SYN (189 without an entry); a
/// longer one is dropped as an invalid extension header (156) — never passed
/// as an unknown protocol. Before the fix, 5 headers reached the server's
/// listening socket and drew a SYN-ACK. Sent by a managed pod (its own
/// egress program judges it first) and by an outsider (only the server's
/// ingress program does).
#[test]
fn ipv6_extension_header_chains_never_get_past_the_auth_check() {
    let node = Node::new("xh");
    let pins = TestPinDir::new("attack-xh");
    let _dp = production(&node, &pins);
    desired_state(pins.path());
    let outside = TestCgroup::new("xho");
    let mut server = node.spawn("server");
    server.ok("serve 8080");
    let mut senders = [
        ("managed", node.spawn("client")),
        ("outsider", node.spawn_outsider("client", &outside)),
    ];

    let mut sport = 41000;
    for (who, client) in &mut senders {
        for n in [0u32, 1, 4, 5, 8, 9, 16, 40] {
            let auth = count_all(pins.path(), reason::DROP_AUTH_REQUIRED);
            let exthdr = count_all(pins.path(), reason::DROP_INVALID_EXTHDR);
            sport += 1;
            let got = client.cmd(&format!("rawsyn {CLIENT6} {SERVER6} {sport} 8080 {n} 0.3"));
            assert_eq!(
                got, "none",
                "{who}: a SYN behind {n} Destination Options headers got through to the server"
            );
            // The drop is counted where it happened, before the answer.
            let (auth2, exthdr2) = (
                count_all(pins.path(), reason::DROP_AUTH_REQUIRED),
                count_all(pins.path(), reason::DROP_INVALID_EXTHDR),
            );
            if n <= 8 {
                assert_eq!(
                    (auth2 - auth, exthdr2 - exthdr),
                    (1, 0),
                    "{who}, {n} headers"
                );
            } else {
                assert_eq!(
                    (auth2 - auth, exthdr2 - exthdr),
                    (0, 1),
                    "{who}, {n} headers"
                );
            }
        }
    }
    assert!(
        count(pins.path(), reason::DROP_INVALID_EXTHDR, Direction::Ingress) >= 3,
        "the outsider's long chains were dropped at the server's ingress"
    );

    // The same SYNs pass once the client is authenticated: the test sees a
    // SYN-ACK when there is one, and a walkable chain is parsed to its TCP
    // header.
    AuthMap::open(pins.path())
        .unwrap()
        .insert(
            auth_key(SERVER_ID, CLIENT_ID),
            SystemTime::now() + Duration::from_secs(600),
        )
        .unwrap();
    for (who, client) in &mut senders {
        sport += 1;
        assert_eq!(
            client.cmd(&format!("rawsyn {CLIENT6} {SERVER6} {sport} 8080 3 2")),
            "synack",
            "{who}"
        );
        // An unwalkable chain stays dropped even for an authenticated pair.
        sport += 1;
        assert_eq!(
            client.cmd(&format!("rawsyn {CLIENT6} {SERVER6} {sport} 8080 40 0.3")),
            "none",
            "{who}"
        );
    }
}

/// One forged segment that never leaves the client pod (source = the
/// server's address:8080, destination = the client itself:45000) must not
/// make a later ordinary connection from port 45000 to the server's
/// auth-required port a "reply". Before the fix it did: the shared
/// conntrack map recorded the forged tuple and every packet of the
/// connection passed as a reply. With the source check the forged segment
/// is dropped at once (132); without it, tracked flows per endpoint and
/// only from opening packets still hold.
#[test]
fn a_forged_packet_does_not_open_a_tracked_flow() {
    forged_packet(true);
}

#[test]
fn a_forged_packet_does_not_open_a_tracked_flow_without_the_source_check() {
    forged_packet(false);
}

fn forged_packet(check_source: bool) {
    let node = Node::new(if check_source { "ct" } else { "cu" });
    let pins = TestPinDir::new("attack-ct");
    let _dp = load_and_attach(&pins, &node.cg.path, check_source);
    node.register(pins.path());
    desired_state(pins.path());
    let mut client = node.spawn("client");
    let mut server = node.spawn("server");
    server.ok("serve 8080");

    for (sport, flags, src, dst) in [
        (45000, "12", SERVER4, CLIENT4),
        (45001, "02", SERVER4, CLIENT4),
        (45002, "12", SERVER6, CLIENT6),
    ] {
        let spoof = count(
            pins.path(),
            reason::DROP_INVALID_SOURCE_IP,
            Direction::Egress,
        );
        let sent = client.cmd(&format!("rawtcp {src} 8080 {dst} {sport} {flags}"));
        assert_eq!(sent, if check_source { "eperm" } else { "ok" });
        if check_source {
            assert!(
                wait_until(|| count(
                    pins.path(),
                    reason::DROP_INVALID_SOURCE_IP,
                    Direction::Egress
                ) > spoof),
                "the forged segment is dropped as a spoofed source"
            );
        }
        let before = count(pins.path(), reason::DROP_AUTH_REQUIRED, Direction::Ingress);
        let got = client.cmd(&format!("connectfrom {src} 8080 {sport} 0.5"));
        assert!(
            got.starts_with("fail"),
            "a connection from port {sport} passed after a forged {flags} from {src}:8080: {got}"
        );
        assert!(
            count(pins.path(), reason::DROP_AUTH_REQUIRED, Direction::Ingress) > before,
            "the server's ingress dropped the connection for authentication"
        );
    }
}

/// A pod sends UDP with the source address of a pod that is authenticated
/// with the server. Before the fix the server's socket received it as
/// coming from that pod (one-way injection), even with strict rp_filter.
#[test]
fn a_spoofed_source_address_does_not_borrow_another_pods_identity() {
    let node = Node::new("sp");
    let pins = TestPinDir::new("attack-sp");
    let _dp = production(&node, &pins);
    desired_state(pins.path());
    let mut client = node.spawn("client");
    let mut server = node.spawn("server");
    let mut trusted = node.spawn("trusted");
    server.ok("serve 5353 udp");

    // The trusted pod itself gets through: the server's log sees a datagram
    // when one arrives.
    trusted.ok(&format!("udp {SERVER4} 5353 legit4 2"));
    trusted.ok(&format!("udp {SERVER6} 5353 legit6 2"));
    assert_eq!(server.cmd("seen 5353"), "seen legit4,legit6");

    for (src, dst, text) in [(TRUSTED4, SERVER4, "spoof4"), (TRUSTED6, SERVER6, "spoof6")] {
        let spoof_drops = count(
            pins.path(),
            reason::DROP_INVALID_SOURCE_IP,
            Direction::Egress,
        );
        let sent = client.cmd(&format!("rawudp {src} 7000 {dst} 5353 {text}"));
        assert!(sent == "ok" || sent == "eperm", "{sent}");
        // Either the datapath drops it (counted) or the server receives it.
        let mut seen = String::new();
        assert!(
            wait_until(|| {
                seen = server.cmd("seen 5353");
                seen.contains(text)
                    || count(
                        pins.path(),
                        reason::DROP_INVALID_SOURCE_IP,
                        Direction::Egress,
                    ) > spoof_drops
            }),
            "neither a drop nor a delivery of {text}"
        );
        assert!(
            !seen.contains(text),
            "the server received a datagram spoofed from {src}: {seen}"
        );
    }
    // A process in a pod cgroup the agent does not know (a pod it has not
    // learned of yet) may not claim a known pod's address either.
    let mut unknown = Pod::spawn("unknown", node.ns("client"), &node.cg.child("unknown"));
    let spoof_drops = count(
        pins.path(),
        reason::DROP_INVALID_SOURCE_IP,
        Direction::Egress,
    );
    assert_eq!(
        unknown.cmd(&format!(
            "rawudp {TRUSTED4} 7000 {SERVER4} 5353 spoof-unknown"
        )),
        "eperm"
    );
    assert_eq!(
        count(
            pins.path(),
            reason::DROP_INVALID_SOURCE_IP,
            Direction::Egress
        ),
        spoof_drops + 1
    );
    // And the trusted pod is not hurt by it.
    trusted.ok(&format!("udp {SERVER4} 5353 legit4b 2"));
    assert_eq!(server.cmd("seen 5353"), "seen legit4,legit6,legit4b");
}
