//! The ends a live case puts around the proxies: the app that plays every destination port
//! (HTTP/1.1 and HTTP/2 answering 200 with a marker header, or, for a TCP probe, a banner
//! line), the stand-ins for CUSTOM providers (`envoyExtAuthzHttp` and `envoyExtAuthzGrpc`)
//! answering as the case says, and the client that sends one case and turns what comes back
//! into an outcome.
//!
//! The app tells a TCP probe from HTTP by its first byte: the probe starts with a lowercase
//! `w`, which no HTTP/1 method or the HTTP/2 preface does. The marker header and the banner
//! let the client tell "the app answered" from anything a proxy says.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use warden_identity::spiffe::SpiffeId;
use warden_identity::tls::{
    client_config_with_alpn, ExpectedPeer, IdentityState, ALPN_H2, ALPN_HTTP_1_1,
};
use warden_policy::engine::ExtAuthzAnswer;
use warden_policy::simulate::HttpSpec;
use warden_proxy::ext_authz_proto as pb;
use warden_proxy::outbound::UPSTREAM_FAILURE_BODY;

/// Header the app puts on every response.
const APP_MARKER: &str = "x-warden-live-app";
/// What a TCP client sends first; it must start with a byte no HTTP request starts with.
const PROBE: &[u8] = b"warden-live probe\n";
/// What the app answers a TCP client.
const BANNER: &[u8] = b"warden-live app\n";
/// The most of a response body kept for the report.
const MAX_BODY: usize = 64 * 1024;

/// How a case's client reaches its destination.
pub(crate) enum Target {
    /// Plaintext TCP from `bind` (port chosen by the system).
    Plain { addr: SocketAddr, bind: IpAddr },
    /// mTLS with `identity`, expecting `server`, sending `sni` (none when `None`).
    Mtls {
        addr: SocketAddr,
        bind: IpAddr,
        identity: Arc<IdentityState>,
        server: SpiffeId,
        sni: Option<String>,
    },
}

/// One HTTP request, checked to be sendable.
#[derive(Debug)]
pub(crate) struct HttpCall {
    method: Method,
    /// Path and query.
    target: String,
    authority: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Send HTTP/2 without TLS (prior knowledge), for a port declared HTTP/2 or gRPC.
    pub(crate) h2c: bool,
}

impl HttpCall {
    /// The request of `spec`, with the `:authority` the offline run used; `Err` says why a
    /// real client cannot send it.
    pub(crate) fn new(spec: &HttpSpec, authority: Option<&str>) -> Result<HttpCall, String> {
        let method = Method::from_bytes(spec.method.as_bytes())
            .map_err(|_| format!("the HTTP client cannot send method \"{}\"", spec.method))?;
        let target = if spec.path.is_empty() {
            "/".to_string()
        } else {
            spec.path.clone()
        };
        // hyper's HTTP/1.1 client writes any target that parses as a URI as given, so a path
        // without its leading slash still reaches the proxy as such.
        if target.parse::<Uri>().is_err() {
            return Err(format!(
                "the HTTP client cannot send request target \"{}\"",
                target.escape_debug()
            ));
        }
        let authority = authority.unwrap_or("localhost").to_string();
        if authority.parse::<hyper::http::uri::Authority>().is_err() {
            return Err(format!(
                "the HTTP client cannot send authority \"{}\"",
                authority.escape_debug()
            ));
        }
        let mut headers = Vec::new();
        let tokens = spec
            .token
            .iter()
            .map(|t| ("authorization".to_string(), format!("Bearer {t}")));
        for (n, v) in spec.headers.iter().cloned().chain(tokens) {
            if n.eq_ignore_ascii_case("host") {
                continue;
            }
            let name = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("the HTTP client cannot send header name \"{n}\""))?;
            let value = HeaderValue::from_str(&v)
                .map_err(|_| format!("the HTTP client cannot send the value of header \"{n}\""))?;
            headers.push((name, value));
        }
        Ok(HttpCall {
            method,
            target,
            authority,
            headers,
            h2c: false,
        })
    }
}

/// What came back for one case.
#[derive(Debug, Clone)]
pub enum LiveOutcome {
    /// An HTTP response.
    Http {
        status: u16,
        /// The app sent it (the marker header is there).
        from_app: bool,
        body: String,
        h2: bool,
    },
    /// The TCP probe was answered by the app's banner.
    Banner,
    /// The connection was refused, reset or closed without a response.
    Closed(String),
    /// The runner could not run the case (set-up, time limit).
    Failed(String),
}

