//! The SPIRE agent answers on its Workload API socket.

use std::path::Path;
use std::time::Duration;

use svid_cache::SourceError;

use super::Check;

const NAME: &str = "SPIRE socket";

/// One `FetchX509SVID` call on `socket` within `timeout`.
pub async fn probe(socket: &Path, timeout: Duration) -> Check {
    let result = tokio::time::timeout(timeout, svid_cache::fetch_x509_svid_ids(socket)).await;
    outcome(socket, timeout, result.ok())
}

/// The check from the call's outcome (`None`: no answer within `timeout`).
pub fn outcome(
    socket: &Path,
    timeout: Duration,
    result: Option<Result<Vec<String>, SourceError>>,
) -> Check {
    let fix_socket = "start the SPIRE agent on this node, or point --spire-socket \
                      (SPIFFE_ENDPOINT_SOCKET) at its Workload API socket";
    match result {
        Some(Ok(ids)) => {
            let shown: Vec<&str> = ids.iter().take(3).map(String::as_str).collect();
            let more = if ids.len() > shown.len() {
                format!(", … {} more", ids.len() - shown.len())
            } else {
                String::new()
            };
            Check::ok(
                NAME,
                format!(
                    "{} answers, {} SVID{} ({}{more})",
                    socket.display(),
                    ids.len(),
                    if ids.len() == 1 { "" } else { "s" },
                    shown.join(", ")
                ),
            )
        }
        Some(Err(SourceError::NoIdentityIssued { .. })) => Check::warn(
            NAME,
            format!(
                "{} answers, but no identity issued to this node yet",
                socket.display()
            ),
            "create registration entries for the identities this node runs, parented to its \
             SPIRE agent; the agent picks them up without a restart",
        ),
        Some(Err(e)) => Check::fail(NAME, e.to_string(), fix_socket),
        None => Check::fail(
            NAME,
            format!(
                "FetchX509SVID on {}: no answer within {timeout:?}",
                socket.display()
            ),
            "check the SPIRE agent is healthy (its logs, `spire-agent healthcheck`)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::Status;

    const T: Duration = Duration::from_secs(3);

    #[test]
    fn answers_with_svids() {
        let ids: Vec<String> = (256..261)
            .map(|i| format!("spiffe://meshauth.local/identity/{i}"))
            .collect();
        let c = outcome(Path::new("/run/a.sock"), T, Some(Ok(ids)));
        assert_eq!(c.status, Status::Ok);
        assert_eq!(
            c.found,
            "/run/a.sock answers, 5 SVIDs (spiffe://meshauth.local/identity/256, \
             spiffe://meshauth.local/identity/257, spiffe://meshauth.local/identity/258, … 2 more)"
        );
    }

    #[test]
    fn no_identity_issued_is_a_warning() {
        let c = outcome(
            Path::new("/run/a.sock"),
            T,
            Some(Err(SourceError::NoIdentityIssued {
                call: "FetchX509SVID",
                path: "/run/a.sock".into(),
            })),
        );
        assert_eq!(c.status, Status::Warn);
        assert!(c.found.contains("no identity issued"), "{c:?}");
    }

    #[tokio::test]
    async fn a_missing_socket_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let c = probe(&sock, T).await;
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.found.contains(&sock.display().to_string()) && c.found.contains("socket missing"),
            "{c:?}"
        );
        assert!(c.fix.unwrap().contains("--spire-socket"));
    }

    #[test]
    fn silence_fails_with_the_timeout() {
        let c = outcome(Path::new("/run/a.sock"), T, None);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.found, "FetchX509SVID on /run/a.sock: no answer within 3s");
    }
}
