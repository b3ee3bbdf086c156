//! Observability: the JSON access log, the Prometheus metrics with Istio's names and labels,
//! and the admin server answering real HTTP/1.1 over 127.0.0.1. Every test is bounded in time
//! and synchronises on I/O or explicit flushes only.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warden_policy::authz::{DryRun, RuleMatch};
use warden_policy::engine::{CustomCall, Decision, ExtAuthzAnswer, HeaderEdits, Outcome, Step};
use warden_policy::model::Action;
use warden_proxy::observe::{
    AccessLog, AccessLogEntry, AdminHandlers, AdminServer, ConnectionInfo, DecisionSummary,
    LogLevel, LogLevelControl, ObserveError, Observer, Readiness, RequestInfo, RequestProtocol,
    ResponseFlag, ResponseFlags, TcpInfo,
};

const LIMIT: Duration = Duration::from_secs(30);
const CLIENT: &str = "spiffe://cluster.local/ns/foo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/bar/sa/server";

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test timed out")
}

/// A sink the test can read back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

fn conn(mtls: bool) -> ConnectionInfo {
    ConnectionInfo {
        source_principal: mtls.then(|| CLIENT.to_string()),
        source_workload: None,
        source_addr: "127.0.0.1:40000".parse().unwrap(),
        destination_workload: "server".into(),
        destination_namespace: "bar".into(),
        destination_principal: mtls.then(|| SERVER.to_string()),
        destination_port: 8080,
        mtls,
        reporter: Default::default(),
    }
}

fn rule(ns: &str, name: &str, action: Action, rule: u32, dry_run: bool) -> RuleMatch {
    RuleMatch {
        namespace: ns.into(),
        name: name.into(),
        action,
        rule,
        dry_run,
        widened_for_tcp: false,
        provider: None,
        bad_custom: None,
    }
}

fn decision(outcome: Outcome, status: Option<u16>, deciding: Option<RuleMatch>) -> Decision {
    Decision {
        outcome,
        step: if outcome == Outcome::Allow {
            Step::Allow
        } else {
            Step::Deny
        },
        status,
        body: String::new(),
        deciding,
        request_principal: Some("https://issuer.example/alice".into()),
        jwt_error: None,
        custom: None,
        audit: Vec::new(),
        dry_run: vec![DryRun {
            action: Action::Deny,
            result: "denied",
            matched: Some(rule("bar", "shadow", Action::Deny, 2, true)),
        }],
        path: Some("/api".into()),
        header_edits: HeaderEdits::default(),
        reason: "test".into(),
    }
}

fn allow() -> DecisionSummary {
    DecisionSummary::from(&decision(
        Outcome::Allow,
        None,
        Some(rule("bar", "allow-get", Action::Allow, 1, false)),
    ))
}

fn deny() -> DecisionSummary {
    DecisionSummary::from(&decision(
        Outcome::Deny,
        Some(403),
        Some(rule("bar", "deny-admin", Action::Deny, 0, false)),
    ))
}

fn request<'a>(
    c: &'a ConnectionInfo,
    method: &'a str,
    path: &'a str,
    status: u16,
) -> RequestInfo<'a> {
    RequestInfo {
        conn: c,
        start: SystemTime::now(),
        protocol: RequestProtocol::Http,
        method,
        authority: "server.bar:8080",
        path,
        status,
        response_flags: ResponseFlags::NONE,
        bytes_received: 12,
        bytes_sent: 34,
        duration: Duration::from_millis(7),
    }
}

fn tcp(c: &ConnectionInfo) -> TcpInfo<'_> {
    TcpInfo {
        conn: c,
        start: SystemTime::now(),
        response_flags: ResponseFlags::NONE,
        bytes_received: 100,
        bytes_sent: 250,
        duration: Duration::from_millis(3),
    }
}

