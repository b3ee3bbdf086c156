//! Warden's workload identity: SPIFFE IDs, the certificate authority that issues X.509 SVIDs
//! from CSRs, the client that keeps a workload's certificate fresh, and rustls verifiers that
//! check peers by SPIFFE ID.
#![forbid(unsafe_code)]

pub mod spiffe;
pub mod svid;
