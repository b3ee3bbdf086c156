//! `warden proxy iptables`: the nat-table rules of Istio's REDIRECT capture for one pod, as
//! `iptables-restore` input (chains `ISTIO_INBOUND`, `ISTIO_IN_REDIRECT`, `ISTIO_OUTPUT`,
//! `ISTIO_REDIRECT`, the same rules `istio-iptables` writes), printed or applied with
//! `iptables-restore --noflush`. The rules are built here from the flags; nothing is read from
//! the system except when applying.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Result};
use clap::Args;

/// `warden proxy iptables --help`.
pub const LONG_ABOUT: &str = "Print the iptables rules that send a pod's TCP traffic through \
Warden's transparent listeners (Istio's REDIRECT mode, as its istio-init container sets up), \
as iptables-restore input for the nat table; --apply loads them with `iptables-restore \
--noflush` (root, in the pod's network namespace).\n\n\
Inbound: every TCP connection arriving at the pod (PREROUTING) goes to --inbound-port, \
except --exclude-inbound-ports; with --include-inbound-ports P1,P2 only those ports are \
captured; an empty list captures none.\n\
Outbound: every TCP connection the pod opens (OUTPUT) goes to --outbound-port, except \
connections of the proxy's own uid/gid (so its traffic is not captured again), traffic to \
127.0.0.1, and loopback traffic of other users. The proxy's connections to the app come from \
127.0.0.6 and pass; the proxy's own connections to the pod IP (the app calling itself through \
a Service) go to the inbound listener, as in Istio.\n\n\
IPv4 only: no ip6tables rules are written.\n\n\
Example:\n  warden proxy iptables --proxy-uid 1337 --apply";

#[derive(Args)]
pub struct IptablesArgs {
    /// The uid the proxy runs as; its connections are never captured.
    #[arg(long, value_name = "UID", default_value_t = 1337)]
    proxy_uid: u32,
    /// The gid the proxy runs as (default: the same number as --proxy-uid).
    #[arg(long, value_name = "GID")]
    proxy_gid: Option<u32>,
    /// Where captured inbound connections go (`warden proxy --inbound-capture`).
    #[arg(long, value_name = "PORT", default_value_t = 15006)]
    inbound_port: u16,
    /// Where captured outbound connections go (`warden proxy --outbound-capture`).
    #[arg(long, value_name = "PORT", default_value_t = 15001)]
    outbound_port: u16,
    /// Inbound ports never captured (comma-separated; used with --include-inbound-ports '*').
    #[arg(long, value_name = "PORTS", default_value = "15020,15021,15090")]
    exclude_inbound_ports: String,
    /// Inbound ports to capture: `*` for all, a comma-separated list, or empty for none.
    #[arg(long, value_name = "PORTS|*", default_value = "*")]
    include_inbound_ports: String,
    /// Load the rules with `iptables-restore --noflush` instead of printing them.
    #[arg(long)]
    apply: bool,
}

/// Which inbound ports are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Include {
    All { exclude: BTreeSet<u16> },
    Only(BTreeSet<u16>),
}

/// Everything the rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub include: Include,
}

fn parse_ports(flag: &str, s: &str) -> Result<BTreeSet<u16>> {
    let mut out = BTreeSet::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n != 0 => {
                out.insert(n);
            }
            _ => bail!("{flag}: \"{p}\" is not a port number (1-65535)"),
        }
    }
    Ok(out)
}

impl IptablesArgs {
    /// The second validation stage: what the flags mean together.
    fn rules(&self) -> Result<Rules> {
        if self.inbound_port == 0 || self.outbound_port == 0 {
            bail!("--inbound-port and --outbound-port must be 1-65535");
        }
        if self.inbound_port == self.outbound_port {
            bail!(
                "--inbound-port and --outbound-port are both {}; inbound and outbound capture need different listeners",
                self.inbound_port
            );
        }
        let include = if self.include_inbound_ports.trim() == "*" {
            Include::All {
                exclude: parse_ports("--exclude-inbound-ports", &self.exclude_inbound_ports)?,
            }
        } else {
            let only = parse_ports("--include-inbound-ports", &self.include_inbound_ports)?;
            for p in [self.inbound_port, self.outbound_port] {
                if only.contains(&p) {
                    bail!("--include-inbound-ports: {p} is the proxy's own capture port; capturing it would loop");
                }
            }
            Include::Only(only)
        };
        Ok(Rules {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid.unwrap_or(self.proxy_uid),
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            include,
        })
    }
}

