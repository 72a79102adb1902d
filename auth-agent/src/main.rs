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
    /// Run CMD in a cgroup and network namespace (the lab's process launcher).
    #[command(hide = true)]
    LabExec {
        /// Network namespace file to enter.
        #[arg(long)]
        netns: std::path::PathBuf,
        /// Cgroup v2 directory to join first.
        #[arg(long)]
        cgroup: Option<std::path::PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<std::ffi::OsString>,
    },
    /// A lab pod's workload: a line protocol on stdin/stdout.
    #[command(hide = true)]
    LabPod,
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
    // Before any runtime thread exists: lab-exec changes this thread's netns.
    match &cli.command {
        Command::LabExec { netns, cgroup, cmd } => {
            let e = auth_agent::lab::exec::exec_in(netns, cgroup.as_deref(), cmd);
            eprintln!("meshauth lab-exec: {e}");
            return ExitCode::from(127);
        }
        Command::LabPod => {
            return match auth_agent::lab::pod::run_stdio() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshauth lab-pod: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
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
        Command::LabExec { .. } | Command::LabPod => unreachable!("handled above"),
    }
}
