//! The outbound proxy end to end over 127.0.0.1: a root and SVIDs minted with rcgen, test
//! upstreams built with Warden's mTLS server config that report the client identity they saw
//! (and count their connections), the outbound listener in front of them, and the app played
//! by plain TCP and hyper clients. Every test runs inside `bounded` and synchronises on I/O
//! only.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose as Eku,
    IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku, SanType,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::{Svid, TrustBundle};
use warden_identity::tls::{
    peer_spiffe_id, server_config, server_config_with_alpn, IdentityState, ALPN_H2, ALPN_HTTP_1_1,
};
use warden_proxy::outbound::{
    destination_for, istio_sni, Destination, OutboundProtocol, OutboundProxy, Security,
    UPSTREAM_FAILURE_BODY,
};

const TD: &str = "cluster.local";
const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test timed out")
}

// ---------------------------------------------------------------- certificates

struct Pki {
    root_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "warden outbound tests root");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Pki {
            root_der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        }
    }

    fn identity(&self, sa: &str) -> Arc<IdentityState> {
        let id = id(sa);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        p.key_usages = vec![Ku::DigitalSignature, Ku::KeyEncipherment];
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let svid = Svid {
            id,
            cert_chain_der: vec![cert.der().to_vec()],
            key_pkcs8_der: key.serialize_der(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
        };
        let bundle = TrustBundle {
            trust_domain: TD.into(),
            roots_der: vec![self.root_der.clone()],
        };
        Arc::new(IdentityState::with_svid(svid, bundle).unwrap())
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "foo", sa).unwrap()
}

const SNI: &str = "outbound_.80_._.server.foo.svc.cluster.local";

// ---------------------------------------------------------------- upstreams

/// What a test upstream saw: connections accepted (TLS handshakes completed, for TLS ones)
/// and handshakes that failed.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    failed_handshakes: AtomicUsize,
}

/// An mTLS server with `server`'s SVID that writes the client's SPIFFE ID and SNI as a line,
/// then echoes.
async fn tls_echo(server: Arc<IdentityState>) -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let acceptor = TlsAcceptor::from(Arc::new(server_config(server)));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = s.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    seen.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let conn = tls.get_ref().1;
                let peer = peer_spiffe_id(conn).map(|p| p.to_string());
                let sni = conn.server_name().map(str::to_string);
                let (mut r, mut w) = tokio::io::split(tls);
                let line = format!("{} {}\n", peer.unwrap_or_default(), sni.unwrap_or_default());
                w.write_all(line.as_bytes()).await.unwrap();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, seen)
}

/// A plaintext TCP echo server.
async fn plain_echo() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An HTTP server answering with JSON: the client identity (mTLS), the HTTP version, the
/// authority and the path. `tls`: Warden's mTLS server with this identity and ALPN list;
/// `None`: plaintext HTTP/1.1.
async fn http_upstream(
    tls: Option<(Arc<IdentityState>, &'static [&'static [u8]])>,
) -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let acceptor =
        tls.map(|(state, alpn)| TlsAcceptor::from(Arc::new(server_config_with_alpn(state, alpn))));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = s.clone();
            tokio::spawn(async move {
                let Some(acceptor) = acceptor else {
                    seen.connections.fetch_add(1, Ordering::SeqCst);
                    serve_echo(TokioIo::new(tcp), None, false).await;
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    seen.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let conn = tls.get_ref().1;
                let peer = peer_spiffe_id(conn).map(|p| p.to_string());
                let h2 = conn.alpn_protocol() == Some(ALPN_H2);
                serve_echo(TokioIo::new(tls), peer, h2).await;
            });
        }
    });
    (addr, seen)
}

async fn serve_echo<I>(io: I, peer: Option<String>, h2: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let peer = peer.clone();
        async move {
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    req.headers()
                        .get("host")
                        .map(|h| String::from_utf8_lossy(h.as_bytes()).into())
                })
                .unwrap_or_default();
            let body = serde_json::json!({
                "peer": peer,
                "version": format!("{:?}", req.version()),
                "authority": authority,
                "path": req.uri().path_and_query().map(|p| p.as_str().to_string()),
            });
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                Bytes::from(body.to_string()),
            )))
        }
    });
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    }
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------- the proxy

async fn outbound(client: Arc<IdentityState>, dest: Destination) -> SocketAddr {
    let l = OutboundProxy::new(client)
        .bind((Ipv4Addr::LOCALHOST, 0).into(), dest)
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(l.run());
    addr
}

fn dest(upstream: SocketAddr, security: Security, protocol: OutboundProtocol) -> Destination {
    Destination {
        upstream,
        security,
        protocol,
        sni: Some(SNI.into()),
    }
}

