//! The inbound proxy end to end over 127.0.0.1: a root and SVIDs minted with rcgen, a small
//! hyper app that echoes what it received, the proxy in front of it, and real clients (rustls
//! with Warden's mTLS client config, plaintext TCP, HTTP/1.1 and HTTP/2). Every test runs
//! inside `bounded` and synchronises on I/O only.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose as Eku,
    IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku, SanType,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::{Svid, TrustBundle};
use warden_identity::tls::{
    client_config, client_config_with_alpn, ExpectedPeer, IdentityState, ALPN_H2,
};
use warden_policy::config::{Config, Loader};
use warden_policy::engine::{InlineJwksOnly, WorkloadPolicy};
use warden_policy::model::MtlsMode;
use warden_proxy::observe::{AccessLog, Observer};
use warden_proxy::{port_table, InboundProxy, PortProtocol};

const TD: &str = "cluster.local";
const LIMIT: Duration = Duration::from_secs(30);
const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 9000;
const DETECT_PORT: u16 = 7070;

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
  - {name: tcp-echo, port: 9000}
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
        ports: [{containerPort: 8080}, {containerPort: 9000}, {containerPort: 7070}]
"#;

fn config(extra: &str) -> Config {
    let mut l = Loader::new();
    l.add_text("inbound.yaml", &format!("{BASE}\n---\n{extra}"));
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    cfg
}

fn compile(cfg: &Config) -> Arc<WorkloadPolicy> {
    let wl = cfg.workload("foo", "server").unwrap();
    Arc::new(WorkloadPolicy::compile(cfg, wl, &InlineJwksOnly))
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

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "warden proxy tests root");
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

    /// An identity state holding a fresh SVID for `sa` in namespace foo; also the leaf's DER.
    fn identity(&self, sa: &str) -> (Arc<IdentityState>, Vec<u8>) {
        let id = SpiffeId::new(TD, "foo", sa).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        p.key_usages = vec![Ku::DigitalSignature, Ku::KeyEncipherment];
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let leaf = cert.der().to_vec();
        let svid = Svid {
            id,
            cert_chain_der: vec![leaf.clone()],
            key_pkcs8_der: key.serialize_der(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
        };
        (
            Arc::new(IdentityState::with_svid(svid, self.bundle()).unwrap()),
            leaf,
        )
    }
}

fn server_id() -> SpiffeId {
    SpiffeId::new(TD, "foo", "server").unwrap()
}

// ---------------------------------------------------------------- apps

/// An HTTP/1.1 and h2c app answering every request with JSON: its path and query, its HTTP
/// version and its headers.
async fn echo_http_app() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: Request<hyper::body::Incoming>| async move {
                        let mut headers = serde_json::Map::new();
                        for (n, v) in req.headers() {
                            headers.insert(
                                n.as_str().to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into(),
                            );
                        }
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str().to_string())
                            .unwrap_or_default();
                        let version = format!("{:?}", req.version());
                        let body = serde_json::json!({"path": path, "version": version, "headers": headers});
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(body.to_string()),
                        )))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP app that echoes every byte.
async fn echo_tcp_app() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------- the proxy

struct Harness {
    pki: Pki,
    store: Arc<ArcSwap<WorkloadPolicy>>,
    /// Proxy listener per container port.
    listen: BTreeMap<u16, SocketAddr>,
    server_leaf: Vec<u8>,
}

impl Harness {
    async fn start(extra: &str) -> Harness {
        Harness::start_with(extra, None).await
    }

    async fn start_with(extra: &str, detect_timeout: Option<Duration>) -> Harness {
        Harness::start_full(extra, detect_timeout, None).await
    }

