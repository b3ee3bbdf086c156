//! The identity a workload holds right now — its SVID and the roots and trust domains it trusts —
//! shared by every TLS configuration built from it and swapped atomically on rotation.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor};
use rustls::sign::CertifiedKey;

use super::verify::{spiffe_id_of, SpiffeTlsError};
use crate::spiffe::{valid_trust_domain, SpiffeId};
use crate::svid::{Svid, TrustBundle};

/// The SVID and trust bundle a workload uses for mesh TLS. Every config from
/// [`server_config`](super::server_config) / [`client_config`](super::client_config) reads it
/// at the start of each handshake, so an update applies to the next connection while listeners
/// and open connections are left alone.
///
/// Reads are lock-free (`arc-swap`): the handshake path takes no lock that a rotation could
/// hold, however many handshakes run at once.
pub struct IdentityState {
    provider: Arc<CryptoProvider>,
    svid: ArcSwapOption<LoadedSvid>,
    trust: ArcSwap<TrustSnapshot>,
    // Writers are rare (the CA client, bundle distribution); serialising them keeps an alias
    // update from racing a bundle update and losing one of the two. Readers never take it.
    writers: Mutex<()>,
}

struct LoadedSvid {
    id: SpiffeId,
    not_after: SystemTime,
    key: Arc<CertifiedKey>,
}

/// One consistent view of what a workload trusts, as a verifier sees it for one handshake.
pub(crate) struct TrustSnapshot {
    pub(crate) trust_domain: String,
    pub(crate) aliases: Vec<String>,
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
    roots_der: Vec<Vec<u8>>,
}

impl TrustSnapshot {
    pub(crate) fn accepts_trust_domain(&self, td: &str) -> bool {
        self.trust_domain == td || self.aliases.iter().any(|a| a == td)
    }

    /// Secure naming with aliases, as Istio expands them: the same namespace and service
    /// account under the mesh's trust domain or any alias is the same workload.
    pub(crate) fn same_workload(&self, expected: &SpiffeId, presented: &SpiffeId) -> bool {
        expected == presented
            || (expected.namespace() == presented.namespace()
                && expected.service_account() == presented.service_account()
                && self.accepts_trust_domain(expected.trust_domain())
                && self.accepts_trust_domain(presented.trust_domain()))
    }
}

impl IdentityState {
    /// A state that trusts `bundle` but has no SVID yet: handshakes fail (closed) until
    /// [`update_svid`](Self::update_svid) succeeds.
    pub fn new(bundle: TrustBundle) -> Result<Self, SpiffeTlsError> {
        let trust = build_trust(bundle, Vec::new())?;
        Ok(IdentityState {
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            svid: ArcSwapOption::empty(),
            trust: ArcSwap::from_pointee(trust),
            writers: Mutex::new(()),
        })
    }

    /// Withdraws the SVID (it expired and no new one could be had): handshakes fail closed
    /// until the next [`update_svid`](Self::update_svid).
    pub fn clear_svid(&self) {
        let _w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        self.svid.store(None);
    }

    /// A state with its first SVID.
    pub fn with_svid(svid: Svid, bundle: TrustBundle) -> Result<Self, SpiffeTlsError> {
        let state = IdentityState::new(bundle)?;
        state.update_svid(svid)?;
        Ok(state)
    }

    /// Installs a new SVID for the next handshakes. Refused — the current one stays — when the
    /// chain is empty, the key does not parse or does not match the leaf, or the leaf does not
    /// name exactly `svid.id`: peers would reject it, or worse, see someone else.
    pub fn update_svid(&self, svid: Svid) -> Result<(), SpiffeTlsError> {
        let loaded = self.load_svid(svid)?;
        let _w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        self.svid.store(Some(Arc::new(loaded)));
        Ok(())
    }

    /// Installs a new trust bundle for the next handshakes (during a root rotation it holds the
    /// old and the new root). Trust-domain aliases are kept. Refused — the current bundle
    /// stays — when the trust domain is invalid, there is no root, or a root is not a CA
    /// certificate.
    pub fn update_bundle(&self, bundle: TrustBundle) -> Result<(), SpiffeTlsError> {
        let _w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let aliases = self.trust.load().aliases.clone();
        let trust = build_trust(bundle, aliases)?;
        self.trust.store(Arc::new(trust));
        Ok(())
    }

