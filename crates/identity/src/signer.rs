//! The CA behind the certificate service: [`CertSigner`] for [`Ca`], swappable in place so a
//! root rotation takes effect without restarting the server.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::ca::Ca;
use crate::service::CertSigner;
use crate::spiffe::SpiffeId;

pub struct CaSigner {
    ca: RwLock<Arc<Ca>>,
}

impl CaSigner {
    pub fn new(ca: Ca) -> Self {
        CaSigner {
            ca: RwLock::new(Arc::new(ca)),
        }
    }

    /// Replaces the CA (after `Ca::rotate_root` or a reload from disk).
    pub fn replace(&self, ca: Ca) {
        // A poisoned lock only means a signing thread panicked; the value is still whole.
        *self.ca.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ca);
    }

    /// Loads the CA folder again and switches to it when its roots changed: a root rotation
    /// done by another process (`warden ca rotate-root`) or an old root past its retirement.
    /// Returns whether anything changed; on error the current CA stays in use.
    pub fn reload(
        &self,
        dir: &Path,
        trust_domain: Option<&str>,
    ) -> Result<bool, crate::ca::CaError> {
        let fresh = Ca::load_with(dir, trust_domain)?;
        let changed = fresh.bundle_pem() != self.current().bundle_pem();
        if changed {
            self.replace(fresh);
        }
        Ok(changed)
    }

    pub fn current(&self) -> Arc<Ca> {
        self.ca.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl CertSigner for CaSigner {
    fn sign(
        &self,
        csr_pem: &[u8],
        entitled: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<(Vec<String>, Vec<String>), String> {
        let ca = self.current();
        let issued = ca
            .sign_csr(csr_pem, entitled, ttl, SystemTime::now())
            .map_err(|e| e.to_string())?;
        Ok((issued.cert_chain_pem, issued.root_bundle_pem))
    }

    fn trust_domain(&self) -> String {
        self.current().trust_domain().to_string()
    }
}
