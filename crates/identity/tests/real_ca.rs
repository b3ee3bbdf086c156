//! The whole identity path with the real CA: `Ca::init` on disk, a bootstrap token, the gRPC
//! service over TLS on 127.0.0.1, the workload client, then a CA restart (same root) and a
//! root rotation (renewal signed by the new root, both roots trusted).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use warden_identity::ca::{Ca, KeyAlg};
use warden_identity::client::{
    Bootstrap, CaEndpoint, CertClient, CertClientConfig, Credential, IdentityStatus,
};
use warden_identity::inspect::verify_chain;
use warden_identity::proto::IstioCertificateRequest;
use warden_identity::service::{CaServer, CaServerOptions};
use warden_identity::signer::CaSigner;
use warden_identity::spiffe::SpiffeId;
use warden_identity::token::TokenStore;

fn temp_dir() -> std::path::PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("warden-real-ca-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn real_ca_issues_restarts_and_rotates() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), scenario())
            .await
            .expect("finished within 60 s");
    });
}

async fn scenario() {
    let dir = temp_dir();
    let ca_dir = dir.join("ca");
    let ca = Ca::init(&ca_dir, "cluster.local", KeyAlg::EcP256).unwrap();
    let first_roots = ca.bundle().roots_der;
    assert_eq!(first_roots.len(), 1);

    // A restart reads the same root back.
    let ca = Ca::load(&ca_dir).unwrap();
    assert_eq!(ca.bundle().roots_der, first_roots);
    assert!(
        Ca::init(&ca_dir, "cluster.local", KeyAlg::EcP256).is_err(),
        "init never overwrites"
    );

    let signer = Arc::new(CaSigner::new(ca));
    let tokens = Arc::new(TokenStore::open(&ca_dir));
    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let token = tokens.mint(&web, Duration::from_secs(600), 1).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = CaServer::start(
        listener,
        signer.clone(),
        CaServerOptions {
            tokens: Some(tokens.clone()),
            ..CaServerOptions::default()
        },
    )
    .await
    .unwrap();

    // Bootstrap: the client gets exactly its identity, chained to the CA's root.
    let endpoint = CaEndpoint::new(addr.to_string(), "cluster.local").unwrap();
    let cfg = CertClientConfig::new(
        web.clone(),
        endpoint.clone(),
        signer.current().bundle(),
        Bootstrap::Token(token),
    );
    let mut handle = CertClient::new(cfg).spawn();
    let svid = loop {
        if let IdentityStatus::Ready(s) = &*handle.status.borrow_and_update() {
            break s.clone();
        }
        handle.status.changed().await.unwrap();
    };
    assert_eq!(svid.id, web);
    verify_chain(&svid.cert_chain_der, &first_roots, SystemTime::now()).unwrap();
    let lifetime = svid.not_after.duration_since(svid.not_before).unwrap();
    assert!(
        lifetime <= Duration::from_secs(24 * 3600 + 5 * 60),
        "{lifetime:?}"
    );

    // Root rotation: the service switches to the new root without a restart; a renewal with
    // the current certificate is signed by the new root, and both roots are trusted.
    let rotated = Ca::rotate_root(&ca_dir, SystemTime::now()).unwrap();
    let both = rotated.bundle().roots_der;
    assert_eq!(both.len(), 2);
    assert!(both.contains(&first_roots[0]));
    signer.replace(rotated);
    server.reload_certificate();
    let (_key, csr) = {
        let (key, der) = warden_identity::csr::generate_csr(&web, KeyAlg::EcP256).unwrap();
        (key, pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der)))
    };
    let resp = endpoint
        .create_certificate(
            &signer.current().bundle(),
            Credential::Svid(&svid),
            IstioCertificateRequest {
                csr,
                validity_duration: 3600,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let leaf_and_chain: Vec<Vec<u8>> = resp
        .cert_chain
        .iter()
        .take(resp.cert_chain.len() - 1)
        .flat_map(|p| pem::parse_many(p).unwrap())
        .map(|p| p.into_contents())
        .collect();
    let new_root: Vec<Vec<u8>> = both
        .iter()
        .filter(|r| **r != first_roots[0])
        .cloned()
        .collect();
    verify_chain(&leaf_and_chain, &new_root, SystemTime::now())
        .expect("renewal chains to the new root");
    assert!(verify_chain(&leaf_and_chain, &first_roots, SystemTime::now()).is_err());
    // Certificates from the old root still verify against the bundle during the rotation.
    verify_chain(&svid.cert_chain_der, &both, SystemTime::now()).unwrap();

    drop(handle);
    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
