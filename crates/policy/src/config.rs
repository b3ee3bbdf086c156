//! The loaded configuration: every resource Warden understands, read from parsed documents,
//! with workloads derived from pods and pod templates and their sidecar status decided.
//!
//! Loading never stops at the first problem: it returns the configuration together with all
//! diagnostics, and callers refuse the configuration when any is an error.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::diag::{Diagnostic, Origin, Severity};
use crate::mesh::MeshConfig;
use crate::model::*;
use crate::source::{parse_documents, Document};

/// One resource of kind `T`, with its metadata (namespace defaulted) and where it came from.
#[derive(Debug, Clone)]
pub struct Resource<T> {
    pub kind: &'static str,
    pub meta: ObjectMeta,
    pub spec: T,
    pub origin: Origin,
}

impl<T> Resource<T> {
    pub fn namespace(&self) -> &str {
        self.meta.namespace.as_deref().unwrap_or("default")
    }
    pub fn name(&self) -> &str {
        &self.meta.name
    }
    /// `Kind namespace/name`, the way every message names a resource.
    pub fn display(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace(), self.meta.name)
    }
    /// Reports findings about this resource, resolving field paths to its lines.
    pub fn reporter<'a>(&'a self, out: &'a mut Vec<Diagnostic>) -> crate::diag::Reporter<'a> {
        crate::diag::Reporter {
            origin: &self.origin,
            resource: self.display(),
            out,
        }
    }
}

/// A place traffic can be sent to: a pod, the pods of a controller, or a WorkloadEntry.
#[derive(Debug, Clone)]
pub struct Workload {
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
    pub service_account: String,
    pub ports: Vec<ContainerPort>,
    pub sidecar: bool,
    /// WorkloadEntry address.
    pub address: Option<String>,
    pub origin: Origin,
}

impl Workload {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    /// The container port a Service port sends to: `targetPort` as a number, as the name of
    /// one of this workload's ports, or the Service port itself. `None` for an unknown name.
    pub fn target_port(&self, sp: &ServicePort) -> Option<u16> {
        match &sp.target_port {
            None => Some(sp.port),
            Some(IntOrString::Int(p)) => Some(*p),
            Some(IntOrString::String(name)) => self
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port),
        }
    }

    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

#[derive(Debug, Clone)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub origin: Option<Origin>,
}

impl Namespace {
    /// Namespace-level injection: `istio-injection: enabled`, or a revision label when
    /// `istio-injection` is absent (Istio's revision webhook requires it absent, so
    /// `istio-injection: disabled` wins over `istio.io/rev`).
    pub fn injection_enabled(&self) -> bool {
        match self.labels.get("istio-injection").map(String::as_str) {
            Some(v) => v == "enabled",
            None => self.labels.contains_key("istio.io/rev"),
        }
    }
}

/// Everything loaded from a set of files.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub mesh: MeshConfig,
    /// `(file, line)` the mesh config was read from (`--mesh` file or the `istio` ConfigMap).
    pub mesh_origin: Option<(String, usize)>,
    pub namespaces: BTreeMap<String, Namespace>,
    pub service_accounts: Vec<Resource<()>>,
    pub workloads: Vec<Workload>,
    pub services: Vec<Resource<ServiceSpec>>,
    pub service_entries: Vec<Resource<ServiceEntrySpec>>,
    pub peer_authentications: Vec<Resource<PeerAuthenticationSpec>>,
    pub request_authentications: Vec<Resource<RequestAuthenticationSpec>>,
    pub authorization_policies: Vec<Resource<AuthorizationPolicySpec>>,
    /// `(file:line, apiVersion/kind namespace/name)` of documents of kinds Warden ignores.
    pub skipped: Vec<(String, String)>,
}

impl Config {
    /// Services in the workload's namespace whose (non-empty) selector matches it.
    pub fn services_selecting<'a>(
        &'a self,
        wl: &'a Workload,
    ) -> impl Iterator<Item = &'a Resource<ServiceSpec>> + 'a {
        self.services.iter().filter(move |s| {
            s.namespace() == wl.namespace
                && s.spec.selector.as_ref().is_some_and(|sel| {
                    !sel.is_empty() && sel.iter().all(|(k, v)| wl.labels.get(k) == Some(v))
                })
        })
    }

    pub fn workload(&self, ns: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.namespace == ns && w.name == name)
    }
}

