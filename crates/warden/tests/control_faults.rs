//! Faults of the control plane, end to end with real `warden control` and `warden proxy
//! --control-plane` processes on loopback: the control plane killed and restarted, an invalid
//! file dropped into its folder, its CA down across certificate renewals, a JWKS server down.
//! (A proxy that NACKs is covered at library level by `crates/control/tests/stream.rs`.)
//!
//! Every wait is on a condition — a log line, the control plane's /status, the answer to a
//! request through the proxy — with a deadline; every child is SIGKILLed and reaped however
//! the test ends, and every temp folder removed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest any single condition is waited for.
const WAIT: Duration = Duration::from_secs(20);
/// How often a polled condition is looked at again.
const POLL: Duration = Duration::from_millis(50);

mod common;
use common::{Proc, TempDir};

fn stdout_of(args: &[&str]) -> String {
    common::stdout_of(args, WAIT)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn addr_in(line: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line}"))
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|e| panic!("addr= in {line}: {e}"))
}

/// Polls `check` until it gives `Some`, at most [`WAIT`]; `what` names the condition.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(POLL);
    }
}

/// One HTTP/1.1 request with `Connection: close` and optional extra header lines: the status,
/// or `None` when no HTTP response came (refused, reset or closed without one).
fn try_get(addr: SocketAddr, path: &str, extra: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).ok()?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: httpbin.foo:8000\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
}

fn get(addr: SocketAddr, path: &str) -> u16 {
    try_get(addr, path, "").unwrap_or_else(|| panic!("no HTTP response to GET {path}"))
}

/// The control plane's /status.
fn status(admin: SocketAddr) -> serde_json::Value {
    let mut s = TcpStream::connect_timeout(&admin, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {out}"))
}

/// The /status entry of the proxy of `workload`, once it has ACKed a version.
fn acked_proxy(st: &serde_json::Value, workload: &str) -> Option<serde_json::Value> {
    st["proxies"]
        .as_array()?
        .iter()
        .find(|p| p["workload"] == workload && p["acked"].is_string())
        .cloned()
}

/// An HTTP/1.1 app answering every request with 200.
fn app() -> SocketAddr {
    common::keep_alive_app(WAIT, |_| {
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_string()
    })
}

/// httpbin (served by the proxy under test) and sleep (its mTLS client in the CA test), in a
/// PERMISSIVE namespace so plain requests reach httpbin's policy.
const BASE: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: foo}
spec:
  template:
    metadata: {labels: {app: httpbin}}
    spec:
      serviceAccountName: httpbin
      containers:
      - name: httpbin
        ports: [{containerPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {app: httpbin}
  ports:
  - {name: http, port: 8000, targetPort: 80}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: foo}
spec:
  template:
    metadata: {labels: {app: sleep}}
    spec:
      serviceAccountName: sleep
      containers:
      - name: sleep
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec:
  mtls: {mode: PERMISSIVE}
"#;

/// A DENY policy for httpbin on one path: which path is refused shows which version of the
/// configuration the proxy enforces.
fn deny_path(name: &str, action: &str, path: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: {action}
  rules:
  - to: [{{operation: {{paths: ["{path}"]}}}}]
"#
    )
}

/// A CA and a configuration folder holding [`BASE`], and httpbin's bootstrap token.
struct Mesh {
    tmp: TempDir,
    ca: PathBuf,
    config: PathBuf,
    token: PathBuf,
}

impl Mesh {
    fn new(tag: &str) -> Mesh {
        let tmp = TempDir::new(tag);
        let ca = tmp.0.join("ca");
        let config = tmp.0.join("config");
        std::fs::create_dir_all(&config).unwrap();
        stdout_of(&["ca", "init", "--dir", &s(&ca)]);
        write_atomic(&config.join("base.yaml"), BASE);
        let token = tmp.0.join("httpbin.token");
        let t = stdout_of(&["ca", "token", "--dir", &s(&ca), "foo/httpbin"]);
        write_atomic(&token, t.trim());
        Mesh {
            tmp,
            ca,
            config,
            token,
        }
    }

