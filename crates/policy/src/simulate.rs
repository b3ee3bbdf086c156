//! Offline simulation of one request or connection through the mesh, for `warden check`,
//! `warden test` and `warden describe`: who the client is, whether it speaks mTLS (auto
//! mTLS), which container port and protocol the destination sees, what the inbound mTLS mode
//! does to the connection, and then the same [`WorkloadPolicy::evaluate`] the proxy runs.

use std::net::IpAddr;

use serde::Serialize;

use crate::authz::Protocol;
use crate::config::{Config, Workload};
use crate::engine::{
    Decision, ExtAuthzAnswer, HttpRequest, JwksSource, Outcome, Request, Step, WorkloadPolicy,
};
use crate::model::MtlsMode;
use crate::scope::{self, PortMode};

/// Who sends the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// `ns/name` of a workload in the configuration.
    Workload(String, String),
    /// An mTLS peer presenting this SPIFFE ID.
    Spiffe(String),
    /// A client outside the mesh.
    Plaintext,
}

impl Client {
    /// Parses `ns/workload`, `spiffe://…` or `plaintext`.
    pub fn parse(s: &str) -> Result<Client, String> {
        if s == "plaintext" {
            return Ok(Client::Plaintext);
        }
        if s.starts_with("spiffe://") {
            return Ok(Client::Spiffe(s.to_string()));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Client::Workload(ns.into(), name.into()))
            }
            _ => Err(format!(
                "\"{s}\" is not a source: expected NAMESPACE/WORKLOAD, a spiffe:// ID, or plaintext"
            )),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct HttpSpec {
    pub method: String,
    /// Request target: path with optional query.
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
    pub token: Option<String>,
}

/// One request or connection to simulate.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub from: Client,
    pub to: (String, String),
    /// The port the client dials.
    pub port: u16,
    pub source_ip: Option<IpAddr>,
    /// `None` = a plain TCP connection.
    pub request: Option<HttpSpec>,
    pub now_unix: i64,
    pub ext_authz: Option<ExtAuthzAnswer>,
}

/// Connection details a scenario may override.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// SNI the client sends; default: Istio's outbound SNI for sidecar mTLS to a service.
    pub sni: Option<String>,
    /// Destination address the proxy sees; default: a WorkloadEntry's address.
    pub destination_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceInfo {
    /// `ns/name`, when the client is a workload.
    pub workload: Option<String>,
    /// SPIFFE ID presented to the destination (only with mTLS).
    pub identity: Option<String>,
    pub sidecar: bool,
    pub mtls: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationInfo {
    pub workload: String,
    pub kind: &'static str,
    pub sidecar: bool,
    /// `ns/name:port` of the Service port dialed, if the dialed port is one.
    pub service: Option<String>,
    pub container_port: u16,
    pub protocol: Protocol,
    /// How the protocol was decided (`Service port name "http"`, `detected`, …).
    pub protocol_source: String,
    pub mtls: Option<PortMode>,
}

/// The full answer to "would this be allowed, and why?".
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub result: Outcome,
    pub status: Option<u16>,
    pub body: String,
    pub source: SourceInfo,
    pub destination: DestinationInfo,
    pub request_principal: Option<String>,
    /// The `:authority` the request carried (the default one when none was given).
    pub authority: Option<String>,
    pub decision: Option<Decision>,
    pub reason: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    #[error("no workload {0}/{1} in the configuration (a Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod or WorkloadEntry)")]
    UnknownWorkload(String, String),
    #[error("{0}; give the provider's answer with extAuthz (allow, deny or error)")]
    NeedExtAuthz(String),
}