const SECURITY_KINDS: [&str; 3] = [
    "PeerAuthentication",
    "RequestAuthentication",
    "AuthorizationPolicy",
];

/// Builds a [`Config`] document by document. Each document is decoded as it is added and
/// only its value-less copy (file, lines) is kept, for messages: a large configuration never
/// holds all its JSON trees at once.
#[derive(Default)]
pub struct Loader {
    mesh_override: Option<(MeshConfig, String)>,
    diags: Vec<Diagnostic>,
    acc: Accumulated,
}

/// What the documents added so far amount to.
#[derive(Default)]
struct Accumulated {
    cfg: Config,
    seen: HashMap<(String, String, String), String>,
    mesh_from_map: Option<(MeshConfig, String, usize)>,
    pending: Vec<(Arc<Document>, &'static str, ObjectMeta, PodTemplate)>,
    entries: Vec<Resource<WorkloadEntrySpec>>,
}

impl Loader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the documents of one file's text (YAML or JSON). Syntax errors become diagnostics.
    pub fn add_text(&mut self, file: &str, text: &str) {
        match parse_documents(file, text) {
            Ok(docs) => {
                for d in docs {
                    self.add_document(d);
                }
            }
            Err(e) => self.diags.push(Diagnostic {
                severity: Severity::Error,
                code: "WRD0001",
                file: e.file.to_string(),
                line: e.line,
                resource: None,
                field: None,
                message: format!("not valid YAML or JSON: {}", e.message),
            }),
        }
    }

    pub fn add_document(&mut self, d: Document) {
        if d.value.get("kind").and_then(Value::as_str) == Some("List") {
            if let Some(Value::Array(items)) = d.value.get("items") {
                for (i, item) in items.iter().enumerate() {
                    let child = d.child(&format!("items[{i}]"), item.clone());
                    self.add_document(child);
                }
            }
            return;
        }
        self.take(Arc::new(d));
    }

    /// Adds a document already shared (and with any `kind: List` already expanded): the
    /// control plane keeps parsed documents between reloads and must not copy ten thousand of
    /// them into every load.
    pub fn add_shared_document(&mut self, d: Arc<Document>) {
        self.take(d);
    }

    /// A MeshConfig given on its own (`--mesh`); it wins over the `istio` ConfigMap.
    pub fn set_mesh_text(&mut self, file: &str, text: &str) {
        match parse_documents(file, text) {
            Ok(docs) => {
                let v = docs.into_iter().next().map(|d| d.value).unwrap_or_default();
                match MeshConfig::from_value(v) {
                    Ok(m) => self.mesh_override = Some((m, file.to_string())),
                    Err(e) => self.diags.push(diag(file, 1, None, &e.field, e.message)),
                }
            }
            Err(e) => self.diags.push(diag(file, e.line, None, "", e.message)),
        }
    }

