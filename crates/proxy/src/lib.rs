//! Warden's data plane. This crate owns the listeners beside a workload, TLS termination with
//! the workload's SVID, HTTP/1.1, HTTP/2 and opaque TCP handling, and forwarding to the app. It
//! decides nothing itself: every request and connection goes through
//! [`warden_policy::engine::WorkloadPolicy::evaluate`], the function `warden check` uses too.
#![forbid(unsafe_code)]

pub mod capture;
pub mod certs;
pub mod error;
pub mod ext_authz;
pub mod idle;
/// Envoy's ext_authz gRPC API (`envoy.service.auth.v3`), generated from `proto/ext_authz.proto`.
#[allow(clippy::all, missing_docs)]
pub mod ext_authz_proto {
    tonic::include_proto!("envoy.service.auth.v3");
}
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod ports;
mod sniff;
pub mod source;
pub mod xfcc;

pub use error::ProxyError;
pub use inbound::{InboundListener, InboundProxy};
pub use ports::{on_loopback, port_table, InboundPort, PortProtocol, PortSettings};
