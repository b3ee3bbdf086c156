//! Warden's certificate authority: creating and loading a CA directory (Warden's own layout or
//! Istio's plug-in `cacerts` layout), issuing X.509 SVIDs from CSRs, the trust bundle, and
//! root rotation. Owns the on-disk format (`ca.json`) and the one error type, [`CaError`],
//! shared by `csr` and `inspect`.
//!
//! Warden layout: `root-cert.pem`, `root-key.pem` (0600), `ca.json`. Plug-in layout (Istio's
//! `cacerts`): `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`, optionally a
//! `ca.json` carrying the trust domain and TTL policy.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::inspect::{rfc3339, verify_chain};
use crate::spiffe::{valid_trust_domain, SpiffeId};
use crate::svid::TrustBundle;

/// Lifetime of a workload certificate when the caller asks for none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload certificate lifetime unless `ca.json` says otherwise.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
/// No TTL policy may allow workload certificates to live longer than this. Root rotation keeps
/// the old root for max TTL after the switch, so this also bounds how long a replaced root key
/// stays trusted.
pub const MAX_TTL_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far certificates are back-dated, so that peers whose clocks lag still accept them.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Validity of a root created by `init` or `rotate_root`.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const METADATA_FILE: &str = "ca.json";
pub const PLUGIN_CERT_FILE: &str = "ca-cert.pem";
pub const PLUGIN_KEY_FILE: &str = "ca-key.pem";
pub const PLUGIN_CHAIN_FILE: &str = "cert-chain.pem";

/// Everything that can go wrong in the CA, CSR and inspection code. Messages name the file,
/// field or input at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("{} already exists; refusing to overwrite an existing CA", .0.display())]
    AlreadyExists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no CA: expected root-cert.pem, root-key.pem and ca.json (Warden) or ca-cert.pem, ca-key.pem, root-cert.pem and cert-chain.pem (Istio plug-in cacerts)", .0.display())]
    NoCa(PathBuf),
    #[error("{} holds both a Warden root key (root-key.pem) and an Istio plug-in CA (ca-cert.pem); keep one layout per directory", .0.display())]
    AmbiguousLayout(PathBuf),
    #[error("{}: {message}", path.display())]
    Metadata { path: PathBuf, message: String },
    #[error("{what}: malformed PEM: {message}")]
    BadPem { what: String, message: String },
    #[error("{what}: {message}")]
    BadCertificate { what: String, message: String },
    #[error("{}: {message}", path.display())]
    BadKey { path: PathBuf, message: String },
    #[error("{} does not hold the private key of the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: not usable as a signing CA certificate: {reason}", path.display())]
    NotCaCert { path: PathBuf, reason: String },
    #[error("{}: certificate is not valid now (valid from {not_before} to {not_after})", path.display())]
    CaCertNotValid {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },
    #[error("{} does not chain to a root in {}: {reason}", path.display(), root.display())]
    ChainBroken {
        path: PathBuf,
        root: PathBuf,
        reason: String,
    },
    #[error("trust domain unknown for the plug-in CA in {}: pass --trust-domain or add a ca.json with \"trust_domain\"", .0.display())]
    TrustDomainRequired(PathBuf),
    #[error(
        "invalid trust domain {0:?}: lowercase letters, digits, '.', '-', '_' (1-255 characters)"
    )]
    BadTrustDomain(String),
    #[error("{}: trust domain is {in_file:?} but {given:?} was given", path.display())]
    TrustDomainMismatch {
        path: PathBuf,
        in_file: String,
        given: String,
    },
    #[error("invalid TTL policy: {0}")]
    BadTtl(String),
    #[error("malformed CSR: {0}")]
    BadCsr(String),
    #[error("CSR signature does not verify with the CSR's own public key")]
    BadCsrSignature,
    #[error("CSR asks for identity {requested}, but the caller is entitled only to {entitled}")]
    IdentityNotEntitled { requested: String, entitled: String },
    #[error("CSR asks for a {kind} SAN ({value}); an X.509 SVID carries only its SPIFFE ID")]
    ForbiddenSan { kind: &'static str, value: String },
    #[error("unsupported key in CSR: {0} (allowed: ECDSA P-256, ECDSA P-384, RSA 2048-8192 bits)")]
    UnsupportedKey(String),
    #[error("{id} is outside this CA's trust domain {trust_domain:?}")]
    ForeignTrustDomain { id: String, trust_domain: String },
    #[error("the signing CA certificate is not valid at {now} (valid from {not_before} to {not_after}); replace or rotate it")]
    IssuerNotValid {
        now: String,
        not_before: String,
        not_after: String,
    },
    #[error("root rotation is only for Warden-managed roots; {} holds an Istio plug-in CA whose root belongs to your own PKI: rotate it there and replace the cacerts files", .0.display())]
    RotationUnsupported(PathBuf),
    #[error("key generation or signing failed: {0}")]
    Crypto(String),
}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        CaError::Crypto(e.to_string())
    }
}

/// Key algorithms Warden generates, for CA roots and for workload keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlg {
    #[serde(rename = "ec-p256")]
    EcP256,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

impl KeyAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::EcP256 => "ec-p256",
            KeyAlg::Rsa2048 => "rsa-2048",
        }
    }

    /// A fresh key pair, in memory.
    pub fn generate(self) -> Result<KeyPair, CaError> {
        Ok(match self {
            KeyAlg::EcP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            KeyAlg::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?
            }
        })
    }

    fn of_key(key: &KeyPair) -> Option<KeyAlg> {
        let alg = key.algorithm();
        if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
            Some(KeyAlg::EcP256)
        } else if alg == &rcgen::PKCS_RSA_SHA256 {
            Some(KeyAlg::Rsa2048)
        } else {
            None
        }
    }
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ec-p256" => Ok(KeyAlg::EcP256),
            "rsa-2048" => Ok(KeyAlg::Rsa2048),
            _ => Err(format!(
                "unknown key algorithm {s:?}: expected ec-p256 or rsa-2048"
            )),
        }
    }
}

/// How long issued certificates live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Used when the CSR's caller asks for no particular lifetime.
    pub default_ttl: Duration,
    /// No certificate lives longer, whatever is asked; root rotation relies on it.
    pub max_ttl: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
        }
    }
}

impl TtlPolicy {
    fn validate(&self) -> Result<(), CaError> {
        if self.default_ttl.as_secs() == 0 || self.max_ttl.as_secs() == 0 {
            return Err(CaError::BadTtl(
                "default and maximum TTL must be at least one second".into(),
            ));
        }
        if self.max_ttl > MAX_TTL_LIMIT {
            return Err(CaError::BadTtl(format!(
                "maximum TTL {}s is longer than the limit of {}s (365 days)",
                self.max_ttl.as_secs(),
                MAX_TTL_LIMIT.as_secs()
            )));
        }
        if self.default_ttl > self.max_ttl {
            return Err(CaError::BadTtl(format!(
                "default TTL {}s is longer than the maximum {}s",
                self.default_ttl.as_secs(),
                self.max_ttl.as_secs()
            )));
        }
        Ok(())
    }

    /// `validate`, and no certificate may be promised a lifetime beyond what is left of the
    /// certificate that signs it (`signer_path`, valid until `not_after`).
    fn validate_within(
        &self,
        signer_path: &Path,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<(), CaError> {
        self.validate()?;
        let left = not_after.duration_since(now).unwrap_or_default();
        if self.max_ttl > left {
            return Err(CaError::BadTtl(format!(
                "maximum TTL {}s is longer than the {}s left on the signing certificate {} \
                 (valid until {}); lower the maximum TTL, or rotate or replace that certificate",
                self.max_ttl.as_secs(),
                left.as_secs(),
                signer_path.display(),
                rfc3339(not_after)
            )));
        }
        Ok(())
    }
}

/// Which directory layout a CA was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Warden's own self-signed root.
    Warden,
    /// Istio's plug-in `cacerts`: Warden signs as an intermediate of the user's PKI.
    PlugIn,
}

/// A certificate issued from a CSR, ready for Istio's `CreateCertificate` response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    /// The leaf, then the intermediates up to (not including) the root.
    pub cert_chain_pem: Vec<String>,
    /// Every root a peer should trust, the signing root first.
    pub root_bundle_pem: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// `ca.json`. Roots are listed so that a rotation survives restarts: the current one
/// (no `retire_after`, equal to `root-cert.pem`) and the retiring ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    trust_domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_alg: Option<KeyAlg>,
    #[serde(default = "default_ttl_secs")]
    default_ttl_seconds: u64,
    #[serde(default = "default_max_ttl_secs")]
    max_ttl_seconds: u64,
    #[serde(default)]
    roots: Vec<RootRecord>,
}

