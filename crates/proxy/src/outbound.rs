//! Outbound traffic of one workload in explicit mode: a listener per destination on a local
//! address the app calls, which originates mTLS with the workload's SVID and checks that the
//! server presents the identity expected for that destination (secure naming), or passes
//! plaintext through when the route says so. Opaque TCP is copied both ways; HTTP/1.1 and h2c
//! from the app are forwarded request by request over pooled upstream connections (HTTP/2 when
//! the upstream's ALPN offers it, else HTTP/1.1), and an upstream that cannot be reached or
//! does not complete the handshake gets Envoy's 503.
//!
//! Whether a destination gets mTLS (Istio's auto mTLS) is decided by whoever builds the
//! [`Destination`]; this module only carries it out.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;
use warden_identity::spiffe::SpiffeId;
use warden_identity::tls::{
    client_config, client_config_with_alpn, ExpectedPeer, IdentityState, SpiffeTlsError, ALPN_H2,
    ALPN_HTTP_1_1,
};

use warden_policy::config::{Config, Workload};
use warden_policy::model::MtlsMode;

use crate::inbound::{Counting, PendingReport, ProxyBody, Reported, HEADER_READ_TIMEOUT};
use crate::observe::{
    ConnectionInfo, DecisionSummary, Observer, Reporter, RequestProtocol, ResponseFlag,
    ResponseFlags, TcpInfo, UNKNOWN,
};
use crate::ports::{port_table, PortProtocol};

/// How long connecting to the upstream may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the mTLS handshake with the upstream may take.
pub const UPSTREAM_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 upstream connections kept per destination.
const MAX_IDLE_H1: usize = 32;

/// Envoy's local reply when no upstream connection could be made or it failed before the
/// response headers.
pub const UPSTREAM_FAILURE_BODY: &str = "upstream connect error or disconnect/reset before headers";

/// ALPN for HTTP routes: the HTTP version is what the pool needs to know.
const HTTP_ALPN: &[&[u8]] = &[ALPN_H2, ALPN_HTTP_1_1];

/// Same list as the inbound side (RFC 9110 §7.6.1 plus `te`, `proxy-connection`).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

/// How the proxy talks to a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Originate mTLS with the workload's SVID; the server must present this identity.
    /// Secure naming needs an identity, so there is no mTLS without one.
    Mtls(SpiffeId),
    /// Plain TCP: the destination has no sidecar or its port is DISABLE (auto mTLS).
    Plaintext,
}

/// What the app speaks to a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundProtocol {
    /// HTTP/1.1 or h2c from the app, forwarded request by request over pooled connections.
    Http,
    /// As [`OutboundProtocol::Http`] to a port declared HTTP/2 (`grpc`, `http2`, …): a
    /// plaintext upstream is spoken to in h2c (mTLS upstreams negotiate by ALPN either way).
    Http2,
    /// Opaque bytes, one upstream connection per app connection.
    Tcp,
}

/// One destination the app reaches through a local listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The destination's inbound listener (its sidecar, or the app when it has none).
    pub upstream: SocketAddr,
    pub security: Security,
    pub protocol: OutboundProtocol,
    /// SNI sent on mTLS connections, Istio's `outbound_.<port>_._.<fqdn>` (see [`istio_sni`]);
    /// `None` sends no SNI.
    pub sni: Option<String>,
}

/// Istio's outbound SNI for a service port: `outbound_.<port>_._.<fqdn>`.
pub fn istio_sni(port: u16, fqdn: &str) -> String {
    format!("outbound_.{port}_._.{fqdn}")
}

/// What can go wrong setting up an outbound listener or one upstream connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot connect to upstream {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("mTLS handshake with upstream {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: io::Error },
    #[error("mTLS handshake with upstream {addr} did not finish within {timeout:?}")]
    HandshakeTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with upstream {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("no Service selecting {workload} has port {port}")]
    NoServicePort { workload: String, port: u16 },
    #[error("{workload} has no valid SPIFFE ID ({id}): {reason}")]
    BadIdentity {
        workload: String,
        id: String,
        reason: String,
    },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// The destination a sidecar client uses for `service_port` of a Service selecting `dst`,
