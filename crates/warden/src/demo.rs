//! `warden demo`: a bookinfo-style mesh in one process — control plane, a sidecar per
//! workload and small built-in apps — taken through the Istio guides' steps from
//! `examples/demo/` (open mesh, STRICT mTLS, deny-all, explicit allows, a JWT at the front).
//! After each step it sends the same real requests over loopback and prints what happened
//! and which policy decided, read from the access log of the sidecar that decided. Every
//! result is compared with what the step intends; a difference is marked and makes `--once`
//! exit 1.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use warden_control::run::Input;
use warden_proxy::observe::AccessLog;

use crate::up::{LocalMesh, LocalWorkload};

pub const LONG_ABOUT: &str = "Run a bookinfo-style mesh in this process — a control plane, \
a sidecar for each workload and small built-in apps, all on 127.0.0.0/8 — and take it through \
the steps of Istio's security guides, read from examples/demo/steps: an open mesh, STRICT \
mTLS (a client without a sidecar is rejected), deny-all, explicit allows (productpage may GET \
reviews, reviews may GET ratings), and a JWT required at the front. After each step the same \
real requests are sent and a table shows source → destination, request, result and the \
policy that decided (from the deciding sidecar's access log). A result other than the step \
intends is marked with !.\n\n\
Then the mesh keeps running, with the control plane's status and metrics URLs printed, \
until Ctrl-C; --once exits instead (status 1 if any result was not as intended).";

#[derive(Args)]
pub struct DemoArgs {
    /// The demo folder: mesh/ (workloads and Services), steps/ (one file per step, applied
    /// cumulatively in name order) and demo-jwt-key.pem.
    #[arg(value_name = "DIR", default_value = "examples/demo")]
    dir: PathBuf,
    /// Exit after the last step instead of running until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// The control plane's admin endpoint (loopback).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
}

