//! The network-namespace lab end to end: nodes, pods, routes, processes in
//! their cgroups, and cleanup. Needs root (fails, does not skip, without).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use meshauth_lab::{Lab, LabOptions, PodInfo, PodProcess, Proto};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A lab with a prefix unique to this test run.
fn lab() -> Lab {
    let prefix = format!("t{}", SEQ.fetch_add(1, Ordering::Relaxed));
    Lab::with_options(
        &prefix,
        LabOptions {
            meshauth_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_meshauth"))),
            ..LabOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("creating the lab (this test needs root): {e}"))
}

const PORT: u16 = 8080;

/// Polls `cond` until it holds; panics after 10 s (a hang, not a timing).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// TCP resets sent in the network namespace of process `pid`
/// (`/proc/PID/net/snmp`, `Tcp: … OutRsts`; IPv4 and IPv6 share it).
fn tcp_out_rsts(pid: u32) -> u64 {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).expect("net/snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().expect("Tcp header"),
        tcp.next().expect("Tcp values"),
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutRsts")
        .and_then(|(_, v)| v.parse().ok())
        .expect("OutRsts")
}
const T: Duration = Duration::from_secs(2);

fn addrs(p: &PodInfo) -> [IpAddr; 2] {
    [p.ipv4.into(), p.ipv6.into()]
}

fn leftovers(lab_prefix: &str, cgroup: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&format!("{lab_prefix}-")) {
            left.push(n);
        }
    }
    if cgroup.exists() {
        left.push(cgroup.display().to_string());
    }
    left
}

#[test]
fn two_nodes_two_pods_each() {
    let mut lab = lab();
    let cgroup_root = lab.cgroup_root().to_path_buf();
    let prefix = lab
        .fabric_netns()
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('-').next())
        .expect("fabric netns name")
        .to_string();
    lab.add_node("a").expect("node a");
    lab.add_node("b").expect("node b");
    let pods: Vec<PodInfo> = [("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")]
        .iter()
        .map(|(n, p)| lab.add_pod(n, p).unwrap_or_else(|e| panic!("pod {p}: {e}")))
        .collect();
    let mut procs: Vec<PodProcess> = pods
        .iter()
        .map(|p| {
            lab.start_pod_process(p)
                .unwrap_or_else(|e| panic!("process in {}: {e}", p.name))
        })
        .collect();
    for p in &mut procs {
        p.serve(PORT).unwrap_or_else(|e| panic!("{e}"));
    }

    // a1 → a2 (same node), a1 → b1 and b2 → a2 (across nodes), v4 and v6.
    for (from, to) in [(0, 1), (0, 2), (3, 1), (2, 3)] {
        for addr in addrs(&pods[to]) {
            let what = format!("{} -> {} {addr}", pods[from].name, pods[to].name);
            procs[from]
                .connect(addr, PORT, T)
                .unwrap_or_else(|e| panic!("tcp {what}: {e}"));
            procs[from]
                .udp(addr, PORT, T)
                .unwrap_or_else(|e| panic!("udp {what}: {e}"));
        }
    }
    let (tcp, udp) = procs[1].served(PORT).expect("stats of a2");
    assert_eq!((tcp, udp), (4, 4), "a2 served 2 pods × v4/v6");

    let r = procs[0]
        .connect_retry(pods[2].ipv4.into(), PORT, T)
        .expect("connect_retry a1 -> b1");
    assert_eq!(r.failed_attempts, 0, "{r:?}");

    for proto in [Proto::Tcp, Proto::Udp] {
        let samples = procs[0]
            .rr(pods[3].ipv6.into(), PORT, proto, 200)
            .expect("rr");
        assert_eq!(samples.len(), 200, "{proto:?}");
        assert!(samples.iter().all(|s| *s > 0), "{proto:?}: {samples:?}");
    }

    procs[0]
        .open("c", pods[2].ipv4.into(), PORT, T)
        .expect("open");
    procs[0].ping("c", T).expect("ping");
    procs[0].close("c").expect("close");
    procs[0]
        .stream("s", pods[2].ipv6.into(), PORT, Duration::from_millis(5), T)
        .expect("stream");
    wait_until("5 stream round trips", || {
        procs[0].stream_stats("s").expect("stream-stats").ok >= 5
    });
    let st = procs[0].stream_stop("s").expect("stream-stop");
    assert!(st.ok >= 5 && st.failed == 0, "{st:?}");

    // A command that fails says which pod and which command.
    let e = procs[0]
        .connect(pods[2].ipv4.into(), PORT + 1, T)
        .expect_err("nothing listens there");
    let msg = e.to_string();
    assert!(
        msg.contains("pod a1") && msg.contains("connect") && msg.contains("refused"),
        "{msg}"
    );

    // Removing node b removes the routes to its pods.
    let b1 = pods[2].clone();
    drop(procs.remove(3));
    drop(procs.remove(2));
    lab.remove_node("b").expect("remove node b");
    // IPv4: node a answers ICMP net unreachable at once. IPv6: the kernel
    // takes ICMPv6 "no route" as a soft error, so connect times out.
    let e = procs[0]
        .connect(b1.ipv4.into(), PORT, Duration::from_millis(300))
        .expect_err("b1 is gone");
    assert!(e.to_string().contains("unreachable"), "{e}");
    procs[0]
        .connect(b1.ipv6.into(), PORT, Duration::from_millis(300))
        .expect_err("b1 is gone (v6)");
    assert!(lab.node("b").is_none() && lab.pod("b1").is_none());
    // Node a still works.
    procs[0]
        .connect(pods[1].ipv4.into(), PORT, T)
        .expect("a1 -> a2 after removing b");

    drop(lab);
    assert_eq!(leftovers(&prefix, &cgroup_root), Vec::<String>::new());
    // The processes were killed with the lab.
    let e = procs[0]
        .connect(pods[1].ipv4.into(), PORT, T)
        .expect_err("lab is gone");
    assert!(e.to_string().contains("pod a1"), "{e}");
}

