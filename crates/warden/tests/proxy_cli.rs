//! `warden proxy` as a process: certificates from `warden ca issue`, a std TCP echo app, the
//! proxy in front of it on a PERMISSIVE TCP port, and a policy change through the watched
//! folder. Synchronised on the proxy's own stderr lines (`listening`, `config applied`) and on
//! connections closing; every wait is bounded and the child is always killed and reaped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

const WAIT: Duration = Duration::from_secs(30);

fn warden() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warden"));
    c.stdin(Stdio::null());
    c
}

/// Runs a warden command that should end by itself, within [`WAIT`]: its exit code and stderr.
fn run(args: &[String]) -> (Option<i32>, String) {
    let child = warden()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn warden");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(Ok(o)) => (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Ok(Err(e)) => panic!("warden {args:?}: {e}"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("warden {args:?} did not finish within {WAIT:?}");
        }
    }
}

fn run_ok(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let (code, err) = run(&args);
    assert_eq!(code, Some(0), "warden {args:?} failed: {err}");
}

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("warden-proxy-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The proxy process: killed and reaped however the test ends.
struct Proxy {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start(args: &[String]) -> Proxy {
        let mut child = warden()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warden proxy");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proxy {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The next stderr line containing `needle`, waiting at most [`WAIT`].
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no \"{needle}\" line from warden proxy within {WAIT:?}; its log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }
}

/// An app that echoes every byte, one thread per connection.
fn echo_app() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}

/// Reads until the proxy closes; true when it closed with nothing echoed (a read timeout —
/// the connection left open — panics).
fn closed_without_data(s: &mut TcpStream) -> bool {
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => out.is_empty(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("the connection was not closed: {e}"),
    }
}

const BASE: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: foo}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: foo}
spec:
  selector: {app: server}
  ports:
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
        ports: [{containerPort: 9000}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec:
  mtls: {mode: PERMISSIVE}
"#;

const DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-local, namespace: foo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["127.0.0.0/8"]}}]}]
"#;

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn warden_proxy_echoes_then_closes_connections_when_the_folder_denies() {
    let tmp = TempDir::new("e2e");
    let ca = tmp.0.join("ca");
    let certs = tmp.0.join("certs");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    run_ok(&["ca", "init", "--dir", &s(&ca)]);
    run_ok(&[
        "ca",
        "issue",
        "foo/server",
        "--dir",
        &s(&ca),
        "--out",
        &s(&certs),
    ]);
    write_atomic(&config.join("workload.yaml"), BASE);
    let app = echo_app();

    let mut proxy = Proxy::start(&[
        "proxy".into(),
        "-f".into(),
        s(&config),
        "--workload".into(),
        "foo/server".into(),
        "--inbound".into(),
        format!("9000=127.0.0.1:0,{app}"),
        "--cert".into(),
        s(&certs.join("cert-chain.pem")),
        "--key".into(),
        s(&certs.join("key.pem")),
        "--roots".into(),
        s(&certs.join("root-cert.pem")),
    ]);
    let listening = proxy.wait_for("listening");
    assert!(listening.contains("mode=PERMISSIVE"), "{listening}");
    let addr: SocketAddr = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("the listening line names its address")
        .parse()
        .unwrap();
    proxy.wait_for("config applied");

    // Plaintext on a PERMISSIVE TCP port, no policy: echoed.
    let mut open = connect(addr);
    echo(&mut open, b"hello through the proxy");

    // A broken change is refused, naming the file and line, and changes nothing.
    write_atomic(&config.join("deny.yaml"), "kind: [unclosed\n");
    let refused = proxy.wait_for("config refused");
    assert!(refused.contains("WARN"), "{refused}");
    proxy.wait_for("deny.yaml:");
    echo(&mut open, b"still allowed");

    // The deny: the open connection is closed, and so is the next one.
    write_atomic(&config.join("deny.yaml"), DENY);
    proxy.wait_for("config applied");
    assert!(closed_without_data(&mut open), "the open connection echoed");
    let mut next = connect(addr);
    let _ = next.write_all(b"hello again");
    assert!(closed_without_data(&mut next), "a denied connection echoed");
    proxy.wait_for("deny-local");
}

