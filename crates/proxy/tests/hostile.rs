//! Hostile input against the inbound proxy (issue 4, point 7), end to end over 127.0.0.1:
//! malformed and oversized HTTP, slow clients, path tricks, duplicate headers, `Host` games,
//! bad peers at the handshake and bad JWTs. Each test asserts what Istio's sidecar (Envoy)
//! would answer, that the app never saw the hostile request, and that the proxy still serves
//! a normal request afterwards. Every test runs inside `bounded` and synchronises on I/O only.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose as Eku,
    IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::{Svid, TrustBundle};
use warden_identity::tls::IdentityState;
use warden_policy::config::{Config, Loader};
use warden_policy::engine::{InlineJwksOnly, WorkloadPolicy};
use warden_proxy::{port_table, InboundProxy};

const TD: &str = "cluster.local";
const LIMIT: Duration = Duration::from_secs(30);
const HTTP_PORT: u16 = 8080;
/// The header read timeout the proxies in these tests use.
const HEADER_TIMEOUT: Duration = Duration::from_millis(300);
const IDLE_TIMEOUT: Duration = Duration::from_millis(1000);

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test timed out")
}

// ---------------------------------------------------------------- configuration

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: foo}
spec:
  selector: {app: server}
  ports:
  - {name: http, port: 80, targetPort: 8080}
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
        ports: [{containerPort: 8080}]
"#;

fn config(extra: &str) -> Config {
    let mut l = Loader::new();
    l.add_text("hostile.yaml", &format!("{BASE}\n---\n{extra}"));
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    cfg
}

fn ap(name: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: {action}\n{rules}\n---\n"
    )
}

fn pa(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  mtls: {{mode: {mode}}}\n---\n"
    )
}

// ---------------------------------------------------------------- certificates

struct Pki {
    root_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its PKCS#8 key.
struct Leaf {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Pki {
            root_der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: TD.into(),
            roots_der: vec![self.root_der.clone()],
        }
    }

    /// An SVID-shaped leaf for `id`; `expired` puts its validity a day in the past.
    fn leaf(&self, id: &str, expired: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.key_usages = vec![Ku::DigitalSignature, Ku::KeyEncipherment];
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        if expired {
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::days(2);
            p.not_after = now - time::Duration::days(1);
        }
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.der().to_vec(),
            key: key.serialize_der(),
        }
    }

    /// The proxy's own identity: SVID `spiffe://cluster.local/ns/foo/sa/server`.
    fn server_identity(&self) -> Arc<IdentityState> {
        let id = SpiffeId::new(TD, "foo", "server").unwrap();
        let leaf = self.leaf(&id.to_string(), false);
        let svid = Svid {
            id,
            cert_chain_der: vec![leaf.cert],
            key_pkcs8_der: leaf.key,
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
        };
        Arc::new(IdentityState::with_svid(svid, self.bundle()).unwrap())
    }
}

/// Accepts any server certificate: these tests probe the proxy's checks of the *client*
/// certificate, so the client must present whatever it is given and not give up first.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects over TLS presenting `leaf`, sends one HTTP/1.1 request and reads until the proxy
/// closes. `Ok(answer)` when the handshake passed (the answer may be empty if the server
/// refused the certificate after a TLS 1.3 client finished), `Err` when it was refused.
async fn tls_exchange(addr: SocketAddr, leaf: &Leaf) -> Result<Vec<u8>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(
            vec![CertificateDer::from(leaf.cert.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key.clone())),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /tls HTTP/1.1\r\nhost: server.foo\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(out)
}

// ---------------------------------------------------------------- the app and the proxy

/// An HTTP/1.1 app answering `ok <path>` and recording every request target it receives.
async fn recording_app() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str().to_string())
                            .unwrap_or_default();
                        record.lock().unwrap().push(path.clone());
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(format!("ok {path}")),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

