//! Snapshots: an accepted configuration cut into the resources proxies receive, each with a
//! content version, and the rule for which of them a proxy gets.
//!
//! Two layers. AuthorizationPolicies and RequestAuthentications are *workload* resources: a
//! proxy gets exactly those that attach to its workload (the engine's own attach rule,
//! [`warden_policy::scope::attaches_in`]). Everything else a proxy needs — its own workload,
//! every other workload (endpoints and their identities), Services, ServiceEntries,
//! Namespaces, PeerAuthentications (auto mTLS towards a destination depends on the
//! destination's mode) and the mesh configuration — is *global*: every proxy holds all of it,
//! as every Istio sidecar holds every Service without a Sidecar resource.
//!
//! Global resources remember the generation at which their content last changed and removed
//! ones leave a tombstone, so the delta for a proxy that ACKed generation `g` is found without
//! remembering, per proxy, what it holds. Workload resources are remembered per proxy (a
//! handful each).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;
use warden_policy::config::{Config, Workload};
use warden_policy::model::WorkloadSelector;
use warden_policy::source::Document;

/// `Kind/namespace/name`.
pub type Key = Arc<str>;

/// Which proxies a resource goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// Every proxy.
    Global,
    /// Proxies whose workload it attaches to.
    Workload,
}

/// One resource of a snapshot.
#[derive(Clone, Debug)]
pub struct Res {
    pub body: Bytes,
    /// Content hash (FNV-1a 64) of `body`.
    pub version: u64,
    /// The snapshot generation at which this content first appeared.
    pub generation: u64,
    pub layer: Layer,
}

/// How a workload resource attaches: what [`warden_policy::scope::attaches_in`] needs.
#[derive(Clone, Debug)]
struct Attach {
    key: Key,
    namespace: String,
    target_refs: bool,
    selector: Option<WorkloadSelector>,
}

/// An accepted configuration, ready to serve.
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    pub resources: HashMap<Key, Res>,
    /// Global resources removed, with the generation that removed them.
    pub tombstones: HashMap<Key, u64>,
    /// Workload resources by namespace.
    by_namespace: HashMap<String, Vec<Attach>>,
    /// When it was accepted (push latency is measured from here).
    pub accepted: Instant,
}

/// What changed between two snapshots, for deciding which proxies to wake.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// A global resource or the root namespace changed: every proxy is concerned.
    pub all: bool,
    /// Namespaces in which a workload resource changed.
    pub namespaces: HashSet<String>,
    /// Keys added, changed or removed.
    pub keys: usize,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        !self.all && self.namespaces.is_empty()
    }
}

/// The key of the `--mesh` override document.
pub const MESH_OVERRIDE_KEY: &str = "MeshConfig//override";

/// One document ready to become a resource: its key, its layer and its body.
pub struct Entry {
    pub key: Key,
    pub layer: Layer,
    pub body: Bytes,
}

/// What a proxy's loader needs of a document, or `None` for documents no proxy needs
/// (ServiceAccounts, unknown kinds, ConfigMaps other than the mesh's, `warden test` files).
/// `kind: List` documents must be expanded first.
pub fn classify(doc: &Document) -> Option<(Key, Layer)> {
    let obj = doc.value.as_object()?;
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let api = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() && api.is_empty() {
        if obj.contains_key("cases") {
            return None;
        }
        // A bare MeshConfig among the resources; the loader recognises it by its keys.
        return Some((format!("MeshConfig//{}", doc.file).into(), Layer::Global));
    }
    let meta = obj.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let group = api.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    let layer = match (group, kind) {
        ("security.istio.io", "AuthorizationPolicy" | "RequestAuthentication") => Layer::Workload,
        ("security.istio.io", "PeerAuthentication") => Layer::Global,
        ("networking.istio.io", "WorkloadEntry" | "ServiceEntry") => Layer::Global,
        ("", "Namespace" | "Pod" | "Service") => Layer::Global,
        ("", "ConfigMap") if ns == "istio-system" && name == "istio" => Layer::Global,
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => Layer::Global,
        ("batch", "Job" | "CronJob") => Layer::Global,
        _ => return None,
    };
    let ns = if kind == "Namespace" { "" } else { ns };
    Some((format!("{kind}/{ns}/{name}").into(), layer))
}

