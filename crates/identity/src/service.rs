//! The CA service: Istio's `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS.
//!
//! It owns caller authentication and entitlement, not signing: a caller is entitled to exactly
//! one identity, proven either by its current certificate (mutual TLS, renewal of that same
//! identity) or by a bootstrap token bound to that identity, and the CSR must ask for exactly
//! that identity. Signing is delegated to a [`CertSigner`], so the service does not depend on how
//! the CA keeps its keys.
//!
//! The server presents its own SVID, `spiffe://<td>/ns/warden-system/sa/warden-ca`, issued by the
//! signer at startup and renewed at half its lifetime; clients check that SPIFFE ID against their
//! trust bundle (secure naming), not a DNS name. That identity is therefore never issued to a
//! caller, whether by bootstrap token or by renewal.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::client::{ClockTime, SystemClock};
use crate::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};
use crate::spiffe::{SpiffeId, SpiffeIdError};
use crate::token::{TokenError, TokenStore};

pub use crate::client::Clock;

/// The gRPC path of the one method, as Istio's clients call it.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Namespace and service account of the CA's own identity.
pub const CA_NAMESPACE: &str = "warden-system";
pub const CA_SERVICE_ACCOUNT: &str = "warden-ca";

/// A CSR plus its PEM framing never comes near this; anything bigger is refused before decoding.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long `shutdown` lets requests in flight finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often a failed renewal of the server's own certificate is retried.
const SERVER_CERT_RETRY: Duration = Duration::from_secs(60);
/// Upper bound on one sleep of the renewal task, so that a wall-clock jump (suspend, NTP step)
/// is noticed within this long.
const MAX_SLEEP: Duration = Duration::from_secs(300);

/// Signs CSRs for the service. The CA implements it; tests use their own.
pub trait CertSigner: Send + Sync + 'static {
    /// Signs `csr_pem` for `entitled` (the service has already checked that the CSR's signature
    /// is valid and that it asks for exactly `entitled`). `ttl` is the caller's requested
    /// lifetime, if any; the signer clamps it to its own maximum. Returns the chain as PEM, leaf
    /// first, and every currently trusted root as PEM.
    fn sign(
        &self,
        csr_pem: &[u8],
        entitled: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<(Vec<String>, Vec<String>), String>;

    /// The trust domain this CA issues for.
    fn trust_domain(&self) -> String;
}

