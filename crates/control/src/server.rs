//! The configuration stream's server side: the snapshot in force, the connected proxies, and
//! one task per stream that sends deltas and waits for their ACK or NACK.
//!
//! A new snapshot wakes only the proxies it concerns ([`Change`]): a workload resource wakes
//! the proxies of its namespace (all of them for the root namespace), a global resource wakes
//! every proxy. A woken stream computes its own delta against what its proxy last ACKed, so
//! the work of a push grows with the proxies a change concerns. Each stream has at most one
//! response in flight; changes that arrive meanwhile are coalesced into the next one. A NACK
//! is recorded (log, status page, metrics) and the proxy's ACKed state stays what it was: the
//! next change is sent as a delta against that state.
//!
//! The gRPC route is written here around the generated trait ([`StreamRoute`]) rather than
//! served by tonic's generated server, for memory: tonic encodes a stream's responses into one
//! buffer that lives as long as the stream, so after a proxy's first response (the whole mesh,
//! about a megabyte with a thousand workloads) every open stream would pin a buffer that size
//! (a gigabyte for a thousand proxies). Here each response gets an exactly sized buffer of its
//! own, freed once sent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use hyper::body::Frame;
use prost::Message;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Codec;
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};
use warden_identity::service::{client_identity, PeerInfo};
use warden_identity::spiffe::SpiffeId;

use crate::load::Loaded;
use crate::metrics::Metrics;
use crate::proto::config_discovery_server::ConfigDiscovery;
use crate::proto::{ConfigRequest, ConfigResponse, Resource};
use crate::snapshot::{version_text, Change, Delta, Held, Snapshot};

/// How long a proxy may leave a response unread before it is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// NACK reasons longer than this are cut: they are logged, kept per proxy and in the history.
const MAX_NACK_DETAIL: usize = 4096;

/// How long a proxy has to send its first request after opening the stream.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses with more resources than this (first syncs of a large mesh) take a permit of
/// [`MAX_LARGE_IN_FLIGHT`] until ACKed, so a thousand proxies connecting at once do not each
/// hold an encoded copy of the mesh in memory (istiod's push throttle, for the same reason).
const LARGE_RESPONSE: usize = 256;
const MAX_LARGE_IN_FLIGHT: usize = 32;
/// A large response not ACKed by then gives its permit back (a stuck proxy must not stall
/// everyone's first sync); its stream still waits for the ACK.
const PERMIT_HOLD: Duration = Duration::from_secs(10);

/// The control plane's serving state, shared by the stream tasks, the watcher and the admin
/// server.
pub struct ControlPlane {
    snapshot: ArcSwapOption<Snapshot>,
    registry: Mutex<Registry>,
    status: Mutex<Status_>,
    pub metrics: Metrics,
    next_id: AtomicU64,
    large: Arc<Semaphore>,
}

#[derive(Default)]
struct Registry {
    proxies: HashMap<u64, ProxyEntry>,
    by_namespace: HashMap<String, HashSet<u64>>,
}

/// One connected proxy, as the status page shows it.
#[derive(Clone, Debug)]
pub struct ProxyEntry {
    pub namespace: String,
    pub workload: String,
    pub identity: String,
    pub peer: SocketAddr,
    pub connected: SystemTime,
    /// The last version it ACKed.
    pub acked: Option<String>,
    /// A version sent and not yet answered.
    pub pending: Option<String>,
    /// Its last NACK: version, reason, when.
    pub nack: Option<(String, String, SystemTime)>,
    /// Why nothing is sent to it (its workload is not in the configuration).
    pub waiting: Option<String>,
    /// The last generation that concerned it, and the last its stream looked at: it is
    /// settled when it has looked at every change that concerned it and has nothing in flight.
    pub woken: u64,
    pub seen: u64,
    notify: Arc<Notify>,
}

#[derive(Default)]
struct Status_ {
    accepted: Option<(u64, String, SystemTime)>,
    refused: Option<(Vec<String>, SystemTime)>,
    /// Past NACKs, newest last (bounded).
    nacks: Vec<serde_json::Value>,
    jwks: BTreeMap<String, serde_json::Value>,
}

const MAX_NACK_HISTORY: usize = 100;

impl Default for ControlPlane {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlPlane {
    pub fn new() -> Self {
        ControlPlane {
            snapshot: ArcSwapOption::empty(),
            registry: Mutex::default(),
            status: Mutex::default(),
            metrics: Metrics::new(),
            next_id: AtomicU64::new(1),
            large: Arc::new(Semaphore::new(MAX_LARGE_IN_FLIGHT)),
        }
    }

