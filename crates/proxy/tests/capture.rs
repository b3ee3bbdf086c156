//! The outbound capture table: which original destinations (Service cluster IPs) get which
//! auto-mTLS route, which are refused, and what happens to the rest. The capture listeners
//! themselves need iptables and are proved end to end in `crates/warden/tests/transparent.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose as Ku};
use warden_identity::svid::TrustBundle;
use warden_identity::tls::IdentityState;
use warden_policy::config::{Config, Loader};
use warden_proxy::capture::{OutboundTable, Target, UnknownDestination};
use warden_proxy::outbound::{OutboundProtocol, OutboundProxy, Security};

const BASE: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: foo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: backend}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-db, port: 5432}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: backend-vm, namespace: foo}
spec:
  address: 10.1.1.1
  labels: {app: backend}
  serviceAccount: backend
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo}
spec:
  clusterIP: 10.96.0.11
  selector: {app: web}
  ports: [{name: http, port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: foo}
spec:
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers: [{name: w, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: legacy}
spec:
  clusterIP: 10.96.0.12
  selector: {app: old}
  ports: [{name: tcp, port: 7000}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: old, namespace: legacy}
spec:
  template:
    metadata: {labels: {app: old}}
    spec:
      containers: [{name: o, ports: [{containerPort: 7000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: foo}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 81, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: typo, namespace: foo}
spec:
  clusterIP: 10.96.0.300
  selector: {app: web}
  ports: [{name: http, port: 82, targetPort: 80}]
"#;

fn config(extra: &str) -> Config {
    let mut l = Loader::new();
    l.add_text("capture.yaml", &format!("{BASE}\n---\n{extra}"));
    let (cfg, diags) = l.finish();
    assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
    cfg
}

fn outbound() -> OutboundProxy {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![Ku::KeyCertSign, Ku::DigitalSignature];
    let root = p.self_signed(&key).unwrap();
    let bundle = TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_der: vec![root.der().to_vec()],
    };
    OutboundProxy::new(Arc::new(IdentityState::new(bundle).unwrap()))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn service_cluster_ips_get_auto_mtls_routes() {
    let (table, notes) = OutboundTable::from_config(&config(""), &outbound());
    // backend: both ports, to the WorkloadEntry's address at the target port, mTLS to its
    // SPIFFE ID, with Istio's SNI.
    let Some(Target::Route(r)) = table.get(&addr("10.96.0.10:80")) else {
        panic!("backend:80 is not routed");
    };
    let d = r.destination();
    assert_eq!(d.upstream, addr("10.1.1.1:8080"));
    assert_eq!(
        d.security,
        Security::Mtls("spiffe://cluster.local/ns/foo/sa/backend".parse().unwrap())
    );
    assert_eq!(d.protocol, OutboundProtocol::Http);
    assert_eq!(
        d.sni.as_deref(),
        Some("outbound_.80_._.backend.foo.svc.cluster.local")
    );
    let Some(Target::Route(r)) = table.get(&addr("10.96.0.10:5432")) else {
        panic!("backend:5432 is not routed");
    };
    assert_eq!(r.destination().upstream, addr("10.1.1.1:5432"));
    assert_eq!(r.destination().protocol, OutboundProtocol::Tcp);
    // web: a Deployment has no address, so the cluster IP itself (kube-proxy's job).
    let Some(Target::Route(r)) = table.get(&addr("10.96.0.11:80")) else {
        panic!("web:80 is not routed");
    };
    assert_eq!(r.destination().upstream, addr("10.96.0.11:80"));
    // old: no sidecar, so plaintext (auto mTLS).
    let Some(Target::Route(r)) = table.get(&addr("10.96.0.12:7000")) else {
        panic!("old:7000 is not routed");
    };
    assert_eq!(r.destination().security, Security::Plaintext);
    // A port the Service does not have, headless and bad cluster IPs: not in the table.
    assert!(table.get(&addr("10.96.0.10:81")).is_none());
    assert_eq!(table.len(), 4);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("foo/typo") && notes[0].contains("10.96.0.300"),
        "{notes:?}"
    );
    assert_eq!(table.unknown(), UnknownDestination::Passthrough);
}

#[test]
fn workloads_that_need_different_routes_are_refused() {
    // A second backend without a sidecar: one route cannot be mTLS and plaintext at once.
    let extra = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: backend, namespace: foo}
spec:
  template:
    metadata:
      labels: {app: backend}
      annotations: {sidecar.istio.io/inject: "false"}
    spec:
      containers: [{name: b, ports: [{containerPort: 8080}, {containerPort: 5432}]}]
"#;
    let (table, notes) = OutboundTable::from_config(&config(extra), &outbound());
    let Some(Target::Refused(why)) = table.get(&addr("10.96.0.10:80")) else {
        panic!("backend:80 should be refused");
    };
    assert!(why.contains("different routes"), "{why}");
    assert!(
        notes.iter().any(|n| n.contains("foo/backend port 80")),
        "{notes:?}"
    );
}

#[test]
fn registry_only_makes_unknown_destinations_a_black_hole() {
    let extra = "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";
    let (table, _) = OutboundTable::from_config(&config(extra), &outbound());
    assert_eq!(table.unknown(), UnknownDestination::BlackHole);
}

#[test]
fn service_entry_addresses_are_routed() {
    let extra = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: foo}
spec:
  hosts: [db.example.internal]
  addresses: [240.0.0.5]
  ports: [{number: 3306, name: tcp-mysql, protocol: TCP}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-vm, namespace: foo}
spec:
  address: 10.2.2.2
  labels: {app: db}
  ports: {tcp-mysql: 13306}
  serviceAccount: db
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: foo}
spec:
  hosts: [api.partner.example]
  addresses: [203.0.113.7/32, 10.0.0.0/24]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
"#;
    let (table, notes) = OutboundTable::from_config(&config(extra), &outbound());
    // Selected WorkloadEntry: its address at its port of the same name, mTLS, SNI from the host.
    let Some(Target::Route(r)) = table.get(&addr("240.0.0.5:3306")) else {
        panic!("db:3306 is not routed");
    };
    let d = r.destination();
    assert_eq!(d.upstream, addr("10.2.2.2:13306"));
    assert_eq!(
        d.security,
        Security::Mtls("spiffe://cluster.local/ns/foo/sa/db".parse().unwrap())
    );
    assert_eq!(
        d.sni.as_deref(),
        Some("outbound_.3306_._.db.example.internal")
    );
    // No selector (an external service): plain TCP to the address itself.
    let Some(Target::Route(r)) = table.get(&addr("203.0.113.7:443")) else {
        panic!("partner:443 is not routed");
    };
    assert_eq!(r.destination().upstream, addr("203.0.113.7:443"));
    assert_eq!(r.destination().security, Security::Plaintext);
    // A CIDR is not one destination: reported, not routed.
    assert!(
        notes
            .iter()
            .any(|n| n.contains("foo/partner") && n.contains("10.0.0.0/24")),
        "{notes:?}"
    );
}
