//! WireGuard node-to-node encryption, bound to authentication: the node's
//! key ([`key`]), what the interface should hold and the safe steps to get
//! there ([`plan`]), the kernel through netlink ([`netlink`]), publishing
//! the public key ([`publish`]) and the task that owns the interface
//! ([`manager`]).

pub mod key;
pub mod manager;
pub mod netlink;
pub mod plan;
pub mod publish;

/// The interface the agent owns.
pub const DEFAULT_INTERFACE: &str = "meshauth_wg0";
/// WireGuard's UDP port on every node.
pub const DEFAULT_PORT: u16 = 51871;