/// Protocol named by a Service port: `appProtocol` first, then the name prefix.
pub fn declared_protocol(
    name: Option<&str>,
    app_protocol: Option<&str>,
) -> Option<(Protocol, String)> {
    let classify = |p: &str| -> Option<Protocol> {
        let p = p.to_ascii_lowercase();
        match p.as_str() {
            "http" | "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c"
            | "kubernetes.io/ws" => Some(Protocol::Http),
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/wss" => {
                Some(Protocol::Tcp)
            }
            _ => None,
        }
    };
    if let Some(ap) = app_protocol {
        if let Some(p) = classify(ap) {
            return Some((p, format!("Service port appProtocol \"{ap}\"")));
        }
    }
    let n = name?;
    let prefix = n.split('-').next().unwrap_or(n);
    classify(prefix).map(|p| (p, format!("Service port name \"{n}\"")))
}

/// Protocol named by a ServiceEntry port (`protocol`, upper case in Istio), else its name.
fn service_entry_protocol(protocol: &str, name: &str) -> Option<(Protocol, String)> {
    if !protocol.is_empty() {
        if let Some((p, _)) = declared_protocol(None, Some(protocol)) {
            return Some((p, format!("ServiceEntry port protocol \"{protocol}\"")));
        }
    }
    declared_protocol(Some(name), None)
        .map(|(p, _)| (p, format!("ServiceEntry port name \"{name}\"")))
}

/// Where a dialed port lands on the destination workload.
struct PortMap {
    container_port: u16,
    /// `ns/name:port` of the Service or ServiceEntry port dialed.
    service: Option<String>,
    protocol: Option<(Protocol, String)>,
    /// How a client names the service: `<name>.<ns>` for a Service (curl's host), the first
    /// host of a ServiceEntry; and the FQDN used in Istio's outbound SNI.
    short_host: Option<String>,
    fqdn: Option<String>,
}

/// Maps the dialed port to the container port, finding the Service port that selects it.
fn map_port(cfg: &Config, wl: &Workload, port: u16) -> PortMap {
    let mut by_target = None;
    for s in cfg.services_selecting(wl) {
        for sp in &s.spec.ports {
            let target = wl.target_port(sp).unwrap_or(0);
            let proto = declared_protocol(sp.name.as_deref(), sp.app_protocol.as_deref());
            if sp.port == port {
                return PortMap {
                    container_port: target,
                    service: Some(format!("{}/{}:{}", s.namespace(), s.name(), sp.port)),
                    protocol: proto,
                    short_host: Some(format!("{}.{}", s.name(), s.namespace())),
                    fqdn: Some(format!("{}.{}.svc.cluster.local", s.name(), s.namespace())),
                };
            }
            if target == port && by_target.is_none() {
                by_target = Some(proto);
            }
        }
    }
    // ServiceEntries select WorkloadEntries (and pods) by `workloadSelector.labels`; their
    // ports reach the workload's port of the same name, else `targetPort`, else the number.
    for se in cfg
        .service_entries
        .iter()
        .filter(|se| se.namespace() == wl.namespace)
    {
        let Some(sel) = &se.spec.workload_selector else {
            continue;
        };
        if sel.labels.is_empty() || !sel.labels.iter().all(|(k, v)| wl.labels.get(k) == Some(v)) {
            continue;
        }
        for sp in &se.spec.ports {
            if sp.number != u32::from(port) {
                continue;
            }
            let by_name = wl
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(sp.name.as_str()))
                .map(|p| p.container_port);
            let target = by_name
                .or(sp.target_port.and_then(|t| u16::try_from(t).ok()))
                .unwrap_or(port);
            return PortMap {
                container_port: target,
                service: Some(format!("{}/{}:{}", se.namespace(), se.name(), sp.number)),
                protocol: service_entry_protocol(&sp.protocol, &sp.name),
                short_host: se.spec.hosts.first().cloned(),
                fqdn: se.spec.hosts.first().cloned(),
            };
        }
    }
    PortMap {
        container_port: port,
        service: None,
        protocol: by_target.flatten(),
        short_host: None,
        fqdn: None,
    }
}

