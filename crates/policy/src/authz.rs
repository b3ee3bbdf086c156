//! AuthorizationPolicy compilation and matching: the rules attached to one workload, turned
//! into indexed rule sets per action, once for HTTP traffic and once for TCP traffic (where
//! HTTP-only fields drop an ALLOW rule and are removed from DENY/AUDIT/CUSTOM rules).
//!
//! Rules are numbered in the order of Envoy's RBAC policy ids (`ns[..]-policy[..]-rule[i]`,
//! sorted as strings, since Envoy keeps them in an ordered map), so "the first matching rule"
//! is the one Envoy would report. Rules are indexed by exact principal, path and host so a
//! decision looks at a handful of rules, not all of them.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use regex::Regex;
use serde::Serialize;

use crate::config::{Resource, Workload};
use crate::mesh::MeshConfig;
use crate::model::*;
use crate::path::{is_template, PathTemplate};

/// Which filter chain a connection is handled by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

/// What one HTTP request looks like to authorization.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// `:authority` / `Host`, as sent (port included if sent).
    pub authority: &'a str,
    /// Normalized path without query or fragment (Envoy `url_path`).
    pub path: &'a str,
    /// The `:path` header as sent, query included.
    pub raw_path: &'a str,
    /// Lowercase names; a header may repeat.
    pub headers: &'a [(&'a str, &'a str)],
    /// Verified JWT payload (space-delimited claims already split).
    pub jwt: Option<&'a serde_json::Value>,
}

/// What one connection (and, for HTTP, one request) looks like to authorization.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attrs<'a> {
    pub source_ip: Option<IpAddr>,
    /// Original client address (from `X-Forwarded-For`); `source_ip` when absent.
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    pub sni: Option<&'a str>,
    /// The peer's URI SAN; `None` unless the connection is mTLS.
    pub principal: Option<&'a str>,
    pub http: Option<HttpAttrs<'a>>,
}

// ------------------------------------------------------------------ string matching

#[derive(Debug, Clone)]
enum Str {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// `*` in generic fields: any non-empty value.
    NonEmpty,
    /// `*` in header-like fields: present, even if empty.
    Present,
    /// `spiffe://` + anything + suffix (principal `*x`).
    SpiffeSuffix(Box<str>),
    IgnoreCase(Box<str>),
    PrefixIgnoreCase(Box<str>),
    SuffixIgnoreCase(Box<str>),
    Contains(Box<str>),
    Regex(Box<Regex>),
    /// A path template and its literal prefix (text before the first `{`), for indexing.
    Template(Box<PathTemplate>, Box<str>),
    /// Matches nothing: attributes Warden has no data for.
    Never,
}

impl Str {
    fn matches(&self, s: &str) -> bool {
        match self {
            Str::Exact(v) => s == &**v,
            Str::Prefix(v) => s.starts_with(&**v),
            Str::Suffix(v) => s.ends_with(&**v),
            Str::NonEmpty => !s.is_empty(),
            Str::Present => true,
            Str::SpiffeSuffix(v) => {
                s.len() >= 9 + v.len() && s.starts_with("spiffe://") && s.ends_with(&**v)
            }
            Str::IgnoreCase(v) => s.eq_ignore_ascii_case(v),
            Str::PrefixIgnoreCase(v) => {
                s.len() >= v.len() && s.as_bytes()[..v.len()].eq_ignore_ascii_case(v.as_bytes())
            }
            Str::SuffixIgnoreCase(v) => {
                s.len() >= v.len()
                    && s.as_bytes()[s.len() - v.len()..].eq_ignore_ascii_case(v.as_bytes())
            }
            Str::Contains(v) => s.contains(&**v),
            Str::Regex(r) => r.is_match(s),
            Str::Template(t, _) => t.matches(s),
            Str::Never => false,
        }
    }
}

/// Generic values (paths, SNI, claims): `*` non-empty, `*x` suffix, `x*` prefix, else exact.
fn generic(v: &str) -> Str {
    if v == "*" {
        Str::NonEmpty
    } else if let Some(s) = v.strip_prefix('*') {
        Str::Suffix(s.into())
    } else if let Some(p) = v.strip_suffix('*') {
        Str::Prefix(p.into())
    } else {
        Str::Exact(v.into())
    }
}

/// Header-like values (methods, request headers): `*` means present.
fn header_like(v: &str) -> Str {
    if v == "*" {
        Str::Present
    } else {
        generic(v)
    }
}

fn host(v: &str) -> Str {
    if v == "*" {
        Str::Present
    } else if let Some(s) = v.strip_prefix('*') {
        Str::SuffixIgnoreCase(s.into())
    } else if let Some(p) = v.strip_suffix('*') {
        Str::PrefixIgnoreCase(p.into())
    } else {
        Str::IgnoreCase(v.into())
    }
}

/// Principal values compare against the full URI SAN, to which Istio adds `spiffe://`.
fn principal(v: &str) -> Str {
    if v == "*" {
        Str::NonEmpty
    } else if let Some(s) = v.strip_prefix('*') {
        Str::SpiffeSuffix(s.into())
    } else if let Some(p) = v.strip_suffix('*') {
        Str::Prefix(format!("spiffe://{p}").into())
    } else {
        Str::Exact(format!("spiffe://{v}").into())
    }
}

fn path_value(v: &str) -> Str {
    if is_template(v) {
        match PathTemplate::parse(v) {
            Ok(t) => Str::Template(Box::new(t), v[..v.find('{').unwrap_or(v.len())].into()),
            Err(_) => Str::Never,
        }
    } else {
        generic(v)
    }
}

fn namespace(v: &str) -> Str {
    if !v.contains('*') {
        return Str::Contains(format!("/ns/{v}/").into());
    }
    let body: String = v
        .split('*')
        .map(regex::escape)
        .collect::<Vec<_>>()
        .join(".*");
    regex_or_never(&format!("^.*/ns/{body}/.*$"))
}

fn service_account(v: &str, policy_ns: &str) -> Str {
    let (ns, sa) = v.split_once('/').unwrap_or((policy_ns, v));
    regex_or_never(&format!(
        "^spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?$",
        regex::escape(ns),
        regex::escape(sa)
    ))
}

