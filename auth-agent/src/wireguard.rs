//! WireGuard node-to-node encryption. So far: the node's key
//! ([`key`]). The interface, peers and the binding to the handshake are
//! not built yet; the agent still refuses `wireguard: true`.

pub mod key;
