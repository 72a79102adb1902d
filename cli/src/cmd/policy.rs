//! `meshauth policy status`: accepted, partially enforced or rejected, with
//! the reasons — from the running agent, or for a manifest directory.
//! Exits 1 if any policy is rejected or a file cannot be read.

use std::path::PathBuf;
use std::process::ExitCode;

use auth_agent::api::policy_status_live;
use policy_bridge::source::files::status_report;

use super::Api;

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Accepted, partially enforced or rejected, with the reasons: for every
    /// policy the running agent sees, or in a manifest directory with
    /// `--dir`. Exits 1 if any is rejected or a file cannot be read.
    Status {
        /// Directory of YAML manifests (policies, pods, namespaces, nodes);
        /// without it, ask the running agent.
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        api: Api,
    },
}

pub fn run(c: PolicyCommand) -> ExitCode {
    let PolicyCommand::Status { dir, api } = c;
    let result = match dir {
        Some(dir) => status_report(&dir, api.json()).map_err(|e| e.to_string()),
        None => match super::block_on(policy_status_live(&api.client(), api.json())) {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(code) => return code,
        },
    };
    match result {
        Ok((report, clean)) => {
            print!("{report}");
            super::exit(clean)
        }
        Err(e) => super::fail("policy status", &e),
    }
}
