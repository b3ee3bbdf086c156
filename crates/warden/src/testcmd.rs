//! `warden test`: policy test files (docs/test-format.md) run through the offline engine,
//! each case reported as pass or fail, then `N passed, M failed`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use warden_policy::config::{Config, Loader};
use warden_policy::engine::ExtAuthzAnswer;
use warden_policy::simulate::{simulate_with, Client, Connection, HttpSpec, Scenario, Verdict};
use warden_policy::source::parse_documents;

use crate::{check, input, live, render};
use warden_control::jwks as jwks_fetch;

#[derive(Args)]
pub struct TestArgs {
    /// Test files (YAML). Folders are searched for *.yaml files.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<String>,
    /// Only run cases whose name contains this text.
    #[arg(long, value_name = "TEXT")]
    pub(crate) run: Option<String>,
    /// Run the cases through real proxies, apps and clients on loopback instead of the
    /// offline engine, and compare with the offline outcome (docs/test-format.md).
    #[arg(long)]
    live: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TestFile {
    #[serde(default)]
    name: Option<String>,
    /// Where the scenario comes from (free text).
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    pub(crate) now: Option<String>,
    #[serde(default)]
    config: Option<String>,
    #[serde(default)]
    config_files: Vec<String>,
    #[serde(default)]
    tokens: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderValue {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Request {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, HeaderValue>,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Expect {
    Allow,
    Deny,
    Unauthenticated,
    Reset,
    /// Rejected before policy: a malformed request (400/404).
    #[serde(rename = "bad-request")]
    BadRequest,
}

impl Expect {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
            Expect::Unauthenticated => "unauthenticated",
            Expect::Reset => "reset",
            Expect::BadRequest => "bad-request",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) from: String,
    #[serde(default, rename = "sourceIP")]
    pub(crate) source_ip: Option<String>,
    to: String,
    pub(crate) port: u16,
    #[serde(default)]
    pub(crate) request: Option<Request>,
    #[serde(default)]
    pub(crate) ext_authz: Option<ExtAuthzAnswer>,
    /// SNI the client sends (default: Istio's outbound SNI for a sidecar client's mTLS).
    #[serde(default)]
    pub(crate) sni: Option<String>,
    /// Destination address the proxy sees.
    #[serde(default, rename = "destinationIP")]
    pub(crate) destination_ip: Option<String>,
    pub(crate) expect: Expect,
}

#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) passed: usize,
    pub(crate) failed: usize,
    pub(crate) bad_files: usize,
    /// Cases the live runner cannot reproduce faithfully (never counted as passed).
    pub(crate) skipped: usize,
}

fn read_test_file(path: &Path) -> Result<(TestFile, warden_policy::source::Document)> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("{file}: cannot read"))?;
    let mut docs = parse_documents(&file, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    if docs.len() != 1 {
        bail!("{file}: expected one YAML document, found {}", docs.len());
    }
    let doc = docs.remove(0);
    let tf: TestFile = serde_path_to_error::deserialize(&doc.value).map_err(|e| {
        let p = e.path().to_string();
        anyhow::anyhow!("{file}:{}: {p}: {}", doc.line_of(&p), e.inner())
    })?;
    Ok((tf, doc))
}

fn load_config(
    path: &Path,
    tf: &TestFile,
    doc: &warden_policy::source::Document,
    verbose: bool,
) -> Result<Config> {
    let file = path.display().to_string();
    let mut loader = Loader::new();
    if let Some(c) = &tf.config {
        // Pad with blank lines so diagnostics carry the test file's own line numbers: a block
        // scalar's text starts on the line after `config: |`.
        let pad = "\n".repeat(doc.line_of("config"));
        loader.add_text(&file, &format!("{pad}{c}"));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let files: Vec<String> = tf
        .config_files
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .collect();
    input::add_inputs(&mut loader, &files)?;
    let (cfg, mut diags) = loader.finish();
    diags.extend(warden_policy::validate::validate(&cfg));
    let errors: Vec<String> = diags
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.to_string())
        .collect();
    if verbose {
        for d in diags.iter().filter(|d| !d.is_error()) {
            eprintln!("{d}");
        }
    }
    if !errors.is_empty() {
        bail!("the configuration has errors:\n  {}", errors.join("\n  "));
    }
    Ok(cfg)
}

fn scenario(tf: &TestFile, c: &Case, now: i64) -> Result<Scenario> {
    let from = Client::parse(&c.from).map_err(|e| anyhow::anyhow!("from: {e}"))?;
    if c.port == 0 {
        bail!("port: 0 is not a port (1-65535)");
    }
    let to = check::parse_to(&c.to)
        .map_err(|_| anyhow::anyhow!("to: \"{}\" must be NAMESPACE/WORKLOAD", c.to))?;
    let source_ip = match &c.source_ip {
        Some(s) => Some(
            s.parse()
                .map_err(|_| anyhow::anyhow!("sourceIP: \"{s}\" is not an IP address"))?,
        ),
        None => None,
    };
    let request = match &c.request {
        None => None,
        Some(r) => {
            let mut headers = Vec::new();
            for (n, v) in &r.headers {
                match v {
                    HeaderValue::One(v) => headers.push((n.to_ascii_lowercase(), v.clone())),
                    HeaderValue::Many(vs) => {
                        for v in vs {
                            headers.push((n.to_ascii_lowercase(), v.clone()));
                        }
                    }
                }
            }
            let token = match r.token.as_deref() {
                Some(t) if t.starts_with('$') => {
                    Some(tf.tokens.get(&t[1..]).cloned().ok_or_else(|| {
                        anyhow::anyhow!("request.token: {t} is not in this file's tokens")
                    })?)
                }
                Some(t) => Some(t.to_string()),
                None => None,
            };
            Some(HttpSpec {
                method: r.method.clone().unwrap_or_else(|| "GET".into()),
                path: r.path.clone().unwrap_or_else(|| "/".into()),
                host: r.host.clone(),
                headers,
                token,
            })
        }
    };
    Ok(Scenario {
        from,
        to,
        port: c.port,
        source_ip,
        request,
        now_unix: now,
        ext_authz: c.ext_authz,
    })
}

/// A test file read and its configuration loaded, ready to run its cases.
pub(crate) struct Prepared {
    pub(crate) file: String,
    pub(crate) tf: TestFile,
    pub(crate) doc: warden_policy::source::Document,
    pub(crate) cfg: Config,
    pub(crate) now: i64,
    pub(crate) jwks: jwks_fetch::Fetched,
}

/// Reads a test file and loads its configuration, printing the file's title (with `mode`
/// after it, if any) or why it cannot run; `None` when it cannot.
pub(crate) fn prepare(
    path: &Path,
    mode: Option<&str>,
    verbose: bool,
    tally: &mut Tally,
) -> Option<Prepared> {
    let file = path.display().to_string();
    let (tf, doc) = match read_test_file(path) {
        Ok(x) => x,
        Err(e) => {
            say!("ERROR {file}: {e:#}");
            tally.bad_files += 1;
            return None;
        }
    };
    let title = tf.name.clone().unwrap_or_else(|| file.clone());
    match mode {
        Some(m) => say!("{title} ({file}) [{m}]"),
        None => say!("{title} ({file})"),
    }
    let _ = &tf.source;
    let cfg = match load_config(path, &tf, &doc, verbose) {
        Ok(c) => c,
        Err(e) => {
            say!("  ERROR {e:#}");
            tally.bad_files += 1;
            tally.failed += tf.cases.len();
            return None;
        }
    };
    let now = match tf.now.as_deref() {
        Some(s) => match input::parse_rfc3339(s) {
            Some(t) => t,
            None => {
                say!(
                    "  ERROR {file}:{}: now: \"{s}\" is not an RFC 3339 time such as 2026-06-01T00:00:00Z",
                    doc.line_of("now")
                );
                tally.bad_files += 1;
                tally.failed += tf.cases.len();
                return None;
            }
        },
        None => check::clock_now(),
    };
    let jwks = jwks_fetch::Fetched::for_config(&cfg);
    Some(Prepared {
        file,
        tf,
        doc,
        cfg,
        now,
        jwks,
    })
}

impl Prepared {
    /// Whether `--run` selects case `c`.
    pub(crate) fn selected(args: &TestArgs, c: &Case) -> bool {
        args.run.as_deref().is_none_or(|r| c.name.contains(r))
    }

