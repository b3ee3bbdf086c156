//! `warden test --live`: the cases of policy test files run through real proxies on loopback
//! instead of the offline engine, and each live outcome is compared with the case's `expect`
//! and with the offline verdict.
//!
//! Owns the per-file orchestration and the report. For each file, [`world::World`] starts, in
//! one tokio runtime: a temporary CA per trust domain; for every destination a case names, an
//! app per container port (HTTP/1.1 + HTTP/2, and a TCP banner for request-less cases) and, if
//! the workload has a sidecar, an [`warden_proxy::InboundProxy`] with its SVID, compiled
//! policy and port table; for every meshed source, an [`warden_proxy::outbound::OutboundProxy`]
//! with its SVID and the route [`warden_proxy::outbound::destination_for`] gives. Clients
//! ([`client`]) then send each case for real. Everything is torn down at the end of the file.
//!
//! Addresses outside 127.0.0.0/8 and the file's `now:` reach the engine through the proxy's
//! test-only hooks ([`warden_proxy::inbound::Presented`], `InboundProxy::with_fixed_clock`).
//! CUSTOM providers are played by stand-ins answering as the case's `extAuthz:` says.
//! A case is only run when loopback reproduces its conditions: the offline engine is asked
//! again with what the live run will actually present (addresses the case leaves unsaid, the
//! SNI sent); when that changes the outcome, the case is reported as `skip (live: …)` and
//! counted apart, never as passed.

mod client;
mod world;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use warden_policy::authz::Protocol;
use warden_policy::config::Workload;
use warden_policy::engine::{ExtAuthzAnswer, Outcome};
use warden_policy::simulate::{simulate_with, Client, Connection, Scenario, SimError, Verdict};
use warden_proxy::inbound::Presented;
use warden_proxy::outbound::Security;

use crate::check;
use crate::render;
use crate::testcmd::{Case, Prepared, Tally, TestArgs};

pub use client::LiveOutcome;

/// How long one case may take, connection set-up included; longer is a failure.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a case's client reaches the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Via {
    /// A meshed workload: through its own outbound proxy.
    Outbound { source: (String, String) },
    /// A workload without a sidecar, or `plaintext`: straight to the destination, plaintext.
    Plaintext,
    /// `from: spiffe://…`: straight to the destination with mTLS and an SVID for that ID.
    Mtls { id: String },
}

/// One case, ready to run live.
pub(crate) struct Plan {
    pub(crate) via: Via,
    /// Destination workload `(ns, name)`.
    pub(crate) to: (String, String),
    /// The port the client dials (a Service port, or the container port).
    pub(crate) port: u16,
    pub(crate) container_port: u16,
    /// Address the client binds (what the destination sees as `source.ip`, unless
    /// `presented` says otherwise).
    pub(crate) source_ip: IpAddr,
    /// Address of the destination's inbound listener (`destination.ip`, unless `presented`
    /// says otherwise).
    pub(crate) destination_ip: IpAddr,
    /// Addresses outside loopback the inbound listener presents to the engine instead.
    pub(crate) presented: Presented,
    /// SNI override for mTLS (`sni:`); `None` keeps the proxy's own choice.
    pub(crate) sni: Option<String>,
    pub(crate) request: Option<client::HttpCall>,
    /// What the live run's CUSTOM provider answers during this case, when one is consulted.
    pub(crate) ext_authz: Option<ExtAuthzAnswer>,
}

fn in_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(_) => false,
    }
}

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Runs every file live, in one runtime.
pub fn run(paths: &[PathBuf], args: &TestArgs, verbose: bool, tally: &mut Tally) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime for --live")?;
    for p in paths {
        run_file(&rt, p, args, verbose, tally);
    }
    Ok(())
}

/// Why a case cannot be run faithfully on loopback, or its plan.
enum Prep {
    Run(Box<(Plan, Verdict, Scenario)>),
    Skip(String),
    Fail(String),
}