/// Who sends a request.
#[derive(Clone, Copy)]
enum From {
    /// A client outside the mesh (no sidecar), from 127.0.0.1.
    Outside(&'static str),
    /// The app of this workload, through its sidecar.
    App(&'static str),
}

/// Where it goes.
#[derive(Clone, Copy)]
enum To {
    /// Straight to the workload's address (its sidecar's inbound listener).
    Workload(&'static str),
    /// To the Service's clusterIP, through the caller's sidecar.
    Service(&'static str),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    None,
    Valid,
    Invalid,
}

struct Request {
    from: From,
    to: To,
    method: &'static str,
    path: &'static str,
    token: Token,
    /// What each step intends, in order: a status code, or 0 for "connection closed".
    expect: [u16; 5],
}

const CLOSED: u16 = 0;

/// The requests sent after every step.
const REQUESTS: &[Request] = &[
    Request {
        from: From::Outside("user"),
        to: To::Workload("ingress-gateway"),
        method: "GET",
        path: "/productpage",
        token: Token::None,
        expect: [200, 200, 403, 200, 403],
    },
    Request {
        from: From::Outside("user+JWT"),
        to: To::Workload("ingress-gateway"),
        method: "GET",
        path: "/productpage",
        token: Token::Valid,
        expect: [200, 200, 403, 200, 200],
    },
    Request {
        from: From::Outside("user+bad JWT"),
        to: To::Workload("ingress-gateway"),
        method: "GET",
        path: "/productpage",
        token: Token::Invalid,
        expect: [200, 200, 403, 200, 401],
    },
    Request {
        from: From::Outside("legacy, no sidecar"),
        to: To::Workload("productpage"),
        method: "GET",
        path: "/productpage",
        token: Token::None,
        expect: [200, CLOSED, CLOSED, CLOSED, CLOSED],
    },
    Request {
        from: From::App("productpage"),
        to: To::Service("reviews"),
        method: "GET",
        path: "/reviews/1",
        token: Token::None,
        expect: [200, 200, 403, 200, 200],
    },
    Request {
        from: From::App("productpage"),
        to: To::Service("reviews"),
        method: "DELETE",
        path: "/reviews/1",
        token: Token::None,
        expect: [200, 200, 403, 403, 403],
    },
    Request {
        from: From::App("reviews"),
        to: To::Service("ratings"),
        method: "GET",
        path: "/ratings/1",
        token: Token::None,
        expect: [200, 200, 403, 200, 200],
    },
    Request {
        from: From::App("productpage"),
        to: To::Service("ratings"),
        method: "GET",
        path: "/ratings/1",
        token: Token::None,
        expect: [200, 200, 403, 403, 403],
    },
];

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An access log kept in memory, one per sidecar, so the demo can say who decided.
#[derive(Clone, Default)]
struct MemLog(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for MemLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Step {
    file: PathBuf,
    text: String,
    title: String,
}

/// The mesh files and the steps of `dir`.
/// The demo folder: its mesh files (name, text), its steps and its JWT signing key (PEM).
type Demo = (Vec<(String, String)>, Vec<Step>, String);

fn read_demo(dir: &Path) -> Result<Demo> {
    let read_yaml = |sub: &str| -> Result<Vec<(PathBuf, String)>> {
        let d = dir.join(sub);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .with_context(|| {
                format!(
                    "{}: cannot read the demo folder (run from the repository root, or give the folder: warden demo DIR)",
                    d.display()
                )
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let t = std::fs::read_to_string(&p)
                    .with_context(|| format!("{}: cannot read", p.display()))?;
                Ok((p, t))
            })
            .collect()
    };
    let mesh: Vec<(String, String)> = read_yaml("mesh")?
        .into_iter()
        .map(|(p, t)| (p.display().to_string(), t))
        .collect();
    let steps: Vec<Step> = read_yaml("steps")?
        .into_iter()
        .map(|(file, text)| {
            let title = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix('#'))
                .map(|l| l.trim().to_string())
                .unwrap_or_else(|| file.display().to_string());
            Step { file, text, title }
        })
        .collect();
    if steps.len() != 5 {
        bail!(
            "{}: expected the 5 steps the demo's requests are written for, found {}",
            dir.join("steps").display(),
            steps.len()
        );
    }
    let key = dir.join("demo-jwt-key.pem");
    let key = std::fs::read_to_string(&key)
        .with_context(|| format!("{}: cannot read the demo's JWT signing key", key.display()))?;
    Ok((mesh, steps, key))
}

fn texts_for(mesh: &[(String, String)], steps: &[Step], upto: usize) -> Vec<(String, String)> {
    let mut t = mesh.to_vec();
    t.extend(
        steps[..=upto]
            .iter()
            .map(|s| (s.file.display().to_string(), s.text.clone())),
    );
    t
}

fn sign_token(key_pem: &str, valid: bool) -> Result<String> {
    let der = pem::parse(key_pem)
        .ok()
        .filter(|p| p.tag() == "PRIVATE KEY")
        .ok_or_else(|| anyhow!("demo-jwt-key.pem: expected a PKCS#8 PEM private key"))?;
    let key = jsonwebtoken::EncodingKey::from_ec_der(der.contents());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("warden-demo".into());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = serde_json::json!({
        "iss": "https://demo.warden.dev",
        "sub": "demo-user",
        "iat": now,
        "exp": now + 3600,
    });
    let token = jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| anyhow!("signing the demo token: {e}"))?;
    if valid {
        return Ok(token);
    }
    // Same claims, another signature: what a forger without the key can send.
    let (signed, _) = token.rsplit_once('.').unwrap_or((&token, ""));
    Ok(format!(
        "{signed}.{}",
        "A".repeat(86) // 64 bytes of zeros, base64url: a well-formed but wrong ES256 signature
    ))
}

/// `warden demo`.
pub fn run(a: &DemoArgs, verbose: bool) -> Result<ExitCode> {
    if !a.admin.ip().is_loopback() {
        bail!("--admin {}: not a loopback address", a.admin);
    }
    let (mesh_files, steps, key) = read_demo(&a.dir)?;
    let valid = sign_token(&key, true)?;
    let invalid = sign_token(&key, false)?;
    crate::proxy_cmd::install_logger(if verbose {
        warden_proxy::observe::LogLevel::Info
    } else {
        warden_proxy::observe::LogLevel::Error
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let ok = rt.block_on(async {
        let started = std::time::Instant::now();
        let logs: Arc<Mutex<HashMap<String, MemLog>>> = Arc::default();
        let factory = {
            let logs = logs.clone();
            Box::new(move |wl: &LocalWorkload| {
                let m = MemLog::default();
                if let Ok(mut l) = logs.lock() {
                    l.insert(wl.name.clone(), m.clone());
                }
                AccessLog::new(m, 1024).ok()
            })
        };
        let mesh = LocalMesh::start(
            Input::Texts(texts_for(&mesh_files, &steps, 0)),
            "127.0.0.1:0".parse().expect("a socket address"),
            Some(a.admin),
            factory,
        )
        .await?;
        let apps = start_apps(&mesh).await?;
        let logs = logs.lock().map(|l| l.clone()).unwrap_or_default();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Warden demo: a bookinfo-style mesh in one process on 127.0.0.0/8 — control plane {}, {} sidecars, built-in apps.",
            mesh.control.addr,
            mesh.sidecars.len()
        );
        for s in &mesh.sidecars {
            let _ = writeln!(
                out,
                "  {:<26} sidecar {}  app {}  identity spiffe://{}/ns/{}/sa/{}",
                s.workload.id(),
                s.workload.address,
                s.workload.app,
                mesh.trust_domain,
                s.workload.namespace,
                s.workload.service_account
            );
        }
        emit(&out);
        let mut mismatches = 0;
        for (i, step) in steps.iter().enumerate() {
            if i > 0 {
                mesh.control
                    .apply_texts(texts_for(&mesh_files, &steps, i), &step.file.display().to_string())
                    .await
                    .map_err(|e| anyhow!("{}: refused:\n  {}", step.file.display(), e.join("\n  ")))?;
            }
            mesh.settle(Duration::from_secs(10)).await?;
            let mut out = String::new();
            let _ = writeln!(
                out,
                "\n{} ({}; configuration version {}, pushed and ACKed)",
                step.title,
                step.file.display(),
                mesh.control.cp.snapshot().map_or(0, |s| s.generation)
            );
            let _ = writeln!(out, "  {:<36} {:<18} {:<18} DECIDED BY", "SOURCE → DESTINATION", "REQUEST", "RESULT");
            for r in REQUESTS {
                let token = match r.token {
                    Token::None => None,
                    Token::Valid => Some(valid.as_str()),
                    Token::Invalid => Some(invalid.as_str()),
                };
                let got = send(&mesh, &apps, r, token).await;
                let decided = decided_by(&mesh, &logs, r, got.status).await;
                let expect = r.expect[i];
                let mark = if got.status == expect { " " } else { mismatches += 1; "!" };
                let (src, dst) = labels(r);
                let result = match got.status {
                    CLOSED => "connection closed".to_string(),
                    s => format!("{s} {}", reason_phrase(s)),
                };
                let _ = writeln!(
                    out,
                    "{mark} {:<36} {:<18} {:<18} {}",
                    format!("{src} → {dst}"),
                    format!("{} {}", r.method, r.path),
                    result,
                    decided
                );
                if mark == "!" {
                    let want = match expect { CLOSED => "connection closed".to_string(), s => format!("{s} {}", reason_phrase(s)) };
                    let _ = writeln!(out, "    ! the step intends {want}; got {}", got.detail);
                }
            }
            emit(&out);
        }
        let mut out = String::new();
        if mismatches == 0 {
            let _ = writeln!(
                out,
                "\nEvery request behaved as its step intends ({} requests, {:.1} s).",
                REQUESTS.len() * steps.len(),
                started.elapsed().as_secs_f64()
            );
        } else {
            let _ = writeln!(out, "\n{mismatches} request(s) did not behave as their step intends (marked !).");
        }
        if let Some(admin) = mesh.control.admin_addr {
            let _ = writeln!(out, "Control plane status: http://{admin}/status   metrics: http://{admin}/metrics");
        }
        if a.once {
            emit(&out);
            return anyhow::Ok(mismatches == 0);
        }
        let _ = writeln!(
            out,
            "The mesh keeps running. Try it:\n  curl -i http://127.0.10.1:8080/productpage -H 'Authorization: Bearer {valid}'\nCtrl-C stops."
        );
        emit(&out);
        crate::proxy_cmd::shutdown_signal().await;
        drop(apps);
        anyhow::Ok(mismatches == 0)
    })?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn emit(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

fn labels(r: &Request) -> (String, String) {
    let src = match r.from {
        From::Outside(n) | From::App(n) => n.to_string(),
    };
    let dst = match r.to {
        To::Workload("ingress-gateway") => "ingress → productpage".to_string(),
        To::Workload(n) => n.to_string(),
        To::Service(n) => n.to_string(),
    };
    (src, dst)
}

fn reason_phrase(s: u16) -> &'static str {
    hyper::StatusCode::from_u16(s)
        .ok()
        .and_then(|c| c.canonical_reason())
        .unwrap_or("")
}

struct Got {
    /// Status, or [`CLOSED`].
    status: u16,
    detail: String,
}

/// Sends one request as the demo's caller would.
async fn send(mesh: &LocalMesh, apps: &Apps, r: &Request, token: Option<&str>) -> Got {
    let (source, dst) = match (r.from, r.to) {
        (From::Outside(_), To::Workload(n)) => {
            let Some(s) = mesh.sidecars.iter().find(|s| s.workload.name == n) else {
                return Got {
                    status: CLOSED,
                    detail: format!("no workload {n}"),
                };
            };
            let port = s.workload.ports.first().copied().unwrap_or(80);
            (
                "127.0.0.1".parse().expect("an IP"),
                SocketAddr::new(s.workload.address, port),
            )
        }
        (From::App(caller), To::Service(svc)) => {
            let Some(c) = mesh.sidecars.iter().find(|s| s.workload.name == caller) else {
                return Got {
                    status: CLOSED,
                    detail: format!("no workload {caller}"),
                };
            };
            let Some(at) = apps.service(svc) else {
                return Got {
                    status: CLOSED,
                    detail: format!("no Service {svc}"),
                };
            };
            (c.workload.app, at)
        }
        _ => {
            return Got {
                status: CLOSED,
                detail: "unsupported request".into(),
            }
        }
    };
    match http_request(source, dst, r.method, r.path, token).await {
        Ok((status, _)) => Got {
            status,
            detail: format!("{status}"),
        },
        Err(e) => Got {
            status: CLOSED,
            detail: e,
        },
    }
}

/// One HTTP/1.1 request from `source` (bound before connecting) to `dst`: the status and body.
async fn http_request(
    source: IpAddr,
    dst: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let exchange = async {
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
        let mut stream = socket
            .connect(dst)
            .await
            .map_err(|e| format!("connect {dst}: {e}"))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n");
        if let Some(t) = token {
            let _ = write!(req, "Authorization: Bearer {t}\r\n");
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("connection closed ({e})"))?;
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "connection closed without a response".to_string())?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Which policy decided, from the access log of the sidecar that decided: the first hop
/// that refused, else the last hop. A connection closed before any request is the port's
/// mTLS mode.
async fn decided_by(
    mesh: &LocalMesh,
    logs: &HashMap<String, MemLog>,
    r: &Request,
    status: u16,
) -> String {
    let Some(snap) = mesh.control.cp.snapshot() else {
        return String::new();
    };
    let cfg = &snap.config;
    let first_hop = match r.to {
        To::Workload(n) | To::Service(n) => n,
    };
    if status == CLOSED {
        let Some(wl) = cfg.workloads.iter().find(|w| w.name == first_hop) else {
            return String::new();
        };
        let port = wl.ports.first().map_or(0, |p| p.container_port);
        let pa = warden_policy::scope::peer_authentication(cfg, wl);
        return format!("mTLS {}", pa.mode_for(port).describe());
    }
    // The ingress forwards to productpage: two hops to read when the first let it through.
    let mut hops = vec![first_hop];
    if first_hop == "ingress-gateway" {
        hops.push("productpage");
    }
    let mut said = Vec::new();
    for (i, hop) in hops.iter().enumerate() {
        let Some(entry) = take_entry(mesh, logs, hop).await else {
            if i == 0 {
                return "(no access log entry)".into();
            }
            break;
        };
        let decision = entry["authz_decision"].as_str().unwrap_or("").to_string();
        let text = describe_entry(cfg, hop, &entry);
        if decision != "allow" {
            return text;
        }
        said.push(text);
    }
    said.join(" · ")
}

fn describe_entry(cfg: &warden_policy::config::Config, hop: &str, e: &serde_json::Value) -> String {
    let decision = e["authz_decision"].as_str().unwrap_or("");
    let policy = e["authz_policy"].as_str();
    let action = e["authz_action"].as_str().unwrap_or("");
    match (decision, policy) {
        ("allow", Some(p)) => format!("{action} {p} ({hop})"),
        ("allow", None) => format!("no policy: allowed ({hop})"),
        ("deny", Some(p)) => format!("{action} {p} ({hop})"),
        ("deny", None) => {
            let names: Vec<String> = cfg
                .workloads
                .iter()
                .find(|w| w.name == hop)
                .map(|wl| {
                    warden_policy::scope::authorization_policies(cfg, wl)
                        .iter()
                        .filter(|p| p.spec.action == warden_policy::model::Action::Allow)
                        .map(|p| format!("{}/{}", p.namespace(), p.name()))
                        .collect()
                })
                .unwrap_or_default();
            format!("no ALLOW rule matched in {} ({hop})", names.join(", "))
        }
        _ => {
            let reason = e["authz_reason"].as_str().unwrap_or("");
            format!("{reason} ({hop})")
        }
    }
}

/// The newest access log entry of `workload`'s sidecar, waiting briefly for it (entries
/// are written once the response has been sent), then clearing the log.
async fn take_entry(
    mesh: &LocalMesh,
    logs: &HashMap<String, MemLog>,
    workload: &str,
) -> Option<serde_json::Value> {
    let sidecar = mesh.sidecars.iter().find(|s| s.workload.name == workload)?;
    let log = logs.get(workload)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(l) = sidecar.observer.access_log() {
            l.flush(Duration::from_millis(200));
        }
        let found = log.0.lock().ok().and_then(|mut buf| {
            let text = String::from_utf8_lossy(&buf).to_string();
            let entry = text
                .lines()
                .rev()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["reporter"] == "destination");
            if entry.is_some() {
                buf.clear();
            }
            entry
        });
        if found.is_some() || tokio::time::Instant::now() >= deadline {
            return found;
        }
        // Waiting for the sidecar to write the entry; the deadline bounds it.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------- built-in apps

/// The built-in apps: each answers with who it is and who called (from the sidecar's
/// x-forwarded-client-cert); the ingress app forwards to productpage.
struct Apps {
    services: HashMap<String, SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Apps {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Apps {
    fn service(&self, name: &str) -> Option<SocketAddr> {
        self.services.get(name).copied()
    }
}

async fn start_apps(mesh: &LocalMesh) -> Result<Apps> {
    let services: HashMap<String, SocketAddr> = mesh
        .services
        .iter()
        .map(|(at, name)| (name.split('.').next().unwrap_or(name).to_string(), *at))
        .collect();
    let productpage = services.get("productpage").copied();
    let mut tasks = Vec::new();
    for s in &mesh.sidecars {
        for port in &s.workload.ports {
            let at = SocketAddr::new(s.workload.app, *port);
            let listener = TcpListener::bind(at).await.with_context(|| {
                format!(
                    "the built-in app of {}: cannot listen on {at}",
                    s.workload.id()
                )
            })?;
            let name = s.workload.name.clone();
            let forward = (name == "ingress-gateway")
                .then_some(productpage)
                .flatten()
                .map(|to| (s.workload.app, to));
            tasks.push(tokio::spawn(serve_app(listener, name, forward)));
        }
    }
    Ok(Apps { services, tasks })
}

async fn serve_app(listener: TcpListener, name: String, forward: Option<(IpAddr, SocketAddr)>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let name = name.clone();
                async move { Ok::<_, std::convert::Infallible>(app_response(&name, forward, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn app_response(
    name: &str,
    forward: Option<(IpAddr, SocketAddr)>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let respond = |status: u16, body: String| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
        r
    };
    if let Some((source, to)) = forward {
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let _ = req.into_body().collect().await;
        return match http_request(source, to, &method, &path, token.as_deref()).await {
            Ok((status, body)) => respond(status, body),
            Err(e) => respond(502, format!("ingress: productpage unreachable: {e}\n")),
        };
    }
    let caller = req
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|f| f.strip_prefix("URI=")))
        .unwrap_or("no mTLS identity")
        .to_string();
    respond(200, format!("{name}: {method} {path} (caller {caller})\n"))
}
