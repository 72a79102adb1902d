//! `meshauth spire render` as a user runs it: every invalid setting at
//! once (exit 2, nothing written), and the two files written 0600.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

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
