//! Serving the local API (and, on TCP, the metrics and health endpoints:
//! see [`crate::app::health`]) with hyper.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::flows::{FlowFilter, FlowHub};
use super::types::{AgentStatus, AuthEntry, IdentityEntry};

/// A response body: whole or streamed.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the API serves; the agent implements it.
pub trait Backend: Send + Sync + 'static {
    /// `/v1/status`.
    fn status(&self) -> Result<AgentStatus, String>;
    /// `/v1/auth`.
    fn auth(&self) -> Result<Vec<AuthEntry>, String>;
    /// `/v1/identities`.
    fn identities(&self) -> Vec<IdentityEntry>;
    /// `/v1/policies`, rendered as text or JSON.
    fn policies(&self, json: bool) -> String;
    /// The flows.
    fn flows(&self) -> &FlowHub;
    /// `POST /v1/wireguard/rotate-key`: a new WireGuard key, set and
    /// published; the new public key.
    fn rotate_wireguard_key(&self) -> futures::future::BoxFuture<'static, Result<String, String>> {
        Box::pin(async { Err("WireGuard is off on this node (wireguard: false)".to_owned()) })
    }
}

/// A whole body.
pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(v) {
        Ok(b) => full(StatusCode::OK, "application/json", b),
        Err(e) => full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

/// The query string as a map.
pub fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Routes one API request.
pub async fn route<B: Backend>(backend: Arc<B>, req: Request<Incoming>) -> Response<Body> {
    if req.method() == http::Method::POST && req.uri().path() == "/v1/wireguard/rotate-key" {
        return match backend.rotate_wireguard_key().await {
            Ok(key) => full(StatusCode::OK, "text/plain", format!("{key}\n")),
            Err(e) => full(StatusCode::CONFLICT, "text/plain", format!("{e}\n")),
        };
    }
    if req.method() != http::Method::GET {
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is served (and POST /v1/wireguard/rotate-key)\n",
        );
    }
    let q = query(&req);
    match req.uri().path() {
        "/v1/status" => match backend.status() {
            Ok(s) => json(&s),
            Err(e) => full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e),
        },
        "/v1/auth" => match backend.auth() {
            Ok(s) => json(&s),
            Err(e) => full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e),
        },
        "/v1/identities" => json(&backend.identities()),
        "/v1/policies" => {
            let as_json = q.get("o").is_some_and(|o| o == "json");
            full(
                StatusCode::OK,
                if as_json {
                    "application/json"
                } else {
                    "text/plain"
                },
                backend.policies(as_json),
            )
        }
        "/v1/flows" => flows(backend.flows(), &q),
        other => full(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such endpoint: {other}\n"),
        ),
    }
}

fn flows(hub: &FlowHub, q: &HashMap<String, String>) -> Response<Body> {
    let identity = match q.get("identity").map(|v| v.parse::<u32>()) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return full(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "identity: a number\n",
            );
        }
    };
    let filter = FlowFilter {
        verdict: q.get("verdict").cloned(),
        identity,
    };
    let last: usize = q.get("last").and_then(|v| v.parse().ok()).unwrap_or(20);
    let follow = q.get("follow").is_some_and(|v| v == "true" || v == "1");
    let (recent, rx) = hub.recent_and_subscribe();
    let mut lines: Vec<Bytes> = recent
        .iter()
        .filter(|r| filter.matches(r))
        .map(|r| line(r))
        .collect();
    let skip = lines.len().saturating_sub(last);
    lines.drain(..skip);
    let history = futures::stream::iter(lines);
    let live = if follow {
        tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(move |r| {
                let keep = match r {
                    Ok(r) if filter.matches(&r) => Some(line(&r)),
                    Ok(_) => None,
                    // A slow reader: say how many it missed, keep going.
                    Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                        Some(Bytes::from(format!("{{\"lost_events\":{n}}}\n")))
                    }
                };
                futures::future::ready(keep)
            })
            .boxed()
    } else {
        futures::stream::empty().boxed()
    };
    let body = StreamBody::new(
        history
            .chain(live)
            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(http_body_util::BodyExt::boxed_unsync(body))
        .unwrap_or_else(|_| full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", ""))
}

fn line(r: &super::types::FlowRecord) -> Bytes {
    let mut v = serde_json::to_vec(r).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Binds the API socket: see [`super::socket::bind`].
pub fn bind(path: &Path) -> Result<UnixListener, super::socket::BindError> {
    super::socket::bind(path)
}

/// A listener the HTTP loop can accept connections from (the API's unix
/// socket, the metrics TCP port).
pub trait Listener: Send + 'static {
    /// One accepted connection.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection.
    fn next_conn(&self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn next_conn(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn next_conn(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Serves HTTP/1.1 on `listener` with `handler` until `shutdown`; `what`
/// names the endpoint in logs.
pub async fn serve_http<L, H, F>(
    what: &'static str,
    listener: L,
    handler: H,
    shutdown: CancellationToken,
) where
    L: Listener,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.next_conn() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = handler(req);
                async move { Ok::<_, Infallible>(resp.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "{what} connection");
                },
            }
        });
    }
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve<B: Backend>(
    listener: UnixListener,
    backend: Arc<B>,
    shutdown: CancellationToken,
) {
    let handler = move |req| route(backend.clone(), req);
    serve_http("local API", listener, handler, shutdown).await
}