fn trust_domain(v: &str) -> Str {
    if v == "*" {
        return Str::Prefix("spiffe://".into());
    }
    if let Some(s) = v.strip_prefix('*') {
        return regex_or_never(&format!("^spiffe://[^/]*{}/.*$", regex::escape(s)));
    }
    if let Some(p) = v.strip_suffix('*') {
        return regex_or_never(&format!("^spiffe://{}[^/]*/.*$", regex::escape(p)));
    }
    Str::Prefix(format!("spiffe://{v}/").into())
}

fn regex_or_never(re: &str) -> Str {
    Regex::new(re)
        .map(|r| Str::Regex(Box::new(r)))
        .unwrap_or(Str::Never)
}

// ------------------------------------------------------------------ trust domains

fn td_pattern_match(a: &str, pattern: &str) -> bool {
    a == pattern
        || pattern == "*"
        || pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
        || pattern.strip_prefix('*').is_some_and(|s| a.ends_with(s))
}

/// Istio's trust-domain alias rewriting of principal values: `cluster.local` (or any member
/// of the bundle) stands for the mesh trust domain and each alias, and is replaced.
pub fn rewrite_principals(values: &[String], bundle: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        let parts: Vec<&str> = v.split('/').collect();
        if parts.len() != 5 || parts[0] == "*" {
            out.push(v.clone());
            continue;
        }
        let td = parts[0];
        if bundle.iter().any(|b| td_pattern_match(td, b)) || td == "cluster.local" {
            let mut mine: Vec<String> = Vec::new();
            for b in bundle {
                let n = if td.strip_prefix('*').is_some_and(|s| b.ends_with(s)) {
                    v.clone()
                } else {
                    format!("{b}/{}", parts[1..].join("/"))
                };
                if !mine.contains(&n) {
                    mine.push(n);
                }
            }
            out.extend(mine);
        } else {
            out.push(v.clone());
        }
    }
    out
}

fn expand_trust_domains(values: &[String], bundle: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        let add: Vec<String> = if bundle.contains(v) {
            bundle.to_vec()
        } else {
            vec![v.clone()]
        };
        for a in add {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

// ------------------------------------------------------------------ predicates

#[derive(Debug, Clone)]
struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let ip = s.parse::<IpAddr>().ok()?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { net: ip, prefix })
    }
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
enum Pred {
    Principal(Str),
    SourceIp(Cidr),
    RemoteIp(Cidr),
    DestIp(Cidr),
    DestPort(u16),
    Sni(Str),
    Host(Str),
    Method(Str),
    Path(Str),
    Header(Box<str>, Str),
    RequestPrincipal(Str, Str),
    Claim(Vec<String>, Str),
    Never,
}

impl Pred {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        match self {
            Pred::Principal(s) => a.principal.is_some_and(|p| s.matches(p)),
            Pred::SourceIp(c) => a.source_ip.is_some_and(|ip| c.contains(ip)),
            Pred::RemoteIp(c) => a.remote_ip.or(a.source_ip).is_some_and(|ip| c.contains(ip)),
            Pred::DestIp(c) => a.destination_ip.is_some_and(|ip| c.contains(ip)),
            Pred::DestPort(p) => a.destination_port == *p,
            Pred::Sni(s) => a.sni.is_some_and(|v| s.matches(v)),
            Pred::Host(s) => a.http.is_some_and(|h| s.matches(h.authority)),
            Pred::Method(s) => a.http.is_some_and(|h| s.matches(h.method)),
            Pred::Path(s) => a.http.is_some_and(|h| s.matches(h.path)),
            Pred::Header(name, s) => a.http.is_some_and(|h| match &**name {
                ":authority" | "host" => s.matches(h.authority),
                ":method" => s.matches(h.method),
                ":path" => s.matches(h.raw_path),
                ":scheme" => s.matches("http"),
                _ => h
                    .headers
                    .iter()
                    .any(|(n, v)| n.eq_ignore_ascii_case(name) && s.matches(v)),
            }),
            Pred::RequestPrincipal(iss, sub) => {
                a.http.and_then(|h| h.jwt).is_some_and(|j| {
                    match (
                        j.get("iss").and_then(|v| v.as_str()),
                        j.get("sub").and_then(|v| v.as_str()),
                    ) {
                        (Some(i), Some(s)) => iss.matches(i) && sub.matches(s),
                        _ => false,
                    }
                })
            }
            Pred::Claim(path, s) => a.http.and_then(|h| h.jwt).is_some_and(|j| {
                let mut cur = j;
                for k in path {
                    match cur.get(k) {
                        Some(v) => cur = v,
                        None => return false,
                    }
                }
                match cur {
                    serde_json::Value::String(v) => s.matches(v),
                    serde_json::Value::Array(items) => items
                        .iter()
                        .any(|i| i.as_str().is_some_and(|v| s.matches(v))),
                    _ => false,
                }
            }),
            Pred::Never => false,
        }
    }
}

/// One field of a rule: any positive value matches (or there are none) and no negative does.
#[derive(Debug, Clone)]
struct Cond {
    preds: Vec<Pred>,
    negate: bool,
}

impl Cond {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        self.preds.iter().any(|p| p.matches(a)) != self.negate
    }
}

/// An AND of conditions.
type Clause = Vec<Cond>;

#[derive(Debug, Clone)]
struct CompiledRule {
    /// OR over clauses; empty = unconstrained.
    from: Vec<Clause>,
    to: Vec<Clause>,
    when: Clause,
    policy: u32,
    rule: u32,
    /// HTTP-only fields were removed for TCP, so the rule matches more than it says.
    widened: bool,
}

impl CompiledRule {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        self.when.iter().all(|c| c.matches(a))
            && (self.from.is_empty() || self.from.iter().any(|cl| cl.iter().all(|c| c.matches(a))))
            && (self.to.is_empty() || self.to.iter().any(|cl| cl.iter().all(|c| c.matches(a))))
    }
}

// ------------------------------------------------------------------ compilation of one field

