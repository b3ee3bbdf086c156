//! Full mTLS handshakes per second per core between two Warden endpoints (issue 3, point 8b):
//! P-256 SVIDs from one root, Warden's own server and client configurations, no resumption.
//! One handshake = both sides done, each having verified the other's SVID. Two variants, each
//! on one thread (so one core): `in_memory` (rustls state machines only) and `loopback_tcp`
//! (a current-thread tokio runtime running both ends over 127.0.0.1, as `openssl s_time`
//! against `openssl s_server` does). `bench/handshake.sh` runs this next to OpenSSL.
//!
//! With `WARDEN_BENCH_CERT_DIR` set, the certificates are also written there as PEM, so the
//! OpenSSL side uses exactly the same ones.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::{Svid, TrustBundle};
use warden_identity::tls::{client_config, server_config, ExpectedPeer, IdentityState};

struct Endpoints {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// Warden's default CA layout: a self-signed P-256 root signing workload certificates.
fn endpoints() -> Endpoints {
    let root_key = KeyPair::generate().expect("root key");
    let mut root = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cluster.local");
    root.distinguished_name = dn;
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root.self_signed(&root_key).expect("root");
    let issuer = Issuer::new(root, root_key);
    let bundle = TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_der: vec![root_cert.der().to_vec()],
    };

    let mut pems = vec![("root.pem".to_string(), root_cert.pem())];
    let mut svid = |sa: &str| {
        let id = SpiffeId::new("cluster.local", "bench", sa).expect("id");
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("uri"))];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).expect("leaf");
        pems.push((format!("{sa}.pem"), cert.pem()));
        pems.push((format!("{sa}.key"), key.serialize_pem()));
        Svid {
            id,
            cert_chain_der: vec![cert.der().to_vec()],
            key_pkcs8_der: key.serialize_der(),
            not_before: SystemTime::now(),
            not_after: SystemTime::now() + Duration::from_secs(86_400),
        }
    };
    let server_svid = svid("server");
    let server_id = server_svid.id.clone();
    let client_svid = svid("client");

    if let Some(dir) = std::env::var_os("WARDEN_BENCH_CERT_DIR") {
        for (name, pem) in &pems {
            std::fs::write(std::path::Path::new(&dir).join(name), pem).expect("write PEM");
        }
    }

    let server =
        Arc::new(IdentityState::with_svid(server_svid, bundle.clone()).expect("server state"));
    let client = Arc::new(IdentityState::with_svid(client_svid, bundle).expect("client state"));
    Endpoints {
        server: Arc::new(server_config(server)),
        client: Arc::new(client_config(client, ExpectedPeer::Exact(server_id))),
    }
}

/// Moves TLS records between the two state machines until both finished the handshake.
fn handshake_in_memory(e: &Endpoints) -> (ClientConnection, ServerConnection) {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut client = ClientConnection::new(e.client.clone(), name).expect("client");
    let mut server = ServerConnection::new(e.server.clone()).expect("server");
    let mut buf = Vec::with_capacity(8192);
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return (client, server);
        }
        while client.wants_write() {
            buf.clear();
            client.write_tls(&mut buf).expect("client write");
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).expect("server read");
            }
            server.process_new_packets().expect("server handshake");
        }
        while server.wants_write() {
            buf.clear();
            server.write_tls(&mut buf).expect("server write");
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("client read");
            }
            client.process_new_packets().expect("client handshake");
        }
    }
    panic!("handshake did not finish");
}

fn mtls_handshake(c: &mut Criterion) {
    let e = endpoints();
    let (client, server) = handshake_in_memory(&e);
    // What is being measured, for the record next to OpenSSL's numbers.
    eprintln!(
        "warden handshake: {:?}, {:?}, key exchange {:?}, server sees {:?}",
        client.protocol_version(),
        client.negotiated_cipher_suite().map(|s| s.suite()),
        client.negotiated_key_exchange_group().map(|g| g.name()),
        warden_identity::tls::peer_spiffe_id(&server).map(|i| i.to_string()),
    );

    let mut g = c.benchmark_group("mtls_handshake");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(8));

    g.bench_function("in_memory", |b| {
        b.iter(|| black_box(handshake_in_memory(&e)))
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(e.server.clone());
    // The server writes one byte after its side completes, so a client that reads it knows
    // both sides are done: the same "both complete" as in memory.
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"!").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    let connector = TlsConnector::from(e.client.clone());
    g.bench_function("loopback_tcp", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let mut tls = connector
                    .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                    .await
                    .expect("handshake");
                let mut done = [0u8; 1];
                tls.read_exact(&mut done).await.expect("server done");
            })
        })
    });
    g.finish();
}

criterion_group!(benches, mtls_handshake);
criterion_main!(benches);