#[test]
fn warden_proxy_refuses_bad_flags_before_starting() {
    let tmp = TempDir::new("flags");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    write_atomic(&config.join("workload.yaml"), BASE);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--inbound", "9000=10.0.0.1:15006"],
            "not a loopback address",
        ),
        (&["--inbound", "nine=127.0.0.1:0"], "not a port number"),
        (
            &["--inbound", "9000=127.0.0.1:0", "--log-level", "loud"],
            "\"loud\" is not a log level",
        ),
        (
            &["--inbound", "9000=127.0.0.1:0", "--admin", "10.0.0.1:1"],
            "admin server is unauthenticated",
        ),
        (
            &["--inbound", "9000=127.0.0.1:0", "--workload", "foo"],
            "NAMESPACE/NAME",
        ),
        // The certificate files do not exist: refused before anything listens.
        (&["--inbound", "9000=127.0.0.1:0"], "certificate is refused"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "proxy".to_string(),
            "-f".into(),
            s(&config),
            "--cert".into(),
            s(&tmp.0.join("missing.pem")),
            "--key".into(),
            s(&tmp.0.join("missing-key.pem")),
            "--roots".into(),
            s(&tmp.0.join("missing-roots.pem")),
        ];
        if !extra.contains(&"--workload") {
            args.extend(["--workload".into(), "foo/server".into()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err}"
        );
    }
}

/// One HTTP/1.1 exchange with the admin server: status and body.
fn admin(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    let mut s = connect(addr);
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

fn addr_in(line: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line}"))
        .parse()
        .unwrap()
}

#[test]
fn warden_proxy_serves_the_admin_endpoints_and_an_access_log() {
    let tmp = TempDir::new("admin");
    let ca = tmp.0.join("ca");
    let certs = tmp.0.join("certs");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    run_ok(&["ca", "init", "--dir", &s(&ca)]);
    run_ok(&[
        "ca",
        "issue",
        "foo/server",
        "--dir",
        &s(&ca),
        "--out",
        &s(&certs),
    ]);
    write_atomic(&config.join("workload.yaml"), BASE);
    let app = echo_app();
    let access_log = tmp.0.join("access.log");

    let mut proxy = Proxy::start(&[
        "proxy".into(),
        "-f".into(),
        s(&config),
        "--workload".into(),
        "foo/server".into(),
        "--inbound".into(),
        format!("9000=127.0.0.1:0,{app}"),
        "--cert".into(),
        s(&certs.join("cert-chain.pem")),
        "--key".into(),
        s(&certs.join("key.pem")),
        "--roots".into(),
        s(&certs.join("root-cert.pem")),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--access-log".into(),
        s(&access_log),
    ]);
    // The admin server is bound first, then the listeners.
    let admin_addr = addr_in(&proxy.wait_for("admin listening"));
    let addr = addr_in(&proxy.wait_for("listening port=9000"));
    assert!(admin_addr.ip().is_loopback());
    proxy.wait_for("config applied");

    let (status, body) = admin(admin_addr, "GET", "/ready");
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin(admin_addr, "GET", "/config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["workload"], "foo/server");
    assert_eq!(dump["ports"]["9000"]["mode"], "PERMISSIVE");
    let (status, body) = admin(admin_addr, "GET", "/certs");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("/ns/foo/sa/server"), "{body}");

    let mut c = connect(addr);
    echo(&mut c, b"counted");
    // The decision line is logged after the connection was counted as opened.
    proxy.wait_for("tcp connection");
    let (status, body) = admin(admin_addr, "GET", "/stats/prometheus");
    assert_eq!(status, 200);
    assert!(
        body.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.ends_with(" 1")),
        "{body}"
    );

    let (status, body) = admin(admin_addr, "POST", "/logging?level=debug");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("debug"), "{body}");
    proxy.wait_for("log level changed");
}