/// Why a field cannot be compiled for this protocol: it is HTTP-only (the key is named).
enum Drop {
    HttpOnly(String),
}

struct FieldCtx<'a> {
    protocol: Protocol,
    bundle: &'a [String],
    policy_ns: &'a str,
}

impl FieldCtx<'_> {
    fn http_only(&self, key: &str) -> Result<(), Drop> {
        match self.protocol {
            Protocol::Http => Ok(()),
            Protocol::Tcp => Err(Drop::HttpOnly(key.to_string())),
        }
    }

    /// Compiles a source/operation field or `when` key into predicates for its values.
    fn preds(&self, key: &str, values: &[String]) -> Result<Vec<Pred>, Drop> {
        let v = values;
        Ok(match key {
            "principals" | "source.principal" => rewrite_principals(v, self.bundle)
                .iter()
                .map(|x| Pred::Principal(principal(x)))
                .collect(),
            "namespaces" | "source.namespace" => {
                v.iter().map(|x| Pred::Principal(namespace(x))).collect()
            }
            "serviceAccounts" | "source.serviceAccount" => v
                .iter()
                .map(|x| Pred::Principal(service_account(x, self.policy_ns)))
                .collect(),
            "trustDomains" | "source.trustDomain" => expand_trust_domains(v, self.bundle)
                .iter()
                .map(|x| Pred::Principal(trust_domain(x)))
                .collect(),
            "ipBlocks" | "source.ip" => v
                .iter()
                .map(|x| Cidr::parse(x).map_or(Pred::Never, Pred::SourceIp))
                .collect(),
            "remoteIpBlocks" | "remote.ip" => v
                .iter()
                .map(|x| Cidr::parse(x).map_or(Pred::Never, Pred::RemoteIp))
                .collect(),
            "destination.ip" => v
                .iter()
                .map(|x| Cidr::parse(x).map_or(Pred::Never, Pred::DestIp))
                .collect(),
            "ports" | "destination.port" => v
                .iter()
                .map(|x| x.parse::<u16>().map_or(Pred::Never, Pred::DestPort))
                .collect(),
            "connection.sni" => v.iter().map(|x| Pred::Sni(generic(x))).collect(),
            "hosts" => {
                self.http_only(key)?;
                v.iter().map(|x| Pred::Host(host(x))).collect()
            }
            "methods" => {
                self.http_only(key)?;
                v.iter().map(|x| Pred::Method(header_like(x))).collect()
            }
            "paths" => {
                self.http_only(key)?;
                v.iter().map(|x| Pred::Path(path_value(x))).collect()
            }
            "requestPrincipals" | "request.auth.principal" => {
                self.http_only(key)?;
                v.iter().map(|x| request_principal(x)).collect()
            }
            "request.auth.audiences" => {
                self.http_only(key)?;
                v.iter()
                    .map(|x| Pred::Claim(vec!["aud".into()], generic(x)))
                    .collect()
            }
            "request.auth.presenter" => {
                self.http_only(key)?;
                v.iter()
                    .map(|x| Pred::Claim(vec!["azp".into()], generic(x)))
                    .collect()
            }
            k if k.starts_with("request.headers[") => {
                self.http_only(key)?;
                match bracket_keys(&k["request.headers".len()..]) {
                    Some(keys) if keys.len() == 1 => {
                        let name = keys[0].to_ascii_lowercase();
                        v.iter()
                            .map(|x| Pred::Header(name.clone().into(), header_like(x)))
                            .collect()
                    }
                    _ => vec![Pred::Never],
                }
            }
            k if k.starts_with("request.auth.claims[") => {
                self.http_only(key)?;
                match bracket_keys(&k["request.auth.claims".len()..]) {
                    Some(keys) => v
                        .iter()
                        .map(|x| Pred::Claim(keys.clone(), generic(x)))
                        .collect(),
                    None => vec![Pred::Never],
                }
            }
            // Dynamic metadata of other Envoy filters does not exist in Warden.
            _ => vec![Pred::Never],
        })
    }

    fn cond(
        &self,
        key: &str,
        values: &[String],
        negate: bool,
        out: &mut Clause,
    ) -> Result<(), Drop> {
        if values.is_empty() {
            return Ok(());
        }
        let preds = self.preds(key, values)?;
        out.push(Cond { preds, negate });
        Ok(())
    }
}

/// `[a][b.c][d]` → `["a", "b.c", "d"]`.
pub fn bracket_keys(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let r = rest.strip_prefix('[')?;
        let end = r.find(']')?;
        if end == 0 {
            return None;
        }
        out.push(r[..end].to_string());
        rest = &r[end + 1..];
    }
    (!out.is_empty()).then_some(out)
}

fn request_principal(v: &str) -> Pred {
    let exact = |s: &str| Str::Exact(s.into());
    let (iss, sub) = if v == "*" {
        (Str::NonEmpty, Str::NonEmpty)
    } else if let Some(rest) = v.strip_prefix('*') {
        match v.rfind('/') {
            Some(i) if &v[..i] == "*" => (Str::NonEmpty, exact(&v[i + 1..])),
            Some(i) => (Str::Suffix(v[1..i].into()), exact(&v[i + 1..])),
            None => (Str::NonEmpty, Str::Suffix(rest.into())),
        }
    } else if let Some(head) = v.strip_suffix('*') {
        match v.rfind('/') {
            Some(i) if &v[i + 1..] == "*" => (exact(&v[..i]), Str::NonEmpty),
            Some(i) => (exact(&v[..i]), Str::Prefix(head[i + 1..].into())),
            None => (Str::Prefix(head.into()), Str::NonEmpty),
        }
    } else {
        match v.rfind('/') {
            Some(i) => (exact(&v[..i]), exact(&v[i + 1..])),
            None => (exact(v), exact("")),
        }
    };
    Pred::RequestPrincipal(iss, sub)
}

