//! The admin server: a small HTTP/1.1 endpoint on loopback for operators and probes —
//! readiness, the configuration and certificates in use, metrics, and the log level.
//! It is unauthenticated by design (like Envoy's admin port), so it refuses to listen on
//! anything but a loopback address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::{ObserveError, Observer};

/// How long an admin client may take to send its request headers.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Produces a JSON document on demand (the config in force, the certificates in use).
pub type JsonSource = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Whether the proxy is ready to take traffic: set once config and certificates are loaded.
/// Clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Log levels the admin server can switch between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum LogLevel {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
    Trace = 4,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => LogLevel::Error,
            1 => LogLevel::Warn,
            2 => LogLevel::Info,
            3 => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }
}

impl std::fmt::Display for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

type ApplyLevel = dyn Fn(LogLevel) -> Result<(), String> + Send + Sync;

/// The runtime log level: remembers the current level and applies changes through a callback
/// (the binary's hook into its `tracing` subscriber, e.g. a reload handle's `modify`).
pub struct LogLevelControl {
    current: AtomicU8,
    apply: Box<ApplyLevel>,
}

impl std::fmt::Debug for LogLevelControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevelControl")
            .field("current", &self.get())
            .finish_non_exhaustive()
    }
}

impl LogLevelControl {
    pub fn new(
        initial: LogLevel,
        apply: impl Fn(LogLevel) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        LogLevelControl {
            current: AtomicU8::new(initial as u8),
            apply: Box::new(apply),
        }
    }

    pub fn get(&self) -> LogLevel {
        LogLevel::from_u8(self.current.load(Ordering::Acquire))
    }

    /// Applies `level`; the current level changes only if the callback accepted it.
    pub fn set(&self, level: LogLevel) -> Result<(), String> {
        (self.apply)(level)?;
        self.current.store(level as u8, Ordering::Release);
        Ok(())
    }
}

/// What the admin endpoints serve.
#[derive(Clone)]
pub struct AdminHandlers {
    pub observer: Arc<Observer>,
    pub readiness: Readiness,
    /// `/config_dump`.
    pub config_dump: JsonSource,
    /// `/certs`.
    pub certs: JsonSource,
    /// `/logging`.
    pub log_level: Arc<LogLevelControl>,
}

impl std::fmt::Debug for AdminHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminHandlers")
            .field("readiness", &self.readiness)
            .field("log_level", &self.log_level)
            .finish_non_exhaustive()
    }
}

/// A bound admin server. [`AdminServer::run`] serves until its future is dropped (abort the
/// task it was spawned on to stop it).
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    handlers: AdminHandlers,
}

impl AdminServer {
    /// Binds `addr`, which must be loopback (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr, handlers: AdminHandlers) -> Result<Self, ObserveError> {
        if !addr.ip().is_loopback() {
            return Err(ObserveError::NotLoopback(addr));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ObserveError::Bind { addr, source })?;
        Ok(AdminServer { listener, handlers })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        let handlers = Arc::new(self.handlers);
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handlers = handlers.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handlers = handlers.clone();
                    async move { Ok::<_, Infallible>(handle(&handlers, req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(mut s) => {
            s.push('\n');
            reply(StatusCode::OK, JSON, s)
        }
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            format!("cannot serialize: {e}\n"),
        ),
    }
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn handle(h: &AdminHandlers, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    let read_only = matches!(*method, Method::GET | Method::HEAD);
    match path {
        "/ready" | "/config_dump" | "/certs" | "/stats/prometheus" if !read_only => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            format!("{path} answers GET only\n"),
        ),
        "/ready" => {
            if h.readiness.is_ready() {
                reply(StatusCode::OK, TEXT, "LIVE\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "PRE_INITIALIZING\n".into(),
                )
            }
        }
        "/config_dump" => json(&(h.config_dump)()),
        "/certs" => json(&(h.certs)()),
        "/stats/prometheus" => reply(StatusCode::OK, OPENMETRICS, h.observer.render()),
        "/logging" => logging(h, method, req.uri().query()),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; endpoints: /ready /config_dump /certs /stats/prometheus /logging\n".into(),
        ),
    }
}

fn logging(h: &AdminHandlers, method: &Method, query: Option<&str>) -> Response<Full<Bytes>> {
    let show = |status| reply(status, TEXT, format!("level: {}\n", h.log_level.get()));
    match *method {
        Method::GET | Method::HEAD => show(StatusCode::OK),
        // A change is a POST, as in Envoy, so that a crawler or a prefetch cannot make it.
        Method::POST => match query_param(query, "level") {
            None => reply(
                StatusCode::BAD_REQUEST,
                TEXT,
                "POST /logging needs ?level=error|warn|info|debug|trace\n".into(),
            ),
            Some(v) => match LogLevel::parse(v) {
                None => reply(
                    StatusCode::BAD_REQUEST,
                    TEXT,
                    format!(
                        "unknown log level {v:?}; expected error, warn, info, debug or trace\n"
                    ),
                ),
                Some(level) => match h.log_level.set(level) {
                    Ok(()) => {
                        tracing::info!(
                            level = level.as_str(),
                            "log level changed through the admin server"
                        );
                        show(StatusCode::OK)
                    }
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        TEXT,
                        format!("cannot change the log level to {level}: {e}\n"),
                    ),
                },
            },
        },
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "/logging answers GET (show) and POST ?level=... (change)\n".into(),
        ),
    }
}
