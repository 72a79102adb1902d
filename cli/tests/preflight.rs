//! `meshauth preflight`, the real binary on this machine: against a spire-dev
//! agent, a pods cgroup made for the test and free ports it passes; a missing
//! SPIRE socket or a held handshake port fail naming what is wrong.
//!
//! Privileged: the datapath probe loads the real programs into a bpffs
//! directory and the test makes a cgroup. Without root these tests fail
//! (the output says which line), they never skip.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

use spire_dev::{DevConfig, EntrySpec, SpiffeId, SpireDev};

/// Every check's name, in output order.
const CHECKS: &[&str] = &[
    "kernel version",
    "kernel config",
    "BTF",
    "BPF JIT",
    "bpffs",
    "datapath load",
    "cgroup v2",
    "pods cgroup",
    "capabilities",
    "WireGuard",
    "SPIRE socket",
    "handshake port",
    "metrics port",
];

/// A cgroup made under the first cgroup v2 mount, removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(tag: &str) -> Self {
        let mounts = auth_ebpf::attach::cgroup2_mounts();
        let mount = mounts.first().unwrap_or_else(|| {
            panic!("this test needs a cgroup v2 mount; /proc/self/mountinfo has none")
        });
        let path = mount.join(format!("meshauth-preflight-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).unwrap_or_else(|e| {
            panic!(
                "this test needs root: creating cgroup {}: {e}",
                path.display()
            )
        });
        Self(path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A TCP port free on 0.0.0.0 right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// spire-dev with `node-a` holding identity 256 and `node-b` holding nothing.
async fn spire(dir: &Path) -> SpireDev {
    let mut config = DevConfig::new(dir);
    config.nodes = vec!["node-a".into(), "node-b".into()];
    config.control_socket = false;
    config.entries = vec![EntrySpec::new(
        "node-a",
        SpiffeId::parse("spiffe://meshauth.local/identity/256").expect("SPIFFE ID"),
    )];
    SpireDev::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting spire-dev: {e}"))
}

fn socket_of(dev: &SpireDev, node: &str) -> PathBuf {
    dev.agent(node)
        .unwrap_or_else(|e| panic!("{e}"))
        .workload_socket()
        .to_owned()
}

struct Run {
    pid: u32,
    code: i32,
    stdout: String,
}

impl Run {
    /// The line of check `name` (its name stands after the status column).
    fn line(&self, name: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(name)))
            .unwrap_or_else(|| panic!("no line for check {name:?} in:\n{}", self.stdout))
    }
}

async fn preflight(socket: &Path, cgroup: &Path, handshake_port: u16, json: bool) -> Run {
    auth_ebpf::testing::ensure_bpffs();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshauth"));
    cmd.arg("preflight")
        .arg("--spire-socket")
        .arg(socket)
        .arg("--pods-cgroup")
        .arg(cgroup)
        .args(["--handshake-port", &handshake_port.to_string()])
        .args(["--metrics-port", &free_port().to_string()]);
    if json {
        cmd.args(["-o", "json"]);
    }
    cmd.stdout(std::process::Stdio::piped());
    let child = cmd.spawn().expect("running meshauth preflight");
    let pid = child.id().expect("pid of a running child");
    let out = child
        .wait_with_output()
        .await
        .expect("meshauth preflight output");
    Run {
        pid,
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_node_passes_with_a_line_for_every_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = spire(dir.path()).await;
    let cgroup = TestCgroup::new("ready");
    let socket = socket_of(&dev, "node-a");

    let run = preflight(&socket, &cgroup.0, free_port(), false).await;
    assert_eq!(
        run.code, 0,
        "preflight failed on a ready node:\n{}",
        run.stdout
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), CHECKS.len() + 1, "{}", run.stdout);
    for (line, name) in lines.iter().zip(CHECKS) {
        assert!(
            line.get(6..).is_some_and(|l| l.starts_with(name)),
            "expected the {name:?} line, got {line:?}"
        );
        assert!(
            ["ok ", "warn"].iter().any(|s| line.starts_with(s)),
            "{line}"
        );
    }
    assert!(
        lines[CHECKS.len()].ends_with(", 0 FAIL"),
        "summary: {}",
        lines[CHECKS.len()]
    );
    let spire = run.line("SPIRE socket");
    assert!(
        spire.starts_with("ok ")
            && spire.contains(&format!("{} answers, 1 SVID", socket.display()))
            && spire.contains("spiffe://meshauth.local/identity/256"),
        "{spire}"
    );
    let probe = run.line("datapath load");
    assert!(
        probe.starts_with("ok ") && probe.contains("loads on this kernel"),
        "{probe}"
    );
    assert!(
        run.line("pods cgroup")
            .contains(&format!("{} (--pods-cgroup)", cgroup.0.display())),
        "{}",
        run.stdout
    );
    let probe_dir = format!("/sys/fs/bpf/meshauth-preflight-{}", run.pid);
    assert!(
        !Path::new(&probe_dir).exists(),
        "the probe left {probe_dir} on bpffs"
    );

    let run = preflight(&socket, &cgroup.0, free_port(), true).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    let json: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("-o json is not JSON ({e}):\n{}", run.stdout));
    assert_eq!(json["passed"], true, "{json:#}");
    let names: Vec<&str> = json["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, CHECKS);
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_identities_yet_only_warns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = spire(dir.path()).await;
    let cgroup = TestCgroup::new("noid");
    let run = preflight(&socket_of(&dev, "node-b"), &cgroup.0, free_port(), false).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    let spire = run.line("SPIRE socket");
    assert!(
        spire.starts_with("warn") && spire.contains("no identity issued"),
        "{spire}"
    );
    dev.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_spire_socket_fails_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cgroup = TestCgroup::new("nosock");
    let socket = dir.path().join("no-agent.sock");
    let run = preflight(&socket, &cgroup.0, free_port(), false).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    let spire = run.line("SPIRE socket");
    assert!(
        spire.starts_with("FAIL")
            && spire.contains(&socket.display().to_string())
            && spire.contains("socket missing"),
        "{spire}"
    );
    let fails: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .collect();
    assert_eq!(fails, [spire], "only the SPIRE line fails:\n{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_handshake_port_fails_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = spire(dir.path()).await;
    let cgroup = TestCgroup::new("port");
    let held = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("binding a port to hold");
    let port = held.local_addr().expect("addr").port();

    let run = preflight(&socket_of(&dev, "node-a"), &cgroup.0, port, false).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    let line = run.line("handshake port");
    assert!(
        line.starts_with("FAIL")
            && line.contains(&format!(
                "TCP 0.0.0.0:{port} in use by pid {}",
                std::process::id()
            )),
        "{line}"
    );
    drop(held);
    dev.shutdown().await;
}
