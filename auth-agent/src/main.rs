//! `meshauth-agent`: the node daemon. Everything lives in the library
//! ([`auth_agent::daemon::main`]); this parses the flags.

use std::process::ExitCode;

use auth_agent::flags::AgentArgs;
use clap::Parser;

/// The meshauth node agent: SVIDs from SPIRE, policy from Kubernetes, the
/// eBPF datapath, the handshake server and the auth manager.
#[derive(Parser, Debug)]
#[command(name = "meshauth-agent", version)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

fn main() -> ExitCode {
    auth_agent::daemon::main("meshauth-agent", &Cli::parse().args)
}