/// One HTTP/1.1 request on a fresh app connection: status and body.
async fn get(proxy: SocketAddr, path: &str) -> (StatusCode, String) {
    let s = TcpStream::connect(proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "server.foo:80")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

// ---------------------------------------------------------------- TCP

#[tokio::test]
async fn tcp_originates_mtls_and_the_server_sees_the_client_identity() {
    bounded(async {
        let pki = Pki::new();
        let (up, seen) = tls_echo(pki.identity("server")).await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Mtls(id("server")), OutboundProtocol::Tcp),
        )
        .await;
        let app = TcpStream::connect(proxy).await.unwrap();
        let mut app = BufReader::new(app);
        let mut line = String::new();
        app.read_line(&mut line).await.unwrap();
        assert_eq!(
            line,
            format!("spiffe://cluster.local/ns/foo/sa/client {SNI}\n")
        );
        app.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        app.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test]
async fn tcp_to_a_server_with_another_identity_closes_the_app_connection() {
    bounded(async {
        let pki = Pki::new();
        let (up, seen) = tls_echo(pki.identity("impostor")).await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Mtls(id("server")), OutboundProtocol::Tcp),
        )
        .await;
        let mut app = TcpStream::connect(proxy).await.unwrap();
        let mut buf = Vec::new();
        // Closed (or reset) without a byte from the impostor.
        let n = app.read_to_end(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "{buf:?}");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
    })
    .await
}

#[tokio::test]
async fn tcp_plaintext_passes_through() {
    bounded(async {
        let pki = Pki::new();
        let up = plain_echo().await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Plaintext, OutboundProtocol::Tcp),
        )
        .await;
        let mut app = TcpStream::connect(proxy).await.unwrap();
        app.write_all(b"hello plaintext").await.unwrap();
        app.shutdown().await.unwrap();
        let mut out = Vec::new();
        app.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello plaintext");
    })
    .await
}

#[tokio::test]
async fn tcp_to_an_upstream_that_is_down_closes_the_app_connection() {
    bounded(async {
        let pki = Pki::new();
        let up = closed_port().await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Mtls(id("server")), OutboundProtocol::Tcp),
        )
        .await;
        let mut app = TcpStream::connect(proxy).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(app.read_to_end(&mut buf).await.unwrap_or(0), 0);
    })
    .await
}

// ---------------------------------------------------------------- HTTP

