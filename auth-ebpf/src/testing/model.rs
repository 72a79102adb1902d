//! A reference model of the datapath's verdict in plain Rust, written from
//! the C programs' documented rules (bpf/endpoint.c and bpf/lib/*.h), for
//! differential testing: the same maps and packets go to the model and to
//! the real programs through `BPF_PROG_TEST_RUN`, and every disagreement is
//! a bug in one of them.
//!
//! What it models: parsing as a cgroup_skb program sees the packet (IPv4,
//! IPv6 with its extension header walk, fragments, truncation), the
//! ipcache's longest-prefix match, the source check's walk up the sending
//! socket's cgroups, strict mode, tracked flows and their replies, policy
//! precedence, auth entries, enforce and audit. What it leaves out, because
//! it never changes a verdict under `BPF_PROG_TEST_RUN`: flow events and
//! signals (rate limits only), the per-socket verdict cache (each test run
//! has a fresh socket), and tracked-flow lifetimes (a test run lasts
//! seconds, the shortest lifetime is 60 s).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::maps::ipcache::Prefix;
use crate::reason;
use crate::types::Direction;

/// Reserved identities.
const ID_WORLD: u32 = 2;
const ID_FIRST_CLUSTER: u32 = 256;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const IPV6_EXT_MAX: usize = 8;

/// The datapath configuration the model needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// Audit mode: count and report, never drop for authentication.
    pub audit: bool,
    /// Strict: drop traffic of local addresses the ipcache does not know.
    pub drop_unknown_local: bool,
    /// Check egress source addresses against the sending pod's cgroup.
    pub check_source: bool,
}

/// A policy rule's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelRule {
    /// Local identity.
    pub local: u32,
    /// Remote identity; 0 = any cluster identity.
    pub remote: u32,
    /// Port; 0 = any.
    pub port: u16,
    /// Protocol; 0 = any.
    pub proto: u8,
    /// Direction.
    pub direction: Direction,
}

/// An auth entry's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelAuthKey {
    /// Local identity.
    pub local: u32,
    /// Remote identity.
    pub remote: u32,
    /// The remote node.
    pub node: u16,
    /// The auth type.
    pub auth_type: u8,
}

/// What a packet came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Passed.
    pub pass: bool,
    /// The reason counted; `None` when the packet is not IP (passed
    /// uncounted).
    pub reason: Option<u8>,
}

/// The parsed forward view of a packet from the local pod's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Local address.
    pub local: IpAddr,
    /// Remote address.
    pub remote: IpAddr,
    /// Local port (ICMP echo: the identifier on the requester's side).
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// IP protocol (IPv6: after the extension headers).
    pub proto: u8,
    /// A non-first fragment.
    pub fragment: bool,
    /// Can open a connection (TCP SYN without ACK, UDP, echo request).
    pub opens: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CtKey {
    saddr: IpAddr,
    daddr: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
    direction: Direction,
}

/// Why parsing stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Neither IPv4 nor IPv6: passed, not counted.
    Unsupported,
    /// Malformed or truncated: dropped (134).
    Invalid,
    /// An IPv6 extension chain too long or ending in "no next header" (156).
    InvalidExtHdr,
}

/// The model's maps and state.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Configuration.
    pub config: ModelConfig,
    /// Ipcache: prefix → (identity, node).
    pub ipcache: Vec<(Prefix, u32, u16)>,
    /// Policy: rule → auth type.
    pub policy: HashMap<ModelRule, u8>,
    /// Auth entries: key → still valid (expiry in the future).
    pub auth: HashMap<ModelAuthKey, bool>,
    /// Endpoints: (cgroup, owned address or `None` for the pod marker).
    pub endpoints: HashSet<(u64, Option<IpAddr>)>,
    /// The sending socket's cgroup ancestors, level 1 first (what
    /// `bpf_skb_ancestor_cgroup_id` returns for levels 1, 2, …).
    pub ancestors: Vec<u64>,
    ct: HashSet<CtKey>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn is_exthdr(n: u8) -> bool {
    matches!(n, 0 | 43 | 44 | 51 | 59 | 60 | 135 | 139 | 140)
}

