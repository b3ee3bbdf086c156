//! Observability for the data plane: what the proxy tells operators about the traffic it
//! handled. This module owns the JSON access log, the Prometheus metrics with Istio's names and
//! labels (plus Warden's per-policy authorization counters), and the loopback-only admin server
//! (`/ready`, `/config_dump`, `/certs`, `/stats/prometheus`, `/logging`).
//!
//! It records, it never decides: the inbound path hands it a [`DecisionSummary`] built from the
//! engine's [`Decision`] and the facts of the request ([`RequestInfo`]) or connection
//! ([`TcpInfo`]) once they are complete, and [`Observer`] turns them into one access-log line
//! and metric updates.
//!
//! How the inbound path uses it (one `Arc<Observer>` per proxy):
//!
//! ```text
//! accept + handshake  -> let conn = ConnectionInfo { .. }            (once per connection)
//! TCP                 -> observer.on_tcp_open(&conn); ... copy ...;
//!                        observer.on_tcp_close(&TcpInfo { conn: &conn, .. }, &summary)
//! HTTP, per request   -> let summary = DecisionSummary::from(&decision);
//!                        flags = ResponseFlags::for_decision(&summary) (+ UF/UT/.. on upstream errors)
//!                        after the response: observer.on_request(&RequestInfo { .. }, &summary)
//! refused before policy (STRICT plaintext, 400) -> DecisionSummary::local("reset", why)
//! admin               -> AdminServer::bind(127.0.0.1:15000, AdminHandlers { .. }).await?.run()
//! ```

mod access_log;
mod admin;
mod metrics;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use warden_policy::authz::RuleMatch;
use warden_policy::engine::{Decision, ExtAuthzAnswer, Outcome};

pub use access_log::{AccessLog, AccessLogEntry, DEFAULT_ACCESS_LOG_CAPACITY};
pub use admin::{
    AdminHandlers, AdminServer, JsonSource, LogLevel, LogLevelControl, Readiness,
    ADMIN_HEADER_TIMEOUT,
};
pub use metrics::{Metrics, ISTIO_DURATION_BUCKETS_MS};

/// What can go wrong setting up observability.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObserveError {
    #[error("the admin server must listen on a loopback address (127.0.0.0/8 or ::1), not {0}: it exposes configuration and changes the log level without authentication")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr} for the admin server: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the access-log writer thread: {0}")]
    Writer(std::io::Error),
}

/// Value Istio puts in a label it cannot fill.
pub const UNKNOWN: &str = "unknown";

/// Which side of a request a report comes from, as Istio's `reporter` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    /// The server's sidecar (inbound): decides and reports every request it serves.
    #[default]
    Destination,
    /// The client's sidecar (outbound): reports what the app sent and what came back; it
    /// decides nothing, so no policy counter moves.
    Source,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Destination => "destination",
            Reporter::Source => "source",
        }
    }
}

/// Facts about one inbound connection, fixed when it is accepted (and, for mTLS, after the
/// handshake). Built once per connection and borrowed by every request on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The peer's SPIFFE ID; `None` for plaintext.
    pub source_principal: Option<String>,
    /// The peer's workload name when the control plane knows it; Istio reports `unknown` else.
    pub source_workload: Option<String>,
    pub source_addr: SocketAddr,
    pub destination_workload: String,
    pub destination_namespace: String,
    /// This workload's own SPIFFE ID when it served TLS.
    pub destination_principal: Option<String>,
    pub destination_port: u16,
    /// Whether the connection was mutual TLS (`connection_security_policy="mutual_tls"`).
    pub mtls: bool,
    pub reporter: Reporter,
}

impl ConnectionInfo {
    /// The namespace in the peer's SPIFFE ID (`spiffe://td/ns/NS/sa/SA`), as Istio fills
    /// `source_workload_namespace` when peer metadata is missing.
    pub fn source_namespace(&self) -> Option<&str> {
        let id = self.source_principal.as_deref()?;
        let path = id.strip_prefix("spiffe://")?;
        let mut parts = path.split('/').skip(1);
        while let Some(p) = parts.next() {
            if p == "ns" {
                return parts.next().filter(|ns| !ns.is_empty());
            }
        }
        None
    }
}

/// `request_protocol` as Istio reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestProtocol {
    Http,
    Grpc,
    Tcp,
}

impl RequestProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
            RequestProtocol::Tcp => "tcp",
        }
    }
}

