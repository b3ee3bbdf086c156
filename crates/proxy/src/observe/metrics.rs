//! Prometheus metrics with Istio's standard names and labels, reported by the destination
//! (inbound, `reporter="destination"`) and by the source (outbound, `reporter="source"`), plus
//! Warden's per-policy authorization counters (inbound decisions only).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{
    ConnectionInfo, DecisionSummary, Reporter, RequestInfo, RequestProtocol, TcpInfo, UNKNOWN,
};

/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const ISTIO_DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: &'static str,
    source_principal: String,
    source_workload: String,
    source_workload_namespace: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    request_protocol: &'static str,
    response_code: u16,
    response_flags: String,
    connection_security_policy: &'static str,
}

/// Istio's TCP metrics carry the same labels less `response_code`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_principal: String,
    source_workload: String,
    source_workload_namespace: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    request_protocol: &'static str,
    response_flags: String,
    connection_security_policy: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy_namespace: String,
    policy_name: String,
    action: String,
    result: String,
}

/// The metric families, registered once; cheap to update from many threads.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    decisions: Family<PolicyLabels, Counter>,
    dry_run: Family<PolicyLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(ISTIO_DURATION_BUCKETS_MS)
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_access_log_dropped(None)
    }

    pub(crate) fn with_access_log_dropped(dropped: Option<Counter>) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let decisions = Family::<PolicyLabels, Counter>::default();
        let dry_run = Family::<PolicyLabels, Counter>::default();
        // Counters get `_total` appended by the encoder, so they are registered without it.
        registry.register(
            "istio_requests",
            "Requests handled, as Istio counts them",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            duration.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client on TCP connections",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client on TCP connections",
            tcp_received.clone(),
        );
        registry.register(
            "warden_authz_decisions",
            "Authorization decisions by deciding policy",
            decisions.clone(),
        );
        registry.register(
            "warden_authz_dry_run",
            "What dry-run policies would have decided",
            dry_run.clone(),
        );
        if let Some(dropped) = dropped {
            registry.register(
                "warden_access_log_dropped",
                "Access-log lines dropped because the writer fell behind",
                dropped,
            );
        }
        Metrics {
            registry,
            requests,
            duration,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            decisions,
            dry_run,
        }
    }

    pub(crate) fn record_request(&self, req: &RequestInfo<'_>, decision: &DecisionSummary) {
        let c = req.conn;
        let labels = RequestLabels {
            reporter: c.reporter.as_str(),
            source_principal: principal(c.source_principal.as_deref()),
            source_workload: c.source_workload.as_deref().unwrap_or(UNKNOWN).to_string(),
            source_workload_namespace: c.source_namespace().unwrap_or(UNKNOWN).to_string(),
            destination_workload: c.destination_workload.clone(),
            destination_workload_namespace: c.destination_namespace.clone(),
            destination_principal: principal(c.destination_principal.as_deref()),
            request_protocol: req.protocol.as_str(),
            response_code: req.status,
            response_flags: req.response_flags.to_string(),
            connection_security_policy: security_policy(c),
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(req.duration.as_secs_f64() * 1000.0);
        if c.reporter == Reporter::Destination {
            self.record_decision(decision);
        }
    }

    pub(crate) fn record_tcp_open(&self, conn: &ConnectionInfo) {
        self.tcp_opened
            .get_or_create(&tcp_labels(conn, "-".to_string()))
            .inc();
    }

    pub(crate) fn record_tcp_close(&self, tcp: &TcpInfo<'_>, decision: &DecisionSummary) {
        let labels = tcp_labels(tcp.conn, tcp.response_flags.to_string());
        self.tcp_closed.get_or_create(&labels).inc();
        self.tcp_sent.get_or_create(&labels).inc_by(tcp.bytes_sent);
        self.tcp_received
            .get_or_create(&labels)
            .inc_by(tcp.bytes_received);
        if tcp.conn.reporter == Reporter::Destination {
            self.record_decision(decision);
        }
    }

    fn record_decision(&self, decision: &DecisionSummary) {
        let labels = match &decision.policy {
            Some(p) => PolicyLabels {
                policy_namespace: p.namespace.clone(),
                policy_name: p.name.clone(),
                action: p.action.clone(),
                result: decision.result.to_string(),
            },
            // No policy decided (none applies, or no ALLOW rule matched): still counted, so
            // the counter's total is the number of decisions.
            None => PolicyLabels {
                policy_namespace: "-".into(),
                policy_name: "-".into(),
                action: "-".into(),
                result: decision.result.to_string(),
            },
        };
        self.decisions.get_or_create(&labels).inc();
        for d in &decision.dry_run {
            let (ns, name) = match &d.policy {
                Some(p) => (p.namespace.clone(), p.name.clone()),
                None => ("-".into(), "-".into()),
            };
            self.dry_run
                .get_or_create(&PolicyLabels {
                    policy_namespace: ns,
                    policy_name: name,
                    action: d.action.clone(),
                    result: d.result.clone(),
                })
                .inc();
        }
    }

    /// The metrics in the OpenMetrics text format (which Prometheus scrapes natively).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn principal(p: Option<&str>) -> String {
    p.unwrap_or(UNKNOWN).to_string()
}

fn security_policy(c: &ConnectionInfo) -> &'static str {
    // Istio's client sidecars report `unknown`: the policy is the server's to state.
    if c.reporter == Reporter::Source {
        "unknown"
    } else if c.mtls {
        "mutual_tls"
    } else {
        "none"
    }
}

fn tcp_labels(c: &ConnectionInfo, response_flags: String) -> TcpLabels {
    TcpLabels {
        reporter: c.reporter.as_str(),
        source_principal: principal(c.source_principal.as_deref()),
        source_workload: c.source_workload.as_deref().unwrap_or(UNKNOWN).to_string(),
        source_workload_namespace: c.source_namespace().unwrap_or(UNKNOWN).to_string(),
        destination_workload: c.destination_workload.clone(),
        destination_workload_namespace: c.destination_namespace.clone(),
        destination_principal: principal(c.destination_principal.as_deref()),
        request_protocol: RequestProtocol::Tcp.as_str(),
        response_flags,
        connection_security_policy: security_policy(c),
    }
}
