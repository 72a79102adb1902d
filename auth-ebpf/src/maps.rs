//! Typed handles on the pinned maps. Each opens its map from the pin
//! directory, so the agent and the CLI (`meshauth auth list`) use the same
//! code, and each reports a full map as [`DatapathError::MapFull`] without
//! touching what is stored.

pub mod auth;
pub mod config;
pub mod endpoints;
pub mod ipcache;
pub mod policy;

use std::path::Path;

use aya::maps::{MapData, MapError};

use crate::error::DatapathError;

/// The pin names of the maps (the C map names).
pub mod names {
    /// LPM trie: prefix → identity, node.
    pub const IPCACHE: &str = "meshauth_ipcache";
    /// Hash: (local, remote, port, proto, dir) → auth type.
    pub const POLICY: &str = "meshauth_policy";
    /// Hash: (local, remote, node, auth type) → expiry.
    pub const AUTH: &str = "meshauth_auth";
    /// LRU hash: (socket cgroup, forward 5-tuple, first direction) → last seen.
    pub const CT: &str = "meshauth_ct";
    /// Hash: (pod cgroup, address) → identity: whose addresses a pod may send from.
    pub const ENDPOINTS: &str = "meshauth_endpoints";
    /// LRU hash: flow and reason → last flow event time.
    pub const EVENT_LIMIT: &str = "meshauth_event_limit";
    /// Per-CPU array: flow events sent in the current second.
    pub const EVENT_BUDGET: &str = "meshauth_event_budget";
    /// Ring buffer of auth-required signals.
    pub const SIGNALS: &str = "meshauth_signals";
    /// LRU hash: auth key → last signal time.
    pub const SIGNAL_LIMIT: &str = "meshauth_signal_limit";
    /// Ring buffer of flow events.
    pub const EVENTS: &str = "meshauth_events";
    /// Per-CPU hash: (reason, direction) → packets, bytes.
    pub const METRICS: &str = "meshauth_metrics";
    /// Array: the datapath configuration.
    pub const CONFIG: &str = "meshauth_config";
    /// Array: the layout version of the pinned maps.
    pub const LAYOUT: &str = "meshauth_layout";
    /// Every map, in a stable order.
    pub const ALL: &[&str] = &[
        IPCACHE,
        POLICY,
        AUTH,
        CT,
        ENDPOINTS,
        EVENT_LIMIT,
        EVENT_BUDGET,
        SIGNALS,
        SIGNAL_LIMIT,
        EVENTS,
        METRICS,
        CONFIG,
        LAYOUT,
    ];
}

/// Opens a pinned map by name.
pub(crate) fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(pin_dir.join(name)).map_err(DatapathError::map(name))
}

/// Maximum entries of an opened map.
pub(crate) fn max_entries(data: &MapData, name: &'static str) -> Result<u32, DatapathError> {
    Ok(data.info().map_err(DatapathError::map(name))?.max_entries())
}

/// Maps aya's error for a failed insert: E2BIG (hash maps) or ENOSPC (the
/// ipcache's LPM trie) means the map is full.
pub(crate) fn insert_error(name: &'static str, max_entries: u32, e: MapError) -> DatapathError {
    if let MapError::SyscallError(s) = &e
        && [rustix::io::Errno::TOOBIG, rustix::io::Errno::NOSPC]
            .iter()
            .any(|full| s.io_error.raw_os_error() == Some(full.raw_os_error()))
    {
        return DatapathError::MapFull { name, max_entries };
    }
    DatapathError::Map { name, source: e }
}

/// True when aya's error says the key was not there.
pub(crate) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => {
            s.io_error.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error())
        }
        _ => false,
    }
}