#[tokio::test]
async fn http_over_mtls_uses_h2_and_one_pooled_connection() {
    bounded(async {
        let pki = Pki::new();
        let (up, seen) =
            http_upstream(Some((pki.identity("server"), &[ALPN_H2, ALPN_HTTP_1_1]))).await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Mtls(id("server")), OutboundProtocol::Http),
        )
        .await;
        for i in 0..3 {
            let (status, body) = get(proxy, &format!("/r{i}?q=1")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let v = json(&body);
            assert_eq!(v["peer"], "spiffe://cluster.local/ns/foo/sa/client");
            assert_eq!(v["version"], "HTTP/2.0");
            assert_eq!(v["authority"], "server.foo:80");
            assert_eq!(v["path"], format!("/r{i}?q=1"));
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test]
async fn http_over_mtls_falls_back_to_http1_and_reuses_the_connection() {
    bounded(async {
        let pki = Pki::new();
        let (up, seen) = http_upstream(Some((pki.identity("server"), &[ALPN_HTTP_1_1]))).await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Mtls(id("server")), OutboundProtocol::Http),
        )
        .await;
        for i in 0..3 {
            let (status, body) = get(proxy, &format!("/h1/{i}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let v = json(&body);
            assert_eq!(v["peer"], "spiffe://cluster.local/ns/foo/sa/client");
            assert_eq!(v["version"], "HTTP/1.1");
            assert_eq!(v["authority"], "server.foo:80");
            assert_eq!(v["path"], format!("/h1/{i}"));
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test]
async fn http_to_a_server_with_another_identity_is_503() {
    bounded(async {
        let pki = Pki::new();
        let (up, seen) =
            http_upstream(Some((pki.identity("impostor"), &[ALPN_H2, ALPN_HTTP_1_1]))).await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Mtls(id("server")), OutboundProtocol::Http),
        )
        .await;
        let (status, body) = get(proxy, "/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, UPSTREAM_FAILURE_BODY);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
    })
    .await
}

#[tokio::test]
async fn http_to_an_upstream_that_is_down_is_503() {
    bounded(async {
        let pki = Pki::new();
        let up = closed_port().await;
        for security in [Security::Mtls(id("server")), Security::Plaintext] {
            let proxy = outbound(
                pki.identity("client"),
                dest(up, security, OutboundProtocol::Http),
            )
            .await;
            let (status, body) = get(proxy, "/").await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body, UPSTREAM_FAILURE_BODY);
        }
    })
    .await
}

#[tokio::test]
async fn http_plaintext_is_forwarded_without_tls_and_pooled() {
    bounded(async {
        let pki = Pki::new();
        let (up, seen) = http_upstream(None).await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Plaintext, OutboundProtocol::Http),
        )
        .await;
        for _ in 0..2 {
            let (status, body) = get(proxy, "/plain").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let v = json(&body);
            assert_eq!(v["peer"], serde_json::Value::Null);
            assert_eq!(v["version"], "HTTP/1.1");
            assert_eq!(v["path"], "/plain");
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test]
async fn oversized_app_headers_get_431_and_are_never_forwarded() {
    bounded(async {
        let pki = Pki::new();
        let (up, seen) = http_upstream(None).await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Plaintext, OutboundProtocol::Http),
        )
        .await;
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let pad = "a".repeat(70 * 1024);
        let req = format!("GET /big HTTP/1.1\r\nhost: server.foo\r\nx-pad: {pad}\r\n\r\n");
        let _ = s.write_all(req.as_bytes()).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
        // A normal request still goes through.
        let (status, _) = get(proxy, "/small").await;
        assert_eq!(status, StatusCode::OK);
    })
    .await
}

#[tokio::test]
async fn h2c_from_the_app_is_forwarded() {
    bounded(async {
        let pki = Pki::new();
        let (up, _) =
            http_upstream(Some((pki.identity("server"), &[ALPN_H2, ALPN_HTTP_1_1]))).await;
        let proxy = outbound(
            pki.identity("client"),
            dest(up, Security::Mtls(id("server")), OutboundProtocol::Http),
        )
        .await;
        let s = TcpStream::connect(proxy).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://server.foo:8080/grpc")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v = json(std::str::from_utf8(&body).unwrap());
        assert_eq!(v["authority"], "server.foo:8080");
        assert_eq!(v["path"], "/grpc");
    })
    .await
}

// ---------------------------------------------------------------- routes from configuration

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: foo}
spec:
  selector: {app: server}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-echo, port: 9000}
  - {name: http-old, port: 7000}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: foo}
spec:
  template:
    metadata: {labels: {app: server}}
    spec:
      serviceAccountName: server
      containers:
      - name: s
        ports: [{containerPort: 8080}, {containerPort: 9000}, {containerPort: 7000}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pa, namespace: foo}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: STRICT}
  portLevelMtls: {7000: {mode: DISABLE}}
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: legacy}
spec:
  selector: {app: old}
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: old, namespace: legacy}
spec:
  template:
    metadata: {labels: {app: old}}
    spec:
      containers:
      - name: o
        ports: [{containerPort: 8080}]
"#;

#[test]
fn routes_follow_auto_mtls_and_the_declared_protocol() {
    let mut l = warden_policy::config::Loader::new();
    l.add_text("mesh.yaml", MESH);
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    let up: SocketAddr = "127.0.0.1:15006".parse().unwrap();
    let server = cfg.workload("foo", "server").unwrap();
    let old = cfg.workload("legacy", "old").unwrap();

    let d = destination_for(&cfg, server, 80, up).unwrap();
    assert_eq!(d.security, Security::Mtls(id("server")));
    assert_eq!(d.protocol, OutboundProtocol::Http);
    assert_eq!(d.sni.as_deref(), Some(SNI));

    let d = destination_for(&cfg, server, 9000, up).unwrap();
    assert_eq!(d.security, Security::Mtls(id("server")));
    assert_eq!(d.protocol, OutboundProtocol::Tcp);
    assert_eq!(
        d.sni.as_deref(),
        Some("outbound_.9000_._.server.foo.svc.cluster.local")
    );

    // DISABLE port and a destination without a sidecar: plaintext, no SNI.
    for (wl, port) in [(server, 7000), (old, 80)] {
        let d = destination_for(&cfg, wl, port, up).unwrap();
        assert_eq!(d.security, Security::Plaintext, "{}:{port}", wl.id());
        assert_eq!(d.protocol, OutboundProtocol::Http);
        assert_eq!(d.sni, None);
    }

    let err = destination_for(&cfg, server, 1234, up).unwrap_err();
    assert!(err.to_string().contains("port 1234"), "{err}");
}

#[test]
fn istio_sni_has_istios_shape() {
    assert_eq!(istio_sni(80, "server.foo.svc.cluster.local"), SNI);
}
