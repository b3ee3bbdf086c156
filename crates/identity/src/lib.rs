//! Warden's workload identity: SPIFFE IDs, the certificate authority that issues X.509 SVIDs
//! from CSRs, the client that keeps a workload's certificate fresh, and rustls verifiers that
//! check peers by SPIFFE ID.
#![forbid(unsafe_code)]

pub mod ca;
pub mod client;
pub mod csr;
pub mod inspect;
pub mod service;
pub mod signer;
pub mod spiffe;
pub mod svid;
pub mod tls;
pub mod token;

/// Istio's certificate service (`proto/ca.proto`), generated at build time.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("istio.v1.auth");
}
