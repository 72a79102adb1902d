//! `#[repr(C)]` mirrors of the C structs in `bpf/lib/*.h`.
//!
//! Field order, sizes and padding match the C side exactly; the
//! `btf_layout` test reads the compiled object's BTF and compares every
//! struct's size and member offsets with these definitions.

// `aya::Pod` is an unsafe marker trait: it promises the type is plain bytes
// with no invalid bit patterns and no padding that could leak. Every type
// here is `#[repr(C)]`, made only of integers and byte arrays, and has its
// padding spelled out as explicit fields.
#![allow(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Address family values stored in map keys (Linux `AF_INET`).
pub const AF_INET: u8 = 2;
/// Address family values stored in map keys (Linux `AF_INET6`).
pub const AF_INET6: u8 = 10;

/// Policy direction, seen from the pod whose cgroup the program runs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Direction {
    /// Traffic entering the pod.
    Ingress = 1,
    /// Traffic leaving the pod.
    Egress = 2,
}

impl Direction {
    /// The direction for a raw map value, if it is one.
    pub fn from_raw(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Ingress),
            2 => Some(Self::Egress),
            _ => None,
        }
    }

    /// Lower-case name, as used in metrics labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// An address of either family as the datapath stores it: IPv4 in the first
/// four bytes (network order), the rest zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct RawAddr(pub [u8; 16]);

impl RawAddr {
    /// The raw form of an address and its family code.
    pub fn from_ip(ip: IpAddr) -> (Self, u8) {
        let mut b = [0u8; 16];
        match ip {
            IpAddr::V4(v4) => {
                b[..4].copy_from_slice(&v4.octets());
                (Self(b), AF_INET)
            }
            IpAddr::V6(v6) => (Self(v6.octets()), AF_INET6),
        }
    }

    /// The address for a family code; `None` for an unknown family.
    pub fn to_ip(self, family: u8) -> Option<IpAddr> {
        match family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                self.0[0], self.0[1], self.0[2], self.0[3],
            ))),
            AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(self.0))),
            _ => None,
        }
    }
}

/// `struct ipcache_key` without the LPM prefix length (aya's `lpm_trie::Key`
/// carries that): family, padding, address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct IpcacheKeyData {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// The prefix's address.
    pub addr: RawAddr,
}

/// Bits of the LPM key before the address: family and padding.
pub const IPCACHE_KEY_PREFIX_BITS: u32 = 32;

/// `struct ipcache_value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct IpcacheValue {
    /// Security identity of the prefix.
    pub identity: u32,
    /// Node the prefix lives on; 0 = the local node.
    pub node_id: u16,
    /// Reserved for flags; zero.
    pub flags: u16,
}

/// `struct policy_key`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct PolicyKey {
    /// Identity of the local pod.
    pub local_id: u32,
    /// Identity of the peer; 0 = any cluster identity.
    pub remote_id: u32,
    /// Destination port of the flow, host order; 0 = any.
    pub port: u16,
    /// IP protocol; 0 = any.
    pub proto: u8,
    /// [`Direction`] as its raw value.
    pub direction: u8,
}

/// `struct policy_value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct PolicyValue {
    /// Authentication type required; 0 = none.
    pub auth_type: u8,
    /// Reserved; zero.
    pub flags: u8,
    /// Zero.
    pub pad: u16,
}

/// `struct auth_key`: one authenticated (local, remote, node) pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct AuthKey {
    /// Identity of the local end.
    pub local_id: u32,
    /// Identity of the remote end.
    pub remote_id: u32,
    /// Node of the remote end (0 = local node).
    pub remote_node_id: u16,
    /// Authentication type (1 = meshauth/1 mutual TLS).
    pub auth_type: u8,
    /// Zero.
    pub pad: u8,
}

/// `struct auth_value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct AuthValue {
    /// Expiry in `CLOCK_BOOTTIME` nanoseconds.
    pub expiry: u64,
}

/// `struct ct_key`: the forward 5-tuple of a flow, per endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct CtKey {
    /// Cgroup v2 id of the pod's socket.
    pub cgroup: u64,
    /// Source address.
    pub saddr: RawAddr,
    /// Destination address.
    pub daddr: RawAddr,
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Address family.
    pub family: u8,
    /// Raw [`Direction`] of the flow's first packet, seen from the pod.
    pub direction: u8,
    /// Zero.
    pub pad: u8,
}

/// `struct ct_value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct CtValue {
    /// Last use in the slow path (`CLOCK_BOOTTIME` ns).
    pub last_seen: u64,
    /// Reserved.
    pub flags: u32,
    /// Zero.
    pub pad: u32,
}

/// `struct signal_msg`: an auth-required signal from the datapath.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SignalMsg {
    /// The pair that needs authentication.
    pub key: AuthKey,
    /// When the packet was seen (`CLOCK_BOOTTIME` ns).
    pub ts: u64,
}

