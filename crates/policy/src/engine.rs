//! The decision engine for one workload's inbound traffic: the compiled AuthorizationPolicies
//! and RequestAuthentication providers that apply to it, and the one function that decides a
//! request or connection in Envoy's filter order. The proxy and the offline tools both call
//! [`WorkloadPolicy::evaluate`]; nothing else decides.

use std::net::IpAddr;

use serde::Serialize;

use crate::authz::{Attrs, CompiledAuthz, HttpAttrs, Protocol, RbacResult, RuleMatch};
use crate::config::{Config, Resource, Workload};
use crate::jwt::{self, JwtOutcome, JwtProvider, KeySource, TokenRequest};
use crate::mesh::{ExtAuthzKind, MeshConfig};
use crate::model::{Action, JwtRule, RequestAuthenticationSpec};
use crate::path::{normalize, split_request_target, Normalization};
use crate::scope;

/// The body Envoy's RBAC filter answers a denied HTTP request with.
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";

/// Everything inbound enforcement needs for one workload, compiled once.
#[derive(Debug, Clone)]
pub struct WorkloadPolicy {
    pub authz: CompiledAuthz,
    pub jwt: Vec<JwtProvider>,
    /// `namespace/name` of the RequestAuthentication behind each provider in `jwt`.
    pub jwt_sources: Vec<String>,
    pub normalization: Normalization,
    mesh: MeshConfig,
}

/// How the engine learns the keys of a `jwksUri` (fetched elsewhere: this crate does no I/O).
pub trait JwksSource {
    fn keys_for(&self, rule: &JwtRule) -> KeySource;
}

/// Inline `jwks` only; a rule with just a `jwksUri` has no keys (tokens fail closed).
pub struct InlineJwksOnly;

impl JwksSource for InlineJwksOnly {
    fn keys_for(&self, rule: &JwtRule) -> KeySource {
        inline_keys(rule).unwrap_or_else(|| KeySource::Unavailable {
            reason: format!("jwksUri {} was not fetched", rule.jwks_uri),
        })
    }
}

/// The keys of a rule's inline `jwks`, if it has one. Istio prefers inline keys.
pub fn inline_keys(rule: &JwtRule) -> Option<KeySource> {
    if rule.jwks.is_empty() {
        return None;
    }
    Some(KeySource::from_jwks_json(&rule.jwks))
}

/// Builds the JWT providers of the given RequestAuthentications, sorted by issuer as Istio does.
pub fn jwt_providers(
    policies: &[&Resource<RequestAuthenticationSpec>],
    jwks: &dyn JwksSource,
) -> (Vec<JwtProvider>, Vec<String>) {
    let mut all: Vec<(JwtProvider, String)> = Vec::new();
    for p in policies {
        for r in p.spec.jwt_rules.iter().flatten() {
            let provider = JwtProvider {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                keys: jwks.keys_for(r),
                from_headers: r
                    .from_headers
                    .iter()
                    .flatten()
                    .map(|h| jwt::HeaderLocation {
                        name: h.name.to_ascii_lowercase(),
                        prefix: h.prefix.clone(),
                    })
                    .collect(),
                from_params: r.from_params.clone(),
                from_cookies: r.from_cookies.clone(),
                space_delimited_claims: r.space_delimited_claims.clone(),
            };
            all.push((provider, format!("{}/{}", p.namespace(), p.name())));
        }
    }
    all.sort_by(|a, b| a.0.issuer.cmp(&b.0.issuer));
    all.into_iter().unzip()
}

/// One inbound request or connection, as the proxy sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    pub source_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    /// Container (target) port the connection arrived on.
    pub destination_port: u16,
    pub sni: Option<&'a str>,
    /// The peer's SPIFFE ID; `None` for plaintext.
    pub peer: Option<&'a str>,
    pub http: Option<HttpRequest<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    /// Request target as sent: path, query and maybe a fragment.
    pub target: &'a str,
    /// Lowercase header names, repeated headers as separate entries.
    pub headers: &'a [(&'a str, &'a str)],
}

/// What a CUSTOM provider answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtAuthzAnswer {
    Allow,
    Deny,
    /// Transport failure or 5xx.
    Error,
}

/// A CUSTOM provider consulted for this request.
#[derive(Debug, Clone, Serialize)]
pub struct CustomCall {
    pub provider: String,
    /// How the provider is reached: kind, service:port, timeout, failOpen, statusOnError.
    pub settings: String,
    pub rule: RuleMatch,
    pub answer: ExtAuthzAnswer,
}

/// The outcome as the client experiences it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Allow,
    /// 403 (HTTP) from RBAC, a JWT audience mismatch or a CUSTOM provider.
    Deny,
    /// 401 from JWT validation.
    Unauthenticated,
    /// Connection refused or closed without an HTTP response.
    Reset,
    /// Rejected before policy: malformed request (400/404).
    BadRequest,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Reset => "reset",
            Outcome::BadRequest => "bad-request",
        }
    }
}

