//! SPIFFE IDs of Kubernetes-style workloads: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    #[error("\"{0}\" does not start with spiffe://")]
    NotSpiffe(String),
    #[error("\"{0}\" has an invalid trust domain (lowercase letters, digits, '.', '-', '_'; 1-255 characters)")]
    BadTrustDomain(String),
    #[error(
        "\"{0}\" is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadPath(String),
}

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Trust domain names per the SPIFFE spec: lowercase letters, digits, dots, dashes, underscores.
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// Kubernetes names (DNS-1123 labels/subdomains): what a namespace or service account may be.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let id = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        if !valid_trust_domain(trust_domain) {
            return Err(SpiffeIdError::BadTrustDomain(id));
        }
        if !valid_name(namespace) || !valid_name(service_account) {
            return Err(SpiffeIdError::BadPath(id));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
    /// The same workload in another trust domain (root migration, aliases).
    pub fn with_trust_domain(&self, td: &str) -> Result<Self, SpiffeIdError> {
        SpiffeId::new(td, &self.namespace, &self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::NotSpiffe(s.into()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::BadPath(s.into()))?;
        if !valid_trust_domain(td) {
            return Err(SpiffeIdError::BadTrustDomain(s.into()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] if valid_name(ns) && valid_name(sa) => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeIdError::BadPath(s.into())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let id: SpiffeId = "spiffe://cluster.local/ns/foo/sa/bar".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "foo");
        assert_eq!(id.service_account(), "bar");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/foo/sa/bar");
        for bad in [
            "http://cluster.local/ns/foo/sa/bar",
            "spiffe://Cluster.local/ns/foo/sa/bar",
            "spiffe://cluster.local/ns/foo/sa/",
            "spiffe://cluster.local/ns/foo/sa/bar/extra",
            "spiffe://cluster.local/ns/foo",
            "spiffe:///ns/foo/sa/bar",
            "spiffe://cluster.local/ns/Foo/sa/bar",
            "spiffe://cluster.local/ns/foo/sa/ba r",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
