//! `warden proxy`: the sidecar for one workload, in explicit mode, inbound (`--inbound`) and
//! outbound (`--outbound`, routes derived from the configuration with Istio's auto mTLS), or in
//! transparent mode (`--capture transparent`, iptables REDIRECT to the capture listeners of
//! `warden_proxy::capture`).
//! Checks every flag, the certificate files and the configuration before anything listens
//! (exit 2), then serves until Ctrl-C or SIGTERM, applying configuration and certificate
//! changes from the files as they happen (outbound routes included). Logs go to stderr, one
//! line per event.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use arc_swap::ArcSwap;
use clap::{Args, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use warden_control::client::{ControlSource, StreamOptions};
use warden_identity::spiffe::SpiffeId;
use warden_policy::config::Config;
use warden_proxy::capture::{
    InboundCapture, OutboundCapture, OutboundTable, UnknownDestination, INBOUND_UPSTREAM_BIND,
};
use warden_proxy::certs::{certs_dump, CertFiles};
use warden_proxy::observe::{
    AccessLog, AdminHandlers, AdminServer, LogLevel, LogLevelControl, Observer, Readiness,
    DEFAULT_ACCESS_LOG_CAPACITY,
};
use warden_proxy::outbound::{
    destination_for, log_failure, Destination, OutboundProxy, Route, Security,
};
use warden_proxy::source::{
    follow, log_refused, ConfigSource, FolderSource, SourceEvent, WorkloadConfig,
};

use crate::proxy_identity::IdentitySource;
use warden_control::jwks as jwks_fetch;
use warden_proxy::InboundProxy;

/// `warden proxy --help`: what the command does, beyond each flag.
pub const LONG_ABOUT: &str = "Run Warden's proxy beside one workload: explicit mode (the \
default; listeners on loopback addresses you choose, no iptables) or transparent mode \
(--capture transparent; iptables REDIRECT, as Istio's sidecars).\n\n\
For each --inbound PORT=LISTEN_ADDR[,APP_ADDR], connections to LISTEN_ADDR are treated as \
connections to the workload's container port PORT: mTLS or plaintext by the port's \
PeerAuthentication mode, HTTP or TCP by its Service port, authorized by the workload's \
policies, and forwarded to APP_ADDR (default 127.0.0.1:PORT). A LISTEN_ADDR port of 0 picks a \
free port; the log says which.\n\n\
For each --outbound LISTEN_ADDR=NS/SERVICE:PORT@UPSTREAM_ADDR, the app connects to the loopback \
LISTEN_ADDR to reach port PORT of Service NS/SERVICE, whose inbound listener (its sidecar, or \
the app when it has none) is at UPSTREAM_ADDR. The route follows Istio's auto mTLS: mTLS with \
this workload's certificate, requiring the SPIFFE ID of the workload the Service selects, or \
plaintext when that workload has no sidecar or the port's mode is DISABLE; HTTP when the port \
declares it, else TCP. Routes are re-derived when the configuration changes (new connections \
use the new route); a change that breaks a route keeps the old one and logs why.\n\n\
Configuration comes from the same YAML `warden check -f` reads. The files are looked at every \
second: a good change applies to new requests at once and re-checks open TCP connections, \
closing those no longer allowed; a change that does not load, does not validate or lacks the \
workload is refused and logged with file:line, and the last good configuration stays. The \
certificate files are watched the same way (e.g. from `warden ca issue`); bad files are \
refused and the current certificate stays. With --ca-addr instead of --cert/--key, the \
certificate comes from `warden ca serve`: a key made in memory, a CSR sent with the bootstrap \
token of --ca-token-file, renewal at about half the lifetime with the current certificate, and \
the CA's trust bundle; no listener opens before the first certificate arrives.\n\n\
With --control-plane HOST:PORT (`warden control`) instead of -f, both come from the control \
plane: the certificate from its CA (--ca-token-file the first time, --service-account and \
--trust-domain name the identity), then the workload's configuration from its stream, applied \
whole and ACKed, or NACKed and ignored. Nothing listens before both have arrived. While the \
control plane is away the proxy keeps enforcing its last configuration and serving with its \
current certificate, and reconnects with backoff.\n\n\
Log lines on stderr include `listening`, `outbound listening`, `admin listening`, `config applied`, `config refused`, \
`certificate rotated` and one decision line per request or TCP connection. The JSON access \
log (one line per request or TCP connection) goes to --access-log. With --admin, a loopback \
address serves /ready, /config_dump, /certs, /stats/prometheus and /logging (GET shows the \
log level, POST /logging?level=debug changes it).\n\n\
Transparent mode (--capture transparent --pod-ip IP): `warden proxy iptables --apply` (root, \
in the pod's network namespace) redirects the pod's TCP traffic; the proxy runs as \
--proxy-uid (default 1337), whose own traffic the rules exclude. Every inbound connection \
arrives at --inbound-capture (default 0.0.0.0:15006) and is served as a connection to the \
container port it was addressed to (read back with SO_ORIGINAL_DST), then forwarded to \
POD_IP:PORT from 127.0.0.6; a port the workload does not have is closed. Every outbound \
connection of the app arrives at --outbound-capture (default 127.0.0.1:15001): one to a \
Service's clusterIP:port or a ServiceEntry address is routed with auto mTLS to the workloads \
it selects (a WorkloadEntry's address, else the dialled address; an external ServiceEntry is \
plain TCP); any other destination is passed through as plain TCP, or closed when the mesh's \
outboundTrafficPolicy.mode is REGISTRY_ONLY. Log lines: \
`inbound capture listening`, `outbound capture listening`, `inbound connection closed`, \
`outbound connection closed`.\n\n\
Examples:\n  warden proxy -f config/ --workload foo/server \\\n    --inbound 9000=127.0.0.1:15006,127.0.0.1:9000 \\\n    --cert certs/cert-chain.pem --key certs/key.pem --roots certs/root-cert.pem\n  \
warden proxy iptables --apply && setpriv --reuid=1337 --regid=1337 --clear-groups -- \\\n    warden proxy -f config/ --workload foo/server --capture transparent --pod-ip 10.0.0.5 \\\n    --cert certs/cert-chain.pem --key certs/key.pem --roots certs/root-cert.pem";

/// `warden proxy`: run the proxy, or one of its helper subcommands.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ProxyCommand {
    #[command(subcommand)]
    sub: Option<ProxySub>,
    #[command(flatten)]
    run: Option<ProxyArgs>,
}

