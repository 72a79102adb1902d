//! The desired state: what policy and cluster state say the datapath and
//! the auth manager must do. Plain data, ordered maps, `Serialize`, so
//! snapshots are comparable, diffable and printable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Cilium's first identity for cluster workloads; below it are reserved ones.
pub const FIRST_CLUSTER_IDENTITY: u32 = 256;

/// A security identity: a canonical label set and its number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// The number (≥ 256 for cluster workloads).
    pub id: u32,
    /// Canonical labels (`k8s:<key>=<value>`, sorted).
    pub labels: BTreeSet<String>,
}

/// One pod address: which identity it has and which node it runs on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The pod's IP (each IP of a dual-stack pod is its own endpoint).
    pub ip: IpAddr,
    /// The pod's identity.
    pub identity: u32,
    /// Name of the node the pod runs on.
    pub node: String,
    /// `namespace/name` of the pod, for status and logs.
    pub pod: String,
}

/// A node as the handshake and WireGuard need it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Where its agent's handshake server listens (InternalIP, unless an
    /// annotation overrides it).
    pub handshake_addr: IpAddr,
    /// Every address the node has (a handshake from any other source is
    /// refused).
    pub addresses: BTreeSet<IpAddr>,
    /// The WireGuard public key the node published (base64), if any.
    pub wireguard_key: Option<String>,
    /// Its pods' address blocks (`spec.podCIDRs`), where the cluster
    /// assigns them; empty otherwise (then its pods' own addresses count).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub pod_cidrs: BTreeSet<crate::prefix::IpPrefix>,
}

/// Direction of a rule, seen from the local workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic into the local workload.
    Ingress,
    /// Traffic out of the local workload.
    Egress,
}

/// Protocol of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Any protocol.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The IP protocol number the datapath uses (0 = any).
    pub fn number(self) -> u8 {
        match self {
            Self::Any => 0,
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

/// An inclusive destination port range; `0..=0` means any port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port (0 = any).
    pub start: u16,
    /// Last port (equal to `start` for one port).
    pub end: u16,
}

impl PortRange {
    /// Any port.
    pub const ANY: Self = Self { start: 0, end: 0 };

    /// One port.
    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    /// True for "any port".
    pub fn is_any(self) -> bool {
        self.start == 0
    }
}

/// The peer of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remote {
    /// One identity.
    Identity(u32),
    /// Any cluster identity (`fromEndpoints: [{}]` in a clusterwide policy).
    AnyCluster,
}

/// "Flows of `local` with `remote` in `direction` on these ports must be
/// authenticated."
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AuthRule {
    /// The workload the policy selects.
    pub local: u32,
    /// The peer.
    pub remote: Remote,
    /// Direction seen from `local`.
    pub direction: Direction,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination ports.
    pub ports: PortRange,
}

/// Everything the agent must make true.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Identities by number.
    pub identities: BTreeMap<u32, Identity>,
    /// Pod addresses.
    pub endpoints: BTreeMap<IpAddr, Endpoint>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Auth rules.
    pub rules: BTreeSet<AuthRule>,
    /// `metadata.uid` of each pod with endpoints, by `namespace/name`
    /// ([`Endpoint::pod`]): kubelet names a pod's cgroup after it, which is
    /// how the agent tells the datapath which cgroup may send from which
    /// address. Pods whose source gave no uid are missing.
    #[serde(default)]
    pub pod_uids: BTreeMap<String, String>,
    /// `metadata.uid` of each node that has one, by name: SPIRE's k8s_psat
    /// agent IDs end with it, so the registration reconciler parents a
    /// node's entries to it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_uids: BTreeMap<String, String>,
    /// The uids each pod's containers run as where its spec says
    /// (`securityContext.runAsUser`), by `namespace/name`: without
    /// Kubernetes, SPIRE's `unix` attestor tells workloads apart by uid, so
    /// the registration reconciler selects a pod by them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_run_as: BTreeMap<String, BTreeSet<u32>>,
}

impl DesiredState {
    /// Identities with at least one endpoint on `node`.
    pub fn identities_on(&self, node: &str) -> BTreeSet<u32> {
        self.endpoints
            .values()
            .filter(|e| e.node == node)
            .map(|e| e.identity)
            .collect()
    }

    /// Nodes hosting at least one endpoint of `identity`.
    pub fn nodes_of(&self, identity: u32) -> BTreeSet<&str> {
        self.endpoints
            .values()
            .filter(|e| e.identity == identity)
            .map(|e| e.node.as_str())
            .collect()
    }