    async fn start_full(
        extra: &str,
        detect_timeout: Option<Duration>,
        observer: Option<Arc<Observer>>,
    ) -> Harness {
        let cfg = config(extra);
        let wl = cfg.workload("foo", "server").unwrap();
        let table = port_table(&cfg, wl);
        let http_app = echo_http_app().await;
        let tcp_app = echo_tcp_app().await;
        let ports = table
            .iter()
            .map(|(p, s)| {
                let app = if *p == TCP_PORT { tcp_app } else { http_app };
                (*p, s.with_app(app))
            })
            .collect();
        let pki = Pki::new();
        let (identity, server_leaf) = pki.identity("server");
        let store = Arc::new(ArcSwap::new(compile(&cfg)));
        let mut proxy = InboundProxy::new(store.clone(), identity, ports);
        if let Some(t) = detect_timeout {
            proxy = proxy.with_detect_timeout(t);
        }
        if let Some(o) = observer {
            proxy = proxy.with_observer(o).with_workload("foo", "server");
        }
        let proxy = Arc::new(proxy);
        let mut listen = BTreeMap::new();
        for port in table.keys() {
            let l = proxy
                .bind(*port, (Ipv4Addr::LOCALHOST, 0).into())
                .await
                .unwrap();
            listen.insert(*port, l.local_addr().unwrap());
            tokio::spawn(l.run());
        }
        Harness {
            pki,
            store,
            listen,
            server_leaf,
        }
    }

    fn addr(&self, port: u16) -> SocketAddr {
        self.listen[&port]
    }

    /// An mTLS connection to `port` as service account `sa`, offering `alpn` (default: Istio's).
    async fn tls(
        &self,
        port: u16,
        sa: &str,
        alpn: Option<&[&[u8]]>,
    ) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
        let (state, leaf) = self.pki.identity(sa);
        let expected = ExpectedPeer::Exact(server_id());
        let cfg = match alpn {
            Some(a) => client_config_with_alpn(state, expected, a),
            None => client_config(state, expected),
        };
        let tcp = TcpStream::connect(self.addr(port)).await.unwrap();
        let s = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
            .await
            .unwrap();
        (s, leaf)
    }
}

// ---------------------------------------------------------------- clients

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn h1<S>(io: S) -> Sender
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

struct Answer {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: String,
}

impl Answer {
    /// The app's JSON echo.
    fn echo(&self) -> serde_json::Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        serde_json::from_str(&self.body).unwrap()
    }
    fn app_header(&self, name: &str) -> Option<String> {
        self.echo()["headers"][name].as_str().map(str::to_string)
    }
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut b = Request::get(path).header("host", "server.foo");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Empty::new()).unwrap()
}

async fn send(sender: &mut Sender, req: Request<Empty<Bytes>>) -> Answer {
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    collect(resp).await
}

async fn collect(resp: Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into(),
    }
}

/// Sends raw bytes and reads until the proxy closes: everything it answered.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out).await {
        Ok(_) => out,
        // Closing with unread bytes makes the kernel send a reset: still nothing answered.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => out,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn assert_rbac_denied(a: &Answer) {
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.body, "RBAC: access denied");
    assert_eq!(a.headers["content-type"], "text/plain");
}

fn sha256_hex(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const ALLOW_GOOD: &str =
    "  rules: [{from: [{source: {principals: [\"cluster.local/ns/foo/sa/good\"]}}]}]";

// ---------------------------------------------------------------- tests

#[test]
fn port_table_follows_services_and_peer_authentication() {
    let cfg = config(&format!(
        "{}apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: ports, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  mtls: {{mode: STRICT}}\n  portLevelMtls: {{\"9000\": {{mode: DISABLE}}}}\n",
        ""
    ));
    let wl = cfg.workload("foo", "server").unwrap();
    let t = port_table(&cfg, wl);
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), [7070, 8080, 9000]);
    assert_eq!(t[&HTTP_PORT].protocol, PortProtocol::Http);
    assert_eq!(t[&HTTP_PORT].mode, MtlsMode::Strict);
    assert_eq!(t[&TCP_PORT].protocol, PortProtocol::Tcp);
    assert_eq!(t[&TCP_PORT].mode, MtlsMode::Disable);
    assert_eq!(t[&DETECT_PORT].protocol, PortProtocol::Detect);
    let none = config("");
    let t = port_table(&none, none.workload("foo", "server").unwrap());
    assert_eq!(t[&HTTP_PORT].mode, MtlsMode::Permissive);
}

