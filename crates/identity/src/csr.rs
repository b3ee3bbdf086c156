//! The workload side of issuance: a key pair generated in memory (it never touches disk and
//! never leaves the workload) and a PKCS#10 CSR asking for exactly one name, the SPIFFE ID.

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, SanType};

use crate::ca::{CaError, KeyAlg};
use crate::spiffe::SpiffeId;

/// A new key for `id` and a CSR for it: `(PKCS#8 key DER, CSR DER)`. The CSR carries the
/// SPIFFE ID as its only SAN and an empty subject, as Istio's agent sends.
pub fn generate_csr(id: &SpiffeId, alg: KeyAlg) -> Result<(Vec<u8>, Vec<u8>), CaError> {
    let key = alg.generate()?;
    let csr = csr_for_key(id, &key)?;
    Ok((key.serialize_der(), csr))
}

/// A CSR for `id` signed by an existing key (renewal that keeps its key, tests, benches).
pub fn csr_for_key(id: &SpiffeId, key: &rcgen::KeyPair) -> Result<Vec<u8>, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string())?)];
    let csr = params.serialize_request(key)?;
    Ok(csr.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    #[test]
    fn csr_carries_the_id_and_the_key_is_pkcs8() {
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        for alg in [KeyAlg::EcP256, KeyAlg::Rsa2048] {
            let (key, csr) = generate_csr(&id, alg).unwrap();
            let (rest, req) = X509CertificationRequest::from_der(&csr).unwrap();
            assert!(rest.is_empty());
            req.verify_signature().unwrap();
            assert!(req.certification_request_info.subject.as_raw().len() <= 2);
            let sans: Vec<_> = req
                .requested_extensions()
                .unwrap()
                .filter_map(|e| match e {
                    ParsedExtension::SubjectAlternativeName(s) => Some(s.general_names.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            assert_eq!(
                sans,
                vec![GeneralName::URI("spiffe://cluster.local/ns/a/sa/b")]
            );
            // PKCS#8 that the TLS layer can load, and it is the CSR's key.
            let pair = rcgen::KeyPair::try_from(key.as_slice()).unwrap();
            assert_eq!(
                pair.public_key_raw(),
                &*req
                    .certification_request_info
                    .subject_pki
                    .subject_public_key
                    .data
            );
            assert_eq!(key[0], 0x30);
        }
    }

    #[test]
    fn every_key_is_fresh() {
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let (k1, _) = generate_csr(&id, KeyAlg::EcP256).unwrap();
        let (k2, _) = generate_csr(&id, KeyAlg::EcP256).unwrap();
        assert_ne!(k1, k2);
    }
}
