//! The SPIFFE Workload API source (`FetchX509SVID` stream), through the `spiffe`
//! crate's [`WorkloadApiClient`].

use std::path::{Path, PathBuf};

use futures::StreamExt;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use spiffe::workload_api::error::WorkloadApiError;
use spiffe::{WorkloadApiClient, X509Context};
use tokio_util::sync::CancellationToken;

use super::supervisor::{self, Connector, Session};
use super::{BackoffConfig, SourceError, SourceHandle, classify_transport};
use crate::bundle::TrustBundle;
use crate::cache::{SvidCache, Update};
use crate::identity::TrustDomain;
use crate::svid::SvidInput;

const CALL: &str = "FetchX509SVID";

/// Settings of a Workload API source.
#[derive(Debug, Clone)]
pub struct WorkloadApiConfig {
    /// The agent's Workload API socket (e.g. `/run/spire/sockets/agent.sock`).
    pub socket_path: PathBuf,
    /// Reconnect timing.
    pub backoff: BackoffConfig,
}

impl WorkloadApiConfig {
    /// Default backoff for `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            backoff: BackoffConfig::default(),
        }
    }
}

/// Starts the worker streaming X.509 contexts from the Workload API at
/// `config.socket_path` into `cache`, until `shutdown` is cancelled.
///
/// Every message is the full state: all SVIDs the caller is entitled to plus the
/// bundles. "no identity issued" empties the cache.
pub fn spawn_workload_api(
    config: WorkloadApiConfig,
    cache: SvidCache,
    shutdown: CancellationToken,
) -> SourceHandle {
    let connector = WorkloadConnector {
        trust_domain: cache.trust_domain().clone(),
        path: config.socket_path,
    };
    supervisor::spawn("workload_api", connector, cache, config.backoff, shutdown)
}

struct WorkloadConnector {
    trust_domain: TrustDomain,
    path: PathBuf,
}

impl Connector for WorkloadConnector {
    const CALL: &'static str = CALL;

    fn path(&self) -> &Path {
        &self.path
    }

    async fn connect(&mut self) -> Result<Session, SourceError> {
        let endpoint = format!("unix:{}", self.path.display());
        let client = WorkloadApiClient::connect_to(&endpoint)
            .await
            .map_err(|e| classify(&self.path, e))?;
        let stream = client
            .stream_x509_contexts()
            .await
            .map_err(|e| classify(&self.path, e))?;
        let path = self.path.clone();
        let td = self.trust_domain.clone();
        Ok(stream
            .map(move |item| match item {
                Ok(ctx) => update_from_context(&ctx, &td, &path),
                Err(e) => Err(classify(&path, e)),
            })
            .boxed())
    }
}

/// Converts an X.509 context into a full-state update for the cache.
fn update_from_context(
    ctx: &X509Context,
    td: &TrustDomain,
    path: &Path,
) -> Result<Update, SourceError> {
    let svids = ctx
        .svids()
        .iter()
        .map(|svid| SvidInput {
            spiffe_id: svid.spiffe_id().to_string(),
            cert_chain: svid
                .cert_chain()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect(),
            private_key: PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()),
        })
        .collect();
    let spiffe_td =
        spiffe::TrustDomain::new(td.as_str()).map_err(|e| SourceError::MalformedMessage {
            call: CALL,
            path: path.to_owned(),
            reason: format!("trust domain {td}: {e}"),
        })?;
    let bundle = match ctx.bundle_set().get(&spiffe_td) {
        Some(b) => Some(
            TrustBundle::new(
                td.clone(),
                b.authorities()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                    .collect(),
            )
            .map_err(|e| SourceError::MalformedMessage {
                call: CALL,
                path: path.to_owned(),
                reason: e.to_string(),
            })?,
        ),
        None => None,
    };
    Ok(Update {
        svids: Some(svids),
        bundle,
    })
}

fn classify(path: &Path, e: WorkloadApiError) -> SourceError {
    use spiffe::transport::TransportError;
    match e {
        WorkloadApiError::NoIdentityIssued => SourceError::NoIdentityIssued {
            call: CALL,
            path: path.to_owned(),
        },
        WorkloadApiError::Transport(TransportError::Status(status)) => {
            let code = format!("{:?}", status.code());
            classify_transport(CALL, path, Some(code), None, &status)
        }
        WorkloadApiError::Transport(t) => classify_transport(CALL, path, None, None, &t),
        WorkloadApiError::PermissionDenied(msg) => SourceError::Rpc {
            call: CALL,
            path: path.to_owned(),
            code: "PermissionDenied".to_owned(),
            message: msg,
        },
        // Everything else is about the content of a message.
        other => SourceError::MalformedMessage {
            call: CALL,
            path: path.to_owned(),
            reason: error_chain(&other),
        },
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}
