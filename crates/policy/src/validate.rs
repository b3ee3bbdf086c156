//! Istio's admission checks for the three security kinds and for the mesh's extension
//! providers: what `kubectl apply` would refuse (IST0106, errors) or admit with a warning
//! (IST0133), plus the `istio.io/dry-run` annotation checks (IST0107, IST0136).
//!
//! The checks transcribe istio `pkg/config/validation/validation.go`,
//! `pkg/config/security/security.go` and `pkg/config/validation/agent/extensionprovider.go`,
//! and the CRD/CEL rules of `customresourcedefinitions.gen.yaml` that the API server applies
//! before the webhook runs. Messages keep Istio's wording where Istio has one, so a user can
//! search for them; every finding carries the exact field path it is about.
//!
//! Deliberately absent: checks Istio does not make (leading `/` in paths, `*` in the middle of
//! values, method case, `spiffe://` in principals). Those belong to the analyzers, as warnings,
//! because refusing what Istio admits would make Warden disagree with the cluster.
//! Enum values (`action`, `mtls.mode`) and unknown fields are refused earlier, by the loader.

use std::net::{IpAddr, Ipv6Addr};

use crate::config::Config;
use crate::diag::{Diagnostic, Reporter, Severity};
use crate::jwt::Jwks;
use crate::mesh::ExtAuthzKind;
use crate::model::*;
use crate::path::validate_path_value;

const DRY_RUN: &str = "istio.io/dry-run";
const DRY_RUN_FIELD: &str = "metadata.annotations.istio.io/dry-run";

/// File name used for findings about the mesh configuration, which has no document of its own
/// once loaded (it may come from `--mesh` or from the `istio` ConfigMap).
pub const MESH_FILE: &str = "<default mesh config>";

/// Every admission finding for the configuration, in resource order.
pub fn validate(cfg: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for p in &cfg.authorization_policies {
        let mut r = p.reporter(&mut out);
        dry_run_annotation(&mut r, &p.meta, Some(p.spec.action));
        authorization_policy(&mut r, &p.spec);
    }
    for p in &cfg.request_authentications {
        let mut r = p.reporter(&mut out);
        dry_run_annotation(&mut r, &p.meta, None);
        request_authentication(&mut r, &p.spec);
    }
    for p in &cfg.peer_authentications {
        let mut r = p.reporter(&mut out);
        dry_run_annotation(&mut r, &p.meta, None);
        peer_authentication(&mut r, &p.spec);
    }
    extension_providers(cfg, &mut out);
    out
}

/// A finding about the mesh configuration (no resource document to point into).
pub fn mesh_diagnostic(
    cfg: &Config,
    severity: Severity,
    code: &'static str,
    field: &str,
    message: String,
) -> Diagnostic {
    Diagnostic {
        severity,
        code,
        file: cfg
            .mesh_origin
            .as_ref()
            .map_or(MESH_FILE.to_string(), |(f, _)| f.clone()),
        line: cfg.mesh_origin.as_ref().map_or(0, |(_, l)| *l),
        resource: Some("MeshConfig".to_string()),
        field: (!field.is_empty()).then(|| field.to_string()),
        message,
    }
}

// ------------------------------------------------------------------ field tables

/// `(json name, Istio's Go name, values)` of every list field of a Source.
pub(crate) fn source_fields(s: &Source) -> [(&'static str, &'static str, &[String]); 14] {
    [
        ("principals", "Principals", &s.principals),
        ("notPrincipals", "NotPrincipals", &s.not_principals),
        (
            "requestPrincipals",
            "RequestPrincipals",
            &s.request_principals,
        ),
        (
            "notRequestPrincipals",
            "NotRequestPrincipals",
            &s.not_request_principals,
        ),
        ("namespaces", "Namespaces", &s.namespaces),
        ("notNamespaces", "NotNamespaces", &s.not_namespaces),
        ("serviceAccounts", "ServiceAccounts", &s.service_accounts),
        (
            "notServiceAccounts",
            "NotServiceAccounts",
            &s.not_service_accounts,
        ),
        ("trustDomains", "TrustDomains", &s.trust_domains),
        ("notTrustDomains", "NotTrustDomains", &s.not_trust_domains),
        ("ipBlocks", "IpBlocks", &s.ip_blocks),
        ("notIpBlocks", "NotIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", "RemoteIpBlocks", &s.remote_ip_blocks),
        (
            "notRemoteIpBlocks",
            "NotRemoteIpBlocks",
            &s.not_remote_ip_blocks,
        ),
    ]
}

/// `(json name, Istio's Go name, values)` of every list field of an Operation.
pub(crate) fn operation_fields(o: &Operation) -> [(&'static str, &'static str, &[String]); 8] {
    [
        ("hosts", "Hosts", &o.hosts),
        ("notHosts", "NotHosts", &o.not_hosts),
        ("ports", "Ports", &o.ports),
        ("notPorts", "NotPorts", &o.not_ports),
        ("methods", "Methods", &o.methods),
        ("notMethods", "NotMethods", &o.not_methods),
        ("paths", "Paths", &o.paths),
        ("notPaths", "NotPaths", &o.not_paths),
    ]
}

// ------------------------------------------------------------------ metadata

/// Go's `strconv.ParseBool`, which Istio uses for the dry-run annotation.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `action` is `Some` for AuthorizationPolicy, the only kind the annotation means anything on.
fn dry_run_annotation(r: &mut Reporter<'_>, meta: &ObjectMeta, action: Option<Action>) {
    let Some(value) = meta.annotations.get(DRY_RUN) else {
        return;
    };
    let Some(action) = action else {
        r.push(
            Severity::Warning,
            "IST0107",
            DRY_RUN_FIELD,
            format!(
                "Misplaced annotation: {DRY_RUN} can only be applied to AuthorizationPolicy; \
                 it has no effect here, please remove the annotation"
            ),
        );
        return;
    };
    r.push(
        Severity::Info,
        "IST0136",
        DRY_RUN_FIELD,
        format!(
            "Annotation \"{DRY_RUN}\" is part of an alpha-phase feature and may be incompletely supported"
        ),
    );
    // Istio's webhook refuses both cases below, but a policy that got in anyway is enforced,
    // which is what a user relying on dry-run must hear about.
    if !matches!(action, Action::Allow | Action::Deny) {
        r.warning(
            DRY_RUN_FIELD,
            format!(
                "the annotation {DRY_RUN} currently only supports action ALLOW/DENY, found action {}",
                action.as_str()
            ),
        );
    } else if parse_go_bool(value).is_none() {
        r.warning(
            DRY_RUN_FIELD,
            format!(
                "annotation {DRY_RUN} with invalid value ({value}): not a boolean, \
                 so the policy is enforced, not dry-run"
            ),
        );
    }
}

// ------------------------------------------------------------------ selector and targetRefs

fn one_of_selector_type(
    r: &mut Reporter<'_>,
    selector: &Option<WorkloadSelector>,
    target_ref: &Option<PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
) {
    let set = usize::from(selector.is_some())
        + usize::from(target_ref.is_some())
        + usize::from(!target_refs.is_empty());
    if set > 1 {
        r.error(
            "spec",
            "only one of targetRefs or workloadSelector can be set",
        );
    }
}

fn workload_selector(r: &mut Reporter<'_>, selector: &Option<WorkloadSelector>) {
    let Some(sel) = selector else { return };
    for (k, v) in &sel.match_labels {
        let field = format!("spec.selector.matchLabels.{k}");
        if k.is_empty() {
            r.error(
                &field,
                format!("empty key is not supported in selector: \"{k}={v}\""),
            );
        }
        if k.contains('*') || v.contains('*') {
            r.error(
                &field,
                format!("wildcard is not supported in selector: \"{k}={v}\""),
            );
        }
        if v.chars().count() > 63 {
            r.error(
                &field,
                format!("label value of \"{k}\" must be no more than 63 characters"),
            );
        }
    }
    if sel.match_labels.len() > 4096 {
        r.error(
            "spec.selector.matchLabels",
            "matchLabels must have at most 4096 entries",
        );
    }
    if sel.match_labels.is_empty() {
        r.warning(
            "spec.selector",
            "workload selector specified without labels",
        );
    }
}

/// Kinds a targetRef may name, as `(canonical group, kind)`.
const ALLOWED_TARGET_REFS: [(&str, &str); 4] = [
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
];

fn target_ref(r: &mut Reporter<'_>, field: &str, t: &PolicyTargetReference) {
    if t.name.is_empty() {
        r.error(field, "targetRef name must be set");
    } else if t.name.len() > 253 {
        r.error(field, "targetRef name must be at most 253 characters");
    }
    if !t.namespace.is_empty() {
        r.error(
            field,
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        );
    }
    let group = if t.group.is_empty() {
        "core"
    } else {
        t.group.as_str()
    };
    if !ALLOWED_TARGET_REFS.contains(&(group, t.kind.as_str())) {
        r.error(
            field,
            format!(
                "targetRef must be to one of [core/Service networking.istio.io/ServiceEntry \
                 gateway.networking.k8s.io/Gateway gateway.networking.k8s.io/GatewayClass] but was {}/{}",
                t.group, t.kind
            ),
        );
    }
}