    /// The gRPC service to add to the server.
    pub fn service(self: &Arc<Self>) -> StreamRoute {
        StreamRoute {
            svc: Arc::new(Service { cp: self.clone() }),
        }
    }

    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.load_full()
    }

    /// Puts an accepted configuration in force (with the JWKS documents to inline) and wakes
    /// the proxies it concerns. Returns what changed (`None`: nothing did).
    pub fn apply(&self, loaded: &Loaded, jwks: &BTreeMap<String, String>) -> Option<Change> {
        let prev = self.snapshot.load_full();
        let snap = Snapshot::build(prev.as_deref(), loaded.config.clone(), loaded.entries(jwks));
        let change = match &prev {
            Some(p) => snap.change_from(p),
            None => Change {
                all: true,
                namespaces: HashSet::new(),
                keys: snap.resources.len(),
            },
        };
        if let Ok(mut st) = self.status.lock() {
            st.refused = None;
        }
        if prev.is_some() && change.is_empty() {
            return None;
        }
        let generation = snap.generation;
        if let Ok(mut st) = self.status.lock() {
            st.accepted = Some((generation, loaded.origin.clone(), SystemTime::now()));
        }
        self.snapshot.store(Some(Arc::new(snap)));
        self.metrics.config_generation.set(generation as i64);
        self.metrics.configs_accepted.inc();
        let woken = self.wake(&change, generation);
        tracing::info!(
            target: "warden::control",
            generation,
            origin = %loaded.origin,
            changed = change.keys,
            proxies = woken,
            "config accepted"
        );
        Some(change)
    }

    /// Records a refused configuration; the one in force stays.
    pub fn refuse(&self, reasons: Vec<String>) {
        self.metrics.configs_refused.inc();
        tracing::warn!(
            target: "warden::control",
            errors = reasons.len(),
            "config refused; the last good configuration stays in force"
        );
        for r in &reasons {
            tracing::warn!(target: "warden::control", "{r}");
        }
        if let Ok(mut st) = self.status.lock() {
            st.refused = Some((reasons, SystemTime::now()));
        }
    }

    /// Records the state of one JWKS target for the status page.
    pub fn note_jwks(&self, target: &str, state: serde_json::Value) {
        if let Ok(mut st) = self.status.lock() {
            st.jwks.insert(target.to_string(), state);
        }
    }

    fn wake(&self, change: &Change, generation: u64) -> usize {
        let Ok(mut reg) = self.registry.lock() else {
            return 0;
        };
        let mut n = 0;
        let Registry {
            proxies,
            by_namespace,
        } = &mut *reg;
        if change.all {
            for p in proxies.values_mut() {
                p.woken = generation;
                p.notify.notify_one();
                n += 1;
            }
        } else {
            for ns in &change.namespaces {
                for id in by_namespace.get(ns).into_iter().flatten() {
                    if let Some(p) = proxies.get_mut(id) {
                        p.woken = generation;
                        p.notify.notify_one();
                        n += 1;
                    }
                }
            }
        }
        self.metrics.proxies_woken.inc_by(n as u64);
        n
    }