impl LiveOutcome {
    /// The outcome in test-file terms; `None` when it is none of them. A response with
    /// `custom_deny` from a proxy is a denial too: the status a CUSTOM provider's
    /// `statusOnError` gives instead of 403.
    pub fn outcome(&self, custom_deny: Option<u16>) -> Option<&'static str> {
        match self {
            LiveOutcome::Http {
                status,
                from_app,
                body,
                ..
            } => match (*status, *from_app) {
                (200..=299, true) => Some("allow"),
                (403, false) => Some("deny"),
                (401, false) => Some("unauthenticated"),
                (400 | 404, false) => Some("bad-request"),
                // The client's own outbound proxy saw the upstream close the connection.
                (503, false) if body.starts_with(UPSTREAM_FAILURE_BODY) => Some("reset"),
                (s, false) if Some(s) == custom_deny => Some("deny"),
                _ => None,
            },
            LiveOutcome::Banner => Some("allow"),
            LiveOutcome::Closed(_) => Some("reset"),
            LiveOutcome::Failed(_) => None,
        }
    }

    /// One line saying what was observed.
    pub fn detail(&self) -> String {
        match self {
            LiveOutcome::Http {
                status,
                from_app,
                body,
                h2,
            } => {
                let by = if *from_app { "the app" } else { "a proxy" };
                let v = if *h2 { "HTTP/2" } else { "HTTP/1.1" };
                let body: String = body.trim().chars().take(120).collect();
                format!("{v} {status} from {by} ({body:?})")
            }
            LiveOutcome::Banner => "TCP: the app's banner came back".into(),
            LiveOutcome::Closed(why) => format!("connection closed without a response: {why}"),
            LiveOutcome::Failed(why) => format!("not run: {why}"),
        }
    }
}

/// A stream to the destination, TLS or not.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

async fn connect(bind: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match bind {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(bind, 0))?;
    socket.connect(addr).await
}

/// `case` within `limit`; past it, a failure saying so (never a pass, never a hang).
pub(crate) async fn bounded(
    limit: Duration,
    case: impl std::future::Future<Output = LiveOutcome>,
) -> LiveOutcome {
    match tokio::time::timeout(limit, case).await {
        Ok(o) => o,
        Err(_) => LiveOutcome::Failed(format!("no answer within {limit:?}")),
    }
}

/// Sends the case (a request, or the TCP probe when `request` is `None`).
pub(crate) async fn send(target: &Target, request: Option<&HttpCall>) -> LiveOutcome {
    let (stream, h2): (Box<dyn Stream>, bool) = match target {
        Target::Plain { addr, bind } => match connect(*bind, *addr).await {
            Ok(s) => (Box::new(s), request.is_some_and(|r| r.h2c)),
            Err(e) => return LiveOutcome::Closed(format!("connect to {addr}: {e}")),
        },
        Target::Mtls {
            addr,
            bind,
            identity,
            server,
            sni,
        } => {
            let tcp = match connect(*bind, *addr).await {
                Ok(s) => s,
                Err(e) => return LiveOutcome::Closed(format!("connect to {addr}: {e}")),
            };
            // Like the outbound proxy: ALPN only for HTTP.
            let alpn: &[&[u8]] = if request.is_some() {
                &[ALPN_H2, ALPN_HTTP_1_1]
            } else {
                &[]
            };
            let config = client_config_with_alpn(
                identity.clone(),
                ExpectedPeer::Exact(server.clone()),
                alpn,
            );
            let name = sni
                .clone()
                .and_then(|s| ServerName::try_from(s).ok())
                .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
            match TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
            {
                Ok(tls) => {
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
                    (Box::new(tls), h2)
                }
                Err(e) => return LiveOutcome::Closed(format!("TLS handshake: {e}")),
            }
        }
    };
    match request {
        Some(call) => http(stream, h2, call).await,
        None => probe(stream).await,
    }
}

async fn probe(mut stream: Box<dyn Stream>) -> LiveOutcome {
    if let Err(e) = stream.write_all(PROBE).await {
        return LiveOutcome::Closed(format!("sending: {e}"));
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < BANNER.len() {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return LiveOutcome::Closed(format!("reading: {e}")),
        }
    }
    if got.starts_with(BANNER) {
        LiveOutcome::Banner
    } else if got.starts_with(b"HTTP/") {
        // A proxy's HTTP listener answered the probe: neither the app nor a closed connection.
        let line = String::from_utf8_lossy(&got);
        LiveOutcome::Failed(format!(
            "the TCP probe got an HTTP response: {}",
            line.lines().next().unwrap_or_default()
        ))
    } else {
        LiveOutcome::Closed(format!(
            "closed after {} bytes that are not the app's banner",
            got.len()
        ))
    }
}