#[derive(Subcommand)]
enum ProxySub {
    /// Print (or --apply) the iptables rules for transparent capture.
    #[command(long_about = crate::iptables_cmd::LONG_ABOUT)]
    Iptables(crate::iptables_cmd::IptablesArgs),
}

/// How connections reach the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Capture {
    /// Loopback listeners the app and its peers are configured to use (--inbound, --outbound).
    Explicit,
    /// iptables REDIRECT to --inbound-capture and --outbound-capture (see `warden proxy iptables`).
    Transparent,
}

pub fn run_command(c: &ProxyCommand, verbose: bool) -> Result<ExitCode> {
    match (&c.sub, &c.run) {
        (Some(ProxySub::Iptables(a)), _) => crate::iptables_cmd::run(a),
        (None, Some(a)) => run(a, verbose),
        (None, None) => bail!(
            "warden proxy needs -f, --workload, --roots, and --cert with --key or --ca-addr (see warden proxy --help)"
        ),
    }
}

#[derive(Args)]
pub struct ProxyArgs {
    /// Configuration: a YAML/JSON file or a folder (read recursively, watched). Repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "PATH",
        required_unless_present = "control_plane"
    )]
    files: Vec<PathBuf>,
    /// Follow the control plane at HOST:PORT (`warden control`) instead of files: the
    /// certificate comes from its CA (with --ca-token-file the first time), then the
    /// configuration from its stream; nothing listens before both have arrived.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["files", "mesh", "cert", "key", "ca_addr"])]
    control_plane: Option<String>,
    /// With --control-plane: the service account the workload runs as (its certificate's
    /// identity; the control plane refuses a proxy whose workload runs as another).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "default",
        requires = "control_plane"
    )]
    service_account: String,
    /// With --control-plane: the mesh's trust domain.
    #[arg(
        long,
        value_name = "DOMAIN",
        default_value = "cluster.local",
        requires = "control_plane"
    )]
    trust_domain: String,
    /// A MeshConfig file (overrides the `istio` ConfigMap in istio-system); watched too.
    #[arg(long, value_name = "FILE")]
    mesh: Option<PathBuf>,
    /// The workload this proxy serves: NAMESPACE/NAME (a Deployment, Pod, … in the config).
    #[arg(long, value_name = "NS/NAME", value_parser = parse_workload)]
    workload: (String, String),
    /// A served port: container PORT, the loopback address to listen on, and where the app
    /// listens (default 127.0.0.1:PORT). Repeatable.
    #[arg(long, value_name = "PORT=LISTEN_ADDR[,APP_ADDR]", value_parser = parse_inbound)]
    inbound: Vec<Inbound>,
    /// A destination the app reaches through a loopback listener: LISTEN_ADDR, the Service
    /// port it stands for, and where the destination's inbound listener is. Repeatable.
    #[arg(long, value_name = "LISTEN_ADDR=NS/SERVICE:PORT@UPSTREAM_ADDR", value_parser = parse_outbound)]
    outbound: Vec<Outbound>,
    /// The workload's certificate chain (PEM, leaf first); watched for rotation.
    #[arg(
        long,
        value_name = "FILE",
        requires = "key",
        required_unless_present_any = ["ca_addr", "control_plane"]
    )]
    cert: Option<PathBuf>,
    /// The certificate's private key (PEM, PKCS#8).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// The roots peers are verified against (PEM). With --ca-addr, also the roots the CA's
    /// own certificate must chain to, until the CA sends its bundle.
    #[arg(long, value_name = "FILE")]
    roots: PathBuf,
    /// Get the certificate from Warden's CA service at HOST:PORT (`warden ca serve`) instead
    /// of files: a key made in memory, renewed at about half its lifetime.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["cert", "key"])]
    ca_addr: Option<String>,
    /// The bootstrap token for the first certificate (`warden ca token`), read at each use.
    #[arg(long, value_name = "FILE")]
    ca_token_file: Option<PathBuf>,
    /// Certificate lifetime to ask the CA for (default: the CA's, 24h).
    #[arg(long, value_name = "DURATION", value_parser = parse_refresh)]
    cert_ttl: Option<std::time::Duration>,
    /// Serve the admin endpoints on this loopback address (port 0 picks a free port; the
    /// `admin listening` log line says which).
    #[arg(long, value_name = "ADDR", value_parser = parse_admin)]
    admin: Option<SocketAddr>,
    /// Where the JSON access log goes: a file (appended to), `-` for stdout, or `off` for
    /// none (as Istio's default, an empty accessLogFile).
    #[arg(long, value_name = "PATH|-|off", default_value = "-")]
    access_log: String,
    /// Where a CUSTOM ext_authz provider of the mesh config listens, when its `service` does
    /// not resolve from here (e.g. `ext-authz.foo.svc.cluster.local` in explicit mode):
    /// PROVIDER=IP:PORT. Repeatable.
    #[arg(long, value_name = "PROVIDER=IP:PORT", value_parser = parse_ext_authz_addr)]
    ext_authz_addr: Vec<(String, SocketAddr)>,
    /// How often the keys of RequestAuthentication `jwksUri`s are fetched again (istiod's
    /// PILOT_JWT_PUB_KEY_REFRESH_INTERVAL). A failed fetch keeps the keys fetched before.
    #[arg(long, value_name = "DURATION", default_value = "20m", value_parser = parse_refresh)]
    jwks_refresh: std::time::Duration,
    /// explicit: loopback listeners from --inbound/--outbound. transparent: every workload
    /// port through --inbound-capture, the app's outbound TCP through --outbound-capture
    /// (iptables from `warden proxy iptables`).
    #[arg(long, value_enum, default_value = "explicit")]
    capture: Capture,
    /// Transparent mode: where redirected inbound connections arrive [default: 0.0.0.0:15006].
    #[arg(long, value_name = "ADDR")]
    inbound_capture: Option<SocketAddr>,
    /// Transparent mode: where redirected outbound connections arrive [default: 127.0.0.1:15001].
    #[arg(long, value_name = "ADDR")]
    outbound_capture: Option<SocketAddr>,
    /// Transparent mode: the pod's IP; allowed inbound traffic goes to POD_IP:PORT from
    /// 127.0.0.6 (Istio ≥ 1.10), so apps bound to the pod IP only are reached.
    #[arg(long, value_name = "IP")]
    pod_ip: Option<std::net::IpAddr>,
    /// Transparent mode: the uid the iptables rules exclude; the proxy refuses to start as any
    /// other uid, since its own connections would be captured again and loop.
    #[arg(long, value_name = "UID", default_value_t = 1337)]
    proxy_uid: u32,
    /// The least severe stderr log line written once started (the startup lines are always
    /// written): `warn` drops the per-request decision lines (`info`), a large share of the
    /// cost of a request under load. Changeable at runtime through the admin server's
    /// /logging. Default `info` (`debug` with -v).
    #[arg(long, value_name = "error|warn|info|debug|trace", value_parser = parse_log_level)]
    log_level: Option<LogLevel>,
}

