//! The inbound proxy's test-only hooks for `warden test --live`, over 127.0.0.1: a listener
//! presenting other addresses makes the engine see them (and only on that listener), and a
//! fixed clock decides JWT expiry. Plaintext HTTP/1.1 keeps the set-up small; every test is
//! bounded and synchronises on I/O only.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use warden_identity::svid::TrustBundle;
use warden_identity::tls::IdentityState;
use warden_policy::config::Loader;
use warden_policy::engine::{InlineJwksOnly, WorkloadPolicy};
use warden_proxy::inbound::Presented;
use warden_proxy::{port_table, InboundProxy};

const LIMIT: Duration = Duration::from_secs(30);
const PORT: u16 = 8080;
const JWT_SECRET: &[u8] = b"warden-proxy-test-secret-0123456789";
const JWKS: &str = r#"{"keys":[{"kty":"oct","alg":"HS256","kid":"k1","k":"d2FyZGVuLXByb3h5LXRlc3Qtc2VjcmV0LTAxMjM0NTY3ODk"}]}"#;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: foo}
spec: {selector: {app: server}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: foo}
spec: {template: {metadata: {labels: {app: server}}, spec: {serviceAccountName: server}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-address, namespace: foo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {ipBlocks: [10.1.2.3/32]}}]
    to: [{operation: {paths: [/ip]}}]
  - to: [{operation: {paths: [/jwt]}}]
    when: [{key: destination.ip, values: [10.4.0.7]}]
  - to: [{operation: {paths: [/jwt]}}]
    when: [{key: destination.ip, values: [127.0.0.1]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules: [{issuer: "https://issuer.example", jwks: 'JWKS'}]
"#;

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test timed out")
}

/// An app answering 200 to everything.
async fn app() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// The proxy for foo/server (plaintext is accepted: PERMISSIVE), optionally on a fixed clock.
async fn proxy(clock: Option<i64>) -> Arc<InboundProxy> {
    let mut l = Loader::new();
    l.add_text("mesh.yaml", &MESH.replace("JWKS", JWKS));
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    let wl = cfg.workload("foo", "server").unwrap();
    let app = app().await;
    let ports: BTreeMap<_, _> = port_table(&cfg, wl)
        .iter()
        .map(|(p, s)| (*p, s.with_app(app)))
        .collect();
    // Plaintext only: the identity is never used in a handshake.
    let key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = root.self_signed(&key).unwrap();
    let identity = IdentityState::new(TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_der: vec![root.der().to_vec()],
    })
    .unwrap();
    let store = Arc::new(ArcSwap::from_pointee(WorkloadPolicy::compile(
        &cfg,
        wl,
        &InlineJwksOnly,
    )));
    let mut p = InboundProxy::new(store, Arc::new(identity), ports);
    if let Some(now) = clock {
        p = p.with_fixed_clock(now);
    }
    Arc::new(p)
}

async fn listen(p: &Arc<InboundProxy>, presented: Presented) -> SocketAddr {
    let l = p
        .bind(PORT, (Ipv4Addr::LOCALHOST, 0).into())
        .await
        .unwrap()
        .presenting(presented);
    let addr = l.local_addr().unwrap();
    tokio::spawn(l.run());
    addr
}

async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> StatusCode {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "server.foo");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

fn token(exp: i64) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("k1".into());
    let claims = serde_json::json!({"iss": "https://issuer.example", "sub": "a", "exp": exp});
    jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET),
    )
    .unwrap()
}

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

#[tokio::test]
async fn a_presenting_listener_shows_its_addresses_to_the_engine() {
    bounded(async {
        let p = proxy(None).await;
        let plain = listen(&p, Presented::default()).await;
        let office = listen(
            &p,
            Presented {
                source_ip: ip("10.1.2.3"),
                destination_ip: None,
            },
        )
        .await;
        let elsewhere = listen(
            &p,
            Presented {
                source_ip: None,
                destination_ip: ip("10.9.9.9"),
            },
        )
        .await;
        let pod = listen(
            &p,
            Presented {
                source_ip: None,
                destination_ip: ip("10.4.0.7"),
            },
        )
        .await;
        assert_eq!(get(plain, "/ip", None).await, StatusCode::FORBIDDEN);
        assert_eq!(get(office, "/ip", None).await, StatusCode::OK);
        // Only the presenting listener: the same proxy's other listeners are unaffected.
        assert_eq!(get(plain, "/ip", None).await, StatusCode::FORBIDDEN);
        assert_eq!(get(plain, "/jwt", None).await, StatusCode::OK);
        assert_eq!(get(elsewhere, "/jwt", None).await, StatusCode::FORBIDDEN);
        assert_eq!(get(pod, "/jwt", None).await, StatusCode::OK);
    })
    .await
}

#[tokio::test]
async fn a_fixed_clock_decides_jwt_expiry() {
    bounded(async {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let t = token(now + 3600);
        let real = listen(&proxy(None).await, Presented::default()).await;
        assert_eq!(get(real, "/jwt", Some(&t)).await, StatusCode::OK);
        let later = listen(&proxy(Some(now + 7200)).await, Presented::default()).await;
        assert_eq!(get(later, "/jwt", Some(&t)).await, StatusCode::UNAUTHORIZED);
        // And a token expired on the real clock is valid at an earlier fixed time.
        let old = token(now - 3600);
        assert_eq!(
            get(real, "/jwt", Some(&old)).await,
            StatusCode::UNAUTHORIZED
        );
        let earlier = listen(&proxy(Some(now - 7200)).await, Presented::default()).await;
        assert_eq!(get(earlier, "/jwt", Some(&old)).await, StatusCode::OK);
    })
    .await
}