/// `struct flow_event`: one verdict for `meshauth observe`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct FlowEventRaw {
    /// `CLOCK_BOOTTIME` ns.
    pub ts: u64,
    /// Local pod's address.
    pub local: RawAddr,
    /// Peer's address.
    pub remote: RawAddr,
    /// Local identity.
    pub local_id: u32,
    /// Remote identity.
    pub remote_id: u32,
    /// Local port, host order.
    pub local_port: u16,
    /// Remote port, host order.
    pub remote_port: u16,
    /// Remote node id.
    pub remote_node_id: u16,
    /// IP protocol.
    pub proto: u8,
    /// Address family.
    pub family: u8,
    /// Raw [`Direction`].
    pub direction: u8,
    /// Reason code (see `reason`).
    pub reason: u8,
    /// 1 forwarded, 0 dropped.
    pub verdict: u8,
    /// Auth type the policy required (0 = none).
    pub auth_type: u8,
    /// Packet length.
    pub len: u32,
    /// Zero.
    pub pad: u32,
}

/// The metrics slot of (reason, direction): `reason * 2 + (direction - 1)`.
pub fn metrics_slot(reason: u8, direction: Direction) -> u32 {
    (u32::from(reason) << 1) | (direction as u32 - 1)
}

/// Number of metrics slots (`METRICS_SLOTS`).
pub const METRICS_SLOTS: u32 = 512;

/// `struct metrics_value` (one CPU's share).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct MetricsValue {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// `struct config_value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct ConfigValue {
    /// 0 enforce, 1 audit.
    pub mode: u32,
    /// Which verdicts produce flow events (`EVENT_*` bits).
    pub event_mask: u32,
    /// Minimum time between two signals for one auth key.
    pub signal_interval_ns: u64,
    /// Bumped whenever a change could turn a pass into a drop; socket-cached
    /// verdicts of an older generation are ignored.
    pub generation: u32,
    /// `CONFIG_F_*` bits (1 = socket verdict cache off, 2 = drop unknown
    /// local addresses, 4 = check egress source addresses).
    pub flags: u32,
    /// At most one flow event per flow and reason per interval (0 = all).
    pub event_interval_ns: u64,
    /// At most this many flow events per CPU per second (0 = no limit).
    pub event_budget: u32,
    /// Zero.
    pub pad: u32,
    /// `CLOCK_BOOTTIME − CLOCK_MONOTONIC` when written: how long the machine
    /// had been suspended. The datapath adds it to the coarse monotonic
    /// clock to tell, without reading the clock source, that an auth entry
    /// is far from its expiry (`bpf/lib/clock.h`). `u64::MAX` = not written.
    pub suspended_ns: u64,
}

/// `struct endpoint_key`: a local pod's cgroup with one of its addresses,
/// or (family 0, zero address) the marker "this cgroup is a known pod".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct EndpointKey {
    /// Cgroup v2 id of the pod's cgroup.
    pub cgroup: u64,
    /// `AF_INET`, `AF_INET6`, or 0 for the marker.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 7],
    /// The address (IPv4 in the first four bytes); zero for the marker.
    pub addr: RawAddr,
}

/// `struct endpoint_value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct EndpointValue {
    /// The pod's identity.
    pub identity: u32,
    /// Reserved.
    pub flags: u32,
}

/// `struct event_limit_key`: one flow's events of one reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct EventLimitKey {
    /// Local address.
    pub local: RawAddr,
    /// Remote address.
    pub remote: RawAddr,
    /// The policy port (local on ingress, remote on egress).
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Address family.
    pub family: u8,
    /// Raw [`Direction`].
    pub direction: u8,
    /// Reason code.
    pub reason: u8,
    /// Zero.
    pub pad: u16,
}

/// `struct event_budget`: one CPU's flow events in the current second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct EventBudget {
    /// Start of the window (`CLOCK_BOOTTIME` ns).
    pub window_start: u64,
    /// Events sent in it.
    pub count: u64,
}

/// `struct layout_value`: the layout version of the pinned maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct LayoutValue {
    /// `MESHAUTH_LAYOUT_VERSION` the maps were created with.
    pub version: u32,
    /// Zero.
    pub pad: u32,
}

// SAFETY: see the module comment; each type is repr(C), integers and byte
// arrays only, padding explicit.
unsafe impl aya::Pod for RawAddr {}
unsafe impl aya::Pod for IpcacheKeyData {}
unsafe impl aya::Pod for IpcacheValue {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for AuthKey {}
unsafe impl aya::Pod for AuthValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for SignalMsg {}
unsafe impl aya::Pod for FlowEventRaw {}
unsafe impl aya::Pod for MetricsValue {}
unsafe impl aya::Pod for ConfigValue {}
unsafe impl aya::Pod for LayoutValue {}
unsafe impl aya::Pod for EndpointKey {}
unsafe impl aya::Pod for EndpointValue {}
unsafe impl aya::Pod for EventLimitKey {}
unsafe impl aya::Pod for EventBudget {}

/// Reads a `T` from the start of a byte slice (ring buffer records), or
/// `None` if the slice is too short.
pub(crate) fn read_pod<T: aya::Pod + Default>(bytes: &[u8]) -> Option<T> {
    let size = std::mem::size_of::<T>();
    if bytes.len() < size {
        return None;
    }
    let mut out = T::default();
    // SAFETY: T is Pod (any bit pattern valid), `out` is a valid, aligned
    // T of `size` bytes, and `bytes` holds at least `size` bytes; the
    // regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut out).cast::<u8>(), size);
    }
    Some(out)
}