    /// Other trust domains whose workloads are accepted as this mesh's (Istio's
    /// `trustDomainAliases`), e.g. the old name during a trust-domain migration. They share
    /// the bundle's roots.
    pub fn set_trust_domain_aliases<I, S>(&self, aliases: I) -> Result<(), SpiffeTlsError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let aliases: Vec<String> = aliases.into_iter().map(Into::into).collect();
        if let Some(bad) = aliases.iter().find(|a| !valid_trust_domain(a)) {
            return Err(SpiffeTlsError::InvalidBundle(format!(
                "trust domain alias \"{bad}\" is not a valid trust domain"
            )));
        }
        let _w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.trust.load();
        self.trust.store(Arc::new(TrustSnapshot {
            trust_domain: cur.trust_domain.clone(),
            aliases,
            anchors: cur.anchors.clone(),
            roots_der: cur.roots_der.clone(),
        }));
        Ok(())
    }

    /// The identity presented in new handshakes, if any.
    pub fn svid_id(&self) -> Option<SpiffeId> {
        self.svid.load().as_ref().map(|s| s.id.clone())
    }

    /// When the SVID presented in new handshakes expires, if there is one.
    pub fn svid_not_after(&self) -> Option<SystemTime> {
        self.svid.load().as_ref().map(|s| s.not_after)
    }

    /// The bundle new handshakes verify peers against.
    pub fn trust_bundle(&self) -> TrustBundle {
        let t = self.trust.load();
        TrustBundle {
            trust_domain: t.trust_domain.clone(),
            roots_der: t.roots_der.clone(),
        }
    }

    /// The trust-domain aliases currently accepted.
    pub fn trust_domain_aliases(&self) -> Vec<String> {
        self.trust.load().aliases.clone()
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    pub(crate) fn trust(&self) -> Arc<TrustSnapshot> {
        self.trust.load_full()
    }

    pub(crate) fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.svid.load().as_ref().map(|s| s.key.clone())
    }

    fn load_svid(&self, svid: Svid) -> Result<LoadedSvid, SpiffeTlsError> {
        let Some(leaf) = svid.cert_chain_der.first() else {
            return Err(SpiffeTlsError::InvalidSvid(
                "empty certificate chain".into(),
            ));
        };
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| SpiffeTlsError::InvalidSvid(format!("leaf does not parse: {e}")))?;
        let named = spiffe_id_of(&cert).map_err(|e| SpiffeTlsError::InvalidSvid(e.to_string()))?;
        if named != svid.id {
            return Err(SpiffeTlsError::InvalidSvid(format!(
                "the leaf names {named}, the SVID claims {}",
                svid.id
            )));
        }
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8_der));
        let certified = CertifiedKey::from_der(chain, key, &self.provider)
            .map_err(|e| SpiffeTlsError::InvalidSvid(format!("key: {e}")))?;
        Ok(LoadedSvid {
            id: svid.id,
            not_after: svid.not_after,
            key: Arc::new(certified),
        })
    }
}

fn build_trust(bundle: TrustBundle, aliases: Vec<String>) -> Result<TrustSnapshot, SpiffeTlsError> {
    if !valid_trust_domain(&bundle.trust_domain) {
        return Err(SpiffeTlsError::InvalidBundle(format!(
            "\"{}\" is not a valid trust domain",
            bundle.trust_domain
        )));
    }
    if bundle.roots_der.is_empty() {
        return Err(SpiffeTlsError::InvalidBundle(format!(
            "no root for trust domain \"{}\"",
            bundle.trust_domain
        )));
    }
    let mut anchors = Vec::with_capacity(bundle.roots_der.len());
    for (i, der) in bundle.roots_der.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| SpiffeTlsError::InvalidBundle(format!("root #{i} does not parse: {e}")))?;
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(SpiffeTlsError::InvalidBundle(format!(
                "root #{i} ({}) is not a CA certificate",
                cert.subject()
            )));
        }
        let der = CertificateDer::from(der.as_slice());
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| SpiffeTlsError::InvalidBundle(format!("root #{i}: {e:?}")))?;
        anchors.push(anchor.to_owned());
    }
    Ok(TrustSnapshot {
        trust_domain: bundle.trust_domain,
        aliases,
        anchors,
        roots_der: bundle.roots_der,
    })
}

impl std::fmt::Debug for IdentityState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.trust.load();
        f.debug_struct("IdentityState")
            .field("svid", &self.svid_id().map(|i| i.to_string()))
            .field("trust_domain", &t.trust_domain)
            .field("aliases", &t.aliases)
            .field("roots", &t.roots_der.len())
            .finish_non_exhaustive()
    }
}
