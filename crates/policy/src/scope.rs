//! Scope resolution: which policies attach to a sidecar workload, and the effective mTLS mode
//! of each of its ports from PeerAuthentication (mesh → namespace → workload → port, with
//! UNSET inheriting and the oldest policy winning at each level).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Config, Resource, Workload};
use crate::model::*;

/// Label selector subset match; a missing or empty selector selects every workload.
pub fn selects(selector: Option<&WorkloadSelector>, labels: &Labels) -> bool {
    selector.is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Whether a selector/targetRef policy in `ns` attaches to a sidecar workload: it must live in
/// the workload's namespace or the root namespace, have no targetRefs (those attach to
/// gateways and waypoints only), and select the workload's labels.
fn attaches(
    cfg: &Config,
    wl: &Workload,
    ns: &str,
    target_refs: bool,
    selector: Option<&WorkloadSelector>,
) -> bool {
    attaches_in(&cfg.mesh.root_namespace, wl, ns, target_refs, selector)
}

/// [`attaches`] with the root namespace given, for callers that index policies by namespace
/// (the control plane) and must apply exactly the rule the engine applies.
pub fn attaches_in(
    root_namespace: &str,
    wl: &Workload,
    ns: &str,
    target_refs: bool,
    selector: Option<&WorkloadSelector>,
) -> bool {
    (ns == wl.namespace || ns == root_namespace) && !target_refs && selects(selector, &wl.labels)
}

/// AuthorizationPolicies that apply to a sidecar workload.
pub fn authorization_policies<'a>(
    cfg: &'a Config,
    wl: &Workload,
) -> Vec<&'a Resource<AuthorizationPolicySpec>> {
    cfg.authorization_policies
        .iter()
        .filter(|p| {
            attaches(
                cfg,
                wl,
                p.namespace(),
                p.spec.has_target_refs(),
                p.spec.selector.as_ref(),
            )
        })
        .collect()
}

/// RequestAuthentications that apply to a sidecar workload (same rule as AuthorizationPolicy).
pub fn request_authentications<'a>(
    cfg: &'a Config,
    wl: &Workload,
) -> Vec<&'a Resource<RequestAuthenticationSpec>> {
    cfg.request_authentications
        .iter()
        .filter(|p| {
            attaches(
                cfg,
                wl,
                p.namespace(),
                p.spec.has_target_refs(),
                p.spec.selector.as_ref(),
            )
        })
        .collect()
}

/// Which PeerAuthentication level decided a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PaLevel {
    Default,
    Mesh,
    Namespace,
    Workload,
    Port,
}

/// The effective mTLS mode of one port and the policy that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortMode {
    pub mode: MtlsMode,
    pub level: PaLevel,
    /// `namespace/name` of the deciding PeerAuthentication, if any.
    pub policy: Option<String>,
}

impl PortMode {
    pub fn describe(&self) -> String {
        match (&self.policy, self.level) {
            (None, _) => format!(
                "{} (default: no PeerAuthentication sets a mode)",
                self.mode.as_str()
            ),
            (Some(p), PaLevel::Port) => format!(
                "{} (PeerAuthentication {p}, port level)",
                self.mode.as_str()
            ),
            (Some(p), l) => format!(
                "{} (PeerAuthentication {p}, {} level)",
                self.mode.as_str(),
                match l {
                    PaLevel::Mesh => "mesh",
                    PaLevel::Namespace => "namespace",
                    _ => "workload",
                }
            ),
        }
    }
}

/// The PeerAuthentications that shape one workload's inbound mTLS.
#[derive(Debug, Clone)]
pub struct PeerAuthn<'a> {
    pub mesh: Option<&'a Resource<PeerAuthenticationSpec>>,
    pub namespace: Option<&'a Resource<PeerAuthenticationSpec>>,
    pub workload: Option<&'a Resource<PeerAuthenticationSpec>>,
    /// Workload-wide result of mesh → namespace → workload.
    pub base: PortMode,
    /// Port-level overrides from the workload policy, keyed by container port.
    pub ports: BTreeMap<u16, PortMode>,
}

