//! Prometheus metrics of the API server (docs/metrics.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;
use vmm_glue::manager::{Manager, Pause};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Debug)]
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    ops: Family<OpLabels, Histogram>,
    pauses: Family<OpLabels, Counter>,
    sprites: Family<StateLabels, Gauge>,
    registry: Registry,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 14))
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let ops = Family::<OpLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let pauses = Family::<OpLabels, Counter>::default();
        let sprites = Family::<StateLabels, Gauge>::default();
        let mut registry = Registry::default();
        registry.register(
            "sprites_api_requests",
            "API requests by route, method and status",
            requests.clone(),
        );
        registry.register(
            "sprites_api_request_duration_seconds",
            "API request latency by route (until the response starts)",
            latency.clone(),
        );
        registry.register(
            "sprites_operation_duration_seconds",
            "Latency of sprite operations: create, checkpoint, restore, fork (through the API); warm_wake, cold_wake (every wake, whatever caused it)",
            ops.clone(),
        );
        registry.register(
            "sprites_pauses",
            "Pauses requested through the API, by mode",
            pauses.clone(),
        );
        registry.register(
            "sprites_by_state",
            "Sprites on this host by state (warm/cold hibernation split)",
            sprites.clone(),
        );
        ApiMetrics {
            requests,
            latency,
            ops,
            pauses,
            sprites,
            registry,
        }
    }
}

impl ApiMetrics {
    pub fn request(&self, route: &str, method: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.into(),
                method: method.into(),
                status: status.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn op(&self, op: &str, took: Duration) {
        self.ops
            .get_or_create(&OpLabels { op: op.into() })
            .observe(took.as_secs_f64());
    }

    pub fn pause(&self, mode: Pause) {
        let op = match mode {
            Pause::Warm => "warm",
            Pause::Cold => "cold",
        };
        self.pauses.get_or_create(&OpLabels { op: op.into() }).inc();
    }

    /// The text exposition, with the sprite-state gauges refreshed from the manager.
    pub fn encode(&self, m: &Manager) -> String {
        let mut counts: std::collections::BTreeMap<String, i64> = [
            "pending",
            "active",
            "hibernating",
            "hibernated_warm",
            "hibernated_cold",
            "waking",
            "error",
        ]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
        for v in m.list() {
            let st = serde_json::to_value(v.record.state)
                .ok()
                .and_then(|s| s.as_str().map(str::to_string))
                .unwrap_or_default();
            let key = match v.record.pause {
                Some(Pause::Warm) if st == "hibernated" => "hibernated_warm".to_string(),
                Some(Pause::Cold) if st == "hibernated" => "hibernated_cold".to_string(),
                _ => st,
            };
            *counts.entry(key).or_default() += 1;
        }
        for (k, n) in counts {
            self.sprites.get_or_create(&StateLabels { state: k }).set(n);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
