//! Inbound enforcement for one workload: a listener per container port that tells mTLS from
//! plaintext, applies the port's PeerAuthentication mode, serves HTTP/1.1, HTTP/2 or opaque
//! TCP, asks the policy engine about every request or connection, and forwards what it allows
//! to the app with Istio's `x-forwarded-client-cert`. Also owns applying a new configuration
//! ([`InboundProxy::apply`]): new requests see it at once, and every open TCP connection is
//! decided again against it and closed when no longer allowed (as ztunnel does).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request as HttpReq, Response, StatusCode, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use warden_identity::tls::{peer_spiffe_id, server_config, IdentityState, ALPN_H2, ALPN_HTTP_1_1};
use warden_policy::authz::Protocol;
use warden_policy::engine::{
    Decision, ExtAuthzAnswer, HttpRequest, Outcome, Request, Step, WorkloadPolicy, RBAC_DENIED_BODY,
};
use warden_policy::model::MtlsMode;

use crate::error::ProxyError;
use crate::ext_authz::{CheckRequest, CheckResult, ExtAuthzClient, HttpCheck};
use crate::idle::{Activity, Tracked, DEFAULT_IDLE_TIMEOUT};
use crate::observe::{
    ConnectionInfo, DecisionSummary, Observer, Reporter, RequestInfo, RequestProtocol,
    ResponseFlag, ResponseFlags, TcpInfo, UNKNOWN,
};
use crate::ports::{InboundPort, PortProtocol, PortSettings};
use crate::sniff::{is_http, is_tls, read_until, Rewind, MAX_SNIFF};
use crate::xfcc::{self, PeerCert};

/// Body of every response the proxy sends: the app's, streamed, or a local reply.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send its first bytes (protocol detection) before the
/// connection is closed.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers (HTTP/1).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a request's headers may take, request line included (Envoy's default
/// `max_request_headers_kb`: 60 KiB); larger requests get 431 and are never forwarded.
pub const MAX_REQUEST_HEADERS: usize = 60 * 1024;
/// How long connecting to the app may take for a TCP connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    client: Client<HttpConnector, ProxyBody>,
    /// To apps on ports declared HTTP/2 (and sniffed ports whose client spoke HTTP/2): h2c.
    h2_client: Client<HttpConnector, ProxyBody>,
    detect_timeout: Duration,
    handshake_timeout: Duration,
    header_read_timeout: Duration,
    /// How long a downstream connection may stay without a byte either way.
    idle_timeout: Duration,
    /// Where every request and connection is reported (metrics, access log).
    observer: Arc<Observer>,
    /// This workload's name and namespace, for the reports.
    workload: (String, String),
    /// Asks CUSTOM providers.
    ext_authz: ExtAuthzClient,
    /// Source address of connections to the app (see [`InboundProxy::with_upstream_bind`]).
    upstream_bind: Option<std::net::IpAddr>,
    /// Test-only clock ([`InboundProxy::with_fixed_clock`]); `None` reads the system clock.
    fixed_now: Option<i64>,
}

/// Test-only: the addresses a listener's connections present to the policy engine (and the
/// reports) instead of those the kernel gives, so that `warden test --live` can replay a
/// case's `sourceIP` or `destinationIP` on loopback. `warden proxy` never sets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Presented {
    pub source_ip: Option<std::net::IpAddr>,
    pub destination_ip: Option<std::net::IpAddr>,
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
    /// What the observer is told about this connection (filled once the peer is known).
    info: Arc<ConnectionInfo>,
    start: SystemTime,
    started: Instant,
}