/// reached at `upstream`, with Istio's auto mTLS: mTLS expecting `dst`'s SPIFFE ID unless `dst`
/// has no sidecar or the container port's effective mode is DISABLE; HTTP when the port
/// declares it, else opaque TCP (an undeclared port is not sniffed on the way out yet).
pub fn destination_for(
    cfg: &Config,
    dst: &Workload,
    service_port: u16,
    upstream: SocketAddr,
) -> Result<Destination, OutboundError> {
    let no_port = || OutboundError::NoServicePort {
        workload: dst.id(),
        port: service_port,
    };
    let (service, target) = cfg
        .services_selecting(dst)
        .find_map(|s| {
            s.spec
                .ports
                .iter()
                .find(|sp| sp.port == service_port)
                .map(|sp| (s, dst.target_port(sp)))
        })
        .ok_or_else(no_port)?;
    let target = target.filter(|t| *t != 0).ok_or_else(no_port)?;
    let settings = port_table(cfg, dst).get(&target).copied();
    let mode = settings.map(|s| s.mode).unwrap_or(MtlsMode::Permissive);
    let protocol = match settings.map(|s| s.protocol) {
        Some(PortProtocol::Http) => OutboundProtocol::Http,
        Some(PortProtocol::Http2) => OutboundProtocol::Http2,
        _ => OutboundProtocol::Tcp,
    };
    if !dst.sidecar || mode == MtlsMode::Disable {
        return Ok(Destination {
            upstream,
            security: Security::Plaintext,
            protocol,
            sni: None,
        });
    }
    let raw = dst.spiffe_id(&cfg.mesh.trust_domain);
    let id = raw
        .parse::<SpiffeId>()
        .map_err(|e| OutboundError::BadIdentity {
            workload: dst.id(),
            id: raw.clone(),
            reason: e.to_string(),
        })?;
    let fqdn = format!(
        "{}.{}.svc.cluster.local",
        service.name(),
        service.namespace()
    );
    Ok(Destination {
        upstream,
        security: Security::Mtls(id),
        protocol,
        sni: Some(istio_sni(service_port, &fqdn)),
    })
}

/// The outbound side of one workload's proxy: its identity, shared by every route.
pub struct OutboundProxy {
    identity: Arc<IdentityState>,
    /// Where requests and connections are reported (`reporter="source"`), with this
    /// workload's namespace and name; `None` reports nothing.
    observer: Option<(Arc<Observer>, String, String)>,
}

/// What a route's reports say about both ends.
struct RouteReport {
    observer: Arc<Observer>,
    identity: Arc<IdentityState>,
    /// `(namespace, name)` of this workload and of the destination workload.
    source: (String, String),
    destination: (String, String),
}

impl OutboundProxy {
    /// An outbound proxy presenting the SVID in `identity` and verifying upstreams against its
    /// trust bundle (both read at each handshake, so rotations apply to new connections).
    pub fn new(identity: Arc<IdentityState>) -> Self {
        OutboundProxy {
            identity,
            observer: None,
        }
    }

    /// Reports every request and TCP connection of every route to `observer` as the source
    /// (`reporter="source"`), naming this workload `namespace/name`.
    pub fn with_observer(mut self, observer: Arc<Observer>, namespace: &str, name: &str) -> Self {
        self.observer = Some((observer, namespace.to_string(), name.to_string()));
        self
    }

    /// As [`OutboundProxy::route`], with the destination workload named in reports.
    pub fn route_to(&self, destination: Destination, namespace: &str, workload: &str) -> Route {
        let mut route = self.route(destination);
        if let Some(r) = route.report.as_mut() {
            r.destination = (namespace.to_string(), workload.to_string());
        }
        route
    }

