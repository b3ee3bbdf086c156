//! Running a control plane: the TLS port serving the CA and the configuration stream, the
//! admin endpoint, the configuration watcher (a folder polled for changes, or texts handed
//! over by the caller) and the JWKS keeper.
//!
//! JWKS: a target is fetched when a configuration first needs it, again every
//! `jwks_refresh`, and every [`JWKS_RETRY`] (or `jwks_refresh`, if shorter) while it has
//! never been fetched. A failed refresh keeps the last good document; a target never fetched
//! is served without keys, so its tokens are refused (fail closed). The SSRF guard of
//! [`crate::jwks`] refuses link-local and cloud-metadata addresses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use warden_identity::service::{CaServer, CaServerOptions, CertSigner};
use warden_identity::token::TokenStore;
use warden_policy::config::Config;

use crate::load::{jwks_targets, load_folder_cached, load_texts, Loaded, ParseCache};
use crate::server::ControlPlane;

/// How often a JWKS target that was never fetched is tried again.
pub const JWKS_RETRY: Duration = Duration::from_secs(30);

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("the configuration is refused:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("admin server on {0}: {1}")]
    Admin(SocketAddr, std::io::Error),
    #[error("CA service: {0}")]
    Service(#[from] warden_identity::service::ServiceError),
}

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Input {
    /// Files and folders, polled every `poll_interval`.
    Folder {
        paths: Vec<PathBuf>,
        mesh: Option<PathBuf>,
        poll_interval: Duration,
    },
    /// Texts handed over with [`Running::apply_texts`] (the first set given here).
    Texts(Vec<(String, String)>),
}

/// Options of [`start`].
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub jwks_refresh: Duration,
}

/// A running control plane.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub cp: Arc<ControlPlane>,
    server: Option<CaServer>,
    keeper: Arc<Mutex<Keeper>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The configuration in force and the JWKS documents inlined into it.
struct Keeper {
    current: Option<Loaded>,
    /// Last good document per target.
    docs: BTreeMap<String, String>,
    /// When each target was last fetched successfully.
    fetched_at: BTreeMap<String, Instant>,
}

/// Loads the first configuration (refusing to start on errors), starts the TLS port and the
/// admin endpoint, then follows the input.
pub async fn start<S: CertSigner>(
    signer: Arc<S>,
    tokens: Option<Arc<TokenStore>>,
    input: Input,
    opts: Options,
) -> Result<Running, ControlError> {
    // Shared by the first load and the watcher, so the first reload parses only what changed.
    let cache = Arc::new(std::sync::Mutex::new(ParseCache::default()));
    let first = match &input {
        Input::Folder { paths, mesh, .. } => {
            let (paths, mesh, cache) = (paths.clone(), mesh.clone(), cache.clone());
            tokio::task::spawn_blocking(move || {
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                load_folder_cached(&paths, mesh.as_deref(), &mut cache)
            })
            .await
            .map_err(|e| ControlError::Config(vec![e.to_string()]))?
        }
        Input::Texts(texts) => load_texts(texts, None, "built-in configuration".into()),
    }
    .map_err(ControlError::Config)?;
    let cp = Arc::new(ControlPlane::new());
    let keeper = Arc::new(Mutex::new(Keeper {
        current: None,
        docs: BTreeMap::new(),
        fetched_at: BTreeMap::new(),
    }));
    put_in_force(&cp, &keeper, first).await;

    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| ControlError::Listen(opts.listen, e))?;
    let routes = tonic::service::Routes::new(cp.service());
    let server = CaServer::start_with(
        listener,
        signer,
        CaServerOptions {
            tokens,
            ..CaServerOptions::default()
        },
        routes,
    )
    .await?;
    let addr = server.local_addr();
    let mut tasks = Vec::new();
    let admin_addr = match opts.admin {
        Some(a) => {
            let l = crate::admin::bind(a)
                .await
                .map_err(|e| ControlError::Admin(a, e))?;
            let local = l.local_addr().map_err(|e| ControlError::Admin(a, e))?;
            tasks.push(tokio::spawn(crate::admin::serve(l, cp.clone())));
            Some(local)
        }
        None => None,
    };
    if let Input::Folder {
        paths,
        mesh,
        poll_interval,
    } = input
    {
        tasks.push(tokio::spawn(watch_folder(
            cp.clone(),
            keeper.clone(),
            paths,
            mesh,
            poll_interval,
            cache,
        )));
    }
    tasks.push(tokio::spawn(refresh_jwks(
        cp.clone(),
        keeper.clone(),
        opts.jwks_refresh,
    )));
    Ok(Running {
        addr,
        admin_addr,
        cp,
        server: Some(server),
        keeper,
        tasks,
    })
}

impl Running {
    /// Validates `texts` as a whole and puts them in force, or refuses them (the
    /// configuration in force stays) and returns every reason.
    pub async fn apply_texts(
        &self,
        texts: Vec<(String, String)>,
        origin: &str,
    ) -> Result<(), Vec<String>> {
        let origin = origin.to_string();
        let loaded = tokio::task::spawn_blocking(move || load_texts(&texts, None, origin))
            .await
            .map_err(|e| vec![e.to_string()])?;
        match loaded {
            Ok(l) => {
                put_in_force(&self.cp, &self.keeper, l).await;
                Ok(())
            }
            Err(reasons) => {
                self.cp.refuse(reasons.clone());
                Err(reasons)
            }
        }
    }

