//! The auth manager's metrics (`meshauth_auth_*` when registered under
//! `auth`): handshakes it initiated, datapath signals, removed entries, and
//! the entries and handshakes it holds now.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// The manager's metrics (`meshauth_auth_*` when registered under `auth`).
#[derive(Debug, Clone, Default)]
pub struct ManagerMetrics {
    handshakes: Family<ResultLabel, Counter>,
    signals: Family<OutcomeLabel, Counter>,
    removed: Family<ReasonLabel, Counter>,
    store_failures: Family<ReasonLabel, Counter>,
    entries: Gauge,
    in_flight: Gauge,
}

impl ManagerMetrics {
    /// Registers the metrics under `registry` (use a prefixed sub-registry).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "handshakes_initiated",
            "Handshakes this node initiated, by result (ok or the failed check)",
            m.handshakes.clone(),
        );
        registry.register(
            "signals",
            "Auth-required signals from the datapath, by outcome",
            m.signals.clone(),
        );
        registry.register(
            "entries_removed",
            "Auth entries removed, by reason",
            m.removed.clone(),
        );
        registry.register(
            "entry_writes_failed",
            "Authenticated pairs that could not be written to the auth map, by reason (full: no room; error)",
            m.store_failures.clone(),
        );
        registry.register(
            "entries",
            "Auth entries this agent holds",
            m.entries.clone(),
        );
        registry.register(
            "handshakes_in_flight",
            "Handshakes in flight",
            m.in_flight.clone(),
        );
        m
    }

    /// Handshakes counted with `result` so far.
    pub fn handshakes(&self, result: &str) -> u64 {
        self.handshakes
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .get()
    }

    /// Signals counted with `outcome` so far.
    pub fn signals(&self, outcome: &str) -> u64 {
        self.signals
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .get()
    }

    /// Entries removed for `reason` so far.
    pub fn removed(&self, reason: &str) -> u64 {
        self.removed
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .get()
    }

    /// Counts a handshake that ended with `result` (`"ok"` or the failed check).
    pub(super) fn handshake(&self, result: &str) {
        self.handshakes
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Counts a signal with `outcome`.
    pub(super) fn signal(&self, outcome: &str) {
        self.signals
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts an entry removed for `reason`.
    pub(super) fn remove(&self, reason: &str) {
        self.removed
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Sets the number of entries held.
    pub(super) fn store_failure(&self, reason: &str) {
        self.store_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Failed auth entry writes counted with `reason` so far.
    pub fn store_failures(&self, reason: &str) -> u64 {
        self.store_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .get()
    }

    pub(super) fn set_entries(&self, n: usize) {
        self.entries.set(n as i64);
    }

    /// Sets the number of handshakes in flight.
    pub(super) fn set_in_flight(&self, n: usize) {
        self.in_flight.set(n as i64);
    }
}
