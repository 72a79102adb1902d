//! The datapath configuration: enforce or audit, signal rate, event mask.

use std::path::Path;
use std::time::Duration;

use aya::maps::{Array, Map, MapData};

use super::{names, open_pinned};
use crate::error::DatapathError;
use crate::types::ConfigValue;

/// Enforce drops; audit only reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Drop flows that need authentication and have none.
    #[default]
    Enforce,
    /// Let them pass, count them and report them.
    Audit,
}

/// Which verdicts produce flow events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventMask {
    /// Drops (always wanted by `meshauth observe`).
    pub drops: bool,
    /// Forwarded packets (costly; off by default).
    pub passes: bool,
    /// Would-be drops in audit mode.
    pub audit: bool,
}

impl Default for EventMask {
    fn default() -> Self {
        Self {
            drops: true,
            passes: false,
            audit: true,
        }
    }
}

impl EventMask {
    fn bits(self) -> u32 {
        u32::from(self.drops) | u32::from(self.passes) << 1 | u32::from(self.audit) << 2
    }

    fn from_bits(b: u32) -> Self {
        Self {
            drops: b & 1 != 0,
            passes: b & 2 != 0,
            audit: b & 4 != 0,
        }
    }
}

/// The datapath's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Enforce or audit.
    pub mode: Mode,
    /// Minimum time between two signals for one auth key.
    pub signal_interval: Duration,
    /// Which verdicts produce flow events.
    pub events: EventMask,
    /// Cache verdicts per socket (the fast path for established flows).
    pub socket_cache: bool,
    /// Strict: drop traffic of pod addresses the ipcache does not know yet
    /// (133 "Policy denied") instead of passing it unenforced.
    pub drop_unknown_local: bool,
    /// Check on egress that the source address belongs to the sending pod
    /// (the endpoints map); drop a mismatch with 132 "Invalid source ip".
    pub check_source: bool,
    /// At most one flow event per flow and reason per interval (zero: one
    /// per packet).
    pub event_interval: Duration,
    /// At most this many flow events per CPU per second (0: no limit).
    pub event_budget: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Enforce,
            signal_interval: Duration::from_secs(1),
            events: EventMask::default(),
            socket_cache: true,
            drop_unknown_local: false,
            check_source: false,
            event_interval: Duration::from_secs(1),
            event_budget: 1000,
        }
    }
}

const CONFIG_F_NO_SKCACHE: u32 = 1;
const CONFIG_F_DROP_UNKNOWN_LOCAL: u32 = 1 << 1;
const CONFIG_F_CHECK_SOURCE: u32 = 1 << 2;

/// Typed handle on `meshauth_config`.
pub struct ConfigMap {
    map: Array<MapData, ConfigValue>,
}

impl std::fmt::Debug for ConfigMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMap").finish_non_exhaustive()
    }
}

impl ConfigMap {
    /// Opens the pinned config map under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = open_pinned(pin_dir, names::CONFIG)?;
        let map = Array::try_from(Map::Array(data)).map_err(DatapathError::map(names::CONFIG))?;
        Ok(Self { map })
    }

    /// The value as stored.
    fn read(&self) -> Result<ConfigValue, DatapathError> {
        self.map
            .get(&0, 0)
            .map_err(DatapathError::map(names::CONFIG))
    }

    /// Rewrites the stored value with `change` applied and the generation
    /// bumped (whatever changed may turn passes into drops); returns the new
    /// generation.
    fn bump_with(&mut self, change: impl FnOnce(&mut ConfigValue)) -> Result<u32, DatapathError> {
        let mut v = self.read()?;
        change(&mut v);
        v.generation = v.generation.wrapping_add(1);
        self.map
            .set(0, v, 0)
            .map_err(DatapathError::map(names::CONFIG))?;
        Ok(v.generation)
    }

    /// Writes the configuration; the datapath uses it from its next packet.
    /// Bumps the generation (a mode change may turn passes into drops).
    pub fn set(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let interval = cfg
            .signal_interval
            .as_nanos()
            .clamp(1, u128::from(u64::MAX)) as u64;
        let generation = self.read()?.generation.wrapping_add(1);
        let value = ConfigValue {
            generation,
            flags: if cfg.socket_cache {
                0
            } else {
                CONFIG_F_NO_SKCACHE
            } | if cfg.drop_unknown_local {
                CONFIG_F_DROP_UNKNOWN_LOCAL
            } else {
                0
            } | if cfg.check_source {
                CONFIG_F_CHECK_SOURCE
            } else {
                0
            },
            mode: match cfg.mode {
                Mode::Enforce => 0,
                Mode::Audit => 1,
            },
            event_mask: cfg.events.bits(),
            signal_interval_ns: interval,
            event_interval_ns: cfg.event_interval.as_nanos().min(u128::from(u64::MAX)) as u64,
            event_budget: cfg.event_budget,
            pad: 0,
            suspended_ns: crate::clock::suspended_ns(),
        };
        self.map
            .set(0, value, 0)
            .map_err(DatapathError::map(names::CONFIG))
    }

    /// Invalidates every verdict the datapath cached per socket: called after
    /// any map change that could turn a pass into a drop.
    pub fn bump_generation(&mut self) -> Result<u32, DatapathError> {
        self.bump_with(|_| {})
    }

    /// After a resume: writes how long the machine has now been suspended
    /// (`suspended_ns`, see [`crate::clock::suspended_ns`]) and bumps the
    /// generation, in one write, so neither the datapath's coarse clock nor
    /// a socket-cached deadline keeps the time before the suspend. Returns
    /// the new generation.
    pub fn resumed(&mut self, suspended_ns: u64) -> Result<u32, DatapathError> {
        self.bump_with(|v| v.suspended_ns = suspended_ns)
    }

    /// The suspended time the datapath was last given (`None`: never
    /// written).
    pub fn suspended_ns(&self) -> Result<Option<u64>, DatapathError> {
        let v = self.read()?;
        Ok((v.signal_interval_ns != 0 && v.suspended_ns != u64::MAX).then_some(v.suspended_ns))
    }

    /// The current generation.
    pub fn generation(&self) -> Result<u32, DatapathError> {
        Ok(self.read()?.generation)
    }

    /// Reads the configuration back.
    pub fn get(&self) -> Result<DatapathConfig, DatapathError> {
        let v = self.read()?;
        Ok(DatapathConfig {
            mode: if v.mode == 1 {
                Mode::Audit
            } else {
                Mode::Enforce
            },
            signal_interval: Duration::from_nanos(v.signal_interval_ns),
            events: EventMask::from_bits(v.event_mask),
            socket_cache: v.flags & CONFIG_F_NO_SKCACHE == 0,
            drop_unknown_local: v.flags & CONFIG_F_DROP_UNKNOWN_LOCAL != 0,
            check_source: v.flags & CONFIG_F_CHECK_SOURCE != 0,
            event_interval: Duration::from_nanos(v.event_interval_ns),
            event_budget: v.event_budget,
        })
    }
}
