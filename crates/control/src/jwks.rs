//! Resolves the verification keys of RequestAuthentication `jwtRules`: for the offline tools,
//! for `warden proxy` reading a folder, and for the control plane, which inlines the fetched
//! documents into the RequestAuthentications it serves (as istiod inlines them into Envoy's
//! configuration).
//!
//! Owns Warden's only outbound HTTP(S) client: inline `jwks` is used as is; otherwise the
//! `jwksUri` (or, without one, the JWKS named by the issuer's OIDC discovery document) is
//! fetched once per distinct target when the configuration is loaded. Every failure, the SSRF
//! guard's refusals included, fails closed: the provider's keys become
//! [`KeySource::Unavailable`], so its tokens get Envoy's 401 `Jwks remote fetch is failed`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::{header, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use warden_policy::config::Config;
use warden_policy::engine::{inline_keys, JwksSource};
use warden_policy::jwt::{Jwks, KeySource};
use warden_policy::model::JwtRule;

/// Istio's default for `jwtRules[].timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS is a few KiB; anything near this is a misconfigured URI or a hostile server.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Cloud metadata endpoints, refused by name before any DNS query is sent.
const METADATA_HOSTS: [&str; 1] = ["metadata.google.internal"];
const AWS_METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Keys resolved for every rule of a [`Config`] that needs fetching.
pub struct Fetched {
    keys: HashMap<Target, KeySource>,
    /// The documents behind `keys`' `Inline` entries, as fetched.
    texts: HashMap<Target, String>,
}

impl Fetched {
    /// Fetches every distinct target of `cfg` concurrently, each bounded by its rules' timeout,
    /// and prints one warning line to stderr per target that could not be fetched.
    pub fn for_config(cfg: &Config) -> Self {
        Self::for_rules(
            cfg.request_authentications
                .iter()
                .flat_map(|p| p.spec.jwt_rules.iter().flatten()),
        )
    }

    /// [`Fetched::for_config`] for some rules only (the control plane fetches the targets it
    /// has no keys for yet, and refreshes the others on its own schedule).
    pub fn for_rules<'a>(rules: impl Iterator<Item = &'a JwtRule>) -> Self {
        let mut jobs: BTreeMap<Target, Job> = BTreeMap::new();
        for rule in rules {
            if !rule.jwks.is_empty() {
                continue;
            }
            let Some(target) = Target::of(rule) else {
                continue;
            };
            let job = jobs.entry(target).or_default();
            // Rules sharing a URI share one fetch; the most patient rule's budget applies so
            // that no rule fails sooner than its own timeout allows.
            job.timeout = job.timeout.max(rule_timeout(rule));
            job.issuers.insert(rule.issuer.clone());
        }
        let mut results = if jobs.is_empty() {
            HashMap::new()
        } else {
            fetch_all(&jobs)
        };
        let mut keys = HashMap::new();
        let mut texts = HashMap::new();
        for (target, job) in jobs {
            let result = results.remove(&target).unwrap_or_else(|| {
                Err(FetchError {
                    uri: target.first_uri(),
                    what: "the fetch task failed".to_string(),
                })
            });
            let source = match result {
                Ok((jwks, text)) => {
                    texts.insert(target.clone(), text);
                    KeySource::Inline(jwks)
                }
                Err(err) => {
                    eprintln!(
                        "warden: warning: jwksUri {}: {}; tokens for issuer {} will be rejected",
                        err.uri,
                        err.what,
                        job.issuer_list()
                    );
                    KeySource::Unavailable {
                        reason: format!("jwksUri {}: {}", err.uri, err.what),
                    }
                }
            };
            keys.insert(target, source);
        }
        Fetched { keys, texts }
    }

    /// Every target that was fetched, by [`target_key`], with the JWKS document or why it
    /// could not be had.
    pub fn documents(&self) -> BTreeMap<String, Result<String, String>> {
        self.keys
            .iter()
            .map(|(target, source)| {
                let doc = match (self.texts.get(target), source) {
                    (Some(text), _) => Ok(text.clone()),
                    (None, KeySource::Unavailable { reason }) => Err(reason.clone()),
                    (None, _) => Err("not fetched".to_string()),
                };
                (target.key(), doc)
            })
            .collect()
    }
}