/// What load tests run with: no access log and no per-request decision line, yet the startup
/// lines still name the listeners, and the level can be raised again at runtime.
#[test]
fn warden_proxy_quiet_logs_startup_but_no_decisions_until_raised() {
    let tmp = TempDir::new("quiet");
    let ca = tmp.0.join("ca");
    let certs = tmp.0.join("certs");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    run_ok(&["ca", "init", "--dir", &s(&ca)]);
    run_ok(&[
        "ca",
        "issue",
        "foo/server",
        "--dir",
        &s(&ca),
        "--out",
        &s(&certs),
    ]);
    write_atomic(&config.join("workload.yaml"), BASE);
    let app = echo_app();

    let args: Vec<String> = vec![
        "proxy".into(),
        "-f".into(),
        s(&config),
        "--workload".into(),
        "foo/server".into(),
        "--inbound".into(),
        format!("9000=127.0.0.1:0,{app}"),
        "--cert".into(),
        s(&certs.join("cert-chain.pem")),
        "--key".into(),
        s(&certs.join("key.pem")),
        "--roots".into(),
        s(&certs.join("root-cert.pem")),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--log-level".into(),
        "warn".into(),
        "--access-log".into(),
        "off".into(),
    ];
    let mut proxy = Proxy::start(&args);
    let admin_addr = addr_in(&proxy.wait_for("admin listening"));
    let addr = addr_in(&proxy.wait_for("listening port=9000"));
    proxy.wait_for("config applied");
    // `off` is not a file name: the proxy (running where the test runs) created none.
    assert!(
        !Path::new("off").exists(),
        "an access log file named off was created"
    );
    let (status, body) = admin(admin_addr, "GET", "/logging");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("warn"), "{body}");

    // Decided and allowed (echoed), but not logged: its line would precede the next one.
    let mut quiet = connect(addr);
    echo(&mut quiet, b"not logged");
    let (status, body) = admin(admin_addr, "POST", "/logging?level=info");
    assert_eq!(status, 200, "{body}");
    proxy.wait_for("log level changed");
    assert!(
        !proxy.log.iter().any(|l| l.contains("tcp connection")),
        "a decision line was written at warn:\n{}",
        proxy.log.join("\n")
    );
    let mut logged = connect(addr);
    echo(&mut logged, b"logged");
    proxy.wait_for("tcp connection");
}

const TWO_HOP: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: foo}
spec:
  template:
    metadata: {labels: {app: sleep}}
    spec:
      serviceAccountName: sleep
      containers: [{name: sleep}]
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
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"]}}]
"#;

fn keep_alive_app(reply: impl Fn(&str) -> String + Send + Sync + 'static) -> SocketAddr {
    common::keep_alive_app(WAIT, reply)
}

/// An app answering every request with 200 and the `x-forwarded-client-cert` it received as
/// the body.
fn xfcc_app() -> SocketAddr {
    keep_alive_app(|head| {
        let xfcc = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-forwarded-client-cert"))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{xfcc}",
            xfcc.len()
        )
    })
}

/// One HTTP/1.1 request with `Connection: close`: status and body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = connect(addr);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: httpbin.foo:8000\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

fn proxy_args(config: &Path, certs: &Path, workload: &str, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "proxy".to_string(),
        "-f".into(),
        s(config),
        "--workload".into(),
        workload.into(),
        "--cert".into(),
        s(&certs.join("cert-chain.pem")),
        "--key".into(),
        s(&certs.join("key.pem")),
        "--roots".into(),
        s(&certs.join("root-cert.pem")),
    ];
    args.extend(extra.iter().cloned());
    args
}

