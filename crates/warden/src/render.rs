//! Rendering of a simulated verdict: the human explanation and the stable JSON object of
//! `warden check -o json` (documented in docs/json-output.md; fields are only ever added).

use serde::Serialize;
use warden_policy::authz::RuleMatch;
use warden_policy::simulate::{Scenario, Verdict};

#[derive(Serialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    pub action: &'static str,
    pub rule: u32,
    pub envoy_id: String,
}

impl From<&RuleMatch> for PolicyRef {
    fn from(m: &RuleMatch) -> Self {
        PolicyRef {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            action: m.action.as_str(),
            rule: m.rule,
            envoy_id: m.envoy_id(),
        }
    }
}

#[derive(Serialize)]
pub struct DryRunOut {
    pub action: &'static str,
    pub result: &'static str,
    pub policy: Option<PolicyRef>,
}

#[derive(Serialize)]
pub struct SourceOut {
    pub workload: Option<String>,
    pub identity: Option<String>,
    pub sidecar: bool,
    pub mtls: bool,
}

#[derive(Serialize)]
pub struct DestinationOut {
    pub workload: String,
    pub kind: &'static str,
    pub sidecar: bool,
    pub service: Option<String>,
    pub container_port: u16,
    pub protocol: &'static str,
    pub protocol_source: String,
    pub mtls_mode: Option<&'static str>,
    pub mtls_policy: Option<String>,
    pub mtls_level: Option<String>,
}

#[derive(Serialize)]
pub struct RequestOut {
    pub method: String,
    pub path: String,
    pub normalized_path: Option<String>,
    pub host: Option<String>,
}

#[derive(Serialize)]
pub struct CustomOut {
    pub provider: String,
    pub settings: String,
    pub answer: String,
    pub policy: PolicyRef,
}

/// `warden check -o json`, schema version 1.
#[derive(Serialize)]
pub struct CheckOut {
    pub schema: u32,
    pub result: &'static str,
    pub allowed: bool,
    pub http_status: Option<u16>,
    pub body: String,
    pub source: SourceOut,
    pub destination: DestinationOut,
    pub request: Option<RequestOut>,
    pub request_principal: Option<String>,
    pub step: Option<String>,
    pub policy: Option<PolicyRef>,
    pub no_allow_policy_matched: bool,
    pub audit: Vec<PolicyRef>,
    pub dry_run: Vec<DryRunOut>,
    pub custom: Option<CustomOut>,
    pub reason: String,
}

fn step_name<T: Serialize>(s: &T) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

