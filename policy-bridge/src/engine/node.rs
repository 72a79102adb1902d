//! Nodes → the node table (handshake address, WireGuard key).

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use super::{Engine, EngineConfig};
use crate::model::{ObjectKey, ObjectKind};
use crate::prefix::IpPrefix;
use crate::state::NodeInfo;

impl Engine {
    pub(super) fn upsert_node(&mut self, node: &Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let key = ObjectKey {
            kind: ObjectKind::Node,
            namespace: None,
            name: name.clone(),
        };
        self.tracker.node(&self.state, &name);
        match node.metadata.uid.as_ref().filter(|u| !u.is_empty()) {
            Some(uid) => self.state.node_uids.insert(name.clone(), uid.clone()),
            None => self.state.node_uids.remove(&name),
        };
        match node_info(node, &self.cfg) {
            Ok(info) => {
                self.state.nodes.insert(name, info);
            }
            Err(msg) => {
                self.state.nodes.remove(&name);
                self.invalid.insert(key, msg);
            }
        }
    }
}

/// A node's table entry. The handshake address is the annotation's if set
/// (it must parse), otherwise the first InternalIP that is IPv4, otherwise
/// the first InternalIP. A node with neither is an error (no entry).
pub fn node_info(node: &Node, cfg: &EngineConfig) -> Result<NodeInfo, String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let ann = node.metadata.annotations.as_ref();
    let addrs = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let mut addresses = BTreeSet::new();
    let mut internal = Vec::new();
    for a in addrs.into_iter().flatten() {
        if let Ok(ip) = a.address.parse::<IpAddr>() {
            addresses.insert(ip);
            if a.type_ == "InternalIP" {
                internal.push(ip);
            }
        }
    }
    let handshake_addr = match ann.and_then(|a| a.get(&cfg.handshake_annotation)) {
        Some(v) => {
            let ip = v.trim().parse::<IpAddr>().map_err(|_| {
                format!(
                    "metadata.annotations[{}]: {v:?} is not an IP address",
                    cfg.handshake_annotation
                )
            })?;
            addresses.insert(ip);
            ip
        }
        None => internal
            .iter()
            .find(|ip| ip.is_ipv4())
            .or_else(|| internal.first())
            .copied()
            .ok_or_else(|| {
                format!(
                    "status.addresses: no InternalIP and no {} annotation",
                    cfg.handshake_annotation
                )
            })?,
    };
    let mut pod_cidrs = BTreeSet::new();
    let spec = node.spec.as_ref();
    let listed = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let single = spec.and_then(|s| s.pod_cidr.clone());
    for (field, v) in listed
        .iter()
        .map(|v| ("spec.podCIDRs", v))
        .chain(single.iter().map(|v| ("spec.podCIDR", v)))
    {
        let p = v
            .trim()
            .parse::<IpPrefix>()
            .map_err(|e| format!("{field}: {e}"))?;
        pod_cidrs.insert(p);
    }
    Ok(NodeInfo {
        name,
        handshake_addr,
        addresses,
        wireguard_key: ann
            .and_then(|a| a.get(&cfg.wireguard_annotation))
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty()),
        pod_cidrs,
    })
}
