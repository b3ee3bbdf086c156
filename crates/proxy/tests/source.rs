//! Configuration and certificates from files, end to end over 127.0.0.1: a [`FolderSource`]
//! feeding an [`InboundProxy`] through `follow`, with open TCP connections re-checked when a
//! change lands, invalid changes refused, and certificate files loaded and rotated. Every test
//! is bounded in time and waits on I/O or on the source's own notifications, never on sleeps.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose as Eku,
    IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use warden_identity::spiffe::SpiffeId;
use warden_identity::tls::IdentityState;
use warden_proxy::certs::CertFiles;
use warden_proxy::source::{follow, FolderSource, SourceEvent};
use warden_proxy::InboundProxy;

const LIMIT: Duration = Duration::from_secs(30);
const TCP_PORT: u16 = 9000;

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test timed out")
}

const BASE: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: foo}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: foo}
spec:
  selector: {app: server}
  ports:
  - {name: tcp-echo, port: 9000}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: foo}
spec:
  template:
    metadata: {labels: {app: server}}
    spec:
      serviceAccountName: server
      containers:
      - name: s
        ports: [{containerPort: 9000}]
"#;

const DENY_LOCAL: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-local, namespace: foo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["127.0.0.0/8"]}}]}]
"#;

/// A policy that does not validate: the action is not one Istio has (line 6).
const BAD_ACTION: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: foo}
spec:
  selector: {matchLabels: {app: server}}
  action: BLOCK
"#;

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "warden-proxy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a file whole, through a rename, so a poll never reads half of it.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------- certificates

struct Pki {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "warden source tests root");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Pki {
            root_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf for `foo/<sa>` valid from an hour ago until `not_after`: (chain PEM, key PEM).
    fn leaf(&self, sa: &str, not_after: time::OffsetDateTime) -> (String, String) {
        let id = SpiffeId::new("cluster.local", "foo", sa).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        p.key_usages = vec![Ku::DigitalSignature, Ku::KeyEncipherment];
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        p.not_after = not_after;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a certificate for `foo/<sa>` and the root into `dir`.
    fn write(&self, dir: &Path, sa: &str, days: i64) -> CertFiles {
        let (chain, key) = self.leaf(
            sa,
            time::OffsetDateTime::now_utc() + time::Duration::days(days),
        );
        let files = CertFiles {
            cert: dir.join("cert-chain.pem"),
            key: dir.join("key.pem"),
            roots: dir.join("root-cert.pem"),
        };
        write_atomic(&files.key, &key);
        write_atomic(&files.cert, &chain);
        write_atomic(&files.roots, &self.root_pem);
        files
    }
}

/// A TCP app that echoes every byte.
async fn echo_tcp_app() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}