/// One of Envoy's response flags: why a request or connection ended the way it did, beyond
/// its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResponseFlag {
    /// `DC`: the client closed or reset the connection.
    DownstreamConnectionTermination,
    /// `DPE`: the client sent malformed HTTP.
    DownstreamProtocolError,
    /// `SI`: an idle or header timeout on the client side.
    StreamIdleTimeout,
    /// `NR`: no route (port not served).
    NoRouteFound,
    /// `UF`: connecting to the app failed.
    UpstreamConnectionFailure,
    /// `UC`: the app closed the connection.
    UpstreamConnectionTermination,
    /// `UT`: the app did not answer in time.
    UpstreamRequestTimeout,
    /// `URX`: retries or connect attempts to the app exhausted.
    UpstreamRetryLimitExceeded,
    /// `UPE`: the app answered with malformed HTTP.
    UpstreamProtocolError,
    /// `UO`: the upstream pool overflowed.
    UpstreamOverflow,
    /// `UH`: no healthy upstream.
    NoHealthyUpstream,
    /// `UAEX`: a CUSTOM (external authorization) provider denied the request.
    UnauthorizedExternalService,
    /// `RL`: rate limited.
    RateLimited,
}

const ALL_FLAGS: [ResponseFlag; 13] = [
    ResponseFlag::DownstreamConnectionTermination,
    ResponseFlag::DownstreamProtocolError,
    ResponseFlag::StreamIdleTimeout,
    ResponseFlag::NoRouteFound,
    ResponseFlag::UpstreamConnectionFailure,
    ResponseFlag::UpstreamConnectionTermination,
    ResponseFlag::UpstreamRequestTimeout,
    ResponseFlag::UpstreamRetryLimitExceeded,
    ResponseFlag::UpstreamProtocolError,
    ResponseFlag::UpstreamOverflow,
    ResponseFlag::NoHealthyUpstream,
    ResponseFlag::UnauthorizedExternalService,
    ResponseFlag::RateLimited,
];

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::UpstreamProtocolError => "UPE",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UnauthorizedExternalService => "UAEX",
            ResponseFlag::RateLimited => "RL",
        }
    }
}

/// A set of [`ResponseFlag`]s, shown as Envoy shows them: `-` when empty, else comma-separated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    pub const NONE: ResponseFlags = ResponseFlags(0);

    pub fn with(self, flag: ResponseFlag) -> Self {
        ResponseFlags(self.0 | 1 << flag as u8)
    }

    /// Every flag in `self` or in `other`.
    pub fn union(self, other: ResponseFlags) -> Self {
        ResponseFlags(self.0 | other.0)
    }

    pub fn contains(self, flag: ResponseFlag) -> bool {
        self.0 & (1 << flag as u8) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The flags a decision implies on its own: `UAEX` when a CUSTOM provider refused the
    /// request (denied, or failed and the request was refused). RBAC and JWT denials carry no
    /// flag, as in Envoy.
    pub fn for_decision(decision: &DecisionSummary) -> Self {
        if decision.ext_authz_denied {
            ResponseFlags::NONE.with(ResponseFlag::UnauthorizedExternalService)
        } else {
            ResponseFlags::NONE
        }
    }
}

impl From<ResponseFlag> for ResponseFlags {
    fn from(flag: ResponseFlag) -> Self {
        ResponseFlags::NONE.with(flag)
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for flag in ALL_FLAGS.iter().filter(|fl| self.contains(**fl)) {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(flag.as_str())?;
            first = false;
        }
        Ok(())
    }
}

/// Which policy rule a decision names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    /// `ALLOW`, `DENY`, `AUDIT` or `CUSTOM`.
    pub action: String,
    /// Index of the rule in the policy's `rules`.
    pub rule: u32,
}

impl From<&RuleMatch> for PolicyRef {
    fn from(m: &RuleMatch) -> Self {
        PolicyRef {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            action: m.action.as_str().to_string(),
            rule: m.rule,
        }
    }
}

/// What a dry-run (`istio.io/dry-run`) engine would have said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunSummary {
    /// `ALLOW` or `DENY`.
    pub action: String,
    /// `allowed` or `denied`.
    pub result: String,
    /// The dry-run rule that matched, if any.
    pub policy: Option<PolicyRef>,
}

