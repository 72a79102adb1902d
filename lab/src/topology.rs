//! What the lab is made of: nodes, pods, their addresses (see the module
//! docs of [`super`] for the plan).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A node of the lab.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Its name.
    pub name: String,
    /// Its number *i* (1..=254).
    pub index: u8,
    /// Its network namespace.
    pub netns: PathBuf,
    /// The address of its `eth0`.
    pub ipv4: Ipv4Addr,
    /// The IPv6 address of its `eth0`.
    pub ipv6: Ipv6Addr,
    /// Its pods' IPv4 block.
    pub pod_cidr_v4: Cidr,
    /// Its pods' IPv6 block.
    pub pod_cidr_v6: Cidr,
    /// Its "kubepods" cgroup: every pod cgroup is below it.
    pub pods_cgroup: PathBuf,
    /// The cgroup for the node's own processes (outside `pods_cgroup`).
    pub host_cgroup: PathBuf,
}

/// A pod of the lab.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// Its name (unique in the lab).
    pub name: String,
    /// Its node's name.
    pub node: String,
    /// Its number *k* on the node (2..=254).
    pub index: u8,
    /// Its network namespace.
    pub netns: PathBuf,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Its `metadata.uid`: a UUID unique to this lab and pod.
    pub uid: String,
    /// Its cgroup, `pod<uid>` below the node's `pods_cgroup` as kubelet
    /// names it (the agent finds a pod's cgroup by its uid).
    pub cgroup: PathBuf,
    /// The node side of its veth (in the node namespace).
    pub host_veth: String,
    /// The uid its processes run as (`None`: root, as the lab).
    pub run_as: Option<u32>,
}

/// Where [`Lab::command`] runs a program.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// In the node's namespace and its host cgroup.
    Node(&'a NodeInfo),
    /// In the pod's namespace and cgroup.
    Pod(&'a PodInfo),
}

impl<'a> From<&'a NodeInfo> for Target<'a> {
    fn from(n: &'a NodeInfo) -> Self {
        Self::Node(n)
    }
}

impl<'a> From<&'a PodInfo> for Target<'a> {
    fn from(p: &'a PodInfo) -> Self {
        Self::Pod(p)
    }
}

/// The pod CIDRs of a node, each with the node's address as gateway.
pub(super) fn pod_routes(n: &NodeInfo) -> [(Cidr, IpAddr); 2] {
    [
        (n.pod_cidr_v4, n.ipv4.into()),
        (n.pod_cidr_v6, n.ipv6.into()),
    ]
}

/// The pods' IPv4 gateway on a node: `10.<net>.<i>.1`.
pub(super) fn gateway_v4(n: &NodeInfo) -> Ipv4Addr {
    match n.pod_cidr_v4.addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            Ipv4Addr::new(o[0], o[1], o[2], 1)
        }
        IpAddr::V6(_) => unreachable!("pod_cidr_v4 is IPv4"),
    }
}

/// The pods' IPv6 gateway: `fe80::1` on every pod veth.
pub(super) fn gateway_v6() -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)
}