fn default_ttl_secs() -> u64 {
    DEFAULT_TTL.as_secs()
}
fn default_max_ttl_secs() -> u64 {
    DEFAULT_MAX_TTL.as_secs()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootRecord {
    cert_pem: String,
    /// RFC 3339; absent for the root that signs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retire_after: Option<String>,
}

/// One trusted root.
#[derive(Debug, Clone)]
struct Root {
    der: Vec<u8>,
    retire_after: Option<SystemTime>,
}

/// A loaded certificate authority. Signing state (key, issuer name, key identifier, chain) is
/// parsed once at load so that issuance only parses the CSR and signs.
pub struct Ca {
    dir: PathBuf,
    layout: Layout,
    trust_domain: String,
    key_alg: Option<KeyAlg>,
    policy: TtlPolicy,
    issuer: Issuer<'static, KeyPair>,
    issuer_not_before: SystemTime,
    issuer_not_after: SystemTime,
    /// Certificates after the leaf in every issued chain.
    chain_pem: Vec<String>,
    roots: Vec<Root>,
    /// `roots` encoded once, since every issuance returns them.
    roots_pem: Vec<String>,
}

impl fmt::Debug for Ca {
    // The signing key must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("layout", &self.layout)
            .field("trust_domain", &self.trust_domain)
            .field("key_alg", &self.key_alg)
            .field("policy", &self.policy)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Create a Warden CA in `dir` with the default TTL policy.
    pub fn init(dir: &Path, trust_domain: &str, alg: KeyAlg) -> Result<Ca, CaError> {
        Ca::init_with(
            dir,
            trust_domain,
            alg,
            TtlPolicy::default(),
            SystemTime::now(),
        )
    }

    /// Create a Warden CA in `dir`: a self-signed root, its key (0600) and `ca.json`.
    /// Refuses if any CA file is already there.
    pub fn init_with(
        dir: &Path,
        trust_domain: &str,
        alg: KeyAlg,
        policy: TtlPolicy,
        now: SystemTime,
    ) -> Result<Ca, CaError> {
        if !valid_trust_domain(trust_domain) {
            return Err(CaError::BadTrustDomain(trust_domain.into()));
        }
        policy.validate()?;
        for name in [
            ROOT_CERT_FILE,
            ROOT_KEY_FILE,
            METADATA_FILE,
            PLUGIN_CERT_FILE,
            PLUGIN_KEY_FILE,
        ] {
            let p = dir.join(name);
            if p.exists() {
                return Err(CaError::AlreadyExists(p));
            }
        }
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let (key, cert_pem) = new_root(trust_domain, alg, now)?;
        let meta = Metadata {
            trust_domain: trust_domain.into(),
            key_alg: Some(alg),
            default_ttl_seconds: policy.default_ttl.as_secs(),
            max_ttl_seconds: policy.max_ttl.as_secs(),
            roots: vec![RootRecord {
                cert_pem: cert_pem.clone(),
                retire_after: None,
            }],
        };
        // Key first: if anything after fails, a rerun stops at the existing key instead of
        // silently minting a second root.
        write_new(
            &dir.join(ROOT_KEY_FILE),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(&dir.join(ROOT_CERT_FILE), cert_pem.as_bytes(), 0o644)?;
        write_new(&dir.join(METADATA_FILE), &metadata_json(&meta), 0o644)?;
        Ca::load_at(dir, None, now)
    }

    /// Load the CA in `dir` (Warden layout, or plug-in layout with a `ca.json`).
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        Ca::load_with(dir, None)
    }

    /// Load the CA in `dir`; `trust_domain` is needed for a plug-in CA without `ca.json`.
    pub fn load_with(dir: &Path, trust_domain: Option<&str>) -> Result<Ca, CaError> {
        Ca::load_at(dir, trust_domain, SystemTime::now())
    }

    /// Load as of `now`: validity checks and dropping retired roots use it.
    pub fn load_at(dir: &Path, trust_domain: Option<&str>, now: SystemTime) -> Result<Ca, CaError> {
        Ca::load_inner(dir, trust_domain, now, true)
    }

    /// `bounded`: whether the TTL policy must fit in what is left of the signing certificate
    /// (not when that certificate is about to be replaced by a rotation).
    fn load_inner(
        dir: &Path,
        trust_domain: Option<&str>,
        now: SystemTime,
        bounded: bool,
    ) -> Result<Ca, CaError> {
        if let Some(td) = trust_domain {
            if !valid_trust_domain(td) {
                return Err(CaError::BadTrustDomain(td.into()));
            }
        }
        let plugin = dir.join(PLUGIN_CERT_FILE).exists();
        let warden = dir.join(ROOT_KEY_FILE).exists();
        match (warden, plugin) {
            (true, true) => Err(CaError::AmbiguousLayout(dir.to_path_buf())),
            (true, false) => load_warden(dir, trust_domain, now, bounded),
            (false, true) => load_plugin(dir, trust_domain, now, bounded),
            (false, false) => Err(CaError::NoCa(dir.to_path_buf())),
        }
    }

    /// Replace the Warden root in `dir` by a new one with the same key algorithm. The old
    /// root stays in the bundle until every certificate it signed has expired (now + max TTL,
    /// plus the clock-skew margin); its key is deleted.
    pub fn rotate_root(dir: &Path, now: SystemTime) -> Result<Ca, CaError> {
        // Checked before loading: a plug-in CA may not even load without --trust-domain,
        // and the answer is the same either way.
        if dir.join(PLUGIN_CERT_FILE).exists() && !dir.join(ROOT_KEY_FILE).exists() {
            return Err(CaError::RotationUnsupported(dir.to_path_buf()));
        }
        // A root close to its end must still be rotatable, so the policy is checked against
        // the new root below rather than the old one here.
        let ca = Ca::load_inner(dir, None, now, false)?;
        if ca.layout != Layout::Warden {
            return Err(CaError::RotationUnsupported(dir.to_path_buf()));
        }
        let meta_path = dir.join(METADATA_FILE);
        let mut meta =
            read_metadata(&meta_path)?.ok_or_else(|| CaError::NoCa(dir.to_path_buf()))?;
        let alg = ca.key_alg.ok_or_else(|| CaError::Metadata {
            path: meta_path.clone(),
            message: "field key_alg: missing".into(),
        })?;
        // Everything is checked before the first file is written: a failure leaves the CA as
        // it was.
        let retire_after = now
            .checked_add(ca.policy.max_ttl)
            .and_then(|t| t.checked_add(CLOCK_SKEW))
            .ok_or_else(|| {
                CaError::BadTtl(format!(
                    "{}: the old root's retirement time (now + max TTL) is out of range",
                    meta_path.display()
                ))
            })?;
        let mut roots = vec![];
        let (key, cert_pem) = new_root(&ca.trust_domain, alg, now)?;
        let new_not_after = now
            .checked_add(ROOT_VALIDITY)
            .ok_or_else(|| CaError::Crypto("the new root's validity end is out of range".into()))?;
        ca.policy
            .validate_within(&dir.join(ROOT_CERT_FILE), new_not_after, now)
            .map_err(|e| CaError::Metadata {
                path: meta_path.clone(),
                message: format!("fields default_ttl_seconds/max_ttl_seconds: {e}"),
            })?;
        roots.push(RootRecord {
            cert_pem: cert_pem.clone(),
            retire_after: None,
        });
        for (i, r) in ca.roots.iter().enumerate() {
            // Roots already retired are dropped from the record for good. No older root
            // signed anything after the current one took over, so none needs trusting
            // longer than the current one.
            let when = match r.retire_after {
                None if i == 0 => retire_after,
                None => continue,
                Some(t) if t <= now => continue,
                Some(t) => t.min(retire_after),
            };
            roots.push(RootRecord {
                cert_pem: pem_encode("CERTIFICATE", &r.der),
                retire_after: Some(retire_after_text(when, &meta_path)?),
            });
        }
        meta.roots = roots;
        // Each file goes to `*.new` and is renamed into place, so no file is ever half
        // written. The key goes last: a crash between renames then leaves the new key in
        // `root-key.pem.new` (finish the rename to recover) and a key/certificate mismatch
        // that `load` refuses, never a directory whose only signing key is lost.
        let staged = [
            (METADATA_FILE, metadata_json(&meta), 0o644),
            (ROOT_CERT_FILE, cert_pem.into_bytes(), 0o644),
            (ROOT_KEY_FILE, key.serialize_pem().into_bytes(), 0o600),
        ];
        for (name, bytes, mode) in &staged {
            let tmp = dir.join(format!("{name}.new"));
            let _ = fs::remove_file(&tmp);
            write_new(&tmp, bytes, *mode)?;
        }
        for (name, _, _) in &staged {
            let tmp = dir.join(format!("{name}.new"));
            let dst = dir.join(name);
            fs::rename(&tmp, &dst).map_err(|source| CaError::Io { path: dst, source })?;
        }
        Ca::load_at(dir, None, now)
    }

    /// Issue an X.509 SVID for `entitled` from a CSR (DER or PEM). The identity comes from the
    /// caller's proof, never from the CSR: the CSR may only repeat it.
    pub fn sign_csr(
        &self,
        csr_der_or_pem: &[u8],
        entitled: &SpiffeId,
        requested_ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        if entitled.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: entitled.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let owned;
        let der: &[u8] = if looks_like_pem(csr_der_or_pem) {
            let p = pem::parse(csr_der_or_pem).map_err(|e| CaError::BadPem {
                what: "CSR".into(),
                message: e.to_string(),
            })?;
            if !matches!(p.tag(), "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST") {
                return Err(CaError::BadCsr(format!(
                    "PEM block is {:?}, expected \"CERTIFICATE REQUEST\"",
                    p.tag()
                )));
            }
            owned = p.into_contents();
            &owned
        } else {
            csr_der_or_pem
        };
        let public_key = check_csr(der, entitled)?;

        let ttl = match requested_ttl {
            // Istio sends 0 for "no preference".
            Some(t) if !t.is_zero() => t.min(self.policy.max_ttl),
            _ => self.policy.default_ttl.min(self.policy.max_ttl),
        };
        let now_s = unix_secs(now);
        let inb = unix_secs(self.issuer_not_before);
        let ina = unix_secs(self.issuer_not_after);
        if now_s < inb || now_s >= ina {
            return Err(CaError::IssuerNotValid {
                now: rfc3339(now),
                not_before: rfc3339(self.issuer_not_before),
                not_after: rfc3339(self.issuer_not_after),
            });
        }
        let skew = i64::try_from(CLOCK_SKEW.as_secs()).unwrap_or(i64::MAX);
        let not_before = now_s.checked_sub(skew).map_or(inb, |t| t.max(inb));
        // The policy is bounded, but a lifetime past the issuer's end is cut to it anyway.
        let not_after = i64::try_from(ttl.as_secs().max(1))
            .ok()
            .and_then(|t| now_s.checked_add(t))
            .map_or(ina, |t| t.min(ina));

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = Ia5String::try_from(entitled.to_string())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = odt(not_before)?;
        params.not_after = odt(not_after)?;
        let cert = params.signed_by(&public_key, &self.issuer)?;

        let mut cert_chain_pem = Vec::with_capacity(1 + self.chain_pem.len());
        cert_chain_pem.push(pem_encode("CERTIFICATE", cert.der()));
        cert_chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(IssuedSvid {
            cert_chain_pem,
            root_bundle_pem: self.bundle_pem(),
            not_before: from_unix(not_before),
            not_after: from_unix(not_after),
        })
    }

    /// Every root a workload should trust, including roots kept during a rotation.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            roots_der: self.roots.iter().map(|r| r.der.clone()).collect(),
        }
    }

    /// The bundle as PEM strings, the signing root first.
    pub fn bundle_pem(&self) -> Vec<String> {
        self.roots_pem.clone()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The key algorithm of a Warden root (`None` for a plug-in CA).
    pub fn key_alg(&self) -> Option<KeyAlg> {
        self.key_alg
    }
    pub fn ttl_policy(&self) -> TtlPolicy {
        self.policy
    }
    /// Override the TTL policy of this loaded CA (e.g. from a command-line flag).
    pub fn set_ttl_policy(&mut self, policy: TtlPolicy) -> Result<(), CaError> {
        let signer = match self.layout {
            Layout::Warden => self.dir.join(ROOT_CERT_FILE),
            Layout::PlugIn => self.dir.join(PLUGIN_CERT_FILE),
        };
        policy.validate_within(&signer, self.issuer_not_after, SystemTime::now())?;
        self.policy = policy;
        Ok(())
    }
    /// Validity of the certificate that signs workload certificates.
    pub fn issuer_validity(&self) -> (SystemTime, SystemTime) {
        (self.issuer_not_before, self.issuer_not_after)
    }
}

