//! The loopback mesh of one test file: temporary CAs and SVIDs, the apps, the inbound proxies
//! of meshed destinations and the outbound routes of meshed sources, all on ephemeral
//! 127.0.0.0/8 ports and all stopped by [`World::stop`] (or when the world is dropped).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
#[cfg(test)]
use std::time::Duration;
use std::time::SystemTime;
#[cfg(test)]
use tokio::net::TcpStream;

use anyhow::{anyhow, Context, Result};
use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use warden_identity::ca::{Ca, KeyAlg};
use warden_identity::csr::generate_csr;
use warden_identity::spiffe::SpiffeId;
use warden_identity::svid::{Svid, TrustBundle};
use warden_identity::tls::IdentityState;
use warden_policy::config::{Config, Workload};
use warden_policy::engine::{ExtAuthzAnswer, JwksSource, WorkloadPolicy};
use warden_policy::mesh::ExtAuthzKind;
use warden_policy::model::MtlsMode;
use warden_policy::scope;
use warden_proxy::inbound::Presented;
use warden_proxy::outbound::{
    destination_for, Destination, OutboundError, OutboundProtocol, OutboundProxy, Security,
};
use warden_proxy::{port_table, InboundPort, InboundProxy, PortProtocol, PortSettings};

use super::client::{self, LiveOutcome, Target};
use super::{Plan, Via, CASE_TIMEOUT};

/// Where one destination workload is reached.
struct Dest {
    sidecar: bool,
    /// The app of each container port.
    apps: BTreeMap<u16, SocketAddr>,
    /// The inbound proxy's listeners, by container port, the address they listen on and the
    /// addresses they present.
    inbound: BTreeMap<Listen, SocketAddr>,
    /// The workload's SPIFFE ID (what a client verifies with mTLS).
    id: Option<SpiffeId>,
}

/// One inbound listener: container port, the address it binds, the addresses it presents.
type Listen = (u16, IpAddr, Presented);

/// One outbound listener: the route a meshed source uses for one destination port.
struct RouteKey {
    source: (String, String),
    /// The inbound listener (or app) it leads to.
    upstream: SocketAddr,
    port: u16,
    sni: Option<String>,
    listen: Result<SocketAddr, String>,
}

pub(crate) struct World {
    dests: BTreeMap<(String, String), Dest>,
    routes: Vec<RouteKey>,
    /// SVIDs of `from: spiffe://…` clients.
    spiffe: BTreeMap<String, Arc<IdentityState>>,
    /// What the CUSTOM provider answers now (set before each case).
    ext_authz: Arc<Mutex<ExtAuthzAnswer>>,
    tasks: JoinSet<()>,
    _dir: TempDir,
}

/// A private folder for the CAs, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("warden-live-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One CA per trust domain in play, and what a mesh workload trusts.
struct Pki {
    cas: BTreeMap<String, Ca>,
    mesh_td: String,
    /// Trust domains the mesh accepts besides its own (aliases, `caCertificates`).
    aliases: Vec<String>,
}

impl Pki {
    fn new(dir: &Path, cfg: &Config, extra: &BTreeSet<String>) -> Result<Pki> {
        let mesh_td = cfg.mesh.trust_domain.clone();
        let mut cas = BTreeMap::new();
        let mut aliases = Vec::new();
        for (i, td) in std::iter::once(&mesh_td).chain(extra).enumerate() {
            if cas.contains_key(td) {
                continue;
            }
            let d = dir.join(format!("ca{i}"));
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            let ca = Ca::init(&d, td, KeyAlg::EcP256)
                .with_context(|| format!("creating a CA for trust domain {td}"))?;
            cas.insert(td.clone(), ca);
            if *td != mesh_td && cfg.mesh.accepts_trust_domain(td) {
                aliases.push(td.clone());
            }
        }
        Ok(Pki {
            cas,
            mesh_td,
            aliases,
        })
    }

