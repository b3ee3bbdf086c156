//! The client side of CUSTOM authorization: asks an `envoyExtAuthzHttp` provider about one
//! request, as Envoy's ext_authz HTTP filter does for Istio's sidecars, and reports what the
//! engine needs (allow / deny / error) plus what the proxy must do with the answer (the
//! provider's own denial response, headers for the app and for the client).
//!
//! The check request is the original method with `pathPrefix` + the original path and query,
//! no body, and these headers: `host` (the original authority), `authorization` when present,
//! the request headers listed in `includeRequestHeadersInCheck` (exact, `x*` prefix or `*x`
//! suffix, case-insensitive), and `includeAdditionalHeadersInCheck`. A 200 answer allows; a
//! 5xx, a timeout (`timeout`, default 600s) or a transport failure is an error (the engine
//! applies `failOpen` / `statusOnError`); any other status denies, and the client gets the
//! provider's status and body with its headers (all of them, or those matching
//! `headersToDownstreamOnDeny` when it is set). On allow, response headers matching
//! `headersToUpstreamOnAllow` are set on the request to the app and those matching
//! `headersToDownstreamOnAllow` are added to the response.
//!
//! An `envoyExtAuthzGrpc` provider gets Envoy's `envoy.service.auth.v3.Authorization/Check`
//! with the source and destination peers (address, SPIFFE ID) and, for HTTP, the request
//! (method, lowercase headers merged with `,`, path, host, scheme, protocol). Status OK allows
//! (the `ok_response` headers go to the app, `response_headers_to_add` to the client, and
//! `headers_to_remove` are removed); any other status denies, with the `denied_response`
//! status (403 when absent), headers and body; a transport failure or timeout is an error. On
//! TCP ports the same call without the request is Envoy's network ext_authz.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use warden_policy::engine::ExtAuthzAnswer;
use warden_policy::mesh::{ExtAuthzKind, ExtAuthzSettings};

/// Istio's default `timeout` for an ext_authz provider.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// A denial body is shown to the client; anything larger is cut off as an error.
const MAX_DENY_BODY: usize = 64 * 1024;

/// One request (or, with `http: None`, one TCP connection) as the provider is told about it.
pub struct CheckRequest<'a> {
    pub http: Option<HttpCheck<'a>>,
    pub source: SocketAddr,
    /// The client's SPIFFE ID when it spoke mTLS.
    pub source_principal: Option<&'a str>,
    pub destination: SocketAddr,
    /// This workload's SPIFFE ID when the connection is mTLS.
    pub destination_principal: Option<&'a str>,
    pub sni: Option<&'a str>,
}

/// The HTTP part of a [`CheckRequest`].
pub struct HttpCheck<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    /// Path and query as the filters see them (normalized).
    pub path: &'a str,
    /// Lowercase names, repeated headers as separate entries.
    pub headers: &'a [(&'a str, &'a str)],
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
}

/// A provider's denial: status, headers for the client, body.
pub type Denial = (StatusCode, Vec<(HeaderName, HeaderValue)>, Bytes);

/// What the provider answered, and what follows from it.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub answer: ExtAuthzAnswer,
    /// For a denial: the provider's status, headers and body, sent to the client as they are.
    pub denial: Option<Denial>,
    /// For an allow: headers to set on the request to the app.
    pub upstream: Vec<(HeaderName, HeaderValue)>,
    /// For an allow: headers to remove from the request to the app.
    pub remove: Vec<HeaderName>,
    /// For an allow: headers to add to the response to the client.
    pub downstream: Vec<(HeaderName, HeaderValue)>,
    /// Why the answer is an error, for the log.
    pub error: Option<String>,
}

impl CheckResult {
    fn error(why: String) -> Self {
        CheckResult {
            answer: ExtAuthzAnswer::Error,
            denial: None,
            upstream: Vec::new(),
            remove: Vec::new(),
            downstream: Vec::new(),
            error: Some(why),
        }
    }
}