    fn register(&self, entry: ProxyEntry) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut reg) = self.registry.lock() {
            reg.by_namespace
                .entry(entry.namespace.clone())
                .or_default()
                .insert(id);
            reg.proxies.insert(id, entry);
            self.metrics.proxies_connected.set(reg.proxies.len() as i64);
        }
        id
    }

    fn unregister(&self, id: u64) {
        if let Ok(mut reg) = self.registry.lock() {
            if let Some(p) = reg.proxies.remove(&id) {
                if let Some(set) = reg.by_namespace.get_mut(&p.namespace) {
                    set.remove(&id);
                    if set.is_empty() {
                        reg.by_namespace.remove(&p.namespace);
                    }
                }
            }
            self.metrics.proxies_connected.set(reg.proxies.len() as i64);
        }
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyEntry)) {
        if let Ok(mut reg) = self.registry.lock() {
            if let Some(p) = reg.proxies.get_mut(&id) {
                f(p);
            }
        }
    }

    /// Whether every connected proxy has been sent every change that concerns it and has
    /// answered (ACK or NACK).
    pub fn settled(&self) -> bool {
        self.registry.lock().is_ok_and(|r| {
            r.proxies
                .values()
                .all(|p| p.seen >= p.woken && p.pending.is_none())
        })
    }

    /// The connected proxies, sorted by workload.
    pub fn proxies(&self) -> Vec<ProxyEntry> {
        let mut v: Vec<ProxyEntry> = self
            .registry
            .lock()
            .map(|r| r.proxies.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| (&a.namespace, &a.workload).cmp(&(&b.namespace, &b.workload)));
        v
    }

    /// What `/status` shows.
    pub fn status_json(&self) -> serde_json::Value {
        let rfc = |t: SystemTime| warden_identity::inspect::rfc3339(t);
        let st = self.status.lock();
        let (config, refused, nacks, jwks) = match &st {
            Ok(st) => (
                st.accepted.as_ref().map(|(g, origin, at)| {
                    serde_json::json!({"version": g.to_string(), "origin": origin, "accepted": rfc(*at)})
                }),
                st.refused.as_ref().map(|(errors, at)| {
                    serde_json::json!({"errors": errors, "at": rfc(*at)})
                }),
                st.nacks.clone(),
                st.jwks.clone(),
            ),
            Err(_) => (None, None, Vec::new(), BTreeMap::new()),
        };
        drop(st);
        let proxies: Vec<serde_json::Value> = self
            .proxies()
            .iter()
            .map(|p| {
                serde_json::json!({
                    "workload": format!("{}/{}", p.namespace, p.workload),
                    "identity": p.identity,
                    "peer": p.peer.to_string(),
                    "connected": rfc(p.connected),
                    "acked": p.acked,
                    "pending": p.pending,
                    "nack": p.nack.as_ref().map(|(v, e, at)| serde_json::json!({"version": v, "error": e, "at": rfc(*at)})),
                    "waiting": p.waiting,
                })
            })
            .collect();
        serde_json::json!({
            "config": config,
            "refused": refused,
            "proxies": proxies,
            "nacks": nacks,
            "jwks": jwks,
        })
    }

    fn record_nack(&self, entry: serde_json::Value) {
        if let Ok(mut st) = self.status.lock() {
            st.nacks.push(entry);
            if st.nacks.len() > MAX_NACK_HISTORY {
                st.nacks.remove(0);
            }
        }
    }
}

/// The tonic service.
pub struct Service {
    cp: Arc<ControlPlane>,
}