    /// The (local, remote) identity pairs that need authentication from
    /// `node`'s point of view, with the remote's nodes: for every rule whose
    /// local identity runs on `node`, every remote identity the rule covers
    /// and every node that runs it. Both directions need the pair
    /// authenticated the same way (the datapath keys entries by local,
    /// remote, remote node), so direction and ports do not split pairs.
    pub fn required_pairs(&self, node: &str) -> BTreeSet<(u32, u32, String)> {
        let local_ids = self.identities_on(node);
        // Identity → nodes hosting it, once (not a scan of every endpoint per
        // remote identity: an any-cluster rule names every identity).
        let mut nodes_by_id: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
        for e in self.endpoints.values() {
            nodes_by_id.entry(e.identity).or_default().insert(&e.node);
        }
        let mut out = BTreeSet::new();
        for rule in &self.rules {
            if !local_ids.contains(&rule.local) {
                continue;
            }
            let remotes: Vec<u32> = match rule.remote {
                Remote::Identity(r) => vec![r],
                Remote::AnyCluster => self
                    .identities
                    .keys()
                    .copied()
                    .filter(|&r| r >= FIRST_CLUSTER_IDENTITY)
                    .collect(),
            };
            for r in remotes {
                for n in nodes_by_id.get(&r).into_iter().flatten() {
                    out.insert((rule.local, r, n.to_string()));
                }
            }
        }
        out
    }
}

/// What changed between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDiff {
    /// Identities added or changed.
    pub identities_upserted: Vec<Identity>,
    /// Identities removed.
    pub identities_removed: Vec<u32>,
    /// Endpoints added or changed.
    pub endpoints_upserted: Vec<Endpoint>,
    /// Endpoints removed.
    pub endpoints_removed: Vec<IpAddr>,
    /// Nodes added or changed.
    pub nodes_upserted: Vec<NodeInfo>,
    /// Nodes removed.
    pub nodes_removed: Vec<String>,
    /// Rules added.
    pub rules_added: Vec<AuthRule>,
    /// Rules removed.
    pub rules_removed: Vec<AuthRule>,
}

impl StateDiff {
    /// The changes that turn `old` into `new`.
    pub fn between(old: &DesiredState, new: &DesiredState) -> Self {
        fn map_diff<K: Ord + Clone, V: PartialEq + Clone>(
            old: &BTreeMap<K, V>,
            new: &BTreeMap<K, V>,
        ) -> (Vec<V>, Vec<K>) {
            let up = new
                .iter()
                .filter(|(k, v)| old.get(k) != Some(v))
                .map(|(_, v)| v.clone())
                .collect();
            let rm = old
                .keys()
                .filter(|k| !new.contains_key(k))
                .cloned()
                .collect();
            (up, rm)
        }
        let (identities_upserted, identities_removed) = map_diff(&old.identities, &new.identities);
        let (endpoints_upserted, endpoints_removed) = map_diff(&old.endpoints, &new.endpoints);
        let (nodes_upserted, nodes_removed) = map_diff(&old.nodes, &new.nodes);
        Self {
            identities_upserted,
            identities_removed,
            endpoints_upserted,
            endpoints_removed,
            nodes_upserted,
            nodes_removed,
            rules_added: new.rules.difference(&old.rules).copied().collect(),
            rules_removed: old.rules.difference(&new.rules).copied().collect(),
        }
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, identity: u32, node: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            identity,
            node: node.into(),
            pod: format!("ns/p{identity}"),
        }
    }

    fn state() -> DesiredState {
        let mut s = DesiredState::default();
        for id in [256, 257, 258] {
            s.identities.insert(
                id,
                Identity {
                    id,
                    labels: BTreeSet::from([format!("k8s:app=a{id}")]),
                },
            );
        }
        for e in [
            ep("10.0.0.1", 256, "a"),
            ep("10.0.1.1", 257, "b"),
            ep("10.0.1.2", 257, "c"),
            ep("10.0.0.2", 258, "a"),
        ] {
            s.endpoints.insert(e.ip, e);
        }
        s.rules.insert(AuthRule {
            local: 256,
            remote: Remote::Identity(257),
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            ports: PortRange::single(8080),
        });
        s
    }

    #[test]
    fn required_pairs_follow_rules_and_endpoints() {
        let s = state();
        let pairs = s.required_pairs("a");
        assert_eq!(
            pairs,
            BTreeSet::from([(256, 257, "b".to_string()), (256, 257, "c".to_string())])
        );
        assert!(
            s.required_pairs("b").is_empty(),
            "257 has no rule of its own"
        );
        let mut any = s.clone();
        any.rules.insert(AuthRule {
            local: 257,
            remote: Remote::AnyCluster,
            direction: Direction::Ingress,
            protocol: Protocol::Any,
            ports: PortRange::ANY,
        });
        let b = any.required_pairs("b");
        assert!(b.contains(&(257, 256, "a".into())) && b.contains(&(257, 258, "a".into())));
        assert!(
            b.contains(&(257, 257, "c".into())),
            "another pod of the same identity"
        );
    }

    #[test]
    fn diff_names_what_changed() {
        let old = state();
        let mut new = old.clone();
        new.endpoints.remove(&"10.0.1.2".parse::<IpAddr>().unwrap());
        new.endpoints
            .insert("10.0.0.9".parse().unwrap(), ep("10.0.0.9", 258, "b"));
        new.rules.clear();
        let d = StateDiff::between(&old, &new);
        assert_eq!(
            d.endpoints_removed,
            vec!["10.0.1.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(d.endpoints_upserted.len(), 1);
        assert_eq!(d.rules_removed.len(), 1);
        assert!(d.rules_added.is_empty() && d.identities_upserted.is_empty());
        assert!(StateDiff::between(&new, &new).is_empty());
    }
}
