//! The decision engine for one workload's inbound traffic: the compiled AuthorizationPolicies
//! and RequestAuthentication providers that apply to it, and the one function that decides a
//! request or connection in Envoy's filter order. The proxy and the offline tools both call
//! [`WorkloadPolicy::evaluate`]; nothing else decides.

use std::net::IpAddr;

use serde::Serialize;

use crate::authz::{Attrs, CompiledAuthz, HttpAttrs, Protocol, RbacResult, RuleMatch};
use crate::config::{Config, Resource, Workload};
use crate::jwt::{self, JwtOutcome, JwtProvider, KeySource, TokenRequest};
use crate::mesh::{ExtAuthzKind, ExtAuthzSettings, MeshConfig};
use crate::model::{JwtRule, RequestAuthenticationSpec};
use crate::path::{normalize, split_request_target, Normalization};
use crate::scope;

/// The body Envoy's RBAC filter answers a denied HTTP request with.
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";

/// What a JWT provider writes into the request once its token is verified.
#[derive(Debug, Clone, Default)]
pub struct JwtOutputs {
    /// `outputPayloadToHeader`, lowercase.
    pub payload_header: Option<String>,
    /// `outputClaimToHeaders`: lowercase header and the claim path (split on `.`).
    pub claim_headers: Vec<(String, Vec<String>)>,
    pub forward_original_token: bool,
}

/// Everything inbound enforcement needs for one workload, compiled once.
#[derive(Debug, Clone)]
pub struct WorkloadPolicy {
    pub authz: CompiledAuthz,
    pub jwt: Vec<JwtProvider>,
    /// `namespace/name` of the RequestAuthentication behind each provider in `jwt`.
    pub jwt_sources: Vec<String>,
    /// Output settings of each provider in `jwt`.
    pub jwt_outputs: Vec<JwtOutputs>,
    /// Every output header of every provider: incoming copies are removed (anti-spoofing).
    jwt_output_headers: Vec<String>,
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
) -> (Vec<JwtProvider>, Vec<String>, Vec<JwtOutputs>) {
    let mut all: Vec<(JwtProvider, (String, JwtOutputs))> = Vec::new();
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
            let outputs = JwtOutputs {
                payload_header: (!r.output_payload_to_header.is_empty())
                    .then(|| r.output_payload_to_header.to_ascii_lowercase()),
                claim_headers: r
                    .output_claim_to_headers
                    .iter()
                    .flatten()
                    .map(|c| {
                        (
                            c.header.to_ascii_lowercase(),
                            c.claim.split('.').map(String::from).collect(),
                        )
                    })
                    .collect(),
                forward_original_token: r.forward_original_token,
            };
            all.push((
                provider,
                (format!("{}/{}", p.namespace(), p.name()), outputs),
            ));
        }
    }
    all.sort_by(|a, b| a.0.issuer.cmp(&b.0.issuer));
    let (providers, rest): (Vec<_>, Vec<_>) = all.into_iter().unzip();
    let (sources, outputs) = rest.into_iter().unzip();
    (providers, sources, outputs)
}

/// A claim as Envoy writes it into a header: strings as they are, integral numbers without a
/// fraction, booleans as words; other types produce no header.
fn claim_header_value(payload: &serde_json::Value, path: &[String]) -> Option<String> {
    let mut cur = payload;
    for k in path {
        cur = cur.get(k)?;
    }
    match cur {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => Some(match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
                format!("{}", f as i64)
            }
            _ => n.to_string(),
        }),
        _ => None,
    }
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
    /// How the request's headers change before it is forwarded to the app (JWT outputs and
    /// token removal), exactly as authorization saw them.
    pub header_edits: HeaderEdits,
    pub reason: String,
}

