//! SPIRE's Delegated Identity API on a node agent's admin socket: X.509-SVIDs
//! of the entries whose selectors are all contained in the request's
//! selectors, and the X.509 bundles. spire-dev attests by selectors only: a
//! request by PID is unimplemented. JWT methods are unimplemented. With
//! authorized delegates configured, a caller is refused as SPIRE refuses it
//! unless its node holds an SVID for one of them (spire-dev's callers match
//! every entry of their node); without, every caller may subscribe.

use std::collections::HashMap;
use std::sync::Arc;

use spire_proto::delegatedidentity::delegated_identity_server::{
    DelegatedIdentity, DelegatedIdentityServer,
};
use spire_proto::delegatedidentity::{
    FetchJwtsviDsRequest, FetchJwtsviDsResponse, SubscribeToJwtBundlesRequest,
    SubscribeToJwtBundlesResponse, SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse,
    SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse, X509svidWithKey,
};
use spire_proto::types::{Spiffeid, X509svid};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::agent::{AgentSnapshot, HeldSvid, Shared};
use crate::entries::Selector;
use crate::stream::{Render, StatusStream, follow};
use crate::workload_api::trust_domain_id;

/// The Delegated Identity API service of one node agent.
#[derive(Debug, Clone)]
pub struct DelegatedIdentityService {
    node: String,
    delegates: Option<Vec<String>>,
    state: watch::Receiver<Arc<AgentSnapshot>>,
    down: watch::Receiver<bool>,
}

impl DelegatedIdentityService {
    pub(crate) fn new(shared: &Shared, down: watch::Receiver<bool>) -> Self {
        Self {
            node: shared.node().to_owned(),
            delegates: shared.authorized_delegates.clone(),
            state: shared.subscribe(),
            down,
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> DelegatedIdentityServer<Self> {
        DelegatedIdentityServer::new(self)
    }

    fn current(&self) -> Result<(watch::Receiver<Arc<AgentSnapshot>>, Arc<AgentSnapshot>), Status> {
        if *self.down.borrow() {
            return Err(Status::unavailable(format!(
                "spire-dev agent {} is down",
                self.node
            )));
        }
        let mut rx = self.state.clone();
        let snapshot = rx.borrow_and_update().clone();
        self.authorize(&snapshot)?;
        Ok((rx, snapshot))
    }

    /// SPIRE's check of the caller against `authorized_delegates`, with its
    /// codes and messages: no identity at all, or none of them a delegate.
    fn authorize(&self, snapshot: &AgentSnapshot) -> Result<(), Status> {
        let Some(delegates) = &self.delegates else {
            return Ok(());
        };
        if snapshot.svids.is_empty() {
            return Err(Status::permission_denied(spire_proto::NO_IDENTITY_ISSUED));
        }
        if snapshot
            .svids
            .iter()
            .any(|h| delegates.contains(&h.svid.spiffe_id.to_string()))
        {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "caller not configured as an authorized delegate",
            ))
        }
    }
}

/// Reads the request's selectors: PID → Unimplemented, both → InvalidArgument,
/// none → InvalidArgument.
fn request_selectors(
    selectors: &[spire_proto::types::Selector],
    pid: i32,
) -> Result<Vec<Selector>, Status> {
    match (selectors.is_empty(), pid) {
        (true, 0) => Err(Status::invalid_argument(
            "SubscribeToX509SVIDs: no selectors given; spire-dev attests by selectors only",
        )),
        (false, pid) if pid != 0 => Err(Status::invalid_argument(format!(
            "SubscribeToX509SVIDs: both selectors and pid {pid} given; give one"
        ))),
        (true, pid) => Err(Status::unimplemented(format!(
            "SubscribeToX509SVIDs by pid ({pid}): spire-dev attests by selectors only; send selectors"
        ))),
        (false, _) => Ok(selectors
            .iter()
            .map(|s| Selector::new(s.r#type.clone(), s.value.clone()))
            .collect()),
    }
}

fn matching<'a>(s: &'a AgentSnapshot, selectors: &[Selector]) -> Vec<&'a HeldSvid> {
    s.svids
        .iter()
        .filter(|h| h.entry.matches_selectors(selectors))
        .collect()
}

fn svids_response(held: &[&HeldSvid]) -> SubscribeToX509sviDsResponse {
    SubscribeToX509sviDsResponse {
        x509_svids: held
            .iter()
            .map(|h| X509svidWithKey {
                x509_svid: Some(X509svid {
                    cert_chain: h.svid.cert_chain.clone(),
                    id: Some(Spiffeid {
                        trust_domain: h.svid.spiffe_id.trust_domain().to_owned(),
                        path: h.svid.spiffe_id.path().to_owned(),
                    }),
                    expires_at: h.svid.not_after_unix(),
                    hint: String::new(),
                }),
                x509_svid_key: h.svid.private_key_pkcs8.clone(),
            })
            .collect(),
        federates_with: Vec::new(),
    }
}

fn bundles_response(s: &AgentSnapshot) -> SubscribeToX509BundlesResponse {
    SubscribeToX509BundlesResponse {
        ca_certificates: HashMap::from([(trust_domain_id(s), s.bundle.concat())]),
    }
}

fn serials(held: &[&HeldSvid]) -> Vec<String> {
    held.iter().map(|h| h.svid.serial.clone()).collect()
}

fn jwt_unimplemented() -> Status {
    Status::unimplemented("spire-dev does not issue JWT-SVIDs (X.509 only)")
}

#[tonic::async_trait]
impl DelegatedIdentity for DelegatedIdentityService {
    type SubscribeToX509SVIDsStream = StatusStream<SubscribeToX509sviDsResponse>;
    type SubscribeToX509BundlesStream = StatusStream<SubscribeToX509BundlesResponse>;
    type SubscribeToJWTBundlesStream = StatusStream<SubscribeToJwtBundlesResponse>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: Request<SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        let req = request.into_inner();
        let selectors = request_selectors(&req.selectors, req.pid)?;
        let (rx, snapshot) = self.current()?;
        let held = matching(&snapshot, &selectors);
        let mut last = serials(&held);
        let first = svids_response(&held);
        let stream = follow(self.node.clone(), rx, self.down.clone(), first, move |s| {
            let held = matching(s, &selectors);
            let now = serials(&held);
            if now == last {
                Render::Skip
            } else {
                last = now;
                Render::Send(svids_response(&held))
            }
        });
        Ok(Response::new(stream))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        _request: Request<SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        let (rx, snapshot) = self.current()?;
        let mut last = snapshot.bundle.clone();
        let first = bundles_response(&snapshot);
        let stream = follow(self.node.clone(), rx, self.down.clone(), first, move |s| {
            if s.bundle == last {
                Render::Skip
            } else {
                last = s.bundle.clone();
                Render::Send(bundles_response(s))
            }
        });
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvi_ds(
        &self,
        _request: Request<FetchJwtsviDsRequest>,
    ) -> Result<Response<FetchJwtsviDsResponse>, Status> {
        Err(jwt_unimplemented())
    }

    async fn subscribe_to_jwt_bundles(
        &self,
        _request: Request<SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        Err(jwt_unimplemented())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_request_rules() {
        let sel = vec![spire_proto::types::Selector {
            r#type: "k8s".into(),
            value: "ns:a".into(),
        }];
        assert_eq!(
            request_selectors(&[], 0).expect_err("empty").code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            request_selectors(&[], 42).expect_err("pid").code(),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            request_selectors(&sel, 42).expect_err("both").code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            request_selectors(&sel, 0).expect("ok"),
            vec![Selector::new("k8s", "ns:a")]
        );
    }
}