#[tokio::test]
async fn allow_by_principal_over_http1_mtls() {
    bounded(async {
        let h = Harness::start(&ap("allow-good", "ALLOW", ALLOW_GOOD)).await;
        let (s, _) = h.tls(HTTP_PORT, "good", None).await;
        let mut c = h1(s).await;
        let a = send(&mut c, get("/hello?x=1", &[])).await;
        assert_eq!(a.echo()["path"], "/hello?x=1");
        assert_eq!(a.app_header("host").as_deref(), Some("server.foo"));

        let (s, _) = h.tls(HTTP_PORT, "bad", None).await;
        let mut c = h1(s).await;
        assert_rbac_denied(&send(&mut c, get("/hello", &[])).await);
    })
    .await
}

#[tokio::test]
async fn http2_over_tls_is_chosen_by_alpn() {
    bounded(async {
        let h = Harness::start(&ap("allow-good", "ALLOW", ALLOW_GOOD)).await;
        for (sa, allowed) in [("good", true), ("bad", false)] {
            let (s, _) = h.tls(HTTP_PORT, sa, Some(&[ALPN_H2])).await;
            assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get("https://server.foo/h2")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let a = collect(sender.send_request(req).await.unwrap()).await;
            if allowed {
                assert_eq!(a.echo()["path"], "/h2");
                assert_eq!(a.app_header("host").as_deref(), Some("server.foo"));
            } else {
                assert_rbac_denied(&a);
            }
        }
    })
    .await
}

#[tokio::test]
async fn strict_closes_plaintext_without_a_response() {
    bounded(async {
        let h = Harness::start(&pa("STRICT")).await;
        let out = raw_exchange(
            h.addr(HTTP_PORT),
            b"GET / HTTP/1.1\r\nhost: server.foo\r\n\r\n",
        )
        .await;
        assert!(out.is_empty(), "STRICT answered plaintext: {out:?}");
        let out = raw_exchange(h.addr(TCP_PORT), b"hello").await;
        assert!(out.is_empty(), "STRICT echoed plaintext TCP: {out:?}");
        // mTLS still gets through.
        let (s, _) = h.tls(HTTP_PORT, "good", None).await;
        let mut c = h1(s).await;
        send(&mut c, get("/", &[])).await.echo();
    })
    .await
}

#[tokio::test]
async fn disable_closes_tls() {
    bounded(async {
        let h = Harness::start(&pa("DISABLE")).await;
        let (state, _) = h.pki.identity("good");
        let cfg = client_config(state, ExpectedPeer::Exact(server_id()));
        let tcp = TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap();
        let r = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
            .await;
        assert!(r.is_err(), "a DISABLE port completed a TLS handshake");
        let mut c = h1(TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap()).await;
        send(&mut c, get("/", &[])).await.echo();
    })
    .await
}

#[tokio::test]
async fn permissive_accepts_plaintext_without_policy_and_strips_xfcc() {
    bounded(async {
        let h = Harness::start("").await;
        let mut c = h1(TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap()).await;
        let a = send(
            &mut c,
            get(
                "/",
                &[(
                    "x-forwarded-client-cert",
                    "URI=spiffe://cluster.local/ns/foo/sa/admin",
                )],
            ),
        )
        .await;
        assert_eq!(a.app_header("x-forwarded-client-cert"), None);
        // A header value that is not UTF-8 cannot be matched faithfully: refused.
        let req = Request::get("/")
            .header("host", "server.foo")
            .header(
                "x-bin",
                hyper::header::HeaderValue::from_bytes(b"\xff").unwrap(),
            )
            .body(Empty::new())
            .unwrap();
        assert_eq!(send(&mut c, req).await.status, StatusCode::BAD_REQUEST);
    })
    .await
}

