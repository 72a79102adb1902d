//! A packet capture in a namespace (AF_PACKET, every protocol, every
//! interface), on its own thread: what kinds of traffic crossed, which
//! addresses were in outer headers, and whether a marker appeared anywhere
//! in a frame.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::MARKER;

/// What the capture saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Frames by kind (`udp/51871`, `tcp/4250`, `arp`, `icmpv6`, …; a port
    /// is the lower of the two).
    pub kinds: BTreeMap<String, u64>,
    /// Addresses in outer IP headers.
    pub addresses: BTreeSet<IpAddr>,
    /// UDP frames to or from port 51871.
    pub udp_wireguard: u64,
    /// Whether the marker was in any frame.
    pub marker: bool,
}

/// A running capture.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Seen>,
}

impl Capture {
    /// Starts capturing every frame on every interface of the namespace
    /// mounted at `netns` (on the fabric: the bridge and its ports);
    /// returns once the socket is open.
    pub fn start(netns: &Path) -> Self {
        use rustix::net::{AddressFamily, SocketType, eth, sockopt};
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = std::fs::File::open(netns).expect("opening the namespace");
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns into the fabric namespace");
            let fd = rustix::net::socket(AddressFamily::PACKET, SocketType::RAW, Some(eth::ALL))
                .expect("AF_PACKET socket");
            sockopt::set_socket_timeout(
                &fd,
                sockopt::Timeout::Recv,
                Some(std::time::Duration::from_millis(100)),
            )
            .expect("SO_RCVTIMEO");
            ready_tx.send(()).unwrap();
            let mut seen = Seen::default();
            let mut buf = vec![0u8; 65536];
            loop {
                match rustix::net::recv(&fd, &mut buf[..], rustix::net::RecvFlags::empty()) {
                    Ok((n, _)) if n > 0 => classify(&buf[..n], &mut seen),
                    _ if flag.load(Ordering::Relaxed) => break,
                    _ => {}
                }
            }
            seen
        });
        ready_rx.recv().expect("the capture thread failed to start");
        Self { stop, thread }
    }

    /// Stops the capture (after what is queued is read); what it saw.
    pub fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the capture thread panicked")
    }
}

fn classify(frame: &[u8], seen: &mut Seen) {
    if frame.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) {
        seen.marker = true;
    }
    if frame.len() < 14 {
        return;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = &frame[14..];
    let (proto, l4, src, dst) = match ethertype {
        0x0806 => {
            *seen.kinds.entry("arp".into()).or_default() += 1;
            return;
        }
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (
                ip[9],
                ip.get(ihl..).unwrap_or(&[]),
                IpAddr::V4(src),
                IpAddr::V4(dst),
            )
        }
        0x86dd if ip.len() >= 40 => {
            let a: [u8; 16] = ip[8..24].try_into().unwrap();
            let b: [u8; 16] = ip[24..40].try_into().unwrap();
            (
                ip[6],
                &ip[40..],
                IpAddr::V6(Ipv6Addr::from(a)),
                IpAddr::V6(Ipv6Addr::from(b)),
            )
        }
        other => {
            *seen
                .kinds
                .entry(format!("ethertype/{other:#06x}"))
                .or_default() += 1;
            return;
        }
    };
    seen.addresses.insert(src);
    seen.addresses.insert(dst);
    let ports = (l4.len() >= 4).then(|| {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    });
    let kind = match (proto, ports) {
        (6, Some((a, b))) => format!("tcp/{}", a.min(b)),
        (17, Some((a, b))) => {
            if a == 51871 || b == 51871 {
                seen.udp_wireguard += 1;
            }
            format!("udp/{}", a.min(b))
        }
        (58, _) => "icmpv6".into(),
        (1, _) => "icmp".into(),
        (p, _) => format!("ip/{p}"),
    };
    *seen.kinds.entry(kind).or_default() += 1;
}
