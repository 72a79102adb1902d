//! The auth map: authenticated pairs and their expiry.

use std::path::Path;
use std::time::SystemTime;

use aya::maps::{HashMap, Map, MapData};

use super::config::ConfigMap;
use super::{insert_error, is_not_found, max_entries, names, open_pinned};
use crate::clock::{boottime_to_system, system_to_boottime_ns};
use crate::error::DatapathError;
use crate::types::{AuthKey, AuthValue};

/// Authentication type of a meshauth/1 mutual TLS handshake.
pub const AUTH_TYPE_MTLS: u8 = 1;

/// Typed handle on `meshauth_auth`.
#[derive(Debug)]
pub struct AuthMap {
    map: HashMap<MapData, AuthKey, AuthValue>,
    config: ConfigMap,
    max_entries: u32,
}

impl AuthMap {
    /// Opens the pinned auth map under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = open_pinned(pin_dir, names::AUTH)?;
        let max_entries = max_entries(&data, names::AUTH)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(DatapathError::map(names::AUTH))?;
        let config = ConfigMap::open(pin_dir)?;
        Ok(Self {
            map,
            config,
            max_entries,
        })
    }

    /// Writes (or replaces in place) a pair's entry with its expiry. A
    /// shorter expiry than before invalidates socket-cached verdicts.
    pub fn insert(&mut self, key: AuthKey, expiry: SystemTime) -> Result<(), DatapathError> {
        let value = AuthValue {
            expiry: system_to_boottime_ns(expiry),
        };
        let shortened = self
            .map
            .get(&key, 0)
            .is_ok_and(|old| old.expiry > value.expiry);
        self.map
            .insert(key, value, 0)
            .map_err(|e| insert_error(names::AUTH, self.max_entries, e))?;
        if shortened {
            self.config.bump_generation()?;
        }
        Ok(())
    }

    /// The expiry of a pair, if it has an entry (live or not).
    pub fn get(&self, key: &AuthKey) -> Result<Option<SystemTime>, DatapathError> {
        match self.map.get(key, 0) {
            Ok(v) => Ok(Some(boottime_to_system(v.expiry))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(names::AUTH)(e)),
        }
    }

    /// Removes a pair; `false` if it had no entry.
    pub fn remove(&mut self, key: &AuthKey) -> Result<bool, DatapathError> {
        match self.map.remove(key) {
            Ok(()) => {
                self.config.bump_generation()?;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(DatapathError::map(names::AUTH)(e)),
        }
    }

    /// Every entry with its expiry as wall-clock time.
    pub fn entries(&self) -> Result<Vec<(AuthKey, SystemTime)>, DatapathError> {
        self.map
            .iter()
            .map(|r| r.map(|(k, v)| (k, boottime_to_system(v.expiry))))
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(names::AUTH))
    }

    /// Every entry with its raw `CLOCK_BOOTTIME` expiry.
    pub fn raw_entries(&self) -> Result<Vec<(AuthKey, u64)>, DatapathError> {
        self.map
            .iter()
            .map(|r| r.map(|(k, v)| (k, v.expiry)))
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(names::AUTH))
    }

    /// The map's capacity.
    pub fn capacity(&self) -> u32 {
        self.max_entries
    }
}
