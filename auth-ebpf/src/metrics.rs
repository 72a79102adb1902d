//! Packet and byte counters by (reason, direction), summed over CPUs.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};

use crate::error::DatapathError;
use crate::maps::{names, open_pinned};
use crate::types::{Direction, METRICS_SLOTS, MetricsValue, metrics_slot};

/// One counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Counter {
    /// Reason code (see [`crate::reason`]).
    pub reason: u8,
    /// Direction.
    pub direction: Direction,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Reads the pinned `meshauth_metrics` map.
pub struct MetricsReader {
    map: PerCpuArray<MapData, MetricsValue>,
}

impl std::fmt::Debug for MetricsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsReader").finish_non_exhaustive()
    }
}

impl MetricsReader {
    /// Opens the pinned map.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = open_pinned(pin_dir, names::METRICS)?;
        let map = PerCpuArray::try_from(Map::PerCpuArray(data))
            .map_err(DatapathError::map(names::METRICS))?;
        Ok(Self { map })
    }

    /// Every non-zero counter, summed over CPUs, sorted by reason and
    /// direction.
    pub fn read(&self) -> Result<Vec<Counter>, DatapathError> {
        let mut out = Vec::new();
        for reason in 0..=u8::MAX {
            for direction in [Direction::Ingress, Direction::Egress] {
                let slot = metrics_slot(reason, direction);
                debug_assert!(slot < METRICS_SLOTS);
                let per_cpu = self
                    .map
                    .get(&slot, 0)
                    .map_err(DatapathError::map(names::METRICS))?;
                let (packets, bytes) = per_cpu
                    .iter()
                    .fold((0u64, 0u64), |(p, b), v| (p + v.packets, b + v.bytes));
                if packets > 0 {
                    out.push(Counter {
                        reason,
                        direction,
                        packets,
                        bytes,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Packets counted for one reason and direction.
    pub fn packets(&self, reason: u8, direction: Direction) -> Result<u64, DatapathError> {
        Ok(self
            .read()?
            .iter()
            .find(|c| c.reason == reason && c.direction == direction)
            .map_or(0, |c| c.packets))
    }
}