/// Parse and vet a CSR: structure, signature, key type, requested names. Returns the key to
/// certify.
fn check_csr(der: &[u8], entitled: &SpiffeId) -> Result<CsrPublicKey, CaError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CaError::BadCsr(format!("not a DER PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CaError::BadCsr(format!(
            "{} bytes of trailing data after the request",
            rest.len()
        )));
    }
    let public_key = csr_public_key(&csr)?;

    let sig = &csr.signature_algorithm.algorithm;
    // SHA-1 and exotic algorithms are refused even where the verifier would accept them.
    let allowed = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
    ];
    if !allowed.contains(sig) {
        return Err(CaError::BadCsr(format!(
            "signature algorithm {sig} is not accepted (ECDSA or RSA with SHA-256 or better)"
        )));
    }
    csr.verify_signature()
        .map_err(|_| CaError::BadCsrSignature)?;

    let mut uris = vec![];
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            other => {
                                let (kind, value) = describe_general_name(other);
                                return Err(CaError::ForbiddenSan { kind, value });
                            }
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(CaError::BadCsr(
                        "requests a CA certificate (basicConstraints CA:true)".into(),
                    ));
                }
                ParsedExtension::ParseError { error } => {
                    return Err(CaError::BadCsr(format!(
                        "unparsable requested extension: {error}"
                    )));
                }
                // Key usages and the like are Warden's decision, not the requester's.
                _ => {}
            }
        }
    }
    let want = entitled.to_string();
    match uris.as_slice() {
        [] => {}
        [one] if *one == want => {}
        [one] => {
            return Err(CaError::IdentityNotEntitled {
                requested: one.clone(),
                entitled: want,
            })
        }
        several => {
            return Err(CaError::IdentityNotEntitled {
                requested: several.join(", "),
                entitled: want,
            })
        }
    }
    Ok(public_key)
}

fn describe_general_name(n: &GeneralName<'_>) -> (&'static str, String) {
    match n {
        GeneralName::DNSName(d) => ("DNS", d.to_string()),
        GeneralName::RFC822Name(e) => ("email", e.to_string()),
        GeneralName::IPAddress(b) => ("IP address", ip_string(b)),
        GeneralName::DirectoryName(dn) => ("directory name", dn.to_string()),
        GeneralName::OtherName(oid, _) => ("otherName", oid.to_id_string()),
        GeneralName::RegisteredID(oid) => ("registeredID", oid.to_id_string()),
        GeneralName::URI(u) => ("URI", u.to_string()),
        GeneralName::Invalid(tag, _) => ("malformed", format!("tag {tag}")),
        _ => ("unsupported", String::new()),
    }
}

fn ip_string(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap_or_default()).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap_or_default()).to_string(),
        _ => format!("{b:02x?}"),
    }
}

/// The requester's public key, as rcgen writes it into the certificate.
struct CsrPublicKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

fn csr_public_key(csr: &X509CertificationRequest<'_>) -> Result<CsrPublicKey, CaError> {
    let spki = &csr.certification_request_info.subject_pki;
    let raw = spki.subject_public_key.data.to_vec();
    let alg_oid = &spki.algorithm.algorithm;
    if *alg_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CaError::UnsupportedKey("EC key without a named curve".into()))?;
        let (alg, point_len) = if curve == OID_EC_P256 {
            (&rcgen::PKCS_ECDSA_P256_SHA256, 65)
        } else if curve == OID_NIST_EC_P384 {
            (&rcgen::PKCS_ECDSA_P384_SHA384, 97)
        } else {
            return Err(CaError::UnsupportedKey(format!("EC curve {curve}")));
        };
        // Uncompressed points only: that is what TLS peers are guaranteed to accept.
        if raw.len() != point_len || raw[0] != 4 {
            return Err(CaError::UnsupportedKey(
                "EC public key is not an uncompressed point".into(),
            ));
        }
        Ok(CsrPublicKey { raw, alg })
    } else if *alg_oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(k)) => k.key_size(),
            _ => return Err(CaError::BadCsr("malformed RSA public key".into())),
        };
        if !(2048..=8192).contains(&bits) {
            return Err(CaError::UnsupportedKey(format!("RSA {bits} bits")));
        }
        Ok(CsrPublicKey {
            raw,
            alg: &rcgen::PKCS_RSA_SHA256,
        })
    } else {
        Err(CaError::UnsupportedKey(format!("key algorithm {alg_oid}")))
    }
}