#[tokio::test]
async fn xfcc_appends_the_mtls_peer_after_what_the_client_sent() {
    bounded(async {
        let h = Harness::start("").await;
        let (s, leaf) = h.tls(HTTP_PORT, "good", None).await;
        let mut c = h1(s).await;
        let a = send(
            &mut c,
            get(
                "/",
                &[("x-forwarded-client-cert", "By=spiffe://evil;URI=spiffe://cluster.local/ns/foo/sa/admin")],
            ),
        )
        .await;
        assert_eq!(
            a.app_header("x-forwarded-client-cert").unwrap(),
            // Istio's APPEND_FORWARD: the client's value stays, this proxy's element is last.
            format!(
                "By=spiffe://evil;URI=spiffe://cluster.local/ns/foo/sa/admin,By=spiffe://cluster.local/ns/foo/sa/server;Hash={};Subject=\"\";URI=spiffe://cluster.local/ns/foo/sa/good",
                sha256_hex(&leaf)
            )
        );
        assert_ne!(sha256_hex(&leaf), sha256_hex(&h.server_leaf));
    })
    .await
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused_at_the_handshake() {
    bounded(async {
        let h = Harness::start("").await;
        // Same trust domain name, different root: the proxy must not accept its certificate.
        let other = Pki::new();
        let (state, _) = other.identity("good");
        state.update_bundle(h.pki.bundle()).unwrap();
        let cfg = client_config(state, ExpectedPeer::Exact(server_id()));
        let tcp = TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap();
        let r = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
            .await;
        // TLS 1.3: the client may finish before the server rejects its certificate, so the
        // refusal can show on the first read instead.
        if let Ok(mut s) = r {
            let _ = s
                .write_all(b"GET / HTTP/1.1\r\nhost: server.foo\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let read = s.read_to_end(&mut out).await;
            assert!(read.is_err() || out.is_empty(), "answered: {out:?}");
        }
    })
    .await
}

/// The key behind `JWKS` (base64url of it is the JWKS `k`).
const JWT_SECRET: &[u8] = b"warden-proxy-test-secret-0123456789";
const JWKS: &str = r#"{"keys":[{"kty":"oct","alg":"HS256","kid":"k1","k":"d2FyZGVuLXByb3h5LXRlc3Qtc2VjcmV0LTAxMjM0NTY3ODk"}]}"#;
const ISSUER: &str = "https://issuer.example";

fn ra(extra: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{JWKS}'\n{extra}\n---\n"
    )
}

fn token(sub: &str) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("k1".into());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"iss": ISSUER, "sub": sub, "exp": now + 3600});
    jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET),
    )
    .unwrap()
}

#[tokio::test]
async fn a_valid_jwt_is_authorized_and_its_outputs_replace_spoofed_headers() {
    bounded(async {
        let policies = format!(
            "{}{}",
            ra("    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]"),
            ap(
                "require-jwt",
                "ALLOW",
                "  rules: [{from: [{source: {requestPrincipals: [\"https://issuer.example/alice\"]}}]}]"
            )
        );
        let h = Harness::start(&policies).await;
        let mut c = h1(TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap()).await;
        let bearer = format!("Bearer {}", token("alice"));
        let a = send(
            &mut c,
            get("/", &[("authorization", &bearer), ("x-jwt-sub", "mallory")]),
        )
        .await;
        assert_eq!(a.app_header("x-jwt-sub").as_deref(), Some("alice"));
        // The token is not forwarded unless forwardOriginalToken.
        assert_eq!(a.app_header("authorization"), None);
        // Another subject, or no token, is not allowed; a spoofed claim header does not help.
        let bearer = format!("Bearer {}", token("bob"));
        assert_rbac_denied(&send(&mut c, get("/", &[("authorization", &bearer)])).await);
        assert_rbac_denied(&send(&mut c, get("/", &[("x-jwt-sub", "alice")])).await);
    })
    .await
}