/// FNV-1a, 64 bits: stable across builds and platforms, so versions survive restarts of
/// either side.
pub fn content_version(body: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// How a version travels on the wire.
pub fn version_text(v: u64) -> String {
    format!("{v:016x}")
}

impl Snapshot {
    /// Builds the snapshot following `prev` (if any) from the accepted `config` and its
    /// `entries`. Unchanged resources keep the generation they had.
    pub fn build(prev: Option<&Snapshot>, config: Arc<Config>, entries: Vec<Entry>) -> Snapshot {
        let generation = prev.map_or(1, |p| p.generation + 1);
        let mut resources = HashMap::with_capacity(entries.len());
        for e in entries {
            let old = prev.and_then(|p| p.resources.get(&e.key));
            // The same buffer as before (unchanged files keep their parsed bodies): its hash is
            // known, and hashing ten thousand bodies on every change is not free.
            let version = match old {
                Some(o) if o.body.as_ptr() == e.body.as_ptr() && o.body.len() == e.body.len() => {
                    o.version
                }
                _ => content_version(&e.body),
            };
            let gen = match old {
                Some(old) if old.version == version => old.generation,
                _ => generation,
            };
            resources.insert(
                e.key,
                Res {
                    body: e.body,
                    version,
                    generation: gen,
                    layer: e.layer,
                },
            );
        }
        let mut tombstones = HashMap::new();
        if let Some(p) = prev {
            for (k, g) in &p.tombstones {
                if !resources.contains_key(k) {
                    tombstones.insert(k.clone(), *g);
                }
            }
            for (k, r) in &p.resources {
                if r.layer == Layer::Global && !resources.contains_key(k) {
                    tombstones.insert(k.clone(), generation);
                }
            }
        }
        let mut by_namespace: HashMap<String, Vec<Attach>> = HashMap::new();
        let attach = config
            .authorization_policies
            .iter()
            .map(|p| {
                (
                    "AuthorizationPolicy",
                    p.namespace(),
                    p.name(),
                    p.spec.has_target_refs(),
                    p.spec.selector.clone(),
                )
            })
            .chain(config.request_authentications.iter().map(|p| {
                (
                    "RequestAuthentication",
                    p.namespace(),
                    p.name(),
                    p.spec.has_target_refs(),
                    p.spec.selector.clone(),
                )
            }));
        for (kind, ns, name, target_refs, selector) in attach {
            let key: Key = format!("{kind}/{ns}/{name}").into();
            if !resources.contains_key(&key) {
                continue;
            }
            by_namespace
                .entry(ns.to_string())
                .or_default()
                .push(Attach {
                    key,
                    namespace: ns.to_string(),
                    target_refs,
                    selector,
                });
        }
        Snapshot {
            generation,
            config,
            resources,
            tombstones,
            by_namespace,
            accepted: Instant::now(),
        }
    }

    /// The workload resources that attach to `wl`, with their versions.
    pub fn workload_resources(&self, wl: &Workload) -> HashMap<Key, u64> {
        let root = self.config.mesh.root_namespace.as_str();
        let mut out = HashMap::new();
        let namespaces: &[&str] = if wl.namespace == root {
            &[root]
        } else {
            &[wl.namespace.as_str(), root]
        };
        for ns in namespaces {
            for a in self.by_namespace.get(*ns).into_iter().flatten() {
                if warden_policy::scope::attaches_in(
                    root,
                    wl,
                    &a.namespace,
                    a.target_refs,
                    a.selector.as_ref(),
                ) {
                    if let Some(r) = self.resources.get(&a.key) {
                        out.insert(a.key.clone(), r.version);
                    }
                }
            }
        }
        out
    }

    /// What changed from `prev` to `self`.
    pub fn change_from(&self, prev: &Snapshot) -> Change {
        let mut change = Change {
            all: prev.config.mesh.root_namespace != self.config.mesh.root_namespace,
            ..Change::default()
        };
        let mut note = |key: &Key, layer: Layer| {
            change.keys += 1;
            match layer {
                Layer::Global => change.all = true,
                Layer::Workload => {
                    let ns = key.split('/').nth(1).unwrap_or("").to_string();
                    change.namespaces.insert(ns);
                }
            }
        };
        for (k, r) in &self.resources {
            match prev.resources.get(k) {
                Some(old) if old.version == r.version => {}
                _ => note(k, r.layer),
            }
        }
        for (k, r) in &prev.resources {
            if !self.resources.contains_key(k) {
                note(k, r.layer);
            }
        }
        let root = &self.config.mesh.root_namespace;
        if change.namespaces.contains(root)
            || change.namespaces.contains(&prev.config.mesh.root_namespace)
        {
            change.all = true;
        }
        change
    }
}

/// What a proxy holds after it ACKed a response.
#[derive(Clone, Debug, Default)]
pub struct Held {
    /// The generation of the last ACKed snapshot; 0 before the first.
    pub generation: u64,
    /// Its workload resources.
    pub workload: HashMap<Key, u64>,
}

/// One response's content.
#[derive(Debug, Default)]
pub struct Delta {
    pub resources: Vec<(Key, Res)>,
    pub removed: Vec<Key>,
    /// What the proxy holds once it applies this.
    pub then: Held,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }
}

