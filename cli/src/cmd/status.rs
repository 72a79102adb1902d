//! `meshauth status`: the running agent's health, SPIRE state, map usage
//! and peers. Exits 1 when the agent is not ready.

use std::process::ExitCode;

use auth_agent::api::render::render_status;
use auth_agent::api::types::AgentStatus;

use super::Api;

pub fn run(api: &Api) -> ExitCode {
    let answer = match super::block_on(api.client().get_json::<AgentStatus>("/v1/status")) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match answer {
        Ok(s) => {
            super::print(api.json(), &render_status(&s), &s);
            super::exit(s.ready.all())
        }
        Err(e) => super::fail("status", &e),
    }
}
