//! Describing certificates for people (`warden cert inspect`): parse a PEM chain, report each
//! certificate's names, validity and key, and verify the chain against a trust bundle. Also
//! owns the chain verification the CA uses to validate its own chain at load.

use std::fmt;
use std::time::SystemTime;

use serde::{Serialize, Serializer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::time::ASN1Time;

use crate::ca::{from_unix, parse_certs_pem, unix_secs, CaError};

/// What `warden cert inspect` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// In input order: the leaf first for a well-formed chain.
    pub certificates: Vec<CertificateInfo>,
    /// Present when a bundle was given: whether the chain verifies to one of its roots now.
    #[serde(serialize_with = "ser_verified")]
    pub chain_verified: Option<Result<(), String>>,
}

/// One certificate, described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateInfo {
    pub subject: String,
    pub issuer: String,
    /// Hex, colon-separated.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// Seconds until `not_after`; negative once expired.
    pub seconds_left: i64,
    /// e.g. "23h 59m", "expired 2d 3h ago", "not yet valid".
    pub time_left: String,
    /// The SPIFFE ID when the certificate has exactly one URI SAN and it is a `spiffe://` URI.
    pub spiffe_id: Option<String>,
    pub uri_sans: Vec<String>,
    pub is_ca: bool,
    /// e.g. "ECDSA P-256", "RSA 2048".
    pub key_algorithm: String,
}

// `Result` would serialize as {"Ok": null}; tools reading the JSON want a plain flag.
fn ser_verified<S: Serializer>(v: &Option<Result<(), String>>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Verified<'a> {
        verified: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
    }
    match v {
        None => s.serialize_none(),
        Some(Ok(())) => s.serialize_some(&Verified {
            verified: true,
            error: None,
        }),
        Some(Err(e)) => s.serialize_some(&Verified {
            verified: false,
            error: Some(e),
        }),
    }
}

/// Describe the certificates of a PEM chain and, given a bundle (root DERs), verify it.
pub fn inspect_chain(
    pem: &str,
    bundle: Option<&[Vec<u8>]>,
    now: SystemTime,
) -> Result<Inspection, CaError> {
    let ders = parse_certs_pem(pem.as_bytes(), "input")?;
    if ders.is_empty() {
        return Err(CaError::BadPem {
            what: "input".into(),
            message: "no CERTIFICATE block found".into(),
        });
    }
    let mut certificates = Vec::with_capacity(ders.len());
    for (i, der) in ders.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CaError::BadCertificate {
            what: format!("input: certificate {}", i + 1),
            message: e.to_string(),
        })?;
        certificates.push(describe(&cert, now));
    }
    let chain_verified = bundle.map(|roots| verify_chain(&ders, roots, now));
    Ok(Inspection {
        certificates,
        chain_verified,
    })
}

fn describe(cert: &X509Certificate<'_>, now: SystemTime) -> CertificateInfo {
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    let now_s = unix_secs(now);
    let seconds_left = na - now_s;
    let time_left = if now_s < nb {
        format!("not yet valid (starts in {})", human(nb - now_s))
    } else if seconds_left < 0 {
        format!("expired {} ago", human(-seconds_left))
    } else {
        human(seconds_left)
    };
    let uri_sans: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        _ => vec![],
    };
    let spiffe_id = match uri_sans.as_slice() {
        [one] if one.starts_with("spiffe://") => Some(one.clone()),
        _ => None,
    };
    CertificateInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: rfc3339(from_unix(nb)),
        not_after: rfc3339(from_unix(na)),
        seconds_left,
        time_left,
        spiffe_id,
        uri_sans,
        is_ca: cert.is_ca(),
        key_algorithm: key_algorithm(cert),
    }
}

fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => "ECDSA P-256".into(),
            Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384".into(),
            Some(c) if c == OID_NIST_EC_P521 => "ECDSA P-521".into(),
            Some(c) => format!("EC curve {c}"),
            None => "EC (no named curve)".into(),
        }
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(k)) => format!("RSA {}", k.key_size()),
            _ => "RSA (malformed key)".into(),
        }
    } else if *alg == OID_SIG_ED25519 {
        "Ed25519".into()
    } else {
        format!("unknown ({alg})")
    }
}

