//! The README's main command: `meshauth demo` runs the three-node cluster
//! end to end, every expectation holds, and nothing is left behind — on
//! spire-dev (the default), then on real SPIRE (`--spire-bin`, SPIRE
//! 1.13.3's server and one agent per node). One test, so the two demos
//! (same lab prefix) never run at once.

use std::process::Command;

fn demo(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshauth"))
        .arg("demo")
        .args(extra)
        .output()
        .expect("running meshauth demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "meshauth demo {extra:?} failed (it needs root):\n{stdout}\n{stderr}"
    );
    for needle in [
        "Authentication required DROPPED (TCP)",
        "8 of 8 expectations held",
        "traffic recovers by itself",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("demo-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "namespaces left: {leftovers:?}");
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("meshauth-tb-demo-"))
        .collect();
    assert!(pins.is_empty(), "pins left: {pins:?}");
    stdout
}

#[test]
fn the_demo_holds_every_expectation_and_cleans_up() {
    demo(&[]);
    let bin = meshauth_lab::spire_real::spire_bin(None).unwrap_or_else(|e| panic!("{e}"));
    let bin = bin.to_string_lossy().into_owned();
    let real = demo(&["--spire-bin", &bin]);
    assert!(
        real.contains("real SPIRE"),
        "the demo says it runs on real SPIRE:\n{real}"
    );
    let left = std::process::Command::new("pgrep")
        .args(["-f", "meshauth-demo-.*/spire/"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(left.trim().is_empty(), "SPIRE processes left: {left}");
}
