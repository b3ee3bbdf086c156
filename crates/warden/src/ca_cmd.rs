//! `warden ca …` and `warden cert …`: the certificate authority and certificates, for people.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use warden_identity::ca::{Ca, KeyAlg, TtlPolicy};
use warden_identity::inspect::inspect_chain;
use warden_identity::service::{CaServer, CaServerOptions};
use warden_identity::signer::CaSigner;
use warden_identity::spiffe::SpiffeId;
use warden_identity::token::TokenStore;

use crate::Format;

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a new CA (self-signed root) in a folder; refuses to overwrite one.
    Init {
        /// The CA folder.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Key type of the root.
        #[arg(long, default_value = "ec-p256", value_parser = ["ec-p256", "rsa-2048"])]
        key: String,
        /// Lifetime of workload certificates when the caller asks for none.
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        default_ttl: String,
        /// No workload certificate lives longer, whatever is asked.
        #[arg(long, default_value = "48h", value_name = "DURATION")]
        max_ttl: String,
    },
    /// Issue a workload certificate by hand (a VM, a test): key, chain and root bundle.
    Issue {
        /// The identity: NAMESPACE/SERVICE-ACCOUNT.
        #[arg(value_name = "NS/SA")]
        identity: String,
        #[command(flatten)]
        ca: CaDir,
        /// Folder to write key.pem (mode 0600), cert-chain.pem and root-cert.pem to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime (e.g. 24h, 90m); clamped to the CA's maximum.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        #[arg(long, default_value = "ec-p256", value_parser = ["ec-p256", "rsa-2048"])]
        key: String,
    },
    /// Mint a bootstrap token bound to one identity (stored only as a hash).
    Token {
        /// The identity: NAMESPACE/SERVICE-ACCOUNT.
        #[arg(value_name = "NS/SA")]
        identity: String,
        #[command(flatten)]
        ca: CaDir,
        /// How long the token is valid.
        #[arg(long, default_value = "10m", value_name = "DURATION")]
        ttl: String,
        /// How many certificates it may obtain.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Add a new root, sign with it, and keep the old root trusted until its certificates expire.
    RotateRoot {
        #[command(flatten)]
        ca: CaDir,
    },
    /// Serve Istio's CreateCertificate gRPC API over TLS.
    Serve {
        #[command(flatten)]
        ca: CaDir,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:15012", value_name = "ADDR")]
        listen: String,
    },
}

#[derive(Args)]
pub struct CaDir {
    /// The CA folder (Warden layout, or Istio's cacerts layout).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Trust domain of a plug-in (cacerts) CA that has no ca.json.
    #[arg(long)]
    trust_domain: Option<String>,
}

impl CaDir {
    fn load(&self) -> Result<Ca> {
        Ca::load_with(&self.dir, self.trust_domain.as_deref())
            .with_context(|| format!("loading the CA in {}", self.dir.display()))
    }
}

#[derive(Subcommand)]
pub enum CertCommand {
    /// Show a certificate chain: SPIFFE ID, issuer, validity with time left, verification.
    Inspect {
        /// A PEM file, or - for stdin.
        #[arg(value_name = "FILE")]
        file: String,
        /// Root certificates (PEM) to verify the chain against.
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Format,
    },
}

/// Every root peers must trust, old and new during a rotation: what workloads are given.
const BUNDLE_FILE: &str = "bundle.pem";

fn write_bundle(ca: &Ca, dir: &Path) -> Result<()> {
    let path = dir.join(BUNDLE_FILE);
    std::fs::write(&path, ca.bundle_pem().concat())
        .with_context(|| format!("{}: cannot write", path.display()))
}

fn key_alg(s: &str) -> Result<KeyAlg> {
    s.parse::<KeyAlg>()
        .map_err(|e| anyhow::anyhow!("--key {s}: {e}"))
}

fn identity(s: &str, td: &str) -> Result<SpiffeId> {
    let Some((ns, sa)) = s.split_once('/') else {
        bail!("\"{s}\" must be NAMESPACE/SERVICE-ACCOUNT");
    };
    SpiffeId::new(td, ns, sa).map_err(|e| anyhow::anyhow!("\"{s}\": {e}"))
}

