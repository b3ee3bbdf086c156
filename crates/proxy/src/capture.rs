//! Transparent capture, Istio's `REDIRECT` interception mode: the pod's iptables rules send
//! every inbound TCP connection to one listener (Istio's 15006) and every outbound one to
//! another (15001); the destination the client really dialled is read back from the kernel
//! (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`). This module owns that lookup, the two capture
//! listeners, and the outbound table that maps an original destination (a Service's cluster
//! IP and port) to an auto-mTLS [`Route`]. What happens to the connection afterwards is
//! [`InboundProxy`]'s and [`Route`]'s job, exactly as in explicit mode.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use warden_policy::authz::Protocol;
use warden_policy::config::{Config, Workload};
use warden_policy::model::MtlsMode;
use warden_policy::simulate::declared_protocol;

use crate::error::ProxyError;
use crate::inbound::InboundProxy;
use crate::outbound::{
    destination_for, istio_sni, log_failure, Destination, OutboundProtocol, OutboundProxy, Route,
    Security,
};
use crate::ports::port_table;

/// Istio's inbound capture port.
pub const DEFAULT_INBOUND_CAPTURE_PORT: u16 = 15006;
/// Istio's outbound capture port.
pub const DEFAULT_OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// The source address of the inbound proxy's connections to the app (Envoy's
/// `InboundPassthroughBindIpv4`); the iptables rules let it through uncaptured.
pub const INBOUND_UPSTREAM_BIND: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6));
/// How long a pass-through connection to an unknown destination may take to connect.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong setting up a capture listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    #[error("cannot listen on {addr} for {what} capture: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// The destination the client dialled before iptables redirected the connection to us. A
/// connection that was not redirected reports its own local address.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}

/// The original destination of a captured connection, or why it must be closed: not
/// redirected at all (someone dialled the capture port itself, which would loop) or unknown to
/// the kernel.
fn captured_dst(stream: &TcpStream) -> Result<SocketAddr, String> {
    let orig = original_dst(stream).map_err(|e| format!("no original destination: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    if orig == local {
        return Err(format!(
            "connection to the capture port {local} itself (not redirected by iptables)"
        ));
    }
    Ok(orig)
}

/// Istio's inbound capture listener: every redirected connection is served as a connection to
/// the container port it was addressed to. A port the workload does not have is closed (no
/// pass-through; see docs/semantics.md).
pub struct InboundCapture {
    proxy: Arc<InboundProxy>,
    listener: TcpListener,
}

impl InboundCapture {
    pub async fn bind(proxy: Arc<InboundProxy>, addr: SocketAddr) -> Result<Self, CaptureError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| CaptureError::Bind {
                what: "inbound",
                addr,
                source,
            })?;
        Ok(InboundCapture { proxy, listener })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the task is dropped, one task per connection.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let proxy = self.proxy.clone();
                    tokio::spawn(serve_inbound(proxy, stream, peer));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(target: "warden::proxy", error = %e, "inbound capture accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn serve_inbound(proxy: Arc<InboundProxy>, stream: TcpStream, peer: SocketAddr) {
    let orig = match captured_dst(&stream) {
        Ok(o) => o,
        Err(why) => {
            tracing::info!(target: "warden::proxy", source = %peer, reason = %why, "inbound connection closed");
            return;
        }
    };
    let port = orig.port();
    if !proxy.ports().contains_key(&port) {
        tracing::info!(
            target: "warden::proxy",
            source = %peer,
            destination = %orig,
            reason = "the workload has no such port",
            "inbound connection closed"
        );
        return;
    }
    match proxy.serve_connection(port, stream).await {
        Ok(()) => {}
        Err(e @ (ProxyError::Handshake(_) | ProxyError::NoPeerIdentity)) => {
            tracing::info!(port, error = %e, "connection refused")
        }
        Err(e) => tracing::debug!(port, error = %e, "connection closed"),
    }
}

/// What the outbound capture does with a destination no Service claims: Istio's mesh
/// `outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownDestination {
    /// `ALLOW_ANY` (the default): plain TCP to the original destination (`PassthroughCluster`).
    Passthrough,
    /// `REGISTRY_ONLY`: closed (`BlackHoleCluster`).
    BlackHole,
}