fn parse_log_level(s: &str) -> Result<LogLevel, String> {
    LogLevel::parse(s.trim())
        .ok_or_else(|| format!("\"{s}\" is not a log level (error, warn, info, debug, trace)"))
}

fn parse_ext_authz_addr(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("\"{s}\" is not PROVIDER=IP:PORT"))?;
    let addr: SocketAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("\"{addr}\" is not IP:PORT (e.g. 127.0.0.1:9000)"))?;
    if name.trim().is_empty() {
        return Err(format!("\"{s}\" has no provider name before ="));
    }
    Ok((name.trim().to_string(), addr))
}

fn parse_refresh(s: &str) -> Result<std::time::Duration, String> {
    jwks_fetch::parse_go_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("\"{s}\" is not a duration such as 30s, 20m or 1h"))
}

/// What transparent mode needs, once the flags are checked.
struct Transparent {
    inbound: SocketAddr,
    outbound: SocketAddr,
    pod_ip: std::net::IpAddr,
}

/// The second validation stage for the capture flags: which mode, and nothing of the other.
fn check_capture(a: &ProxyArgs) -> Result<Option<Transparent>> {
    match a.capture {
        Capture::Explicit => {
            for (given, flag) in [
                (a.inbound_capture.is_some(), "--inbound-capture"),
                (a.outbound_capture.is_some(), "--outbound-capture"),
                (a.pod_ip.is_some(), "--pod-ip"),
            ] {
                if given {
                    bail!("{flag} is for transparent mode; add --capture transparent (or drop it)");
                }
            }
            if a.inbound.is_empty() && a.outbound.is_empty() {
                bail!("explicit mode needs at least one --inbound or --outbound (or use --capture transparent)");
            }
            Ok(None)
        }
        Capture::Transparent => {
            if !a.inbound.is_empty() || !a.outbound.is_empty() {
                bail!("--inbound and --outbound are explicit-mode listeners; in transparent mode every workload port is served through --inbound-capture and outbound traffic through --outbound-capture");
            }
            let Some(pod_ip) = a.pod_ip else {
                bail!("transparent mode needs --pod-ip (the pod's IP address, where allowed inbound traffic is forwarded)");
            };
            if !pod_ip.is_ipv4() || pod_ip.is_loopback() || pod_ip.is_unspecified() {
                bail!("--pod-ip {pod_ip}: expected the pod's own IPv4 address (transparent capture is IPv4 only)");
            }
            let inbound = a
                .inbound_capture
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 15006)));
            let outbound = a
                .outbound_capture
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15001)));
            if inbound.port() == 0 || outbound.port() == 0 {
                bail!("--inbound-capture and --outbound-capture need fixed ports: the iptables rules redirect to them");
            }
            if inbound.port() == outbound.port() {
                bail!(
                    "--inbound-capture and --outbound-capture use the same port {}",
                    inbound.port()
                );
            }
            if let Some(uid) = own_uid() {
                if uid != a.proxy_uid {
                    bail!(
                        "transparent mode runs as uid {} (--proxy-uid, the uid the iptables rules exclude), but this process runs as uid {uid}; its own connections would be captured again",
                        a.proxy_uid
                    );
                }
            }
            Ok(Some(Transparent {
                inbound,
                outbound,
                pod_ip,
            }))
        }
    }
}