    /// An identity for `id`: its SVID from the CA of its trust domain, trusting the roots of
    /// every trust domain the mesh accepts (and, for a foreign client, the mesh's).
    fn identity(&self, id: &SpiffeId) -> Result<Arc<IdentityState>> {
        let td = id.trust_domain();
        let ca = self
            .cas
            .get(td)
            .ok_or_else(|| anyhow!("no CA for trust domain {td}"))?;
        let (key, csr) = generate_csr(id, KeyAlg::EcP256)?;
        let issued = ca.sign_csr(&csr, id, None, SystemTime::now())?;
        let chain = issued
            .cert_chain_pem
            .iter()
            .map(|p| pem::parse(p).map(|p| p.into_contents()))
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the issued chain")?;
        let svid = Svid {
            id: id.clone(),
            cert_chain_der: chain,
            key_pkcs8_der: key,
            not_before: issued.not_before,
            not_after: issued.not_after,
        };
        let mesh_member = td == self.mesh_td || self.aliases.iter().any(|a| a == td);
        let (bundle_td, aliases) = if mesh_member {
            (self.mesh_td.clone(), self.aliases.clone())
        } else {
            // A client from an unaccepted trust domain still trusts the mesh: only the
            // destination's refusal should end its handshake.
            (td.to_string(), vec![self.mesh_td.clone()])
        };
        let roots = self
            .cas
            .iter()
            .filter(|(t, _)| {
                !mesh_member || **t == self.mesh_td || self.aliases.iter().any(|a| a == *t)
            })
            .flat_map(|(_, ca)| ca.bundle().roots_der)
            .collect();
        let bundle = TrustBundle {
            trust_domain: bundle_td,
            roots_der: roots,
        };
        let state = IdentityState::with_svid(svid, bundle)?;
        if !aliases.is_empty() {
            state.set_trust_domain_aliases(aliases)?;
        }
        Ok(Arc::new(state))
    }
}

/// The route a meshed source uses for `port` of `dst`: the proxy's own choice for a Service
/// port; for a port no Service declares (a pod port dialed directly), auto mTLS as the offline
/// simulation decides it (mTLS unless the destination has no sidecar or the port is DISABLE),
/// no SNI, and HTTP only when the port table declares it.
pub(crate) fn route_for(
    cfg: &Config,
    dst: &Workload,
    port: u16,
    upstream: SocketAddr,
) -> Result<Destination, OutboundError> {
    match destination_for(cfg, dst, port, upstream) {
        Err(OutboundError::NoServicePort { .. }) => {}
        other => return other,
    }
    let settings = port_table(cfg, dst).get(&port).copied();
    let mode = scope::peer_authentication(cfg, dst).mode_for(port).mode;
    let protocol = match settings.map(|s| s.protocol) {
        Some(PortProtocol::Http) => OutboundProtocol::Http,
        _ => OutboundProtocol::Tcp,
    };
    let security = if dst.sidecar && mode != MtlsMode::Disable {
        let raw = dst.spiffe_id(&cfg.mesh.trust_domain);
        Security::Mtls(
            raw.parse()
                .map_err(|e: warden_identity::spiffe::SpiffeIdError| {
                    OutboundError::BadIdentity {
                        workload: dst.id(),
                        id: raw.clone(),
                        reason: e.to_string(),
                    }
                })?,
        )
    } else {
        Security::Plaintext
    };
    Ok(Destination {
        upstream,
        security,
        protocol,
        sni: None,
    })
}

fn workload<'a>(cfg: &'a Config, (ns, name): &(String, String)) -> Result<&'a Workload> {
    cfg.workload(ns, name)
        .ok_or_else(|| anyhow!("no workload {ns}/{name}"))
}