fn default_host(short_host: Option<&str>, wl: &Workload, port: u16) -> String {
    let base = match short_host {
        Some(h) => h.to_string(),
        None => format!("{}.{}", wl.name, wl.namespace),
    };
    if port == 80 {
        base
    } else {
        format!("{base}:{port}")
    }
}

fn reset(source: SourceInfo, destination: DestinationInfo, reason: String) -> Verdict {
    Verdict {
        result: Outcome::Reset,
        status: None,
        body: String::new(),
        source,
        destination,
        request_principal: None,
        authority: None,
        decision: None,
        reason,
    }
}

/// Simulates one scenario against a loaded configuration.
pub fn simulate(cfg: &Config, sc: &Scenario, jwks: &dyn JwksSource) -> Result<Verdict, SimError> {
    simulate_with(cfg, sc, &Connection::default(), jwks)
}

/// [`simulate`] with connection details given explicitly.
pub fn simulate_with(
    cfg: &Config,
    sc: &Scenario,
    conn: &Connection,
    jwks: &dyn JwksSource,
) -> Result<Verdict, SimError> {
    let (dns, dname) = &sc.to;
    let dst = cfg
        .workload(dns, dname)
        .ok_or_else(|| SimError::UnknownWorkload(dns.clone(), dname.clone()))?;
    let td = &cfg.mesh.trust_domain;
    let (client_wl, client_sidecar, client_id) = match &sc.from {
        Client::Workload(ns, name) => {
            let w = cfg
                .workload(ns, name)
                .ok_or_else(|| SimError::UnknownWorkload(ns.clone(), name.clone()))?;
            (Some(w.id()), w.sidecar, w.sidecar.then(|| w.spiffe_id(td)))
        }
        Client::Spiffe(id) => (None, true, Some(id.clone())),
        Client::Plaintext => (None, false, None),
    };

    let pm = map_port(cfg, dst, sc.port);
    let (container_port, service, declared) =
        (pm.container_port, pm.service.clone(), pm.protocol.clone());
    let (protocol, protocol_source) = match declared {
        Some(p) => p,
        None if sc.request.is_some() => (
            Protocol::Http,
            "detected: HTTP sniffed, no protocol declared".into(),
        ),
        None => (
            Protocol::Tcp,
            "detected: no protocol declared, not HTTP".into(),
        ),
    };
    let pa = dst.sidecar.then(|| scope::peer_authentication(cfg, dst));
    let mode = pa.as_ref().map(|p| p.mode_for(container_port).clone());
    let mut destination = DestinationInfo {
        workload: dst.id(),
        kind: dst.kind,
        sidecar: dst.sidecar,
        service: service.clone(),
        container_port,
        protocol,
        protocol_source,
        mtls: mode.clone(),
    };

    // Auto mTLS: a sidecar client upgrades to mTLS unless the destination has no sidecar or
    // its port is DISABLE. A SPIFFE source is an mTLS peer by definition.
    let mtls = match &sc.from {
        Client::Spiffe(_) => true,
        _ => {
            client_sidecar
                && dst.sidecar
                && mode.as_ref().is_some_and(|m| m.mode != MtlsMode::Disable)
        }
    };
    let source = SourceInfo {
        workload: client_wl,
        identity: if mtls { client_id.clone() } else { None },
        sidecar: client_sidecar,
        mtls,
    };

    if !dst.sidecar {
        destination.mtls = None;
        let (status, body) = if sc.request.is_some() {
            (Some(200), String::new())
        } else {
            (None, String::new())
        };
        return Ok(Verdict {
            result: Outcome::Allow,
            status,
            body,
            source,
            destination,
            request_principal: None,
            authority: None,
            decision: None,
            reason: format!("{} has no sidecar, so nothing is enforced there", dst.id()),
        });
    }
    let mode = mode.expect("sidecar workloads have a mode");
    let port_desc = format!("port {container_port} is {}", mode.describe());
    match mode.mode {
        MtlsMode::Strict if !mtls => {
            return Ok(reset(
                source,
                destination,
                format!("{port_desc}; the plaintext connection is closed without a response"),
            ))
        }
        MtlsMode::Disable if mtls => {
            return Ok(reset(
                source,
                destination,
                format!("{port_desc}; a TLS connection is not accepted"),
            ))
        }
        _ => {}
    }
    if mtls {
        let id = client_id.clone().unwrap_or_default();
        let peer_td = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())
            .unwrap_or("");
        if !cfg.mesh.accepts_trust_domain(peer_td) {
            return Ok(reset(
                source,
                destination,
                format!(
                    "the peer's trust domain \"{peer_td}\" is neither the mesh trust domain \"{td}\" nor an alias; the TLS handshake fails"
                ),
            ));
        }
    }

    let policy = WorkloadPolicy::compile(cfg, dst, jwks);
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut authority = String::new();
    let mut target = String::new();
    let mut method = String::new();
    if let Some(r) = &sc.request {
        for (n, v) in &r.headers {
            let n = n.to_ascii_lowercase();
            if n == "host" {
                continue;
            }
            headers.push((n, v.clone()));
        }
        if let Some(t) = &r.token {
            headers.push(("authorization".into(), format!("Bearer {t}")));
        }
        authority = r
            .host
            .clone()
            .or_else(|| {
                r.headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("host"))
                    .map(|x| x.1.clone())
            })
            .unwrap_or_else(|| default_host(pm.short_host.as_deref(), dst, sc.port));
        target = if r.path.is_empty() {
            "/".into()
        } else {
            r.path.clone()
        };
        method = if r.method.is_empty() {
            "GET".into()
        } else {
            r.method.clone()
        };
    }
    let header_refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    // A sidecar client's auto-mTLS connection carries Istio's outbound SNI for the service.
    let default_sni = match (&sc.from, mtls, &pm.fqdn) {
        (Client::Workload(..), true, Some(fqdn)) => {
            Some(format!("outbound_.{}_._.{fqdn}", sc.port))
        }
        _ => None,
    };
    let sni = conn.sni.clone().or(default_sni);
    let req = Request {
        source_ip: sc.source_ip,
        destination_ip: conn
            .destination_ip
            .or_else(|| dst.address.as_deref().and_then(|a| a.parse().ok())),
        destination_port: container_port,
        sni: sni.as_deref(),
        peer: source.identity.as_deref(),
        http: sc.request.as_ref().map(|_| HttpRequest {
            method: &method,
            authority: &authority,
            target: &target,
            headers: &header_refs,
        }),
    };
    let answer = sc.ext_authz;
    let decision = policy
        .evaluate(&req, protocol, sc.now_unix, &mut |_, _| answer)
        .map_err(|e| SimError::NeedExtAuthz(e.to_string()))?;
    let mut reason = decision.reason.clone();
    if protocol == Protocol::Tcp && sc.request.is_some() && decision.step != Step::Normalization {
        reason = format!("port {container_port} is TCP ({}), so the request is an opaque TCP connection: {reason}", destination.protocol_source);
    }
    Ok(Verdict {
        result: decision.outcome,
        status: decision.status,
        body: decision.body.clone(),
        source,
        destination,
        request_principal: decision.request_principal.clone(),
        authority: sc.request.as_ref().map(|_| authority.clone()),
        reason,
        decision: Some(decision),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Loader;
    use crate::engine::InlineJwksOnly;

    fn cfg(text: &str) -> Config {
        let mut l = Loader::new();
        l.add_text("t.yaml", text);
        let (c, d) = l.finish();
        assert!(d.is_empty(), "{d:?}");
        c
    }

    fn run(c: &Config, from: &str, to: &str, port: u16, http: bool, conn: &Connection) -> Verdict {
        let (ns, name) = to.split_once('/').unwrap();
        let sc = Scenario {
            from: Client::parse(from).unwrap(),
            to: (ns.into(), name.into()),
            port,
            source_ip: None,
            request: http.then(HttpSpec::default),
            now_unix: 0,
            ext_authz: None,
        };
        simulate_with(c, &sc, conn, &InlineJwksOnly).unwrap()
    }

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: legacy}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: foo}
spec: {template: {spec: {serviceAccountName: sleep}}}
"#;

    /// Review finding: a ServiceEntry port reaches the WorkloadEntry port of the same name,
    /// and the port-level mode of that port applies.
    #[test]
    fn service_entry_ports_map_to_workload_entry_ports() {
        let c = cfg(&format!(
            "{BASE}---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm1, namespace: foo}}\nspec: {{address: 127.0.0.9, labels: {{app: vm}}, ports: {{tcp-db: 3307}}}}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: foo}}\nspec:\n  hosts: [db.example.internal]\n  ports: [{{number: 3306, name: tcp-db, protocol: TCP}}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  workloadSelector: {{labels: {{app: vm}}}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: vm, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: vm}}}}\n  mtls: {{mode: PERMISSIVE}}\n  portLevelMtls: {{3307: {{mode: STRICT}}}}\n"
        ));
        let v = run(
            &c,
            "legacy/sleep",
            "foo/vm1",
            3306,
            false,
            &Connection::default(),
        );
        assert_eq!(v.destination.container_port, 3307);
        assert_eq!(v.destination.protocol, Protocol::Tcp);
        assert_eq!(v.result, Outcome::Reset, "{}", v.reason);
    }

    /// Review finding: `connection.sni` sees Istio's outbound SNI of a sidecar client, and
    /// `destination.ip` the address given.
    #[test]
    fn sni_and_destination_ip() {
        let c = cfg(&format!(
            "{BASE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: foo}}\nspec: {{selector: {{app: web}}, ports: [{{name: http, port: 8000, targetPort: 80}}]}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: foo}}\nspec: {{template: {{metadata: {{labels: {{app: web}}}}}}}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  rules: [{{when: [{{key: connection.sni, values: [\"outbound_.8000_._.web.foo.svc.cluster.local\"]}}]}}, {{when: [{{key: destination.ip, values: [10.0.0.0/8]}}]}}]\n"
        ));
        let v = run(
            &c,
            "foo/sleep",
            "foo/web",
            8000,
            true,
            &Connection::default(),
        );
        assert_eq!(v.result, Outcome::Allow, "{}", v.reason);
        let v = run(
            &c,
            "legacy/sleep",
            "foo/web",
            8000,
            true,
            &Connection::default(),
        );
        assert_eq!(
            v.result,
            Outcome::Deny,
            "plaintext sends no SNI: {}",
            v.reason
        );
        let conn = Connection {
            sni: None,
            destination_ip: Some("10.1.2.3".parse().unwrap()),
        };
        let v = run(&c, "legacy/sleep", "foo/web", 8000, true, &conn);
        assert_eq!(v.result, Outcome::Allow, "{}", v.reason);
    }

    /// Review finding: trust domains of meshConfig.caCertificates pass the handshake.
    #[test]
    fn ca_certificate_trust_domains_pass_the_handshake() {
        let c = cfg(&format!(
            "{BASE}---\ntrustDomain: td1\ncaCertificates: [{{trustDomains: [other-td]}}]\n"
        ));
        let v = run(
            &c,
            "spiffe://other-td/ns/foo/sa/x",
            "foo/sleep",
            80,
            true,
            &Connection::default(),
        );
        assert_eq!(v.result, Outcome::Allow, "{}", v.reason);
        let v = run(
            &c,
            "spiffe://evil/ns/foo/sa/x",
            "foo/sleep",
            80,
            true,
            &Connection::default(),
        );
        assert_eq!(v.result, Outcome::Reset);
    }
}
