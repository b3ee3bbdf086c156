//! `warden control`: the control plane for proxies started with `warden proxy
//! --control-plane`. Serves the CA service and the configuration stream on one TLS port
//! (as istiod serves both on 15012), watches the configuration folder, fetches JWKS, and
//! shows its state on a loopback admin port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use warden_control::run::{start, Input, Options};
use warden_identity::ca::Ca;
use warden_identity::signer::CaSigner;
use warden_identity::token::TokenStore;

pub const LONG_ABOUT: &str = "Run Warden's control plane. It reads the configuration with \
the same loader as `warden check -f` and watches it (every --poll-interval): a change that \
loads and validates is put in force and pushed, as a delta, to the proxies it concerns only; \
a change with any error is refused, logged with file:line, resource and field, shown on the \
admin endpoint's /status, and the last good configuration stays in force.\n\n\
Proxies (`warden proxy --control-plane ADDR`) connect over mutual TLS to --listen, which also \
serves the CA of --ca (Istio's CreateCertificate API; bootstrap tokens from `warden ca token`). \
Each proxy receives exactly the policies that attach to its workload, plus the workloads, \
Services, ServiceEntries, PeerAuthentications and mesh configuration it needs for outbound \
traffic, in versioned responses it ACKs or NACKs; a NACK is logged and shown on /status. \
RequestAuthentication jwksUris are fetched here (never from link-local or cloud-metadata \
addresses), refreshed every --jwks-refresh, kept when a refresh fails, and sent inline; a \
URI never fetched leaves its tokens refused.\n\n\
Admin (loopback): /ready, /status (JSON), /metrics (Prometheus).\n\n\
Example:\n  warden ca init --dir ca/ && warden control -f config/ --ca ca/";

#[derive(Args)]
pub struct ControlArgs {
    /// Configuration: a YAML/JSON file or folder (recursive, watched). Repeatable.
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
    files: Vec<PathBuf>,
    /// A MeshConfig file (overrides the `istio` ConfigMap in istio-system); watched too.
    #[arg(long, value_name = "FILE")]
    mesh: Option<PathBuf>,
    /// The CA folder (`warden ca init`, or Istio's cacerts layout).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Trust domain of a plug-in (cacerts) CA that has no ca.json.
    #[arg(long, value_name = "DOMAIN")]
    trust_domain: Option<String>,
    /// The TLS port for proxies: configuration stream and CA.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// The admin endpoint (loopback only; port 0 picks one, the log says which).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
    /// How often the configuration files are looked at.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// How often JWKS are fetched again (istiod's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL).
    #[arg(long, value_name = "DURATION", default_value = "20m", value_parser = parse_duration)]
    jwks_refresh: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    warden_control::jwks::parse_go_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("\"{s}\" is not a duration such as 500ms, 30s or 20m"))
}

/// glibc's malloc settings for the control plane, as `GLIBC_TUNABLES`. Each first sync is one
/// large response (about 1 MB for a 1,000-workload mesh), built and freed once per proxy, and
/// each reload builds a new configuration while the old one is still in force.
/// glibc raises its mmap threshold after every large free, so those buffers end up in the
/// heap and fragment it: 1,000 proxies left about 200 MiB of freed memory that was never
/// returned to the OS. A fixed 64 KiB threshold keeps large buffers in mmap (returned on
/// free), one arena keeps what reloads free reusable by the next reload, and a 64 KiB trim
/// threshold returns the heap's free top. Measured in BENCHMARKS.md (control plane scale).
const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=65536:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=65536";

/// glibc reads its tunables only at process start, so `warden control` re-executes itself
/// once with them set (same pid, arguments and descriptors). This avoids an unsafe
/// `mallopt` call. If the exec fails, the control plane runs with glibc's defaults.
fn tune_malloc() {
    use std::os::unix::process::CommandExt;
    const MARK: &str = "WARDEN_MALLOC_TUNED";
    if !cfg!(all(target_os = "linux", target_env = "gnu")) || std::env::var_os(MARK).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let tunables = match std::env::var("GLIBC_TUNABLES") {
        Ok(t) if !t.is_empty() => format!("{t}:{MALLOC_TUNABLES}"),
        _ => MALLOC_TUNABLES.to_string(),
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("GLIBC_TUNABLES", tunables)
        .env(MARK, "1")
        .exec();
    eprintln!("warden: warning: cannot re-execute with malloc tunables ({err}); continuing with glibc's defaults");
}

pub fn run(a: &ControlArgs, verbose: bool) -> Result<ExitCode> {
    tune_malloc();
    if !a.admin.ip().is_loopback() {
        bail!(
            "--admin {}: not a loopback address; the admin endpoint is unauthenticated",
            a.admin
        );
    }
    let ca = Ca::load_with(&a.ca, a.trust_domain.as_deref())
        .with_context(|| format!("loading the CA in {}", a.ca.display()))?;
    let td = ca.trust_domain().to_string();
    let signer = Arc::new(CaSigner::new(ca));
    let tokens = Arc::new(TokenStore::open(&a.ca));
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
        let running = start(
            signer.clone(),
            Some(tokens),
            Input::Folder {
                paths: a.files.clone(),
                mesh: a.mesh.clone(),
                poll_interval: a.poll_interval,
            },
            Options {
                listen: a.listen,
                admin: Some(a.admin),
                jwks_refresh: a.jwks_refresh,
            },
        )
        .await?;
        tracing::info!(
            target: "warden::control",
            addr = %running.addr,
            trust_domain = %td,
            "control plane listening"
        );
        if let Some(admin) = running.admin_addr {
            tracing::info!(target: "warden::control", addr = %admin, "admin listening");
        }
        // A `warden ca rotate-root` by another process takes effect without a restart.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let shutdown = crate::proxy_cmd::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match signer.reload(&a.ca, a.trust_domain.as_deref()) {
                        Ok(true) => {
                            running.reload_ca_certificate();
                            tracing::info!(target: "warden::control", "CA reloaded from {}", a.ca.display());
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(target: "warden::control", "CA in {} not reloaded, keeping the current one: {e:#}", a.ca.display()),
                    }
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!(target: "warden::control", "shutting down");
        running.shutdown().await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