impl UnknownDestination {
    /// From the mesh config's mode; anything but `REGISTRY_ONLY` is Istio's default.
    pub fn from_mode(mode: &str) -> Self {
        if mode == "REGISTRY_ONLY" {
            UnknownDestination::BlackHole
        } else {
            UnknownDestination::Passthrough
        }
    }
}

/// What one known original destination leads to.
pub enum Target {
    Route(Arc<Route>),
    /// A destination the configuration names but cannot route safely; connections are closed.
    Refused(String),
}

/// Original destinations (Service cluster IPs and ServiceEntry addresses, with a port) and
/// their routes, rebuilt from each configuration.
pub struct OutboundTable {
    entries: HashMap<SocketAddr, Target>,
    unknown: UnknownDestination,
}

impl OutboundTable {
    /// The table for `cfg`: every Service with a `clusterIP`, each of its TCP ports routed with
    /// auto mTLS to the workloads it selects (see [`destination_for`]). The upstream is the
    /// first selected workload with an address (a WorkloadEntry) at its target port, else the
    /// cluster IP itself (kube-proxy's job). Then every ServiceEntry `addresses` IP: with a
    /// `workloadSelector`, routed the same way to the workloads it selects; without one (an
    /// external service), plain TCP to the address, so `REGISTRY_ONLY` lets it through. A
    /// Service wins over a ServiceEntry claiming the same address and port. Also the messages
    /// worth logging (unusable entries).
    pub fn from_config(cfg: &Config, outbound: &OutboundProxy) -> (Self, Vec<String>) {
        let mut entries = HashMap::new();
        let mut notes = Vec::new();
        for svc in &cfg.services {
            let Some(vip) = svc.spec.cluster_ip.as_deref().map(str::trim) else {
                continue;
            };
            if vip.is_empty() || vip.eq_ignore_ascii_case("none") {
                continue;
            }
            let Ok(ip) = vip.parse::<IpAddr>() else {
                notes.push(format!(
                    "Service {}/{}: clusterIP \"{vip}\" is not an IP address; not routed",
                    svc.namespace(),
                    svc.name()
                ));
                continue;
            };
            let selected: Vec<_> = cfg
                .workloads
                .iter()
                .filter(|w| {
                    cfg.services_selecting(w)
                        .any(|s| s.namespace() == svc.namespace() && s.name() == svc.name())
                })
                .collect();
            for sp in &svc.spec.ports {
                let udp = sp
                    .protocol
                    .as_deref()
                    .is_some_and(|p| p.eq_ignore_ascii_case("udp"));
                if sp.port == 0 || udp {
                    continue;
                }
                let vip_port = SocketAddr::new(ip, sp.port);
                let target = match route_for(cfg, &selected, sp.port, vip_port) {
                    Ok(d) => Target::Route(Arc::new(outbound.route(d))),
                    Err(why) => {
                        let why = format!(
                            "Service {}/{} port {}: {why}",
                            svc.namespace(),
                            svc.name(),
                            sp.port
                        );
                        notes.push(why.clone());
                        Target::Refused(why)
                    }
                };
                entries.insert(vip_port, target);
            }
        }
        for se in &cfg.service_entries {
            let mut ips = Vec::new();
            for a in &se.spec.addresses {
                let a = a.trim();
                let host = a
                    .strip_suffix("/32")
                    .or_else(|| a.strip_suffix("/128"))
                    .unwrap_or(a);
                match host.parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => notes.push(format!(
                        "ServiceEntry {}/{}: address \"{a}\" is not a single IP address; not routed",
                        se.namespace(),
                        se.name()
                    )),
                }
            }
            if ips.is_empty() {
                continue;
            }
            let selector = se
                .spec
                .workload_selector
                .as_ref()
                .map(|s| &s.labels)
                .filter(|l| !l.is_empty());
            let selected: Vec<&Workload> = match selector {
                Some(labels) => cfg
                    .workloads
                    .iter()
                    .filter(|w| {
                        w.namespace == se.namespace()
                            && labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .collect(),
                None => Vec::new(),
            };
            for sp in &se.spec.ports {
                let Some(port) = u16::try_from(sp.number).ok().filter(|p| *p != 0) else {
                    continue;
                };
                let protocol = match declared_protocol(None, Some(&sp.protocol))
                    .or_else(|| declared_protocol(Some(&sp.name), None))
                {
                    Some((Protocol::Http, _)) => OutboundProtocol::Http,
                    _ => OutboundProtocol::Tcp,
                };
                for ip in &ips {
                    let vip = SocketAddr::new(*ip, port);
                    if entries.contains_key(&vip) {
                        continue;
                    }
                    let target = if selector.is_none() {
                        Ok(Destination {
                            upstream: vip,
                            security: Security::Plaintext,
                            protocol,
                            sni: None,
                        })
                    } else {
                        let sni = se.spec.hosts.first().map(|h| istio_sni(port, h));
                        entry_route(cfg, &selected, sp, port, protocol, sni, vip)
                    };
                    let target = match target {
                        Ok(d) => Target::Route(Arc::new(outbound.route(d))),
                        Err(why) => {
                            let why = format!(
                                "ServiceEntry {}/{} port {port}: {why}",
                                se.namespace(),
                                se.name()
                            );
                            notes.push(why.clone());
                            Target::Refused(why)
                        }
                    };
                    entries.insert(vip, target);
                }
            }
        }
        let table = OutboundTable {
            entries,
            unknown: UnknownDestination::from_mode(&cfg.mesh.outbound_traffic_policy),
        };
        (table, notes)
    }

    /// How many original destinations the table knows.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn unknown(&self) -> UnknownDestination {
        self.unknown
    }

