//! `meshauth demo` inside a qemu VM booting the host's Debian kernel (the
//! one with kernel WireGuard): the namespace cluster, cgroups v2, the eBPF
//! datapath pinned in bpffs and spire-dev all work in the VM the WireGuard
//! tests run in. Needs root, qemu, busybox-static and linux-image-amd64
//! (`scripts/install-test-deps`); fails, never skips, without them.

use std::time::Duration;

use meshauth_test_support::vm::VmBuilder;

#[test]
fn the_demo_holds_every_expectation_inside_the_vm() {
    let vm = VmBuilder::new()
        .unwrap_or_else(|e| panic!("the VM harness cannot start: {e}"))
        .timeout(Duration::from_secs(900));
    let out = vm
        .run(&[env!("CARGO_BIN_EXE_meshauth"), "demo"])
        .unwrap_or_else(|e| panic!("running meshauth demo in the VM: {e}"));
    eprintln!(
        "meshauth demo in the VM ({}, kernel {}): status {}, boot {:?}, total {:?}",
        out.accel,
        vm.kernel_release(),
        out.status,
        out.boot_time,
        out.total_time
    );
    assert_eq!(
        out.status, 0,
        "meshauth demo failed in the VM:\n{}",
        out.output
    );
    for needle in [
        "Authentication required DROPPED (TCP)",
        "8 of 8 expectations held",
        "traffic recovers by itself",
    ] {
        assert!(
            out.output.contains(needle),
            "missing {needle:?} in:\n{}",
            out.output
        );
    }
}