fn duration(flag: &str, s: &str) -> Result<Duration> {
    warden_control::jwks::parse_go_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            anyhow::anyhow!("{flag} \"{s}\" is not a duration such as 10m, 24h or 1h30m")
        })
}

/// Writes a file readable only by its owner: a new file created with mode 0600 (never an
/// existing file or a symlink, whose mode or target would be kept), renamed into place.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// The identity Warden's CA service presents; never issued to anyone else.
fn refuse_ca_identity(id: &SpiffeId) -> Result<()> {
    if id.namespace() == "warden-system" && id.service_account() == "warden-ca" {
        bail!("{id} is the CA service's own identity and is never issued to a workload");
    }
    Ok(())
}

/// Reloads the CA folder every few seconds and on SIGHUP: a `warden ca rotate-root` run by
/// another process, or an old root reaching its retirement, takes effect without a restart.
async fn follow_ca_dir(ca: &CaDir, signer: Arc<CaSigner>, server: &CaServer) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hup.recv() => {}
            r = tokio::signal::ctrl_c() => {
                r.context("waiting for Ctrl-C")?;
                return Ok(());
            }
        }
        match signer.reload(&ca.dir, ca.trust_domain.as_deref()) {
            Ok(true) => {
                server.reload_certificate();
                write_bundle(&signer.current(), &ca.dir)?;
                eprintln!(
                    "warden: CA reloaded from {}: signing with the current root, {} root(s) trusted",
                    ca.dir.display(),
                    signer.current().bundle().roots_der.len()
                );
            }
            Ok(false) => {}
            // Keep serving with the CA in memory; say why in the log.
            Err(e) => eprintln!(
                "warden: CA in {} not reloaded, keeping the current one: {e:#}",
                ca.dir.display()
            ),
        }
    }
}

