//! The SPIFFE Workload API (X.509 part) on a node agent's socket, as SPIRE
//! serves it: the `workload.spiffe.io: true` header is required; streams send
//! the full state at once and on every change; "no identity issued"
//! (PermissionDenied) when nothing matches, ending the stream; JWT methods are
//! unimplemented.

use std::collections::HashMap;
use std::sync::Arc;

use spire_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use spire_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use spire_proto::{NO_IDENTITY_ISSUED, WORKLOAD_HEADER_KEY, WORKLOAD_HEADER_VALUE};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::agent::{AgentSnapshot, Shared};
use crate::stream::{Render, StatusStream, follow};

/// The message SPIRE sends when the security header is missing.
pub const SECURITY_HEADER_MISSING: &str = "security header missing from request";

/// The Workload API service of one node agent.
#[derive(Debug, Clone)]
pub struct WorkloadApiService {
    node: String,
    state: watch::Receiver<Arc<AgentSnapshot>>,
    down: watch::Receiver<bool>,
}

impl WorkloadApiService {
    pub(crate) fn new(shared: &Shared, down: watch::Receiver<bool>) -> Self {
        Self {
            node: shared.node().to_owned(),
            state: shared.subscribe(),
            down,
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }

    /// The current state, or Unavailable when the agent is going down.
    fn current(&self) -> Result<(watch::Receiver<Arc<AgentSnapshot>>, Arc<AgentSnapshot>), Status> {
        if *self.down.borrow() {
            return Err(Status::unavailable(format!(
                "spire-dev agent {} is down",
                self.node
            )));
        }
        let mut rx = self.state.clone();
        let snapshot = rx.borrow_and_update().clone();
        Ok((rx, snapshot))
    }
}

/// Checks the `workload.spiffe.io: true` header (SPIRE's message when missing).
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(WORKLOAD_HEADER_KEY) {
        Some(v) if v.as_bytes() == WORKLOAD_HEADER_VALUE.as_bytes() => Ok(()),
        _ => Err(Status::invalid_argument(SECURITY_HEADER_MISSING)),
    }
}

fn no_identity() -> Status {
    Status::permission_denied(NO_IDENTITY_ISSUED)
}

/// The trust domain ID (`spiffe://<td>`) SPIRE keys bundles by.
pub(crate) fn trust_domain_id(snapshot: &AgentSnapshot) -> String {
    format!("spiffe://{}", snapshot.trust_domain)
}

fn svid_response(s: &AgentSnapshot) -> X509svidResponse {
    let bundle = s.bundle.concat();
    X509svidResponse {
        svids: s
            .svids
            .iter()
            .map(|h| X509svid {
                spiffe_id: h.svid.spiffe_id.to_string(),
                x509_svid: h.svid.chain_der(),
                x509_svid_key: h.svid.private_key_pkcs8.clone(),
                bundle: bundle.clone(),
                hint: String::new(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

fn bundles_response(s: &AgentSnapshot) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(trust_domain_id(s), s.bundle.concat())]),
    }
}

fn jwt_unimplemented() -> Status {
    Status::unimplemented("spire-dev does not issue JWT-SVIDs (X.509 only)")
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiService {
    type FetchX509SVIDStream = StatusStream<X509svidResponse>;
    type FetchX509BundlesStream = StatusStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = StatusStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let (rx, snapshot) = self.current()?;
        if snapshot.svids.is_empty() {
            return Err(no_identity());
        }
        let first = svid_response(&snapshot);
        let stream = follow(self.node.clone(), rx, self.down.clone(), first, |s| {
            if s.svids.is_empty() {
                Render::End(no_identity())
            } else {
                Render::Send(svid_response(s))
            }
        });
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let (rx, snapshot) = self.current()?;
        if snapshot.svids.is_empty() {
            return Err(no_identity());
        }
        let mut last = snapshot.bundle.clone();
        let first = bundles_response(&snapshot);
        let stream = follow(self.node.clone(), rx, self.down.clone(), first, move |s| {
            if s.svids.is_empty() {
                Render::End(no_identity())
            } else if s.bundle == last {
                Render::Skip
            } else {
                last = s.bundle.clone();
                Render::Send(bundles_response(s))
            }
        });
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(jwt_unimplemented())
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        Err(jwt_unimplemented())
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(jwt_unimplemented())
    }
}