#[test]
fn access_log_lines_are_json_with_the_expected_fields() {
    let sink = Shared::default();
    let log = AccessLog::new(sink.clone(), 64).unwrap();
    let observer = Observer::new(Some(log));
    let c = conn(true);
    observer.on_request(&request(&c, "GET", "/api?x=1", 200), &allow());
    let mut denied = request(&c, "POST", "/admin", 403);
    denied.response_flags = ResponseFlag::UpstreamConnectionFailure.into();
    observer.on_request(&denied, &deny());
    let plain = conn(false);
    observer.on_tcp_open(&plain);
    observer.on_tcp_close(
        &tcp(&plain),
        &DecisionSummary::local("reset", "no ALLOW rule matched"),
    );
    assert!(observer.access_log().unwrap().flush(LIMIT));

    let lines = sink.lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let a = &lines[0];
    let time = a["time"].as_str().unwrap();
    let parsed = time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{time}: {e}"));
    assert_eq!(parsed.offset(), time::UtcOffset::UTC);
    assert!(time.ends_with('Z'), "{time}");
    assert_eq!(a["protocol"], "http");
    assert_eq!(a["source_principal"], CLIENT);
    assert_eq!(a["source_address"], "127.0.0.1:40000");
    assert_eq!(a["destination_workload"], "server.bar");
    assert_eq!(a["destination_port"], 8080);
    assert_eq!(a["method"], "GET");
    assert_eq!(a["authority"], "server.bar:8080");
    assert_eq!(a["path"], "/api?x=1");
    assert_eq!(a["status"], 200);
    assert_eq!(a["response_flags"], "-");
    assert_eq!(a["authz_decision"], "allow");
    assert_eq!(a["authz_policy"], "bar/allow-get");
    assert_eq!(a["authz_action"], "ALLOW");
    assert_eq!(a["authz_rule"], 1);
    assert_eq!(a["request_principal"], "https://issuer.example/alice");
    assert_eq!(a["bytes_received"], 12);
    assert_eq!(a["bytes_sent"], 34);
    assert_eq!(a["duration_ms"], 7);
    assert_eq!(a["dry_run"][0]["result"], "denied");
    assert_eq!(a["dry_run"][0]["policy"]["name"], "shadow");

    let d = &lines[1];
    assert_eq!(d["authz_decision"], "deny");
    assert_eq!(d["authz_policy"], "bar/deny-admin");
    assert_eq!(d["authz_rule"], 0);
    assert_eq!(d["status"], 403);
    assert_eq!(d["response_flags"], "UF");

    let t = &lines[2];
    assert_eq!(t["protocol"], "tcp");
    assert!(t["source_principal"].is_null());
    for http_only in ["method", "authority", "path", "status"] {
        assert!(t.get(http_only).is_none(), "{http_only} in a TCP line: {t}");
    }
    assert_eq!(t["authz_decision"], "reset");
    assert!(t["authz_policy"].is_null());
    assert_eq!(t["bytes_received"], 100);
    assert_eq!(t["bytes_sent"], 250);

    // The struct reads back what it wrote.
    let back: AccessLogEntry = serde_json::from_value(lines[0].clone()).unwrap();
    assert_eq!(back.authz_rule, Some(1));
}

/// A sink whose first write blocks until the test lets it go.
struct Stuck(Option<mpsc::Receiver<()>>);

impl Write for Stuck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(gate) = self.0.take() {
            let _ = gate.recv();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stuck_sink_drops_lines_instead_of_blocking_requests() {
    let (release, gate) = mpsc::channel();
    let log = AccessLog::new(Stuck(Some(gate)), 2).unwrap();
    let observer = Observer::new(Some(log));
    let c = conn(true);
    for _ in 0..50 {
        observer.on_request(&request(&c, "GET", "/", 200), &allow());
    }
    let dropped = observer.access_log().unwrap().dropped();
    assert!(dropped >= 40, "dropped {dropped}");
    assert!(observer
        .render()
        .contains(&format!("warden_access_log_dropped_total {dropped}")));
    release.send(()).unwrap();
    assert!(observer.access_log().unwrap().flush(LIMIT));
}

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

#[test]
fn metrics_have_istio_names_labels_and_counts() {
    let observer = Observer::new(None);
    let c = conn(true);
    observer.on_request(&request(&c, "GET", "/a", 200), &allow());
    observer.on_request(&request(&c, "GET", "/b", 200), &allow());
    observer.on_request(&request(&c, "POST", "/admin", 403), &deny());
    let plain = conn(false);
    for _ in 0..2 {
        observer.on_tcp_open(&plain);
        observer.on_tcp_close(&tcp(&plain), &allow());
    }
    let text = observer.render();

    let ok = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("source_workload", "unknown"),
        ("source_workload_namespace", "foo"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "bar"),
        ("destination_principal", SERVER),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        sample(&text, "istio_requests_total", &ok),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_requests_total", &[("response_code", "403")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "istio_request_duration_milliseconds_count", &ok),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "istio_request_duration_milliseconds_sum", &ok),
        Some(14.0)
    );
    // 7 ms lands in le=10 and not in le=5, with Istio's buckets.
    let mut le5 = ok.to_vec();
    le5.push(("le", "5.0"));
    assert_eq!(
        sample(&text, "istio_request_duration_milliseconds_bucket", &le5),
        Some(0.0)
    );
    let mut le10 = ok.to_vec();
    le10.push(("le", "10.0"));
    assert_eq!(
        sample(&text, "istio_request_duration_milliseconds_bucket", &le10),
        Some(2.0)
    );
    assert!(text.contains("le=\"3600000.0\""), "{text}");

