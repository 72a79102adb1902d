//! Metrics read at scrape time from the datapath and the SVID cache
//! (`meshauth_drops_total`, `meshauth_auth_map_*`,
//! `meshauth_svid_expiration_timestamp_seconds`, `meshauth_spire_*`, …).
//! The handshake and auth-manager metrics register themselves elsewhere.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use auth_ebpf::maps::auth::AuthMap;
use auth_ebpf::metrics::MetricsReader;
use auth_ebpf::reason;
use auth_ebpf::types::Direction;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use svid_cache::{SourceState, SourceStatus, SvidCache};
use tokio::sync::watch;

use super::Readiness;
use crate::nodes::NodeTable;

/// The scrape-time collector.
#[derive(Debug)]
pub struct AgentCollector {
    pub(crate) pin_dir: PathBuf,
    pub(crate) cache: SvidCache,
    pub(crate) source: watch::Receiver<SourceStatus>,
    pub(crate) nodes: NodeTable,
    pub(crate) ready: Arc<Readiness>,
    pub(crate) status_leader: Option<watch::Receiver<bool>>,
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn dir(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Datapath verdicts.
        if let Ok(counters) = MetricsReader::open(&self.pin_dir).and_then(|m| m.read()) {
            let pkts = ConstCounter::new(0u64);
            let mut fam = enc.encode_descriptor(
                "datapath_packets",
                "Packets the datapath judged, by verdict, reason and direction",
                None,
                pkts.metric_type(),
            )?;
            for c in counters.iter().filter(|c| !reason::is_event(c.reason)) {
                let verdict = if reason::is_drop(c.reason) {
                    "dropped"
                } else {
                    "forwarded"
                };
                let labels = [
                    ("verdict", verdict),
                    ("reason", reason::label(c.reason)),
                    ("direction", dir(c.direction)),
                ];
                ConstCounter::new(c.packets).encode(fam.encode_family(&labels)?)?;
            }
            let mut fam = enc.encode_descriptor(
                "datapath_signals",
                "What became of auth-required signals in the datapath: sent, rate_limited (one for the pair went out within the interval) or lost (ring buffer full)",
                None,
                pkts.metric_type(),
            )?;
            for (code, outcome) in [
                (reason::EVENT_SIGNAL_SENT, "sent"),
                (reason::EVENT_SIGNAL_RATE_LIMITED, "rate_limited"),
                (reason::EVENT_SIGNAL_LOST, "lost"),
            ] {
                for d in [Direction::Ingress, Direction::Egress] {
                    let n = counters
                        .iter()
                        .find(|c| c.reason == code && c.direction == d)
                        .map_or(0, |c| c.packets);
                    let labels = [("outcome", outcome), ("direction", dir(d))];
                    ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
                }
            }
            let mut fam = enc.encode_descriptor(
                "drops",
                "Packets dropped, by reason and direction",
                None,
                pkts.metric_type(),
            )?;
            for c in counters.iter().filter(|c| reason::is_drop(c.reason)) {
                let labels = [
                    ("reason", reason::label(c.reason)),
                    ("direction", dir(c.direction)),
                ];
                ConstCounter::new(c.packets).encode(fam.encode_family(&labels)?)?;
            }
        }
        // Auth map usage.
        if let Ok(map) = AuthMap::open(&self.pin_dir) {
            let entries = map.raw_entries().map(|e| e.len()).unwrap_or(0) as i64;
            let cap = i64::from(map.capacity());
            let g = ConstGauge::new(entries);
            g.encode(enc.encode_descriptor(
                "auth_map_entries",
                "Entries in the datapath's auth map",
                None,
                g.metric_type(),
            )?)?;
            let g = ConstGauge::new(cap);
            g.encode(enc.encode_descriptor(
                "auth_map_capacity",
                "Capacity of the datapath's auth map",
                None,
                g.metric_type(),
            )?)?;
            let g = ConstGauge::new(if cap > 0 {
                entries as f64 / cap as f64
            } else {
                0.0
            });
            g.encode(enc.encode_descriptor(
                "auth_map_pressure",
                "Auth map fill ratio (entries / capacity)",
                None,
                g.metric_type(),
            )?)?;
        }
        // SVIDs.
        let g = ConstGauge::new(0.0f64);
        let mut fam = enc.encode_descriptor(
            "svid_expiration_timestamp_seconds",
            "NotAfter of the SVID held for each identity",
            None,
            g.metric_type(),
        )?;
        for id in self.cache.identities() {
            if let Some(svid) = self.cache.get(id) {
                let labels = [("identity", id.to_string())];
                ConstGauge::new(secs(svid.not_after())).encode(fam.encode_family(&labels)?)?;
            }
        }
        let status = self.source.borrow().clone();
        let mut fam = enc.encode_descriptor(
            "spire_source_state",
            "The SPIRE source's state (1 for the current one)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for state in ["connecting", "connected", "disconnected"] {
            let now = match status.state {
                SourceState::Connecting => "connecting",
                SourceState::Connected { .. } => "connected",
                SourceState::Disconnected { .. } => "disconnected",
            };
            let labels = [("state", state)];
            ConstGauge::new(i64::from(now == state)).encode(fam.encode_family(&labels)?)?;
        }
        let c = ConstCounter::new(status.reconnects);
        c.encode(enc.encode_descriptor(
            "spire_reconnects",
            "Streams to SPIRE reopened after the first",
            None,
            c.metric_type(),
        )?)?;
        let c = ConstCounter::new(status.updates_rejected);
        c.encode(enc.encode_descriptor(
            "spire_updates_rejected",
            "SPIRE messages rejected (malformed or refused)",
            None,
            c.metric_type(),
        )?)?;
        let g = ConstGauge::new(self.cache.len() as i64);
        g.encode(enc.encode_descriptor("svids", "SVIDs held", None, g.metric_type())?)?;
        let g = ConstGauge::new(auth_ebpf::clock::wall_clock_step());
        g.encode(enc.encode_descriptor(
            "wall_clock_step_seconds",
            "How far the system clock is ahead of the agent's (negative: behind): steps taken since the agent started, which the agent does not follow",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(
            super::backend::overdue(&self.cache, auth_ebpf::clock::agent_now()) as i64,
        );
        g.encode(enc.encode_descriptor(
            "svids_rotation_overdue",
            "SVIDs past 3/4 of their lifetime and not rotated (SPIRE server unreachable?)",
            None,
            g.metric_type(),
        )?)?;
        let c = ConstCounter::new(self.nodes.write_failures());
        c.encode(enc.encode_descriptor(
            "node_table_write_failures",
            "Failed writes of the node table state file (retried at the next change)",
            None,
            c.metric_type(),
        )?)?;
        let g = ConstGauge::new(self.nodes.ids().len().saturating_sub(1) as i64);
        g.encode(enc.encode_descriptor(
            "peer_nodes",
            "Other nodes in the node table",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(i64::from(self.ready.get().all()));
        g.encode(enc.encode_descriptor(
            "ready",
            "1 when the datapath is attached, SPIRE answered and policy is synced",
            None,
            g.metric_type(),
        )?)?;
        if let Some(l) = &self.status_leader {
            let g = ConstGauge::new(i64::from(*l.borrow()));
            g.encode(enc.encode_descriptor(
                "policy_status_leader",
                "1 while this agent holds the policy status Lease and writes policy status",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}
