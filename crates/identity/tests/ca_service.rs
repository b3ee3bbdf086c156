//! The CA service and the workload client over real TLS on 127.0.0.1, with a small rcgen CA as
//! the signer. Time-dependent behaviour (renewal, backoff, expiry) runs on tokio's paused clock,
//! shared by the signer, the service and the client, so no test waits for real time. Every
//! test runs on its own thread under a 60 s wall-clock bound.

use std::future::Future;
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Code;

use warden_identity::client::{
    Bootstrap, CaEndpoint, CertClient, CertClientConfig, ClientError, Clock, Credential,
    IdentityStatus, SystemClock, TokioClock,
};
use warden_identity::proto::{IstioCertificateRequest, IstioCertificateResponse};
use warden_identity::service::{
    ca_identity, CaServer, CaServerOptions, CertSigner, CREATE_CERTIFICATE_PATH,
};
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::{Svid, TrustBundle};
use warden_identity::token::TokenStore;

const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);

/// Runs the test body on a fresh single-threaded runtime (optionally with a paused clock) on
/// its own thread, failing the test if it has not finished after 60 s of real time.
fn bounded<F, Fut>(paused: bool, make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(paused)
            .build()
            .unwrap();
        rt.block_on(make());
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => thread.join().unwrap(),
        Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => panic!("test did not finish within 60 s"),
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

struct Root {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A minimal CA: signs what the service lets through for exactly the entitled identity.
struct TestSigner {
    clock: Arc<dyn Clock>,
    lifetime: Duration,
    /// Every root, and which one signs.
    roots: Mutex<(Vec<Root>, usize)>,
    issued: Mutex<Vec<SpiffeId>>,
    /// When set, every signing request is refused with this reason.
    refuse: Mutex<Option<String>>,
}

impl TestSigner {
    fn new(clock: Arc<dyn Clock>, lifetime: Duration) -> Arc<Self> {
        let s = TestSigner {
            clock,
            lifetime,
            roots: Mutex::new((Vec::new(), 0)),
            issued: Mutex::new(Vec::new()),
            refuse: Mutex::new(None),
        };
        s.add_root();
        Arc::new(s)
    }

    fn add_root(&self) {
        let mut roots = self.roots.lock().unwrap();
        let n = roots.0.len();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, format!("Test Root {n}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = self.clock.now();
        p.not_before = (now - 24 * HOUR).into();
        p.not_after = (now + 24 * 3650 * HOUR).into();
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        roots.0.push(Root {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        });
    }

    fn use_root(&self, i: usize) {
        self.roots.lock().unwrap().1 = i;
    }

    fn bundle(&self) -> TrustBundle {
        let roots = self.roots.lock().unwrap();
        TrustBundle {
            trust_domain: TD.into(),
            roots_der: roots.0.iter().map(|r| der(&r.pem)).collect(),
        }
    }

    fn issued(&self) -> Vec<SpiffeId> {
        self.issued.lock().unwrap().clone()
    }

    /// A certificate for `who` straight from this CA, bypassing the service.
    fn issue_directly(&self, who: &SpiffeId) -> Svid {
        let (key, csr) = csr_for(&[who.to_string()]);
        let (chain, _) = self.sign(csr.as_bytes(), who, None).unwrap();
        svid_from(&chain, key)
    }
}

impl CertSigner for TestSigner {
    fn sign(
        &self,
        csr_pem: &[u8],
        entitled: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<(Vec<String>, Vec<String>), String> {
        if let Some(why) = self.refuse.lock().unwrap().clone() {
            return Err(why);
        }
        let pem = std::str::from_utf8(csr_pem).map_err(|e| e.to_string())?;
        let mut csr = CertificateSigningRequestParams::from_pem(pem).map_err(|e| e.to_string())?;
        let now = self.clock.now();
        let p = &mut csr.params;
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(entitled.to_string().try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = (now + ttl.unwrap_or(self.lifetime).min(24 * HOUR)).into();
        let roots = self.roots.lock().unwrap();
        let cert = csr
            .signed_by(&roots.0[roots.1].issuer)
            .map_err(|e| e.to_string())?;
        self.issued.lock().unwrap().push(entitled.clone());
        Ok((
            vec![cert.pem()],
            roots.0.iter().map(|r| r.pem.clone()).collect(),
        ))
    }

    fn trust_domain(&self) -> String {
        TD.into()
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A key and a CSR asking for `uris` as URI SANs.
fn csr_for(uris: &[String]) -> (Vec<u8>, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(u.clone().try_into().unwrap()))
        .collect();
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    (key.serialize_der(), csr)
}

fn request(csr: String) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    }
}

/// The SVID in a chain of PEM certificates (leaf first; anything after the leaf is ignored).
fn svid_from(chain: &[String], key: Vec<u8>) -> Svid {
    let leaf = der(&chain[0]);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let t = |s: i64| UNIX_EPOCH + Duration::from_secs(s as u64);
    Svid {
        id: uri_sans(&leaf)[0].parse().unwrap(),
        not_before: t(cert.validity().not_before.timestamp()),
        not_after: t(cert.validity().not_after.timestamp()),
        cert_chain_der: vec![leaf],
        key_pkcs8_der: key,
    }
}

fn uri_sans(cert_der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect()
}

fn issuer_cn(cert_der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).unwrap();
    cert.issuer().to_string()
}

fn temp_dir(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!(
        "warden-ca-svc-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A CA service on 127.0.0.1 with a token store in a temporary directory.
struct Env {
    clock: Arc<dyn Clock>,
    signer: Arc<TestSigner>,
    tokens: Arc<TokenStore>,
    dir: PathBuf,
    server: Option<CaServer>,
    addr: std::net::SocketAddr,
}

impl Env {
    async fn start(name: &str, clock: Arc<dyn Clock>, lifetime: Duration) -> Env {
        let dir = temp_dir(name);
        let signer = TestSigner::new(clock.clone(), lifetime);
        let tokens = Arc::new(TokenStore::open(&dir));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut env = Env {
            clock,
            signer,
            tokens,
            dir,
            server: None,
            addr,
        };
        env.serve(listener).await;
        env
    }

    async fn serve(&mut self, listener: TcpListener) {
        let opts = CaServerOptions {
            tokens: Some(self.tokens.clone()),
            clock: self.clock.clone(),
            // Longer than the workload certificates, so that tests moving the clock past a
            // workload's expiry still reach a valid CA.
            server_cert_ttl: Some(12 * HOUR),
            ..CaServerOptions::default()
        };
        self.server = Some(
            CaServer::start(listener, self.signer.clone(), opts)
                .await
                .unwrap(),
        );
    }

    async fn stop(&mut self) {
        self.server.take().unwrap().shutdown().await.unwrap();
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener).await;
    }

    fn endpoint(&self) -> CaEndpoint {
        CaEndpoint::new(self.addr.to_string(), TD)
            .unwrap()
            .with_clock(self.clock.clone())
    }

    fn mint(&self, who: &SpiffeId, ttl: Duration, uses: u32) -> String {
        self.tokens
            .mint_at(who, ttl, uses, self.clock.now())
            .unwrap()
    }

    async fn call(
        &self,
        cred: Credential<'_>,
        csr: String,
    ) -> Result<IstioCertificateResponse, ClientError> {
        self.endpoint()
            .create_certificate(&self.signer.bundle(), cred, request(csr))
            .await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn refused(r: Result<IstioCertificateResponse, ClientError>, code: Code, needle: &str) {
    match r {
        Err(ClientError::Refused { code: c, message }) => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[test]
fn bootstrap_token_gets_exactly_its_identity_and_is_then_used_up() {
    bounded(false, || async {
        let env = Env::start("bootstrap", Arc::new(SystemClock), HOUR).await;
        let web = id("shop", "web");
        let token = env.mint(&web, Duration::from_secs(600), 1);
        let (_key, csr) = csr_for(&[web.to_string()]);

        let resp = env
            .call(Credential::Token(&token), csr.clone())
            .await
            .unwrap();
        // Istio's layout: leaf first, the root bundle last.
        assert_eq!(resp.cert_chain.len(), 2);
        assert_eq!(uri_sans(&der(&resp.cert_chain[0])), vec![web.to_string()]);
        assert_eq!(der(&resp.cert_chain[1]), env.signer.bundle().roots_der[0]);
        assert!(resp.root_cert.is_none());
        assert_eq!(
            env.signer.issued(),
            vec![ca_identity(TD).unwrap(), web.clone()]
        );

        refused(
            env.call(Credential::Token(&token), csr).await,
            Code::Unauthenticated,
            "used up",
        );
        assert_eq!(env.signer.issued().len(), 2);
    });
}

#[test]
fn csr_for_another_identity_is_refused_without_burning_the_token() {
    bounded(false, || async {
        let env = Env::start("other-id", Arc::new(SystemClock), HOUR).await;
        let web = id("shop", "web");
        let db = id("shop", "db");
        let token = env.mint(&web, Duration::from_secs(600), 1);

        let (_, csr_db) = csr_for(&[db.to_string()]);
        refused(
            env.call(Credential::Token(&token), csr_db).await,
            Code::PermissionDenied,
            "the CSR asks for spiffe://cluster.local/ns/shop/sa/db, but the bootstrap token \
             entitles the caller only to spiffe://cluster.local/ns/shop/sa/web",
        );
        // Several names, one of them the right one, are refused too.
        let (_, csr_two) = csr_for(&[web.to_string(), db.to_string()]);
        refused(
            env.call(Credential::Token(&token), csr_two).await,
            Code::InvalidArgument,
            "exactly one",
        );
        refused(
            env.call(Credential::Token(&token), "not a CSR".into())
                .await,
            Code::InvalidArgument,
            "csr",
        );
        assert_eq!(
            env.signer.issued().len(),
            1,
            "only the CA's own certificate"
        );

        let (_, csr_web) = csr_for(&[web.to_string()]);
        env.call(Credential::Token(&token), csr_web).await.unwrap();
    });
}

#[test]
fn expired_unknown_and_missing_credentials_are_unauthenticated() {
    bounded(false, || async {
        let env = Env::start("creds", Arc::new(SystemClock), HOUR).await;
        let web = id("shop", "web");
        let (_, csr) = csr_for(&[web.to_string()]);
        let expired = env
            .tokens
            .mint_at(&web, Duration::from_secs(600), 5, SystemTime::now() - HOUR)
            .unwrap();
        refused(
            env.call(Credential::Token(&expired), csr.clone()).await,
            Code::Unauthenticated,
            "expired",
        );
        refused(
            env.call(Credential::Token("bm90LWEtdG9rZW4"), csr.clone())
                .await,
            Code::Unauthenticated,
            "unknown bootstrap token",
        );
        refused(
            env.call(Credential::None, csr).await,
            Code::Unauthenticated,
            "no credentials",
        );
        assert_eq!(env.signer.issued().len(), 1);
    });
}

#[test]
fn renewal_with_the_current_certificate_is_for_the_same_identity_only() {
    bounded(true, || async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
        let env = Env::start("renew", clock.clone(), HOUR).await;
        let web = id("shop", "web");
        let db = id("shop", "db");
        let token = env.mint(&web, Duration::from_secs(600), 1);
        let (key, csr) = csr_for(&[web.to_string()]);
        let resp = env.call(Credential::Token(&token), csr).await.unwrap();
        let svid = svid_from(&resp.cert_chain, key);

        // Renewal by certificate: the token is used up, so only the certificate can have worked.
        let (key2, csr2) = csr_for(&[web.to_string()]);
        let renewed = env.call(Credential::Svid(&svid), csr2).await.unwrap();
        let renewed = svid_from(&renewed.cert_chain, key2);
        assert_eq!(renewed.id, web);

        let (_, csr_db) = csr_for(&[db.to_string()]);
        refused(
            env.call(Credential::Svid(&svid), csr_db.clone()).await,
            Code::PermissionDenied,
            "the client certificate entitles the caller only to spiffe://cluster.local/ns/shop/sa/web",
        );
        let issued = env.signer.issued().len();

        // A certificate from another CA does not get through the handshake, even though that
        // CA's root has the same name as ours.
        let foreign = TestSigner::new(clock.clone(), HOUR).issue_directly(&web);
        let (_, csr3) = csr_for(&[web.to_string()]);
        let e = env.call(Credential::Svid(&foreign), csr3.clone()).await;
        assert!(
            matches!(&e, Err(ClientError::Refused { message, .. }) if message.contains("fatal alert")),
            "{e:?}"
        );

        // Nor does an expired one (the service judges by the same clock as the test).
        tokio::time::advance(HOUR + Duration::from_secs(120)).await;
        assert!(clock.now() > renewed.not_after);
        let e = env.call(Credential::Svid(&renewed), csr3).await;
        assert!(
            matches!(&e, Err(ClientError::Refused { message, .. }) if message.contains("CertificateExpired")),
            "{e:?}"
        );
        assert_eq!(
            env.signer.issued().len(),
            issued,
            "nothing issued to refused callers"
        );
    });
}

/// The next `Ready` certificate that differs from `previous`.
async fn next_ready(rx: &mut watch::Receiver<IdentityStatus>, previous: Option<&Svid>) -> Svid {
    loop {
        if let IdentityStatus::Ready(s) = &*rx.borrow_and_update() {
            if previous.is_none_or(|p| p.cert_chain_der != s.cert_chain_der) {
                return s.clone();
            }
        }
        rx.changed().await.expect("client stopped");
    }
}

#[test]
fn client_renews_at_half_life_backs_off_expires_and_recovers() {
    bounded(true, || async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
        let mut env = Env::start("lifecycle", clock.clone(), HOUR).await;
        let web = id("shop", "web");
        let token_file = env.dir.join("bootstrap-token");
        std::fs::write(&token_file, env.mint(&web, Duration::from_secs(600), 1)).unwrap();
        let cfg = CertClientConfig::new(
            web.clone(),
            env.endpoint(),
            env.signer.bundle(),
            Bootstrap::TokenFile(token_file.clone()),
        );
        let mut h = CertClient::new(cfg).spawn();

        let first = next_ready(&mut h.status, None).await;
        assert_eq!(first.id, web);
        assert_eq!(*h.bundle.borrow(), env.signer.bundle());

        // Renewal at 45–55 % of the lifetime, by certificate (the one-use token is spent).
        let second = next_ready(&mut h.status, Some(&first)).await;
        let at = clock.now().duration_since(first.not_before).unwrap();
        let life = first.not_after.duration_since(first.not_before).unwrap();
        assert!(
            at >= life.mul_f64(0.45) && at <= life.mul_f64(0.55) + Duration::from_secs(1),
            "renewed after {at:?} of {life:?}"
        );
        assert_eq!(env.signer.issued().iter().filter(|i| **i == web).count(), 2);

        // The CA goes away: the client backs off and keeps the certificate it has.
        env.stop().await;
        let mut delays = Vec::new();
        let expired_at = loop {
            tokio::select! {
                r = h.stats.changed() => {
                    r.unwrap();
                    let s = h.stats.borrow_and_update().clone();
                    if s.consecutive_failures > 0 {
                        let due = s.next_attempt.unwrap();
                        delays.push(due.duration_since(clock.now()).unwrap());
                        let status = h.status.borrow().clone();
                        if clock.now() < second.not_after {
                            let kept = status.svid().expect("still Ready while valid");
                            assert_eq!(kept.cert_chain_der, second.cert_chain_der);
                        }
                    }
                }
                r = h.status.changed() => {
                    r.unwrap();
                    let status = h.status.borrow_and_update().clone();
                    if let IdentityStatus::Expired { not_after, last_error, .. } = status {
                        assert_eq!(not_after, second.not_after);
                        assert!(last_error.contains("cannot reach the CA"), "{last_error}");
                        break clock.now();
                    }
                }
            }
        };
        // Fail closed exactly at expiry, not at the next retry.
        assert!(expired_at >= second.not_after);
        assert!(expired_at < second.not_after + Duration::from_secs(1));
        assert!(delays.len() >= 8, "{delays:?}");
        for (n, d) in delays.iter().enumerate() {
            let full = Duration::from_secs(1u64 << n.min(6)).min(Duration::from_secs(60));
            assert!(
                *d <= full && *d >= full.mul_f64(0.8),
                "retry {n}: {d:?} ({delays:?})"
            );
        }

        // The CA comes back; with the certificate gone, a fresh token gets the workload going.
        std::fs::write(&token_file, env.mint(&web, Duration::from_secs(600), 1)).unwrap();
        env.restart().await;
        let third = next_ready(&mut h.status, Some(&second)).await;
        assert_eq!(third.id, web);
        assert!(clock.now() < third.not_after);
    });
}

#[test]
fn client_takes_up_new_roots_during_a_root_rotation() {
    bounded(true, || async {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
        let env = Env::start("rotation", clock.clone(), HOUR).await;
        let web = id("shop", "web");
        let cfg = CertClientConfig::new(
            web.clone(),
            env.endpoint(),
            env.signer.bundle(),
            Bootstrap::Token(env.mint(&web, Duration::from_secs(600), 1)),
        );
        let mut h = CertClient::new(cfg).spawn();
        let first = next_ready(&mut h.status, None).await;
        assert_eq!(h.bundle.borrow_and_update().roots_der.len(), 1);

        // Phase 1: the new root is trusted but does not sign yet.
        env.signer.add_root();
        let second = next_ready(&mut h.status, Some(&first)).await;
        assert!(h.bundle.has_changed().unwrap());
        assert_eq!(*h.bundle.borrow_and_update(), env.signer.bundle());
        assert_eq!(h.bundle.borrow().roots_der.len(), 2);
        assert!(issuer_cn(&second.cert_chain_der[0]).contains("Test Root 0"));

        // Phase 2: the new root signs, the CA's own certificate included; the client still
        // reaches the CA and renews with its certificate from the old root.
        env.signer.use_root(1);
        env.server.as_ref().unwrap().reload_certificate();
        let third = next_ready(&mut h.status, Some(&second)).await;
        assert!(issuer_cn(&third.cert_chain_der[0]).contains("Test Root 1"));
        assert!(
            !h.bundle.has_changed().unwrap(),
            "same two roots, no new bundle"
        );
        assert_eq!(h.stats.borrow().consecutive_failures, 0);
    });
}

/// An Istio client's view of the messages, written from Istio's field numbers rather than
/// generated from our proto.
#[derive(Clone, PartialEq, prost::Message)]
struct IstioWireRequest {
    #[prost(string, tag = "1")]
    csr: String,
    #[prost(int64, tag = "3")]
    validity_duration: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct IstioWireResponse {
    #[prost(string, repeated, tag = "1")]
    cert_chain: Vec<String>,
}

#[test]
fn wire_compatible_with_istio() {
    use prost::Message;
    // Field numbers and types by hand: csr = 1 (string), validity_duration = 3 (varint).
    let ours = IstioCertificateRequest {
        csr: "ab".into(),
        validity_duration: 3600,
        metadata: None,
    };
    let bytes = ours.encode_to_vec();
    assert_eq!(bytes, [0x0a, 2, b'a', b'b', 0x18, 0x90, 0x1c]);
    assert_eq!(
        IstioCertificateRequest::decode(bytes.as_slice()).unwrap(),
        ours
    );
    let with_metadata = IstioCertificateRequest {
        metadata: Some(prost_types::Struct::default()),
        ..ours.clone()
    };
    // Metadata is field 4, length-delimited; an Istio decoder that ignores it still reads the rest.
    assert!(with_metadata.encode_to_vec().ends_with(&[0x22, 0]));
    let theirs = IstioWireRequest::decode(with_metadata.encode_to_vec().as_slice()).unwrap();
    assert_eq!(
        (theirs.csr.as_str(), theirs.validity_duration),
        ("ab", 3600)
    );
    let resp = IstioCertificateResponse {
        cert_chain: vec!["leaf".into(), "root".into()],
        root_cert: None,
    };
    assert_eq!(
        IstioWireResponse::decode(resp.encode_to_vec().as_slice())
            .unwrap()
            .cert_chain,
        resp.cert_chain
    );

    assert_eq!(
        CREATE_CERTIFICATE_PATH,
        "/istio.v1.auth.IstioCertificateService/CreateCertificate"
    );
    assert_eq!(
        format!(
            "/{}/CreateCertificate",
            warden_identity::proto::istio_certificate_service_server::SERVICE_NAME
        ),
        CREATE_CERTIFICATE_PATH
    );

    // And a real call on that path with the hand-written messages, as an Istio agent makes it.
    bounded(false, || async {
        let env = Env::start("wire", Arc::new(SystemClock), HOUR).await;
        let web = id("shop", "web");
        let token = env.mint(&web, Duration::from_secs(600), 1);
        let (_, csr) = csr_for(&[web.to_string()]);
        let channel = env
            .endpoint()
            .connect(&env.signer.bundle(), None)
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let mut req = tonic::Request::new(IstioWireRequest {
            csr,
            validity_duration: 600,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let resp: IstioWireResponse = grpc
            .unary(
                req,
                tonic::codegen::http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.cert_chain.len(), 2);
        let leaf = der(&resp.cert_chain[0]);
        assert_eq!(uri_sans(&leaf), vec![web.to_string()]);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let v = cert.validity();
        // The requested lifetime was honoured (plus the signer's one-minute back-dating).
        assert_eq!(v.not_after.timestamp() - v.not_before.timestamp(), 660);
    });
}

/// Uses left on the one token in the store.
fn uses_left(env: &Env) -> u32 {
    let list = env.tokens.list().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    list[0].uses_left
}

#[test]
fn the_ca_identity_is_never_issued_to_a_caller() {
    bounded(false, || async {
        let env = Env::start("ca-id", Arc::new(SystemClock), HOUR).await;
        let ca = ca_identity(TD).unwrap();
        // The service did get its own certificate, through the signer.
        assert_eq!(env.signer.issued(), vec![ca.clone()]);

        let token = env.mint(&ca, Duration::from_secs(600), 1);
        let (_, csr) = csr_for(&[ca.to_string()]);
        refused(
            env.call(Credential::Token(&token), csr.clone()).await,
            Code::PermissionDenied,
            "spiffe://cluster.local/ns/warden-system/sa/warden-ca is the CA service's own \
             identity and is never issued to a caller (requested through a bootstrap token)",
        );
        assert_eq!(uses_left(&env), 1, "a refused request spends no token");

        // Nor by renewal, even with a genuine certificate for that identity.
        let stolen = env.signer.issue_directly(&ca);
        refused(
            env.call(Credential::Svid(&stolen), csr).await,
            Code::PermissionDenied,
            "never issued to a caller (requested through renewal with a client certificate)",
        );
        assert_eq!(
            env.signer.issued().len(),
            2,
            "the server's own certificate and the test's direct one only"
        );
    });
}

#[test]
fn a_csr_the_signer_refuses_does_not_spend_the_token() {
    bounded(false, || async {
        let env = Env::start("signer-refuses", Arc::new(SystemClock), HOUR).await;
        let web = id("shop", "web");
        let token = env.mint(&web, Duration::from_secs(600), 1);
        let (_, csr) = csr_for(&[web.to_string()]);

        *env.signer.refuse.lock().unwrap() = Some("the HSM is unavailable".into());
        refused(
            env.call(Credential::Token(&token), csr.clone()).await,
            Code::InvalidArgument,
            "the CA refused to sign: the HSM is unavailable",
        );
        assert_eq!(uses_left(&env), 1);

        *env.signer.refuse.lock().unwrap() = None;
        env.call(Credential::Token(&token), csr.clone())
            .await
            .unwrap();
        assert_eq!(uses_left(&env), 0);
        refused(
            env.call(Credential::Token(&token), csr).await,
            Code::Unauthenticated,
            "used up",
        );
    });
}

#[test]
fn concurrent_requests_with_an_n_use_token_get_at_most_n_certificates() {
    bounded(false, || async {
        let env = Arc::new(Env::start("token-race", Arc::new(SystemClock), HOUR).await);
        let web = id("shop", "web");
        let token = env.mint(&web, Duration::from_secs(600), 3);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (env, token, web) = (env.clone(), token.clone(), web.clone());
            calls.spawn(async move {
                let (_, csr) = csr_for(&[web.to_string()]);
                env.call(Credential::Token(&token), csr).await
            });
        }
        let (mut ok, mut used_up) = (0, 0);
        while let Some(r) = calls.join_next().await {
            match r.unwrap() {
                Ok(resp) => {
                    assert_eq!(uri_sans(&der(&resp.cert_chain[0])), vec![web.to_string()]);
                    ok += 1;
                }
                Err(ClientError::Refused { code, message }) => {
                    assert_eq!(code, Code::Unauthenticated, "{message}");
                    assert!(message.contains("used up"), "{message}");
                    used_up += 1;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!((ok, used_up), (3, 5));
        assert_eq!(uses_left(&env), 0);
    });
}

/// CSRs that pass the service's own checks (or not) but that the real CA refuses: none of
/// them may burn a one-use token.
#[test]
fn csrs_the_real_ca_refuses_do_not_spend_the_token() {
    use warden_identity::ca::{Ca, KeyAlg};
    use warden_identity::signer::CaSigner;

    // Made with `openssl req` (rcgen cannot sign with these): the same SAN as `web` below.
    const RSA_1024_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBjjCB+AIBADAMMQowCAYDVQQKDAFUMIGfMA0GCSqGSIb3DQEBAQUAA4GNADCB
iQKBgQDRVfx554fIhzgfdYnZeZg7u780i78rk1N8kPdv+uCbdLsWSwmjfjYCShw7
otlzs9GRSLt9c6Fd0y5vXTI2d5J36AC05Vx/gE19Eu+eagtz8DHF0hfzpUoTf4xg
pSMGhRe9yPcCGkkSPJP6HsbSIbXqNpxLeBRAyHdrE98czbBY8wIDAQABoEMwQQYJ
KoZIhvcNAQkOMTQwMjAwBgNVHREEKTAnhiVzcGlmZmU6Ly9jbHVzdGVyLmxvY2Fs
L25zL3Nob3Avc2Evd2ViMA0GCSqGSIb3DQEBCwUAA4GBABUvOcfIsVlvrT8Lc+2V
nTYQFH7VjQOaMBXcQoH67uXUcoLiCfaaJRwQMijbl79Jl+8S7ECYSGLyx/KS/9WU
YWIT4vDPy1AHZT5ciJDLFFDGLaqAnt+CCPIpcDqGWyytDznf6GUcLJH1NxZg82o/
13/rBldDfRI33kR/dx9zhtm8
-----END CERTIFICATE REQUEST-----
";
    const ECDSA_SHA1_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBCTCBsQIBADAMMQowCAYDVQQKDAFUMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcD
QgAEz7BhES829okpRmln+h0UQlUgIWTW4//4ebJTTMMCPVfvLTerBjK0MaRFueeH
7uHyWoy2hI2yQeIJCajsPmeWdqBDMEEGCSqGSIb3DQEJDjE0MDIwMAYDVR0RBCkw
J4Ylc3BpZmZlOi8vY2x1c3Rlci5sb2NhbC9ucy9zaG9wL3NhL3dlYjAJBgcqhkjO
PQQBA0gAMEUCIAIKwR0Szu1N+1YxGFDi2amruUPI1AGv8ACaWy+RUf1PAiEA6FNI
UQxjtgieVMxjAkl4h60x/mVo3+Bx9xrhheudUWw=
-----END CERTIFICATE REQUEST-----
";
    bounded(false, || async {
        let dir = temp_dir("real-ca-refusals");
        let ca = Ca::init(&dir, TD, KeyAlg::EcP256).unwrap();
        let bundle = ca.bundle();
        let signer = Arc::new(CaSigner::new(ca));
        let tokens = Arc::new(TokenStore::open(&dir));
        let web = id("shop", "web");
        let token = tokens.mint(&web, Duration::from_secs(600), 1).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = CaServerOptions {
            tokens: Some(tokens.clone()),
            ..CaServerOptions::default()
        };
        let server = CaServer::start(listener, signer, opts).await.unwrap();
        let ep = CaEndpoint::new(addr.to_string(), TD).unwrap();

        let csr_with = |alg: &'static rcgen::SignatureAlgorithm, ca: bool| {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.subject_alt_names = vec![SanType::URI(web.to_string().try_into().unwrap())];
            if ca {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }
            p.serialize_request(&key).unwrap().pem().unwrap()
        };
        let bad = [
            ("Ed25519 key", csr_with(&rcgen::PKCS_ED25519, false)),
            ("RSA-1024 key", RSA_1024_CSR.to_string()),
            ("SHA-1 signature", ECDSA_SHA1_CSR.to_string()),
            ("CA:true", csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, true)),
        ];
        for (what, csr) in bad {
            let r = ep
                .create_certificate(&bundle, Credential::Token(&token), request(csr))
                .await;
            match r {
                Err(ClientError::Refused { code, message }) => {
                    assert_eq!(code, Code::InvalidArgument, "{what}: {message}")
                }
                other => panic!("{what}: expected a refusal, got {other:?}"),
            }
            assert_eq!(tokens.list().unwrap()[0].uses_left, 1, "{what}");
        }
        let good = csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, false);
        let resp = ep
            .create_certificate(&bundle, Credential::Token(&token), request(good))
            .await
            .unwrap();
        assert_eq!(uri_sans(&der(&resp.cert_chain[0])), vec![web.to_string()]);
        assert_eq!(tokens.list().unwrap()[0].uses_left, 0);
        server.shutdown().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    });
}