fn run_file(
    rt: &tokio::runtime::Runtime,
    path: &std::path::Path,
    args: &TestArgs,
    verbose: bool,
    tally: &mut Tally,
) {
    let Some(p) = crate::testcmd::prepare(path, Some("live"), verbose, tally) else {
        return;
    };
    // Offline verdicts and plans come first, outside the runtime: fetching JWKS runs a runtime
    // of its own, which cannot nest in this one.
    let mut cases: Vec<(usize, &Case, Prep)> = Vec::new();
    for (i, c) in p.tf.cases.iter().enumerate() {
        if !Prepared::selected(args, c) {
            continue;
        }
        cases.push((i, c, plan_case(&p, c)));
    }
    let plans: Vec<&Plan> = cases
        .iter()
        .filter_map(|(_, _, prep)| match prep {
            Prep::Run(run) => Some(&run.0),
            _ => None,
        })
        .collect();
    let started: Result<Vec<LiveOutcome>> = if plans.is_empty() {
        Ok(Vec::new())
    } else {
        rt.block_on(async {
            let clock = p.tf.now.is_some().then_some(p.now);
            let world = world::World::start(&p.cfg, &p.jwks, clock, &plans).await?;
            let mut out = Vec::new();
            for plan in &plans {
                out.push(world.run_case(plan).await);
            }
            world.stop().await;
            Ok(out)
        })
    };
    let mut results = match started {
        Ok(r) => r.into_iter(),
        Err(e) => {
            // The file cannot run live at all: an error (exit 2), and each of its cases fails
            // saying why.
            let why = format!("cannot start the live environment: {e:#}");
            say!("  ERROR {why}");
            tally.bad_files += 1;
            vec![LiveOutcome::Failed(why); plans.len()].into_iter()
        }
    };
    let file = &p.file;
    for (i, c, prep) in &cases {
        let line = p.case_line(*i);
        let expect = c.expect.as_str();
        match prep {
            Prep::Fail(e) => {
                tally.failed += 1;
                say!("  FAIL  {} ({file}:{line}): {e}", c.name);
            }
            Prep::Skip(why) => {
                tally.skipped += 1;
                say!("  skip  {} (live: {why})", c.name);
            }
            Prep::Run(run) => {
                let (_, v, sc) = &**run;
                let live = results.next().unwrap_or_else(|| {
                    LiveOutcome::Failed("the live run returned no result".into())
                });
                let offline = v.result.as_str();
                // A CUSTOM denial may carry another status than 403 (`statusOnError`).
                let custom_deny = match (v.result, v.status) {
                    (Outcome::Deny, Some(s)) if s != 403 => Some(s),
                    _ => None,
                };
                let head = match judge(expect, offline, live.outcome(custom_deny)) {
                    Ok(()) => {
                        tally.passed += 1;
                        say!("  pass  {}", c.name);
                        if verbose {
                            say!("          live: {}", live.detail());
                            for l in render::to_text(sc, v).lines() {
                                say!("          {l}");
                            }
                        }
                        continue;
                    }
                    Err(head) => head,
                };
                tally.failed += 1;
                say!("  FAIL  {} ({file}:{line}): {head}", c.name);
                say!("          live: {}", live.detail());
                for l in render::to_text(sc, v).lines() {
                    say!("          {l}");
                }
            }
        }
    }
}

/// Whether the Service port dialed declares HTTP/2 (`http2`, `grpc`, `h2c` by name prefix or
/// `appProtocol`): its clients then speak HTTP/2 without TLS, as gRPC clients do.
fn declares_http2(cfg: &warden_policy::config::Config, dst: &Workload, port: u16) -> bool {
    let h2 = |p: &str| {
        let p = p.to_ascii_lowercase();
        matches!(p.as_str(), "http2" | "grpc" | "h2c" | "kubernetes.io/h2c")
    };
    cfg.services_selecting(dst)
        .flat_map(|s| s.spec.ports.iter())
        .find(|sp| sp.port == port)
        .is_some_and(|sp| match sp.app_protocol.as_deref() {
            Some(ap) => h2(ap),
            None => sp
                .name
                .as_deref()
                .is_some_and(|n| h2(n.split('-').next().unwrap_or(n))),
        })
}