fn target_refs(
    r: &mut Reporter<'_>,
    single: &Option<PolicyTargetReference>,
    many: &[PolicyTargetReference],
) {
    if let Some(t) = single {
        target_ref(r, "spec.targetRef", t);
    }
    if many.len() > 16 {
        r.error("spec.targetRefs", "targetRefs must have at most 16 entries");
    }
    for (i, t) in many.iter().enumerate() {
        target_ref(r, &format!("spec.targetRefs[{i}]"), t);
    }
}

// ------------------------------------------------------------------ value checks

/// Go `netip.ParseAddr`: dotted IPv4 without leading zeros, or IPv6 with an optional zone.
fn parse_go_addr(s: &str) -> Option<IpAddr> {
    if s.contains(':') {
        let (addr, zone) = match s.split_once('%') {
            Some((a, z)) => (a, Some(z)),
            None => (s, None),
        };
        if zone.is_some_and(str::is_empty) {
            return None;
        }
        return addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    s.parse::<IpAddr>().ok()
}

/// Go `netip.ParsePrefix`: no zone, prefix length in decimal without a sign or leading zero.
fn parse_go_prefix(s: &str) -> bool {
    let Some((addr, bits)) = s.rsplit_once('/') else {
        return false;
    };
    if addr.contains('%') {
        return false;
    }
    let Some(ip) = parse_go_addr(addr) else {
        return false;
    };
    if bits.is_empty()
        || !bits.bytes().all(|b| b.is_ascii_digit())
        || (bits.len() > 1 && bits.starts_with('0'))
    {
        return false;
    }
    let max = if ip.is_ipv4() { 32 } else { 128 };
    bits.parse::<u32>().is_ok_and(|b| b <= max)
}

/// Istio `security.ValidateIPs` for one value.
fn ip_problem(v: &str) -> Option<String> {
    if v.contains('/') {
        (!parse_go_prefix(v)).then(|| format!("bad CIDR range ({v}): not a valid IP prefix"))
    } else {
        parse_go_addr(v)
            .is_none()
            .then(|| format!("bad IP address ({v})"))
    }
}

/// Istio `security.ValidatePorts` for one value: Go `strconv.ParseUint(v, 10, 32)` ≤ 65535.
fn port_problem(v: &str) -> Option<String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(format!(
            "bad port ({v}): strconv.ParseUint: parsing \"{v}\": invalid syntax"
        ));
    }
    match v.parse::<u32>() {
        Err(_) => Some(format!(
            "bad port ({v}): strconv.ParseUint: parsing \"{v}\": value out of range"
        )),
        Ok(p) if p > 65535 => Some(format!(
            "bad port ({v}): port must be in the range 0..65535"
        )),
        Ok(_) => None,
    }
}

fn service_account_problem(v: &str) -> Option<String> {
    if v.chars().count() > 320 {
        return Some(format!(
            "service account \"{v}\" must be at most 320 characters"
        ));
    }
    if v.contains('*') {
        return Some(format!(
            "wildcard is not supported in service account \"{v}\""
        ));
    }
    let parts: Vec<&str> = v.split('/').collect();
    if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Some(format!(
            "invalid service account \"{v}\": expected <namespace>/<name> or <name>"
        ));
    }
    None
}

fn trust_domain_problem(v: &str) -> Option<String> {
    if v.contains('/') {
        return Some(format!(
            "invalid trust domain \"{v}\": must not contain '/'"
        ));
    }
    let stars = v.matches('*').count();
    let at_end = v.starts_with('*') || v.ends_with('*');
    if stars > 1 || (stars == 1 && !at_end) {
        return Some(format!(
            "invalid trust domain \"{v}\": only one wildcard '*' is allowed, at the start or the end"
        ));
    }
    None
}

/// Istio `validateMapKey`: `x[y]` with `]` last and a non-empty `y`.
fn map_key_ok(key: &str) -> bool {
    match key.find('[') {
        Some(open) => key.ends_with(']') && open > 0 && open + 2 < key.len(),
        None => false,
    }
}

/// What kind of value a `when` key takes, or why the key is refused. Mirrors the dispatch
/// of istio `security.ValidateAttribute` (prefix and exact matches in the same order).
enum KeyKind {
    /// Any non-empty string.
    Plain,
    /// Key of the form `x[y]`; values any non-empty string.
    MapKey,
    Ip,
    Port,
    ServiceAccount,
    TrustDomain,
    Refused(String),
}

fn key_kind(key: &str) -> KeyKind {
    match key {
        k if k.starts_with("request.headers") => KeyKind::MapKey,
        "source.ip" | "remote.ip" | "destination.ip" => KeyKind::Ip,
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => KeyKind::Plain,
        "source.serviceAccount" => KeyKind::ServiceAccount,
        "source.trustDomain" => KeyKind::TrustDomain,
        k if k.starts_with("request.auth.claims") => KeyKind::MapKey,
        "destination.port" => KeyKind::Port,
        k if k.starts_with("experimental.envoy.filters.") => KeyKind::MapKey,
        "destination.namespace" => KeyKind::Refused(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        k if k.starts_with("destination.labels") => KeyKind::Refused(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        "destination.name" | "destination.user" => KeyKind::Refused(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ => KeyKind::Refused(format!("unknown attribute: {key}")),
    }
}

// ------------------------------------------------------------------ AuthorizationPolicy

/// Source fields a CUSTOM policy may not use: identity is not established before ext_authz.
const CUSTOM_FORBIDDEN_SOURCE: [&str; 10] = [
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "trustDomains",
    "notTrustDomains",
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
];

/// Source fields that still constrain a TCP connection (for the DENY-on-TCP warning).
const TCP_SOURCE_FIELDS: [&str; 10] = [
    "principals",
    "notPrincipals",
    "ipBlocks",
    "notIpBlocks",
    "namespaces",
    "notNamespaces",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
];

fn authorization_policy(r: &mut Reporter<'_>, spec: &AuthorizationPolicySpec) {
    one_of_selector_type(r, &spec.selector, &spec.target_ref, &spec.target_refs);
    workload_selector(r, &spec.selector);
    target_refs(r, &spec.target_ref, &spec.target_refs);

    // `rules: []` decodes to the same nil list as an absent field in Istio's proto types.
    let no_rules = spec.rules.as_ref().is_none_or(Vec::is_empty);
    let rules: &[Option<Rule>] = spec.rules.as_deref().unwrap_or(&[]);

    if spec.action == Action::Custom {
        if no_rules {
            r.error(
                "spec",
                "CUSTOM action without `rules` is meaningless as it will never be triggered, \
                 add an empty rule `{}` if you want it be triggered for every request",
            );
        } else if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
            let field = if spec.provider.is_some() {
                "spec.provider.name"
            } else {
                "spec"
            };
            r.error(field, "`provider.name` must not be empty");
        }
        custom_restrictions(r, rules);
    }
    if spec.provider.is_some() && spec.action != Action::Custom {
        r.error(
            "spec.provider",
            format!(
                "`provider` must not be with non CUSTOM action, found {}",
                spec.action.as_str()
            ),
        );
    }
    if spec.action == Action::Deny && no_rules {
        r.error(
            "spec",
            "DENY action without `rules` is meaningless as it will never be triggered, \
             add an empty rule `{}` if you want it be triggered for every request",
        );
    }
    if rules.len() > 512 {
        r.error("spec.rules", "rules must have at most 512 entries");
    }
    for (i, rule) in rules.iter().enumerate() {
        let base = format!("spec.rules[{i}]");
        let Some(rule) = rule else {
            r.error(&base, format!("`rule` must not be nil, found at rule {i}"));
            continue;
        };
        let shape = rule_shape(r, &base, i, rule);
        if spec.action == Action::Deny
            && ((shape.from_exists && !shape.to_exists && !shape.tcp_in_from)
                || (shape.to_exists && !shape.tcp_in_to))
        {
            r.warning(
                &base,
                "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope \
                 due to the use of only HTTP attributes in a DENY rule; \
                 it is recommended to explicitly specify the port",
            );
        }
    }
}

fn custom_restrictions(r: &mut Reporter<'_>, rules: &[Option<Rule>]) {
    for (i, rule) in rules.iter().enumerate() {
        let Some(rule) = rule else { continue };
        for (j, from) in rule.from.iter().flatten().enumerate() {
            let Some(src) = from.as_ref().and_then(|f| f.source.as_ref()) else {
                continue;
            };
            for (json, go, values) in source_fields(src) {
                if CUSTOM_FORBIDDEN_SOURCE.contains(&json) && !values.is_empty() {
                    r.error(
                        &format!("spec.rules[{i}].from[{j}].source.{json}"),
                        format!("From.{go} is currently not supported with CUSTOM action"),
                    );
                }
            }
        }
        for (j, cond) in rule.when.iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}].when[{j}]");
            let Some(c) = cond else {
                r.error(&field, "when field cannot be nil");
                continue;
            };
            let k = c.key.as_str();
            if matches!(
                k,
                "source.namespace"
                    | "source.serviceAccount"
                    | "source.trustDomain"
                    | "source.principal"
            ) || k.starts_with("request.auth.")
            {
                r.error(
                    &format!("{field}.key"),
                    format!("{k} is currently not supported with CUSTOM action"),
                );
            }
        }
    }
}