    /// Decodes one document into the configuration being built.
    fn take(&mut self, doc: Arc<Document>) {
        let Accumulated {
            cfg,
            seen,
            mesh_from_map,
            pending,
            entries,
        } = &mut self.acc;
        let diags = &mut self.diags;
        let v = &doc.value;
        let Some(obj) = v.as_object() else {
            diags.push(diag(
                &doc.file,
                doc.line,
                None,
                "",
                "expected a Kubernetes object (a mapping with apiVersion and kind)".into(),
            ));
            return;
        };
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let api = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if kind.is_empty()
            && api.is_empty()
            && !obj.is_empty()
            && obj.keys().all(|k| !k.is_empty())
            && obj
                .keys()
                .any(|k| MeshConfig::KNOWN_KEYS.contains(&k.as_str()))
            && !obj.contains_key("cases")
        {
            // A bare MeshConfig file among the resources (as `--mesh` takes it).
            match MeshConfig::from_value(doc.value.clone()) {
                Ok(m) => *mesh_from_map = Some((m, doc.file.to_string(), doc.line)),
                Err(e) => diags.push(diag(
                    &doc.file,
                    doc.line_of(&e.field),
                    None,
                    &e.field,
                    e.message,
                )),
            }
            return;
        }
        if kind.is_empty() && api.is_empty() && obj.contains_key("cases") {
            // A `warden test` file kept next to the policies it tests.
            cfg.skipped.push((
                format!("{}:{}", doc.file, doc.line),
                "warden test file".into(),
            ));
            return;
        }
        if kind.is_empty() || api.is_empty() {
            let missing = if kind.is_empty() {
                "kind"
            } else {
                "apiVersion"
            };
            diags.push(diag(
                &doc.file,
                doc.line,
                None,
                missing,
                format!("{missing} not set: every document needs apiVersion and kind"),
            ));
            return;
        }
        let origin = Origin {
            doc: Arc::new(doc.without_value()),
        };
        let meta: ObjectMeta = match decode(&doc, "metadata", obj.get("metadata")) {
            Ok(m) => m,
            Err(d) => {
                diags.push(*d);
                return;
            }
        };
        let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let rname = format!("{kind} {ns}/{}", meta.name);
        if meta.name.is_empty() {
            diags.push(Diagnostic {
                resource: Some(format!("{kind} {ns}/")),
                ..diag(
                    &doc.file,
                    doc.line_of("metadata"),
                    None,
                    "metadata.name",
                    "name is required".into(),
                )
            });
            return;
        }
        let group = api.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let known = match (group, kind) {
            ("security.istio.io", k) if SECURITY_KINDS.contains(&k) => {
                if !api.ends_with("/v1") && !api.ends_with("/v1beta1") {
                    diags.push(diag(
                        &doc.file,
                        doc.line_of("apiVersion"),
                        Some(rname.clone()),
                        "apiVersion",
                        format!("no matches for kind \"{kind}\" in version \"{api}\": expected security.istio.io/v1 or security.istio.io/v1beta1"),
                    ));
                    return;
                }
                true
            }
            ("networking.istio.io", "WorkloadEntry" | "ServiceEntry") => true,
            ("", "Namespace" | "ServiceAccount" | "Pod" | "Service" | "ConfigMap") => true,
            ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => true,
            ("batch", "Job" | "CronJob") => true,
            _ => false,
        };
        if !known {
            cfg.skipped.push((
                format!("{}:{}", doc.file, doc.line),
                format!(
                    "{api}/{kind} {rname}",
                    rname = rname.split_once(' ').map(|x| x.1).unwrap_or("")
                ),
            ));
            return;
        }
        // Namespace and cluster-scoped kinds are not namespaced.
        let key_ns = if kind == "Namespace" { "" } else { ns.as_str() };
        let key = (kind.to_string(), key_ns.to_string(), meta.name.clone());
        if let Some(first) = seen.get(&key) {
            diags.push(diag(
                &doc.file,
                doc.line,
                Some(rname.clone()),
                "metadata.name",
                format!("defined twice; first definition at {first}"),
            ));
            return;
        }
        seen.insert(key, format!("{}:{}", doc.file, doc.line));
        let spec = obj.get("spec");
        macro_rules! res {
            ($k:expr, $t:ty) => {
                match decode::<$t>(&doc, "spec", spec) {
                    Ok(s) => Some(Resource {
                        kind: $k,
                        meta: ObjectMeta {
                            namespace: Some(ns.clone()),
                            ..meta.clone()
                        },
                        spec: s,
                        origin: origin.clone(),
                    }),
                    Err(mut d) => {
                        d.resource = Some(rname.clone());
                        diags.push(*d);
                        None
                    }
                }
            };
        }
        match kind {
            "Namespace" => {
                cfg.namespaces.insert(
                    meta.name.clone(),
                    Namespace {
                        name: meta.name.clone(),
                        labels: meta.labels.clone(),
                        origin: Some(origin.clone()),
                    },
                );
            }
            "ServiceAccount" => cfg.service_accounts.push(Resource {
                kind: "ServiceAccount",
                meta: ObjectMeta {
                    namespace: Some(ns.clone()),
                    ..meta.clone()
                },
                spec: (),
                origin: origin.clone(),
            }),
            "ConfigMap" => {
                if meta.name == "istio" && ns == "istio-system" {
                    let text = obj
                        .get("data")
                        .and_then(|d| d.get("mesh"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let file = format!("{} (ConfigMap istio-system/istio data.mesh)", doc.file);
                    match parse_documents(&file, text) {
                        Ok(mdocs) => {
                            let v = mdocs
                                .into_iter()
                                .next()
                                .map(|d| d.value)
                                .unwrap_or_default();
                            match MeshConfig::from_value(v) {
                                Ok(m) => {
                                    *mesh_from_map =
                                        Some((m, doc.file.to_string(), doc.line_of("data.mesh")))
                                }
                                Err(e) => diags.push(diag(
                                    &doc.file,
                                    doc.line_of("data.mesh"),
                                    Some(rname.clone()),
                                    &format!("data.mesh: {}", e.field),
                                    e.message,
                                )),
                            }
                        }
                        Err(e) => diags.push(diag(
                            &doc.file,
                            doc.line_of("data.mesh"),
                            Some(rname.clone()),
                            "data.mesh",
                            format!("not valid YAML: {}", e.message),
                        )),
                    }
                } else {
                    cfg.skipped.push((
                        format!("{}:{}", doc.file, doc.line),
                        format!("{api}/{kind} {ns}/{}", meta.name),
                    ));
                }
            }
            "Service" => cfg.services.extend(res!("Service", ServiceSpec)),
            "ServiceEntry" => cfg
                .service_entries
                .extend(res!("ServiceEntry", ServiceEntrySpec)),
            "WorkloadEntry" => entries.extend(res!("WorkloadEntry", WorkloadEntrySpec)),
            "PeerAuthentication" => cfg
                .peer_authentications
                .extend(res!("PeerAuthentication", PeerAuthenticationSpec)),
            "RequestAuthentication" => cfg
                .request_authentications
                .extend(res!("RequestAuthentication", RequestAuthenticationSpec)),
            "AuthorizationPolicy" => cfg
                .authorization_policies
                .extend(res!("AuthorizationPolicy", AuthorizationPolicySpec)),
            "Pod" => {
                if let Some(r) = res!("Pod", PodSpec) {
                    let tmpl = PodTemplate {
                        metadata: r.meta.clone(),
                        spec: r.spec,
                    };
                    pending.push((origin.doc.clone(), "Pod", r.meta, tmpl));
                }
            }
            "CronJob" => {
                if let Some(r) = res!("CronJob", CronJobSpec) {
                    pending.push((
                        origin.doc.clone(),
                        "CronJob",
                        r.meta,
                        r.spec.job_template.spec.template,
                    ));
                }
            }
            k => {
                let k: &'static str = match k {
                    "Deployment" => "Deployment",
                    "StatefulSet" => "StatefulSet",
                    "DaemonSet" => "DaemonSet",
                    "ReplicaSet" => "ReplicaSet",
                    _ => "Job",
                };
                if let Some(r) = res!(k, TemplatedSpec) {
                    pending.push((origin.doc.clone(), k, r.meta, r.spec.template));
                }
            }
        }
    }

    pub fn finish(self) -> (Config, Vec<Diagnostic>) {
        let Loader {
            mesh_override,
            mut diags,
            acc,
        } = self;
        let Accumulated {
            mut cfg,
            mesh_from_map,
            pending,
            entries,
            ..
        } = acc;

        match (mesh_override, mesh_from_map) {
            (Some((m, file)), _) => {
                cfg.mesh = m;
                cfg.mesh_origin = Some((file, 1));
            }
            (None, Some((m, file, line))) => {
                cfg.mesh = m;
                cfg.mesh_origin = Some((file, line));
            }
            (None, None) => {}
        }

        for (doc, kind, meta, tmpl) in pending {
            let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
            let ns_injected = cfg
                .namespaces
                .get(&namespace)
                .is_some_and(Namespace::injection_enabled);
            let pod_says = tmpl
                .metadata
                .labels
                .get("sidecar.istio.io/inject")
                .or_else(|| tmpl.metadata.annotations.get("sidecar.istio.io/inject"))
                .map(String::as_str);
            let sidecar = match pod_says {
                Some("false") => false,
                Some("true") => true,
                _ => ns_injected,
            };
            let sa = tmpl
                .spec
                .service_account_name
                .clone()
                .or(tmpl.spec.service_account.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into());
            cfg.workloads.push(Workload {
                kind,
                name: meta.name.clone(),
                namespace,
                labels: tmpl.metadata.labels.clone(),
                annotations: tmpl.metadata.annotations.clone(),
                service_account: sa,
                ports: tmpl
                    .spec
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().cloned())
                    .collect(),
                sidecar,
                address: None,
                origin: Origin { doc },
            });
        }
        for e in entries {
            let mut ports: Vec<ContainerPort> = e
                .spec
                .ports
                .iter()
                .map(|(name, p)| ContainerPort {
                    name: Some(name.clone()),
                    container_port: u16::try_from(*p).unwrap_or(0),
                    protocol: None,
                })
                .collect();
            ports.sort_by_key(|p| p.container_port);
            cfg.workloads.push(Workload {
                kind: "WorkloadEntry",
                name: e.meta.name.clone(),
                namespace: e.namespace().to_string(),
                labels: e.spec.labels.clone(),
                annotations: e.meta.annotations.clone(),
                service_account: if e.spec.service_account.is_empty() {
                    "default".into()
                } else {
                    e.spec.service_account.clone()
                },
                ports,
                sidecar: true,
                address: Some(e.spec.address.clone()),
                origin: e.origin.clone(),
            });
        }
        diags.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        (cfg, diags)
    }
}

