//! `meshauth auth list` and `meshauth identity list`.

use std::process::ExitCode;

use auth_agent::api::render::{render_auth, render_identities};
use auth_agent::api::types::{AuthEntry, IdentityEntry};
use serde::de::DeserializeOwned;

use super::Api;

#[derive(clap::Subcommand, Debug)]
pub enum ListCommand {
    /// List them.
    List(Api),
}

/// `meshauth auth list`: the auth map.
pub fn auth(c: &ListCommand) -> ExitCode {
    list::<AuthEntry>(c, "auth list", "/v1/auth", render_auth)
}

/// `meshauth identity list`: identities in the desired state.
pub fn identities(c: &ListCommand) -> ExitCode {
    list::<IdentityEntry>(c, "identity list", "/v1/identities", render_identities)
}

fn list<T: DeserializeOwned + serde::Serialize>(
    c: &ListCommand,
    what: &str,
    path: &str,
    render: impl Fn(&[T]) -> String,
) -> ExitCode {
    let ListCommand::List(api) = c;
    match super::block_on(api.client().get_json::<Vec<T>>(path)) {
        Ok(Ok(v)) => {
            super::print(api.json(), &render(&v), &v);
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => super::fail(what, &e),
        Err(code) => code,
    }
}
