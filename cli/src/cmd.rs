//! One module per command: its arguments, the work, and what it prints.
//! Exit codes: 0 done (or healthy), 1 the answer is "no" (not ready, a
//! policy rejected, a check failed), 2 the command itself failed.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

pub mod demo;
pub mod lab;
pub mod list;
pub mod observe;
pub mod policy;
pub mod preflight;
pub mod spire;
pub mod status;
pub mod wireguard;

const DEFAULT_API_SOCKET: &str = "/var/run/meshauth/agent.sock";

/// Where the running agent's API is, and how to print its answer.
#[derive(clap::Args, Debug, Clone)]
pub struct Api {
    /// The agent's local API socket.
    #[arg(long, env = "MESHAUTH_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    pub api_socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

impl Api {
    /// `-o json`.
    pub fn json(&self) -> bool {
        self.output == "json"
    }

    /// A client of the agent's API socket.
    pub fn client(&self) -> auth_agent::api::ApiClient {
        auth_agent::api::ApiClient::new(&self.api_socket)
    }
}

/// Runs `f` to completion on a new runtime, with error-level logs (the
/// commands print their results; logs are for what went wrong).
pub fn block_on<F: Future>(f: F) -> Result<F::Output, ExitCode> {
    auth_agent::daemon::init_logs("error", false);
    match tokio::runtime::Runtime::new() {
        Ok(rt) => Ok(rt.block_on(f)),
        Err(e) => Err(fail("", &format!("starting the runtime: {e}"))),
    }
}

/// Prints `meshauth WHAT: error` and gives exit code 2.
pub fn fail(what: &str, e: &dyn std::fmt::Display) -> ExitCode {
    if what.is_empty() {
        eprintln!("meshauth: {e}");
    } else {
        eprintln!("meshauth {what}: {e}");
    }
    ExitCode::from(2)
}

/// Prints `value` as pretty JSON or `text`.
pub fn print(json: bool, text: &str, value: &impl serde::Serialize) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        print!("{text}");
    }
}

/// 0 if `ok`, else 1.
pub fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