/// Calls ext_authz providers; one per proxy, its connections pooled.
pub struct ExtAuthzClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Provider name → address, overriding `service:port` (e.g. in explicit mode, where mesh
    /// hostnames do not resolve).
    addrs: BTreeMap<String, SocketAddr>,
    /// gRPC channels by `host:port`, made on first use and kept (they reconnect by themselves).
    channels: Mutex<BTreeMap<String, tonic::transport::Channel>>,
}

impl Default for ExtAuthzClient {
    fn default() -> Self {
        Self::new(BTreeMap::new())
    }
}

impl ExtAuthzClient {
    pub fn new(addrs: BTreeMap<String, SocketAddr>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        ExtAuthzClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            addrs,
            channels: Mutex::new(BTreeMap::new()),
        }
    }

    /// Where provider `name` is dialled: `--ext-authz-addr`, else `service:port`.
    fn authority(&self, name: &str, s: &ExtAuthzSettings) -> String {
        match self.addrs.get(name) {
            Some(a) => a.to_string(),
            None => {
                // `service` may be `namespace/host`; the host is what is dialled.
                let host = s.service.rsplit('/').next().unwrap_or(&s.service);
                match host.parse::<IpAddr>() {
                    Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", s.port),
                    _ => format!("{host}:{}", s.port),
                }
            }
        }
    }

    /// Asks provider `name` about `req`.
    pub async fn check(
        &self,
        name: &str,
        kind: ExtAuthzKind,
        s: &ExtAuthzSettings,
        req: &CheckRequest<'_>,
    ) -> CheckResult {
        let timeout = s
            .timeout
            .as_deref()
            .and_then(parse_proto_duration)
            .unwrap_or(DEFAULT_TIMEOUT);
        let authority = self.authority(name, s);
        match kind {
            ExtAuthzKind::EnvoyExtAuthzGrpc => {
                match tokio::time::timeout(timeout, self.check_grpc(&authority, req)).await {
                    Ok(r) => r,
                    Err(_) => {
                        CheckResult::error(format!("{authority}: no answer within {timeout:?}"))
                    }
                }
            }
            ExtAuthzKind::EnvoyExtAuthzHttp => match &req.http {
                Some(http) => self.check_http(&authority, s, http, timeout).await,
                // The engine never asks an HTTP provider about a TCP connection.
                None => CheckResult::error(format!(
                    "provider \"{name}\" is envoyExtAuthzHttp, which cannot check TCP"
                )),
            },
        }
    }

    async fn check_http(
        &self,
        authority: &str,
        s: &ExtAuthzSettings,
        req: &HttpCheck<'_>,
        timeout: Duration,
    ) -> CheckResult {
        let prefix = s.path_prefix.as_deref().unwrap_or("");
        let uri = format!("http://{authority}{prefix}{}", req.path);
        let Ok(method) = Method::from_bytes(req.method.as_bytes()) else {
            return CheckResult::error(format!("method {} cannot be sent", req.method));
        };
        let mut builder = Request::builder().method(method).uri(&uri);
        let headers = builder.headers_mut().expect("a fresh builder has headers");
        if let Ok(v) = HeaderValue::from_str(req.authority) {
            headers.insert(hyper::header::HOST, v);
        }
        let included = s
            .include_request_headers_in_check
            .iter()
            .chain(&s.include_headers_in_check)
            .collect::<Vec<_>>();
        for (n, v) in req.headers {
            let wanted = *n == "authorization" || included.iter().any(|p| matches(p, n));
            // Hop-by-hop and framing headers describe the client's connection, not the request.
            if !wanted
                || matches!(
                    *n,
                    "host" | "content-length" | "transfer-encoding" | "connection"
                )
            {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.append(n, v);
            }
        }
        for (n, v) in &s.include_additional_headers_in_check {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.insert(n, v);
            }
        }
        headers.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let Ok(request) = builder.body(Empty::new()) else {
            return CheckResult::error(format!("{uri} is not a valid request target"));
        };
        let call = async {
            let resp = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{uri}: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_DENY_BODY)
                .collect()
                .await
                .map_err(|e| format!("{uri}: reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts.status, parts.headers, body))
        };
        let (status, resp_headers, body) = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return CheckResult::error(e),
            Err(_) => {
                return CheckResult::error(format!("{uri}: no answer within {timeout:?}"));
            }
        };
        if status.is_server_error() {
            return CheckResult::error(format!("{uri} answered {status}"));
        }
        if status == StatusCode::OK {
            return CheckResult {
                answer: ExtAuthzAnswer::Allow,
                denial: None,
                upstream: pick(&resp_headers, &s.headers_to_upstream_on_allow),
                remove: Vec::new(),
                downstream: pick(&resp_headers, &s.headers_to_downstream_on_allow),
                error: None,
            };
        }
        let to_client = if s.headers_to_downstream_on_deny.is_empty() {
            resp_headers
                .iter()
                .filter(|(n, _)| !is_framing(n.as_str()))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        } else {
            pick(&resp_headers, &s.headers_to_downstream_on_deny)
        };
        CheckResult {
            answer: ExtAuthzAnswer::Deny,
            denial: Some((status, to_client, body)),
            upstream: Vec::new(),
            remove: Vec::new(),
            downstream: Vec::new(),
            error: None,
        }
    }

    async fn check_grpc(&self, authority: &str, req: &CheckRequest<'_>) -> CheckResult {
        use crate::ext_authz_proto as pb;
        let channel = {
            let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            match channels.get(authority) {
                Some(c) => c.clone(),
                None => {
                    let Ok(endpoint) =
                        tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
                    else {
                        return CheckResult::error(format!("{authority} is not host:port"));
                    };
                    let c = endpoint.connect_lazy();
                    channels.insert(authority.to_string(), c.clone());
                    c
                }
            }
        };
        let peer = |addr: SocketAddr, principal: Option<&str>| pb::attribute_context::Peer {
            address: Some(pb::Address {
                socket_address: Some(pb::SocketAddress {
                    address: addr.ip().to_string(),
                    port_value: u32::from(addr.port()),
                }),
            }),
            principal: principal.unwrap_or_default().to_string(),
            ..Default::default()
        };
        let http = req.http.as_ref().map(|h| {
            let mut headers: BTreeMap<String, String> = BTreeMap::new();
            for (n, v) in h.headers {
                headers
                    .entry((*n).to_string())
                    .and_modify(|e| {
                        e.push(',');
                        e.push_str(v);
                    })
                    .or_insert_with(|| (*v).to_string());
            }
            headers.insert(":authority".into(), h.authority.to_string());
            headers.insert(":method".into(), h.method.to_string());
            headers.insert(":path".into(), h.path.to_string());
            pb::attribute_context::HttpRequest {
                method: h.method.to_string(),
                headers: headers.into_iter().collect(),
                path: h.path.to_string(),
                host: h.authority.to_string(),
                scheme: "http".into(),
                size: -1,
                protocol: h.protocol.to_string(),
                ..Default::default()
            }
        });
        let check = pb::CheckRequest {
            attributes: Some(pb::AttributeContext {
                source: Some(peer(req.source, req.source_principal)),
                destination: Some(peer(req.destination, req.destination_principal)),
                request: http.map(|h| pb::attribute_context::Request { http: Some(h) }),
                tls_session: req.sni.map(|sni| pb::attribute_context::TlsSession {
                    sni: sni.to_string(),
                }),
                ..Default::default()
            }),
        };
        let mut client = pb::authorization_client::AuthorizationClient::new(channel);
        let resp = match client.check(check).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                return CheckResult::error(format!(
                    "{authority}: the Check call failed: {}",
                    status.message()
                ))
            }
        };
        let code = resp.status.as_ref().map(|s| s.code).unwrap_or(0);
        let options = |opts: &[pb::HeaderValueOption]| -> Vec<(HeaderName, HeaderValue)> {
            opts.iter()
                .filter_map(|o| o.header.as_ref())
                .filter_map(|h| {
                    let value = if h.raw_value.is_empty() {
                        HeaderValue::from_str(&h.value).ok()
                    } else {
                        HeaderValue::from_bytes(&h.raw_value).ok()
                    };
                    Some((
                        HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).ok()?,
                        value?,
                    ))
                })
                .filter(|(n, _)| !is_framing(n.as_str()))
                .collect()
        };
        if code == 0 {
            let ok = match resp.http_response {
                Some(pb::check_response::HttpResponse::OkResponse(ok)) => Some(ok),
                _ => None,
            };
            return CheckResult {
                answer: ExtAuthzAnswer::Allow,
                denial: None,
                upstream: ok.as_ref().map(|o| options(&o.headers)).unwrap_or_default(),
                remove: ok
                    .as_ref()
                    .map(|o| {
                        o.headers_to_remove
                            .iter()
                            .filter_map(|n| {
                                HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok()
                            })
                            // Envoy refuses to remove what would make the request malformed.
                            .filter(|n| n != hyper::header::HOST)
                            .collect()
                    })
                    .unwrap_or_default(),
                downstream: ok
                    .as_ref()
                    .map(|o| options(&o.response_headers_to_add))
                    .unwrap_or_default(),
                error: None,
            };
        }
        let (status, headers, body) = match resp.http_response {
            Some(pb::check_response::HttpResponse::DeniedResponse(d)) => (
                d.status
                    .and_then(|s| u16::try_from(s.code).ok())
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .unwrap_or(StatusCode::FORBIDDEN),
                options(&d.headers),
                Bytes::from(d.body),
            ),
            _ => (StatusCode::FORBIDDEN, Vec::new(), Bytes::new()),
        };
        CheckResult {
            answer: ExtAuthzAnswer::Deny,
            denial: Some((status, headers, body)),
            upstream: Vec::new(),
            remove: Vec::new(),
            downstream: Vec::new(),
            error: None,
        }
    }
}

