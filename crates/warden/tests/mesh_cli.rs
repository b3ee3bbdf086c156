//! `warden demo` and `warden up` as processes: the demo's steps from examples/demo with
//! every request as intended, and a folder of local workloads served by `warden up` — real
//! apps calling a Service through their sidecars, a policy edited live. Synchronised on the
//! processes' own output and on request outcomes; every wait is bounded and every child is
//! killed and reaped.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

mod common;
use common::{Proc, TempDir};

#[test]
fn warden_demo_takes_the_mesh_through_every_step_as_intended() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/demo");
    let run = Proc::start(
        "warden demo",
        &["demo", "--once", "--admin", "127.0.0.1:0", dir],
        WAIT,
    );
    let (code, out) = run.finish();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("Every request behaved as its step intends (40 requests"),
        "{out}"
    );
    // Readable golden lines, one per kind of outcome.
    for line in [
        "legacy, no sidecar → productpage     GET /productpage   connection closed  mTLS STRICT (PeerAuthentication istio-system/default, mesh level)",
        "productpage → reviews                DELETE /reviews/1  403 Forbidden      no ALLOW rule matched in bookinfo/allow-nothing, bookinfo/reviews-from-productpage (reviews)",
        "reviews → ratings                    GET /ratings/1     200 OK             ALLOW bookinfo/ratings-from-reviews (ratings)",
        "user+bad JWT → ingress → productpage GET /productpage   401 Unauthorized   the JWT was rejected: Jwt verification fails (ingress-gateway)",
        "user+JWT → ingress → productpage     GET /productpage   200 OK             ALLOW ingress/require-jwt (ingress-gateway) · ALLOW bookinfo/productpage-from-ingress (productpage)",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.lines().any(|l| l.starts_with('!')), "{out}");
}

const UP_MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: web
  namespace: shop
  annotations:
    warden.dev/app-address: 127.0.41.1
spec:
  address: 127.0.40.1
  serviceAccount: web
  labels:
    app: web
  ports:
    http: 18080
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: api
  namespace: shop
  annotations:
    warden.dev/app-address: 127.0.41.2
spec:
  address: 127.0.40.2
  serviceAccount: api
  labels:
    app: api
  ports:
    http: 18081
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  clusterIP: 127.0.42.2
  selector:
    app: api
  ports:
  - name: http
    port: 18081
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"#;

fn policy(methods: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: api-from-web\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: api\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/web\"]\n    to:\n    - operation:\n        methods: [{methods}]\n"
    )
}

/// The api app: answers every request with the caller's identity from XFCC.
fn api_app(at: SocketAddr) -> std::thread::JoinHandle<()> {
    let l = TcpListener::bind(at).expect("the api app's address");
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_lowercase();
                let caller = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
                    .and_then(|v| v.split(';').find_map(|f| f.strip_prefix("uri=")))
                    .unwrap_or("none")
                    .to_string();
                let body = format!("api saw {caller}\n");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    })
}

/// One request from `source` to `dst`: the status line's code and the body, or `None` when
/// the connection closed without a response.
fn request(source: IpAddr, dst: SocketAddr, method: &str) -> Option<(u16, String)> {
    let socket = socket_from(source, dst)?;
    let mut s = socket;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    write!(
        s,
        "{method} /items HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((code, out.split_once("\r\n\r\n")?.1.to_string()))
}

/// A TCP connection from `source` (bound first): std has no bind-before-connect, so this
/// goes through a tiny tokio runtime.
fn socket_from(source: IpAddr, dst: SocketAddr) -> Option<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().ok()?;
        s.bind(SocketAddr::new(source, 0)).ok()?;
        let stream = tokio::time::timeout(Duration::from_secs(5), s.connect(dst))
            .await
            .ok()?
            .ok()?;
        stream.into_std().ok()
    })
    .and_then(|s| {
        s.set_nonblocking(false).ok()?;
        Some(s)
    })
}

#[test]
fn warden_up_serves_local_workloads_and_applies_policy_changes_live() {
    let tmp = TempDir::new("up");
    let dir = tmp.0.clone();
    std::fs::write(dir.join("mesh.yaml"), UP_MESH).unwrap();
    std::fs::write(dir.join("policy.yaml"), policy("\"GET\"")).unwrap();
    let _app = api_app("127.0.41.2:18081".parse().unwrap());

    let mut up = Proc::start(
        "warden up",
        &[
            "up",
            dir.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
            "--poll-interval",
            "100ms",
        ],
        WAIT,
    );
    up.wait_for(&["shop/api"]);
    up.wait_for(&["Ctrl-C stops."]);

    let web: IpAddr = "127.0.41.1".parse().unwrap();
    let svc: SocketAddr = "127.0.42.2:18081".parse().unwrap();
    // web's app calls the api Service through its sidecar: mTLS with web's identity.
    let (code, body) = request(web, svc, "GET").expect("a response");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, "api saw spiffe://cluster.local/ns/shop/sa/web\n");
    let (code, _) = request(web, svc, "DELETE").expect("a response");
    assert_eq!(code, 403);
    // A connection from an address no local workload has is refused.
    assert!(request("127.0.0.1".parse().unwrap(), svc, "GET").is_none());
    // Straight to api's sidecar without mTLS: STRICT closes it.
    assert!(request(
        "127.0.0.1".parse().unwrap(),
        "127.0.40.2:18081".parse().unwrap(),
        "GET"
    )
    .is_none());

    // A live change: DELETE becomes allowed once the control plane has pushed it.
    std::fs::write(dir.join("policy.yaml"), policy("\"GET\", \"DELETE\"")).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _) = request(web, svc, "DELETE").expect("a response");
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the change was not applied within {WAIT:?}"
        );
        // Waiting for the push; each try is a real request and the deadline bounds it.
        std::thread::sleep(Duration::from_millis(50));
    }
    // A broken file is refused and the policy in force stays.
    std::fs::write(dir.join("broken.yaml"), "kind: AuthorizationPolicy\n").unwrap();
    up.wait_for(&["config refused"]);
    let (code, _) = request(web, svc, "DELETE").expect("a response");
    assert_eq!(code, 200);
}

#[test]
fn warden_up_explains_a_folder_that_cannot_run_locally() {
    let tmp = TempDir::new("up-bad");
    let dir = tmp.0.clone();
    let no_app = UP_MESH.replace(
        "  annotations:\n    warden.dev/app-address: 127.0.41.2\n",
        "",
    );
    std::fs::write(dir.join("mesh.yaml"), no_app).unwrap();
    let run = Proc::start(
        "warden up",
        &["up", dir.to_str().unwrap(), "--admin", "127.0.0.1:0"],
        WAIT,
    );
    let (code, out) = run.finish();
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("WorkloadEntry shop/api"), "{out}");
    assert!(out.contains("warden.dev/app-address"), "{out}");
}