    /// Listens on `listen` for the app's connections to `destination`.
    pub async fn bind(
        &self,
        listen: SocketAddr,
        destination: Destination,
    ) -> Result<OutboundListener, OutboundError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| OutboundError::Bind {
                addr: listen,
                source,
            })?;
        Ok(OutboundListener {
            route: Arc::new(self.route(destination)),
            listener,
        })
    }

    /// The state serving one destination; public for callers that accept connections
    /// themselves (transparent capture).
    pub fn route(&self, destination: Destination) -> Route {
        let tls = match &destination.security {
            Security::Mtls(id) => {
                let expected = ExpectedPeer::Exact(id.clone());
                let config = match destination.protocol {
                    OutboundProtocol::Tcp => client_config(self.identity.clone(), expected),
                    OutboundProtocol::Http | OutboundProtocol::Http2 => {
                        client_config_with_alpn(self.identity.clone(), expected, HTTP_ALPN)
                    }
                };
                Some(TlsConnector::from(Arc::new(config)))
            }
            Security::Plaintext => None,
        };
        Route {
            destination,
            tls,
            pool: Pool::default(),
            report: self.observer.as_ref().map(|(o, ns, name)| RouteReport {
                observer: o.clone(),
                identity: self.identity.clone(),
                source: (ns.clone(), name.clone()),
                destination: (UNKNOWN.to_string(), UNKNOWN.to_string()),
            }),
        }
    }
}

/// One destination: how to reach it and its pooled HTTP connections.
pub struct Route {
    destination: Destination,
    tls: Option<TlsConnector>,
    pool: Pool,
    report: Option<RouteReport>,
}

/// Upstream HTTP connections of one route. One HTTP/2 connection carries every request once
/// it exists; HTTP/1.1 connections go back to the idle list when their response is done.
#[derive(Default)]
struct Pool {
    h2: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    idle_h1: Mutex<Vec<http1::SendRequest<ProxyBody>>>,
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

/// A stream to the upstream, TLS or not.
trait Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Upstream for T {}

impl Route {
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// Connects to the upstream (and completes mTLS); also whether ALPN chose HTTP/2.
    async fn connect(&self) -> Result<(Box<dyn Upstream>, bool), OutboundError> {
        let addr = self.destination.upstream;
        let tcp = timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| OutboundError::Connect {
                addr,
                source: io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| OutboundError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            let h2c = self.destination.protocol == OutboundProtocol::Http2;
            return Ok((Box::new(tcp), h2c));
        };
        // SVIDs carry no DNS names, so the name only decides the SNI; an IP address sends none.
        let name = self
            .destination
            .sni
            .clone()
            .and_then(|s| ServerName::try_from(s).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let stream = timeout(UPSTREAM_HANDSHAKE_TIMEOUT, tls.connect(name, tcp))
            .await
            .map_err(|_| OutboundError::HandshakeTimeout {
                addr,
                timeout: UPSTREAM_HANDSHAKE_TIMEOUT,
            })?
            .map_err(|source| OutboundError::Handshake { addr, source })?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        Ok((Box::new(stream), h2))
    }

    /// Serves one app connection until it ends.
    pub async fn serve_connection(self: Arc<Self>, app: TcpStream) -> Result<(), OutboundError> {
        match self.destination.protocol {
            OutboundProtocol::Tcp => self.serve_tcp(app).await,
            OutboundProtocol::Http | OutboundProtocol::Http2 => {
                self.serve_http(app).await;
                Ok(())
            }
        }
    }

    async fn serve_tcp(&self, mut app: TcpStream) -> Result<(), OutboundError> {
        let conn = self.connection_info(&app);
        let start = SystemTime::now();
        let started = Instant::now();
        if let (Some(r), Some(c)) = (&self.report, &conn) {
            r.observer.on_tcp_open(c);
        }
        // Any failure drops `app`, which closes it: the app sees the connection end, as
        // Envoy's TCP proxy does when the upstream cannot be reached.
        let result = async {
            let (mut upstream, _) = self.connect().await?;
            Ok::<_, OutboundError>(tokio::io::copy_bidirectional(&mut app, &mut upstream).await?)
        }
        .await;
        if let (Some(r), Some(c)) = (&self.report, &conn) {
            let (flags, (from_app, to_app)) = match &result {
                Ok(bytes) => (ResponseFlags::NONE, *bytes),
                Err(_) => (ResponseFlag::UpstreamConnectionFailure.into(), (0, 0)),
            };
            r.observer.on_tcp_close(
                &TcpInfo {
                    conn: c,
                    start,
                    response_flags: flags,
                    bytes_received: from_app,
                    bytes_sent: to_app,
                    duration: started.elapsed(),
                },
                &DecisionSummary::local("-", "reported by the source; the destination decides"),
            );
        }
        result.map(|_| ())
    }

    /// What reports say about one app connection (`None` when this route reports nothing).
    fn connection_info(&self, app: &TcpStream) -> Option<ConnectionInfo> {
        let r = self.report.as_ref()?;
        let id = self.destination_principal();
        Some(ConnectionInfo {
            source_principal: r.identity.svid_id().map(|i| i.to_string()),
            source_workload: Some(r.source.1.clone()),
            source_addr: app
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            destination_workload: r.destination.1.clone(),
            destination_namespace: r.destination.0.clone(),
            destination_principal: id,
            destination_port: self.destination.upstream.port(),
            mtls: matches!(self.destination.security, Security::Mtls(_)),
            reporter: Reporter::Source,
        })
    }

    fn destination_principal(&self) -> Option<String> {
        match &self.destination.security {
            Security::Mtls(id) => Some(id.to_string()),
            Security::Plaintext => None,
        }
    }

    async fn serve_http(self: Arc<Self>, app: TcpStream) {
        let _ = app.set_nodelay(true);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The app is local, but still bounded like any client: Envoy's 60 KiB of headers.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(crate::inbound::MAX_REQUEST_HEADERS);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(crate::inbound::MAX_REQUEST_HEADERS as u32);
        let conn = self.connection_info(&app).map(Arc::new);
        let service = hyper::service::service_fn(move |req| {
            let route = self.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(route.handle_request(req, conn).await) }
        });
        if let Err(e) = builder.serve_connection(TokioIo::new(app), service).await {
            tracing::debug!(error = %e, "outbound HTTP connection ended with an error");
        }
    }

