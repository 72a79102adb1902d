//! `meshauth demo`: the lab's demo scenario (see `meshauth_lab::demo`).

use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// SVID lifetime in seconds (rotation at half of it; the outage lasts until expiry).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=300))]
    ttl: u64,
    /// Run on real SPIRE: the directory holding `spire-server` and
    /// `spire-agent` 1.13.3 (scripts/build-spire prints it) instead of the
    /// embedded spire-dev.
    #[arg(long, value_name = "DIR")]
    spire_bin: Option<std::path::PathBuf>,
}

pub fn run(args: &Args) -> ExitCode {
    let opts = meshauth_lab::demo::DemoOptions {
        ttl: Duration::from_secs(args.ttl),
        spire_bin: args.spire_bin.clone(),
    };
    match super::block_on(meshauth_lab::demo::run(opts)) {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::FAILURE,
        Ok(Err(e)) => {
            eprintln!("meshauth demo: {e:#}");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}
