//! The control plane's Prometheus metrics (names after istiod's `pilot_xds_*` where one
//! exists): connected proxies, pushes, ACKs and NACKs, configurations accepted and refused,
//! and the time from a configuration being accepted to each concerned proxy's ACK.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    pub proxies_connected: Gauge,
    pub config_generation: Gauge,
    pub configs_accepted: Counter,
    pub configs_refused: Counter,
    pub proxies_woken: Counter,
    pub pushes: Counter,
    pub pushed_resources: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub push_ack_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            proxies_connected: Gauge::default(),
            config_generation: Gauge::default(),
            configs_accepted: Counter::default(),
            configs_refused: Counter::default(),
            proxies_woken: Counter::default(),
            pushes: Counter::default(),
            pushed_resources: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            push_ack_seconds: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            registry: Registry::default(),
        };
        registry.register(
            "warden_control_proxies_connected",
            "Proxies with an open configuration stream",
            m.proxies_connected.clone(),
        );
        registry.register(
            "warden_control_config_generation",
            "Generation of the configuration in force",
            m.config_generation.clone(),
        );
        registry.register(
            "warden_control_configs_accepted",
            "Configurations accepted",
            m.configs_accepted.clone(),
        );
        registry.register(
            "warden_control_configs_refused",
            "Configurations refused (the last good one stayed in force)",
            m.configs_refused.clone(),
        );
        registry.register(
            "warden_control_proxies_woken",
            "Proxy streams woken by configuration changes",
            m.proxies_woken.clone(),
        );
        registry.register(
            "warden_control_pushes",
            "Responses sent to proxies",
            m.pushes.clone(),
        );
        registry.register(
            "warden_control_pushed_resources",
            "Resources sent to proxies",
            m.pushed_resources.clone(),
        );
        registry.register("warden_control_acks", "Responses ACKed", m.acks.clone());
        registry.register("warden_control_nacks", "Responses NACKed", m.nacks.clone());
        registry.register(
            "warden_control_push_ack_seconds",
            "From a configuration being accepted to a concerned proxy's ACK",
            m.push_ack_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
