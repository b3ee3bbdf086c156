//! Peer certificate verification for the mesh: chain validation against the current trust
//! bundle (rustls-webpki), then the X.509-SVID rules of the SPIFFE spec, each failure its own
//! [`SpiffeTlsError`] variant; plus the rustls verifier types that run it at handshake time.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::SignatureScheme;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use x509_parser::extensions::GeneralName;

use super::state::{IdentityState, TrustSnapshot};
use super::ExpectedPeer;
use crate::spiffe::SpiffeId;

/// Why a peer (or a local SVID or bundle) was refused. Handshake failures reach rustls as
/// `Error::InvalidCertificate(CertificateError::Other(..))`; [`SpiffeTlsError::from_rustls`]
/// and [`SpiffeTlsError::from_io`] get the variant back for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeTlsError {
    #[error("peer certificate has no URI SAN; an X.509 SVID carries exactly one, its SPIFFE ID")]
    NoUriSan,
    #[error("peer certificate has {} URI SANs ({}); an X.509 SVID carries exactly one", .0.len(), .0.join(", "))]
    MultipleUriSans(Vec<String>),
    #[error("peer certificate's URI SAN \"{0}\" is not a spiffe:// ID")]
    NotSpiffe(String),
    #[error("peer SPIFFE ID \"{uri}\" is malformed: {reason}")]
    MalformedSpiffeId { uri: String, reason: String },
    #[error("peer SPIFFE ID {id} is in trust domain \"{peer_trust_domain}\", which is neither the mesh's (\"{trust_domain}\") nor one of its aliases")]
    UntrustedTrustDomain {
        id: SpiffeId,
        peer_trust_domain: String,
        trust_domain: String,
    },
    #[error("peer certificate expired at {} (now {})", unix_to_rfc3339(*.not_after), unix_to_rfc3339(*.now))]
    Expired { not_after: u64, now: u64 },
    #[error("peer certificate is not valid before {} (now {})", unix_to_rfc3339(*.not_before), unix_to_rfc3339(*.now))]
    NotYetValid { not_before: u64, now: u64 },
    #[error("peer certificate has the wrong key usage: {0}")]
    WrongKeyUsage(KeyUsageProblem),
    #[error("peer certificate does not chain to any root of the trust bundle of \"{trust_domain}\" (unknown issuer)")]
    UnknownIssuer { trust_domain: String },
    #[error("peer presented a CA certificate (basicConstraints CA:true) as its leaf")]
    CaCertAsLeaf,
    #[error("secure naming: expected the server to be {expected}, it presented {presented}")]
    IdentityMismatch {
        // Boxed: two IDs inline would make every `Result<_, SpiffeTlsError>` twice as big.
        expected: Box<SpiffeId>,
        presented: Box<SpiffeId>,
    },
    #[error("peer certificate chain is invalid: {0}")]
    InvalidChain(String),
    #[error("SVID refused, the current one stays in use: {0}")]
    InvalidSvid(String),
    #[error("trust bundle refused, the current one stays in use: {0}")]
    InvalidBundle(String),
}

/// Which key-usage rule of the X.509-SVID spec a leaf broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyUsageProblem {
    /// No keyUsage extension, or one without digitalSignature: the key may not sign the
    /// handshake.
    MissingDigitalSignature,
    /// keyCertSign or cRLSign on a leaf: the SPIFFE spec forbids leaves that can issue.
    LeafCanSign,
    /// An extendedKeyUsage without serverAuth on a certificate presented by a server.
    MissingServerAuth,
    /// An extendedKeyUsage without clientAuth on a certificate presented by a client.
    MissingClientAuth,
}

impl fmt::Display for KeyUsageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyUsageProblem::MissingDigitalSignature => "keyUsage lacks digitalSignature",
            KeyUsageProblem::LeafCanSign => "a leaf with keyCertSign or cRLSign",
            KeyUsageProblem::MissingServerAuth => {
                "extendedKeyUsage lacks serverAuth (certificate presented by a server)"
            }
            KeyUsageProblem::MissingClientAuth => {
                "extendedKeyUsage lacks clientAuth (certificate presented by a client)"
            }
        })
    }
}

impl SpiffeTlsError {
    /// The SPIFFE error inside a rustls error, if the handshake failed on one.
    pub fn from_rustls(err: &rustls::Error) -> Option<&SpiffeTlsError> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref::<SpiffeTlsError>()
            }
            _ => None,
        }
    }

    /// The SPIFFE error inside an I/O error as returned by tokio-rustls' accept/connect.
    pub fn from_io(err: &std::io::Error) -> Option<&SpiffeTlsError> {
        let inner = err.get_ref()?.downcast_ref::<rustls::Error>()?;
        Self::from_rustls(inner)
    }
}