/// "1d 2h", "23h 59m", "4m 10s": the two largest units, enough for a person to act on.
pub fn human(secs: i64) -> String {
    let s = secs.max(0);
    let (d, h, m, sec) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

/// RFC 3339 in UTC, whole seconds.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

/// Verify `chain` (leaf first, DER) up to one of `roots` (DER) at `now`: every signature,
/// issuer/subject name links, validity periods, that every issuer is a CA allowed to sign
/// certificates, and path-length constraints. SHA-1 signatures are refused. Returns why not.
///
/// When the first certificate is a workload certificate (not a CA), the chain must also pass
/// webpki, as TLS peers check it, for serverAuth or clientAuth (names are not checked): so
/// "verified" is never claimed for a chain that handshakes would refuse (name constraints,
/// unknown critical extensions, anything else webpki enforces).
pub fn verify_chain(chain: &[Vec<u8>], roots: &[Vec<u8>], now: SystemTime) -> Result<(), String> {
    verify_chain_fields(chain, roots, now)?;
    let leaf = parse(&chain[0], "certificate 1")?;
    if leaf.is_ca() {
        return Ok(());
    }
    webpki_verify(&chain[0], &chain[1..], roots, now)
        .map_err(|e| format!("certificate 1 ({}): {e}", name(&leaf)))
}

/// What webpki, as TLS peers run it, says of `leaf` issued through `intermediates` (DER,
/// any order) up to one of `roots` at `now`: accepted for serverAuth or for clientAuth.
/// Subject names are not checked; the error says why in words.
pub(crate) fn webpki_verify(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: SystemTime,
) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let leaf = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| webpki_reason(&e))?;
    let mut anchors = Vec::with_capacity(roots.len());
    for (i, r) in roots.iter().enumerate() {
        let der = CertificateDer::from(r.as_slice());
        match webpki::anchor_from_trusted_cert(&der) {
            Ok(a) => anchors.push(a.to_owned()),
            Err(e) => {
                return Err(format!(
                    "bundle root {} is not usable as a trust anchor: {}",
                    i + 1,
                    webpki_reason(&e)
                ))
            }
        }
    }
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let algs = provider.signature_verification_algorithms.all;
    let secs = u64::try_from(unix_secs(now)).unwrap_or(0);
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
    let verify = |usage| {
        ee.verify_for_usage(algs, &anchors, &intermediates, time, usage, None, None)
            .map(|_| ())
    };
    match verify(webpki::KeyUsage::server_auth()) {
        Ok(()) => Ok(()),
        Err(server) => match verify(webpki::KeyUsage::client_auth()) {
            Ok(()) => Ok(()),
            // Both fail alike unless the usage was the problem; report the informative one.
            Err(client) => Err(webpki_reason(if is_eku_error(&server) {
                &client
            } else {
                &server
            })),
        },
    }
}

fn is_eku_error(e: &webpki::Error) -> bool {
    matches!(
        e,
        webpki::Error::RequiredEkuNotFoundContext(_) | webpki::Error::EmptyEkuExtension
    )
}

