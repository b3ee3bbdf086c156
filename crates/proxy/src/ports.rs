//! The inbound port table: for each container port of the workload, its effective mTLS mode
//! (PeerAuthentication) and protocol (Service port `appProtocol` or name, else detected), and
//! where the app listens.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use warden_policy::authz::Protocol;
use warden_policy::config::{Config, Workload};
use warden_policy::model::MtlsMode;
use warden_policy::scope;
use warden_policy::simulate::declared_protocol;

/// Which filter chain handles a port's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// HTTP/1.1 or HTTP/2 (by ALPN over TLS, by preface in plaintext), forwarded to the app
    /// over HTTP/1.1.
    Http,
    /// Declared HTTP/2 (`http2`, `grpc`, `grpc-web`, `h2c`): served like [`PortProtocol::Http`]
    /// but forwarded to the app over HTTP/2 (h2c), as Istio's inbound cluster does, so gRPC
    /// trailers and streams survive.
    Http2,
    /// Opaque TCP.
    Tcp,
    /// Undeclared: HTTP when the first bytes look like an HTTP/1 request line or the HTTP/2
    /// preface, else TCP (Istio's protocol sniffing).
    Detect,
}

/// Mode and protocol of one container port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSettings {
    /// STRICT, PERMISSIVE or DISABLE; UNSET is treated as PERMISSIVE (Istio's default).
    pub mode: MtlsMode,
    pub protocol: PortProtocol,
}

impl PortSettings {
    /// These settings with the app reached at `app`.
    pub fn with_app(self, app: SocketAddr) -> InboundPort {
        InboundPort {
            mode: self.mode,
            protocol: self.protocol,
            app,
        }
    }
}

/// One inbound port as the proxy serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundPort {
    pub mode: MtlsMode,
    pub protocol: PortProtocol,
    /// Where allowed traffic is sent: the app's address for this port.
    pub app: SocketAddr,
}

/// The port table of `wl` under `cfg`: the workload's container ports and the target ports of
/// the Services selecting it, each with its PeerAuthentication mode and declared protocol. The
/// first Service port that declares a protocol for a container port wins, as in the offline
/// simulation. UDP container ports are left out: the proxy does not handle UDP.
pub fn port_table(cfg: &Config, wl: &Workload) -> BTreeMap<u16, PortSettings> {
    let mut protocols: BTreeMap<u16, Option<PortProtocol>> = BTreeMap::new();
    for cp in &wl.ports {
        let udp = cp
            .protocol
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("udp"));
        if cp.container_port != 0 && !udp {
            protocols.entry(cp.container_port).or_insert(None);
        }
    }
    for s in cfg.services_selecting(wl) {
        for sp in &s.spec.ports {
            let udp = sp
                .protocol
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case("udp"));
            let Some(target) = wl.target_port(sp).filter(|t| *t != 0) else {
                continue;
            };
            if udp {
                continue;
            }
            let declared =
                declared_protocol(sp.name.as_deref(), sp.app_protocol.as_deref()).map(|(p, _)| {
                    match p {
                        Protocol::Http
                            if declares_h2(sp.name.as_deref(), sp.app_protocol.as_deref()) =>
                        {
                            PortProtocol::Http2
                        }
                        Protocol::Http => PortProtocol::Http,
                        Protocol::Tcp => PortProtocol::Tcp,
                    }
                });
            let entry = protocols.entry(target).or_insert(None);
            if entry.is_none() {
                *entry = declared;
            }
        }
    }
    let pa = scope::peer_authentication(cfg, wl);
    protocols
        .into_iter()
        .map(|(port, proto)| {
            let mode = match pa.mode_for(port).mode {
                MtlsMode::Unset => MtlsMode::Permissive,
                m => m,
            };
            let protocol = proto.unwrap_or(PortProtocol::Detect);
            (port, PortSettings { mode, protocol })
        })
        .collect()
}

/// Whether a Service port declares an HTTP/2-only protocol, with the precedence
/// `declared_protocol` uses: a known `appProtocol` first, else the name's prefix.
fn declares_h2(name: Option<&str>, app_protocol: Option<&str>) -> bool {
    let h2 = |p: &str| {
        matches!(
            p.to_ascii_lowercase().as_str(),
            "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c"
        )
    };
    if let Some(ap) = app_protocol {
        if declared_protocol(None, Some(ap)).is_some() {
            return h2(ap);
        }
    }
    name.map(|n| n.split('-').next().unwrap_or(n))
        .is_some_and(h2)
}

/// `table` with every app on loopback at its container port (`127.0.0.1:<port>`), as in a pod.
pub fn on_loopback(table: &BTreeMap<u16, PortSettings>) -> BTreeMap<u16, InboundPort> {
    table
        .iter()
        .map(|(port, s)| {
            (
                *port,
                s.with_app(SocketAddr::from((Ipv4Addr::LOCALHOST, *port))),
            )
        })
        .collect()
}