fn compile_source(
    ctx: &FieldCtx<'_>,
    s: &Source,
    action: Action,
    widened: &mut bool,
) -> Result<Clause, Drop> {
    let mut c = Vec::new();
    let fields: [(&str, &[String], bool); 14] = [
        ("principals", &s.principals, false),
        ("principals", &s.not_principals, true),
        ("requestPrincipals", &s.request_principals, false),
        ("requestPrincipals", &s.not_request_principals, true),
        ("namespaces", &s.namespaces, false),
        ("namespaces", &s.not_namespaces, true),
        ("serviceAccounts", &s.service_accounts, false),
        ("serviceAccounts", &s.not_service_accounts, true),
        ("trustDomains", &s.trust_domains, false),
        ("trustDomains", &s.not_trust_domains, true),
        ("ipBlocks", &s.ip_blocks, false),
        ("ipBlocks", &s.not_ip_blocks, true),
        ("remoteIpBlocks", &s.remote_ip_blocks, false),
        ("remoteIpBlocks", &s.not_remote_ip_blocks, true),
    ];
    for (k, v, neg) in fields {
        field(ctx, action, k, v, neg, &mut c, widened)?;
    }
    Ok(c)
}

fn compile_operation(
    ctx: &FieldCtx<'_>,
    o: &Operation,
    action: Action,
    widened: &mut bool,
) -> Result<Clause, Drop> {
    let mut c = Vec::new();
    let fields: [(&str, &[String], bool); 8] = [
        ("hosts", &o.hosts, false),
        ("hosts", &o.not_hosts, true),
        ("ports", &o.ports, false),
        ("ports", &o.not_ports, true),
        ("methods", &o.methods, false),
        ("methods", &o.not_methods, true),
        ("paths", &o.paths, false),
        ("paths", &o.not_paths, true),
    ];
    for (k, v, neg) in fields {
        field(ctx, action, k, v, neg, &mut c, widened)?;
    }
    Ok(c)
}

/// ALLOW drops the whole rule for an HTTP-only field on TCP; other actions drop the field.
fn field(
    ctx: &FieldCtx<'_>,
    action: Action,
    key: &str,
    v: &[String],
    neg: bool,
    out: &mut Clause,
    widened: &mut bool,
) -> Result<(), Drop> {
    match ctx.cond(key, v, neg, out) {
        Err(Drop::HttpOnly(_)) if action != Action::Allow => {
            *widened = true;
            Ok(())
        }
        r => r,
    }
}

fn compile_rule(
    ctx: &FieldCtx<'_>,
    r: &Rule,
    action: Action,
    policy: u32,
    rule: u32,
) -> Result<CompiledRule, Drop> {
    let mut widened = false;
    let mut from = Vec::new();
    for f in r.from.iter().flatten().flatten() {
        let s = f.source.clone().unwrap_or_default();
        from.push(compile_source(ctx, &s, action, &mut widened)?);
    }
    let mut to = Vec::new();
    for t in r.to.iter().flatten().flatten() {
        let o = t.operation.clone().unwrap_or_default();
        to.push(compile_operation(ctx, &o, action, &mut widened)?);
    }
    let mut when = Vec::new();
    for c in r.when.iter().flatten().flatten() {
        field(
            ctx,
            action,
            &c.key,
            &c.values,
            false,
            &mut when,
            &mut widened,
        )?;
        field(
            ctx,
            action,
            &c.key,
            &c.not_values,
            true,
            &mut when,
            &mut widened,
        )?;
    }
    Ok(CompiledRule {
        from,
        to,
        when,
        policy,
        rule,
        widened,
    })
}

// ------------------------------------------------------------------ indexed rule sets

#[derive(Debug, Clone, Default)]
struct RuleSet {
    rules: Vec<CompiledRule>,
    by_principal: HashMap<Box<str>, Vec<u32>>,
    by_namespace: HashMap<Box<str>, Vec<u32>>,
    by_path: HashMap<Box<str>, Vec<u32>>,
    by_path_prefix: Trie,
    by_host: HashMap<Box<str>, Vec<u32>>,
    scan: Vec<u32>,
}

/// A byte trie of path prefixes: walking a request path visits every indexed prefix of it in
/// one pass, so prefix rules cost O(path length), not O(rules).
#[derive(Debug, Clone, Default)]
struct Trie {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    /// Sorted by byte.
    edges: Vec<(u8, u32)>,
    ids: Vec<u32>,
}

impl Trie {
    fn insert(&mut self, key: &str, id: u32) {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut n = 0usize;
        for b in key.bytes() {
            n = match self.nodes[n].edges.binary_search_by_key(&b, |e| e.0) {
                Ok(i) => self.nodes[n].edges[i].1 as usize,
                Err(i) => {
                    let next = self.nodes.len() as u32;
                    self.nodes.push(TrieNode::default());
                    self.nodes[n].edges.insert(i, (b, next));
                    next as usize
                }
            };
        }
        let ids = &mut self.nodes[n].ids;
        if ids.last() != Some(&id) {
            ids.push(id);
        }
    }

    /// Calls `f` with the rule ids of every indexed prefix of `path`.
    fn walk(&self, path: &str, mut f: impl FnMut(&[u32])) {
        let Some(mut node) = self.nodes.first() else {
            return;
        };
        for b in path.bytes() {
            if !node.ids.is_empty() {
                f(&node.ids);
            }
            match node.edges.binary_search_by_key(&b, |e| e.0) {
                Ok(i) => node = &self.nodes[node.edges[i].1 as usize],
                Err(_) => return,
            }
        }
        if !node.ids.is_empty() {
            f(&node.ids);
        }
    }
}

/// An index key a rule can be filed under.
#[derive(Clone, Copy)]
enum Key<'r> {
    Principal(&'r str),
    Namespace(&'r str),
    Path(&'r str),
    PathPrefix(&'r str),
    Host(&'r str),
}

/// Keys of one predicate within an index family (`None` = not indexable in that family).
type Family = for<'r> fn(&'r Pred) -> Option<Key<'r>>;

fn principal_family(p: &Pred) -> Option<Key<'_>> {
    match p {
        Pred::Principal(Str::Exact(v)) => Some(Key::Principal(v)),
        _ => None,
    }
}

fn namespace_family(p: &Pred) -> Option<Key<'_>> {
    match p {
        Pred::Principal(Str::Contains(v)) => v
            .strip_prefix("/ns/")
            .and_then(|r| r.strip_suffix('/'))
            .map(Key::Namespace),
        _ => None,
    }
}

fn path_family(p: &Pred) -> Option<Key<'_>> {
    match p {
        Pred::Path(Str::Exact(v)) => Some(Key::Path(v)),
        Pred::Path(Str::Prefix(v)) => Some(Key::PathPrefix(v)),
        Pred::Path(Str::Template(_, v)) => Some(Key::PathPrefix(v)),
        _ => None,
    }
}

