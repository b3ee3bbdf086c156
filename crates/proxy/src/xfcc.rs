//! `x-forwarded-client-cert` as Istio's sidecars set it on inbound requests: Envoy's
//! `APPEND_FORWARD` with `Subject`, `URI` and `DNS` details. For an mTLS peer the proxy appends
//! one element `By=<own URI SAN>;Hash=<hex SHA-256 of the peer leaf>;Subject="<peer subject>";
//! URI=<peer URI SAN>[;DNS=<peer DNS SAN>...]` to whatever the client sent; for a plaintext
//! peer the header is removed, since no one vouches for it.
//!
//! Appending (rather than replacing) means an mTLS client can put its own elements first; as
//! with Envoy, the element this proxy adds is always the last one, and apps must read that one.

use aws_lc_rs::digest;
use hyper::header::{HeaderMap, HeaderValue};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

pub const XFCC: &str = "x-forwarded-client-cert";

/// What XFCC says about a verified peer certificate, computed once per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// Hex SHA-256 of the leaf certificate (DER), lowercase as Envoy writes it.
    pub hash: String,
    /// The subject in RFC 2253 form (empty for Warden's SVIDs, which have none).
    pub subject: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
}

impl PeerCert {
    /// Reads the details from the peer's leaf. The handshake already verified the certificate,
    /// so a parse failure here only loses the optional details (subject, DNS), never the hash.
    pub fn from_der(der: &[u8]) -> Self {
        let hash = sha256_hex(der);
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return PeerCert {
                hash,
                subject: String::new(),
                uris: Vec::new(),
                dns: Vec::new(),
            };
        };
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
        PeerCert {
            hash,
            subject: rfc2253(cert.subject()),
            uris,
            dns,
        }
    }

    /// This proxy's element: `by` is its own URI SAN (its SPIFFE ID).
    pub fn element(&self, by: &str) -> String {
        let mut parts = Vec::with_capacity(4 + self.uris.len() + self.dns.len());
        if !by.is_empty() {
            parts.push(format!("By={by}"));
        }
        parts.push(format!("Hash={}", self.hash));
        // `rfc2253` already escaped any quote inside the subject.
        parts.push(format!("Subject=\"{}\"", self.subject));
        parts.extend(self.uris.iter().map(|u| format!("URI={u}")));
        parts.extend(self.dns.iter().map(|d| format!("DNS={d}")));
        parts.join(";")
    }
}

/// Applies `APPEND_FORWARD` to the request headers: removed for a plaintext peer; for an mTLS
/// peer, the client's values (all of them, joined as one list) followed by this proxy's element.
pub fn append_forward(headers: &mut HeaderMap, by: &str, peer: Option<&PeerCert>) {
    let previous: Vec<String> = headers
        .get_all(XFCC)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect();
    headers.remove(XFCC);
    let Some(peer) = peer else { return };
    let mut value = previous.join(",");
    if !value.is_empty() {
        value.push(',');
    }
    value.push_str(&peer.element(by));
    // Every part came from a verified certificate or a header that was already valid; if the
    // mix still cannot be a header value, send only this proxy's element rather than none.
    match HeaderValue::from_str(&value) {
        Ok(v) => {
            headers.insert(XFCC, v);
        }
        Err(_) => {
            if let Ok(v) = HeaderValue::from_str(&peer.element(by)) {
                headers.insert(XFCC, v);
            }
        }
    }
}