/// The CA's own SPIFFE ID in trust domain `td`.
pub fn ca_identity(td: &str) -> Result<SpiffeId, SpiffeIdError> {
    SpiffeId::new(td, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("the CA's trust domain: {0}")]
    TrustDomain(#[from] SpiffeIdError),
    #[error("cannot issue the CA service's own certificate: {0}")]
    ServerCert(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("listener: {0}")]
    Io(#[from] io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What the TLS layer learned about a connection, handed to every request on it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The client's certificate chain, leaf first, already verified against the bundle by the
    /// handshake; `None` when the client sent none.
    pub client_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// The workload identity of a client whose chain the handshake verified: the leaf's one
/// SPIFFE ID, refused for a CA certificate or once the leaf has expired (a connection can
/// outlive its certificate, so services check again for each request).
pub fn client_identity(
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<SpiffeId, String> {
    let leaf = chain.first().ok_or("empty client certificate chain")?;
    let info = leaf_info(leaf).map_err(|e| format!("client certificate: {e}"))?;
    if info.is_ca {
        return Err("client certificate is a CA certificate, not a workload certificate".into());
    }
    if now >= info.not_after {
        return Err(format!("client certificate of {} has expired", info.id));
    }
    Ok(info.id)
}

/// Options of [`CaServer::start`].
#[derive(Clone)]
pub struct CaServerOptions {
    /// Bootstrap tokens; `None` accepts only renewals.
    pub tokens: Option<Arc<TokenStore>>,
    /// The time used for certificate validity and token expiry.
    pub clock: Arc<dyn Clock>,
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Lifetime requested for the server's own certificate (`None`: the signer's default).
    pub server_cert_ttl: Option<Duration>,
}

impl Default for CaServerOptions {
    fn default() -> Self {
        CaServerOptions {
            tokens: None,
            clock: Arc::new(SystemClock),
            handshake_timeout: Duration::from_secs(10),
            server_cert_ttl: None,
        }
    }
}

/// A running CA service.
pub struct CaServer {
    local_addr: SocketAddr,
    reload: Arc<Notify>,
    shutdown: Option<oneshot::Sender<()>>,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    accept: JoinHandle<()>,
    renew: JoinHandle<()>,
}

impl CaServer {
    /// Issues the server's certificate, then serves on `listener` until [`CaServer::shutdown`].
    pub async fn start<S: CertSigner>(
        listener: TcpListener,
        signer: Arc<S>,
        opts: CaServerOptions,
    ) -> Result<CaServer, ServiceError> {
        Self::start_with(listener, signer, opts, tonic::service::Routes::default()).await
    }

    /// [`CaServer::start`], also serving `extra` gRPC services on the same TLS port (the
    /// control plane's configuration stream, as istiod serves xDS beside its CA). Requests of
    /// every service carry the connection's [`PeerInfo`] in their extensions.
    pub async fn start_with<S: CertSigner>(
        listener: TcpListener,
        signer: Arc<S>,
        opts: CaServerOptions,
        extra: tonic::service::Routes,
    ) -> Result<CaServer, ServiceError> {
        let local_addr = listener.local_addr()?;
        let td = signer.trust_domain();
        ca_identity(&td)?;
        let (config, renew_at) = server_config(signer.as_ref(), &opts)?;
        let config = Arc::new(RwLock::new(config));
        let reload = Arc::new(Notify::new());

        let renew = tokio::spawn(renew_server_cert(
            signer.clone(),
            opts.clone(),
            config.clone(),
            reload.clone(),
            renew_at,
        ));

        let (conn_tx, conn_rx) = mpsc::channel::<io::Result<TlsConn>>(64);
        let accept = tokio::spawn(accept_loop(
            listener,
            config,
            opts.handshake_timeout,
            conn_tx,
        ));

        let service = CaService {
            signer,
            tokens: opts.tokens.clone(),
            clock: opts.clock.clone(),
            trust_domain: td,
        };
        let svc = IstioCertificateServiceServer::new(service)
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let serve = tokio::spawn(
            tonic::transport::Server::builder()
                .timeout(Duration::from_secs(30))
                // Streams of idle proxies must not look dead to load balancers or NAT; pings
                // also find peers that vanished without closing their connection.
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_routes(extra)
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(conn_rx),
                    async {
                        let _ = shutdown_rx.await;
                    },
                ),
        );
        tracing::info!(%local_addr, "CA service listening");
        Ok(CaServer {
            local_addr,
            reload,
            shutdown: Some(shutdown_tx),
            serve,
            accept,
            renew,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Re-issues the server's certificate and reloads the trusted roots now, e.g. after a root
    /// rotation. Connections already open keep their certificate.
    pub fn reload_certificate(&self) {
        self.reload.notify_one();
    }

    /// Stops accepting, closes the listener, lets requests in flight finish (for at most 10 s).
    pub async fn shutdown(mut self) -> Result<(), ServiceError> {
        self.accept.abort();
        // Wait for the accept task to be dropped: that closes the listening socket, so the
        // port is free again when this returns.
        let _ = (&mut self.accept).await;
        self.renew.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // A client that keeps its connection open must not hold the shutdown up forever.
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.serve).await {
            Ok(Ok(r)) => r.map_err(ServiceError::from),
            Ok(Err(e)) if e.is_cancelled() => Ok(()),
            Ok(Err(e)) => Err(ServiceError::Tls(format!("server task failed: {e}"))),
            Err(_) => {
                self.serve.abort();
                tracing::warn!("CA service: connections still open after the grace period, closed");
                Ok(())
            }
        }
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.renew.abort();
        self.serve.abort();
    }
}

/// TLS handshakes run in their own tasks so that one slow client does not hold up the others.
async fn accept_loop(
    listener: TcpListener,
    config: Arc<RwLock<Arc<ServerConfig>>>,
    handshake_timeout: Duration,
    conns: mpsc::Sender<io::Result<TlsConn>>,
) {
    loop {
        let (tcp, remote_addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "CA service: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let cfg = config.read().unwrap_or_else(|e| e.into_inner()).clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let client_chain = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .filter(|c| !c.is_empty())
                        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
                    let info = PeerInfo {
                        remote_addr,
                        client_chain,
                    };
                    let _ = conns.send(Ok(TlsConn { io: tls, info })).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(%remote_addr, error = %e, "CA service: TLS handshake refused")
                }
                Err(_) => tracing::info!(%remote_addr, "CA service: TLS handshake timed out"),
            }
        });
    }
}

async fn renew_server_cert<S: CertSigner>(
    signer: Arc<S>,
    opts: CaServerOptions,
    config: Arc<RwLock<Arc<ServerConfig>>>,
    reload: Arc<Notify>,
    mut renew_at: SystemTime,
) {
    loop {
        let now = opts.clock.now();
        let wait = renew_at
            .duration_since(now)
            .unwrap_or_default()
            .min(MAX_SLEEP);
        let forced = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            () = reload.notified() => true,
        };
        if !forced && opts.clock.now() < renew_at {
            continue;
        }
        match server_config(signer.as_ref(), &opts) {
            Ok((cfg, next)) => {
                *config.write().unwrap_or_else(|e| e.into_inner()) = cfg;
                renew_at = next;
                tracing::info!("CA service: renewed its own certificate");
            }
            Err(e) => {
                // Keep serving with the current certificate; clients fail closed once it expires.
                tracing::warn!(error = %e, "CA service: cannot renew its own certificate");
                renew_at = opts.clock.now() + SERVER_CERT_RETRY;
            }
        }
    }
}

