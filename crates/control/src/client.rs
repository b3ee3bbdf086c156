//! The proxy side of the configuration stream: [`ControlSource`], a
//! [`ConfigSource`](warden_proxy::source::ConfigSource) that follows the control plane, and
//! [`FakeProxy`], a light client of the same protocol for tests and the scale benchmark.
//!
//! The source connects over mutual TLS with the workload's current certificate (renewals are
//! picked up at the next connection) and requires the control plane to present the CA
//! service's SPIFFE ID. Each response is applied to a copy of the resources held; the copy is
//! loaded, validated and compiled exactly as a folder would be, and only then replaces what
//! is held and is ACKed. A response that does not build is NACKed with the reasons and
//! changes nothing. When the stream breaks the proxy keeps enforcing what it holds and
//! reconnects with exponential backoff, telling the control plane what it holds so only the
//! difference is sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use warden_identity::client::backoff;
use warden_identity::service::ca_identity;
use warden_identity::tls::{client_config_with_alpn, ExpectedPeer, IdentityState};
use warden_policy::config::Loader;
use warden_proxy::source::{compile_workload, ConfigSource, SourceEvent};

use crate::proto::config_discovery_client::ConfigDiscoveryClient;
use crate::proto::{ConfigRequest, ConfigResponse};
use crate::snapshot::MESH_OVERRIDE_KEY;

