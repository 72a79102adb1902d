//! `meshauth spire render` as a user runs it: every invalid setting at
//! once (exit 2, nothing written), and the two files written 0600; and
//! `meshauth spire reconcile` against real SPIRE (needs the binaries
//! scripts/build-spire makes; fails, never skips, without them).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use meshauth_tests::real_spire::{
    SpireAgent, SpireServer, agent_settings, own_uid, spire_bin, spire_tempdir, start_server,
};

fn meshauth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshauth"))
}

#[test]
fn every_invalid_setting_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshauth()
        .args([
            "spire",
            "render",
            "--trust-domain",
            "Bad.TD",
            "--server-replicas",
            "2",
        ])
        .args([
            "--svid-ttl",
            "forever",
            "--admin-socket",
            "/run/spire/sockets/admin.sock",
        ])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--svid-ttl \"forever\"",
        "trust domain \"Bad.TD\"",
        "sqlite3 with 2 server replicas",
        "under the Workload API socket's directory",
        "no authorized delegate",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn kubernetes_files_are_written_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshauth()
        .args([
            "spire",
            "render",
            "--trust-domain",
            "prod.example",
            "--deployment",
            "kubernetes",
        ])
        .args([
            "--cluster",
            "eu1",
            "--server-replicas",
            "3",
            "--datastore",
            "postgres",
        ])
        .args(["--admin-socket", "/run/spire/admin/admin.sock"])
        .args([
            "--authorized-delegate",
            "spiffe://prod.example/ns/meshauth/sa/meshauth-agent",
        ])
        .arg("--out")
        .arg(dir.path())
        .env(
            "MESHAUTH_SPIRE_POSTGRES",
            "dbname=spire host=db password=secret",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = std::fs::read_to_string(dir.path().join("server.conf")).unwrap();
    let agent = std::fs::read_to_string(dir.path().join("agent.conf")).unwrap();
    for f in ["server.conf", "agent.conf"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    assert!(
        server.contains("NodeAttestor \"k8s_psat\"") && server.contains("\"eu1\""),
        "{server}"
    );
    assert!(server.contains("database_type = \"postgres\""), "{server}");
    assert!(agent.contains("WorkloadAttestor \"k8s\""), "{agent}");
    assert!(agent.contains("authorized_delegates"), "{agent}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("secret"),
        "the connection string is not printed: {stdout}"
    );
}

const TD: &str = "meshauth.local";

fn node_yaml(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n    - type: InternalIP\n      address: {ip}\n"
    )
}

fn pod_yaml(name: &str, app: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: prod\n  uid: uid-{name}\n  labels:\n    app: {app}\nspec:\n  nodeName: {node}\nstatus:\n  phase: Running\n  podIP: {ip}\n"
    )
}

fn write(path: &std::path::Path, text: &str) {
    // Written beside and renamed, as a deploy tool would, so the reconciler
    // never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// `<dir>/manifests`: node-a (with `node_a_uid` as metadata.uid, if
/// given) and node-b, pod pay (app payment) on node-a and pod ord (app
/// order) on node-b.
fn two_nodes_two_pods(dir: &std::path::Path, node_a_uid: Option<&str>) -> std::path::PathBuf {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let mut node_a = node_yaml("node-a", "192.0.2.1");
    if let Some(uid) = node_a_uid {
        node_a = node_a.replace(
            "  name: node-a\n",
            &format!("  name: node-a\n  uid: {uid}\n"),
        );
    }
    write(&manifests.join("node-a.yaml"), &node_a);
    write(
        &manifests.join("node-b.yaml"),
        &node_yaml("node-b", "192.0.2.2"),
    );
    write(
        &manifests.join("pay.yaml"),
        &pod_yaml("pay", "payment", "node-a", "10.0.1.10"),
    );
    write(
        &manifests.join("ord.yaml"),
        &pod_yaml("ord", "order", "node-b", "10.0.2.10"),
    );
    manifests
}

/// Our entries as `spire-server entry show` prints them: (SPIFFE ID, parent).
fn ours(server: &SpireServer) -> BTreeSet<(String, String)> {
    let shown = server
        .cli(&["entry", "show"], &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = BTreeSet::new();
    for block in shown.split("\n\n") {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches([' ', ':']).trim().to_owned())
        };
        if field("Entry ID").is_some_and(|id| id.starts_with("meshauth-")) {
            out.insert((
                field("SPIFFE ID").unwrap_or_default(),
                field("Parent ID").unwrap_or_default(),
            ));
        }
    }
    out
}

fn pair(identity: &str, node: &str) -> (String, String) {
    (
        format!("spiffe://{TD}/identity/{identity}"),
        format!("spiffe://{TD}/meshauth/node/{node}"),
    )
}