struct Peer {
    id: String,
    /// What `x-forwarded-client-cert` says about the peer's leaf.
    cert: PeerCert,
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
        let client = Client::builder(TokioExecutor::new()).build(app_connector(None));
        let h2_client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(app_connector(None));
        let apps = ports.iter().map(|(p, s)| (*p, s.app)).collect();
        InboundProxy {
            policy,
            identity,
            tls,
            ports: ArcSwap::from_pointee(ports),
            apps,
            generation: watch::Sender::new(0),
            client,
            h2_client,
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            observer: Arc::new(Observer::new(None)),
            workload: (UNKNOWN.to_string(), UNKNOWN.to_string()),
            ext_authz: ExtAuthzClient::default(),
            upstream_bind: None,
            fixed_now: None,
        }
    }

    /// Dials these addresses for the named CUSTOM providers instead of their `service:port`
    /// (mesh hostnames do not resolve in explicit mode).
    pub fn with_ext_authz_addrs(mut self, addrs: BTreeMap<String, SocketAddr>) -> Self {
        self.ext_authz = ExtAuthzClient::new(addrs);
        self
    }

    /// Connects to the app from `ip` (port chosen by the kernel). Transparent capture needs
    /// it: Istio's iptables rules let connections from 127.0.0.6 to the pod IP through
    /// instead of capturing them again.
    pub fn with_upstream_bind(mut self, ip: std::net::IpAddr) -> Self {
        let connector = app_connector(Some(ip));
        self.client = Client::builder(TokioExecutor::new()).build(connector.clone());
        self.h2_client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        self.upstream_bind = Some(ip);
        self
    }

    /// Test-only: the policy engine sees `now_unix` (Unix seconds) as the time of every
    /// request, for JWT `exp`/`nbf`, instead of the system clock; certificates are still
    /// checked against the system clock. For `warden test --live` replaying a file's `now:`;
    /// `warden proxy` never sets it.
    pub fn with_fixed_clock(mut self, now_unix: i64) -> Self {
        self.fixed_now = Some(now_unix);
        self
    }

    fn now(&self) -> i64 {
        self.fixed_now.unwrap_or_else(now_unix)
    }

    /// Reports every request and connection to `observer` (by default, metrics no one reads
    /// and no access log).
    pub fn with_observer(mut self, observer: Arc<Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Names the workload in reports (`destination_workload`, `destination_workload_namespace`).
    pub fn with_workload(mut self, namespace: &str, name: &str) -> Self {
        self.workload = (namespace.to_string(), name.to_string());
        self
    }

    /// Where this proxy reports.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    /// Changes how long a client may take to send its first bytes.
    pub fn with_detect_timeout(mut self, t: Duration) -> Self {
        self.detect_timeout = t;
        self
    }

    /// Changes how long a client may take to send an HTTP/1 request's headers.
    pub fn with_header_read_timeout(mut self, t: Duration) -> Self {
        self.header_read_timeout = t;
        self
    }

    /// Changes how long a connection may stay idle (no byte either way) before it is closed
    /// (default: Envoy's 1 hour).
    pub fn with_idle_timeout(mut self, t: Duration) -> Self {
        self.idle_timeout = t;
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
            presented: Presented::default(),
        })
    }

    /// Handles one accepted connection to container `port` until it ends.
    pub async fn serve_connection(
        self: Arc<Self>,
        port: u16,
        stream: TcpStream,
    ) -> Result<(), ProxyError> {
        self.serve_connection_presenting(port, stream, Presented::default())
            .await
    }

    /// [`InboundProxy::serve_connection`], the connection presenting `presented` addresses
    /// (test-only, see [`Presented`]).
    pub async fn serve_connection_presenting(
        self: Arc<Self>,
        port: u16,
        stream: TcpStream,
        presented: Presented,
    ) -> Result<(), ProxyError> {
        let settings = *self
            .ports
            .load()
            .get(&port)
            .ok_or(ProxyError::UnknownPort(port))?;
        // Small HTTP/2 frames and request/response exchanges must not wait for the peer's
        // delayed ACK (Nagle): measured at ~10 ms added per request on a multiplexed hop.
        let _ = stream.set_nodelay(true);
        let mut source = stream.peer_addr()?;
        let mut local = stream.local_addr()?;
        if let Some(ip) = presented.source_ip {
            source.set_ip(ip);
        }
        if let Some(ip) = presented.destination_ip {
            local.set_ip(ip);
        }
        let start = SystemTime::now();
        let started = Instant::now();
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
        let info = ConnectionInfo {
            source_principal: None,
            source_workload: None,
            source_addr: source,
            destination_workload: self.workload.1.clone(),
            destination_namespace: self.workload.0.clone(),
            destination_principal: None,
            destination_port: port,
            mtls: false,
            reporter: Reporter::Destination,
        };
        if let Some(why) = mode_refusal(settings.mode, tls) {
            self.report_refused(&info, start, started, first.len() as u64, why);
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
            info: Arc::new(info),
            start,
            started,
        };
        let sniffed = first.len() as u64;
        let stream = Rewind::new(first, stream);
        if !tls {
            return ctx.dispatch(stream, None, deadline).await;
        }
        let accepted = match timeout(
            self.handshake_timeout,
            TlsAcceptor::from(self.tls.clone()).accept(stream),
        )
        .await
        {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let why = format!("TLS handshake failed: {e}");
                self.report_refused(&ctx.info, start, started, sniffed, &why);
                return Err(ProxyError::Handshake(e));
            }
            Err(_) => {
                let e = ProxyError::HandshakeTimeout(self.handshake_timeout);
                self.report_refused(&ctx.info, start, started, sniffed, &e.to_string());
                return Err(e);
            }
        };
        let (_, conn) = accepted.get_ref();
        // The server config requires a verified client certificate, so a missing identity
        // here means something is wrong: refuse rather than treat the peer as anonymous.
        let peer_leaf = peer_spiffe_id(conn).and_then(|id| {
            conn.peer_certificates()
                .and_then(|c| c.first())
                .map(|leaf| (id, leaf))
        });
        let Some((id, leaf)) = peer_leaf else {
            let e = ProxyError::NoPeerIdentity;
            self.report_refused(&ctx.info, start, started, sniffed, &e.to_string());
            return Err(e);
        };
        ctx.peer = Some(Peer {
            id: id.to_string(),
            cert: PeerCert::from_der(leaf.as_ref()),
        });
        ctx.sni = conn.server_name().map(str::to_string);
        let mut info = (*ctx.info).clone();
        info.source_principal = Some(id.to_string());
        info.destination_principal = Some(self.own_id()).filter(|s| !s.is_empty());
        info.mtls = true;
        ctx.info = Arc::new(info);
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        // Detection over TLS gets its own window, starting after the handshake.
        let deadline = Instant::now() + self.detect_timeout;
        ctx.dispatch(accepted, alpn, deadline).await
    }

    /// Reports a connection refused before the engine was asked, as a TCP connection opened
    /// and closed with a local `reset` decision.
    fn report_refused(
        &self,
        info: &ConnectionInfo,
        start: SystemTime,
        started: Instant,
        received: u64,
        why: &str,
    ) {
        self.observer.on_tcp_open(info);
        self.observer.on_tcp_close(
            &TcpInfo {
                conn: info,
                start,
                response_flags: ResponseFlags::NONE,
                bytes_received: received,
                bytes_sent: 0,
                duration: started.elapsed(),
            },
            &DecisionSummary::local(Outcome::Reset.as_str(), why),
        );
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
            PortProtocol::Http | PortProtocol::Http2 => true,
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
        // A client gets a bounded time to send each request's headers (slow-header attacks),
        // and bounded room for them (Envoy's 60 KiB; hyper's own default is ~400 KiB).
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(ctx.proxy.header_read_timeout)
            .max_buf_size(MAX_REQUEST_HEADERS);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_REQUEST_HEADERS as u32);
        builder = match alpn.as_deref() {
            Some(ALPN_H2) => builder.http2_only(),
            Some(ALPN_HTTP_1_1) => builder.http1_only(),
            // Plaintext, or mesh ALPN values that do not name the HTTP version: the preface
            // tells.
            _ => builder,
        };
        let idle = ctx.proxy.idle_timeout;
        let service = hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(ctx.handle_request(req).await) }
        });
        let activity = Activity::new();
        let stream = Tracked::new(stream, activity.clone());
        tokio::select! {
            served = builder.serve_connection(TokioIo::new(stream), service) => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            }
            _ = activity.idle_for(idle) => {
                tracing::debug!(timeout = ?idle, "HTTP connection idle; closed");
            }
        }
        Ok(())
    }

    async fn serve_tcp<S>(self, stream: S) -> Result<(), ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let observer = self.proxy.observer.clone();
        observer.on_tcp_open(&self.info);
        let activity = Activity::new();
        let mut stream = Counted::new(Tracked::new(stream, activity.clone()));
        let mut flags = ResponseFlags::NONE;
        let (summary, result) = self.relay_tcp(&mut stream, &mut flags, &activity).await;
        observer.on_tcp_close(
            &TcpInfo {
                conn: &self.info,
                start: self.start,
                response_flags: flags,
                bytes_received: stream.read,
                bytes_sent: stream.written,
                duration: self.started.elapsed(),
            },
            &summary,
        );
        result
    }

    /// Decides, connects and copies until either side closes or a new configuration no longer
    /// allows the connection. Returns the decision that stands at the end.
    async fn relay_tcp<S>(
        &self,
        stream: &mut S,
        flags: &mut ResponseFlags,
        activity: &Activity,
    ) -> (DecisionSummary, Result<(), ProxyError>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // Subscribe before deciding: a configuration applied from here on is seen below, so
        // no change can slip between the decision and the watch.
        let mut changes = self.proxy.generation.subscribe();
        changes.borrow_and_update();
        let mut answers = BTreeMap::new();
        let (allowed, summary) = self.decide_tcp(false, &mut answers).await;
        if !allowed {
            return (summary, Ok(()));
        }
        let app = self.settings.app;
        let connect = connect_from(self.proxy.upstream_bind, app);
        let mut upstream = match timeout(UPSTREAM_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(u)) => u,
            Ok(Err(source)) => {
                *flags = flags.with(ResponseFlag::UpstreamConnectionFailure);
                return (summary, Err(ProxyError::Upstream { addr: app, source }));
            }
            Err(_) => {
                *flags = flags.with(ResponseFlag::UpstreamConnectionFailure);
                let source = std::io::ErrorKind::TimedOut.into();
                return (summary, Err(ProxyError::Upstream { addr: app, source }));
            }
        };
        let copy = tokio::io::copy_bidirectional(stream, &mut upstream);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                done = &mut copy => {
                    return (summary, done.map(|_| ()).map_err(ProxyError::from));
                }
                _ = activity.idle_for(self.proxy.idle_timeout) => {
                    tracing::debug!(timeout = ?self.proxy.idle_timeout, "TCP connection idle; closed");
                    return (summary, Ok(()));
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The proxy is going away; nothing will change any more.
                        let done = (&mut copy).await;
                        return (summary, done.map(|_| ()).map_err(ProxyError::from));
                    }
                    changes.borrow_and_update();
                    let (allowed, again) = self.decide_tcp(true, &mut answers).await;
                    if !allowed {
                        // Dropping both streams closes them.
                        return (again, Ok(()));
                    }
                }
            }
        }
    }

    /// Decides this TCP connection against the current configuration and logs the decision;
    /// true when it may (still) pass. `recheck` marks a decision taken again for an open
    /// connection after a configuration change.
    async fn decide_tcp(
        &self,
        recheck: bool,
        answers: &mut BTreeMap<String, ExtAuthzAnswer>,
    ) -> (bool, DecisionSummary) {
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
                return (false, DecisionSummary::local(Outcome::Reset.as_str(), why));
            }
        }
        let req = Request {
            source_ip: Some(self.source.ip()),
            destination_ip: Some(self.local.ip()),
            destination_port: self.port,
            sni: self.sni.as_deref(),
            peer: self.peer.as_ref().map(|p| p.id.as_str()),
            http: None,
        };
        // Network ext_authz (gRPC providers): asked once per connection and provider; a
        // re-check reuses the answer, as Envoy's network filter checks only at connect.
        let decision = loop {
            let policy = self.proxy.policy.load_full();
            let r = policy.evaluate(&req, Protocol::Tcp, self.proxy.now(), &mut |p, _| {
                answers.get(p).copied()
            });
            let e = match r {
                Err(e) if !answers.contains_key(&e.provider) => e,
                other => break other,
            };
            let Some((kind, settings)) = policy
                .ext_authz_provider(&e.provider)
                .map(|(k, s)| (k, s.clone()))
            else {
                break Err(e);
            };
            drop(policy);
            let own_id = self.proxy.own_id();
            let check = CheckRequest {
                http: None,
                source: self.source,
                source_principal: self.peer.as_ref().map(|p| p.id.as_str()),
                destination: self.local,
                destination_principal: self.peer.as_ref().map(|_| own_id.as_str()),
                sni: self.sni.as_deref(),
            };
            let result = self
                .proxy
                .ext_authz
                .check(&e.provider, kind, &settings, &check)
                .await;
            if let Some(why) = &result.error {
                tracing::warn!(target: "warden::decision", provider = %e.provider, "ext_authz call failed: {why}");
            }
            answers.insert(e.provider, result.answer);
        };
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
                (allowed, DecisionSummary::from(d))
            }
            Err(e) => {
                let why = format!("{e}; the provider is not an ext_authz provider of the mesh config, so the connection fails closed");
                self.log_tcp(event, Outcome::Reset.as_str(), Some(e.rule.clone()), &why);
                (false, DecisionSummary::local(Outcome::Reset.as_str(), why))
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

    /// Serves one request and wraps the response's body so the request is reported to the
    /// observer once the response has been sent (or abandoned).
    async fn handle_request(&self, req: HttpReq<Incoming>) -> Response<ProxyBody> {
        let start = SystemTime::now();
        let started = Instant::now();
        let received = Arc::new(AtomicU64::new(0));
        let (parts, body) = req.into_parts();
        let body = Counting {
            inner: body,
            count: received.clone(),
        }
        .boxed();
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let method = parts.method.as_str().to_string();
        let handled = self.respond(parts, body).await;
        let (rparts, rbody) = handled.response.into_parts();
        let report = PendingReport {
            observer: self.proxy.observer.clone(),
            conn: self.info.clone(),
            start,
            started,
            protocol: if grpc {
                RequestProtocol::Grpc
            } else {
                RequestProtocol::Http
            },
            method,
            authority: handled.authority,
            path: handled.path,
            status: rparts.status.as_u16(),
            flags: handled.flags,
            received,
            summary: handled.summary,
        };
        let body = Reported {
            inner: rbody,
            sent: 0,
            done: false,
            report: Some(report),
        };
        Response::from_parts(rparts, body.boxed())
    }

    /// Decides one request and, when allowed, forwards it: the response with what the observer
    /// needs to know about it.
    async fn respond(&self, parts: hyper::http::request::Parts, body: ProxyBody) -> Handled {
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
        let target = request_target(&parts.uri);
        let target = target.as_ref();
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(parts.headers.len());
        for (name, value) in &parts.headers {
            if name == header::HOST {
                continue;
            }
            // The engine matches strings; a value that is not UTF-8 cannot be matched
            // faithfully, so it is refused rather than guessed at.
            let Ok(v) = std::str::from_utf8(value.as_bytes()) else {
                return Handled {
                    response: local_reply(StatusCode::BAD_REQUEST, "Bad Request", &[]),
                    summary: DecisionSummary::local(
                        Outcome::BadRequest.as_str(),
                        format!("header {name} is not UTF-8"),
                    ),
                    flags: ResponseFlag::DownstreamProtocolError.into(),
                    authority,
                    path: target.to_string(),
                };
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
        // CUSTOM: the engine says which provider it needs; ask it, then decide again with the
        // answer (at most once per provider, so a misbehaving engine cannot loop).
        let mut answers: BTreeMap<String, CheckResult> = BTreeMap::new();
        let decision = loop {
            let r = policy.evaluate(&ereq, Protocol::Http, self.proxy.now(), &mut |p, _| {
                answers.get(p).map(|c| c.answer)
            });
            let e = match r {
                Err(e) if !answers.contains_key(&e.provider) => e,
                other => break other,
            };
            let Some((kind, settings)) = policy
                .ext_authz_provider(&e.provider)
                .map(|(k, s)| (k, s.clone()))
            else {
                break Err(e);
            };
            let path = policy
                .filter_target(target)
                .unwrap_or_else(|| target.to_string());
            let own_id = self.proxy.own_id();
            let check = CheckRequest {
                http: Some(HttpCheck {
                    method: parts.method.as_str(),
                    authority: &authority,
                    path: &path,
                    headers: &headers,
                    protocol: if parts.version == Version::HTTP_2 {
                        "HTTP/2"
                    } else {
                        "HTTP/1.1"
                    },
                }),
                source: self.source,
                source_principal: self.peer.as_ref().map(|p| p.id.as_str()),
                destination: self.local,
                destination_principal: self.peer.as_ref().map(|_| own_id.as_str()),
                sni: self.sni.as_deref(),
            };
            let result = self
                .proxy
                .ext_authz
                .check(&e.provider, kind, &settings, &check)
                .await;
            if let Some(why) = &result.error {
                tracing::warn!(target: "warden::decision", provider = %e.provider, "ext_authz call failed: {why}");
            }
            answers.insert(e.provider, result);
        };
        drop(policy);
        let mut decision = match decision {
            Ok(d) => d,
            Err(e) => {
                // A provider the mesh config does not describe: fail closed.
                let why = format!("{e}; the provider is not an ext_authz provider of the mesh config, so the request fails closed");
                self.log_http(
                    &parts.method,
                    &authority,
                    target,
                    "deny",
                    Some(403),
                    Some(e.rule.clone()),
                    &why,
                );
                return Handled {
                    response: local_reply(StatusCode::FORBIDDEN, RBAC_DENIED_BODY, &[]),
                    summary: DecisionSummary::local(Outcome::Deny.as_str(), why),
                    flags: ResponseFlag::UnauthorizedExternalService.into(),
                    path: target.to_string(),
                    authority,
                };
            }
        };
        let summary = DecisionSummary::from(&decision);
        let flags = ResponseFlags::for_decision(&summary);
        let path = decision.path.clone().unwrap_or_else(|| target.to_string());
        let done = |response, flags| Handled {
            response,
            summary: summary.clone(),
            flags,
            authority: authority.clone(),
            path: path.clone(),
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
                return done(
                    local_reply(
                        status_of(&decision, StatusCode::UNAUTHORIZED),
                        &decision.body,
                        &[(header::WWW_AUTHENTICATE, realm)],
                    ),
                    flags,
                );
            }
            Outcome::Deny | Outcome::BadRequest => {
                // A provider's own denial reaches the client as the provider wrote it.
                let denial = (decision.step == Step::Custom)
                    .then_some(decision.custom.as_ref())
                    .flatten()
                    .and_then(|c| answers.get(&c.provider))
                    .and_then(|r| r.denial.clone());
                if let Some((status, headers, body)) = denial {
                    return done(provider_reply(status, headers, body), flags);
                }
                return done(
                    local_reply(
                        status_of(&decision, StatusCode::FORBIDDEN),
                        &decision.body,
                        &[],
                    ),
                    flags,
                );
            }
            // The engine resets only TCP connections; for HTTP, deny.
            Outcome::Reset => {
                return done(
                    local_reply(StatusCode::FORBIDDEN, RBAC_DENIED_BODY, &[]),
                    flags,
                );
            }
        }
        // Allowed: what CUSTOM providers asked to pass on, to the app and to the client.
        let mut to_client = Vec::new();
        for r in answers.values() {
            decision
                .header_edits
                .remove
                .extend(r.remove.iter().map(|n| n.as_str().to_string()));
            for (n, v) in &r.upstream {
                if let Ok(v) = v.to_str() {
                    decision
                        .header_edits
                        .set
                        .push((n.as_str().to_string(), v.to_string()));
                }
            }
            to_client.extend(r.downstream.iter().cloned());
        }
        match self.forward(parts, body, &authority, &decision).await {
            Ok(mut resp) => {
                for (n, v) in to_client {
                    resp.headers_mut().append(n, v);
                }
                done(resp, flags)
            }
            Err((reply, more)) => done(reply, flags.union(more)),
        }
    }

    /// Sends an allowed request to the app and streams its response back.
    async fn forward(
        &self,
        parts: hyper::http::request::Parts,
        body: ProxyBody,
        authority: &str,
        decision: &Decision,
    ) -> Result<Response<ProxyBody>, (Response<ProxyBody>, ResponseFlags)> {
        let path = decision.path.as_deref().unwrap_or("/");
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let uri: hyper::Uri = format!("http://{}{path_and_query}", self.settings.app)
            .parse()
            .map_err(|_| {
                (
                    local_reply(StatusCode::BAD_REQUEST, "Bad Request", &[]),
                    ResponseFlag::DownstreamProtocolError.into(),
                )
            })?;
        // Istio's inbound cluster speaks HTTP/2 to the app on ports declared HTTP/2, and the
        // client's protocol on sniffed ports; HTTP/1.1 otherwise.
        let h2 = match self.settings.protocol {
            PortProtocol::Http2 => true,
            PortProtocol::Detect => parts.version == Version::HTTP_2,
            PortProtocol::Http | PortProtocol::Tcp => false,
        };
        let mut headers = parts.headers;
        // gRPC needs `te: trailers` end to end; it is the one `te` HTTP/2 allows.
        let te_trailers = h2
            && headers
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        strip_hop_by_hop(&mut headers);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
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
                return Err((
                    local_reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Internal Server Error",
                        &[],
                    ),
                    ResponseFlags::NONE,
                ));
            };
            headers.insert(n, v);
        }
        xfcc::append_forward(
            &mut headers,
            &self.proxy.own_id(),
            self.peer.as_ref().map(|p| &p.cert),
        );
        let mut out = HttpReq::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.version_mut() = if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *out.headers_mut() = headers;
        let client = if h2 {
            &self.proxy.h2_client
        } else {
            &self.proxy.client
        };
        match client.request(out).await {
            Ok(resp) => {
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                rparts.version = Version::default();
                Ok(Response::from_parts(rparts, rbody.boxed()))
            }
            Err(e) => {
                tracing::warn!(port = self.port, app = %self.settings.app, error = %e, "upstream request failed");
                Err((
                    local_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers",
                        &[],
                    ),
                    ResponseFlag::UpstreamConnectionFailure.into(),
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
    presented: Presented,
}

impl InboundListener {
    /// Test-only: every connection accepted here presents these addresses (see [`Presented`]).
    pub fn presenting(mut self, presented: Presented) -> Self {
        self.presented = presented;
        self
    }

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
                    let presented = self.presented;
                    tokio::spawn(async move {
                        match proxy
                            .serve_connection_presenting(port, stream, presented)
                            .await
                        {
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

/// The connector to apps: no Nagle delay, and from `bind` when given.
fn app_connector(bind: Option<std::net::IpAddr>) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_local_address(bind);
    connector
}

/// Connects to `addr`, from `bind` when given, without Nagle delay.
async fn connect_from(
    bind: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    let stream = match bind {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
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

/// The request target as the client sent it. hyper reads an HTTP/1 target without a leading
/// `/` (`GET public`) as authority-form and would report the path `/`; Envoy's path checks
/// see `public` and refuse it (404), so the raw text is what the engine must be given.
pub(crate) fn request_target(uri: &hyper::Uri) -> std::borrow::Cow<'_, str> {
    match (uri.scheme(), uri.path_and_query(), uri.authority()) {
        (None, None, Some(authority)) => std::borrow::Cow::Borrowed(authority.as_str()),
        (_, Some(pq), _) => std::borrow::Cow::Borrowed(pq.as_str()),
        _ => std::borrow::Cow::Borrowed("/"),
    }
}

/// A CUSTOM provider's denial, passed to the client as it was written.
fn provider_reply(
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    for (n, v) in headers {
        resp.headers_mut().append(n, v);
    }
    resp
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

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One request's response, with what the observer is told about it.
struct Handled {
    response: Response<ProxyBody>,
    summary: DecisionSummary,
    flags: ResponseFlags,
    authority: String,
    /// The path as authorization saw it.
    path: String,
}

/// A request body that counts the bytes the client sent.
pub(crate) struct Counting<B> {
    pub(crate) inner: B,
    pub(crate) count: Arc<AtomicU64>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counting<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Everything needed to report a request once its response is over.
pub(crate) struct PendingReport {
    pub(crate) observer: Arc<Observer>,
    pub(crate) conn: Arc<ConnectionInfo>,
    pub(crate) start: SystemTime,
    pub(crate) started: Instant,
    pub(crate) protocol: RequestProtocol,
    pub(crate) method: String,
    pub(crate) authority: String,
    pub(crate) path: String,
    pub(crate) status: u16,
    pub(crate) flags: ResponseFlags,
    pub(crate) received: Arc<AtomicU64>,
    pub(crate) summary: DecisionSummary,
}

/// A response body that counts what is sent and reports the request when it is dropped —
/// after the last byte, or earlier when the client goes away (`DC`).
pub(crate) struct Reported {
    pub(crate) inner: ProxyBody,
    pub(crate) sent: u64,
    pub(crate) done: bool,
    pub(crate) report: Option<PendingReport>,
}

impl Body for Reported {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(r) = self.report.as_mut() {
                    r.flags = r.flags.with(ResponseFlag::UpstreamConnectionTermination);
                }
                self.done = true;
            }
            Poll::Ready(None) => self.done = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        let Some(r) = self.report.take() else { return };
        let mut flags = r.flags;
        if !self.done && !self.inner.is_end_stream() {
            flags = flags.with(ResponseFlag::DownstreamConnectionTermination);
        }
        r.observer.on_request(
            &RequestInfo {
                conn: &r.conn,
                start: r.start,
                protocol: r.protocol,
                method: &r.method,
                authority: &r.authority,
                path: &r.path,
                status: r.status,
                response_flags: flags,
                bytes_received: r.received.load(Ordering::Relaxed),
                bytes_sent: self.sent,
                duration: r.started.elapsed(),
            },
            &r.summary,
        );
    }
}

/// A stream that counts the bytes read from and written to it.
struct Counted<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.read += (buf.filled().len() - before) as u64;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
