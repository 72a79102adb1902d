//! WireGuard node-to-node encryption. So far: the node's key ([`key`])
//! and the planner ([`plan`]: what the interface should hold and the safe
//! steps to get there). The interface itself is not programmed yet; the
//! agent still refuses `wireguard: true`.

pub mod key;
pub mod plan;
pub mod netlink;
pub mod publish;