    pub fn get(&self, dst: &SocketAddr) -> Option<&Target> {
        self.entries.get(dst)
    }
}

/// The destination for `service_port` of a Service selecting `selected`, dialled at `vip`. All
/// selected workloads must agree on security and protocol (one route serves them all).
fn route_for(
    cfg: &Config,
    selected: &[&warden_policy::config::Workload],
    service_port: u16,
    vip: SocketAddr,
) -> Result<Destination, String> {
    let mut found: Option<(String, Destination)> = None;
    for wl in selected {
        let upstream = wl
            .address
            .as_deref()
            .and_then(|a| a.trim().parse::<IpAddr>().ok())
            .and_then(|ip| {
                cfg.services_selecting(wl)
                    .flat_map(|s| s.spec.ports.iter())
                    .find(|sp| sp.port == service_port)
                    .and_then(|sp| wl.target_port(sp))
                    .map(|p| SocketAddr::new(ip, p))
            })
            .unwrap_or(vip);
        let d = destination_for(cfg, wl, service_port, upstream).map_err(|e| e.to_string())?;
        match &found {
            None => found = Some((wl.id(), d)),
            Some((first, fd)) => {
                if fd.security != d.security || fd.protocol != d.protocol {
                    return Err(format!(
                        "the workloads it selects need different routes ({first}: {}, {}: {})",
                        describe(&fd.security),
                        wl.id(),
                        describe(&d.security)
                    ));
                }
                // Keep the first upstream with an address: no load balancing yet.
                if fd.upstream == vip && d.upstream != vip {
                    found = Some((wl.id(), d));
                }
            }
        }
    }
    found
        .map(|(_, d)| d)
        .ok_or_else(|| "it selects no workload in the configuration".to_string())
}

/// The destination for port `port` of a ServiceEntry selecting `selected` (WorkloadEntries or
/// pods), dialled at `vip`: each workload's port of the same name, else `targetPort`, else the
/// number, with auto mTLS by that port's mode. All selected workloads must agree.
fn entry_route(
    cfg: &Config,
    selected: &[&Workload],
    sp: &warden_policy::model::ServiceEntryPort,
    port: u16,
    protocol: OutboundProtocol,
    sni: Option<String>,
    vip: SocketAddr,
) -> Result<Destination, String> {
    let mut found: Option<(String, Destination)> = None;
    for wl in selected {
        let target = wl
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(sp.name.as_str()))
            .map(|p| p.container_port)
            .or(sp.target_port.and_then(|t| u16::try_from(t).ok()))
            .filter(|t| *t != 0)
            .unwrap_or(port);
        let mode = port_table(cfg, wl)
            .get(&target)
            .map(|s| s.mode)
            .unwrap_or(MtlsMode::Permissive);
        let security = if !wl.sidecar || mode == MtlsMode::Disable {
            Security::Plaintext
        } else {
            let raw = wl.spiffe_id(&cfg.mesh.trust_domain);
            Security::Mtls(
                raw.parse()
                    .map_err(|e| format!("{} has no valid SPIFFE ID ({raw}): {e}", wl.id()))?,
            )
        };
        let upstream = wl
            .address
            .as_deref()
            .and_then(|a| a.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, target))
            .unwrap_or(vip);
        let d = Destination {
            upstream,
            sni: if security == Security::Plaintext {
                None
            } else {
                sni.clone()
            },
            security,
            protocol,
        };
        match &found {
            None => found = Some((wl.id(), d)),
            Some((first, fd)) => {
                if fd.security != d.security {
                    return Err(format!(
                        "the workloads it selects need different routes ({first}: {}, {}: {})",
                        describe(&fd.security),
                        wl.id(),
                        describe(&d.security)
                    ));
                }
                if fd.upstream == vip && d.upstream != vip {
                    found = Some((wl.id(), d));
                }
            }
        }
    }
    found
        .map(|(_, d)| d)
        .ok_or_else(|| "its workloadSelector selects no workload in the configuration".to_string())
}

