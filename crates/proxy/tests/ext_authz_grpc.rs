//! CUSTOM policies with an `envoyExtAuthzGrpc` provider over 127.0.0.1: a tonic server playing
//! the provider (Envoy's `envoy.service.auth.v3.Authorization/Check`), the inbound proxy in
//! front of an HTTP app and a TCP echo app, and plain clients. Shows what the provider is told,
//! that its OK headers reach the app and its denial reaches the client, and that on TCP ports
//! it is asked once per connection (network ext_authz).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warden_identity::svid::TrustBundle;
use warden_identity::tls::IdentityState;
use warden_policy::config::Loader;
use warden_policy::engine::{InlineJwksOnly, WorkloadPolicy};
use warden_proxy::ext_authz_proto as pb;
use warden_proxy::{port_table, InboundProxy};

const LIMIT: Duration = Duration::from_secs(30);
const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 9000;

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test timed out")
}

fn config(provider_port: u16) -> String {
    format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    extensionProviders:
    - name: grpc-authz
      envoyExtAuthzGrpc:
        service: 127.0.0.1
        port: {provider_port}
        timeout: 5s
---
apiVersion: v1
kind: Namespace
metadata: {{name: foo, labels: {{istio-injection: enabled}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: foo}}
spec:
  selector: {{app: server}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: tcp-echo, port: 9000}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: server, namespace: foo}}
spec:
  template:
    metadata: {{labels: {{app: server}}}}
    spec:
      serviceAccountName: server
      containers:
      - name: s
        ports: [{{containerPort: 8080}}, {{containerPort: 9000}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: CUSTOM
  provider: {{name: grpc-authz}}
  rules: [{{}}]
"#
    )
}

/// The provider: allows HTTP requests with `x-allow: yes` (adding `x-user` for the app,
/// removing `x-allow`, adding `x-checked` for the client), denies other HTTP requests with 418
/// and its own body, and allows TCP connections while `tcp_open` is set. Records every request.
#[derive(Clone, Default)]
struct Provider {
    tcp_open: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<pb::CheckRequest>>>,
}

fn header(key: &str, value: &str) -> pb::HeaderValueOption {
    pb::HeaderValueOption {
        header: Some(pb::HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append: None,
    }
}

#[tonic::async_trait]
impl pb::authorization_server::Authorization for Provider {
    async fn check(
        &self,
        request: tonic::Request<pb::CheckRequest>,
    ) -> Result<tonic::Response<pb::CheckResponse>, tonic::Status> {
        let req = request.into_inner();
        self.seen.lock().unwrap().push(req.clone());
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let allow = match http {
            Some(h) => h.headers.get("x-allow").map(String::as_str) == Some("yes"),
            None => self.tcp_open.load(Ordering::SeqCst),
        };
        let resp = if allow {
            pb::CheckResponse {
                status: Some(pb::RpcStatus {
                    code: 0,
                    message: String::new(),
                }),
                http_response: Some(pb::check_response::HttpResponse::OkResponse(
                    pb::OkHttpResponse {
                        headers: vec![header("x-user", "alice")],
                        headers_to_remove: vec!["x-allow".into()],
                        response_headers_to_add: vec![header("x-checked", "yes")],
                    },
                )),
            }
        } else {
            pb::CheckResponse {
                // PERMISSION_DENIED
                status: Some(pb::RpcStatus {
                    code: 7,
                    message: "no".into(),
                }),
                http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                    pb::DeniedHttpResponse {
                        status: Some(pb::HttpStatus { code: 418 }),
                        headers: vec![header("x-why", "grpc provider")],
                        body: "denied by the grpc provider".into(),
                    },
                )),
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

async fn start_provider(p: Provider) -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::authorization_server::AuthorizationServer::new(p))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    addr
}

/// An HTTP app answering 200 with the request's header names and values, one per line.
async fn headers_app() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let mut out = String::new();
                        for (n, v) in req.headers() {
                            out.push_str(&format!("{n}: {}\n", v.to_str().unwrap_or("?")));
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            out,
                        ))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP app that greets and then echoes.
async fn greeting_app() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(b"hello\n").await;
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

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