#[test]
fn warden_proxy_two_hops_outbound_mtls_to_inbound_with_authorization() {
    let tmp = TempDir::new("two-hop");
    let ca = tmp.0.join("ca");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    run_ok(&["ca", "init", "--dir", &s(&ca)]);
    for sa in ["sleep", "httpbin"] {
        run_ok(&[
            "ca",
            "issue",
            &format!("foo/{sa}"),
            "--dir",
            &s(&ca),
            "--out",
            &s(&tmp.0.join(sa)),
        ]);
    }
    write_atomic(&config.join("mesh.yaml"), TWO_HOP);
    let app = xfcc_app();

    let mut httpbin = Proxy::start(&proxy_args(
        &config,
        &tmp.0.join("httpbin"),
        "foo/httpbin",
        &["--inbound".into(), format!("80=127.0.0.1:0,{app}")],
    ));
    let line = httpbin.wait_for("listening port=80");
    assert!(line.contains("mode=STRICT"), "{line}");
    let inbound = addr_in(&line);
    httpbin.wait_for("config applied");

    let mut sleep = Proxy::start(&proxy_args(
        &config,
        &tmp.0.join("sleep"),
        "foo/sleep",
        &[
            "--outbound".into(),
            format!("127.0.0.1:0=foo/httpbin:8000@{inbound}"),
            "--admin".into(),
            "127.0.0.1:0".into(),
        ],
    ));
    let admin_addr = addr_in(&sleep.wait_for("admin listening"));
    let line = sleep.wait_for("outbound listening");
    assert!(
        line.contains("security=mTLS:spiffe://cluster.local/ns/foo/sa/httpbin"),
        "{line}"
    );
    let outbound = addr_in(&line);
    sleep.wait_for("config applied");

    // Allowed: GET from sleep's identity, which reaches the app in XFCC.
    let (status, body) = http(outbound, "GET", "/get");
    assert_eq!(status, 200, "{body}");
    // The client side reports it too, as Istio's source sidecar does.
    let (_, metrics) = admin(admin_addr, "GET", "/stats/prometheus");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"source\""))
        .unwrap_or_else(|| panic!("no source-reported request in:\n{metrics}"));
    for label in [
        "source_workload=\"sleep\"",
        "source_principal=\"spiffe://cluster.local/ns/foo/sa/sleep\"",
        "destination_workload=\"httpbin\"",
        "destination_principal=\"spiffe://cluster.local/ns/foo/sa/httpbin\"",
        "response_code=\"200\"",
        "connection_security_policy=\"unknown\"",
    ] {
        assert!(line.contains(label), "{label} missing in {line}");
    }
    assert!(
        !metrics.contains("warden_authz_decisions_total{"),
        "the source decided nothing, yet a policy counter moved:\n{metrics}"
    );
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/foo/sa/sleep"),
        "{body}"
    );
    // Denied by the policy's methods.
    let (status, body) = http(outbound, "POST", "/post");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body, "RBAC: access denied");
    // Bypassing the sleep sidecar: plaintext on a STRICT port is closed without a response.
    let mut direct = connect(inbound);
    let _ = direct.write_all(b"GET /get HTTP/1.1\r\nHost: httpbin\r\n\r\n");
    assert!(
        closed_without_data(&mut direct),
        "plaintext reached httpbin"
    );

    // Port 80 becomes DISABLE: the sleep proxy re-derives its route (auto mTLS → plaintext),
    // so the next request arrives without a principal and the policy denies it.
    write_atomic(&config.join("disable.yaml"), DISABLE_80);
    httpbin.wait_for("config applied");
    let line = sleep.wait_for("outbound route changed");
    assert!(line.contains("security=plaintext"), "{line}");
    let (status, body) = http(outbound, "GET", "/get");
    assert_eq!(status, 403, "{body}");
}

const DISABLE_80: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
  portLevelMtls:
    80: {mode: DISABLE}
"#;

#[test]
fn warden_proxy_refuses_bad_outbound_flags_before_starting() {
    let tmp = TempDir::new("outbound-flags");
    let ca = tmp.0.join("ca");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    run_ok(&["ca", "init", "--dir", &s(&ca)]);
    run_ok(&[
        "ca",
        "issue",
        "foo/sleep",
        "--dir",
        &s(&ca),
        "--out",
        &s(&tmp.0.join("sleep")),
    ]);
    write_atomic(&config.join("mesh.yaml"), TWO_HOP);
    let cases: &[(&str, &str)] = &[
        (
            "127.0.0.1:0=foo/nope:8000@127.0.0.1:1",
            "no Service foo/nope",
        ),
        (
            "127.0.0.1:0=foo/httpbin:9999@127.0.0.1:1",
            "has no port 9999",
        ),
        (
            "10.0.0.1:0=foo/httpbin:8000@127.0.0.1:1",
            "not a loopback address",
        ),
        ("127.0.0.1:0=foo/httpbin:8000@nowhere", "is not IP:PORT"),
        ("127.0.0.1:0=foo/httpbin:8000", "no @UPSTREAM_ADDR"),
        ("127.0.0.1:0=httpbin:8000@127.0.0.1:1", "NS/SERVICE:PORT"),
    ];
    for (flag, expected) in cases {
        let args = proxy_args(
            &config,
            &tmp.0.join("sleep"),
            "foo/sleep",
            &["--outbound".into(), flag.to_string()],
        );
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err}"
        );
    }
}