struct RuleShape {
    from_exists: bool,
    to_exists: bool,
    tcp_in_from: bool,
    tcp_in_to: bool,
}

fn rule_shape(r: &mut Reporter<'_>, base: &str, i: usize, rule: &Rule) -> RuleShape {
    let mut shape = RuleShape {
        from_exists: false,
        to_exists: false,
        tcp_in_from: false,
        tcp_in_to: false,
    };
    if let Some(from) = &rule.from {
        if from.is_empty() {
            r.error(
                &format!("{base}.from"),
                format!("`from` must not be empty, found at rule {i}"),
            );
        }
        if from.len() > 512 {
            r.error(
                &format!("{base}.from"),
                "from must have at most 512 entries",
            );
        }
        for (j, f) in from.iter().enumerate() {
            let fbase = format!("{base}.from[{j}]");
            let Some(f) = f else {
                r.error(&fbase, format!("`from` must not be nil, found at rule {i}"));
                continue;
            };
            let Some(src) = &f.source else {
                r.error(
                    &fbase,
                    format!("`from.source` must not be nil, found at rule {i}"),
                );
                continue;
            };
            shape.from_exists = true;
            let sbase = format!("{fbase}.source");
            source(r, &sbase, i, src);
            if source_fields(src)
                .iter()
                .any(|(json, _, v)| TCP_SOURCE_FIELDS.contains(json) && !v.is_empty())
            {
                shape.tcp_in_from = true;
            }
        }
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            r.error(
                &format!("{base}.to"),
                format!("`to` must not be empty, found at rule {i}"),
            );
        }
        for (j, t) in to.iter().enumerate() {
            let tbase = format!("{base}.to[{j}]");
            let Some(t) = t else {
                r.error(&tbase, format!("`to` must not be nil, found at rule {i}"));
                continue;
            };
            let Some(op) = &t.operation else {
                r.error(
                    &tbase,
                    format!("`to.operation` must not be nil, found at rule {i}"),
                );
                continue;
            };
            shape.to_exists = true;
            operation(r, &format!("{tbase}.operation"), i, op);
            if !op.ports.is_empty() || !op.not_ports.is_empty() {
                shape.tcp_in_to = true;
            }
        }
    }
    for (j, c) in rule.when.iter().flatten().enumerate() {
        condition(r, &format!("{base}.when[{j}]"), c.as_ref());
    }
    shape
}

fn empty_values(r: &mut Reporter<'_>, base: &str, json: &str, go: &str, values: &[String]) {
    // Istio stops at the first empty value of a list; so does this.
    if let Some(k) = values.iter().position(String::is_empty) {
        r.error(
            &format!("{base}.{json}[{k}]"),
            format!("empty value not allowed, found in {go}"),
        );
    }
}

fn source(r: &mut Reporter<'_>, base: &str, i: usize, s: &Source) {
    let fields = source_fields(s);
    if fields.iter().all(|(_, _, v)| v.is_empty()) {
        r.error(
            base,
            format!("`from.source` must not be empty, found at rule {i}"),
        );
    }
    for (json, go, values) in fields {
        empty_values(r, base, json, go, values);
        for (k, v) in values.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let problem = match json {
                "ipBlocks" | "notIpBlocks" | "remoteIpBlocks" | "notRemoteIpBlocks" => {
                    ip_problem(v)
                }
                "serviceAccounts" | "notServiceAccounts" => service_account_problem(v),
                "trustDomains" | "notTrustDomains" => trust_domain_problem(v),
                _ => None,
            };
            if let Some(p) = problem {
                r.error(&format!("{base}.{json}[{k}]"), p);
            }
        }
    }
    for (json, values) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        if values.len() > 16 {
            r.error(
                &format!("{base}.{json}"),
                format!("{json} must have at most 16 entries"),
            );
        }
    }
    let has_sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_identity = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if has_sa && has_identity {
        let json = if s.service_accounts.is_empty() {
            "notServiceAccounts"
        } else {
            "serviceAccounts"
        };
        r.error(
            &format!("{base}.{json}"),
            "Cannot set serviceAccounts with namespaces or principals",
        );
    }
}

fn operation(r: &mut Reporter<'_>, base: &str, i: usize, op: &Operation) {
    let fields = operation_fields(op);
    if fields.iter().all(|(_, _, v)| v.is_empty()) {
        r.error(
            base,
            format!("`to.operation` must not be empty, found at rule {i}"),
        );
    }
    for (json, go, values) in fields {
        for (k, v) in values.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let field = format!("{base}.{json}[{k}]");
            match json {
                "ports" | "notPorts" => {
                    if let Some(p) = port_problem(v) {
                        r.error(&field, p);
                    }
                }
                "paths" | "notPaths" => {
                    if let Err(e) = validate_path_value(v) {
                        r.error(&field, format!("{e}, found in {go}"));
                    }
                }
                _ => {}
            }
        }
        empty_values(r, base, json, go, values);
    }
}

