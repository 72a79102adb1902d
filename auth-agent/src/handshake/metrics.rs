//! Handshake metrics, registered under `meshauth_handshake_*` (the caller
//! passes `registry.sub_registry_with_prefix("handshake")`).

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which side of the handshake this agent played (label values
/// `initiator` / `responder`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side that dialled (client).
    Initiator,
    /// The side that accepted (server).
    Responder,
}

impl EncodeLabelValue for Role {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Self::Initiator => "initiator",
            Self::Responder => "responder",
        })
    }
}

/// Which connection limit closed a connection unserved (label values
/// `per_source` / `global`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The source address already held its share of connections.
    PerSource,
    /// The responder already ran its global number of handshakes.
    Global,
}

impl EncodeLabelValue for Limit {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Self::PerSource => "per_source",
            Self::Global => "global",
        })
    }
}

/// Labels of `connections_refused_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    /// The limit that was reached.
    pub limit: Limit,
}

/// Labels of `handshakes_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    /// Initiator or responder.
    pub role: Role,
    /// `ok`, or the failed check's label ([`super::HandshakeError::label`]).
    pub result: &'static str,
}

/// Labels of the per-role metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RoleLabels {
    /// Initiator or responder.
    pub role: Role,
}

fn duration_histogram() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// The handshake subsystem's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Handshakes finished, by role and result.
    pub handshakes: Family<ResultLabels, Counter>,
    /// Handshake duration in seconds (TCP accept/connect to the end of the message exchange).
    pub duration: Family<RoleLabels, Histogram, fn() -> Histogram>,
    /// Handshakes in flight.
    pub in_flight: Family<RoleLabels, Gauge>,
    /// Connections closed unserved because a connection limit was reached,
    /// by limit (`per_source`, `global`).
    pub refused_connections: Family<LimitLabels, Counter>,
    /// TCP connections the responder accepted (served or closed unserved).
    pub accepted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            handshakes: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            in_flight: Family::default(),
            refused_connections: Family::default(),
            accepted: Counter::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` (already prefixed).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "handshakes",
            "meshauth/1 handshakes finished, by role and result (ok or the failed check)",
            m.handshakes.clone(),
        );
        registry.register(
            "duration_seconds",
            "meshauth/1 handshake duration, from TCP connect/accept to the end of the message exchange",
            m.duration.clone(),
        );
        registry.register(
            "in_flight",
            "meshauth/1 handshakes in progress",
            m.in_flight.clone(),
        );
        registry.register(
            "connections_refused",
            "connections the responder closed unserved because a limit was reached: per_source (connections from one address) or global (handshakes at once)",
            m.refused_connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "TCP connections the responder accepted, served or closed unserved",
            m.accepted.clone(),
        );
        m
    }

    /// Counts one finished handshake.
    pub fn record(&self, role: Role, result: &'static str, took: Duration) {
        self.handshakes
            .get_or_create(&ResultLabels { role, result })
            .inc();
        self.duration
            .get_or_create(&RoleLabels { role })
            .observe(took.as_secs_f64());
    }

    /// How many handshakes ended with `result` in `role` (for tests and status).
    pub fn count(&self, role: Role, result: &'static str) -> u64 {
        self.handshakes
            .get_or_create(&ResultLabels { role, result })
            .get()
    }

    /// How many connections `limit` closed unserved (for tests and status).
    pub fn refused(&self, limit: Limit) -> u64 {
        self.refused_connections
            .get_or_create(&LimitLabels { limit })
            .get()
    }

    /// Marks a handshake in flight until the guard drops.
    pub fn in_flight(&self, role: Role) -> InFlight {
        let gauge = self.in_flight.get_or_create(&RoleLabels { role }).clone();
        gauge.inc();
        InFlight(gauge)
    }
}

/// Decrements the in-flight gauge on drop.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
