//! SPIFFE-aware mutual TLS for the mesh (rustls, aws-lc-rs): server and client configurations
//! that present the workload's current SVID, verify peers against the current trust bundle by
//! SPIFFE ID (never by DNS name), enforce secure naming on the client side, and pick up SVID
//! and bundle rotations on the next handshake. Also owns the mesh ALPN values and reading the
//! verified peer identity off a connection.
//!
//! Session resumption is off on both sides, deliberately: a resumed session skips certificate
//! verification and the server's certificate, so it would outlive a root removed from the
//! bundle and keep showing a rotated-out SVID. Every mesh connection is a full handshake.

mod state;
mod verify;

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, CommonState, ServerConfig};

pub use self::state::IdentityState;
pub use self::verify::{KeyUsageProblem, SpiffeTlsError};
use self::verify::{SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver};
use crate::spiffe::SpiffeId;

/// Istio's ALPN for TCP traffic with metadata exchange between sidecars.
pub const ALPN_ISTIO_PEER_EXCHANGE: &[u8] = b"istio-peer-exchange";
/// Istio's ALPN marking in-mesh traffic.
pub const ALPN_ISTIO: &[u8] = b"istio";
/// HTTP/2 over TLS.
pub const ALPN_H2: &[u8] = b"h2";
/// HTTP/1.1.
pub const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// What a Warden client offers, in Istio's order (its sidecars offer `istio-peer-exchange`,
/// `istio`, then the HTTP protocol).
pub const DEFAULT_CLIENT_ALPN: &[&[u8]] =
    &[ALPN_ISTIO_PEER_EXCHANGE, ALPN_ISTIO, ALPN_H2, ALPN_HTTP_1_1];

/// What a Warden server accepts, most preferred first. The server picks the first of these
/// the client offered, so the HTTP protocols come before the bare `istio` marker: a client
/// offering `istio-http/1.1, istio, http/1.1` gets `http/1.1`, which tells the proxy what
/// follows. Like Istio's inbound listener, `istio-peer-exchange` wins when offered.
pub const DEFAULT_SERVER_ALPN: &[&[u8]] =
    &[ALPN_ISTIO_PEER_EXCHANGE, ALPN_H2, ALPN_HTTP_1_1, ALPN_ISTIO];

/// Whom a client expects to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Secure naming: the server must present exactly this identity (or the same namespace and
    /// service account under a trust-domain alias).
    Exact(SpiffeId),
    /// Any workload of the mesh's trust domain or an alias. For tests and tools, not for
    /// proxying to a known destination.
    AnyInTrustDomain,
}

/// An mTLS server configuration: presents the current SVID, requires a client certificate
/// that verifies against the current bundle, offers [`DEFAULT_SERVER_ALPN`].
pub fn server_config(state: Arc<IdentityState>) -> ServerConfig {
    server_config_with_alpn(state, DEFAULT_SERVER_ALPN)
}

/// [`server_config`] accepting the given ALPN protocols, most preferred first. An empty list
/// negotiates no ALPN; a non-empty one refuses clients that offer ALPN but none of these
/// (rustls answers `no_application_protocol`, per RFC 7301).
pub fn server_config_with_alpn(state: Arc<IdentityState>, alpn: &[&[u8]]) -> ServerConfig {
    let provider = state.provider().clone();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // Only fails for a provider without cipher suites for TLS 1.2/1.3; aws-lc-rs's
        // default provider has both.
        .expect("aws-lc-rs default provider supports TLS 1.2 and 1.3")
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
            state: state.clone(),
        }))
        .with_cert_resolver(Arc::new(SvidResolver { state }));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config
}

/// An mTLS client configuration: presents the current SVID, verifies the server against the
/// current bundle and `expected`, offers [`DEFAULT_CLIENT_ALPN`]. The `ServerName` given to
/// `connect` is not checked (SVIDs carry no DNS names); an IP address keeps SNI off the wire.
pub fn client_config(state: Arc<IdentityState>, expected: ExpectedPeer) -> ClientConfig {
    client_config_with_alpn(state, expected, DEFAULT_CLIENT_ALPN)
}

/// [`client_config`] offering the given ALPN protocols, most preferred first (empty: none).
pub fn client_config_with_alpn(
    state: Arc<IdentityState>,
    expected: ExpectedPeer,
    alpn: &[&[u8]],
) -> ClientConfig {
    let provider = state.provider().clone();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs default provider supports TLS 1.2 and 1.3")
        // "dangerous" only in rustls' sense: a custom verifier instead of WebPKI hostnames.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            state: state.clone(),
            expected,
        }))
        .with_client_cert_resolver(Arc::new(SvidResolver { state }));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = Resumption::disabled();
    config
}