fn condition(r: &mut Reporter<'_>, base: &str, c: Option<&Condition>) {
    let Some(c) = c.filter(|c| !c.key.is_empty()) else {
        r.error(&format!("{base}.key"), "`key` must not be empty");
        return;
    };
    let key = c.key.as_str();
    if c.values.is_empty() && c.not_values.is_empty() {
        r.error(
            base,
            format!("at least one of `values` or `notValues` must be set for key {key}"),
        );
        return;
    }
    let kind = key_kind(key);
    for (json, label, values) in [
        ("values", "value", &c.values),
        ("notValues", "notValue", &c.not_values),
    ] {
        if values.is_empty() {
            continue;
        }
        let prefix = format!("invalid `{label}` for `key` {key}");
        if let Some(k) = values.iter().position(String::is_empty) {
            r.error(
                &format!("{base}.{json}[{k}]"),
                format!("{prefix}: empty value not allowed, found in {key}"),
            );
            continue;
        }
        match &kind {
            KeyKind::Refused(msg) => r.error(&format!("{base}.key"), format!("{prefix}: {msg}")),
            KeyKind::MapKey if !map_key_ok(key) => r.error(
                &format!("{base}.key"),
                format!("{prefix}: bad key ({key}): should have format a[b]"),
            ),
            _ => {
                for (k, v) in values.iter().enumerate() {
                    let problem = match kind {
                        KeyKind::Ip => ip_problem(v),
                        KeyKind::Port => port_problem(v),
                        KeyKind::ServiceAccount => service_account_problem(v),
                        KeyKind::TrustDomain => trust_domain_problem(v),
                        _ => None,
                    };
                    if let Some(p) = problem {
                        r.error(&format!("{base}.{json}[{k}]"), format!("{prefix}: {p}"));
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ RequestAuthentication

fn request_authentication(r: &mut Reporter<'_>, spec: &RequestAuthenticationSpec) {
    one_of_selector_type(r, &spec.selector, &spec.target_ref, &spec.target_refs);
    workload_selector(r, &spec.selector);
    target_refs(r, &spec.target_ref, &spec.target_refs);
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        if let Some(rule) = rule {
            jwt_rule(r, &format!("spec.jwtRules[{i}]"), rule);
        }
    }
}

fn jwt_rule(r: &mut Reporter<'_>, base: &str, rule: &JwtRule) {
    if rule.issuer.is_empty() && rule.jwks_uri.is_empty() {
        r.error(
            &format!("{base}.issuer"),
            "issuer must be set (it may only be empty when jwksUri is set)",
        );
    }
    for (k, a) in rule.audiences.iter().enumerate() {
        if a.is_empty() {
            r.error(
                &format!("{base}.audiences[{k}]"),
                "audience must be non-empty string",
            );
        }
    }
    if !rule.jwks_uri.is_empty() {
        let field = format!("{base}.jwksUri");
        if rule.jwks_uri.len() > 2048 {
            r.error(&field, "jwksUri must be at most 2048 characters");
        }
        if let Err(e) = jwks_uri_problem(&rule.jwks_uri) {
            r.error(&field, e);
        }
    }
    if !rule.jwks.is_empty() {
        let field = format!("{base}.jwks");
        match Jwks::parse(&rule.jwks) {
            Err(e) => r.error(&field, format!("jwks parse error: {e}")),
            Ok(_) => {
                if Jwks::has_private_material(&rule.jwks) {
                    r.warning(
                        &field,
                        "jwks contains private key material (a key has \"d\", \"p\" or \"q\"); \
                         only public keys belong in a RequestAuthentication",
                    );
                }
            }
        }
    }
    if !rule.jwks.is_empty() && !rule.jwks_uri.is_empty() {
        r.error(base, "only one of jwks or jwksUri can be set");
    }
    for (k, h) in rule.from_headers.iter().enumerate() {
        let field = format!("{base}.fromHeaders[{k}]");
        match h {
            None => r.error(&field, "location header name must be non-null"),
            Some(h) if h.name.is_empty() => r.error(
                &format!("{field}.name"),
                "location header name must be non-empty string",
            ),
            Some(_) => {}
        }
    }
    for (k, p) in rule.from_params.iter().enumerate() {
        if p.is_empty() {
            r.error(
                &format!("{base}.fromParams[{k}]"),
                "location query must be non-empty string",
            );
        }
    }
    for (k, c) in rule.from_cookies.iter().enumerate() {
        if c.is_empty() {
            r.error(
                &format!("{base}.fromCookies[{k}]"),
                "cookie name must be non-empty string",
            );
        }
    }
    for (k, o) in rule.output_claim_to_headers.iter().enumerate() {
        let field = format!("{base}.outputClaimToHeaders[{k}]");
        let Some(o) = o else {
            r.error(&field, "outputClaimToHeaders must not be null");
            continue;
        };
        if o.claim.is_empty() || o.header.is_empty() {
            r.error(
                &field,
                "outputClaimToHeaders header and claim value must be non-empty string",
            );
            continue;
        }
        let valid = o
            .header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            r.error(
                &format!("{field}.header"),
                format!("header name {} is not a valid header name", o.header),
            );
        }
    }
    if let Some(t) = &rule.timeout {
        let field = format!("{base}.timeout");
        match parse_duration_nanos(t) {
            None => r.error(&field, format!("invalid duration \"{t}\"")),
            Some(n) if n < 1_000_000 => r.error(&field, "duration must be greater than 1ms"),
            Some(n) if n % 1_000_000 != 0 => {
                r.error(&field, "only durations to ms precision are supported")
            }
            Some(_) => {}
        }
    }
    if rule.space_delimited_claims.len() > 64 {
        r.error(
            &format!("{base}.spaceDelimitedClaims"),
            "spaceDelimitedClaims must have at most 64 entries",
        );
    }
    for (k, c) in rule.space_delimited_claims.iter().enumerate() {
        if c.is_empty() {
            r.error(
                &format!("{base}.spaceDelimitedClaims[{k}]"),
                "spaceDelimitedClaims must not contain empty strings",
            );
        }
    }
}

/// Istio `security.ParseJwksURI` on Go's `url.Parse`: scheme http or https, numeric port.
fn jwks_uri_problem(uri: &str) -> Result<(), String> {
    let scheme = match uri.split_once(':') {
        Some((s, _))
            if s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            s.to_ascii_lowercase()
        }
        _ => String::new(),
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!("URI scheme \"{scheme}\" is not supported"));
    }
    let rest = uri.get(scheme.len() + 1..).unwrap_or("");
    let Some(rest) = rest.strip_prefix("//") else {
        return Ok(());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = if let Some(v6) = hostport.strip_prefix('[') {
        match v6.split_once(']') {
            Some((_, after)) => after.strip_prefix(':'),
            None => return Err(format!("parse \"{uri}\": missing ']' in host")),
        }
    } else {
        hostport.rsplit_once(':').map(|(_, p)| p)
    };
    match port {
        Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) => {
            Err(format!("parse \"{uri}\": invalid port \":{p}\" after host"))
        }
        _ => Ok(()),
    }
}

/// A protobuf JSON duration (`"1.5s"`) or a Go duration (`"1m30s"`, `"500ms"`), in
/// nanoseconds. Both spellings reach Istio: the CRD's CEL checks use Go syntax.
fn parse_duration_nanos(s: &str) -> Option<i128> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return None;
        }
        let int_v: i128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let mut value = int_v.checked_mul(scale)?;
        let mut div: i128 = 1;
        for d in frac.bytes().take(18) {
            div *= 10;
            value = value.checked_add(i128::from(d - b'0') * scale / div)?;
        }
        total = total.checked_add(value)?;
        rest = after;
    }
    Some(if neg { -total } else { total })
}

// ------------------------------------------------------------------ PeerAuthentication

fn peer_authentication(r: &mut Reporter<'_>, spec: &PeerAuthenticationSpec) {
    workload_selector(r, &spec.selector);
    let empty_selector = spec
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    let Some(ports) = &spec.port_level_mtls else {
        return;
    };
    if ports.is_empty() {
        r.error(
            "spec.portLevelMtls",
            "port level mTLS, if defined, must have at least one element",
        );
        return;
    }
    if empty_selector {
        r.error(
            "spec.portLevelMtls",
            "mesh/namespace peer authentication cannot have port level mTLS",
        );
    }
    for k in ports.keys() {
        let ok = k.bytes().all(|b| b.is_ascii_digit())
            && k.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !ok {
            r.error(
                &format!("spec.portLevelMtls.{k}"),
                format!("port number {k} must be in the range 1..65535"),
            );
        }
    }
}

// ------------------------------------------------------------------ extension providers

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Istio `ValidateFQDN`: at most 255 characters of DNS-1123 labels, a trailing dot allowed.
fn is_fqdn(s: &str) -> bool {
    if s.is_empty() || s.len() > 255 {
        return false;
    }
    let s = s.strip_suffix('.').unwrap_or(s);
    s.split('.').all(is_dns1123_label)
}

fn is_wildcard_hostname(s: &str) -> bool {
    s == "*" || s.strip_prefix("*.").map_or_else(|| is_fqdn(s), is_fqdn)
}

fn service_problem(service: &str) -> Option<String> {
    if service.is_empty() {
        return Some("service must not be empty".into());
    }
    match service.split_once('/') {
        None => (!is_fqdn(service) && parse_go_addr(service).is_none()).then(|| {
            format!("invalid service fmt {service}: ParseAddr(\"{service}\"): unable to parse IP")
        }),
        Some((ns, host)) => {
            if ns != "." && ns != "*" && !is_dns1123_label(ns) {
                Some(format!(
                    "invalid namespace: {ns}: a DNS-1123 label must consist of lower case \
                     alphanumeric characters or '-'"
                ))
            } else if host.contains('/') || !is_wildcard_hostname(host) {
                Some(format!("invalid host {host}: not a valid hostname"))
            } else {
                None
            }
        }
    }
}

fn extension_providers(cfg: &Config, out: &mut Vec<Diagnostic>) {
    let mesh = &cfg.mesh;
    let mut seen: Vec<&str> = Vec::new();
    for (i, p) in mesh.extension_providers.iter().enumerate() {
        let base = format!("extensionProviders[{i}]");
        let prefix = format!("invalid extension provider {}:", p.name);
        let mut err = |field: &str, msg: String| {
            out.push(mesh_diagnostic(
                cfg,
                Severity::Error,
                "IST0106",
                field,
                format!("{prefix} {msg}"),
            ));
        };
        if p.name.is_empty() {
            err(
                &format!("{base}.name"),
                "empty extension provider name".into(),
            );
        } else if seen.contains(&p.name.as_str()) {
            err(
                &format!("{base}.name"),
                format!("duplicate extension provider name {}", p.name),
            );
        } else {
            seen.push(&p.name);
        }
        let Some((kind, s)) = &p.ext_authz else {
            continue;
        };
        let kbase = match kind {
            ExtAuthzKind::EnvoyExtAuthzHttp => format!("{base}.envoyExtAuthzHttp"),
            ExtAuthzKind::EnvoyExtAuthzGrpc => format!("{base}.envoyExtAuthzGrpc"),
        };
        if s.port == 0 || s.port > 65535 {
            let msg = format!("port number {} must be in the range 1..65535", s.port);
            let msg = match kind {
                ExtAuthzKind::EnvoyExtAuthzHttp => msg,
                ExtAuthzKind::EnvoyExtAuthzGrpc => format!("invalid service port: {msg}"),
            };
            err(&format!("{kbase}.port"), msg);
        }
        if let Some(m) = service_problem(&s.service) {
            err(&format!("{kbase}.service"), m);
        }
        if let Some(code) = s.status_on_error.as_deref().filter(|c| !c.is_empty()) {
            match code.parse::<i32>() {
                Err(_) => err(
                    &format!("{kbase}.statusOnError"),
                    format!(
                        "invalid statusOnError value {code}: strconv.ParseInt: parsing \"{code}\": invalid syntax"
                    ),
                ),
                Ok(c) if !is_envoy_status_code(c) => err(
                    &format!("{kbase}.statusOnError"),
                    format!("unsupported statusOnError value {code}"),
                ),
                Ok(_) => {}
            }
        }
        if let Some(pp) = s.path_prefix.as_deref().filter(|x| !x.is_empty()) {
            if !pp.starts_with('/') {
                err(
                    &format!("{kbase}.pathPrefix"),
                    format!("pathPrefix should begin with `/` but found \"{pp}\""),
                );
            }
        }
        // Admitted by the webhook but refused when istiod builds the filter: every CUSTOM
        // policy using the provider then denies what it matches.
        let lists = [
            (
                "includeRequestHeadersInCheck",
                &s.include_request_headers_in_check,
            ),
            ("includeHeadersInCheck", &s.include_headers_in_check),
            ("headersToUpstreamOnAllow", &s.headers_to_upstream_on_allow),
            (
                "headersToDownstreamOnDeny",
                &s.headers_to_downstream_on_deny,
            ),
            (
                "headersToDownstreamOnAllow",
                &s.headers_to_downstream_on_allow,
            ),
        ];
        for (json, list) in lists {
            if let Some(k) = list.iter().position(|h| h == "*") {
                out.push(mesh_diagnostic(
                cfg,
                    Severity::Warning,
                    "IST0133",
                    &format!("{kbase}.{json}[{k}]"),
                    format!(
                        "extension provider {}: a lone \"*\" is not a valid header match; istiod \
                         rejects the provider and CUSTOM policies using it deny every request they match",
                        p.name
                    ),
                ));
            }
        }
        if !p.name.is_empty() && !is_dns1123_label(&p.name) {
            out.push(mesh_diagnostic(
                cfg,
                Severity::Warning,
                "IST0133",
                &format!("{base}.name"),
                format!(
                    "extension provider name \"{}\" is not a DNS label ([a-z0-9-], at most 63 \
                     characters); Istio 1.30+ treats the provider as invalid and CUSTOM policies \
                     using it deny every request they match",
                    p.name
                ),
            ));
        }
    }
}

