//! The workload's certificate from files (`cert-chain.pem`, `key.pem`, `root-cert.pem`, as
//! `warden ca issue` and Istio's file-mounted certificates lay them out): read, checked, put
//! into the [`IdentityState`] every TLS handshake reads, and read again whenever the files
//! change. A bad set of files is refused and logged; the certificate in force stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::{Svid, TrustBundle};
use warden_identity::tls::IdentityState;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// How often [`CertFiles::watch`] looks at the files by default.
pub const DEFAULT_CERT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why a set of certificate files was refused.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct CertError {
    pub file: String,
    pub message: String,
}

fn err(file: &Path, message: impl Into<String>) -> CertError {
    CertError {
        file: file.display().to_string(),
        message: message.into(),
    }
}

/// The three files of a workload certificate.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM: the leaf first, then intermediates.
    pub cert: PathBuf,
    /// PEM: the leaf's PKCS#8 private key (`PRIVATE KEY`).
    pub key: PathBuf,
    /// PEM: the roots peers are verified against.
    pub roots: PathBuf,
}

impl CertFiles {
    /// Reads and checks the files: a chain whose leaf names exactly one SPIFFE ID and is valid
    /// now, a PKCS#8 key, at least one root. The trust domain is the leaf's.
    pub fn load(&self) -> Result<(Svid, TrustBundle), CertError> {
        let chain = read_certs(&self.cert)?;
        let leaf = chain
            .first()
            .ok_or_else(|| err(&self.cert, "no CERTIFICATE block found"))?;
        let (_, parsed) = X509Certificate::from_der(leaf).map_err(|e| {
            err(
                &self.cert,
                format!("the leaf certificate does not parse: {e}"),
            )
        })?;
        let id = spiffe_id(&parsed).map_err(|m| err(&self.cert, m))?;
        let not_before = to_system_time(parsed.validity().not_before.timestamp());
        let not_after = to_system_time(parsed.validity().not_after.timestamp());
        let now = SystemTime::now();
        if now >= not_after {
            return Err(err(&self.cert, "the certificate has expired"));
        }
        if now < not_before {
            return Err(err(&self.cert, "the certificate is not valid yet"));
        }
        let key_text = read(&self.key)?;
        let blocks = pem::parse_many(&key_text)
            .map_err(|e| err(&self.key, format!("not valid PEM: {e}")))?;
        let key = blocks
            .into_iter()
            .find(|b| b.tag() == "PRIVATE KEY")
            .ok_or_else(|| {
                err(
                    &self.key,
                    "no PRIVATE KEY (PKCS#8) block found; convert with `openssl pkcs8 -topk8 -nocrypt`",
                )
            })?;
        let roots = read_certs(&self.roots)?;
        if roots.is_empty() {
            return Err(err(&self.roots, "no CERTIFICATE block found"));
        }
        let bundle = TrustBundle {
            trust_domain: id.trust_domain().to_string(),
            roots_der: roots,
        };
        let svid = Svid {
            id,
            cert_chain_der: chain,
            key_pkcs8_der: key.into_contents(),
            not_before,
            not_after,
        };
        Ok((svid, bundle))
    }

    /// A new identity state holding the certificate the files hold now.
    pub fn initial_state(&self) -> Result<Arc<IdentityState>, CertError> {
        let (svid, bundle) = self.load()?;
        let state = IdentityState::new(bundle).map_err(|e| err(&self.roots, e.to_string()))?;
        state
            .update_svid(svid)
            .map_err(|e| err(&self.cert, e.to_string()))?;
        Ok(Arc::new(state))
    }

    /// Reads the files into `state`: the bundle, then the SVID. A refused bundle leaves both
    /// as they were; a refused SVID leaves the SVID as it was.
    pub fn apply(&self, state: &IdentityState) -> Result<SpiffeId, CertError> {
        let (svid, bundle) = self.load()?;
        let id = svid.id.clone();
        // Check the SVID first, on its own, so a bad key does not leave a new bundle behind.
        let probe =
            IdentityState::new(bundle.clone()).map_err(|e| err(&self.roots, e.to_string()))?;
        probe
            .update_svid(svid.clone())
            .map_err(|e| err(&self.cert, e.to_string()))?;
        state
            .update_bundle(bundle)
            .map_err(|e| err(&self.roots, e.to_string()))?;
        state
            .update_svid(svid)
            .map_err(|e| err(&self.cert, e.to_string()))?;
        Ok(id)
    }

