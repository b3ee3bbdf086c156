//! The control plane's admin endpoint, on loopback only (it is unauthenticated): `/ready`
//! (200 once a configuration is in force), `/status` (JSON: the configuration in force, the
//! last refused change with every error, connected proxies with their ACKed version and last
//! NACK, JWKS targets) and `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::server::ControlPlane;

/// Binds the admin server; refuses non-loopback addresses.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} is not a loopback address; the admin server is unauthenticated and listens on loopback only"),
        ));
    }
    TcpListener::bind(addr).await
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, cp: Arc<ControlPlane>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let cp = cp.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let cp = cp.clone();
                async move { Ok::<_, Infallible>(handle(&cp, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn handle(cp: &ControlPlane, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/ready" => match cp.snapshot() {
            Some(s) => (
                StatusCode::OK,
                "text/plain",
                format!("ready: configuration version {}\n", s.generation),
            ),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: no configuration accepted yet\n".to_string(),
            ),
        },
        "/status" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&cp.status_json()).unwrap_or_default() + "\n",
        ),
        "/metrics" | "/stats/prometheus" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            cp.metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready, /status or /metrics\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}
