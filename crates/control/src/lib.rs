//! Warden's control plane: reads and watches the configuration, cuts it into the resources
//! each proxy needs ([`snapshot`]), serves them over a streaming gRPC API with versions and
//! ACK/NACK ([`server`]), and hosts the CA service on the same port. Proxies follow it through
//! [`client::ControlSource`]. JWKS documents are fetched here ([`jwks`]) and inlined into the
//! RequestAuthentications served, as istiod does.
#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod jwks;
pub mod load;
pub mod local;
pub mod metrics;
pub mod run;
pub mod server;
pub mod snapshot;

/// The generated protocol types (`proto/control.proto`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("warden.control.v1");
}
