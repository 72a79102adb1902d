//! Real traffic between pods in network namespaces, each pod's process in
//! its own cgroup under a test "kubepods" cgroup the programs are attached
//! to. Root; real kernel.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use auth_ebpf::maps::auth::{AUTH_TYPE_MTLS, AuthMap};
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use auth_ebpf::testing::TestPinDir;
use auth_ebpf::types::{AuthKey, Direction};
use auth_ebpf::{Datapath, LoadOptions};
use meshauth_test_support::netns::{Netns, Pod, TestCgroup, uniq, veth};

const CLIENT_ID: u32 = 300;
const SERVER_ID: u32 = 301;
const A4: &str = "10.201.0.1";
const B4: &str = "10.201.0.2";
const A6: &str = "fd00:201::1";
const B6: &str = "fd00:201::2";

/// Two pods in their own namespaces, joined by a veth pair.
struct Topology {
    a: Netns,
    b: Netns,
    cg: TestCgroup,
}

impl Topology {
    fn new(tag: &str) -> Self {
        let a = Netns::new(&format!("{tag}a"));
        let b = Netns::new(&format!("{tag}b"));
        let t = uniq();
        let (ia, ib) = (format!("va{t}"), format!("vb{t}"));
        veth(&a, &ia, &b, &ib);
        a.ip(&format!("addr add {A4}/24 dev {ia}"));
        b.ip(&format!("addr add {B4}/24 dev {ib}"));
        a.ip(&format!("addr add {A6}/64 dev {ia} nodad"));
        b.ip(&format!("addr add {B6}/64 dev {ib} nodad"));
        let cg = TestCgroup::new(tag);
        Self { a, b, cg }
    }

    fn pods(&self) -> (Pod, Pod) {
        let a = Pod::spawn("client", &self.a, &self.cg.child("client"));
        let b = Pod::spawn("server", &self.b, &self.cg.child("server"));
        (a, b)
    }
}

/// Writes the desired state: identities for both pods (same node), and
/// "the server requires authentication from the client" on TCP 8080 and
/// UDP 5353.
fn desired_state(pins: &Path) {
    identities(pins);
    rules(pins);
}

fn identities(pins: &Path) {
    let mut ipc = Ipcache::open(pins).expect("ipcache");
    for (ip, id) in [
        (A4, CLIENT_ID),
        (A6, CLIENT_ID),
        (B4, SERVER_ID),
        (B6, SERVER_ID),
    ] {
        ipc.insert(Prefix::host(ip.parse::<IpAddr>().unwrap()), id, 0)
            .expect("ipcache insert");
    }
}

fn rules(pins: &Path) {
    let mut pol = PolicyMap::open(pins).expect("policy");
    for (port, proto) in [(8080, 6), (5353, 17)] {
        pol.insert(
            PolicyRule {
                local: SERVER_ID,
                remote: CLIENT_ID,
                port,
                proto,
                direction: Direction::Ingress,
            },
            AUTH_TYPE_MTLS,
        )
        .expect("policy insert");
    }
}

fn server_key() -> AuthKey {
    AuthKey {
        local_id: SERVER_ID,
        remote_id: CLIENT_ID,
        remote_node_id: 0,
        auth_type: AUTH_TYPE_MTLS,
        pad: 0,
    }
}

fn load_and_attach(pins: &TestPinDir, cgroup: &Path) -> Datapath {
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ..LoadOptions::default()
    })
    .unwrap_or_else(|e| panic!("load: {e}"));
    dp.attach(cgroup)
        .unwrap_or_else(|e| panic!("attach: {e}: {e:?}"));
    dp
}