/// Which step of the filter chain decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Normalization,
    Custom,
    Jwt,
    Deny,
    Allow,
    NoAllowPolicy,
    NoAllowMatch,
}

/// A decision with everything needed to explain it.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub outcome: Outcome,
    pub step: Step,
    /// HTTP status the client sees (None for TCP or a reset).
    pub status: Option<u16>,
    pub body: String,
    pub deciding: Option<RuleMatch>,
    pub request_principal: Option<String>,
    /// JWT status string when a token was rejected.
    pub jwt_error: Option<String>,
    pub custom: Option<CustomCall>,
    pub audit: Vec<RuleMatch>,
    pub dry_run: Vec<crate::authz::DryRun>,
    /// The path authorization saw (normalized, without query).
    pub path: Option<String>,
    pub reason: String,
}

/// The CUSTOM provider was consulted but the caller has no answer for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CUSTOM provider \"{provider}\" would be consulted (rule {rule}) but no answer was given")]
pub struct NeedExtAuthz {
    pub provider: String,
    pub rule: String,
}

impl WorkloadPolicy {
    pub fn compile(cfg: &Config, wl: &Workload, jwks: &dyn JwksSource) -> Self {
        let aps = scope::authorization_policies(cfg, wl);
        let ras = scope::request_authentications(cfg, wl);
        let (jwt, jwt_sources) = jwt_providers(&ras, jwks);
        WorkloadPolicy {
            authz: CompiledAuthz::compile(&aps, &cfg.mesh, wl),
            jwt,
            jwt_sources,
            normalization: cfg.mesh.path_normalization,
            mesh: cfg.mesh.clone(),
        }
    }

