//! The README's main command: `meshauth demo` runs the three-node cluster
//! end to end, every expectation holds, and nothing is left behind.

use std::process::Command;

#[test]
fn the_demo_holds_every_expectation_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshauth"))
        .args(["demo"])
        .output()
        .expect("running meshauth demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "meshauth demo failed (it needs root):\n{stdout}\n{stderr}"
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
}
