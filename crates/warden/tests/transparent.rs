//! Transparent capture end to end, inside network namespaces this test creates: a "pod"
//! namespace with an app (python3), `warden proxy --capture transparent` running as uid 1337 and
//! the rules of `warden proxy iptables --apply`; a "client" namespace with plain and mTLS peers
//! (10.250.0.0/24); and a second pod with its own transparent proxy (10.250.1.0/24), for a
//! whole mesh: plain app → captured outbound → mTLS → captured inbound → app. Addresses exist
//! only inside these namespaces. Needs root, `ip`, `iptables`, `setpriv` and `python3`:
//! without root it is skipped with the reason printed; with root but a missing tool it is
//! skipped too, except under CI (`CI` set), where that is a failure. Every wait is bounded;
//! namespaces and processes are removed however the test ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
const POD_IP: &str = "10.250.0.1";
const CLIENT_IP: &str = "10.250.0.2";
/// The backend Service's cluster IP: on the link's subnet, assigned to no one; only the
/// pod's outbound capture makes it reachable.
const BACKEND_VIP: &str = "10.250.0.100";
/// The server Service's cluster IP; in the client pod, a DNAT rule stands in for kube-proxy.
const SERVER_VIP: &str = "10.250.0.200";
/// A second pod with its own transparent proxy, on a second link of the server pod.
const CLIENT_POD_IP: &str = "10.250.1.2";

fn warden_bin() -> &'static str {
    env!("CARGO_BIN_EXE_warden")
}

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !(v.is_empty() || v == "0" || v == "false")
    })
}

fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

fn runs(program: &str, arg: &str) -> bool {
    matches!(
        Command::new(program).arg(arg).stdin(Stdio::null()).output(),
        Ok(out) if out.status.success()
    )
}

/// `Some(reason)` when this machine cannot run the test. Missing tools under CI panic: a CI job
/// that silently skips the capture test proves nothing.
fn cannot_run() -> Option<String> {
    if own_uid() != 0 {
        return Some("not running as root (network namespaces and iptables need it)".into());
    }
    let missing: Vec<&str> = [
        ("ip", "-V"),
        ("iptables", "--version"),
        ("iptables-restore", "--version"),
        ("setpriv", "--version"),
        ("python3", "--version"),
    ]
    .into_iter()
    .filter(|(p, a)| !runs(p, a))
    .map(|(p, _)| p)
    .collect();
    if missing.is_empty() {
        return None;
    }
    let why = format!(
        "missing {} (apt-get install iproute2 iptables util-linux python3)",
        missing.join(", ")
    );
    if on_ci() {
        panic!("{why}, and CI is set: the transparent capture tests must run in CI");
    }
    Some(why)
}

/// Runs a command to completion within [`WAIT`]: exit status success, stdout, stderr.
fn run(cmd: &mut Command) -> (bool, String, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(Ok(o)) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Ok(Err(e)) => panic!("{cmd:?}: {e}"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {WAIT:?}");
        }
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let (ok, out, err) = run(cmd);
    assert!(ok, "{cmd:?} failed:\n{out}{err}");
    out
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// `ip netns exec NS program args…`
fn in_ns(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]).args(args);
    c
}

/// A network namespace, deleted when dropped (its veth end goes with it).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "wdn-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(&mut cmd("ip", &["netns", "add", &name]));
        let ns = Netns(name);
        run_ok(&mut in_ns(&ns.0, "ip", &["link", "set", "lo", "up"]));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p =
            std::env::temp_dir().join(format!("warden-transparent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A long-running process whose stderr or stdout lines are read; killed and reaped when dropped.
struct Process {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn start(name: &str, mut c: Command) -> Process {
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Process {
            name: name.to_string(),
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The next output line containing `needle`, waiting at most [`WAIT`].
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no \"{needle}\" line from {} within {WAIT:?}; its output:\n{}",
                    self.name,
                    self.log.join("\n")
                ),
            }
        }
    }
}

/// The peers and the app: small Python programs, each printing `ready` once listening.
const HELPER: &str = r#"
import socket, ssl, sys, threading, http.server

def tls_ctx(server, cert, key, roots):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(roots)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # SVIDs carry a SPIFFE ID, no DNS name
        ctx.set_alpn_protocols(["http/1.1"])
    return ctx

