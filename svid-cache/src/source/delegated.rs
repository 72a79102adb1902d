//! SPIRE's Delegated Identity API source: `SubscribeToX509SVIDs` (by selectors)
//! and `SubscribeToX509Bundles` on the agent's admin socket, merged into full
//! states.

use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use spire_proto::delegatedidentity::delegated_identity_client::DelegatedIdentityClient;
use spire_proto::delegatedidentity::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse,
};
use spire_proto::types::Selector;
use tokio_util::sync::CancellationToken;

use super::supervisor::{self, Connector, Session};
use super::{
    BackoffConfig, DEFAULT_MAX_MESSAGE_BYTES, SourceError, SourceHandle, classify_status,
    uds_channel,
};
use crate::bundle::TrustBundle;
use crate::cache::{SvidCache, Update};
use crate::identity::TrustDomain;
use crate::svid::SvidInput;

const CALL_SVIDS: &str = "SubscribeToX509SVIDs";
const CALL_BUNDLES: &str = "SubscribeToX509Bundles";
const CALL: &str = "DelegatedIdentity";

/// Settings of a Delegated Identity API source.
#[derive(Debug, Clone)]
pub struct DelegatedIdentityConfig {
    /// The SPIRE agent's admin socket.
    pub socket_path: PathBuf,
    /// The selectors (type, value) of the workload whose SVIDs to receive, e.g.
    /// `("k8s", "ns:default")`.
    pub selectors: Vec<(String, String)>,
    /// Reconnect timing.
    pub backoff: BackoffConfig,
    /// Bound on connecting to the socket and opening the stream(s); a
    /// source that does not answer in time is retried with backoff.
    pub connect_timeout: std::time::Duration,
    /// Largest message accepted from the agent.
    pub max_message_bytes: usize,
}