/// This process's uid, from the owner of /proc/self (no libc call needed).
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn parse_admin(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .trim()
        .parse()
        .map_err(|_| format!("\"{s}\" is not IP:PORT (e.g. 127.0.0.1:15000)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; the admin server is unauthenticated and listens on loopback only"
        ));
    }
    Ok(addr)
}

/// One `--inbound` flag.
#[derive(Clone, Debug)]
struct Inbound {
    port: u16,
    listen: SocketAddr,
    app: SocketAddr,
}

/// One `--outbound` flag.
#[derive(Clone, Debug)]
struct Outbound {
    listen: SocketAddr,
    namespace: String,
    service: String,
    port: u16,
    upstream: SocketAddr,
}

impl Outbound {
    fn target(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.service, self.port)
    }
}

fn parse_outbound(s: &str) -> Result<Outbound, String> {
    const FORM: &str = "LISTEN_ADDR=NS/SERVICE:PORT@UPSTREAM_ADDR";
    let (listen, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("expected {FORM}, got \"{s}\""))?;
    let listen: SocketAddr = listen.trim().parse().map_err(|_| {
        format!("listen address \"{listen}\" is not IP:PORT (e.g. 127.0.0.1:15001)")
    })?;
    if !listen.ip().is_loopback() {
        return Err(format!(
            "listen address {listen} is not a loopback address; explicit mode listens on loopback only"
        ));
    }
    let (target, upstream) = match rest.split_once('@') {
        Some((t, u)) => (t, u),
        None => {
            return Err(format!(
                "\"{s}\" has no @UPSTREAM_ADDR; explicit mode needs the address of the destination's inbound listener ({FORM})"
            ))
        }
    };
    let (service, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("\"{target}\" is not NS/SERVICE:PORT"))?;
    let (namespace, service) = match service.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            (ns.to_string(), name.to_string())
        }
        _ => return Err(format!("\"{target}\" is not NS/SERVICE:PORT")),
    };
    let port: u16 = port
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("\"{port}\" is not a port number (1-65535)"))?;
    let upstream: SocketAddr = upstream.trim().parse().map_err(|_| {
        format!("upstream address \"{upstream}\" is not IP:PORT (e.g. 127.0.0.1:15006)")
    })?;
    if upstream.port() == 0 {
        return Err(format!("upstream address {upstream} has port 0"));
    }
    Ok(Outbound {
        listen,
        namespace,
        service,
        port,
        upstream,
    })
}

/// The route for one `--outbound` flag under `cfg`: the Service port's destination with auto
/// mTLS, the same for every workload the Service selects (one upstream address cannot tell
/// them apart, so they must agree).
/// The workload an `--outbound` Service selects, for reports (`destination_workload`): the
/// first in configuration order, or the Service's name when it selects none.
fn destination_workload(cfg: &Config, o: &Outbound) -> (String, String) {
    let name = cfg
        .workloads
        .iter()
        .find(|wl| {
            cfg.services_selecting(wl)
                .any(|s| s.namespace() == o.namespace && s.name() == o.service)
        })
        .map(|wl| wl.name.clone())
        .unwrap_or_else(|| o.service.clone());
    (o.namespace.clone(), name)
}