def peer_uri(conn):
    for kind, value in conn.getpeercert().get("subjectAltName", ()):
        if kind == "URI":
            return value
    return "none"

mode = sys.argv[1]
if mode == "app":
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = "app xfcc=%s from=%s\n" % (self.headers.get("x-forwarded-client-cert", "none"), self.client_address[0])
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H)
    print("ready", flush=True)
    srv.serve_forever()
elif mode == "whoami":
    l = socket.create_server(("0.0.0.0", int(sys.argv[2])))
    print("ready", flush=True)
    while True:
        c, peer = l.accept()
        c.sendall(("from=%s\n" % peer[0]).encode())
        c.close()
elif mode in ("tls-echo", "plain-echo"):
    l = socket.create_server(("0.0.0.0", int(sys.argv[2])))
    ctx = tls_ctx(True, *sys.argv[3:6]) if mode == "tls-echo" else None
    print("ready", flush=True)
    while True:
        c, _ = l.accept()
        try:
            if ctx:
                c = ctx.wrap_socket(c, server_side=True)
                c.sendall(("peer=%s\n" % peer_uri(c)).encode())
            else:
                c.sendall(b"plain\n")
        except Exception as e:
            print("refused", e, flush=True)
        finally:
            c.close()
elif mode == "get":
    host, port = sys.argv[2], int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=20)
    if len(sys.argv) > 4:
        s = tls_ctx(False, *sys.argv[4:7]).wrap_socket(s)
    s.sendall(("GET / HTTP/1.1\r\nHost: server.foo:%d\r\nConnection: close\r\n\r\n" % port).encode())
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except ConnectionResetError:
        pass
    print(out.decode(errors="replace") if out else "CLOSED")
elif mode == "read":
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=20)
    if len(sys.argv) > 4:
        s = tls_ctx(False, *sys.argv[4:7]).wrap_socket(s)
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except ConnectionResetError:
        pass
    print(out.decode(errors="replace") if out else "CLOSED")
"#;

fn config() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: foo, labels: {{istio-injection: enabled}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: foo}}
spec:
  clusterIP: {SERVER_VIP}
  selector: {{app: server}}
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: tcp-who, port: 9100}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: server, namespace: foo}}
spec:
  template:
    metadata: {{labels: {{app: server}}}}
    spec:
      serviceAccountName: server
      containers: [{{name: app, ports: [{{containerPort: 8080}}, {{containerPort: 9100}}]}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: client, namespace: foo}}
spec:
  template:
    metadata: {{labels: {{app: client}}}}
    spec:
      serviceAccountName: client
      containers: [{{name: c}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: foo}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-client, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: ["cluster.local/ns/foo/sa/client"]}}}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: backend, namespace: foo}}
spec:
  clusterIP: {BACKEND_VIP}
  selector: {{app: backend}}
  ports: [{{name: tcp-echo, port: 9000}}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: backend, namespace: foo}}
spec:
  address: {CLIENT_IP}
  labels: {{app: backend}}
  serviceAccount: backend
"#
    )
}

