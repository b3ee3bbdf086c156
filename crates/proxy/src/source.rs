//! Where the proxy's configuration comes from. [`ConfigSource`] is the seam: something that
//! yields, change after change, either a new good configuration for the proxy's workload or the
//! reasons a change was refused. [`FolderSource`] reads a folder of the YAML `warden check`
//! reads (the policy crate's loader and validation), polls it for changes, and refuses any
//! change that does not load, does not validate or lacks the workload. [`follow`] applies what a
//! source yields to an [`InboundProxy`] and logs every outcome; a refused change never replaces
//! the configuration in force. The control plane adds a streaming source behind the same trait.
//!
//! Keys of a `jwksUri` are resolved when a configuration is loaded, as istiod does before it
//! pushes a config to a sidecar, through a [`JwksResolver`] the binary supplies (this crate
//! has no outbound HTTP client), and resolved again every [`DEFAULT_JWKS_REFRESH`] (istiod's
//! `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`) even when no file changed.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use warden_policy::config::{Config, Loader};
use warden_policy::engine::{InlineJwksOnly, JwksSource, WorkloadPolicy};

use crate::inbound::InboundProxy;
use crate::ports::{port_table, PortSettings};

/// How often [`FolderSource`] looks at its files by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How often the keys of `jwksUri` rules are fetched again (istiod's default: 20 minutes).
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);

/// Resolves the keys of every `jwksUri` rule of a configuration (blocking; run off the async
/// threads). Without one, only inline `jwks` have keys and tokens for other rules fail closed.
pub type JwksResolver = Arc<dyn Fn(&Config) -> Box<dyn JwksSource> + Send + Sync>;

/// File names the folder loader reads, as `warden check -f DIR` does.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// One good configuration for the proxy's workload.
#[derive(Clone)]
pub struct WorkloadConfig {
    /// The whole configuration it was compiled from (for tools such as a config dump).
    pub config: Arc<Config>,
    pub policy: Arc<WorkloadPolicy>,
    /// Mode and protocol per container port.
    pub ports: BTreeMap<u16, PortSettings>,
    /// Where it came from, for the log (e.g. the folder and how many files).
    pub origin: String,
}

/// What a source yields.
pub enum SourceEvent {
    /// A new good configuration: put it in force.
    Config(WorkloadConfig),
    /// A change that was refused; the configuration in force stays. Each reason names
    /// file:line where there is one.
    Refused(Vec<String>),
}

/// A stream of configurations for one workload.
pub trait ConfigSource: Send {
    /// Waits for the next change. `None` when the source has ended (the proxy keeps the
    /// configuration in force).
    fn next(&mut self) -> impl Future<Output = Option<SourceEvent>> + Send;
}

/// Applies every configuration `source` yields to `proxy` until the source ends, logging each
/// applied or refused change (`config applied` / `config refused` at target
/// `warden::config`). `observe` sees each event after it was handled (tests, status pages).
pub async fn follow<S: ConfigSource>(
    mut source: S,
    proxy: Arc<InboundProxy>,
    mut observe: impl FnMut(&SourceEvent) + Send,
) {
    while let Some(event) = source.next().await {
        match &event {
            SourceEvent::Config(c) => {
                proxy.apply(c.policy.clone(), &c.ports);
                tracing::info!(
                    target: "warden::config",
                    generation = proxy.generation(),
                    origin = %c.origin,
                    "config applied"
                );
            }
            SourceEvent::Refused(reasons) => log_refused(reasons),
        }
        observe(&event);
    }
}

/// Logs a refused change, one line per reason, so each names its own file:line.
pub fn log_refused(reasons: &[String]) {
    tracing::warn!(
        target: "warden::config",
        errors = reasons.len(),
        "config refused; the last good configuration stays in force"
    );
    for r in reasons {
        tracing::warn!(target: "warden::config", "{r}");
    }
}

/// A folder (or several paths) of Kubernetes/Istio YAML, plus an optional MeshConfig file,
/// polled for changes.
pub struct FolderSource {
    paths: Vec<PathBuf>,
    mesh: Option<PathBuf>,
    namespace: String,
    workload: String,
    interval: Duration,
    /// What the files looked like at the last load (good or refused): a change is a
    /// difference from it.
    seen: Option<Fingerprint>,
    jwks: Option<JwksResolver>,
    jwks_refresh: Duration,
    /// When the last good configuration with `jwksUri` rules was loaded (their keys are due
    /// again `jwks_refresh` later); `None` when it has none.
    remote_keys_loaded: Option<Instant>,
}

