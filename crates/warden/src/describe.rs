//! `warden describe NS/WORKLOAD`: everything that applies to one workload's inbound traffic,
//! and a short summary of who may reach it.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use warden_policy::authz::{is_dry_run, CompiledAuthz};
use warden_policy::config::Resource;
use warden_policy::model::{Action, AuthorizationPolicySpec, MtlsMode, Rule, Source};
use warden_policy::scope;
use warden_policy::simulate::declared_protocol;

use crate::{ConfigArgs, Format};

#[derive(Args)]
pub struct DescribeArgs {
    /// The workload: NAMESPACE/WORKLOAD.
    #[arg(value_name = "NS/WORKLOAD")]
    workload: String,
    #[command(flatten)]
    config: ConfigArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Format,
}

#[derive(Serialize)]
struct PortOut {
    port: u16,
    protocol: String,
    mtls_mode: &'static str,
    set_by: String,
}

/// The mode of every port not listed: the workload-wide result of mesh → namespace →
/// workload PeerAuthentication (port-level settings do not reach it).
#[derive(Serialize)]
struct OtherPortsOut {
    mtls_mode: &'static str,
    set_by: String,
}

#[derive(Serialize)]
struct JwtOut {
    issuer: String,
    policy: String,
    audiences: Vec<String>,
    keys: String,
}

#[derive(Serialize)]
struct PolicyOut {
    namespace: String,
    name: String,
    action: &'static str,
    dry_run: bool,
    provider: Option<String>,
    /// Why this CUSTOM policy is enforced as DENY instead (provider unusable, or more than one
    /// CUSTOM provider on the workload).
    #[serde(skip_serializing_if = "Option::is_none")]
    bad_custom: Option<String>,
    rules: Vec<String>,
}

#[derive(Serialize)]
struct DescribeOut {
    schema: u32,
    workload: String,
    kind: &'static str,
    sidecar: bool,
    identity: String,
    labels: std::collections::BTreeMap<String, String>,
    ports: Vec<PortOut>,
    other_ports: OtherPortsOut,
    jwt_rules: Vec<JwtOut>,
    policies: Vec<PolicyOut>,
    summary: Vec<String>,
}

fn list(name: &str, v: &[String], out: &mut Vec<String>) {
    if !v.is_empty() {
        out.push(format!("{name} {}", v.join(",")));
    }
}

/// One rule in a line: `from (…) or (…), to (…), when …`.
pub fn rule_text(r: &Option<Rule>) -> String {
    let Some(r) = r else {
        return "(null rule: skipped)".into();
    };
    let mut parts = Vec::new();
    let froms: Vec<String> = r
        .from
        .iter()
        .flatten()
        .flatten()
        .map(|f| {
            let s = f.source.clone().unwrap_or_default();
            let mut o = Vec::new();
            list("principals", &s.principals, &mut o);
            list("notPrincipals", &s.not_principals, &mut o);
            list("requestPrincipals", &s.request_principals, &mut o);
            list("notRequestPrincipals", &s.not_request_principals, &mut o);
            list("namespaces", &s.namespaces, &mut o);
            list("notNamespaces", &s.not_namespaces, &mut o);
            list("serviceAccounts", &s.service_accounts, &mut o);
            list("notServiceAccounts", &s.not_service_accounts, &mut o);
            list("trustDomains", &s.trust_domains, &mut o);
            list("notTrustDomains", &s.not_trust_domains, &mut o);
            list("ipBlocks", &s.ip_blocks, &mut o);
            list("notIpBlocks", &s.not_ip_blocks, &mut o);
            list("remoteIpBlocks", &s.remote_ip_blocks, &mut o);
            list("notRemoteIpBlocks", &s.not_remote_ip_blocks, &mut o);
            format!("({})", o.join("; "))
        })
        .collect();
    if !froms.is_empty() {
        parts.push(format!("from {}", froms.join(" or ")));
    }
    let tos: Vec<String> =
        r.to.iter()
            .flatten()
            .flatten()
            .map(|t| {
                let op = t.operation.clone().unwrap_or_default();
                let mut o = Vec::new();
                list("hosts", &op.hosts, &mut o);
                list("notHosts", &op.not_hosts, &mut o);
                list("ports", &op.ports, &mut o);
                list("notPorts", &op.not_ports, &mut o);
                list("methods", &op.methods, &mut o);
                list("notMethods", &op.not_methods, &mut o);
                list("paths", &op.paths, &mut o);
                list("notPaths", &op.not_paths, &mut o);
                format!("({})", o.join("; "))
            })
            .collect();
    if !tos.is_empty() {
        parts.push(format!("to {}", tos.join(" or ")));
    }
    for c in r.when.iter().flatten().flatten() {
        if !c.values.is_empty() {
            parts.push(format!("when {} in [{}]", c.key, c.values.join(",")));
        }
        if !c.not_values.is_empty() {
            parts.push(format!(
                "when {} not in [{}]",
                c.key,
                c.not_values.join(",")
            ));
        }
    }
    if parts.is_empty() {
        "any request".into()
    } else {
        parts.join(", ")
    }
}

