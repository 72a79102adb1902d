//! Flow events for `meshauth observe`.

use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use crate::clock::boottime_to_system;
use crate::error::DatapathError;
use crate::maps::names;
use crate::reason;
use crate::ringbuf::RingReader;
use crate::types::{Direction, FlowEventRaw};

/// One verdict of the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// When the packet was seen.
    pub time: SystemTime,
    /// Direction seen from the local pod.
    pub direction: Direction,
    /// The local pod's address and port.
    pub local: (IpAddr, u16),
    /// The peer's address and port.
    pub remote: (IpAddr, u16),
    /// Local identity.
    pub local_identity: u32,
    /// Remote identity.
    pub remote_identity: u32,
    /// Remote node id (0 = local).
    pub remote_node_id: u16,
    /// IP protocol number.
    pub proto: u8,
    /// True when the packet was forwarded.
    pub forwarded: bool,
    /// Reason code (see [`crate::reason`]).
    pub reason: u8,
    /// Auth type the policy required (0 = none).
    pub auth_type: u8,
    /// Packet length.
    pub len: u32,
}

impl FlowEvent {
    /// The reason's description ("Authentication required" for 189).
    pub fn reason_desc(&self) -> &'static str {
        reason::description(self.reason)
    }
}

/// Reads events from the pinned `meshauth_events` ring buffer.
#[derive(Debug)]
pub struct EventReader {
    ring: RingReader<FlowEventRaw>,
}

impl EventReader {
    /// Opens the pinned ring buffer (needs a tokio runtime).
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            ring: RingReader::open(pin_dir, names::EVENTS)?,
        })
    }

    /// Waits for events; returns every one available.
    pub async fn next_batch(&mut self) -> Result<Vec<FlowEvent>, DatapathError> {
        Ok(self
            .ring
            .next_batch()
            .await?
            .into_iter()
            .filter_map(parse)
            .collect())
    }

    /// The events available now, without waiting.
    pub fn drain_now(&mut self) -> Vec<FlowEvent> {
        self.ring
            .drain_now()
            .into_iter()
            .filter_map(parse)
            .collect()
    }
}

fn parse(r: FlowEventRaw) -> Option<FlowEvent> {
    Some(FlowEvent {
        time: boottime_to_system(r.ts),
        direction: Direction::from_raw(r.direction)?,
        local: (r.local.to_ip(r.family)?, r.local_port),
        remote: (r.remote.to_ip(r.family)?, r.remote_port),
        local_identity: r.local_id,
        remote_identity: r.remote_id,
        remote_node_id: r.remote_node_id,
        proto: r.proto,
        forwarded: r.verdict == 1,
        reason: r.reason,
        auth_type: r.auth_type,
        len: r.len,
    })
}