fn describe(s: &Security) -> String {
    match s {
        Security::Mtls(id) => format!("mTLS:{id}"),
        Security::Plaintext => "plaintext".to_string(),
    }
}

/// Istio's outbound capture listener: each redirected connection from the app is routed by its
/// original destination through the table in force when it was accepted.
pub struct OutboundCapture {
    table: Arc<ArcSwap<OutboundTable>>,
    listener: TcpListener,
}

impl OutboundCapture {
    pub async fn bind(
        table: Arc<ArcSwap<OutboundTable>>,
        addr: SocketAddr,
    ) -> Result<Self, CaptureError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| CaptureError::Bind {
                what: "outbound",
                addr,
                source,
            })?;
        Ok(OutboundCapture { table, listener })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the task is dropped, one task per connection.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let table = self.table.load_full();
                    tokio::spawn(serve_outbound(table, stream, peer));
                }
                Err(e) => {
                    tracing::warn!(target: "warden::proxy", error = %e, "outbound capture accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn serve_outbound(table: Arc<OutboundTable>, mut stream: TcpStream, peer: SocketAddr) {
    let orig = match captured_dst(&stream) {
        Ok(o) => o,
        Err(why) => {
            tracing::info!(target: "warden::proxy", source = %peer, reason = %why, "outbound connection closed");
            return;
        }
    };
    match table.get(&orig) {
        Some(Target::Route(route)) => {
            let upstream = route.destination().upstream;
            tracing::debug!(target: "warden::proxy", destination = %orig, upstream = %upstream, "outbound connection routed");
            if let Err(e) = route.clone().serve_connection(stream).await {
                log_failure(upstream, &e);
            }
        }
        Some(Target::Refused(why)) => {
            tracing::info!(target: "warden::proxy", destination = %orig, reason = %why, "outbound connection closed");
        }
        None => match table.unknown {
            UnknownDestination::BlackHole => {
                tracing::info!(
                    target: "warden::proxy",
                    destination = %orig,
                    reason = "not a known Service and outboundTrafficPolicy is REGISTRY_ONLY",
                    "outbound connection closed"
                );
            }
            UnknownDestination::Passthrough => {
                let mut upstream = match timeout(
                    PASSTHROUGH_CONNECT_TIMEOUT,
                    TcpStream::connect(orig),
                )
                .await
                {
                    Ok(Ok(u)) => u,
                    Ok(Err(e)) => {
                        tracing::debug!(target: "warden::proxy", destination = %orig, error = %e, "passthrough connect failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(target: "warden::proxy", destination = %orig, "passthrough connect timed out");
                        return;
                    }
                };
                tracing::debug!(target: "warden::proxy", destination = %orig, "outbound passthrough");
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_policy_modes() {
        assert_eq!(
            UnknownDestination::from_mode("REGISTRY_ONLY"),
            UnknownDestination::BlackHole
        );
        assert_eq!(
            UnknownDestination::from_mode("ALLOW_ANY"),
            UnknownDestination::Passthrough
        );
    }

    /// Without iptables, a connection to the capture listener is its own original destination
    /// (or has none): either way it is closed, never served or forwarded (which would loop).
    #[tokio::test]
    async fn a_connection_that_was_not_redirected_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let why = captured_dst(&server).unwrap_err();
        assert!(
            why.contains("not redirected") || why.contains("no original destination"),
            "{why}"
        );
        drop(client);
    }
}
