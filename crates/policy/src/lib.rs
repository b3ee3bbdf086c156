//! Warden's policy crate: the Istio security resource model, validation, scope resolution and
//! the authorization/JWT decision engine. Pure: no I/O, no async, no clock reads. The proxy
//! and the CLI both call this crate, so simulation and enforcement cannot disagree.
#![forbid(unsafe_code)]

pub mod analyze;
pub mod authz;
pub mod config;
pub mod diag;
pub mod engine;
pub mod jwt;
pub mod mesh;
pub mod model;
pub mod path;
pub mod scope;
pub mod simulate;
pub mod source;
pub mod validate;
