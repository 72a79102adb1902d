//! The SPIFFE Workload API source (`FetchX509SVID` stream).
//!
//! The client is generated from the upstream `workload.proto` (spire-proto),
//! not the `spiffe` crate's: that crate's client keeps tonic's 4 MiB message
//! cap, which a full state of more than about 3,400 SVIDs exceeds (each SVID
//! travels with its chain, key and bundle). The wire contract is the same;
//! the `spiffe` crate and py-spiffe are used in the tests as independent
//! clients of spire-dev.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use rustls_pki_types::PrivatePkcs8KeyDer;
use spire_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spire_proto::workload::{X509svidRequest, X509svidResponse};
use spire_proto::{WORKLOAD_HEADER_KEY, WORKLOAD_HEADER_VALUE};
use tokio_util::sync::CancellationToken;

use super::supervisor::{self, Connector, Session};
use super::{
    BackoffConfig, DEFAULT_MAX_MESSAGE_BYTES, SourceError, SourceHandle, classify_status,
    split_der, uds_channel,
};
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
    /// Bound on connecting to the socket and opening the stream(s); a
    /// source that does not answer in time is retried with backoff.
    pub connect_timeout: std::time::Duration,
    /// Largest message accepted from the agent.
    pub max_message_bytes: usize,
}

impl WorkloadApiConfig {
    /// Default backoff and message cap for `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            backoff: BackoffConfig::default(),
            connect_timeout: super::DEFAULT_CONNECT_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Starts the worker streaming X.509 SVIDs from the Workload API at
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
        max_message_bytes: config.max_message_bytes,
    };
    supervisor::spawn(
        "workload_api",
        connector,
        cache,
        config.backoff,
        config.connect_timeout,
        shutdown,
    )
}

struct WorkloadConnector {
    trust_domain: TrustDomain,
    path: PathBuf,
    max_message_bytes: usize,
}

impl Connector for WorkloadConnector {
    const CALL: &'static str = CALL;

    fn path(&self) -> &Path {
        &self.path
    }

    async fn connect(&mut self) -> Result<Session, SourceError> {
        let stream = open_stream(&self.path, self.max_message_bytes).await?;
        let path = self.path.clone();
        let td = self.trust_domain.clone();
        Ok(stream
            .map(move |item| match item {
                Ok(m) => update_from_response(m, &td, &path),
                Err(s) => Err(classify_status(CALL, &path, &s)),
            })
            .boxed())
    }
}

/// Opens a `FetchX509SVID` stream (with the `workload.spiffe.io: true`
/// header the Workload API requires).
async fn open_stream(
    path: &Path,
    max_message_bytes: usize,
) -> Result<tonic::Streaming<X509svidResponse>, SourceError> {
    let channel = uds_channel(CALL, path).await?;
    let mut client =
        SpiffeWorkloadApiClient::new(channel).max_decoding_message_size(max_message_bytes);
    let mut request = tonic::Request::new(X509svidRequest {});
    request.metadata_mut().insert(
        WORKLOAD_HEADER_KEY,
        tonic::metadata::MetadataValue::from_static(WORKLOAD_HEADER_VALUE),
    );
    Ok(client
        .fetch_x509svid(request)
        .await
        .map_err(|s| classify_status(CALL, path, &s))?
        .into_inner())
}

/// One `FetchX509SVID` call on the Workload API at `socket_path`: opens the
/// stream, reads the first message and returns the SPIFFE IDs it carries,
/// without keeping anything (a readiness probe, as `meshauth preflight`
/// runs). Failures are classified as the source's are: a missing socket, a
/// refused connection, "no identity issued", a gRPC status. The caller
/// bounds the time.
pub async fn fetch_x509_svid_ids(socket_path: &Path) -> Result<Vec<String>, SourceError> {
    let mut stream = open_stream(socket_path, DEFAULT_MAX_MESSAGE_BYTES).await?;
    match stream.message().await {
        Ok(Some(m)) => Ok(m.svids.into_iter().map(|s| s.spiffe_id).collect()),
        Ok(None) => Err(SourceError::StreamEnded {
            call: CALL,
            path: socket_path.to_owned(),
        }),
        Err(s) => Err(classify_status(CALL, socket_path, &s)),
    }
}