impl From<SpiffeTlsError> for rustls::Error {
    fn from(e: SpiffeTlsError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

fn unix_to_rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

/// Which side of the handshake presented the certificate being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerRole {
    Server,
    Client,
}

/// Chain first, then SPIFFE: a certificate that does not chain to our roots says nothing we
/// can believe, so its SAN is only looked at once the signatures hold.
pub(crate) fn verify_peer(
    trust: &TrustSnapshot,
    algs: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, SpiffeTlsError> {
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| SpiffeTlsError::InvalidChain(format!("leaf does not parse: {e}")))?;
    let usage = match role {
        PeerRole::Server => webpki::KeyUsage::server_auth(),
        PeerRole::Client => webpki::KeyUsage::client_auth(),
    };
    ee.verify_for_usage(
        algs.all,
        &trust.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| map_webpki_error(e, trust, role))?;

    let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
        .map_err(|e| SpiffeTlsError::InvalidChain(format!("leaf does not parse: {e}")))?;
    check_leaf_key_usage(&cert)?;
    let id = spiffe_id_of(&cert)?;
    if !trust.accepts_trust_domain(id.trust_domain()) {
        return Err(SpiffeTlsError::UntrustedTrustDomain {
            peer_trust_domain: id.trust_domain().to_string(),
            trust_domain: trust.trust_domain.clone(),
            id,
        });
    }
    Ok(id)
}

fn map_webpki_error(e: webpki::Error, trust: &TrustSnapshot, role: PeerRole) -> SpiffeTlsError {
    match e {
        webpki::Error::CertExpired { time, not_after } => SpiffeTlsError::Expired {
            not_after: not_after.as_secs(),
            now: time.as_secs(),
        },
        webpki::Error::CertNotValidYet { time, not_before } => SpiffeTlsError::NotYetValid {
            not_before: not_before.as_secs(),
            now: time.as_secs(),
        },
        webpki::Error::UnknownIssuer => SpiffeTlsError::UnknownIssuer {
            trust_domain: trust.trust_domain.clone(),
        },
        webpki::Error::CaUsedAsEndEntity => SpiffeTlsError::CaCertAsLeaf,
        webpki::Error::RequiredEkuNotFoundContext(_) | webpki::Error::EmptyEkuExtension => {
            SpiffeTlsError::WrongKeyUsage(match role {
                PeerRole::Server => KeyUsageProblem::MissingServerAuth,
                PeerRole::Client => KeyUsageProblem::MissingClientAuth,
            })
        }
        other => SpiffeTlsError::InvalidChain(format!("{other:?}")),
    }
}

/// webpki ignores keyUsage on leaves (as browsers do); the SPIFFE spec does not: a leaf must
/// sign (digitalSignature) and must not issue (keyCertSign, cRLSign).
fn check_leaf_key_usage(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<(), SpiffeTlsError> {
    let ku = cert
        .key_usage()
        .map_err(|e| SpiffeTlsError::InvalidChain(format!("leaf keyUsage: {e}")))?;
    let Some(ku) = ku else {
        return Err(SpiffeTlsError::WrongKeyUsage(
            KeyUsageProblem::MissingDigitalSignature,
        ));
    };
    if !ku.value.digital_signature() {
        return Err(SpiffeTlsError::WrongKeyUsage(
            KeyUsageProblem::MissingDigitalSignature,
        ));
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SpiffeTlsError::WrongKeyUsage(KeyUsageProblem::LeafCanSign));
    }
    Ok(())
}

/// The one SPIFFE ID a leaf names. Other SAN types (DNS, IP) are allowed by the spec and
/// ignored; URIs are not, because a second URI would be a second identity.
pub(crate) fn spiffe_id_of(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<SpiffeId, SpiffeTlsError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SpiffeTlsError::InvalidChain(format!("leaf subjectAltName: {e}")))?;
    let mut uris = san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let uri = match uris.len() {
        0 => return Err(SpiffeTlsError::NoUriSan),
        1 => uris.remove(0),
        _ => return Err(SpiffeTlsError::MultipleUriSans(uris)),
    };
    if !uri.starts_with("spiffe://") {
        return Err(SpiffeTlsError::NotSpiffe(uri));
    }
    uri.parse::<SpiffeId>()
        .map_err(|e| SpiffeTlsError::MalformedSpiffeId {
            reason: e.to_string(),
            uri,
        })
}

/// Checks the certificate a server presents to a Warden client: chain, SPIFFE rules, then
/// secure naming against the identity the client meant to reach.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    pub(crate) state: Arc<IdentityState>,
    pub(crate) expected: ExpectedPeer,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // SVIDs carry no DNS names: the server name is only a routing hint, never checked.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Loaded per handshake so that a bundle update applies from the next connection on.
        let trust = self.state.trust();
        let algs = &self.state.provider().signature_verification_algorithms;
        let presented = verify_peer(
            &trust,
            algs,
            end_entity,
            intermediates,
            now,
            PeerRole::Server,
        )?;
        if let ExpectedPeer::Exact(expected) = &self.expected {
            if !trust.same_workload(expected, &presented) {
                return Err(SpiffeTlsError::IdentityMismatch {
                    expected: Box::new(expected.clone()),
                    presented: Box::new(presented),
                }
                .into());
            }
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
            &self.state.provider().signature_verification_algorithms,
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
            &self.state.provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.state
            .provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks the certificate a client presents to a Warden server. Client certificates are
/// mandatory: mesh traffic without a peer identity is not mTLS.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    pub(crate) state: Arc<IdentityState>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would have to borrow from a bundle that can be swapped under us; mesh clients
        // (Envoy, OpenSSL, rustls) send their one certificate without them anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let trust = self.state.trust();
        let algs = &self.state.provider().signature_verification_algorithms;
        verify_peer(
            &trust,
            algs,
            end_entity,
            intermediates,
            now,
            PeerRole::Client,
        )?;
        Ok(ClientCertVerified::assertion())
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
            &self.state.provider().signature_verification_algorithms,
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
            &self.state.provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.state
            .provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Hands rustls the SVID that is current when a handshake starts, on both sides.
#[derive(Debug)]
pub(crate) struct SvidResolver {
    pub(crate) state: Arc<IdentityState>,
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(
        &self,
        _client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.state.certified_key()
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let key = self.state.certified_key()?;
        // rustls needs a scheme the server accepts; without one, sending the SVID is pointless.
        key.key.choose_scheme(sigschemes)?;
        Some(key)
    }

    fn has_certs(&self) -> bool {
        self.state.certified_key().is_some()
    }
}
