//! Running a control plane: the TLS port serving the CA and the configuration stream, the
//! admin endpoint, the configuration watcher (a folder polled for changes, or texts handed
//! over by the caller) and the JWKS keeper.
//!
//! JWKS: a configuration is put in force at once with the keys at hand, and a task fetches
//! off the change path: a target when a configuration first needs it, again every
//! `jwks_refresh`, and after a failed attempt every [`JWKS_RETRY`] (or `jwks_refresh`, if
//! shorter), each fetch bounded by [`MAX_FETCH_BUDGET`]. A failed refresh keeps the last good
//! document; a target never fetched is served without keys, so its tokens are refused (fail
//! closed); a target the configuration drops is forgotten. The SSRF guard of [`crate::jwks`]
//! refuses link-local and cloud-metadata addresses.

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
    /// When each target was last tried, successfully or not.
    attempted_at: BTreeMap<String, Instant>,
    /// Wakes the JWKS task: a configuration needs targets it has no keys for.
    wake: Arc<tokio::sync::Notify>,
}

/// A fetch never waits longer than this, whatever a rule's `timeout` says: the JWKS task must
/// come back to the others.
const MAX_FETCH_BUDGET: Duration = Duration::from_secs(10);

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
        attempted_at: BTreeMap::new(),
        wake: Arc::new(tokio::sync::Notify::new()),
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

/// Puts `loaded` in force at once, with the keys at hand. Targets it needs and has never had
/// keys for go out without keys, so their tokens are refused (fail closed). The JWKS task is
/// woken to fetch them and re-applies when they arrive. No fetch ever holds up a change.
async fn put_in_force(cp: &ControlPlane, keeper: &Mutex<Keeper>, loaded: Loaded) {
    let mut k = keeper.lock().await;
    let targets = jwks_targets(&loaded.config);
    // Keys of a target the configuration dropped are forgotten: re-adding it fetches anew,
    // rather than serving keys that may have been rotated away meanwhile.
    k.docs.retain(|t, _| targets.contains(t));
    k.fetched_at.retain(|t, _| targets.contains(t));
    k.attempted_at.retain(|t, _| targets.contains(t));
    cp.apply(&loaded, &k.docs);
    let missing = targets
        .iter()
        .any(|t| !k.docs.contains_key(t) && !k.attempted_at.contains_key(t));
    k.current = Some(loaded);
    if missing {
        k.wake.notify_one();
    }
}

/// When `target` is next due: `refresh` after its last good fetch, `retry` after a failed
/// attempt, now if never tried.
fn due_at(k: &Keeper, target: &str, refresh: Duration, retry: Duration, now: Instant) -> Instant {
    let after_success = k.fetched_at.get(target).map(|at| *at + refresh);
    let after_attempt = k.attempted_at.get(target).map(|at| *at + retry);
    match (after_success, after_attempt) {
        (Some(s), Some(a)) => s.max(a),
        (None, Some(a)) => a,
        (Some(s), None) => s,
        (None, None) => now,
    }
}