    /// Decides one request (HTTP) or connection (TCP) in Envoy's order:
    /// normalization → CUSTOM → JWT → AUDIT → DENY → ALLOW.
    pub fn evaluate(
        &self,
        req: &Request<'_>,
        protocol: Protocol,
        now_unix: i64,
        ext_authz: &mut dyn FnMut(&str, &RuleMatch) -> Option<ExtAuthzAnswer>,
    ) -> Result<Decision, NeedExtAuthz> {
        let http = match (protocol, req.http) {
            (Protocol::Http, Some(h)) => Some(h),
            _ => None,
        };
        let mut d = Decision {
            outcome: Outcome::Allow,
            step: Step::NoAllowPolicy,
            status: http.map(|_| 200),
            body: String::new(),
            deciding: None,
            request_principal: None,
            jwt_error: None,
            custom: None,
            audit: Vec::new(),
            dry_run: Vec::new(),
            path: None,
            reason: String::new(),
        };

        // 1. Path normalization (HTTP connection manager, before any filter).
        let (raw_path, query) = http
            .map(|h| split_request_target(h.target))
            .unwrap_or(("", None));
        let path = match http {
            Some(_) => match normalize(raw_path, self.normalization) {
                Ok(p) => Some(p),
                Err(e) => {
                    d.outcome = Outcome::BadRequest;
                    d.step = Step::Normalization;
                    d.status = Some(e.http_status());
                    d.reason = format!("the request path is rejected before any policy runs: {e}");
                    return Ok(d);
                }
            },
            None => None,
        };
        d.path = path.as_ref().map(|p| p.to_string());
        let remote_ip = http
            .and_then(|h| forwarded_for(h.headers))
            .or(req.source_ip);
        let mut attrs = Attrs {
            source_ip: req.source_ip,
            remote_ip,
            destination_ip: req.destination_ip,
            destination_port: req.destination_port,
            sni: req.sni,
            principal: req.peer,
            http: http.map(|h| HttpAttrs {
                method: h.method,
                authority: h.authority,
                path: path.as_deref().unwrap_or(""),
                raw_path: h.target,
                headers: h.headers,
                jwt: None,
            }),
        };

        // 2. CUSTOM: the providers whose rules match are asked first, before JWT validation.
        for (provider, rule) in self.authz.custom_matches(protocol, &attrs) {
            let settings = self
                .mesh
                .provider(&provider)
                .and_then(|p| p.ext_authz.as_ref());
            // An HTTP ext_authz provider has no TCP filter: not enforced on TCP.
            if protocol == Protocol::Tcp
                && settings.is_some_and(|(k, _)| *k == ExtAuthzKind::EnvoyExtAuthzHttp)
            {
                continue;
            }
            let Some(answer) = ext_authz(&provider, &rule) else {
                return Err(NeedExtAuthz {
                    provider,
                    rule: rule.envoy_id(),
                });
            };
            let fail_open = settings.is_some_and(|(_, s)| s.fail_open);
            let status_on_error = settings
                .and_then(|(_, s)| s.status_on_error.as_deref())
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(403);
            d.custom = Some(CustomCall {
                provider: provider.clone(),
                settings: settings
                    .map(|(k, s)| {
                        format!(
                            "{} {}:{}, timeout {}, failOpen {}, statusOnError {}",
                            match k {
                                ExtAuthzKind::EnvoyExtAuthzHttp => "envoyExtAuthzHttp",
                                ExtAuthzKind::EnvoyExtAuthzGrpc => "envoyExtAuthzGrpc",
                            },
                            s.service,
                            s.port,
                            s.timeout.as_deref().unwrap_or("600s"),
                            s.fail_open,
                            status_on_error
                        )
                    })
                    .unwrap_or_default(),
                rule: rule.clone(),
                answer,
            });
            match answer {
                ExtAuthzAnswer::Allow => {}
                ExtAuthzAnswer::Error if fail_open => {}
                ExtAuthzAnswer::Deny | ExtAuthzAnswer::Error => {
                    d.step = Step::Custom;
                    d.deciding = Some(rule.clone());
                    if http.is_some() {
                        d.outcome = Outcome::Deny;
                        d.status = Some(if answer == ExtAuthzAnswer::Deny {
                            403
                        } else {
                            status_on_error
                        });
                    } else {
                        d.outcome = Outcome::Reset;
                        d.status = None;
                    }
                    d.reason = if answer == ExtAuthzAnswer::Deny {
                        format!(
                            "CUSTOM provider \"{provider}\" denied the request (policy {})",
                            rule.envoy_id()
                        )
                    } else {
                        format!("CUSTOM provider \"{provider}\" failed and failOpen is false")
                    };
                    return Ok(d);
                }
            }
        }

        // 3. JWT validation (HTTP only).
        let payload;
        if let Some(h) = http {
            if !self.jwt.is_empty() {
                let treq = TokenRequest {
                    method: h.method,
                    headers: h.headers,
                    query,
                };
                match jwt::authenticate(&self.jwt, &treq, now_unix) {
                    JwtOutcome::NoToken => {}
                    JwtOutcome::Verified(v) => {
                        d.request_principal = v.request_principal();
                        payload = v.payload;
                        if let Some(a) = attrs.http.as_mut() {
                            a.jwt = Some(&payload);
                        }
                    }
                    JwtOutcome::Failed { status, .. } => {
                        let code = status.http_status();
                        d.step = Step::Jwt;
                        d.outcome = if code == 401 {
                            Outcome::Unauthenticated
                        } else {
                            Outcome::Deny
                        };
                        d.status = Some(code);
                        d.body = status.message().to_string();
                        d.jwt_error = Some(status.message().to_string());
                        d.reason = format!("the JWT was rejected: {}", status.message());
                        return Ok(d);
                    }
                }
            }
        }

        // 4. AUDIT, DENY, ALLOW.
        let rbac: RbacResult = self.authz.evaluate(protocol, &attrs);
        d.audit = rbac.audit;
        d.dry_run = rbac.dry_run;
        d.deciding = rbac.deciding;
        if rbac.allowed {
            d.outcome = Outcome::Allow;
            match &d.deciding {
                Some(m) => {
                    d.step = Step::Allow;
                    d.reason = format!(
                        "allowed by rule {} of ALLOW policy {}/{}",
                        m.rule, m.namespace, m.name
                    );
                }
                None => {
                    d.step = Step::NoAllowPolicy;
                    d.reason = "no DENY rule matched and no ALLOW policy applies, so everything is allowed".into();
                }
            }
        } else {
            d.outcome = if http.is_some() {
                Outcome::Deny
            } else {
                Outcome::Reset
            };
            d.status = http.map(|_| 403);
            d.body = if http.is_some() {
                RBAC_DENIED_BODY.into()
            } else {
                String::new()
            };
            match &d.deciding {
                Some(m) => {
                    d.step = Step::Deny;
                    d.reason = if self.authz.policies.iter().any(|p| {
                        p.name == m.name && p.namespace == m.namespace && p.action == Action::Custom
                    }) {
                        format!(
                            "denied by rule {} of CUSTOM policy {}/{}, enforced as DENY because its provider is unusable",
                            m.rule, m.namespace, m.name
                        )
                    } else {
                        format!(
                            "denied by rule {} of DENY policy {}/{}",
                            m.rule, m.namespace, m.name
                        )
                    };
                    if m.widened_for_tcp {
                        d.reason.push_str(
                            " (on TCP its HTTP-only fields are ignored, so it matches every connection the rest of the rule selects)",
                        );
                    }
                }
                None => {
                    d.step = Step::NoAllowMatch;
                    d.reason =
                        "ALLOW policies apply to this workload but none of their rules matched"
                            .into();
                }
            }
        }
        Ok(d)
    }
}

/// Envoy with `use_remote_address: false` (sidecar inbound) and no trusted hops takes the
/// last `X-Forwarded-For` address as the downstream remote address.
fn forwarded_for(headers: &[(&str, &str)]) -> Option<IpAddr> {
    let last = headers
        .iter()
        .rev()
        .find(|(n, _)| *n == "x-forwarded-for")?
        .1;
    last.rsplit(',').next()?.trim().parse().ok()
}
