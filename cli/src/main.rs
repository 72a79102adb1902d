//! `meshauth`: the operator CLI and the demo. Parses the arguments and
//! hands each command to its module in [`cmd`], which does the work and
//! the printing.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod preflight;

#[derive(Parser, Debug)]
#[command(
    name = "meshauth",
    version,
    about = "Sidecarless mutual authentication between Kubernetes workloads, enforced in the kernel",
    after_help = "The node agent is a separate binary, `meshauth-agent`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The running agent's health, SPIRE state, map usage and peers.
    Status(cmd::Api),
    /// Stream flow verdicts, like `hubble observe`.
    Observe(cmd::observe::Args),
    /// The auth map.
    Auth {
        #[command(subcommand)]
        command: cmd::list::ListCommand,
    },
    /// Identities in the desired state.
    Identity {
        #[command(subcommand)]
        command: cmd::list::ListCommand,
    },
    /// Policies: what meshauth makes of them.
    Policy {
        #[command(subcommand)]
        command: cmd::policy::PolicyCommand,
    },
    /// SPIRE's side of the deployment: `spire render` writes the server's
    /// and agent's configuration.
    Spire {
        #[command(subcommand)]
        command: cmd::spire::SpireCommand,
    },
    /// WireGuard on this node.
    Wireguard {
        #[command(subcommand)]
        command: cmd::wireguard::WireGuardCommand,
    },
    /// Check this node before install: kernel, BPF, mounts, privileges,
    /// SPIRE, ports. One line per check with what to fix; exits 1 if any
    /// check FAILs.
    Preflight(cmd::preflight::Args),
    /// Run the demo on this machine.
    Demo(cmd::demo::Args),
    /// The node agent, as `meshauth-agent` runs it: the demo and the lab
    /// start each node's agent through this, so they run the same code.
    #[command(hide = true)]
    Agent(Box<auth_agent::flags::AgentArgs>),
    /// Run CMD in a cgroup and network namespace (the lab's process launcher).
    #[command(hide = true)]
    LabExec(cmd::lab::ExecArgs),
    /// A lab pod's workload: a line protocol on stdin/stdout.
    #[command(hide = true)]
    LabPod,
}

fn main() -> ExitCode {
    // Before any thread exists: lab-exec changes this thread's netns, and
    // the agent limits malloc arenas.
    match Cli::parse().command {
        Command::Agent(args) => auth_agent::daemon::main("meshauth agent", &args),
        Command::LabExec(args) => cmd::lab::exec(&args),
        Command::LabPod => cmd::lab::pod(),
        Command::Status(api) => cmd::status::run(&api),
        Command::Observe(args) => cmd::observe::run(args),
        Command::Auth { command } => cmd::list::auth(&command),
        Command::Identity { command } => cmd::list::identities(&command),
        Command::Policy { command } => cmd::policy::run(command),
        Command::Wireguard { command } => cmd::wireguard::run(&command),
        Command::Spire { command } => cmd::spire::run(&command),
        Command::Preflight(args) => cmd::preflight::run(args),
        Command::Demo(args) => cmd::demo::run(&args),
    }
}
