//! `warden analyze`: Istio's admission checks ([`crate::validate`]) plus analyzers that look
//! across resources, the way `istioctl analyze` does, and Warden's own checks (WRD01xx) for
//! the security mistakes that are valid YAML, pass Istio's webhook, and still leave a hole or
//! deny traffic nobody meant to deny.
//!
//! Istio codes keep istioctl's meaning and wording (IST0101, IST0102, IST0103, IST0127); where
//! Warden applies one to more kinds than istioctl does, the message says so. Every finding
//! names file, line, resource and field path, and the result is sorted by file and line.
//!
//! Analyzers reason about sidecar workloads only (the ones [`crate::scope`] resolves); policies
//! with targetRefs are reported once (WRD0111) and otherwise left alone. Dry-run policies are
//! not enforced, so the checks about enforcement effects skip them.

use std::collections::{BTreeMap, BTreeSet};

use crate::authz::{custom_provider_problem, is_dry_run, CompiledAuthz, Protocol};
use crate::config::{Config, Resource, Workload};
use crate::diag::{Diagnostic, Reporter, Severity};
use crate::model::*;
use crate::path::Normalization;
use crate::scope::{self, selects};
use crate::simulate::declared_protocol;
use crate::validate::{mesh_diagnostic, operation_fields, source_fields, validate};

/// Validation findings plus every analyzer's, sorted by file and line.
pub fn analyze(cfg: &Config) -> Vec<Diagnostic> {
    let mut out = validate(cfg);
    referenced_namespaces(cfg, &mut out);
    no_matching_workloads(cfg, &mut out);
    namespace_not_injected(cfg, &mut out);
    pod_missing_proxy(cfg, &mut out);
    token_not_required(cfg, &mut out);
    identity_on_plaintext(cfg, &mut out);
    http_fields_on_tcp(cfg, &mut out);
    permissive_mesh(cfg, &mut out);
    spiffe_prefix(cfg, &mut out);
    hosts_without_port(cfg, &mut out);
    unmerged_slashes(cfg, &mut out);
    ignored_peer_authentications(cfg, &mut out);
    split_from_to(cfg, &mut out);
    split_across_rules(cfg, &mut out);
    refused_custom(cfg, &mut out);
    envoy_filter_keys(cfg, &mut out);
    unresolved_target_ports(cfg, &mut out);
    root_selector_peer_authentications(cfg, &mut out);
    target_ref_policies(cfg, &mut out);
    // Stable: findings on one line keep the order the checks ran in.
    out.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    out
}

// ------------------------------------------------------------------ shared helpers

/// Workloads a selector/namespace-scoped policy attaches to (AuthorizationPolicy and
/// RequestAuthentication rule: own namespace or root namespace, then label subset).
fn attached_workloads<'a>(
    cfg: &'a Config,
    ns: &str,
    selector: Option<&WorkloadSelector>,
) -> Vec<&'a Workload> {
    let root = cfg.mesh.root_namespace.as_str();
    cfg.workloads
        .iter()
        .filter(|w| (ns == w.namespace || ns == root) && selects(selector, &w.labels))
        .collect()
}

fn ap_workloads<'a>(cfg: &'a Config, p: &Resource<AuthorizationPolicySpec>) -> Vec<&'a Workload> {
    if p.spec.has_target_refs() {
        return Vec::new();
    }
    attached_workloads(cfg, p.namespace(), p.spec.selector.as_ref())
}

/// `a, b, c and 4 more`: long lists stay readable in one message.
fn short_list(items: &[String]) -> String {
    const MAX: usize = 3;
    let shown: Vec<&str> = items.iter().take(MAX).map(String::as_str).collect();
    let mut s = shown.join(", ");
    if items.len() > MAX {
        s.push_str(&format!(" and {} more", items.len() - MAX));
    }
    s
}

fn workload_diag(
    wl: &Workload,
    severity: Severity,
    code: &'static str,
    message: String,
) -> Diagnostic {
    Diagnostic {
        severity,
        code,
        file: wl.origin.file().to_string(),
        line: wl.origin.line(),
        resource: Some(format!("{} {}", wl.kind, wl.id())),
        field: None,
        message,
    }
}

/// Every enforced rule, with its index and field-path prefix.
fn rules(p: &Resource<AuthorizationPolicySpec>) -> impl Iterator<Item = (usize, String, &Rule)> {
    p.spec
        .rules
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| (i, format!("spec.rules[{i}]"), r)))
}

fn sources(rule: &Rule) -> impl Iterator<Item = (usize, &Source)> {
    rule.from
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(j, f)| f.as_ref().and_then(|f| f.source.as_ref()).map(|s| (j, s)))
}

fn operations(rule: &Rule) -> impl Iterator<Item = (usize, &Operation)> {
    rule.to.iter().flatten().enumerate().filter_map(|(j, t)| {
        t.as_ref()
            .and_then(|t| t.operation.as_ref())
            .map(|o| (j, o))
    })
}

fn conditions(rule: &Rule) -> impl Iterator<Item = (usize, &Condition)> {
    rule.when
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(j, c)| c.as_ref().map(|c| (j, c)))
}

fn is_http_only_key(key: &str) -> bool {
    key.starts_with("request.headers") || key.starts_with("request.auth.")
}

/// Whether a rule can apply to connections on `port`, judging only `ports`/`notPorts` and
/// `destination.port` (the constraints that survive on TCP).
fn rule_covers_port(rule: &Rule, port: u16) -> bool {
    let hit = |vs: &[String]| vs.iter().any(|v| v.parse::<u16>() == Ok(port));
    let mut ops = operations(rule).peekable();
    let to_ok = ops.peek().is_none()
        || ops.any(|(_, o)| (o.ports.is_empty() || hit(&o.ports)) && !hit(&o.not_ports));
    let when_ok = conditions(rule)
        .filter(|(_, c)| c.key == "destination.port")
        .all(|(_, c)| (c.values.is_empty() || hit(&c.values)) && !hit(&c.not_values));
    to_ok && when_ok
}

// ------------------------------------------------------------------ IST0101

/// Istio's namespace match for the ReferencedResourceNotFound analyzer.
fn namespace_matches(pattern: &str, ns: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        ns.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        ns.starts_with(prefix)
    } else {
        pattern.eq_ignore_ascii_case(ns)
    }
}

