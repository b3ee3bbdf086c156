//! The configuration stream against a real control plane over loopback mTLS, with fake
//! proxies: what each proxy receives, incremental pushes to only the proxies a change
//! concerns, NACKs, refused configurations and identity checks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use warden_control::client::{FakeProxy, Received};
use warden_control::run::{start, Input, Options, Running};
use warden_identity::ca::{Ca, KeyAlg};
use warden_identity::signer::CaSigner;
use warden_identity::spiffe::SpiffeId;

const STEP: Duration = Duration::from_secs(10);

fn workload(ns: &str, name: &str, sa: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    istio-injection: enabled\n---\n\
apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      serviceAccountName: {sa}\n      containers:\n      - name: app\n        ports:\n        - containerPort: 8080\n"
    )
}

fn policy(ns: &str, name: &str, app: &str, path: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  selector:\n    matchLabels:\n      app: {app}\n  rules:\n  - to:\n    - operation:\n        paths: [\"{path}\"]\n"
    )
}

struct Mesh {
    _dir: TempDir,
    ca: Ca,
    running: Running,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn texts(extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut v = vec![
        ("a.yaml".to_string(), workload("a", "wl-a", "sa-a")),
        ("b.yaml".to_string(), workload("b", "wl-b", "sa-b")),
    ];
    v.extend(extra.iter().map(|(f, t)| (f.to_string(), t.clone())));
    v
}

async fn mesh(initial: Vec<(String, String)>) -> Mesh {
    let dir = std::env::temp_dir().join(format!(
        "warden-control-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let ca = Ca::init(&dir, "cluster.local", KeyAlg::EcP256).expect("CA");
    let signer = Arc::new(CaSigner::new(Ca::load_with(&dir, None).expect("CA loads")));
    let running = start(
        signer,
        None,
        Input::Texts(initial),
        Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: None,
            jwks_refresh: Duration::from_secs(1200),
        },
    )
    .await
    .expect("control plane starts");
    Mesh {
        _dir: TempDir(dir),
        ca,
        running,
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

struct Fake {
    rx: mpsc::UnboundedReceiver<Received>,
    nack: Arc<Mutex<Option<String>>>,
    done: tokio::task::JoinHandle<Result<(), String>>,
}

impl Fake {
    async fn next(&mut self) -> Received {
        tokio::time::timeout(STEP, self.rx.recv())
            .await
            .expect("a response in time")
            .expect("stream open")
    }
}

fn fake(m: &Mesh, ns: &str, workload: &str, sa: &str) -> Fake {
    let id = SpiffeId::new("cluster.local", ns, sa).unwrap();
    let identity = warden_control::local::identity(&m.ca, &id).expect("identity");
    let nack = Arc::new(Mutex::new(None));
    let proxy = FakeProxy {
        namespace: ns.into(),
        workload: workload.into(),
        identity,
        nack: nack.clone(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = m.running.addr.to_string();
    let done = tokio::spawn(async move { proxy.run(&addr, tx).await });
    Fake { rx, nack, done }
}

#[tokio::test]
async fn each_proxy_gets_its_own_policies_and_changes_reach_only_the_proxies_they_concern() {
    let m = mesh(texts(&[
        ("pa.yaml", policy("a", "allow-a", "wl-a", "/a")),
        ("pb.yaml", policy("b", "allow-b", "wl-b", "/b")),
    ]))
    .await;
    let mut a = fake(&m, "a", "wl-a", "sa-a");
    let mut b = fake(&m, "b", "wl-b", "sa-b");
    let first_a = a.next().await;
    let first_b = b.next().await;
    assert!(first_a
        .keys
        .contains(&"AuthorizationPolicy/a/allow-a".to_string()));
    assert!(!first_a
        .keys
        .contains(&"AuthorizationPolicy/b/allow-b".to_string()));
    assert!(first_b
        .keys
        .contains(&"AuthorizationPolicy/b/allow-b".to_string()));
    // Outbound needs every workload: both proxies hold both Deployments.
    for r in [&first_a, &first_b] {
        assert!(
            r.keys.contains(&"Deployment/a/wl-a".to_string()),
            "{:?}",
            r.keys
        );
        assert!(
            r.keys.contains(&"Deployment/b/wl-b".to_string()),
            "{:?}",
            r.keys
        );
    }

    // A change in namespace a: only a's proxy hears of it, and only that resource.
    m.running
        .apply_texts(
            texts(&[
                ("pa.yaml", policy("a", "allow-a", "wl-a", "/a2")),
                ("pb.yaml", policy("b", "allow-b", "wl-b", "/b")),
            ]),
            "step 2",
        )
        .await
        .expect("accepted");
    let second_a = a.next().await;
    assert_eq!(
        second_a.keys,
        vec!["AuthorizationPolicy/a/allow-a".to_string()]
    );
    assert!(second_a.removed.is_empty());

    // Then one in namespace b: b's next response is about it alone, so it never got a's.
    m.running
        .apply_texts(
            texts(&[
                ("pa.yaml", policy("a", "allow-a", "wl-a", "/a2")),
                ("pb.yaml", policy("b", "allow-b", "wl-b", "/b2")),
            ]),
            "step 3",
        )
        .await
        .expect("accepted");
    let second_b = b.next().await;
    assert_eq!(
        second_b.keys,
        vec!["AuthorizationPolicy/b/allow-b".to_string()]
    );
    assert_eq!(second_b.version, "3");
    // Removing a's policy sends a removal to a only.
    m.running
        .apply_texts(
            texts(&[("pb.yaml", policy("b", "allow-b", "wl-b", "/b2"))]),
            "step 4",
        )
        .await
        .expect("accepted");
    let third_a = a.next().await;
    assert!(third_a.keys.is_empty());
    assert_eq!(
        third_a.removed,
        vec!["AuthorizationPolicy/a/allow-a".to_string()]
    );
    assert!(b.rx.try_recv().is_err(), "b must not hear of a's changes");
}

#[tokio::test]
async fn a_nack_is_reported_and_the_next_push_is_a_delta_from_the_acked_state() {
    let m = mesh(texts(&[("pa.yaml", policy("a", "p1", "wl-a", "/1"))])).await;
    let mut a = fake(&m, "a", "wl-a", "sa-a");
    let mut b = fake(&m, "b", "wl-b", "sa-b");
    a.next().await;
    b.next().await;

    *a.nack.lock().unwrap() = Some("cannot apply: test refusal".into());
    m.running
        .apply_texts(
            texts(&[
                ("pa.yaml", policy("a", "p1", "wl-a", "/1")),
                ("pa2.yaml", policy("a", "p2", "wl-a", "/2")),
            ]),
            "nacked",
        )
        .await
        .expect("accepted");
    let nacked = a.next().await;
    assert!(nacked.nacked);
    assert_eq!(nacked.keys, vec!["AuthorizationPolicy/a/p2".to_string()]);
    // The NACK is on the status page, with the proxy's reason.
    let status = wait_for(|| {
        let s = m.running.cp.status_json();
        let nacks = s["nacks"].as_array().cloned().unwrap_or_default();
        (!nacks.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(status["nacks"][0]["workload"], "a/wl-a");
    assert_eq!(status["nacks"][0]["error"], "cannot apply: test refusal");

    // b is unaffected and still gets its own changes.
    m.running
        .apply_texts(
            texts(&[
                ("pa.yaml", policy("a", "p1", "wl-a", "/1")),
                ("pa2.yaml", policy("a", "p2", "wl-a", "/2")),
                ("pb.yaml", policy("b", "pb", "wl-b", "/b")),
            ]),
            "b changes",
        )
        .await
        .expect("accepted");
    let rb = b.next().await;
    assert_eq!(rb.keys, vec!["AuthorizationPolicy/b/pb".to_string()]);
    assert!(!rb.nacked);

    // a accepts again: the next change arrives with the NACKed one, since a never applied it.
    *a.nack.lock().unwrap() = None;
    m.running
        .apply_texts(
            texts(&[
                ("pa.yaml", policy("a", "p1", "wl-a", "/1")),
                ("pa2.yaml", policy("a", "p2", "wl-a", "/2")),
                ("pa3.yaml", policy("a", "p3", "wl-a", "/3")),
                ("pb.yaml", policy("b", "pb", "wl-b", "/b")),
            ]),
            "a again",
        )
        .await
        .expect("accepted");
    let mut keys = a.next().await.keys;
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "AuthorizationPolicy/a/p2".to_string(),
            "AuthorizationPolicy/a/p3".to_string()
        ]
    );
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_and_the_last_good_one_stays() {
    let m = mesh(texts(&[("pa.yaml", policy("a", "p1", "wl-a", "/1"))])).await;
    let mut a = fake(&m, "a", "wl-a", "sa-a");
    a.next().await;
    let bad = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: broken\n  namespace: a\nspec:\n  action: MAYBE\n";
    let errors = m
        .running
        .apply_texts(
            texts(&[
                ("pa.yaml", policy("a", "p1", "wl-a", "/changed")),
                ("broken.yaml", bad.to_string()),
            ]),
            "bad",
        )
        .await
        .expect_err("refused");
    let all = errors.join("\n");
    assert!(all.contains("broken.yaml:"), "{all}");
    assert!(all.contains("AuthorizationPolicy a/broken"), "{all}");
    let status = m.running.cp.status_json();
    assert!(status["refused"]["errors"][0]
        .as_str()
        .unwrap()
        .contains("broken.yaml"));
    assert_eq!(status["config"]["version"], "1");
    // Nothing was half-applied: the good p1 change in the same set did not go out either.
    // The next good change is the proof: a's next response carries only it.
    m.running
        .apply_texts(
            texts(&[("pa.yaml", policy("a", "p1", "wl-a", "/good"))]),
            "good",
        )
        .await
        .expect("accepted");
    let r = a.next().await;
    assert_eq!(r.version, "2");
    assert_eq!(r.keys, vec!["AuthorizationPolicy/a/p1".to_string()]);
    assert!(m.running.cp.status_json()["refused"].is_null());
}

#[tokio::test]
async fn a_proxy_cannot_ask_for_another_service_accounts_workload() {
    let m = mesh(texts(&[])).await;
    let mut wrong_sa = fake(&m, "a", "wl-a", "intruder");
    let err = tokio::time::timeout(STEP, &mut wrong_sa.done)
        .await
        .expect("ends in time")
        .expect("joins")
        .expect_err("refused");
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(err.contains("service account sa-a"), "{err}");
    let mut wrong_ns = fake(&m, "a", "wl-a", "sa-b");
    // Same service account name, other namespace: refused before anything is looked up.
    wrong_ns.done.abort();
    let id = SpiffeId::new("cluster.local", "b", "sa-a").unwrap();
    let proxy = FakeProxy {
        namespace: "a".into(),
        workload: "wl-a".into(),
        identity: warden_control::local::identity(&m.ca, &id).unwrap(),
        nack: Arc::default(),
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = tokio::time::timeout(STEP, proxy.run(&m.running.addr.to_string(), tx))
        .await
        .expect("ends in time")
        .expect_err("refused");
    assert!(err.contains("another namespace"), "{err}");
    let _ = wrong_ns.rx.try_recv();
}

async fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        // Polling a status page; the condition, not the interval, is what is waited for.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Regression: a first sync larger than tonic's default 4 MiB receive limit never reached a
/// real proxy (the stream failed and was retried forever), though the server sends up to
/// 256 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_proxy_source_takes_a_first_sync_larger_than_4_mib() {
    use warden_control::client::{ControlSource, StreamOptions};
    use warden_proxy::source::{ConfigSource, SourceEvent};
    // One policy with ~5 MiB of paths.
    let mut big = String::from(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: big\n  namespace: a\nspec:\n  selector:\n    matchLabels:\n      app: wl-a\n  rules:\n  - to:\n    - operation:\n        paths:\n",
    );
    let filler = "x".repeat(90);
    for i in 0..55_000 {
        big.push_str(&format!("        - /{filler}/{i}\n"));
    }
    let m = mesh(texts(&[("big.yaml", big)])).await;
    let id = SpiffeId::new("cluster.local", "a", "sa-a").unwrap();
    let identity = warden_control::local::identity(&m.ca, &id).expect("identity");
    let mut source = ControlSource::spawn(StreamOptions::new(
        &m.running.addr.to_string(),
        "a",
        "wl-a",
        identity,
    ));
    let first = tokio::time::timeout(Duration::from_secs(60), source.next())
        .await
        .expect("the first configuration in time")
        .expect("the source runs");
    match first {
        SourceEvent::Config(c) => assert_eq!(c.policy.authz.policies.len(), 1),
        SourceEvent::Refused(r) => panic!("refused: {r:?}"),
    }
}

/// Regression: fetching a never-fetched JWKS held up every configuration change for as long
/// as the rule's `timeout` (here an hour), an emergency DENY included.
#[tokio::test]
async fn a_silent_jwks_server_never_holds_up_a_change() {
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let ra = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: a\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwksUri: http://127.0.0.1:{port}/keys\n    timeout: 1h\n"
    );
    let started = tokio::time::timeout(
        STEP,
        mesh(texts(&[
            ("ra.yaml", ra.clone()),
            ("pa.yaml", policy("a", "p1", "wl-a", "/1")),
        ])),
    )
    .await
    .expect("the control plane starts without waiting for the JWKS");
    let m = started;
    let mut a = fake(&m, "a", "wl-a", "sa-a");
    a.next().await;
    tokio::time::timeout(
        STEP,
        m.running.apply_texts(
            texts(&[
                ("ra.yaml", ra),
                ("pa.yaml", policy("a", "p1", "wl-a", "/2")),
            ]),
            "deny now",
        ),
    )
    .await
    .expect("the change is not held up")
    .expect("accepted");
    let r = a.next().await;
    assert_eq!(r.keys, vec!["AuthorizationPolicy/a/p1".to_string()]);
    drop(silent);
}
