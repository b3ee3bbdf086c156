//! `warden up DIR`: a whole mesh on one machine, no cluster. Starts a control plane (with an
//! ephemeral CA) in this process and, for every workload the folder describes as local, a
//! sidecar that gets its certificate and configuration from it over the real protocol.
//!
//! A local workload is a WorkloadEntry whose `address` is a loopback address
//! (127.x.y.z): its sidecar listens there on each of the workload's ports, and forwards what
//! its policies allow to the app at the address of the `warden.dev/app-address` annotation
//! (same port). To reach a Service, an app connects to the Service's `clusterIP` (a loopback
//! address) and port **from its own app address** (bind before connect): one listener per
//! Service port serves every local app and tells them apart by source address, as ztunnel
//! tells pods apart, then routes with the calling workload's identity (auto mTLS).
//!
//! [`LocalMesh`] is shared with `warden demo`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use arc_swap::ArcSwap;
use clap::Args;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use warden_control::client::{ControlSource, StreamOptions};
use warden_control::run::{start, Input, Options, Running};
use warden_identity::ca::{Ca, KeyAlg};
use warden_identity::signer::CaSigner;
use warden_identity::spiffe::SpiffeId;
use warden_identity::token::TokenStore;
use warden_policy::config::Config;
use warden_proxy::capture::{OutboundTable, Target};
use warden_proxy::observe::{AccessLog, Observer};
use warden_proxy::outbound::{log_failure, OutboundProxy};
use warden_proxy::source::{follow, log_refused, ConfigSource, SourceEvent};
use warden_proxy::InboundProxy;

use crate::proxy_identity::IdentitySource;

/// The annotation naming where a local workload's app listens.
pub const APP_ADDRESS_ANNOTATION: &str = "warden.dev/app-address";

/// How long the whole mesh may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub const LONG_ABOUT: &str = "Run a whole zero-trust mesh on this machine from a folder of \
YAML: a control plane with its own CA, and a sidecar for every local workload.\n\n\
A local workload is a WorkloadEntry with a loopback `address` (127.x.y.z), its own per \
workload. Its sidecar listens on ADDRESS:PORT for each of its `ports`, takes mTLS or plaintext \
by its PeerAuthentication, applies its policies, and forwards to the app at the IP of its \
`warden.dev/app-address` annotation, same port. The app listens there.\n\n\
To call a Service, an app connects to the Service's `clusterIP` (give every Service a \
loopback clusterIP) and port, with its own app address as the source (bind before connect; \
curl --interface, Python's source_address). Connections from any other source are refused, \
since the caller's identity is known by its address.\n\n\
Policies change live: edit the folder and the control plane pushes the change. Workloads \
and Service addresses are read at start.\n\n\
Example:\n  warden up examples/demo/mesh";

#[derive(Args)]
pub struct UpArgs {
    /// The folder (or files) of YAML: WorkloadEntries, Services, policies.
    #[arg(value_name = "DIR", required = true)]
    paths: Vec<PathBuf>,
    /// The control plane's admin endpoint (loopback).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
    /// The control plane's TLS port (0 picks one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// How often the folder is looked at.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    warden_control::jwks::parse_go_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("\"{s}\" is not a duration such as 500ms or 1s"))
}

/// A workload `warden up` runs a sidecar for.
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub address: IpAddr,
    pub app: IpAddr,
    pub ports: Vec<u16>,
}

