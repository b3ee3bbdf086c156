//! The whole identity path with the real CA: `Ca::init` on disk, a bootstrap token, the gRPC
//! service over TLS on 127.0.0.1, the workload client, then a CA restart (same root) and a
//! root rotation (renewal signed by the new root, both roots trusted).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warden_identity::ca::{Ca, KeyAlg};
use warden_identity::client::{
    drive_identity_state, Bootstrap, CaEndpoint, CertClient, CertClientConfig, CertClientHandle,
    Credential, IdentityStatus,
};
use warden_identity::inspect::verify_chain;
use warden_identity::proto::IstioCertificateRequest;
use warden_identity::service::{CaServer, CaServerOptions};
use warden_identity::signer::CaSigner;
use warden_identity::spiffe::SpiffeId;
use warden_identity::tls::{
    client_config, peer_spiffe_id, server_config, ExpectedPeer, IdentityState,
};
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

    // The client's certificates drive TLS state; two workloads then handshake over mTLS.
    let api = SpiffeId::new("cluster.local", "shop", "api").unwrap();
    let api_token = tokens.mint(&api, Duration::from_secs(600), 1).unwrap();
    let api_cfg = CertClientConfig::new(
        api.clone(),
        endpoint.clone(),
        signer.current().bundle(),
        Bootstrap::Token(api_token),
    );
    let api_handle = CertClient::new(api_cfg).spawn();
    let web_state = tls_state(web_handle_clone(&endpoint, &signer, &tokens, &web).await).await;
    let api_state = tls_state(api_handle).await;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(api_state)));
    let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = tls_listener.accept().await.unwrap();
        let mut conn = acceptor.accept(tcp).await.unwrap();
        let peer = peer_spiffe_id(conn.get_ref().1).unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.unwrap();
        conn.write_all(b"pong").await.unwrap();
        conn.shutdown().await.unwrap();
        peer
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(
        web_state,
        ExpectedPeer::Exact(api.clone()),
    )));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.shop.svc").unwrap();
    let mut conn = connector.connect(name, tcp).await.unwrap();
    assert_eq!(peer_spiffe_id(conn.get_ref().1), Some(api.clone()));
    conn.write_all(b"ping").await.unwrap();
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf).await.unwrap();
    assert_eq!(buf, b"pong");
    assert_eq!(server_side.await.unwrap(), web);

    // Root rotation: the service switches to the new root without a restart; a renewal with
    // the current certificate is signed by the new root, and both roots are trusted.
    let rotated = Ca::rotate_root(&ca_dir, SystemTime::now()).unwrap();
    let both = rotated.bundle().roots_der;
    assert_eq!(both.len(), 2);
    assert!(both.contains(&first_roots[0]));
    // What `warden ca serve` does when another process rotated the root on disk.
    assert!(
        signer.reload(&ca_dir, None).unwrap(),
        "the rotation is picked up"
    );
    assert!(
        !signer.reload(&ca_dir, None).unwrap(),
        "nothing changed since"
    );
    assert_eq!(
        signer.current().bundle().roots_der,
        rotated.bundle().roots_der
    );
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

/// A second client for `id` (the first is kept for renewal checks), bootstrapped with a new token.
async fn web_handle_clone(
    endpoint: &CaEndpoint,
    signer: &CaSigner,
    tokens: &TokenStore,
    id: &SpiffeId,
) -> CertClientHandle {
    let token = tokens.mint(id, Duration::from_secs(600), 1).unwrap();
    let cfg = CertClientConfig::new(
        id.clone(),
        endpoint.clone(),
        signer.current().bundle(),
        Bootstrap::Token(token),
    );
    CertClient::new(cfg).spawn()
}

/// Waits for the client's first certificate, then keeps a TLS state current from it.
async fn tls_state(mut handle: CertClientHandle) -> Arc<IdentityState> {
    loop {
        if matches!(
            &*handle.status.borrow_and_update(),
            IdentityStatus::Ready(_)
        ) {
            break;
        }
        handle.status.changed().await.unwrap();
    }
    let state = Arc::new(IdentityState::new(handle.bundle.borrow().clone()).unwrap());
    let driven = state.clone();
    tokio::spawn(drive_identity_state(handle, driven));
    // The driver applies the current certificate before its first wait.
    for _ in 0..1000 {
        if state.svid_id().is_some() {
            return state;
        }
        tokio::task::yield_now().await;
    }
    panic!("the driver did not install the certificate");
}
