//! `meshauth-agent` as a process: every invalid setting reported at once.
//! The agent on a lab cluster (health, metrics, restarts) is tested in
//! meshauth-cli's `tests/agent.rs`; `wireguard: true` on a kernel without
//! WireGuard in its `tests/wireguard_host.rs`, and with it in
//! `tests/wireguard_vm.rs`.

use std::process::Command;

#[test]
fn every_invalid_setting_is_reported_at_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshauth-agent"))
        .args([
            "--mode",
            "block",
            "--handshake-listen",
            "nowhere",
            "--policy-poll-interval",
            "often",
        ])
        .env_remove("NODE_NAME")
        .env("MESHAUTH_REAUTH_FRACTION", "1.5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for source in [
        "--node-name",
        "--mode",
        "--handshake-listen",
        "--policy-poll-interval",
        "MESHAUTH_REAUTH_FRACTION",
    ] {
        assert!(err.contains(source), "{source} missing from:\n{err}");
    }
    assert!(err.contains("5 invalid configuration value(s)"), "{err}");
}