/// Reads until the proxy closes the connection; true when it did, with nothing echoed.
async fn closed_without_data(s: &mut TcpStream) -> bool {
    let mut out = Vec::new();
    match s.read_to_end(&mut out).await {
        Ok(_) => out.is_empty(),
        // A close with unread bytes is a reset: closed all the same.
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[derive(Debug)]
enum Seen {
    Applied,
    Refused(Vec<String>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_changes_recheck_open_tcp_connections_and_bad_changes_are_refused() {
    bounded(async {
        let dir = TempDir::new("folder");
        write_atomic(&dir.path().join("base.yaml"), BASE);
        let pki = Pki::new();
        let certs_dir = TempDir::new("folder-certs");
        let identity = pki
            .write(certs_dir.path(), "server", 1)
            .initial_state()
            .unwrap();

        let mut source = FolderSource::new(vec![dir.path().to_path_buf()], None, "foo", "server")
            .with_poll_interval(Duration::from_millis(20));
        let first = source.load_now().expect("the first configuration loads");
        let app = echo_tcp_app().await;
        let ports = first
            .ports
            .iter()
            .map(|(p, s)| (*p, s.with_app(app)))
            .collect();
        let store = Arc::new(ArcSwap::new(first.policy.clone()));
        let proxy = Arc::new(InboundProxy::new(store, identity, ports));
        let listener = proxy
            .bind(TCP_PORT, (Ipv4Addr::LOCALHOST, 0).into())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(listener.run());
        let (tx, mut events) = mpsc::unbounded_channel();
        tokio::spawn(follow(source, proxy.clone(), move |e| {
            let _ = tx.send(match e {
                SourceEvent::Config(_) => Seen::Applied,
                SourceEvent::Refused(r) => Seen::Refused(r.clone()),
            });
        }));

        let mut open = TcpStream::connect(addr).await.unwrap();
        echo_once(&mut open, b"before").await;

        // An invalid change is refused with file:line, and the last good config stays.
        write_atomic(&dir.path().join("broken.yaml"), BAD_ACTION);
        let Some(Seen::Refused(reasons)) = events.recv().await else {
            panic!("expected the broken change to be refused");
        };
        assert!(
            reasons.iter().any(|r| r.contains("broken.yaml:6:")),
            "{reasons:?}"
        );
        echo_once(&mut open, b"still open").await;
        let mut fresh = TcpStream::connect(addr).await.unwrap();
        echo_once(&mut fresh, b"new connection").await;

        // A change that loses the workload is refused too. (The two writes may be seen apart:
        // every state in between is refused as well.)
        write_atomic(
            &dir.path().join("base.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: foo}\n",
        );
        write_atomic(
            &dir.path().join("broken.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: bar}\n",
        );
        loop {
            match events.recv().await {
                Some(Seen::Refused(r))
                    if r.iter()
                        .any(|r| r.contains("workload foo/server is not in the configuration")) =>
                {
                    break
                }
                Some(Seen::Refused(_)) => {}
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        echo_once(&mut open, b"still allowed").await;

        // A good change that denies: both open connections are closed, new ones refused.
        write_atomic(
            &dir.path().join("base.yaml"),
            &format!("{BASE}---\n{DENY_LOCAL}"),
        );
        assert!(
            closed_without_data(&mut open).await,
            "the open connection was not closed"
        );
        assert!(
            closed_without_data(&mut fresh).await,
            "the second connection was not closed"
        );
        loop {
            match events.recv().await {
                Some(Seen::Applied) => break,
                // A late second look at the refused state before (a file renamed between the
                // fingerprint and the read): the closes above already show the deny applied.
                Some(Seen::Refused(_)) => {}
                None => panic!("the source ended"),
            }
        }
        let mut denied = TcpStream::connect(addr).await.unwrap();
        let _ = denied.write_all(b"hello").await;
        assert!(
            closed_without_data(&mut denied).await,
            "a denied connection echoed"
        );
    })
    .await
}

#[test]
fn certificate_files_load_and_bad_rotations_keep_the_current_certificate() {
    let pki = Pki::new();
    let dir = TempDir::new("certs");
    let files = pki.write(dir.path(), "server", 1);
    let state = files.initial_state().unwrap();
    let id = state.svid_id().unwrap();
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/foo/sa/server");
    let first_expiry = state.svid_not_after().unwrap();

    // A key that does not belong to the certificate: refused, the current one stays.
    let (_, other_key) = pki.leaf(
        "server",
        time::OffsetDateTime::now_utc() + time::Duration::days(3),
    );
    let (chain, _) = pki.leaf(
        "server",
        time::OffsetDateTime::now_utc() + time::Duration::days(3),
    );
    write_atomic(&files.cert, &chain);
    write_atomic(&files.key, &other_key);
    let e = files.apply(&state).unwrap_err();
    assert!(e.to_string().contains("cert-chain.pem"), "{e}");
    assert_eq!(state.svid_not_after(), Some(first_expiry));

    // Garbage: refused with the file named.
    std::fs::write(&files.roots, "not a certificate").unwrap();
    std::fs::write(
        &files.cert,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = files.apply(&state).unwrap_err();
    assert!(e.to_string().contains("cert-chain.pem"), "{e}");
    assert_eq!(state.svid_not_after(), Some(first_expiry));

    // An expired certificate is refused.
    let (expired, key) = pki.leaf(
        "server",
        time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
    );
    write_atomic(&files.cert, &expired);
    write_atomic(&files.key, &key);
    write_atomic(&files.roots, &pki.root_pem);
    let e = files.apply(&state).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");

    // A good rotation is taken.
    let rotated = pki.write(dir.path(), "server", 2);
    assert_eq!(rotated.apply(&state).unwrap(), id);
    assert!(state.svid_not_after().unwrap() > first_expiry);
}

#[tokio::test]
async fn the_certificate_watcher_rotates_on_file_changes() {
    bounded(async {
        let pki = Pki::new();
        let dir = TempDir::new("certwatch");
        let files = pki.write(dir.path(), "server", 1);
        let state: Arc<IdentityState> = files.initial_state().unwrap();
        let first_expiry = state.svid_not_after().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(
            files
                .clone()
                .watch(state.clone(), Duration::from_millis(20), move |r| {
                    let _ = tx.send(r.is_ok());
                }),
        );
        std::fs::write(&files.key, "garbage").unwrap();
        assert_eq!(rx.recv().await, Some(false));
        assert_eq!(state.svid_not_after(), Some(first_expiry));
        pki.write(dir.path(), "server", 2);
        // Files written one by one may be seen half-rotated (refused); the last event is the
        // whole set.
        while rx.recv().await != Some(true) {}
        assert!(state.svid_not_after().unwrap() > first_expiry);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_applied_later_closes_open_plaintext_tcp_but_not_mtls() {
    use rustls::pki_types::ServerName;
    use tokio_rustls::TlsConnector;
    use warden_identity::tls::{client_config, ExpectedPeer};

    bounded(async {
        let dir = TempDir::new("strict");
        write_atomic(&dir.path().join("base.yaml"), BASE);
        let pki = Pki::new();
        let server_certs = TempDir::new("strict-server");
        let client_certs = TempDir::new("strict-client");
        let identity = pki.write(server_certs.path(), "server", 1).initial_state().unwrap();
        let client = pki.write(client_certs.path(), "client", 1).initial_state().unwrap();

        let mut source = FolderSource::new(vec![dir.path().to_path_buf()], None, "foo", "server");
        let first = source.load_now().unwrap();
        let app = echo_tcp_app().await;
        let ports = first.ports.iter().map(|(p, s)| (*p, s.with_app(app))).collect();
        let store = Arc::new(ArcSwap::new(first.policy.clone()));
        let proxy = Arc::new(InboundProxy::new(store, identity, ports));
        let listener = proxy.bind(TCP_PORT, (Ipv4Addr::LOCALHOST, 0).into()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(listener.run());

        let mut plain = TcpStream::connect(addr).await.unwrap();
        echo_once(&mut plain, b"plaintext").await;
        let expected = ExpectedPeer::Exact(SpiffeId::new("cluster.local", "foo", "server").unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(Arc::new(client_config(client, expected)))
            .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
            .await
            .unwrap();
        tls.write_all(b"mtls").await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"mtls");

        write_atomic(
            &dir.path().join("pa.yaml"),
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: foo}\nspec:\n  mtls: {mode: STRICT}\n",
        );
        let strict = source.load_now().unwrap();
        proxy.apply(strict.policy, &strict.ports);
        assert!(closed_without_data(&mut plain).await, "plaintext stayed open on STRICT");
        // The mTLS connection is still allowed, and still forwards.
        tls.write_all(b"more").await.unwrap();
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"more");
    })
    .await
}