    /// Polls the files every `interval` and applies each change to `state` until the task is
    /// dropped, logging `certificate rotated` or `certificate refused` at target
    /// `warden::certs`. `observe` sees each outcome (tests). A change is a difference from
    /// the files as they are when this is called, not when the future first runs.
    pub fn watch(
        self,
        state: Arc<IdentityState>,
        interval: Duration,
        mut observe: impl FnMut(&Result<SpiffeId, CertError>) + Send,
    ) -> impl std::future::Future<Output = ()> + Send {
        let mut seen = self.fingerprint();
        async move {
            loop {
                // Polling, not synchronisation: the interval only bounds how soon a change is
                // noticed.
                tokio::time::sleep(interval).await;
                let now = self.fingerprint();
                if now == seen {
                    continue;
                }
                seen = now;
                let result = self.apply(&state);
                match &result {
                    Ok(id) => tracing::info!(
                        target: "warden::certs",
                        id = %id,
                        not_after = ?state.svid_not_after(),
                        "certificate rotated"
                    ),
                    Err(e) => tracing::warn!(
                        target: "warden::certs",
                        error = %e,
                        "certificate refused; the current certificate stays in use"
                    ),
                }
                observe(&result);
            }
        }
    }

    fn fingerprint(&self) -> Vec<Option<(u64, Option<SystemTime>)>> {
        [&self.cert, &self.key, &self.roots]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.len(), m.modified().ok()))
            })
            .collect()
    }
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))
}

fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, CertError> {
    let text = read(path)?;
    let blocks = pem::parse_many(&text).map_err(|e| err(path, format!("not valid PEM: {e}")))?;
    let mut out = Vec::new();
    for b in blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE") {
        let n = out.len() + 1;
        match X509Certificate::from_der(b.contents()) {
            Ok(([], _)) => out.push(b.into_contents()),
            Ok(_) => return Err(err(path, format!("certificate {n}: trailing bytes"))),
            Err(e) => {
                return Err(err(
                    path,
                    format!("certificate {n}: not a valid X.509 certificate: {e}"),
                ))
            }
        }
    }
    Ok(out)
}

fn spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the leaf's subjectAltName does not parse: {e}"))?;
    let uris: Vec<String> = san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [one] => one
            .parse::<SpiffeId>()
            .map_err(|e| format!("the leaf's URI SAN {one} is not a workload SPIFFE ID: {e}")),
        [] => Err("the leaf has no URI SAN; an X.509 SVID carries exactly one SPIFFE ID".into()),
        many => Err(format!(
            "the leaf has {} URI SANs; an X.509 SVID carries exactly one",
            many.len()
        )),
    }
}

fn to_system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// What `/certs` shows: the SVID in use (SPIFFE ID, expiry) and the subjects of the trust
/// bundle's roots.
pub fn certs_dump(state: &IdentityState) -> serde_json::Value {
    let now = std::time::SystemTime::now();
    let not_after = state.svid_not_after();
    let seconds_left = not_after.map(|t| match t.duration_since(now) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    });
    let bundle = state.trust_bundle();
    let roots: Vec<String> = bundle
        .roots_der
        .iter()
        .map(|der| match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => cert.subject().to_string(),
            Err(e) => format!("(unparseable root: {e})"),
        })
        .collect();
    serde_json::json!({
        "svid": {
            "spiffe_id": state.svid_id().map(|id| id.to_string()),
            "not_after": not_after.map(warden_identity::inspect::rfc3339),
            "seconds_left": seconds_left,
        },
        "trust_domain": bundle.trust_domain,
        "roots": roots,
    })
}
