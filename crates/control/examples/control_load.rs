//! The control plane's scale benchmark (issue 5): a real `warden control` process serving a
//! generated mesh of N namespaces (a Namespace, a Deployment with its own service account, a
//! Service and P AuthorizationPolicies each) to N light proxies ([`FakeProxy`]), each with its
//! own identity and its own TLS connection. Once every proxy has its first configuration,
//! policy files are rewritten (atomically, by rename) and the time from the rename to each
//! concerned proxy's receipt of the changed resource is measured, with the server's CPU time,
//! memory and push counters around each change.
//!
//! Scenarios: (a) a policy of one namespace changes (concerns its one proxy); (b) a policy of
//! the root namespace changes (concerns every proxy). The ratio of their per-change pushes and
//! CPU shows that a push costs in proportion to the proxies a change concerns.
//!
//! Run: `cargo run --release -p warden-control --example control_load -- --warden
//! target/release/warden` (see `--help`; `bench/control-scale.sh` does it all).
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use warden_control::client::{FakeProxy, Received};
use warden_identity::ca::Ca;
use warden_identity::spiffe::SpiffeId;

const ROOT_NS: &str = "istio-system";
const ROOT_POLICY_KEY: &str = "AuthorizationPolicy/istio-system/mesh-deny-internal";
/// How long one change may take to reach its proxies before the run is declared failed.
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);

const USAGE: &str = "control_load: scale benchmark of `warden control`

Options:
  --warden PATH          the warden binary (default: $WARDEN_BIN)
  --namespaces N         namespaces, one proxy each (default 1000)
  --policies N           AuthorizationPolicies per namespace (default 10)
  --local-changes N      scenario (a): changes of one namespace's policy (default 50)
  --global-changes N     scenario (b): changes of a root-namespace policy (default 10)
  --poll-interval D      the control plane's --poll-interval (default 100ms)
  --work DIR             where the config and CA go (default: a fresh temporary folder)
  --json FILE            also write the results as JSON
  --keep                 keep the work folder";