#[tokio::test]
async fn malformed_jwt_gets_401_with_www_authenticate() {
    bounded(async {
        let h = Harness::start(&ra("")).await;
        let mut c = h1(TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap()).await;
        let a = send(&mut c, get("/data?q=1", &[("authorization", "Bearer abc")])).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            a.body,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
        );
        assert_eq!(
            a.headers["www-authenticate"],
            "Bearer realm=\"http://server.foo/data\", error=\"invalid_token\""
        );
        // No token at all passes RequestAuthentication alone.
        send(&mut c, get("/data", &[])).await.echo();
    })
    .await
}

#[tokio::test]
async fn paths_are_normalized_before_authorization_and_forwarding() {
    bounded(async {
        let deny = ap(
            "deny-admin",
            "DENY",
            "  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
        );
        let h = Harness::start(&deny).await;
        let mut c = h1(TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap()).await;
        assert_rbac_denied(&send(&mut c, get("/a/../admin", &[])).await);
        let a = send(&mut c, get("/a/../public?x=/../admin", &[])).await;
        assert_eq!(a.echo()["path"], "/public?x=/../admin");
        // An undeclared port that speaks HTTP is detected as HTTP and gets the same rules.
        let mut c = h1(TcpStream::connect(h.addr(DETECT_PORT)).await.unwrap()).await;
        assert_rbac_denied(&send(&mut c, get("/x/../admin", &[])).await);
        send(&mut c, get("/ok", &[])).await.echo();
        // Bytes that are not HTTP make it a TCP connection, where the DENY rule's HTTP-only
        // `paths` are ignored and it denies every connection: closed, no HTTP 400.
        let out = raw_exchange(h.addr(DETECT_PORT), b"\x00\x01not http").await;
        assert!(out.is_empty(), "non-HTTP bytes got an answer: {out:?}");
    })
    .await
}

#[tokio::test]
async fn tcp_port_echoes_when_allowed_and_closes_when_denied() {
    bounded(async {
        let h = Harness::start("").await;
        let mut s = TcpStream::connect(h.addr(TCP_PORT)).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // The same over mTLS (ALPN istio-peer-exchange, as Istio's sidecars send TCP).
        let (mut t, _) = h.tls(TCP_PORT, "good", None).await;
        t.write_all(b"over tls").await.unwrap();
        let mut buf = [0u8; 8];
        t.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"over tls");

        let cfg = config(&ap(
            "deny-local",
            "DENY",
            "  rules: [{from: [{source: {ipBlocks: [\"127.0.0.0/8\"]}}], to: [{operation: {ports: [\"9000\"]}}]}]",
        ));
        h.store.store(compile(&cfg));
        let out = raw_exchange(h.addr(TCP_PORT), b"hello").await;
        assert!(out.is_empty(), "a denied TCP connection echoed: {out:?}");
    })
    .await
}

#[tokio::test]
async fn a_policy_swap_applies_to_the_next_request_on_a_kept_alive_connection() {
    bounded(async {
        let h = Harness::start("").await;
        let mut c = h1(TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap()).await;
        send(&mut c, get("/first", &[])).await.echo();
        // An ALLOW policy without rules allows nothing.
        let cfg = config(&ap("allow-nothing", "ALLOW", ""));
        h.store.store(compile(&cfg));
        assert_rbac_denied(&send(&mut c, get("/second", &[])).await);
        h.store.store(compile(&config("")));
        send(&mut c, get("/third", &[])).await.echo();
    })
    .await
}