impl PeerAuthn<'_> {
    pub fn mode_for(&self, port: u16) -> &PortMode {
        self.ports.get(&port).unwrap_or(&self.base)
    }
}

fn is_ns_wide(p: &Resource<PeerAuthenticationSpec>) -> bool {
    p.spec
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty())
}

fn mode_of(p: &Resource<PeerAuthenticationSpec>) -> MtlsMode {
    p.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
}

/// PeerAuthentications sorted as Istio orders configs: creation time, then name, then namespace.
pub fn sorted_peer_authentications(cfg: &Config) -> Vec<&Resource<PeerAuthenticationSpec>> {
    let mut all: Vec<_> = cfg.peer_authentications.iter().collect();
    all.sort_by(|a, b| {
        let ta = a.meta.creation_timestamp.as_deref().unwrap_or("");
        let tb = b.meta.creation_timestamp.as_deref().unwrap_or("");
        (ta, a.name(), a.namespace()).cmp(&(tb, b.name(), b.namespace()))
    });
    all
}

/// Namespace-wide PeerAuthentications that Istio ignores because an older one exists in the
/// same namespace.
pub fn ignored_namespace_peer_authentications(
    cfg: &Config,
) -> Vec<(
    &Resource<PeerAuthenticationSpec>,
    &Resource<PeerAuthenticationSpec>,
)> {
    let mut first: BTreeMap<&str, &Resource<PeerAuthenticationSpec>> = BTreeMap::new();
    let mut out = Vec::new();
    for p in sorted_peer_authentications(cfg) {
        if is_ns_wide(p) {
            match first.get(p.namespace()) {
                Some(f) => out.push((p, *f)),
                None => {
                    first.insert(p.namespace(), p);
                }
            }
        }
    }
    out
}

pub fn peer_authentication<'a>(cfg: &'a Config, wl: &Workload) -> PeerAuthn<'a> {
    let root = cfg.mesh.root_namespace.as_str();
    let mut mesh = None;
    let mut namespace = None;
    let mut workload = None;
    for p in sorted_peer_authentications(cfg) {
        let ns = p.namespace();
        if ns != wl.namespace && ns != root {
            continue;
        }
        if is_ns_wide(p) {
            // Only the oldest namespace-wide policy of a namespace counts.
            if ns == root && mesh.is_none() {
                mesh = Some(p);
            }
            if ns == wl.namespace && ns != root && namespace.is_none() {
                namespace = Some(p);
            }
            if ns == root && ns == wl.namespace && namespace.is_none() {
                namespace = Some(p);
            }
        } else if ns != root && workload.is_none() && selects(p.spec.selector.as_ref(), &wl.labels)
        {
            workload = Some(p);
        }
    }
    let mut base = PortMode {
        mode: MtlsMode::Permissive,
        level: PaLevel::Default,
        policy: None,
    };
    for (p, level) in [
        (mesh, PaLevel::Mesh),
        (namespace, PaLevel::Namespace),
        (workload, PaLevel::Workload),
    ] {
        if let Some(p) = p {
            let m = mode_of(p);
            if m != MtlsMode::Unset {
                base = PortMode {
                    mode: m,
                    level,
                    policy: Some(format!("{}/{}", p.namespace(), p.name())),
                };
            }
        }
    }
    let mut ports = BTreeMap::new();
    if let Some(w) = workload {
        for (k, v) in w.spec.port_level_mtls.iter().flatten() {
            let Ok(port) = k.parse::<u16>() else { continue };
            let m = v.as_ref().map(|m| m.mode).unwrap_or_default();
            let pm = if m == MtlsMode::Unset {
                base.clone()
            } else {
                PortMode {
                    mode: m,
                    level: PaLevel::Port,
                    policy: Some(format!("{}/{}", w.namespace(), w.name())),
                }
            };
            ports.insert(port, pm);
        }
    }
    PeerAuthn {
        mesh,
        namespace,
        workload,
        base,
        ports,
    }
}