struct Args {
    warden: PathBuf,
    namespaces: usize,
    policies: usize,
    local_changes: usize,
    global_changes: usize,
    poll_interval: String,
    work: Option<PathBuf>,
    json: Option<PathBuf>,
    keep: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        warden: std::env::var_os("WARDEN_BIN")
            .map(PathBuf::from)
            .unwrap_or_default(),
        namespaces: 1000,
        policies: 10,
        local_changes: 50,
        global_changes: 10,
        poll_interval: "100ms".into(),
        work: None,
        json: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|e| format!("{flag} {v}: not a number: {e}"))
        };
        match flag.as_str() {
            "--warden" => a.warden = PathBuf::from(value()?),
            "--namespaces" => a.namespaces = num(value()?)?,
            "--policies" => a.policies = num(value()?)?,
            "--local-changes" => a.local_changes = num(value()?)?,
            "--global-changes" => a.global_changes = num(value()?)?,
            "--poll-interval" => a.poll_interval = value()?,
            "--work" => a.work = Some(PathBuf::from(value()?)),
            "--json" => a.json = Some(PathBuf::from(value()?)),
            "--keep" => a.keep = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other}\n\n{USAGE}")),
        }
    }
    if a.warden.as_os_str().is_empty() {
        return Err(format!(
            "name the warden binary with --warden or WARDEN_BIN\n\n{USAGE}"
        ));
    }
    if a.namespaces == 0 || a.policies == 0 {
        return Err("--namespaces and --policies must be at least 1".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("control_load: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("control_load: {e}");
        std::process::exit(1);
    }
}

// ------------------------------------------------------------------ configuration

fn ns_name(i: usize) -> String {
    format!("ns-{i:04}")
}

fn app_name(i: usize) -> String {
    format!("svc-{i:04}")
}

fn sa_name(i: usize) -> String {
    format!("sa-{i:04}")
}

/// Namespace `i`'s file: its Namespace, Deployment, Service and policies. `variant` changes
/// the paths of policy `pol-3` (the one scenario (a) rewrites).
fn namespace_file(i: usize, n: usize, policies: usize, variant: usize) -> String {
    let (ns, app, sa) = (ns_name(i), app_name(i), sa_name(i));
    let vip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
    let mut s = format!(
        "apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
  labels:
    istio-injection: enabled
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {app}
  namespace: {ns}
spec:
  template:
    metadata:
      labels:
        app: {app}
        version: v1
    spec:
      serviceAccountName: {sa}
      containers:
      - name: app
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: {app}
  namespace: {ns}
spec:
  clusterIP: {vip}
  selector:
    app: {app}
  ports:
  - name: http
    port: 80
    targetPort: 8080
"
    );
    for j in 0..policies {
        // Callers: the next namespaces' service accounts, as a chain of services would.
        let caller = |k: usize| {
            let c = (i + k) % n;
            format!("cluster.local/ns/{}/sa/{}", ns_name(c), sa_name(c))
        };
        let policy = if j == 0 {
            format!(
                "  action: DENY
  rules:
  - to:
    - operation:
        paths: [\"/admin/*\", \"/debug/*\"]
    from:
    - source:
        notPrincipals: [\"{}\"]
",
                caller(1)
            )
        } else {
            let version = if j == 3 {
                format!("/v{variant}")
            } else {
                String::new()
            };
            format!(
                "  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"{}\", \"{}\"]
    to:
    - operation:
        methods: [\"GET\", \"HEAD\"]
        paths: [\"/api{version}/items/{j}/*\", \"/api{version}/items/{j}\"]
  - from:
    - source:
        principals: [\"{}\"]
    to:
    - operation:
        methods: [\"POST\", \"PUT\", \"DELETE\"]
        paths: [\"/api{version}/items/{j}/*\"]
",
                caller(1),
                caller(2),
                caller(3)
            )
        };
        s.push_str(&format!(
            "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: pol-{j}
  namespace: {ns}
spec:
  selector:
    matchLabels:
      app: {app}
{policy}"
        ));
    }
    s
}

/// The root namespace's file: a mesh-wide DENY policy (no selector: it attaches to every
/// workload) whose path scenario (b) rewrites.
fn root_file(variant: usize) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata:
  name: {ROOT_NS}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: mesh-deny-internal
  namespace: {ROOT_NS}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: [\"/internal/v{variant}/*\"]
"
    )
}

/// Replaces `dir/name` atomically (write a hidden file, which the watcher skips, then rename)
/// and returns the instant just before the rename.
fn replace(dir: &Path, name: &str, text: &str) -> Result<Instant, String> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let at = Instant::now();
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| format!("renaming {name}: {e}"))?;
    Ok(at)
}

// ------------------------------------------------------------------ the server process

/// The `warden control` child; killed when dropped.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// A GET on the admin endpoint: status and body.
fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}{path}: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// The counters and gauges of `/metrics` this benchmark reads.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    pushes: f64,
    acks: f64,
    nacks: f64,
    connected: f64,
    accepted: f64,
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name || n == format!("{name}_total")).then(|| v.parse().ok())?
        })
        .unwrap_or(f64::NAN)
}

fn counters(admin: &str) -> Result<Counters, String> {
    let (status, body) = http_get(admin, "/metrics")?;
    if status != 200 {
        return Err(format!("{admin}/metrics: status {status}"));
    }
    Ok(Counters {
        pushes: metric(&body, "warden_control_pushes"),
        acks: metric(&body, "warden_control_acks"),
        nacks: metric(&body, "warden_control_nacks"),
        connected: metric(&body, "warden_control_proxies_connected"),
        accepted: metric(&body, "warden_control_configs_accepted"),
    })
}