/// Issues a fresh server SVID through the signer and builds the TLS configuration around it and
/// the signer's current roots. Returns when to renew it.
fn server_config<S: CertSigner>(
    signer: &S,
    opts: &CaServerOptions,
) -> Result<(Arc<ServerConfig>, SystemTime), ServiceError> {
    let id = ca_identity(&signer.trust_domain())?;
    let (key_der, csr_pem) =
        crate::client::generate_key_and_csr(&id).map_err(ServiceError::ServerCert)?;
    let (chain_pem, roots_pem) = signer
        .sign(csr_pem.as_bytes(), &id, opts.server_cert_ttl)
        .map_err(ServiceError::ServerCert)?;
    let roots = parse_pem_certs(&roots_pem).map_err(ServiceError::ServerCert)?;
    let chain: Vec<CertificateDer<'static>> = parse_pem_certs(&chain_pem)
        .map_err(ServiceError::ServerCert)?
        .into_iter()
        .filter(|c| !roots.contains(c))
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| ServiceError::ServerCert("the signer returned no certificate".into()))?;
    let info = leaf_info(leaf).map_err(ServiceError::ServerCert)?;

    let mut store = RootCertStore::empty();
    for r in &roots {
        store
            .add(r.clone())
            .map_err(|e| ServiceError::Tls(format!("a root from the signer: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // Clients without a certificate are let through the handshake: they may still hold a
    // bootstrap token, which is checked per request. A certificate that is sent must verify.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServiceError::Tls(e.to_string()))?;
    let mut cfg =
        ServerConfig::builder_with_details(provider, Arc::new(ClockTime(opts.clock.clone())))
            .with_safe_default_protocol_versions()
            .map_err(|e| ServiceError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            )
            .map_err(|e| ServiceError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    Ok((Arc::new(cfg), info.not_before + lifetime / 2))
}

struct CaService<S> {
    signer: Arc<S>,
    tokens: Option<Arc<TokenStore>>,
    clock: Arc<dyn Clock>,
    trust_domain: String,
}

/// How the caller proved who it is.
enum Caller {
    Certificate(SpiffeId),
    Token(String, SpiffeId),
}

#[tonic::async_trait]
impl<S: CertSigner> IstioCertificateService for CaService<S> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let remote = peer.as_ref().map(|p| p.remote_addr);
        let result = self.handle(request, peer).await;
        match &result {
            Ok((id, how, _)) => tracing::info!(?remote, %id, via = how, "issued certificate"),
            Err(status) => tracing::warn!(
                ?remote,
                code = ?status.code(),
                reason = status.message(),
                "refused certificate request"
            ),
        }
        result.map(|(_, _, resp)| Response::new(resp))
    }
}

impl<S: CertSigner> CaService<S> {
    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
        peer: Option<PeerInfo>,
    ) -> Result<(SpiffeId, &'static str, IstioCertificateResponse), Status> {
        let token = bearer_token(&request)?;
        let req = request.into_inner();
        let now = self.clock.now();

        // Who is asking comes first: an unauthenticated caller learns nothing about its CSR.
        let caller = match peer.and_then(|p| p.client_chain) {
            Some(chain) => Caller::Certificate(self.certificate_identity(&chain, now)?),
            None => match token {
                Some(t) => {
                    let id = self
                        .with_tokens(t.clone(), move |s, t| s.peek(&t, now))
                        .await?;
                    Caller::Token(t, id)
                }
                None => {
                    return Err(Status::unauthenticated(
                        "no credentials: present a current Warden certificate (mutual TLS) or \
                         an `authorization: Bearer <bootstrap token>` header",
                    ))
                }
            },
        };
        let entitled = match &caller {
            Caller::Certificate(id) | Caller::Token(_, id) => id.clone(),
        };
        // The CA's own identity is what every client checks the CA service against (secure
        // naming): whoever held a certificate for it could impersonate the CA to workloads.
        // The server's own certificate is issued through the signer directly, never here.
        if ca_identity(&self.trust_domain).is_ok_and(|ca| ca == entitled) {
            let how = match caller {
                Caller::Certificate(_) => "renewal with a client certificate",
                Caller::Token(..) => "a bootstrap token",
            };
            return Err(Status::permission_denied(format!(
                "{entitled} is the CA service's own identity and is never issued to a caller \
                 (requested through {how})"
            )));
        }
        if entitled.trust_domain() != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "{entitled} is not in this CA's trust domain {}",
                self.trust_domain
            )));
        }

        let requested = csr_identity(&req.csr).map_err(Status::invalid_argument)?;
        if requested != entitled {
            let how = match caller {
                Caller::Certificate(_) => "the client certificate",
                Caller::Token(..) => "the bootstrap token",
            };
            return Err(Status::permission_denied(format!(
                "the CSR asks for {requested}, but {how} entitles the caller only to {entitled}"
            )));
        }
        let ttl = match req.validity_duration {
            0 => None,
            s if s > 0 => Some(Duration::from_secs(s.unsigned_abs())),
            s => {
                return Err(Status::invalid_argument(format!(
                    "validity_duration must not be negative, got {s}"
                )))
            }
        };

        let (chain, roots) = self
            .signer
            .sign(req.csr.as_bytes(), &entitled, ttl)
            .map_err(|e| Status::invalid_argument(format!("the CA refused to sign: {e}")))?;
        if chain.is_empty() || roots.is_empty() {
            return Err(Status::internal(
                "the CA returned no certificate or no root",
            ));
        }

        let how = match caller {
            Caller::Certificate(_) => "certificate",
            Caller::Token(t, id) => {
                // Spent only once the certificate exists, so that a CSR the signer refuses
                // does not burn the token, and atomically just before returning: when
                // concurrent requests race for the last use, the losers' certificates are
                // dropped here, unseen, and an N-use token yields at most N certificates.
                self.with_tokens(t, move |s, t| s.consume_for(&t, &id, now))
                    .await?;
                "bootstrap token"
            }
        };

        // Istio's layout without `root_cert`: leaf, intermediates, then every trusted root in
        // one last entry, which old and new Istio clients alike read as the root bundle.
        let roots_pem: Vec<String> = roots.iter().map(|r| r.trim().to_string()).collect();
        let mut cert_chain: Vec<String> = chain
            .into_iter()
            .filter(|c| !roots_pem.iter().any(|r| r == c.trim()))
            .collect();
        cert_chain.push(roots_pem.join("\n") + "\n");
        Ok((
            entitled,
            how,
            IstioCertificateResponse {
                cert_chain,
                root_cert: None,
            },
        ))
    }

    /// The SPIFFE ID of a client certificate that the handshake has verified against the
    /// bundle, after the checks webpki does not make.
    fn certificate_identity(
        &self,
        chain: &[CertificateDer<'static>],
        now: SystemTime,
    ) -> Result<SpiffeId, Status> {
        client_identity(chain, now).map_err(Status::unauthenticated)
    }

    /// Runs a token-store operation off the async threads (it reads, fsyncs and renames a
    /// file) and maps its refusals to gRPC codes.
    async fn with_tokens<T: Send + 'static>(
        &self,
        token: String,
        f: impl FnOnce(&TokenStore, String) -> Result<T, TokenError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self
            .tokens
            .clone()
            .ok_or_else(|| Status::unauthenticated("this CA does not accept bootstrap tokens"))?;
        let r = tokio::task::spawn_blocking(move || f(&store, token))
            .await
            .map_err(|e| Status::internal(format!("token store: {e}")))?;
        r.map_err(|e| match e {
            TokenError::WrongIdentity { .. } => Status::permission_denied(e.to_string()),
            TokenError::Unknown | TokenError::Expired { .. } | TokenError::UsedUp { .. } => {
                Status::unauthenticated(e.to_string())
            }
            other => {
                tracing::error!(error = %other, "token store unusable");
                Status::internal("the CA's token store is unusable; see the CA's log")
            }
        })
    }
}