impl LocalWorkload {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The local workloads of `cfg`, or every reason the folder cannot run locally.
pub fn local_workloads(cfg: &Config) -> Result<Vec<LocalWorkload>, Vec<String>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut by_addr: HashMap<IpAddr, String> = HashMap::new();
    for wl in cfg.workloads.iter().filter(|w| w.kind == "WorkloadEntry") {
        let at = format!(
            "{}:{}: WorkloadEntry {}/{}",
            wl.origin.doc.file, wl.origin.doc.line, wl.namespace, wl.name
        );
        let Some(address) = wl
            .address
            .as_deref()
            .and_then(|a| a.parse::<IpAddr>().ok())
            .filter(IpAddr::is_loopback)
        else {
            continue;
        };
        let app = match wl.annotations.get(APP_ADDRESS_ANNOTATION) {
            Some(a) => match a.trim().parse::<IpAddr>() {
                Ok(ip) if ip.is_loopback() && ip != address => ip,
                Ok(_) => {
                    errors.push(format!("{at}: metadata.annotations[{APP_ADDRESS_ANNOTATION}]: expected a loopback IP other than the workload's address {address}, got \"{a}\""));
                    continue;
                }
                Err(_) => {
                    errors.push(format!("{at}: metadata.annotations[{APP_ADDRESS_ANNOTATION}]: expected an IP address (where the app listens), got \"{a}\""));
                    continue;
                }
            },
            None => {
                errors.push(format!("{at}: a local workload (loopback address {address}) needs metadata.annotations[{APP_ADDRESS_ANNOTATION}]: the loopback IP its app listens on, e.g. \"127.0.20.1\""));
                continue;
            }
        };
        for (ip, what) in [(address, "address"), (app, "app address")] {
            if let Some(other) = by_addr.insert(ip, wl.id()) {
                errors.push(format!(
                    "{at}: {what} {ip} is already used by {other}; every local workload needs its own"
                ));
            }
        }
        let ports: Vec<u16> = wl
            .ports
            .iter()
            .map(|p| p.container_port)
            .filter(|p| *p != 0)
            .collect();
        out.push(LocalWorkload {
            namespace: wl.namespace.clone(),
            name: wl.name.clone(),
            service_account: wl.service_account.clone(),
            address,
            app,
            ports,
        });
    }
    if out.is_empty() && errors.is_empty() {
        errors.push("no local workloads: add WorkloadEntries with a loopback address (127.x.y.z) and a warden.dev/app-address annotation".to_string());
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// One running sidecar.
pub struct Sidecar {
    pub workload: LocalWorkload,
    pub observer: Arc<Observer>,
    table: Arc<ArcSwap<OutboundTable>>,
    /// The control-plane version last put in force.
    pub applied: Arc<Mutex<String>>,
    /// The port modes and protocols in force, for the start-up summary.
    pub ports: Mutex<BTreeMap<u16, String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A control plane and the sidecars of every local workload, in this process.
pub struct LocalMesh {
    pub control: Running,
    pub sidecars: Vec<Arc<Sidecar>>,
    /// Service listeners: clusterIP:port and the Service's name.
    pub services: Vec<(SocketAddr, String)>,
    pub trust_domain: String,
    tasks: Vec<JoinHandle<()>>,
    ca_dir: PathBuf,
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.ca_dir);
    }
}

/// How [`LocalMesh::start`] builds each sidecar's access log (`None`: no access log).
pub type LogFactory = Box<dyn Fn(&LocalWorkload) -> Option<AccessLog> + Send>;

impl LocalMesh {
    /// Starts the control plane on `input` and a sidecar for each local workload, and returns
    /// once every sidecar has its certificate and first configuration.
    pub async fn start(
        input: Input,
        listen: SocketAddr,
        admin: Option<SocketAddr>,
        logs: LogFactory,
    ) -> Result<LocalMesh> {
        let ca_dir = std::env::temp_dir().join(format!(
            "warden-up-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let ca = Ca::init(&ca_dir, "cluster.local", KeyAlg::EcP256)
            .with_context(|| format!("creating the mesh's CA in {}", ca_dir.display()))?;
        let bundle_path = ca_dir.join("bundle.pem");
        std::fs::write(&bundle_path, ca.bundle_pem().concat())
            .with_context(|| format!("writing {}", bundle_path.display()))?;
        let tokens = Arc::new(TokenStore::open(&ca_dir));
        let signer = Arc::new(CaSigner::new(ca));
        let control = start(
            signer,
            Some(tokens.clone()),
            input,
            Options {
                listen,
                admin,
                jwks_refresh: Duration::from_secs(20 * 60),
            },
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        let snap = control
            .cp
            .snapshot()
            .ok_or_else(|| anyhow!("the control plane has no configuration"))?;
        let cfg = snap.config.clone();
        let trust_domain = cfg.mesh.trust_domain.clone();
        if trust_domain != "cluster.local" {
            bail!("warden up issues certificates for trust domain cluster.local; the mesh config says {trust_domain}");
        }
        let locals = local_workloads(&cfg)
            .map_err(|e| anyhow!("the folder cannot run locally:\n  {}", e.join("\n  ")))?;
        let addr = control.addr.to_string();
        let mut starting = tokio::task::JoinSet::new();
        for wl in locals {
            let id = SpiffeId::new(&trust_domain, &wl.namespace, &wl.service_account)
                .map_err(|e| anyhow!("workload {}: {e}", wl.id()))?;
            let token = tokens
                .mint(&id, Duration::from_secs(60), 1)
                .map_err(|e| anyhow!("minting a bootstrap token for {id}: {e}"))?;
            let token_file = ca_dir.join(format!("token-{}-{}", wl.namespace, wl.name));
            write_private(&token_file, &token)
                .with_context(|| format!("writing {}", token_file.display()))?;
            let log = logs(&wl);
            let (addr, bundle) = (addr.clone(), bundle_path.clone());
            starting.spawn(async move {
                let name = wl.id();
                start_sidecar(&addr, bundle, token_file, wl, id, log)
                    .await
                    .with_context(|| format!("sidecar of {name}"))
            });
        }
        let mut sidecars = Vec::new();
        let all = async {
            while let Some(r) = starting.join_next().await {
                sidecars.push(Arc::new(r.map_err(|e| anyhow!("{e}"))??));
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(START_TIMEOUT, all)
            .await
            .map_err(|_| anyhow!("the sidecars did not all start within {START_TIMEOUT:?}"))??;
        sidecars.sort_by_key(|s| s.workload.id());

        let by_app: Arc<HashMap<IpAddr, Arc<Sidecar>>> = Arc::new(
            sidecars
                .iter()
                .map(|s| (s.workload.app, s.clone()))
                .collect(),
        );
        let mut services = Vec::new();
        let mut tasks = Vec::new();
        for svc in &cfg.services {
            let Some(ip) = svc
                .spec
                .cluster_ip
                .as_deref()
                .and_then(|a| a.trim().parse::<IpAddr>().ok())
                .filter(IpAddr::is_loopback)
            else {
                continue;
            };
            for sp in &svc.spec.ports {
                let at = SocketAddr::new(ip, sp.port);
                let listener = TcpListener::bind(at).await.with_context(|| {
                    format!(
                        "Service {}/{}: cannot listen on its clusterIP:port {at}",
                        svc.namespace(),
                        svc.name()
                    )
                })?;
                services.push((at, format!("{}.{}", svc.name(), svc.namespace())));
                tasks.push(tokio::spawn(serve_service(listener, by_app.clone())));
            }
        }
        Ok(LocalMesh {
            control,
            sidecars,
            services,
            trust_domain,
            tasks,
            ca_dir,
        })
    }

    /// Waits until every sidecar has been sent, has applied and has ACKed every change that
    /// concerns it.
    pub async fn settle(&self, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // A NACK newer than what a sidecar ACKed means the step is not in force there.
            for p in self.control.cp.proxies() {
                if let Some((version, error, _)) = &p.nack {
                    let newer = match (&p.acked, version.parse::<u64>()) {
                        (Some(a), Ok(v)) => a.parse::<u64>().map_or(true, |a| v > a),
                        _ => true,
                    };
                    if newer {
                        bail!(
                            "the sidecar of {}/{} refused configuration version {version}: {error}",
                            p.namespace,
                            p.workload
                        );
                    }
                }
            }
            if self.control.cp.settled() {
                let acked: HashMap<String, Option<String>> = self
                    .control
                    .cp
                    .proxies()
                    .into_iter()
                    .map(|p| (format!("{}/{}", p.namespace, p.workload), p.acked))
                    .collect();
                let all_applied = self.sidecars.iter().all(|s| {
                    let applied = s.applied.lock().map(|a| a.clone()).unwrap_or_default();
                    acked.get(&s.workload.id()).cloned().flatten().as_deref()
                        == Some(applied.as_str())
                });
                if all_applied {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the sidecars did not apply the configuration within {limit:?}");
            }
            // Polling state the control plane and sidecars publish; the deadline bounds it.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn start_sidecar(
    cp_addr: &str,
    bundle: PathBuf,
    token_file: PathBuf,
    wl: LocalWorkload,
    id: SpiffeId,
    log: Option<AccessLog>,
) -> Result<Sidecar> {
    let identity = IdentitySource::Ca {
        addr: cp_addr.to_string(),
        roots: bundle,
        token_file: Some(token_file),
        ttl: None,
    }
    .prepare(&id)?
    .start()
    .await;
    let mut source = ControlSource::spawn(StreamOptions::new(
        cp_addr,
        &wl.namespace,
        &wl.name,
        identity.clone(),
    ));
    let first = loop {
        match source.next().await {
            Some(SourceEvent::Config(c)) => break c,
            Some(SourceEvent::Refused(r)) => log_refused(&r),
            None => bail!("the control plane stream ended before the first configuration"),
        }
    };
    let mut served = BTreeMap::new();
    let mut summary = BTreeMap::new();
    for port in &wl.ports {
        if let Some(s) = first.ports.get(port) {
            served.insert(*port, s.with_app(SocketAddr::new(wl.app, *port)));
            summary.insert(
                *port,
                format!(
                    "{} {}",
                    s.mode.as_str(),
                    format!("{:?}", s.protocol).to_lowercase()
                ),
            );
        }
    }
    let observer = Arc::new(Observer::new(log));
    let store = Arc::new(ArcSwap::new(first.policy.clone()));
    let proxy = Arc::new(
        InboundProxy::new(store, identity.clone(), served)
            .with_observer(observer.clone())
            .with_workload(&wl.namespace, &wl.name),
    );
    let mut tasks = Vec::new();
    for port in &wl.ports {
        let at = SocketAddr::new(wl.address, *port);
        let l = proxy
            .bind(*port, at)
            .await
            .with_context(|| format!("listening on {at}"))?;
        tasks.push(tokio::spawn(l.run()));
    }
    let outbound = OutboundProxy::new(identity.clone()).with_observer(
        observer.clone(),
        &wl.namespace,
        &wl.name,
    );
    let (table, notes) = OutboundTable::from_config(&first.config, &outbound);
    for n in &notes {
        tracing::debug!(target: "warden::up", workload = %wl.id(), "outbound: {n}");
    }
    let table = Arc::new(ArcSwap::from_pointee(table));
    let applied = Arc::new(Mutex::new(version_of(&first.origin)));
    {
        let (table, applied, wid) = (table.clone(), applied.clone(), wl.id());
        tasks.push(tokio::spawn(follow(source, proxy.clone(), move |event| {
            if let SourceEvent::Config(c) = event {
                let (t, _) = OutboundTable::from_config(&c.config, &outbound);
                table.store(Arc::new(t));
                if let Ok(mut a) = applied.lock() {
                    *a = version_of(&c.origin);
                }
                tracing::debug!(target: "warden::up", workload = %wid, origin = %c.origin, "applied");
            }
        })));
    }
    Ok(Sidecar {
        workload: wl,
        observer,
        table,
        applied,
        ports: Mutex::new(summary),
        tasks,
    })
}

/// Writes a secret readable by this user only (a bootstrap token must not be redeemable by
/// another local user first).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// The control-plane version in a configuration's origin ("control plane ADDR version N").
fn version_of(origin: &str) -> String {
    origin
        .rsplit_once("version ")
        .map(|(_, v)| v.to_string())
        .unwrap_or_default()
}

/// One Service port's listener: the caller is the local app whose address the connection
/// comes from, and its sidecar's outbound table routes it.
async fn serve_service(listener: TcpListener, by_app: Arc<HashMap<IpAddr, Arc<Sidecar>>>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target: "warden::up", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let by_app = by_app.clone();
        tokio::spawn(async move {
            let Ok(dst) = stream.local_addr() else { return };
            let Some(sidecar) = by_app.get(&peer.ip()) else {
                tracing::info!(target: "warden::up", source = %peer, destination = %dst, reason = "no local workload has this app address; an app must connect from its own app address", "outbound connection closed");
                return;
            };
            route(sidecar, stream, dst).await;
        });
    }
}

async fn route(sidecar: &Sidecar, stream: TcpStream, dst: SocketAddr) {
    let table = sidecar.table.load_full();
    match table.get(&dst) {
        Some(Target::Route(route)) => {
            let upstream = route.destination().upstream;
            if let Err(e) = route.clone().serve_connection(stream).await {
                log_failure(upstream, &e);
            }
        }
        Some(Target::Refused(why)) => {
            tracing::info!(target: "warden::up", workload = %sidecar.workload.id(), destination = %dst, reason = %why, "outbound connection closed");
        }
        None => {
            tracing::info!(target: "warden::up", workload = %sidecar.workload.id(), destination = %dst, reason = "not a Service in this workload's configuration", "outbound connection closed");
        }
    }
}

/// `warden up`.
pub fn run(a: &UpArgs, verbose: bool) -> Result<ExitCode> {
    if !a.admin.ip().is_loopback() {
        bail!("--admin {}: not a loopback address", a.admin);
    }
    let level = if verbose {
        warden_proxy::observe::LogLevel::Debug
    } else {
        warden_proxy::observe::LogLevel::Info
    };
    crate::proxy_cmd::install_logger(level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mesh = LocalMesh::start(
            Input::Folder {
                paths: a.paths.clone(),
                mesh: None,
                poll_interval: a.poll_interval,
            },
            a.listen,
            Some(a.admin),
            Box::new(|_| {
                AccessLog::new(
                    std::io::stdout(),
                    warden_proxy::observe::DEFAULT_ACCESS_LOG_CAPACITY,
                )
                .ok()
            }),
        )
        .await?;
        print_summary(&mesh);
        crate::proxy_cmd::shutdown_signal().await;
        eprintln!("warden up: stopping");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// What is running and where, on stderr (stdout carries the access log).
pub fn print_summary(mesh: &LocalMesh) {
    let mut out = String::new();
    out.push_str(&format!(
        "warden up: control plane on {} (CA and configuration stream)\n",
        mesh.control.addr
    ));
    if let Some(a) = mesh.control.admin_addr {
        out.push_str(&format!(
            "  status  http://{a}/status\n  metrics http://{a}/metrics\n"
        ));
    }
    out.push_str("workloads (sidecar listens on ADDRESS:PORT, app on APP:PORT):\n");
    for s in &mesh.sidecars {
        let ports = s.ports.lock().map(|p| p.clone()).unwrap_or_default();
        let ports: Vec<String> = ports.iter().map(|(p, m)| format!("{p} {m}")).collect();
        out.push_str(&format!(
            "  {:<28} {:<15} app {:<15} spiffe://{}/ns/{}/sa/{}  [{}]\n",
            s.workload.id(),
            s.workload.address,
            s.workload.app,
            mesh.trust_domain,
            s.workload.namespace,
            s.workload.service_account,
            ports.join(", ")
        ));
    }
    if !mesh.services.is_empty() {
        out.push_str("services (connect from your app address):\n");
        for (at, name) in &mesh.services {
            out.push_str(&format!("  {name:<28} {at}\n"));
        }
    }
    out.push_str("Ctrl-C stops.\n");
    eprint!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: bootstrap tokens were written world-readable (0644), so another local user
    /// could redeem one first and get that workload's certificate.
    #[test]
    fn bootstrap_tokens_are_written_for_this_user_only() {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("warden-up-token-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        write_private(&p, "secret").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        let text = std::fs::read_to_string(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        assert_eq!(mode, 0o600);
        assert_eq!(text, "secret");
    }
}
