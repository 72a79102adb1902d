//! Enforcement holds when the CNI delivers into the pod with
//! bpf_redirect_peer from a host-side tc program (as eBPF CNIs do), which
//! skips the host veth's tc hooks and the host's routing. The host namespace
//! has forwarding off, so the redirect is the only way a packet gets across.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use auth_ebpf::maps::auth::{AUTH_TYPE_MTLS, AuthMap};
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use auth_ebpf::testing::TestPinDir;
use auth_ebpf::types::{AuthKey, Direction};
use auth_ebpf::{Datapath, LoadOptions};
use aya::maps::{Array, HashMap};
use aya::programs::{SchedClassifier, TcAttachType};
use meshauth_test_support::netns::{Netns, Pod, TestCgroup, ifindex, in_netns, uniq, veth};

static REDIRECT_OBJ: &[u8] = aya::include_bytes_aligned!("../bpf/test/redirect_peer.o");

/// `struct redirect_target` of the fixture.
#[derive(Clone, Copy)]
#[repr(C)]
struct RedirectTarget {
    ifindex: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
}
// SAFETY: repr(C), integers and byte arrays, no padding (4 + 6 + 6 = 16).
#[allow(unsafe_code)]
unsafe impl aya::Pod for RedirectTarget {}

const A: &str = "10.202.0.1";
const B: &str = "10.202.0.2";
const GW: &str = "169.254.1.1";
const MAC_A: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 1];
const MAC_HA: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0xfe];
const MAC_HB: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0xfe];

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn cgroup_enforcement_holds_under_redirect_peer_delivery() {
    let host = Netns::new("rph");
    let pa = Netns::new("rpa");
    let pb = Netns::new("rpb");
    let t = uniq();
    let (ea, ha, eb, hb) = (
        format!("ea{t}"),
        format!("ha{t}"),
        format!("eb{t}"),
        format!("hb{t}"),
    );
    veth(&pa, &ea, &host, &ha);
    veth(&pb, &eb, &host, &hb);
    host.exec("sysctl -qw net.ipv4.ip_forward=0");
    for (ns, dev, m, ip, peer, hmac) in [
        (&pa, &ea, MAC_A, A, B, MAC_HA),
        (&pb, &eb, MAC_B, B, A, MAC_HB),
    ] {
        ns.ip(&format!("link set dev {dev} address {}", mac(m)));
        ns.ip(&format!("addr add {ip}/32 dev {dev}"));
        ns.ip(&format!(
            "neigh add {GW} lladdr {} dev {dev} nud permanent",
            mac(hmac)
        ));
        ns.ip(&format!("route add {peer}/32 via {GW} dev {dev} onlink"));
    }
    host.ip(&format!("link set dev {ha} address {}", mac(MAC_HA)));
    host.ip(&format!("link set dev {hb} address {}", mac(MAC_HB)));
    let (ia, ib) = (ifindex(&host, &ha), ifindex(&host, &hb));

    // The "CNI": tc ingress on both host veths, redirecting into the other pod.
    let cni = in_netns(&host, || {
        let mut ebpf = aya::Ebpf::load(REDIRECT_OBJ).expect("load redirect fixture");
        {
            let mut targets: HashMap<_, u32, RedirectTarget> =
                HashMap::try_from(ebpf.map_mut("redirect_targets").unwrap()).unwrap();
            targets
                .insert(
                    ia,
                    RedirectTarget {
                        ifindex: ib,
                        dmac: MAC_B,
                        smac: MAC_HB,
                    },
                    0,
                )
                .unwrap();
            targets
                .insert(
                    ib,
                    RedirectTarget {
                        ifindex: ia,
                        dmac: MAC_A,
                        smac: MAC_HA,
                    },
                    0,
                )
                .unwrap();
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut("redirect_peer_prog")
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("load classifier");
        for dev in [&ha, &hb] {
            prog.attach(dev, TcAttachType::Ingress)
                .unwrap_or_else(|e| panic!("attach tc on {dev}: {e}"));
        }
        ebpf
    });
    let redirected = || -> u64 {
        let arr: Array<_, u64> = Array::try_from(cni.map("redirect_count").unwrap()).unwrap();
        arr.get(&0, 0).unwrap()
    };

    // meshauth on the pods' cgroup.
    let cg = TestCgroup::new("rp");
    let pins = TestPinDir::new("rp");
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ..LoadOptions::default()
    })
    .expect("load datapath");
    dp.attach(&cg.path).expect("attach datapath");
    let mut ipc = Ipcache::open(pins.path()).unwrap();
    ipc.insert(Prefix::host(A.parse::<IpAddr>().unwrap()), 400, 0)
        .unwrap();
    ipc.insert(Prefix::host(B.parse::<IpAddr>().unwrap()), 401, 0)
        .unwrap();
    PolicyMap::open(pins.path())
        .unwrap()
        .insert(
            PolicyRule {
                local: 401,
                remote: 400,
                port: 8080,
                proto: 6,
                direction: Direction::Ingress,
            },
            AUTH_TYPE_MTLS,
        )
        .unwrap();

    let mut client = Pod::spawn("client", &pa, &cg.child("a"));
    let mut server = Pod::spawn("server", &pb, &cg.child("b"));
    server.ok("serve 8080");
    server.ok("serve 9090");

    // The path works at all only through the redirect (forwarding is off).
    client.ok(&format!("connect {B} 9090 2"));
    client.ok("send via-redirect 2");
    let before = redirected();
    assert!(before > 0, "packets went through bpf_redirect_peer");

    let got = client.cmd(&format!("connect {B} 8080 0.8"));
    assert!(
        got.starts_with("fail"),
        "redirect_peer delivery must still be enforced: {got}"
    );
    assert!(
        redirected() > before,
        "the dropped SYNs were delivered by the redirect"
    );
    let m = MetricsReader::open(pins.path()).unwrap();
    assert!(
        m.packets(reason::DROP_AUTH_REQUIRED, Direction::Ingress)
            .unwrap()
            >= 1
    );

    AuthMap::open(pins.path())
        .unwrap()
        .insert(
            AuthKey {
                local_id: 401,
                remote_id: 400,
                remote_node_id: 0,
                auth_type: AUTH_TYPE_MTLS,
                pad: 0,
            },
            SystemTime::now() + Duration::from_secs(60),
        )
        .unwrap();
    client.ok(&format!("connect {B} 8080 2"));
    client.ok("send authenticated 2");
    drop(client);
    drop(server);
    drop(cni);
}
