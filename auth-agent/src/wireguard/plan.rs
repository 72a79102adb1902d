//! What the interface should hold, and the steps from what it holds — pure
//! functions of the node table and the pods, so every rule here is tested
//! without a kernel.
//!
//! - A peer per remote node that published a usable key: endpoint = the
//!   node's handshake address and the WireGuard port; AllowedIPs = the
//!   node's addresses, its pod CIDRs, and its pods' addresses outside
//!   them. A key that is all zero, not a key, this node's own, or published
//!   by two nodes is refused (no peer for any node claiming it).
//! - Routes through the interface for the remote pods (CIDRs and the pod
//!   addresses outside them) — never for node addresses, or WireGuard's
//!   own UDP packets would be routed into the tunnel.
//! - Steps never leave a wanted address without a peer: AllowedIPs are only
//!   ever added to a peer (adding one to a peer moves it atomically from
//!   the peer that had it), never replaced (the kernel's replace flag
//!   clears the list first); an address nobody wants is moved to a
//!   throwaway peer which is then removed; a peer whose node changed key
//!   is added under the new key (taking the addresses over) before the old
//!   one is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use policy_bridge::{DesiredState, IpPrefix, NodeInfo};

use super::key::{PublicKey, PublicKeyError};

/// A peer as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The node it belongs to.
    pub node: String,
    /// Where its WireGuard listens.
    pub endpoint: SocketAddr,
    /// What it may send and what is sent to it.
    pub allowed: BTreeSet<IpPrefix>,
}

/// Why a node has no peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The node published no key (WireGuard off there): its traffic is not
    /// encrypted by meshauth.
    #[error("published no WireGuard key")]
    NoKey,
    /// The published key is unusable.
    #[error("published key refused: {0}")]
    BadKey(PublicKeyError),
    /// The key is this node's own.
    #[error("published this node's own key {0}")]
    OwnKey(PublicKey),
    /// Another node published the same key.
    #[error("published key {key}, which node {other} also published")]
    Duplicate {
        /// The key.
        key: PublicKey,
        /// One other node with it.
        other: String,
    },
}

/// The interface's wanted state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Peers by public key.
    pub peers: BTreeMap<PublicKey, PeerSpec>,
    /// Prefixes routed through the interface.
    pub routes: BTreeSet<IpPrefix>,
    /// Remote nodes without a peer, and why.
    pub refused: BTreeMap<String, Refused>,
    /// Addresses two nodes claimed: the one kept (first by name) and the
    /// one left out.
    pub conflicts: Vec<(IpPrefix, String, String)>,
}

/// The wanted state for `local` (whose public key is `own`), from the
/// node table and the pods; peers listen on `port`.
pub fn desired(
    local: &str,
    own: &PublicKey,
    nodes: &BTreeMap<String, NodeInfo>,
    state: &DesiredState,
    port: u16,
) -> Desired {
    let mut out = Desired::default();
    // Keys first, so a duplicate refuses every node that claims it.
    let mut by_key: BTreeMap<PublicKey, Vec<&str>> = BTreeMap::new();
    for (name, node) in nodes.iter().filter(|(n, _)| *n != local) {
        let Some(text) = &node.wireguard_key else {
            out.refused.insert(name.clone(), Refused::NoKey);
            continue;
        };
        match text.parse::<PublicKey>() {
            Err(e) => {
                out.refused.insert(name.clone(), Refused::BadKey(e));
            }
            Ok(k) if k == *own => {
                out.refused.insert(name.clone(), Refused::OwnKey(k));
            }
            Ok(k) => by_key.entry(k).or_default().push(name),
        }
    }
    // Pods by node, for the addresses outside the node's CIDRs.
    let mut pods: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for (ip, ep) in &state.endpoints {
        pods.entry(ep.node.as_str()).or_default().push(*ip);
    }
    let mut usable: BTreeMap<&str, PublicKey> = BTreeMap::new();
    for (key, names) in by_key {
        if let [a, b, ..] = names[..] {
            for n in &names {
                let other = if *n == a { b } else { a };
                out.refused.insert(
                    (*n).to_owned(),
                    Refused::Duplicate {
                        key,
                        other: other.to_owned(),
                    },
                );
            }
        } else {
            usable.insert(names[0], key);
        }
    }
    let mut owner: BTreeMap<IpPrefix, String> = BTreeMap::new();
    for (name, key) in usable {
        let node = &nodes[name];
        let mut allowed = BTreeSet::new();
        let mut routed = BTreeSet::new();
        for ip in &node.addresses {
            allowed.insert(IpPrefix::host(*ip));
        }
        for c in &node.pod_cidrs {
            allowed.insert(*c);
            routed.insert(*c);
        }
        for ip in pods.get(name).into_iter().flatten() {
            if !node.pod_cidrs.iter().any(|c| c.contains(*ip)) {
                allowed.insert(IpPrefix::host(*ip));
                routed.insert(IpPrefix::host(*ip));
            }
        }
        // An address is one peer's: the first node by name keeps it.
        allowed.retain(|p| match owner.get(p) {
            Some(first) => {
                out.conflicts.push((*p, first.clone(), name.to_owned()));
                routed.remove(p);
                false
            }
            None => {
                owner.insert(*p, name.to_owned());
                true
            }
        });
        out.routes.extend(routed);
        out.peers.insert(
            key,
            PeerSpec {
                node: name.to_owned(),
                endpoint: SocketAddr::new(node.handshake_addr, port),
                allowed,
            },
        );
    }
    out
}