/// Envoy `type.v3.StatusCode` values: the codes Istio accepts for `statusOnError`.
fn is_envoy_status_code(c: i32) -> bool {
    matches!(
        c,
        100 | 200..=208
            | 226
            | 300..=305
            | 307
            | 308
            | 400..=418
            | 421..=424
            | 426
            | 428
            | 429
            | 431
            | 500..=508
            | 510
            | 511
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Loader;

    fn load(text: &str) -> Config {
        let mut l = Loader::new();
        l.add_text("t.yaml", text);
        let (cfg, diags) = l.finish();
        assert!(diags.is_empty(), "load diagnostics: {diags:?}");
        cfg
    }

    fn ap(spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: foo\nspec:\n{}",
            indent(spec)
        )
    }

    fn indent(s: &str) -> String {
        s.lines().map(|l| format!("  {l}\n")).collect()
    }

    /// `(code, field)` of every finding.
    fn findings(text: &str) -> Vec<(String, String, String)> {
        validate(&load(text))
            .into_iter()
            .map(|d| (d.code.to_string(), d.field.unwrap_or_default(), d.message))
            .collect()
    }

    fn assert_case(name: &str, text: &str, code: &str, field: &str, msg_part: &str) {
        let f = findings(text);
        assert!(
            f.iter()
                .any(|(c, fl, m)| c == code && fl == field && m.contains(msg_part)),
            "{name}: expected {code} at {field} containing {msg_part:?}, got {f:#?}"
        );
    }

    #[test]
    fn authorization_policy_errors() {
        // (case, spec, code, field, message fragment)
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            (
                "selector and targetRef",
                "selector:\n  matchLabels: {app: a}\ntargetRef: {kind: Service, name: s}",
                "IST0106",
                "spec",
                "only one of targetRefs or workloadSelector",
            ),
            (
                "empty selector key",
                "selector:\n  matchLabels: {\"\": a}",
                "IST0106",
                "spec.selector.matchLabels.",
                "empty key is not supported",
            ),
            (
                "wildcard selector",
                "selector:\n  matchLabels: {app: \"a*\"}",
                "IST0106",
                "spec.selector.matchLabels.app",
                "wildcard is not supported in selector: \"app=a*\"",
            ),
            (
                "long label value",
                &format!("selector:\n  matchLabels: {{app: {}}}", "a".repeat(64)),
                "IST0106",
                "spec.selector.matchLabels.app",
                "63 characters",
            ),
            (
                "empty selector warning",
                "selector: {}",
                "IST0133",
                "spec.selector",
                "workload selector specified without labels",
            ),
            (
                "targetRef without name",
                "targetRefs:\n- kind: Service",
                "IST0106",
                "spec.targetRefs[0]",
                "targetRef name must be set",
            ),
            (
                "targetRef namespace",
                "targetRefs:\n- {kind: Service, name: s, namespace: other}",
                "IST0106",
                "spec.targetRefs[0]",
                "cross namespace referencing is not supported",
            ),
            (
                "targetRef kind",
                "targetRefs:\n- {group: apps, kind: Deployment, name: d}",
                "IST0106",
                "spec.targetRefs[0]",
                "but was apps/Deployment",
            ),
            (
                "too many targetRefs",
                &format!(
                    "targetRefs:\n{}",
                    "- {kind: Service, name: s}\n".repeat(17)
                ),
                "IST0106",
                "spec.targetRefs",
                "at most 16",
            ),
            (
                "CUSTOM without rules",
                "action: CUSTOM\nprovider: {name: ext}",
                "IST0106",
                "spec",
                "CUSTOM action without `rules` is meaningless",
            ),
            (
                "CUSTOM without provider",
                "action: CUSTOM\nrules: [{}]",
                "IST0106",
                "spec",
                "`provider.name` must not be empty",
            ),
            (
                "CUSTOM with principals",
                "action: CUSTOM\nprovider: {name: ext}\nrules:\n- from:\n  - source: {principals: [a]}",
                "IST0106",
                "spec.rules[0].from[0].source.principals",
                "From.Principals is currently not supported with CUSTOM action",
            ),
            (
                "CUSTOM with serviceAccounts",
                "action: CUSTOM\nprovider: {name: ext}\nrules:\n- from:\n  - source: {serviceAccounts: [a]}",
                "IST0106",
                "spec.rules[0].from[0].source.serviceAccounts",
                "From.ServiceAccounts",
            ),
            (
                "CUSTOM with request.auth when",
                "action: CUSTOM\nprovider: {name: ext}\nrules:\n- when:\n  - {key: \"request.auth.claims[x]\", values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "request.auth.claims[x] is currently not supported with CUSTOM action",
            ),
            (
                "CUSTOM with nil when",
                "action: CUSTOM\nprovider: {name: ext}\nrules:\n- when:\n  - null",
                "IST0106",
                "spec.rules[0].when[0]",
                "when field cannot be nil",
            ),
            (
                "provider on ALLOW",
                "provider: {name: ext}\nrules: [{}]",
                "IST0106",
                "spec.provider",
                "`provider` must not be with non CUSTOM action, found ALLOW",
            ),
            (
                "DENY without rules",
                "action: DENY",
                "IST0106",
                "spec",
                "DENY action without `rules` is meaningless",
            ),
            (
                "DENY with rules: []",
                "action: DENY\nrules: []",
                "IST0106",
                "spec",
                "DENY action without `rules`",
            ),
            (
                "nil rule",
                "rules:\n- null",
                "IST0106",
                "spec.rules[0]",
                "`rule` must not be nil, found at rule 0",
            ),
            (
                "empty from",
                "rules:\n- from: []",
                "IST0106",
                "spec.rules[0].from",
                "`from` must not be empty, found at rule 0",
            ),
            (
                "nil from",
                "rules:\n- from: [null]",
                "IST0106",
                "spec.rules[0].from[0]",
                "`from` must not be nil",
            ),
            (
                "nil source",
                "rules:\n- from: [{}]",
                "IST0106",
                "spec.rules[0].from[0]",
                "`from.source` must not be nil",
            ),
            (
                "empty source",
                "rules:\n- from: [{source: {}}]",
                "IST0106",
                "spec.rules[0].from[0].source",
                "`from.source` must not be empty",
            ),
            (
                "serviceAccounts with principals",
                "rules:\n- from:\n  - source: {serviceAccounts: [a], principals: [b]}",
                "IST0106",
                "spec.rules[0].from[0].source.serviceAccounts",
                "Cannot set serviceAccounts with namespaces or principals",
            ),
            (
                "bad ip",
                "rules:\n- from:\n  - source: {ipBlocks: [1.2.3.4, 1.2.3.256]}",
                "IST0106",
                "spec.rules[0].from[0].source.ipBlocks[1]",
                "bad IP address (1.2.3.256)",
            ),
            (
                "bad cidr",
                "rules:\n- from:\n  - source: {remoteIpBlocks: [10.0.0.0/33]}",
                "IST0106",
                "spec.rules[0].from[0].source.remoteIpBlocks[0]",
                "bad CIDR range (10.0.0.0/33)",
            ),
            (
                "leading zero ip",
                "rules:\n- from:\n  - source: {notIpBlocks: [\"010.0.0.1\"]}",
                "IST0106",
                "spec.rules[0].from[0].source.notIpBlocks[0]",
                "bad IP address",
            ),
            (
                "empty principal",
                "rules:\n- from:\n  - source: {principals: [a, \"\"]}",
                "IST0106",
                "spec.rules[0].from[0].source.principals[1]",
                "empty value not allowed, found in Principals",
            ),
            (
                "too many serviceAccounts",
                &format!(
                    "rules:\n- from:\n  - source: {{serviceAccounts: [{}]}}",
                    vec!["a"; 17].join(", ")
                ),
                "IST0106",
                "spec.rules[0].from[0].source.serviceAccounts",
                "at most 16",
            ),
            (
                "long serviceAccount",
                &format!(
                    "rules:\n- from:\n  - source: {{serviceAccounts: [{}]}}",
                    "a".repeat(321)
                ),
                "IST0106",
                "spec.rules[0].from[0].source.serviceAccounts[0]",
                "320",
            ),
            (
                "wildcard serviceAccount",
                "rules:\n- from:\n  - source: {serviceAccounts: [\"ns/*\"]}",
                "IST0106",
                "spec.rules[0].from[0].source.serviceAccounts[0]",
                "wildcard",
            ),
            (
                "serviceAccount with two slashes",
                "rules:\n- from:\n  - source: {notServiceAccounts: [a/b/c]}",
                "IST0106",
                "spec.rules[0].from[0].source.notServiceAccounts[0]",
                "expected <namespace>/<name>",
            ),
            (
                "serviceAccount with empty part",
                "rules:\n- from:\n  - source: {serviceAccounts: [\"/b\"]}",
                "IST0106",
                "spec.rules[0].from[0].source.serviceAccounts[0]",
                "expected <namespace>/<name>",
            ),
            (
                "trust domain middle wildcard",
                "rules:\n- from:\n  - source: {trustDomains: [\"a*b\"]}",
                "IST0106",
                "spec.rules[0].from[0].source.trustDomains[0]",
                "only one wildcard",
            ),
            (
                "trust domain slash",
                "rules:\n- from:\n  - source: {notTrustDomains: [a/b]}",
                "IST0106",
                "spec.rules[0].from[0].source.notTrustDomains[0]",
                "must not contain '/'",
            ),
            (
                "empty to",
                "rules:\n- to: []",
                "IST0106",
                "spec.rules[0].to",
                "`to` must not be empty, found at rule 0",
            ),
            (
                "nil to",
                "rules:\n- to: [null]",
                "IST0106",
                "spec.rules[0].to[0]",
                "`to` must not be nil",
            ),
            (
                "nil operation",
                "rules:\n- to: [{}]",
                "IST0106",
                "spec.rules[0].to[0]",
                "`to.operation` must not be nil",
            ),
            (
                "empty operation",
                "rules:\n- to: [{operation: {}}]",
                "IST0106",
                "spec.rules[0].to[0].operation",
                "`to.operation` must not be empty",
            ),
            (
                "bad port",
                "rules:\n- to:\n  - operation: {ports: [\"80\", abc]}",
                "IST0106",
                "spec.rules[0].to[0].operation.ports[1]",
                "bad port (abc)",
            ),
            (
                "port out of range",
                "rules:\n- to:\n  - operation: {notPorts: [\"70000\"]}",
                "IST0106",
                "spec.rules[0].to[0].operation.notPorts[0]",
                "bad port (70000)",
            ),
            (
                "signed port",
                "rules:\n- to:\n  - operation: {ports: [\"+80\"]}",
                "IST0106",
                "spec.rules[0].to[0].operation.ports[0]",
                "invalid syntax",
            ),
            (
                "empty method",
                "rules:\n- to:\n  - operation: {methods: [\"\"]}",
                "IST0106",
                "spec.rules[0].to[0].operation.methods[0]",
                "empty value not allowed, found in Methods",
            ),
            (
                "brace in path",
                "rules:\n- to:\n  - operation: {paths: [\"/api/{id}\"]}",
                "IST0106",
                "spec.rules[0].to[0].operation.paths[0]",
                "found in Paths",
            ),
            (
                "template after {**}",
                "rules:\n- to:\n  - operation: {notPaths: [\"/a/{**}/{*}\"]}",
                "IST0106",
                "spec.rules[0].to[0].operation.notPaths[0]",
                "found in NotPaths",
            ),
            (
                "empty when key",
                "rules:\n- when:\n  - {values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "`key` must not be empty",
            ),
            (
                "when without values",
                "rules:\n- when:\n  - {key: source.ip}",
                "IST0106",
                "spec.rules[0].when[0]",
                "at least one of `values` or `notValues` must be set for key source.ip",
            ),
            (
                "when empty value",
                "rules:\n- when:\n  - {key: source.namespace, values: [\"\"]}",
                "IST0106",
                "spec.rules[0].when[0].values[0]",
                "empty value not allowed",
            ),
            (
                "when bad ip",
                "rules:\n- when:\n  - {key: destination.ip, notValues: [nope]}",
                "IST0106",
                "spec.rules[0].when[0].notValues[0]",
                "invalid `notValue` for `key` destination.ip: bad IP address (nope)",
            ),
            (
                "when bad port",
                "rules:\n- when:\n  - {key: destination.port, values: [\"-1\"]}",
                "IST0106",
                "spec.rules[0].when[0].values[0]",
                "bad port (-1)",
            ),
            (
                "when bad header key",
                "rules:\n- when:\n  - {key: \"request.headers[]\", values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "bad key (request.headers[]): should have format a[b]",
            ),
            (
                "when dotted claim",
                "rules:\n- when:\n  - {key: request.auth.claims.groups, values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "should have format a[b]",
            ),
            (
                "when destination.namespace",
                "rules:\n- when:\n  - {key: destination.namespace, values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "attribute destination.namespace is replaced by the metadata.namespace",
            ),
            (
                "when destination.labels",
                "rules:\n- when:\n  - {key: \"destination.labels[app]\", values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "is replaced by the workload selector",
            ),
            (
                "when destination.name",
                "rules:\n- when:\n  - {key: destination.name, values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "deprecated attribute destination.name: only supported in v1alpha1",
            ),
            (
                "when destination.user",
                "rules:\n- when:\n  - {key: destination.user, values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "deprecated attribute destination.user",
            ),
            (
                "when unknown key",
                "rules:\n- when:\n  - {key: source.user, values: [a]}",
                "IST0106",
                "spec.rules[0].when[0].key",
                "unknown attribute: source.user",
            ),
            (
                "when bad serviceAccount",
                "rules:\n- when:\n  - {key: source.serviceAccount, values: [\"a/*\"]}",
                "IST0106",
                "spec.rules[0].when[0].values[0]",
                "wildcard",
            ),
            (
                "when bad trust domain",
                "rules:\n- when:\n  - {key: source.trustDomain, values: [\"*a*\"]}",
                "IST0106",
                "spec.rules[0].when[0].values[0]",
                "only one wildcard",
            ),
            (
                "too many rules",
                &format!("rules:\n{}", "- {}\n".repeat(513)),
                "IST0106",
                "spec.rules",
                "at most 512",
            ),
            (
                "too many from",
                &format!(
                    "rules:\n- from:\n{}",
                    "  - source: {principals: [a]}\n".repeat(513)
                ),
                "IST0106",
                "spec.rules[0].from",
                "at most 512",
            ),
            (
                "DENY with only HTTP fields in to",
                "action: DENY\nrules:\n- to:\n  - operation: {methods: [GET]}",
                "IST0133",
                "spec.rules[0]",
                "will deny all traffic to TCP ports",
            ),
            (
                "DENY with only requestPrincipals",
                "action: DENY\nrules:\n- from:\n  - source: {requestPrincipals: [\"*\"]}",
                "IST0133",
                "spec.rules[0]",
                "will deny all traffic to TCP ports",
            ),
        ];
        for (name, spec, code, field, msg) in cases {
            assert_case(name, &ap(spec), code, field, msg);
        }
    }

    #[test]
    fn valid_policies_have_no_findings() {
        let specs = [
            "{}",
            "rules: [{}]",
            "action: DENY\nrules: [{}]",
            "action: AUDIT",
            "action: CUSTOM\nprovider: {name: ext}\nrules:\n- to:\n  - operation: {paths: [\"/x\"]}\n  from:\n  - source: {ipBlocks: [10.0.0.0/8]}",
            "selector:\n  matchLabels: {app: a}\nrules:\n- from:\n  - source: {principals: [\"cluster.local/ns/a/sa/b\"], namespaces: [\"prod*\"], ipBlocks: [\"::1\", \"fe80::1%eth0\", \"10.0.0.0/8\"]}\n  - source: {serviceAccounts: [\"ns/sa\", sa], trustDomains: [\"*.local\", \"td\"]}\n  to:\n  - operation: {ports: [\"0\", \"0080\", \"65535\"], paths: [\"/a/{*}/b/{**}\", \"/a*\"], methods: [GET], hosts: [\"a.com\", \"a.com:*\"]}\n  when:\n  - {key: \"request.headers[x-a]\", values: [b]}\n  - {key: \"request.auth.claims[iss]\", notValues: [c]}\n  - {key: \"experimental.envoy.filters.a[b]\", values: [c]}\n  - {key: destination.port, values: [\"80\"]}\n  - {key: connection.sni, values: [a]}\n  - {key: remote.ip, values: [1.2.3.4/32]}",
            "action: DENY\nrules:\n- to:\n  - operation: {ports: [\"8080\"], methods: [GET]}",
            "action: DENY\nrules:\n- from:\n  - source: {namespaces: [a]}",
            "targetRefs:\n- {kind: Gateway, group: gateway.networking.k8s.io, name: g}\n- {kind: Service, name: s}\n- {kind: ServiceEntry, group: networking.istio.io, name: e}",
            "targetRef: {kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}",
        ];
        for s in specs {
            let f = findings(&ap(s));
            assert!(f.is_empty(), "{s}: {f:#?}");
        }
    }

    #[test]
    fn field_paths_resolve_to_lines() {
        let text = ap("rules:\n- to:\n  - operation:\n      ports:\n      - \"80\"\n      - abc");
        let d = validate(&load(&text));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].line, 12);
        assert_eq!(d[0].file, "t.yaml");
        assert_eq!(d[0].resource.as_deref(), Some("AuthorizationPolicy foo/p"));
    }

    fn ra(spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: r\n  namespace: foo\nspec:\n{}",
            indent(spec)
        )
    }

    const PUBLIC_JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"k","alg":"RS256","n":"wHN8AdyHKdsUrUFzWqjuVRbA-Hl7xDVxqjJc4uF1JuSIDYYA6Nim9HE1kl-lkK-2pndRUUy8WCz7OrcZxuLDdQAOmG8tN59jvMmhUZlq3hXm3ZBVdEKBKf3TGiyqVlV5lbMyhoV1CZxIDhvIxnDUS3zO4QOFf8q5lVCQd6d-NQGJklDPmeImFDIrtw2BclbE8Bx6PeVvg_CymUPiU2-9yGVvdsolt6Gn2pl1znUWCVSxLm3rDyyBOzfqpJlyHFvYrFpe03UBzsGRtp3zmxt7bcD0IdrnIWnQIcmVEj7mQpCAfchu6FsBzeiSEsmgK6djjKxDeJB8rg1PGW5f65Z-Mw","e":"AQAB"}]}"#;

    #[test]
    fn request_authentication_checks() {
        let private = PUBLIC_JWKS.replace(r#""e":"AQAB""#, r#""e":"AQAB","d":"AQAB""#);
        let cases: Vec<(&str, String, &str, &str, &str)> = vec![
            (
                "no issuer",
                "jwtRules:\n- audiences: [a]".into(),
                "IST0106",
                "spec.jwtRules[0].issuer",
                "issuer must be set",
            ),
            (
                "empty audience",
                "jwtRules:\n- {issuer: i, audiences: [\"\"]}".into(),
                "IST0106",
                "spec.jwtRules[0].audiences[0]",
                "audience must be non-empty string",
            ),
            (
                "bad jwksUri scheme",
                "jwtRules:\n- {issuer: i, jwksUri: \"ftp://x/jwks\"}".into(),
                "IST0106",
                "spec.jwtRules[0].jwksUri",
                "URI scheme \"ftp\" is not supported",
            ),
            (
                "jwksUri without scheme",
                "jwtRules:\n- {issuer: i, jwksUri: \"example.com/jwks\"}".into(),
                "IST0106",
                "spec.jwtRules[0].jwksUri",
                "URI scheme \"\" is not supported",
            ),
            (
                "jwksUri bad port",
                "jwtRules:\n- {issuer: i, jwksUri: \"https://x:abc/jwks\"}".into(),
                "IST0106",
                "spec.jwtRules[0].jwksUri",
                "invalid port",
            ),
            (
                "jwksUri too long",
                format!(
                    "jwtRules:\n- {{issuer: i, jwksUri: \"https://x/{}\"}}",
                    "a".repeat(2048)
                ),
                "IST0106",
                "spec.jwtRules[0].jwksUri",
                "2048",
            ),
            (
                "bad jwks",
                "jwtRules:\n- {issuer: i, jwks: \"{not json\"}".into(),
                "IST0106",
                "spec.jwtRules[0].jwks",
                "jwks parse error",
            ),
            (
                "private jwks",
                format!("jwtRules:\n- issuer: i\n  jwks: '{private}'"),
                "IST0133",
                "spec.jwtRules[0].jwks",
                "private key material",
            ),
            (
                "jwks and jwksUri",
                format!("jwtRules:\n- issuer: i\n  jwksUri: https://x/j\n  jwks: '{PUBLIC_JWKS}'"),
                "IST0106",
                "spec.jwtRules[0]",
                "only one of jwks or jwksUri",
            ),
            (
                "nil header",
                "jwtRules:\n- issuer: i\n  fromHeaders: [null]".into(),
                "IST0106",
                "spec.jwtRules[0].fromHeaders[0]",
                "location header name must be non-null",
            ),
            (
                "empty header name",
                "jwtRules:\n- issuer: i\n  fromHeaders: [{prefix: \"Bearer \"}]".into(),
                "IST0106",
                "spec.jwtRules[0].fromHeaders[0].name",
                "location header name must be non-empty string",
            ),
            (
                "empty param",
                "jwtRules:\n- issuer: i\n  fromParams: [\"\"]".into(),
                "IST0106",
                "spec.jwtRules[0].fromParams[0]",
                "location query must be non-empty string",
            ),
            (
                "empty cookie",
                "jwtRules:\n- issuer: i\n  fromCookies: [\"\"]".into(),
                "IST0106",
                "spec.jwtRules[0].fromCookies[0]",
                "cookie name must be non-empty string",
            ),
            (
                "nil claim to header",
                "jwtRules:\n- issuer: i\n  outputClaimToHeaders: [null]".into(),
                "IST0106",
                "spec.jwtRules[0].outputClaimToHeaders[0]",
                "must not be null",
            ),
            (
                "empty claim",
                "jwtRules:\n- issuer: i\n  outputClaimToHeaders: [{header: x-a}]".into(),
                "IST0106",
                "spec.jwtRules[0].outputClaimToHeaders[0]",
                "header and claim value must be non-empty string",
            ),
            (
                "bad claim header",
                "jwtRules:\n- issuer: i\n  outputClaimToHeaders: [{header: \"x a\", claim: c}]"
                    .into(),
                "IST0106",
                "spec.jwtRules[0].outputClaimToHeaders[0].header",
                "header name x a is not a valid header name",
            ),
            (
                "timeout too small",
                "jwtRules:\n- {issuer: i, timeout: 0.0001s}".into(),
                "IST0106",
                "spec.jwtRules[0].timeout",
                "duration must be greater than 1ms",
            ),
            (
                "timeout precision",
                "jwtRules:\n- {issuer: i, timeout: 1.0005s}".into(),
                "IST0106",
                "spec.jwtRules[0].timeout",
                "ms precision",
            ),
            (
                "timeout garbage",
                "jwtRules:\n- {issuer: i, timeout: soon}".into(),
                "IST0106",
                "spec.jwtRules[0].timeout",
                "invalid duration",
            ),
            (
                "empty space-delimited claim",
                "jwtRules:\n- {issuer: i, spaceDelimitedClaims: [\"\"]}".into(),
                "IST0106",
                "spec.jwtRules[0].spaceDelimitedClaims[0]",
                "empty",
            ),
            (
                "too many space-delimited claims",
                format!(
                    "jwtRules:\n- {{issuer: i, spaceDelimitedClaims: [{}]}}",
                    vec!["c"; 65].join(", ")
                ),
                "IST0106",
                "spec.jwtRules[0].spaceDelimitedClaims",
                "at most 64",
            ),
            (
                "RA selector wildcard",
                "selector:\n  matchLabels: {app: \"*\"}".into(),
                "IST0106",
                "spec.selector.matchLabels.app",
                "wildcard",
            ),
            (
                "RA targetRef and selector",
                "selector:\n  matchLabels: {app: a}\ntargetRefs: [{kind: Service, name: s}]".into(),
                "IST0106",
                "spec",
                "only one of",
            ),
            (
                "RA bad targetRef",
                "targetRef: {kind: Pod, name: s}".into(),
                "IST0106",
                "spec.targetRef",
                "but was /Pod",
            ),
        ];
        for (name, spec, code, field, msg) in &cases {
            assert_case(name, &ra(spec), code, field, msg);
        }
        let ok = [
            format!("jwtRules:\n- issuer: i\n  jwks: '{PUBLIC_JWKS}'\n  timeout: 1.5s"),
            "jwtRules:\n- {jwksUri: \"https://x:8443/jwks\", timeout: 1m30s}\n- null".into(),
            "jwtRules:\n- {issuer: i, jwksUri: \"http://[::1]:80/jwks\", timeout: 500ms}".into(),
        ];
        for s in ok {
            let f = findings(&ra(&s));
            assert!(f.is_empty(), "{s}: {f:#?}");
        }
    }

    fn pa(spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: pa\n  namespace: foo\nspec:\n{}",
            indent(spec)
        )
    }

    #[test]
    fn peer_authentication_checks() {
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            (
                "port level without selector",
                "portLevelMtls:\n  8080: {mode: DISABLE}",
                "IST0106",
                "spec.portLevelMtls",
                "mesh/namespace peer authentication cannot have port level mTLS",
            ),
            (
                "port level with empty selector",
                "selector: {matchLabels: {}}\nportLevelMtls:\n  8080: {mode: DISABLE}",
                "IST0106",
                "spec.portLevelMtls",
                "cannot have port level mTLS",
            ),
            (
                "empty port level",
                "selector: {matchLabels: {app: a}}\nportLevelMtls: {}",
                "IST0106",
                "spec.portLevelMtls",
                "must have at least one element",
            ),
            (
                "port zero",
                "selector: {matchLabels: {app: a}}\nportLevelMtls:\n  0: {mode: DISABLE}",
                "IST0106",
                "spec.portLevelMtls.0",
                "port number 0 must be in the range 1..65535",
            ),
            (
                "port too big",
                "selector: {matchLabels: {app: a}}\nportLevelMtls:\n  65536: {mode: DISABLE}",
                "IST0106",
                "spec.portLevelMtls.65536",
                "1..65535",
            ),
            (
                "PA selector wildcard",
                "selector: {matchLabels: {\"a*\": b}}",
                "IST0106",
                "spec.selector.matchLabels.a*",
                "wildcard",
            ),
            (
                "PA empty selector",
                "selector: {}\nmtls: {mode: STRICT}",
                "IST0133",
                "spec.selector",
                "without labels",
            ),
        ];
        for (name, spec, code, field, msg) in cases {
            assert_case(name, &pa(spec), code, field, msg);
        }
        let f = findings(&pa(
            "selector: {matchLabels: {app: a}}\nmtls: {mode: STRICT}\nportLevelMtls:\n  8080: {mode: DISABLE}",
        ));
        assert!(f.is_empty(), "{f:#?}");
    }

    #[test]
    fn dry_run_annotation_checks() {
        let with = |kind: &str, value: &str, spec: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: x\n  namespace: foo\n  annotations:\n    istio.io/dry-run: \"{value}\"\nspec:\n{}",
                indent(spec)
            )
        };
        assert_case(
            "misplaced",
            &with("PeerAuthentication", "true", "mtls: {mode: STRICT}"),
            "IST0107",
            DRY_RUN_FIELD,
            "can only be applied to AuthorizationPolicy",
        );
        assert_case(
            "misplaced on RA",
            &with("RequestAuthentication", "true", "{}"),
            "IST0107",
            DRY_RUN_FIELD,
            "Misplaced annotation",
        );
        assert_case(
            "alpha",
            &with("AuthorizationPolicy", "true", "{}"),
            "IST0136",
            DRY_RUN_FIELD,
            "alpha-phase",
        );
        assert_case(
            "unparseable",
            &with("AuthorizationPolicy", "yes", "{}"),
            "IST0133",
            DRY_RUN_FIELD,
            "policy is enforced",
        );
        assert_case(
            "audit dry-run",
            &with("AuthorizationPolicy", "false", "action: AUDIT"),
            "IST0133",
            DRY_RUN_FIELD,
            "only supports action ALLOW/DENY, found action AUDIT",
        );
        let d = validate(&load(&with("AuthorizationPolicy", "True", "{}")));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].severity, Severity::Info);
        assert_eq!(d[0].line, 7);
        let d = validate(&load(&with("AuthorizationPolicy", "0", "{}")));
        assert!(d.iter().all(|d| d.code == "IST0136"), "{d:?}");
    }

    fn mesh_findings(mesh: &str) -> Vec<(String, String, String)> {
        let mut l = Loader::new();
        l.set_mesh_text("mesh.yaml", mesh);
        let (cfg, diags) = l.finish();
        assert!(diags.is_empty(), "{diags:?}");
        validate(&cfg)
            .into_iter()
            .map(|d| (d.code.to_string(), d.field.unwrap_or_default(), d.message))
            .collect()
    }

    #[test]
    fn extension_provider_checks() {
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            (
                "empty name",
                "extensionProviders:\n- envoyExtAuthzHttp: {service: a.b, port: 80}",
                "IST0106",
                "extensionProviders[0].name",
                "empty extension provider name",
            ),
            (
                "duplicate name",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a.b, port: 80}}\n- {name: a, envoyExtAuthzGrpc: {service: a.b, port: 80}}",
                "IST0106",
                "extensionProviders[1].name",
                "duplicate extension provider name a",
            ),
            (
                "bad port",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a.b, port: 0}}",
                "IST0106",
                "extensionProviders[0].envoyExtAuthzHttp.port",
                "port number 0 must be in the range 1..65535",
            ),
            (
                "grpc bad port",
                "extensionProviders:\n- {name: a, envoyExtAuthzGrpc: {service: a.b, port: 70000}}",
                "IST0106",
                "extensionProviders[0].envoyExtAuthzGrpc.port",
                "invalid service port",
            ),
            (
                "no service",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {port: 80}}",
                "IST0106",
                "extensionProviders[0].envoyExtAuthzHttp.service",
                "service must not be empty",
            ),
            (
                "bad service",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: \"Bad_Host\", port: 80}}",
                "IST0106",
                "extensionProviders[0].envoyExtAuthzHttp.service",
                "invalid service fmt Bad_Host",
            ),
            (
                "bad namespace in service",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: \"Foo/a.b\", port: 80}}",
                "IST0106",
                "extensionProviders[0].envoyExtAuthzHttp.service",
                "invalid namespace",
            ),
            (
                "bad statusOnError",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a.b, port: 80, statusOnError: \"abc\"}}",
                "IST0106",
                "extensionProviders[0].envoyExtAuthzHttp.statusOnError",
                "invalid statusOnError value abc",
            ),
            (
                "unsupported statusOnError",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a.b, port: 80, statusOnError: \"299\"}}",
                "IST0106",
                "extensionProviders[0].envoyExtAuthzHttp.statusOnError",
                "unsupported statusOnError value 299",
            ),
            (
                "pathPrefix",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a.b, port: 80, pathPrefix: check}}",
                "IST0106",
                "extensionProviders[0].envoyExtAuthzHttp.pathPrefix",
                "pathPrefix should begin with `/`",
            ),
            (
                "lone star header",
                "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: a.b, port: 80, headersToUpstreamOnAllow: [x, \"*\"]}}",
                "IST0133",
                "extensionProviders[0].envoyExtAuthzHttp.headersToUpstreamOnAllow[1]",
                "lone \"*\"",
            ),
            (
                "name not a DNS label",
                "extensionProviders:\n- {name: My_Authz, envoyExtAuthzHttp: {service: a.b, port: 80}}",
                "IST0133",
                "extensionProviders[0].name",
                "not a DNS label",
            ),
        ];
        for (name, mesh, code, field, msg) in cases {
            let f = mesh_findings(mesh);
            assert!(
                f.iter()
                    .any(|(c, fl, m)| c == code && fl == field && m.contains(msg)),
                "{name}: {f:#?}"
            );
        }
        let ok = "extensionProviders:\n- {name: a, envoyExtAuthzHttp: {service: authz.foo.svc.cluster.local, port: 8000, statusOnError: \"503\", pathPrefix: /check}}\n- {name: b, envoyExtAuthzGrpc: {service: foo/authz.foo.svc.cluster.local, port: 9000}}\n- {name: c, envoyExtAuthzGrpc: {service: 10.0.0.1, port: 9000}}\n- {name: t, zipkin: {service: z, port: 9411}}";
        let f = mesh_findings(ok);
        assert!(f.is_empty(), "{f:#?}");
    }

    #[test]
    fn value_helpers() {
        assert!(parse_go_prefix("10.0.0.0/8"));
        assert!(parse_go_prefix("::/0"));
        assert!(!parse_go_prefix("10.0.0.0/08"));
        assert!(!parse_go_prefix("10.0.0.0/+8"));
        assert!(!parse_go_prefix("fe80::1%eth0/64"));
        assert!(!parse_go_prefix("10.0.0.0/"));
        assert!(parse_go_addr("fe80::1%eth0").is_some());
        assert!(parse_go_addr("fe80::1%").is_none());
        assert_eq!(parse_duration_nanos("1.5s"), Some(1_500_000_000));
        assert_eq!(parse_duration_nanos("1h1m"), Some(3_660_000_000_000));
        assert_eq!(parse_duration_nanos("0"), Some(0));
        assert_eq!(parse_duration_nanos("-1s"), Some(-1_000_000_000));
        assert_eq!(parse_duration_nanos("1"), None);
        assert_eq!(parse_duration_nanos(".s"), None);
        assert_eq!(parse_duration_nanos(""), None);
        assert!(map_key_ok("request.headers[a]"));
        assert!(!map_key_ok("request.headers[]"));
        assert!(!map_key_ok("[a]"));
        assert!(!map_key_ok("request.headers[a]x"));
        assert!(jwks_uri_problem("https://u:p@host:1/x?y").is_ok());
        assert!(jwks_uri_problem("https://[::1/x").is_err());
    }
}