struct Harness {
    pki: Pki,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Harness {
    async fn start(extra: &str) -> Harness {
        let cfg = config(extra);
        let wl = cfg.workload("foo", "server").unwrap();
        let table = port_table(&cfg, wl);
        let (app, seen) = recording_app().await;
        let ports = table.iter().map(|(p, s)| (*p, s.with_app(app))).collect();
        let pki = Pki::new("warden hostile tests root");
        let policy = Arc::new(WorkloadPolicy::compile(&cfg, wl, &InlineJwksOnly));
        let store = Arc::new(ArcSwap::new(policy));
        let proxy = Arc::new(
            InboundProxy::new(store, pki.server_identity(), ports)
                .with_header_read_timeout(HEADER_TIMEOUT)
                .with_idle_timeout(IDLE_TIMEOUT),
        );
        let l = proxy
            .bind(HTTP_PORT, (Ipv4Addr::LOCALHOST, 0).into())
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(l.run());
        Harness { pki, addr, seen }
    }

    /// Whether the app ever received a request whose target contains `needle`.
    fn app_saw(&self, needle: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|p| p.contains(needle))
    }

    fn app_requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// A normal plaintext request still gets through to the app.
    async fn still_serves(&self) {
        self.still_serves_with(&[]).await
    }

    /// The same, with `headers` (what the policy requires of a normal request).
    async fn still_serves_with(&self, headers: &[(&str, &str)]) {
        let (status, body) = self.get("/healthy", headers).await;
        assert_eq!(status, 200, "the proxy stopped serving: {body}");
        assert_eq!(body, "ok /healthy");
    }

    /// A plaintext HTTP/1.1 request for `target` with `headers`, sent as raw bytes so that
    /// nothing on the client side normalizes it; the status and body of the answer.
    async fn get(&self, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut req = format!("GET {target} HTTP/1.1\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            req.push_str("host: server.foo\r\n");
        }
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("connection: close\r\n\r\n");
        let out = raw_exchange(self.addr, req.as_bytes()).await;
        parse_answer(&out).unwrap_or_else(|| panic!("no HTTP answer to {target}: {out:?}"))
    }
}

/// Sends raw bytes and reads until the proxy closes: everything it answered. A write or read
/// cut short by a reset (the proxy closing on unread bytes) still returns what came back.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}

/// The status and body of an HTTP/1.1 answer (bodies here are small and not chunked).
fn parse_answer(out: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(out);
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Some((status, body.to_string()))
}

fn status_of(out: &[u8]) -> Option<u16> {
    parse_answer(out).map(|(s, _)| s)
}

// ---------------------------------------------------------------- malformed and oversized HTTP

#[tokio::test]
async fn malformed_request_lines_get_400_and_are_never_forwarded() {
    bounded(async {
        let h = Harness::start("").await;
        let bad: [&[u8]; 5] = [
            b"GET /a b c HTTP/1.1\r\nhost: server.foo\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /evil HTTP/1.1 extra\r\nhost: server.foo\r\n\r\n",
            b"GET /evil\x01 HTTP/1.1\r\nhost: server.foo\r\n\r\n",
            b"GET /evil HTTP/1.1\r\nbad header\r\n\r\n",
        ];
        for req in bad {
            let out = raw_exchange(h.addr, req).await;
            let status = status_of(&out);
            assert!(
                out.is_empty() || status == Some(400),
                "{:?} got {:?}",
                String::from_utf8_lossy(req),
                String::from_utf8_lossy(&out)
            );
            h.still_serves().await;
        }
        assert!(!h.app_saw("evil") && !h.app_saw("/a"), "{:?}", h.seen);
    })
    .await
}