/// The RS256 key and a token for it (valid until 2118) from the shared conformance suite
/// (authz-jwt-02): `iss` and `sub` are `testing@secure.istio.io`.
const JWKS: &str = r#"{"keys":[{"kty":"RSA","alg":"RS256","use":"sig","kid":"warden-test-key-1","e":"AQAB","n":"v6PNADQXyVsl4w-5OCb1DZzVg2gP3xDInmrouR7qzp4o4aauqYftrKWfYC9Iu0R7sJAhXqyT6Uw1c2P6uLI4MdqdxkXJ9z3I69SnLDh4MZR215XbnPKDeYXwUEkPtFfVi0BIgbUuCnMYGOne4oLkJfOPmuHHHX7IV544LmRfOrQg0IEr_uib9ESdw5OE-KS_QFwlUbfgfaCmsCRTRvT3XdntbuDrQv5oBlMZFrFPiWp_rAePCzK2xg7exIwShgonRGUaVpGkGLooEtJt9Zixzi0uWxZtC-HQtCvwKHzLUk62CUncTq-AdDxe0meZaaV_TnzbtF3QvmhMXT7pF5Fbbw"}]}"#;
const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IndhcmRlbi10ZXN0LWtleS0xIiwidHlwIjoiSldUIn0.eyJleHAiOjQ2ODU5ODk3MDAsImZvbyI6ImJhciIsImlhdCI6MTc2NzIyNTYwMCwiaXNzIjoidGVzdGluZ0BzZWN1cmUuaXN0aW8uaW8iLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.HCDJCiXqcPa0BmizM4GM6g-fGGxNwZ_GVPeon9QFKkHOJWzSAss2s5a7CuHRlZIX8L7RbzWVm1mqbX5AShdgPKsOTBn4DI-KPE-VfRKZaPF7AHK49DOf3W4HkkF28lxzh0oRkgZrFuC0DV73gr-vSzw8mITYG5l6PxCpGQXbfyERpWdXKLchdHUAIPK0zSObIFl3GgPufolgTvSe71Mc8Q_tJoxq6RxRTAlJAJoMgJfgGHyDAZNlHTDLEpXxAObn1CqF6_S4YkjTmbHtnb2xKk1LOiYP437iEEXkRDo-QtpBN3Djfllz27Ibc6Lt4wYVzc81xdywWyvlGA6V3Clr_g";

const JWKS_URI_CONFIG: &str = r#"apiVersion: v1
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
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  jwtRules:
  - issuer: testing@secure.istio.io
    jwksUri: JWKS_URI
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]}}]
"#;