/// A new self-signed root for `trust_domain`: its key and its PEM certificate.
fn new_root(
    trust_domain: &str,
    alg: KeyAlg,
    now: SystemTime,
) -> Result<(KeyPair, String), CaError> {
    let key = alg.generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Warden");
    dn.push(
        DnType::CommonName,
        format!("Warden root CA for {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    // Back-dated further than leaves, so the first leaves' back-dating is not cut short by
    // the root's own notBefore.
    let now_s = unix_secs(now);
    let out_of_range = || CaError::Crypto("the new root's validity is out of range".into());
    let validity = i64::try_from(ROOT_VALIDITY.as_secs()).map_err(|_| out_of_range())?;
    params.not_before = odt(now_s.checked_sub(3600).ok_or_else(out_of_range)?)?;
    params.not_after = odt(now_s.checked_add(validity).ok_or_else(out_of_range)?)?;
    let cert = params.self_signed(&key)?;
    Ok((key, pem_encode("CERTIFICATE", cert.der())))
}

fn load_warden(
    dir: &Path,
    trust_domain: Option<&str>,
    now: SystemTime,
    bounded: bool,
) -> Result<Ca, CaError> {
    let meta_path = dir.join(METADATA_FILE);
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    let meta = read_metadata(&meta_path)?.ok_or_else(|| CaError::Metadata {
        path: meta_path.clone(),
        message: "missing: a Warden CA directory needs ca.json (trust domain, key algorithm, TTLs, roots)".into(),
    })?;
    check_metadata_td(&meta_path, &meta, trust_domain)?;
    let policy = meta_policy(&meta_path, &meta)?;
    let meta_err = |message: String| CaError::Metadata {
        path: meta_path.clone(),
        message,
    };
    let key_alg = meta
        .key_alg
        .ok_or_else(|| meta_err("field key_alg: missing (ec-p256 or rsa-2048)".into()))?;

    let certs = read_certs(&cert_path)?;
    let [root_der] = <[Vec<u8>; 1]>::try_from(certs).map_err(|v| CaError::BadCertificate {
        what: cert_path.display().to_string(),
        message: format!("holds {} certificates; expected exactly the root", v.len()),
    })?;
    let key = read_key(&key_path)?;
    // Rotation generates the next root from key_alg, so it must describe the real key.
    if KeyAlg::of_key(&key) != Some(key_alg) {
        return Err(meta_err(format!(
            "field key_alg: says {key_alg} but {ROOT_KEY_FILE} holds another kind of key"
        )));
    }
    let (issuer, nb, na) = signing_cert(&cert_path, &key_path, &root_der, key, now)?;
    if bounded {
        policy_within(&meta_path, &policy, &cert_path, na, now)?;
    }
    // A root is its own trust anchor; its self-signature shows the file was not altered.
    X509Certificate::from_der(&root_der)
        .map_err(|e| e.to_string())
        .and_then(|(_, c)| {
            if c.issuer().as_raw() != c.subject().as_raw() {
                return Err("it is not self-signed (issuer differs from subject)".into());
            }
            c.verify_signature(None)
                .map_err(|e| format!("its self-signature does not verify: {e}"))
        })
        .map_err(|reason| CaError::NotCaCert {
            path: cert_path.clone(),
            reason,
        })?;

    let mut roots = vec![Root {
        der: root_der.clone(),
        retire_after: None,
    }];
    let mut current_listed = false;
    for (i, r) in meta.roots.iter().enumerate() {
        let what = format!("{}: roots[{i}].cert_pem", meta_path.display());
        let der = parse_cert_pem(&r.cert_pem, &what)?;
        match &r.retire_after {
            None => {
                if der != root_der {
                    return Err(meta_err(format!(
                        "roots[{i}] is listed as the current root but differs from {ROOT_CERT_FILE} (interrupted rotation?)"
                    )));
                }
                current_listed = true;
            }
            Some(t) => {
                let when = parse_rfc3339(t).map_err(|e| {
                    meta_err(format!("roots[{i}].retire_after: {e} (expected RFC 3339)"))
                })?;
                // Rotation never sets it further ahead than the longest possible TTL: a later
                // one would keep a replaced root key trusted for longer than anything it signed.
                let latest = now
                    .checked_add(MAX_TTL_LIMIT)
                    .and_then(|t| t.checked_add(CLOCK_SKEW));
                if latest.is_none_or(|l| when > l) {
                    return Err(meta_err(format!(
                        "roots[{i}].retire_after: {t} is more than {} days and the clock-skew \
                         margin ahead; a retired root is kept at most that long",
                        MAX_TTL_LIMIT.as_secs() / 86400
                    )));
                }
                // A retired root's certificates have all expired: trusting it longer would
                // only widen what a stolen old key could do.
                if when > now && der != root_der {
                    roots.push(Root {
                        der,
                        retire_after: Some(when),
                    });
                }
            }
        }
    }
    if !current_listed {
        return Err(meta_err(format!(
            "roots lists no current root (an entry without retire_after equal to {ROOT_CERT_FILE})"
        )));
    }
    probe_as_peers_do(
        &issuer,
        &meta.trust_domain,
        &[],
        std::slice::from_ref(&root_der),
        now,
    )
    .map_err(|reason| CaError::NotCaCert {
        path: cert_path.clone(),
        reason,
    })?;
    Ok(Ca {
        dir: dir.to_path_buf(),
        layout: Layout::Warden,
        trust_domain: meta.trust_domain,
        key_alg: Some(key_alg),
        policy,
        issuer,
        issuer_not_before: nb,
        issuer_not_after: na,
        chain_pem: vec![],
        roots_pem: roots_pem(&roots),
        roots,
    })
}

fn load_plugin(
    dir: &Path,
    trust_domain: Option<&str>,
    now: SystemTime,
    bounded: bool,
) -> Result<Ca, CaError> {
    let meta_path = dir.join(METADATA_FILE);
    let cert_path = dir.join(PLUGIN_CERT_FILE);
    let key_path = dir.join(PLUGIN_KEY_FILE);
    let root_path = dir.join(ROOT_CERT_FILE);
    let chain_path = dir.join(PLUGIN_CHAIN_FILE);

    let meta = read_metadata(&meta_path)?;
    let (td, policy) = match (&meta, trust_domain) {
        (Some(m), given) => {
            check_metadata_td(&meta_path, m, given)?;
            (m.trust_domain.clone(), meta_policy(&meta_path, m)?)
        }
        (None, Some(td)) => (td.to_string(), TtlPolicy::default()),
        (None, None) => return Err(CaError::TrustDomainRequired(dir.to_path_buf())),
    };

    let certs = read_certs(&cert_path)?;
    let [ca_der] = <[Vec<u8>; 1]>::try_from(certs).map_err(|v| CaError::BadCertificate {
        what: cert_path.display().to_string(),
        message: format!(
            "holds {} certificates; expected exactly the signing CA certificate",
            v.len()
        ),
    })?;
    let roots_der = read_certs(&root_path)?;
    let chain_der = if chain_path.exists() {
        read_certs(&chain_path)?
    } else {
        vec![]
    };
    let key = read_key(&key_path)?;
    let (issuer, nb, na) = signing_cert(&cert_path, &key_path, &ca_der, key, now)?;
    if bounded {
        if meta.is_some() {
            policy_within(&meta_path, &policy, &cert_path, na, now)?;
        } else {
            policy.validate_within(&cert_path, na, now).map_err(|e| {
                CaError::BadTtl(format!(
                    "{e} (this is the default policy; a ca.json with \"max_ttl_seconds\" sets \
                     another)"
                ))
            })?;
        }
    }

    // Istio's cert-chain.pem usually starts with ca-cert.pem and may end with the root;
    // neither belongs twice in an issued chain, and roots are sent as the bundle instead.
    let mut chain = vec![ca_der.clone()];
    for c in chain_der {
        if !chain.contains(&c) && !roots_der.contains(&c) {
            chain.push(c);
        }
    }
    verify_chain(&chain, &roots_der, now).map_err(|reason| CaError::ChainBroken {
        path: if chain.len() > 1 {
            chain_path.clone()
        } else {
            cert_path.clone()
        },
        root: root_path.clone(),
        reason,
    })?;
    // The field checks above count the CA certificate as the chain's end; webpki sees the
    // chain as peers will, one level longer with a leaf below it, and applies name
    // constraints, so a CA whose every certificate would be refused is refused here.
    probe_as_peers_do(&issuer, &td, &chain, &roots_der, now).map_err(|reason| {
        CaError::NotCaCert {
            path: cert_path.clone(),
            reason: format!(
                "{reason} (checked with {} and {})",
                if chain.len() > 1 {
                    chain_path.display()
                } else {
                    cert_path.display()
                },
                root_path.display()
            ),
        }
    })?;

    Ok(Ca {
        dir: dir.to_path_buf(),
        layout: Layout::PlugIn,
        trust_domain: td,
        key_alg: None,
        policy,
        issuer,
        issuer_not_before: nb,
        issuer_not_after: na,
        chain_pem: chain.iter().map(|d| pem_encode("CERTIFICATE", d)).collect(),
        roots_pem: roots_der
            .iter()
            .map(|d| pem_encode("CERTIFICATE", d))
            .collect(),
        roots: roots_der
            .into_iter()
            .map(|der| Root {
                der,
                retire_after: None,
            })
            .collect(),
    })
}

fn roots_pem(roots: &[Root]) -> Vec<String> {
    roots
        .iter()
        .map(|r| pem_encode("CERTIFICATE", &r.der))
        .collect()
}

/// Check that `cert_der` can sign with `key` now, and build the rcgen issuer for it.
fn signing_cert(
    cert_path: &Path,
    key_path: &Path,
    cert_der: &[u8],
    key: KeyPair,
    now: SystemTime,
) -> Result<(Issuer<'static, KeyPair>, SystemTime, SystemTime), CaError> {
    let what = cert_path.display().to_string();
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| CaError::BadCertificate {
        what: what.clone(),
        message: e.to_string(),
    })?;
    if key.public_key_raw() != &*cert.public_key().subject_public_key.data {
        return Err(CaError::KeyMismatch {
            key: key_path.to_path_buf(),
            cert: cert_path.to_path_buf(),
        });
    }
    let not_ca = |reason: &str| CaError::NotCaCert {
        path: cert_path.to_path_buf(),
        reason: reason.into(),
    };
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(not_ca("basicConstraints CA:true is missing")),
        Err(e) => return Err(not_ca(&format!("basicConstraints: {e}"))),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {}
        Ok(Some(_)) => return Err(not_ca("keyUsage lacks keyCertSign")),
        Ok(None) => return Err(not_ca("keyUsage extension is missing")),
        Err(e) => return Err(not_ca(&format!("keyUsage: {e}"))),
    }
    let nb = from_unix(cert.validity().not_before.timestamp());
    let na = from_unix(cert.validity().not_after.timestamp());
    if now < nb || now > na {
        return Err(CaError::CaCertNotValid {
            path: cert_path.to_path_buf(),
            not_before: rfc3339(nb),
            not_after: rfc3339(na),
        });
    }
    let issuer = Issuer::from_ca_cert_der(&cert_der.to_vec().into(), key).map_err(|e| {
        CaError::NotCaCert {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    probe(&issuer, &cert).map_err(|reason| CaError::NotCaCert {
        path: cert_path.to_path_buf(),
        reason,
    })?;
    Ok((issuer, nb, na))
}

/// Sign one throwaway certificate and check it against the CA certificate. rcgen re-encodes
/// the issuer name; a CA whose name it cannot reproduce byte for byte would issue
/// certificates that no verifier chains, so this fails at load rather than in handshakes.
fn probe(issuer: &Issuer<'static, KeyPair>, ca: &X509Certificate<'_>) -> Result<(), String> {
    let key = KeyAlg::EcP256.generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from("spiffe://probe.invalid/ns/probe/sa/probe")
            .map_err(|e| e.to_string())?,
    )];
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|e| format!("signing a probe certificate failed: {e}"))?;
    let (_, leaf) = X509Certificate::from_der(cert.der()).map_err(|e| e.to_string())?;
    if leaf.issuer().as_raw() != ca.subject().as_raw() {
        return Err("its subject name cannot be reproduced exactly as an issuer name (unusual string types or multi-valued RDNs)".into());
    }
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|e| format!("a probe certificate signed with its key does not verify: {e}"))
}

/// Sign a throwaway workload certificate exactly as [`Ca::sign_csr`] shapes them and verify it
/// with webpki, as TLS peers will: through `chain` (the signing CA certificate first, for a
/// plug-in CA) to one of `roots`.
fn probe_as_peers_do(
    issuer: &Issuer<'static, KeyPair>,
    trust_domain: &str,
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: SystemTime,
) -> Result<(), String> {
    let key = KeyAlg::EcP256.generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = format!("spiffe://{trust_domain}/ns/warden-probe/sa/probe");
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(uri).map_err(|e| e.to_string())?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let leaf = params
        .signed_by(&key, issuer)
        .map_err(|e| format!("signing a probe certificate failed: {e}"))?;
    crate::inspect::webpki_verify(leaf.der(), chain, roots, now)
        .map_err(|e| format!("a workload certificate it signs would be refused by TLS peers: {e}"))
}

fn policy_within(
    meta_path: &Path,
    policy: &TtlPolicy,
    signer_path: &Path,
    not_after: SystemTime,
    now: SystemTime,
) -> Result<(), CaError> {
    policy
        .validate_within(signer_path, not_after, now)
        .map_err(|e| CaError::Metadata {
            path: meta_path.to_path_buf(),
            message: format!("fields default_ttl_seconds/max_ttl_seconds: {e}"),
        })
}

/// `retire_after` as written to `ca.json`: RFC 3339 that reads back as the same second, or an
/// error; never a placeholder that a later load would refuse.
fn retire_after_text(t: SystemTime, meta_path: &Path) -> Result<String, CaError> {
    let secs = unix_secs(t);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .filter(|s| parse_rfc3339(s).is_ok_and(|back| unix_secs(back) == secs))
        .ok_or_else(|| CaError::Metadata {
            path: meta_path.to_path_buf(),
            message: format!("roots: retirement time @{secs} cannot be written as RFC 3339"),
        })
}

fn check_metadata_td(path: &Path, meta: &Metadata, given: Option<&str>) -> Result<(), CaError> {
    if !valid_trust_domain(&meta.trust_domain) {
        return Err(CaError::Metadata {
            path: path.to_path_buf(),
            message: format!(
                "field trust_domain: {:?} is not a valid trust domain",
                meta.trust_domain
            ),
        });
    }
    match given {
        Some(g) if g != meta.trust_domain => Err(CaError::TrustDomainMismatch {
            path: path.to_path_buf(),
            in_file: meta.trust_domain.clone(),
            given: g.into(),
        }),
        _ => Ok(()),
    }
}

fn meta_policy(path: &Path, meta: &Metadata) -> Result<TtlPolicy, CaError> {
    let p = TtlPolicy {
        default_ttl: Duration::from_secs(meta.default_ttl_seconds),
        max_ttl: Duration::from_secs(meta.max_ttl_seconds),
    };
    p.validate().map_err(|e| CaError::Metadata {
        path: path.to_path_buf(),
        message: format!("fields default_ttl_seconds/max_ttl_seconds: {e}"),
    })?;
    Ok(p)
}

