//! `meshauth`: thin entry point; everything lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "meshauth",
    version,
    about = "Sidecarless mutual authentication between Kubernetes workloads, enforced in the kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Policies: what meshauth makes of them.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run the demo on this machine (no privileges, nothing installed).
    Demo {
        /// SVID lifetime in seconds (rotation at half of it; the outage lasts until expiry).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=300))]
        ttl: u64,
    },
    /// Check this node before install: kernel, BPF, mounts, privileges,
    /// SPIRE, ports. One line per check with what to fix; exits 1 if any
    /// check FAILs.
    Preflight(PreflightArgs),
}

#[derive(clap::Args, Debug)]
struct PreflightArgs {
    /// The SPIRE agent's Workload API socket.
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = "unix:///run/spire/sockets/agent.sock"
    )]
    spire_socket: String,
    /// The cgroup v2 directory holding all pods (detected if not given).
    #[arg(long)]
    pods_cgroup: Option<std::path::PathBuf>,
    /// The handshake port (TCP).
    #[arg(long, default_value_t = 4250)]
    handshake_port: u16,
    /// The metrics and health port (TCP).
    #[arg(long, default_value_t = 9964)]
    metrics_port: u16,
    /// Where bpffs must be mounted.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: std::path::PathBuf,
    /// Seconds the SPIRE agent gets to answer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    spire_timeout: u64,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Accepted, partially enforced or rejected, with the reasons, for every
    /// policy in a manifest directory. Exits 1 if any is rejected or a file
    /// cannot be read.
    Status {
        /// Directory of YAML manifests (policies, pods, namespaces, nodes).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Output format.
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHAUTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshauth: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Policy {
            command: PolicyCommand::Status { dir, output },
        } => match auth_agent::cli::policy_status(&dir, output == "json") {
            Ok((report, clean)) => {
                print!("{report}");
                if clean {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("meshauth policy status: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Preflight(args) => {
            use auth_agent::preflight;
            let opts = preflight::Options {
                spire_socket: preflight::socket_path(&args.spire_socket),
                pods_cgroup: args.pods_cgroup,
                handshake_port: args.handshake_port,
                metrics_port: args.metrics_port,
                bpffs: args.bpffs,
                spire_timeout: Duration::from_secs(args.spire_timeout),
            };
            let report = runtime.block_on(preflight::run(&preflight::Host::default(), &opts));
            if args.output == "json" {
                println!("{}", report.render_json());
            } else {
                print!("{}", report.render_text());
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Demo { ttl } => {
            let opts = auth_agent::demo::DemoOptions {
                ttl: Duration::from_secs(ttl),
            };
            match runtime.block_on(auth_agent::demo::run(opts)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("meshauth demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