impl DelegatedIdentityConfig {
    /// Default backoff and message cap for `socket_path` and `selectors`.
    pub fn new(socket_path: impl Into<PathBuf>, selectors: Vec<(String, String)>) -> Self {
        Self {
            socket_path: socket_path.into(),
            selectors,
            backoff: BackoffConfig::default(),
            connect_timeout: super::DEFAULT_CONNECT_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Starts the worker subscribing to SVIDs and bundles on the Delegated Identity
/// API at `config.socket_path`, until `shutdown` is cancelled.
///
/// The two streams are merged: nothing is applied until both have delivered a
/// first message; after that each message of either stream applies the latest
/// SVIDs together with the latest bundle, so an SVID signed by a new CA is
/// accepted as soon as the bundle carrying that CA arrives.
pub fn spawn_delegated_identity(
    config: DelegatedIdentityConfig,
    cache: SvidCache,
    shutdown: CancellationToken,
) -> SourceHandle {
    let connector = DelegatedConnector {
        trust_domain: cache.trust_domain().clone(),
        path: config.socket_path,
        selectors: config
            .selectors
            .into_iter()
            .map(|(r#type, value)| Selector { r#type, value })
            .collect(),
        max_message_bytes: config.max_message_bytes,
    };
    supervisor::spawn(
        "delegated_identity",
        connector,
        cache,
        config.backoff,
        config.connect_timeout,
        shutdown,
    )
}

struct DelegatedConnector {
    trust_domain: TrustDomain,
    path: PathBuf,
    selectors: Vec<Selector>,
    max_message_bytes: usize,
}

enum Message {
    Svids(Result<Vec<SvidInput>, SourceError>),
    Bundle(Result<Option<TrustBundle>, SourceError>),
    Failed(SourceError),
}

impl Connector for DelegatedConnector {
    const CALL: &'static str = CALL;

    fn path(&self) -> &Path {
        &self.path
    }

    async fn connect(&mut self) -> Result<Session, SourceError> {
        let path = self.path.clone();
        let channel = uds_channel(CALL_SVIDS, &path).await?;
        let mut client =
            DelegatedIdentityClient::new(channel).max_decoding_message_size(self.max_message_bytes);
        let svids = client
            .subscribe_to_x509svi_ds(SubscribeToX509sviDsRequest {
                selectors: self.selectors.clone(),
                pid: 0,
            })
            .await
            .map_err(|s| classify_status(CALL_SVIDS, &path, &s))?
            .into_inner();
        let bundles = client
            .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
            .await
            .map_err(|s| classify_status(CALL_BUNDLES, &path, &s))?
            .into_inner();

        let td = self.trust_domain.clone();
        let (p1, p2) = (path.clone(), path.clone());
        let td2 = td.clone();
        let svids = svids.map(move |m| match m {
            Ok(m) => Message::Svids(parse_svids(m, &p1)),
            Err(s) => Message::Failed(classify_status(CALL_SVIDS, &p1, &s)),
        });
        let bundles = bundles.map(move |m| match m {
            Ok(m) => Message::Bundle(parse_bundle(m, &td2, &p2)),
            Err(s) => Message::Failed(classify_status(CALL_BUNDLES, &p2, &s)),
        });
        // Either stream ending ends the session.
        let svids = svids.chain(stream::once(async move {
            Message::Failed(SourceError::StreamEnded {
                call: CALL_SVIDS,
                path: PathBuf::new(),
            })
        }));
        let bundles = bundles.chain(stream::once(async move {
            Message::Failed(SourceError::StreamEnded {
                call: CALL_BUNDLES,
                path: PathBuf::new(),
            })
        }));
        let merged = stream::select(svids, bundles);
        let mut state = Merge::default();
        Ok(merged
            .map(move |m| state.on(m, &path))
            .filter_map(|x| async move { x })
            .boxed())
    }
}

/// The latest accepted message of each stream.
#[derive(Default)]
struct Merge {
    svids: Option<Vec<SvidInput>>,
    bundle: Option<Option<TrustBundle>>,
}

impl Merge {
    /// Folds one message in; yields an update once both streams have spoken.
    fn on(&mut self, m: Message, path: &Path) -> Option<Result<Update, SourceError>> {
        match m {
            Message::Svids(Ok(s)) => self.svids = Some(s),
            Message::Bundle(Ok(b)) => self.bundle = Some(b),
            Message::Svids(Err(e)) | Message::Bundle(Err(e)) => return Some(Err(e)),
            Message::Failed(SourceError::StreamEnded { call, .. }) => {
                return Some(Err(SourceError::StreamEnded {
                    call,
                    path: path.to_owned(),
                }));
            }
            Message::Failed(e) => return Some(Err(e)),
        }
        match (&self.svids, &self.bundle) {
            (Some(svids), Some(bundle)) => Some(Ok(Update {
                svids: Some(svids.clone()),
                bundle: bundle.clone(),
            })),
            _ => None,
        }
    }
}

fn malformed(call: &'static str, path: &Path, reason: String) -> SourceError {
    SourceError::MalformedMessage {
        call,
        path: path.to_owned(),
        reason,
    }
}

pub(crate) fn parse_svids(
    m: SubscribeToX509sviDsResponse,
    path: &Path,
) -> Result<Vec<SvidInput>, SourceError> {
    m.x509_svids
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let svid = s.x509_svid.ok_or_else(|| {
                malformed(
                    CALL_SVIDS,
                    path,
                    format!("x509_svids[{i}].x509_svid missing"),
                )
            })?;
            let id = svid.id.ok_or_else(|| {
                malformed(
                    CALL_SVIDS,
                    path,
                    format!("x509_svids[{i}].x509_svid.id missing"),
                )
            })?;
            if svid.cert_chain.is_empty() {
                return Err(malformed(
                    CALL_SVIDS,
                    path,
                    format!(
                        "x509_svids[{i}] (spiffe://{}{}): empty cert_chain",
                        id.trust_domain, id.path
                    ),
                ));
            }
            if s.x509_svid_key.is_empty() {
                return Err(malformed(
                    CALL_SVIDS,
                    path,
                    format!(
                        "x509_svids[{i}] (spiffe://{}{}): empty x509_svid_key",
                        id.trust_domain, id.path
                    ),
                ));
            }
            let path_part = if id.path.starts_with('/') {
                id.path
            } else {
                format!("/{}", id.path)
            };
            Ok(SvidInput {
                spiffe_id: format!("spiffe://{}{}", id.trust_domain, path_part),
                cert_chain: svid
                    .cert_chain
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect(),
                private_key: PrivatePkcs8KeyDer::from(s.x509_svid_key),
            })
        })
        .collect()
}

/// The bundle of the configured trust domain; `None` when the message has none
/// (bundles of other trust domains are ignored).
pub(crate) fn parse_bundle(
    m: SubscribeToX509BundlesResponse,
    td: &TrustDomain,
    path: &Path,
) -> Result<Option<TrustBundle>, SourceError> {
    let Some((key, der)) = m.ca_certificates.iter().find(|(k, _)| {
        k.as_str() == td.as_str() || k.strip_prefix("spiffe://") == Some(td.as_str())
    }) else {
        tracing::debug!(trust_domain = %td, "bundle message has no bundle for the trust domain");
        return Ok(None);
    };
    TrustBundle::from_concatenated_der(td.clone(), der)
        .map(Some)
        .map_err(|e| malformed(CALL_BUNDLES, path, format!("ca_certificates[{key:?}]: {e}")))
}