impl Rules {
    /// The rules as `iptables-restore` input.
    pub fn render(&self) -> String {
        let mut r = Vec::new();
        r.push("# warden proxy iptables: Istio's REDIRECT capture (IPv4, nat table)".to_string());
        r.push("# load with: iptables-restore --noflush".to_string());
        r.push("*nat".to_string());
        for chain in [
            "ISTIO_INBOUND",
            "ISTIO_IN_REDIRECT",
            "ISTIO_OUTPUT",
            "ISTIO_REDIRECT",
        ] {
            r.push(format!(":{chain} - [0:0]"));
        }
        // Inbound: everything that arrives at the pod, minus the excluded ports.
        r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".to_string());
        match &self.include {
            Include::All { exclude } => {
                for p in exclude {
                    r.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
                }
                r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".to_string());
            }
            Include::Only(only) => {
                for p in only {
                    r.push(format!(
                        "-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT"
                    ));
                }
            }
        }
        r.push(format!(
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));
        // Outbound: everything the pod sends, except the proxy's own traffic.
        r.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".to_string());
        // The inbound proxy's connections to the app on the pod IP come from 127.0.0.6.
        r.push("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".to_string());
        for (flag, id) in [("uid", self.proxy_uid), ("gid", self.proxy_gid)] {
            // The proxy calling its own pod through a Service: served as inbound.
            match &self.include {
                Include::All { .. } => r.push(format!(
                    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --{flag}-owner {id} -j ISTIO_IN_REDIRECT"
                )),
                Include::Only(only) => {
                    for p in only {
                        r.push(format!(
                            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp --dport {p} -m owner --{flag}-owner {id} -j ISTIO_IN_REDIRECT"
                        ));
                    }
                }
            }
            // Loopback traffic of the app stays local; the proxy's other traffic leaves.
            r.push(format!(
                "-A ISTIO_OUTPUT -o lo -m owner ! --{flag}-owner {id} -j RETURN"
            ));
            r.push(format!(
                "-A ISTIO_OUTPUT -m owner --{flag}-owner {id} -j RETURN"
            ));
        }
        r.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".to_string());
        r.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".to_string());
        r.push(format!(
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        r.push("COMMIT".to_string());
        let mut out = r.join("\n");
        out.push('\n');
        out
    }
}

pub fn run(a: &IptablesArgs) -> Result<ExitCode> {
    let rules = a.rules()?;
    let text = rules.render();
    if !a.apply {
        say!("{}", text.trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    match apply(&text) {
        Ok(()) => {
            eprintln!("warden: iptables rules applied (nat table: ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_REDIRECT)");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("warden: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

fn apply(text: &str) -> Result<()> {
    // Applying twice would add the PREROUTING/OUTPUT jumps twice: refuse instead.
    match Command::new("iptables")
        .args(["-t", "nat", "-S", "ISTIO_OUTPUT"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("iptables is not installed (no `iptables` on PATH); install the iptables package")
        }
        Err(e) => bail!("cannot run iptables: {e}"),
        Ok(s) if s.success() => bail!(
            "the nat table already has an ISTIO_OUTPUT chain: the capture rules are in place (remove them first to apply new ones)"
        ),
        Ok(_) => {}
    }
    let mut child = match Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("iptables-restore is not installed (not on PATH); install the iptables package")
        }
        Err(e) => bail!("cannot run iptables-restore: {e}"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("Permission denied") || err.contains("must be root") {
            " (it needs root, or CAP_NET_ADMIN in the pod's network namespace)"
        } else {
            ""
        };
        bail!("iptables-restore failed{hint}: {}", err.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(include: &str, exclude: &str) -> IptablesArgs {
        IptablesArgs {
            proxy_uid: 1337,
            proxy_gid: None,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: exclude.to_string(),
            include_inbound_ports: include.to_string(),
            apply: false,
        }
    }

    /// Golden output: the rules `istio-iptables -p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT
    /// -i '*' -b '*' -d 15090,15021,15020` writes for the nat table (IPv4), in Warden's order.
    #[test]
    fn default_rules_are_istios() {
        let golden = "\
# warden proxy iptables: Istio's REDIRECT capture (IPv4, nat table)
# load with: iptables-restore --noflush
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
        assert_eq!(
            args("*", "15020,15021,15090").rules().unwrap().render(),
            golden
        );
    }

    #[test]
    fn an_include_list_captures_only_those_ports() {
        let text = args("8080, 9000", "15020").rules().unwrap().render();
        assert!(text.contains("-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT\n"));
        assert!(text.contains("-A ISTIO_INBOUND -p tcp --dport 9000 -j ISTIO_IN_REDIRECT\n"));
        assert!(!text.contains("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
        assert!(
            !text.contains("--dport 15020"),
            "exclusions only apply to '*'"
        );
        let none = args("", "").rules().unwrap().render();
        assert!(!none.contains("ISTIO_IN_REDIRECT\n-A ISTIO_IN"));
        assert!(!none.contains("-A ISTIO_INBOUND"), "{none}");
    }

    #[test]
    fn bad_flags_are_refused() {
        let mut a = args("*", "15020,x");
        assert!(a.rules().unwrap_err().to_string().contains("\"x\""));
        a = args("15006", "");
        assert!(a.rules().unwrap_err().to_string().contains("loop"));
        a = args("*", "");
        a.outbound_port = 15006;
        assert!(a.rules().unwrap_err().to_string().contains("different"));
    }
}