#[tokio::test]
async fn plaintext_http2_prior_knowledge_is_served() {
    bounded(async {
        let h = Harness::start(&ap(
            "deny-admin",
            "DENY",
            "  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
        ))
        .await;
        for port in [HTTP_PORT, DETECT_PORT] {
            let tcp = TcpStream::connect(h.addr(port)).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = |p: &str| {
                Request::get(format!("http://server.foo{p}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap()
            };
            let a = collect(sender.send_request(req("/h2c")).await.unwrap()).await;
            assert_eq!(a.echo()["path"], "/h2c");
            // A port declared `http` reaches the app over HTTP/1.1; a sniffed one in the
            // client's protocol (Istio's inbound cluster: USE_DOWNSTREAM_PROTOCOL).
            let expected = if port == HTTP_PORT {
                "HTTP/1.1"
            } else {
                "HTTP/2.0"
            };
            assert_eq!(a.echo()["version"], expected);
            let a = collect(sender.send_request(req("/admin")).await.unwrap()).await;
            assert_rbac_denied(&a);
        }
    })
    .await
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_detection_timeout() {
    bounded(async {
        let h = Harness::start_with("", Some(Duration::from_millis(200))).await;
        for port in [HTTP_PORT, DETECT_PORT] {
            let mut s = TcpStream::connect(h.addr(port)).await.unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            assert!(out.is_empty());
        }
    })
    .await
}

// ---------------------------------------------------------------- observability

/// An access-log sink that hands each complete line to the test.
struct LineSink {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::UnboundedSender<serde_json::Value>,
}

impl std::io::Write for LineSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let v = serde_json::from_slice(&line).expect("access-log line is JSON");
            let _ = self.tx.send(v);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn observed(
    extra: &str,
) -> (
    Harness,
    Arc<Observer>,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let log = AccessLog::new(
        LineSink {
            buf: Vec::new(),
            tx,
        },
        64,
    )
    .unwrap();
    let observer = Arc::new(Observer::new(Some(log)));
    let h = Harness::start_full(extra, None, Some(observer.clone())).await;
    (h, observer, rx)
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn a_request_is_logged_and_counted_with_its_decision() {
    bounded(async {
        let (h, observer, mut lines) = observed(&ap("allow-good", "ALLOW", ALLOW_GOOD)).await;
        let (s, _) = h.tls(HTTP_PORT, "good", None).await;
        let mut c = h1(s).await;
        let a = send(&mut c, get("/hello?x=1", &[])).await;
        assert_eq!(a.status, StatusCode::OK);

        let line = lines.recv().await.expect("an access-log line");
        assert_eq!(line["protocol"], "http");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["status"], 200);
        assert_eq!(line["authz_decision"], "allow");
        assert_eq!(line["authz_policy"], "foo/allow-good");
        assert_eq!(line["authz_action"], "ALLOW");
        assert_eq!(
            line["source_principal"],
            "spiffe://cluster.local/ns/foo/sa/good"
        );
        assert_eq!(line["destination_workload"], "server.foo");
        assert_eq!(line["destination_port"], HTTP_PORT);
        assert_eq!(line["response_flags"], "-");
        assert!(line["bytes_sent"].as_u64().unwrap() > 0, "{line}");

        let text = observer.render();
        let labels = [
            ("reporter", "destination"),
            ("source_principal", "spiffe://cluster.local/ns/foo/sa/good"),
            ("source_workload_namespace", "foo"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "foo"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/foo/sa/server",
            ),
            ("request_protocol", "http"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ];
        assert_eq!(
            sample(&text, "istio_requests_total", &labels),
            Some(1.0),
            "{text}"
        );
        let policy = [
            ("policy_namespace", "foo"),
            ("policy_name", "allow-good"),
            ("action", "ALLOW"),
            ("result", "allow"),
        ];
        assert_eq!(
            sample(&text, "warden_authz_decisions_total", &policy),
            Some(1.0),
            "{text}"
        );

        // A denied request: 403, logged with the same policy's verdict.
        let (s, _) = h.tls(HTTP_PORT, "bad", None).await;
        let mut c = h1(s).await;
        assert_rbac_denied(&send(&mut c, get("/hello", &[])).await);
        let line = lines.recv().await.expect("an access-log line");
        assert_eq!(line["status"], 403);
        assert_eq!(line["authz_decision"], "deny");
        let text = observer.render();
        assert_eq!(
            sample(
                &text,
                "istio_requests_total",
                &[
                    ("response_code", "403"),
                    ("source_principal", "spiffe://cluster.local/ns/foo/sa/bad")
                ]
            ),
            Some(1.0),
            "{text}"
        );
    })
    .await
}

#[tokio::test]
async fn a_denied_tcp_connection_is_logged_and_counted() {
    bounded(async {
        let (h, observer, mut lines) = observed(&ap(
            "deny-local",
            "DENY",
            "  rules: [{from: [{source: {ipBlocks: [\"127.0.0.0/8\"]}}], to: [{operation: {ports: [\"9000\"]}}]}]",
        ))
        .await;
        let out = raw_exchange(h.addr(TCP_PORT), b"hello").await;
        assert!(out.is_empty(), "a denied TCP connection echoed: {out:?}");
        let line = lines.recv().await.expect("an access-log line");
        assert_eq!(line["protocol"], "tcp");
        assert_eq!(line["status"], serde_json::Value::Null);
        // The engine's answer for a denied TCP connection is a reset, as Istio's.
        assert_eq!(line["authz_decision"], "reset");
        assert_eq!(line["authz_policy"], "foo/deny-local");
        assert_eq!(line["destination_port"], TCP_PORT);
        assert_eq!(line["bytes_sent"], 0);

        let text = observer.render();
        let labels = [
            ("destination_workload", "server"),
            ("connection_security_policy", "none"),
        ];
        assert_eq!(
            sample(&text, "istio_tcp_connections_opened_total", &labels),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &labels),
            Some(1.0),
            "{text}"
        );
        let policy = [("policy_name", "deny-local"), ("result", "reset")];
        assert_eq!(
            sample(&text, "warden_authz_decisions_total", &policy),
            Some(1.0),
            "{text}"
        );
    })
    .await
}

#[tokio::test]
async fn plaintext_refused_by_strict_is_logged_as_a_local_reset() {
    bounded(async {
        let (h, observer, mut lines) = observed(&pa("STRICT")).await;
        let out = raw_exchange(h.addr(TCP_PORT), b"hello").await;
        assert!(out.is_empty(), "STRICT answered plaintext: {out:?}");
        let line = lines.recv().await.expect("an access-log line");
        assert_eq!(line["authz_decision"], "reset");
        assert_eq!(line["authz_policy"], serde_json::Value::Null);
        assert!(
            line["authz_reason"].as_str().unwrap().contains("STRICT"),
            "{line}"
        );
        let text = observer.render();
        assert_eq!(
            sample(
                &text,
                "istio_tcp_connections_closed_total",
                &[("destination_workload", "server")]
            ),
            Some(1.0),
            "{text}"
        );
    })
    .await
}

#[tokio::test]
async fn a_failed_handshake_is_logged_as_a_local_reset() {
    bounded(async {
        let (h, observer, mut lines) = observed("").await;
        let other = Pki::new();
        let (state, _) = other.identity("good");
        state.update_bundle(h.pki.bundle()).unwrap();
        let cfg = client_config(state, ExpectedPeer::Exact(server_id()));
        let tcp = TcpStream::connect(h.addr(HTTP_PORT)).await.unwrap();
        if let Ok(mut s) = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
            .await
        {
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            assert!(out.is_empty(), "answered: {out:?}");
        }
        let line = lines.recv().await.expect("an access-log line");
        assert_eq!(line["authz_decision"], "reset");
        assert!(
            line["authz_reason"].as_str().unwrap().contains("handshake"),
            "{line}"
        );
        assert_eq!(line["source_principal"], serde_json::Value::Null);
        let text = observer.render();
        assert_eq!(
            sample(
                &text,
                "warden_authz_decisions_total",
                &[("policy_name", "-"), ("result", "reset")]
            ),
            Some(1.0),
            "{text}"
        );
    })
    .await
}