fn resolve_outbound(cfg: &Config, o: &Outbound) -> Result<Destination, String> {
    let target = o.target();
    let Some(svc) = cfg
        .services
        .iter()
        .find(|s| s.namespace() == o.namespace && s.name() == o.service)
    else {
        let known: Vec<String> = cfg
            .services
            .iter()
            .filter(|s| s.namespace() == o.namespace)
            .map(|s| s.name().to_string())
            .collect();
        return Err(format!(
            "--outbound {target}: there is no Service {}/{} in the configuration (Services in {}: {})",
            o.namespace,
            o.service,
            o.namespace,
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ));
    };
    if !svc.spec.ports.iter().any(|p| p.port == o.port) {
        let known: Vec<String> = svc.spec.ports.iter().map(|p| p.port.to_string()).collect();
        return Err(format!(
            "--outbound {target}: Service {}/{} has no port {} (its ports: {})",
            o.namespace,
            o.service,
            o.port,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    }
    let mut found: Option<(String, Destination)> = None;
    for wl in cfg.workloads.iter().filter(|w| {
        cfg.services_selecting(w)
            .any(|s| s.namespace() == o.namespace && s.name() == o.service)
    }) {
        let d = destination_for(cfg, wl, o.port, o.upstream)
            .map_err(|e| format!("--outbound {target}: {e}"))?;
        match &found {
            None => found = Some((wl.id(), d)),
            Some((first, fd)) if *fd != d => {
                return Err(format!(
                    "--outbound {target}: the workloads it selects need different routes ({first}: {}, {}: {}); one upstream address cannot serve both",
                    describe_security(&fd.security),
                    wl.id(),
                    describe_security(&d.security)
                ))
            }
            Some(_) => {}
        }
    }
    found.map(|(_, d)| d).ok_or_else(|| {
        format!(
            "--outbound {target}: Service {}/{} selects no workload in the configuration",
            o.namespace, o.service
        )
    })
}

fn describe_security(s: &Security) -> String {
    match s {
        Security::Mtls(id) => format!("mTLS:{id}"),
        Security::Plaintext => "plaintext".to_string(),
    }
}

/// Accepts the app's connections for one outbound flag; each uses the route in force when it
/// was accepted, so a configuration change applies to new connections.
async fn serve_outbound(listener: TcpListener, route: Arc<ArcSwap<Route>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let route = route.load_full();
                tokio::spawn(async move {
                    let upstream = route.destination().upstream;
                    if let Err(e) = route.serve_connection(stream).await {
                        log_failure(upstream, &e);
                    }
                });
            }
            Err(e) => {
                // Out of descriptors and the like: back off briefly instead of spinning.
                tracing::warn!(target: "warden::proxy", error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn parse_workload(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("expected NAMESPACE/NAME, got \"{s}\"")),
    }
}

fn parse_inbound(s: &str) -> Result<Inbound, String> {
    let (port, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("expected PORT=LISTEN_ADDR[,APP_ADDR], got \"{s}\""))?;
    let port: u16 = port
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("\"{port}\" is not a port number (1-65535)"))?;
    let (listen, app) = match rest.split_once(',') {
        Some((l, a)) => (l, Some(a)),
        None => (rest, None),
    };
    let listen: SocketAddr = listen.trim().parse().map_err(|_| {
        format!("listen address \"{listen}\" is not IP:PORT (e.g. 127.0.0.1:15006)")
    })?;
    if !listen.ip().is_loopback() {
        return Err(format!(
            "listen address {listen} is not a loopback address; explicit mode listens on loopback only"
        ));
    }
    let app: SocketAddr = match app {
        Some(a) => a
            .trim()
            .parse()
            .map_err(|_| format!("app address \"{a}\" is not IP:PORT (e.g. 127.0.0.1:8080)"))?,
        None => SocketAddr::from(([127, 0, 0, 1], port)),
    };
    if app.port() == 0 {
        return Err(format!("app address {app} has port 0"));
    }
    Ok(Inbound { port, listen, app })
}

fn run(a: &ProxyArgs, verbose: bool) -> Result<ExitCode> {
    // Everything that can be wrong with the command line is found before anything listens.
    let transparent = check_capture(a)?;
    let mut ports = BTreeSet::new();
    let mut listens = BTreeSet::new();
    for i in &a.inbound {
        if !ports.insert(i.port) {
            bail!("--inbound: port {} is given twice", i.port);
        }
        if i.listen.port() != 0 && !listens.insert(i.listen) {
            bail!("--inbound: listen address {} is given twice", i.listen);
        }
    }
    for o in &a.outbound {
        if o.listen.port() != 0 && !listens.insert(o.listen) {
            bail!("--outbound: listen address {} is given twice", o.listen);
        }
    }
    if (a.ca_token_file.is_some() || a.cert_ttl.is_some())
        && a.ca_addr.is_none()
        && a.control_plane.is_none()
    {
        bail!("--ca-token-file and --cert-ttl are for certificates from a CA: add --ca-addr or --control-plane");
    }
    let ca_addr = a.ca_addr.clone().or_else(|| a.control_plane.clone());
    let identity_source = match (&ca_addr, &a.cert, &a.key) {
        (Some(addr), _, _) => {
            if a.ca_token_file.is_none() {
                bail!("--ca-addr and --control-plane need --ca-token-file: a new workload has no certificate to renew, so its first one needs a bootstrap token (`warden ca token NS/SA`)");
            }
            IdentitySource::Ca {
                addr: addr.clone(),
                roots: a.roots.clone(),
                token_file: a.ca_token_file.clone(),
                ttl: a.cert_ttl,
            }
        }
        (None, Some(cert), Some(key)) => IdentitySource::Files(CertFiles {
            cert: cert.clone(),
            key: key.clone(),
            roots: a.roots.clone(),
        }),
        _ => bail!("give either --cert and --key, or --ca-addr"),
    };
    let (ns, name) = &a.workload;
    // From files, the first configuration is loaded now and names the workload's service
    // account; from the control plane it arrives once the certificate has.
    let (mut folder, own_id) = match &a.control_plane {
        None => {
            let mut source = FolderSource::new(a.files.clone(), a.mesh.clone(), ns, name)
                .with_jwks(jwks_fetch::proxy_resolver(), a.jwks_refresh);
            let first = source.load_now().map_err(|reasons| {
                anyhow!("the configuration is refused:\n  {}", reasons.join("\n  "))
            })?;
            let wl = first
                .config
                .workload(ns, name)
                .ok_or_else(|| anyhow!("workload {ns}/{name} is not in the configuration"))?;
            let own_id = SpiffeId::new(
                &first.config.mesh.trust_domain,
                &wl.namespace,
                &wl.service_account,
            )
            .map_err(|e| anyhow!("workload {ns}/{name}: {e}"))?;
            (Some((source, first)), own_id)
        }
        Some(_) => {
            let own_id = SpiffeId::new(&a.trust_domain, ns, &a.service_account)
                .map_err(|e| anyhow!("--workload/--service-account/--trust-domain: {e}"))?;
            (None, own_id)
        }
    };
    let prepared = identity_source.prepare(&own_id)?;
    let access_log = if a.access_log == "off" {
        None
    } else if a.access_log == "-" {
        Some(
            AccessLog::new(std::io::stdout(), DEFAULT_ACCESS_LOG_CAPACITY)
                .context("starting the access log")?,
        )
    } else {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.access_log)
            .with_context(|| format!("--access-log: cannot open {}", a.access_log))?;
        Some(AccessLog::new(f, DEFAULT_ACCESS_LOG_CAPACITY).context("starting the access log")?)
    };
    let observer = Arc::new(Observer::new(access_log));

    let run_level = match a.log_level {
        Some(l) => l,
        None if verbose => LogLevel::Debug,
        None => LogLevel::Info,
    };
    // The startup lines (`listening`, `config applied`) are info; scripts find the ports in
    // them, so a quieter level takes effect once they are written.
    let level = install_logger(run_level.max(LogLevel::Info));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let identity = prepared.start().await;
        let (source, first) = match folder.take() {
            Some((source, first)) => (AnySource::Folder(source), first),
            None => {
                let addr = a.control_plane.clone().unwrap_or_default();
                let mut source = ControlSource::spawn(StreamOptions::new(
                    &addr,
                    ns,
                    name,
                    identity.clone(),
                ));
                tracing::info!(target: "warden::config", control_plane = %addr, "waiting for the first configuration");
                let first = loop {
                    match source.next().await {
                        Some(SourceEvent::Config(c)) => break c,
                        Some(SourceEvent::Refused(reasons)) => log_refused(&reasons),
                        None => bail!("the control plane stream ended before the first configuration"),
                    }
                };
                (AnySource::Control(source), first)
            }
        };
        let (served, destinations) = plan(a, &first, transparent.as_ref())?;
        let store = Arc::new(ArcSwap::new(first.policy.clone()));
        let mut inbound = InboundProxy::new(store, identity.clone(), served)
            .with_observer(observer.clone())
            .with_workload(ns, name)
            .with_ext_authz_addrs(a.ext_authz_addr.iter().cloned().collect());
        if transparent.is_some() {
            inbound = inbound.with_upstream_bind(INBOUND_UPSTREAM_BIND);
        }
        let proxy = Arc::new(inbound);
        let readiness = Readiness::new();
        let dump = Arc::new(Mutex::new(first.dump(
            ns,
            name,
            proxy.generation(),
            SystemTime::now(),
        )));
        let admin = match a.admin {
            Some(addr) => {
                let handlers = AdminHandlers {
                    observer: observer.clone(),
                    readiness: readiness.clone(),
                    config_dump: {
                        let dump = dump.clone();
                        Arc::new(move || dump.lock().map(|d| d.clone()).unwrap_or_default())
                    },
                    certs: {
                        let identity = identity.clone();
                        Arc::new(move || certs_dump(&identity))
                    },
                    log_level: Arc::new(LogLevelControl::new(run_level, {
                        let level = level.clone();
                        move |l: LogLevel| {
                            level.store(l as u8, Ordering::Relaxed);
                            Ok(())
                        }
                    })),
                };
                let server = AdminServer::bind(addr, handlers).await?;
                tracing::info!(
                    target: "warden::proxy",
                    addr = %server.local_addr()?,
                    "admin listening"
                );
                Some(server)
            }
            None => None,
        };
        let mut listeners = Vec::new();
        for i in &a.inbound {
            let l = proxy.bind(i.port, i.listen).await?;
            let addr = l.local_addr()?;
            let s = proxy.ports()[&i.port];
            tracing::info!(
                target: "warden::proxy",
                port = i.port,
                addr = %addr,
                app = %i.app,
                mode = s.mode.as_str(),
                protocol = ?s.protocol,
                "listening"
            );
            listeners.push(l);
        }
        let outbound =
            OutboundProxy::new(identity.clone()).with_observer(observer.clone(), ns, name);
        let mut routes = Vec::new();
        for (o, d) in a.outbound.iter().zip(destinations) {
            let listener = TcpListener::bind(o.listen)
                .await
                .with_context(|| format!("--outbound: cannot listen on {}", o.listen))?;
            tracing::info!(
                target: "warden::proxy",
                outbound = %o.target(),
                addr = %listener.local_addr()?,
                upstream = %d.upstream,
                security = %describe_security(&d.security),
                protocol = ?d.protocol,
                "outbound listening"
            );
            let (dns, dname) = destination_workload(&first.config, o);
            let route = Arc::new(ArcSwap::from_pointee(outbound.route_to(d, &dns, &dname)));
            routes.push((o.clone(), route.clone(), listener));
        }
        let mut captures = None;
        if let Some(t) = &transparent {
            let (table, notes) = OutboundTable::from_config(&first.config, &outbound);
            for n in &notes {
                tracing::warn!(target: "warden::proxy", "outbound capture: {n}");
            }
            let unknown = table.unknown();
            let known = table.len();
            let table = Arc::new(ArcSwap::from_pointee(table));
            let inbound_capture = InboundCapture::bind(proxy.clone(), t.inbound).await?;
            let served: Vec<String> = proxy.ports().keys().map(u16::to_string).collect();
            tracing::info!(
                target: "warden::proxy",
                addr = %inbound_capture.local_addr()?,
                ports = %served.join(","),
                app = %t.pod_ip,
                "inbound capture listening"
            );
            let outbound_capture = OutboundCapture::bind(table.clone(), t.outbound).await?;
            tracing::info!(
                target: "warden::proxy",
                addr = %outbound_capture.local_addr()?,
                destinations = known,
                unknown = match unknown {
                    UnknownDestination::Passthrough => "passthrough",
                    UnknownDestination::BlackHole => "blackhole",
                },
                "outbound capture listening"
            );
            captures = Some((inbound_capture, outbound_capture, table));
        } else {
            for port in first.ports.keys().filter(|p| !ports.contains(p)) {
                tracing::info!(target: "warden::proxy", port, "not served (no --inbound for it)");
            }
        }
        // Configuration and certificate are loaded and every listener is bound.
        readiness.set_ready(true);
        tracing::info!(
            target: "warden::config",
            generation = proxy.generation(),
            origin = %first.origin,
            "config applied"
        );
        level.store(run_level as u8, Ordering::Relaxed);
        for l in listeners {
            tokio::spawn(l.run());
        }
        if let Some(server) = admin {
            tokio::spawn(server.run());
        }
        let mut capture_table = None;
        if let Some((i, o, table)) = captures {
            tokio::spawn(i.run());
            tokio::spawn(o.run());
            capture_table = Some(table);
        }
        let mut outbound_routes = Vec::new();
        for (o, route, listener) in routes {
            tokio::spawn(serve_outbound(listener, route.clone()));
            outbound_routes.push((o, route));
        }
        let (wns, wname) = (ns.clone(), name.clone());
        let follower = proxy.clone();
        tokio::spawn(follow(source, proxy.clone(), move |event| {
            if let SourceEvent::Config(c) = event {
                if let Ok(mut d) = dump.lock() {
                    *d = c.dump(&wns, &wname, follower.generation(), SystemTime::now());
                }
                update_routes(&outbound, &outbound_routes, &c.config);
                if let Some(table) = &capture_table {
                    let (t, notes) = OutboundTable::from_config(&c.config, &outbound);
                    for n in &notes {
                        tracing::warn!(target: "warden::proxy", "outbound capture: {n}");
                    }
                    table.store(Arc::new(t));
                }
            }
        }));
        shutdown_signal().await;
        tracing::info!(target: "warden::proxy", "shutting down");
        if let Some(log) = observer.access_log() {
            log.flush(std::time::Duration::from_secs(2));
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The inbound ports served and the outbound routes, from the first configuration.
type Plan = (BTreeMap<u16, warden_proxy::InboundPort>, Vec<Destination>);

fn plan(a: &ProxyArgs, first: &WorkloadConfig, transparent: Option<&Transparent>) -> Result<Plan> {
    let (ns, name) = &a.workload;
    let mut served = BTreeMap::new();
    if let Some(t) = transparent {
        // Every workload port, forwarded to the pod IP as Istio ≥ 1.10 does.
        for (port, settings) in &first.ports {
            served.insert(*port, settings.with_app(SocketAddr::new(t.pod_ip, *port)));
        }
    }
    for i in &a.inbound {
        let Some(settings) = first.ports.get(&i.port) else {
            let known: Vec<String> = first.ports.keys().map(u16::to_string).collect();
            bail!(
                "--inbound {}: workload {ns}/{name} has no port {} (its ports: {})",
                i.port,
                i.port,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        };
        served.insert(i.port, settings.with_app(i.app));
    }
    let mut destinations = Vec::new();
    for o in &a.outbound {
        destinations.push(resolve_outbound(&first.config, o).map_err(|e| anyhow!(e))?);
    }

    Ok((served, destinations))
}

/// Either configuration source, so one `follow` serves both.
enum AnySource {
    Folder(FolderSource),
    Control(ControlSource),
}

impl warden_proxy::source::ConfigSource for AnySource {
    async fn next(&mut self) -> Option<SourceEvent> {
        match self {
            AnySource::Folder(s) => s.next().await,
            AnySource::Control(s) => s.next().await,
        }
    }
}

/// Re-derives every outbound route from a newly applied configuration. A route that no longer
/// resolves keeps the one in force (a bad change never replaces a good route) and says why.
fn update_routes(
    outbound: &OutboundProxy,
    routes: &[(Outbound, Arc<ArcSwap<Route>>)],
    cfg: &Config,
) {
    for (o, route) in routes {
        match resolve_outbound(cfg, o) {
            Ok(d) if d == *route.load().destination() => {}
            Ok(d) => {
                tracing::info!(
                    target: "warden::proxy",
                    outbound = %o.target(),
                    upstream = %d.upstream,
                    security = %describe_security(&d.security),
                    protocol = ?d.protocol,
                    "outbound route changed"
                );
                let (dns, dname) = destination_workload(cfg, o);
                route.store(Arc::new(outbound.route_to(d, &dns, &dname)));
            }
            Err(e) => tracing::warn!(
                target: "warden::proxy",
                "outbound route kept; the new configuration does not resolve it: {e}"
            ),
        }
    }
}

pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

// ---------------------------------------------------------------- logging

/// Prints each `tracing` event as one line on stderr: time, level, target, message, fields.
/// Small on purpose; structured access logs are the observability module's job.
/// The level is shared (`LogLevel as u8`) so the admin server can change it at runtime.
struct StderrLog {
    max: Arc<AtomicU8>,
}

/// Installs the stderr logger; the returned level (a `LogLevel as u8`) can be changed at any
/// time.
pub(crate) fn install_logger(start: LogLevel) -> Arc<AtomicU8> {
    let max = Arc::new(AtomicU8::new(start as u8));
    // Fails only if a logger is already installed, which then keeps logging.
    let _ = tracing::subscriber::set_global_default(StderrLog { max: max.clone() });
    max
}

fn level_from_u8(v: u8) -> LogLevel {
    match v {
        0 => LogLevel::Error,
        1 => LogLevel::Warn,
        2 => LogLevel::Info,
        3 => LogLevel::Debug,
        _ => LogLevel::Trace,
    }
}

fn tracing_level(v: u8) -> tracing::Level {
    match level_from_u8(v) {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    }
}

struct Line(String);

impl tracing::field::Visit for Line {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else if value.is_empty() || value.contains(char::is_whitespace) || value.contains('"') {
            let _ = write!(self.0, " {}={value:?}", field.name());
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let text = format!("{value:?}");
            self.record_str(field, &text);
        }
    }
}

impl tracing::Subscriber for StderrLog {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing_level(self.max.load(Ordering::Relaxed))
    }

    // The level can change at runtime: no hint and no cached interest, so `enabled` is asked
    // for every event.
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        None
    }

    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, e: &tracing::Event<'_>) {
        let m = e.metadata();
        let mut line = Line(format!(
            "{} {} {}: ",
            warden_identity::inspect::rfc3339(SystemTime::now()),
            m.level(),
            m.target()
        ));
        e.record(&mut line);
        line.0.push('\n');
        use std::io::Write;
        // A closed stderr must not stop the proxy.
        let _ = std::io::stderr().lock().write_all(line.0.as_bytes());
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