/// The process's CPU time (user + system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15; in `rest` they are at 11 and 12.
    let clk = clock_ticks();
    Ok(Duration::from_secs_f64(
        (ticks(11) + ticks(12)) as f64 / clk,
    ))
}

/// USER_HZ; 100 on every Linux this runs on (getconf CLK_TCK), read from getconf if it can.
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    s.lines()
        .find_map(|l| {
            let v = l.strip_prefix(field)?.strip_prefix(':')?;
            v.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| format!("/proc/{pid}/status: no {field}"))
}

/// The soft limit on open files of a process, from /proc/PID/limits.
fn open_files_limit(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

fn check_fd_limit(who: &str, pid: &str, needed: u64) -> Result<(), String> {
    match open_files_limit(pid) {
        Some(limit) if limit < needed => Err(format!(
            "{who} may open only {limit} files but {needed} are needed (one per proxy connection, \
             plus files and listeners): raise the limit first, e.g. `ulimit -n 65536` in the shell \
             that runs this (bench/control-scale.sh does)"
        )),
        _ => Ok(()),
    }
}

/// Waits until every push the server made was answered and `connected` proxies are in:
/// the server is idle, so CPU and counters read next belong to what came before.
async fn settle(admin: &str, connected: usize) -> Result<Counters, String> {
    let until = Instant::now() + CHANGE_DEADLINE;
    loop {
        let admin_ = admin.to_string();
        let c = tokio::task::spawn_blocking(move || counters(&admin_))
            .await
            .map_err(|e| e.to_string())??;
        if c.acks + c.nacks == c.pushes && c.connected as usize == connected {
            return Ok(c);
        }
        if Instant::now() > until {
            return Err(format!(
                "the server did not settle: {} pushes, {} ACKs, {} NACKs, {} proxies connected",
                c.pushes, c.acks, c.nacks, c.connected
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ measuring

#[derive(Default, serde::Serialize)]
struct Scenario {
    name: String,
    changes: usize,
    proxies_per_change: usize,
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    pushes_per_change: f64,
    cpu_ms_per_change: f64,
    /// Responses seen by proxies the changes did not concern.
    unconcerned_responses: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Mesh {
    dir: PathBuf,
    n: usize,
    policies: usize,
    admin: String,
    pid: u32,
    rx: mpsc::UnboundedReceiver<(usize, Received)>,
}

impl Mesh {
    /// Waits until each of `concerned` received a response holding `key`; returns the
    /// latencies from `t0`, and counts responses seen by others.
    async fn reach(
        &mut self,
        key: &str,
        t0: Instant,
        concerned: &HashSet<usize>,
        unconcerned: &mut usize,
    ) -> Result<Vec<f64>, String> {
        let mut waiting = concerned.clone();
        let mut out = Vec::with_capacity(concerned.len());
        let until = tokio::time::Instant::now() + CHANGE_DEADLINE;
        while !waiting.is_empty() {
            let got = tokio::time::timeout_at(until, self.rx.recv())
                .await
                .map_err(|_| {
                    format!(
                        "{key}: {} of {} proxies had not received it after {CHANGE_DEADLINE:?}",
                        waiting.len(),
                        concerned.len()
                    )
                })?;
            let Some((idx, r)) = got else {
                return Err("every proxy stream ended".into());
            };
            if r.nacked {
                return Err(format!("proxy {idx} NACKed version {}", r.version));
            }
            if !concerned.contains(&idx) {
                *unconcerned += 1;
                continue;
            }
            if r.keys.iter().any(|k| k == key) && waiting.remove(&idx) {
                out.push(r.at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
            }
        }
        Ok(out)
    }

    async fn scenario(
        &mut self,
        name: &str,
        changes: usize,
        mut change: impl FnMut(usize) -> Result<(String, Instant, HashSet<usize>), String>,
    ) -> Result<Scenario, String> {
        let mut lat = Vec::new();
        let mut unconcerned = 0;
        let mut per_change = 0;
        let before = settle(&self.admin, self.n).await?;
        let mut cpu = Duration::ZERO;
        let mut pushes = 0.0;
        let mut last = before;
        for c in 0..changes {
            let cpu0 = cpu_time(self.pid)?;
            let (key, t0, concerned) = change(c)?;
            per_change = concerned.len();
            lat.extend(self.reach(&key, t0, &concerned, &mut unconcerned).await?);
            let now = settle(&self.admin, self.n).await?;
            cpu += cpu_time(self.pid)?.saturating_sub(cpu0);
            pushes += now.pushes - last.pushes;
            if now.accepted - last.accepted != 1.0 {
                return Err(format!(
                    "{name} change {c}: expected one configuration accepted, saw {}",
                    now.accepted - last.accepted
                ));
            }
            last = now;
        }
        lat.sort_by(f64::total_cmp);
        Ok(Scenario {
            name: name.into(),
            changes,
            proxies_per_change: per_change,
            samples: lat.len(),
            p50_ms: percentile(&lat, 50.0),
            p99_ms: percentile(&lat, 99.0),
            max_ms: lat.last().copied().unwrap_or(f64::NAN),
            pushes_per_change: pushes / changes.max(1) as f64,
            cpu_ms_per_change: cpu.as_secs_f64() * 1000.0 / changes.max(1) as f64,
            unconcerned_responses: unconcerned,
        })
    }
}

#[derive(serde::Serialize)]
struct Report {
    namespaces: usize,
    proxies: usize,
    policies: usize,
    resources_per_proxy_first_sync: usize,
    config_files: usize,
    server_startup_ms: f64,
    initial_sync_ms: f64,
    rss_after_sync_mib: f64,
    peak_rss_mib: f64,
    rss_end_mib: f64,
    idle_cpu_ms_per_s: f64,
    scenarios: Vec<Scenario>,
}

async fn run(args: Args) -> Result<(), String> {
    let n = args.namespaces;
    let needed = n as u64 + 128;
    check_fd_limit("this process", "self", needed)?;

    let work = match &args.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("warden-control-load-{}", std::process::id())),
    };
    let dir = work.join("config");
    let ca_dir = work.join("ca");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    eprintln!(
        "generating {n} namespaces x {} policies in {}",
        args.policies,
        dir.display()
    );
    for i in 0..n {
        let f = dir.join(format!("{}.yaml", ns_name(i)));
        std::fs::write(&f, namespace_file(i, n, args.policies, 0))
            .map_err(|e| format!("{}: {e}", f.display()))?;
    }
    let root = dir.join(format!("{ROOT_NS}.yaml"));
    std::fs::write(&root, root_file(0)).map_err(|e| format!("{}: {e}", root.display()))?;

    let status = Command::new(&args.warden)
        .args(["ca", "init", "--dir"])
        .arg(&ca_dir)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", args.warden.display()))?;
    if !status.success() {
        return Err(format!("warden ca init failed: {status}"));
    }
    let ca = Ca::load_with(&ca_dir, None).map_err(|e| format!("{}: {e}", ca_dir.display()))?;

    let (port, admin_port) = (free_port()?, free_port()?);
    let addr = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin_port}");
    let log_path = work.join("control.log");
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let started = Instant::now();
    let child = Command::new(&args.warden)
        .arg("control")
        .arg("-f")
        .arg(&dir)
        .arg("--ca")
        .arg(&ca_dir)
        .args(["--listen", &addr, "--admin", &admin])
        .args(["--poll-interval", &args.poll_interval])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {} control: {e}", args.warden.display()))?;
    let mut server = Server { child };
    let pid = server.pid();
    check_fd_limit("the control plane", &pid.to_string(), needed)?;
    {
        let admin = admin.clone();
        let log_path = log_path.clone();
        let mut exited = None;
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(st)) = server.child.try_wait() {
                exited = Some(st);
                break;
            }
            let a = admin.clone();
            let ready = tokio::task::spawn_blocking(move || http_get(&a, "/ready"))
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|(s, _)| s == 200);
            if ready || Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(st) = exited {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("warden control exited ({st}):\n{log}"));
        }
    }
    let server_startup_ms = started.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "control plane ready in {server_startup_ms:.0} ms (pid {pid}, log {})",
        log_path.display()
    );
    eprintln!(
        "  (after loading: VmRSS {:.1} MiB, VmHWM {:.1} MiB)",
        status_kib(pid, "VmRSS")? as f64 / 1024.0,
        status_kib(pid, "VmHWM")? as f64 / 1024.0
    );

    // Identities first: signing is not what is measured.
    let mut identities = Vec::with_capacity(n);
    for i in 0..n {
        let id = SpiffeId::new(ca.trust_domain(), &ns_name(i), &sa_name(i))
            .map_err(|e| e.to_string())?;
        identities.push(warden_control::local::identity(&ca, &id)?);
    }

    let (tx, rx) = mpsc::unbounded_channel();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let sync_start = Instant::now();
    for (i, identity) in identities.into_iter().enumerate() {
        let proxy = FakeProxy {
            namespace: ns_name(i),
            workload: app_name(i),
            identity,
            nack: Arc::default(),
        };
        let (ptx, mut prx) = mpsc::unbounded_channel::<Received>();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(r) = prx.recv().await {
                if tx.send((i, r)).is_err() {
                    return;
                }
            }
        });
        let addr = addr.clone();
        let failed = failed.clone();
        tokio::spawn(async move {
            let r = proxy.run(&addr, ptx).await;
            let why = match r {
                Ok(()) => "stream closed by the server".to_string(),
                Err(e) => e,
            };
            if let Ok(mut f) = failed.lock() {
                f.push(format!("proxy {i}: {why}"));
            }
        });
    }
    drop(tx);
    let mut mesh = Mesh {
        dir: dir.clone(),
        n,
        policies: args.policies,
        admin: admin.clone(),
        pid,
        rx,
    };
    let mut first: HashMap<usize, usize> = HashMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(300);
    while first.len() < n {
        let got = tokio::time::timeout_at(until, mesh.rx.recv()).await;
        let fails = failed.lock().map(|f| f.clone()).unwrap_or_default();
        if !fails.is_empty() {
            return Err(format!(
                "{} proxies failed, first: {}",
                fails.len(),
                fails[0]
            ));
        }
        match got {
            Ok(Some((i, r))) => {
                first.entry(i).or_insert(r.keys.len());
            }
            Ok(None) => return Err("every proxy stream ended".into()),
            Err(_) => {
                return Err(format!(
                    "initial sync: only {} of {n} proxies received a configuration in 300 s",
                    first.len()
                ))
            }
        }
    }
    let initial_sync_ms = sync_start.elapsed().as_secs_f64() * 1000.0;
    settle(&admin, n).await?;
    let initial_sync_acked_ms = sync_start.elapsed().as_secs_f64() * 1000.0;
    let rss_after_sync = status_kib(pid, "VmRSS")?;
    eprintln!(
        "  (peak so far: VmHWM {:.1} MiB)",
        status_kib(pid, "VmHWM")? as f64 / 1024.0
    );
    eprintln!(
        "{n} proxies synced in {initial_sync_ms:.0} ms (all ACKed at {initial_sync_acked_ms:.0} ms), \
         RSS {:.1} MiB",
        rss_after_sync as f64 / 1024.0
    );

    // Idle cost: the watcher's polling.
    let idle0 = cpu_time(pid)?;
    let idle_window = Duration::from_secs(3);
    tokio::time::sleep(idle_window).await;
    let idle_cpu_ms_per_s =
        cpu_time(pid)?.saturating_sub(idle0).as_secs_f64() * 1000.0 / idle_window.as_secs_f64();

    let mut scenarios = Vec::new();
    eprintln!(
        "scenario (a): {} changes of one namespace's policy",
        args.local_changes
    );
    let (dir_a, pols) = (mesh.dir.clone(), mesh.policies);
    scenarios.push(
        mesh.scenario(
            "(a) one namespace's policy (1 proxy)",
            args.local_changes,
            |c| {
                // A different namespace each time, spread over the mesh.
                let i = (c * 7919 + 13) % n;
                let policy = 3.min(pols - 1);
                let key = format!("AuthorizationPolicy/{}/pol-{policy}", ns_name(i));
                let text = namespace_file(i, n, pols, c + 1);
                let t0 = replace(&dir_a, &format!("{}.yaml", ns_name(i)), &text)?;
                Ok((key, t0, HashSet::from([i])))
            },
        )
        .await?,
    );
    eprintln!(
        "scenario (b): {} changes of a root-namespace policy",
        args.global_changes
    );
    let all: HashSet<usize> = (0..n).collect();
    scenarios.push(
        mesh.scenario(
            "(b) root-namespace policy (all proxies)",
            args.global_changes,
            |c| {
                let t0 = replace(&dir_a, &format!("{ROOT_NS}.yaml"), &root_file(c + 1))?;
                Ok((ROOT_POLICY_KEY.to_string(), t0, all.clone()))
            },
        )
        .await?,
    );

    let report = Report {
        namespaces: n,
        proxies: n,
        policies: n * args.policies + 1,
        resources_per_proxy_first_sync: first.values().copied().max().unwrap_or(0),
        config_files: n + 1,
        server_startup_ms,
        initial_sync_ms,
        rss_after_sync_mib: rss_after_sync as f64 / 1024.0,
        peak_rss_mib: status_kib(pid, "VmHWM")? as f64 / 1024.0,
        rss_end_mib: status_kib(pid, "VmRSS")? as f64 / 1024.0,
        idle_cpu_ms_per_s,
        scenarios,
    };
    print_report(&report, initial_sync_acked_ms);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let fails = failed.lock().map(|f| f.clone()).unwrap_or_default();
    if !fails.is_empty() {
        return Err(format!(
            "{} proxies failed, first: {}",
            fails.len(),
            fails[0]
        ));
    }
    drop(server);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

