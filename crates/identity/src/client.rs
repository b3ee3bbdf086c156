//! The workload side of the CA service: keeps one workload's certificate fresh.
//!
//! [`CertClient`] generates a new key in memory for every certificate (the key never leaves the
//! process), sends a CSR for its SPIFFE ID to the CA over TLS — with its bootstrap token the
//! first time, with its current certificate afterwards — and publishes each new [`Svid`] and
//! [`TrustBundle`] on `tokio::sync::watch` channels, from which the TLS layer swaps them in
//! without restarting listeners. It renews at about half the lifetime (±10 % jitter, so that a
//! fleet started together does not renew together), backs off exponentially while the CA is
//! unreachable, keeps using the current certificate until it expires, and then reports
//! [`IdentityStatus::Expired`] so that callers fail closed.
//!
//! Time comes from a [`Clock`], so tests can drive the whole life cycle with tokio's paused
//! clock ([`TokioClock`]) instead of waiting.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};
use crate::service::{ca_identity, leaf_info, parse_pem_certs};
use crate::spiffe::{SpiffeId, SpiffeIdError};
use crate::svid::{Svid, TrustBundle};

/// Upper bound on one sleep, so that a wall-clock jump (suspend, NTP step) is noticed within
/// this long rather than after a whole half-lifetime.
const MAX_SLEEP: Duration = Duration::from_secs(300);

/// Wall-clock time, behind a trait so tests can move it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Wall-clock time that follows tokio's clock from the moment it is made, so that
/// `tokio::time::pause()`/`advance()` (and the paused clock's auto-advance) move it. For tests.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        TokioClock {
            base: SystemTime::now(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

/// Gives rustls the same time as the rest of the CA client and service, so certificate validity
/// is judged by one clock.
pub(crate) struct ClockTime(pub Arc<dyn Clock>);

impl fmt::Debug for ClockTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClockTime")
    }
}

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(
            self.0.now().duration_since(UNIX_EPOCH).ok()?,
        ))
    }
}

