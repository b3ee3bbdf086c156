//! Inbound enforcement for one workload: a listener per container port that tells mTLS from
//! plaintext, applies the port's PeerAuthentication mode, serves HTTP/1.1, HTTP/2 or opaque
//! TCP, asks the policy engine about every request or connection, and forwards what it allows
//! to the app with Istio's `x-forwarded-client-cert`. Also owns applying a new configuration
//! ([`InboundProxy::apply`]): new requests see it at once, and every open TCP connection is
//! decided again against it and closed when no longer allowed (as ztunnel does).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request as HttpReq, Response, StatusCode, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use warden_identity::tls::{peer_spiffe_id, server_config, IdentityState, ALPN_H2, ALPN_HTTP_1_1};
use warden_policy::authz::Protocol;
use warden_policy::engine::{
    Decision, HttpRequest, Outcome, Request, WorkloadPolicy, RBAC_DENIED_BODY,
};
use warden_policy::model::MtlsMode;

use crate::error::ProxyError;
use crate::ports::{InboundPort, PortProtocol, PortSettings};
use crate::sniff::{is_http, is_tls, read_until, Rewind, MAX_SNIFF};

/// Body of every response the proxy sends: the app's, streamed, or a local reply.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send its first bytes (protocol detection) before the
/// connection is closed.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers (HTTP/1).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the app may take for a TCP connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const XFCC: &str = "x-forwarded-client-cert";

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1, plus `te`, which the
/// HTTP/1 upstream does not need, and the non-standard `proxy-connection`).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

/// The inbound side of one workload's proxy.
pub struct InboundProxy {
    policy: Arc<ArcSwap<WorkloadPolicy>>,
    identity: Arc<IdentityState>,
    tls: Arc<rustls::ServerConfig>,
    /// Mode and protocol follow the configuration ([`InboundProxy::apply`]); a port missing
    /// from the current table refuses new connections.
    ports: ArcSwap<BTreeMap<u16, InboundPort>>,
    /// Where each served port's app listens: fixed at start, whatever the configuration says.
    apps: BTreeMap<u16, SocketAddr>,
    /// Bumped by every [`InboundProxy::apply`]; open TCP connections watch it to be decided
    /// again.
    generation: watch::Sender<u64>,
    client: Client<HttpConnector, Incoming>,
    detect_timeout: Duration,
    handshake_timeout: Duration,
}

/// What is known about one downstream connection.
struct ConnCtx {
    proxy: Arc<InboundProxy>,
    port: u16,
    settings: InboundPort,
    source: SocketAddr,
    local: SocketAddr,
    /// Whether the client spoke TLS (for re-checking the port's mode).
    tls: bool,
    /// The verified mTLS peer, if any.
    peer: Option<Peer>,
    sni: Option<String>,
}

struct Peer {
    id: String,
    /// Hex SHA-256 of the peer's leaf certificate (DER), as in XFCC's `Hash`.
    leaf_hash: String,
}