fn print_report(r: &Report, acked_ms: f64) {
    println!();
    println!(
        "mesh: {} namespaces, {} proxies, {} AuthorizationPolicies in {} files; {} resources in a proxy's first response",
        r.namespaces, r.proxies, r.policies, r.config_files, r.resources_per_proxy_first_sync
    );
    println!(
        "control plane startup (load + validate, until /ready): {:.0} ms",
        r.server_startup_ms
    );
    println!(
        "initial sync of {} proxies: last first response {:.0} ms, all ACKed {:.0} ms",
        r.proxies, r.initial_sync_ms, acked_ms
    );
    println!(
        "control plane memory: RSS after sync {:.1} MiB, at end {:.1} MiB, peak (VmHWM) {:.1} MiB",
        r.rss_after_sync_mib, r.rss_end_mib, r.peak_rss_mib
    );
    println!(
        "control plane idle CPU (folder polling): {:.1} ms/s",
        r.idle_cpu_ms_per_s
    );
    println!();
    println!(
        "{:<42} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>10} {:>11} {:>7}",
        "scenario",
        "changes",
        "proxies",
        "samples",
        "p50 ms",
        "p99 ms",
        "max ms",
        "pushes/chg",
        "CPU ms/chg",
        "others"
    );
    for s in &r.scenarios {
        println!(
            "{:<42} {:>7} {:>8} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>11.1} {:>7}",
            s.name,
            s.changes,
            s.proxies_per_change,
            s.samples,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            s.pushes_per_change,
            s.cpu_ms_per_change,
            s.unconcerned_responses
        );
    }
    println!();
    println!("latency: file renamed into place -> the concerned proxy received the changed resource (it ACKs at once)");
}