    let tcp_labels = [
        ("reporter", "destination"),
        ("source_principal", "unknown"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &tcp_labels),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &tcp_labels),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &tcp_labels),
        Some(200.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &tcp_labels),
        Some(500.0)
    );
    assert!(!text
        .lines()
        .any(|l| l.starts_with("istio_tcp_") && l.contains("response_code")));

    let allowed = [
        ("policy_namespace", "bar"),
        ("policy_name", "allow-get"),
        ("action", "ALLOW"),
        ("result", "allow"),
    ];
    assert_eq!(
        sample(&text, "warden_authz_decisions_total", &allowed),
        Some(4.0)
    );
    let denied = [
        ("policy_namespace", "bar"),
        ("policy_name", "deny-admin"),
        ("action", "DENY"),
        ("result", "deny"),
    ];
    assert_eq!(
        sample(&text, "warden_authz_decisions_total", &denied),
        Some(1.0)
    );
    let shadow = [
        ("policy_namespace", "bar"),
        ("policy_name", "shadow"),
        ("action", "DENY"),
        ("result", "denied"),
    ];
    assert_eq!(
        sample(&text, "warden_authz_dry_run_total", &shadow),
        Some(5.0)
    );
    assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram"));
    assert!(text.contains("# TYPE istio_requests counter"));
}

#[test]
fn response_flags_and_principals_read_as_envoy_and_istio_show_them() {
    assert_eq!(ResponseFlags::NONE.to_string(), "-");
    let f = ResponseFlags::from(ResponseFlag::UpstreamConnectionFailure)
        .with(ResponseFlag::UpstreamRetryLimitExceeded);
    assert_eq!(f.to_string(), "UF,URX");
    let mut custom = rule("bar", "ext", Action::Custom, 0, false);
    custom.provider = Some("opa".into());
    let mut d = decision(Outcome::Deny, Some(403), Some(custom.clone()));
    d.custom = Some(CustomCall {
        provider: "opa".into(),
        settings: String::new(),
        rule: custom,
        answer: ExtAuthzAnswer::Deny,
    });
    let d = DecisionSummary::from(&d);
    assert_eq!(ResponseFlags::for_decision(&d).to_string(), "UAEX");
    // A CUSTOM policy whose provider is unusable is enforced as DENY by RBAC: no UAEX.
    let mut bad = rule("bar", "ext", Action::Custom, 0, false);
    bad.bad_custom = Some("provider not in mesh config".into());
    let d = DecisionSummary::from(&decision(Outcome::Deny, Some(403), Some(bad)));
    assert_eq!(ResponseFlags::for_decision(&d).to_string(), "-");
    assert_eq!(ResponseFlags::for_decision(&deny()).to_string(), "-");
    assert_eq!(conn(true).source_namespace(), Some("foo"));
    assert_eq!(conn(false).source_namespace(), None);
}

// ---------------------------------------------------------------- admin server

struct Admin {
    addr: SocketAddr,
    readiness: Readiness,
    applied: Arc<Mutex<Vec<LogLevel>>>,
    observer: Arc<Observer>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn admin() -> Admin {
    let observer = Arc::new(Observer::new(None));
    let readiness = Readiness::new();
    let applied = Arc::new(Mutex::new(Vec::new()));
    let seen = applied.clone();
    let handlers = AdminHandlers {
        observer: observer.clone(),
        readiness: readiness.clone(),
        config_dump: Arc::new(|| serde_json::json!({"workload": "bar/server", "policies": 3})),
        certs: Arc::new(
            || serde_json::json!({"spiffe_id": SERVER, "expires": "2030-01-01T00:00:00Z"}),
        ),
        log_level: Arc::new(LogLevelControl::new(LogLevel::Info, move |l| {
            if l == LogLevel::Trace {
                return Err("trace is not compiled in".into());
            }
            seen.lock().unwrap().push(l);
            Ok(())
        })),
    };
    let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), handlers)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(server.run());
    Admin {
        addr,
        readiness,
        applied,
        observer,
        task,
    }
}

