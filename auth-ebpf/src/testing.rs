//! Packet builders for `BPF_PROG_TEST_RUN` (tests and benchmarks): an
//! Ethernet header (the kernel strips it for cgroup_skb programs and takes
//! the protocol from its EtherType), then IPv4 or IPv6, then TCP, UDP or
//! ICMP echo. Checksums are left zero: the programs do not read them.

use std::net::IpAddr;

pub mod model;

/// IP protocol numbers.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// What the L4 header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with ports and flags.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// TCP flags byte (0x02 SYN, 0x10 ACK, 0x12 SYN-ACK).
        flags: u8,
    },
    /// UDP with ports.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMP (or ICMPv6) echo request or reply with an identifier.
    Echo {
        /// True for a request, false for a reply.
        request: bool,
        /// Echo identifier.
        id: u16,
    },
}

/// Builds an Ethernet frame holding one IP packet from `src` to `dst`.
/// Both addresses must be of one family.
pub fn frame(src: IpAddr, dst: IpAddr, l4: L4, payload: usize) -> Vec<u8> {
    let v6 = src.is_ipv6();
    assert_eq!(v6, dst.is_ipv6(), "frame: {src} and {dst} differ in family");
    let l4_bytes = l4_header(l4, v6, payload);
    let mut out = Vec::with_capacity(14 + 40 + l4_bytes.len());
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
    out.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let proto = match l4 {
        L4::Tcp { .. } => proto::TCP,
        L4::Udp { .. } => proto::UDP,
        L4::Echo { .. } if v6 => proto::ICMPV6,
        L4::Echo { .. } => proto::ICMP,
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + l4_bytes.len()) as u16;
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(l4_bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(&[proto, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => unreachable!("families checked above"),
    }
    out.extend_from_slice(&l4_bytes);
    out
}

/// Builds an IPv6 frame whose transport header sits behind a chain of
/// extension headers, `headers` in order (0 hop-by-hop, 43 routing, 44
/// fragment with offset 0, 51 AH, 60 destination options, …; each the
/// smallest valid size). A 59 ("no next header") ends the chain there: the
/// header before it says nothing follows, and no L4 header is written.
pub fn ipv6_chain(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    headers: &[u8],
    l4: L4,
) -> Vec<u8> {
    let base = frame(src.into(), dst.into(), l4, 0);
    let (eth_ip, l4_bytes) = base.split_at(14 + 40);
    let l4_proto = eth_ip[14 + 6];
    let end = headers
        .iter()
        .position(|&h| h == 59)
        .unwrap_or(headers.len());
    let chain = &headers[..end];
    let mut ext = Vec::new();
    for (i, &h) in chain.iter().enumerate() {
        let next = match chain.get(i + 1) {
            Some(&n) => n,
            None if end < headers.len() => 59,
            None => l4_proto,
        };
        match h {
            // AH: length in 4-byte units minus 2; 12 bytes with its ICV empty.
            51 => ext.extend_from_slice(&[next, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]),
            // Fragment: offset 0, no more fragments.
            44 => ext.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 1]),
            // Hop-by-hop, routing, destination options, …: 8 bytes, PadN.
            _ => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    let mut out = eth_ip.to_vec();
    let first = chain
        .first()
        .copied()
        .unwrap_or(if end < headers.len() { 59 } else { l4_proto });
    out[14 + 6] = first;
    let body = if end < headers.len() {
        &[][..]
    } else {
        l4_bytes
    };
    let payload_len = (ext.len() + body.len()) as u16;
    out[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&ext);
    out.extend_from_slice(body);
    out
}

/// Builds an IPv4 frame that is a non-first fragment (offset 8 bytes, no L4
/// header in it).
pub fn ipv4_fragment(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, proto: u8) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    out.extend_from_slice(&[0x45, 0, 0, 28, 0, 1, 0x00, 0x01, 64, proto, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(&[0u8; 8]);
    out
}

fn l4_header(l4: L4, v6: bool, payload: usize) -> Vec<u8> {
    let mut h = match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => {
            let mut h = Vec::with_capacity(20);
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
            h
        }
        L4::Udp { sport, dport } => {
            let len = (8 + payload) as u16;
            let mut h = Vec::with_capacity(8);
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            h
        }
        L4::Echo { request, id } => {
            let ty = match (v6, request) {
                (false, true) => 8,
                (false, false) => 0,
                (true, true) => 128,
                (true, false) => 129,
            };
            let mut h = vec![ty, 0, 0, 0];
            h.extend_from_slice(&id.to_be_bytes());
            h.extend_from_slice(&[0, 1]);
            h
        }
    };
    h.resize(h.len() + payload, 0xab);
    h
}

/// A unique pin directory on bpffs for one test, removed (with every map and
/// link pinned in it) on drop, also when the test panics. Mounts bpffs at
/// `/sys/fs/bpf` if nothing is mounted there; panics with the reason if that
/// is impossible (privileged tests fail loudly, they never skip).
#[derive(Debug)]
pub struct TestPinDir {
    path: std::path::PathBuf,
}

impl TestPinDir {
    /// Creates `/sys/fs/bpf/meshauth-test-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        ensure_bpffs();
        let path = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/meshauth-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating test pin dir {}: {e}", path.display()));
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TestPinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Mounts bpffs on `/sys/fs/bpf` unless it is there; panics with what to do
/// if this process cannot (not root, no CAP_SYS_ADMIN).
pub fn ensure_bpffs() {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    let is_bpffs = |p: &str| rustix::fs::statfs(p).is_ok_and(|s| s.f_type as u64 == BPF_FS_MAGIC);
    if is_bpffs("/sys/fs/bpf") {
        return;
    }
    let _ = std::fs::create_dir_all("/sys/fs/bpf");
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()) && is_bpffs("/sys/fs/bpf"),
        "this test needs root and bpffs: `mount -t bpf bpf /sys/fs/bpf` failed ({status:?})"
    );
}

/// Overwrites the layout version pinned under `pin_dir`, as an agent of
/// another version would have left it (upgrade and rollback tests: the
/// next load sees a layout other than its own).
pub fn set_pinned_layout_version(
    pin_dir: &std::path::Path,
    version: u32,
) -> Result<(), crate::DatapathError> {
    use crate::maps::names;
    let data = crate::maps::open_pinned(pin_dir, names::LAYOUT)?;
    let mut arr: aya::maps::Array<aya::maps::MapData, crate::types::LayoutValue> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data))
            .map_err(crate::DatapathError::map(names::LAYOUT))?;
    arr.set(0, crate::types::LayoutValue { version, pad: 0 }, 0)
        .map_err(crate::DatapathError::map(names::LAYOUT))
}

/// The layout version pinned under `pin_dir`, if any.
pub fn pinned_layout_version(pin_dir: &std::path::Path) -> Option<u32> {
    crate::layout::read_pinned_version(pin_dir)
}
