//! End-to-end tests of the `warden` binary: the bundled examples and the shared conformance
//! suite, golden outputs for the explanation formats, exit codes and bad-input messages.
//!
//! Golden files live in `tests/golden/`; run with `UPDATE_GOLDEN=1` to rewrite them after an
//! intended change, then review the diff.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Runs warden with a hard time limit: a hang fails the test instead of stalling CI.
fn warden(args: &[&str]) -> Out {
    let child = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn warden");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(o)) => Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("warden {args:?}: {e}"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("warden {args:?} did not finish within 60 s");
        }
    }
}

/// A fresh folder under the system temp dir, unique to this process and call.
fn temp_dir(prefix: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()))
}

/// Compares with a golden file, making paths in the output independent of the checkout.
fn golden(name: &str, actual: &str) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .display()
        .to_string();
    let actual = actual.replace(&fixtures, "<fixtures>");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing golden file {}; run with UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(actual, want, "output differs from {}", path.display());
}

#[test]
fn examples_all_pass() {
    let o = warden(&["test", "examples/"]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let last = o.stdout.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    assert!(!last.starts_with("0 passed"), "no example case ran");
}

/// The shared conformance cases, beside the project; from a git worktree elsewhere, beside
/// the main checkout.
fn conformance_dir() -> PathBuf {
    let beside = root().join("../shared/conformance/cases");
    if beside.is_dir() {
        return beside;
    }
    let common = Command::new("git")
        .args(["rev-parse", "--path-format=absolute", "--git-common-dir"])
        .current_dir(root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let main = Path::new(&common).join("../../shared/conformance/cases");
    assert!(
        main.is_dir(),
        "the shared conformance cases must sit beside the project: {}",
        beside.display()
    );
    main
}

#[test]
fn shared_conformance_suite_passes() {
    let dir = conformance_dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut args = vec!["test"];
    args.extend(files.iter().map(String::as_str));
    let o = warden(&args);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o
        .stdout
        .lines()
        .last()
        .unwrap()
        .ends_with(" passed, 0 failed"));
}

#[test]
fn check_golden_outputs() {
    let m = fixture("mesh.yaml");
    let cases: [(&str, Vec<&str>, i32); 6] = [
        (
            "check-deny-admin.txt",
            vec![
                "--from",
                "foo/sleep",
                "--to",
                "foo/httpbin",
                "--port",
                "8000",
                "--method",
                "POST",
                "--path",
                "/admin/users?x=1",
            ],
            1,
        ),
        (
            "check-allow-dry-run.txt",
            vec![
                "--from",
                "foo/sleep",
                "--to",
                "foo/httpbin",
                "--port",
                "8000",
                "--method",
                "GET",
                "--path",
                "/get",
            ],
            0,
        ),
        (
            "check-strict-reset.txt",
            vec![
                "--from",
                "legacy/sleep",
                "--to",
                "foo/httpbin",
                "--port",
                "8000",
                "--path",
                "/get",
            ],
            1,
        ),
        (
            "check-tcp.txt",
            vec![
                "--from",
                "foo/sleep",
                "--to",
                "foo/httpbin",
                "--port",
                "9000",
            ],
            1,
        ),
        (
            "check-foreign-trust-domain.txt",
            vec![
                "--from",
                "spiffe://evil.example/ns/foo/sa/sleep",
                "--to",
                "foo/httpbin",
                "--port",
                "8000",
                "--path",
                "/",
            ],
            1,
        ),
        (
            "check-no-sidecar.txt",
            vec![
                "--from",
                "foo/sleep",
                "--to",
                "legacy/sleep",
                "--port",
                "80",
                "--path",
                "/",
            ],
            0,
        ),
    ];
    for (name, args, code) in cases {
        let mut a = vec!["check", "-f", m.as_str()];
        a.extend(args);
        let o = warden(&a);
        assert_eq!(o.code, code, "{name}: {}{}", o.stdout, o.stderr);
        golden(name, &o.stdout);
    }
}

#[test]
fn check_json_is_stable() {
    let m = fixture("mesh.yaml");
    let o = warden(&[
        "check",
        "-f",
        &m,
        "--from",
        "foo/sleep",
        "--to",
        "foo/httpbin",
        "--port",
        "8000",
        "--method",
        "GET",
        "--path",
        "/admin",
        "-o",
        "json",
    ]);
    assert_eq!(o.code, 1);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("valid JSON");
    assert_eq!(v["schema"], 1);
    assert_eq!(v["result"], "deny");
    assert_eq!(v["http_status"], 403);
    assert_eq!(v["body"], "RBAC: access denied");
    assert_eq!(
        v["policy"]["envoy_id"],
        "ns[foo]-policy[deny-admin]-rule[0]"
    );
    assert_eq!(v["destination"]["container_port"], 80);
    assert_eq!(v["destination"]["mtls_mode"], "STRICT");
    assert_eq!(v["destination"]["mtls_policy"], "istio-system/default");
    assert_eq!(
        v["source"]["identity"],
        "spiffe://cluster.local/ns/foo/sa/sleep"
    );
    assert_eq!(v["dry_run"][0]["result"], "allowed");
    golden("check-json.json", &o.stdout);
}

#[test]
fn describe_golden() {
    let m = fixture("mesh.yaml");
    let o = warden(&["describe", "foo/httpbin", "-f", &m]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    golden("describe-httpbin.txt", &o.stdout);
}

#[test]
fn bad_input_names_file_line_resource_and_field() {
    let o = warden(&[
        "check",
        "-f",
        &fixture("bad-field.yaml"),
        "--from",
        "plaintext",
        "--to",
        "foo/x",
        "--port",
        "80",
    ]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("bad-field.yaml:9"), "{}", o.stderr);
    assert!(
        o.stderr.contains("AuthorizationPolicy foo/typo"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("unknown field \"spec.rules[0].form\""),
        "{}",
        o.stderr
    );

    let o = warden(&["analyze", "-f", &fixture("bad-type.yaml")]);
    assert_eq!(o.code, 1);
    assert!(o.stdout.contains("bad-type.yaml:10"), "{}", o.stdout);
    assert!(
        o.stdout.contains("spec.rules[0].to[0].operation.ports[0]"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("expected a string"), "{}", o.stdout);

    let o = warden(&["analyze", "-f", &fixture("bad-syntax.yaml")]);
    assert_eq!(o.code, 1);
    assert!(o.stdout.contains("bad-syntax.yaml:"), "{}", o.stdout);

    let o = warden(&[
        "check",
        "-f",
        "/nonexistent/dir",
        "--from",
        "plaintext",
        "--to",
        "a/b",
        "--port",
        "1",
    ]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("/nonexistent/dir"), "{}", o.stderr);
}

#[test]
fn flags_are_validated_before_work() {
    let m = fixture("mesh.yaml");
    let o = warden(&[
        "check",
        "-f",
        &m,
        "--from",
        "foo",
        "--to",
        "foo/httpbin",
        "--port",
        "80",
    ]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("NAMESPACE/WORKLOAD"), "{}", o.stderr);
    let o = warden(&[
        "check",
        "-f",
        &m,
        "--from",
        "plaintext",
        "--to",
        "foo/httpbin",
        "--port",
        "80",
        "--tcp",
        "--method",
        "GET",
    ]);
    assert_eq!(o.code, 2);
    let o = warden(&[
        "check",
        "-f",
        &m,
        "--from",
        "plaintext",
        "--to",
        "foo/httpbin",
        "--port",
        "99999",
    ]);
    assert_eq!(o.code, 2);
    let o = warden(&[
        "check",
        "-f",
        &m,
        "--from",
        "plaintext",
        "--to",
        "foo/nothere",
        "--port",
        "80",
    ]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("no workload foo/nothere"), "{}", o.stderr);
    for cmd in ["check", "test", "analyze", "describe"] {
        let o = warden(&[cmd, "--help"]);
        assert_eq!(o.code, 0, "{cmd} --help");
        assert!(o.stdout.contains("Usage"), "{cmd} --help");
    }
}

#[test]
fn stdin_and_lists_are_read() {
    let text = std::fs::read_to_string(fixture("mesh.yaml")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["describe", "foo/httpbin", "-f", "-", "-o", "json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["identity"], "spiffe://cluster.local/ns/foo/sa/httpbin");
}

#[test]
fn custom_provider_is_explained_and_needs_an_answer() {
    let f = fixture("custom.yaml");
    let base = [
        "check",
        "-f",
        f.as_str(),
        "--from",
        "foo/sleep",
        "--to",
        "foo/httpbin",
        "--port",
        "8000",
        "--path",
        "/secure/x",
    ];
    let o = warden(&base);
    assert_eq!(o.code, 2);
    assert!(
        o.stderr
            .contains("CUSTOM provider \"ext-authz\" would be consulted"),
        "{}",
        o.stderr
    );
    let mut a = base.to_vec();
    a.extend(["--ext-authz", "error", "-o", "json"]);
    let o = warden(&a);
    assert_eq!(o.code, 1);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["http_status"], 503);
    assert_eq!(v["step"], "custom");
    assert_eq!(
        v["custom"]["settings"],
        "envoyExtAuthzHttp ext-authz.foo.svc.cluster.local:8000, timeout 600s, failOpen false, statusOnError 503"
    );
}

#[test]
fn test_command_reports_failures_readably() {
    let o = warden(&["test", &fixture("custom.test.yaml")]);
    assert_eq!(o.code, 1);
    assert!(o.stdout.ends_with("4 passed, 2 failed\n"), "{}", o.stdout);
    golden("test-custom.txt", &o.stdout);
}

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "warden-cli-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
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

/// Regression: `ln -s . a; ln -s . b` made the folder walk exponential (a hang), and one
/// self-link read every file 40 times ("defined twice" errors). Bounded by `warden`'s timeout.
#[cfg(unix)]
#[test]
fn symlink_loops_end_and_files_are_read_once() {
    use std::os::unix::fs::symlink;
    let t = TempDir::new("loops");
    let config = t.0.join("config");
    let tests = t.0.join("tests");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::create_dir_all(tests.join(".hidden")).unwrap();
    std::fs::copy(fixture("custom.yaml"), config.join("custom.yaml")).unwrap();
    for d in [&config, &tests] {
        symlink(".", d.join("a")).unwrap();
        symlink(".", d.join("b")).unwrap();
    }
    symlink("..", tests.join("up")).unwrap();
    let case = "cases:
- name: public path
  from: foo/sleep
  to: foo/httpbin
  port: 8000
  request: {path: /public}
  expect: allow
";
    std::fs::write(
        tests.join("t.test.yaml"),
        format!("configFiles: [../config/]\n{case}"),
    )
    .unwrap();
    // Hidden folders are not searched for test files.
    std::fs::write(
        tests.join(".hidden/skip.test.yaml"),
        format!(
            "configFiles: [../../config/]\n{}",
            case.replace("expect: allow", "expect: deny")
        ),
    )
    .unwrap();

    let dir = config.display().to_string();
    let o = warden(&["analyze", "-f", &dir]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(!o.stdout.contains("defined twice"), "{}", o.stdout);
    let o = warden(&[
        "check",
        "-f",
        &dir,
        "-f",
        &format!("{dir}/a/b/custom.yaml"),
        "--from",
        "foo/sleep",
        "--to",
        "foo/httpbin",
        "--port",
        "8000",
        "--path",
        "/public",
    ]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);

    let o = warden(&["test", &tests.display().to_string()]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(
        o.stdout.matches("pass  public path").count(),
        1,
        "{}",
        o.stdout
    );
    assert!(o.stdout.ends_with("1 passed, 0 failed\n"), "{}", o.stdout);
}

#[test]
fn check_rejects_port_zero_and_names_the_ext_authz_flag() {
    let m = fixture("mesh.yaml");
    let o = warden(&[
        "check",
        "-f",
        &m,
        "--from",
        "foo/sleep",
        "--to",
        "foo/httpbin",
        "--port",
        "0",
    ]);
    assert_eq!(o.code, 2, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("--port 0 is not a port"), "{}", o.stderr);
    let f = fixture("custom.yaml");
    let o = warden(&[
        "check",
        "-f",
        &f,
        "--from",
        "foo/sleep",
        "--to",
        "foo/httpbin",
        "--port",
        "8000",
        "--path",
        "/secure/x",
    ]);
    assert_eq!(o.code, 2);
    assert!(
        o.stderr
            .contains("give the provider's answer with --ext-authz allow|deny|error"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("extAuthz"), "{}", o.stderr);
}

#[test]
fn test_file_now_and_bad_request() {
    let o = warden(&["test", &fixture("now-bad.test.yaml")]);
    assert_eq!(o.code, 2, "{}", o.stdout);
    assert!(
        o.stdout.contains(&format!(
            "ERROR {}:3: now: \"tomorrow\" is not an RFC 3339 time",
            fixture("now-bad.test.yaml")
        )),
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains("--now"), "{}", o.stdout);
    let o = warden(&["test", &fixture("bad-request.test.yaml")]);
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(
        o.stdout.contains("pass  a NUL byte in the path is 400"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout
            .contains("pass  a path without a leading slash is 404"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("port: 0 is not a port (1-65535)"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.ends_with("2 passed, 1 failed\n"), "{}", o.stdout);
}

/// Two CUSTOM providers on one workload are refused (fail closed), a DENY with
/// notRequestPrincipals requires a token, and port-level STRICT leaves other ports open.
#[test]
fn describe_refused_custom_token_and_other_ports() {
    let f = fixture("describe-custom.yaml");
    let o = warden(&["describe", "foo/api", "-f", &f]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        !o.stdout.contains("external authorizer (CUSTOM)"),
        "{}",
        o.stdout
    );
    assert!(
        !o.stdout.contains("mTLS is required on every port"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("rejects requests without a token"),
        "{}",
        o.stdout
    );
    golden("describe-custom.txt", &o.stdout);
    let o = warden(&["describe", "foo/api", "-f", &f, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["other_ports"]["mtls_mode"], "PERMISSIVE");
    assert_eq!(v["ports"][0]["port"], 8080);
    assert_eq!(
        v["policies"][0]["bad_custom"],
        "only one CUSTOM provider may be used per workload, found ext-a, ext-b"
    );
}

#[test]
fn ca_commands_issue_inspect_rotate() {
    let tmp = temp_dir("warden-cli-ca");
    let ca = tmp.join("ca").display().to_string();
    let out = tmp.join("web").display().to_string();
    let o = warden(&["ca", "init", "--dir", &ca, "--trust-domain", "example.org"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tmp.join("ca/root-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let o = warden(&["ca", "init", "--dir", &ca]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("refusing to overwrite"), "{}", o.stderr);

    let o = warden(&[
        "ca", "issue", "shop/web", "--dir", &ca, "--out", &out, "--ttl", "2h",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let chain = format!("{out}/cert-chain.pem");
    let bundle = format!("{ca}/bundle.pem");
    let o = warden(&["cert", "inspect", &chain, "--bundle", &bundle, "-o", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        v["certificates"][0]["spiffe_id"],
        "spiffe://example.org/ns/shop/sa/web"
    );
    assert_eq!(v["chain_verified"]["verified"], true);

    // After a root rotation the old certificate still verifies against the bundle.
    let o = warden(&["ca", "rotate-root", "--dir", &ca]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = warden(&["cert", "inspect", &chain, "--bundle", &bundle]);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(
        o.stdout.contains("verified against the bundle"),
        "{}",
        o.stdout
    );
    // ...but not against the new root alone.
    let o = warden(&[
        "cert",
        "inspect",
        &chain,
        "--bundle",
        &format!("{ca}/root-cert.pem"),
    ]);
    assert_eq!(o.code, 1, "{}", o.stdout);

    let o = warden(&["ca", "token", "shop/web", "--dir", &ca, "--ttl", "5m"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout.trim().len(),
        43,
        "a 256-bit base64url token: {}",
        o.stdout
    );
    let tokens = std::fs::read_to_string(tmp.join("ca/tokens.json")).unwrap();
    assert!(
        !tokens.contains(o.stdout.trim()),
        "tokens are stored only as hashes"
    );

    let o = warden(&["cert", "inspect", &format!("{out}/key.pem")]);
    assert_eq!(o.code, 2, "a key is not a certificate: {}", o.stdout);
    let o = warden(&["ca", "issue", "shop/Web", "--dir", &ca, "--out", &out]);
    assert_eq!(o.code, 2);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn ca_max_ttl_clamps_issued_certificates() {
    let tmp = temp_dir("warden-cli-ttl");
    let ca = tmp.join("ca").display().to_string();
    let out = tmp.join("vm").display().to_string();
    let o = warden(&[
        "ca",
        "init",
        "--dir",
        &ca,
        "--default-ttl",
        "30m",
        "--max-ttl",
        "1h",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = warden(&[
        "ca", "issue", "vms/db", "--dir", &ca, "--out", &out, "--ttl", "10h",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = warden(&[
        "cert",
        "inspect",
        &format!("{out}/cert-chain.pem"),
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let left = v["certificates"][0]["seconds_left"].as_i64().unwrap();
    assert!(
        left <= 3600 && left > 3500,
        "clamped to the 1h maximum: {left}s"
    );
    let o = warden(&[
        "ca",
        "init",
        "--dir",
        &tmp.join("ca2").display().to_string(),
        "--default-ttl",
        "2h",
        "--max-ttl",
        "1h",
    ]);
    assert_eq!(o.code, 2);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Review finding: a running `warden ca serve` must pick up `warden ca rotate-root` done by
/// another process (here on SIGHUP; it also polls), and sign with the new root.
#[test]
fn ca_serve_follows_a_root_rotation() {
    use std::io::{BufRead, BufReader};
    use warden_identity::client::{CaEndpoint, Credential};
    use warden_identity::proto::IstioCertificateRequest;
    use warden_identity::spiffe::SpiffeId;
    use warden_identity::svid::TrustBundle;

    let tmp = temp_dir("warden-cli-serve");
    let ca = tmp.join("ca").display().to_string();
    assert_eq!(warden(&["ca", "init", "--dir", &ca]).code, 0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["ca", "serve", "--dir", &ca, "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Kill the server whatever happens, so a failing assertion never leaves it running.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .arg("-9")
                .arg(self.0.to_string())
                .status();
        }
    }
    let _guard = Kill(pid);
    // The server's stderr lines are the synchronisation points; a reader thread forwards them.
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |needle: &str| -> String {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no \"{needle}\" from warden ca serve within 30 s"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    let serving = wait_for("serving");
    let addr = serving
        .rsplit(" on ")
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();

    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let roots = |path: &str| -> Vec<Vec<u8>> {
        pem::parse_many(std::fs::read_to_string(path).unwrap())
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect()
    };
    let bundle_path = format!("{ca}/bundle.pem");
    let root_path = format!("{ca}/root-cert.pem");
    let issue = |token: &str, bundle: Vec<Vec<u8>>| -> Vec<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_key, der) =
                warden_identity::csr::generate_csr(&web, warden_identity::ca::KeyAlg::EcP256)
                    .unwrap();
            let csr = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
            let endpoint = CaEndpoint::new(addr.clone(), "cluster.local").unwrap();
            let bundle = TrustBundle {
                trust_domain: "cluster.local".into(),
                roots_der: bundle,
            };
            let resp = tokio::time::timeout(
                Duration::from_secs(30),
                endpoint.create_certificate(
                    &bundle,
                    Credential::Token(token),
                    IstioCertificateRequest {
                        csr,
                        validity_duration: 3600,
                        ..Default::default()
                    },
                ),
            )
            .await
            .expect("answered within 30 s")
            .unwrap();
            let n = resp.cert_chain.len();
            resp.cert_chain[..n - 1]
                .iter()
                .flat_map(|p| pem::parse_many(p).unwrap())
                .map(|p| p.into_contents())
                .collect()
        })
    };
    let token = |ca: &str| {
        warden(&["ca", "token", "shop/web", "--dir", ca])
            .stdout
            .trim()
            .to_string()
    };

    let old_root = roots(&root_path);
    let chain = issue(&token(&ca), roots(&bundle_path));
    warden_identity::inspect::verify_chain(&chain, &old_root, std::time::SystemTime::now())
        .unwrap();

    assert_eq!(warden(&["ca", "rotate-root", "--dir", &ca]).code, 0);
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status();
    wait_for("CA reloaded");
    let new_root = roots(&root_path);
    assert_ne!(new_root, old_root);
    let chain = issue(&token(&ca), roots(&bundle_path));
    warden_identity::inspect::verify_chain(&chain, &new_root, std::time::SystemTime::now())
        .expect("signed by the new root without a restart");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn ca_issue_guards_keys_and_reserved_identities() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = temp_dir("warden-cli-guard");
    let ca = tmp.join("ca").display().to_string();
    let out = tmp.join("out");
    assert_eq!(warden(&["ca", "init", "--dir", &ca]).code, 0);
    std::fs::create_dir_all(&out).unwrap();
    // A pre-existing world-readable key file and a symlink must not keep their mode/target.
    std::fs::write(out.join("key.pem"), "old").unwrap();
    std::fs::set_permissions(out.join("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = warden(&[
        "ca",
        "issue",
        "shop/web",
        "--dir",
        &ca,
        "--out",
        &out.display().to_string(),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let elsewhere = tmp.join("elsewhere.pem");
    std::fs::remove_file(out.join("key.pem")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("key.pem")).unwrap();
    assert_eq!(
        warden(&[
            "ca",
            "issue",
            "shop/web",
            "--dir",
            &ca,
            "--out",
            &out.display().to_string()
        ])
        .code,
        0
    );
    assert!(!elsewhere.exists(), "the key was written through a symlink");
    // The CA's own identity is never issued; the CA folder is never an output folder.
    let o = warden(&[
        "ca",
        "issue",
        "warden-system/warden-ca",
        "--dir",
        &ca,
        "--out",
        &out.display().to_string(),
    ]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("never issued"), "{}", o.stderr);
    assert_eq!(
        warden(&["ca", "token", "warden-system/warden-ca", "--dir", &ca]).code,
        2
    );
    let o = warden(&["ca", "issue", "shop/web", "--dir", &ca, "--out", &ca]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("is a CA folder"), "{}", o.stderr);
    let _ = std::fs::remove_dir_all(&tmp);
}