pub fn run_ca(cmd: &CaCommand) -> Result<ExitCode> {
    match cmd {
        CaCommand::Init {
            dir,
            trust_domain,
            key,
            default_ttl,
            max_ttl,
        } => {
            let policy = TtlPolicy {
                default_ttl: duration("--default-ttl", default_ttl)?,
                max_ttl: duration("--max-ttl", max_ttl)?,
            };
            if policy.default_ttl > policy.max_ttl {
                bail!("--default-ttl {default_ttl} is longer than --max-ttl {max_ttl}");
            }
            let ca = Ca::init_with(dir, trust_domain, key_alg(key)?, policy, SystemTime::now())
                .with_context(|| format!("creating a CA in {}", dir.display()))?;
            write_bundle(&ca, dir)?;
            say!(
                "created a CA for trust domain {} ({key} root) in {}: root-cert.pem, root-key.pem (mode 0600), ca.json, bundle.pem",
                ca.trust_domain(),
                dir.display()
            );
        }
        CaCommand::Issue {
            identity: who,
            ca,
            out,
            ttl,
            key,
        } => {
            let loaded = ca.load()?;
            let id = identity(who, loaded.trust_domain())?;
            refuse_ca_identity(&id)?;
            // Writing workload files into a CA folder would overwrite its roots or chain.
            let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(x), Ok(y)) => x == y,
                _ => false,
            };
            if same(out, &ca.dir) || out.join("ca.json").exists() || out.join("ca-key.pem").exists()
            {
                bail!(
                    "--out {} is a CA folder; choose another folder for the workload's files",
                    out.display()
                );
            }
            let ca = loaded;
            let ttl = ttl.as_deref().map(|t| duration("--ttl", t)).transpose()?;
            let (key_der, csr) = warden_identity::csr::generate_csr(&id, key_alg(key)?)?;
            let issued = ca.sign_csr(&csr, &id, ttl, SystemTime::now())?;
            std::fs::create_dir_all(out)
                .with_context(|| format!("{}: cannot create", out.display()))?;
            write_private(
                &out.join("key.pem"),
                pem::encode(&pem::Pem::new("PRIVATE KEY", key_der)).as_bytes(),
            )?;
            std::fs::write(out.join("cert-chain.pem"), issued.cert_chain_pem.concat())
                .with_context(|| {
                    format!("{}: cannot write", out.join("cert-chain.pem").display())
                })?;
            std::fs::write(out.join("root-cert.pem"), issued.root_bundle_pem.concat())
                .with_context(|| {
                    format!("{}: cannot write", out.join("root-cert.pem").display())
                })?;
            let left = issued
                .not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs();
            say!(
                "issued {id}, valid for {}h{:02}m; wrote key.pem, cert-chain.pem, root-cert.pem to {}",
                left / 3600,
                (left % 3600) / 60,
                out.display()
            );
        }
        CaCommand::Token {
            identity: who,
            ca,
            ttl,
            uses,
        } => {
            let loaded = ca.load()?;
            let id = identity(who, loaded.trust_domain())?;
            refuse_ca_identity(&id)?;
            if *uses == 0 {
                bail!("--uses must be at least 1");
            }
            let ttl = duration("--ttl", ttl)?;
            let token = TokenStore::open(&ca.dir).mint(&id, ttl, *uses)?;
            eprintln!("bootstrap token for {id}, {uses} use(s), valid for {}s (shown once; stored only as a hash):", ttl.as_secs());
            say!("{token}");
        }
        CaCommand::RotateRoot { ca } => {
            let rotated = Ca::rotate_root(&ca.dir, SystemTime::now())
                .with_context(|| format!("rotating the root of {}", ca.dir.display()))?;
            write_bundle(&rotated, &ca.dir)?;
            say!(
                "signing with a new root; {} now trusts {} roots (the old one until every certificate it signed has expired)",
                ca.dir.join(BUNDLE_FILE).display(),
                rotated.bundle().roots_der.len()
            );
        }
        CaCommand::Serve { ca, listen } => {
            let loaded = ca.load()?;
            let td = loaded.trust_domain().to_string();
            // Retired roots are gone from the loaded CA; the bundle handed out follows.
            write_bundle(&loaded, &ca.dir)?;
            let signer = Arc::new(CaSigner::new(loaded));
            let tokens = Arc::new(TokenStore::open(&ca.dir));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(listen.as_str())
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                let server = CaServer::start(
                    listener,
                    signer.clone(),
                    CaServerOptions {
                        tokens: Some(tokens),
                        ..CaServerOptions::default()
                    },
                )
                .await?;
                eprintln!(
                    "warden CA for {td} serving istio.v1.auth.IstioCertificateService on {} (Ctrl-C stops)",
                    server.local_addr()
                );
                follow_ca_dir(ca, signer, &server).await?;
                server.shutdown().await?;
                anyhow::Ok(())
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_cert(cmd: &CertCommand) -> Result<ExitCode> {
    match cmd {
        CertCommand::Inspect {
            file,
            bundle,
            output,
        } => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading stdin")?;
                s
            } else {
                std::fs::read_to_string(file).with_context(|| format!("{file}: cannot read"))?
            };
            let roots = match bundle {
                Some(b) => {
                    let pem_text = std::fs::read_to_string(b)
                        .with_context(|| format!("{}: cannot read", b.display()))?;
                    let roots: Vec<Vec<u8>> = pem::parse_many(&pem_text)
                        .with_context(|| format!("{}: not PEM", b.display()))?
                        .into_iter()
                        .filter(|p| p.tag() == "CERTIFICATE")
                        .map(|p| p.into_contents())
                        .collect();
                    if roots.is_empty() {
                        bail!("{}: no CERTIFICATE blocks", b.display());
                    }
                    Some(roots)
                }
                None => None,
            };
            let ins = inspect_chain(&text, roots.as_deref(), SystemTime::now())
                .with_context(|| format!("{file}: cannot inspect"))?;
            match output {
                Format::Json => say!("{}", serde_json::to_string_pretty(&ins)?),
                Format::Text => crate::emit(&ins.to_string()),
            }
            let failed = matches!(&ins.chain_verified, Some(Err(_)));
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
