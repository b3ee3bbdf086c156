//! gRPC through the proxy over 127.0.0.1: a port declared `grpc` is forwarded to an h2c-only
//! app over HTTP/2 with `te: trailers` and the response trailers intact, whatever HTTP version
//! the client spoke; the outbound side speaks h2c to a plaintext gRPC destination.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame};
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use warden_identity::svid::TrustBundle;
use warden_identity::tls::IdentityState;
use warden_policy::config::Loader;
use warden_policy::engine::{InlineJwksOnly, WorkloadPolicy};
use warden_proxy::outbound::{Destination, OutboundProtocol, OutboundProxy, Security};
use warden_proxy::{port_table, InboundProxy, PortProtocol};

const LIMIT: Duration = Duration::from_secs(30);
const GRPC_PORT: u16 = 50051;

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test timed out")
}

const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: greeter, namespace: foo}
spec:
  selector: {app: greeter}
  ports:
  - {name: grpc-api, port: 50051}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: greeter, namespace: foo}
spec:
  template:
    metadata: {labels: {app: greeter}}
    spec:
      serviceAccountName: greeter
      containers:
      - name: g
        ports: [{containerPort: 50051}]
"#;

/// A state with a trust bundle and no certificate: enough for plaintext traffic.
fn identity() -> Arc<IdentityState> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = p.self_signed(&key).unwrap();
    Arc::new(
        IdentityState::new(TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_der: vec![root.der().to_vec()],
        })
        .unwrap(),
    )
}

/// An h2c-only gRPC-shaped app: answers 200 with what it saw in headers, and `grpc-status: 0`
/// in the trailers.
async fn grpc_app() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let te = req
                            .headers()
                            .get("te")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        let version = format!("{:?}", req.version());
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        let body = WithTrailers {
                            data: Some(Bytes::from_static(b"\0\0\0\0\0")),
                            trailers: Some(trailers),
                        };
                        let resp = Response::builder()
                            .header("content-type", "application/grpc")
                            .header("x-seen-te", te)
                            .header("x-seen-version", version)
                            .body(body)
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A body of one data frame, then trailers.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(d))));
        }
        std::task::Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

async fn start_inbound(app: SocketAddr) -> SocketAddr {
    let mut l = Loader::new();
    l.add_text("grpc.yaml", CONFIG);
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    let wl = cfg.workload("foo", "greeter").unwrap();
    let table = port_table(&cfg, wl);
    assert_eq!(table[&GRPC_PORT].protocol, PortProtocol::Http2);
    let policy = Arc::new(ArcSwap::from_pointee(WorkloadPolicy::compile(
        &cfg,
        wl,
        &InlineJwksOnly,
    )));
    let ports = table.iter().map(|(p, s)| (*p, s.with_app(app))).collect();
    let proxy = Arc::new(InboundProxy::new(policy, identity(), ports));
    let listener = proxy
        .bind(GRPC_PORT, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(listener.run());
    addr
}

fn grpc_request(version: hyper::Version) -> Request<Full<Bytes>> {
    Request::post("http://greeter.foo:50051/helloworld.Greeter/SayHello")
        .version(version)
        .header("host", "greeter.foo:50051")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

/// Status, the app's `x-seen-*` headers and the trailers of one response.
async fn answer(
    resp: Response<hyper::body::Incoming>,
) -> (StatusCode, String, String, Option<HeaderMap>) {
    let status = resp.status();
    let seen = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (te, version) = (seen("x-seen-te"), seen("x-seen-version"));
    let collected = resp.into_body().collect().await.unwrap();
    (status, te, version, collected.trailers().cloned())
}

#[tokio::test]
async fn a_grpc_port_reaches_an_h2c_app_with_trailers_from_h2_clients() {
    bounded(async {
        let app = grpc_app().await;
        let inbound = start_inbound(app).await;
        let tcp = TcpStream::connect(inbound).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let resp = send
            .send_request(grpc_request(hyper::Version::HTTP_2))
            .await
            .unwrap();
        let (status, te, version, trailers) = answer(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, "HTTP/2.0");
        assert_eq!(te, "trailers");
        let trailers = trailers.expect("the app's trailers reach the client");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    })
    .await
}

#[tokio::test]
async fn a_grpc_port_speaks_h2_to_the_app_even_for_an_http1_client() {
    bounded(async {
        let app = grpc_app().await;
        let inbound = start_inbound(app).await;
        let tcp = TcpStream::connect(inbound).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = grpc_request(hyper::Version::HTTP_11);
        *req.uri_mut() = "/helloworld.Greeter/SayHello".parse().unwrap();
        let resp = send.send_request(req).await.unwrap();
        let (status, _, version, _) = answer(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, "HTTP/2.0");
    })
    .await
}

#[tokio::test]
async fn outbound_speaks_h2c_to_a_plaintext_grpc_destination() {
    bounded(async {
        let app = grpc_app().await;
        let outbound = OutboundProxy::new(identity());
        let listener = outbound
            .bind(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                Destination {
                    upstream: app,
                    security: Security::Plaintext,
                    protocol: OutboundProtocol::Http2,
                    sni: None,
                },
            )
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(listener.run());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let resp = send
            .send_request(grpc_request(hyper::Version::HTTP_2))
            .await
            .unwrap();
        let (status, te, version, trailers) = answer(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, "HTTP/2.0");
        assert_eq!(te, "trailers");
        assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");
    })
    .await
}
