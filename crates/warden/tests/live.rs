//! `warden test --live` end to end: the bundled examples and the shared conformance suite pass
//! through real proxies on loopback exactly as they pass offline, the runner reproduces client
//! and destination addresses, SNI, foreign trust domains and the file's clock, skips what
//! loopback cannot reproduce instead of passing it, and reports wrong expectations and
//! offline/live disagreements as failures.

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

/// The shared conformance cases, beside the project as in `cli.rs`; from a git worktree
/// elsewhere, beside the main checkout.
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
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(o)) => Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("warden {args:?}: {e}"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("warden {args:?} did not finish within 120 s");
        }
    }
}

fn last_line(o: &Out) -> &str {
    o.stdout.lines().last().unwrap_or_default()
}

/// `N` of a summary line starting `N passed`.
fn passed(line: &str) -> usize {
    line.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn examples_and_conformance_pass_live_as_offline() {
    let dir = conformance_dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no conformance case in {}",
        dir.display()
    );
    let mut args = vec!["test", "examples/"];
    args.extend(files.iter().map(String::as_str));
    let offline = warden(&args);
    assert_eq!(offline.code, 0, "{}\n{}", offline.stdout, offline.stderr);
    args.insert(1, "--live");
    let live = warden(&args);
    assert_eq!(live.code, 0, "{}\n{}", live.stdout, live.stderr);
    let summary = last_line(&live);
    assert!(
        summary.ends_with(" passed, 0 failed, 0 skipped (live)"),
        "{}",
        live.stdout
    );
    // Every case ran live: none dropped, none skipped.
    assert_eq!(
        passed(summary),
        passed(last_line(&offline)),
        "{}",
        live.stdout
    );
    assert!(passed(summary) > 100, "{summary}");
    assert_eq!(
        live.stdout.matches("[live]").count(),
        offline
            .stdout
            .lines()
            .filter(|l| !l.starts_with(' '))
            .count()
            - 1,
        "every file is headed as live:\n{}",
        live.stdout
    );
}

#[test]
fn live_reproduces_addresses_sni_and_trust_domains() {
    let o = warden(&["test", "--live", &fixture("live.test.yaml")]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(
        last_line(&o),
        "17 passed, 0 failed, 1 skipped (live)",
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains(
            "skip  a TCP connection to an HTTP port is skipped, not passed (live: port 80 is HTTP (Service port name \"http\"); a case without `request:` is an opaque TCP connection, which a proxy's HTTP listener answers with 400)"
        ),
        "{}",
        o.stdout
    );
    // The same file passes offline in full, the skipped cases included.
    let o = warden(&["test", &fixture("live.test.yaml")]);
    assert_eq!(last_line(&o), "18 passed, 0 failed", "{}", o.stdout);
}

/// The CUSTOM provider is played by a server answering as `extAuthz:` says; its denial and a
/// `statusOnError` status reach the client through the proxy.
#[test]
fn live_asks_a_custom_provider_that_answers_as_the_case_says() {
    let o = warden(&[
        "test",
        "-v",
        "--live",
        "--run",
        "provider",
        &fixture("custom.test.yaml"),
    ]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(
        last_line(&o),
        "4 passed, 0 failed, 0 skipped (live)",
        "{}",
        o.stdout
    );
    for seen in [
        "live: HTTP/1.1 200 from the app (\"warden-live app: GET /secure/data\")",
        "live: HTTP/1.1 403 from a proxy (\"denied by warden-live ext_authz\")",
        "live: HTTP/1.1 503 from a proxy (\"\")",
    ] {
        assert!(o.stdout.contains(seen), "{seen}\n{}", o.stdout);
    }
}

/// An `envoyExtAuthzGrpc` provider is played by a gRPC stand-in, for requests and (network
/// ext_authz) TCP connections.
#[test]
fn live_asks_a_grpc_provider_for_requests_and_connections() {
    let o = warden(&[
        "test",
        "-v",
        "--live",
        &fixture("live-grpc-authz.test.yaml"),
    ]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(
        last_line(&o),
        "6 passed, 0 failed, 0 skipped (live)",
        "{}",
        o.stdout
    );
    for seen in [
        "live: HTTP/1.1 403 from a proxy (\"denied by warden-live ext_authz\")",
        "live: TCP: the app's banner came back",
        "live: connection closed without a response",
    ] {
        assert!(o.stdout.contains(seen), "{seen}\n{}", o.stdout);
    }
}

#[test]
fn live_fails_wrong_expectations_and_agrees_on_a_path_without_a_slash() {
    let f = fixture("live-fail.test.yaml");
    let o = warden(&["test", "--live", &f]);
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(
        last_line(&o),
        "2 passed, 1 failed, 0 skipped (live)",
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains(&format!(
            "FAIL  a wrong expectation ({f}:36): expected allow, got deny (live and offline agree)"
        )),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout
            .contains("live: HTTP/1.1 403 from a proxy (\"RBAC: access denied\")"),
        "{}",
        o.stdout
    );
    // Regression: the outbound proxy used to forward `GET public` as `GET /` (found by the
    // live runner as a disagreement with the offline engine); it now answers 404 as Envoy does.
    assert!(
        o.stdout.contains("pass  a path without a leading slash"),
        "{}",
        o.stdout
    );
    // `--run` selects live cases as it does offline.
    let o = warden(&["test", "--live", "--run", "right", &f]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(last_line(&o), "1 passed, 0 failed, 0 skipped (live)");
}

/// The proxies run on the file's `now:`: the token is expired in 2120 live as offline, where
/// the real clock would accept it.
#[test]
fn live_runs_on_the_files_clock() {
    let f = fixture("live-clock.test.yaml");
    let offline = warden(&["test", &f]);
    assert_eq!(
        last_line(&offline),
        "2 passed, 0 failed",
        "{}",
        offline.stdout
    );
    let o = warden(&["test", "-v", "--live", &f]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout
            .contains("pass  a token valid until 2118 is expired in 2120"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout
            .contains("live: HTTP/1.1 401 from a proxy (\"Jwt is expired\")"),
        "{}",
        o.stdout
    );
    assert_eq!(last_line(&o), "2 passed, 0 failed, 0 skipped (live)");
}