#[test]
fn pod_process_is_in_the_pod_cgroup_and_netns() {
    let mut lab = lab();
    let node = lab.add_node("n").expect("node");
    let pod = lab.add_pod("n", "p").expect("pod");
    let proc = lab.start_pod_process(&pod).expect("process");
    let cg =
        std::fs::read_to_string(format!("/proc/{}/cgroup", proc.pid())).expect("cgroup of pid");
    let mount = auth_ebpf::attach::cgroup2_mounts()
        .into_iter()
        .next()
        .expect("cgroup2 mount");
    let rel = pod
        .cgroup
        .strip_prefix(&mount)
        .expect("pod cgroup under the mount");
    let want = format!("0::/{}", rel.display());
    assert!(cg.lines().any(|l| l == want), "want {want:?} in\n{cg}");
    assert!(pod.cgroup.starts_with(&node.pods_cgroup));
    let ns = std::fs::read_link(format!("/proc/{}/ns/net", proc.pid())).expect("netns of pid");
    let pod_ns = nix_stat_ino(&pod.netns);
    assert_eq!(ns.to_string_lossy(), format!("net:[{pod_ns}]"));
}

/// A checkout under `/root` (mode 0700), as on a fresh machine cloned into
/// root's home: a pod run as another uid cannot search the directory that
/// holds the meshauth binary, and must still start (lab-exec opens the binary
/// as root and execs it through its descriptor).
#[test]
fn a_pod_run_as_another_uid_starts_from_a_binary_it_cannot_reach() {
    use std::os::unix::fs::PermissionsExt as _;
    let private = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let bin = private.path().join("meshauth");
    std::fs::copy(env!("CARGO_BIN_EXE_meshauth"), &bin).expect("copying meshauth");
    let prefix = format!("t{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let mut lab = Lab::with_options(
        &prefix,
        LabOptions {
            meshauth_bin: Some(bin),
            ..LabOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("creating the lab (this test needs root): {e}"));
    lab.add_node("n").expect("node");
    let pod = lab.add_pod("n", "p").expect("pod");
    lab.set_run_as("p", Some(20_517)).expect("run_as");
    let proc = lab
        .start_pod_process(&pod)
        .unwrap_or_else(|e| panic!("a pod as uid 20517 from a 0700 directory: {e}"));
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", proc.pid())).expect("status of pid");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("a Uid line");
    assert_eq!(
        uid.split_whitespace().collect::<Vec<_>>(),
        ["20517"; 4],
        "{status}"
    );
}

fn nix_stat_ino(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p).expect("stat netns").ino()
}