/// Whether a case passes: the live outcome and the offline one must both be `expect`.
/// Otherwise the failure's headline, saying whether offline and live disagree.
fn judge(expect: &str, offline: &str, live: Option<&str>) -> Result<(), String> {
    let got = live.unwrap_or("no outcome");
    if live == Some(expect) && offline == expect {
        Ok(())
    } else if live == Some(expect) {
        Err(format!(
            "live gives {got} as expected, but offline gives {offline}: offline and live disagree"
        ))
    } else if live == Some(offline) {
        Err(format!(
            "expected {expect}, got {got} (live and offline agree)"
        ))
    } else {
        Err(format!(
            "expected {expect}, got {got} live but {offline} offline: offline and live disagree"
        ))
    }
}

/// Decides how case `c` runs live, or why it cannot.
fn plan_case(p: &Prepared, c: &Case) -> Prep {
    let (v, sc, conn) = match p.offline(c) {
        Ok(x) => x,
        Err(e) => return Prep::Fail(format!("{e:#}")),
    };
    let cfg = &p.cfg;
    let dst = match cfg.workload(&sc.to.0, &sc.to.1) {
        Some(w) => w,
        None => return Prep::Fail(format!("no workload {}/{}", sc.to.0, sc.to.1)),
    };
    let via = match &sc.from {
        Client::Workload(ns, name) => match cfg.workload(ns, name) {
            Some(w) if w.sidecar => Via::Outbound {
                source: (ns.clone(), name.clone()),
            },
            Some(_) => Via::Plaintext,
            None => return Prep::Fail(format!("no workload {ns}/{name}")),
        },
        Client::Spiffe(id) => {
            if let Err(e) = id.parse::<warden_identity::spiffe::SpiffeId>() {
                return Prep::Skip(format!("cannot issue an SVID for {id}: {e}"));
            }
            Via::Mtls { id: id.clone() }
        }
        Client::Plaintext => Via::Plaintext,
    };

    // A request-less case is an opaque TCP connection; a proxy's HTTP listener answers such
    // bytes with 400, so only a connection refused before HTTP (by the port's mode or the
    // handshake, where the engine is not asked) has a live counterpart.
    let proxied = dst.sidecar || matches!(via, Via::Outbound { .. });
    if sc.request.is_none()
        && v.destination.protocol == Protocol::Http
        && proxied
        && !(v.result == Outcome::Reset && v.decision.is_none())
    {
        return Prep::Skip(format!(
            "port {} is HTTP ({}); a case without `request:` is an opaque TCP connection, which a proxy's HTTP listener answers with 400",
            v.destination.container_port, v.destination.protocol_source
        ));
    }

    // Addresses in 127.0.0.0/8 are real: a client that opens its own socket binds its source
    // address, and the inbound listener binds the destination address. Others (and a source
    // behind the outbound proxy, which connects from 127.0.0.1) are presented to the engine by
    // the listener (the proxy's test-only `Presented`).
    let mut presented = Presented::default();
    let source_ip = match sc.source_ip {
        Some(ip) if in_loopback(ip) && !matches!(via, Via::Outbound { .. }) => ip,
        Some(ip) if dst.sidecar => {
            presented.source_ip = Some(ip);
            LOCALHOST
        }
        _ => LOCALHOST,
    };
    let wanted_dst = conn
        .destination_ip
        .or_else(|| dst.address.as_deref().and_then(|a| a.parse().ok()));
    let destination_ip = match wanted_dst {
        Some(ip) if in_loopback(ip) && dst.sidecar => ip,
        Some(ip) if dst.sidecar => {
            presented.destination_ip = Some(ip);
            LOCALHOST
        }
        _ => LOCALHOST,
    };
    let request = match &sc.request {
        None => None,
        Some(r) => match client::HttpCall::new(r, v.authority.as_deref()) {
            Ok(mut call) => {
                call.h2c = declares_http2(cfg, dst, sc.port);
                Some(call)
            }
            Err(why) => return Prep::Skip(why),
        },
    };
    let mut plan = Plan {
        via: via.clone(),
        to: sc.to.clone(),
        port: sc.port,
        container_port: v.destination.container_port,
        source_ip,
        destination_ip,
        presented,
        sni: c.sni.clone(),
        request,
        ext_authz: None,
    };

    // What the destination will really see, asked of the engine again.
    let live_sni = match &via {
        Via::Plaintext => None,
        Via::Mtls { .. } => c.sni.clone(),
        // As the world builds the route: `sni:` replaces the route's SNI on mTLS only.
        Via::Outbound { .. } => match world::route_for(cfg, dst, sc.port, (LOCALHOST, 0).into()) {
            Ok(d) if matches!(d.security, Security::Mtls(_)) => c.sni.clone().or(d.sni),
            _ => None,
        },
    };
    let mut live_sc = sc.clone();
    live_sc.source_ip = Some(presented.source_ip.unwrap_or(source_ip));
    // The proxies run on the file's `now:` when it has one (their test-only fixed clock).
    live_sc.now_unix = if p.tf.now.is_some() {
        p.now
    } else {
        check::clock_now()
    };
    live_sc.ext_authz = None;
    let live_conn = Connection {
        sni: live_sni.clone(),
        destination_ip: Some(presented.destination_ip.unwrap_or(destination_ip)),
    };
    let live_v = match simulate_with(cfg, &live_sc, &live_conn, &p.jwks) {
        Ok(v) => v,
        // A CUSTOM provider is consulted: the live run's stand-in gives the case's answer.
        Err(SimError::NeedExtAuthz(_)) => {
            live_sc.ext_authz = sc.ext_authz;
            plan.ext_authz = sc.ext_authz;
            match simulate_with(cfg, &live_sc, &live_conn, &p.jwks) {
                Ok(v) => v,
                Err(e) => return Prep::Fail(e.to_string()),
            }
        }
        Err(e) => return Prep::Fail(e.to_string()),
    };
    if live_v.result != v.result {
        // Addresses, the clock and the ext_authz answer the case gives are reproduced exactly;
        // what it leaves unsaid and the SNI actually sent may not be.
        let mut given = Vec::new();
        let mut implicit = Vec::new();
        if sc.source_ip.is_none() {
            implicit.push(format!("source address {source_ip}"));
        }
        if dst.sidecar && wanted_dst.is_none() {
            implicit.push(format!("destination address {destination_ip}"));
        }
        if conn.sni.is_some() && conn.sni != live_sni {
            given.push(format!(
                "SNI {} instead of {}",
                live_sni.as_deref().unwrap_or("none"),
                conn.sni.as_deref().unwrap_or("none")
            ));
        } else if conn.sni.is_none() {
            implicit.push(format!("SNI {}", live_sni.as_deref().unwrap_or("none")));
        }
        let differs = if given.is_empty() { implicit } else { given };
        return Prep::Skip(format!(
            "on loopback the proxy would see {}, which gives {} instead of {}",
            differs.join(", "),
            live_v.result.as_str(),
            v.result.as_str()
        ));
    }
    Prep::Run(Box::new((plan, v, sc)))
}

#[cfg(test)]
mod tests {
    use super::judge;

    #[test]
    fn a_case_passes_only_when_live_and_offline_both_match() {
        assert_eq!(judge("allow", "allow", Some("allow")), Ok(()));
        let e = judge("deny", "allow", Some("allow")).unwrap_err();
        assert_eq!(e, "expected deny, got allow (live and offline agree)");
        let e = judge("allow", "allow", Some("deny")).unwrap_err();
        assert!(e.contains("offline and live disagree"), "{e}");
        assert!(e.contains("got deny live"), "{e}");
        let e = judge("reset", "allow", Some("reset")).unwrap_err();
        assert!(
            e.contains("offline gives allow: offline and live disagree"),
            "{e}"
        );
        let e = judge("allow", "allow", None).unwrap_err();
        assert!(e.contains("got no outcome live"), "{e}");
    }
}