fn read_metadata(path: &Path) -> Result<Option<Metadata>, CaError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CaError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| CaError::Metadata {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn metadata_json(meta: &Metadata) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(meta).unwrap_or_default();
    v.push(b'\n');
    v
}

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// All certificates in a PEM file, DER; errors name the file.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let text = read_file(path)?;
    let what = path.display().to_string();
    let certs = parse_certs_pem(&text, &what)?;
    if certs.is_empty() {
        return Err(CaError::BadPem {
            what,
            message: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Every CERTIFICATE block of `text`, each checked to be a well-formed certificate. Other
/// blocks (a key kept in the same file) are skipped.
pub(crate) fn parse_certs_pem(text: &[u8], what: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let blocks = pem::parse_many(text).map_err(|e| CaError::BadPem {
        what: what.into(),
        message: e.to_string(),
    })?;
    let mut out = vec![];
    for b in blocks {
        if b.tag() != "CERTIFICATE" {
            continue;
        }
        let n = out.len() + 1;
        match X509Certificate::from_der(b.contents()) {
            Ok(([], _)) => out.push(b.into_contents()),
            Ok(_) => {
                return Err(CaError::BadCertificate {
                    what: format!("{what}: certificate {n}"),
                    message: "trailing bytes after the certificate".into(),
                })
            }
            Err(e) => {
                return Err(CaError::BadCertificate {
                    what: format!("{what}: certificate {n}"),
                    message: format!("not a valid X.509 certificate: {e}"),
                })
            }
        }
    }
    Ok(out)
}

fn parse_cert_pem(text: &str, what: &str) -> Result<Vec<u8>, CaError> {
    let mut certs = parse_certs_pem(text.as_bytes(), what)?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        n => Err(CaError::BadPem {
            what: what.into(),
            message: format!("holds {n} certificates; expected one"),
        }),
    }
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let bytes = read_file(path)?;
    let text = String::from_utf8(bytes).map_err(|_| CaError::BadKey {
        path: path.to_path_buf(),
        message: "not a PEM text file".into(),
    })?;
    KeyPair::from_pem(&text).map_err(|e| CaError::BadKey {
        path: path.to_path_buf(),
        message: format!(
            "not a usable private key (PKCS#8, SEC1 or PKCS#1 PEM; ECDSA P-256/P-384 or RSA): {e}"
        ),
    })
}

/// Create `path` with `mode` from the start, so a key is never readable by others, not even
/// for an instant; fails if the file exists.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CaError::AlreadyExists(path.to_path_buf())
        } else {
            io(e)
        }
    })?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn looks_like_pem(b: &[u8]) -> bool {
    b.iter()
        .position(|c| !c.is_ascii_whitespace())
        .is_some_and(|i| b[i..].starts_with(b"-----BEGIN"))
}

pub(crate) fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| CaError::Crypto("random generator failed".into()))?;
    // A zero first byte would shorten the DER integer; keep every serial a full 128 bits.
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    }
}

pub(crate) fn from_unix(s: i64) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::from_secs(s as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
    }
}

fn odt(secs: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| CaError::Crypto(format!("time out of range: {e}")))
}

fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| e.to_string())
}

