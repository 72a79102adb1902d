//! The bodies of meshauth's fuzz targets: what an attacker who owns a pod,
//! reaches port 4250, or impersonates SPIRE or a local API client can feed
//! meshauth, each through the same code the agent runs. None may panic,
//! hang or allocate without bound on any input.
//!
//! - [`handshake_message`]: a meshauth/1 frame (length prefix, then JSON)
//!   as the handshake reads it off a TLS stream.
//! - [`policy_yaml`]: policy manifests → the compiled desired state and
//!   each policy's status.
//! - [`workload_api`] and [`delegated_api`]: SPIRE's protobuf responses,
//!   through the sources' conversion and the cache's certificate, key and
//!   chain checks.
//! - [`local_api`]: raw bytes on the local API socket, through hyper and
//!   the API's routing.
//!
//! `fuzz/` wraps each in a libFuzzer target (`scripts/fuzz`); the replay
//! test runs the committed corpus `fuzz/corpus/<target>/` and mutations of
//! it on stable.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use auth_agent::api::flows::FlowHub;
use auth_agent::api::server::{Backend, route};
use auth_agent::api::types::{AgentStatus, AuthEntry, IdentityEntry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("handshake_message", handshake_message),
    ("policy_yaml", policy_yaml),
    ("workload_api", workload_api),
    ("delegated_api", delegated_api),
    ("local_api", local_api),
];

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
}

/// A handshake frame read as each version reads it; a `meshauth/2` proof
/// is decoded (chain, signature) and checked against a fixed statement as
/// the responder and the initiator check one.
pub fn handshake_message(data: &[u8]) {
    use auth_agent::handshake::proof::{self, Signer, Statement};
    use auth_agent::handshake::protocol::{self, Message, Version};
    RT.with(|rt| {
        rt.block_on(async {
            let mut r = data;
            let _ = protocol::read(&mut r).await;
            let mut r = data;
            let Ok(Message::Prove(p) | Message::Proven(p)) =
                protocol::read_as(&mut r, Version::V2).await
            else {
                return;
            };
            let Ok(decoded) = proof::decode(&p) else {
                return;
            };
            let exporter = [7u8; 32];
            let statement = Statement {
                exporter: &exporter,
                id: p.id,
                initiator: p.local,
                responder: p.remote,
                initiator_node: &p.node,
                responder_node: "node-b",
            };
            let _ = proof::check(Signer::Initiator, &statement, &p, &decoded, None);
            let _ = proof::check(Signer::Responder, &statement, &p, &decoded, Some(b"sig"));
        });
    });
}

/// Policy manifests (YAML, any number of documents) compiled.
pub fn policy_yaml(data: &[u8]) {
    // The agent reads files it was given whole; a bound keeps one input fast.
    if data.len() > 64 * 1024 {
        return;
    }
    let text = String::from_utf8_lossy(data);
    let _ = policy_bridge::compile_text(&text, "fuzz");
}

/// A Workload API X509SVIDResponse.
pub fn workload_api(data: &[u8]) {
    let _ = svid_cache::fuzzing::workload_response(data);
}

/// A Delegated Identity API response: the first byte picks the SVIDs
/// stream (even) or the bundles stream (odd).
pub fn delegated_api(data: &[u8]) {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let _ = svid_cache::fuzzing::delegated_response(rest, first % 2 == 1);
}

struct Fake {
    flows: FlowHub,
}

impl Backend for Fake {
    fn status(&self) -> Result<AgentStatus, String> {
        Err("no status in the fuzz backend".into())
    }
    fn auth(&self) -> Result<Vec<AuthEntry>, String> {
        Ok(Vec::new())
    }
    fn identities(&self) -> Vec<IdentityEntry> {
        Vec::new()
    }
    fn policies(&self, _json: bool) -> String {
        String::new()
    }
    fn flows(&self) -> &FlowHub {
        &self.flows
    }
}

/// Raw bytes on the local API socket: HTTP/1.1 through hyper and the
/// API's routing; the response read until the server closes (a streaming
/// `follow` response is cut after 20 ms).
pub fn local_api(data: &[u8]) {
    RT.with(|rt| {
        rt.block_on(async {
            let backend = Arc::new(Fake {
                flows: FlowHub::new(16),
            });
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let svc = hyper::service::service_fn(move |req| {
                let b = backend.clone();
                async move { Ok::<_, Infallible>(route(b, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
            let io = async move {
                let _ = client.write_all(data).await;
                let _ = client.shutdown().await;
                let mut out = Vec::new();
                let _ = client.read_to_end(&mut out).await;
            };
            let _ =
                tokio::time::timeout(Duration::from_millis(20), futures::future::join(conn, io))
                    .await;
        });
    });
}