    /// Re-issues the TLS port's own certificate and reloads its roots (after a root
    /// rotation of the CA folder).
    pub fn reload_ca_certificate(&self) {
        if let Some(s) = &self.server {
            s.reload_certificate();
        }
    }

    /// Stops serving: the port closes, open streams end.
    pub async fn shutdown(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = self.server.take() {
            let _ = s.shutdown().await;
        }
    }
}

/// Fetches the JWKS documents `loaded` needs and does not have, then applies it.
async fn put_in_force(cp: &ControlPlane, keeper: &Mutex<Keeper>, loaded: Loaded) {
    let mut k = keeper.lock().await;
    let missing: Vec<String> = jwks_targets(&loaded.config)
        .into_iter()
        .filter(|t| !k.docs.contains_key(t))
        .collect();
    if !missing.is_empty() {
        fetch(cp, &mut k, &loaded.config, Some(&missing)).await;
    }
    cp.apply(&loaded, &k.docs);
    k.current = Some(loaded);
}

/// Fetches `only` (or every target of `cfg`), keeping the last good document of any that
/// fails.
async fn fetch(cp: &ControlPlane, k: &mut Keeper, cfg: &Config, only: Option<&[String]>) {
    let rules: Vec<warden_policy::model::JwtRule> = cfg
        .request_authentications
        .iter()
        .flat_map(|p| p.spec.jwt_rules.iter().flatten())
        .filter(|r| crate::jwks::target_key(r).is_some_and(|t| only.is_none_or(|o| o.contains(&t))))
        .cloned()
        .collect();
    if rules.is_empty() {
        return;
    }
    let fetched = tokio::task::spawn_blocking(move || {
        crate::jwks::Fetched::for_rules(rules.iter()).documents()
    })
    .await
    .unwrap_or_default();
    let now = warden_identity::inspect::rfc3339(SystemTime::now());
    for (target, result) in fetched {
        match result {
            Ok(doc) => {
                cp.note_jwks(&target, serde_json::json!({"state": "fetched", "at": now}));
                k.docs.insert(target.clone(), doc);
                k.fetched_at.insert(target, Instant::now());
            }
            Err(reason) if k.docs.contains_key(&target) => {
                tracing::warn!(target: "warden::control", jwks = %target, error = %reason, "JWKS refresh failed; keeping the keys fetched before");
                cp.note_jwks(
                    &target,
                    serde_json::json!({"state": "stale", "error": reason, "at": now}),
                );
            }
            Err(reason) => {
                tracing::warn!(target: "warden::control", jwks = %target, error = %reason, "JWKS never fetched; tokens of its issuer are refused until it is");
                cp.note_jwks(
                    &target,
                    serde_json::json!({"state": "unavailable", "error": reason, "at": now}),
                );
            }
        }
    }
}

async fn watch_folder(
    cp: Arc<ControlPlane>,
    keeper: Arc<Mutex<Keeper>>,
    paths: Vec<PathBuf>,
    mesh: Option<PathBuf>,
    interval: Duration,
    cache: Arc<std::sync::Mutex<ParseCache>>,
) {
    let mut seen = {
        let (p, m) = (paths.clone(), mesh.clone());
        tokio::task::spawn_blocking(move || warden_proxy::source::fingerprint(&p, m.as_deref()))
            .await
            .ok()
    };
    loop {
        // Polling, not synchronisation: the interval bounds how soon a change is noticed.
        tokio::time::sleep(interval).await;
        let (p, m) = (paths.clone(), mesh.clone());
        let prev = seen.clone();
        let cache = cache.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            let now = warden_proxy::source::fingerprint(&p, m.as_deref());
            if prev.as_ref() == Some(&now) {
                return None;
            }
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            Some((now, load_folder_cached(&p, m.as_deref(), &mut cache)))
        })
        .await;
        let Ok(Some((fp, result))) = scanned else {
            continue;
        };
        seen = Some(fp);
        match result {
            Ok(loaded) => put_in_force(&cp, &keeper, loaded).await,
            Err(reasons) => cp.refuse(reasons),
        }
    }
}

async fn refresh_jwks(cp: Arc<ControlPlane>, keeper: Arc<Mutex<Keeper>>, refresh: Duration) {
    loop {
        let wait = {
            let k = keeper.lock().await;
            let Some(cur) = &k.current else {
                drop(k);
                tokio::time::sleep(JWKS_RETRY).await;
                continue;
            };
            let targets = jwks_targets(&cur.config);
            targets
                .iter()
                .map(|t| match k.fetched_at.get(t) {
                    Some(at) => refresh.saturating_sub(at.elapsed()),
                    // Never later than a fetched target would be refreshed.
                    None => JWKS_RETRY.min(refresh),
                })
                .min()
                .unwrap_or(refresh)
        };
        tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
        let mut k = keeper.lock().await;
        let Some(cur) = k.current.take() else {
            continue;
        };
        let due: Vec<String> = jwks_targets(&cur.config)
            .into_iter()
            .filter(|t| match k.fetched_at.get(t) {
                Some(at) => at.elapsed() >= refresh,
                None => true,
            })
            .collect();
        if !due.is_empty() {
            fetch(&cp, &mut k, &cur.config, Some(&due)).await;
            cp.apply(&cur, &k.docs);
        }
        k.current = Some(cur);
    }
}