/// A peer as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerState {
    /// Its endpoint, if it has one.
    pub endpoint: Option<SocketAddr>,
    /// Its AllowedIPs.
    pub allowed: BTreeSet<IpPrefix>,
}

/// One step toward the wanted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the peer (`created`) or update it: set the endpoint if given,
    /// append `add` to its AllowedIPs (never replacing them).
    Upsert {
        /// The peer.
        key: PublicKey,
        /// Whether the peer is new.
        created: bool,
        /// The endpoint to set.
        endpoint: Option<SocketAddr>,
        /// AllowedIPs to add (taken from any other peer that has them).
        add: Vec<IpPrefix>,
    },
    /// Route a prefix through the interface.
    AddRoute(IpPrefix),
    /// Stop routing a prefix through the interface.
    DelRoute(IpPrefix),
    /// Take addresses nobody wants from the peers that have them (through a
    /// throwaway peer, removed at once).
    Release(Vec<IpPrefix>),
    /// Remove a peer nobody wants.
    Remove(PublicKey),
}

/// The steps from `current` (peers and routes the kernel holds) to
/// `desired`, in a safe order: peers created and extended, routes added,
/// routes removed, addresses released, peers removed. With `collect`
/// false (before the first full sync) nothing is removed.
pub fn steps(
    current: &BTreeMap<PublicKey, PeerState>,
    current_routes: &BTreeSet<IpPrefix>,
    desired: &Desired,
    collect: bool,
) -> Vec<Step> {
    let mut out = Vec::new();
    for (key, want) in &desired.peers {
        let have = current.get(key);
        let add: Vec<IpPrefix> = want
            .allowed
            .iter()
            .filter(|p| !have.is_some_and(|h| h.allowed.contains(p)))
            .copied()
            .collect();
        let endpoint =
            (have.and_then(|h| h.endpoint) != Some(want.endpoint)).then_some(want.endpoint);
        if have.is_none() || endpoint.is_some() || !add.is_empty() {
            out.push(Step::Upsert {
                key: *key,
                created: have.is_none(),
                endpoint,
                add,
            });
        }
    }
    for r in desired.routes.difference(current_routes) {
        out.push(Step::AddRoute(*r));
    }
    if !collect {
        return out;
    }
    for r in current_routes.difference(&desired.routes) {
        out.push(Step::DelRoute(*r));
    }
    // Addresses a kept peer holds that nobody wants (an address wanted by
    // another peer moved there with its Upsert).
    let wanted: BTreeSet<&IpPrefix> = desired.peers.values().flat_map(|p| &p.allowed).collect();
    let release: Vec<IpPrefix> = current
        .iter()
        .filter(|(k, _)| desired.peers.contains_key(k))
        .flat_map(|(_, p)| &p.allowed)
        .filter(|p| !wanted.contains(p))
        .copied()
        .collect();
    if !release.is_empty() {
        out.push(Step::Release(release));
    }
    for key in current.keys().filter(|k| !desired.peers.contains_key(k)) {
        out.push(Step::Remove(*key));
    }
    out
}

/// Applies `steps` to a model of the kernel's peers (what the kernel does
/// with them), for tests and the planner's own checks.
pub fn apply_model(
    peers: &mut BTreeMap<PublicKey, PeerState>,
    routes: &mut BTreeSet<IpPrefix>,
    step: &Step,
) {
    match step {
        Step::Upsert {
            key, endpoint, add, ..
        } => {
            for p in add {
                for other in peers.values_mut() {
                    other.allowed.remove(p);
                }
            }
            let peer = peers.entry(*key).or_default();
            if let Some(e) = endpoint {
                peer.endpoint = Some(*e);
            }
            peer.allowed.extend(add.iter().copied());
        }
        Step::AddRoute(r) => {
            routes.insert(*r);
        }
        Step::DelRoute(r) => {
            routes.remove(r);
        }
        Step::Release(ps) => {
            for p in ps {
                for other in peers.values_mut() {
                    other.allowed.remove(p);
                }
            }
        }
        Step::Remove(k) => {
            peers.remove(k);
        }
    }
}

#[cfg(test)]
mod tests;
