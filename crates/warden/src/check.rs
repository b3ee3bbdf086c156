//! `warden check`: one request or connection, and why it would (not) be allowed.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use warden_policy::engine::{ExtAuthzAnswer, Outcome};
use warden_policy::simulate::{simulate_with, Client, Connection, HttpSpec, Scenario, SimError};

use crate::{input, render, ConfigArgs, Format};
use warden_control::jwks as jwks_fetch;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExtAuthzArg {
    Allow,
    Deny,
    Error,
}

impl From<ExtAuthzArg> for ExtAuthzAnswer {
    fn from(a: ExtAuthzArg) -> Self {
        match a {
            ExtAuthzArg::Allow => ExtAuthzAnswer::Allow,
            ExtAuthzArg::Deny => ExtAuthzAnswer::Deny,
            ExtAuthzArg::Error => ExtAuthzAnswer::Error,
        }
    }
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The client: NAMESPACE/WORKLOAD, a spiffe:// ID (an mTLS peer), or `plaintext`.
    #[arg(long, value_name = "SOURCE")]
    from: String,
    /// The destination workload: NAMESPACE/WORKLOAD.
    #[arg(long, value_name = "NS/WORKLOAD")]
    to: String,
    /// The port the client dials (a Service port maps to its targetPort).
    #[arg(long)]
    port: u16,
    /// HTTP method (makes it an HTTP request).
    #[arg(long)]
    method: Option<String>,
    /// HTTP path, query allowed (makes it an HTTP request).
    #[arg(long)]
    path: Option<String>,
    /// Host/:authority header (default as curl sends for http://<service>.<ns>:<port>/).
    #[arg(long)]
    host: Option<String>,
    /// A request header `name: value`. Repeatable.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// A JWT, sent as `Authorization: Bearer <token>`.
    #[arg(long)]
    token: Option<String>,
    /// The client address the proxy sees.
    #[arg(long, value_name = "IP")]
    source_ip: Option<String>,
    /// A plain TCP connection, even if method or path are given.
    #[arg(long)]
    tcp: bool,
    /// The clock for JWT exp/nbf (RFC 3339); default now.
    #[arg(long, value_name = "RFC3339")]
    now: Option<String>,
    /// What a CUSTOM provider answers, if one is consulted.
    #[arg(long, value_enum)]
    ext_authz: Option<ExtAuthzArg>,
    /// SNI the client sends (default: Istio's outbound SNI for a sidecar client's mTLS).
    #[arg(long)]
    sni: Option<String>,
    /// Destination address the proxy sees (default: a WorkloadEntry's address).
    #[arg(long, value_name = "IP")]
    destination_ip: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Format,
}

/// The system clock in Unix seconds.
pub fn clock_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn now_or(now: Option<&str>) -> Result<i64> {
    match now {
        Some(s) => match input::parse_rfc3339(s) {
            Some(t) => Ok(t),
            None => bail!("--now \"{s}\" is not an RFC 3339 time such as 2026-06-01T00:00:00Z"),
        },
        None => Ok(clock_now()),
    }
}

pub fn parse_to(s: &str) -> Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, w)) if !ns.is_empty() && !w.is_empty() && !w.contains('/') => {
            Ok((ns.into(), w.into()))
        }
        _ => bail!("--to \"{s}\" must be NAMESPACE/WORKLOAD"),
    }
}

fn parse_header(h: &str) -> Result<(String, String)> {
    match h.split_once(':') {
        Some((n, v)) if !n.trim().is_empty() && !n.contains(char::is_whitespace) => {
            Ok((n.trim().to_ascii_lowercase(), v.trim().to_string()))
        }
        _ => bail!("-H \"{h}\" must be `name: value` (no spaces in the name)"),
    }
}

/// Second-stage validation: what the flags mean together.
fn scenario(a: &CheckArgs) -> Result<Scenario> {
    let from = Client::parse(&a.from).map_err(|e| anyhow::anyhow!("--from {e}"))?;
    let to = parse_to(&a.to)?;
    if a.port == 0 {
        bail!("--port 0 is not a port: give the port the client dials (1-65535)");
    }
    let http_flags = a.method.is_some()
        || a.path.is_some()
        || a.host.is_some()
        || !a.headers.is_empty()
        || a.token.is_some();
    if a.tcp && http_flags {
        bail!("--tcp is a plain TCP connection: it cannot have --method, --path, --host, -H or --token");
    }
    let headers = a
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>>>()?;
    let request = (!a.tcp && http_flags).then(|| HttpSpec {
        method: a.method.clone().unwrap_or_else(|| "GET".into()),
        path: a.path.clone().unwrap_or_else(|| "/".into()),
        host: a.host.clone(),
        headers,
        token: a.token.clone(),
    });
    let source_ip = match &a.source_ip {
        Some(s) => Some(
            s.parse()
                .map_err(|_| anyhow::anyhow!("--source-ip \"{s}\" is not an IP address"))?,
        ),
        None => None,
    };
    Ok(Scenario {
        from,
        to,
        port: a.port,
        source_ip,
        request,
        now_unix: now_or(a.now.as_deref())?,
        ext_authz: a.ext_authz.map(Into::into),
    })
}

pub fn run(a: &CheckArgs, verbose: bool) -> Result<ExitCode> {
    let sc = scenario(a)?;
    let cfg = crate::load_checked(&a.config, verbose)?;
    let jwks = jwks_fetch::Fetched::for_config(&cfg);
    let conn =
        Connection {
            sni: a.sni.clone(),
            destination_ip: match &a.destination_ip {
                Some(s) => Some(s.parse().map_err(|_| {
                    anyhow::anyhow!("--destination-ip \"{s}\" is not an IP address")
                })?),
                None => None,
            },
        };
    let v = simulate_with(&cfg, &sc, &conn, &jwks).map_err(|e| match e {
        // The engine words the hint for test files (`extAuthz:`); here it is a flag.
        SimError::NeedExtAuthz(what) => {
            anyhow::anyhow!("{what}; give the provider's answer with --ext-authz allow|deny|error")
        }
        e => e.into(),
    })?;
    match a.output {
        Format::Json => say!(
            "{}",
            serde_json::to_string_pretty(&render::to_json(&sc, &v))?
        ),
        Format::Text => crate::emit(&render::to_text(&sc, &v)),
    }
    Ok(if v.result == Outcome::Allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