pub fn to_json(sc: &Scenario, v: &Verdict) -> CheckOut {
    let d = v.decision.as_ref();
    let mode = v.destination.mtls.as_ref();
    CheckOut {
        schema: 1,
        result: v.result.as_str(),
        allowed: v.result == warden_policy::engine::Outcome::Allow,
        http_status: v.status,
        body: v.body.clone(),
        source: SourceOut {
            workload: v.source.workload.clone(),
            identity: v.source.identity.clone(),
            sidecar: v.source.sidecar,
            mtls: v.source.mtls,
        },
        destination: DestinationOut {
            workload: v.destination.workload.clone(),
            kind: v.destination.kind,
            sidecar: v.destination.sidecar,
            service: v.destination.service.clone(),
            container_port: v.destination.container_port,
            protocol: match v.destination.protocol {
                warden_policy::authz::Protocol::Http => "http",
                warden_policy::authz::Protocol::Tcp => "tcp",
            },
            protocol_source: v.destination.protocol_source.clone(),
            mtls_mode: mode.map(|m| m.mode.as_str()),
            mtls_policy: mode.and_then(|m| m.policy.clone()),
            mtls_level: mode.map(|m| step_name(&m.level)),
        },
        request: sc.request.as_ref().map(|r| RequestOut {
            method: if r.method.is_empty() {
                "GET".into()
            } else {
                r.method.clone()
            },
            path: r.path.clone(),
            normalized_path: d.and_then(|d| d.path.clone()),
            host: v.authority.clone().or_else(|| r.host.clone()),
        }),
        request_principal: v.request_principal.clone(),
        step: d.map(|d| step_name(&d.step)),
        policy: d.and_then(|d| d.deciding.as_ref()).map(PolicyRef::from),
        no_allow_policy_matched: d
            .is_some_and(|d| d.step == warden_policy::engine::Step::NoAllowMatch),
        audit: d
            .map(|d| d.audit.iter().map(PolicyRef::from).collect())
            .unwrap_or_default(),
        dry_run: d
            .map(|d| {
                d.dry_run
                    .iter()
                    .map(|x| DryRunOut {
                        action: x.action.as_str(),
                        result: x.result,
                        policy: x.matched.as_ref().map(PolicyRef::from),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        custom: d.and_then(|d| d.custom.as_ref()).map(|c| CustomOut {
            provider: c.provider.clone(),
            settings: c.settings.clone(),
            answer: step_name(&c.answer),
            policy: PolicyRef::from(&c.rule),
        }),
        reason: v.reason.clone(),
    }
}

/// The human explanation, one fact a line.
pub fn to_text(sc: &Scenario, v: &Verdict) -> String {
    let j = to_json(sc, v);
    let mut out = String::new();
    let mut line = |k: &str, val: String| {
        out.push_str(&format!("{k:<13}{val}\n"));
    };
    let result = match (j.http_status, j.body.is_empty()) {
        (Some(s), true) => format!("{} (HTTP {s})", j.result),
        (Some(s), false) => format!("{} (HTTP {s} \"{}\")", j.result, j.body),
        (None, _) if j.result == "reset" => {
            "reset (connection refused or closed, no HTTP response)".into()
        }
        (None, _) => format!("{} (TCP connection)", j.result),
    };
    line("result:", result);
    let src = match (&j.source.workload, &j.source.identity) {
        (Some(w), Some(id)) => format!("{w} as {id} (mTLS)"),
        (Some(w), None) => format!(
            "{w}, plaintext ({})",
            if j.source.sidecar {
                "auto mTLS off for this destination"
            } else {
                "no sidecar"
            }
        ),
        (None, Some(id)) => format!("{id} (mTLS peer)"),
        (None, None) => "plaintext client outside the mesh".into(),
    };
    line("source:", src);
    let via = j
        .destination
        .service
        .as_ref()
        .map(|s| format!(" via Service {s}"))
        .unwrap_or_default();
    line(
        "destination:",
        format!(
            "{} ({}{}), container port {}{via}",
            j.destination.workload,
            j.destination.kind,
            if j.destination.sidecar {
                ", sidecar"
            } else {
                ", no sidecar"
            },
            j.destination.container_port
        ),
    );
    line(
        "protocol:",
        format!(
            "{} ({})",
            j.destination.protocol, j.destination.protocol_source
        ),
    );
    if let Some(m) = &v.destination.mtls {
        line("mTLS mode:", m.describe());
    }
    if let Some(r) = &j.request {
        let host = r
            .host
            .clone()
            .map(|h| format!(" (host {h})"))
            .unwrap_or_default();
        let norm = match &r.normalized_path {
            Some(p) if p != &r.path && !r.path.starts_with(&format!("{p}?")) => {
                format!(", normalized to {p}")
            }
            _ => String::new(),
        };
        line("request:", format!("{} {}{host}{norm}", r.method, r.path));
        if v.decision.is_some() {
            line(
                "principal:",
                j.request_principal
                    .clone()
                    .unwrap_or_else(|| "none (no verified JWT)".into()),
            );
        }
    }
    if let Some(c) = &j.custom {
        line(
            "custom:",
            format!(
                "provider \"{}\" ({}) consulted for {}, answered {}",
                c.provider, c.settings, c.policy.envoy_id, c.answer
            ),
        );
    }
    match (&j.policy, j.no_allow_policy_matched) {
        (Some(p), _) => line(
            "policy:",
            format!(
                "{} {}/{} rule {} ({})",
                p.action, p.namespace, p.name, p.rule, p.envoy_id
            ),
        ),
        (None, true) => line("policy:", "no ALLOW policy matched".into()),
        (None, false) => {}
    }
    for a in &j.audit {
        line(
            "audit:",
            format!(
                "{}/{} rule {} matched ({})",
                a.namespace, a.name, a.rule, a.envoy_id
            ),
        );
    }
    for d in &j.dry_run {
        let p = d
            .policy
            .as_ref()
            .map(|p| format!(", matched {}/{} rule {}", p.namespace, p.name, p.rule))
            .unwrap_or_default();
        line(
            "dry-run:",
            format!("{} policies would have {}{p}", d.action, d.result),
        );
    }
    line("reason:", j.reason.clone());
    out
}