impl Snapshot {
    /// Everything a proxy that holds `held` (key -> version, as it said when it connected)
    /// lacks, and what it holds and must drop.
    pub fn delta_from_held(&self, wl: &Workload, held: &HashMap<String, u64>) -> Delta {
        let workload = self.workload_resources(wl);
        let mut delta = Delta::default();
        for (k, r) in &self.resources {
            let wanted = match r.layer {
                Layer::Global => true,
                Layer::Workload => workload.contains_key(k),
            };
            if wanted && held.get(k.as_ref()) != Some(&r.version) {
                delta.resources.push((k.clone(), r.clone()));
            }
        }
        for k in held.keys() {
            let keep = match self.resources.get(k.as_str()) {
                Some(r) => r.layer == Layer::Global || workload.contains_key(k.as_str()),
                None => false,
            };
            if !keep {
                delta.removed.push(k.as_str().into());
            }
        }
        delta.then = Held {
            generation: self.generation,
            workload,
        };
        delta
    }

    /// What changed for a proxy since it ACKed `held`.
    pub fn delta_since(&self, wl: &Workload, held: &Held) -> Delta {
        let mut delta = Delta::default();
        if held.generation < self.generation {
            for (k, r) in &self.resources {
                if r.layer == Layer::Global && r.generation > held.generation {
                    delta.resources.push((k.clone(), r.clone()));
                }
            }
            for (k, g) in &self.tombstones {
                if *g > held.generation {
                    delta.removed.push(k.clone());
                }
            }
        }
        let workload = self.workload_resources(wl);
        for (k, v) in &workload {
            if held.workload.get(k) != Some(v) {
                if let Some(r) = self.resources.get(k) {
                    delta.resources.push((k.clone(), r.clone()));
                }
            }
        }
        for k in held.workload.keys() {
            if !workload.contains_key(k) {
                delta.removed.push(k.clone());
            }
        }
        delta.then = Held {
            generation: self.generation,
            workload,
        };
        delta
    }
}

/// Expands `kind: List` documents into their items, as the loader does.
pub fn expand_lists(doc: Document, out: &mut Vec<Document>) {
    if doc.value.get("kind").and_then(Value::as_str) == Some("List") {
        if let Some(Value::Array(items)) = doc.value.get("items") {
            for (i, item) in items.clone().into_iter().enumerate() {
                let child = doc.child(&format!("items[{i}]"), item);
                expand_lists(child, out);
            }
        }
        return;
    }
    out.push(doc);
}

/// Sorted keys, for logs and status pages.
pub fn sorted<'a>(keys: impl Iterator<Item = &'a Key>) -> Vec<String> {
    let mut v: Vec<String> = keys.map(|k| k.to_string()).collect();
    v.sort();
    v
}

/// Counts of a snapshot's resources by layer, for the status page.
pub fn counts(s: &Snapshot) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for r in s.resources.values() {
        *m.entry(match r.layer {
            Layer::Global => "global",
            Layer::Workload => "workload",
        })
        .or_insert(0) += 1;
    }
    m
}
