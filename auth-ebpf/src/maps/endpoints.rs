//! The endpoints map: which addresses each local pod may send from.
//!
//! For every local pod the agent knows: its pod cgroup (kubelet's
//! `pod<uid>` cgroup, parent of its containers') with each of its addresses,
//! plus a marker entry that says "this cgroup is a known pod". The egress
//! program drops a packet whose source address its sending pod does not own
//! with 132 "Invalid source ip" (`bpf/lib/source.h`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};

use super::config::ConfigMap;
use super::{insert_error, is_not_found, max_entries, names, open_pinned};
use crate::error::DatapathError;
use crate::types::{EndpointKey, EndpointValue, RawAddr};

/// One local pod as the datapath knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Cgroup v2 id (the inode number of the pod's cgroup directory).
    pub cgroup: u64,
    /// The pod's identity.
    pub identity: u32,
    /// The pod's addresses.
    pub addresses: Vec<IpAddr>,
}

/// Typed handle on `meshauth_endpoints`.
#[derive(Debug)]
pub struct EndpointMap {
    map: HashMap<MapData, EndpointKey, EndpointValue>,
    config: ConfigMap,
    max_entries: u32,
}

fn marker(cgroup: u64) -> EndpointKey {
    EndpointKey {
        cgroup,
        ..EndpointKey::default()
    }
}

fn addr_key(cgroup: u64, ip: IpAddr) -> EndpointKey {
    let (addr, family) = RawAddr::from_ip(ip);
    EndpointKey {
        cgroup,
        family,
        pad: [0; 7],
        addr,
    }
}

impl EndpointMap {
    /// Opens the pinned map under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = open_pinned(pin_dir, names::ENDPOINTS)?;
        let max_entries = max_entries(&data, names::ENDPOINTS)?;
        let map =
            HashMap::try_from(Map::HashMap(data)).map_err(DatapathError::map(names::ENDPOINTS))?;
        let config = ConfigMap::open(pin_dir)?;
        Ok(Self {
            map,
            config,
            max_entries,
        })
    }

    /// Writes a pod: its addresses first, then its marker, so the pod is
    /// never known without the addresses it owns.
    pub fn insert(&mut self, ep: &Endpoint) -> Result<(), DatapathError> {
        let value = EndpointValue {
            identity: ep.identity,
            flags: 0,
        };
        for ip in &ep.addresses {
            self.map
                .insert(addr_key(ep.cgroup, *ip), value, 0)
                .map_err(|e| insert_error(names::ENDPOINTS, self.max_entries, e))?;
        }
        self.map
            .insert(marker(ep.cgroup), value, 0)
            .map_err(|e| insert_error(names::ENDPOINTS, self.max_entries, e))
    }

    /// Removes one address of a pod (the address it no longer owns). Bumps
    /// the generation: a socket may have cached a pass for it.
    pub fn remove_address(&mut self, cgroup: u64, ip: IpAddr) -> Result<bool, DatapathError> {
        let removed = self.remove_key(&addr_key(cgroup, ip))?;
        if removed {
            self.config.bump_generation()?;
        }
        Ok(removed)
    }

    /// Removes a pod: its marker first (so its cgroup is never a known pod
    /// with some of its addresses missing), then its addresses.
    pub fn remove(&mut self, cgroup: u64) -> Result<bool, DatapathError> {
        let existed = self.remove_key(&marker(cgroup))?;
        let addrs: Vec<EndpointKey> = self
            .raw_entries()?
            .into_iter()
            .filter(|(k, _)| k.cgroup == cgroup)
            .map(|(k, _)| k)
            .collect();
        for k in &addrs {
            self.remove_key(k)?;
        }
        if existed || !addrs.is_empty() {
            self.config.bump_generation()?;
        }
        Ok(existed)
    }

    fn remove_key(&mut self, key: &EndpointKey) -> Result<bool, DatapathError> {
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(DatapathError::map(names::ENDPOINTS)(e)),
        }
    }

    fn raw_entries(&self) -> Result<Vec<(EndpointKey, EndpointValue)>, DatapathError> {
        self.map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(DatapathError::map(names::ENDPOINTS))
    }

    /// Every pod the map holds, by cgroup. Addresses without a marker (a
    /// write that stopped half-way) are listed with identity from the
    /// address entries.
    pub fn entries(&self) -> Result<Vec<Endpoint>, DatapathError> {
        let mut by_cgroup: BTreeMap<u64, Endpoint> = BTreeMap::new();
        for (k, v) in self.raw_entries()? {
            let ep = by_cgroup.entry(k.cgroup).or_insert_with(|| Endpoint {
                cgroup: k.cgroup,
                identity: v.identity,
                addresses: Vec::new(),
            });
            if k.family != 0
                && let Some(ip) = k.addr.to_ip(k.family)
            {
                ep.addresses.push(ip);
            }
        }
        let mut out: Vec<Endpoint> = by_cgroup.into_values().collect();
        for ep in &mut out {
            ep.addresses.sort();
        }
        Ok(out)
    }
}