fn host_family(p: &Pred) -> Option<Key<'_>> {
    match p {
        Pred::Host(Str::IgnoreCase(v)) => Some(Key::Host(v)),
        _ => None,
    }
}

/// Keys of a positive condition whose every value is indexable in the family.
fn cond_keys<'r>(c: &'r Cond, family: Family) -> Option<Vec<Key<'r>>> {
    if c.negate {
        return None;
    }
    c.preds.iter().map(family).collect()
}

/// Keys that any match of the clauses must hit: every clause (OR) needs an indexable
/// condition (AND), so a request matching none of the keys cannot match the rule.
fn clause_keys<'r>(clauses: &'r [Clause], family: Family) -> Option<Vec<Key<'r>>> {
    if clauses.is_empty() {
        return None;
    }
    let mut keys = Vec::new();
    for cl in clauses {
        keys.extend(cl.iter().find_map(|c| cond_keys(c, family))?);
    }
    Some(keys)
}

impl RuleSet {
    fn push(&mut self, r: CompiledRule) {
        let id = self.rules.len() as u32;
        let when = std::slice::from_ref(&r.when);
        let keys = clause_keys(&r.from, principal_family)
            .or_else(|| clause_keys(when, principal_family))
            .or_else(|| clause_keys(&r.from, namespace_family))
            .or_else(|| clause_keys(when, namespace_family))
            .or_else(|| clause_keys(&r.to, path_family))
            .or_else(|| clause_keys(&r.to, host_family));
        match keys {
            None => self.scan.push(id),
            Some(keys) => {
                for k in keys {
                    let list = match k {
                        Key::Principal(v) => self.by_principal.entry(v.into()).or_default(),
                        Key::Namespace(v) => self.by_namespace.entry(v.into()).or_default(),
                        Key::Path(v) => self.by_path.entry(v.into()).or_default(),
                        Key::Host(v) => self
                            .by_host
                            .entry(v.to_ascii_lowercase().into())
                            .or_default(),
                        Key::PathPrefix(v) => {
                            self.by_path_prefix.insert(v, id);
                            continue;
                        }
                    };
                    if list.last() != Some(&id) {
                        list.push(id);
                    }
                }
            }
        }
        self.rules.push(r);
    }

    fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule (in Envoy's order) that matches. Candidate lists are ascending, so each
    /// is tried until its first match or until it passes the best match so far.
    fn first_match(&self, a: &Attrs<'_>) -> Option<&CompiledRule> {
        let mut best: Option<u32> = None;
        let mut try_list = |ids: &[u32]| {
            for &id in ids {
                if best.is_some_and(|b| id >= b) {
                    break;
                }
                if self.rules[id as usize].matches(a) {
                    best = Some(id);
                    break;
                }
            }
        };
        if let Some(p) = a.principal {
            if let Some(ids) = self.by_principal.get(p) {
                try_list(ids);
            }
            if !self.by_namespace.is_empty() {
                // Every `/ns/<x>/` segment of the principal, as Istio's regex `.*/ns/<x>/.*`.
                // Occurrences may overlap (`/ns/ns/x/`), so step past "/ns" only.
                let mut from = 0;
                while let Some(i) = p[from..].find("/ns/") {
                    let start = from + i + 4;
                    let seg = &p[start..start + p[start..].find('/').unwrap_or(p.len() - start)];
                    if let Some(ids) = self.by_namespace.get(seg) {
                        try_list(ids);
                    }
                    from += i + 3;
                }
            }
        }
        if let Some(h) = a.http {
            if let Some(ids) = self.by_path.get(h.path) {
                try_list(ids);
            }
            self.by_path_prefix.walk(h.path, &mut try_list);
            if !self.by_host.is_empty() {
                let lower = h.authority.to_ascii_lowercase();
                if let Some(ids) = self.by_host.get(lower.as_str()) {
                    try_list(ids);
                }
            }
        }
        try_list(&self.scan);
        best.map(|b| &self.rules[b as usize])
    }
}

// ------------------------------------------------------------------ per-workload policy

/// An attached AuthorizationPolicy as the engine knows it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyInfo {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Why a CUSTOM policy is enforced as DENY instead (provider missing or invalid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_custom: Option<String>,
}

/// An ALLOW rule dropped from the TCP chain, and the HTTP-only field that dropped it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DroppedRule {
    pub namespace: String,
    pub name: String,
    pub rule: u32,
    pub field: String,
}

/// A rule that matched: which policy, which rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleMatch {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub rule: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// On TCP, the rule's HTTP-only fields were ignored, so it matched more widely.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub widened_for_tcp: bool,
    /// The CUSTOM provider of the policy, if it is a CUSTOM policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Why a CUSTOM policy is enforced as DENY instead (its provider is unusable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_custom: Option<String>,
}

impl RuleMatch {
    /// Envoy's RBAC policy id, as seen in its logs and response details; CUSTOM rules carry
    /// Istio's ext-authz prefix, unusable CUSTOM rules its fail-closed suffix.
    pub fn envoy_id(&self) -> String {
        let base = format!(
            "ns[{}]-policy[{}]-rule[{}]",
            self.namespace, self.name, self.rule
        );
        match (&self.provider, &self.bad_custom) {
            (_, Some(_)) => format!("{base}-deny-due-to-bad-CUSTOM-action"),
            (Some(p), None) => format!("istio-ext-authz-{p}-{base}"),
            (None, None) => base,
        }
    }
}

/// CUSTOM rules of one provider.
#[derive(Debug, Clone, Default)]
struct CustomSet {
    provider: String,
    rules: RuleSet,
}