impl InboundProxy {
    /// A proxy for the workload whose current policy is in `policy` (store a new one to change
    /// what the next request sees), whose SVID and trust bundle are in `identity`, serving
    /// `ports` (keyed by container port).
    pub fn new(
        policy: Arc<ArcSwap<WorkloadPolicy>>,
        identity: Arc<IdentityState>,
        ports: BTreeMap<u16, InboundPort>,
    ) -> Self {
        // `server_config` reads the identity at each handshake, so one config serves all
        // rotations.
        let tls = Arc::new(server_config(identity.clone()));
        let client = Client::builder(TokioExecutor::new()).build_http();
        let apps = ports.iter().map(|(p, s)| (*p, s.app)).collect();
        InboundProxy {
            policy,
            identity,
            tls,
            ports: ArcSwap::from_pointee(ports),
            apps,
            generation: watch::Sender::new(0),
            client,
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Changes how long a client may take to send its first bytes.
    pub fn with_detect_timeout(mut self, t: Duration) -> Self {
        self.detect_timeout = t;
        self
    }

    /// The ports this proxy serves, with their current mode and protocol.
    pub fn ports(&self) -> Arc<BTreeMap<u16, InboundPort>> {
        self.ports.load_full()
    }

    /// How many configurations have been applied since start.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Puts a new configuration in force: `policy` decides the next request or connection,
    /// `table` gives each served port its mode and protocol (apps stay where they were given;
    /// a served port the table no longer has refuses new connections — fail closed), and every
    /// open TCP connection is decided again, those no longer allowed being closed.
    pub fn apply(&self, policy: Arc<WorkloadPolicy>, table: &BTreeMap<u16, PortSettings>) {
        let ports: BTreeMap<u16, InboundPort> = self
            .apps
            .iter()
            .filter_map(|(port, app)| table.get(port).map(|s| (*port, s.with_app(*app))))
            .collect();
        for port in self.apps.keys().filter(|p| !table.contains_key(p)) {
            tracing::warn!(
                port,
                "the workload no longer has this port; new connections to it are refused"
            );
        }
        self.policy.store(policy);
        self.ports.store(Arc::new(ports));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Listens on `addr` for connections to container port `port`.
    pub async fn bind(
        self: &Arc<Self>,
        port: u16,
        addr: SocketAddr,
    ) -> Result<InboundListener, ProxyError> {
        if !self.ports.load().contains_key(&port) {
            return Err(ProxyError::UnknownPort(port));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind { port, addr, source })?;
        Ok(InboundListener {
            proxy: self.clone(),
            port,
            listener,
        })
    }

    /// Handles one accepted connection to container `port` until it ends.
    pub async fn serve_connection(
        self: Arc<Self>,
        port: u16,
        stream: TcpStream,
    ) -> Result<(), ProxyError> {
        let settings = *self
            .ports
            .load()
            .get(&port)
            .ok_or(ProxyError::UnknownPort(port))?;
        let source = stream.peer_addr()?;
        let local = stream.local_addr()?;
        let deadline = Instant::now() + self.detect_timeout;
        let mut stream = stream;
        let mut first = Vec::with_capacity(MAX_SNIFF);
        timeout_at(deadline, read_until(&mut stream, &mut first, 2, is_tls))
            .await
            .map_err(|_| ProxyError::DetectTimeout(self.detect_timeout))??;
        if first.is_empty() {
            return Err(ProxyError::EmptyConnection);
        }
        let tls = is_tls(&first) == Some(true);
        if let Some(why) = mode_refusal(settings.mode, tls) {
            tracing::info!(
                target: "warden::decision",
                port,
                source = %source,
                outcome = Outcome::Reset.as_str(),
                mode = settings.mode.as_str(),
                reason = why,
                "connection closed"
            );
            return Ok(());
        }
        let mut ctx = ConnCtx {
            proxy: self.clone(),
            port,
            settings,
            source,
            local,
            tls,
            peer: None,
            sni: None,
        };
        let stream = Rewind::new(first, stream);
        if !tls {
            return ctx.dispatch(stream, None, deadline).await;
        }
        let accepted = timeout(
            self.handshake_timeout,
            TlsAcceptor::from(self.tls.clone()).accept(stream),
        )
        .await
        .map_err(|_| ProxyError::HandshakeTimeout(self.handshake_timeout))?
        .map_err(ProxyError::Handshake)?;
        let (_, conn) = accepted.get_ref();
        // The server config requires a verified client certificate, so a missing identity
        // here means something is wrong: refuse rather than treat the peer as anonymous.
        let id = peer_spiffe_id(conn).ok_or(ProxyError::NoPeerIdentity)?;
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(ProxyError::NoPeerIdentity)?;
        ctx.peer = Some(Peer {
            id: id.to_string(),
            leaf_hash: sha256_hex(leaf.as_ref()),
        });
        ctx.sni = conn.server_name().map(str::to_string);
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        // Detection over TLS gets its own window, starting after the handshake.
        let deadline = Instant::now() + self.detect_timeout;
        ctx.dispatch(accepted, alpn, deadline).await
    }

    fn own_id(&self) -> String {
        self.identity
            .svid_id()
            .map(|id| id.to_string())
            .unwrap_or_default()
    }
}

impl ConnCtx {
    /// Hands the (possibly decrypted) stream to the HTTP or TCP handler.
    async fn dispatch<S>(
        self,
        mut stream: S,
        alpn: Option<Vec<u8>>,
        deadline: Instant,
    ) -> Result<(), ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let alpn_http = matches!(alpn.as_deref(), Some(ALPN_H2) | Some(ALPN_HTTP_1_1));
        let mut first = Vec::new();
        let http = match self.settings.protocol {
            PortProtocol::Http => true,
            PortProtocol::Tcp => false,
            PortProtocol::Detect if alpn_http => true,
            PortProtocol::Detect => {
                let detect = self.proxy.detect_timeout;
                timeout_at(
                    deadline,
                    read_until(&mut stream, &mut first, MAX_SNIFF, is_http),
                )
                .await
                .map_err(|_| ProxyError::DetectTimeout(detect))??;
                if first.is_empty() {
                    return Err(ProxyError::EmptyConnection);
                }
                is_http(&first) == Some(true)
            }
        };
        let stream = Rewind::new(first, stream);
        if http {
            self.serve_http(stream, alpn).await
        } else {
            self.serve_tcp(stream).await
        }
    }

    async fn serve_http<S>(self, stream: S, alpn: Option<Vec<u8>>) -> Result<(), ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ctx = Arc::new(self);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // A client gets a bounded time to send each request's headers (slow-header attacks).
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        builder.http2().timer(TokioTimer::new());
        builder = match alpn.as_deref() {
            Some(ALPN_H2) => builder.http2_only(),
            Some(ALPN_HTTP_1_1) => builder.http1_only(),
            // Plaintext, or mesh ALPN values that do not name the HTTP version: the preface
            // tells.
            _ => builder,
        };
        let service = hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(ctx.handle_request(req).await) }
        });
        if let Err(e) = builder
            .serve_connection(TokioIo::new(stream), service)
            .await
        {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
        Ok(())
    }

    async fn serve_tcp<S>(self, mut stream: S) -> Result<(), ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Subscribe before deciding: a configuration applied from here on is seen below, so
        // no change can slip between the decision and the watch.
        let mut changes = self.proxy.generation.subscribe();
        changes.borrow_and_update();
        if !self.decide_tcp(false) {
            return Ok(());
        }
        let app = self.settings.app;
        let mut upstream = timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(app))
            .await
            .map_err(|_| ProxyError::Upstream {
                addr: app,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| ProxyError::Upstream { addr: app, source })?;
        let copy = tokio::io::copy_bidirectional(&mut stream, &mut upstream);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                done = &mut copy => {
                    done?;
                    return Ok(());
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The proxy is going away; nothing will change any more.
                        (&mut copy).await?;
                        return Ok(());
                    }
                    changes.borrow_and_update();
                    if !self.decide_tcp(true) {
                        // Dropping both streams closes them.
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Decides this TCP connection against the current configuration and logs the decision;
    /// true when it may (still) pass. `recheck` marks a decision taken again for an open
    /// connection after a configuration change.
    fn decide_tcp(&self, recheck: bool) -> bool {
        let event = if recheck {
            "tcp connection re-checked"
        } else {
            "tcp connection"
        };
        if recheck {
            let ports = self.proxy.ports.load();
            let refusal = match ports.get(&self.port) {
                None => Some("the workload no longer has this port"),
                Some(s) => mode_refusal(s.mode, self.tls),
            };
            if let Some(why) = refusal {
                self.log_tcp(event, Outcome::Reset.as_str(), None, why);
                return false;
            }
        }
        let policy = self.proxy.policy.load();
        let req = Request {
            source_ip: Some(self.source.ip()),
            destination_ip: Some(self.local.ip()),
            destination_port: self.port,
            sni: self.sni.as_deref(),
            peer: self.peer.as_ref().map(|p| p.id.as_str()),
            http: None,
        };
        let decision = policy.evaluate(&req, Protocol::Tcp, now_unix(), &mut |_, _| None);
        drop(policy);
        match &decision {
            Ok(d) => {
                let allowed = d.outcome == Outcome::Allow;
                // An open connection that stays allowed is not news; a closed one is.
                if !recheck || !allowed {
                    self.log_tcp(
                        event,
                        d.outcome.as_str(),
                        d.deciding.as_ref().map(|m| m.envoy_id()),
                        &d.reason,
                    );
                }
                allowed
            }
            Err(e) => {
                self.log_tcp(
                    event,
                    Outcome::Reset.as_str(),
                    Some(e.rule.clone()),
                    &format!("{e}; Warden has no ext_authz client yet, so it fails closed"),
                );
                false
            }
        }
    }

    fn log_tcp(&self, event: &str, outcome: &str, policy: Option<String>, reason: &str) {
        tracing::info!(
            target: "warden::decision",
            port = self.port,
            source = %self.source,
            peer = self.peer.as_ref().map(|p| p.id.as_str()).unwrap_or("-"),
            protocol = "tcp",
            outcome,
            policy = policy.as_deref().unwrap_or("-"),
            reason,
            "{event}"
        );
    }

    async fn handle_request(&self, req: HttpReq<Incoming>) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let target = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(parts.headers.len());
        for (name, value) in &parts.headers {
            if name == header::HOST {
                continue;
            }
            // The engine matches strings; a value that is not UTF-8 cannot be matched
            // faithfully, so it is refused rather than guessed at.
            let Ok(v) = std::str::from_utf8(value.as_bytes()) else {
                return local_reply(StatusCode::BAD_REQUEST, "Bad Request", &[]);
            };
            headers.push((name.as_str(), v));
        }
        let policy = self.proxy.policy.load();
        let ereq = Request {
            source_ip: Some(self.source.ip()),
            destination_ip: Some(self.local.ip()),
            destination_port: self.port,
            sni: self.sni.as_deref(),
            peer: self.peer.as_ref().map(|p| p.id.as_str()),
            http: Some(HttpRequest {
                method: parts.method.as_str(),
                authority: &authority,
                target,
                headers: &headers,
            }),
        };
        let decision = policy.evaluate(&ereq, Protocol::Http, now_unix(), &mut |_, _| None);
        drop(policy);
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                // CUSTOM: Warden has no ext_authz client yet. An unanswered provider is an
                // error, and errors fail closed.
                self.log_http(
                    &parts.method,
                    &authority,
                    target,
                    "deny",
                    Some(403),
                    Some(e.rule.clone()),
                    &format!("{e}; Warden has no ext_authz client yet, so it fails closed"),
                );
                return local_reply(StatusCode::FORBIDDEN, RBAC_DENIED_BODY, &[]);
            }
        };
        self.log_http(
            &parts.method,
            &authority,
            decision.path.as_deref().unwrap_or(target),
            decision.outcome.as_str(),
            decision.status,
            decision.deciding.as_ref().map(|m| m.envoy_id()),
            &decision.reason,
        );
        match decision.outcome {
            Outcome::Allow => {}
            Outcome::Unauthenticated => {
                let realm = format!(
                    "Bearer realm=\"http://{authority}{}\", error=\"invalid_token\"",
                    decision.path.as_deref().unwrap_or("/")
                );
                return local_reply(
                    status_of(&decision, StatusCode::UNAUTHORIZED),
                    &decision.body,
                    &[(header::WWW_AUTHENTICATE, realm)],
                );
            }
            Outcome::Deny | Outcome::BadRequest => {
                return local_reply(
                    status_of(&decision, StatusCode::FORBIDDEN),
                    &decision.body,
                    &[],
                );
            }
            // The engine resets only TCP connections; for HTTP, deny.
            Outcome::Reset => {
                return local_reply(StatusCode::FORBIDDEN, RBAC_DENIED_BODY, &[]);
            }
        }
        match self.forward(parts, body, &authority, &decision).await {
            Ok(resp) => resp,
            Err(reply) => reply,
        }
    }

    /// Sends an allowed request to the app and streams its response back.
    async fn forward(
        &self,
        parts: hyper::http::request::Parts,
        body: Incoming,
        authority: &str,
        decision: &Decision,
    ) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
        let path = decision.path.as_deref().unwrap_or("/");
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let uri: hyper::Uri = format!("http://{}{path_and_query}", self.settings.app)
            .parse()
            .map_err(|_| local_reply(StatusCode::BAD_REQUEST, "Bad Request", &[]))?;
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        if !headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(authority) {
                headers.insert(header::HOST, v);
            }
        }
        for name in &decision.header_edits.remove {
            headers.remove(name.as_str());
        }
        for (name, value) in &decision.header_edits.set {
            // JWT outputs the app may rely on: if one cannot be written, do not forward
            // without it.
            let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) else {
                tracing::warn!(header = %name, "JWT output header cannot be written; refusing the request");
                return Err(local_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal Server Error",
                    &[],
                ));
            };
            headers.insert(n, v);
        }
        // Sanitize, then set: only this proxy vouches for the client certificate.
        headers.remove(XFCC);
        if let Some(peer) = &self.peer {
            let xfcc = format!(
                "By={};Hash={};URI={}",
                self.proxy.own_id(),
                peer.leaf_hash,
                peer.id
            );
            if let Ok(v) = HeaderValue::from_str(&xfcc) {
                headers.insert(XFCC, v);
            }
        }
        let mut out = HttpReq::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.version_mut() = Version::HTTP_11;
        *out.headers_mut() = headers;
        match self.proxy.client.request(out).await {
            Ok(resp) => {
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                rparts.version = Version::default();
                Ok(Response::from_parts(rparts, rbody.boxed()))
            }
            Err(e) => {
                tracing::warn!(port = self.port, app = %self.settings.app, error = %e, "upstream request failed");
                Err(local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                    &[],
                ))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn log_http(
        &self,
        method: &hyper::Method,
        authority: &str,
        path: &str,
        outcome: &str,
        status: Option<u16>,
        policy: Option<String>,
        reason: &str,
    ) {
        tracing::info!(
            target: "warden::decision",
            port = self.port,
            source = %self.source,
            peer = self.peer.as_ref().map(|p| p.id.as_str()).unwrap_or("-"),
            protocol = "http",
            method = method.as_str(),
            authority,
            path,
            outcome,
            status = status.unwrap_or(0),
            policy = policy.as_deref().unwrap_or("-"),
            reason,
            "http request"
        );
    }
}