#[test]
fn cleanup_stale_removes_leftovers_of_a_dead_run() {
    // Fake leftovers of a run whose pid does not exist.
    let dead = 4_000_000; // above pid_max's default
    let mount = auth_ebpf::attach::cgroup2_mounts()
        .into_iter()
        .next()
        .expect("cgroup2 mount");
    let cg = mount.join(format!("meshauth-lab-stale-{dead}x0"));
    std::fs::create_dir_all(cg.join("n")).expect("fake cgroup");
    std::fs::create_dir_all("/run/netns").expect("/run/netns");
    let ns = PathBuf::from(format!("/run/netns/stale-{dead}x0-fabric"));
    std::fs::write(&ns, "").expect("fake netns file");
    let removed = Lab::cleanup_stale("stale");
    assert!(!cg.exists() && !ns.exists(), "removed {removed:?}");
}

#[test]
fn a_panic_drops_the_lab() {
    let mut names = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = lab();
        lab.add_node("n").expect("node");
        let pod = lab.add_pod("n", "p").expect("pod");
        let proc = lab.start_pod_process(&pod).expect("process");
        names = Some((
            pod.netns.clone(),
            lab.cgroup_root().to_path_buf(),
            proc.pid(),
        ));
        std::mem::forget(proc); // only the lab can kill it now
        panic!("test body fails");
    }));
    assert!(r.is_err());
    let (netns, cgroup, pid) = names.expect("the body ran");
    assert!(!netns.exists() && !cgroup.exists(), "{netns:?} {cgroup:?}");
    assert_not_running(pid);
}

/// `pid` is gone or a zombie (a forgotten Child is never reaped).
fn assert_not_running(pid: u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    assert!(matches!(state, None | Some("Z")), "pid {pid}: {stat}");
}

#[test]
fn cleanup_stale_removes_a_forgotten_lab() {
    let mut lab = lab();
    let node = lab.add_node("n").expect("node");
    let pod = lab.add_pod("n", "p").expect("pod");
    let proc = lab.start_pod_process(&pod).expect("process");
    let agent = lab.spawn(&node, "sleep", ["60"]).expect("a node process");
    let host = std::fs::read_to_string(format!("/proc/{}/cgroup", agent.id())).expect("cgroup");
    assert!(
        host.contains(&format!(
            "/{}/n.host",
            lab.cgroup_root().file_name().unwrap().to_string_lossy()
        )),
        "{host}"
    );
    let prefix = lab
        .fabric_netns()
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('-').next())
        .expect("fabric netns name")
        .to_string();
    let cgroup = lab.cgroup_root().to_path_buf();
    let pids = [proc.pid(), agent.id()];
    // As if the run had been killed with -9: nothing dropped.
    std::mem::forget(proc);
    std::mem::forget(agent);
    std::mem::forget(lab);
    let removed = Lab::cleanup_stale(&prefix);
    assert!(removed.len() >= 4, "{removed:?}");
    assert_eq!(leftovers(&prefix, &cgroup), Vec::<String>::new());
    for pid in pids {
        assert_not_running(pid);
    }
}

#[test]
fn connect_retry_counts_attempts_until_a_server_appears() {
    let mut lab = lab();
    lab.add_node("a").expect("node a");
    lab.add_node("b").expect("node b");
    let client = lab.add_pod("a", "client").expect("client");
    let server = lab.add_pod("b", "server").expect("server");
    let mut c = lab.start_pod_process(&client).expect("client process");
    let mut s = lab.start_pod_process(&server).expect("server process");
    let to: IpAddr = server.ipv6.into();
    let retry = std::thread::spawn(move || {
        let r = c.connect_retry(to, PORT, Duration::from_secs(5));
        (c, r)
    });
    // Serve only after the client was refused at least once: the server
    // pod's kernel answered a SYN with a reset (its netns' TCP OutRsts).
    let server_pid = s.pid();
    wait_until("a refused attempt", || tcp_out_rsts(server_pid) >= 1);
    s.serve(PORT).expect("serve");
    let (_c, r) = retry.join().expect("retry thread");
    let r = r.expect("connect_retry succeeds once the server is up");
    // Refused while nothing listened (the timing is not asserted).
    assert!(r.failed_attempts >= 1, "{r:?}");
}