impl World {
    /// Starts everything `plans` need.
    pub(crate) async fn start(
        cfg: &Config,
        jwks: &dyn JwksSource,
        clock: Option<i64>,
        plans: &[&Plan],
    ) -> Result<World> {
        let dir = TempDir::new()?;
        let extra: BTreeSet<String> = plans
            .iter()
            .filter_map(|p| match &p.via {
                Via::Mtls { id } => id
                    .parse::<SpiffeId>()
                    .ok()
                    .map(|i| i.trust_domain().to_string()),
                _ => None,
            })
            .collect();
        let pki = Pki::new(dir.path(), cfg, &extra)?;
        let mut tasks = JoinSet::new();

        // One stand-in per kind plays every ext_authz provider of the mesh config; until a
        // case sets an answer, they answer with an error (fail closed).
        let ext_authz = Arc::new(Mutex::new(ExtAuthzAnswer::Error));
        let mut provider_addrs = BTreeMap::new();
        let (mut http_addr, mut grpc_addr) = (None, None);
        for p in &cfg.mesh.extension_providers {
            let addr = match &p.ext_authz {
                Some((ExtAuthzKind::EnvoyExtAuthzHttp, _)) => match http_addr {
                    Some(a) => a,
                    None => *http_addr
                        .insert(client::start_ext_authz(&mut tasks, ext_authz.clone()).await?),
                },
                Some((ExtAuthzKind::EnvoyExtAuthzGrpc, _)) => match grpc_addr {
                    Some(a) => a,
                    None => *grpc_addr
                        .insert(client::start_ext_authz_grpc(&mut tasks, ext_authz.clone()).await?),
                },
                None => continue,
            };
            provider_addrs.insert(p.name.clone(), addr);
        }

        // Destinations: the container ports dialed, plus those of their port table.
        let mut wanted: BTreeMap<(String, String), BTreeSet<Listen>> = BTreeMap::new();
        for p in plans {
            wanted.entry(p.to.clone()).or_default().insert((
                p.container_port,
                p.destination_ip,
                p.presented,
            ));
        }
        let mut dests = BTreeMap::new();
        for (key, listens) in wanted {
            let wl = workload(cfg, &key)?;
            let table = port_table(cfg, wl);
            let mut ports: BTreeSet<u16> = table.keys().copied().collect();
            ports.extend(listens.iter().map(|(p, ..)| *p));
            let mut apps = BTreeMap::new();
            for port in &ports {
                apps.insert(*port, client::start_app(&mut tasks).await?);
            }
            let mut dest = Dest {
                sidecar: wl.sidecar,
                apps,
                inbound: BTreeMap::new(),
                id: None,
            };
            if wl.sidecar {
                let id: SpiffeId = wl
                    .spiffe_id(&cfg.mesh.trust_domain)
                    .parse()
                    .map_err(|e| anyhow!("{}: bad SPIFFE ID: {e}", wl.id()))?;
                let identity = pki.identity(&id)?;
                let served: BTreeMap<u16, InboundPort> = dest
                    .apps
                    .iter()
                    .map(|(port, app)| {
                        // A port no Service or container declares is still captured in a pod
                        // (Istio's pass-through chain): its mode applies, its protocol is
                        // detected.
                        let settings = table.get(port).copied().unwrap_or_else(|| {
                            let mode =
                                match scope::peer_authentication(cfg, wl).mode_for(*port).mode {
                                    MtlsMode::Unset => MtlsMode::Permissive,
                                    m => m,
                                };
                            PortSettings {
                                mode,
                                protocol: PortProtocol::Detect,
                            }
                        });
                        (*port, settings.with_app(*app))
                    })
                    .collect();
                let policy = Arc::new(ArcSwap::from_pointee(WorkloadPolicy::compile(
                    cfg, wl, jwks,
                )));
                let mut proxy = InboundProxy::new(policy, identity, served)
                    .with_workload(&wl.namespace, &wl.name)
                    .with_ext_authz_addrs(provider_addrs.clone());
                if let Some(now) = clock {
                    proxy = proxy.with_fixed_clock(now);
                }
                let proxy = Arc::new(proxy);
                for (port, ip, presented) in listens {
                    let l = proxy
                        .bind(port, SocketAddr::new(ip, 0))
                        .await
                        .with_context(|| format!("{}: inbound listener for port {port}", wl.id()))?
                        .presenting(presented);
                    dest.inbound.insert((port, ip, presented), l.local_addr()?);
                    tasks.spawn(l.run());
                }
                dest.id = Some(id);
            }
            dests.insert(key, dest);
        }

        // Sources: an outbound proxy per meshed workload, a route per destination port.
        let mut outbound: BTreeMap<(String, String), OutboundProxy> = BTreeMap::new();
        let mut routes: Vec<RouteKey> = Vec::new();
        let mut spiffe = BTreeMap::new();
        for p in plans {
            match &p.via {
                Via::Outbound { source } => {
                    let upstream =
                        dests[&p.to].reach(p.container_port, p.destination_ip, p.presented);
                    let Ok(upstream) = upstream else {
                        continue;
                    };
                    if routes.iter().any(|r| {
                        r.source == *source
                            && r.upstream == upstream
                            && r.port == p.port
                            && r.sni == p.sni
                    }) {
                        continue;
                    }
                    if !outbound.contains_key(source) {
                        let wl = workload(cfg, source)?;
                        let id: SpiffeId = wl
                            .spiffe_id(&cfg.mesh.trust_domain)
                            .parse()
                            .map_err(|e| anyhow!("{}: bad SPIFFE ID: {e}", wl.id()))?;
                        outbound.insert(source.clone(), OutboundProxy::new(pki.identity(&id)?));
                    }
                    // A route that cannot be set up fails its cases, not the whole file.
                    let listen = async {
                        let dst_wl = workload(cfg, &p.to)?;
                        let mut d = route_for(cfg, dst_wl, p.port, upstream)?;
                        if p.sni.is_some() && matches!(d.security, Security::Mtls(_)) {
                            d.sni = p.sni.clone();
                        }
                        let l = outbound[source]
                            .bind(SocketAddr::new(super::LOCALHOST, 0), d)
                            .await?;
                        let addr = l.local_addr()?;
                        tasks.spawn(l.run());
                        anyhow::Ok(addr)
                    }
                    .await
                    .map_err(|e| format!("outbound route of {}/{}: {e:#}", source.0, source.1));
                    routes.push(RouteKey {
                        source: source.clone(),
                        upstream,
                        port: p.port,
                        sni: p.sni.clone(),
                        listen,
                    });
                }
                Via::Mtls { id } => {
                    if !spiffe.contains_key(id) {
                        let sid: SpiffeId = id.parse().map_err(|e| anyhow!("{id}: {e}"))?;
                        spiffe.insert(id.clone(), pki.identity(&sid)?);
                    }
                }
                Via::Plaintext => {}
            }
        }
        Ok(World {
            dests,
            routes,
            spiffe,
            ext_authz,
            tasks,
            _dir: dir,
        })
    }