/// A webpki refusal in words.
pub(crate) fn webpki_reason(e: &webpki::Error) -> String {
    use webpki::Error as E;
    let text = match e {
        E::NameConstraintViolation => {
            "a CA certificate's name constraints exclude the certificate's names (TLS peers \
             refuse any URI name constraint, so a SPIFFE ID under one never verifies)"
        }
        E::PathLenConstraintViolated => {
            "a CA certificate's path length constraint is exceeded: more intermediate CAs sit \
             below it than it allows"
        }
        E::UnsupportedCriticalExtension => {
            "a certificate carries a critical extension that TLS peers do not understand"
        }
        E::CaUsedAsEndEntity => "a CA certificate is used as the end-entity certificate",
        E::EndEntityUsedAsCa => "a certificate that is not a CA (CA:false) issues certificates",
        E::CertExpired { .. } => "a certificate in the chain has expired",
        E::CertNotValidYet { .. } => "a certificate in the chain is not valid yet",
        E::UnknownIssuer => "the chain does not lead to a root in the bundle",
        E::InvalidSignatureForPublicKey => "a signature does not verify with its issuer's key",
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::SignatureAlgorithmMismatch => {
            "a signature uses an algorithm TLS peers do not accept (e.g. SHA-1)"
        }
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            "the extendedKeyUsage allows neither serverAuth nor clientAuth"
        }
        E::MalformedNameConstraint | E::InvalidNetworkMaskConstraint => {
            "a CA certificate's name constraints are malformed"
        }
        E::UnsupportedCertVersion => "a certificate is not X.509 version 3",
        E::MaximumPathDepthExceeded => "the chain has too many intermediate CAs",
        _ => return format!("TLS peers refuse the chain ({})", variant_name(e)),
    };
    format!("{text} ({})", variant_name(e))
}

/// `NameConstraintViolation` rather than a context struct's every byte.
fn variant_name(e: &webpki::Error) -> String {
    let debug = format!("{e:?}");
    let end = debug
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(debug.len());
    debug[..end].to_string()
}

/// The checks of [`verify_chain`] on certificate fields, with messages naming the certificate.
fn verify_chain_fields(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: SystemTime,
) -> Result<(), String> {
    if chain.is_empty() {
        return Err("empty chain".into());
    }
    let t = ASN1Time::from_timestamp(unix_secs(now)).map_err(|e| e.to_string())?;
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, d)| parse(d, &format!("certificate {}", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    let label = |i: usize, c: &X509Certificate<'_>| format!("certificate {} ({})", i + 1, name(c));

    for (i, c) in certs.iter().enumerate() {
        check_time(c, t, &label(i, c))?;
        if i > 0 {
            check_issuer(c, i - 1, &label(i, c))?;
        }
    }
    for i in 0..certs.len() - 1 {
        check_link(&certs[i], &certs[i + 1], &label(i, &certs[i]))?;
    }

    let last = certs.len() - 1;
    if roots.iter().any(|r| *r == chain[last]) {
        return Ok(());
    }
    let top = &certs[last];
    let mut why = vec![];
    for (j, rder) in roots.iter().enumerate() {
        let root = parse(rder, &format!("bundle root {}", j + 1))?;
        if root.subject().as_raw() != top.issuer().as_raw() {
            continue;
        }
        let rl = format!("bundle root {} ({})", j + 1, name(&root));
        let r = check_time(&root, t, &rl)
            .and_then(|_| check_issuer(&root, last, &rl))
            .and_then(|_| check_link(top, &root, &label(last, top)));
        match r {
            Ok(()) => return Ok(()),
            Err(e) => why.push(e),
        }
    }
    if why.is_empty() {
        Err(format!(
            "no root in the bundle is named {} (the issuer of {})",
            quoted_or_empty(&top.issuer().to_string()),
            label(last, top)
        ))
    } else {
        Err(why.join("; "))
    }
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, String> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| format!("{what}: not a valid certificate: {e}"))
}

fn name(c: &X509Certificate<'_>) -> String {
    let s = c.subject().to_string();
    if !s.is_empty() {
        return s;
    }
    match c.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .find_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "empty subject".into()),
        _ => "empty subject".into(),
    }
}

fn quoted_or_empty(s: &str) -> String {
    if s.is_empty() {
        "(empty name)".into()
    } else {
        format!("\"{s}\"")
    }
}

fn check_time(c: &X509Certificate<'_>, t: ASN1Time, what: &str) -> Result<(), String> {
    let v = c.validity();
    if t < v.not_before {
        return Err(format!(
            "{what} is not valid before {}",
            rfc3339(from_unix(v.not_before.timestamp()))
        ));
    }
    if t > v.not_after {
        return Err(format!(
            "{what} expired at {}",
            rfc3339(from_unix(v.not_after.timestamp()))
        ));
    }
    Ok(())
}

