//! Real TLS handshakes over 127.0.0.1: Warden's SPIFFE-aware rustls configurations against each
//! other, against hand-built rustls peers presenting defective certificates, and against
//! OpenSSL (`s_server`, `s_client`) as an outside peer. Certificates are minted with rcgen.
//! Every test runs inside `bounded`, and synchronises on I/O, never on sleeps.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose as Eku,
    IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::{Svid, TrustBundle};
use warden_identity::tls::{
    client_config, client_config_with_alpn, peer_spiffe_id, server_config, server_config_with_alpn,
    ExpectedPeer, IdentityState, KeyUsageProblem, SpiffeTlsError,
};

const TD: &str = "cluster.local";
const LIMIT: Duration = Duration::from_secs(30);

/// Every test body runs under this: a hang is a failure, not a stuck CI job.
async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test timed out")
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn workload(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", sa).unwrap()
}

// ---------------------------------------------------------------- certificates

struct Ca {
    der: Vec<u8>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Warden tests");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
    p
}

impl Ca {
    fn root(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(cn);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn intermediate(&self, cn: &str) -> Ca {
        self.intermediate_with(cn, |_| {})
    }

    /// An intermediate that `tweak` may break.
    fn intermediate_with(&self, cn: &str, tweak: impl FnOnce(&mut CertificateParams)) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params(cn);
        tweak(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Ca {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }
}

/// A root and the intermediate that signs workload certificates, as with a plug-in CA.
struct Pki {
    root: Arc<Ca>,
    inter: Ca,
    /// Intermediates between `inter` and the root, `inter`'s issuer first.
    above: Vec<Vec<u8>>,
}

type Tweak = fn(&mut CertificateParams);

impl Pki {
    fn new(name: &str) -> Pki {
        let root = Arc::new(Ca::root(&format!("{name} root")));
        let inter = root.intermediate(&format!("{name} intermediate"));
        Pki {
            root,
            inter,
            above: vec![],
        }
    }

    /// The same root → one new intermediate per tweak, outermost first; the last signs the
    /// leaves.
    fn with_intermediates(&self, name: &str, tweaks: &[Tweak]) -> Pki {
        let root = self.root.clone();
        let mut above = vec![];
        let mut inter: Option<Ca> = None;
        for (i, tweak) in tweaks.iter().enumerate() {
            let cn = format!("{name} intermediate {i}");
            let next = match &inter {
                None => root.intermediate_with(&cn, tweak),
                Some(parent) => parent.intermediate_with(&cn, tweak),
            };
            if let Some(parent) = inter.replace(next) {
                above.insert(0, parent.der);
            }
        }
        Pki {
            root,
            inter: inter.expect("at least one intermediate"),
            above,
        }
    }

    fn bundle(&self) -> TrustBundle {
        bundle_of(&[self])
    }

    /// A well-formed SVID for `uri`.
    fn leaf(&self, uri: &str) -> Leaf {
        self.leaf_with(|p| p.subject_alt_names = vec![uri_san(uri)])
    }

    /// A leaf that starts well-formed (URI SAN of `default/broken`, digitalSignature, both
    /// auth EKUs) and that `tweak` then breaks.
    fn leaf_with(&self, tweak: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![uri_san(&workload("broken").to_string())];
        p.key_usages = vec![Ku::DigitalSignature];
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        tweak(&mut p);
        let cert = p.signed_by(&key, &self.inter.issuer).unwrap();
        let mut chain = vec![cert.der().to_vec(), self.inter.der.clone()];
        chain.extend(self.above.iter().cloned());
        Leaf {
            chain,
            pem: cert.pem(),
            key,
        }
    }
}

fn bundle_of(pkis: &[&Pki]) -> TrustBundle {
    TrustBundle {
        trust_domain: TD.into(),
        roots_der: pkis.iter().map(|p| p.root.der.clone()).collect(),
    }
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().unwrap())
}

struct Leaf {
    /// Leaf, then the intermediates.
    chain: Vec<Vec<u8>>,
    pem: String,
    key: KeyPair,
}

impl Leaf {
    fn svid(&self) -> Svid {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.chain[0]).unwrap();
        let uri = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .unwrap();
        Svid {
            id: id(&uri),
            cert_chain_der: self.chain.clone(),
            key_pkcs8_der: self.key.serialize_der(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
        }
    }

    fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        self.chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect()
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

fn state(leaf: &Leaf, bundle: TrustBundle) -> Arc<IdentityState> {
    Arc::new(IdentityState::with_svid(leaf.svid(), bundle).unwrap())
}

// ---------------------------------------------------------------- non-Warden rustls peers

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server that presents `leaf` as is, whatever is wrong with it, and asks for no client
/// certificate: the attacker or misconfigured peer a Warden client must refuse.
fn raw_server(leaf: &Leaf) -> ServerConfig {
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.chain_der(), leaf.key_der())
        .unwrap()
}

/// A client that presents `leaf` as is and believes any server: what a Warden server must
/// refuse.
fn raw_client(leaf: &Leaf) -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(BelievesAnything))
        .with_client_auth_cert(leaf.chain_der(), leaf.key_der())
        .unwrap()
}

#[derive(Debug)]
struct BelievesAnything;

impl ServerCertVerifier for BelievesAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------- handshakes

type ClientEnd = client::TlsStream<TcpStream>;
type ServerEnd = server::TlsStream<TcpStream>;

fn server_name(addr: SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// One connection over loopback; both sides' outcomes. The client's `connect` returns once it
/// sent its Finished, the server's `accept` once it checked the client: so a client
/// certificate refused by the server shows up as a server error.
async fn handshake(
    server: ServerConfig,
    client: ClientConfig,
) -> (std::io::Result<ClientEnd>, std::io::Result<ServerEnd>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        acceptor.accept(tcp).await
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = TlsConnector::from(Arc::new(client))
        .connect(server_name(addr), tcp)
        .await;
    let server = accepted.await.unwrap();
    (client, server)
}

fn spiffe_err(err: &std::io::Error) -> SpiffeTlsError {
    SpiffeTlsError::from_io(err)
        .unwrap_or_else(|| panic!("not a SPIFFE verification error: {err}"))
        .clone()
}

/// A Warden server that echoes bytes back, reporting each client's leaf certificate.
async fn echo_server(
    config: ServerConfig,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<std::io::Result<Vec<u8>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                let _ = tx.send(Ok(leaf));
                let mut buf = [0u8; 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn connect(config: ClientConfig, addr: SocketAddr) -> std::io::Result<ClientEnd> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(server_name(addr), tcp)
        .await
}

async fn roundtrip(tls: &mut ClientEnd, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

fn presented_leaf(tls: &ClientEnd) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One handshake and round trip from each of `peers` to the server at `addr`; panics on any
/// failure, on either side. Returns how many handshakes succeeded.
async fn check_all(
    label: &str,
    addr: SocketAddr,
    peers: &[(&str, &Arc<IdentityState>)],
    server_id: &SpiffeId,
    seen: &mut mpsc::UnboundedReceiver<std::io::Result<Vec<u8>>>,
) -> usize {
    for (who, st) in peers {
        let config = client_config((*st).clone(), ExpectedPeer::Exact(server_id.clone()));
        let mut tls = connect(config, addr)
            .await
            .unwrap_or_else(|e| panic!("{label}: {who} failed: {e}"));
        roundtrip(&mut tls, label.as_bytes()).await;
        seen.recv()
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{label}: server refused {who}: {e}"));
    }
    peers.len()
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn mtls_handshake_both_sides_see_each_others_spiffe_id() {
    bounded(async {
        let pki = Pki::new("mesh");
        let server_id = workload("httpbin");
        let client_id = workload("sleep");
        let server = state(&pki.leaf(&server_id.to_string()), pki.bundle());
        let client = state(&pki.leaf(&client_id.to_string()), pki.bundle());

        let (c, s) = handshake(
            server_config(server),
            client_config(client, ExpectedPeer::Exact(server_id.clone())),
        )
        .await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert_eq!(peer_spiffe_id(c.get_ref().1), Some(server_id));
        assert_eq!(peer_spiffe_id(s.get_ref().1), Some(client_id));
        assert_eq!(
            c.get_ref().1.alpn_protocol(),
            Some(&b"istio-peer-exchange"[..])
        );
        assert_eq!(
            s.get_ref().1.alpn_protocol(),
            Some(&b"istio-peer-exchange"[..])
        );
        // Full handshake with the peer's intermediate: the chain was built, not assumed.
        assert_eq!(c.get_ref().1.peer_certificates().unwrap().len(), 2);

        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    })
    .await
}

type Check = Option<fn(&SpiffeTlsError) -> bool>;

fn invalid_chain(e: &SpiffeTlsError, webpki_error: &str) -> bool {
    matches!(e, SpiffeTlsError::InvalidChain(m) if m.contains(webpki_error))
}

/// A critical nameConstraints extension permitting only URIs on `host` (rcgen has no URI
/// subtrees).
fn uri_name_constraint(host: &str) -> rcgen::CustomExtension {
    let host = host.as_bytes();
    let n = host.len() as u8;
    let mut der = vec![0x30, n + 6, 0xa0, n + 4, 0x30, n + 2, 0x86, n];
    der.extend_from_slice(host);
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 30], der);
    ext.set_criticality(true);
    ext
}

/// Every defect of point 5, presented by a server to a Warden client and by a client to a
/// Warden server; each must fail with its own error (or pass, where the defect does not
/// concern that direction).
#[tokio::test]
async fn every_defective_peer_certificate_is_refused_with_its_own_error() {
    bounded(async {
        let pki = Pki::new("mesh");
        let other = Pki::new("someone else");
        // Defects one level up: the peer's leaf is fine, its intermediate is not.
        let not_a_ca = pki.with_intermediates("not a CA", &[|p| {
            p.is_ca = IsCa::ExplicitNoCa;
        }]);
        let under_pathlen_0 = pki.with_intermediates(
            "pathlen",
            &[|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)), |_| {}],
        );
        let expired_intermediate = pki.with_intermediates("expired", &[|p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }]);
        let uri_constrained = pki.with_intermediates("constrained", &[|p| {
            p.custom_extensions.push(uri_name_constraint("other.td"));
        }]);
        let unknown_critical = pki.with_intermediates("unknown extension", &[|p| {
            let mut ext = rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55555, 1], vec![5, 0]);
            ext.set_criticality(true);
            p.custom_extensions.push(ext);
        }]);
        let good_client = state(&pki.leaf(&workload("sleep").to_string()), pki.bundle());
        let good_server = state(&pki.leaf(&workload("httpbin").to_string()), pki.bundle());

        let old = |p: &mut CertificateParams| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        };
        let future = |p: &mut CertificateParams| {
            p.not_before = rcgen::date_time_ymd(2090, 1, 1);
            p.not_after = rcgen::date_time_ymd(2091, 1, 1);
        };
        let cases: Vec<(&str, Leaf, Check, Check)> = vec![
            (
                "no URI SAN",
                pki.leaf_with(|p| p.subject_alt_names = vec![SanType::DnsName("httpbin.default".try_into().unwrap())]),
                Some(|e| *e == SpiffeTlsError::NoUriSan),
                Some(|e| *e == SpiffeTlsError::NoUriSan),
            ),
            (
                "several URI SANs",
                pki.leaf_with(|p| {
                    p.subject_alt_names = vec![
                        uri_san("spiffe://cluster.local/ns/default/sa/a"),
                        uri_san("spiffe://cluster.local/ns/default/sa/b"),
                    ]
                }),
                Some(|e| matches!(e, SpiffeTlsError::MultipleUriSans(v) if v.len() == 2)),
                Some(|e| matches!(e, SpiffeTlsError::MultipleUriSans(v) if v.len() == 2)),
            ),
            (
                "a non-spiffe URI",
                pki.leaf_with(|p| p.subject_alt_names = vec![uri_san("https://cluster.local/ns/default/sa/a")]),
                Some(|e| matches!(e, SpiffeTlsError::NotSpiffe(u) if u == "https://cluster.local/ns/default/sa/a")),
                Some(|e| matches!(e, SpiffeTlsError::NotSpiffe(_))),
            ),
            (
                "a malformed SPIFFE ID",
                pki.leaf_with(|p| p.subject_alt_names = vec![uri_san("spiffe://cluster.local/workload")]),
                Some(|e| matches!(e, SpiffeTlsError::MalformedSpiffeId { .. })),
                Some(|e| matches!(e, SpiffeTlsError::MalformedSpiffeId { .. })),
            ),
            (
                "a foreign trust domain (signed by our own root)",
                pki.leaf_with(|p| p.subject_alt_names = vec![uri_san("spiffe://evil.example/ns/default/sa/a")]),
                Some(|e| matches!(e, SpiffeTlsError::UntrustedTrustDomain { peer_trust_domain, .. } if peer_trust_domain == "evil.example")),
                Some(|e| matches!(e, SpiffeTlsError::UntrustedTrustDomain { .. })),
            ),
            (
                "expired",
                pki.leaf_with(old),
                Some(|e| matches!(e, SpiffeTlsError::Expired { not_after, now } if not_after < now)),
                Some(|e| matches!(e, SpiffeTlsError::Expired { .. })),
            ),
            (
                "not yet valid",
                pki.leaf_with(future),
                Some(|e| matches!(e, SpiffeTlsError::NotYetValid { not_before, now } if not_before > now)),
                Some(|e| matches!(e, SpiffeTlsError::NotYetValid { .. })),
            ),
            (
                "keyUsage without digitalSignature",
                pki.leaf_with(|p| p.key_usages = vec![Ku::KeyAgreement]),
                Some(|e| *e == SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::MissingDigitalSignature)),
                Some(|e| *e == SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::MissingDigitalSignature)),
            ),
            (
                "no keyUsage at all",
                pki.leaf_with(|p| p.key_usages = vec![]),
                Some(|e| *e == SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::MissingDigitalSignature)),
                Some(|e| *e == SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::MissingDigitalSignature)),
            ),
            (
                "a leaf with keyCertSign",
                pki.leaf_with(|p| p.key_usages = vec![Ku::DigitalSignature, Ku::KeyCertSign]),
                Some(|e| *e == SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::LeafCanSign)),
                Some(|e| *e == SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::LeafCanSign)),
            ),
            (
                "EKU clientAuth only",
                pki.leaf_with(|p| p.extended_key_usages = vec![Eku::ClientAuth]),
                Some(|e| *e == SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::MissingServerAuth)),
                None,
            ),
            (
                "EKU serverAuth only",
                pki.leaf_with(|p| p.extended_key_usages = vec![Eku::ServerAuth]),
                None,
                Some(|e| *e == SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::MissingClientAuth)),
            ),
            (
                "a chain to another root",
                other.leaf(&workload("httpbin").to_string()),
                Some(|e| matches!(e, SpiffeTlsError::UnknownIssuer { trust_domain } if trust_domain == TD)),
                Some(|e| matches!(e, SpiffeTlsError::UnknownIssuer { .. })),
            ),
            (
                "a CA certificate as the leaf",
                pki.leaf_with(|p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                    p.key_usages = vec![Ku::DigitalSignature, Ku::KeyCertSign];
                }),
                Some(|e| *e == SpiffeTlsError::CaCertAsLeaf),
                Some(|e| *e == SpiffeTlsError::CaCertAsLeaf),
            ),
            (
                "an intermediate with CA:false",
                not_a_ca.leaf_with(|_| {}),
                Some(|e| invalid_chain(e, "EndEntityUsedAsCa")),
                Some(|e| invalid_chain(e, "EndEntityUsedAsCa")),
            ),
            (
                "an intermediate below a pathlen:0 intermediate",
                under_pathlen_0.leaf_with(|_| {}),
                Some(|e| invalid_chain(e, "PathLenConstraintViolated")),
                Some(|e| invalid_chain(e, "PathLenConstraintViolated")),
            ),
            (
                "an expired intermediate",
                expired_intermediate.leaf_with(|_| {}),
                Some(|e| matches!(e, SpiffeTlsError::Expired { not_after, now } if not_after < now)),
                Some(|e| matches!(e, SpiffeTlsError::Expired { .. })),
            ),
            (
                "an intermediate whose name constraints exclude the trust domain",
                uri_constrained.leaf_with(|_| {}),
                Some(|e| invalid_chain(e, "NameConstraintViolation")),
                Some(|e| invalid_chain(e, "NameConstraintViolation")),
            ),
            (
                "an intermediate with an unknown critical extension",
                unknown_critical.leaf_with(|_| {}),
                Some(|e| invalid_chain(e, "UnsupportedCriticalExtension")),
                Some(|e| invalid_chain(e, "UnsupportedCriticalExtension")),
            ),
        ];

        for (what, leaf, as_server, as_client) in &cases {
            // Presented by a server to a Warden client.
            let (c, s) = handshake(
                raw_server(leaf),
                client_config(good_client.clone(), ExpectedPeer::AnyInTrustDomain),
            )
            .await;
            match as_server {
                Some(check) => {
                    let err = spiffe_err(c.as_ref().err().unwrap_or_else(|| panic!("{what}: server accepted")));
                    assert!(check(&err), "{what} (server): wrong error: {err:?}");
                    assert!(s.is_err(), "{what}: the bad server should see the handshake fail");
                }
                None => assert!(c.is_ok(), "{what} (server): refused: {:?}", c.err()),
            }

            // Presented by a client to a Warden server.
            let (_c, s) = handshake(server_config(good_server.clone()), raw_client(leaf)).await;
            match as_client {
                Some(check) => {
                    let err = spiffe_err(s.as_ref().err().unwrap_or_else(|| panic!("{what}: client accepted")));
                    assert!(check(&err), "{what} (client): wrong error: {err:?}");
                }
                None => {
                    let s = s.unwrap_or_else(|e| panic!("{what} (client): refused: {e}"));
                    assert_eq!(peer_spiffe_id(s.get_ref().1), Some(workload("broken")));
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn secure_naming_refuses_a_server_with_another_identity() {
    bounded(async {
        let pki = Pki::new("mesh");
        let server = state(&pki.leaf(&workload("httpbin").to_string()), pki.bundle());
        let client = state(&pki.leaf(&workload("sleep").to_string()), pki.bundle());

        let (c, _s) = handshake(
            server_config(server.clone()),
            client_config(client.clone(), ExpectedPeer::Exact(workload("reviews"))),
        )
        .await;
        assert_eq!(
            spiffe_err(&c.expect_err("secure naming not enforced")),
            SpiffeTlsError::IdentityMismatch {
                expected: Box::new(workload("reviews")),
                presented: Box::new(workload("httpbin")),
            }
        );
        // The same workload in another namespace is another identity.
        let (c, _s) = handshake(
            server_config(server),
            client_config(
                client,
                ExpectedPeer::Exact(SpiffeId::new(TD, "prod", "httpbin").unwrap()),
            ),
        )
        .await;
        assert!(matches!(
            spiffe_err(&c.err().unwrap()),
            SpiffeTlsError::IdentityMismatch { .. }
        ));
    })
    .await
}

#[tokio::test]
async fn a_trust_domain_alias_is_accepted_only_once_configured() {
    bounded(async {
        let pki = Pki::new("mesh");
        let old_td_server = id("spiffe://old.example/ns/default/sa/httpbin");
        let server = state(&pki.leaf(&old_td_server.to_string()), pki.bundle());
        let client = state(&pki.leaf(&workload("sleep").to_string()), pki.bundle());
        let expected = ExpectedPeer::Exact(workload("httpbin"));

        let (c, _s) = handshake(
            server_config(server.clone()),
            client_config(client.clone(), expected.clone()),
        )
        .await;
        assert!(matches!(
            spiffe_err(&c.err().unwrap()),
            SpiffeTlsError::UntrustedTrustDomain { peer_trust_domain, .. } if peer_trust_domain == "old.example"
        ));

        client.set_trust_domain_aliases(["old.example"]).unwrap();
        // Secure naming across the alias: cluster.local/ns/default/sa/httpbin is expected,
        // old.example/ns/default/sa/httpbin is the same workload under the old name.
        let (c, s) = handshake(server_config(server), client_config(client, expected)).await;
        let c = c.unwrap();
        s.unwrap();
        assert_eq!(peer_spiffe_id(c.get_ref().1), Some(old_td_server));
    })
    .await
}

#[tokio::test]
async fn svid_rotation_keeps_open_connections_and_new_ones_use_the_new_certificate() {
    bounded(async {
        let pki = Pki::new("mesh");
        let (server_v1, server_v2) = (
            pki.leaf(&workload("httpbin").to_string()),
            pki.leaf(&workload("httpbin").to_string()),
        );
        let (client_v1, client_v2) = (
            pki.leaf(&workload("sleep").to_string()),
            pki.leaf(&workload("sleep").to_string()),
        );
        let server = state(&server_v1, pki.bundle());
        let client = state(&client_v1, pki.bundle());
        let (addr, mut seen) = echo_server(server_config(server.clone())).await;
        let config = || client_config(client.clone(), ExpectedPeer::Exact(workload("httpbin")));

        let mut open = connect(config(), addr).await.unwrap();
        roundtrip(&mut open, b"before rotation").await;
        assert_eq!(seen.recv().await.unwrap().unwrap(), client_v1.chain[0]);
        assert_eq!(presented_leaf(&open), server_v1.chain[0]);

        server.update_svid(server_v2.svid()).unwrap();
        client.update_svid(client_v2.svid()).unwrap();

        // The open connection is untouched: same session, bytes still flow both ways.
        roundtrip(&mut open, b"after rotation").await;
        assert_eq!(presented_leaf(&open), server_v1.chain[0]);

        // A new connection presents the new certificates, in both directions.
        let mut fresh = connect(config(), addr).await.unwrap();
        roundtrip(&mut fresh, b"new connection").await;
        assert_eq!(presented_leaf(&fresh), server_v2.chain[0]);
        assert_eq!(seen.recv().await.unwrap().unwrap(), client_v2.chain[0]);
        roundtrip(&mut open, b"still there").await;
    })
    .await
}

#[tokio::test]
async fn root_rotation_has_no_failed_handshake_then_the_old_root_is_refused() {
    bounded(async {
        let old = Pki::new("old");
        let new = Pki::new("new");
        let server_id = workload("httpbin");
        let client_id = workload("sleep");
        let server = state(&old.leaf(&server_id.to_string()), old.bundle());
        let client = state(&old.leaf(&client_id.to_string()), old.bundle());
        let (addr, mut seen) = echo_server(server_config(server.clone())).await;
        let to_server = |st: &Arc<IdentityState>| {
            client_config(st.clone(), ExpectedPeer::Exact(server_id.clone()))
        };

        let mut open = connect(to_server(&client), addr).await.unwrap();
        roundtrip(&mut open, b"old root").await;
        seen.recv().await.unwrap().unwrap();

        // Phase 1: everyone trusts both roots before anyone gets a certificate from the new one.
        let both = bundle_of(&[&old, &new]);
        server.update_bundle(both.clone()).unwrap();
        client.update_bundle(both.clone()).unwrap();
        // A workload already re-issued from the new root, next to one still on the old root.
        let newcomer = state(
            &new.leaf(&workload("productpage").to_string()),
            both.clone(),
        );

        let mut handshakes = 0;
        let peers = [("old-root client", &client), ("new-root client", &newcomer)];
        handshakes += check_all("both roots trusted", addr, &peers, &server_id, &mut seen).await;
        // Phase 2: the server moves to a certificate from the new root.
        server
            .update_svid(new.leaf(&server_id.to_string()).svid())
            .unwrap();
        handshakes += check_all("server on new root", addr, &peers, &server_id, &mut seen).await;
        // Phase 3: the client too.
        client
            .update_svid(new.leaf(&client_id.to_string()).svid())
            .unwrap();
        handshakes += check_all("everyone on new root", addr, &peers, &server_id, &mut seen).await;
        // Phase 4: the old root leaves the bundles.
        server.update_bundle(new.bundle()).unwrap();
        client.update_bundle(new.bundle()).unwrap();
        newcomer.update_bundle(new.bundle()).unwrap();
        handshakes += check_all("old root removed", addr, &peers, &server_id, &mut seen).await;
        assert_eq!(handshakes, 8);
        roundtrip(&mut open, b"open through the whole rotation").await;

        // Now a straggler still holding an old-root certificate is refused, as client…
        let straggler = state(&old.leaf(&workload("legacy").to_string()), both);
        let _ = connect(to_server(&straggler), addr).await;
        let refused = seen
            .recv()
            .await
            .unwrap()
            .expect_err("old-root client accepted");
        assert!(matches!(
            spiffe_err(&refused),
            SpiffeTlsError::UnknownIssuer { .. }
        ));
        // …and as server.
        let old_server = state(&old.leaf(&server_id.to_string()), old.bundle());
        let (c, _s) = handshake(server_config(old_server), to_server(&client)).await;
        assert!(matches!(
            spiffe_err(&c.err().unwrap()),
            SpiffeTlsError::UnknownIssuer { .. }
        ));
    })
    .await
}

#[tokio::test]
async fn alpn_follows_istio_and_is_configurable() {
    bounded(async {
        let pki = Pki::new("mesh");
        let server = state(&pki.leaf(&workload("httpbin").to_string()), pki.bundle());
        let client = state(&pki.leaf(&workload("sleep").to_string()), pki.bundle());
        let any = || ExpectedPeer::AnyInTrustDomain;

        // An Envoy HTTP/1.1 upstream offers istio-http/1.1, istio, http/1.1: the server picks
        // the protocol, not the bare mesh marker.
        let (c, _s) = handshake(
            server_config(server.clone()),
            client_config_with_alpn(
                client.clone(),
                any(),
                &[b"istio-http/1.1", b"istio", b"http/1.1"],
            ),
        )
        .await;
        assert_eq!(
            c.unwrap().get_ref().1.alpn_protocol(),
            Some(&b"http/1.1"[..])
        );

        let (c, _s) = handshake(
            server_config(server.clone()),
            client_config_with_alpn(client.clone(), any(), &[b"istio"]),
        )
        .await;
        assert_eq!(c.unwrap().get_ref().1.alpn_protocol(), Some(&b"istio"[..]));

        let (c, _s) = handshake(
            server_config(server.clone()),
            client_config_with_alpn(client.clone(), any(), &[]),
        )
        .await;
        assert_eq!(c.unwrap().get_ref().1.alpn_protocol(), None);

        let (_c, s) = handshake(
            server_config_with_alpn(server, &[b"h2"]),
            client_config_with_alpn(client, any(), &[b"http/1.1"]),
        )
        .await;
        let err = s.err().unwrap();
        assert!(matches!(
            err.get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>()),
            Some(rustls::Error::NoApplicationProtocol)
        ));
    })
    .await
}

#[tokio::test]
async fn without_an_svid_handshakes_fail_closed() {
    bounded(async {
        let pki = Pki::new("mesh");
        let bare = Arc::new(IdentityState::new(pki.bundle()).unwrap());
        let client = state(&pki.leaf(&workload("sleep").to_string()), pki.bundle());
        let (c, s) = handshake(
            server_config(bare.clone()),
            client_config(client.clone(), ExpectedPeer::AnyInTrustDomain),
        )
        .await;
        assert!(c.is_err() && s.is_err());

        let server = state(&pki.leaf(&workload("httpbin").to_string()), pki.bundle());
        let (_c, s) = handshake(
            server_config(server),
            client_config(bare, ExpectedPeer::AnyInTrustDomain),
        )
        .await;
        assert!(s.is_err(), "a client without certificate was accepted");
    })
    .await
}

// ---------------------------------------------------------------- OpenSSL as an outside peer

/// Whether the OpenSSL interop tests can run. Where they cannot, they are skipped with the
/// reason printed, except under CI (`CI` set, as every CI system does), where a missing
/// `openssl` is a failure: a CI job that silently skips interop proves nothing.
fn openssl_installed() -> bool {
    match openssl_check("openssl", std::env::var_os("CI")) {
        Ok(found) => found,
        Err(why) => panic!("{why}"),
    }
}

/// `Ok(true)`: `program` runs; `Ok(false)`: it does not and the test is skipped (reason
/// printed); `Err`: it does not and `ci` says this is CI.
fn openssl_check(program: &str, ci: Option<std::ffi::OsString>) -> Result<bool, String> {
    let works = matches!(
        std::process::Command::new(program)
            .arg("version")
            .stdin(Stdio::null())
            .output(),
        Ok(out) if out.status.success()
    );
    if works {
        return Ok(true);
    }
    let on_ci = ci.is_some_and(|v| {
        let v = v.to_string_lossy().trim().to_ascii_lowercase();
        !(v.is_empty() || v == "0" || v == "false")
    });
    if on_ci {
        Err(format!(
            "`{program}` is not installed, and CI is set: the OpenSSL interop tests must run \
             in CI (apt-get install openssl)"
        ))
    } else {
        eprintln!(
            "SKIPPED: `{program}` is not installed; CI installs it (apt-get install openssl)"
        );
        Ok(false)
    }
}

#[test]
fn a_missing_openssl_fails_under_ci_and_is_skipped_elsewhere() {
    let missing = "warden-test-no-such-openssl";
    let err = openssl_check(missing, Some("true".into())).unwrap_err();
    assert!(err.contains("CI is set"), "{err}");
    assert!(openssl_check(missing, Some("1".into())).is_err());
    assert_eq!(openssl_check(missing, None), Ok(false));
    assert_eq!(openssl_check(missing, Some("".into())), Ok(false));
    assert_eq!(openssl_check(missing, Some("false".into())), Ok(false));
}

/// A scratch directory for PEM files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("warden-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_string_lossy().into_owned()
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn openssl_s_server_accepts_a_warden_client() {
    if !openssl_installed() {
        return;
    }
    bounded(async {
        let pki = Pki::new("mesh");
        let server_id = workload("openssl-server");
        let server_leaf = pki.leaf(&server_id.to_string());
        let client = state(&pki.leaf(&workload("sleep").to_string()), pki.bundle());
        let dir = Scratch::new("s_server");
        let (cert, key) = (
            dir.write("server.pem", &server_leaf.pem),
            dir.write("server.key", &server_leaf.key.serialize_pem()),
        );
        let (chain, root) = (
            dir.write("inter.pem", &pki.inter.pem),
            dir.write("root.pem", &pki.root.pem),
        );

        let mut child = tokio::process::Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                "127.0.0.1:0",
                "-naccept",
                "1",
                "-rev",
            ])
            .args([
                "-cert",
                &cert,
                "-cert_chain",
                &chain,
                "-key",
                &key,
                "-CAfile",
                &root,
                "-Verify",
                "1",
            ])
            .args(["-verify_return_error", "-alpn", "istio-peer-exchange,istio"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        // s_server prints "ACCEPT 127.0.0.1:PORT" once it listens: that is the go signal.
        let port: u16 = loop {
            let line = out
                .next_line()
                .await
                .unwrap()
                .expect("s_server exited before listening");
            if let Some(addr) = line.strip_prefix("ACCEPT ") {
                break addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();

        let mut tls = connect(
            client_config(client, ExpectedPeer::Exact(server_id.clone())),
            addr,
        )
        .await
        .unwrap();
        tls.write_all(b"hello warden\n").await.unwrap();
        let mut reply = String::new();
        BufReader::new(&mut tls)
            .read_line(&mut reply)
            .await
            .unwrap();
        // -rev echoes reversed; an echo at all means s_server verified our certificate
        // (-Verify with -verify_return_error closes the connection otherwise).
        assert_eq!(reply.trim_end(), "nedraw olleh");
        assert_eq!(peer_spiffe_id(tls.get_ref().1), Some(server_id));
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"istio-peer-exchange"[..])
        );
        drop(tls);
        child.kill().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn openssl_s_client_connects_to_a_warden_server() {
    if !openssl_installed() {
        return;
    }
    bounded(async {
        let pki = Pki::new("mesh");
        let client_id = workload("openssl-client");
        let client_leaf = pki.leaf(&client_id.to_string());
        let server = state(&pki.leaf(&workload("httpbin").to_string()), pki.bundle());
        let dir = Scratch::new("s_client");
        let (cert, key) = (
            dir.write("client.pem", &client_leaf.pem),
            dir.write("client.key", &client_leaf.key.serialize_pem()),
        );
        let (chain, root) = (
            dir.write("inter.pem", &pki.inter.pem),
            dir.write("root.pem", &pki.root.pem),
        );

        for version in ["-tls1_3", "-tls1_2"] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let acceptor = TlsAcceptor::from(Arc::new(server_config(server.clone())));
            let served = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await?;
                let mut tls = acceptor.accept(tcp).await?;
                let peer = peer_spiffe_id(tls.get_ref().1);
                let mut line = String::new();
                BufReader::new(&mut tls).read_line(&mut line).await?;
                let who = peer.as_ref().map(|p| p.to_string()).unwrap_or_default();
                tls.write_all(format!("pong {} {who}\n", line.trim_end()).as_bytes())
                    .await?;
                tls.shutdown().await?;
                Ok::<_, std::io::Error>(peer)
            });

            let mut child = tokio::process::Command::new("openssl")
                .args(["s_client", "-connect", &addr.to_string(), version])
                .args([
                    "-cert",
                    &cert,
                    "-cert_chain",
                    &chain,
                    "-key",
                    &key,
                    "-CAfile",
                    &root,
                ])
                .args(["-verify_return_error", "-alpn", "istio-peer-exchange"])
                .current_dir(dir.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            // Stdin stays open until s_client has read our reply: on EOF it would hang up.
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"ping\n").await.unwrap();
            let mut stdout = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut stdout)
                .await
                .unwrap();
            drop(stdin);
            let status = child.wait().await.unwrap();

            let peer = served
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{version}: Warden server: {e}\n{stdout}"));
            assert_eq!(peer, Some(client_id.clone()), "{version}");
            assert!(
                stdout.contains(&format!("pong ping {client_id}")),
                "{version}: no reply\n{stdout}"
            );
            assert!(
                stdout.contains("Verify return code: 0 (ok)"),
                "{version}: s_client did not verify\n{stdout}"
            );
            assert!(
                stdout.contains("ALPN protocol: istio-peer-exchange"),
                "{version}\n{stdout}"
            );
            assert!(
                status.success() || status.code().is_some(),
                "{version}: s_client killed"
            );
        }
    })
    .await
}