pub fn run(a: &DescribeArgs, verbose: bool) -> Result<ExitCode> {
    let Some((ns, name)) = a.workload.split_once('/') else {
        bail!("\"{}\" must be NAMESPACE/WORKLOAD", a.workload);
    };
    let cfg = crate::load_checked(&a.config, verbose)?;
    let Some(wl) = cfg.workload(ns, name) else {
        bail!("no workload {ns}/{name} in the configuration");
    };
    let pa = scope::peer_authentication(&cfg, wl);
    let mut ports: BTreeSet<u16> = wl.ports.iter().map(|p| p.container_port).collect();
    ports.extend(pa.ports.keys());
    let mut port_out = Vec::new();
    // Protocol per container port, from the Service ports that target it.
    let mut declared: std::collections::BTreeMap<u16, String> = Default::default();
    for s in cfg.services_selecting(wl) {
        for sp in &s.spec.ports {
            let Some(t) = wl.target_port(sp) else {
                continue;
            };
            ports.insert(t);
            if let Some((p, _)) = declared_protocol(sp.name.as_deref(), sp.app_protocol.as_deref())
            {
                declared
                    .entry(t)
                    .or_insert_with(|| format!("{p:?}").to_lowercase());
            }
        }
    }
    for p in &ports {
        let m = pa.mode_for(*p);
        let proto = declared
            .get(p)
            .cloned()
            .unwrap_or_else(|| "detected".into());
        port_out.push(PortOut {
            port: *p,
            protocol: proto,
            mtls_mode: m.mode.as_str(),
            set_by: m.describe(),
        });
    }
    let other_ports = OtherPortsOut {
        mtls_mode: pa.base.mode.as_str(),
        set_by: pa.base.describe(),
    };
    let jwt_rules: Vec<JwtOut> = scope::request_authentications(&cfg, wl)
        .iter()
        .flat_map(|ra| {
            ra.spec.jwt_rules.iter().flatten().map(move |r| JwtOut {
                issuer: r.issuer.clone(),
                policy: format!("{}/{}", ra.namespace(), ra.name()),
                audiences: r.audiences.clone(),
                keys: if !r.jwks.is_empty() {
                    "inline jwks".into()
                } else {
                    format!("jwksUri {}", r.jwks_uri)
                },
            })
        })
        .collect();
    let attached = scope::authorization_policies(&cfg, wl);
    // The engine decides which CUSTOM policies are enforced as DENY (unusable provider, or
    // more than one provider on this workload); describe must not say otherwise.
    let compiled = CompiledAuthz::compile(&attached, &cfg.mesh, wl);
    let mut policies: Vec<PolicyOut> = attached
        .iter()
        .map(|p| PolicyOut {
            namespace: p.namespace().into(),
            name: p.name().into(),
            action: p.spec.action.as_str(),
            dry_run: is_dry_run(&p.meta),
            provider: p.spec.provider.as_ref().map(|x| x.name.clone()),
            bad_custom: compiled
                .policies
                .iter()
                .find(|i| i.namespace == p.namespace() && i.name == p.name())
                .and_then(|i| i.bad_custom.clone()),
            rules: p.spec.rules.iter().flatten().map(rule_text).collect(),
        })
        .collect();
    let order = |a: &str| {
        ["CUSTOM", "AUDIT", "DENY", "ALLOW"]
            .iter()
            .position(|x| *x == a)
            .unwrap_or(9)
    };
    policies.sort_by_key(|p| (order(p.action), p.namespace.clone(), p.name.clone()));

    let mut summary = Vec::new();
    if !wl.sidecar {
        summary
            .push("no sidecar: nothing is enforced, anyone who can reach the pod is let in".into());
    } else {
        summary.push(mtls_summary(&port_out, &other_ports));
        let enforced = |act: &str| {
            policies
                .iter()
                .filter(|p| p.action == act && !p.dry_run)
                .count()
        };
        let deny = enforced(Action::Deny.as_str());
        let allow = enforced(Action::Allow.as_str());
        let custom = Action::Custom.as_str();
        if policies
            .iter()
            .any(|p| p.action == custom && !p.dry_run && p.bad_custom.is_none())
        {
            summary
                .push("matching requests are first sent to an external authorizer (CUSTOM)".into());
        }
        // One line per reason: with two providers every CUSTOM policy shares it.
        let mut refused: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for p in policies.iter().filter(|p| p.action == custom && !p.dry_run) {
            if let Some(why) = &p.bad_custom {
                refused
                    .entry(why.as_str())
                    .or_default()
                    .push(format!("{}/{}", p.namespace, p.name));
            }
        }
        for (why, names) in refused {
            summary.push(format!(
                "requests matching CUSTOM {} {} are denied (403, fail closed), not sent to an \
                 external authorizer: {why}",
                if names.len() == 1 {
                    "policy"
                } else {
                    "policies"
                },
                names.join(", ")
            ));
        }
        if !jwt_rules.is_empty() {
            let requirement = match token_required_by(&attached) {
                Some(TokenRule::Deny(name)) => {
                    format!("; DENY policy {name} rejects requests without a token")
                }
                Some(TokenRule::Allow) => "; ALLOW rules require a token".into(),
                None => {
                    "; requests without a token are NOT rejected by RequestAuthentication alone"
                        .into()
                }
            };
            summary.push(format!(
                "JWTs from {} are validated (invalid ones get 401){requirement}",
                jwt_rules
                    .iter()
                    .map(|j| j.issuer.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        match deny {
            0 => {}
            1 => summary.push("a DENY policy rejects matching requests first".into()),
            n => summary.push(format!("{n} DENY policies reject matching requests first")),
        }
        match allow {
            0 => summary.push("no ALLOW policy: everything not denied is allowed".into()),
            n => {
                let rules: usize = policies
                    .iter()
                    .filter(|p| p.action == "ALLOW" && !p.dry_run)
                    .map(|p| p.rules.len())
                    .sum();
                if rules == 0 {
                    summary.push(format!(
                        "{} with no rules: every request is denied (allow-nothing)",
                        plural(n, "ALLOW policy", "ALLOW policies")
                    ));
                } else {
                    summary.push(if rules == 1 {
                        "only requests matching the one ALLOW rule get in; all others get 403".to_string()
                    } else {
                        format!("only requests matching one of the {rules} ALLOW rules get in; all others get 403")
                    });
                }
            }
        }
    }
    let out = DescribeOut {
        schema: 1,
        workload: wl.id(),
        kind: wl.kind,
        sidecar: wl.sidecar,
        identity: wl.spiffe_id(&cfg.mesh.trust_domain),
        labels: wl.labels.clone(),
        ports: port_out,
        other_ports,
        jwt_rules,
        policies,
        summary,
    };
    match a.output {
        Format::Json => say!("{}", serde_json::to_string_pretty(&out)?),
        Format::Text => crate::emit(&text(&out)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Where plaintext is accepted: listed ports that are not STRICT, and every other port when
/// the workload-wide mode is not STRICT (port-level STRICT protects only the ports it names).
fn mtls_summary(ports: &[PortOut], other: &OtherPortsOut) -> String {
    let strict = MtlsMode::Strict.as_str();
    let plain: Vec<String> = ports
        .iter()
        .filter(|p| p.mtls_mode != strict)
        .map(|p| p.port.to_string())
        .collect();
    let mode = other.mtls_mode;
    let open = match (plain.is_empty(), mode == strict) {
        (true, true) => {
            return "mTLS is required on every port: only workloads with a mesh identity get in"
                .into()
        }
        (false, true) => format!("port(s) {}", plain.join(", ")),
        (true, false) if ports.is_empty() => format!("every port ({mode})"),
        (true, false) => format!("every port not listed above ({mode})"),
        (false, false) => format!(
            "port(s) {} and every port not listed above ({mode})",
            plain.join(", ")
        ),
    };
    format!("plaintext is accepted on {open}: identity-based rules cannot match those clients")
}

/// What makes a token required, if anything enforced does.
enum TokenRule {
    /// A DENY policy (named) with `notRequestPrincipals`: requests without one are denied.
    Deny(String),
    /// An ALLOW rule that needs a request principal or a claim.
    Allow,
}

fn token_required_by(policies: &[&Resource<AuthorizationPolicySpec>]) -> Option<TokenRule> {
    let enforced = |action: Action| {
        policies
            .iter()
            .filter(move |p| p.spec.action == action && !is_dry_run(&p.meta))
    };
    let rules = |p: &Resource<AuthorizationPolicySpec>| -> Vec<Rule> {
        p.spec.rules.iter().flatten().flatten().cloned().collect()
    };
    let sources = |r: &Rule| -> Vec<Source> {
        r.from
            .iter()
            .flatten()
            .flatten()
            .filter_map(|f| f.source.clone())
            .collect()
    };
    for p in enforced(Action::Deny) {
        let denies_tokenless = rules(p).iter().any(|r| {
            sources(r)
                .iter()
                .any(|s| !s.not_request_principals.is_empty())
        });
        if denies_tokenless {
            return Some(TokenRule::Deny(format!("{}/{}", p.namespace(), p.name())));
        }
    }
    let allow_needs_token = enforced(Action::Allow).any(|p| {
        rules(p).iter().any(|r| {
            sources(r).iter().any(|s| !s.request_principals.is_empty())
                || r.when
                    .iter()
                    .flatten()
                    .flatten()
                    .any(|c| c.key.starts_with("request.auth.") && !c.values.is_empty())
        })
    });
    allow_needs_token.then_some(TokenRule::Allow)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        one.to_string()
    } else {
        format!("{n} {many}")
    }
}

fn text(o: &DescribeOut) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Workload:  {} ({}, {})\n",
        o.workload,
        o.kind,
        if o.sidecar { "sidecar" } else { "no sidecar" }
    ));
    s.push_str(&format!("Identity:  {}\n", o.identity));
    s.push_str("\nInbound mTLS by container port (other = every port not listed):\n");
    if o.ports.is_empty() {
        s.push_str("  (no ports declared)\n");
    }
    for p in &o.ports {
        s.push_str(&format!("  {:<6} {:<9} {}\n", p.port, p.protocol, p.set_by));
    }
    s.push_str(&format!(
        "  {:<6} {:<9} {}\n",
        "other", "detected", o.other_ports.set_by
    ));
    s.push_str("\nJWT rules (RequestAuthentication):\n");
    if o.jwt_rules.is_empty() {
        s.push_str("  none\n");
    }
    for j in &o.jwt_rules {
        let aud = if j.audiences.is_empty() {
            "any audience".into()
        } else {
            format!("audiences {}", j.audiences.join(","))
        };
        s.push_str(&format!(
            "  issuer {} ({aud}; {}) from {}\n",
            j.issuer, j.keys, j.policy
        ));
    }
    s.push_str("\nAuthorizationPolicies (evaluated CUSTOM, AUDIT, DENY, ALLOW):\n");
    if o.policies.is_empty() {
        s.push_str("  none\n");
    }
    for p in &o.policies {
        let dry = if p.dry_run { " [dry-run]" } else { "" };
        let prov = p
            .provider
            .as_ref()
            .map(|x| format!(" provider {x}"))
            .unwrap_or_default();
        s.push_str(&format!(
            "  {:<6} {}/{}{prov}{dry}\n",
            p.action, p.namespace, p.name
        ));
        if let Some(why) = &p.bad_custom {
            s.push_str(&format!(
                "           enforced as DENY (fail closed): {why}\n"
            ));
        }
        if p.rules.is_empty() {
            s.push_str("           (no rules: matches nothing)\n");
        }
        for (i, r) in p.rules.iter().enumerate() {
            s.push_str(&format!("           rule {i}: {r}\n"));
        }
    }
    s.push_str("\nWho may reach it:\n");
    for l in &o.summary {
        s.push_str(&format!("  - {l}\n"));
    }
    s
}