/// Header changes for the forwarded request: names (lowercase) to remove, then headers to set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeaderEdits {
    pub remove: Vec<String>,
    pub set: Vec<(String, String)>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty()
    }
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
        let (jwt, jwt_sources, jwt_outputs) = jwt_providers(&ras, jwks);
        let mut jwt_output_headers: Vec<String> = jwt_outputs
            .iter()
            .flat_map(|o: &JwtOutputs| {
                o.payload_header
                    .iter()
                    .cloned()
                    .chain(o.claim_headers.iter().map(|(h, _)| h.clone()))
            })
            .collect();
        jwt_output_headers.sort();
        jwt_output_headers.dedup();
        WorkloadPolicy {
            authz: CompiledAuthz::compile(&aps, &cfg.mesh, wl),
            jwt,
            jwt_sources,
            jwt_outputs,
            jwt_output_headers,
            normalization: cfg.mesh.path_normalization,
            mesh: cfg.mesh.clone(),
        }
    }

    /// The settings of CUSTOM provider `name` in the mesh config, if it is an ext_authz one.
    pub fn ext_authz_provider(&self, name: &str) -> Option<(ExtAuthzKind, &ExtAuthzSettings)> {
        self.mesh
            .provider(name)
            .and_then(|p| p.ext_authz.as_ref())
            .map(|(k, s)| (*k, s))
    }

    /// The request target as HTTP filters see it (ext_authz included): the path normalized per
    /// the mesh config, the query kept, any fragment dropped; `None` when normalization refuses
    /// the path.
    pub fn filter_target(&self, target: &str) -> Option<String> {
        let (raw, query) = split_request_target(target);
        let p = normalize(raw, self.normalization).ok()?;
        Some(match query {
            Some(q) => format!("{p}?{q}"),
            None => p.to_string(),
        })
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
            header_edits: HeaderEdits::default(),
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
        // `:path` as filters see it: normalized, fragment stripped, query kept.
        let path_header: std::borrow::Cow<'_, str> = match (http, &path) {
            (Some(h), Some(std::borrow::Cow::Borrowed(_))) => {
                std::borrow::Cow::Borrowed(h.target.split('#').next().unwrap_or(""))
            }
            (Some(_), Some(p)) => match query {
                Some(q) => std::borrow::Cow::Owned(format!("{p}?{q}")),
                None => std::borrow::Cow::Owned(p.to_string()),
            },
            _ => std::borrow::Cow::Borrowed(""),
        };
        // Headers after the JWT filter (declared here so they outlive `attrs`).
        let jwt_headers: Vec<(String, String)>;
        let jwt_header_refs: Vec<(&str, &str)>;
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
                raw_path: &path_header,
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

        // 3. JWT validation (HTTP only). Like Envoy's jwt_authn filter: incoming copies of the
        // output headers are removed whether or not a token is present, the token is verified,
        // then the payload/claim headers are written and the token header is dropped unless
        // `forwardOriginalToken`. Authorization sees the headers as they leave this filter.
        let payload;
        if let Some(h) = http {
            if !self.jwt.is_empty() {
                let stripped: Vec<(&str, &str)> = h
                    .headers
                    .iter()
                    .filter(|(n, _)| !self.jwt_output_headers.iter().any(|o| o == n))
                    .copied()
                    .collect();
                let treq = TokenRequest {
                    method: h.method,
                    headers: &stripped,
                    query,
                };
                match jwt::authenticate(&self.jwt, &treq, now_unix) {
                    JwtOutcome::NoToken => {
                        d.header_edits.remove = self.jwt_output_headers.clone();
                        if stripped.len() != h.headers.len() {
                            jwt_headers = stripped
                                .iter()
                                .map(|(n, v)| (n.to_string(), v.to_string()))
                                .collect();
                            jwt_header_refs = jwt_headers
                                .iter()
                                .map(|(n, v)| (n.as_str(), v.as_str()))
                                .collect();
                            if let Some(a) = attrs.http.as_mut() {
                                a.headers = &jwt_header_refs;
                            }
                        }
                    }
                    JwtOutcome::Verified(v) => {
                        d.request_principal = v.request_principal();
                        let out = &self.jwt_outputs[v.provider_index];
                        d.header_edits.remove = self.jwt_output_headers.clone();
                        if !out.forward_original_token {
                            for t in &v.token_headers {
                                if !d.header_edits.remove.contains(t) {
                                    d.header_edits.remove.push(t.clone());
                                }
                            }
                        }
                        let mut hs: Vec<(String, String)> = stripped
                            .iter()
                            .filter(|(n, _)| {
                                out.forward_original_token
                                    || !v.token_headers.iter().any(|t| t == n)
                            })
                            .map(|(n, v)| (n.to_string(), v.to_string()))
                            .collect();
                        if let Some(ph) = &out.payload_header {
                            hs.push((ph.clone(), v.raw_payload.clone()));
                        }
                        if !out.claim_headers.is_empty() {
                            // Claims as sent, before space-delimited splitting.
                            let raw: Option<serde_json::Value> = base64::Engine::decode(
                                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                                v.raw_payload.trim_end_matches('='),
                            )
                            .ok()
                            .and_then(|b| serde_json::from_slice(&b).ok());
                            for (header, claim) in &out.claim_headers {
                                if let Some(val) =
                                    raw.as_ref().and_then(|p| claim_header_value(p, claim))
                                {
                                    hs.retain(|(n, _)| n != header);
                                    hs.push((header.clone(), val));
                                }
                            }
                        }
                        d.header_edits.set = hs
                            .iter()
                            .filter(|(n, _)| {
                                out.payload_header.as_deref() == Some(n.as_str())
                                    || out.claim_headers.iter().any(|(h, _)| h == n)
                            })
                            .cloned()
                            .collect();
                        jwt_headers = hs;
                        jwt_header_refs = jwt_headers
                            .iter()
                            .map(|(n, v)| (n.as_str(), v.as_str()))
                            .collect();
                        payload = v.payload;
                        if let Some(a) = attrs.http.as_mut() {
                            a.jwt = Some(&payload);
                            a.headers = &jwt_header_refs;
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
                    d.reason = match &m.bad_custom {
                        Some(why) => format!(
                            "denied by rule {} of CUSTOM policy {}/{}, enforced as DENY (fail closed) because {why}",
                            m.rule, m.namespace, m.name
                        ),
                        None => format!("denied by rule {} of DENY policy {}/{}", m.rule, m.namespace, m.name),
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
                    if protocol == Protocol::Tcp && !self.authz.tcp_dropped_allow.is_empty() {
                        let list: Vec<String> = self
                            .authz
                            .tcp_dropped_allow
                            .iter()
                            .take(3)
                            .map(|r| {
                                format!("{}/{} rule {} ({})", r.namespace, r.name, r.rule, r.field)
                            })
                            .collect();
                        let more = self.authz.tcp_dropped_allow.len().saturating_sub(3);
                        d.reason.push_str(&format!(
                            "; on TCP, ALLOW rules with HTTP-only fields do not exist: {}{}",
                            list.join(", "),
                            if more > 0 {
                                format!(" and {more} more")
                            } else {
                                String::new()
                            }
                        ));
                    }
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
