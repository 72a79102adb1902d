//! The local API over a real unix socket: the CLI's client against the
//! server with a stand-in backend; Hubble-shaped flows, following, filters,
//! the socket's mode, bad requests and garbage on the socket.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use auth_agent::api::types::{
    AgentStatus, AuthEntry, DatapathStatus, FlowRecord, HandshakeCounts, IdentityEntry,
    PolicySummary, Readiness, SpireStatus,
};
use auth_agent::api::{ApiClient, ApiError, Backend, FlowHub};
use auth_agent::api::{ObserveArgs, observe};
use auth_ebpf::events::FlowEvent;
use auth_ebpf::types::Direction;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

struct Fake {
    hub: FlowHub,
}

fn status() -> AgentStatus {
    AgentStatus {
        node: "node-a".into(),
        version: "0.1.0".into(),
        mode: "enforce".into(),
        started: "2026-11-26T00:00:00Z".into(),
        ready: Readiness {
            datapath: true,
            svids: false,
            policy: true,
        },
        spire: SpireStatus {
            source: "workload_api".into(),
            socket: "/run/spire/sockets/agent.sock".into(),
            state: "disconnected".into(),
            since: None,
            last_error: Some("connect: refused".into()),
            outage: true,
            svids: 2,
            next_expiry: None,
            reconnects: 3,
            overdue_svids: 1,
            pods: Vec::new(),
        },
        datapath: DatapathStatus {
            pin_dir: "/sys/fs/bpf/meshauth".into(),
            cgroup: "/sys/fs/cgroup/kubepods.slice".into(),
            links: 2,
            auth_entries: 5,
            auth_capacity: 100,
            ipcache_entries: 9,
            policy_entries: 1,
            auth_required_drops: 7,
        },
        policy: PolicySummary {
            source: "kubernetes".into(),
            generation: 4,
            synced: true,
            policies: 2,
            rejected: 1,
            identities: 3,
            endpoints: 9,
            rules: 1,
            errors: vec![],
        },
        peers: vec![],
        handshakes: HandshakeCounts {
            initiated_ok: 1,
            initiated_failed: 0,
            served_ok: 2,
            served_failed: 1,
        },
        wireguard: None,
    }
}

impl Backend for Fake {
    fn status(&self) -> Result<AgentStatus, String> {
        Ok(status())
    }
    fn auth(&self) -> Result<Vec<AuthEntry>, String> {
        Err("auth map: opening /sys/fs/bpf/x: no such file".into())
    }
    fn identities(&self) -> Vec<IdentityEntry> {
        vec![]
    }
    fn policies(&self, json: bool) -> String {
        if json { "[]".into() } else { "none\n".into() }
    }
    fn flows(&self) -> &FlowHub {
        &self.hub
    }
}

fn event(i: u16, dropped: bool) -> FlowEvent {
    FlowEvent {
        time: SystemTime::now(),
        direction: Direction::Ingress,
        local: ("10.0.1.2".parse().unwrap(), 8080),
        remote: ("fd00::3".parse().unwrap(), 40000 + i),
        local_identity: 257,
        remote_identity: 256,
        remote_node_id: 1,
        proto: 17,
        forwarded: !dropped,
        reason: if dropped { 189 } else { 2 },
        auth_type: 1,
        len: 100,
    }
}

async fn start() -> (tempfile::TempDir, ApiClient, FlowHub, CancellationToken) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/meshauth/agent.sock");
    let listener = auth_agent::api::server::bind(&sock).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket is root's only");
    let hub = FlowHub::new(100);
    let token = CancellationToken::new();
    tokio::spawn(auth_agent::api::server::serve(
        listener,
        Arc::new(Fake { hub: hub.clone() }),
        token.clone(),
    ));
    (dir, ApiClient::new(&sock), hub, token)
}

#[tokio::test]
async fn status_round_trips_and_errors_name_what_failed() {
    let (dir, api, _hub, token) = start().await;
    let s: AgentStatus = api.get_json("/v1/status").await.unwrap();
    assert_eq!(s, status());
    let text = auth_agent::api::render::render_status(&s);
    assert!(text.contains("Ready:       NO"), "{text}");
    assert!(text.contains("SPIRE answered: NO"), "{text}");
    assert!(text.contains("OUTAGE"), "{text}");
    assert!(
        text.contains("1 SVIDs past 3/4 of their lifetime"),
        "{text}"
    );
    assert!(text.contains("auth 5/100 (5.0%)"), "{text}");

    match api.get_json::<Vec<AuthEntry>>("/v1/auth").await {
        Err(ApiError::Status { status, body, .. }) => {
            assert_eq!(status, 500);
            assert!(body.contains("no such file"), "{body}");
        }
        other => panic!("expected the backend's error, got {other:?}"),
    }
    match api.get_text("/v1/nope").await {
        Err(ApiError::Status { status, .. }) => assert_eq!(status, 404),
        other => panic!("{other:?}"),
    }
    match api.get_text("/v1/flows?identity=abc").await {
        Err(ApiError::Status { status, body, .. }) => {
            assert_eq!(status, 400);
            assert!(body.contains("identity"));
        }
        other => panic!("{other:?}"),
    }

    // Garbage on the socket: that connection fails, the server keeps serving.
    let sock = dir.path().join("run/meshauth/agent.sock");
    let mut raw = tokio::net::UnixStream::connect(&sock).await.unwrap();
    raw.write_all(b"\x16\x03\x01garbage\r\n\r\n").await.unwrap();
    drop(raw);
    let s: AgentStatus = api.get_json("/v1/status").await.unwrap();
    assert_eq!(s.node, "node-a");

    // No agent: the error says where it looked.
    let missing = ApiClient::new(dir.path().join("none.sock"));
    let e = missing
        .get_text("/v1/status")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("none.sock") && e.contains("meshauth-agent"),
        "{e}"
    );
    token.cancel();
}