/// A temporary directory removed on drop, unique per test (no extra dependency for this).
#[cfg(test)]
pub(crate) mod testdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "warden-ca-{tag}-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdir::TempDir;
    use super::*;
    use crate::csr::{csr_for_key, generate_csr};
    use x509_parser::extensions::ParsedExtension;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn ders(pems: &[String]) -> Vec<Vec<u8>> {
        pems.iter()
            .map(|p| pem::parse(p).unwrap().into_contents())
            .collect()
    }

    fn issue(ca: &Ca, who: &SpiffeId, ttl: Option<Duration>, now: SystemTime) -> IssuedSvid {
        let (_, csr) = generate_csr(who, KeyAlg::EcP256).unwrap();
        ca.sign_csr(&csr, who, ttl, now).unwrap()
    }

    fn secs(t: SystemTime) -> i64 {
        unix_secs(t)
    }

    #[test]
    fn ca_is_shareable_between_threads() {
        fn check<T: Send + Sync>() {}
        check::<Ca>();
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let d = TempDir::new("overwrite");
        Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();
        let before = fs::read(d.path().join(ROOT_KEY_FILE)).unwrap();
        match Ca::init(d.path(), "cluster.local", KeyAlg::EcP256) {
            Err(CaError::AlreadyExists(p)) => assert!(p.ends_with(ROOT_CERT_FILE), "{p:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(before, fs::read(d.path().join(ROOT_KEY_FILE)).unwrap());

        // Any one CA file is enough to refuse.
        let d2 = TempDir::new("overwrite2");
        fs::write(d2.path().join(METADATA_FILE), "{}").unwrap();
        match Ca::init(d2.path(), "cluster.local", KeyAlg::EcP256) {
            Err(CaError::AlreadyExists(p)) => assert!(p.ends_with(METADATA_FILE)),
            other => panic!("{other:?}"),
        }
        assert!(!d2.path().join(ROOT_KEY_FILE).exists());
    }

    #[test]
    fn init_rejects_bad_trust_domain_and_ttl() {
        let d = TempDir::new("badtd");
        assert!(matches!(
            Ca::init(d.path(), "Bad Domain", KeyAlg::EcP256),
            Err(CaError::BadTrustDomain(_))
        ));
        let bad = TtlPolicy {
            default_ttl: Duration::from_secs(7200),
            max_ttl: Duration::from_secs(3600),
        };
        assert!(matches!(
            Ca::init_with(d.path(), "td", KeyAlg::EcP256, bad, SystemTime::now()),
            Err(CaError::BadTtl(_))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn root_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = TempDir::new("mode");
        Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();
        let mode = fs::metadata(d.path().join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn root_certificate_shape() {
        let d = TempDir::new("rootshape");
        let now = SystemTime::now();
        let ca = Ca::init_with(
            d.path(),
            "example.org",
            KeyAlg::EcP256,
            TtlPolicy::default(),
            now,
        )
        .unwrap();
        let der = &ca.bundle().roots_der[0];
        let (_, c) = X509Certificate::from_der(der).unwrap();
        assert!(c.is_ca());
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let subject = c.subject().to_string();
        assert!(subject.contains("O=Warden"), "{subject}");
        assert!(subject.contains("example.org"), "{subject}");
        let life = c.validity().not_after.timestamp() - secs(now);
        assert!((life - ROOT_VALIDITY.as_secs() as i64).abs() <= 1);
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(d.path().join(METADATA_FILE)).unwrap()).unwrap();
        assert_eq!(meta["trust_domain"], "example.org");
        assert_eq!(meta["key_alg"], "ec-p256");
        assert_eq!(meta["default_ttl_seconds"], 86400);
        assert_eq!(meta["max_ttl_seconds"], 172800);
        assert_eq!(meta["roots"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn restart_keeps_the_same_root() {
        let d = TempDir::new("restart");
        let first = Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();
        let again = Ca::load(d.path()).unwrap();
        assert_eq!(first.bundle(), again.bundle());
        assert_eq!(again.trust_domain(), "cluster.local");
        assert_eq!(again.layout(), Layout::Warden);
        // A certificate from the restarted CA chains to the root handed out before.
        let who = id("spiffe://cluster.local/ns/default/sa/web");
        let now = SystemTime::now();
        let svid = issue(&again, &who, None, now);
        verify_chain(&ders(&svid.cert_chain_pem), &first.bundle().roots_der, now).unwrap();
    }

    #[test]
    fn issued_svid_is_a_strict_x509_svid() {
        let d = TempDir::new("shape");
        let now = SystemTime::now();
        let ca = Ca::init_with(
            d.path(),
            "cluster.local",
            KeyAlg::EcP256,
            TtlPolicy::default(),
            now,
        )
        .unwrap();
        let who = id("spiffe://cluster.local/ns/shop/sa/cart");
        let svid = issue(&ca, &who, None, now);
        assert_eq!(svid.cert_chain_pem.len(), 1);
        assert_eq!(svid.root_bundle_pem, ca.bundle_pem());
        let chain = ders(&svid.cert_chain_pem);
        let (_, c) = X509Certificate::from_der(&chain[0]).unwrap();

        assert!(c.subject().as_raw().len() <= 2, "subject must be empty");
        let san = c.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN is critical when the subject is empty");
        assert_eq!(san.value.general_names.len(), 1);
        assert_eq!(
            san.value.general_names[0],
            GeneralName::URI("spiffe://cluster.local/ns/shop/sa/cart")
        );
        let ku = c.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature() && ku.value.key_encipherment());
        assert!(!ku.value.key_cert_sign());
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.any && eku.other.is_empty());
        let bc = c.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        let exts = c.extensions();
        let ski = exts.iter().find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
        let aki = exts.iter().find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
        let bundle = ca.bundle();
        let (_, root) = X509Certificate::from_der(&bundle.roots_der[0]).unwrap();
        let root_ski = root
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        assert!(ski.is_some());
        assert_eq!(aki, root_ski);
        assert!(c.raw_serial().len() >= 16, "128-bit serial");

        // Back-dated by exactly the skew allowance, 24 h by default.
        let nb = c.validity().not_before.timestamp();
        let na = c.validity().not_after.timestamp();
        assert_eq!(nb, secs(now) - 300);
        assert_eq!(na, secs(now) + 86400);
        assert_eq!(secs(svid.not_before), nb);
        assert_eq!(secs(svid.not_after), na);
        verify_chain(&chain, &ca.bundle().roots_der, now).unwrap();

        // Two certificates for the same key and name still get distinct serials.
        let other = issue(&ca, &who, None, now);
        let other_chain = ders(&other.cert_chain_pem);
        let (_, c2) = X509Certificate::from_der(&other_chain[0]).unwrap();
        assert_ne!(c.raw_serial(), c2.raw_serial());
    }

    #[test]
    fn lifetime_is_clamped_to_the_maximum() {
        let d = TempDir::new("ttl");
        let now = SystemTime::now();
        let ca = Ca::init_with(
            d.path(),
            "cluster.local",
            KeyAlg::EcP256,
            TtlPolicy::default(),
            now,
        )
        .unwrap();
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let life = |ttl| {
            let s = issue(&ca, &who, ttl, now);
            secs(s.not_after) - secs(now)
        };
        assert_eq!(life(Some(Duration::from_secs(30 * 86400))), 48 * 3600);
        assert_eq!(life(Some(Duration::from_secs(3600))), 3600);
        assert_eq!(life(Some(Duration::ZERO)), 86400);
        assert_eq!(life(None), 86400);

        let mut ca = ca;
        ca.set_ttl_policy(TtlPolicy {
            default_ttl: Duration::from_secs(600),
            max_ttl: Duration::from_secs(1200),
        })
        .unwrap();
        let s = issue(&ca, &who, Some(Duration::from_secs(86400)), now);
        assert_eq!(secs(s.not_after) - secs(now), 1200);
    }

    #[test]
    fn validity_stays_inside_the_issuer() {
        let d = TempDir::new("inside");
        let t0 = SystemTime::now();
        let ca = Ca::init_with(
            d.path(),
            "cluster.local",
            KeyAlg::EcP256,
            TtlPolicy::default(),
            t0,
        )
        .unwrap();
        let (inb, ina) = ca.issuer_validity();
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        // Just after the root's start: back-dating stops at the root's notBefore.
        let early = inb + Duration::from_secs(60);
        let s = issue(&ca, &who, None, early);
        assert_eq!(secs(s.not_before), secs(inb));
        // Just before the root's end: the leaf ends with it.
        let late = ina - Duration::from_secs(3600);
        let s = issue(&ca, &who, None, late);
        assert_eq!(secs(s.not_after), secs(ina));
        // After it: nothing is issued.
        let (_, csr) = generate_csr(&who, KeyAlg::EcP256).unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &who, None, ina + Duration::from_secs(1)),
            Err(CaError::IssuerNotValid { .. })
        ));
    }

    #[test]
    fn csr_for_another_identity_is_refused() {
        let d = TempDir::new("other");
        let ca = Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();
        let asked = id("spiffe://cluster.local/ns/prod/sa/admin");
        let entitled = id("spiffe://cluster.local/ns/prod/sa/web");
        let (_, csr) = generate_csr(&asked, KeyAlg::EcP256).unwrap();
        match ca.sign_csr(&csr, &entitled, None, SystemTime::now()) {
            Err(CaError::IdentityNotEntitled {
                requested,
                entitled,
            }) => {
                assert_eq!(requested, "spiffe://cluster.local/ns/prod/sa/admin");
                assert_eq!(entitled, "spiffe://cluster.local/ns/prod/sa/web");
            }
            other => panic!("{other:?}"),
        }
        // Nor is an identity outside the CA's trust domain, even when entitled.
        let foreign = id("spiffe://other.org/ns/prod/sa/web");
        let (_, csr) = generate_csr(&foreign, KeyAlg::EcP256).unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &foreign, None, SystemTime::now()),
            Err(CaError::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn csr_with_several_uris_is_refused() {
        let d = TempDir::new("several");
        let ca = Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let key = KeyAlg::EcP256.generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(Ia5String::try_from(who.to_string()).unwrap()),
            SanType::URI(Ia5String::try_from("spiffe://cluster.local/ns/a/sa/c").unwrap()),
        ];
        let csr = params.serialize_request(&key).unwrap();
        assert!(matches!(
            ca.sign_csr(csr.der(), &who, None, SystemTime::now()),
            Err(CaError::IdentityNotEntitled { .. })
        ));
    }

    #[test]
    fn csr_with_a_bad_signature_is_refused() {
        let d = TempDir::new("badsig");
        let ca = Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let (_, mut csr) = generate_csr(&who, KeyAlg::EcP256).unwrap();
        // The signature BIT STRING ends the request; its last byte is inside `s`.
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        assert!(matches!(
            ca.sign_csr(&csr, &who, None, SystemTime::now()),
            Err(CaError::BadCsrSignature)
        ));
    }

    #[test]
    fn csr_asking_for_dns_or_ip_names_is_refused() {
        let d = TempDir::new("dns");
        let ca = Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        for (extra, kind) in [
            (
                SanType::DnsName("evil.example.com".try_into().unwrap()),
                "DNS",
            ),
            (
                SanType::IpAddress("10.0.0.1".parse().unwrap()),
                "IP address",
            ),
            (SanType::Rfc822Name("a@b.c".try_into().unwrap()), "email"),
        ] {
            let key = KeyAlg::EcP256.generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![
                SanType::URI(Ia5String::try_from(who.to_string()).unwrap()),
                extra,
            ];
            let csr = params.serialize_request(&key).unwrap();
            match ca.sign_csr(csr.der(), &who, None, SystemTime::now()) {
                Err(CaError::ForbiddenSan { kind: k, .. }) => assert_eq!(k, kind),
                other => panic!("{kind}: {other:?}"),
            }
        }
    }

    #[test]
    fn csr_without_san_pem_csr_and_key_types() {
        let d = TempDir::new("keys");
        let ca = Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let now = SystemTime::now();
        let root = ca.bundle().roots_der;

        // No SAN in the CSR: the entitled identity is issued.
        let key = KeyAlg::EcP256.generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let s = ca.sign_csr(csr.der(), &who, None, now).unwrap();
        let info = crate::inspect::inspect_chain(&s.cert_chain_pem[0], None, now).unwrap();
        assert_eq!(
            info.certificates[0].spiffe_id.as_deref(),
            Some(who.to_string().as_str())
        );

        // PEM input, P-384 and RSA keys.
        for (alg, want) in [
            (&rcgen::PKCS_ECDSA_P384_SHA384, "ECDSA P-384"),
            (&rcgen::PKCS_ECDSA_P256_SHA256, "ECDSA P-256"),
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = csr_for_key(&who, &key).unwrap();
            let pem = pem_encode("CERTIFICATE REQUEST", &csr);
            let s = ca.sign_csr(pem.as_bytes(), &who, None, now).unwrap();
            verify_chain(&ders(&s.cert_chain_pem), &root, now).unwrap();
            let info = crate::inspect::inspect_chain(&s.cert_chain_pem[0], None, now).unwrap();
            assert_eq!(info.certificates[0].key_algorithm, want);
        }
        let (_, csr) = generate_csr(&who, KeyAlg::Rsa2048).unwrap();
        let s = ca.sign_csr(&csr, &who, None, now).unwrap();
        verify_chain(&ders(&s.cert_chain_pem), &root, now).unwrap();

        // Ed25519 is not something every TLS peer accepts.
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = csr_for_key(&who, &key).unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &who, None, now),
            Err(CaError::UnsupportedKey(_))
        ));

        // Junk is an error, not a panic.
        for junk in [
            &b""[..],
            b"hello",
            b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n-----END CERTIFICATE REQUEST-----\n",
            &[0x30, 0x82, 0xff, 0xff, 0x00],
        ] {
            let e = ca.sign_csr(junk, &who, None, now).unwrap_err();
            assert!(
                matches!(e, CaError::BadCsr(_) | CaError::BadPem { .. }),
                "{e}"
            );
        }
        let cert_pem = ca.bundle_pem().remove(0);
        assert!(matches!(
            ca.sign_csr(cert_pem.as_bytes(), &who, None, now),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn rsa_2048_ca_works() {
        let d = TempDir::new("rsa");
        let now = SystemTime::now();
        Ca::init(d.path(), "cluster.local", KeyAlg::Rsa2048).unwrap();
        let ca = Ca::load(d.path()).unwrap();
        assert_eq!(ca.key_alg(), Some(KeyAlg::Rsa2048));
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        for alg in [KeyAlg::EcP256, KeyAlg::Rsa2048] {
            let (_, csr) = generate_csr(&who, alg).unwrap();
            let s = ca.sign_csr(&csr, &who, None, now).unwrap();
            verify_chain(&ders(&s.cert_chain_pem), &ca.bundle().roots_der, now).unwrap();
        }
        let info = crate::inspect::inspect_chain(&ca.bundle_pem()[0], None, now).unwrap();
        assert_eq!(info.certificates[0].key_algorithm, "RSA 2048");
    }

    #[test]
    fn load_reports_missing_and_broken_files() {
        let d = TempDir::new("broken");
        assert!(matches!(Ca::load(d.path()), Err(CaError::NoCa(_))));
        Ca::init(d.path(), "cluster.local", KeyAlg::EcP256).unwrap();

        let meta = d.path().join(METADATA_FILE);
        let good = fs::read(&meta).unwrap();
        fs::write(&meta, b"{\"trust_domain\": 3}").unwrap();
        let e = Ca::load(d.path()).unwrap_err();
        assert!(matches!(e, CaError::Metadata { .. }), "{e}");
        assert!(e.to_string().contains("ca.json"), "{e}");
        fs::write(&meta, &good).unwrap();

        // A key that does not belong to the root.
        let key_path = d.path().join(ROOT_KEY_FILE);
        let good_key = fs::read(&key_path).unwrap();
        fs::write(
            &key_path,
            KeyAlg::EcP256.generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let e = Ca::load(d.path()).unwrap_err();
        assert!(matches!(e, CaError::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("root-key.pem"), "{e}");
        fs::write(&key_path, b"not a key").unwrap();
        assert!(matches!(Ca::load(d.path()), Err(CaError::BadKey { .. })));
        fs::write(&key_path, &good_key).unwrap();

        // A certificate file that is not a certificate.
        let cert = d.path().join(ROOT_CERT_FILE);
        fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = Ca::load(d.path()).unwrap_err();
        assert!(e.to_string().contains("root-cert.pem"), "{e}");

        // The plug-in layout next to a Warden root is ambiguous.
        fs::write(d.path().join(PLUGIN_CERT_FILE), "x").unwrap();
        assert!(matches!(
            Ca::load(d.path()),
            Err(CaError::AmbiguousLayout(_))
        ));
    }

    /// A user's PKI: root → `depth` intermediates; returns (root PEM, intermediates PEM
    /// outermost last, signing key PEM of the innermost).
    fn user_pki(depth: usize, now: SystemTime, ku_sign: bool) -> (String, Vec<String>, String) {
        let ca_params = |cn: &str, sign: bool| {
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "Example Corp");
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = if sign {
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
            } else {
                vec![KeyUsagePurpose::DigitalSignature]
            };
            p.not_before = odt(secs(now) - 86400).unwrap();
            p.not_after = odt(secs(now) + 365 * 86400).unwrap();
            p
        };
        let root_key = KeyAlg::EcP256.generate().unwrap();
        let root_params = ca_params("Example Root CA", true);
        let root = root_params.self_signed(&root_key).unwrap();
        let mut issuer = Issuer::new(root_params, root_key);
        let mut ints = vec![];
        let mut last_key = String::new();
        for i in 0..depth {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
            let innermost = i + 1 == depth;
            let params = ca_params(&format!("Example Intermediate {i}"), ku_sign || !innermost);
            let cert = params.signed_by(&key, &issuer).unwrap();
            ints.push(pem_encode("CERTIFICATE", cert.der()));
            last_key = key.serialize_pem();
            issuer = Issuer::new(params, key);
        }
        ints.reverse();
        (pem_encode("CERTIFICATE", root.der()), ints, last_key)
    }

    fn write_plugin(dir: &Path, root: &str, ints: &[String], key: &str) {
        fs::write(dir.join(PLUGIN_CERT_FILE), &ints[0]).unwrap();
        fs::write(dir.join(PLUGIN_KEY_FILE), key).unwrap();
        fs::write(dir.join(ROOT_CERT_FILE), root).unwrap();
        // As Istio's tooling writes it: the CA certificate, intermediates, then the root.
        fs::write(dir.join(PLUGIN_CHAIN_FILE), ints.concat() + root).unwrap();
    }

    #[test]
    fn plugin_ca_signs_as_an_intermediate() {
        let now = SystemTime::now();
        for depth in [1, 2] {
            let d = TempDir::new("plugin");
            let (root, ints, key) = user_pki(depth, now, true);
            write_plugin(d.path(), &root, &ints, &key);

            assert!(matches!(
                Ca::load(d.path()),
                Err(CaError::TrustDomainRequired(_))
            ));
            let ca = Ca::load_with(d.path(), Some("example.org")).unwrap();
            assert_eq!(ca.layout(), Layout::PlugIn);
            assert_eq!(ca.trust_domain(), "example.org");
            let who = id("spiffe://example.org/ns/a/sa/b");
            let svid = issue(&ca, &who, None, now);
            // Leaf + every intermediate once; the root only in the bundle.
            assert_eq!(svid.cert_chain_pem.len(), 1 + depth);
            assert_eq!(&svid.cert_chain_pem[1..], &ints[..]);
            assert_eq!(svid.root_bundle_pem, vec![root.clone()]);
            let root_der = ders(std::slice::from_ref(&root));
            verify_chain(&ders(&svid.cert_chain_pem), &root_der, now).unwrap();
            assert_eq!(ca.bundle().roots_der, root_der);

            assert!(matches!(
                Ca::rotate_root(d.path(), now),
                Err(CaError::RotationUnsupported(_))
            ));
        }
    }

    #[test]
    fn plugin_trust_domain_from_ca_json() {
        let now = SystemTime::now();
        let d = TempDir::new("plugin-json");
        let (root, ints, key) = user_pki(1, now, true);
        write_plugin(d.path(), &root, &ints, &key);
        fs::write(
            d.path().join(METADATA_FILE),
            r#"{"trust_domain": "corp.example", "max_ttl_seconds": 3600, "default_ttl_seconds": 600}"#,
        )
        .unwrap();
        let ca = Ca::load(d.path()).unwrap();
        assert_eq!(ca.trust_domain(), "corp.example");
        assert_eq!(ca.ttl_policy().max_ttl, Duration::from_secs(3600));
        assert!(matches!(
            Ca::load_with(d.path(), Some("other.example")),
            Err(CaError::TrustDomainMismatch { .. })
        ));
    }

    #[test]
    fn plugin_ca_is_validated_on_load() {
        let now = SystemTime::now();
        let td = Some("example.org");

        // Signing certificate without keyCertSign.
        let d = TempDir::new("plugin-ku");
        let (root, ints, key) = user_pki(1, now, false);
        write_plugin(d.path(), &root, &ints, &key);
        let e = Ca::load_with(d.path(), td).unwrap_err();
        assert!(matches!(e, CaError::NotCaCert { .. }), "{e}");
        assert!(e.to_string().contains("ca-cert.pem"), "{e}");

        // Intermediate from another PKI than root-cert.pem.
        let d = TempDir::new("plugin-root");
        let (_, ints, key) = user_pki(1, now, true);
        let (other_root, _, _) = user_pki(1, now, true);
        write_plugin(d.path(), &other_root, &ints, &key);
        let e = Ca::load_with(d.path(), td).unwrap_err();
        assert!(matches!(e, CaError::ChainBroken { .. }), "{e}");

        // Key of another certificate.
        let d = TempDir::new("plugin-key");
        let (root, ints, _) = user_pki(1, now, true);
        let (_, _, other_key) = user_pki(1, now, true);
        write_plugin(d.path(), &root, &ints, &other_key);
        assert!(matches!(
            Ca::load_with(d.path(), td),
            Err(CaError::KeyMismatch { .. })
        ));

        // Expired (as seen from two years on).
        let d = TempDir::new("plugin-expired");
        let (root, ints, key) = user_pki(1, now, true);
        write_plugin(d.path(), &root, &ints, &key);
        let later = now + Duration::from_secs(2 * 365 * 86400);
        assert!(matches!(
            Ca::load_at(d.path(), td, later),
            Err(CaError::CaCertNotValid { .. })
        ));
    }

    #[test]
    fn root_rotation_keeps_old_certificates_valid() {
        let d = TempDir::new("rotate");
        let t0 = SystemTime::now();
        let ca = Ca::init_with(
            d.path(),
            "cluster.local",
            KeyAlg::EcP256,
            TtlPolicy::default(),
            t0,
        )
        .unwrap();
        let old_root = ca.bundle().roots_der[0].clone();
        let old_key = fs::read(d.path().join(ROOT_KEY_FILE)).unwrap();
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let old_leaf = issue(&ca, &who, Some(Duration::from_secs(48 * 3600)), t0);

        let t1 = t0 + Duration::from_secs(3600);
        let ca = Ca::rotate_root(d.path(), t1).unwrap();
        let bundle = ca.bundle().roots_der;
        assert_eq!(bundle.len(), 2);
        assert_eq!(bundle[1], old_root);
        let new_root = bundle[0].clone();
        assert_ne!(new_root, old_root);
        assert_ne!(old_key, fs::read(d.path().join(ROOT_KEY_FILE)).unwrap());
        assert!(fs::read_dir(d.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".new")));

        // New leaves chain to the new root only; old leaves still verify against the bundle.
        let new_leaf = issue(&ca, &who, None, t1);
        let new_chain = ders(&new_leaf.cert_chain_pem);
        verify_chain(&new_chain, std::slice::from_ref(&new_root), t1).unwrap();
        assert!(verify_chain(&new_chain, std::slice::from_ref(&old_root), t1).is_err());
        verify_chain(&ders(&old_leaf.cert_chain_pem), &bundle, t1).unwrap();
        assert_eq!(new_leaf.root_bundle_pem.len(), 2);

        // A restart during the rotation keeps both roots.
        let again = Ca::load_at(d.path(), None, t1 + Duration::from_secs(60)).unwrap();
        assert_eq!(again.bundle().roots_der, bundle);
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(d.path().join(METADATA_FILE)).unwrap()).unwrap();
        let roots = meta["roots"].as_array().unwrap();
        assert_eq!(roots.len(), 2);
        assert!(roots[0].get("retire_after").is_none());
        assert!(roots[1]["retire_after"].is_string());

        // Once every certificate of the old root has expired, it is no longer trusted.
        let after = t1 + DEFAULT_MAX_TTL + CLOCK_SKEW + Duration::from_secs(1);
        let later = Ca::load_at(d.path(), None, after).unwrap();
        assert_eq!(later.bundle().roots_der, vec![new_root.clone()]);

        // A second rotation drops retired roots from ca.json for good.
        let ca3 = Ca::rotate_root(d.path(), after).unwrap();
        assert_eq!(ca3.bundle().roots_der.len(), 2);
        assert_eq!(ca3.bundle().roots_der[1], new_root);
    }

    /// Critical nameConstraints permitting only the URI host `other.td`.
    fn uri_name_constraint() -> rcgen::CustomExtension {
        let mut content = vec![0x30, 0x0e, 0xa0, 0x0c, 0x30, 0x0a, 0x86, 0x08];
        content.extend_from_slice(b"other.td");
        let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 30], content);
        ext.set_criticality(true);
        ext
    }

    /// A critical extension nobody understands.
    fn unknown_critical() -> rcgen::CustomExtension {
        let mut ext =
            rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55555, 1], vec![5, 0]);
        ext.set_criticality(true);
        ext
    }

    type Tweak = fn(&mut CertificateParams);

    /// root → one CA per tweak (outermost first); returns (root PEM, CA PEMs innermost first,
    /// innermost key PEM, innermost issuer).
    fn tweaked_pki(
        now: SystemTime,
        tweaks: &[Tweak],
    ) -> (String, Vec<String>, String, Issuer<'static, KeyPair>) {
        let params = |cn: &str| {
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.use_authority_key_identifier_extension = true;
            p.not_before = odt(secs(now) - 86400).unwrap();
            p.not_after = odt(secs(now) + 365 * 86400).unwrap();
            p
        };
        let root_key = KeyAlg::EcP256.generate().unwrap();
        let root_params = params("Tweaked Root");
        let root = root_params.self_signed(&root_key).unwrap();
        let mut issuer = Issuer::new(root_params, root_key);
        let mut cas = vec![];
        let mut last_key = String::new();
        for (i, tweak) in tweaks.iter().enumerate() {
            let key = KeyAlg::EcP256.generate().unwrap();
            let mut p = params(&format!("Tweaked CA {i}"));
            tweak(&mut p);
            cas.push(pem_encode(
                "CERTIFICATE",
                p.signed_by(&key, &issuer).unwrap().der(),
            ));
            last_key = key.serialize_pem();
            issuer = Issuer::new(p, key);
        }
        cas.reverse();
        (pem_encode("CERTIFICATE", root.der()), cas, last_key, issuer)
    }

    fn no_tweak(_: &mut CertificateParams) {}
    fn path_len_0(p: &mut CertificateParams) {
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    }
    fn uri_constrained(p: &mut CertificateParams) {
        p.custom_extensions.push(uri_name_constraint());
    }
    fn dns_constrained(p: &mut CertificateParams) {
        p.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.com".into())],
            excluded_subtrees: vec![],
        });
    }
    fn unknown_critical_extension(p: &mut CertificateParams) {
        p.custom_extensions.push(unknown_critical());
    }
    fn one_day_left(p: &mut CertificateParams) {
        let now = secs(SystemTime::now());
        p.not_after = odt(now + 86400).unwrap();
    }

    #[test]
    fn plugin_ca_whose_certificates_peers_would_refuse_is_refused_at_load() {
        let now = SystemTime::now();
        let td = Some("example.org");
        let rows: [(&str, &[Tweak], Option<&str>); 5] = [
            ("plain", &[no_tweak], None),
            // A DNS-only constraint says nothing about URI names: peers accept.
            ("dns-constrained", &[dns_constrained], None),
            // pathlen 0 on the parent, yet the signing CA is a CA below it.
            ("pathlen", &[path_len_0, no_tweak], Some("path length")),
            (
                "uri-constrained",
                &[uri_constrained],
                Some("name constraints"),
            ),
            (
                "unknown-critical",
                &[no_tweak, unknown_critical_extension],
                Some("critical extension"),
            ),
        ];
        for (name, tweaks, refused) in rows {
            let d = TempDir::new("plugin-webpki");
            let (root, cas, key, _) = tweaked_pki(now, tweaks);
            write_plugin(d.path(), &root, &cas, &key);
            match (Ca::load_with(d.path(), td), refused) {
                (Ok(ca), None) => {
                    let who = id("spiffe://example.org/ns/a/sa/b");
                    let s = issue(&ca, &who, None, now);
                    let roots = ders(std::slice::from_ref(&root));
                    verify_chain(&ders(&s.cert_chain_pem), &roots, now).unwrap();
                }
                (Err(e @ CaError::NotCaCert { .. }), Some(needle)) => {
                    let text = e.to_string();
                    assert!(text.contains("ca-cert.pem"), "{name}: {text}");
                    assert!(text.contains(needle), "{name}: {text}");
                    assert!(text.contains("refused by TLS peers"), "{name}: {text}");
                }
                (other, want) => panic!("{name}: expected refusal {want:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn verify_chain_agrees_with_webpki_on_leaves() {
        let now = SystemTime::now();
        let who = id("spiffe://example.org/ns/a/sa/b");
        let rows: [(&str, &[Tweak], Option<&str>); 4] = [
            ("plain", &[no_tweak], None),
            ("dns-constrained", &[dns_constrained], None),
            (
                "uri-constrained",
                &[uri_constrained],
                Some("name constraints"),
            ),
            (
                "unknown-critical",
                &[unknown_critical_extension],
                Some("critical extension"),
            ),
        ];
        for (name, tweaks, refused) in rows {
            let (root, cas, _, issuer) = tweaked_pki(now, tweaks);
            let key = KeyAlg::EcP256.generate().unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.subject_alt_names = vec![SanType::URI(who.to_string().try_into().unwrap())];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let leaf = p.signed_by(&key, &issuer).unwrap();
            let mut chain = vec![leaf.der().to_vec()];
            chain.extend(ders(&cas));
            let r = verify_chain(&chain, &ders(std::slice::from_ref(&root)), now);
            match (r, refused) {
                (Ok(()), None) => {}
                (Err(e), Some(needle)) => assert!(e.contains(needle), "{name}: {e}"),
                (other, want) => panic!("{name}: expected {want:?}, got {other:?}"),
            }
        }
        // A leaf with an unknown critical extension of its own.
        let (root, cas, _, issuer) = tweaked_pki(now, &[no_tweak]);
        let key = KeyAlg::EcP256.generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(who.to_string().try_into().unwrap())];
        p.custom_extensions.push(unknown_critical());
        let leaf = p.signed_by(&key, &issuer).unwrap();
        let mut chain = vec![leaf.der().to_vec()];
        chain.extend(ders(&cas));
        let e = verify_chain(&chain, &ders(std::slice::from_ref(&root)), now).unwrap_err();
        assert!(e.contains("critical extension"), "{e}");
    }

    #[test]
    fn ttl_policy_is_bounded_everywhere() {
        let now = SystemTime::now();
        let year = Duration::from_secs(365 * 86400);
        let d = TempDir::new("ttl-bound");
        let too_long = TtlPolicy {
            default_ttl: DEFAULT_TTL,
            max_ttl: year + Duration::from_secs(1),
        };
        let e = Ca::init_with(d.path(), "td", KeyAlg::EcP256, too_long, now).unwrap_err();
        assert!(matches!(e, CaError::BadTtl(_)), "{e}");
        assert!(!d.path().join(ROOT_KEY_FILE).exists());
        let ok = TtlPolicy {
            default_ttl: DEFAULT_TTL,
            max_ttl: year,
        };
        let mut ca = Ca::init_with(d.path(), "td", KeyAlg::EcP256, ok, now).unwrap();
        assert!(matches!(
            ca.set_ttl_policy(too_long),
            Err(CaError::BadTtl(_))
        ));

        // Whatever ca.json says: an error naming the file and field, never a panic, and a
        // refused rotation leaves every file as it was.
        let meta_path = d.path().join(METADATA_FILE);
        let good: serde_json::Value =
            serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
        let files = |dir: &Path| {
            let mut v: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name(), fs::read(e.path()).unwrap())
                })
                .collect();
            v.sort();
            v
        };
        for (default, max) in [
            (u64::MAX, u64::MAX),
            (1, u64::MAX),
            (1, i64::MAX as u64 + 1),
            (1, year.as_secs() + 1),
            (year.as_secs() + 1, year.as_secs() + 1),
            (0, 0),
            (7200, 3600),
        ] {
            let mut m = good.clone();
            m["default_ttl_seconds"] = default.into();
            m["max_ttl_seconds"] = max.into();
            fs::write(&meta_path, serde_json::to_vec(&m).unwrap()).unwrap();
            let e = Ca::load_at(d.path(), None, now).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, CaError::Metadata { .. }), "{text}");
            assert!(text.contains("ca.json"), "{text}");
            assert!(text.contains("max_ttl_seconds"), "{text}");
            let before = files(d.path());
            assert!(Ca::rotate_root(d.path(), now).is_err());
            assert_eq!(before, files(d.path()), "{default}/{max}");
        }
        fs::write(&meta_path, serde_json::to_vec(&good).unwrap()).unwrap();
        Ca::load_at(d.path(), None, now).unwrap();
        let _ = ca;
    }

    #[test]
    fn max_ttl_must_fit_in_the_signing_certificate() {
        let now = SystemTime::now();
        let td = Some("example.org");
        let d = TempDir::new("plugin-short");
        let (root, cas, key, _) = tweaked_pki(now, &[one_day_left]);
        write_plugin(d.path(), &root, &cas, &key);
        // The default 48 h maximum outlives the CA certificate.
        let e = Ca::load_with(d.path(), td).unwrap_err();
        assert!(matches!(e, CaError::BadTtl(_)), "{e}");
        assert!(e.to_string().contains("ca-cert.pem"), "{e}");
        fs::write(
            d.path().join(METADATA_FILE),
            r#"{"trust_domain": "example.org", "max_ttl_seconds": 172800}"#,
        )
        .unwrap();
        let e = Ca::load(d.path()).unwrap_err();
        assert!(matches!(e, CaError::Metadata { .. }), "{e}");
        fs::write(
            d.path().join(METADATA_FILE),
            r#"{"trust_domain": "example.org", "max_ttl_seconds": 3600, "default_ttl_seconds": 600}"#,
        )
        .unwrap();
        Ca::load(d.path()).unwrap();

        // A Warden root close to its end cannot serve a long maximum, but can be rotated.
        let d = TempDir::new("warden-short");
        let t0 = SystemTime::now();
        let ca = Ca::init_with(
            d.path(),
            "cluster.local",
            KeyAlg::EcP256,
            TtlPolicy::default(),
            t0,
        )
        .unwrap();
        let (_, end) = ca.issuer_validity();
        let late = end - Duration::from_secs(3600);
        assert!(matches!(
            Ca::load_at(d.path(), None, late),
            Err(CaError::Metadata { .. })
        ));
        let rotated = Ca::rotate_root(d.path(), late).unwrap();
        assert_eq!(rotated.bundle().roots_der.len(), 2);
    }

    #[test]
    fn retire_after_is_never_garbage() {
        let d = TempDir::new("retire");
        let t0 = SystemTime::now();
        Ca::init_with(
            d.path(),
            "cluster.local",
            KeyAlg::EcP256,
            TtlPolicy::default(),
            t0,
        )
        .unwrap();
        let t1 = t0 + Duration::from_secs(60);
        Ca::rotate_root(d.path(), t1).unwrap();
        let meta_path = d.path().join(METADATA_FILE);
        let mut meta: serde_json::Value =
            serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
        let written = meta["roots"][1]["retire_after"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            parse_rfc3339(&written).map(secs),
            Ok(secs(t1) + DEFAULT_MAX_TTL.as_secs() as i64 + 300)
        );

        // A retired root kept for centuries is refused, not trusted.
        meta["roots"][1]["retire_after"] = "9999-12-31T23:59:59Z".into();
        fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
        let e = Ca::load_at(d.path(), None, t1).unwrap_err();
        assert!(e.to_string().contains("roots[1].retire_after"), "{e}");
        for junk in ["@12345", "tomorrow", ""] {
            meta["roots"][1]["retire_after"] = junk.into();
            fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
            let e = Ca::load_at(d.path(), None, t1).unwrap_err();
            assert!(e.to_string().contains("roots[1].retire_after"), "{e}");
            assert!(Ca::rotate_root(d.path(), t1).is_err());
        }

        // Carried over by a second rotation: never later than the new retirement.
        meta["roots"][1]["retire_after"] = written.as_str().into();
        fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
        let t2 = t1 + Duration::from_secs(60);
        Ca::rotate_root(d.path(), t2).unwrap();
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
        for r in meta["roots"].as_array().unwrap().iter().skip(1) {
            let t = parse_rfc3339(r["retire_after"].as_str().unwrap()).unwrap();
            assert!(secs(t) <= secs(t2) + DEFAULT_MAX_TTL.as_secs() as i64 + 300);
        }
    }
}