/// The parts of a [`Decision`] observability needs, owned so it can outlive the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionSummary {
    /// `allow`, `deny`, `unauthenticated`, `reset` or `bad-request` ([`Outcome::as_str`]).
    pub result: &'static str,
    /// The rule that decided; `None` when no policy applies or none matched.
    pub policy: Option<PolicyRef>,
    pub request_principal: Option<String>,
    pub dry_run: Vec<DryRunSummary>,
    /// A CUSTOM provider was consulted and the request was refused on its account.
    pub ext_authz_denied: bool,
    pub reason: String,
}

impl DecisionSummary {
    /// For traffic refused before the engine was asked (plaintext to STRICT, malformed HTTP).
    pub fn local(result: &'static str, reason: impl Into<String>) -> Self {
        DecisionSummary {
            result,
            policy: None,
            request_principal: None,
            dry_run: Vec::new(),
            ext_authz_denied: false,
            reason: reason.into(),
        }
    }
}

impl From<&Decision> for DecisionSummary {
    fn from(d: &Decision) -> Self {
        DecisionSummary {
            result: d.outcome.as_str(),
            policy: d.deciding.as_ref().map(PolicyRef::from),
            request_principal: d.request_principal.clone(),
            dry_run: d
                .dry_run
                .iter()
                .map(|r| DryRunSummary {
                    action: r.action.as_str().to_string(),
                    result: r.result.to_string(),
                    policy: r.matched.as_ref().map(PolicyRef::from),
                })
                .collect(),
            ext_authz_denied: d.outcome != Outcome::Allow
                && d.custom
                    .as_ref()
                    .is_some_and(|c| c.answer != ExtAuthzAnswer::Allow),
            reason: d.reason.clone(),
        }
    }
}

/// One finished HTTP request (or gRPC call), reported once its response has been sent.
#[derive(Debug, Clone)]
pub struct RequestInfo<'a> {
    pub conn: &'a ConnectionInfo,
    /// When the request's headers arrived.
    pub start: SystemTime,
    pub protocol: RequestProtocol,
    pub method: &'a str,
    pub authority: &'a str,
    /// The path as the client sent it (with query).
    pub path: &'a str,
    /// Status sent to the client; 0 when the stream was reset without one.
    pub status: u16,
    pub response_flags: ResponseFlags,
    /// Request body bytes received from the client.
    pub bytes_received: u64,
    /// Response body bytes sent to the client.
    pub bytes_sent: u64,
    pub duration: Duration,
}

/// One finished opaque TCP connection, reported when it closes.
#[derive(Debug, Clone)]
pub struct TcpInfo<'a> {
    pub conn: &'a ConnectionInfo,
    pub start: SystemTime,
    pub response_flags: ResponseFlags,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
}

/// Everything the proxy reports: metrics always, the access log when one is configured.
/// Shared (`Arc<Observer>`) by every listener and the admin server; all methods take `&self`.
pub struct Observer {
    metrics: Metrics,
    access_log: Option<AccessLog>,
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("access_log", &self.access_log.is_some())
            .finish_non_exhaustive()
    }
}

impl Observer {
    pub fn new(access_log: Option<AccessLog>) -> Self {
        Observer {
            metrics: Metrics::with_access_log_dropped(
                access_log.as_ref().map(AccessLog::dropped_counter),
            ),
            access_log,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.as_ref()
    }

    /// Records a finished HTTP request: one access-log line, `istio_requests_total`,
    /// `istio_request_duration_milliseconds` and the per-policy counters.
    pub fn on_request(&self, req: &RequestInfo<'_>, decision: &DecisionSummary) {
        self.metrics.record_request(req, decision);
        if let Some(log) = &self.access_log {
            log.log(&AccessLogEntry::for_request(req, decision));
        }
    }

    /// Records an accepted TCP connection (`istio_tcp_connections_opened_total`).
    pub fn on_tcp_open(&self, conn: &ConnectionInfo) {
        self.metrics.record_tcp_open(conn);
    }

    /// Records a closed TCP connection: one access-log line, the closed counter, the byte
    /// counters and the per-policy counters. Call it for denied connections too, after
    /// [`Observer::on_tcp_open`], as Istio counts them.
    pub fn on_tcp_close(&self, tcp: &TcpInfo<'_>, decision: &DecisionSummary) {
        self.metrics.record_tcp_close(tcp, decision);
        if let Some(log) = &self.access_log {
            log.log(&AccessLogEntry::for_tcp(tcp, decision));
        }
    }

    /// All metrics in the Prometheus (OpenMetrics) text format.
    pub fn render(&self) -> String {
        self.metrics.render()
    }
}