/// The token of an `authorization: Bearer <token>` header, if there is one.
fn bearer_token<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let Some(v) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not ASCII"))?;
    match v.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
            Ok(Some(t.trim().to_string()))
        }
        _ => Err(Status::unauthenticated(
            "authorization header must be `Bearer <token>`",
        )),
    }
}

/// What the service and the client need to know about a workload certificate.
pub(crate) struct LeafInfo {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
}

/// Parses a certificate whose only identity is one SPIFFE ID.
pub(crate) fn leaf_info(der: &[u8]) -> Result<LeafInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName: a workload certificate needs its SPIFFE ID as URI SAN")?;
    let id = single_spiffe_san(&san.value.general_names)?;
    let time = |t: &x509_parser::time::ASN1Time| {
        let s = t.timestamp();
        if s >= 0 {
            UNIX_EPOCH + Duration::from_secs(s.unsigned_abs())
        } else {
            UNIX_EPOCH
        }
    };
    Ok(LeafInfo {
        id,
        not_before: time(&cert.validity().not_before),
        not_after: time(&cert.validity().not_after),
        is_ca: cert.is_ca(),
        spki: cert.public_key().raw.to_vec(),
    })
}

/// The identity a PEM CSR asks for, after checking its self-signature. Only a single URI SAN
/// holding a SPIFFE ID is accepted: anything else in it would be a name the caller is not
/// entitled to.
pub(crate) fn csr_identity(pem: &str) -> Result<SpiffeId, String> {
    use x509_parser::prelude::FromDer;
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("csr is not a PEM certificate request: {e}"))?;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| format!("csr is not a valid PKCS#10 request: {e}"))?;
    if !rest.is_empty() {
        return Err("csr has trailing data".into());
    }
    csr.verify_signature()
        .map_err(|e| format!("csr signature does not verify: {e}"))?;
    let mut names = None;
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
            if names.is_some() {
                return Err("csr has more than one subjectAltName extension".into());
            }
            names = Some(san.general_names.clone());
        }
    }
    let names = names.ok_or("csr has no subjectAltName: it must ask for a SPIFFE ID")?;
    single_spiffe_san(&names).map_err(|e| format!("csr: {e}"))
}

fn single_spiffe_san(
    names: &[x509_parser::extensions::GeneralName<'_>],
) -> Result<SpiffeId, String> {
    use x509_parser::extensions::GeneralName;
    match names {
        [GeneralName::URI(uri)] => uri
            .parse::<SpiffeId>()
            .map_err(|e| format!("URI SAN is not a workload SPIFFE ID: {e}")),
        [] => Err("no subject alternative name".into()),
        [_] => Err("the only subject alternative name must be a SPIFFE ID URI".into()),
        _ => Err(format!(
            "{} subject alternative names; exactly one, the SPIFFE ID, is allowed",
            names.len()
        )),
    }
}

/// Every certificate in a list of PEM texts (an entry may hold several).
pub(crate) fn parse_pem_certs(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for p in pems {
        let before = out.len();
        for c in CertificateDer::pem_slice_iter(p.as_bytes()) {
            out.push(c.map_err(|e| format!("bad PEM certificate: {e}"))?);
        }
        if out.len() == before {
            return Err("a PEM entry holds no certificate".into());
        }
    }
    Ok(out)
}

/// A server-side TLS connection carrying what the handshake learned, so that tonic can hand
/// it to each request as an extension.
struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
