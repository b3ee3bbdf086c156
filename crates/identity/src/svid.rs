//! An X.509 SVID as held in memory: the workload's certificate chain and private key. The
//! type the CA client produces and the TLS layer consumes; plain DER, no TLS library types.

use std::time::SystemTime;

use crate::spiffe::SpiffeId;

/// A workload certificate with its key. The key is generated in the workload's memory and
/// never leaves it; `Debug` does not print it.
#[derive(Clone)]
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then intermediates (never the root).
    pub cert_chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("chain_len", &self.cert_chain_der.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The roots a workload trusts. During a root rotation it holds the old and the new root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: String,
    /// Root certificates, DER.
    pub roots_der: Vec<Vec<u8>>,
}