#[tokio::test]
async fn observe_gives_history_then_follows_with_the_verdict_filter() {
    let (_dir, api, hub, token) = start().await;
    let d = policy_bridge::DesiredState::default();
    for i in 0..5 {
        hub.push(auth_agent::api::flows::to_record(
            &event(i, i % 2 == 0),
            &d,
            "node-b",
        ));
    }
    // History only: the last 2 drops.
    let mut got = Vec::new();
    let args = ObserveArgs {
        verdict: Some("dropped".into()),
        last: 2,
        json: true,
        ..ObserveArgs::default()
    };
    observe(&api, &args, &mut got).await.unwrap();
    let lines: Vec<FlowRecord> = String::from_utf8(got)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|r| r.flow.verdict == "DROPPED"));
    assert_eq!(lines[0].flow.l4.udp.unwrap().source_port, 40002);
    assert_eq!(lines[1].flow.drop_reason_desc, "AUTH_REQUIRED");
    assert_eq!(lines[1].flow.ip.source, "fd00::3");
    assert_eq!(lines[1].flow.ip.ip_version, "IPv6");

    // Following: flows pushed after the request arrive, filtered.
    let api2 = api.clone();
    let follower = tokio::spawn(async move {
        let mut seen = Vec::new();
        api2.stream_lines("/v1/flows?last=0&follow=true&verdict=FORWARDED", |l| {
            seen.push(l.to_string());
            seen.len() < 3
        })
        .await
        .unwrap();
        seen
    });
    // Push only once the follower is attached (not after a guessed sleep).
    tokio::time::timeout(Duration::from_secs(5), async {
        while hub.followers() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the follower attached");
    for i in 10..20 {
        hub.push(auth_agent::api::flows::to_record(
            &event(i, i % 2 == 0),
            &d,
            "node-b",
        ));
    }
    let seen = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("three followed flows in time")
        .unwrap();
    let ports: Vec<u32> = seen
        .iter()
        .map(|l| {
            let r: FlowRecord = serde_json::from_str(l).unwrap();
            assert_eq!(r.flow.verdict, "FORWARDED");
            r.flow.l4.udp.unwrap().source_port
        })
        .collect();
    assert_eq!(ports, vec![40011, 40013, 40015]);

    // Text lines like hubble observe.
    let mut got = Vec::new();
    let args = ObserveArgs {
        last: 1,
        ..ObserveArgs::default()
    };
    observe(&api, &args, &mut got).await.unwrap();
    let text = String::from_utf8(got).unwrap();
    assert!(
        text.contains(
            "[fd00::3]:40019 (ID:256) -> 10.0.1.2:8080 (ID:257) FORWARDED (UDP) on node-b"
        ),
        "{text}"
    );
    token.cancel();
}

/// A Hubble runbook's filter, unchanged, on `meshauth observe -o json`:
/// the drops for "Authentication required" by Hubble's enum name, with
/// `drop_reason` 189 and the `event_type` of a drop notification.
#[tokio::test]
async fn a_hubble_runbook_jq_filter_works_on_observe_json() {
    let (_dir, api, hub, token) = start().await;
    let d = policy_bridge::DesiredState::default();
    for i in 0..4 {
        hub.push(auth_agent::api::flows::to_record(
            &event(i, i % 2 == 1),
            &d,
            "node-b",
        ));
    }
    let mut got = Vec::new();
    let args = ObserveArgs {
        json: true,
        last: 10,
        ..ObserveArgs::default()
    };
    observe(&api, &args, &mut got).await.unwrap();
    token.cancel();

    let filter = r#"select(.flow.verdict == "DROPPED" and .flow.drop_reason_desc == "AUTH_REQUIRED" and .flow.drop_reason == 189 and .flow.event_type.type == 1) | "\(.flow.IP.source):\(.flow.l4.UDP.source_port)""#;
    let mut jq = std::process::Command::new("jq")
        .args(["-r", filter])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("jq (scripts/install-test-deps installs it)");
    use std::io::Write as _;
    jq.stdin.take().unwrap().write_all(&got).unwrap();
    let out = jq.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "fd00::3:40001\nfd00::3:40003\n",
        "input:\n{}",
        String::from_utf8_lossy(&got)
    );
}

