//! `--wireguard true` on this machine's own kernel. Whether the kernel has
//! WireGuard is read independently (`/sys/module/wireguard`, or a
//! `wireguard.ko*` under `/lib/modules/<release>`): without it the agent
//! must stop at start with an error naming the fix and publish no key; with
//! it, it must come up with the interface (the full behaviour is tested in
//! the VM, `wireguard_vm.rs`).

use std::path::Path;
use std::time::{Duration, Instant};

use meshauth_lab::testbed::{Testbed, TestbedOptions};

fn kernel_has_wireguard() -> bool {
    if Path::new("/sys/module/wireguard").exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = Path::new("/lib/modules").join(release.trim());
    fn find(d: &Path, depth: u32) -> bool {
        depth > 0
            && std::fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with("wireguard.ko")
                        || (e.path().is_dir() && find(&e.path(), depth - 1))
                })
    }
    find(&dir, 8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_names_the_fix_when_the_kernel_has_no_wireguard() {
    assert!(
        meshauth_lab::testbed::is_root(),
        "needs root (namespaces, cgroups, BPF)"
    );
    let mut tb = Testbed::start(TestbedOptions {
        prefix: "wgh".into(),
        nodes: vec!["node-a".into()],
        meshauth_bin: Some(env!("CARGO_BIN_EXE_meshauth").into()),
        net: 63,
        ..TestbedOptions::default()
    })
    .await
    .unwrap();
    tb.set_agent_args("node-a", vec!["--wireguard".into(), "true".into()]);
    tb.start_agent("node-a").unwrap();
    if kernel_has_wireguard() {
        tb.wait_ready("node-a", Duration::from_secs(60))
            .await
            .unwrap();
        let s = tb.status("node-a").await.unwrap();
        assert!(
            s.wireguard.is_some(),
            "WireGuard on a kernel that has it: {s:?}"
        );
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while tb.agent_running("node-a") {
        assert!(
            Instant::now() < deadline,
            "the agent kept running without kernel WireGuard:\n{}",
            tb.log_tail("node-a", 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(tb.paths("node-a").log).unwrap();
    for needle in [
        "the kernel has no WireGuard",
        "modprobe wireguard",
        "CONFIG_WIREGUARD",
        "wireguard: false",
    ] {
        assert!(
            log.contains(needle),
            "missing {needle:?} in the agent's log:\n{log}"
        );
    }
    let manifest = std::fs::read_to_string(tb.manifests().join("node-node-a.yaml")).unwrap();
    assert!(
        !manifest.contains("wireguard-public-key"),
        "a key was published: {manifest}"
    );
    assert!(
        !tb.paths("node-a").state_dir.join("wireguard.key").exists(),
        "a key was made for a node that cannot use it"
    );
}
