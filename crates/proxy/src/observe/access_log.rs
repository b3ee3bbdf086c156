//! The JSON access log: one line per HTTP request or TCP connection, written by a dedicated
//! thread so that a slow sink (a full pipe, a slow disk) never holds up the request path.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{
    DecisionSummary, DryRunSummary, ObserveError, PolicyRef, RequestInfo, RequestProtocol, TcpInfo,
};

/// Lines that may wait for the writer before new ones are dropped (and counted).
pub const DEFAULT_ACCESS_LOG_CAPACITY: usize = 8192;

/// One access-log line. HTTP fields are absent for TCP connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessLogEntry {
    /// Start of the request or connection, RFC 3339 in UTC with milliseconds.
    pub time: String,
    /// `destination` (inbound: this proxy decided) or `source` (outbound: the app's call).
    #[serde(default)]
    pub reporter: super::Reporter,
    /// `http`, `grpc` or `tcp`.
    pub protocol: RequestProtocol,
    /// The peer's SPIFFE ID; `null` for plaintext.
    pub source_principal: Option<String>,
    /// `ip:port` of the client.
    pub source_address: String,
    /// `name.namespace`, as Istio names a workload in logs.
    pub destination_workload: String,
    pub destination_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Status sent; 0 when none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Envoy-style: `-`, or flags such as `UF,URX`.
    pub response_flags: String,
    /// `allow`, `deny`, `unauthenticated`, `reset` or `bad-request`.
    pub authz_decision: String,
    /// `namespace/name` of the deciding policy, `null` when none decided.
    pub authz_policy: Option<String>,
    /// `ALLOW`, `DENY`, `AUDIT` or `CUSTOM`.
    pub authz_action: Option<String>,
    /// Index of the deciding rule in the policy's `rules`.
    pub authz_rule: Option<u32>,
    pub authz_reason: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRunSummary>,
    /// The JWT's `iss/sub`, when a token was validated.
    pub request_principal: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
}

impl AccessLogEntry {
    pub fn for_request(req: &RequestInfo<'_>, decision: &DecisionSummary) -> Self {
        let mut e = Self::common(
            req.conn,
            req.start,
            req.protocol,
            req.response_flags.to_string(),
            decision,
            (req.bytes_received, req.bytes_sent),
            req.duration,
        );
        e.method = Some(req.method.to_string());
        e.authority = Some(req.authority.to_string());
        e.path = Some(req.path.to_string());
        e.status = Some(req.status);
        e
    }

    pub fn for_tcp(tcp: &TcpInfo<'_>, decision: &DecisionSummary) -> Self {
        Self::common(
            tcp.conn,
            tcp.start,
            RequestProtocol::Tcp,
            tcp.response_flags.to_string(),
            decision,
            (tcp.bytes_received, tcp.bytes_sent),
            tcp.duration,
        )
    }

    fn common(
        conn: &super::ConnectionInfo,
        start: SystemTime,
        protocol: RequestProtocol,
        response_flags: String,
        decision: &DecisionSummary,
        (bytes_received, bytes_sent): (u64, u64),
        duration: Duration,
    ) -> Self {
        let policy: Option<&PolicyRef> = decision.policy.as_ref();
        AccessLogEntry {
            time: rfc3339_millis(start),
            reporter: conn.reporter,
            protocol,
            source_principal: conn.source_principal.clone(),
            source_address: conn.source_addr.to_string(),
            destination_workload: format!(
                "{}.{}",
                conn.destination_workload, conn.destination_namespace
            ),
            destination_port: conn.destination_port,
            method: None,
            authority: None,
            path: None,
            status: None,
            response_flags,
            authz_decision: decision.result.to_string(),
            authz_policy: policy.map(|p| format!("{}/{}", p.namespace, p.name)),
            authz_action: policy.map(|p| p.action.clone()),
            authz_rule: policy.map(|p| p.rule),
            authz_reason: decision.reason.clone(),
            dry_run: decision.dry_run.clone(),
            request_principal: decision.request_principal.clone(),
            bytes_received,
            bytes_sent,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// RFC 3339 in UTC with millisecond precision, as Envoy's `%START_TIME%`.
fn rfc3339_millis(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    let dt = dt
        .replace_nanosecond(dt.millisecond() as u32 * 1_000_000)
        .unwrap_or(dt);
    dt.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

enum Msg {
    Line(String),
    Flush(SyncSender<()>),
}

/// A JSON-lines access log. [`AccessLog::log`] serializes on the caller's thread and hands the
/// line to a writer thread through a bounded queue; it never waits for I/O. When the queue is
/// full the line is dropped and counted (`warden_access_log_dropped_total`) rather than
/// slowing traffic down.
pub struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("dropped", &self.dropped.get())
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Starts the writer thread for `sink` (stdout, a file, a pipe) with room for `capacity`
    /// pending lines. The thread ends once the `AccessLog` is dropped and its queue drained.
    pub fn new<W: Write + Send + 'static>(sink: W, capacity: usize) -> Result<Self, ObserveError> {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        std::thread::Builder::new()
            .name("warden-access-log".into())
            .spawn(move || writer(sink, rx))
            .map_err(ObserveError::Writer)?;
        Ok(AccessLog {
            tx,
            dropped: Counter::default(),
        })
    }

    /// Queues one entry as a JSON line.
    pub fn log(&self, entry: &AccessLogEntry) {
        match serde_json::to_string(entry) {
            Ok(line) => self.send_line(line),
            Err(e) => {
                // Cannot happen for this struct; counted rather than panicking on the hot path.
                self.dropped.inc();
                tracing::warn!(error = %e, "access-log entry cannot be serialized");
            }
        }
    }

    fn send_line(&self, line: String) {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }

    /// Lines dropped because the writer fell behind or failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    pub(crate) fn dropped_counter(&self) -> Counter {
        self.dropped.clone()
    }

    /// Waits (at most `limit`) until every line queued before this call is written and the
    /// sink flushed. For shutdown and tests; returns whether it finished in time.
    pub fn flush(&self, limit: Duration) -> bool {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + limit;
        let mut msg = Msg::Flush(ack_tx);
        // The queue may be full: retry until there is room or time is up.
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::yield_now();
                }
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        matches!(ack_rx.recv_timeout(left), Ok(()))
    }
}

fn writer<W: Write>(mut sink: W, rx: Receiver<Msg>) {
    let mut failed = false;
    loop {
        // Flush only when the queue is empty, so bursts become few writes.
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(TryRecvError::Empty) => {
                if let Err(e) = sink.flush() {
                    report(&mut failed, &e);
                }
                match rx.recv_timeout(Duration::from_secs(3600)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            Err(TryRecvError::Disconnected) => {
                let _ = sink.flush();
                return;
            }
        };
        match msg {
            Msg::Line(mut line) => {
                line.push('\n');
                if let Err(e) = sink.write_all(line.as_bytes()) {
                    report(&mut failed, &e);
                }
            }
            Msg::Flush(ack) => {
                if let Err(e) = sink.flush() {
                    report(&mut failed, &e);
                }
                let _ = ack.try_send(());
            }
        }
    }
}

/// Logs the first write error only: a broken sink must not flood the log with one warning
/// per request.
fn report(failed: &mut bool, e: &std::io::Error) {
    if !*failed {
        *failed = true;
        tracing::warn!(error = %e, "access log cannot be written; further errors are not reported");
    }
}