/// The largest response accepted: the server's own limit.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Connecting and each first response are bounded by this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a gRPC channel to the control plane at `addr` (`host:port`), presenting the
/// workload's current certificate and requiring the CA service's identity of the bundle's
/// trust domain.
pub async fn connect(addr: &str, identity: Arc<IdentityState>) -> Result<Channel, String> {
    let td = identity.trust_bundle().trust_domain;
    let expected = ca_identity(&td).map_err(|e| e.to_string())?;
    let tls = Arc::new(client_config_with_alpn(
        identity,
        ExpectedPeer::Exact(expected),
        &[b"h2"],
    ));
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let server_name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| format!("{addr}: bad address: {e}"))?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{addr}: bad address: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let target = addr.to_string();
    let connector = tower::service_fn(move |_: Uri| {
        let (target, tls, server_name) = (target.clone(), tls.clone(), server_name.clone());
        async move {
            let tcp = TcpStream::connect(target.as_str()).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{addr}: {}", error_chain(&e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// Where the source is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamState {
    Connecting,
    /// Connected; the version ACKed last, if any.
    Connected(Option<String>),
    /// Disconnected; why, and the version still enforced.
    Disconnected(String, Option<String>),
}

/// Options of [`ControlSource::spawn`].
#[derive(Clone)]
pub struct StreamOptions {
    pub addr: String,
    pub namespace: String,
    pub workload: String,
    pub identity: Arc<IdentityState>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl StreamOptions {
    pub fn new(addr: &str, namespace: &str, workload: &str, identity: Arc<IdentityState>) -> Self {
        StreamOptions {
            addr: addr.to_string(),
            namespace: namespace.to_string(),
            workload: workload.to_string(),
            identity,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
        }
    }
}

/// A configuration source following the control plane.
pub struct ControlSource {
    events: mpsc::Receiver<SourceEvent>,
    state: watch::Receiver<StreamState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ControlSource {
    /// Starts following; the first [`SourceEvent::Config`] is the first configuration.
    pub fn spawn(opts: StreamOptions) -> ControlSource {
        let (tx, events) = mpsc::channel(4);
        let (state_tx, state) = watch::channel(StreamState::Connecting);
        let task = tokio::spawn(run(opts, tx, state_tx));
        ControlSource {
            events,
            state,
            task,
        }
    }

    /// The stream's state, for readiness and status pages.
    pub fn state(&self) -> watch::Receiver<StreamState> {
        self.state.clone()
    }
}

impl ConfigSource for ControlSource {
    async fn next(&mut self) -> Option<SourceEvent> {
        self.events.recv().await
    }
}

/// What the proxy holds: key -> (version, body).
type HeldResources = BTreeMap<String, (String, Bytes)>;

async fn run(
    opts: StreamOptions,
    events: mpsc::Sender<SourceEvent>,
    state: watch::Sender<StreamState>,
) {
    let mut held = HeldResources::new();
    let mut held_version = String::new();
    let mut failures: u32 = 0;
    let target = format!("{}/{}", opts.namespace, opts.workload);
    loop {
        let mut progressed = false;
        let result = session(
            &opts,
            &mut held,
            &mut held_version,
            &events,
            &state,
            &mut progressed,
        )
        .await;
        if events.is_closed() {
            return;
        }
        let why = match result {
            Ok(()) => "the control plane closed the stream".to_string(),
            Err(e) => e,
        };
        if progressed {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let wait = backoff(opts.backoff_initial, opts.backoff_max, failures);
        let version = (!held_version.is_empty()).then(|| held_version.clone());
        tracing::warn!(
            target: "warden::config",
            workload = %target,
            control_plane = %opts.addr,
            error = %why,
            enforcing = version.as_deref().unwrap_or("nothing yet"),
            retry_ms = wait.as_millis() as u64,
            "control plane unreachable; keeping the configuration in force"
        );
        let _ = state.send(StreamState::Disconnected(why, version));
        tokio::time::sleep(wait).await;
    }
}

async fn session(
    opts: &StreamOptions,
    held: &mut HeldResources,
    held_version: &mut String,
    events: &mpsc::Sender<SourceEvent>,
    state: &watch::Sender<StreamState>,
    progressed: &mut bool,
) -> Result<(), String> {
    let channel = connect(&opts.addr, opts.identity.clone()).await?;
    let (req_tx, req_rx) = mpsc::channel(4);
    let first = ConfigRequest {
        namespace: opts.namespace.clone(),
        workload: opts.workload.clone(),
        held: held
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect(),
        held_version: held_version.clone(),
        ..ConfigRequest::default()
    };
    req_tx
        .send(first)
        .await
        .map_err(|_| "request channel closed".to_string())?;
    // A large mesh's first sync is one message; the server allows up to 256 MiB.
    let mut stream = ConfigDiscoveryClient::new(channel)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .stream(ReceiverStream::new(req_rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let _ = state.send(StreamState::Connected(
        (!held_version.is_empty()).then(|| held_version.clone()),
    ));
    let target = (opts.namespace.clone(), opts.workload.clone());
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        };
        *progressed = true;
        let next = apply_delta(held, &resp);
        let origin = format!("control plane {} version {}", opts.addr, resp.version);
        let built = build(&next, &target, origin);
        match built {
            Ok(config) => {
                *held = next;
                *held_version = resp.version.clone();
                if events.send(SourceEvent::Config(config)).await.is_err() {
                    return Ok(());
                }
                let _ = state.send(StreamState::Connected(Some(resp.version.clone())));
                let ack = ConfigRequest {
                    response_nonce: resp.nonce.clone(),
                    ..ConfigRequest::default()
                };
                req_tx
                    .send(ack)
                    .await
                    .map_err(|_| "stream closed".to_string())?;
            }
            Err(reasons) => {
                let detail = reasons.join("\n");
                let nack = ConfigRequest {
                    response_nonce: resp.nonce.clone(),
                    error_detail: if detail.is_empty() {
                        "refused".into()
                    } else {
                        detail
                    },
                    ..ConfigRequest::default()
                };
                if events.send(SourceEvent::Refused(reasons)).await.is_err() {
                    return Ok(());
                }
                req_tx
                    .send(nack)
                    .await
                    .map_err(|_| "stream closed".to_string())?;
            }
        }
    }
}

/// `held` with a response applied (a copy: nothing changes until it builds).
fn apply_delta(held: &HeldResources, resp: &ConfigResponse) -> HeldResources {
    let mut next = held.clone();
    for k in &resp.removed {
        next.remove(k);
    }
    for r in &resp.resources {
        next.insert(r.key.clone(), (r.version.clone(), r.body.clone()));
    }
    next
}

/// Loads, validates and compiles what a proxy holds for its workload.
pub fn build(
    held: &HeldResources,
    target: &(String, String),
    origin: String,
) -> Result<warden_proxy::source::WorkloadConfig, Vec<String>> {
    let mut loader = Loader::new();
    for (key, (_, body)) in held {
        let Ok(text) = std::str::from_utf8(body) else {
            return Err(vec![format!("control-plane:{key}: not UTF-8")]);
        };
        if key == MESH_OVERRIDE_KEY {
            loader.set_mesh_text("control-plane:mesh", text);
        } else {
            loader.add_text(&format!("control-plane:{key}"), text);
        }
    }
    compile_workload(loader, target, None, origin)
}

// ---------------------------------------------------------------- fake proxy

/// One response as a [`FakeProxy`] saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub version: String,
    pub keys: Vec<String>,
    pub removed: Vec<String>,
    pub at: Instant,
    /// Whether it was NACKed.
    pub nacked: bool,
}

/// A light client of the protocol: ACKs (or NACKs, while `nack` holds a reason) every
/// response without building anything, and reports each on `received`.
pub struct FakeProxy {
    pub namespace: String,
    pub workload: String,
    pub identity: Arc<IdentityState>,
    pub nack: Arc<std::sync::Mutex<Option<String>>>,
}

impl FakeProxy {
    /// Runs one stream until it ends; `Err` says why it failed.
    pub async fn run(
        &self,
        addr: &str,
        received: mpsc::UnboundedSender<Received>,
    ) -> Result<(), String> {
        let channel = connect(addr, self.identity.clone()).await?;
        self.run_on(channel, received).await
    }

    /// [`FakeProxy::run`] over an open channel.
    pub async fn run_on(
        &self,
        channel: Channel,
        received: mpsc::UnboundedSender<Received>,
    ) -> Result<(), String> {
        let (req_tx, req_rx) = mpsc::channel(4);
        let _ = req_tx
            .send(ConfigRequest {
                namespace: self.namespace.clone(),
                workload: self.workload.clone(),
                held: HashMap::new(),
                ..ConfigRequest::default()
            })
            .await;
        let mut stream = ConfigDiscoveryClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .stream(ReceiverStream::new(req_rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
            };
            let at = Instant::now();
            let nack = self.nack.lock().ok().and_then(|n| n.clone());
            let _ = received.send(Received {
                version: resp.version.clone(),
                keys: resp.resources.iter().map(|r| r.key.clone()).collect(),
                removed: resp.removed.clone(),
                at,
                nacked: nack.is_some(),
            });
            let answer = ConfigRequest {
                response_nonce: resp.nonce,
                error_detail: nack.unwrap_or_default(),
                ..ConfigRequest::default()
            };
            if req_tx.send(answer).await.is_err() {
                return Ok(());
            }
        }
    }
}