    /// Forwards one request and, when this route reports, reports it once its response has
    /// been sent (`reporter="source"`, no policy decision: the destination decides).
    async fn handle_request(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Option<Arc<ConnectionInfo>>,
    ) -> Response<ProxyBody> {
        let (Some(r), Some(conn)) = (&self.report, conn) else {
            return self.clone().forward_request(req.map(BodyExt::boxed)).await;
        };
        let observer = r.observer.clone();
        let start = SystemTime::now();
        let started = Instant::now();
        let received = Arc::new(AtomicU64::new(0));
        let (parts, body) = req.into_parts();
        let method = parts.method.as_str().to_string();
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
        let path = crate::inbound::request_target(&parts.uri).into_owned();
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let body = Counting {
            inner: body,
            count: received.clone(),
        }
        .boxed();
        let resp = self.forward_request(Request::from_parts(parts, body)).await;
        let (rparts, rbody) = resp.into_parts();
        let flags = if rparts.extensions.get::<UpstreamFailure>().is_some() {
            ResponseFlag::UpstreamConnectionFailure.into()
        } else {
            ResponseFlags::NONE
        };
        let report = PendingReport {
            observer,
            conn,
            start,
            started,
            protocol: if grpc {
                RequestProtocol::Grpc
            } else {
                RequestProtocol::Http
            },
            method,
            authority,
            path,
            status: rparts.status.as_u16(),
            flags,
            received,
            summary: DecisionSummary::local("-", "reported by the source; the destination decides"),
        };
        let body = Reported {
            inner: rbody,
            sent: 0,
            done: false,
            report: Some(report),
        };
        Response::from_parts(rparts, body.boxed())
    }