    /// Runs one case, bounded by [`CASE_TIMEOUT`].
    pub(crate) async fn run_case(&self, p: &Plan) -> LiveOutcome {
        *self.ext_authz.lock().unwrap_or_else(|p| p.into_inner()) =
            p.ext_authz.unwrap_or(ExtAuthzAnswer::Error);
        let target = match self.target(p) {
            Ok(t) => t,
            Err(e) => return LiveOutcome::Failed(format!("{e:#}")),
        };
        client::bounded(CASE_TIMEOUT, client::send(&target, p.request.as_ref())).await
    }

    fn target(&self, p: &Plan) -> Result<Target> {
        let dest = self
            .dests
            .get(&p.to)
            .ok_or_else(|| anyhow!("{}/{} was not started", p.to.0, p.to.1))?;
        Ok(match &p.via {
            Via::Outbound { source } => {
                let upstream = dest.reach(p.container_port, p.destination_ip, p.presented)?;
                let r = self
                    .routes
                    .iter()
                    .find(|r| {
                        r.source == *source
                            && r.upstream == upstream
                            && r.port == p.port
                            && r.sni == p.sni
                    })
                    .ok_or_else(|| anyhow!("no outbound route for this case"))?;
                Target::Plain {
                    addr: r.listen.clone().map_err(|e| anyhow!(e))?,
                    bind: super::LOCALHOST,
                }
            }
            Via::Plaintext => Target::Plain {
                addr: dest.reach(p.container_port, p.destination_ip, p.presented)?,
                bind: p.source_ip,
            },
            Via::Mtls { id } => {
                let identity = self
                    .spiffe
                    .get(id)
                    .cloned()
                    .ok_or_else(|| anyhow!("no SVID for {id}"))?;
                match &dest.id {
                    Some(server) => Target::Mtls {
                        addr: dest.reach(p.container_port, p.destination_ip, p.presented)?,
                        bind: p.source_ip,
                        identity,
                        server: server.clone(),
                        sni: p.sni.clone(),
                    },
                    // No sidecar: a mesh client's auto mTLS sends plaintext, as offline.
                    None => Target::Plain {
                        addr: dest.reach(p.container_port, p.destination_ip, p.presented)?,
                        bind: p.source_ip,
                    },
                }
            }
        })
    }