/// Accepts connections for one container port.
pub struct InboundListener {
    proxy: Arc<InboundProxy>,
    port: u16,
    listener: TcpListener,
}

impl InboundListener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the task is dropped, one task per connection.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let proxy = self.proxy.clone();
                    let port = self.port;
                    tokio::spawn(async move {
                        match proxy.serve_connection(port, stream).await {
                            Ok(()) => {}
                            // Refused identities are security events: say why at info.
                            Err(e @ (ProxyError::Handshake(_) | ProxyError::NoPeerIdentity)) => {
                                tracing::info!(port, error = %e, "connection refused")
                            }
                            Err(e) => tracing::debug!(port, error = %e, "connection closed"),
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(port = self.port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Why a connection may not use a port in `mode`, if it may not.
fn mode_refusal(mode: MtlsMode, tls: bool) -> Option<&'static str> {
    match (mode, tls) {
        (MtlsMode::Strict, false) => Some("plaintext connection to a STRICT port"),
        (MtlsMode::Disable, true) => Some("TLS connection to a DISABLE port"),
        _ => None,
    }
}

fn status_of(d: &Decision, default: StatusCode) -> StatusCode {
    d.status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(default)
}

fn local_reply(
    status: StatusCode,
    body: &str,
    extra: &[(HeaderName, String)],
) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(name.clone(), v);
        }
    }
    resp
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(*n);
    }
}

fn sha256_hex(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