#[derive(Debug, Clone, Default)]
struct Engines {
    custom: Vec<CustomSet>,
    audit: RuleSet,
    deny: RuleSet,
    allow: RuleSet,
    dry_deny: RuleSet,
    dry_allow: RuleSet,
    dry_audit: RuleSet,
}

/// The outcome of the AUDIT/DENY/ALLOW steps for one request or connection.
#[derive(Debug, Clone, Serialize)]
pub struct RbacResult {
    pub allowed: bool,
    /// The DENY rule that denied, or the ALLOW rule that allowed.
    pub deciding: Option<RuleMatch>,
    /// True when no enforced ALLOW policy is attached (default allow).
    pub no_allow_policies: bool,
    pub audit: Vec<RuleMatch>,
    pub dry_run: Vec<DryRun>,
}

/// What a dry-run engine would have said.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    pub action: Action,
    /// `allowed` or `denied`, as Envoy's shadow engine reports it.
    pub result: &'static str,
    pub matched: Option<RuleMatch>,
}

/// All AuthorizationPolicies attached to one workload, compiled for HTTP and for TCP.
#[derive(Debug, Clone, Default)]
pub struct CompiledAuthz {
    pub policies: Vec<PolicyInfo>,
    /// Enforced ALLOW rules that do not exist on TCP because of an HTTP-only field.
    pub tcp_dropped_allow: Vec<DroppedRule>,
    http: Engines,
    tcp: Engines,
    allow_exists: bool,
    dry_allow_exists: bool,
}

/// `istio.io/dry-run` parsed like Go's `strconv.ParseBool`; unparseable means enforced.
pub fn is_dry_run(meta: &ObjectMeta) -> bool {
    matches!(
        meta.annotations.get("istio.io/dry-run").map(String::as_str),
        Some("1" | "t" | "T" | "TRUE" | "true" | "True")
    )
}

impl CompiledAuthz {
    pub fn compile(
        policies: &[&Resource<AuthorizationPolicySpec>],
        mesh: &MeshConfig,
        _wl: &Workload,
    ) -> Self {
        let bundle = mesh.trust_domain_bundle();
        let mut out = CompiledAuthz::default();
        // Providers used by enforced CUSTOM policies of this workload; more than one is an error.
        let mut providers: Vec<&str> = Vec::new();
        for p in policies {
            if p.spec.action == Action::Custom && !is_dry_run(&p.meta) {
                if let Some(name) = p.spec.provider.as_ref().map(|x| x.name.as_str()) {
                    if !providers.contains(&name) {
                        providers.push(name);
                    }
                }
            }
        }
        providers.sort_unstable();
        // Rules in Envoy's policy-id order.
        let mut entries: Vec<(String, usize, usize)> = Vec::new();
        for (pi, p) in policies.iter().enumerate() {
            let dry = is_dry_run(&p.meta);
            let mut bad_custom = None;
            let provider = p.spec.provider.as_ref().map(|x| x.name.clone());
            if p.spec.action == Action::Custom {
                let name = provider.clone().unwrap_or_default();
                bad_custom = custom_provider_problem(mesh, &name);
                if bad_custom.is_none() && providers.len() > 1 {
                    bad_custom = Some(format!(
                        "only one CUSTOM provider may be used per workload, found {}",
                        providers.join(", ")
                    ));
                }
            }
            out.policies.push(PolicyInfo {
                namespace: p.namespace().to_string(),
                name: p.name().to_string(),
                action: p.spec.action,
                dry_run: dry,
                provider,
                bad_custom,
            });
            if p.spec.action == Action::Allow {
                if dry {
                    out.dry_allow_exists = true;
                } else {
                    out.allow_exists = true;
                }
            }
            for (ri, r) in p.spec.rules.iter().flatten().enumerate() {
                if r.is_some() {
                    let id = format!("ns[{}]-policy[{}]-rule[{ri}]", p.namespace(), p.name());
                    entries.push((id, pi, ri));
                }
            }
        }
        entries.sort();
        let mut tcp_dropped = Vec::new();
        for (protocol, engines) in [
            (Protocol::Http, &mut out.http),
            (Protocol::Tcp, &mut out.tcp),
        ] {
            let mut http_dropped = Vec::new();
            let out_dropped = match protocol {
                Protocol::Tcp => &mut tcp_dropped,
                Protocol::Http => &mut http_dropped,
            };
            for (_, pi, ri) in &entries {
                let p = policies[*pi];
                let info = &out.policies[*pi];
                let Some(Some(rule)) = p.spec.rules.as_ref().and_then(|r| r.get(*ri)) else {
                    continue;
                };
                // A CUSTOM policy with a bad provider is enforced as DENY (fail closed).
                let action = if info.bad_custom.is_some() {
                    Action::Deny
                } else {
                    info.action
                };
                let ctx = FieldCtx {
                    protocol,
                    bundle: &bundle,
                    policy_ns: p.namespace(),
                };
                let c = match compile_rule(&ctx, rule, action, *pi as u32, *ri as u32) {
                    Ok(c) => c,
                    Err(Drop::HttpOnly(key)) => {
                        if !info.dry_run {
                            out_dropped.push(DroppedRule {
                                namespace: info.namespace.clone(),
                                name: info.name.clone(),
                                rule: *ri as u32,
                                field: key,
                            });
                        }
                        continue;
                    }
                };
                let set = match (action, info.dry_run) {
                    (Action::Allow, false) => &mut engines.allow,
                    (Action::Allow, true) => &mut engines.dry_allow,
                    (Action::Deny, false) => &mut engines.deny,
                    (Action::Deny, true) => &mut engines.dry_deny,
                    (Action::Audit, false) => &mut engines.audit,
                    (Action::Audit, true) => &mut engines.dry_audit,
                    // Dry-run CUSTOM policies never reach the provider (Istio ≤ 1.29).
                    (Action::Custom, true) => continue,
                    (Action::Custom, false) => {
                        let name = info.provider.clone().unwrap_or_default();
                        let idx = match engines.custom.iter().position(|c| c.provider == name) {
                            Some(i) => i,
                            None => {
                                engines.custom.push(CustomSet {
                                    provider: name,
                                    rules: RuleSet::default(),
                                });
                                engines.custom.len() - 1
                            }
                        };
                        &mut engines.custom[idx].rules
                    }
                };
                set.push(c);
            }
            engines.custom.sort_by(|a, b| a.provider.cmp(&b.provider));
        }
        out.tcp_dropped_allow = tcp_dropped;
        out
    }