    async fn forward_request(self: Arc<Self>, req: Request<ProxyBody>) -> Response<ProxyBody> {
        let upstream = self.destination.upstream;
        // A target without a leading `/` (`GET public`, which hyper reads as authority-form):
        // Envoy's path checks answer 404 and forward nothing, as the inbound side does.
        if !crate::inbound::request_target(req.uri()).starts_with('/')
            && req.method() != hyper::Method::CONNECT
        {
            return local_reply(StatusCode::NOT_FOUND, "");
        }
        let sender = match self.acquire().await {
            Ok(s) => s,
            Err(e) => {
                log_failure(upstream, &e);
                return upstream_failure();
            }
        };
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
            .unwrap_or_else(|| upstream.to_string());
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let mut headers = parts.headers;
        // gRPC needs `te: trailers` end to end over HTTP/2; anything else in `te` is per hop.
        let te_trailers = headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        strip_hop_by_hop(&mut headers);
        let h2 = matches!(sender, Sender::H2(_));
        let uri = if h2 {
            format!("http://{authority}{path_and_query}")
        } else {
            path_and_query.to_string()
        };
        let Ok(uri) = uri.parse::<Uri>() else {
            return local_reply(StatusCode::BAD_REQUEST, "Bad Request");
        };
        if h2 {
            // HTTP/2 carries the authority in `:authority`.
            headers.remove(header::HOST);
            if te_trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
        } else if !headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                headers.insert(header::HOST, v);
            }
        }
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = headers;
        let result = match sender {
            Sender::H2(mut s) => {
                *out.version_mut() = Version::HTTP_2;
                s.send_request(out).await
            }
            Sender::H1(mut s) => {
                *out.version_mut() = Version::HTTP_11;
                let result = s.send_request(out).await;
                if result.is_ok() {
                    // Back to the pool once this response has been read to its end.
                    let route = self.clone();
                    tokio::spawn(async move {
                        if s.ready().await.is_ok() {
                            let mut idle =
                                route.pool.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
                            if idle.len() < MAX_IDLE_H1 {
                                idle.push(s);
                            }
                        }
                    });
                }
                result
            }
        };
        match result {
            Ok(resp) => {
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                rparts.version = Version::default();
                Response::from_parts(rparts, rbody.boxed())
            }
            Err(e) => {
                tracing::warn!(upstream = %upstream, error = %e, "upstream request failed");
                upstream_failure()
            }
        }
    }

    /// A pooled upstream connection ready for a request, or a new one.
    async fn acquire(&self) -> Result<Sender, OutboundError> {
        {
            let mut h2 = self.pool.h2.lock().unwrap_or_else(|p| p.into_inner());
            match h2.as_ref() {
                Some(s) if !s.is_closed() => return Ok(Sender::H2(s.clone())),
                Some(_) => *h2 = None,
                None => {}
            }
        }
        {
            let mut idle = self.pool.idle_h1.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(s) = idle.pop() {
                if s.is_ready() {
                    return Ok(Sender::H1(s));
                }
            }
        }
        let addr = self.destination.upstream;
        let (stream, h2) = self.connect().await?;
        let io = TokioIo::new(stream);
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|source| OutboundError::Http { addr, source })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
                }
            });
            // Concurrent first requests may each open one; the last stored serves the rest.
            *self.pool.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|source| OutboundError::Http { addr, source })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(upstream = %addr, error = %e, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Sender::H1(sender))
        }
    }
}

/// Accepts the app's connections to one destination.
pub struct OutboundListener {
    route: Arc<Route>,
    listener: TcpListener,
}

impl OutboundListener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the task is dropped, one task per connection.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let route = self.route.clone();
                    tokio::spawn(async move {
                        let upstream = route.destination.upstream;
                        if let Err(e) = route.serve_connection(stream).await {
                            log_failure(upstream, &e);
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Logs why one app connection to `upstream` ended in failure: at info when the server was not
/// who the route expects (a security event), else at debug. Public for callers that accept
/// connections themselves.
pub fn log_failure(upstream: SocketAddr, e: &OutboundError) {
    match e {
        // A server that is not who the route expects is a security event: say why at info.
        OutboundError::Handshake { source, .. } => {
            let spiffe = SpiffeTlsError::from_io(source).map(ToString::to_string);
            tracing::info!(
                upstream = %upstream,
                error = %e,
                spiffe = spiffe.as_deref().unwrap_or("-"),
                "upstream refused"
            );
        }
        _ => tracing::debug!(upstream = %upstream, error = %e, "outbound connection closed"),
    }
}

/// Marks a 503 this proxy answered because the upstream failed (`UF` in reports).
#[derive(Clone, Copy)]
struct UpstreamFailure;

fn upstream_failure() -> Response<ProxyBody> {
    let mut resp = local_reply(StatusCode::SERVICE_UNAVAILABLE, UPSTREAM_FAILURE_BODY);
    resp.extensions_mut().insert(UpstreamFailure);
    resp
}

fn local_reply(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_sni_is_a_valid_server_name() {
        let sni = istio_sni(80, "server.foo.svc.cluster.local");
        assert_eq!(sni, "outbound_.80_._.server.foo.svc.cluster.local");
        assert!(ServerName::try_from(sni).is_ok());
    }
}