/// Where a rule without inline `jwks` gets its keys: its `jwksUri`, or `discovery:ISSUER`
/// for OIDC discovery. `None` for a rule with inline keys or nothing to fetch.
pub fn target_key(rule: &JwtRule) -> Option<String> {
    if !rule.jwks.is_empty() {
        return None;
    }
    Target::of(rule).map(|t| t.key())
}

impl JwksSource for Fetched {
    fn keys_for(&self, rule: &JwtRule) -> KeySource {
        if let Some(inline) = inline_keys(rule) {
            return inline;
        }
        let Some(target) = Target::of(rule) else {
            return KeySource::Unavailable {
                reason: "no jwks, jwksUri or issuer to discover keys from".to_string(),
            };
        };
        self.keys
            .get(&target)
            .cloned()
            .unwrap_or_else(|| KeySource::Unavailable {
                reason: format!("jwksUri {} was not fetched", target.first_uri()),
            })
    }
}

/// The resolver `warden proxy` loads configurations with. Each load fetches anew; a target
/// whose fetch fails keeps the keys it last had, as istiod does when a refresh fails, so a JWKS
/// server's outage does not turn valid tokens away. A target never fetched stays unavailable,
/// and its tokens are refused (fail closed).
pub fn proxy_resolver() -> warden_proxy::source::JwksResolver {
    let last: Arc<Mutex<BTreeMap<Target, KeySource>>> = Arc::default();
    Arc::new(move |cfg: &Config| -> Box<dyn JwksSource> {
        Box::new(LastGood {
            fetched: Fetched::for_config(cfg),
            last: last.clone(),
        })
    })
}

struct LastGood {
    fetched: Fetched,
    last: Arc<Mutex<BTreeMap<Target, KeySource>>>,
}

impl JwksSource for LastGood {
    fn keys_for(&self, rule: &JwtRule) -> KeySource {
        let keys = self.fetched.keys_for(rule);
        let Some(target) = Target::of(rule).filter(|_| rule.jwks.is_empty()) else {
            return keys;
        };
        let Ok(mut last) = self.last.lock() else {
            return keys;
        };
        match keys {
            KeySource::Inline(_) => {
                last.insert(target, keys.clone());
                keys
            }
            failed => match last.get(&target) {
                Some(good) => {
                    tracing::warn!(
                        uri = %target.first_uri(),
                        "JWKS fetch failed; keeping the keys fetched before"
                    );
                    good.clone()
                }
                None => failed,
            },
        }
    }
}

/// Where a rule's keys come from when it has no inline `jwks`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Target {
    Uri(String),
    /// OIDC discovery from this issuer.
    Discovery(String),
}

impl Target {
    fn of(rule: &JwtRule) -> Option<Target> {
        if !rule.jwks_uri.is_empty() {
            Some(Target::Uri(rule.jwks_uri.clone()))
        } else if !rule.issuer.is_empty() {
            Some(Target::Discovery(rule.issuer.clone()))
        } else {
            None
        }
    }

    fn key(&self) -> String {
        match self {
            Target::Uri(uri) => uri.clone(),
            Target::Discovery(issuer) => format!("discovery:{issuer}"),
        }
    }

    /// The first URI fetched for this target, for messages.
    fn first_uri(&self) -> String {
        match self {
            Target::Uri(uri) => uri.clone(),
            Target::Discovery(issuer) => discovery_url(issuer),
        }
    }
}

#[derive(Default)]
struct Job {
    timeout: Duration,
    issuers: BTreeSet<String>,
}

impl Job {
    fn issuer_list(&self) -> String {
        let names: Vec<&str> = self
            .issuers
            .iter()
            .map(|i| if i.is_empty() { "\"\"" } else { i.as_str() })
            .collect();
        names.join(", ")
    }
}

struct FetchError {
    /// The URI whose fetch failed: for discovery, the document's or the JWKS's.
    uri: String,
    what: String,
}

fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// The rule's `timeout`; a missing, zero or unparsable one gets Istio's default.
fn rule_timeout(rule: &JwtRule) -> Duration {
    rule.timeout
        .as_deref()
        .and_then(parse_go_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// Go's `time.ParseDuration`, the format Istio's API uses; negative durations are `None`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.strip_prefix('+').unwrap_or(text);
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if text.is_empty() {
        return None;
    }
    let is_number = |c: char| c.is_ascii_digit() || c == '.';
    let mut rest = text;
    let mut seconds = 0f64;
    while !rest.is_empty() {
        let (number, tail) = rest.split_at(rest.find(|c| !is_number(c)).unwrap_or(rest.len()));
        let (unit, next) = tail.split_at(tail.find(is_number).unwrap_or(tail.len()));
        if number.is_empty() || number == "." {
            return None;
        }
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        seconds += number.parse::<f64>().ok()? * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(seconds).ok()
}

fn fetch_all(jobs: &BTreeMap<Target, Job>) -> HashMap<Target, Result<(Jwks, String), FetchError>> {
    // The CLI is synchronous; a private current-thread runtime keeps tokio out of its design
    // while still letting one slow server overlap with the others.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return jobs
                .keys()
                .map(|target| {
                    let err = FetchError {
                        uri: target.first_uri(),
                        what: format!("cannot start the I/O runtime: {e}"),
                    };
                    (target.clone(), Err(err))
                })
                .collect();
        }
    };
    let client = Arc::new(Client::default());
    runtime.block_on(async {
        let mut set = JoinSet::new();
        for (target, job) in jobs {
            let (client, target, budget) = (client.clone(), target.clone(), job.timeout);
            set.spawn(async move {
                let deadline = Deadline {
                    at: Instant::now() + budget,
                    budget,
                };
                let result = resolve(&client, &target, deadline).await;
                (target, result)
            });
        }
        let mut results = HashMap::new();
        while let Some(joined) = set.join_next().await {
            if let Ok((target, result)) = joined {
                results.insert(target, result);
            }
        }
        results
    })
}

/// One budget for a target's whole resolution, discovery included, so the wait for a rule
/// never exceeds its `timeout`.
#[derive(Clone, Copy)]
struct Deadline {
    at: Instant,
    budget: Duration,
}

async fn resolve(
    client: &Client,
    target: &Target,
    deadline: Deadline,
) -> Result<(Jwks, String), FetchError> {
    match target {
        Target::Uri(uri) => fetch_jwks(client, uri, deadline).await,
        Target::Discovery(issuer) => {
            let url = discovery_url(issuer);
            let fail = |what: String| FetchError {
                uri: url.clone(),
                what: format!("OIDC discovery failed: {what}"),
            };
            let body = get(client, &url, deadline).await.map_err(fail)?;
            let doc: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| fail(format!("response is not JSON: {e}")))?;
            match doc.get("jwks_uri").and_then(|v| v.as_str()) {
                Some(jwks_uri) if !jwks_uri.is_empty() => {
                    fetch_jwks(client, jwks_uri, deadline).await
                }
                _ => Err(fail("document has no jwks_uri".to_string())),
            }
        }
    }
}

async fn fetch_jwks(
    client: &Client,
    uri: &str,
    deadline: Deadline,
) -> Result<(Jwks, String), FetchError> {
    let fail = |what: String| FetchError {
        uri: uri.to_string(),
        what,
    };
    let body = get(client, uri, deadline).await.map_err(fail)?;
    let text = std::str::from_utf8(&body).map_err(|_| fail("response is not UTF-8".into()))?;
    // Envoy treats a fetched document it cannot use as a failed fetch, not as a key set with
    // no valid keys, hence Unavailable rather than Invalid.
    let jwks =
        Jwks::parse(text).map_err(|e| fail(format!("response is not a usable JWKS: {e}")))?;
    Ok((jwks, text.to_string()))
}

async fn get(client: &Client, uri: &str, deadline: Deadline) -> Result<Bytes, String> {
    match tokio::time::timeout_at(deadline.at, get_unbounded(client, uri)).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {:?}", deadline.budget)),
    }
}

async fn get_unbounded(client: &Client, uri: &str) -> Result<Bytes, String> {
    // Checked before parsing: `Uri` rejects some other schemes' forms (`file:///x`) with a
    // bare "invalid format", which would hide the real problem.
    let https = match uri.split_once("://").map(|(s, _)| s.to_ascii_lowercase()) {
        Some(s) if s == "http" => false,
        Some(s) if s == "https" => true,
        Some(s) => return Err(format!("unsupported scheme {s:?} (want http or https)")),
        None => return Err("not an absolute http(s) URI".to_string()),
    };
    let parsed: Uri = uri.parse().map_err(|e| format!("invalid URI: {e}"))?;
    let host = parsed.host().ok_or("URI has no host")?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs = resolve_checked(bare_host, port).await?;
    let tcp = connect_any(&addrs).await?;
    // `authority()` would carry userinfo, which must never reach the Host header.
    let host_header = match parsed.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(header::HOST, host_header)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("warden/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    if !https {
        return exchange(TokioIo::new(tcp), request).await;
    }
    let tls = client.tls()?;
    let name = ServerName::try_from(bare_host.to_string())
        .map_err(|e| format!("invalid TLS server name {bare_host}: {e}"))?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {bare_host} failed: {e}"))?;
    exchange(TokioIo::new(stream), request).await
}

