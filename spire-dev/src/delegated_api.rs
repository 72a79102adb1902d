//! SPIRE's Delegated Identity API on a node agent's admin socket: X.509-SVIDs
//! of the entries whose selectors are all contained in the request's
//! selectors, and the X.509 bundles. A request by PID is attested as SPIRE's
//! `unix` workload attestor does it (`unix:uid`, `unix:gid`,
//! `unix:supplementary_gid` of the process's effective IDs, from
//! `/proc/<pid>/status`); a PID that cannot be read attests to no selectors,
//! which match no entry (SPIRE logs the attestor's error and subscribes to
//! nothing). JWT methods are unimplemented. With
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

/// SPIRE's answer when a request gives both selectors and a PID, or neither.
pub const SELECTORS_OR_PID: &str = "must provide either selectors or non-zero PID, but not both";

/// Reads the request's selectors: exactly one of selectors and PID, as SPIRE
/// checks it (InvalidArgument otherwise); a PID is attested.
fn request_selectors(
    selectors: &[spire_proto::types::Selector],
    pid: i32,
) -> Result<Vec<Selector>, Status> {
    match (selectors.is_empty(), pid) {
        (true, 0) | (false, 1..) | (false, ..0) => Err(Status::invalid_argument(SELECTORS_OR_PID)),
        (true, pid) => Ok(attest_pid(pid)),
        (false, 0) => Ok(selectors
            .iter()
            .map(|s| Selector::new(s.r#type.clone(), s.value.clone()))
            .collect()),
    }
}

/// The `unix` attestor's selectors for `pid`: effective uid and gid, and the
/// supplementary groups. Nothing when the process cannot be read (gone, or
/// a negative PID).
pub fn attest_pid(pid: i32) -> Vec<Selector> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    unix_selectors(&status)
}

/// The selectors from a `/proc/<pid>/status` text.
fn unix_selectors(status: &str) -> Vec<Selector> {
    let field = |name: &str| -> Option<Vec<&str>> {
        status.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(':'))
                .map(|r| r.split_whitespace().collect())
        })
    };
    // Real, effective, saved, filesystem: SPIRE uses the effective one.
    let (Some(uids), Some(gids)) = (field("Uid"), field("Gid")) else {
        return Vec::new();
    };
    let (Some(uid), Some(gid)) = (uids.get(1).or(uids.first()), gids.get(1).or(gids.first()))
    else {
        return Vec::new();
    };
    let mut out = vec![
        Selector::new("unix", format!("uid:{uid}")),
        Selector::new("unix", format!("gid:{gid}")),
    ];
    for g in field("Groups").unwrap_or_default() {
        out.push(Selector::new("unix", format!("supplementary_gid:{g}")));
    }
    out
}

/// The SVIDs of entries whose selectors are all in `selectors`; none for
/// no selectors (a PID that attested to nothing), as in SPIRE, whose
/// entries always have selectors.
fn matching<'a>(s: &'a AgentSnapshot, selectors: &[Selector]) -> Vec<&'a HeldSvid> {
    if selectors.is_empty() {
        return Vec::new();
    }
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
        for (selectors, pid) in [(&[][..], 0), (&sel[..], 42), (&sel[..], -1)] {
            let e = request_selectors(selectors, pid).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert_eq!(e.message(), SELECTORS_OR_PID);
        }
        assert_eq!(
            request_selectors(&sel, 0).expect("ok"),
            vec![Selector::new("k8s", "ns:a")]
        );
    }

    #[test]
    fn a_pid_is_attested_by_its_effective_ids() {
        let status = "Name:\tx\nUid:\t1000\t20001\t20001\t20001\nGid:\t1000\t20002\t20002\t20002\nGroups:\t4 27 \n";
        assert_eq!(
            unix_selectors(status),
            vec![
                Selector::new("unix", "uid:20001"),
                Selector::new("unix", "gid:20002"),
                Selector::new("unix", "supplementary_gid:4"),
                Selector::new("unix", "supplementary_gid:27"),
            ]
        );
        assert!(unix_selectors("Name:\tx\n").is_empty());
        // This process: root in the tests' runs, or whoever runs them.
        let me = attest_pid(std::process::id() as i32);
        assert!(me.iter().any(|s| s.value.starts_with("uid:")), "{me:?}");
        assert!(attest_pid(-5).is_empty());
        assert!(attest_pid(i32::MAX).is_empty(), "no such process");
    }
}
