//! The proxy's error type: what can go wrong setting up a listener or handling one connection.

use std::io;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("port {0} is not one of the workload's inbound ports")]
    UnknownPort(u16),
    #[error("cannot listen on {addr} for port {port}: {source}")]
    Bind {
        port: u16,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("the client sent no bytes within {0:?}, so its protocol could not be detected")]
    DetectTimeout(std::time::Duration),
    #[error("the client closed the connection before sending anything")]
    EmptyConnection,
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("TLS handshake did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("the TLS peer presented no usable SPIFFE ID")]
    NoPeerIdentity,
    #[error("cannot connect to the app at {addr}: {source}")]
    Upstream { addr: SocketAddr, source: io::Error },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}