/// `below` = how many CA certificates sit between this issuer and the leaf.
fn check_issuer(c: &X509Certificate<'_>, below: usize, what: &str) -> Result<(), String> {
    match c.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if let Some(max) = bc.value.path_len_constraint {
                if below as u64 > u64::from(max) {
                    return Err(format!(
                        "{what} allows {max} intermediate(s) below it, the chain has {below}"
                    ));
                }
            }
        }
        Ok(_) => return Err(format!("{what} signs certificates but is not a CA")),
        Err(e) => return Err(format!("{what}: basicConstraints: {e}")),
    }
    match c.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            Err(format!("{what} is a CA whose keyUsage lacks keyCertSign"))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{what}: keyUsage: {e}")),
    }
}

fn check_link(
    child: &X509Certificate<'_>,
    parent: &X509Certificate<'_>,
    what: &str,
) -> Result<(), String> {
    if child.issuer().as_raw() != parent.subject().as_raw() {
        return Err(format!(
            "{what} is issued by {}, not by the next certificate {}",
            quoted_or_empty(&child.issuer().to_string()),
            quoted_or_empty(&parent.subject().to_string())
        ));
    }
    let sig = &child.signature_algorithm.algorithm;
    if *sig == OID_PKCS1_SHA1WITHRSA || *sig == OID_SHA1_WITH_RSA {
        return Err(format!(
            "{what} is signed with SHA-1, which is not accepted"
        ));
    }
    child
        .verify_signature(Some(parent.public_key()))
        .map_err(|e| format!("{what}: signature does not verify with its issuer's key ({e})"))
}

