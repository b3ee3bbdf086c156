//! Identities issued straight from a CA held in memory, without the CA service: for fake
//! proxies in tests and the scale benchmark, where a thousand workloads need certificates
//! before anything runs. The key is made here and never leaves the process, as with the
//! service.

use std::sync::Arc;
use std::time::SystemTime;

use warden_identity::ca::{Ca, KeyAlg};
use warden_identity::csr::generate_csr;
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::Svid;
use warden_identity::tls::IdentityState;

/// A workload identity for `id`, signed by `ca`, trusting `ca`'s roots.
pub fn identity(ca: &Ca, id: &SpiffeId) -> Result<Arc<IdentityState>, String> {
    let (key, csr) = generate_csr(id, KeyAlg::EcP256).map_err(|e| e.to_string())?;
    let issued = ca
        .sign_csr(&csr, id, None, SystemTime::now())
        .map_err(|e| e.to_string())?;
    let chain = issued
        .cert_chain_pem
        .iter()
        .map(|p| pem::parse(p).map(|p| p.into_contents()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("parsing the issued chain: {e}"))?;
    let svid = Svid {
        id: id.clone(),
        cert_chain_der: chain,
        key_pkcs8_der: key,
        not_before: issued.not_before,
        not_after: issued.not_after,
    };
    IdentityState::with_svid(svid, ca.bundle())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}