    /// `warden control` on `listen`: the process, its listen address and its admin address.
    fn control(&self, listen: &str, extra: &[&str]) -> (Proc, String, SocketAddr) {
        let mut args: Vec<String> = vec![
            "control".into(),
            "-f".into(),
            s(&self.config),
            "--ca".into(),
            s(&self.ca),
            "--listen".into(),
            listen.into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--poll-interval".into(),
            "100ms".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut cp = Proc::start("warden control", &args, WAIT);
        let addr = addr_in(&cp.wait_for(&["control plane listening"])).to_string();
        let admin = addr_in(&cp.wait_for(&["admin listening"]));
        (cp, addr, admin)
    }

    /// `warden proxy --control-plane` for httpbin in front of `app`: the process and its
    /// inbound listener for container port 80.
    fn httpbin(&self, cp: &str, app: SocketAddr, extra: &[&str]) -> (Proc, SocketAddr) {
        let mut args: Vec<String> = vec![
            "proxy".into(),
            "--control-plane".into(),
            cp.into(),
            "--workload".into(),
            "foo/httpbin".into(),
            "--service-account".into(),
            "httpbin".into(),
            "--ca-token-file".into(),
            s(&self.token),
            "--roots".into(),
            s(&self.ca.join("root-cert.pem")),
            "--inbound".into(),
            format!("80=127.0.0.1:0,{app}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut p = Proc::start("warden proxy (httpbin)", &args, WAIT);
        let inbound = addr_in(&p.wait_for(&["listening", "port=80"]));
        (p, inbound)
    }
}

/// Waits until GET `path` through `inbound` answers `want`; the proxy applies pushes on its own
/// schedule, so the first requests after a change may still see the previous configuration.
fn until_status(inbound: SocketAddr, path: &str, want: u16) {
    eventually(&format!("GET {path} answers {want}"), || {
        (try_get(inbound, path, "") == Some(want)).then_some(())
    });
}

#[test]
fn control_plane_killed_proxy_keeps_enforcing_then_resyncs_after_restart() {
    let mesh = Mesh::new("restart");
    write_atomic(
        &mesh.config.join("policy.yaml"),
        &deny_path("deny", "DENY", "/blocked"),
    );
    let (cp, cp_addr, admin) = mesh.control("127.0.0.1:0", &[]);
    let app = app();
    let (mut proxy, inbound) = mesh.httpbin(&cp_addr, app, &[]);
    assert_eq!(get(inbound, "/blocked"), 403);
    assert_eq!(get(inbound, "/open"), 200);
    let before = eventually("the proxy ACKed on /status", || {
        acked_proxy(&status(admin), "foo/httpbin")
    });

    // SIGKILL: the stream breaks without a goodbye; the proxy notices and keeps its config.
    cp.kill();
    let line = proxy.wait_for(&["control plane unreachable; keeping the configuration in force"]);
    let acked = before["acked"].as_str().unwrap();
    assert!(line.contains(&format!("enforcing={acked}")), "{line}");
    for _ in 0..3 {
        assert_eq!(get(inbound, "/blocked"), 403, "enforcing while away");
        assert_eq!(get(inbound, "/open"), 200, "enforcing while away");
    }

    // Changed while the control plane is away; a restarted one (same CA, same folder, same
    // port) loads it and the proxy, reconnecting with what it holds, gets the difference.
    write_atomic(
        &mesh.config.join("policy.yaml"),
        &deny_path("deny", "DENY", "/open"),
    );
    assert_eq!(get(inbound, "/open"), 200, "nothing to push it yet");
    let (_cp, _, admin) = mesh.control(&cp_addr, &[]);
    until_status(inbound, "/open", 403);
    assert_eq!(get(inbound, "/blocked"), 200);
    // The new control plane knows nothing of the proxy but what it said on reconnecting.
    eventually(
        "the proxy reconnected and ACKed the version in force",
        || {
            let st = status(admin);
            acked_proxy(&st, "foo/httpbin").filter(|p| p["acked"] == st["config"]["version"])
        },
    );

    // And the stream is live again: a change made now is pushed and enforced.
    write_atomic(
        &mesh.config.join("policy.yaml"),
        &deny_path("deny", "DENY", "/third"),
    );
    until_status(inbound, "/third", 403);
    assert_eq!(get(inbound, "/open"), 200);
}

#[test]
fn an_invalid_file_is_refused_visibly_and_the_proxy_keeps_the_old_config() {
    let mesh = Mesh::new("invalid");
    write_atomic(
        &mesh.config.join("policy.yaml"),
        &deny_path("deny", "DENY", "/blocked"),
    );
    let (mut cp, cp_addr, admin) = mesh.control("127.0.0.1:0", &[]);
    let app = app();
    let (_proxy, inbound) = mesh.httpbin(&cp_addr, app, &[]);
    assert_eq!(get(inbound, "/open"), 200);
    let version = eventually("a config version on /status", || {
        status(admin)["config"]["version"]
            .as_str()
            .map(String::from)
    });

    // `DENI` is not an action: the whole change is refused, with the file and line named.
    let bad = mesh.config.join("bad.yaml");
    write_atomic(&bad, &deny_path("deny-open", "DENI", "/open"));
    cp.wait_for(&["config refused; the last good configuration stays in force"]);
    let reason = cp.wait_for(&["bad.yaml:"]);
    let after_name = reason.split_once("bad.yaml:").unwrap().1;
    assert!(
        after_name.starts_with(|c: char| c.is_ascii_digit()) && reason.contains("DENI"),
        "file:line and the bad value: {reason}"
    );
    let st = eventually("the refusal on /status", || {
        let st = status(admin);
        st["refused"]["errors"].is_array().then_some(st)
    });
    let errors = st["refused"]["errors"].to_string();
    assert!(errors.contains("bad.yaml:"), "{st}");
    assert_eq!(st["config"]["version"], version.as_str(), "{st}");
    for _ in 0..3 {
        assert_eq!(
            get(inbound, "/open"),
            200,
            "the refused policy is not enforced"
        );
        assert_eq!(get(inbound, "/blocked"), 403, "the old policy still is");
    }

    // Fixed: accepted, pushed, enforced; the refusal is cleared from /status.
    write_atomic(&bad, &deny_path("deny-open", "DENY", "/open"));
    until_status(inbound, "/open", 403);
    assert_eq!(get(inbound, "/blocked"), 403);
    let st = status(admin);
    assert!(st["refused"].is_null(), "{st}");
    assert_ne!(st["config"]["version"], version.as_str(), "{st}");
}

#[test]
fn ca_down_across_renewals_the_certificate_serves_until_it_expires_then_fails_closed() {
    let mesh = Mesh::new("ca-down");
    let sleep_certs = mesh.tmp.0.join("sleep");
    stdout_of(&[
        "ca",
        "issue",
        "foo/sleep",
        "--dir",
        &s(&mesh.ca),
        "--out",
        &s(&sleep_certs),
    ]);
    let (cp, cp_addr, _) = mesh.control("127.0.0.1:0", &[]);
    let app = app();
    // The CA's policy allows any lifetime from 1 s; 10 s keeps the test short and leaves a
    // margin for the requests made before expiry.
    let (mut httpbin, inbound) = mesh.httpbin(&cp_addr, app, &["--cert-ttl", "10s"]);

    // sleep (certificates from files) reaches httpbin over mTLS, requiring its SPIFFE ID, so
    // its requests succeed only while httpbin presents a valid certificate from the CA.
    let sleep_args = vec![
        "proxy".to_string(),
        "-f".into(),
        s(&mesh.config),
        "--workload".into(),
        "foo/sleep".into(),
        "--cert".into(),
        s(&sleep_certs.join("cert-chain.pem")),
        "--key".into(),
        s(&sleep_certs.join("key.pem")),
        "--roots".into(),
        s(&sleep_certs.join("root-cert.pem")),
        "--outbound".into(),
        format!("127.0.0.1:0=foo/httpbin:8000@{inbound}"),
    ];
    let mut sleep = Proc::start("warden proxy (sleep)", &sleep_args, WAIT);
    let outbound = addr_in(&sleep.wait_for(&["outbound listening"]));
    sleep.wait_for(&["config applied"]);
    assert_eq!(get(outbound, "/get"), 200);

    cp.kill();
    // Renewal fails and is retried with growing delays, the current certificate still valid.
    let first = httpbin.wait_for(&["certificate fetch failed", "still_valid=true"]);
    let second = httpbin.wait_for(&["certificate fetch failed", "still_valid=true"]);
    let retry = |l: &str| -> Duration {
        let v = l
            .split_whitespace()
            .find_map(|w| w.strip_prefix("retry_in="))
            .unwrap_or_else(|| panic!("no retry_in= in {l}"));
        let (n, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap());
        let n: f64 = n.parse().unwrap_or_else(|e| panic!("retry_in={v}: {e}"));
        match unit {
            "s" => Duration::from_secs_f64(n),
            "ms" => Duration::from_secs_f64(n / 1e3),
            "µs" | "us" => Duration::from_secs_f64(n / 1e6),
            _ => panic!("retry_in={v}: unknown unit"),
        }
    };
    assert!(retry(&second) > retry(&first), "{first}\n{second}");
    assert_eq!(
        get(outbound, "/get"),
        200,
        "the current certificate is still used"
    );

    // Expiry with the CA still down: httpbin withdraws its certificate, so a new mTLS
    // handshake with it fails. (A fresh sleep proxy: the first one pools its connections to
    // httpbin, and a connection set up before expiry is not cut, as with Envoy.)
    httpbin.wait_for(&["certificate expired: failing closed"]);
    drop(sleep);
    let mut sleep = Proc::start("warden proxy (sleep, after expiry)", &sleep_args, WAIT);
    let outbound = addr_in(&sleep.wait_for(&["outbound listening"]));
    sleep.wait_for(&["config applied"]);
    for _ in 0..3 {
        assert_ne!(
            try_get(outbound, "/get", ""),
            Some(200),
            "served after expiry"
        );
    }
    // Refused by httpbin in the handshake, not a routing or network failure.
    let refused = sleep.wait_for(&["upstream refused", &format!("upstream={inbound}")]);
    assert!(refused.contains("handshake"), "{refused}");
}

const JWKS: &str = r#"{"keys":[{"kty":"RSA","alg":"RS256","use":"sig","kid":"warden-test-key-1","e":"AQAB","n":"v6PNADQXyVsl4w-5OCb1DZzVg2gP3xDInmrouR7qzp4o4aauqYftrKWfYC9Iu0R7sJAhXqyT6Uw1c2P6uLI4MdqdxkXJ9z3I69SnLDh4MZR215XbnPKDeYXwUEkPtFfVi0BIgbUuCnMYGOne4oLkJfOPmuHHHX7IV544LmRfOrQg0IEr_uib9ESdw5OE-KS_QFwlUbfgfaCmsCRTRvT3XdntbuDrQv5oBlMZFrFPiWp_rAePCzK2xg7exIwShgonRGUaVpGkGLooEtJt9Zixzi0uWxZtC-HQtCvwKHzLUk62CUncTq-AdDxe0meZaaV_TnzbtF3QvmhMXT7pF5Fbbw"}]}"#;
/// Signed by the key of [`JWKS`]; issuer testing@secure.istio.io, expires in 2118.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IndhcmRlbi10ZXN0LWtleS0xIiwidHlwIjoiSldUIn0.eyJleHAiOjQ2ODU5ODk3MDAsImZvbyI6ImJhciIsImlhdCI6MTc2NzIyNTYwMCwiaXNzIjoidGVzdGluZ0BzZWN1cmUuaXN0aW8uaW8iLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.HCDJCiXqcPa0BmizM4GM6g-fGGxNwZ_GVPeon9QFKkHOJWzSAss2s5a7CuHRlZIX8L7RbzWVm1mqbX5AShdgPKsOTBn4DI-KPE-VfRKZaPF7AHK49DOf3W4HkkF28lxzh0oRkgZrFuC0DV73gr-vSzw8mITYG5l6PxCpGQXbfyERpWdXKLchdHUAIPK0zSObIFl3GgPufolgTvSe71Mc8Q_tJoxq6RxRTAlJAJoMgJfgGHyDAZNlHTDLEpXxAObn1CqF6_S4YkjTmbHtnb2xKk1LOiYP437iEEXkRDo-QtpBN3Djfllz27Ibc6Lt4wYVzc81xdywWyvlGA6V3Clr_g";

fn jwt_policy(jwks_uri: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: testing@secure.istio.io
    jwksUri: {jwks_uri}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]}}}}]
