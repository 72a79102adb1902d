//! `meshauth preflight`: the node checks in [`crate::preflight`], one line
//! each with what to fix. Exits 1 if any check FAILs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::preflight::{Host, Options, run as run_checks, socket_path};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The SPIRE agent's Workload API socket.
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = "unix:///run/spire/sockets/agent.sock"
    )]
    spire_socket: String,
    /// The cgroup v2 directory holding all pods (detected if not given).
    #[arg(long)]
    pods_cgroup: Option<PathBuf>,
    /// The handshake port (TCP).
    #[arg(long, default_value_t = 4250)]
    handshake_port: u16,
    /// The metrics and health port (TCP).
    #[arg(long, default_value_t = 9964)]
    metrics_port: u16,
    /// Where bpffs must be mounted.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Seconds the SPIRE agent gets to answer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    spire_timeout: u64,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

pub fn run(args: Args) -> ExitCode {
    let opts = Options {
        spire_socket: socket_path(&args.spire_socket),
        pods_cgroup: args.pods_cgroup,
        handshake_port: args.handshake_port,
        metrics_port: args.metrics_port,
        bpffs: args.bpffs,
        spire_timeout: Duration::from_secs(args.spire_timeout),
    };
    let report = match super::block_on(run_checks(&Host::default(), &opts)) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.output == "json" {
        println!("{}", report.render_json());
    } else {
        print!("{}", report.render_text());
    }
    super::exit(report.passed())
}