async fn http(stream: Box<dyn Stream>, h2: bool, call: &HttpCall) -> LiveOutcome {
    let io = TokioIo::new(stream);
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.method_mut() = call.method.clone();
    for (n, v) in &call.headers {
        req.headers_mut().append(n.clone(), v.clone());
    }
    let result = if h2 {
        if !call.target.starts_with('/') {
            return LiveOutcome::Failed(format!(
                "HTTP/2 cannot carry the path {:?}: it does not start with /",
                call.target
            ));
        }
        let uri = format!("http://{}{}", call.authority, call.target);
        match uri.parse::<Uri>() {
            Ok(u) => *req.uri_mut() = u,
            Err(e) => return LiveOutcome::Failed(format!("request URI {uri}: {e}")),
        }
        let (mut sender, conn) =
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await {
                Ok(x) => x,
                Err(e) => return LiveOutcome::Closed(format!("HTTP/2 handshake: {e}")),
            };
        tokio::spawn(conn);
        sender.send_request(req).await
    } else {
        match call.target.parse::<Uri>() {
            Ok(u) => *req.uri_mut() = u,
            Err(e) => return LiveOutcome::Failed(format!("request target: {e}")),
        }
        if let Ok(v) = HeaderValue::from_str(&call.authority) {
            req.headers_mut().insert(HOST, v);
        }
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(x) => x,
            Err(e) => return LiveOutcome::Closed(format!("HTTP/1.1 handshake: {e}")),
        };
        tokio::spawn(conn);
        sender.send_request(req).await
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => return LiveOutcome::Closed(format!("no response: {e}")),
    };
    let status = resp.status().as_u16();
    let from_app = resp.headers().contains_key(APP_MARKER);
    let body = match Limited::new(resp.into_body(), MAX_BODY).collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(e) => format!("(body unreadable: {e})"),
    };
    LiveOutcome::Http {
        status,
        from_app,
        body,
        h2,
    }
}