/// Resolves `host` and applies the SSRF guard to every answer; connecting only to the
/// addresses checked here means a second DNS answer cannot slip a metadata address in.
async fn resolve_checked(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if METADATA_HOSTS.contains(&name.as_str()) {
        return Err(format!("refused: {host} is a cloud metadata host"));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} resolved to no address"));
    }
    // Any forbidden answer refuses the host outright: a name that mixes public and metadata
    // addresses is more likely an attack than a misconfiguration.
    for addr in &addrs {
        if let Some(kind) = forbidden_kind(addr.ip()) {
            let ip = addr.ip();
            return Err(if host.parse::<IpAddr>().is_ok() {
                format!("refused: {ip} is a {kind} address")
            } else {
                format!("refused: {host} resolves to {ip}, a {kind} address")
            });
        }
    }
    Ok(addrs)
}

/// Why an address must not be fetched from, if it must not.
fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    // An IPv4-mapped IPv6 address reaches the same IPv4 host.
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4 == AWS_METADATA_V4 => Some("cloud metadata"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V6(v6) if v6 == AWS_METADATA_V6 => Some("cloud metadata"),
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some("link-local"),
        _ => None,
    }
}

async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::new();
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("connecting to {addr} failed: {e}"),
        }
    }
    Err(last)
}

/// Sends one request on a fresh HTTP/1.1 connection and returns the 2xx body.
async fn exchange<I>(io: I, request: Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    // The connection task must die with this fetch, including when the deadline drops it.
    let _connection = AbortOnDrop(tokio::spawn(connection));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    if status.is_redirection() {
        return Err(format!("HTTP {status} (redirects are not followed)"));
    }
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let collected = Limited::new(response.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_large()
            } else {
                format!("reading the response failed: {e}")
            }
        })?;
    Ok(collected.to_bytes())
}

