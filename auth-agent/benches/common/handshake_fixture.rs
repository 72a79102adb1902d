//! What the handshake benches share: two nodes on loopback (node-a 127.0.0.1
//! initiating as identity 256, node-b 127.0.0.2 responding as 257), P-256
//! SVIDs from an rcgen CA in each node's cache, and the desired state
//! "257 requires authentication from 256".

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use meshauth_test_support::certs::{Ca, HOUR, base_time, cache_with};
use policy_bridge::{
    AuthRule, DesiredState, Direction, Endpoint, Identity, NodeInfo, PortRange, Protocol, Remote,
};
use svid_cache::SvidCache;

pub const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
pub const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
pub const L: u32 = 256;
pub const R: u32 = 257;

/// A P-256 CA and one P-256 SVID per identity (rcgen's default key is
/// ECDSA P-256 with SHA-256), each in its node's cache.
pub fn caches() -> (SvidCache, SvidCache) {
    let ca = Ca::root("bench CA");
    let now = base_time();
    let cache = |id: u32| cache_with(&ca, &[&ca.svid(id, now, HOUR)]);
    (cache(L), cache(R))
}

pub fn node(name: &str, ip: IpAddr) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        handshake_addr: ip,
        addresses: BTreeSet::from([ip]),
        wireguard_key: None,
        pod_cidrs: Default::default(),
    }
}

pub fn desired(extra_nodes: &[(&str, IpAddr)]) -> DesiredState {
    let mut d = DesiredState::default();
    for (id, ip, n) in [(L, "10.0.1.1", "node-a"), (R, "10.0.2.1", "node-b")] {
        d.identities.insert(
            id,
            Identity {
                id,
                labels: BTreeSet::new(),
            },
        );
        let ip: IpAddr = ip.parse().expect("ip");
        d.endpoints.insert(
            ip,
            Endpoint {
                ip,
                identity: id,
                node: n.into(),
                pod: format!("default/w{id}"),
            },
        );
    }
    d.nodes = BTreeMap::from([
        ("node-a".into(), node("node-a", A)),
        ("node-b".into(), node("node-b", B)),
    ]);
    for (name, ip) in extra_nodes {
        d.nodes.insert(name.to_string(), node(name, *ip));
    }
    d.rules.insert(AuthRule {
        local: R,
        remote: Remote::Identity(L),
        direction: Direction::Ingress,
        protocol: Protocol::Any,
        ports: PortRange::ANY,
    });
    d
}