fn malformed(path: &Path, reason: String) -> SourceError {
    SourceError::MalformedMessage {
        call: CALL,
        path: path.to_owned(),
        reason,
    }
}

/// Converts one `X509SVIDResponse` into a full-state update for the cache.
/// Structure only (fields present, DER framing sound); the cache checks
/// each certificate, key and chain.
pub(crate) fn update_from_response(
    m: X509svidResponse,
    td: &TrustDomain,
    path: &Path,
) -> Result<Update, SourceError> {
    if m.svids.is_empty() {
        return Err(malformed(path, "X509SVIDResponse.svids is empty".into()));
    }
    let own_td = format!("spiffe://{td}/");
    let mut bundle_der: Option<Vec<u8>> = None;
    let mut svids = Vec::with_capacity(m.svids.len());
    for (i, s) in m.svids.into_iter().enumerate() {
        for (empty, field) in [
            (s.spiffe_id.is_empty(), "spiffe_id"),
            (s.x509_svid.is_empty(), "x509_svid"),
            (s.x509_svid_key.is_empty(), "x509_svid_key"),
            (s.bundle.is_empty(), "bundle"),
        ] {
            if empty {
                return Err(malformed(path, format!("svids[{i}].{field} is empty")));
            }
        }
        let cert_chain = split_der(&s.x509_svid)
            .map_err(|e| malformed(path, format!("svids[{i}] ({}).x509_svid: {e}", s.spiffe_id)))?;
        if bundle_der.is_none() && s.spiffe_id.starts_with(&own_td) {
            bundle_der = Some(s.bundle);
        }
        svids.push(SvidInput {
            spiffe_id: s.spiffe_id,
            cert_chain,
            private_key: PrivatePkcs8KeyDer::from(s.x509_svid_key),
        });
    }
    let bundle_der = bundle_der.or_else(|| {
        m.federated_bundles
            .into_iter()
            .find(|(k, _)| k.strip_prefix("spiffe://") == Some(td.as_str()))
            .map(|(_, v)| v)
    });
    let bundle = match bundle_der {
        Some(der) => Some(
            TrustBundle::from_concatenated_der(td.clone(), &der)
                .map_err(|e| malformed(path, format!("bundle of {td}: {e}")))?,
        ),
        None => None,
    };
    Ok(Update {
        svids: Some(svids),
        bundle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spire_proto::workload::X509svid;

    fn td() -> TrustDomain {
        TrustDomain::new("meshauth.local").unwrap()
    }

    #[test]
    fn empty_fields_are_named() {
        let m = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://meshauth.local/identity/256".into(),
                x509_svid: vec![0x30, 0x00],
                x509_svid_key: vec![],
                bundle: vec![0x30, 0x00],
                hint: String::new(),
            }],
            ..Default::default()
        };
        let e = update_from_response(m, &td(), Path::new("/x")).unwrap_err();
        assert!(
            e.to_string().contains("svids[0].x509_svid_key is empty"),
            "{e}"
        );
    }

    #[test]
    fn broken_der_framing_is_named() {
        let m = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://meshauth.local/identity/256".into(),
                x509_svid: vec![0x30, 0x82, 0x05, 0x00, 1, 2, 3],
                x509_svid_key: vec![1],
                bundle: vec![0x30, 0x00],
                hint: String::new(),
            }],
            ..Default::default()
        };
        let e = update_from_response(m, &td(), Path::new("/x")).unwrap_err();
        assert!(
            e.to_string()
                .contains("x509_svid: certificate 0: 1280 bytes announced"),
            "{e}"
        );
    }

    #[test]
    fn empty_state_is_malformed_not_an_empty_cache() {
        let e =
            update_from_response(X509svidResponse::default(), &td(), Path::new("/x")).unwrap_err();
        assert!(e.to_string().contains("svids is empty"), "{e}");
    }
}
