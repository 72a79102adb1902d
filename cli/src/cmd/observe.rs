//! `meshauth observe`: flow verdicts as text lines or Hubble's JSON.

use std::process::ExitCode;

use auth_agent::api::{ObserveArgs, observe};

use super::Api;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    api: Api,
    /// Only this verdict: DROPPED, FORWARDED or AUDIT.
    #[arg(long)]
    verdict: Option<String>,
    /// Only flows to or from this identity.
    #[arg(long)]
    identity: Option<u32>,
    /// Past flows to show first.
    #[arg(long, default_value_t = 20)]
    last: usize,
    /// Keep following new flows.
    #[arg(short, long)]
    follow: bool,
}

pub fn run(args: Args) -> ExitCode {
    let client = args.api.client();
    let filter = ObserveArgs {
        json: args.api.json(),
        verdict: args.verdict,
        identity: args.identity,
        last: args.last,
        follow: args.follow,
    };
    match super::block_on(observe(&client, &filter, std::io::stdout().lock())) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => super::fail("observe", &e),
        Err(code) => code,
    }
}