/// The SPIFFE ID of the peer of an established connection, for authorization (Istio's
/// `source.principal`). `None` while the handshake is still running or when the peer sent no
/// certificate: both mean "no authenticated peer". With Warden's configurations the peer
/// certificate has been verified by the time the handshake completes.
pub fn peer_spiffe_id(conn: &CommonState) -> Option<SpiffeId> {
    if conn.is_handshaking() {
        return None;
    }
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    verify::spiffe_id_of(&cert).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::TrustBundle;

    #[test]
    fn bad_bundles_are_refused_and_the_last_good_one_stays() {
        let ca = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&ca).unwrap().der().to_vec();
        let good = TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_der: vec![root.clone()],
        };
        let state = IdentityState::new(good.clone()).unwrap();

        let leaf = rcgen::CertificateParams::default()
            .self_signed(&ca)
            .unwrap()
            .der()
            .to_vec();
        for bad in [
            TrustBundle {
                trust_domain: "cluster.local".into(),
                roots_der: vec![],
            },
            TrustBundle {
                trust_domain: "Bad Domain".into(),
                roots_der: vec![root.clone()],
            },
            TrustBundle {
                trust_domain: "cluster.local".into(),
                roots_der: vec![b"not der".to_vec()],
            },
            TrustBundle {
                trust_domain: "cluster.local".into(),
                roots_der: vec![leaf],
            },
        ] {
            let err = state.update_bundle(bad.clone()).unwrap_err();
            assert!(
                matches!(err, SpiffeTlsError::InvalidBundle(_)),
                "{bad:?}: {err}"
            );
            assert_eq!(state.trust_bundle(), good);
        }
        assert!(state.set_trust_domain_aliases(["UPPER"]).is_err());
        state.set_trust_domain_aliases(["old.local"]).unwrap();
        state.update_bundle(good.clone()).unwrap();
        assert_eq!(state.trust_domain_aliases(), vec!["old.local".to_string()]);
    }

    #[test]
    fn an_svid_naming_someone_else_or_with_the_wrong_key_is_refused() {
        let ca = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&ca).unwrap().der().to_vec();
        let issuer = rcgen::Issuer::new(params, &ca);
        let state = IdentityState::new(TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_der: vec![root],
        })
        .unwrap();

        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::default();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        let cert = leaf.signed_by(&key, &issuer).unwrap().der().to_vec();
        let svid = |id: &SpiffeId, key_der: Vec<u8>| crate::svid::Svid {
            id: id.clone(),
            cert_chain_der: vec![cert.clone()],
            key_pkcs8_der: key_der,
            not_before: std::time::SystemTime::UNIX_EPOCH,
            not_after: std::time::SystemTime::UNIX_EPOCH,
        };
        let other: SpiffeId = "spiffe://cluster.local/ns/a/sa/c".parse().unwrap();
        let wrong_key = rcgen::KeyPair::generate().unwrap().serialize_der();
        for bad in [
            svid(&other, key.serialize_der()),
            svid(&id, wrong_key),
            svid(&id, vec![1, 2, 3]),
        ] {
            let err = state.update_svid(bad).unwrap_err();
            assert!(matches!(err, SpiffeTlsError::InvalidSvid(_)), "{err}");
            assert_eq!(state.svid_id(), None);
        }
        state.update_svid(svid(&id, key.serialize_der())).unwrap();
        assert_eq!(state.svid_id(), Some(id));
    }

    #[test]
    fn spiffe_errors_survive_the_trip_through_rustls_and_io_errors() {
        let e: rustls::Error = SpiffeTlsError::NoUriSan.into();
        assert_eq!(
            SpiffeTlsError::from_rustls(&e),
            Some(&SpiffeTlsError::NoUriSan)
        );
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            SpiffeTlsError::from_io(&io),
            Some(&SpiffeTlsError::NoUriSan)
        );
        let expired = SpiffeTlsError::Expired {
            not_after: 0,
            now: 86_400,
        };
        assert_eq!(
            expired.to_string(),
            "peer certificate expired at 1970-01-01T00:00:00Z (now 1970-01-02T00:00:00Z)"
        );
    }
}