/// Names, sizes and modification times of every file a load reads.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

impl FolderSource {
    /// A source for workload `namespace/workload` reading `paths` (files or folders, folders
    /// recursively, hidden entries skipped) and, if given, the MeshConfig file `mesh`.
    pub fn new(
        paths: Vec<PathBuf>,
        mesh: Option<PathBuf>,
        namespace: &str,
        workload: &str,
    ) -> FolderSource {
        FolderSource {
            paths,
            mesh,
            namespace: namespace.to_string(),
            workload: workload.to_string(),
            interval: DEFAULT_POLL_INTERVAL,
            seen: None,
            jwks: None,
            jwks_refresh: DEFAULT_JWKS_REFRESH,
            remote_keys_loaded: None,
        }
    }

    /// Resolves `jwksUri` keys with `resolver` at each load, and again every `refresh`.
    pub fn with_jwks(mut self, resolver: JwksResolver, refresh: Duration) -> FolderSource {
        self.jwks = Some(resolver);
        self.jwks_refresh = refresh;
        self
    }

    /// Changes how often the files are looked at.
    pub fn with_poll_interval(mut self, interval: Duration) -> FolderSource {
        self.interval = interval;
        self
    }

    /// Loads the files as they are now: the configuration, or every reason it is refused.
    /// Blocking (file I/O); at start, before the proxy runs.
    pub fn load_now(&mut self) -> Result<WorkloadConfig, Vec<String>> {
        let (fingerprint, result) = load(
            &self.paths,
            self.mesh.as_deref(),
            &self.target(),
            self.jwks.as_ref(),
        );
        self.seen = Some(fingerprint);
        self.note_loaded(&result);
        result
    }

    fn note_loaded(&mut self, result: &Result<WorkloadConfig, Vec<String>>) {
        if let Ok(c) = result {
            self.remote_keys_loaded =
                (self.jwks.is_some() && has_remote_keys(&c.config)).then(Instant::now);
        }
    }

    fn keys_due(&self) -> bool {
        self.remote_keys_loaded
            .is_some_and(|at| at.elapsed() >= self.jwks_refresh)
    }

    fn target(&self) -> (String, String) {
        (self.namespace.clone(), self.workload.clone())
    }
}

impl ConfigSource for FolderSource {
    async fn next(&mut self) -> Option<SourceEvent> {
        loop {
            // Polling, not synchronisation: the interval only bounds how soon a change is
            // noticed.
            tokio::time::sleep(self.interval).await;
            let paths = self.paths.clone();
            let mesh = self.mesh.clone();
            let seen = self.seen.clone();
            let target = self.target();
            let jwks = self.jwks.clone();
            let keys_due = self.keys_due();
            let scanned = tokio::task::spawn_blocking(move || {
                let now = fingerprint(&paths, mesh.as_deref());
                if seen.as_ref() == Some(&now) && !keys_due {
                    return None;
                }
                Some(load(&paths, mesh.as_deref(), &target, jwks.as_ref()))
            })
            .await;
            let Ok(Some((fp, result))) = scanned else {
                continue;
            };
            self.seen = Some(fp);
            self.note_loaded(&result);
            return Some(match result {
                Ok(c) => SourceEvent::Config(c),
                Err(reasons) => SourceEvent::Refused(reasons),
            });
        }
    }
}

/// Reads every file, loads and validates the whole, and compiles the policy and port table of
/// `target`. The fingerprint is taken before reading, so a file changed while being read shows
/// up as a change at the next poll.
fn load(
    paths: &[PathBuf],
    mesh: Option<&Path>,
    target: &(String, String),
    jwks: Option<&JwksResolver>,
) -> (Fingerprint, Result<WorkloadConfig, Vec<String>>) {
    let fp = fingerprint(paths, mesh);
    let files = match collect_all(paths) {
        Ok(f) => f,
        Err(e) => return (fp, Err(vec![e])),
    };
    let mut loader = Loader::new();
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(text) => loader.add_text(&f.display().to_string(), &text),
            Err(e) => return (fp, Err(vec![format!("{}: cannot read: {e}", f.display())])),
        }
    }
    if let Some(m) = mesh {
        match std::fs::read_to_string(m) {
            Ok(text) => loader.set_mesh_text(&m.display().to_string(), &text),
            Err(e) => {
                return (
                    fp,
                    Err(vec![format!(
                        "{}: cannot read mesh config: {e}",
                        m.display()
                    )]),
                )
            }
        }
    }
    let origin = format!(
        "{} ({} file(s))",
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        files.len()
    );
    (fp, compile_workload(loader, target, jwks, origin))
}

