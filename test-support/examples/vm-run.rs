//! Runs a command in the test VM (Debian's kernel, the host's root shared
//! read-only) from the current directory, and exits with its status:
//!
//! ```sh
//! cargo run -p meshauth-test-support --features vm --example vm-run -- wg show
//! ```
//!
//! `MESHAUTH_VM_ENV=A,B` passes the host's values of A and B.

use meshauth_test_support::vm::VmBuilder;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        eprintln!("usage: vm-run COMMAND [ARG...]");
        std::process::exit(2);
    }
    let mut vm = VmBuilder::new().unwrap_or_else(|e| {
        eprintln!("vm-run: {e}");
        std::process::exit(1)
    });
    for name in std::env::var("MESHAUTH_VM_ENV")
        .unwrap_or_default()
        .split(',')
    {
        if let Ok(value) = std::env::var(name) {
            vm = vm.env(name, value);
        }
    }
    match vm.run(&argv) {
        Ok(out) => {
            eprintln!(
                "vm-run: status {} ({}, kernel {}; boot {:.1?}, total {:.1?})",
                out.status,
                out.accel,
                vm.kernel_release(),
                out.boot_time,
                out.total_time
            );
            std::process::exit(out.status);
        }
        Err(e) => {
            eprintln!("vm-run: {e}");
            std::process::exit(1);
        }
    }
}
