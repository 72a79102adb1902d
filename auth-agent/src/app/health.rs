//! `/metrics` (Prometheus text format), `/healthz` (liveness) and `/readyz`
//! (readiness) over HTTP on the metrics address (9964).

use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Liveness, Readiness};
use crate::api::server::{Body, full};

/// What the endpoints read.
#[derive(Debug, Clone)]
pub struct Health {
    /// The registry rendered by `/metrics`.
    pub registry: Arc<Mutex<Registry>>,
    /// Readiness parts.
    pub ready: Arc<Readiness>,
    /// Liveness.
    pub live: Arc<Liveness>,
}

fn route(h: &Health, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            let reg = h.registry.lock().unwrap_or_else(|e| e.into_inner());
            match prometheus_client::encoding::text::encode(&mut out, &reg) {
                Ok(()) => full(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => full(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/healthz" => match h.live.failure() {
            None => full(StatusCode::OK, "text/plain", "ok\n"),
            Some(why) => full(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        "/readyz" => {
            let r = h.ready.get();
            let body = format!(
                "datapath attached: {}\nSPIRE answered: {}\npolicy synced: {}\n",
                r.datapath, r.svids, r.policy
            );
            let status = if r.all() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            full(status, "text/plain", body)
        }
        other => full(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such endpoint: {other} (/metrics, /healthz, /readyz)\n"),
        ),
    }
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, h: Health, shutdown: CancellationToken) {
    let handler = move |req: Request<Incoming>| {
        let resp = route(&h, &req);
        async move { resp }
    };
    crate::api::server::serve_http("metrics", listener, handler, shutdown).await
}