fn too_large() -> String {
    "response body exceeds the 1 MiB limit".to_string()
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Shared by every fetch of one `for_config`; trust roots are loaded only if some target is
/// https, since reading the system store costs file I/O that plain-http configs never need.
#[derive(Default)]
struct Client {
    tls: OnceLock<Result<Arc<ClientConfig>, String>>,
}

impl Client {
    fn tls(&self) -> Result<Arc<ClientConfig>, String> {
        self.tls.get_or_init(tls_config).clone()
    }
}

fn tls_config() -> Result<Arc<ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let detail = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "no trusted root certificates found on this system{detail}"
        ));
    }
    // An explicit provider: `ClientConfig::builder()` panics if another crate in the build
    // ever enables a second rustls provider.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use warden_policy::config::Loader;

    use super::*;

    const ONE_KEY: &str = r#"{"keys":[{"kty":"OKP","kid":"ed-1","crv":"Ed25519","x":"Si2c98kmj2uirlTkBavdnD4N41VPLeYNlzpSULkfwYo"}]}"#;
    const TWO_KEYS: &str = r#"{"keys":[{"kty":"OKP","kid":"ed-1","crv":"Ed25519","x":"Si2c98kmj2uirlTkBavdnD4N41VPLeYNlzpSULkfwYo"},{"kty":"oct","kid":"oct-1","alg":"HS256","k":"d2FyZGVuLXRlc3QtaG1hYy1zZWNyZXQtMzItYnl0ZXM"}]}"#;

    enum Reply {
        Status(u16, String),
        /// Reads the request, then answers nothing until the client hangs up.
        Silent,
    }

    type Routes = dyn Fn(&str, &str) -> Reply + Send + Sync;

    /// A loopback HTTP/1.1 server answering `routes(path, base_url)`; its threads are
    /// detached and end with the test process.
    fn serve(routes: impl Fn(&str, &str) -> Reply + Send + Sync + 'static) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Arc<Routes> = Arc::new(routes);
        let server_base = base.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (routes, base) = (routes.clone(), server_base.clone());
                std::thread::spawn(move || answer(stream, &*routes, &base));
            }
        });
        base
    }

    fn answer(mut stream: TcpStream, routes: &Routes, base: &str) {
        // Bounds a handler whose client vanished without closing.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            // A TLS ClientHello never ends in a blank line; answer it as a plain server would.
            if head.first() == Some(&0x16) {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                return;
            }
        }
        let head = String::from_utf8_lossy(&head);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        match routes(&path, base) {
            Reply::Status(code, body) => {
                let response = format!(
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
            }
            Reply::Silent => while matches!(stream.read(&mut buf), Ok(n) if n > 0) {},
        }
    }

    fn config(rules: &str) -> Config {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
             metadata:\n  name: jwt\n  namespace: default\nspec:\n  jwtRules:\n{rules}"
        );
        let mut loader = Loader::new();
        loader.add_text("t.yaml", &yaml);
        let (cfg, diags) = loader.finish();
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
        cfg
    }

    fn rule(cfg: &Config, i: usize) -> &JwtRule {
        cfg.request_authentications[0].spec.jwt_rules[i]
            .as_ref()
            .unwrap()
    }

    /// Fetches for a single-rule config and returns that rule's keys.
    fn keys_of(rules: &str) -> KeySource {
        let cfg = config(rules);
        Fetched::for_config(&cfg).keys_for(rule(&cfg, 0))
    }

    fn unavailable_reason(keys: KeySource) -> String {
        match keys {
            KeySource::Unavailable { reason } => reason,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    fn key_count(keys: KeySource) -> usize {
        match keys {
            KeySource::Inline(jwks) => jwks.len(),
            other => panic!("expected Inline, got {other:?}"),
        }
    }

    #[test]
    fn inline_jwks_wins_over_uri() {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let base = serve(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            Reply::Status(200, TWO_KEYS.to_string())
        });
        let cfg = config(&format!(
            "  - issuer: iss\n    jwksUri: {base}/jwks\n    jwks: '{ONE_KEY}'\n"
        ));
        let fetched = Fetched::for_config(&cfg);
        assert_eq!(key_count(fetched.keys_for(rule(&cfg, 0))), 1);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "inline keys must not be fetched"
        );
    }

    #[test]
    fn fetched_keys_are_inline_and_fetched_once_per_uri() {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let base = serve(move |path, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            match path {
                "/jwks" => Reply::Status(200, TWO_KEYS.to_string()),
                _ => Reply::Status(404, String::new()),
            }
        });
        let cfg = config(&format!(
            "  - issuer: a\n    jwksUri: {base}/jwks\n  - issuer: b\n    jwksUri: {base}/jwks\n"
        ));
        let fetched = Fetched::for_config(&cfg);
        assert_eq!(key_count(fetched.keys_for(rule(&cfg, 0))), 2);
        assert_eq!(key_count(fetched.keys_for(rule(&cfg, 1))), 2);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn not_found_is_unavailable_with_status() {
        let base = serve(|_, _| Reply::Status(404, "nope".to_string()));
        let reason = unavailable_reason(keys_of(&format!(
            "  - issuer: iss\n    jwksUri: {base}/missing\n"
        )));
        assert!(reason.contains("404"), "{reason}");
        assert!(reason.contains(&format!("{base}/missing")), "{reason}");
    }

    #[test]
    fn redirect_is_not_followed() {
        let base = serve(|_, _| Reply::Status(302, String::new()));
        let reason = unavailable_reason(keys_of(&format!(
            "  - issuer: iss\n    jwksUri: {base}/jwks\n"
        )));
        assert!(
            reason.contains("302") && reason.contains("redirect"),
            "{reason}"
        );
    }

    #[test]
    fn non_jwks_body_is_unavailable() {
        let base = serve(|path, _| match path {
            "/html" => Reply::Status(200, "<html>hello</html>".to_string()),
            _ => Reply::Status(200, r#"{"issuer": "iss"}"#.to_string()),
        });
        for path in ["/html", "/object"] {
            let reason = unavailable_reason(keys_of(&format!(
                "  - issuer: iss\n    jwksUri: {base}{path}\n"
            )));
            assert!(reason.contains("not a usable JWKS"), "{reason}");
        }
    }

    #[test]
    fn oversized_body_is_unavailable() {
        let base = serve(|_, _| Reply::Status(200, " ".repeat(MAX_BODY_BYTES + 1)));
        let reason = unavailable_reason(keys_of(&format!(
            "  - issuer: iss\n    jwksUri: {base}/jwks\n"
        )));
        assert!(reason.contains("exceeds"), "{reason}");
    }

    #[test]
    fn silent_server_times_out_within_rule_timeout() {
        let base = serve(|_, _| Reply::Silent);
        let started = Instant::now();
        let reason = unavailable_reason(keys_of(&format!(
            "  - issuer: iss\n    jwksUri: {base}/jwks\n    timeout: 200ms\n"
        )));
        let elapsed = started.elapsed();
        assert!(reason.contains("timed out after 200ms"), "{reason}");
        assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    }

    #[test]
    fn oidc_discovery_finds_the_jwks() {
        let base = serve(|path, base| match path {
            "/.well-known/openid-configuration" => {
                Reply::Status(200, format!(r#"{{"jwks_uri": "{base}/keys"}}"#))
            }
            "/keys" => Reply::Status(200, ONE_KEY.to_string()),
            _ => Reply::Status(404, String::new()),
        });
        // The trailing slash must not produce `//.well-known`.
        assert_eq!(key_count(keys_of(&format!("  - issuer: {base}/\n"))), 1);
    }

    #[test]
    fn oidc_discovery_without_jwks_uri_is_unavailable() {
        let base = serve(|_, _| Reply::Status(200, r#"{"issuer": "x"}"#.to_string()));
        let reason = unavailable_reason(keys_of(&format!("  - issuer: {base}\n")));
        assert!(reason.contains("OIDC discovery failed"), "{reason}");
        assert!(reason.contains("jwks_uri"), "{reason}");
    }

    #[test]
    fn oidc_discovery_cannot_point_at_metadata() {
        let base = serve(|_, _| {
            Reply::Status(200, r#"{"jwks_uri": "http://169.254.169.254/keys"}"#.into())
        });
        let reason = unavailable_reason(keys_of(&format!("  - issuer: {base}\n")));
        assert!(reason.contains("refused"), "{reason}");
    }

    #[test]
    fn link_local_and_metadata_targets_are_refused() {
        // Each of these is refused before connecting: the guard runs on the literal address
        // or the host name, and a connection attempt would surface a different reason.
        let cases = [
            ("http://169.254.169.254/jwks", "cloud metadata"),
            ("http://169.254.10.1/jwks", "link-local"),
            ("http://[fe80::1]/jwks", "link-local"),
            ("http://[::ffff:169.254.1.1]/jwks", "link-local"),
            ("http://[fd00:ec2::254]/jwks", "cloud metadata"),
            ("https://metadata.google.internal/jwks", "cloud metadata"),
        ];
        for (uri, kind) in cases {
            let started = Instant::now();
            let reason = unavailable_reason(keys_of(&format!(
                "  - issuer: iss\n    jwksUri: {uri}\n    timeout: 30s\n"
            )));
            assert!(
                reason.contains("refused") && reason.contains(kind),
                "{reason}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }

    #[test]
    fn https_to_a_plain_http_server_fails_closed() {
        let base = serve(|_, _| Reply::Status(200, ONE_KEY.to_string()));
        let https = base.replacen("http://", "https://", 1);
        let reason = unavailable_reason(keys_of(&format!(
            "  - issuer: iss\n    jwksUri: {https}/jwks\n    timeout: 2s\n"
        )));
        // Which one depends on whether the machine has a system trust store.
        assert!(
            reason.contains("TLS handshake") || reason.contains("root certificates"),
            "{reason}"
        );
    }

    #[test]
    fn unsupported_scheme_is_unavailable() {
        let reason = unavailable_reason(keys_of(
            "  - issuer: iss\n    jwksUri: file:///etc/jwks.json\n",
        ));
        assert!(reason.contains("scheme"), "{reason}");
    }

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_go_duration("5s"), Some(ms(5000)));
        assert_eq!(parse_go_duration("500ms"), Some(ms(500)));
        assert_eq!(parse_go_duration("1m"), Some(ms(60_000)));
        assert_eq!(parse_go_duration("1h2m3.5s"), Some(ms(3_723_500)));
        assert_eq!(parse_go_duration("1.5s"), Some(ms(1500)));
        assert_eq!(parse_go_duration("250µs"), Some(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        for bad in ["", "5", "-1s", "s", "1x", ".s", "1.2.3s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }
}