"#
    )
}

/// A JWKS server: serves [`JWKS`] while `up` is set, 503 otherwise; counts requests.
fn jwks_server(up: Arc<AtomicBool>, hits: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_read_timeout(Some(WAIT));
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            hits.fetch_add(1, Ordering::SeqCst);
            let reply = if up.load(Ordering::SeqCst) {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{JWKS}",
                    JWKS.len()
                )
            } else {
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = s.write_all(reply.as_bytes());
        }
    });
    addr
}

fn bearer(inbound: SocketAddr) -> Option<u16> {
    try_get(
        inbound,
        "/get",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    )
}

/// The state /status shows for the JWKS at `uri`, once there is one.
fn jwks_state(admin: SocketAddr, uri: &str) -> Option<String> {
    let st = status(admin);
    let jwks = st["jwks"].as_object()?;
    jwks.iter()
        .find(|(k, _)| k.contains(uri))
        .and_then(|(_, v)| v["state"].as_str().map(String::from))
}

#[test]
fn jwks_server_down_the_last_good_keys_are_kept() {
    let mesh = Mesh::new("jwks-down");
    let up = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let uri = format!("http://{}/jwks.json", jwks_server(up.clone(), hits.clone()));
    write_atomic(&mesh.config.join("jwt.yaml"), &jwt_policy(&uri));
    let (mut cp, cp_addr, admin) = mesh.control("127.0.0.1:0", &["--jwks-refresh", "1s"]);
    eventually("the JWKS fetched", || {
        (jwks_state(admin, &uri).as_deref() == Some("fetched")).then_some(())
    });
    let app = app();
    let (_proxy, inbound) = mesh.httpbin(&cp_addr, app, &[]);
    assert_eq!(bearer(inbound), Some(200));
    assert_eq!(get(inbound, "/get"), 403, "no token, no request principal");

    up.store(false, Ordering::SeqCst);
    let line = cp.wait_for(&["JWKS refresh failed; keeping the keys fetched before"]);
    assert!(line.contains(&uri), "{line}");
    eventually("the JWKS stale on /status", || {
        (jwks_state(admin, &uri).as_deref() == Some("stale")).then_some(())
    });
    let refreshes = hits.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            bearer(inbound),
            Some(200),
            "the last good keys still verify"
        );
    }
    // Still failing on later refreshes, and still kept.
    eventually("another failed refresh", || {
        (hits.load(Ordering::SeqCst) > refreshes).then_some(())
    });
    assert_eq!(bearer(inbound), Some(200));
}