/// Finishes `loader`, validates the whole, and compiles the policy and port table of
/// `target` (namespace, workload): the configuration, or every reason it is refused. The
/// control plane's stream source builds its configurations through this too.
pub fn compile_workload(
    loader: Loader,
    target: &(String, String),
    jwks: Option<&JwksResolver>,
    origin: String,
) -> Result<WorkloadConfig, Vec<String>> {
    let (cfg, diags) = loader.finish();
    let validation = warden_policy::validate::validate(&cfg);
    let errors: Vec<String> = diags
        .iter()
        .chain(validation.iter())
        .filter(|d| d.is_error())
        .map(|d| d.to_string())
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    let (ns, name) = target;
    let Some(wl) = cfg.workload(ns, name) else {
        return Err(vec![format!(
            "workload {ns}/{name} is not in the configuration ({origin}); this proxy serves only it"
        )]);
    };
    let policy = match jwks {
        Some(resolve) if has_remote_keys(&cfg) => {
            Arc::new(WorkloadPolicy::compile(&cfg, wl, resolve(&cfg).as_ref()))
        }
        _ => Arc::new(WorkloadPolicy::compile(&cfg, wl, &InlineJwksOnly)),
    };
    let ports = port_table(&cfg, wl);
    Ok(WorkloadConfig {
        config: Arc::new(cfg),
        policy,
        ports,
        origin,
    })
}

/// Whether any JWT rule has keys that must be fetched (no inline `jwks`).
fn has_remote_keys(cfg: &Config) -> bool {
    cfg.request_authentications
        .iter()
        .flat_map(|p| p.spec.jwt_rules.iter().flatten())
        .any(|r| r.jwks.is_empty())
}

/// What the files under `paths` (and `mesh`) look like now: a change is a difference.
pub fn fingerprint(paths: &[PathBuf], mesh: Option<&Path>) -> Fingerprint {
    let mut files = collect_all(paths).unwrap_or_default();
    // The named paths themselves too: a folder that vanishes, or a named file that appears,
    // is a change.
    files.extend(paths.iter().cloned());
    files.extend(mesh.map(Path::to_path_buf));
    files
        .into_iter()
        .map(|f| match std::fs::metadata(&f) {
            Ok(m) if m.is_file() => (f, m.len(), m.modified().ok()),
            Ok(_) => (f, 0, None),
            Err(_) => (f, u64::MAX, None),
        })
        .collect()
}

/// Every file under `paths` the loader reads, in a stable order, each once.
pub fn collect_all(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for p in paths {
        collect(p, &mut out, &mut seen)?;
    }
    Ok(out)
}

/// The walk `warden check -f` does: folders recursively in name order, hidden entries skipped,
/// only YAML/JSON files, and every folder and file once by canonical path (symlink loops).
fn collect(path: &Path, out: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if !seen.insert(canonical) {
        return Ok(());
    }
    if !meta.is_dir() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| format!("{}: cannot list folder: {e}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        let hidden = e
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if e.is_dir() {
            collect(&e, out, seen)?;
        } else if e
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| EXTENSIONS.contains(&x))
        {
            let canonical = std::fs::canonicalize(&e).unwrap_or_else(|_| e.clone());
            if seen.insert(canonical) {
                out.push(e);
            }
        }
    }
    Ok(())
}

impl WorkloadConfig {
    /// What `/config_dump` shows: the workload, its port table, the policies that apply to it
    /// and which configuration this is (`generation`, applied at `applied`).
    pub fn dump(
        &self,
        namespace: &str,
        name: &str,
        generation: u64,
        applied: std::time::SystemTime,
    ) -> serde_json::Value {
        let ports: serde_json::Map<String, serde_json::Value> = self
            .ports
            .iter()
            .map(|(port, s)| {
                (
                    port.to_string(),
                    serde_json::json!({
                        "mode": s.mode.as_str(),
                        "protocol": format!("{:?}", s.protocol).to_lowercase(),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "workload": format!("{namespace}/{name}"),
            "version": generation,
            "applied": warden_identity::inspect::rfc3339(applied),
            "origin": self.origin,
            "ports": ports,
            "authorization_policies": self.policy.authz.policies,
            "request_authentications": self.policy.jwt_sources,
        })
    }
}