    fn engines(&self, protocol: Protocol) -> &Engines {
        match protocol {
            Protocol::Http => &self.http,
            Protocol::Tcp => &self.tcp,
        }
    }

    fn to_match(&self, r: &CompiledRule) -> RuleMatch {
        let p = &self.policies[r.policy as usize];
        RuleMatch {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            action: if p.bad_custom.is_some() {
                Action::Deny
            } else {
                p.action
            },
            rule: r.rule,
            dry_run: p.dry_run,
            widened_for_tcp: r.widened,
            provider: if p.action == Action::Custom {
                p.provider.clone()
            } else {
                None
            },
            bad_custom: p.bad_custom.clone(),
        }
    }

    /// The CUSTOM providers to consult, in order, each with the rule that triggered it.
    pub fn custom_matches(&self, protocol: Protocol, a: &Attrs<'_>) -> Vec<(String, RuleMatch)> {
        self.engines(protocol)
            .custom
            .iter()
            .filter_map(|c| {
                c.rules
                    .first_match(a)
                    .map(|r| (c.provider.clone(), self.to_match(r)))
            })
            .collect()
    }

    /// AUDIT, then DENY, then ALLOW, as Envoy's RBAC filters run.
    pub fn evaluate(&self, protocol: Protocol, a: &Attrs<'_>) -> RbacResult {
        let e = self.engines(protocol);
        let mut audit = Vec::new();
        if let Some(r) = e.audit.first_match(a) {
            audit.push(self.to_match(r));
        }
        if let Some(r) = e.dry_audit.first_match(a) {
            audit.push(self.to_match(r));
        }
        let mut dry_run = Vec::new();
        if !e.dry_deny.is_empty() {
            let m = e.dry_deny.first_match(a).map(|r| self.to_match(r));
            dry_run.push(DryRun {
                action: Action::Deny,
                result: if m.is_some() { "denied" } else { "allowed" },
                matched: m,
            });
        }
        if self.dry_allow_exists {
            let m = e.dry_allow.first_match(a).map(|r| self.to_match(r));
            dry_run.push(DryRun {
                action: Action::Allow,
                result: if m.is_some() { "allowed" } else { "denied" },
                matched: m,
            });
        }
        let no_allow_policies = !self.allow_exists;
        if let Some(r) = e.deny.first_match(a) {
            return RbacResult {
                allowed: false,
                deciding: Some(self.to_match(r)),
                no_allow_policies,
                audit,
                dry_run,
            };
        }
        if no_allow_policies {
            return RbacResult {
                allowed: true,
                deciding: None,
                no_allow_policies,
                audit,
                dry_run,
            };
        }
        let m = e.allow.first_match(a).map(|r| self.to_match(r));
        RbacResult {
            allowed: m.is_some(),
            deciding: m,
            no_allow_policies,
            audit,
            dry_run,
        }
    }

    /// Counts of compiled rules per action (HTTP chain), for `describe`.
    pub fn rule_counts(&self) -> BTreeMap<&'static str, usize> {
        let e = &self.http;
        let mut m = BTreeMap::new();
        m.insert("ALLOW", e.allow.rules.len());
        m.insert("DENY", e.deny.rules.len());
        m.insert("AUDIT", e.audit.rules.len());
        m.insert("CUSTOM", e.custom.iter().map(|c| c.rules.rules.len()).sum());
        m
    }
}