    /// Stops every listener and app of this file.
    pub(crate) async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Dest {
    /// Where a client reaches container `port`: the inbound listener, or the app itself when
    /// there is no sidecar.
    fn reach(&self, port: u16, ip: IpAddr, presented: Presented) -> Result<SocketAddr> {
        let found = if self.sidecar {
            self.inbound.get(&(port, ip, presented))
        } else {
            self.apps.get(&port)
        };
        found
            .copied()
            .ok_or_else(|| anyhow!("nothing listens for port {port}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::LOCALHOST;
    use warden_policy::config::Loader;
    use warden_policy::engine::InlineJwksOnly;

    const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: foo, labels: {istio-injection: enabled}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: foo}\nspec: {selector: {app: web}, ports: [{name: http, port: 8000, targetPort: 80}]}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: foo}\nspec: {template: {metadata: {labels: {app: web}}, spec: {serviceAccountName: web}}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: sleep, namespace: foo}\nspec: {template: {metadata: {labels: {app: sleep}}, spec: {serviceAccountName: sleep}}}\n";

    /// Everything a file started stops with it: afterwards no app, inbound or outbound
    /// listener accepts connections.
    #[tokio::test]
    async fn stop_closes_every_listener() {
        let mut l = Loader::new();
        l.add_text("mesh.yaml", MESH);
        let (cfg, diags) = l.finish();
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
        let plan = Plan {
            via: Via::Outbound {
                source: ("foo".into(), "sleep".into()),
            },
            to: ("foo".into(), "web".into()),
            port: 8000,
            container_port: 80,
            source_ip: LOCALHOST,
            destination_ip: LOCALHOST,
            presented: Presented::default(),
            ext_authz: None,
            sni: None,
            request: Some(
                client::HttpCall::new(
                    &warden_policy::simulate::HttpSpec {
                        method: "GET".into(),
                        path: "/".into(),
                        ..Default::default()
                    },
                    Some("web.foo:8000"),
                )
                .unwrap(),
            ),
        };
        let world = tokio::time::timeout(
            Duration::from_secs(20),
            World::start(&cfg, &InlineJwksOnly, None, &[&plan]),
        )
        .await
        .expect("start is bounded")
        .expect("the world starts");
        let dest = &world.dests[&plan.to];
        let mut addrs: Vec<SocketAddr> = dest.apps.values().copied().collect();
        addrs.extend(dest.inbound.values().copied());
        addrs.extend(world.routes.iter().map(|r| r.listen.clone().unwrap()));
        assert_eq!(
            addrs.len(),
            3,
            "one app, one inbound and one outbound listener"
        );
        let o = world.run_case(&plan).await;
        assert_eq!(o.outcome(None), Some("allow"), "{}", o.detail());
        for a in &addrs {
            assert!(
                TcpStream::connect(a).await.is_ok(),
                "{a} listens while running"
            );
        }
        world.stop().await;
        for a in &addrs {
            assert!(
                TcpStream::connect(a).await.is_err(),
                "{a} still accepts after stop"
            );
        }
    }
}
