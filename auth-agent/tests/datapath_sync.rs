//! Desired state into the real pinned ipcache and policy maps (root).

mod common;

use std::net::IpAddr;

use auth_agent::datapath_sync::{DatapathSync, policy_for};
use auth_agent::nodes::NodeTable;
use auth_ebpf::maps::ipcache::Ipcache;
use auth_ebpf::maps::policy::PolicyMap;
use auth_ebpf::testing::TestPinDir;
use auth_ebpf::types::Direction as DpDirection;
use auth_ebpf::{Datapath, LoadOptions};
use policy_bridge::{AuthRule, DesiredState, Direction, PortRange, Protocol, Remote};

fn state() -> DesiredState {
    let mut d = common::state_of(
        &[("a", "10.8.0.1"), ("b", "10.8.0.2")],
        &[
            ("10.8.1.1", 256, "a"),
            ("fd00:8::1", 256, "a"),
            ("10.8.2.1", 257, "b"),
            ("10.8.2.2", 258, "b"),
        ],
    );
    // 256 (on a) requires auth from 257 on 8080-8082/TCP; 257 (on b) from
    // any cluster identity on any port; 258 has no endpoint on a.
    d.rules.insert(AuthRule {
        local: 256,
        remote: Remote::Identity(257),
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        ports: PortRange {
            start: 8080,
            end: 8082,
        },
    });
    d.rules.insert(AuthRule {
        local: 257,
        remote: Remote::AnyCluster,
        direction: Direction::Ingress,
        protocol: Protocol::Any,
        ports: PortRange::ANY,
    });
    d
}

#[test]
fn policy_is_compiled_for_local_identities_only_with_ranges_expanded() {
    let d = state();
    let a = policy_for(&d, "a");
    assert_eq!(a.len(), 3, "{a:?}");
    assert!(
        a.iter()
            .all(|r| r.local == 256 && r.remote == 257 && r.proto == 6)
    );
    assert_eq!(
        a.iter().map(|r| r.port).collect::<Vec<_>>(),
        vec![8080, 8081, 8082]
    );
    let b = policy_for(&d, "b");
    assert_eq!(b.len(), 1);
    let r = b.first().unwrap();
    assert_eq!(
        (r.local, r.remote, r.port, r.proto),
        (257, 0, 0, 0),
        "any cluster identity, any port"
    );
    assert_eq!(r.direction, DpDirection::Ingress);

    let mut wide = state();
    wide.rules.insert(AuthRule {
        local: 256,
        remote: Remote::Identity(258),
        direction: Direction::Egress,
        protocol: Protocol::Udp,
        ports: PortRange {
            start: 1,
            end: 60000,
        },
    });
    let a = policy_for(&wide, "a");
    assert!(
        a.iter()
            .any(|r| r.remote == 258 && r.port == 0 && r.proto == 17),
        "a range too wide for the map is enforced on every port, never dropped"
    );
}

#[test]
fn maps_follow_the_desired_state_and_a_restart_rewrites_nothing() {
    let pins = TestPinDir::new("dpsync");
    let _dp = Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ..LoadOptions::default()
    })
    .expect("load");
    let nodes = NodeTable::in_memory("a");
    let d = state();
    nodes.sync(&d.nodes).unwrap();
    let mut sync = DatapathSync::open(pins.path(), nodes.clone()).unwrap();
    let r = sync.apply(&d).unwrap();
    assert_eq!(
        (r.ipcache_written, r.policy_written),
        (6, 3),
        "4 pod addresses and the 2 nodes' addresses"
    );

    let ipc = Ipcache::open(pins.path()).unwrap();
    let v = ipc.lookup("10.8.2.1".parse().unwrap()).unwrap().unwrap();
    assert_eq!((v.identity, v.node_id), (257, nodes.id_of("b").unwrap()));
    let a = *d.nodes["a"].addresses.iter().next().unwrap();
    let b = *d.nodes["b"].addresses.iter().next().unwrap();
    let v = ipc.lookup(a).unwrap().unwrap();
    assert_eq!((v.identity, v.node_id), (1, 0), "this node: host");
    let v = ipc.lookup(b).unwrap().unwrap();
    assert_eq!(
        (v.identity, v.node_id),
        (6, nodes.id_of("b").unwrap()),
        "another node: remote-node"
    );
    let v = ipc.lookup("fd00:8::1".parse().unwrap()).unwrap().unwrap();
    assert_eq!(
        (v.identity, v.node_id),
        (256, 0),
        "local pods are on node 0"
    );
    assert_eq!(
        PolicyMap::open(pins.path())
            .unwrap()
            .entries()
            .unwrap()
            .len(),
        3
    );

    // A new sync over the same maps (agent restart) has nothing to do.
    let mut again = DatapathSync::open(pins.path(), nodes.clone()).unwrap();
    assert_eq!(again.apply(&d).unwrap(), Default::default());

    // A pod moves and a rule narrows: only the difference is written.
    let mut d2 = d.clone();
    d2.endpoints.remove(&"10.8.2.2".parse::<IpAddr>().unwrap());
    d2.rules.retain(|r| r.local != 256);
    d2.rules.insert(AuthRule {
        local: 256,
        remote: Remote::Identity(257),
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        ports: PortRange::single(8080),
    });
    let r = again.apply(&d2).unwrap();
    assert_eq!((r.ipcache_written, r.ipcache_removed), (0, 1));
    assert_eq!((r.policy_written, r.policy_removed), (0, 2));
    assert!(ipc.lookup("10.8.2.2".parse().unwrap()).unwrap().is_none());
    let ports: Vec<u16> = PolicyMap::open(pins.path())
        .unwrap()
        .entries()
        .unwrap()
        .iter()
        .map(|(r, _)| r.port)
        .collect();
    assert_eq!(ports, vec![8080]);
}
