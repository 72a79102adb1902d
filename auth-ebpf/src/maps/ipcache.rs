//! The ipcache: prefix → identity and node.

use std::net::IpAddr;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData};

use super::config::ConfigMap;
use super::{insert_error, is_not_found, max_entries, names, open_pinned};
use crate::error::DatapathError;
use crate::types::{IPCACHE_KEY_PREFIX_BITS, IpcacheKeyData, IpcacheValue, RawAddr};

/// An IPv4 or IPv6 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length in bits (≤ 32 for IPv4, ≤ 128 for IPv6).
    pub len: u8,
}

impl Prefix {
    /// A host prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }

    fn key(&self) -> Result<Key<IpcacheKeyData>, DatapathError> {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.len > max {
            return Err(DatapathError::Invalid {
                what: "prefix length",
                value: format!("{}/{}", self.addr, self.len),
            });
        }
        let (addr, family) = RawAddr::from_ip(self.addr);
        Ok(Key::new(
            IPCACHE_KEY_PREFIX_BITS + u32::from(self.len),
            IpcacheKeyData {
                family,
                pad: [0; 3],
                addr,
            },
        ))
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Typed handle on `meshauth_ipcache`.
#[derive(Debug)]
pub struct Ipcache {
    map: LpmTrie<MapData, IpcacheKeyData, IpcacheValue>,
    config: ConfigMap,
    max_entries: u32,
}

impl Ipcache {
    /// Opens the pinned ipcache under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = open_pinned(pin_dir, names::IPCACHE)?;
        let max_entries = max_entries(&data, names::IPCACHE)?;
        let map =
            LpmTrie::try_from(Map::LpmTrie(data)).map_err(DatapathError::map(names::IPCACHE))?;
        let config = ConfigMap::open(pin_dir)?;
        Ok(Self {
            map,
            config,
            max_entries,
        })
    }

    /// Maps a prefix to an identity on a node (0 = local).
    pub fn insert(
        &mut self,
        prefix: Prefix,
        identity: u32,
        node_id: u16,
    ) -> Result<(), DatapathError> {
        let value = IpcacheValue {
            identity,
            node_id,
            flags: 0,
        };
        self.map
            .insert(&prefix.key()?, value, 0)
            .map_err(|e| insert_error(names::IPCACHE, self.max_entries, e))?;
        self.config.bump_generation()?;
        Ok(())
    }

    /// Removes a prefix; `false` if it was not there.
    pub fn remove(&mut self, prefix: Prefix) -> Result<bool, DatapathError> {
        match self.map.remove(&prefix.key()?) {
            Ok(()) => {
                self.config.bump_generation()?;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(DatapathError::map(names::IPCACHE)(e)),
        }
    }

    /// The longest-prefix match for an address.
    pub fn lookup(&self, addr: IpAddr) -> Result<Option<IpcacheValue>, DatapathError> {
        match self.map.get(&Prefix::host(addr).key()?, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(names::IPCACHE)(e)),
        }
    }

    /// Every prefix with its value.
    pub fn entries(&self) -> Result<Vec<(Prefix, IpcacheValue)>, DatapathError> {
        let mut out = Vec::new();
        for r in self.map.iter() {
            let (k, v) = r.map_err(DatapathError::map(names::IPCACHE))?;
            let data = k.data();
            let Some(addr) = data.addr.to_ip(data.family) else {
                continue;
            };
            let len = k.prefix_len().saturating_sub(IPCACHE_KEY_PREFIX_BITS) as u8;
            out.push((Prefix { addr, len }, v));
        }
        Ok(out)
    }
}