#[tokio::test]
async fn oversized_headers_get_431_and_are_never_forwarded() {
    bounded(async {
        let h = Harness::start("").await;
        // 20 headers of 10 KB: 200 KB, well under hyper's own ~400 KiB buffer and 100-header
        // limit but over Envoy's 60 KiB `max_request_headers_kb`.
        let mut req = String::from("GET /big HTTP/1.1\r\nhost: server.foo\r\n");
        for i in 0..20 {
            req.push_str(&format!("x-pad-{i}: {}\r\n", "a".repeat(10_000)));
        }
        req.push_str("\r\n");
        let out = raw_exchange(h.addr, req.as_bytes()).await;
        let status = status_of(&out);
        assert!(
            out.is_empty() || matches!(status, Some(431) | Some(400)),
            "200 KB of headers got {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
        // One 200 KB header likewise.
        let req = format!(
            "GET /big1 HTTP/1.1\r\nhost: server.foo\r\nx-pad: {}\r\n\r\n",
            "b".repeat(200_000)
        );
        let out = raw_exchange(h.addr, req.as_bytes()).await;
        assert!(
            out.is_empty() || matches!(status_of(&out), Some(431) | Some(400)),
            "a 200 KB header got {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
        assert!(!h.app_saw("/big"), "oversized headers were forwarded");
        // Under the limit (50 KB of headers) still passes, as it does through Envoy.
        let pad = "c".repeat(50_000);
        let (status, body) = h.get("/fits", &[("x-pad", &pad)]).await;
        assert_eq!((status, body.as_str()), (200, "ok /fits"));
        h.still_serves().await;
    })
    .await
}

#[tokio::test]
async fn a_slow_client_is_closed_after_the_header_timeout() {
    bounded(async {
        let h = Harness::start("").await;
        let started = tokio::time::Instant::now();
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        // Half a request line, then nothing.
        s.write_all(b"GET /slo").await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let waited = started.elapsed();
        assert!(
            out.is_empty() || status_of(&out) == Some(408),
            "answered: {:?}",
            String::from_utf8_lossy(&out)
        );
        // Closed by the header timeout, not the 5 s detection timeout or the test's limit.
        assert!(
            waited >= HEADER_TIMEOUT && waited < Duration::from_secs(5),
            "closed after {waited:?}"
        );
        assert_eq!(h.app_requests(), 0);
        h.still_serves().await;
    })
    .await
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    bounded(async {
        // HTTP/1 keep-alive connections are closed sooner, by the header timeout between
        // requests; an HTTP/2 connection has no such timer, so the idle timeout is what ends it.
        let h = Harness::start("").await;
        let tcp = TcpStream::connect(h.addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::get("http://server.foo/once")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok /once");
        let answered = tokio::time::Instant::now();
        // Nothing more is sent: the proxy must end the connection by itself.
        let _ = conn.await;
        let waited = answered.elapsed();
        assert!(
            waited >= IDLE_TIMEOUT - Duration::from_millis(50) && waited < Duration::from_secs(5),
            "closed after {waited:?}"
        );
        h.still_serves().await;
    })
    .await
}

// ---------------------------------------------------------------- path tricks

#[tokio::test]
async fn path_tricks_against_a_deny_on_admin() {
    bounded(async {
        let deny = ap(
            "deny-admin",
            "DENY",
            "  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
        );
        let h = Harness::start(&deny).await;
        // Sanity: the rule works.
        assert_eq!(
            h.get("/admin", &[]).await,
            (403, "RBAC: access denied".into())
        );
        // Dot segments, plain or `%2e`-encoded, are removed before authorization.
        for trick in [
            "/public/../admin",
            "/%2e%2e/admin",
            "/%2E%2E/admin",
            "/./admin",
        ] {
            let (status, body) = h.get(trick, &[]).await;
            assert_eq!(status, 403, "{trick}: {body}");
            h.still_serves().await;
        }
        // A fragment never reaches authorization as part of the path: stripped (Envoy's
        // default) or refused, never forwarded past the DENY.
        let (status, body) = h.get("/admin#x", &[]).await;
        assert!(status == 403 || status == 400, "/admin#x: {status} {body}");
        // BASE normalization does not merge slashes: `//admin` is not `/admin` (docs/
        // semantics.md; MERGE_SLASHES would deny it), and reaches the app unchanged.
        let (status, body) = h.get("//admin", &[]).await;
        assert_eq!((status, body.as_str()), (200, "ok //admin"));
        // Envoy does not strip matrix parameters: `/admin;x` is another path.
        let (status, body) = h.get("/admin;x", &[]).await;
        assert_eq!((status, body.as_str()), (200, "ok /admin;x"));
        // `%2F` stays escaped under BASE: the path is `/%2Fadmin`, which `/admin` does not
        // match, and the app gets it escaped.
        let (status, body) = h.get("/%2Fadmin", &[]).await;
        assert_eq!((status, body.as_str()), (200, "ok /%2Fadmin"));
        // The app never saw any request for `/admin` itself.
        let seen = h.seen.lock().unwrap().clone();
        assert!(
            !seen
                .iter()
                .any(|p| p == "/admin" || p.starts_with("/admin?")),
            "{seen:?}"
        );
        h.still_serves().await;
    })
    .await
}

// ---------------------------------------------------------------- headers

#[tokio::test]
async fn a_duplicate_header_cannot_hide_a_denied_value() {
    bounded(async {
        let deny = ap(
            "deny-admin-role",
            "DENY",
            "  rules: [{when: [{key: \"request.headers[x-role]\", values: [admin]}]}]",
        );
        let h = Harness::start(&deny).await;
        let (status, _) = h
            .get("/dup", &[("x-role", "user"), ("x-role", "admin")])
            .await;
        assert_eq!(status, 403);
        let (status, _) = h
            .get("/dup", &[("x-role", "admin"), ("x-role", "user")])
            .await;
        assert_eq!(status, 403);
        let (status, _) = h.get("/dup", &[("x-role", "admin, user")]).await;
        assert_eq!(status, 200, "one value `admin, user` is not `admin`");
        assert_eq!(h.get("/dup", &[("x-role", "user")]).await.0, 200);
        h.still_serves().await;
    })
    .await
}

#[tokio::test]
async fn host_matching_ignores_case_but_not_the_port() {
    bounded(async {
        let allow = ap(
            "allow-example",
            "ALLOW",
            "  rules: [{to: [{operation: {hosts: [\"example.com\"]}}]}]",
        );
        let h = Harness::start(&allow).await;
        assert_eq!(h.get("/h1", &[("host", "example.com")]).await.0, 200);
        assert_eq!(h.get("/h2", &[("host", "EXAMPLE.COM")]).await.0, 200);
        assert_eq!(h.get("/h3", &[("host", "Example.Com")]).await.0, 200);
        let (status, body) = h.get("/h4", &[("host", "example.com:80")]).await;
        assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
        assert_eq!(h.get("/h5", &[("host", "evil.com")]).await.0, 403);
        assert!(!h.app_saw("/h4") && !h.app_saw("/h5"));
        assert_eq!(h.get("/h6", &[("host", "example.com")]).await.0, 200);
    })
    .await
}

// ---------------------------------------------------------------- peers

#[tokio::test]
async fn strict_refuses_plaintext_and_bad_certificates() {
    bounded(async {
        let h = Harness::start(&pa("STRICT")).await;
        // Plaintext: closed with no bytes.
        let out = raw_exchange(h.addr, b"GET /plain HTTP/1.1\r\nhost: server.foo\r\n\r\n").await;
        assert!(out.is_empty(), "STRICT answered plaintext: {out:?}");

        // Control: a good SVID from the mesh CA gets through with this client.
        let good = h.pki.leaf("spiffe://cluster.local/ns/foo/sa/good", false);
        let out = tls_exchange(h.addr, &good)
            .await
            .expect("good peer refused");
        assert_eq!(
            status_of(&out),
            Some(200),
            "{:?}",
            String::from_utf8_lossy(&out)
        );

        let refused = |what: &str, r: Result<Vec<u8>, String>| match r {
            Err(_) => {}
            Ok(out) => assert!(
                out.is_empty(),
                "{what} was answered: {:?}",
                String::from_utf8_lossy(&out)
            ),
        };
        // Another CA, another trust domain.
        let evil = Pki::new("evil root");
        let leaf = evil.leaf("spiffe://evil.example/ns/foo/sa/x", false);
        refused("another CA's leaf", tls_exchange(h.addr, &leaf).await);
        // The mesh's own CA, but a trust domain that is neither the mesh's nor an alias.
        let leaf = h.pki.leaf("spiffe://evil.example/ns/foo/sa/x", false);
        refused("a foreign trust domain", tls_exchange(h.addr, &leaf).await);
        // The mesh's CA and trust domain, but expired.
        let leaf = h.pki.leaf("spiffe://cluster.local/ns/foo/sa/good", true);
        refused("an expired certificate", tls_exchange(h.addr, &leaf).await);

        assert_eq!(
            h.seen.lock().unwrap().as_slice(),
            ["/tls".to_string()],
            "only the good peer's request reaches the app"
        );
        let out = tls_exchange(h.addr, &good)
            .await
            .expect("good peer refused");
        assert_eq!(status_of(&out), Some(200));
    })
    .await
}

// ---------------------------------------------------------------- JWTs

const ISSUER: &str = "https://issuer.example";

// A fixed throwaway RSA key (the one `warden-policy`'s JWT tests use).
const RSA_PRIVATE_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEpAIBAAKCAQEArXXcLEeG0J3dYyWtvw/u1+0gMhs7B5JOYmVWBIg3ZsTKszWE
xWaWQwqsqX4Z5wS9qWRNwMw2vVy8DhP+iUnPsR4LsHhScWDpc4r1uztflDdWuiES
q0PKXLPMlQIC+SPCYij35y7ifQxI/sKXBog8peA79IcUWXa/l+Nlcy9yQRbX+41i
QcMiWVd9M6ranM22KT96PQy+p/oF5ar7hpm2GiZ0EWl8DIJlDPpiP+dZpzsifjY6
Lv8ntv2DqoSfkRqA1arIgGC+rRJgLMTKJRephN5lgXE0IiyE/ERNRISb1AEJ9hox
axR6HQkvkGH7qGkKcAtwu+zj9gIlto/r+G/vFQIDAQABAoIBAFQd1JBwezMNav+a
lQATVOrHJhbGV8DbNUHIDIeUGvGuOvHe4SztC68lLQfgi+UYynSrnH0DSwRXRSa6
kXO4JIyqmlaQcsJikbMjTvjl2PrCPz9xrGD7NdXwpyQXXqO8sJXzcgxdEx465+cL
LDvRsz9pVwnEu5yK1mxsrJTIDGr9QWU+NQ0ty0H1tO+/oEthmZAVlwOUdH8R6hhQ
j+wRWDDGZ5QvpSawbsB0T6P0rW7pKh9r8wiDoIY5tQbBlasNB0iSVkNguMf4gTjE
oAFcGuIweqIUB55v1LIMs98gF98pIXjYMC3+SSddB2pSi53DRcSkzNtqRyQpw/E0
qV3OuN0CgYEA2w+NE88bGQrnnviSd90Cg+lLV/v3nD5XKuwkUCAKvaRKCbF0ZYss
cwwzzZ43SxBNjjap1yUCMR9hYl0wkuWcPT0bkhi3Cqmv1eGf57kvFUqhUuCNvBuc
2fcq5/k2RpcUxNYF/fpIjwB9DaQotOtCNO8eMb9inpTL/MoyA8d2e0sCgYEAyrXT
W0Cegv03qQXnGJf4VGHGoS1wvJmDNJgeP78v2HC3j3rkVJ2YsdIYgi7mTA2yMlD9
CL7P941ONffA965hID7FoFDoRB0mphbuljAbOkok/1cKt0M+smQtwGpHOnXv5dVW
jxMD2A5QALVormXX0zVltNjtZJb9BBRSzWubYx8CgYEArUEiai1eGDNYt5GPfj+N
Mrk7/s1oq+leVbNIkRqWhCDA8eOo1Hr7X86h1hkxUCwHutefAmrhzeoswnhD55q0
NHb1LFphwowsZrO5HbOH+oX5C6xQTRtltbpX8/pVpATvxzIisRnXc0qGnVhdXaHH
zkfkkKH2pMe4gimE3xpNqfsCgYEAgFQFfsJ01vYZE47iEwa6NilEButucGc60cPv
emm9j2ckPdgNzqeKcCBSVa/9KW6OPh5ZYfzySYSSW8YByosBf9ldYTV3JQ/TVNg1
qKzBv/AKZf+jkAspGOQktqhReWgKPFUHnEHscA33hctSfv2IWXR3c7rU5pZTjQ6U
sOkLkP8CgYB27an9k2JxlvYZZHOL28PA16AC8E4CqvOiqQCDNlU/GAH5oefOAJqb
PKfaAQsXYU0z78FVWKA+lxq6ibkjkx95B+ZVN30QJo6BgdOD+jovJCslx2HNFIWR
03obJSsxd5dEKQ9c2Ez1rGGYAT87P5CQHFoZaySfTPnF5UROUUyJNA==
-----END RSA PRIVATE KEY-----";
/// Base64 of the SubjectPublicKeyInfo DER of the key above: the bytes an attacker would use
/// as an HMAC secret.
const RSA_PUBLIC_B64: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEArXXcLEeG0J3dYyWtvw/u1+0gMhs7B5JOYmVWBIg3ZsTKszWExWaWQwqsqX4Z5wS9qWRNwMw2vVy8DhP+iUnPsR4LsHhScWDpc4r1uztflDdWuiESq0PKXLPMlQIC+SPCYij35y7ifQxI/sKXBog8peA79IcUWXa/l+Nlcy9yQRbX+41iQcMiWVd9M6ranM22KT96PQy+p/oF5ar7hpm2GiZ0EWl8DIJlDPpiP+dZpzsifjY6Lv8ntv2DqoSfkRqA1arIgGC+rRJgLMTKJRephN5lgXE0IiyE/ERNRISb1AEJ9hoxaxR6HQkvkGH7qGkKcAtwu+zj9gIlto/r+G/vFQIDAQAB";
const RSA_N: &str = "rXXcLEeG0J3dYyWtvw_u1-0gMhs7B5JOYmVWBIg3ZsTKszWExWaWQwqsqX4Z5wS9qWRNwMw2vVy8DhP-iUnPsR4LsHhScWDpc4r1uztflDdWuiESq0PKXLPMlQIC-SPCYij35y7ifQxI_sKXBog8peA79IcUWXa_l-Nlcy9yQRbX-41iQcMiWVd9M6ranM22KT96PQy-p_oF5ar7hpm2GiZ0EWl8DIJlDPpiP-dZpzsifjY6Lv8ntv2DqoSfkRqA1arIgGC-rRJgLMTKJRephN5lgXE0IiyE_ERNRISb1AEJ9hoxaxR6HQkvkGH7qGkKcAtwu-zj9gIlto_r-G_vFQ";

/// RequestAuthentication with the RSA key (no `alg`, so only its type limits how it is
/// used), and an ALLOW that requires alice's token.
fn jwt_policies() -> String {
    let jwks = format!(r#"{{"keys":[{{"kty":"RSA","kid":"rsa-1","n":"{RSA_N}","e":"AQAB"}}]}}"#);
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{jwks}'\n---\n{}",
        ap(
            "require-alice",
            "ALLOW",
            "  rules: [{from: [{source: {requestPrincipals: [\"https://issuer.example/alice\"]}}]}]"
        )
    )
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(exp: i64, nbf: Option<i64>) -> serde_json::Value {
    let mut c = serde_json::json!({"iss": ISSUER, "sub": "alice", "exp": exp});
    if let Some(nbf) = nbf {
        c["nbf"] = nbf.into();
    }
    c
}

fn rs256(claims: &serde_json::Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    let body: String = RSA_PRIVATE_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let key = jsonwebtoken::EncodingKey::from_rsa_der(&b64_decode(&body));
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

fn hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("rsa-1".into());
    jsonwebtoken::encode(&h, claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap()
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn b64_decode(text: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let vals: Vec<u32> = text
        .bytes()
        .filter(|c| *c != b'=')
        .map(|c| A.iter().position(|a| *a == c).unwrap() as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in vals.chunks(4) {
        let mut n = 0u32;
        for (i, v) in chunk.iter().enumerate() {
            n |= v << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[tokio::test]
async fn hostile_jwts_get_401_and_are_never_forwarded() {
    bounded(async {
        let h = Harness::start(&jwt_policies()).await;
        let exp = now() + 3600;
        let valid = rs256(&claims(exp, None));
        // Control: the valid token is forwarded.
        let (status, body) = h
            .get("/ok", &[("authorization", &format!("Bearer {valid}"))])
            .await;
        assert_eq!((status, body.as_str()), (200, "ok /ok"));

        let bearer = format!("Bearer {valid}");
        let normal = [("authorization", bearer.as_str())];
        let mut parts = valid.split('.');
        let (header, _, signature) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let admin = serde_json::json!({"iss": ISSUER, "sub": "admin", "exp": exp});
        let admin_payload = b64url(admin.to_string().as_bytes());
        let alice_payload = b64url(claims(exp, None).to_string().as_bytes());
        let none_header = b64url(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#);
        let spki = b64_decode(RSA_PUBLIC_B64);
        let pem =
            format!("-----BEGIN PUBLIC KEY-----\n{RSA_PUBLIC_B64}\n-----END PUBLIC KEY-----\n");
        let hostile: Vec<(&str, String)> = vec![
            // alice's signature on a payload that names admin.
            ("forged", format!("{header}.{admin_payload}.{signature}")),
            // alice's payload with a corrupted signature.
            (
                "bad signature",
                format!(
                    "{header}.{alice_payload}.{}",
                    signature.replace(['A', 'B'], "C")
                ),
            ),
            ("alg none", format!("{none_header}.{alice_payload}.")),
            (
                "alg none signed",
                format!("{none_header}.{alice_payload}.c2ln"),
            ),
            ("hs256 with the spki", hs256(&spki, &claims(exp, None))),
            (
                "hs256 with the pem",
                hs256(pem.as_bytes(), &claims(exp, None)),
            ),
            ("hs256 with n", hs256(RSA_N.as_bytes(), &claims(exp, None))),
            ("expired", rs256(&claims(now() - 3600, None))),
            ("not yet valid", rs256(&claims(exp, Some(now() + 1800)))),
        ];
        for (what, token) in &hostile {
            let (status, body) = h
                .get(
                    &format!("/jwt-{}", what.replace(' ', "-")),
                    &[("authorization", &format!("Bearer {token}"))],
                )
                .await;
            assert_eq!(status, 401, "{what}: {body}");
            h.still_serves_with(&normal).await;
        }

        // A 1 MB token: over the header limit, refused before any decoding.
        let huge = format!(
            "GET /jwt-huge HTTP/1.1\r\nhost: server.foo\r\nauthorization: Bearer {}.{}.{}\r\n\r\n",
            header,
            "a".repeat(1 << 20),
            signature
        );
        let out = raw_exchange(h.addr, huge.as_bytes()).await;
        assert!(
            out.is_empty() || matches!(status_of(&out), Some(401) | Some(431) | Some(400)),
            "a 1 MB token got {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
        // A 50 KB token fits in the header limit: the JWT filter refuses it.
        let (status, body) = h
            .get(
                "/jwt-big",
                &[("authorization", &format!("Bearer {}", "a".repeat(50_000)))],
            )
            .await;
        assert_eq!(status, 401, "{body}");

        assert!(!h.app_saw("/jwt"), "{:?}", h.seen);
        h.still_serves_with(&normal).await;
    })
    .await
}