/// The proxy for foo/server with both ports; their listen addresses.
async fn start_proxy(provider: SocketAddr) -> (SocketAddr, SocketAddr) {
    let mut l = Loader::new();
    l.add_text("ext-authz-grpc.yaml", &config(provider.port()));
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    let wl = cfg.workload("foo", "server").unwrap();
    let table = port_table(&cfg, wl);
    let http_app = headers_app().await;
    let tcp_app = greeting_app().await;
    let ports = table
        .iter()
        .map(|(p, s)| {
            (
                *p,
                s.with_app(if *p == TCP_PORT { tcp_app } else { http_app }),
            )
        })
        .collect();
    let policy = Arc::new(ArcSwap::from_pointee(WorkloadPolicy::compile(
        &cfg,
        wl,
        &InlineJwksOnly,
    )));
    let proxy = Arc::new(InboundProxy::new(policy, identity(), ports));
    let mut addrs = Vec::new();
    for port in [HTTP_PORT, TCP_PORT] {
        let listener = proxy
            .bind(port, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(listener.run());
    }
    (addrs[0], addrs[1])
}

async fn get(addr: SocketAddr, headers: &[(&str, &str)]) -> (StatusCode, hyper::HeaderMap, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::get("/items?x=1").header("host", "server.foo");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let resp = send
        .send_request(b.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn http_requests_are_checked_by_the_grpc_provider() {
    bounded(async {
        let provider = Provider::default();
        let (http, _) = start_proxy(start_provider(provider.clone()).await).await;

        let (status, headers, body) = get(http, &[("x-allow", "yes"), ("x-other", "1")]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("x-user: alice"), "{body}");
        assert!(
            !body.contains("x-allow"),
            "headers_to_remove reached the app: {body}"
        );
        assert_eq!(headers.get("x-checked").unwrap(), "yes");
        {
            let seen = provider.seen.lock().unwrap();
            let attrs = seen[0].attributes.as_ref().unwrap();
            let h = attrs.request.as_ref().unwrap().http.as_ref().unwrap();
            assert_eq!(h.method, "GET");
            assert_eq!(h.path, "/items?x=1");
            assert_eq!(h.host, "server.foo");
            assert_eq!(h.protocol, "HTTP/1.1");
            assert_eq!(h.headers.get("x-other").map(String::as_str), Some("1"));
            let src = attrs.source.as_ref().unwrap();
            assert_eq!(
                src.address
                    .as_ref()
                    .unwrap()
                    .socket_address
                    .as_ref()
                    .unwrap()
                    .address,
                "127.0.0.1"
            );
            // Plaintext: no principal.
            assert_eq!(src.principal, "");
        }

        let (status, headers, body) = get(http, &[]).await;
        assert_eq!(status.as_u16(), 418);
        assert_eq!(body, "denied by the grpc provider");
        assert_eq!(headers.get("x-why").unwrap(), "grpc provider");
    })
    .await
}

#[tokio::test]
async fn tcp_connections_are_checked_once_by_the_grpc_provider() {
    bounded(async {
        let provider = Provider::default();
        let (_, tcp) = start_proxy(start_provider(provider.clone()).await).await;

        // Denied: closed before the app's greeting. (The client speaks first: the proxy needs
        // its first bytes to tell TLS from plaintext.)
        let mut s = TcpStream::connect(tcp).await.unwrap();
        let _ = s.write_all(b"ping").await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(
            out.is_empty(),
            "reached the app: {:?}",
            String::from_utf8_lossy(&out)
        );

        // Allowed: greeted, echoed; the provider was asked without an HTTP request.
        provider.tcp_open.store(true, Ordering::SeqCst);
        let mut s = TcpStream::connect(tcp).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 10];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"hello\nping");
        let seen = provider.seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen[1].attributes.as_ref().unwrap().request.is_none());
    })
    .await
}

#[tokio::test]
async fn an_unreachable_grpc_provider_fails_closed() {
    bounded(async {
        // Nothing listens there: an error, and failOpen is false, so 403 (statusOnError).
        let closed = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            l.local_addr().unwrap()
        };
        let (http, _) = start_proxy(closed).await;
        let (status, _, body) = get(http, &[("x-allow", "yes")]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(!body.contains("x-user"), "{body}");
    })
    .await
}