/// A JWKS server: serves [`JWKS`] while `up` is set, 503 otherwise; counts requests.
fn jwks_server(
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> SocketAddr {
    use std::sync::atomic::Ordering;
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

/// One HTTP/1.1 GET with an optional bearer token: the status.
fn get_with_token(addr: SocketAddr, token: Option<&str>) -> u16 {
    let mut s = connect(addr);
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /get HTTP/1.1\r\nHost: httpbin.foo:8000\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"))
}

#[test]
fn warden_proxy_fetches_jwks_uri_and_keeps_the_keys_when_a_refresh_fails() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let tmp = TempDir::new("jwks-uri");
    let ca = tmp.0.join("ca");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    run_ok(&["ca", "init", "--dir", &s(&ca)]);
    run_ok(&[
        "ca",
        "issue",
        "foo/httpbin",
        "--dir",
        &s(&ca),
        "--out",
        &s(&tmp.0.join("httpbin")),
    ]);
    let up = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let jwks = jwks_server(up.clone(), hits.clone());
    write_atomic(
        &config.join("mesh.yaml"),
        &JWKS_URI_CONFIG.replace("JWKS_URI", &format!("http://{jwks}/jwks.json")),
    );
    let app = xfcc_app();
    let mut proxy = Proxy::start(&proxy_args(
        &config,
        &tmp.0.join("httpbin"),
        "foo/httpbin",
        &[
            "--inbound".into(),
            format!("80=127.0.0.1:0,{app}"),
            "--jwks-refresh".into(),
            "1s".into(),
        ],
    ));
    let inbound = addr_in(&proxy.wait_for("listening"));
    assert!(
        hits.load(Ordering::SeqCst) >= 1,
        "the JWKS was not fetched at start"
    );

    assert_eq!(get_with_token(inbound, Some(TOKEN)), 200);
    assert_eq!(get_with_token(inbound, None), 403);
    assert_eq!(get_with_token(inbound, Some("not.a.jwt")), 401);

    // The JWKS server fails: the next refresh keeps the keys it had, and tokens still pass.
    up.store(false, Ordering::SeqCst);
    proxy.wait_for("keeping the keys fetched before");
    proxy.wait_for("config applied");
    assert_eq!(get_with_token(inbound, Some(TOKEN)), 200);
}

/// Runs a warden command that should succeed within [`WAIT`]: its stdout.
fn stdout_of(args: &[&str]) -> String {
    let out = warden()
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn warden");
    let pid = out.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(out.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(Ok(o)) => {
            assert!(
                o.status.success(),
                "warden {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
        Ok(Err(e)) => panic!("warden {args:?}: {e}"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("warden {args:?} did not finish within {WAIT:?}");
        }
    }
}

#[test]
fn warden_proxy_gets_its_certificate_from_the_ca_service_with_a_bootstrap_token() {
    let tmp = TempDir::new("ca-client");
    let ca = tmp.0.join("ca");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    run_ok(&["ca", "init", "--dir", &s(&ca)]);
    run_ok(&[
        "ca",
        "issue",
        "foo/sleep",
        "--dir",
        &s(&ca),
        "--out",
        &s(&tmp.0.join("sleep")),
    ]);
    write_atomic(&config.join("mesh.yaml"), TWO_HOP);
    let mut server = Proxy::start(&[
        "ca".into(),
        "serve".into(),
        "--dir".into(),
        s(&ca),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ]);
    let line = server.wait_for("serving istio.v1.auth.IstioCertificateService on");
    let ca_addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line}"))
        .to_string();

    // A token for another identity cannot get httpbin a certificate: the proxy keeps
    // retrying and never listens.
    let token_file = tmp.0.join("token");
    let wrong = stdout_of(&["ca", "token", "foo/sleep", "--dir", &s(&ca)]);
    write_atomic(&token_file, wrong.trim());
    let app = xfcc_app();
    let ca_args = |extra: &[String]| {
        let mut args = vec![
            "proxy".to_string(),
            "-f".into(),
            s(&config),
            "--workload".into(),
            "foo/httpbin".into(),
            "--ca-addr".into(),
            ca_addr.clone(),
            "--ca-token-file".into(),
            s(&token_file),
            "--roots".into(),
            s(&ca.join("root-cert.pem")),
            "--inbound".into(),
            format!("80=127.0.0.1:0,{app}"),
        ];
        args.extend(extra.iter().cloned());
        args
    };
    {
        let mut refused = Proxy::start(&ca_args(&[]));
        let line = refused.wait_for("certificate fetch failed");
        assert!(
            line.contains("PermissionDenied")
                && line
                    .contains("entitles the caller only to spiffe://cluster.local/ns/foo/sa/sleep"),
            "{line}"
        );
        assert!(
            !refused.log.iter().any(|l| l.contains("listening")),
            "listened without a certificate: {:?}",
            refused.log
        );
    }

    let right = stdout_of(&["ca", "token", "foo/httpbin", "--dir", &s(&ca)]);
    write_atomic(&token_file, right.trim());
    let mut httpbin = Proxy::start(&ca_args(&[]));
    let line = httpbin.wait_for("certificate issued");
    assert!(
        line.contains("spiffe://cluster.local/ns/foo/sa/httpbin"),
        "{line}"
    );
    let inbound = addr_in(&httpbin.wait_for("listening port=80"));

    // sleep (certificate from files) dials httpbin over mTLS and requires httpbin's SPIFFE ID:
    // the CA-issued certificate is what httpbin presents.
    let mut sleep = Proxy::start(&proxy_args(
        &config,
        &tmp.0.join("sleep"),
        "foo/sleep",
        &[
            "--outbound".into(),
            format!("127.0.0.1:0=foo/httpbin:8000@{inbound}"),
        ],
    ));
    let outbound = addr_in(&sleep.wait_for("outbound listening"));
    sleep.wait_for("config applied");
    let (status, body) = http(outbound, "GET", "/get");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("By=spiffe://cluster.local/ns/foo/sa/httpbin;")
            && body.contains("URI=spiffe://cluster.local/ns/foo/sa/sleep"),
        "{body}"
    );
}

const EXT_AUTHZ_CONFIG: &str = r#"apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: ext-authz-http
      envoyExtAuthzHttp:
        service: ext-authz.foo.svc.cluster.local
        port: 8000
        pathPrefix: /check
        statusOnError: "503"
        includeRequestHeadersInCheck: ["x-ext-authz"]
        includeAdditionalHeadersInCheck: {x-added: "yes"}
        headersToUpstreamOnAllow: ["x-user"]
        headersToDownstreamOnDeny: ["x-ext-authz-*"]
---
apiVersion: v1
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
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: ext-authz-http}
  rules:
  - to: [{operation: {paths: ["/api/*"]}}]