/// Fetches the due targets of the configuration in force, without holding the keeper while
/// the network is waited on; a failed target keeps its last good document and is tried again
/// `retry` later (not in a loop).
async fn refresh_jwks(cp: Arc<ControlPlane>, keeper: Arc<Mutex<Keeper>>, refresh: Duration) {
    let retry = JWKS_RETRY.min(refresh);
    let wake = keeper.lock().await.wake.clone();
    loop {
        let (next, rules, due) = {
            let k = keeper.lock().await;
            let Some(cur) = &k.current else {
                drop(k);
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = wake.notified() => {}
                }
                continue;
            };
            let now = Instant::now();
            let targets = jwks_targets(&cur.config);
            let due: Vec<String> = targets
                .iter()
                .filter(|t| due_at(&k, t, refresh, retry, now) <= now)
                .cloned()
                .collect();
            let next = targets
                .iter()
                .map(|t| due_at(&k, t, refresh, retry, now))
                .min()
                .unwrap_or(now + refresh);
            let rules: Vec<warden_policy::model::JwtRule> = cur
                .config
                .request_authentications
                .iter()
                .flat_map(|p| p.spec.jwt_rules.iter().flatten())
                .filter(|r| crate::jwks::target_key(r).is_some_and(|t| due.contains(&t)))
                .cloned()
                .map(cap_timeout)
                .collect();
            (next, rules, due)
        };
        if due.is_empty() {
            tokio::select! {
                () = tokio::time::sleep_until(next.into()) => {}
                () = wake.notified() => {}
            }
            continue;
        }
        let fetched = tokio::task::spawn_blocking(move || {
            crate::jwks::Fetched::for_rules(rules.iter()).documents()
        })
        .await
        .unwrap_or_default();
        let mut k = keeper.lock().await;
        let now = Instant::now();
        let at = warden_identity::inspect::rfc3339(SystemTime::now());
        for (target, result) in fetched {
            k.attempted_at.insert(target.clone(), now);
            match result {
                Ok(doc) => {
                    cp.note_jwks(&target, serde_json::json!({"state": "fetched", "at": at}));
                    k.docs.insert(target.clone(), doc);
                    k.fetched_at.insert(target, now);
                }
                Err(reason) if k.docs.contains_key(&target) => {
                    tracing::warn!(target: "warden::control", jwks = %target, error = %reason, "JWKS refresh failed; keeping the keys fetched before");
                    cp.note_jwks(
                        &target,
                        serde_json::json!({"state": "stale", "error": reason, "at": at}),
                    );
                }
                Err(reason) => {
                    tracing::warn!(target: "warden::control", jwks = %target, error = %reason, "JWKS never fetched; tokens of its issuer are refused until it is");
                    cp.note_jwks(
                        &target,
                        serde_json::json!({"state": "unavailable", "error": reason, "at": at}),
                    );
                }
            }
        }
        // Targets that produced no result (the task failed) still wait `retry`.
        for t in &due {
            k.attempted_at.entry(t.clone()).or_insert(now);
        }
        if let Some(cur) = k.current.take() {
            cp.apply(&cur, &k.docs);
            k.current = Some(cur);
        }
    }
}

/// A rule's fetch budget, capped at [`MAX_FETCH_BUDGET`].
fn cap_timeout(mut rule: warden_policy::model::JwtRule) -> warden_policy::model::JwtRule {
    let budget = rule
        .timeout
        .as_deref()
        .and_then(crate::jwks::parse_go_duration);
    if budget.is_some_and(|d| d > MAX_FETCH_BUDGET) {
        rule.timeout = Some(format!("{}s", MAX_FETCH_BUDGET.as_secs()));
    }
    rule
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

#[cfg(test)]
mod tests {
    use super::*;

    fn keeper() -> Keeper {
        Keeper {
            current: None,
            docs: BTreeMap::new(),
            fetched_at: BTreeMap::new(),
            attempted_at: BTreeMap::new(),
            wake: Arc::default(),
        }
    }

    /// Regression: a failed refresh left the target due at once, so it was fetched again in a
    /// loop (every 100 ms), logging and re-applying each time.
    #[test]
    fn a_failed_fetch_waits_the_retry_interval() {
        let (refresh, retry) = (Duration::from_secs(1200), Duration::from_secs(30));
        let now = Instant::now();
        let mut k = keeper();
        assert_eq!(
            due_at(&k, "t", refresh, retry, now),
            now,
            "never tried: due now"
        );
        k.fetched_at.insert("t".into(), now);
        k.attempted_at.insert("t".into(), now);
        assert_eq!(due_at(&k, "t", refresh, retry, now), now + refresh);
        // A refresh fails at `later`: next try `retry` after it, not at once.
        let later = now + refresh;
        k.attempted_at.insert("t".into(), later);
        assert_eq!(due_at(&k, "t", refresh, retry, later), later + retry);
    }

    #[test]
    fn fetch_budgets_are_capped() {
        let rule = warden_policy::model::JwtRule {
            timeout: Some("1h".into()),
            ..Default::default()
        };
        assert_eq!(cap_timeout(rule).timeout.as_deref(), Some("10s"));
        let rule = warden_policy::model::JwtRule {
            timeout: Some("2s".into()),
            ..Default::default()
        };
        assert_eq!(cap_timeout(rule).timeout.as_deref(), Some("2s"));
    }
}
