//! Mesh-wide settings (Istio `MeshConfig`) that change security semantics: root namespace,
//! trust domain and aliases, extension providers for CUSTOM, path normalization and the
//! outbound traffic policy. Other MeshConfig fields are accepted and ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::path::Normalization;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathNormalizationConfig {
    #[serde(default)]
    pub normalization: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: Option<String>,
}

/// Settings shared by `envoyExtAuthzHttp` and `envoyExtAuthzGrpc`; HTTP-only ones are empty
/// for gRPC providers.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthzSettings {
    #[serde(default)]
    pub service: String,
    /// Istio's proto-JSON reader accepts `8000` and `"8000"` alike (Istio's docs quote it).
    #[serde(default, deserialize_with = "number_or_string")]
    pub port: u32,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub clear_route_cache: bool,
    #[serde(default)]
    pub status_on_error: Option<String>,
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
    #[serde(default)]
    pub include_request_body_in_check: Option<serde_json::Value>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Num(u32),
        Str(String),
    }
    match N::deserialize(d)? {
        N::Num(n) => Ok(n),
        N::Str(s) => s.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!("invalid port \"{s}\": expected a number"))
        }),
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaCertificate {
    #[serde(default)]
    trust_domains: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ExtAuthzKind {
    EnvoyExtAuthzHttp,
    EnvoyExtAuthzGrpc,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    /// `None` for providers of other kinds (tracing, logging): unusable for CUSTOM.
    pub ext_authz: Option<(ExtAuthzKind, ExtAuthzSettings)>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMeshConfig {
    #[serde(default)]
    root_namespace: Option<String>,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    trust_domain_aliases: Vec<String>,
    #[serde(default)]
    extension_providers: Vec<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    path_normalization: Option<PathNormalizationConfig>,
    #[serde(default)]
    outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    #[serde(default)]
    ca_certificates: Vec<CaCertificate>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    pub root_namespace: String,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub extension_providers: Vec<ExtensionProvider>,
    #[serde(serialize_with = "ser_normalization")]
    pub path_normalization: Normalization,
    /// `ALLOW_ANY` (Istio's default) or `REGISTRY_ONLY`.
    pub outbound_traffic_policy: String,
    /// Trust domains of `caCertificates[].trustDomains`: accepted at the TLS handshake, but
    /// not part of the principal-rewriting bundle.
    pub ca_trust_domains: Vec<String>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            root_namespace: "istio-system".into(),
            trust_domain: "cluster.local".into(),
            trust_domain_aliases: Vec::new(),
            extension_providers: Vec::new(),
            path_normalization: Normalization::Base,
            outbound_traffic_policy: "ALLOW_ANY".into(),
            ca_trust_domains: Vec::new(),
        }
    }
}

fn ser_normalization<S: serde::Serializer>(n: &Normalization, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match n {
        Normalization::None => "NONE",
        Normalization::Base => "BASE",
        Normalization::MergeSlashes => "MERGE_SLASHES",
        Normalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
    })
}

/// A MeshConfig value that cannot be used, with the field path it is at.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MeshError {
    pub field: String,
    pub message: String,
}

impl MeshConfig {
    /// Builds the mesh config from its JSON form (a parsed MeshConfig YAML document).
    pub fn from_value(v: serde_json::Value) -> Result<Self, MeshError> {
        let raw: RawMeshConfig = serde_path_to_error::deserialize(v).map_err(|e| MeshError {
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
        let mut mesh = MeshConfig::default();
        if let Some(ns) = raw.root_namespace.filter(|s| !s.is_empty()) {
            mesh.root_namespace = ns;
        }
        if let Some(td) = raw.trust_domain.filter(|s| !s.is_empty()) {
            mesh.trust_domain = td;
        }
        mesh.trust_domain_aliases = raw.trust_domain_aliases;
        mesh.ca_trust_domains = raw
            .ca_certificates
            .into_iter()
            .flat_map(|c| c.trust_domains)
            .collect();
        if let Some(n) = raw.path_normalization.and_then(|p| p.normalization) {
            mesh.path_normalization = Normalization::parse(&n).ok_or_else(|| MeshError {
                field: "pathNormalization.normalization".into(),
                message: format!(
                    "unknown value \"{n}\", expected one of DEFAULT, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES"
                ),
            })?;
        }
        if let Some(m) = raw.outbound_traffic_policy.and_then(|o| o.mode) {
            if m != "ALLOW_ANY" && m != "REGISTRY_ONLY" {
                return Err(MeshError {
                    field: "outboundTrafficPolicy.mode".into(),
                    message: format!("unknown value \"{m}\", expected ALLOW_ANY or REGISTRY_ONLY"),
                });
            }
            mesh.outbound_traffic_policy = m;
        }
        for (i, p) in raw.extension_providers.into_iter().enumerate() {
            let name = p
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_string();
            let mut ext_authz = None;
            for (key, kind) in [
                ("envoyExtAuthzHttp", ExtAuthzKind::EnvoyExtAuthzHttp),
                ("envoyExtAuthzGrpc", ExtAuthzKind::EnvoyExtAuthzGrpc),
            ] {
                if let Some(v) = p.get(key) {
                    let s: ExtAuthzSettings =
                        serde_path_to_error::deserialize(v.clone()).map_err(|e| MeshError {
                            field: format!("extensionProviders[{i}].{key}.{}", e.path()),
                            message: e.inner().to_string(),
                        })?;
                    ext_authz = Some((kind, s));
                }
            }
            mesh.extension_providers
                .push(ExtensionProvider { name, ext_authz });
        }
        Ok(mesh)
    }

    /// Trust domain followed by its aliases: the principals Istio rewrites `cluster.local` to.
    pub fn trust_domain_bundle(&self) -> Vec<String> {
        let mut v = vec![self.trust_domain.clone()];
        for a in &self.trust_domain_aliases {
            if !v.contains(a) {
                v.push(a.clone());
            }
        }
        v
    }

    /// Whether an mTLS peer of this trust domain passes the inbound handshake: the mesh trust
    /// domain, an alias, or a trust domain of `caCertificates`.
    pub fn accepts_trust_domain(&self, td: &str) -> bool {
        td == self.trust_domain
            || self.trust_domain_aliases.iter().any(|a| a == td)
            || self.ca_trust_domains.iter().any(|a| a == td)
    }

    /// Top-level MeshConfig keys, to recognise a bare MeshConfig document among resources.
    pub const KNOWN_KEYS: [&'static str; 8] = [
        "rootNamespace",
        "trustDomain",
        "trustDomainAliases",
        "extensionProviders",
        "pathNormalization",
        "outboundTrafficPolicy",
        "caCertificates",
        "defaultConfig",
    ];

    pub fn provider(&self, name: &str) -> Option<&ExtensionProvider> {
        self.extension_providers.iter().find(|p| p.name == name)
    }
}