/// The address in an IP packet's header bytes.
fn addr(b: &[u8]) -> IpAddr {
    match b.len() {
        4 => IpAddr::from([b[0], b[1], b[2], b[3]]),
        _ => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[..16]);
            IpAddr::from(a)
        }
    }
}

/// Ports, flags and whether it opens, from the L4 header at `off`.
fn parse_l4(data: &[u8], off: usize, proto: u8) -> Result<(u16, u16, bool), ParseError> {
    let load = |n: usize| data.get(off..off + n).ok_or(ParseError::Invalid);
    Ok(match proto {
        TCP => {
            let t = load(14)?;
            (be16(&t[0..]), be16(&t[2..]), t[13] & 0x12 == 0x02)
        }
        UDP => {
            let u = load(4)?;
            (be16(&u[0..]), be16(&u[2..]), true)
        }
        ICMP | ICMPV6 => {
            let i = load(6)?;
            match i[0] {
                8 | 128 => (be16(&i[4..]), 0, true),
                0 | 129 => (0, be16(&i[4..]), false),
                _ => (0, 0, false),
            }
        }
        _ => (0, 0, false),
    })
}

/// Parses `frame` (Ethernet header first) as the program sees it.
pub fn parse(direction: Direction, frame: &[u8]) -> Result<Flow, ParseError> {
    if frame.len() < 14 {
        return Err(ParseError::Unsupported);
    }
    let ethertype = be16(&frame[12..]);
    let data = &frame[14..];
    let load = |off: usize, n: usize| data.get(off..off + n).ok_or(ParseError::Invalid);
    let (src, dst, proto, fragment, sport, dport, opens);
    match ethertype {
        0x0800 => {
            let ip = load(0, 20)?;
            let (version, ihl) = (ip[0] >> 4, ip[0] & 0xf);
            if version != 4 || ihl < 5 {
                return Err(ParseError::Invalid);
            }
            src = addr(&ip[12..16]);
            dst = addr(&ip[16..20]);
            proto = ip[9];
            if be16(&ip[6..]) & 0x1fff != 0 {
                fragment = true;
                (sport, dport, opens) = (0, 0, false);
            } else {
                fragment = false;
                (sport, dport, opens) = parse_l4(data, usize::from(ihl) * 4, proto)?;
            }
        }
        0x86dd => {
            let ip = load(0, 40)?;
            if ip[0] >> 4 != 6 {
                return Err(ParseError::Invalid);
            }
            src = addr(&ip[8..24]);
            dst = addr(&ip[24..40]);
            let mut next = ip[6];
            let mut off = 40usize;
            let mut frag_proto = None;
            for _ in 0..IPV6_EXT_MAX {
                if !is_exthdr(next) {
                    break;
                }
                if next == 59 {
                    return Err(ParseError::InvalidExtHdr);
                }
                let ext = load(off, 2)?;
                if next == 44 {
                    let frag = be16(load(off + 2, 2)?);
                    next = ext[0];
                    off += 8;
                    if frag & 0xfff8 != 0 {
                        frag_proto = Some(next);
                        break;
                    }
                    continue;
                }
                off += if next == 51 {
                    (usize::from(ext[1]) + 2) * 4
                } else {
                    (usize::from(ext[1]) + 1) * 8
                };
                next = ext[0];
            }
            if let Some(p) = frag_proto {
                proto = p;
                fragment = true;
                (sport, dport, opens) = (0, 0, false);
            } else {
                if is_exthdr(next) {
                    return Err(ParseError::InvalidExtHdr);
                }
                proto = next;
                fragment = false;
                (sport, dport, opens) = parse_l4(data, off, next)?;
            }
        }
        _ => return Err(ParseError::Unsupported),
    }
    Ok(match direction {
        Direction::Egress => Flow {
            local: src,
            remote: dst,
            local_port: sport,
            remote_port: dport,
            proto,
            fragment,
            opens,
        },
        Direction::Ingress => Flow {
            local: dst,
            remote: src,
            local_port: dport,
            remote_port: sport,
            proto,
            fragment,
            opens,
        },
    })
}