fn diag(
    file: &str,
    line: usize,
    resource: Option<String>,
    field: &str,
    message: String,
) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        code: "WRD0002",
        file: file.to_string(),
        line,
        resource,
        field: (!field.is_empty()).then(|| field.to_string()),
        message,
    }
}

/// Strict decoding of one top-level field, with errors naming the full field path and its
/// line. Unknown fields are reported as the API server's strict field validation does.
fn decode<T: DeserializeOwned + Default>(
    doc: &Document,
    field: &str,
    v: Option<&Value>,
) -> Result<T, Box<Diagnostic>> {
    let Some(v) = v else { return Ok(T::default()) };
    if v.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let sub = e.path().to_string();
        let path = if sub.is_empty() || sub == "." {
            field.to_string()
        } else {
            format!("{field}.{sub}")
        };
        let inner = e.inner().to_string();
        let message = match inner.strip_prefix("unknown field `") {
            Some(rest) => {
                let (_name, expected) = rest.split_once('`').unwrap_or((rest, ""));
                format!("strict decoding error: unknown field \"{path}\"{expected}")
            }
            None => inner,
        };
        Box::new(Diagnostic {
            severity: Severity::Error,
            code: "WRD0002",
            file: doc.file.to_string(),
            line: doc.line_of(&path),
            resource: None,
            field: Some(path),
            message,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (Config, Vec<Diagnostic>) {
        let mut l = Loader::new();
        l.add_text("t.yaml", text);
        l.finish()
    }

    /// Regression: `annotations:` with no value (YAML null) was refused, though the API
    /// server accepts it as an empty map.
    #[test]
    fn null_labels_and_annotations_are_empty_maps() {
        let (cfg, diags) = load(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels:\n  annotations:\n",
        );
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
        assert!(cfg.namespaces["a"].labels.is_empty());
    }

    #[test]
    fn lists_defaults_and_skips() {
        let (cfg, diags) = load(
            r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: a, labels: {istio-injection: enabled}}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: a}
  spec: {template: {metadata: {labels: {app: web}}, spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p}
"#,
        );
        assert!(diags.is_empty(), "{diags:?}");
        let w = cfg.workload("a", "web").unwrap();
        assert!(w.sidecar);
        assert_eq!(w.service_account, "default");
        assert_eq!(w.ports[0].container_port, 8080);
        assert_eq!(cfg.skipped.len(), 1);
        assert_eq!(cfg.authorization_policies[0].namespace(), "default");
        let (cfg, diags) = load("name: a warden test file\ncases: []\n");
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(cfg.skipped[0].1, "warden test file");
    }

    #[test]
    fn sidecar_rules() {
        let (cfg, _) = load(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: on, labels: {istio.io/rev: canary}}
---
apiVersion: v1
kind: Namespace
metadata: {name: off}
---
apiVersion: v1
kind: Pod
metadata: {name: opt-out, namespace: on, annotations: {sidecar.istio.io/inject: "false"}}
---
apiVersion: v1
kind: Pod
metadata: {name: opt-in, namespace: off, labels: {sidecar.istio.io/inject: "true"}}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: off}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: cron, namespace: on}
spec: {jobTemplate: {spec: {template: {spec: {serviceAccountName: batch}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: off}
spec: {address: 127.0.0.5, serviceAccount: vm-sa, labels: {app: vm}, ports: {http: 8080}}
"#,
        );
        let sidecar = |ns, n| cfg.workload(ns, n).unwrap().sidecar;
        assert!(!sidecar("on", "opt-out"));
        assert!(sidecar("off", "opt-in"));
        assert!(!sidecar("off", "plain"));
        assert!(sidecar("on", "cron"));
        assert_eq!(cfg.workload("on", "cron").unwrap().service_account, "batch");
        assert!(sidecar("off", "vm"));
        assert_eq!(cfg.workload("off", "vm").unwrap().service_account, "vm-sa");
        let (cfg, _) = load(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {istio-injection: disabled, istio.io/rev: canary}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\n",
        );
        assert!(
            !cfg.workload("x", "p").unwrap().sidecar,
            "istio-injection: disabled beats a revision"
        );
    }

    #[test]
    fn errors_name_file_line_resource_and_field() {
        let (_, diags) = load(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: x}\nspec:\n  mtls:\n    mode: STRIC\n",
        );
        assert_eq!(diags.len(), 1, "{diags:?}");
        let d = &diags[0];
        assert_eq!((d.file.as_str(), d.line), ("t.yaml", 6));
        assert_eq!(d.resource.as_deref(), Some("PeerAuthentication x/pa"));
        assert_eq!(d.field.as_deref(), Some("spec.mtls.mode"));
        assert!(d.message.contains("STRICT"), "{}", d.message);

        let (_, diags) = load("apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n");
        assert!(
            diags[0].message.contains("no matches for kind"),
            "{diags:?}"
        );
        let (_, diags) = load("kind: Pod\nmetadata: {name: p}\n");
        assert!(diags[0].message.contains("apiVersion"), "{diags:?}");
        let (_, diags) = load("- just\n- a list\n");
        assert!(diags[0].message.contains("Kubernetes object"), "{diags:?}");
        let twice = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let (_, diags) = load(twice);
        assert!(
            diags[0]
                .message
                .contains("defined twice; first definition at t.yaml:1"),
            "{diags:?}"
        );
    }

    #[test]
    fn mesh_config_from_configmap() {
        let (cfg, diags) = load(
            r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    rootNamespace: mesh-root
    trustDomain: td1
    trustDomainAliases: [old-td]
    pathNormalization: {normalization: MERGE_SLASHES}
    outboundTrafficPolicy: {mode: REGISTRY_ONLY}
    extensionProviders:
    - name: ext
      envoyExtAuthzHttp: {service: ext.foo.svc.cluster.local, port: 8000}
    defaultConfig: {holdApplicationUntilProxyStarts: true}
"#,
        );
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(cfg.mesh.root_namespace, "mesh-root");
        assert_eq!(cfg.mesh.trust_domain_bundle(), vec!["td1", "old-td"]);
        assert_eq!(
            cfg.mesh.path_normalization,
            crate::path::Normalization::MergeSlashes
        );
        assert_eq!(cfg.mesh.outbound_traffic_policy, "REGISTRY_ONLY");
        assert!(cfg.mesh.provider("ext").unwrap().ext_authz.is_some());

        let (_, diags) = load(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    pathNormalization: {normalization: WEIRD}\n",
        );
        assert!(diags[0].message.contains("WEIRD"), "{diags:?}");

        // Review findings: a quoted provider port (as Istio's docs write it), caCertificates
        // trust domains, and a bare MeshConfig document among resources.
        let (cfg, diags) = load(
            "trustDomain: td1\ncaCertificates: [{trustDomains: [other-td]}]\nextensionProviders:\n- name: oauth2\n  envoyExtAuthzHttp: {service: oauth2.foo.svc.cluster.local, port: \"4180\"}\n",
        );
        assert!(diags.is_empty(), "{diags:?}");
        let (_, s) = cfg
            .mesh
            .provider("oauth2")
            .unwrap()
            .ext_authz
            .clone()
            .unwrap();
        assert_eq!(s.port, 4180);
        assert!(cfg.mesh.accepts_trust_domain("other-td"));
        assert!(cfg.mesh.accepts_trust_domain("td1"));
        assert!(!cfg.mesh.accepts_trust_domain("cluster.local"));
        assert_eq!(cfg.mesh.trust_domain_bundle(), vec!["td1"]);
    }
}