/// Why a CUSTOM provider cannot be used (Istio then denies what the policy matches).
pub fn custom_provider_problem(mesh: &MeshConfig, name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("CUSTOM policy names no provider".into());
    }
    let Some(p) = mesh.provider(name) else {
        return Some(format!(
            "extension provider \"{name}\" is not defined in meshConfig.extensionProviders"
        ));
    };
    let Some((_, s)) = &p.ext_authz else {
        return Some(format!(
            "extension provider \"{name}\" is not an envoyExtAuthzHttp or envoyExtAuthzGrpc provider"
        ));
    };
    if s.service.is_empty() {
        return Some(format!(
            "extension provider \"{name}\": service is required"
        ));
    }
    if s.port == 0 || s.port > 65535 {
        return Some(format!(
            "extension provider \"{name}\": port must be 1-65535"
        ));
    }
    if let Some(p) = &s.path_prefix {
        if !p.is_empty() && !p.starts_with('/') {
            return Some(format!(
                "extension provider \"{name}\": pathPrefix must start with /"
            ));
        }
    }
    if let Some(code) = &s.status_on_error {
        if !code.is_empty() && !code.parse::<u16>().is_ok_and(|c| (100..600).contains(&c)) {
            return Some(format!(
                "extension provider \"{name}\": statusOnError \"{code}\" is not an HTTP status"
            ));
        }
    }
    let lists = [
        &s.include_request_headers_in_check,
        &s.include_headers_in_check,
        &s.headers_to_upstream_on_allow,
        &s.headers_to_downstream_on_deny,
        &s.headers_to_downstream_on_allow,
    ];
    if lists.iter().any(|l| l.iter().any(|h| h == "*")) {
        return Some(format!(
            "extension provider \"{name}\": a lone \"*\" is not allowed in header lists"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_rewrite() {
        let b = vec!["td1".to_string()];
        assert_eq!(
            rewrite_principals(&["cluster.local/ns/a/sa/b".into()], &b),
            vec!["td1/ns/a/sa/b"]
        );
        let b2 = vec!["td1".to_string(), "old".to_string()];
        assert_eq!(
            rewrite_principals(&["old/ns/a/sa/b".into()], &b2),
            vec!["td1/ns/a/sa/b", "old/ns/a/sa/b"]
        );
        assert_eq!(
            rewrite_principals(&["other/ns/a/sa/b".into()], &b2),
            vec!["other/ns/a/sa/b"]
        );
        assert_eq!(
            rewrite_principals(&["*/ns/a/sa/b".into()], &b2),
            vec!["*/ns/a/sa/b"]
        );
        assert_eq!(rewrite_principals(&["a/b".into()], &b2), vec!["a/b"]);
    }

    #[test]
    fn request_principal_table() {
        let cases = [
            ("*", "iss", "sub", true),
            ("*", "iss", "", false),
            ("*/u1", "any", "u1", true),
            ("*.com/u1", "a.com", "u1", true),
            ("*.com/u1", "a.org", "u1", false),
            ("*@x.com", "i", "me@x.com", true),
            ("iss/*", "iss", "x", true),
            ("iss/us*", "iss", "user", true),
            ("iss/us*", "iss", "them", false),
            ("a*", "ab", "x", true),
            // Contains a '/', so Istio splits at the last one: iss "https:/", sub prefix "a".
            ("https://a*", "https://ab", "x", false),
            ("https://a*", "https:/", "ab", true),
            ("https://a/b/c", "https://a/b", "c", true),
            ("noslash", "noslash", "", true),
            ("noslash", "noslash", "x", false),
        ];
        for (v, iss, sub, want) in cases {
            let jwt = serde_json::json!({"iss": iss, "sub": sub});
            let a = Attrs {
                http: Some(HttpAttrs {
                    method: "GET",
                    authority: "h",
                    path: "/",
                    raw_path: "/",
                    headers: &[],
                    jwt: Some(&jwt),
                }),
                ..Default::default()
            };
            assert_eq!(request_principal(v).matches(&a), want, "{v} vs {iss}/{sub}");
        }
    }

    #[test]
    fn string_rows() {
        assert!(principal("*").matches("anything"));
        assert!(principal("*/ns/a/sa/b").matches("spiffe://x/ns/a/sa/b"));
        assert!(!principal("*/ns/a/sa/b").matches("/ns/a/sa/b"));
        assert!(principal("td/ns/a/*").matches("spiffe://td/ns/a/sa/q"));
        assert!(namespace("prod*").matches("spiffe://td/ns/prod-eu/sa/x"));
        assert!(!namespace("prod").matches("spiffe://td/ns/prod-eu/sa/x"));
        assert!(namespace("prod").matches("spiffe://td/ns/prod/sa/x"));
        assert!(service_account("sa1", "foo").matches("spiffe://any/ns/foo/sa/sa1"));
        assert!(!service_account("sa1", "foo").matches("spiffe://any/ns/foo/sa/sa1x"));
        assert!(!service_account("a.b", "foo").matches("spiffe://any/ns/foo/sa/aXb"));
        assert!(host("example.com").matches("EXAMPLE.com"));
        assert!(!host("example.com").matches("example.com:80"));
        assert!(host("*.com").matches("A.COM"));
        assert!(trust_domain("td").matches("spiffe://td/ns/a/sa/b"));
        assert!(!trust_domain("td").matches("spiffe://td2/ns/a/sa/b"));
        assert!(trust_domain("*.local").matches("spiffe://cluster.local/ns/a/sa/b"));
        assert!(generic("*x*").matches("ax*"));
        assert!(!generic("*").matches(""));
    }

    /// The index must never hide a rule the full match would accept.
    #[test]
    fn index_agrees_with_full_match() {
        use crate::config::Loader;
        let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: s, namespace: foo}
spec: {template: {metadata: {labels: {app: s}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from: [{source: {namespaces: [x]}}]
  - from: [{source: {namespaces: [ns]}}, {source: {principals: [td/ns/a/sa/b]}}]
  - to: [{operation: {paths: ["/api/v1/*", "/exact"]}}]
  - to: [{operation: {paths: ["/t/{*}/x"]}}]
  - to: [{operation: {hosts: [Example.COM]}}]
  - when: [{key: source.principal, values: [td/ns/w/sa/w]}]
"#;
        let mut l = Loader::new();
        l.add_text("t.yaml", text);
        let (cfg, d) = l.finish();
        assert!(d.is_empty(), "{d:?}");
        let wl = cfg.workload("foo", "s").unwrap();
        let aps = crate::scope::authorization_policies(&cfg, wl);
        let c = CompiledAuthz::compile(&aps, &cfg.mesh, wl);
        let cases: [(&str, &str, &str, Option<u32>); 8] = [
            ("spiffe://td/ns/ns/x/sa/y", "/", "h", Some(0)),
            ("spiffe://td/ns/ns/sa/y", "/", "h", Some(1)),
            ("spiffe://td/ns/a/sa/b", "/", "h", Some(1)),
            ("spiffe://td/ns/q/sa/q", "/api/v1/items", "h", Some(2)),
            ("spiffe://td/ns/q/sa/q", "/exact", "h", Some(2)),
            ("spiffe://td/ns/q/sa/q", "/t/seg/x", "h", Some(3)),
            ("spiffe://td/ns/q/sa/q", "/", "example.com", Some(4)),
            ("spiffe://td/ns/w/sa/w", "/", "h", Some(5)),
        ];
        for (peer, path, host, want) in cases {
            let a = Attrs {
                principal: Some(peer),
                http: Some(HttpAttrs {
                    method: "GET",
                    authority: host,
                    path,
                    raw_path: path,
                    headers: &[],
                    jwt: None,
                }),
                ..Default::default()
            };
            let got = c.evaluate(Protocol::Http, &a).deciding.map(|m| m.rule);
            let brute = c
                .http
                .allow
                .rules
                .iter()
                .find(|r| r.matches(&a))
                .map(|r| r.rule);
            assert_eq!(got, want, "{peer} {path} {host}");
            assert_eq!(got, brute, "{peer} {path} {host}");
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.1.2.3".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("9.9.9.9".parse().unwrap()));
        assert!(Cidr::parse("::/0")
            .unwrap()
            .contains("::1".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4/33").is_none());
        assert!(bracket_keys("[a][b.c]").unwrap() == vec!["a", "b.c"]);
        assert!(bracket_keys("[a").is_none());
    }
}
