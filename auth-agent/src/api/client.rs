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
        "cannot reach the agent at {path}: {source} (is `meshauth agent` running on this node? --api-socket names another socket)"
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
        let req = http::Request::get(path)
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