fn referenced_namespaces(cfg: &Config, out: &mut Vec<Diagnostic>) {
    // With no Namespace objects the files say nothing about which namespaces exist.
    if cfg.namespaces.is_empty() {
        return;
    }
    // In a cluster every namespace holding an object exists, Namespace object or not.
    let mut known: BTreeSet<&str> = cfg.namespaces.keys().map(String::as_str).collect();
    known.extend(cfg.workloads.iter().map(|w| w.namespace.as_str()));
    known.extend(cfg.services.iter().map(|s| s.namespace()));
    known.extend(cfg.service_accounts.iter().map(|s| s.namespace()));
    known.extend(cfg.authorization_policies.iter().map(|s| s.namespace()));
    known.extend(cfg.request_authentications.iter().map(|s| s.namespace()));
    known.extend(cfg.peer_authentications.iter().map(|s| s.namespace()));
    for p in &cfg.authorization_policies {
        let mut r = p.reporter(out);
        for (_, base, rule) in rules(p) {
            for (j, s) in sources(rule) {
                for (json, values) in [
                    ("namespaces", &s.namespaces),
                    ("notNamespaces", &s.not_namespaces),
                ] {
                    for (k, v) in values.iter().enumerate() {
                        if !v.is_empty() && !known.iter().any(|ns| namespace_matches(v, ns)) {
                            r.push(
                                Severity::Error,
                                "IST0101",
                                &format!("{base}.from[{j}].source.{json}[{k}]"),
                                format!("Referenced namespace not found: \"{v}\""),
                            );
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ IST0127

fn labels_text(sel: &WorkloadSelector) -> String {
    sel.match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn no_matching_workloads(cfg: &Config, out: &mut Vec<Diagnostic>) {
    // Policy-only inputs say nothing about which workloads exist.
    if cfg.workloads.is_empty() {
        return;
    }
    let root = cfg.mesh.root_namespace.as_str();
    let in_ns = |ns: &str, sel: Option<&WorkloadSelector>| {
        cfg.workloads
            .iter()
            .any(|w| w.namespace == ns && selects(sel, &w.labels))
    };
    let anywhere =
        |sel: Option<&WorkloadSelector>| cfg.workloads.iter().any(|w| selects(sel, &w.labels));
    // (resource, namespace, selector, is Warden's extension of the istioctl check)
    let check = |r: &mut Reporter<'_>, ns: &str, sel: Option<&WorkloadSelector>, extended: bool| {
        let note = if extended {
            " (Warden extension: istioctl analyze checks AuthorizationPolicy only)"
        } else {
            ""
        };
        match sel.filter(|s| !s.match_labels.is_empty()) {
            Some(s) => {
                let found = if ns == root {
                    anywhere(Some(s))
                } else {
                    in_ns(ns, Some(s))
                };
                if !found {
                    r.push(
                        Severity::Warning,
                        "IST0127",
                        "spec.selector",
                        format!(
                            "No matching workloads for this resource with the following labels: {}{note}",
                            labels_text(s)
                        ),
                    );
                }
            }
            None => {
                if ns != root && !in_ns(ns, None) {
                    r.push(
                        Severity::Warning,
                        "IST0127",
                        "",
                        format!(
                            "No matching workloads for this resource: namespace {ns} has no workloads{note}"
                        ),
                    );
                }
            }
        }
    };
    for p in &cfg.authorization_policies {
        if !p.spec.has_target_refs() {
            check(
                &mut p.reporter(out),
                p.namespace(),
                p.spec.selector.as_ref(),
                false,
            );
        }
    }
    for p in &cfg.request_authentications {
        if !p.spec.has_target_refs() {
            check(
                &mut p.reporter(out),
                p.namespace(),
                p.spec.selector.as_ref(),
                true,
            );
        }
    }
    for p in &cfg.peer_authentications {
        // Root-namespace selector policies are ignored anyway (WRD0110).
        let sel = p
            .spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty());
        if sel.is_some() && p.namespace() != root {
            check(&mut p.reporter(out), p.namespace(), sel, true);
        }
    }
}

// ------------------------------------------------------------------ IST0102 / IST0103

const SYSTEM_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];

fn is_ambient(labels: &Labels) -> bool {
    labels.get("istio.io/dataplane-mode").map(String::as_str) == Some("ambient")
}

fn namespace_not_injected(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let mut namespaces: BTreeSet<&str> = BTreeSet::new();
    namespaces.extend(cfg.workloads.iter().map(|w| w.namespace.as_str()));
    for ns in namespaces {
        if ns == cfg.mesh.root_namespace || SYSTEM_NAMESPACES.contains(&ns) {
            continue;
        }
        let obj = cfg.namespaces.get(ns);
        if obj.is_some_and(|n| {
            n.injection_enabled()
                || n.labels.get("istio-injection").map(String::as_str) == Some("disabled")
                || is_ambient(&n.labels)
        }) {
            continue;
        }
        let missing = cfg
            .workloads
            .iter()
            .any(|w| w.namespace == ns && !w.sidecar);
        if !missing {
            continue;
        }
        // Where to report: the Namespace object, else the first policy in the namespace.
        let origin = obj.and_then(|n| n.origin.clone()).or_else(|| {
            cfg.authorization_policies
                .iter()
                .find(|p| p.namespace() == ns)
                .map(|p| p.origin.clone())
                .or_else(|| {
                    cfg.request_authentications
                        .iter()
                        .find(|p| p.namespace() == ns)
                        .map(|p| p.origin.clone())
                })
                .or_else(|| {
                    cfg.peer_authentications
                        .iter()
                        .find(|p| p.namespace() == ns)
                        .map(|p| p.origin.clone())
                })
        });
        let assumed = if obj.is_none() {
            format!(
                " (no Namespace object for {ns} was given, so Warden assumes it is not labelled)"
            )
        } else {
            String::new()
        };
        let has_policies = cfg
            .authorization_policies
            .iter()
            .any(|p| p.namespace() == ns)
            || cfg
                .request_authentications
                .iter()
                .any(|p| p.namespace() == ns)
            || cfg.peer_authentications.iter().any(|p| p.namespace() == ns);
        let Some(origin) = origin.filter(|_| has_policies) else {
            continue;
        };
        out.push(Diagnostic {
            severity: Severity::Info,
            code: "IST0102",
            file: origin.file().to_string(),
            line: origin.line(),
            resource: Some(format!("Namespace {ns}")),
            field: None,
            message: format!(
                "The namespace is not enabled for Istio injection. Run 'kubectl label namespace {ns} \
                 istio-injection=enabled' to enable it, or 'kubectl label namespace {ns} \
                 istio-injection=disabled' to explicitly mark it as not needing injection. \
                 Security policies in {ns} are not enforced on workloads without a sidecar{assumed}"
            ),
        });
    }
}

fn pod_missing_proxy(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let root = cfg.mesh.root_namespace.as_str();
    for wl in cfg.workloads.iter().filter(|w| !w.sidecar) {
        let ambient = is_ambient(&wl.labels)
            || cfg
                .namespaces
                .get(&wl.namespace)
                .is_some_and(|n| is_ambient(&n.labels));
        if ambient {
            continue;
        }
        // Mesh-wide policies select every pod in the cluster; only policies aimed at this
        // workload (its namespace, or a root-namespace selector) make the missing proxy news.
        let aims = |ns: &str, sel: Option<&WorkloadSelector>| {
            let has_labels = sel.is_some_and(|s| !s.match_labels.is_empty());
            (ns == wl.namespace || (ns == root && has_labels)) && selects(sel, &wl.labels)
        };
        let mut names = Vec::new();
        for p in &cfg.authorization_policies {
            if !p.spec.has_target_refs() && aims(p.namespace(), p.spec.selector.as_ref()) {
                names.push(p.display());
            }
        }
        for p in &cfg.request_authentications {
            if !p.spec.has_target_refs() && aims(p.namespace(), p.spec.selector.as_ref()) {
                names.push(p.display());
            }
        }
        for p in &cfg.peer_authentications {
            if p.namespace() == wl.namespace && selects(p.spec.selector.as_ref(), &wl.labels) {
                names.push(p.display());
            }
        }
        if names.is_empty() {
            continue;
        }
        out.push(workload_diag(
            wl,
            Severity::Warning,
            "IST0103",
            format!(
                "The pod {} is missing the Istio proxy, so nothing enforces {} on it: \
                 enable injection and restart or redeploy the workload",
                wl.id(),
                short_list(&names)
            ),
        ));
    }
}

// ------------------------------------------------------------------ WRD0101

/// Whether an enforced policy can turn away a request that carries no token.
fn requires_token(p: &Resource<AuthorizationPolicySpec>) -> bool {
    if is_dry_run(&p.meta) || !matches!(p.spec.action, Action::Allow | Action::Deny) {
        return false;
    }
    rules(p).any(|(_, _, rule)| {
        sources(rule)
            .any(|(_, s)| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
            || conditions(rule).any(|(_, c)| c.key.starts_with("request.auth."))
    })
}

fn token_not_required(cfg: &Config, out: &mut Vec<Diagnostic>) {
    for ra in &cfg.request_authentications {
        if ra.spec.has_target_refs() {
            continue;
        }
        let open: Vec<String> = attached_workloads(cfg, ra.namespace(), ra.spec.selector.as_ref())
            .into_iter()
            .filter(|wl| {
                !scope::authorization_policies(cfg, wl)
                    .into_iter()
                    .any(requires_token)
            })
            .map(Workload::id)
            .collect();
        if open.is_empty() {
            continue;
        }
        let field = if ra.spec.jwt_rules.is_empty() {
            "spec"
        } else {
            "spec.jwtRules"
        };
        ra.reporter(out).push(
            Severity::Warning,
            "WRD0101",
            field,
            format!(
                "requests without a token are accepted: a RequestAuthentication only rejects invalid \
                 tokens, and no AuthorizationPolicy on {} requires one; add an ALLOW rule with \
                 from.source.requestPrincipals: [\"*\"] (or a DENY rule with notRequestPrincipals: [\"*\"])",
                short_list(&open)
            ),
        );
    }
}

// ------------------------------------------------------------------ WRD0102

const IDENTITY_FIELDS: [&str; 4] = [
    "principals",
    "namespaces",
    "serviceAccounts",
    "trustDomains",
];
const IDENTITY_KEYS: [&str; 4] = [
    "source.principal",
    "source.namespace",
    "source.serviceAccount",
    "source.trustDomain",
];

/// Ports of a workload that accept plaintext, with the mode that decided each; `None` as the
/// port when the workload declares no ports and its workload-wide mode accepts plaintext.
fn plaintext_ports(cfg: &Config, wl: &Workload, rule: &Rule) -> Vec<(Option<u16>, String)> {
    let pa = scope::peer_authentication(cfg, wl);
    let accepts = |m: MtlsMode| matches!(m, MtlsMode::Permissive | MtlsMode::Disable);
    let mut ports: BTreeSet<u16> = wl
        .ports
        .iter()
        .map(|p| p.container_port)
        .filter(|p| *p != 0)
        .collect();
    ports.extend(pa.ports.keys().copied());
    if ports.is_empty() {
        return if accepts(pa.base.mode) {
            vec![(None, pa.base.describe())]
        } else {
            Vec::new()
        };
    }
    ports
        .into_iter()
        .filter(|p| rule_covers_port(rule, *p))
        .filter_map(|p| {
            let m = pa.mode_for(p);
            accepts(m.mode).then(|| (Some(p), m.describe()))
        })
        .collect()
}

fn identity_on_plaintext(cfg: &Config, out: &mut Vec<Diagnostic>) {
    for p in &cfg.authorization_policies {
        if is_dry_run(&p.meta) || !matches!(p.spec.action, Action::Allow | Action::Deny) {
            continue;
        }
        let workloads = ap_workloads(cfg, p);
        if workloads.is_empty() {
            continue;
        }
        let mut r = p.reporter(out);
        for (_, base, rule) in rules(p) {
            let mut fields: Vec<(String, &str)> = Vec::new();
            for (j, s) in sources(rule) {
                for (json, _, values) in source_fields(s) {
                    if IDENTITY_FIELDS.contains(&json) && !values.is_empty() {
                        fields.push((format!("{base}.from[{j}].source.{json}"), json));
                    }
                }
            }
            for (j, c) in conditions(rule) {
                if IDENTITY_KEYS.contains(&c.key.as_str()) && !c.values.is_empty() {
                    fields.push((format!("{base}.when[{j}].key"), c.key.as_str()));
                }
            }
            if fields.is_empty() {
                continue;
            }
            let mut open = Vec::new();
            for wl in &workloads {
                for (port, mode) in plaintext_ports(cfg, wl, rule) {
                    open.push(match port {
                        Some(n) => format!("{} port {n} ({mode})", wl.id()),
                        None => format!("{} all ports ({mode})", wl.id()),
                    });
                }
            }
            if open.is_empty() {
                continue;
            }
            for (field, name) in fields {
                let consequence = if p.spec.action == Action::Deny {
                    "a plaintext client carries no identity, never matches this DENY rule and so \
                     bypasses it; require STRICT mTLS on these ports"
                } else {
                    "plaintext clients never match this rule, and nothing forces clients to use \
                     mTLS; require STRICT mTLS on these ports so the identity check cannot be sidestepped"
                };
                r.push(
                    Severity::Warning,
                    "WRD0102",
                    &field,
                    format!(
                        "{name} is only known for mTLS connections, but plaintext is accepted on {}: {consequence}",
                        short_list(&open)
                    ),
                );
            }
        }
    }
}

// ------------------------------------------------------------------ WRD0103

/// Container ports of a workload that a Service declares as TCP (not HTTP), with the reason.
fn tcp_ports(cfg: &Config, wl: &Workload) -> BTreeMap<u16, String> {
    let mut out = BTreeMap::new();
    for s in cfg.services_selecting(wl) {
        for sp in &s.spec.ports {
            let Some((Protocol::Tcp, why)) =
                declared_protocol(sp.name.as_deref(), sp.app_protocol.as_deref())
            else {
                continue;
            };
            let target = wl.target_port(sp).unwrap_or(0);
            if target != 0 {
                out.entry(target)
                    .or_insert_with(|| format!("{why} of Service {}/{}", s.namespace(), s.name()));
            }
        }
    }
    out
}

/// `(field path, name)` of every HTTP-only constraint in a rule.
fn http_only_fields(base: &str, rule: &Rule) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for (j, s) in sources(rule) {
        for (json, values) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
        ] {
            if !values.is_empty() {
                v.push((format!("{base}.from[{j}].source.{json}"), json.to_string()));
            }
        }
    }
    for (j, o) in operations(rule) {
        for (json, _, values) in operation_fields(o) {
            if !values.is_empty() && !matches!(json, "ports" | "notPorts") {
                v.push((format!("{base}.to[{j}].operation.{json}"), json.to_string()));
            }
        }
    }
    for (j, c) in conditions(rule) {
        if is_http_only_key(&c.key) {
            v.push((format!("{base}.when[{j}].key"), c.key.clone()));
        }
    }
    v
}

/// Whether anything besides HTTP-only fields and ports constrains the rule on TCP.
fn has_other_tcp_constraints(rule: &Rule) -> bool {
    sources(rule).any(|(_, s)| {
        source_fields(s)
            .iter()
            .any(|(json, _, v)| !v.is_empty() && !json.contains("equestPrincipals"))
    }) || conditions(rule).any(|(_, c)| !is_http_only_key(&c.key) && c.key != "destination.port")
}

fn http_fields_on_tcp(cfg: &Config, out: &mut Vec<Diagnostic>) {
    for p in &cfg.authorization_policies {
        if is_dry_run(&p.meta) || !matches!(p.spec.action, Action::Allow | Action::Deny) {
            continue;
        }
        let workloads: Vec<(&Workload, BTreeMap<u16, String>)> = ap_workloads(cfg, p)
            .into_iter()
            .map(|w| (w, tcp_ports(cfg, w)))
            .filter(|(_, t)| !t.is_empty())
            .collect();
        if workloads.is_empty() {
            continue;
        }
        let mut r = p.reporter(out);
        for (_, base, rule) in rules(p) {
            let fields = http_only_fields(&base, rule);
            let Some((first, _)) = fields.first() else {
                continue;
            };
            let mut hit = Vec::new();
            for (wl, ports) in &workloads {
                for (port, why) in ports {
                    if rule_covers_port(rule, *port) {
                        hit.push(format!("port {port} of {} ({why})", wl.id()));
                    }
                }
            }
            if hit.is_empty() {
                continue;
            }
            let names: Vec<&str> = fields
                .iter()
                .map(|(_, n)| n.as_str())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let message = if p.spec.action == Action::Allow {
                format!(
                    "rule dropped for TCP: {} are HTTP-only, and {} is TCP, so this rule allows nothing \
                     there; connections to those ports are denied unless another ALLOW rule matches them",
                    names.join(", "),
                    short_list(&hit)
                )
            } else {
                let scope = if has_other_tcp_constraints(rule) {
                    ", if its other conditions match"
                } else {
                    ""
                };
                format!(
                    "field ignored on TCP: {} are HTTP-only and dropped for TCP, so the rule denies every \
                     connection to {}{scope}",
                    names.join(", "),
                    short_list(&hit)
                )
            };
            r.push(Severity::Warning, "WRD0103", first, message);
        }
    }
}

// ------------------------------------------------------------------ WRD0104

fn pa_mode(p: &Resource<PeerAuthenticationSpec>) -> MtlsMode {
    p.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
}

fn is_ns_wide(p: &Resource<PeerAuthenticationSpec>) -> bool {
    p.spec
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty())
}

fn permissive_mesh(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let anything = !cfg.workloads.is_empty()
        || !cfg.peer_authentications.is_empty()
        || !cfg.authorization_policies.is_empty()
        || !cfg.request_authentications.is_empty();
    if !anything {
        return;
    }
    let root = cfg.mesh.root_namespace.as_str();
    let sorted = scope::sorted_peer_authentications(cfg);
    let mesh = sorted
        .iter()
        .copied()
        .find(|p| p.namespace() == root && is_ns_wide(p));
    let mesh_mode = mesh.map(pa_mode).unwrap_or_default();
    if mesh_mode == MtlsMode::Strict {
        return;
    }
    let strict_elsewhere: Vec<&Resource<PeerAuthenticationSpec>> = sorted
        .iter()
        .copied()
        .filter(|p| {
            !mesh.is_some_and(|m| std::ptr::eq(m, *p))
                && (pa_mode(p) == MtlsMode::Strict
                    || p.spec
                        .port_level_mtls
                        .iter()
                        .flatten()
                        .any(|(_, m)| m.as_ref().is_some_and(|m| m.mode == MtlsMode::Strict)))
        })
        .collect();
    let (severity, extra) = if strict_elsewhere.is_empty() {
        (Severity::Info, String::new())
    } else {
        let names: Vec<String> = strict_elsewhere.iter().map(|p| p.display()).collect();
        (
            Severity::Warning,
            format!(
                "; STRICT is set only by {}, so every other namespace and workload still accepts plaintext",
                short_list(&names)
            ),
        )
    };
    let mode_text = match (mesh, mesh_mode) {
        (Some(m), MtlsMode::Unset) => format!("the mesh-wide PeerAuthentication {} leaves the mode UNSET (PERMISSIVE)", m.display()),
        (Some(m), mode) => format!("the mesh-wide PeerAuthentication {} sets {}", m.display(), mode.as_str()),
        (None, _) => format!(
            "there is no PeerAuthentication without a selector in the root namespace {root}, so the default PERMISSIVE applies"
        ),
    };
    let message = format!("mTLS is not required mesh-wide: {mode_text}{extra}");
    match (mesh, strict_elsewhere.first()) {
        (Some(m), _) => {
            let field = if m.spec.mtls.is_some() {
                "spec.mtls.mode"
            } else {
                "spec"
            };
            m.reporter(out).push(severity, "WRD0104", field, message);
        }
        (None, Some(p)) => p.reporter(out).push(severity, "WRD0104", "", message),
        (None, None) => out.push(mesh_diagnostic(cfg, severity, "WRD0104", "", message)),
    }
}

// ------------------------------------------------------------------ WRD0105

fn spiffe_prefix(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let bad = |v: &str| {
        v.get(..9)
            .is_some_and(|p| p.eq_ignore_ascii_case("spiffe://"))
    };
    for p in &cfg.authorization_policies {
        let mut r = p.reporter(out);
        let mut report = |field: String, v: &str, negative: bool| {
            let effect = if negative {
                "this notPrincipals entry excludes nobody"
            } else {
                "this entry matches nobody"
            };
            let fixed = v.get(9..).unwrap_or("");
            r.push(
                Severity::Warning,
                "WRD0105",
                &field,
                format!(
                    "Istio matches principals against \"spiffe://<value>\", so \"{v}\" could only match a peer \
                     \"spiffe://{v}\" ({effect}); write \"{fixed}\""
                ),
            );
        };
        for (_, base, rule) in rules(p) {
            for (j, s) in sources(rule) {
                for (json, values, negative) in [
                    ("principals", &s.principals, false),
                    ("notPrincipals", &s.not_principals, true),
                ] {
                    for (k, v) in values.iter().enumerate() {
                        if bad(v) {
                            report(format!("{base}.from[{j}].source.{json}[{k}]"), v, negative);
                        }
                    }
                }
            }
            for (j, c) in conditions(rule) {
                if c.key != "source.principal" {
                    continue;
                }
                for (json, values, negative) in [
                    ("values", &c.values, false),
                    ("notValues", &c.not_values, true),
                ] {
                    for (k, v) in values.iter().enumerate() {
                        if bad(v) {
                            report(format!("{base}.when[{j}].{json}[{k}]"), v, negative);
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ WRD0106

fn host_has_port(v: &str) -> bool {
    match v.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => v.contains(':'),
    }
}

fn hosts_without_port(cfg: &Config, out: &mut Vec<Diagnostic>) {
    for p in &cfg.authorization_policies {
        let mut r = p.reporter(out);
        for (_, base, rule) in rules(p) {
            for (j, o) in operations(rule) {
                for (json, values) in [("hosts", &o.hosts), ("notHosts", &o.not_hosts)] {
                    for (k, v) in values.iter().enumerate() {
                        // A prefix (`x*`) or `*` already matches any port.
                        if v.is_empty() || v.ends_with('*') || host_has_port(v) {
                            continue;
                        }
                        let with_port = format!("{}:", v.to_ascii_lowercase());
                        if values
                            .iter()
                            .any(|x| x.to_ascii_lowercase().starts_with(&with_port))
                        {
                            continue;
                        }
                        let fix = if v.starts_with('*') {
                            format!("also list the ports clients use, e.g. \"{v}:443\"")
                        } else {
                            format!("also list \"{v}:*\"")
                        };
                        r.push(
                            Severity::Warning,
                            "WRD0106",
                            &format!("{base}.to[{j}].operation.{json}[{k}]"),
                            format!(
                                "\"{v}\" does not match a Host header that carries a port (\"{}:8080\"): Istio \
                                 compares the whole header, port included; {fix}",
                                v.strip_prefix('*').map_or_else(|| v.clone(), |rest| format!("x{rest}"))
                            ),
                        );
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ WRD0107

fn unmerged_slashes(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let norm = cfg.mesh.path_normalization;
    if norm.merges_slashes() {
        return;
    }
    let name = match norm {
        Normalization::None => "NONE (no normalization at all)",
        _ => "BASE (the default), which does not merge slashes",
    };
    for p in &cfg.authorization_policies {
        if is_dry_run(&p.meta) {
            continue;
        }
        let mut r = p.reporter(out);
        for (_, base, rule) in rules(p) {
            for (j, o) in operations(rule) {
                let (json, values, effect) = match p.spec.action {
                    Action::Deny => ("paths", &o.paths, "bypasses this DENY rule"),
                    Action::Custom => (
                        "paths",
                        &o.paths,
                        "is never sent to the external authorizer",
                    ),
                    Action::Allow => ("notPaths", &o.not_paths, "is allowed by this rule"),
                    Action::Audit => continue,
                };
                // Suffix patterns (`*x`, `*`) still match whatever precedes them.
                let Some(v) = values.iter().find(|v| !v.is_empty() && !v.starts_with('*')) else {
                    continue;
                };
                let sample = if v.starts_with('/') {
                    format!("/{}", v.trim_end_matches('*'))
                } else {
                    format!("//{}", v.trim_end_matches('*'))
                };
                r.push(
                    Severity::Warning,
                    "WRD0107",
                    &format!("{base}.to[{j}].operation.{json}"),
                    format!(
                        "meshConfig.pathNormalization is {name}: a request for \"{sample}\" does not match \
                         \"{v}\" and {effect}; set pathNormalization to MERGE_SLASHES or DECODE_AND_MERGE_SLASHES"
                    ),
                );
            }
        }
    }
}

// ------------------------------------------------------------------ WRD0108 / WRD0110

fn ignored_peer_authentications(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let root = cfg.mesh.root_namespace.as_str();
    for (ignored, kept) in scope::ignored_namespace_peer_authentications(cfg) {
        let level = if ignored.namespace() == root {
            "mesh-wide"
        } else {
            "namespace-wide"
        };
        ignored.reporter(out).push(
            Severity::Warning,
            "WRD0108",
            "metadata.name",
            format!(
                "Istio ignores this {level} PeerAuthentication: only the oldest one without a selector in a \
                 namespace applies, and {} (mode {}) is in force; merge the two",
                kept.display(),
                pa_mode(kept).as_str()
            ),
        );
    }
}

fn root_selector_peer_authentications(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let root = cfg.mesh.root_namespace.as_str();
    for p in &cfg.peer_authentications {
        if p.namespace() == root && !is_ns_wide(p) {
            p.reporter(out).push(
                Severity::Warning,
                "WRD0110",
                "spec.selector",
                format!(
                    "Istio ignores PeerAuthentications with a selector in the root namespace {root}; \
                     create it in the namespace of the workloads it should select"
                ),
            );
        }
    }
}

// ------------------------------------------------------------------ WRD0109

/// The one field set in an entry, if exactly one is; `not` forms count as their own kind.
fn single_field<'a>(
    fields: impl Iterator<Item = (&'static str, &'a [String])>,
) -> Option<&'static str> {
    let mut set = fields.filter(|(_, v)| !v.is_empty()).map(|(n, _)| n);
    let first = set.next()?;
    set.next().is_none().then_some(first)
}

fn split_from_to(cfg: &Config, out: &mut Vec<Diagnostic>) {
    for p in &cfg.authorization_policies {
        let mut r = p.reporter(out);
        for (_, base, rule) in rules(p) {
            let froms: Vec<Option<&'static str>> = rule
                .from
                .iter()
                .flatten()
                .map(|f| {
                    f.as_ref().and_then(|f| f.source.as_ref()).and_then(|s| {
                        single_field(source_fields(s).into_iter().map(|(n, _, v)| (n, v)))
                    })
                })
                .collect();
            let tos: Vec<Option<&'static str>> = rule
                .to
                .iter()
                .flatten()
                .map(|t| {
                    t.as_ref().and_then(|t| t.operation.as_ref()).and_then(|o| {
                        single_field(operation_fields(o).into_iter().map(|(n, _, v)| (n, v)))
                    })
                })
                .collect();
            for (side, inner, entries) in [("from", "source", froms), ("to", "operation", tos)] {
                if entries.len() < 2 || entries.iter().any(Option::is_none) {
                    continue;
                }
                let kinds: BTreeSet<&str> = entries.iter().flatten().copied().collect();
                if kinds.len() < 2 {
                    continue;
                }
                let described: Vec<String> = entries
                    .iter()
                    .enumerate()
                    .map(|(j, k)| format!("{side}[{j}] only {}", k.unwrap_or("")))
                    .collect();
                r.push(
                    Severity::Warning,
                    "WRD0109",
                    &format!("{base}.{side}"),
                    format!(
                        "each `{side}` entry is an alternative (OR), not an extra condition: {} — a request \
                         matching any one entry matches; to require all of them, put the fields in one {inner}",
                        described.join(", ")
                    ),
                );
            }
        }
    }
}

/// A rule with only `from` next to a rule with only `to`: each rule is an alternative, so the
/// `to` rule applies to every source (and the `from` rule to every operation). Usually one
/// rule with both was meant.
fn split_across_rules(cfg: &Config, out: &mut Vec<Diagnostic>) {
    // (has from, has to, has when)
    let shape = |r: &Rule| {
        (
            sources(r).next().is_some(),
            operations(r).next().is_some(),
            conditions(r).next().is_some(),
        )
    };
    for p in &cfg.authorization_policies {
        let all: Vec<(usize, &Rule)> = rules(p).map(|(i, _, r)| (i, r)).collect();
        let only_from = all.iter().find(|(_, r)| shape(r) == (true, false, false));
        let only_to = all.iter().find(|(_, r)| shape(r) == (false, true, false));
        let (Some((f, _)), Some((t, _))) = (only_from, only_to) else {
            continue;
        };
        let effect = match p.spec.action {
            Action::Allow => "allows",
            Action::Deny => "denies",
            Action::Audit => "audits",
            Action::Custom => "sends to the provider",
        };
        p.reporter(out).push(
            Severity::Warning,
            "WRD0109",
            "spec.rules",
            format!(
                "rules[{f}] has only `from` and rules[{t}] only `to`: each rule is an alternative \
                 (OR), so this policy {effect} rules[{t}]'s operations from every source and \
                 anything from rules[{f}]'s sources; to require both, put `from` and `to` in one rule"
            ),
        );
    }
}

// ------------------------------------------------------------------ WRD0112

/// CUSTOM policies Istio enforces as DENY: the provider is unusable, or a workload has more
/// than one CUSTOM provider. Either way everything they match gets 403.
fn refused_custom(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let enforced_custom = |p: &Resource<AuthorizationPolicySpec>| {
        p.spec.action == Action::Custom && !is_dry_run(&p.meta) && !p.spec.has_target_refs()
    };
    // Policy (namespace, name) → reason → workloads; the engine decides, per workload.
    let mut refused: BTreeMap<(String, String), BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for wl in &cfg.workloads {
        let attached = scope::authorization_policies(cfg, wl);
        if !attached.iter().any(|p| enforced_custom(p)) {
            continue;
        }
        let compiled = CompiledAuthz::compile(&attached, &cfg.mesh, wl);
        for info in &compiled.policies {
            if let (Action::Custom, false, Some(why)) =
                (info.action, info.dry_run, &info.bad_custom)
            {
                refused
                    .entry((info.namespace.clone(), info.name.clone()))
                    .or_default()
                    .entry(why.clone())
                    .or_default()
                    .push(wl.id());
            }
        }
    }
    for p in &cfg.authorization_policies {
        if !enforced_custom(p) {
            continue;
        }
        let name = p.spec.provider.as_ref().map_or("", |x| x.name.as_str());
        // A missing provider name is a validation error already.
        if name.is_empty() {
            continue;
        }
        let mut reasons = refused
            .remove(&(p.namespace().to_string(), p.name().to_string()))
            .unwrap_or_default();
        // An unusable provider is a problem even when no workload in the input is selected.
        if let Some(why) = custom_provider_problem(&cfg.mesh, name) {
            reasons.entry(why).or_default();
        }
        for (why, workloads) in reasons {
            let on = if workloads.is_empty() {
                "every workload it selects".to_string()
            } else {
                short_list(&workloads)
            };
            p.reporter(out).push(
                Severity::Warning,
                "WRD0112",
                "spec.provider.name",
                format!(
                    "this CUSTOM policy cannot use provider \"{name}\" ({why}): Istio enforces its rules \
                     as DENY instead, so every request they match on {on} gets 403"
                ),
            );
        }
    }
}

// ------------------------------------------------------------------ WRD0113

fn envoy_filter_keys(cfg: &Config, out: &mut Vec<Diagnostic>) {
    for p in &cfg.authorization_policies {
        let effect = match p.spec.action {
            Action::Allow => "so this rule allows nothing",
            Action::Deny => "so this rule never denies",
            Action::Audit => "so this rule never audits",
            Action::Custom => "so this rule never reaches the provider",
        };
        let mut r = p.reporter(out);
        for (_, base, rule) in rules(p) {
            for (j, c) in conditions(rule) {
                if c.key.starts_with("experimental.envoy.filters.") {
                    r.push(
                        Severity::Warning,
                        "WRD0113",
                        &format!("{base}.when[{j}].key"),
                        format!(
                            "Warden has no Envoy filter metadata: this condition never matches \
                             ({effect}); Istio matches {} against other Envoy filters' metadata",
                            c.key
                        ),
                    );
                }
            }
        }
    }
}

// ------------------------------------------------------------------ WRD0114

/// Service ports whose named `targetPort` is not a port name of a workload the Service
/// selects: Kubernetes has no endpoint port for that pod, so traffic to it goes nowhere.
fn unresolved_target_ports(cfg: &Config, out: &mut Vec<Diagnostic>) {
    for (si, s) in cfg.services.iter().enumerate() {
        for (k, sp) in s.spec.ports.iter().enumerate() {
            let Some(IntOrString::String(target)) = &sp.target_port else {
                continue;
            };
            let missing: Vec<String> = cfg
                .workloads
                .iter()
                .filter(|wl| {
                    cfg.services_selecting(wl)
                        .any(|x| std::ptr::eq(x, &cfg.services[si]))
                        && wl.target_port(sp).is_none()
                })
                .map(Workload::id)
                .collect();
            if missing.is_empty() {
                continue;
            }
            let port = match &sp.name {
                Some(n) if !n.is_empty() => format!("port {} (\"{n}\")", sp.port),
                _ => format!("port {}", sp.port),
            };
            s.reporter(out).push(
                Severity::Warning,
                "WRD0114",
                &format!("spec.ports[{k}].targetPort"),
                format!(
                    "targetPort \"{target}\" of {port} names no container port of {}: Kubernetes \
                     routes this Service port to no pod of {}, so connections to it fail; name the \
                     container port \"{target}\" or use a port number",
                    short_list(&missing),
                    if missing.len() == 1 { "it" } else { "them" }
                ),
            );
        }
    }
}

// ------------------------------------------------------------------ WRD0111

fn target_ref_policies(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let message =
        "this policy has targetRefs, so it applies only to the gateways and waypoints it \
                   names: sidecar workloads ignore it (use a selector to reach sidecars)";
    let field = |single: &Option<PolicyTargetReference>| {
        if single.is_some() {
            "spec.targetRef"
        } else {
            "spec.targetRefs"
        }
    };
    for p in &cfg.authorization_policies {
        if p.spec.has_target_refs() {
            p.reporter(out).push(
                Severity::Info,
                "WRD0111",
                field(&p.spec.target_ref),
                message.into(),
            );
        }
    }
    for p in &cfg.request_authentications {
        if p.spec.has_target_refs() {
            p.reporter(out).push(
                Severity::Info,
                "WRD0111",
                field(&p.spec.target_ref),
                message.into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Loader;

    /// Namespace `foo` (injected) with an HTTP workload `web` (port 8080) and a TCP workload
    /// `db` (port 5432), each behind a Service.
    const BASE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: foo
  labels: {istio-injection: enabled}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: foo}
spec:
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: c
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: db, namespace: foo}
spec:
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
      - name: c
        ports:
        - containerPort: 5432
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: foo}
spec:
  selector: {app: db}
  ports:
  - {name: tcp-db, port: 5432}
";

    const MESH_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
";

    fn ap(name: &str, ns: &str, spec: &str) -> String {
        let body: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
        )
    }

    fn kind(kind: &str, name: &str, ns: &str, spec: &str) -> String {
        ap(name, ns, spec).replace("kind: AuthorizationPolicy", &format!("kind: {kind}"))
    }

    fn run_with_mesh(docs: &[&str], mesh: Option<&str>) -> Vec<Diagnostic> {
        let mut l = Loader::new();
        l.add_text("t.yaml", &docs.join("---\n"));
        if let Some(m) = mesh {
            l.set_mesh_text("mesh.yaml", m);
        }
        let (cfg, diags) = l.finish();
        assert!(diags.is_empty(), "load diagnostics: {diags:?}");
        analyze(&cfg)
    }

    fn run(docs: &[&str]) -> Vec<Diagnostic> {
        run_with_mesh(docs, None)
    }

    fn with_code<'a>(d: &'a [Diagnostic], code: &str) -> Vec<&'a Diagnostic> {
        d.iter().filter(|x| x.code == code).collect()
    }

    fn expect_one<'a>(d: &'a [Diagnostic], code: &str) -> &'a Diagnostic {
        let found = with_code(d, code);
        assert_eq!(found.len(), 1, "expected one {code}, got {d:#?}");
        found[0]
    }

    fn expect_none(d: &[Diagnostic], code: &str) {
        let found = with_code(d, code);
        assert!(found.is_empty(), "expected no {code}, got {found:#?}");
    }

    #[test]
    fn ist0101_referenced_namespace() {
        let spec = |ns: &str| format!("rules:\n- from:\n  - source: {{namespaces: [{ns}]}}");
        let d = run(&[BASE, MESH_STRICT, &ap("p", "foo", &spec("bar"))]);
        let f = expect_one(&d, "IST0101");
        assert_eq!(f.severity, Severity::Error);
        assert_eq!(
            f.field.as_deref(),
            Some("spec.rules[0].from[0].source.namespaces[0]")
        );
        assert_eq!(f.message, "Referenced namespace not found: \"bar\"");
        for ok in ["FOO", "\"fo*\"", "\"*oo\"", "\"*\"", "istio-system"] {
            expect_none(
                &run(&[BASE, MESH_STRICT, &ap("p", "foo", &spec(ok))]),
                "IST0101",
            );
        }
        // No Namespace objects: nothing is known about which namespaces exist.
        expect_none(&run(&[&ap("p", "foo", &spec("bar"))]), "IST0101");
        let not = "rules:\n- from:\n  - source: {notNamespaces: [\"x*\"]}";
        let d = run(&[BASE, &ap("p", "foo", not)]);
        assert_eq!(
            expect_one(&d, "IST0101").field.as_deref(),
            Some("spec.rules[0].from[0].source.notNamespaces[0]")
        );
    }

    #[test]
    fn ist0127_no_matching_workloads() {
        let sel = |app: &str| format!("selector:\n  matchLabels: {{app: {app}}}\nrules: [{{}}]");
        let d = run(&[BASE, MESH_STRICT, &ap("p", "foo", &sel("nope"))]);
        let f = expect_one(&d, "IST0127");
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.message.contains("app=nope"), "{f}");
        expect_none(
            &run(&[BASE, MESH_STRICT, &ap("p", "foo", &sel("web"))]),
            "IST0127",
        );
        // Root-namespace selector policies match workloads anywhere.
        expect_none(
            &run(&[BASE, MESH_STRICT, &ap("p", "istio-system", &sel("web"))]),
            "IST0127",
        );
        expect_one(
            &run(&[BASE, MESH_STRICT, &ap("p", "istio-system", &sel("nope"))]),
            "IST0127",
        );
        // Namespace-wide policy in a namespace without workloads.
        let d = run(&[BASE, MESH_STRICT, &ap("p", "empty", "rules: [{}]")]);
        assert!(expect_one(&d, "IST0127")
            .message
            .contains("namespace empty has no workloads"));
        // RequestAuthentication and PeerAuthentication are Warden's extension.
        let ra = kind(
            "RequestAuthentication",
            "r",
            "foo",
            "selector:\n  matchLabels: {app: nope}",
        );
        let d = run(&[BASE, MESH_STRICT, &ra]);
        assert!(expect_one(&d, "IST0127")
            .message
            .contains("Warden extension"));
        let pa = kind(
            "PeerAuthentication",
            "pa",
            "foo",
            "selector:\n  matchLabels: {app: nope}\nmtls: {mode: STRICT}",
        );
        expect_one(&run(&[BASE, MESH_STRICT, &pa]), "IST0127");
        let pa_ok = kind(
            "PeerAuthentication",
            "pa",
            "foo",
            "selector:\n  matchLabels: {app: db}\nmtls: {mode: STRICT}",
        );
        expect_none(&run(&[BASE, MESH_STRICT, &pa_ok]), "IST0127");
        // Policy-only input: nothing is known about workloads.
        expect_none(&run(&[&ap("p", "foo", &sel("nope"))]), "IST0127");
    }

    const BAR_PLAIN: &str = "apiVersion: v1
kind: Namespace
metadata: {name: bar}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy, namespace: bar}
spec:
  template:
    metadata:
      labels: {app: legacy}
    spec:
      containers: [{name: c}]
";

    #[test]
    fn ist0102_and_ist0103_missing_sidecar() {
        let policy = ap(
            "p",
            "bar",
            "selector:\n  matchLabels: {app: legacy}\nrules: [{}]",
        );
        let d = run(&[BASE, MESH_STRICT, BAR_PLAIN, &policy]);
        let ns = expect_one(&d, "IST0102");
        assert_eq!(ns.severity, Severity::Info);
        assert_eq!(ns.resource.as_deref(), Some("Namespace bar"));
        let pod = expect_one(&d, "IST0103");
        assert_eq!(pod.severity, Severity::Warning);
        assert_eq!(pod.resource.as_deref(), Some("Deployment bar/legacy"));
        assert!(pod.message.contains("AuthorizationPolicy bar/p"), "{pod}");
        // Without policies aimed at it, a plain namespace is not worth a message.
        let d = run(&[BASE, MESH_STRICT, BAR_PLAIN]);
        expect_none(&d, "IST0102");
        expect_none(&d, "IST0103");
        // Injected namespaces and explicitly opted-out ones are fine.
        let d = run(&[BASE, MESH_STRICT, &ap("p", "foo", "rules: [{}]")]);
        expect_none(&d, "IST0102");
        expect_none(&d, "IST0103");
        let opted_out = BAR_PLAIN.replace(
            "metadata: {name: bar}",
            "metadata: {name: bar, labels: {istio-injection: disabled}}",
        );
        let d = run(&[BASE, MESH_STRICT, &opted_out, &policy]);
        expect_none(&d, "IST0102");
        expect_one(&d, "IST0103");
    }

    #[test]
    fn wrd0101_token_not_required() {
        let ra = kind(
            "RequestAuthentication",
            "r",
            "foo",
            "selector:\n  matchLabels: {app: web}\njwtRules:\n- issuer: https://issuer",
        );
        let d = run(&[BASE, MESH_STRICT, &ra]);
        let f = expect_one(&d, "WRD0101");
        assert_eq!(f.field.as_deref(), Some("spec.jwtRules"));
        assert!(f.message.contains("foo/web"), "{f}");
        let require = ap(
            "p",
            "foo",
            "selector:\n  matchLabels: {app: web}\nrules:\n- from:\n  - source: {requestPrincipals: [\"*\"]}",
        );
        expect_none(&run(&[BASE, MESH_STRICT, &ra, &require]), "WRD0101");
        let by_claim = ap(
            "p",
            "foo",
            "rules:\n- when:\n  - {key: \"request.auth.claims[iss]\", values: [\"https://issuer\"]}",
        );
        expect_none(&run(&[BASE, MESH_STRICT, &ra, &by_claim]), "WRD0101");
        // A dry-run policy enforces nothing.
        let dry = require.replace(
            "namespace: foo}",
            "namespace: foo, annotations: {istio.io/dry-run: \"true\"}}",
        );
        expect_one(&run(&[BASE, MESH_STRICT, &ra, &dry]), "WRD0101");
    }

    #[test]
    fn wrd0102_identity_with_plaintext() {
        let allow = ap(
            "p",
            "foo",
            "selector:\n  matchLabels: {app: web}\nrules:\n- from:\n  - source: {principals: [\"cluster.local/ns/a/sa/b\"]}",
        );
        let d = run(&[BASE, &allow]);
        let f = expect_one(&d, "WRD0102");
        assert_eq!(
            f.field.as_deref(),
            Some("spec.rules[0].from[0].source.principals")
        );
        assert!(f.message.contains("foo/web port 8080 (PERMISSIVE"), "{f}");
        expect_none(&run(&[BASE, MESH_STRICT, &allow]), "WRD0102");
        let deny = ap(
            "p",
            "foo",
            "action: DENY\nselector:\n  matchLabels: {app: web}\nrules:\n- when:\n  - {key: source.namespace, values: [evil]}",
        );
        let d = run(&[BASE, &deny]);
        let f = expect_one(&d, "WRD0102");
        assert_eq!(f.field.as_deref(), Some("spec.rules[0].when[0].key"));
        assert!(f.message.contains("bypasses"), "{f}");
        // A port-level DISABLE under a STRICT mesh still leaves that port open.
        let port_pa = kind(
            "PeerAuthentication",
            "pa",
            "foo",
            "selector:\n  matchLabels: {app: web}\nportLevelMtls:\n  8080: {mode: DISABLE}",
        );
        let d = run(&[BASE, MESH_STRICT, &port_pa, &allow]);
        assert!(expect_one(&d, "WRD0102").message.contains("DISABLE"));
        // Negative identity fields and IP-based rules are not affected.
        let not = ap(
            "p",
            "foo",
            "rules:\n- from:\n  - source: {notPrincipals: [a], ipBlocks: [10.0.0.0/8]}",
        );
        expect_none(&run(&[BASE, &not]), "WRD0102");
    }

    #[test]
    fn wrd0103_http_fields_on_tcp() {
        let allow = ap(
            "p",
            "foo",
            "selector:\n  matchLabels: {app: db}\nrules:\n- to:\n  - operation: {methods: [GET]}",
        );
        let d = run(&[BASE, MESH_STRICT, &allow]);
        let f = expect_one(&d, "WRD0103");
        assert_eq!(
            f.field.as_deref(),
            Some("spec.rules[0].to[0].operation.methods")
        );
        assert!(f.message.starts_with("rule dropped for TCP"), "{f}");
        assert!(f.message.contains("port 5432 of foo/db"), "{f}");
        let deny = ap(
            "p",
            "foo",
            "action: DENY\nrules:\n- to:\n  - operation: {paths: [/admin]}",
        );
        let d = run(&[BASE, MESH_STRICT, &deny]);
        let f = expect_one(&d, "WRD0103");
        assert!(f.message.starts_with("field ignored on TCP"), "{f}");
        assert!(
            f.message.contains("denies every connection to port 5432"),
            "{f}"
        );
        // HTTP ports are fine, and a port constraint that excludes the TCP port is fine.
        let web = allow.replace("app: db", "app: web");
        expect_none(&run(&[BASE, MESH_STRICT, &web]), "WRD0103");
        let scoped = ap(
            "p",
            "foo",
            "action: DENY\nrules:\n- to:\n  - operation: {paths: [/admin], ports: [\"8080\"]}",
        );
        expect_none(&run(&[BASE, MESH_STRICT, &scoped]), "WRD0103");
        let header = ap(
            "p",
            "foo",
            "action: DENY\nrules:\n- from:\n  - source: {namespaces: [x]}\n  when:\n  - {key: \"request.headers[x-a]\", values: [b]}",
        );
        let d = run(&[BASE, MESH_STRICT, &header]);
        let f = expect_one(&d, "WRD0103");
        assert_eq!(f.field.as_deref(), Some("spec.rules[0].when[0].key"));
        assert!(
            f.message.contains("request.headers[x-a] are HTTP-only"),
            "{f}"
        );
        assert!(
            f.message.contains("foo/db (Service port name \"tcp-db\" of Service foo/db), if its other conditions match"),
            "{f}"
        );
    }

    #[test]
    fn wrd0104_permissive_mesh() {
        let d = run(&[BASE]);
        let f = expect_one(&d, "WRD0104");
        assert_eq!(f.severity, Severity::Info);
        assert_eq!(f.file, crate::validate::MESH_FILE);
        let ns_strict = kind(
            "PeerAuthentication",
            "strict",
            "foo",
            "mtls: {mode: STRICT}",
        );
        let d = run(&[BASE, &ns_strict]);
        let f = expect_one(&d, "WRD0104");
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.message.contains("PeerAuthentication foo/strict"), "{f}");
        let mesh_permissive = MESH_STRICT.replace("STRICT", "PERMISSIVE");
        let d = run(&[BASE, &mesh_permissive]);
        let f = expect_one(&d, "WRD0104");
        assert_eq!(
            f.resource.as_deref(),
            Some("PeerAuthentication istio-system/default")
        );
        assert_eq!(f.field.as_deref(), Some("spec.mtls.mode"));
        expect_none(&run(&[BASE, MESH_STRICT]), "WRD0104");
        expect_none(&run(&[]), "WRD0104");
    }

    #[test]
    fn wrd0105_spiffe_prefix() {
        let p = ap(
            "p",
            "foo",
            "rules:\n- from:\n  - source: {principals: [\"spiffe://cluster.local/ns/a/sa/b\", \"cluster.local/ns/a/sa/c\"]}\n  when:\n  - {key: source.principal, notValues: [\"SPIFFE://x/ns/a/sa/b\"]}",
        );
        let d = run(&[MESH_STRICT, &p]);
        let found = with_code(&d, "WRD0105");
        assert_eq!(found.len(), 2, "{d:#?}");
        assert_eq!(
            found[0].field.as_deref(),
            Some("spec.rules[0].from[0].source.principals[0]")
        );
        assert!(
            found[0]
                .message
                .contains("write \"cluster.local/ns/a/sa/b\""),
            "{}",
            found[0]
        );
        assert_eq!(
            found[1].field.as_deref(),
            Some("spec.rules[0].when[0].notValues[0]")
        );
        assert!(found[1]
            .message
            .contains("notPrincipals entry excludes nobody"));
        let ok = ap(
            "p",
            "foo",
            "rules:\n- from:\n  - source: {principals: [\"cluster.local/ns/a/sa/b\"]}",
        );
        expect_none(&run(&[MESH_STRICT, &ok]), "WRD0105");
    }

    #[test]
    fn wrd0106_hosts_without_port() {
        let p = ap(
            "p",
            "foo",
            "action: DENY\nrules:\n- to:\n  - operation: {hosts: [example.com, \"*.example.org\", \"a.com\", \"a.com:*\", \"b.com:8080\", \"c.*\", \"[::1]\"]}",
        );
        let d = run(&[MESH_STRICT, &p]);
        let found = with_code(&d, "WRD0106");
        let fields: Vec<&str> = found.iter().filter_map(|f| f.field.as_deref()).collect();
        assert_eq!(
            fields,
            [
                "spec.rules[0].to[0].operation.hosts[0]",
                "spec.rules[0].to[0].operation.hosts[1]",
                "spec.rules[0].to[0].operation.hosts[6]",
            ],
            "{d:#?}"
        );
        assert!(found[0].message.contains("also list \"example.com:*\""));
        assert!(found[1].message.contains("\"*.example.org:443\""));
        assert!(
            found[1].message.contains("(\"x.example.org:8080\")"),
            "{}",
            found[1]
        );
        let ok = ap(
            "p",
            "foo",
            "rules:\n- to:\n  - operation: {notHosts: [example.com, \"EXAMPLE.com:*\"]}",
        );
        expect_none(&run(&[MESH_STRICT, &ok]), "WRD0106");
    }

    #[test]
    fn wrd0107_unmerged_slashes() {
        let deny = ap(
            "p",
            "foo",
            "action: DENY\nrules:\n- to:\n  - operation: {paths: [/admin, \"*.php\"]}",
        );
        let d = run(&[MESH_STRICT, &deny]);
        let f = expect_one(&d, "WRD0107");
        assert_eq!(
            f.field.as_deref(),
            Some("spec.rules[0].to[0].operation.paths")
        );
        assert!(f.message.contains("\"//admin\""), "{f}");
        let allow = ap(
            "p",
            "foo",
            "rules:\n- to:\n  - operation: {notPaths: [\"/admin*\"]}",
        );
        let d = run_with_mesh(
            &[MESH_STRICT, &allow],
            Some("pathNormalization: {normalization: NONE}"),
        );
        assert!(expect_one(&d, "WRD0107").message.contains("NONE"));
        let merged = Some("pathNormalization: {normalization: MERGE_SLASHES}");
        expect_none(&run_with_mesh(&[MESH_STRICT, &deny], merged), "WRD0107");
        // ALLOW on paths fails closed, suffix patterns cannot be bypassed this way.
        let allow_paths = ap(
            "p",
            "foo",
            "rules:\n- to:\n  - operation: {paths: [/admin]}",
        );
        expect_none(&run(&[MESH_STRICT, &allow_paths]), "WRD0107");
        let suffix = ap(
            "p",
            "foo",
            "action: DENY\nrules:\n- to:\n  - operation: {paths: [\"*.php\"]}",
        );
        expect_none(&run(&[MESH_STRICT, &suffix]), "WRD0107");
    }

    #[test]
    fn wrd0108_ignored_namespace_peer_authentication() {
        let a = kind("PeerAuthentication", "a", "foo", "mtls: {mode: STRICT}");
        let b = kind("PeerAuthentication", "b", "foo", "mtls: {mode: DISABLE}");
        let d = run(&[MESH_STRICT, &b, &a]);
        let f = expect_one(&d, "WRD0108");
        assert_eq!(f.resource.as_deref(), Some("PeerAuthentication foo/b"));
        assert!(
            f.message
                .contains("PeerAuthentication foo/a (mode STRICT) is in force"),
            "{f}"
        );
        expect_none(&run(&[MESH_STRICT, &a]), "WRD0108");
    }

    #[test]
    fn wrd0109_split_from_to() {
        let split = ap(
            "p",
            "foo",
            "rules:\n- from:\n  - source: {principals: [a]}\n  - source: {namespaces: [b]}",
        );
        let d = run(&[MESH_STRICT, &split]);
        let f = expect_one(&d, "WRD0109");
        assert_eq!(f.field.as_deref(), Some("spec.rules[0].from"));
        assert!(
            f.message
                .contains("from[0] only principals, from[1] only namespaces"),
            "{f}"
        );
        let to_split = ap(
            "p",
            "foo",
            "rules:\n- to:\n  - operation: {methods: [GET]}\n  - operation: {paths: [/a]}",
        );
        assert_eq!(
            expect_one(&run(&[MESH_STRICT, &to_split]), "WRD0109")
                .field
                .as_deref(),
            Some("spec.rules[0].to")
        );
        for ok in [
            "rules:\n- from:\n  - source: {principals: [a], namespaces: [b]}",
            "rules:\n- from:\n  - source: {principals: [a]}\n  - source: {principals: [b]}",
            "rules:\n- from:\n  - source: {principals: [a]}\n  - source: {namespaces: [b], ipBlocks: [1.2.3.4]}",
        ] {
            expect_none(&run(&[MESH_STRICT, &ap("p", "foo", ok)]), "WRD0109");
        }
    }

    #[test]
    fn wrd0109_split_across_rules() {
        let split = ap(
            "p",
            "foo",
            "rules:\n- from:\n  - source: {namespaces: [bar]}\n- to:\n  - operation: {paths: [/admin]}",
        );
        let d = run(&[MESH_STRICT, &split]);
        let f = expect_one(&d, "WRD0109");
        assert_eq!(f.field.as_deref(), Some("spec.rules"));
        assert!(
            f.message
                .contains("rules[0] has only `from` and rules[1] only `to`"),
            "{f}"
        );
        assert!(
            f.message
                .contains("allows rules[1]'s operations from every source"),
            "{f}"
        );
        let deny = split.replace("spec:\n", "spec:\n  action: DENY\n");
        assert!(expect_one(&run(&[MESH_STRICT, &deny]), "WRD0109")
            .message
            .contains("denies"));
        for ok in [
            // One rule with both: AND, as meant.
            "rules:\n- from:\n  - source: {namespaces: [bar]}\n  to:\n  - operation: {paths: [/admin]}",
            // Two rules of the same shape, or a `to` rule that is otherwise constrained.
            "rules:\n- from:\n  - source: {namespaces: [bar]}\n- from:\n  - source: {namespaces: [baz]}",
            "rules:\n- from:\n  - source: {namespaces: [bar]}\n- to:\n  - operation: {paths: [/admin]}\n  when:\n  - {key: source.ip, values: [10.0.0.1]}",
        ] {
            expect_none(&run(&[MESH_STRICT, &ap("p", "foo", ok)]), "WRD0109");
        }
    }

    const PROVIDERS: &str = "extensionProviders:
- {name: ext-a, envoyExtAuthzHttp: {service: a.foo.svc.cluster.local, port: 8000}}
- {name: ext-b, envoyExtAuthzGrpc: {service: b.foo.svc.cluster.local, port: 9000}}
- {name: bad, envoyExtAuthzHttp: {service: c.foo.svc.cluster.local, port: 8000, headersToUpstreamOnAllow: [\"*\"]}}
";

    fn custom(name: &str, provider: &str, app: &str) -> String {
        ap(
            name,
            "foo",
            &format!("action: CUSTOM\nprovider: {{name: {provider}}}\nselector:\n  matchLabels: {{app: {app}}}\nrules:\n- to:\n  - operation: {{paths: [/x]}}"),
        )
    }

    #[test]
    fn wrd0112_refused_custom() {
        // One usable provider per workload: fine.
        let a_web = custom("a", "ext-a", "web");
        let b_db = custom("b", "ext-b", "db");
        expect_none(
            &run_with_mesh(&[BASE, MESH_STRICT, &a_web, &b_db], Some(PROVIDERS)),
            "WRD0112",
        );
        // Two providers on web: both policies are refused there, and say where.
        let b_web = custom("b", "ext-b", "web");
        let d = run_with_mesh(&[BASE, MESH_STRICT, &a_web, &b_web], Some(PROVIDERS));
        let found = with_code(&d, "WRD0112");
        assert_eq!(found.len(), 2, "{d:#?}");
        for f in &found {
            assert_eq!(f.severity, Severity::Warning);
            assert_eq!(f.field.as_deref(), Some("spec.provider.name"));
            assert!(f.message.contains("found ext-a, ext-b"), "{f}");
            assert!(f.message.contains("on foo/web gets 403"), "{f}");
        }
        // A dry-run CUSTOM policy never reaches a provider, so it does not count.
        let b_dry = b_web.replace(
            "namespace: foo}",
            "namespace: foo, annotations: {istio.io/dry-run: \"true\"}}",
        );
        expect_none(
            &run_with_mesh(&[BASE, MESH_STRICT, &a_web, &b_dry], Some(PROVIDERS)),
            "WRD0112",
        );
        // An unusable or unknown provider.
        for (provider, why) in [
            ("bad", "a lone \"*\""),
            ("nope", "not defined in meshConfig.extensionProviders"),
        ] {
            let d = run_with_mesh(
                &[BASE, MESH_STRICT, &custom("c", provider, "db")],
                Some(PROVIDERS),
            );
            let f = expect_one(&d, "WRD0112");
            assert!(f.message.contains(why), "{f}");
            assert!(f.message.contains("on foo/db gets 403"), "{f}");
        }
        // No workloads in the input: the bad provider is still reported.
        let d = run_with_mesh(&[MESH_STRICT, &custom("c", "nope", "db")], Some(PROVIDERS));
        assert!(expect_one(&d, "WRD0112")
            .message
            .contains("every workload it selects"));
    }

    #[test]
    fn wrd0113_envoy_filter_keys() {
        let p = ap(
            "p",
            "foo",
            "rules:\n- when:\n  - {key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\", values: [\"[update]\"]}",
        );
        let d = run(&[MESH_STRICT, &p]);
        let f = expect_one(&d, "WRD0113");
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(f.field.as_deref(), Some("spec.rules[0].when[0].key"));
        assert!(
            f.message
                .starts_with("Warden has no Envoy filter metadata: this condition never matches"),
            "{f}"
        );
        assert!(f.message.contains("allows nothing"), "{f}");
        let ok = ap(
            "p",
            "foo",
            "rules:\n- when:\n  - {key: \"request.headers[x-envoy-filters]\", values: [a]}",
        );
        expect_none(&run(&[MESH_STRICT, &ok]), "WRD0113");
    }

    #[test]
    fn wrd0114_unresolved_target_port() {
        let named = |target: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web2, namespace: foo}}\nspec:\n  selector: {{app: web}}\n  ports:\n  - {{name: http, port: 80, targetPort: {target}}}\n"
            )
        };
        let with_name = BASE.replace(
            "        - containerPort: 8080",
            "        - containerPort: 8080\n          name: web-http",
        );
        let d = run(&[&with_name, MESH_STRICT, &named("nope")]);
        let f = expect_one(&d, "WRD0114");
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(f.resource.as_deref(), Some("Service foo/web2"));
        assert_eq!(f.field.as_deref(), Some("spec.ports[0].targetPort"));
        assert!(
            f.message.contains(
                "targetPort \"nope\" of port 80 (\"http\") names no container port of foo/web"
            ),
            "{f}"
        );
        for ok in ["web-http", "8080"] {
            expect_none(&run(&[&with_name, MESH_STRICT, &named(ok)]), "WRD0114");
        }
        // A Service selecting no workload routes nowhere for another reason (not this check).
        let other = named("nope").replace("app: web", "app: nobody");
        expect_none(&run(&[&with_name, MESH_STRICT, &other]), "WRD0114");
    }

    #[test]
    fn wrd0110_root_selector_peer_authentication() {
        let root = kind(
            "PeerAuthentication",
            "pa",
            "istio-system",
            "selector:\n  matchLabels: {app: web}\nmtls: {mode: STRICT}",
        );
        let d = run(&[MESH_STRICT, &root]);
        assert_eq!(
            expect_one(&d, "WRD0110").field.as_deref(),
            Some("spec.selector")
        );
        let in_ns = root.replace("namespace: istio-system", "namespace: foo");
        expect_none(&run(&[MESH_STRICT, &in_ns]), "WRD0110");
    }

    #[test]
    fn wrd0111_target_refs() {
        let p = ap("p", "foo", "targetRefs:\n- {kind: Gateway, group: gateway.networking.k8s.io, name: gw}\nrules: [{}]");
        let d = run(&[MESH_STRICT, &p]);
        let f = expect_one(&d, "WRD0111");
        assert_eq!(f.severity, Severity::Info);
        assert_eq!(f.field.as_deref(), Some("spec.targetRefs"));
        let ra = kind(
            "RequestAuthentication",
            "r",
            "foo",
            "targetRef: {kind: Service, name: s}",
        );
        assert_eq!(
            expect_one(&run(&[MESH_STRICT, &ra]), "WRD0111")
                .field
                .as_deref(),
            Some("spec.targetRef")
        );
        expect_none(
            &run(&[MESH_STRICT, &ap("p", "foo", "rules: [{}]")]),
            "WRD0111",
        );
    }

    #[test]
    fn includes_validation_and_is_sorted() {
        let bad = ap("p", "foo", "action: DENY");
        let split = ap(
            "q",
            "foo",
            "rules:\n- from:\n  - source: {principals: [a]}\n  - source: {namespaces: [b]}",
        );
        let d = run(&[BASE, &split, &bad]);
        expect_one(&d, "IST0106");
        expect_one(&d, "WRD0109");
        let keys: Vec<(&str, usize)> = d.iter().map(|x| (x.file.as_str(), x.line)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(d.iter().all(|x| !x.file.is_empty()));
    }
}
