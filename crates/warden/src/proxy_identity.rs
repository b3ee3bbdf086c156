//! Where `warden proxy` gets its workload certificate: certificate files watched for changes
//! (`--cert/--key/--roots`, e.g. from `warden ca issue` or cert-manager), or Warden's CA service
//! (`--ca-addr`), as Istio's pilot-agent does: a key generated in memory, a CSR sent with a
//! bootstrap token the first time and with the current certificate afterwards, renewal at about
//! half the lifetime, and the trust bundle the CA returns. Either way the TLS configurations
//! read the [`IdentityState`] at each handshake, so rotation never restarts a listener.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use warden_identity::client::{
    drive_identity_state, Bootstrap, CaEndpoint, CertClient, CertClientConfig, IdentityStatus,
};
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::TrustBundle;
use warden_identity::tls::IdentityState;
use warden_proxy::certs::{CertFiles, DEFAULT_CERT_POLL_INTERVAL};

/// The certificate source chosen by the flags.
pub enum IdentitySource {
    Files(CertFiles),
    Ca {
        addr: String,
        roots: PathBuf,
        token_file: Option<PathBuf>,
        ttl: Option<Duration>,
    },
}

/// What [`IdentitySource::prepare`] hands the runtime: the state the listeners use, and what
/// keeps it current.
pub struct Prepared {
    pub state: Arc<IdentityState>,
    keeper: Keeper,
}

enum Keeper {
    Files(CertFiles),
    Ca(Box<CertClientConfig>),
}

impl IdentitySource {
    /// Loads what can be loaded before the runtime starts: the certificate files, or the roots
    /// the CA's own certificate must chain to. `id` is the identity the workload runs as; a
    /// certificate file naming anyone else is refused (peers would see the wrong identity).
    pub fn prepare(&self, id: &SpiffeId) -> Result<Prepared> {
        match self {
            IdentitySource::Files(files) => {
                let state = files
                    .initial_state()
                    .map_err(|e| anyhow!("the workload certificate is refused: {e}"))?;
                if let Some(have) = state.svid_id() {
                    if have.namespace() != id.namespace()
                        || have.service_account() != id.service_account()
                    {
                        bail!(
                            "--cert names {have}, but the workload runs as service account {}/{}; peers would see the wrong identity",
                            id.namespace(),
                            id.service_account()
                        );
                    }
                }
                Ok(Prepared {
                    state,
                    keeper: Keeper::Files(files.clone()),
                })
            }
            IdentitySource::Ca {
                addr,
                roots,
                token_file,
                ttl,
            } => {
                let text = std::fs::read(roots)
                    .map_err(|e| anyhow!("--roots {}: cannot read: {e}", roots.display()))?;
                let roots_der: Vec<_> = pem::parse_many(&text)
                    .map_err(|e| anyhow!("--roots {}: not valid PEM: {e}", roots.display()))?
                    .into_iter()
                    .filter(|b| b.tag() == "CERTIFICATE")
                    .map(|b| b.into_contents())
                    .collect();
                if roots_der.is_empty() {
                    bail!("--roots {}: no CERTIFICATE block found", roots.display());
                }
                let bundle = TrustBundle {
                    trust_domain: id.trust_domain().to_string(),
                    roots_der,
                };
                let state = IdentityState::new(bundle.clone())
                    .map_err(|e| anyhow!("--roots {}: {e}", roots.display()))?;
                let ca = CaEndpoint::new(addr.clone(), id.trust_domain())
                    .map_err(|e| anyhow!("--ca-addr {addr}: {e}"))?;
                let bootstrap = match token_file {
                    Some(p) => Bootstrap::TokenFile(p.clone()),
                    None => Bootstrap::None,
                };
                let mut cfg = CertClientConfig::new(id.clone(), ca, bundle, bootstrap);
                cfg.requested_ttl = *ttl;
                Ok(Prepared {
                    state: Arc::new(state),
                    keeper: Keeper::Ca(Box::new(cfg)),
                })
            }
        }
    }
}

impl Prepared {
    /// Starts keeping the state current. From the CA, waits for the first certificate (the
    /// client retries with backoff; each failure is logged) so that no listener opens without
    /// an identity; from files, the certificate is already in place.
    pub async fn start(self) -> Arc<IdentityState> {
        match self.keeper {
            Keeper::Files(files) => {
                tokio::spawn(files.watch(self.state.clone(), DEFAULT_CERT_POLL_INTERVAL, |_| {}));
            }
            Keeper::Ca(cfg) => {
                let id = cfg.id.clone();
                let addr = cfg.ca.addr.clone();
                tracing::info!(target: "warden::certs", %id, ca = %addr, "requesting a certificate");
                let handle = CertClient::new(*cfg).spawn();
                let mut status = handle.status.clone();
                let bundle = handle.bundle.clone();
                tokio::spawn(drive_identity_state(handle, self.state.clone()));
                // Failures are logged by the client as it retries; here we only wait.
                loop {
                    if let IdentityStatus::Ready(svid) = &*status.borrow_and_update() {
                        // Put it in force now rather than when `drive_identity_state` runs
                        // next, bundle first, so the listeners that open next have it.
                        let roots = bundle.borrow().clone();
                        if !roots.roots_der.is_empty() {
                            let _ = self.state.update_bundle(roots);
                        }
                        match self.state.update_svid(svid.clone()) {
                            Ok(()) => {
                                tracing::info!(target: "warden::certs", id = %svid.id, ca = %addr, "certificate issued");
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(target: "warden::certs", "issued certificate refused: {e}")
                            }
                        }
                    }
                    if status.changed().await.is_err() {
                        break;
                    }
                }
            }
        }
        self.state
    }
}
