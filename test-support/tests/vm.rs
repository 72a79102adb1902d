//! The VM harness against a real qemu and the host's Debian kernel. Needs
//! root, qemu, busybox-static and linux-image-amd64
//! (`scripts/install-test-deps`); fails, never skips, without them.

use std::time::Duration;

use meshauth_test_support::vm::{VmBuilder, VmOutput};

fn vm() -> VmBuilder {
    VmBuilder::new()
        .unwrap_or_else(|e| panic!("the VM harness cannot start: {e}"))
        .timeout(Duration::from_secs(300))
}

fn run(builder: &VmBuilder, argv: &[&str]) -> VmOutput {
    let out = builder
        .run(argv)
        .unwrap_or_else(|e| panic!("running {argv:?} in the VM: {e}"));
    eprintln!(
        "{argv:?}: status {} ({}; boot {:?}, total {:?})",
        out.status, out.accel, out.boot_time, out.total_time
    );
    out
}

#[test]
fn exit_status_comes_back() {
    let out = run(&vm(), &["sh", "-c", "echo before; exit 7"]);
    assert_eq!(out.status, 7, "{}", out.output);
    assert_eq!(out.output, "before");
}

#[test]
fn guest_kernel_has_wireguard() {
    let vm = vm();
    let script = "test -d /sys/module/wireguard || { echo no /sys/module/wireguard; exit 1; }
        ip link add wgtest type wireguard || exit 2
        wg show wgtest >/dev/null || exit 3
        wg show || exit 4
        echo release=$(uname -r)";
    let out = run(&vm, &["sh", "-c", script]);
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(
        out.output
            .lines()
            .any(|l| l == format!("release={}", vm.kernel_release())),
        "the guest runs another kernel than {}: {}",
        vm.kernel_release(),
        out.output
    );
}

#[test]
fn kernel_modules_autoload_through_the_hosts_modprobe() {
    // veth and bridge, which the lab needs, are modules in Debian's kernel.
    let script = "for m in veth bridge; do test -d /sys/module/$m && { echo $m already loaded; exit 1; }; done
        ip link add va type veth peer name vb || exit 2
        ip link add mabr0 type bridge || exit 3
        test -d /sys/module/veth && test -d /sys/module/bridge || exit 4";
    let out = run(&vm(), &["sh", "-c", script]);
    assert_eq!(out.status, 0, "{}", out.output);
}

#[test]
fn host_files_written_before_boot_are_seen_at_the_same_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("from-host.txt");
    std::fs::write(&file, "written on the host\n").expect("writing the file");
    let path = file.to_str().expect("utf-8 path");
    let out = run(&vm(), &["cat", path]);
    assert_eq!(out.status, 0, "{}", out.output);
    assert_eq!(out.output, "written on the host");
}

#[test]
fn env_and_cwd_arrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path().to_str().expect("utf-8 path");
    let value = "a 'quoted' value; $HOME `x` \"y\"";
    let out = run(
        &vm().cwd(cwd).env("MESHAUTH_VM_TEST", value),
        &[
            "sh",
            "-c",
            "pwd; printf '%s\\n' \"$MESHAUTH_VM_TEST\"; echo home=$HOME",
        ],
    );
    assert_eq!(out.status, 0, "{}", out.output);
    assert_eq!(out.output, format!("{cwd}\n{value}\nhome=/root"));
}

#[test]
fn a_missing_working_directory_is_status_125() {
    let out = run(&vm().cwd("/nonexistent/meshauth-vm"), &["true"]);
    assert_eq!(out.status, 125, "{}", out.output);
}

#[test]
fn a_command_past_the_timeout_is_an_error_and_qemu_is_killed() {
    let started = std::time::Instant::now();
    let err = vm()
        .timeout(Duration::from_secs(40))
        .run(&["sh", "-c", "echo sleeping; sleep 600"])
        .expect_err("sleep 600 outlives a 40 s timeout");
    let msg = err.to_string();
    assert!(msg.contains("did not finish within 40s"), "{msg}");
    assert!(
        msg.contains("sleeping"),
        "the console tail is in the error: {msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_vm_that_ends_without_the_exit_status_is_an_error_with_the_console() {
    let err = vm()
        .run(&[
            "sh",
            "-c",
            // A shell-builtin loop, not `sleep`: as the power-off tears the
            // guest down, exec'ing `sleep` can fail (EIO), the shell exits
            // and init would print an exit status after all.
            "echo powering off; echo o > /proc/sysrq-trigger; while :; do :; done",
        ])
        .expect_err("no exit marker");
    let msg = err.to_string();
    assert!(
        msg.contains("ended without the command's exit status"),
        "{msg}"
    );
    assert!(msg.contains("powering off"), "{msg}");
}
