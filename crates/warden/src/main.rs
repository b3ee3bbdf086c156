//! The `warden` command: one binary, one subcommand per job. Flags are validated in two
//! stages: clap checks their syntax, then each command checks what they mean together, so
//! every mistake is reported before any work starts (exit 2).
#![forbid(unsafe_code)]

/// `println!` through [`emit`], so a closed pipe never panics.
macro_rules! say {
    ($($t:tt)*) => { $crate::emit(&format!("{}\n", format_args!($($t)*))) };
}

mod ca_cmd;
mod check;
mod control_cmd;
mod demo;
mod describe;
mod input;
mod iptables_cmd;

mod live;
mod proxy_cmd;
mod proxy_identity;
mod render;
mod testcmd;
mod up;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Zero-trust security for microservices, speaking Istio's security API",
    long_about = "Warden enforces the Istio security YAML you already have (PeerAuthentication, \
RequestAuthentication, AuthorizationPolicy) and explains every decision it makes.\n\n\
Offline tools: check, test, analyze and describe answer \"would this be allowed, and why?\" \
with the same engine the proxy enforces with."
)]
struct Cli {
    /// More output: list skipped resources and warnings.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Where configuration comes from.
#[derive(Args, Clone)]
pub struct ConfigArgs {
    /// A YAML/JSON file, a folder (read recursively) or - for stdin. Repeatable.
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    pub files: Vec<String>,
    /// A MeshConfig file (overrides the `istio` ConfigMap in istio-system).
    #[arg(long, value_name = "FILE")]
    pub mesh: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Would this one request or connection be allowed, and why?
    Check(check::CheckArgs),
    /// Run policy test files (the format is in docs/test-format.md).
    Test(testcmd::TestArgs),
    /// Validate configuration and find mistakes (Istio's checks and Warden's own).
    Analyze(AnalyzeArgs),
    /// What applies to one workload: mTLS per port, JWT rules, authorization policies.
    Describe(describe::DescribeArgs),
    /// The certificate authority: init, issue, token, rotate-root, serve.
    #[command(subcommand)]
    Ca(ca_cmd::CaCommand),
    /// Certificates: inspect.
    #[command(subcommand)]
    Cert(ca_cmd::CertCommand),
    /// Run the proxy for one workload, inbound and outbound (explicit or transparent capture) until Ctrl-C.
    #[command(long_about = proxy_cmd::LONG_ABOUT)]
    Proxy(Box<proxy_cmd::ProxyCommand>),
    /// Run the control plane: configuration stream and CA for `warden proxy --control-plane`.
    #[command(long_about = control_cmd::LONG_ABOUT)]
    Control(control_cmd::ControlArgs),
    /// Run a whole mesh on this machine: control plane and a sidecar per local workload.
    #[command(long_about = up::LONG_ABOUT)]
    Up(up::UpArgs),
    /// A bookinfo-style mesh in one process, taken through Istio's security guides.
    #[command(long_about = demo::LONG_ABOUT)]
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct AnalyzeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Format,
}

fn analyze(a: &AnalyzeArgs, verbose: bool) -> anyhow::Result<ExitCode> {
    let (cfg, load_diags) = input::load(&a.config.files, a.config.mesh.as_deref())?;
    let mut diags = load_diags;
    // Analysis of a configuration that did not load would report on resources that are not there.
    if !diags.iter().any(|d| d.is_error()) {
        diags.extend(warden_policy::analyze::analyze(&cfg));
    }
    let errors = diags.iter().filter(|d| d.is_error()).count();
    match a.output {
        Format::Json => {
            let out = serde_json::json!({
                "schema": 1,
                "errors": errors,
                "warnings": diags.iter().filter(|d| d.severity == warden_policy::diag::Severity::Warning).count(),
                "messages": diags,
            });
            say!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Text => {
            for d in &diags {
                say!("{d}");
            }
            if verbose {
                for (at, what) in &cfg.skipped {
                    say!("{at}: skipped {what} (kind not used by Warden)");
                }
            }
            let warnings = diags.len() - errors;
            if diags.is_empty() {
                say!("no problems found");
            } else {
                say!("{errors} error(s), {warnings} warning(s)/info");
            }
        }
    }
    Ok(if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match &cli.command {
        Command::Check(a) => check::run(a, cli.verbose),
        Command::Test(a) => testcmd::run(a, cli.verbose),
        Command::Analyze(a) => analyze(a, cli.verbose),
        Command::Describe(a) => describe::run(a, cli.verbose),
        Command::Ca(c) => ca_cmd::run_ca(c),
        Command::Cert(c) => ca_cmd::run_cert(c),
        Command::Proxy(a) => proxy_cmd::run_command(a, cli.verbose),
        Command::Control(a) => control_cmd::run(a, cli.verbose),
        Command::Up(a) => up::run(a, cli.verbose),
        Command::Demo(a) => demo::run(a, cli.verbose),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warden: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints to stdout. A closed pipe (`warden … | head`) ends the program quietly instead of
/// panicking the way `println!` does.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("warden: cannot write output: {e}");
        std::process::exit(2);
    }
}

/// Loads configuration for a command that refuses configurations with errors (exit 2).
pub fn load_checked(
    c: &ConfigArgs,
    verbose: bool,
) -> anyhow::Result<warden_policy::config::Config> {
    let (cfg, diags) = input::load(&c.files, c.mesh.as_deref())?;
    let mut bad = Vec::new();
    let validation = warden_policy::validate::validate(&cfg);
    for d in diags.iter().chain(validation.iter()) {
        if d.is_error() {
            bad.push(d.to_string());
        } else if verbose {
            eprintln!("{d}");
        }
    }
    if verbose {
        for (at, what) in &cfg.skipped {
            eprintln!("{at}: skipped {what} (kind not used by Warden)");
        }
    }
    if !bad.is_empty() {
        anyhow::bail!("the configuration has errors:\n  {}", bad.join("\n  "));
    }
    Ok(cfg)
}
