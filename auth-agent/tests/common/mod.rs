//! Desired-state builders shared by the auth-agent tests.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::IpAddr;

use policy_bridge::{
    AuthRule, DesiredState, Direction, Endpoint, Identity, NodeInfo, PortRange, Protocol, Remote,
};

/// A node reachable (and handshaking) at `ip`.
pub fn node(name: &str, ip: &str) -> NodeInfo {
    let addr: IpAddr = ip.parse().expect("node ip");
    NodeInfo {
        name: name.into(),
        handshake_addr: addr,
        addresses: BTreeSet::from([addr]),
        wireguard_key: None,
        pod_cidrs: Default::default(),
    }
}

/// A state with these nodes (name, ip) and pods (ip, identity, node).
pub fn state_of(nodes: &[(&str, &str)], pods: &[(&str, u32, &str)]) -> DesiredState {
    let mut d = DesiredState::default();
    for (name, ip) in nodes {
        d.nodes.insert(name.to_string(), node(name, ip));
    }
    for (ip, id, n) in pods {
        let ip: IpAddr = ip.parse().expect("pod ip");
        d.identities.insert(
            *id,
            Identity {
                id: *id,
                labels: BTreeSet::from([format!("k8s:app=x{id}")]),
            },
        );
        d.endpoints.insert(
            ip,
            Endpoint {
                ip,
                identity: *id,
                node: n.to_string(),
                pod: format!("ns/p{id}-{ip}"),
            },
        );
    }
    d
}

/// `local` must authenticate with identity `remote`, TCP `port` (0 = any).
pub fn rule(local: u32, remote: u32, direction: Direction, port: u16) -> AuthRule {
    AuthRule {
        local,
        remote: Remote::Identity(remote),
        direction,
        protocol: if port == 0 {
            Protocol::Any
        } else {
            Protocol::Tcp
        },
        ports: if port == 0 {
            PortRange::ANY
        } else {
            PortRange::single(port)
        },
    }
}