#[test]
fn jwks_never_fetched_its_tokens_are_refused_until_it_is() {
    let mesh = Mesh::new("jwks-never");
    let up = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let uri = format!("http://{}/jwks.json", jwks_server(up.clone(), hits.clone()));
    write_atomic(&mesh.config.join("jwt.yaml"), &jwt_policy(&uri));
    let (mut cp, cp_addr, admin) = mesh.control("127.0.0.1:0", &["--jwks-refresh", "1s"]);
    let line = cp.saw(&["JWKS never fetched"]);
    assert!(line.contains(&uri), "{line}");
    assert_eq!(jwks_state(admin, &uri).as_deref(), Some("unavailable"));
    let app = app();
    let (_proxy, inbound) = mesh.httpbin(&cp_addr, app, &[]);
    for _ in 0..3 {
        assert_eq!(
            bearer(inbound),
            Some(401),
            "no keys: the token cannot verify"
        );
    }

    // The server comes back: the next refresh fetches the keys and they are pushed.
    up.store(true, Ordering::SeqCst);
    eventually("the token accepted once the keys are fetched", || {
        (bearer(inbound) == Some(200)).then_some(())
    });
    assert_eq!(jwks_state(admin, &uri).as_deref(), Some("fetched"));
}

/// Fail closed at start: a proxy whose workload the control plane does not know yet gets its
/// certificate but no configuration, so nothing listens (its admin `/ready` is not served);
/// `/status` says why. Once the workload is added it gets its configuration and listens.
#[test]
fn a_proxy_listens_only_once_it_has_its_configuration() {
    let mesh = Mesh::new("not-yet");
    // The folder without httpbin's Deployment.
    let without: String = BASE
        .split("---\n")
        .filter(|d| !d.contains("name: httpbin, namespace: foo}\nspec:\n  template"))
        .collect::<Vec<_>>()
        .join("---\n");
    write_atomic(&mesh.config.join("base.yaml"), &without);
    let (_cp, cp_addr, admin) = mesh.control("127.0.0.1:0", &[]);
    let app = app();
    let args: Vec<String> = [
        "proxy",
        "--control-plane",
        &cp_addr,
        "--workload",
        "foo/httpbin",
        "--service-account",
        "httpbin",
        "--ca-token-file",
        &s(&mesh.token),
        "--roots",
        &s(&mesh.ca.join("root-cert.pem")),
        "--inbound",
        &format!("80=127.0.0.1:0,{app}"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut proxy = Proc::start("warden proxy (httpbin)", &args, WAIT);
    proxy.wait_for(&["waiting for the first configuration"]);
    let waiting = eventually("the control plane shows the proxy waiting", || {
        let st = status(admin);
        st["proxies"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["workload"] == "foo/httpbin").cloned())
            .filter(|p| p["waiting"].is_string())
    });
    assert!(
        waiting["waiting"]
            .as_str()
            .unwrap()
            .contains("not in the configuration"),
        "{waiting}"
    );
    assert!(
        !proxy.log.iter().any(|l| l.contains("listening")),
        "listened without a configuration:\n{}",
        proxy.log.join("\n")
    );
    write_atomic(&mesh.config.join("base.yaml"), BASE);
    let inbound = addr_in(&proxy.wait_for(&["listening", "port=80"]));
    assert_eq!(get(inbound, "/anything"), 200);
}