/// Why a certificate could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the CA at {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("the CA refused ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("unusable answer from the CA: {0}")]
    BadResponse(String),
    #[error(
        "no credentials: the certificate is expired or missing and there is no bootstrap token"
    )]
    NoCredentials,
    #[error("bootstrap token file {}: {source}", path.display())]
    TokenFile { path: PathBuf, source: io::Error },
    #[error("cannot make a key and CSR: {0}")]
    Csr(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

impl ClientError {
    /// The gRPC status code, when the CA answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How the client proves who it is to the CA.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    None,
    /// Its current certificate (renewal).
    Svid(&'a Svid),
    /// A bootstrap token.
    Token(&'a str),
}

/// Where the CA service is and who it must be.
#[derive(Clone)]
pub struct CaEndpoint {
    /// `host:port`.
    pub addr: String,
    /// The SPIFFE ID the CA's certificate must carry (secure naming).
    pub ca_id: SpiffeId,
    /// Bound on connecting and on each call: a hung CA is a failed attempt, not a hang.
    pub timeout: Duration,
    pub clock: Arc<dyn Clock>,
}

impl CaEndpoint {
    /// The CA of trust domain `td` at `addr`, with Warden's CA identity and a 10 s timeout.
    pub fn new(addr: impl Into<String>, td: &str) -> Result<Self, SpiffeIdError> {
        Ok(CaEndpoint {
            addr: addr.into(),
            ca_id: ca_identity(td)?,
            timeout: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
        })
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// A gRPC channel to the CA over TLS: the CA's chain must verify against `bundle` and carry
    /// `ca_id`; `cert`, if given, is presented as the client certificate.
    pub async fn connect(
        &self,
        bundle: &TrustBundle,
        cert: Option<&Svid>,
    ) -> Result<Channel, ClientError> {
        let config = Arc::new(self.tls_config(bundle, cert)?);
        let connect_err = |msg: String| ClientError::Connect {
            addr: self.addr.clone(),
            msg,
        };
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        // Only the SNI is derived from the address; the name that is checked is the SPIFFE ID.
        let server_name =
            ServerName::try_from(host).map_err(|e| connect_err(format!("bad address: {e}")))?;
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| connect_err(format!("bad address: {e}")))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        let addr = self.addr.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let (addr, config, server_name) = (addr.clone(), config.clone(), server_name.clone());
            async move {
                let tcp = TcpStream::connect(addr.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(server_name, tcp)
                    .await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| connect_err(error_chain(&e)))
    }

    /// One `CreateCertificate` call on a fresh connection.
    pub async fn create_certificate(
        &self,
        bundle: &TrustBundle,
        cred: Credential<'_>,
        req: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, ClientError> {
        let cert = match cred {
            Credential::Svid(s) => Some(s),
            _ => None,
        };
        let channel = self.connect(bundle, cert).await?;
        let mut request = tonic::Request::new(req);
        if let Credential::Token(t) = cred {
            let value = format!("Bearer {}", t.trim())
                .parse()
                .map_err(|_| ClientError::BadResponse("token is not ASCII".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| {
                // A refused client certificate surfaces as a bare "transport error" status;
                // the TLS alert that says why is in its sources.
                let mut message = s.message().to_string();
                if let Some(src) = std::error::Error::source(&s) {
                    let chain = error_chain(src);
                    message = if chain.starts_with(&message) {
                        chain
                    } else {
                        format!("{message}: {chain}")
                    };
                }
                ClientError::Refused {
                    code: s.code(),
                    message,
                }
            })
    }

    fn tls_config(
        &self,
        bundle: &TrustBundle,
        cert: Option<&Svid>,
    ) -> Result<ClientConfig, ClientError> {
        let tls = |e: rustls::Error| ClientError::Tls(e.to_string());
        let mut roots = RootCertStore::empty();
        for r in &bundle.roots_der {
            roots.add(CertificateDer::from(r.clone())).map_err(tls)?;
        }
        if roots.is_empty() {
            return Err(ClientError::Tls("the trust bundle has no root".into()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(CaServerVerifier {
            roots: Arc::new(roots),
            expected: self.ca_id.clone(),
            provider: provider.clone(),
        });
        let builder =
            ClientConfig::builder_with_details(provider, Arc::new(ClockTime(self.clock.clone())))
                .with_safe_default_protocol_versions()
                .map_err(tls)?
                .dangerous()
                .with_custom_certificate_verifier(verifier);
        let mut config = match cert {
            Some(s) => builder
                .with_client_auth_cert(
                    s.cert_chain_der
                        .iter()
                        .map(|c| CertificateDer::from(c.clone()))
                        .collect(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(s.key_pkcs8_der.clone())),
                )
                .map_err(tls)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// Verifies the CA's certificate by chain and SPIFFE ID; the DNS name or IP the client dialled
/// is not part of the CA's identity.
#[derive(Debug)]
struct CaServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CaServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let info = leaf_info(end_entity)
            .map_err(|e| rustls::Error::General(format!("CA certificate: {e}")))?;
        if info.is_ca || info.id != self.expected {
            return Err(rustls::Error::General(format!(
                "the server is {}, not the CA {}",
                info.id, self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A P-256 key (PKCS#8 DER) and a PEM CSR whose only name is `id`.
/// A fresh P-256 key and a CSR (PEM) for `id`.
pub(crate) fn generate_key_and_csr(id: &SpiffeId) -> Result<(Vec<u8>, String), String> {
    generate_key_and_csr_with(id, crate::ca::KeyAlg::EcP256)
}

/// A fresh key of the given type, generated in this process's memory, and a CSR (PEM) for `id`.
pub(crate) fn generate_key_and_csr_with(
    id: &SpiffeId,
    alg: crate::ca::KeyAlg,
) -> Result<(Vec<u8>, String), String> {
    let (key, csr_der) = crate::csr::generate_csr(id, alg).map_err(|e| e.to_string())?;
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr_der));
    Ok((key, pem))
}

/// Where the client gets a bootstrap token when it has no valid certificate.
#[derive(Clone, Default)]
pub enum Bootstrap {
    /// Renewal only.
    #[default]
    None,
    Token(String),
    /// Read at each use, so an operator can drop in a fresh token after a long outage.
    TokenFile(PathBuf),
}

impl fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bootstrap::None => f.write_str("None"),
            Bootstrap::Token(_) => f.write_str("Token(<redacted>)"),
            Bootstrap::TokenFile(p) => f.debug_tuple("TokenFile").field(p).finish(),
        }
    }
}

impl Bootstrap {
    fn token(&self) -> Result<Option<String>, ClientError> {
        match self {
            Bootstrap::None => Ok(None),
            Bootstrap::Token(t) => Ok(Some(t.trim().to_string())),
            Bootstrap::TokenFile(path) => match std::fs::read_to_string(path) {
                Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(ClientError::TokenFile {
                    path: path.clone(),
                    source,
                }),
            },
        }
    }
}

/// Configuration of a [`CertClient`].
#[derive(Clone)]
pub struct CertClientConfig {
    /// The identity to keep a certificate for.
    pub id: SpiffeId,
    pub ca: CaEndpoint,
    /// Roots to trust the CA with until the CA sends its own bundle.
    pub bundle: TrustBundle,
    pub bootstrap: Bootstrap,
    /// Lifetime to ask for (`None`: the CA's default).
    pub requested_ttl: Option<Duration>,
    /// Key type generated for each certificate (P-256 unless RSA is asked for).
    pub key_alg: crate::ca::KeyAlg,
    /// First retry delay after a failure; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl CertClientConfig {
    pub fn new(id: SpiffeId, ca: CaEndpoint, bundle: TrustBundle, bootstrap: Bootstrap) -> Self {
        CertClientConfig {
            id,
            ca,
            bundle,
            bootstrap,
            requested_ttl: None,
            key_alg: crate::ca::KeyAlg::EcP256,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Whether the workload has a certificate it may use.
#[derive(Debug, Clone)]
pub enum IdentityStatus {
    /// No certificate yet.
    Pending,
    Ready(Svid),
    /// The last certificate expired and no new one could be had: connections must be refused.
    Expired {
        id: SpiffeId,
        not_after: SystemTime,
        last_error: String,
    },
}

impl IdentityStatus {
    pub fn svid(&self) -> Option<&Svid> {
        match self {
            IdentityStatus::Ready(s) => Some(s),
            _ => None,
        }
    }
}

/// Counters for logs, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub attempts: u64,
    pub successes: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// When the next attempt is due.
    pub next_attempt: Option<SystemTime>,
}

/// Keeps one workload's certificate fresh; see the module documentation.
pub struct CertClient {
    cfg: CertClientConfig,
    status: watch::Sender<IdentityStatus>,
    bundle: watch::Sender<TrustBundle>,
    stats: watch::Sender<ClientStats>,
}

/// A spawned [`CertClient`]; dropping it stops the client.
pub struct CertClientHandle {
    pub status: watch::Receiver<IdentityStatus>,
    pub bundle: watch::Receiver<TrustBundle>,
    pub stats: watch::Receiver<ClientStats>,
    task: JoinHandle<()>,
}

impl Drop for CertClientHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CertClient {
    pub fn new(cfg: CertClientConfig) -> Self {
        let bundle = cfg.bundle.clone();
        CertClient {
            cfg,
            status: watch::Sender::new(IdentityStatus::Pending),
            bundle: watch::Sender::new(bundle),
            stats: watch::Sender::new(ClientStats::default()),
        }
    }

    pub fn status(&self) -> watch::Receiver<IdentityStatus> {
        self.status.subscribe()
    }

    pub fn bundle(&self) -> watch::Receiver<TrustBundle> {
        self.bundle.subscribe()
    }

    pub fn stats(&self) -> watch::Receiver<ClientStats> {
        self.stats.subscribe()
    }

    /// Runs the client on the current tokio runtime.
    pub fn spawn(self) -> CertClientHandle {
        CertClientHandle {
            status: self.status(),
            bundle: self.bundle(),
            stats: self.stats(),
            task: tokio::spawn(self.run()),
        }
    }

    /// One fetch: a new key, a CSR, a call authenticated by `current` if it is still valid and
    /// by the bootstrap token otherwise. The answer is checked before it is returned: the leaf
    /// must name this workload, hold the new key, and chain to the returned roots.
    pub async fn fetch(&self, current: Option<&Svid>) -> Result<(Svid, TrustBundle), ClientError> {
        let now = self.cfg.ca.clock.now();
        let current = current.filter(|s| s.not_before <= now && now < s.not_after);
        let token = match current {
            Some(_) => None,
            None => Some(
                self.cfg
                    .bootstrap
                    .token()?
                    .ok_or(ClientError::NoCredentials)?,
            ),
        };
        let cred = match (current, &token) {
            (Some(s), _) => Credential::Svid(s),
            (None, Some(t)) => Credential::Token(t),
            (None, None) => Credential::None,
        };
        let bundle = self.bundle.borrow().clone();
        let (key, csr) =
            generate_key_and_csr_with(&self.cfg.id, self.cfg.key_alg).map_err(ClientError::Csr)?;
        let req = IstioCertificateRequest {
            csr,
            validity_duration: self
                .cfg
                .requested_ttl
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            metadata: None,
        };
        let resp = self.cfg.ca.create_certificate(&bundle, cred, req).await?;
        accept_response(resp, &self.cfg.id, key, &bundle, self.cfg.ca.clock.now())
    }

    /// Fetches, renews and reports forever. Spawn it, or use [`CertClient::spawn`].
    pub async fn run(self) {
        let clock = self.cfg.ca.clock.clone();
        let mut current: Option<Svid> = None;
        let mut next_attempt = clock.now();
        let mut failures: u32 = 0;
        let mut last_error = String::new();
        loop {
            let now = clock.now();
            if let Some(s) = current.as_ref().filter(|s| now >= s.not_after) {
                tracing::error!(id = %s.id, error = %last_error, "certificate expired: failing closed");
                self.status.send_replace(IdentityStatus::Expired {
                    id: s.id.clone(),
                    not_after: s.not_after,
                    last_error: last_error.clone(),
                });
                current = None;
            }
            if now < next_attempt {
                let mut wake = next_attempt;
                if let Some(s) = &current {
                    wake = wake.min(s.not_after);
                }
                let wait = wake.duration_since(now).unwrap_or_default().min(MAX_SLEEP);
                tokio::time::sleep(wait).await;
                continue;
            }

            let result = self.fetch(current.as_ref()).await;
            let now = clock.now();
            match result {
                Ok((svid, bundle)) => {
                    failures = 0;
                    last_error.clear();
                    // Never sooner than a backoff step, so that a CA handing out very short or
                    // skewed certificates cannot make us spin.
                    let renew_at = renewal_time(
                        svid.not_before,
                        svid.not_after,
                        now,
                        0.45 + 0.1 * random_unit(),
                    );
                    next_attempt = renew_at.max(now + self.cfg.backoff_initial);
                    tracing::info!(
                        id = %svid.id,
                        not_after = %crate::inspect::rfc3339(svid.not_after),
                        renew_at = %crate::inspect::rfc3339(next_attempt),
                        "new certificate"
                    );
                    self.bundle.send_if_modified(|b| {
                        let changed = *b != bundle;
                        if changed {
                            tracing::info!(roots = bundle.roots_der.len(), "trust bundle updated");
                            *b = bundle;
                        }
                        changed
                    });
                    current = Some(svid.clone());
                    self.status.send_replace(IdentityStatus::Ready(svid));
                    self.stats.send_modify(|s| {
                        s.attempts += 1;
                        s.successes += 1;
                        s.consecutive_failures = 0;
                        s.last_error = None;
                        s.next_attempt = Some(next_attempt);
                    });
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    last_error = e.to_string();
                    let delay = backoff(self.cfg.backoff_initial, self.cfg.backoff_max, failures);
                    next_attempt = now + delay;
                    tracing::warn!(
                        id = %self.cfg.id,
                        error = %last_error,
                        retry_in = ?delay,
                        still_valid = current.is_some(),
                        "certificate fetch failed"
                    );
                    self.stats.send_modify(|s| {
                        s.attempts += 1;
                        s.consecutive_failures = failures;
                        s.last_error = Some(last_error.clone());
                        s.next_attempt = Some(next_attempt);
                    });
                }
            }
        }
    }
}

/// When to renew a certificate received at `now`: at `fraction` of the lifetime left from
/// when it became usable. CAs back-date `not_before` (Warden's by 5 minutes, for clock skew),
/// so measuring from `not_before` would put a short certificate's renewal in the past the
/// moment it arrives, and the client would renew it in a loop.
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    fraction: f64,
) -> SystemTime {
    let start = not_before.max(now);
    let usable = not_after.duration_since(start).unwrap_or_default();
    start + usable.mul_f64(fraction)
}

/// `initial` doubled per consecutive failure up to `max`, less up to 20 % jitter so that
/// clients cut off together do not come back together, and never above `max`.
pub fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let d = initial.saturating_mul(1u32 << doublings).min(max);
    d.mul_f64(1.0 - 0.2 * random_unit())
}

/// Uniform in [0, 1).
fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    // Jitter only spreads load; if the generator failed, no jitter is still correct.
    let _ = aws_lc_rs::rand::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Splits Istio's response into chain and roots (both layouts: with `root_cert`, or with every
/// root in the last `cert_chain` entry) and checks it before anything is handed to TLS.
fn accept_response(
    resp: IstioCertificateResponse,
    id: &SpiffeId,
    key_pkcs8_der: Vec<u8>,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<(Svid, TrustBundle), ClientError> {
    let bad = ClientError::BadResponse;
    let mut entries = resp.cert_chain;
    if entries.is_empty() {
        return Err(bad("empty certificate chain".into()));
    }
    let root_entries = match resp.root_cert {
        Some(r) if !r.ca_cert.is_empty() => r.ca_cert,
        _ if entries.len() >= 2 => entries.split_off(entries.len() - 1),
        _ => Vec::new(),
    };
    let roots = parse_pem_certs(&root_entries).map_err(bad)?;
    let chain: Vec<CertificateDer<'static>> = parse_pem_certs(&entries)
        .map_err(bad)?
        .into_iter()
        .filter(|c| !roots.contains(c))
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| bad("no leaf certificate".into()))?;
    let info = leaf_info(leaf).map_err(|e| bad(format!("leaf: {e}")))?;
    if info.id != *id {
        return Err(bad(format!("the certificate is for {}, not {id}", info.id)));
    }
    if info.is_ca {
        return Err(bad("the leaf is a CA certificate".into()));
    }
    let key = rcgen::KeyPair::try_from(key_pkcs8_der.as_slice())
        .map_err(|e| bad(format!("own key: {e}")))?;
    if info.spki != rcgen::PublicKeyData::subject_public_key_info(&key) {
        return Err(bad(
            "the certificate is not for the key this client sent".into()
        ));
    }
    // A response may add roots (rotation) but never replace every root the client trusts:
    // otherwise whoever answered could install its own trust anchors in the workload.
    if !roots.is_empty()
        && !bundle.roots_der.is_empty()
        && !roots
            .iter()
            .any(|r| bundle.roots_der.iter().any(|b| b.as_slice() == r.as_ref()))
    {
        return Err(bad(
            "the response's roots share none with the current trust bundle; refusing to replace them".into(),
        ));
    }
    let new_bundle = if roots.is_empty() {
        bundle.clone()
    } else {
        TrustBundle {
            trust_domain: id.trust_domain().to_string(),
            roots_der: roots.iter().map(|r| r.to_vec()).collect(),
        }
    };
    // The chain must verify against the roots we are about to trust, or peers will reject it.
    let mut store = RootCertStore::empty();
    for r in &new_bundle.roots_der {
        store
            .add(CertificateDer::from(r.clone()))
            .map_err(|e| bad(format!("root: {e}")))?;
    }
    let parsed =
        rustls::server::ParsedCertificate::try_from(leaf).map_err(|e| bad(format!("leaf: {e}")))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let unix_now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        &chain[1..],
        unix_now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| bad(format!("the chain does not verify against the bundle: {e}")))?;

    let svid = Svid {
        id: id.clone(),
        cert_chain_der: chain.iter().map(|c| c.to_vec()).collect(),
        key_pkcs8_der,
        not_before: info.not_before,
        not_after: info.not_after,
    };
    Ok((svid, new_bundle))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        src = inner.source();
    }
    s
}

/// Keeps a TLS identity state current from a running certificate client, for as long as the
/// client runs: bundle changes and new certificates take effect for the next handshake (open
/// connections are untouched, listeners are not restarted); on expiry the certificate is
/// withdrawn so handshakes fail closed. The bundle is applied before the certificate, so a
/// certificate from a new root is never served before that root is trusted.
pub async fn drive_identity_state(
    mut handle: CertClientHandle,
    state: Arc<crate::tls::IdentityState>,
) {
    let mut first = true;
    loop {
        if std::mem::take(&mut first) || handle.bundle.has_changed().unwrap_or(false) {
            let bundle = handle.bundle.borrow_and_update().clone();
            if !bundle.roots_der.is_empty() {
                if let Err(e) = state.update_bundle(bundle) {
                    tracing::warn!("trust bundle refused, keeping the previous one: {e}");
                }
            }
        }
        let status = handle.status.borrow_and_update().clone();
        match status {
            IdentityStatus::Ready(svid) => {
                if let Err(e) = state.update_svid(svid) {
                    tracing::warn!("new certificate refused, keeping the previous one: {e}");
                }
            }
            IdentityStatus::Expired { id, last_error, .. } => {
                tracing::error!("certificate for {id} expired and could not be renewed ({last_error}): refusing connections");
                state.clear_svid();
            }
            IdentityStatus::Pending => {}
        }
        tokio::select! {
            r = handle.status.changed() => if r.is_err() { return },
            r = handle.bundle.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    /// Regression: a 1-minute certificate back-dated 5 minutes was renewed at once, again and
    /// again (its half-life measured from `not_before` had already passed on arrival).
    fn renewal_is_measured_from_arrival_for_back_dated_certificates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_before = now - Duration::from_secs(300);
        let not_after = now + Duration::from_secs(60);
        let at = renewal_time(not_before, not_after, now, 0.5);
        assert_eq!(at, now + Duration::from_secs(30));
        // A certificate that is not yet valid counts from its not_before.
        let later = now + Duration::from_secs(100);
        let at = renewal_time(later, later + Duration::from_secs(100), now, 0.5);
        assert_eq!(at, later + Duration::from_secs(50));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        for (n, full) in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (40, 60)] {
            for _ in 0..50 {
                let d = backoff(i, m, n);
                let full = Duration::from_secs(full);
                assert!(d <= full && d >= full.mul_f64(0.8), "failure {n}: {d:?}");
            }
        }
    }

    /// Review finding: a response signed under roots the client does not trust must not
    /// replace its trust bundle.
    #[test]
    fn responses_cannot_replace_the_trust_bundle() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let base = std::env::temp_dir().join(format!(
            "warden-client-bundle-{}-{nanos}",
            std::process::id()
        ));
        let ours = crate::ca::Ca::init(
            &base.join("ours"),
            "cluster.local",
            crate::ca::KeyAlg::EcP256,
        )
        .unwrap();
        let rogue = crate::ca::Ca::init(
            &base.join("rogue"),
            "cluster.local",
            crate::ca::KeyAlg::EcP256,
        )
        .unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        let response = |ca: &crate::ca::Ca| {
            let (key, csr) = generate_key_and_csr(&id).unwrap();
            let issued = ca
                .sign_csr(csr.as_bytes(), &id, None, SystemTime::now())
                .unwrap();
            let mut chain = issued.cert_chain_pem.clone();
            chain.push(issued.root_bundle_pem.concat());
            (
                key,
                IstioCertificateResponse {
                    cert_chain: chain,
                    ..Default::default()
                },
            )
        };
        let (key, resp) = response(&rogue);
        let err = accept_response(resp, &id, key, &ours.bundle(), SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("share none"), "{err}");
        let (key, resp) = response(&ours);
        let (svid, bundle) =
            accept_response(resp, &id, key, &ours.bundle(), SystemTime::now()).unwrap();
        assert_eq!(svid.id, id);
        assert_eq!(bundle.roots_der, ours.bundle().roots_der);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn csr_names_only_the_spiffe_id() {
        let id = SpiffeId::new("cluster.local", "ns1", "sa1").unwrap();
        let (_key, pem) = generate_key_and_csr_with(&id, crate::ca::KeyAlg::Rsa2048).unwrap();
        assert_eq!(crate::service::csr_identity(&pem).unwrap(), id);
    }
}