/// Waits (polling SPIRE's CLI) until our entries are `want`; panics with
/// what SPIRE holds and the reconciler's output otherwise.
fn wait_for(server: &SpireServer, want: &BTreeSet<(String, String)>, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = ours(server);
        if &got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "entries {got:?}, want {want:?}; reconciler output:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `meshauth spire reconcile` against SPIRE 1.13.3 with one SPIRE agent
/// per node: `--once` creates the entries the manifests call for (each
/// node's agent serves only its own pods' identities) and a second run
/// changes nothing; the continuous mode puts back an entry deleted by hand,
/// follows a pod to another node (least privilege: the old node's agent
/// stops serving that identity, the new one serves it) and stops on
/// SIGTERM.
#[test]
fn reconcile_keeps_real_spire_in_step_with_the_manifests() -> anyhow::Result<()> {
    let bin = spire_bin();
    let dir = spire_tempdir();
    let server = start_server(&bin, dir.path(), TD)?;
    let manifests = two_nodes_two_pods(dir.path(), None);
    // One real SPIRE agent per node, attested with a join token aliased to
    // the parent the reconciler uses; the entries select this process.
    let node_agent = |node: &str| -> anyhow::Result<SpireAgent> {
        let mut st = server.settings().clone();
        agent_settings(&mut st, &dir.path().join("agents").join(node))?;
        st.agent.sync_interval = Some(Duration::from_millis(500));
        let token = server.join_token(&format!("spiffe://{TD}/meshauth/node/{node}"))?;
        Ok(SpireAgent::start(&bin, &server, &st, &token)?)
    };
    let (agent_a, agent_b) = (node_agent("node-a")?, node_agent("node-b")?);
    let me = format!("unix:uid:{}", own_uid());
    let identity_file = dir.path().join("identities.json");
    let args = |extra: &[&str]| {
        let mut c = meshauth();
        c.args(["spire", "reconcile", "--trust-domain", TD, "--manifests"])
            .arg(&manifests)
            .arg("--identity-file")
            .arg(&identity_file)
            .arg("--server-socket")
            .arg(server.socket())
            .args(["--agent-selector", &me])
            .args(extra);
        c
    };
    let once = |what: &str| {
        let out = args(&["--once"])
            .output()
            .unwrap_or_else(|e| panic!("running meshauth spire reconcile: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{what}: {text}");
        text
    };
    let first = once("first run");
    assert!(first.contains("2 created"), "{first}");
    let ids = std::fs::read_to_string(&identity_file)
        .unwrap_or_else(|e| panic!("the identity file: {e}"));
    let v: serde_json::Value =
        serde_json::from_str(&ids).unwrap_or_else(|e| panic!("identities.json: {e}\n{ids}"));
    let number = |app: &str| -> String {
        let label = serde_json::Value::String(format!("k8s:app={app}"));
        v["identities"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["labels"].as_array().is_some_and(|l| l.contains(&label)))
            .and_then(|i| i["id"].as_u64())
            .unwrap_or_else(|| panic!("no identity for app={app} in identities.json: {ids}"))
            .to_string()
    };
    let (pay, ord) = (number("payment"), number("order"));
    let want = BTreeSet::from([pair(&pay, "node-a"), pair(&ord, "node-b")]);
    assert_eq!(ours(&server), want);
    // Each node's SPIRE agent serves only its own pods' identities.
    for (agent, id) in [(&agent_a, &pay), (&agent_b, &ord)] {
        let want = vec![format!("spiffe://{TD}/identity/{id}")];
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.served()? != want {
            assert!(
                Instant::now() < deadline,
                "served {:?}, want {want:?}",
                agent.served()?
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let second = once("second run");
    assert!(
        second.contains("0 created")
            && second.contains("0 put back")
            && second.contains("0 deleted"),
        "{second}"
    );

    let log = dir.path().join("reconcile.log");
    let log_file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
    let log_err = log_file.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let child = args(&["--resync", "1s"])
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting meshauth spire reconcile: {e}"));
    /// Kills the reconciler if the test fails before it is stopped.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(child);

    // Deleted by hand: back within a resync.
    let shown = server.cli(
        &["entry", "show"],
        &[
            "-spiffeID",
            &want.iter().next().map(|p| p.0.clone()).unwrap_or_default(),
        ],
    )?;
    let victim = shown
        .lines()
        .find_map(|l| l.strip_prefix("Entry ID"))
        .map(|v| v.trim_start_matches([' ', ':']).trim().to_owned())
        .unwrap_or_else(|| panic!("no entry to delete: {shown}"));
    server.cli(&["entry", "delete"], &["-entryID", &victim])?;
    assert_ne!(ours(&server), want, "the entry was deleted");
    wait_for(&server, &want, &log);

    // The payment pod moves to node-b: node-a loses the identity.
    write(
        &manifests.join("pay.yaml"),
        &pod_yaml("pay", "payment", "node-b", "10.0.2.11"),
    );
    let moved = BTreeSet::from([pair(&pay, "node-b"), pair(&ord, "node-b")]);
    wait_for(&server, &moved, &log);

    // Least privilege, as the nodes' Workload APIs serve it: node-a no
    // longer holds payment's key, node-b holds both.
    let sid = |n: &str| format!("spiffe://{TD}/identity/{n}");
    let served = |a: &SpireAgent, want: &[String]| {
        let want: BTreeSet<String> = want.iter().cloned().collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got: BTreeSet<String> = a
                .served()
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .collect();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the node's SPIRE agent serves {got:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    served(&agent_a, &[]);
    served(&agent_b, &[sid(&pay), sid(&ord)]);

    let pid = rustix::process::Pid::from_child(&child.0);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)
        .unwrap_or_else(|e| panic!("SIGTERM: {e}"));
    let status = child
        .0
        .wait()
        .unwrap_or_else(|e| panic!("waiting for the reconciler: {e}"));
    assert!(status.success(), "exit on SIGTERM: {status}");
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.contains("1 created"), "the repair is reported: {out}");
    Ok(())
}

/// `--deployment kubernetes`: a node's entries are parented to its k8s_psat
/// agent ID, `spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node uid>`,
/// from the Node's metadata.uid; a node without one gets no entries, and
/// the reconciler says so.
#[test]
fn kubernetes_entries_are_parented_to_the_nodes_k8s_psat_agents() -> anyhow::Result<()> {
    let bin = spire_bin();
    let dir = spire_tempdir();
    let server = start_server(&bin, dir.path(), TD)?;
    let manifests = two_nodes_two_pods(dir.path(), Some("5a1e0c9e-0000-4000-8000-00000000000a"));
    let out = meshauth()
        .args(["spire", "reconcile", "--trust-domain", TD, "--manifests"])
        .arg(&manifests)
        .arg("--server-socket")
        .arg(server.socket())
        .args([
            "--deployment",
            "kubernetes",
            "--cluster",
            "prod-eu",
            "--once",
        ])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("node node-b has no metadata.uid"),
        "the node without a uid is named: {text}"
    );
    let parents: Vec<String> = ours(&server).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        parents,
        vec![format!(
            "spiffe://{TD}/spire/agent/k8s_psat/prod-eu/5a1e0c9e-0000-4000-8000-00000000000a"
        )],
        "one entry, parented to node-a's k8s_psat agent: {text}"
    );

    // Delegated mode on Kubernetes: the entry selects the pods the way
    // SPIRE's k8s attestor names them, not meshauth's agent.
    let out = meshauth()
        .args(["spire", "reconcile", "--trust-domain", TD, "--manifests"])
        .arg(&manifests)
        .arg("--server-socket")
        .arg(server.socket())
        .args([
            "--deployment",
            "kubernetes",
            "--cluster",
            "prod-eu",
            "--select",
            "pods",
            "--once",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("1 created") && text.contains("1 deleted"),
        "{text}"
    );
    let shown = server.cli(&["entry", "show"], &[])?;
    let ours: Vec<&str> = shown
        .split("\n\n")
        .filter(|b| b.contains("meshauth-"))
        .collect();
    assert_eq!(ours.len(), 1, "{shown}");
    let selectors: BTreeSet<&str> = ours[0]
        .lines()
        .filter_map(|l| l.strip_prefix("Selector"))
        .map(|v| v.trim_start_matches([' ', ':']).trim())
        .collect();
    assert_eq!(
        selectors,
        BTreeSet::from(["k8s:ns:prod", "k8s:sa:default", "k8s:pod-label:app:payment"]),
        "{shown}"
    );
    Ok(())
}

/// `--select pods --delegate-id`: meshauth's own agents are registered as
/// the delegate on every node — a node without pods too, since its agent
/// must be authorized before any pod arrives.
#[test]
fn the_delegate_is_registered_on_every_node() -> anyhow::Result<()> {
    let bin = spire_bin();
    let dir = spire_tempdir();
    let server = start_server(&bin, dir.path(), TD)?;
    let manifests = two_nodes_two_pods(dir.path(), None);
    write(
        &manifests.join("node-c.yaml"),
        &node_yaml("node-c", "192.0.2.3"),
    );
    let delegate = format!("spiffe://{TD}/meshauth/agent");
    let out = meshauth()
        .args(["spire", "reconcile", "--trust-domain", TD, "--manifests"])
        .arg(&manifests)
        .arg("--server-socket")
        .arg(server.socket())
        .args(["--select", "pods", "--delegate-id", &delegate])
        .args(["--agent-selector", "unix:uid:0", "--once"])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("pod prod/pay names no uid"),
        "pods without runAsUser are named: {text}"
    );
    let got = ours(&server);
    let want: BTreeSet<(String, String)> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| (delegate.clone(), format!("spiffe://{TD}/meshauth/node/{n}")))
        .collect();
    assert_eq!(got, want, "{text}");

    // Only with --select pods.
    let out = meshauth()
        .args(["spire", "reconcile", "--trust-domain", TD, "--manifests"])
        .arg(&manifests)
        .args(["--delegate-id", &delegate, "--once"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--delegate-id goes with --select pods"),
        "{err}"
    );
    Ok(())
}