fn issue(ca: &Path, identity: &str, out: &Path) {
    run_ok(&mut cmd(
        warden_bin(),
        &["ca", "issue", identity, "--dir", &s(ca), "--out", &s(out)],
    ));
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `warden proxy --capture transparent` for `workload` as uid 1337 in `ns`.
fn start_proxy(ns: &str, workload: &str, pod_ip: &str, certs: &Path, cfg: &Path) -> Process {
    let [cert, key, roots] = tls_args(certs);
    let mut c = in_ns(
        ns,
        "setpriv",
        &[
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "--",
            warden_bin(),
            "-v",
            "proxy",
            "-f",
            &s(cfg),
            "--workload",
            workload,
            "--capture",
            "transparent",
            "--pod-ip",
            pod_ip,
            "--cert",
            &cert,
            "--key",
            &key,
            "--roots",
            &roots,
        ],
    );
    c.env_remove("RUST_LOG");
    Process::start(&format!("warden proxy {workload}"), c)
}

fn tls_args(dir: &Path) -> [String; 3] {
    [
        s(&dir.join("cert-chain.pem")),
        s(&dir.join("key.pem")),
        s(&dir.join("root-cert.pem")),
    ]
}

#[test]
fn transparent_capture_in_network_namespaces() {
    if let Some(why) = cannot_run() {
        println!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let tmp = TempDir::new("e2e");
    let ca = tmp.0.join("ca");
    run_ok(&mut cmd(warden_bin(), &["ca", "init", "--dir", &s(&ca)]));
    for (id, dir) in [
        ("foo/server", "server"),
        ("foo/client", "client"),
        ("foo/other", "other"),
        ("foo/backend", "backend"),
    ] {
        issue(&ca, id, &tmp.0.join(dir));
    }
    // The proxies run as uid 1337 and must read their certificates and keys.
    for dir in ["server", "client"] {
        for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
            std::os::unix::fs::chown(tmp.0.join(dir).join(f), Some(1337), Some(1337)).unwrap();
        }
    }
    let cfg_dir = tmp.0.join("config");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::write(cfg_dir.join("mesh.yaml"), config()).unwrap();
    let helper = tmp.0.join("helper.py");
    std::fs::write(&helper, HELPER).unwrap();
    let helper = s(&helper);

    // Two namespaces joined by a veth pair; dropped (deleted) last.
    let pod = Netns::new("pod");
    let client = Netns::new("cli");
    let cpod = Netns::new("cpod");
    run_ok(&mut in_ns(
        &pod.0,
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &client.0,
        ],
    ));
    for (ns, ip) in [(&pod, POD_IP), (&client, CLIENT_IP)] {
        run_ok(&mut in_ns(
            &ns.0,
            "ip",
            &["addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        ));
        run_ok(&mut in_ns(&ns.0, "ip", &["link", "set", "eth0", "up"]));
    }

    run_ok(&mut in_ns(
        &pod.0,
        "ip",
        &[
            "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &cpod.0,
        ],
    ));
    for (ns, dev, ip) in [(&pod, "eth1", "10.250.1.1"), (&cpod, "eth0", CLIENT_POD_IP)] {
        run_ok(&mut in_ns(
            &ns.0,
            "ip",
            &["addr", "add", &format!("{ip}/24"), "dev", dev],
        ));
        run_ok(&mut in_ns(&ns.0, "ip", &["link", "set", dev, "up"]));
    }
    run_ok(&mut in_ns(
        &cpod.0,
        "ip",
        &["route", "add", "10.250.0.0/24", "via", "10.250.1.1"],
    ));

    // The app answers plaintext directly while nothing captures.
    let mut app = Process::start("app", in_ns(&pod.0, "python3", &[&helper, "app", "8080"]));
    app.wait_for("ready");
    let mut whoami = Process::start(
        "whoami",
        in_ns(&pod.0, "python3", &[&helper, "whoami", "9100"]),
    );
    whoami.wait_for("ready");
    let get = |args: &[&str]| -> String {
        let mut a = vec![helper.as_str(), "get", POD_IP, "8080"];
        a.extend_from_slice(args);
        run_ok(&mut in_ns(&client.0, "python3", &a))
    };
    let direct = get(&[]);
    assert!(direct.starts_with("HTTP/1.0 200"), "{direct}");

    // The mesh peers in the client namespace.
    let backend = tls_args(&tmp.0.join("backend"));
    let mut tls_echo = Process::start(
        "tls-echo",
        in_ns(
            &client.0,
            "python3",
            &[
                &helper,
                "tls-echo",
                "9000",
                &backend[0],
                &backend[1],
                &backend[2],
            ],
        ),
    );
    tls_echo.wait_for("ready");
    let mut plain_echo = Process::start(
        "plain-echo",
        in_ns(&client.0, "python3", &[&helper, "plain-echo", "9001"]),
    );
    plain_echo.wait_for("ready");

    // The proxy as uid 1337, then the capture rules.
    let mut proxy = start_proxy(
        &pod.0,
        "foo/server",
        POD_IP,
        &tmp.0.join("server"),
        &cfg_dir,
    );
    let inbound = proxy.wait_for("inbound capture listening");
    assert!(inbound.contains("ports=8080,9100"), "{inbound}");
    let outbound = proxy.wait_for("outbound capture listening");
    assert!(outbound.contains("destinations=3"), "{outbound}");
    proxy.wait_for("config applied");
    let printed = run_ok(&mut cmd(warden_bin(), &["proxy", "iptables"]));
    assert!(printed.contains("--uid-owner 1337"), "{printed}");
    run_ok(&mut in_ns(
        &pod.0,
        warden_bin(),
        &["proxy", "iptables", "--apply"],
    ));
    // A second apply is refused rather than duplicating the jumps.
    let (again, _, err) = run(&mut in_ns(
        &pod.0,
        warden_bin(),
        &["proxy", "iptables", "--apply"],
    ));
    assert!(!again && err.contains("already"), "{err}");

    // (a) Plaintext to the STRICT port now meets the proxy, which closes it.
    assert_eq!(get(&[]).trim(), "CLOSED");
    proxy.wait_for("plaintext connection to a STRICT port");

    // (b) + (c) mTLS as foo/client: allowed, forwarded to the pod IP from 127.0.0.6 with XFCC.
    let c = tls_args(&tmp.0.join("client"));
    let allowed = get(&[&c[0], &c[1], &c[2]]);
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    assert!(
        allowed.contains("URI=spiffe://cluster.local/ns/foo/sa/client"),
        "the app did not see the client's identity in XFCC: {allowed}"
    );
    assert!(allowed.contains("from=127.0.0.6"), "{allowed}");
    // mTLS as foo/other: denied by the AuthorizationPolicy.
    let o = tls_args(&tmp.0.join("other"));
    let denied = get(&[&o[0], &o[1], &o[2]]);
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(denied.contains("RBAC: access denied"), "{denied}");

    // The same over opaque TCP.
    let tcp = run_ok(&mut in_ns(
        &client.0,
        "python3",
        &[&helper, "read", POD_IP, "9100", &c[0], &c[1], &c[2]],
    ));
    assert_eq!(tcp.trim(), "from=127.0.0.6");

    // (d) The app's plain connection to the backend Service's cluster IP leaves as mTLS with
    // the server's SVID (the backend sees its SPIFFE ID).
    let read = |host: &str, port: &str| -> String {
        run_ok(&mut in_ns(
            &pod.0,
            "python3",
            &[&helper, "read", host, port],
        ))
    };
    let via_vip = read(BACKEND_VIP, "9000");
    assert_eq!(
        via_vip.trim(),
        "peer=spiffe://cluster.local/ns/foo/sa/server"
    );
    // An unknown destination passes through as plain TCP (ALLOW_ANY), through the proxy.
    assert_eq!(read(CLIENT_IP, "9001").trim(), "plain");
    proxy.wait_for("outbound passthrough");

    // A port the workload does not have is captured and closed, not passed to whatever listens.
    let (ok, out, err) = run(&mut in_ns(
        &client.0,
        "python3",
        &[&helper, "read", POD_IP, "8081"],
    ));
    assert!(ok && out.trim() == "CLOSED", "{out}{err}");
    let closed = proxy.wait_for("inbound connection closed");
    assert!(closed.contains("no such port"), "{closed}");

    // REGISTRY_ONLY (from the watched folder): the unknown destination is now a black hole,
    // while the Service still routes.
    std::fs::write(
        cfg_dir.join("meshconfig.yaml"),
        "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    )
    .unwrap();
    proxy.wait_for("config applied");
    assert_eq!(read(CLIENT_IP, "9001").trim(), "CLOSED");
    let black = proxy.wait_for("outbound connection closed");
    assert!(black.contains("REGISTRY_ONLY"), "{black}");
    assert_eq!(
        read(BACKEND_VIP, "9000").trim(),
        "peer=spiffe://cluster.local/ns/foo/sa/server"
    );
    // Registering the destination with a ServiceEntry lets it through again.
    std::fs::write(
        cfg_dir.join("partner.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: partner, namespace: foo}}\n\
             spec: {{hosts: [partner.example], addresses: [{CLIENT_IP}], \
             ports: [{{number: 9001, name: tcp, protocol: TCP}}], resolution: NONE}}\n"
        ),
    )
    .unwrap();
    proxy.wait_for("config applied");
    assert_eq!(read(CLIENT_IP, "9001").trim(), "plain");

    // (e) A whole transparent mesh: the client pod's app speaks plain HTTP to the server
    // Service's cluster IP; its proxy (transparent outbound) sends it as mTLS with the client's
    // SVID; the server's proxy (transparent inbound) allows it and the app sees the identity.
    let mut client_proxy = start_proxy(
        &cpod.0,
        "foo/client",
        CLIENT_POD_IP,
        &tmp.0.join("client"),
        &cfg_dir,
    );
    client_proxy.wait_for("outbound capture listening");
    client_proxy.wait_for("config applied");
    run_ok(&mut in_ns(
        &cpod.0,
        warden_bin(),
        &["proxy", "iptables", "--apply"],
    ));
    // kube-proxy's part: the cluster IP leads to the server pod (after the capture jump, so
    // only the proxy's own connection gets here).
    run_ok(&mut in_ns(
        &cpod.0,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            SERVER_VIP,
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{POD_IP}:8080"),
        ],
    ));
    let meshed = run_ok(&mut in_ns(
        &cpod.0,
        "python3",
        &[&helper, "get", SERVER_VIP, "80"],
    ));
    assert!(meshed.starts_with("HTTP/1.1 200"), "{meshed}");
    assert!(
        meshed.contains("URI=spiffe://cluster.local/ns/foo/sa/client"),
        "the server app did not see the client pod's identity: {meshed}"
    );
    let routed = client_proxy.wait_for("outbound connection routed");
    assert!(
        routed.contains(&format!("destination={SERVER_VIP}:80")),
        "{routed}"
    );
    let decided = proxy.wait_for("source=10.250.1.2");
    assert!(decided.contains("outcome=allow"), "{decided}");

    drop(client_proxy);
    drop(proxy);
    drop(tls_echo);
    drop(plain_echo);
    drop(app);
    drop(whoami);
    assert!(started.elapsed() < Duration::from_secs(120));
}

/// Needs no privileges: the second validation stage refuses flag combinations that do not fit
/// the capture mode (exit 2), and the rules print without touching the system.
#[test]
fn transparent_flags_are_checked_before_anything_starts() {
    let base = [
        "proxy",
        "-f",
        "/nonexistent",
        "--workload",
        "foo/server",
        "--cert",
        "c",
        "--key",
        "k",
        "--roots",
        "r",
    ];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--pod-ip", "10.0.0.1"],
            "--pod-ip is for transparent mode",
        ),
        (
            &[],
            "explicit mode needs at least one --inbound or --outbound",
        ),
        (&["--capture", "transparent"], "needs --pod-ip"),
        (
            &["--capture", "transparent", "--pod-ip", "127.0.0.1"],
            "the pod's own IPv4 address",
        ),
        (
            &[
                "--capture",
                "transparent",
                "--pod-ip",
                "10.0.0.1",
                "--inbound",
                "80=127.0.0.1:0",
            ],
            "explicit-mode listeners",
        ),
        (
            &[
                "--capture",
                "transparent",
                "--pod-ip",
                "10.0.0.1",
                "--inbound-capture",
                "0.0.0.0:15001",
            ],
            "same port 15001",
        ),
        (&["--capture", "sideways"], "invalid value 'sideways'"),
    ];
    for (extra, expected) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        let out = Command::new(warden_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err}"
        );
    }
    // Running as another uid than --proxy-uid would capture the proxy's own traffic.
    let mut args: Vec<&str> = base.to_vec();
    args.extend_from_slice(&[
        "--capture",
        "transparent",
        "--pod-ip",
        "10.0.0.1",
        "--proxy-uid",
        "4242",
    ]);
    let out = Command::new(warden_bin()).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("captured again"), "{err}");

    let out = Command::new(warden_bin())
        .args([
            "proxy",
            "iptables",
            "--proxy-uid",
            "999",
            "--include-inbound-ports",
            "8080",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.starts_with("# warden proxy iptables"), "{text}");
    assert!(
        text.contains("-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT"),
        "{text}"
    );
    assert!(
        text.contains("-A ISTIO_OUTPUT -m owner --uid-owner 999 -j RETURN"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("COMMIT"), "{text}");
    let out = Command::new(warden_bin())
        .args(["proxy", "iptables", "--exclude-inbound-ports", "80,nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\" is not a port number"));
}