impl fmt::Display for Inspection {
    /// The text form of `warden cert inspect`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.certificates.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "Certificate {}:", i + 1)?;
            if let Some(id) = &c.spiffe_id {
                writeln!(f, "  SPIFFE ID:  {id}")?;
            } else if !c.uri_sans.is_empty() {
                writeln!(f, "  URI SANs:   {}", c.uri_sans.join(", "))?;
            }
            let or_empty = |s: &str| {
                if s.is_empty() {
                    "(empty)".to_string()
                } else {
                    s.to_string()
                }
            };
            writeln!(f, "  Subject:    {}", or_empty(&c.subject))?;
            writeln!(f, "  Issuer:     {}", or_empty(&c.issuer))?;
            writeln!(f, "  Serial:     {}", c.serial)?;
            writeln!(f, "  Valid:      {} to {}", c.not_before, c.not_after)?;
            writeln!(f, "  Time left:  {}", c.time_left)?;
            writeln!(f, "  CA:         {}", if c.is_ca { "yes" } else { "no" })?;
            writeln!(f, "  Key:        {}", c.key_algorithm)?;
        }
        match &self.chain_verified {
            None => Ok(()),
            Some(Ok(())) => writeln!(f, "\nChain: verified against the bundle"),
            Some(Err(e)) => writeln!(f, "\nChain: NOT verified: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::testdir::TempDir;
    use crate::ca::{Ca, CaError, KeyAlg, TtlPolicy};
    use crate::csr::generate_csr;
    use std::time::Duration;

    fn setup(now: SystemTime) -> (TempDir, Ca, String) {
        let d = TempDir::new("inspect");
        let ca = Ca::init_with(
            d.path(),
            "cluster.local",
            KeyAlg::EcP256,
            TtlPolicy::default(),
            now,
        )
        .unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        let (_, csr) = generate_csr(&id, KeyAlg::EcP256).unwrap();
        let svid = ca.sign_csr(&csr, &id, None, now).unwrap();
        let pem = svid.cert_chain_pem.concat();
        (d, ca, pem)
    }

    #[test]
    fn describes_a_leaf_and_verifies_it() {
        let now = SystemTime::now();
        let (_d, ca, pem) = setup(now);
        let roots = ca.bundle().roots_der;
        let later = now + Duration::from_secs(60);
        let ins = inspect_chain(&pem, Some(&roots), later).unwrap();
        assert_eq!(ins.certificates.len(), 1);
        let c = &ins.certificates[0];
        assert_eq!(
            c.spiffe_id.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/cart")
        );
        assert_eq!(c.uri_sans.len(), 1);
        assert_eq!(c.subject, "");
        assert!(
            c.issuer.contains("Warden root CA for cluster.local"),
            "{}",
            c.issuer
        );
        assert!(!c.is_ca);
        assert_eq!(c.key_algorithm, "ECDSA P-256");
        assert_eq!(c.seconds_left, 86400 - 60);
        assert_eq!(c.time_left, "23h 59m");
        assert_eq!(c.not_after, rfc3339(now + Duration::from_secs(86400)));
        assert!(c.serial.contains(':'));
        assert_eq!(ins.chain_verified, Some(Ok(())));

        let json = serde_json::to_value(&ins).unwrap();
        assert_eq!(json["chain_verified"]["verified"], true);
        assert_eq!(json["certificates"][0]["time_left"], "23h 59m");
        let text = ins.to_string();
        assert!(
            text.contains("SPIFFE ID:  spiffe://cluster.local/ns/shop/sa/cart"),
            "{text}"
        );
        assert!(text.contains("verified against the bundle"), "{text}");

        // No bundle: nothing claimed either way.
        assert_eq!(inspect_chain(&pem, None, now).unwrap().chain_verified, None);
    }

    #[test]
    fn chain_failures_are_reported() {
        let now = SystemTime::now();
        let (_d, ca, pem) = setup(now);
        let roots = ca.bundle().roots_der;

        // Expired.
        let late = now + Duration::from_secs(2 * 86400);
        let ins = inspect_chain(&pem, Some(&roots), late).unwrap();
        let err = ins.chain_verified.clone().unwrap().unwrap_err();
        assert!(err.contains("expired"), "{err}");
        assert!(ins.certificates[0].time_left.starts_with("expired"));
        let json = serde_json::to_value(&ins).unwrap();
        assert_eq!(json["chain_verified"]["verified"], false);

        // Another root.
        let (_d2, other, _) = setup(now);
        let err = inspect_chain(&pem, Some(&other.bundle().roots_der), now)
            .unwrap()
            .chain_verified
            .unwrap()
            .unwrap_err();
        assert!(err.contains("does not verify"), "{err}");

        // A root with another name altogether.
        let plain = rcgen::CertificateParams::new(vec!["x.example".to_string()])
            .unwrap()
            .self_signed(&KeyAlg::EcP256.generate().unwrap())
            .unwrap();
        let err = verify_chain(
            &[pem::parse(&pem).unwrap().into_contents()],
            &[plain.der().to_vec()],
            now,
        )
        .unwrap_err();
        assert!(err.contains("no root in the bundle"), "{err}");

        // A leaf used as an issuer.
        let leaf = pem::parse(&pem).unwrap().into_contents();
        let err = verify_chain(&[leaf.clone(), leaf], &roots, now).unwrap_err();
        assert!(err.contains("not a CA"), "{err}");
        assert!(verify_chain(&[], &roots, now).is_err());
    }

    #[test]
    fn junk_is_an_error_not_a_panic() {
        let now = SystemTime::now();
        for junk in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATEX-----\n",
        ] {
            match inspect_chain(junk, None, now) {
                Err(CaError::BadPem { what, .. }) | Err(CaError::BadCertificate { what, .. }) => {
                    assert!(what.starts_with("input"), "{what}")
                }
                other => panic!("{junk:?}: {other:?}"),
            }
        }
        // Junk roots in a bundle make the verification fail, not the inspection.
        let (_d, _ca, pem) = setup(now);
        let bad_roots = vec![vec![1u8, 2, 3]];
        let ins = inspect_chain(&pem, Some(&bad_roots), now).unwrap();
        assert!(ins.chain_verified.unwrap().is_err());
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(61), "1m 1s");
        assert_eq!(human(3600 * 23 + 59 * 60 + 30), "23h 59m");
        assert_eq!(human(86400 * 3 + 7200), "3d 2h");
    }
}