mod socket {
    //! The API socket against a second agent, stale sockets and unsafe
    //! directories.

    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    use std::path::Path;

    use auth_agent::api::socket::{BindError, bind, bind_guarded};

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// A fresh 0700 directory for the socket.
    fn run_dir() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        (dir, sock)
    }

    #[tokio::test]
    async fn a_second_agent_is_refused_while_the_first_answers_and_the_first_keeps_its_socket() {
        let (_dir, sock) = run_dir();
        let (first, first_guard) = bind_guarded(&sock).unwrap();
        let token = CancellationToken::new();
        tokio::spawn(auth_agent::api::server::serve(
            first,
            Arc::new(Fake {
                hub: FlowHub::new(10),
            }),
            token.clone(),
        ));
        let inode = std::fs::metadata(&sock).unwrap().ino();

        let e = bind_guarded(&sock)
            .map(|_| "bound")
            .expect_err("a second agent took over the running agent's API socket");
        assert!(matches!(e, BindError::InUse { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&sock.display().to_string())
                && msg.contains("another meshauth agent is running"),
            "{msg}"
        );
        assert_eq!(
            std::fs::metadata(&sock).unwrap().ino(),
            inode,
            "the socket file was replaced"
        );
        // The first agent still answers on it.
        let s: AgentStatus = ApiClient::new(&sock).get_json("/v1/status").await.unwrap();
        assert_eq!(s.node, "node-a");
        drop(first_guard);
        assert!(!sock.exists(), "the first agent removes its own socket");
        token.cancel();
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let (_dir, sock) = run_dir();
        // An agent that died: the file stays, nothing answers.
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let (_new, guard) = bind_guarded(&sock).expect("a stale socket is replaced");
        assert_eq!(mode(&sock), 0o600);
        std::os::unix::net::UnixStream::connect(&sock).expect("the new socket answers");
        drop(guard);
        assert!(!sock.exists());
    }

    #[tokio::test]
    async fn an_agent_stopping_leaves_a_socket_that_is_not_its_own() {
        let (_dir, sock) = run_dir();
        let (_a, guard_a) = bind_guarded(&sock).unwrap();
        // Someone removed A's socket file and B started in its place.
        std::fs::remove_file(&sock).unwrap();
        let (_b, guard_b) = bind_guarded(&sock).unwrap();
        drop(guard_a);
        assert!(sock.exists(), "agent A removed agent B's socket");
        std::os::unix::net::UnixStream::connect(&sock).expect("B still answers");
        drop(guard_b);
        assert!(!sock.exists());
    }

    #[tokio::test]
    async fn something_else_at_the_path_is_left_alone() {
        let (_dir, sock) = run_dir();
        std::fs::write(&sock, "not a socket").unwrap();
        let e = bind(&sock).map(|_| ()).unwrap_err();
        assert!(
            e.to_string().contains("not a socket (a regular file)"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not a socket");
    }

    #[tokio::test]
    async fn a_directory_others_can_write_to_or_owned_by_someone_else_is_refused() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (chown)"
        );
        let (dir, sock) = run_dir();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind(&sock).map(|_| ()).unwrap_err();
        assert!(
            matches!(e, BindError::UnsafeDir { mode: 0o777, .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string())
                && msg.contains("mode 0777")
                && msg.contains("chmod 0700"),
            "{msg}"
        );
        assert!(!sock.exists());

        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let e = bind(&sock).map(|_| ()).unwrap_err();
        assert!(
            matches!(e, BindError::UnsafeDir { uid: 65534, .. }),
            "{e:?}"
        );

        // A missing directory is created 0700.
        let nested = dir.path().join("run/meshauth/agent.sock");
        std::os::unix::fs::chown(dir.path(), Some(0), None).unwrap();
        let _l = bind(&nested).unwrap();
        assert_eq!(mode(nested.parent().unwrap()), 0o700);
        assert_eq!(mode(&nested), 0o600);
    }

    #[tokio::test]
    async fn the_socket_appears_at_its_path_already_0600() {
        use rustix::fs::inotify;
        let (dir, sock) = run_dir();
        let fd =
            inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
        inotify::add_watch(
            &fd,
            dir.path(),
            inotify::WatchFlags::CREATE
                | inotify::WatchFlags::MOVED_TO
                | inotify::WatchFlags::ATTRIB,
        )
        .unwrap();
        let _l = bind(&sock).unwrap();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&fd, &mut buf);
        let mut seen = Vec::new();
        while let Ok(e) = reader.next() {
            if e.file_name().is_some_and(|n| n.to_bytes() == b"agent.sock") {
                seen.push(e.events());
            }
        }
        assert_eq!(
            seen,
            [inotify::ReadFlags::MOVED_TO],
            "the socket must appear at its path once, by a rename of an already 0600 socket \
             (a bind there followed by a chmod leaves a window with the umask's mode)"
        );
        assert_eq!(mode(&sock), 0o600);
    }
}