    /// `file:line` of case `i`.
    pub(crate) fn case_line(&self, i: usize) -> usize {
        self.doc.line_of(&format!("cases[{i}]"))
    }

    /// The case as the offline engine sees it, and the offline verdict.
    pub(crate) fn offline(&self, c: &Case) -> Result<(Verdict, Scenario, Connection)> {
        let sc = scenario(&self.tf, c, self.now)?;
        let conn =
            Connection {
                sni: c.sni.clone(),
                destination_ip: match &c.destination_ip {
                    Some(s) => Some(s.parse().map_err(|_| {
                        anyhow::anyhow!("destinationIP: \"{s}\" is not an IP address")
                    })?),
                    None => None,
                },
            };
        let v = simulate_with(&self.cfg, &sc, &conn, &self.jwks)?;
        Ok((v, sc, conn))
    }
}

fn run_file(path: &Path, args: &TestArgs, verbose: bool, tally: &mut Tally) {
    let Some(p) = prepare(path, None, verbose, tally) else {
        return;
    };
    let file = &p.file;
    for (i, c) in p.tf.cases.iter().enumerate() {
        if !Prepared::selected(args, c) {
            continue;
        }
        let line = p.case_line(i);
        match p.offline(c) {
            Ok((v, sc, _)) if v.result.as_str() == c.expect.as_str() => {
                tally.passed += 1;
                say!("  pass  {}", c.name);
                if verbose {
                    for l in render::to_text(&sc, &v).lines() {
                        say!("          {l}");
                    }
                }
            }
            Ok((v, sc, _)) => {
                tally.failed += 1;
                say!(
                    "  FAIL  {} ({file}:{line}): expected {}, got {}",
                    c.name,
                    c.expect.as_str(),
                    v.result.as_str()
                );
                for l in render::to_text(&sc, &v).lines() {
                    say!("          {l}");
                }
            }
            Err(e) => {
                tally.failed += 1;
                say!("  FAIL  {} ({file}:{line}): {e:#}", c.name);
            }
        }
    }
}

pub fn run(args: &TestArgs, verbose: bool) -> Result<ExitCode> {
    let mut tally = Tally::default();
    let mut paths = Vec::new();
    // One visit per file, however many arguments or symlinks lead to it.
    let mut seen = input::Visited::default();
    for f in &args.files {
        let p = Path::new(f);
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut seen, &mut found)?;
            found.sort();
            paths.extend(found);
        } else if seen.first_file(p) {
            paths.push(p.to_path_buf());
        }
    }
    if args.live {
        live::run(&paths, args, verbose, &mut tally)?;
        say!(
            "{} passed, {} failed, {} skipped (live)",
            tally.passed,
            tally.failed,
            tally.skipped
        );
    } else {
        for p in &paths {
            run_file(p, args, verbose, &mut tally);
        }
        say!("{} passed, {} failed", tally.passed, tally.failed);
    }
    Ok(if tally.bad_files > 0 {
        ExitCode::from(2)
    } else if tally.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Test files under a folder: `*.yaml` files that have a `cases:` key. Hidden entries are
/// skipped, and each folder and file is visited once (symlink loops end).
fn walk(dir: &Path, seen: &mut input::Visited, out: &mut Vec<PathBuf>) -> Result<()> {
    if !seen.first_dir(dir) {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let p = e?.path();
        if input::is_hidden(&p) {
            continue;
        }
        if p.is_dir() {
            walk(&p, seen, out)?;
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") && seen.first_file(&p) {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            if text.lines().any(|l| l.starts_with("cases:")) {
                out.push(p);
            }
        }
    }
    Ok(())
}
