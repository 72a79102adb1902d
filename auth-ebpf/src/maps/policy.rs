//! The policy map: which flows need authentication.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData};

use super::config::ConfigMap;
use super::{insert_error, is_not_found, max_entries, names, open_pinned};
use crate::error::DatapathError;
use crate::types::{Direction, PolicyKey, PolicyValue};

/// One auth rule as the datapath stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRule {
    /// Local identity.
    pub local: u32,
    /// Remote identity; 0 = any cluster identity.
    pub remote: u32,
    /// Destination port; 0 = any.
    pub port: u16,
    /// IP protocol; 0 = any.
    pub proto: u8,
    /// Direction seen from the local pod.
    pub direction: Direction,
}

impl PolicyRule {
    fn key(&self) -> PolicyKey {
        PolicyKey {
            local_id: self.local,
            remote_id: self.remote,
            port: self.port,
            proto: self.proto,
            direction: self.direction as u8,
        }
    }
}

/// Typed handle on `meshauth_policy`.
#[derive(Debug)]
pub struct PolicyMap {
    map: HashMap<MapData, PolicyKey, PolicyValue>,
    config: ConfigMap,
    max_entries: u32,
}

impl PolicyMap {
    /// Opens the pinned policy map under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = open_pinned(pin_dir, names::POLICY)?;
        let max_entries = max_entries(&data, names::POLICY)?;
        let map =
            HashMap::try_from(Map::HashMap(data)).map_err(DatapathError::map(names::POLICY))?;
        let config = ConfigMap::open(pin_dir)?;
        Ok(Self {
            map,
            config,
            max_entries,
        })
    }

    /// Requires `auth_type` for flows matching `rule` (0 = explicitly none).
    pub fn insert(&mut self, rule: PolicyRule, auth_type: u8) -> Result<(), DatapathError> {
        let value = PolicyValue {
            auth_type,
            flags: 0,
            pad: 0,
        };
        self.map
            .insert(rule.key(), value, 0)
            .map_err(|e| insert_error(names::POLICY, self.max_entries, e))?;
        self.config.bump_generation()?;
        Ok(())
    }

    /// Removes a rule; `false` if it was not there.
    pub fn remove(&mut self, rule: &PolicyRule) -> Result<bool, DatapathError> {
        match self.map.remove(&rule.key()) {
            Ok(()) => {
                self.config.bump_generation()?;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(DatapathError::map(names::POLICY)(e)),
        }
    }

    /// Every rule with its auth type.
    pub fn entries(&self) -> Result<Vec<(PolicyRule, u8)>, DatapathError> {
        let mut out = Vec::new();
        for r in self.map.iter() {
            let (k, v) = r.map_err(DatapathError::map(names::POLICY))?;
            let Some(direction) = Direction::from_raw(k.direction) else {
                continue;
            };
            out.push((
                PolicyRule {
                    local: k.local_id,
                    remote: k.remote_id,
                    port: k.port,
                    proto: k.proto,
                    direction,
                },
                v.auth_type,
            ));
        }
        Ok(out)
    }
}