/// True when `a` falls in `p` (same family, first `len` bits equal).
fn in_prefix(p: &Prefix, a: IpAddr) -> bool {
    let bits = |x: IpAddr| -> (bool, u128, u32) {
        match x {
            IpAddr::V4(v) => (false, u128::from(u32::from(v)) << 96, 32),
            IpAddr::V6(v) => (true, u128::from(v), 128),
        }
    };
    let (pf, pa, max) = bits(p.addr);
    let (af, aa, _) = bits(a);
    if pf != af {
        return false;
    }
    let len = u32::from(p.len).min(max);
    len == 0 || (pa ^ aa) >> (128 - len) == 0
}

/// Loopback, link-local or unspecified.
fn link_scope(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => {
            let o = v.octets();
            o[0] == 127 || (o[0] == 169 && o[1] == 254) || u32::from(v) == 0
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            v.is_unspecified() || v.is_loopback() || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

impl Model {
    /// Adds an ipcache entry; one with the same prefix (the same first
    /// `len` bits) is replaced, as the LPM trie does.
    pub fn ipcache_insert(&mut self, prefix: Prefix, identity: u32, node: u16) {
        self.ipcache
            .retain(|(p, _, _)| !(p.len == prefix.len && in_prefix(p, prefix.addr)));
        self.ipcache.push((prefix, identity, node));
    }

    /// The ipcache's (identity, node) for an address: the longest prefix,
    /// or the world.
    pub fn lookup(&self, a: IpAddr) -> (u32, u16) {
        self.ipcache
            .iter()
            .filter(|(p, _, _)| in_prefix(p, a))
            .max_by_key(|(p, _, _)| p.len)
            .map_or((ID_WORLD, 0), |(_, id, node)| (*id, *node))
    }

    fn source_ok(&self, f: &Flow, local_identity: u32) -> bool {
        if link_scope(f.local) {
            return true;
        }
        for &id in self.ancestors.iter().take(8) {
            if self.endpoints.contains(&(id, Some(f.local))) {
                return true;
            }
            if self.endpoints.contains(&(id, None)) {
                return false;
            }
        }
        local_identity < ID_FIRST_CLUSTER
    }

    fn probe(&self, local: u32, remote: u32, port: u16, proto: u8, d: Direction) -> Option<u8> {
        self.policy
            .get(&ModelRule {
                local,
                remote,
                port,
                proto,
                direction: d,
            })
            .copied()
    }

    /// The auth type the policy requires, most specific rule first.
    pub fn auth_type(&self, local: u32, remote: u32, port: u16, proto: u8, d: Direction) -> u8 {
        let exact = [(remote, port, proto), (remote, 0, proto), (remote, 0, 0)];
        let any = [(0, port, proto), (0, 0, proto), (0, 0, 0)];
        let candidates: &[(u32, u16, u8)] = if remote < ID_FIRST_CLUSTER {
            &exact
        } else {
            &[exact, any].concat()
        };
        candidates
            .iter()
            .find_map(|&(r, p, pr)| self.probe(local, r, p, pr, d))
            .unwrap_or(0)
    }

    fn forward_key(f: &Flow, d: Direction) -> CtKey {
        let (saddr, daddr, sport, dport) = match d {
            Direction::Egress => (f.local, f.remote, f.local_port, f.remote_port),
            Direction::Ingress => (f.remote, f.local, f.remote_port, f.local_port),
        };
        CtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto: f.proto,
            direction: d,
        }
    }

    fn is_reply(&self, f: &Flow, d: Direction) -> bool {
        if f.proto == TCP && f.opens {
            return false;
        }
        let fwd = Self::forward_key(f, d);
        self.ct.contains(&CtKey {
            saddr: fwd.daddr,
            daddr: fwd.saddr,
            sport: fwd.dport,
            dport: fwd.sport,
            proto: fwd.proto,
            direction: match d {
                Direction::Egress => Direction::Ingress,
                Direction::Ingress => Direction::Egress,
            },
        })
    }

    fn track(&mut self, f: &Flow, d: Direction) {
        if f.opens {
            self.ct.insert(Self::forward_key(f, d));
        }
    }

    /// Judges one packet and updates the tracked flows, as the program for
    /// `direction` does.
    pub fn run(&mut self, direction: Direction, frame: &[u8]) -> Outcome {
        let drop = |r: u8| Outcome {
            pass: false,
            reason: Some(r),
        };
        let pass = |r: u8| Outcome {
            pass: true,
            reason: Some(r),
        };
        let f = match parse(direction, frame) {
            Ok(f) => f,
            Err(ParseError::Unsupported) => {
                return Outcome {
                    pass: true,
                    reason: None,
                };
            }
            Err(ParseError::Invalid) => return drop(reason::DROP_INVALID),
            Err(ParseError::InvalidExtHdr) => return drop(reason::DROP_INVALID_EXTHDR),
        };
        let (local, _) = self.lookup(f.local);
        if direction == Direction::Egress && self.config.check_source && !self.source_ok(&f, local)
        {
            return drop(reason::DROP_INVALID_SOURCE_IP);
        }
        if local == ID_WORLD && self.config.drop_unknown_local && !self.config.audit {
            return drop(reason::DROP_POLICY_DENIED);
        }
        if local < ID_FIRST_CLUSTER {
            return pass(reason::PASS_NOT_ENFORCED);
        }
        let (remote, node) = self.lookup(f.remote);
        let port = match (f.fragment, direction) {
            (true, _) => 0,
            (false, Direction::Ingress) => f.local_port,
            (false, Direction::Egress) => f.remote_port,
        };
        let auth_type = self.auth_type(local, remote, port, f.proto, direction);
        if auth_type == 0 {
            if self.is_reply(&f, direction) {
                return pass(reason::PASS_REPLY);
            }
            self.track(&f, direction);
            return pass(reason::PASS_NO_POLICY);
        }
        let key = ModelAuthKey {
            local,
            remote,
            node,
            auth_type,
        };
        // Authenticated before the reply check (a live entry passes either way).
        if self.auth.get(&key).copied().unwrap_or(false) {
            self.track(&f, direction);
            return pass(reason::PASS_AUTHENTICATED);
        }
        if self.is_reply(&f, direction) {
            return pass(reason::PASS_REPLY);
        }
        if self.config.audit {
            self.track(&f, direction);
            return pass(reason::PASS_AUDIT);
        }
        drop(reason::DROP_AUTH_REQUIRED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{L4, frame};
    use std::net::Ipv4Addr;

    #[test]
    fn longest_prefix_wins_and_a_miss_is_the_world() {
        let mut m = Model::default();
        let a = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        m.ipcache_insert(
            Prefix {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                len: 8,
            },
            300,
            1,
        );
        assert_eq!(m.lookup(a), (300, 1));
        m.ipcache_insert(Prefix::host(a), 301, 2);
        assert_eq!(m.lookup(a), (301, 2));
        assert_eq!(m.lookup(IpAddr::V4(Ipv4Addr::new(11, 0, 0, 1))), (2, 0));
        assert_eq!(m.lookup("fd00::1".parse().unwrap_or(a)), (2, 0));
    }

    #[test]
    fn an_egress_syn_is_tracked_and_its_syn_ack_is_a_reply() {
        let mut m = Model::default();
        let (l, r) = (
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        );
        m.ipcache_insert(Prefix::host(l), 256, 0);
        m.ipcache_insert(Prefix::host(r), 257, 1);
        let syn = frame(
            l,
            r,
            L4::Tcp {
                sport: 5,
                dport: 80,
                flags: 2,
            },
            0,
        );
        assert_eq!(
            m.run(Direction::Egress, &syn).reason,
            Some(reason::PASS_NO_POLICY)
        );
        let syn_ack = frame(
            r,
            l,
            L4::Tcp {
                sport: 80,
                dport: 5,
                flags: 0x12,
            },
            0,
        );
        assert_eq!(
            m.run(Direction::Ingress, &syn_ack).reason,
            Some(reason::PASS_REPLY)
        );
        // A SYN is never a reply.
        let syn_back = frame(
            r,
            l,
            L4::Tcp {
                sport: 80,
                dport: 5,
                flags: 2,
            },
            0,
        );
        assert_eq!(
            m.run(Direction::Ingress, &syn_back).reason,
            Some(reason::PASS_NO_POLICY)
        );
    }
}