/// Starts a CUSTOM (`envoyExtAuthzHttp`) provider on an ephemeral 127.0.0.1 port: every check
/// gets what `answer` holds at that moment (200 for allow, 403 for deny, 500 for error, which
/// the proxy treats as a provider error). Cases run one at a time, so the runner sets the
/// answer before each case.
pub(crate) async fn start_ext_authz(
    tasks: &mut JoinSet<()>,
    answer: Arc<Mutex<ExtAuthzAnswer>>,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((super::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            conns.spawn(async move {
                let service =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let now = *answer.lock().unwrap_or_else(|p| p.into_inner());
                        let (status, body) = match now {
                            ExtAuthzAnswer::Allow => {
                                (StatusCode::OK, "allowed by warden-live ext_authz")
                            }
                            ExtAuthzAnswer::Deny => {
                                (StatusCode::FORBIDDEN, "denied by warden-live ext_authz")
                            }
                            ExtAuthzAnswer::Error => (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "warden-live ext_authz error",
                            ),
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = status;
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The `envoyExtAuthzGrpc` stand-in: Envoy's `Authorization/Check` answering what `answer`
/// holds (OK; PERMISSION_DENIED with a 403 denial; or a failed call, which is an error).
struct GrpcProvider {
    answer: Arc<Mutex<ExtAuthzAnswer>>,
}

#[tonic::async_trait]
impl pb::authorization_server::Authorization for GrpcProvider {
    async fn check(
        &self,
        _request: tonic::Request<pb::CheckRequest>,
    ) -> Result<tonic::Response<pb::CheckResponse>, tonic::Status> {
        let now = *self.answer.lock().unwrap_or_else(|p| p.into_inner());
        let status = |code, message: &str| {
            Some(pb::RpcStatus {
                code,
                message: message.into(),
            })
        };
        let resp = match now {
            ExtAuthzAnswer::Allow => pb::CheckResponse {
                status: status(0, ""),
                http_response: None,
            },
            // PERMISSION_DENIED, with the body the HTTP stand-in sends.
            ExtAuthzAnswer::Deny => pb::CheckResponse {
                status: status(7, "denied"),
                http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                    pb::DeniedHttpResponse {
                        status: Some(pb::HttpStatus { code: 403 }),
                        headers: Vec::new(),
                        body: "denied by warden-live ext_authz".into(),
                    },
                )),
            },
            ExtAuthzAnswer::Error => {
                return Err(tonic::Status::unavailable("warden-live ext_authz error"))
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

/// Starts the `envoyExtAuthzGrpc` stand-in on an ephemeral 127.0.0.1 port, answering as
/// [`start_ext_authz`] does.
pub(crate) async fn start_ext_authz_grpc(
    tasks: &mut JoinSet<()>,
    answer: Arc<Mutex<ExtAuthzAnswer>>,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((super::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let server = tonic::transport::Server::builder()
        .add_service(pb::authorization_server::AuthorizationServer::new(
            GrpcProvider { answer },
        ))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tasks.spawn(async move {
        if let Err(e) = server.await {
            tracing::debug!(error = %e, "the live ext_authz gRPC stand-in stopped");
        }
    });
    Ok(addr)
}

/// Starts an app on an ephemeral 127.0.0.1 port; it runs until `tasks` is aborted.
pub(crate) async fn start_app(tasks: &mut JoinSet<()>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((super::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        // Connections end with the app: `conns` is dropped (and aborted) with this task.
        while let Ok((stream, _)) = listener.accept().await {
            conns.spawn(serve_app(stream));
        }
    });
    Ok(addr)
}

async fn serve_app(mut stream: TcpStream) {
    let mut first = [0u8; 1];
    match stream.read(&mut first).await {
        Ok(1) => {}
        _ => return,
    }
    if first[0] == PROBE[0] {
        if stream.write_all(BANNER).await.is_err() {
            return;
        }
        let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
        return;
    }
    let stream = Prefixed {
        prefix: Some(first[0]),
        inner: stream,
    };
    let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
        let body = format!("warden-live app: {} {}\n", req.method(), req.uri());
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = StatusCode::OK;
        resp.headers_mut()
            .insert(APP_MARKER, HeaderValue::from_static("1"));
        Ok::<_, std::convert::Infallible>(resp)
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// A stream whose first byte was already read.
struct Prefixed {
    prefix: Option<u8>,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(b) = self.prefix.take() {
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(path: &str) -> HttpSpec {
        HttpSpec {
            method: "GET".into(),
            path: path.into(),
            ..HttpSpec::default()
        }
    }

    /// A server that accepts and never answers: the case ends at the limit as a failure, not
    /// as `reset` and not as a hang.
    #[tokio::test]
    async fn a_silent_destination_is_a_failure_at_the_time_limit() {
        let l = TcpListener::bind((crate::live::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let target = Target::Plain {
            addr,
            bind: crate::live::LOCALHOST,
        };
        let req = HttpCall::new(&call("/"), Some("web.foo:8000")).unwrap();
        for request in [None, Some(&req)] {
            let o = tokio::time::timeout(
                Duration::from_secs(10),
                bounded(Duration::from_millis(200), send(&target, request)),
            )
            .await
            .expect("bounded must end the case");
            assert!(matches!(o, LiveOutcome::Failed(_)), "{o:?}");
            assert_eq!(o.outcome(None), None);
            assert!(o.detail().contains("no answer within"), "{}", o.detail());
        }
        hold.abort();
    }

    /// The app answers HTTP with its marker and a probe with its banner; a closed port is a
    /// reset.
    #[tokio::test]
    async fn the_app_answers_both_and_a_closed_port_is_reset() {
        let mut tasks = JoinSet::new();
        let addr = start_app(&mut tasks).await.unwrap();
        let target = Target::Plain {
            addr,
            bind: crate::live::LOCALHOST,
        };
        let req = HttpCall::new(&call("/x?y=1"), Some("web.foo:8000")).unwrap();
        let o = bounded(Duration::from_secs(10), send(&target, Some(&req))).await;
        assert_eq!(o.outcome(None), Some("allow"), "{}", o.detail());
        assert!(o.detail().contains("GET /x?y=1"), "{}", o.detail());
        let o = bounded(Duration::from_secs(10), send(&target, None)).await;
        assert!(matches!(o, LiveOutcome::Banner), "{}", o.detail());
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let o = bounded(Duration::from_secs(10), send(&target, None)).await;
        assert_eq!(o.outcome(None), Some("reset"), "{}", o.detail());
    }

    #[test]
    fn requests_a_client_cannot_send_are_named() {
        assert!(HttpCall::new(&call("/ok"), Some("a:1")).is_ok());
        let mut bad = call("/");
        bad.method = "G T".into();
        assert!(HttpCall::new(&bad, None).unwrap_err().contains("method"));
        let mut bad = call("/");
        bad.headers = vec![("x-a".into(), "line\nbreak".into())];
        assert!(HttpCall::new(&bad, None).unwrap_err().contains("x-a"));
    }
}