"#;

/// An ext_authz HTTP server: allows requests carrying `x-ext-authz: allow` (telling the proxy
/// `x-user: alice`), answers 500 for paths under `/check/api/boom`, denies the rest with its
/// own body and headers. Sends each check request's head (lowercased) to `seen`.
fn ext_authz_server(seen: mpsc::Sender<String>) -> SocketAddr {
    let seen = std::sync::Mutex::new(seen);
    keep_alive_app(move |head| {
        let head = head.to_ascii_lowercase();
        let reply = if head.contains("\r\nx-ext-authz: allow\r\n") {
            "HTTP/1.1 200 OK\r\nx-user: alice\r\nx-other: no\r\ncontent-length: 0\r\n\r\n"
                .to_string()
        } else if head.starts_with("get /check/api/boom") {
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".to_string()
        } else {
            let body = "denied by ext authz";
            format!("HTTP/1.1 403 Forbidden\r\nx-ext-authz-check-result: denied\r\nx-secret: no\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        };
        let _ = seen.lock().unwrap().send(head);
        reply
    })
}

/// An HTTP/1.1 app answering 200 with the request's headers as its body.
fn headers_app() -> SocketAddr {
    keep_alive_app(|head| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}",
            head.len()
        )
    })
}

/// One HTTP/1.1 GET with extra headers: status, response head, body.
fn get_with(addr: SocketAddr, path: &str, extra: &str) -> (u16, String, String) {
    let mut s = connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: httpbin.foo:8000\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn warden_proxy_asks_a_custom_http_ext_authz_provider() {
    let tmp = TempDir::new("ext-authz");
    let ca = tmp.0.join("ca");
    let config = tmp.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    run_ok(&["ca", "init", "--dir", &s(&ca)]);
    run_ok(&[
        "ca",
        "issue",
        "foo/httpbin",
        "--dir",
        &s(&ca),
        "--out",
        &s(&tmp.0.join("httpbin")),
    ]);
    write_atomic(&config.join("mesh.yaml"), EXT_AUTHZ_CONFIG);
    let (tx, seen) = mpsc::channel();
    let authz = ext_authz_server(tx);
    let app = headers_app();
    let mut proxy = Proxy::start(&proxy_args(
        &config,
        &tmp.0.join("httpbin"),
        "foo/httpbin",
        &[
            "--inbound".into(),
            format!("80=127.0.0.1:0,{app}"),
            "--ext-authz-addr".into(),
            format!("ext-authz-http={authz}"),
        ],
    ));
    let inbound = addr_in(&proxy.wait_for("listening port=80"));

    // Outside the CUSTOM rules: the provider is not asked.
    let (status, _, _) = get_with(inbound, "/public", "");
    assert_eq!(status, 200);
    assert!(
        seen.try_recv().is_err(),
        "the provider was asked about /public"
    );

    // Allowed by the provider: its x-user reaches the app, its other headers do not.
    let (status, _, body) = get_with(
        inbound,
        "/api/items?page=2",
        "x-ext-authz: allow\r\ncookie: secret\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let body = body.to_ascii_lowercase();
    assert!(body.contains("x-user: alice"), "{body}");
    assert!(!body.contains("x-other"), "{body}");
    let check = seen.recv_timeout(WAIT).unwrap();
    assert!(
        check.starts_with("get /check/api/items?page=2 http/1.1"),
        "{check}"
    );
    assert!(check.contains("\r\nhost: httpbin.foo:8000\r\n"), "{check}");
    assert!(check.contains("\r\nx-added: yes\r\n"), "{check}");
    assert!(
        !check.contains("cookie"),
        "not in includeRequestHeadersInCheck: {check}"
    );

    // Denied by the provider: its status, body and the listed headers reach the client.
    let (status, head, body) = get_with(inbound, "/api/items", "");
    assert_eq!(status, 403);
    assert_eq!(body, "denied by ext authz");
    assert!(head.contains("x-ext-authz-check-result: denied"), "{head}");
    assert!(!head.contains("x-secret"), "{head}");
    seen.recv_timeout(WAIT).unwrap();

    // The provider fails (5xx): statusOnError, empty body (failOpen is false).
    let (status, _, body) = get_with(inbound, "/api/boom", "x-ext-authz: maybe\r\n");
    assert_eq!(status, 503);
    assert_eq!(body, "");
    seen.recv_timeout(WAIT).unwrap();
}