#[tonic::async_trait]
impl ConfigDiscovery for Service {
    type StreamStream = ReceiverStream<Result<ConfigResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<ConfigRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::internal("no connection information"))?;
        let chain = peer.client_chain.clone().ok_or_else(|| {
            Status::unauthenticated(
                "the configuration stream needs the workload's certificate (mutual TLS)",
            )
        })?;
        let caller = client_identity(&chain, SystemTime::now()).map_err(Status::unauthenticated)?;
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Err(e)) => return Err(e),
            _ => {
                return Err(Status::invalid_argument(
                    "expected a first request naming the workload",
                ))
            }
        };
        if first.namespace.is_empty() || first.workload.is_empty() {
            return Err(Status::invalid_argument(
                "the first request must name the workload (namespace and workload)",
            ));
        }
        if caller.namespace() != first.namespace {
            let msg = format!(
                "{caller} may not receive the configuration of workload {}/{}: it is in another namespace",
                first.namespace, first.workload
            );
            tracing::warn!(target: "warden::control", peer = %peer.remote_addr, "{msg}");
            return Err(Status::permission_denied(msg));
        }
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(run_stream(
            self.cp.clone(),
            caller,
            peer.remote_addr,
            first,
            inbound,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct InFlight {
    nonce: String,
    version: String,
    then: Held,
    accepted: Instant,
    sent: Instant,
    initial: bool,
    resources: usize,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Unregisters a stream however its task ends.
struct Registered {
    cp: Arc<ControlPlane>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.cp.unregister(self.id);
    }
}

async fn run_stream(
    cp: Arc<ControlPlane>,
    caller: SpiffeId,
    peer: SocketAddr,
    first: ConfigRequest,
    mut inbound: Streaming<ConfigRequest>,
    tx: mpsc::Sender<Result<ConfigResponse, Status>>,
) {
    let (ns, name) = (first.namespace.clone(), first.workload.clone());
    let notify = Arc::new(Notify::new());
    let id = cp.register(ProxyEntry {
        namespace: ns.clone(),
        workload: name.clone(),
        identity: caller.to_string(),
        peer,
        connected: SystemTime::now(),
        acked: None,
        pending: None,
        nack: None,
        waiting: None,
        woken: cp.snapshot().map_or(0, |s| s.generation),
        seen: 0,
        notify: notify.clone(),
    });
    let _registered = Registered { cp: cp.clone(), id };
    tracing::info!(target: "warden::control", workload = %format!("{ns}/{name}"), %peer, held = first.held.len(), "proxy connected");

    // What the proxy said it holds, until its first ACK.
    let mut initial: Option<HashMap<String, u64>> = Some(
        first
            .held
            .iter()
            .filter_map(|(k, v)| u64::from_str_radix(v, 16).ok().map(|v| (k.clone(), v)))
            .collect(),
    );
    let mut acked = Held::default();
    let mut in_flight: Option<InFlight> = None;
    let mut dirty = true;
    let mut nonce_counter: u64 = 0;
    let mut waiting_logged = false;
    loop {
        if dirty && in_flight.is_none() {
            dirty = false;
            let now = cp.snapshot();
            let looked_at = now.as_ref().map(|s| s.generation);
            if let Some(snap) = now {
                match snap.config.workload(&ns, &name) {
                    None => {
                        let why = format!(
                            "workload {ns}/{name} is not in the configuration; nothing is sent until it is"
                        );
                        if !waiting_logged {
                            tracing::warn!(target: "warden::control", %peer, "{why}");
                            waiting_logged = true;
                        }
                        cp.update(id, |p| p.waiting = Some(why));
                    }
                    Some(wl) if wl.service_account != caller.service_account() => {
                        let msg = format!(
                            "{caller} may not receive the configuration of workload {ns}/{name}, which runs as service account {}",
                            wl.service_account
                        );
                        tracing::warn!(target: "warden::control", %peer, "{msg}");
                        let _ = tx.send(Err(Status::permission_denied(msg))).await;
                        return;
                    }
                    Some(wl) => {
                        waiting_logged = false;
                        cp.update(id, |p| p.waiting = None);
                        // A first sync of a large mesh is large: its permit is taken before
                        // the delta is even computed, so a thousand proxies connecting at once
                        // do not each hold one while they wait.
                        let mut permit =
                            if initial.is_some() && snap.resources.len() > LARGE_RESPONSE {
                                cp.large.clone().acquire_owned().await.ok()
                            } else {
                                None
                            };
                        let delta = match &initial {
                            Some(h) => snap.delta_from_held(wl, h),
                            None => snap.delta_since(wl, &acked),
                        };
                        if initial.is_some() || !delta.is_empty() {
                            nonce_counter += 1;
                            let version = snap.generation.to_string();
                            let resources = delta.resources.len();
                            if resources <= LARGE_RESPONSE {
                                permit = None;
                            } else if permit.is_none() {
                                permit = cp.large.clone().acquire_owned().await.ok();
                            }
                            let response = encode(&version, nonce_counter, &delta);
                            cp.metrics.pushes.inc();
                            cp.metrics.pushed_resources.inc_by(resources as u64);
                            cp.update(id, |p| p.pending = Some(version.clone()));
                            // A proxy that stops reading must not hold a permit (or this task)
                            // forever: it is disconnected, and resyncs when it comes back.
                            match tokio::time::timeout(SEND_TIMEOUT, tx.send(Ok(response))).await {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => break,
                                Err(_) => {
                                    tracing::warn!(target: "warden::control", workload = %format!("{ns}/{name}"), %peer, "the proxy does not read its responses; disconnected");
                                    break;
                                }
                            }
                            in_flight = Some(InFlight {
                                nonce: nonce_counter.to_string(),
                                version,
                                then: delta.then,
                                accepted: snap.accepted,
                                sent: Instant::now(),
                                initial: initial.is_some(),
                                resources,
                                _permit: permit,
                            });
                        }
                    }
                }
            }
            // Looked at (and anything to send is pending): settled once answered.
            if let Some(generation) = looked_at {
                cp.update(id, |p| p.seen = p.seen.max(generation));
            }
        }
        let permit_deadline = in_flight
            .as_ref()
            .filter(|f| f._permit.is_some())
            .map(|f| f.sent + PERMIT_HOLD);
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    let Some(f) = in_flight.take() else { continue };
                    if f.nonce != req.response_nonce {
                        // A stale answer; the one in flight is still awaited.
                        in_flight = Some(f);
                        continue;
                    }
                    if req.error_detail.is_empty() {
                        cp.metrics.acks.inc();
                        if !f.initial {
                            cp.metrics.push_ack_seconds.observe(f.accepted.elapsed().as_secs_f64());
                        }
                        tracing::debug!(target: "warden::control", workload = %format!("{ns}/{name}"), version = %f.version, resources = f.resources, rtt_ms = f.sent.elapsed().as_millis() as u64, "ACK");
                        acked = f.then;
                        initial = None;
                        let v = f.version.clone();
                        cp.update(id, |p| { p.acked = Some(v); p.pending = None; });
                    } else {
                        let mut detail = req.error_detail;
                        if detail.len() > MAX_NACK_DETAIL {
                            let mut cut = MAX_NACK_DETAIL;
                            while !detail.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            detail.truncate(cut);
                            detail.push_str(" …(cut)");
                        }
                        cp.metrics.nacks.inc();
                        tracing::warn!(target: "warden::control", workload = %format!("{ns}/{name}"), version = %f.version, error = %detail, "NACK: the proxy refused this version and keeps the one it has");
                        let at = SystemTime::now();
                        cp.record_nack(serde_json::json!({
                            "workload": format!("{ns}/{name}"),
                            "version": f.version,
                            "error": detail,
                            "at": warden_identity::inspect::rfc3339(at),
                        }));
                        let (v, e) = (f.version.clone(), detail.clone());
                        cp.update(id, |p| { p.nack = Some((v, e, at)); p.pending = None; });
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(target: "warden::control", workload = %format!("{ns}/{name}"), %peer, error = %e.message(), "stream error");
                    break;
                }
            },
            () = notify.notified(), if in_flight.is_none() => dirty = true,
            () = sleep_until(permit_deadline) => {
                if let Some(f) = in_flight.as_mut() {
                    f._permit = None;
                }
            }
        }
    }
    tracing::info!(target: "warden::control", workload = %format!("{ns}/{name}"), %peer, "proxy disconnected");
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Requests larger than this are refused (they carry a proxy's held versions at most).
const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Responses larger than this end the stream with an error.
const MAX_RESPONSE: usize = 256 * 1024 * 1024;
const STREAM_PATH: &str = "/warden.control.v1.ConfigDiscovery/Stream";

/// The configuration stream's gRPC route (see the module documentation for why it is not
/// tonic's generated server).
#[derive(Clone)]
pub struct StreamRoute {
    svc: Arc<Service>,
}

impl tonic::server::NamedService for StreamRoute {
    const NAME: &'static str = "warden.control.v1.ConfigDiscovery";
}

type RouteFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for StreamRoute {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> RouteFuture {
        let svc = self.svc.clone();
        Box::pin(async move {
            if req.uri().path() != STREAM_PATH {
                return Ok(
                    Status::unimplemented(format!("no method {}", req.uri().path())).into_http(),
                );
            }
            let (parts, body) = req.into_parts();
            let mut codec = tonic_prost::ProstCodec::<ConfigResponse, ConfigRequest>::default();
            let inbound = Streaming::new_request(codec.decoder(), body, None, Some(MAX_REQUEST));
            let request = Request::from_http(http::Request::from_parts(parts, inbound));
            match svc.stream(request).await {
                Ok(response) => {
                    let body = Responses {
                        rx: response.into_inner().into_inner(),
                        done: false,
                    };
                    let mut r = http::Response::new(tonic::body::Body::new(body));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    Ok(r)
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// A stream's response body: each message framed (gRPC's 5-byte prefix) in a buffer of its
/// own, then the status in trailers.
struct Responses {
    rx: mpsc::Receiver<Result<ConfigResponse, Status>>,
    done: bool,
}

impl Responses {
    fn end(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        match status.add_header(&mut trailers) {
            Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl hyper::body::Body for Responses {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(msg))) => {
                let len = msg.encoded_len();
                if len > MAX_RESPONSE {
                    return self.end(Status::out_of_range(format!(
                        "a response of {len} bytes is over the limit of {MAX_RESPONSE}"
                    )));
                }
                let mut buf = Vec::with_capacity(5 + len);
                buf.push(0);
                buf.extend_from_slice(&(len as u32).to_be_bytes());
                if let Err(e) = msg.encode(&mut buf) {
                    return self.end(Status::internal(format!("encoding a response: {e}")));
                }
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
            }
            Poll::Ready(Some(Err(status))) => self.end(status),
            Poll::Ready(None) => self.end(Status::ok("")),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

fn encode(version: &str, nonce: u64, delta: &Delta) -> ConfigResponse {
    ConfigResponse {
        version: version.to_string(),
        nonce: nonce.to_string(),
        resources: delta
            .resources
            .iter()
            .map(|(k, r)| Resource {
                key: k.to_string(),
                version: version_text(r.version),
                body: r.body.clone(),
            })
            .collect(),
        removed: delta.removed.iter().map(|k| k.to_string()).collect(),
    }
}