/// One HTTP/1.1 request over a fresh connection; returns status, headers and body.
async fn http(addr: SocketAddr, method: &str, target: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[tokio::test]
async fn admin_readiness_flips_from_503_to_200() {
    bounded(async {
        let a = admin().await;
        let (status, _, body) = http(a.addr, "GET", "/ready").await;
        assert_eq!(status, 503, "{body}");
        a.readiness.set_ready(true);
        let (status, _, _) = http(a.addr, "GET", "/ready").await;
        assert_eq!(status, 200);
        a.readiness.set_ready(false);
        assert_eq!(http(a.addr, "GET", "/ready").await.0, 503);
    })
    .await
}

#[tokio::test]
async fn admin_serves_config_certs_and_metrics() {
    bounded(async {
        let a = admin().await;
        let (status, head, body) = http(a.addr, "GET", "/config_dump").await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["workload"], "bar/server");

        let (status, _, body) = http(a.addr, "GET", "/certs").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["spiffe_id"], SERVER);

        let c = conn(true);
        a.observer
            .on_request(&request(&c, "GET", "/", 200), &allow());
        let (status, head, body) = http(a.addr, "GET", "/stats/prometheus").await;
        assert_eq!(status, 200);
        assert!(head.contains("openmetrics-text"), "{head}");
        assert_eq!(
            sample(&body, "istio_requests_total", &[("response_code", "200")]),
            Some(1.0),
            "{body}"
        );

        assert_eq!(http(a.addr, "GET", "/nope").await.0, 404);
        assert_eq!(http(a.addr, "POST", "/config_dump").await.0, 405);
    })
    .await
}

#[tokio::test]
async fn admin_changes_the_log_level_through_post_only() {
    bounded(async {
        let a = admin().await;
        let (status, _, body) = http(a.addr, "GET", "/logging").await;
        assert_eq!((status, body.as_str()), (200, "level: info\n"));

        // A GET with a level shows but never changes it.
        let (_, _, body) = http(a.addr, "GET", "/logging?level=debug").await;
        assert_eq!(body, "level: info\n");
        assert!(a.applied.lock().unwrap().is_empty());

        let (status, _, body) = http(a.addr, "POST", "/logging?level=debug").await;
        assert_eq!((status, body.as_str()), (200, "level: debug\n"));
        assert_eq!(http(a.addr, "GET", "/logging").await.2, "level: debug\n");
        assert_eq!(*a.applied.lock().unwrap(), vec![LogLevel::Debug]);

        let (status, _, body) = http(a.addr, "POST", "/logging?level=loud").await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(http(a.addr, "POST", "/logging").await.0, 400);

        // The callback refusing leaves the level as it was.
        let (status, _, body) = http(a.addr, "POST", "/logging?level=trace").await;
        assert_eq!(status, 500, "{body}");
        assert_eq!(http(a.addr, "GET", "/logging").await.2, "level: debug\n");

        for level in ["warn", "error", "info"] {
            let (status, _, body) = http(a.addr, "POST", &format!("/logging?level={level}")).await;
            assert_eq!((status, body), (200, format!("level: {level}\n")));
        }
    })
    .await
}

#[tokio::test]
async fn admin_refuses_non_loopback_addresses() {
    bounded(async {
        for addr in ["0.0.0.0:0", "10.1.2.3:15000", "[::]:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let handlers = AdminHandlers {
                observer: Arc::new(Observer::new(None)),
                readiness: Readiness::new(),
                config_dump: Arc::new(|| serde_json::json!({})),
                certs: Arc::new(|| serde_json::json!({})),
                log_level: Arc::new(LogLevelControl::new(LogLevel::Info, |_| Ok(()))),
            };
            let err = AdminServer::bind(addr, handlers).await.unwrap_err();
            assert!(matches!(err, ObserveError::NotLoopback(a) if a == addr));
            assert!(err.to_string().contains("loopback"), "{err}");
        }
    })
    .await
}