/// Headers of a provider's answer that the proxy sets itself (or that describe the provider's
/// connection) and never copies.
fn is_framing(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

/// The answer's headers whose names match one of `patterns`.
fn pick(headers: &HeaderMap, patterns: &[String]) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(n, _)| !is_framing(n.as_str()))
        .filter(|(n, _)| patterns.iter().any(|p| matches(p, n.as_str())))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// Istio's header-list matching: exact, `x*` prefix or `*x` suffix, case-insensitive. A lone
/// `*` is refused by validation and matches nothing here.
fn matches(pattern: &str, name: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    let n = name.to_ascii_lowercase();
    if p == "*" || p.is_empty() {
        return false;
    }
    if let Some(prefix) = p.strip_suffix('*') {
        n.starts_with(prefix)
    } else if let Some(suffix) = p.strip_prefix('*') {
        n.ends_with(suffix)
    } else {
        n == p
    }
}

/// A protobuf JSON duration (`"0.5s"`, `"600s"`), also accepting `ms`, `m` and `h`.
fn parse_proto_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return None;
    };
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_patterns_are_exact_prefix_or_suffix_and_case_insensitive() {
        assert!(matches("X-Ext-Authz", "x-ext-authz"));
        assert!(matches("x-ext-authz-*", "x-ext-authz-user"));
        assert!(matches("*-user", "x-auth-request-user"));
        assert!(!matches("x-ext-authz", "x-ext-authz-user"));
        assert!(!matches("*", "anything"));
    }

    #[test]
    fn durations_read_as_istio_writes_them() {
        assert_eq!(
            parse_proto_duration("0.5s"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_proto_duration("600s"), Some(Duration::from_secs(600)));
        assert_eq!(
            parse_proto_duration("250ms"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_proto_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_proto_duration("soon"), None);
        assert_eq!(parse_proto_duration("-1s"), None);
    }
}