pub fn sha256_hex(der: &[u8]) -> String {
    use std::fmt::Write as _;
    let d = digest::digest(&digest::SHA256, der);
    let mut s = String::with_capacity(64);
    for b in d.as_ref() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A distinguished name as OpenSSL's `XN_FLAG_RFC2253` prints it (what Envoy puts in
/// `Subject`): RDNs last to first, separated by `,`, multi-valued RDNs joined by `+`.
fn rfc2253(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| rdn.iter().map(attribute).collect::<Vec<_>>().join("+"))
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn attribute(atv: &AttributeTypeAndValue<'_>) -> String {
    let oid = atv.attr_type().to_id_string();
    let key = match oid.as_str() {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.5" => "serialNumber",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => "",
    };
    match atv.as_str() {
        Ok(v) if !key.is_empty() => format!("{key}={}", escape(v)),
        Ok(v) => format!("{oid}={}", escape(v)),
        // Not a string type: RFC 2253 writes the DER value as `#` and hex.
        Err(_) => {
            use std::fmt::Write as _;
            let mut s = format!("{}=#", if key.is_empty() { &oid } else { key });
            for b in atv.attr_value().data.iter() {
                let _ = write!(s, "{b:02X}");
            }
            s
        }
    }
}

/// RFC 2253 §2.4 escaping, plus control and non-ASCII bytes as `\XX` (OpenSSL's `ESC_MSB`).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.len().saturating_sub(1);
    for (i, c) in v.char_indices() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_ascii_control() || !c.is_ascii() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(subject: &[(rcgen::DnType, &str)], uri: &str, dns: &[&str]) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (k, v) in subject {
            p.distinguished_name.push(k.clone(), *v);
        }
        p.subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        for d in dns {
            p.subject_alt_names
                .push(rcgen::SanType::DnsName((*d).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn an_svid_without_subject_reads_as_istio_shows_it() {
        let der = cert(&[], "spiffe://cluster.local/ns/foo/sa/sleep", &[]);
        let p = PeerCert::from_der(&der);
        assert_eq!(
            p.element("spiffe://cluster.local/ns/foo/sa/httpbin"),
            format!(
                "By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash={};Subject=\"\";URI=spiffe://cluster.local/ns/foo/sa/sleep",
                sha256_hex(&der)
            )
        );
    }

    #[test]
    fn subject_is_rfc2253_and_dns_sans_follow_the_uri() {
        let der = cert(
            &[
                (rcgen::DnType::OrganizationName, "Acme, Inc"),
                (rcgen::DnType::CommonName, "client"),
            ],
            "spiffe://td/ns/a/sa/b",
            &["a.example", "b.example"],
        );
        let p = PeerCert::from_der(&der);
        assert_eq!(p.subject, "CN=client,O=Acme\\, Inc");
        assert!(p
            .element("spiffe://td/ns/x/sa/y")
            .ends_with(";Subject=\"CN=client,O=Acme\\, Inc\";URI=spiffe://td/ns/a/sa/b;DNS=a.example;DNS=b.example"));
    }

    #[test]
    fn append_forward_keeps_client_values_first_and_drops_them_for_plaintext() {
        let der = cert(&[], "spiffe://td/ns/a/sa/b", &[]);
        let p = PeerCert::from_der(&der);
        let mut h = HeaderMap::new();
        h.append(
            XFCC,
            HeaderValue::from_static("By=spiffe://x;URI=spiffe://y"),
        );
        h.append(XFCC, HeaderValue::from_static("URI=spiffe://z"));
        append_forward(&mut h, "spiffe://td/ns/s/sa/me", Some(&p));
        let all: Vec<_> = h.get_all(XFCC).iter().collect();
        assert_eq!(all.len(), 1);
        let v = all[0].to_str().unwrap();
        assert!(
            v.starts_with(
                "By=spiffe://x;URI=spiffe://y,URI=spiffe://z,By=spiffe://td/ns/s/sa/me;Hash="
            ),
            "{v}"
        );
        append_forward(&mut h, "spiffe://td/ns/s/sa/me", None);
        assert!(h.get(XFCC).is_none());
    }

    #[test]
    fn escaping_follows_rfc2253() {
        assert_eq!(escape("#a b "), "\\#a b\\ ");
        assert_eq!(escape("a+b;c<d>\"e\\"), "a\\+b\\;c\\<d\\>\\\"e\\\\");
        assert_eq!(escape("é"), "\\C3\\A9");
    }
}
