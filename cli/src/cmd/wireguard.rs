//! `meshauth wireguard rotate-key`: a new WireGuard key for this node, set
//! on the interface and published; peers follow when they see it.

use std::process::ExitCode;

use clap::Subcommand;

use super::Api;

/// `meshauth wireguard ...`.
#[derive(Subcommand, Debug)]
pub enum WireGuardCommand {
    /// Generate a new key (0600 in the state directory), set it on the
    /// interface and publish it; prints the new public key.
    RotateKey(Api),
}

pub fn run(command: &WireGuardCommand) -> ExitCode {
    match command {
        WireGuardCommand::RotateKey(api) => {
            match super::block_on(api.client().post_text("/v1/wireguard/rotate-key")) {
                Ok(Ok(key)) => {
                    println!("new WireGuard public key: {}", key.trim());
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => super::fail("wireguard rotate-key", &e),
                Err(code) => code,
            }
        }
    }
}