#[test]
fn tcp_and_udp_pass_only_after_authentication() {
    let topo = Topology::new("tu");
    let pins = TestPinDir::new("netns-tu");
    let _dp = load_and_attach(&pins, &topo.cg.path);
    desired_state(pins.path());
    let (mut client, mut server) = topo.pods();
    server.ok("serve 8080");
    server.ok("serve 5353 udp");

    let got = client.cmd(&format!("connect {B4} 8080 0.8"));
    assert!(
        got.starts_with("fail"),
        "TCP connect must fail without an auth entry: {got}"
    );
    let got = client.cmd(&format!("udp {B4} 5353 hello 0.5"));
    assert!(
        got.starts_with("fail"),
        "UDP must fail without an auth entry: {got}"
    );
    let got = client.cmd(&format!("connect {B6} 8080 0.8"));
    assert!(
        got.starts_with("fail"),
        "IPv6 TCP must fail without an auth entry: {got}"
    );

    let m = MetricsReader::open(pins.path()).unwrap();
    let drops = m
        .packets(reason::DROP_AUTH_REQUIRED, Direction::Ingress)
        .unwrap();
    assert!(drops >= 3, "drops counted at the server's ingress: {drops}");

    AuthMap::open(pins.path())
        .unwrap()
        .insert(server_key(), SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    // The first SYN after the entry passes: no drop is counted for the
    // connection (a dropped SYN would be retransmitted and still connect).
    let before = m
        .packets(reason::DROP_AUTH_REQUIRED, Direction::Ingress)
        .unwrap();
    client.ok(&format!("connect {B4} 8080 2"));
    assert_eq!(
        m.packets(reason::DROP_AUTH_REQUIRED, Direction::Ingress)
            .unwrap(),
        before,
        "the connection passed at its first SYN"
    );
    client.ok("send ping 2");
    client.ok(&format!("connect {B6} 8080 2"));
    client.ok("send ping6 2");
    client.ok(&format!("udp {B4} 5353 hello 2"));
    client.ok(&format!("udp {B6} 5353 hello6 2"));
    // An unrelated port has no rule: it was never blocked.
    server.ok("serve 9090");
    client.ok(&format!("connect {B4} 9090 2"));

    // Detaching removes enforcement: without an entry the flow now passes.
    assert!(
        AuthMap::open(pins.path())
            .unwrap()
            .remove(&server_key())
            .unwrap()
    );
    let got = client.cmd(&format!("connect {B4} 8080 0.8"));
    assert!(
        got.starts_with("fail"),
        "still enforced before detaching: {got}"
    );
    let released = Datapath::detach(pins.path(), &topo.cg.path).unwrap();
    assert_eq!(released, 2, "one link per direction released");
    assert_eq!(
        Datapath::pinned_links(pins.path(), &topo.cg.path).unwrap(),
        0
    );
    client.ok(&format!("connect {B4} 8080 2"));
}

#[test]
fn established_connection_stops_when_its_entry_expires() {
    let topo = Topology::new("ex");
    let pins = TestPinDir::new("netns-ex");
    let _dp = load_and_attach(&pins, &topo.cg.path);
    desired_state(pins.path());
    let (mut client, mut server) = topo.pods();
    server.ok("serve 8080");

    let expiry = SystemTime::now() + Duration::from_millis(2500);
    AuthMap::open(pins.path())
        .unwrap()
        .insert(server_key(), expiry)
        .unwrap();
    client.ok(&format!("connect {B4} 8080 2"));
    client.ok("send before 2");

    if let Ok(left) = expiry.duration_since(SystemTime::now()) {
        std::thread::sleep(left + Duration::from_millis(200));
    }
    let got = client.cmd("send after 1");
    assert!(
        got.starts_with("fail"),
        "data must stop once the entry expired: {got}"
    );

    // Re-authenticated (entry replaced in place): a new connection passes.
    AuthMap::open(pins.path())
        .unwrap()
        .insert(server_key(), SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    client.ok(&format!("connect {B4} 8080 2"));
    client.ok("send again 2");
}

#[test]
fn reloading_the_loader_keeps_an_authenticated_connection_flowing() {
    let topo = Topology::new("rl");
    let pins = TestPinDir::new("netns-rl");
    let tool = env!("CARGO_BIN_EXE_meshauth-datapath");
    let load = || {
        let out = Command::new(tool)
            .args(["load", "--pin-dir"])
            .arg(pins.path())
            .arg("--cgroup")
            .arg(&topo.cg.path)
            .output()
            .expect("running meshauth-datapath");
        assert!(
            out.status.success(),
            "meshauth-datapath load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // First loader process: loads, attaches, exits; enforcement stays.
    let first = load();
    assert!(first.contains("meshauth_auth: Created"), "{first}");
    desired_state(pins.path());
    let (mut client, mut server) = topo.pods();
    server.ok("serve 8080");
    let got = client.cmd(&format!("connect {B4} 8080 0.8"));
    assert!(
        got.starts_with("fail"),
        "enforced after the loader exited: {got}"
    );
    AuthMap::open(pins.path())
        .unwrap()
        .insert(server_key(), SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    client.ok(&format!("connect {B4} 8080 2"));
    client.ok("send one 2");

    // A new loader process replaces the programs while the connection runs.
    let reload = std::thread::scope(|s| {
        let h = s.spawn(load);
        for i in 0..20 {
            client.ok(&format!("send during{i} 2"));
            std::thread::sleep(Duration::from_millis(20));
        }
        h.join().expect("loader thread")
    });
    assert!(reload.contains("meshauth_auth: Reused"), "{reload}");
    for i in 0..5 {
        client.ok(&format!("send after{i} 2"));
    }
    assert_eq!(
        Datapath::pinned_links(pins.path(), &topo.cg.path).unwrap(),
        2,
        "one link per direction after the reload, the old ones released"
    );
    assert_eq!(
        AuthMap::open(pins.path()).unwrap().entries().unwrap().len(),
        1
    );
    // Still enforcing with the new programs: another client identity is dropped.
    let mut pol = PolicyMap::open(pins.path()).unwrap();
    pol.insert(
        PolicyRule {
            local: SERVER_ID,
            remote: CLIENT_ID,
            port: 9090,
            proto: 6,
            direction: Direction::Ingress,
        },
        AUTH_TYPE_MTLS,
    )
    .unwrap();
    AuthMap::open(pins.path())
        .unwrap()
        .remove(&server_key())
        .unwrap();
    server.ok("serve 9090");
    let got = client.cmd(&format!("connect {B4} 9090 0.8"));
    assert!(
        got.starts_with("fail"),
        "the reloaded programs enforce: {got}"
    );
}

#[test]
fn socket_cached_verdicts_do_not_outlive_a_policy_or_auth_change() {
    let topo = Topology::new("sc");
    let pins = TestPinDir::new("netns-sc");
    let _dp = load_and_attach(&pins, &topo.cg.path);
    identities(pins.path());
    let (mut client, mut server) = topo.pods();
    server.ok("serve 8080");

    // No policy yet: the connection's sockets cache "pass".
    client.ok(&format!("connect {B4} 8080 2"));
    for i in 0..5 {
        client.ok(&format!("send open{i} 2"));
    }
    // A rule requiring authentication arrives: the established connection
    // must stop at once, not ride on its cached verdict.
    rules(pins.path());
    let got = client.cmd("send after-policy 1");
    assert!(
        got.starts_with("fail"),
        "a cached pass must not survive a new rule: {got}"
    );

    // Authenticated: a new connection flows and caches "authenticated" ...
    AuthMap::open(pins.path())
        .unwrap()
        .insert(server_key(), SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    client.ok(&format!("connect {B4} 8080 2"));
    for i in 0..5 {
        client.ok(&format!("send authed{i} 2"));
    }
    // ... until the entry is removed (a node or rule went away).
    assert!(
        AuthMap::open(pins.path())
            .unwrap()
            .remove(&server_key())
            .unwrap()
    );
    let got = client.cmd("send after-removal 1");
    assert!(
        got.starts_with("fail"),
        "a cached pass must not survive the entry's removal: {got}"
    );
}
