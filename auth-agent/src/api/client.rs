//! The CLI's side of the local API.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// Talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket cannot be reached.
    #[error(
        "cannot reach the agent at {path}: {source} (is `meshauth-agent` running on this node? --api-socket names another socket)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("local API {path}: {source}")]
    Http {
        /// The request path.
        path: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The agent answered with an error.
    #[error("local API {path}: {status}: {body}")]
    Status {
        /// The request path.
        path: String,
        /// The status.
        status: http::StatusCode,
        /// What it said.
        body: String,
    },
    /// The answer did not parse.
    #[error("local API {path}: unexpected answer: {source}")]
    Decode {
        /// The request path.
        path: String,
        /// serde's error.
        source: serde_json::Error,
    },
}

/// A client of one agent's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client of the agent listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    async fn request(&self, path: &str) -> Result<http::Response<Incoming>, ApiError> {
        self.request_with(http::Method::GET, path).await
    }

    async fn request_with(
        &self,
        method: http::Method,
        path: &str,
    ) -> Result<http::Response<Incoming>, ApiError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let http = |source| ApiError::Http {
            path: path.to_string(),
            source,
        };
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "meshauth")
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let resp = send.send_request(req).await.map_err(http)?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(ApiError::Status {
                path: path.to_string(),
                status,
                body: body.trim().to_string(),
            });
        }
        Ok(resp)
    }

    /// `GET path` as text.
    pub async fn get_text(&self, path: &str) -> Result<String, ApiError> {
        let resp = self.request(path).await?;
        body_text(path, resp).await
    }

    /// `POST path` (no body); the answer as text.
    pub async fn post_text(&self, path: &str) -> Result<String, ApiError> {
        let resp = self.request_with(http::Method::POST, path).await?;
        body_text(path, resp).await
    }

    /// `GET path` as JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let text = self.get_text(path).await?;
        serde_json::from_str(&text).map_err(|source| ApiError::Decode {
            path: path.to_string(),
            source,
        })
    }

    /// `GET path`, handing each line to `f` as it arrives, until the agent
    /// ends the stream or `f` returns false.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut f: impl FnMut(&str) -> bool,
    ) -> Result<(), ApiError> {
        let resp = self.request(path).await?;
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| ApiError::Http {
                path: path.to_string(),
                source,
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if !f(String::from_utf8_lossy(&line[..nl]).as_ref()) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// A whole response body as text.
async fn body_text(path: &str, resp: http::Response<Incoming>) -> Result<String, ApiError> {
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|source| ApiError::Http {
            path: path.to_string(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

/// `meshauth policy status` against a running agent: what it enforces now.
/// Returns the report and whether no policy is rejected.
pub async fn policy_status_live(api: &ApiClient, json: bool) -> Result<(String, bool), ApiError> {
    let text = api
        .get_text(if json {
            "/v1/policies?o=json"
        } else {
            "/v1/policies?o=text"
        })
        .await?;
    let rejected = if json {
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| a.iter().any(|p| p["verdict"] == "rejected"))
    } else {
        text.lines().any(|l| l.contains("rejected"))
    };
    Ok((text, !rejected))
}

/// `meshauth observe`: prints flows (text lines or Hubble-style JSON)
/// until the agent closes the stream, `limit` flows were printed, or the
/// output goes away.
pub async fn observe(
    api: &ApiClient,
    filter: &ObserveArgs,
    mut out: impl std::io::Write,
) -> Result<(), ApiError> {
    let mut path = format!("/v1/flows?last={}", filter.last);
    if let Some(v) = &filter.verdict {
        path.push_str(&format!("&verdict={}", v.to_ascii_uppercase()));
    }
    if let Some(id) = filter.identity {
        path.push_str(&format!("&identity={id}"));
    }
    if filter.follow {
        path.push_str("&follow=true");
    }
    api.stream_lines(&path, |line| {
        let text = if filter.json {
            line.to_string()
        } else {
            match serde_json::from_str::<super::types::FlowRecord>(line) {
                Ok(r) => super::flows::render_line(&r),
                Err(_) => line.to_string(),
            }
        };
        writeln!(out, "{text}").is_ok() && out.flush().is_ok()
    })
    .await
}

/// What `meshauth observe` asks for.
#[derive(Debug, Clone, Default)]
pub struct ObserveArgs {
    /// `DROPPED`, `FORWARDED` or `AUDIT`.
    pub verdict: Option<String>,
    /// Only flows of this identity.
    pub identity: Option<u32>,
    /// How many past flows to print first.
    pub last: usize,
    /// Keep streaming new flows.
    pub follow: bool,
    /// Hubble-style JSON, one flow per line.
    pub json: bool,
}
