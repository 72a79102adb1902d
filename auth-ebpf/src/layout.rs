//! Map layout versions and what happens to pinned maps across upgrades.
//!
//! aya reuses a pinned map by name without comparing its shape with the new
//! object, so a changed key or value would be silently misread. Before every
//! load the pinned maps are compared with the object's definitions and the
//! layout version pinned beside them:
//! - same shape and version: reused;
//! - the auth map with a changed capacity or flags, or a newer layout version
//!   that left the auth key and value unchanged: migrated (its entries are
//!   read out and written into the new map, so no authentication is lost);
//! - the tracked-flow map with an unchanged key and value under another
//!   layout version or shape: carried, its entries copied into the new map
//!   when the new programs are attached ([`crate::Datapath::attach`]: once
//!   before, and once more before the old programs are released), so the
//!   replies of flows opened under the old programs still pass;
//! - anything else: recreated, with a log line saying why. The agent rewrites
//!   the ipcache, policy and config maps from desired state on start, and an
//!   auth entry that cannot be carried over is re-authenticated.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData};

use crate::error::DatapathError;
use crate::maps::names;
use crate::types::{AuthKey, AuthValue, CtKey, CtValue, LayoutValue};

/// The layout version of this build's maps (`MESHAUTH_LAYOUT_VERSION`).
pub const LAYOUT_VERSION: u32 = 2;
/// The oldest layout version whose auth key and value equal this build's.
pub const AUTH_LAYOUT_SINCE: u32 = 1;

/// What loading did to one pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapFate {
    /// No pinned map existed; a new one was created and pinned.
    Created,
    /// The pinned map matched and was reused with its contents.
    Reused,
    /// The pinned map differed; its entries were carried into a new map.
    Migrated {
        /// How many entries were carried over.
        entries: usize,
    },
    /// The pinned tracked-flow map differed; it is kept open and its entries
    /// are copied into the new map when the programs are attached.
    Carried,
    /// The pinned map differed and could not be migrated; a new, empty one
    /// replaced it.
    Recreated {
        /// Why it could not be reused.
        reason: String,
    },
}

/// What loading did to each map, in the order of [`names::ALL`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutReport {
    /// The layout version found pinned, if any.
    pub pinned_version: Option<u32>,
    /// One fate per map.
    pub maps: Vec<(String, MapFate)>,
}

impl LayoutReport {
    /// The fate of one map.
    pub fn fate(&self, name: &str) -> Option<&MapFate> {
        self.maps.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
}

/// A pinned map that was set aside: kept open so it can be put back if the
/// load fails, and (for the auth map) its entries to carry over.
pub(crate) struct SetAside {
    name: &'static str,
    path: PathBuf,
    map: MapData,
}

/// The outcome of [`prepare`], finished by [`finish`] once aya has loaded.
pub(crate) struct Prepared {
    pub report: LayoutReport,
    set_aside: Vec<SetAside>,
    auth_entries: Option<Vec<(AuthKey, AuthValue)>>,
    previous_ct: Option<PreviousCt>,
}

/// The tracked-flow map a load set aside, to copy into the new one when the
/// new programs are attached. The old programs still use it until then.
#[derive(Debug)]
pub(crate) struct PreviousCt(Map);

impl PreviousCt {
    /// Copies every entry into the pinned tracked-flow map under `pin_dir`:
    /// overwriting (`BPF_ANY`) or keeping what is there (`BPF_NOEXIST`).
    /// How many were written.
    pub(crate) fn copy_into(
        &self,
        pin_dir: &Path,
        overwrite: bool,
    ) -> Result<usize, DatapathError> {
        let from: HashMap<&MapData, CtKey, CtValue> =
            HashMap::try_from(&self.0).map_err(DatapathError::map(names::CT))?;
        let to_data = crate::maps::open_pinned(pin_dir, names::CT)?;
        let mut to: HashMap<MapData, CtKey, CtValue> =
            HashMap::try_from(Map::LruHashMap(to_data)).map_err(DatapathError::map(names::CT))?;
        let flags = if overwrite { 0 } else { BPF_NOEXIST };
        let mut n = 0;
        for entry in from.iter() {
            // An entry the old programs evicted while we walked: skipped.
            let Ok((k, v)) = entry else { continue };
            match to.insert(k, v, flags) {
                Ok(()) => n += 1,
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error()
                        == Some(rustix::io::Errno::EXIST.raw_os_error()) => {}
                Err(e) => return Err(DatapathError::map(names::CT)(e)),
            }
        }
        Ok(n)
    }
}

const BPF_NOEXIST: u64 = 1;

/// Compares each pinned map with the object's definition and sets aside
/// (unpins, keeping it open) every one that cannot be reused.
pub(crate) fn prepare(pin_dir: &Path, obj: &aya_obj::Object) -> Result<Prepared, DatapathError> {
    let pinned_version = read_pinned_version(pin_dir);
    let mut report = LayoutReport {
        pinned_version,
        maps: Vec::new(),
    };
    let mut set_aside = Vec::new();
    let mut auth_entries = None;
    let mut previous_ct = None;

    for &name in names::ALL {
        let def = obj
            .maps
            .get(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let path = pin_dir.join(name);
        if !path.exists() {
            report.maps.push((name.to_string(), MapFate::Created));
            continue;
        }
        let map = MapData::from_pin(&path).map_err(DatapathError::map(name))?;
        let info = map.info().map_err(DatapathError::map(name))?;
        let mut diffs = Vec::new();
        let ty = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        if ty != def.map_type() {
            diffs.push(format!("type {ty} != {}", def.map_type()));
        }
        if info.key_size() != def.key_size() {
            diffs.push(format!(
                "key size {} != {}",
                info.key_size(),
                def.key_size()
            ));
        }
        if info.value_size() != def.value_size() {
            diffs.push(format!(
                "value size {} != {}",
                info.value_size(),
                def.value_size()
            ));
        }
        if info.max_entries() != def.max_entries() {
            diffs.push(format!(
                "max_entries {} != {}",
                info.max_entries(),
                def.max_entries()
            ));
        }
        if info.map_flags() != def.map_flags() {
            diffs.push(format!(
                "flags {:#x} != {:#x}",
                info.map_flags(),
                def.map_flags()
            ));
        }
        let version_differs = name != names::LAYOUT && pinned_version != Some(LAYOUT_VERSION);
        if diffs.is_empty() && !version_differs {
            report.maps.push((name.to_string(), MapFate::Reused));
            continue;
        }
        if version_differs {
            diffs.push(match pinned_version {
                Some(v) => format!("layout version {v} != {LAYOUT_VERSION}"),
                None => "no layout version pinned".to_string(),
            });
        }
        let reason = diffs.join(", ");

        let fate = if name == names::AUTH && entries_carry_over(pinned_version, &info, def) {
            let entries = read_auth_entries(&path)?;
            let n = entries.len();
            auth_entries = Some(entries);
            tracing::warn!(map = name, %reason, entries = n, "migrating pinned auth map");
            MapFate::Migrated { entries: n }
        } else if name == names::CT
            && ty == def.map_type()
            && entries_carry_over(pinned_version, &info, def)
        {
            let old = MapData::from_pin(&path).map_err(DatapathError::map(name))?;
            previous_ct = Some(PreviousCt(Map::LruHashMap(old)));
            tracing::warn!(map = name, %reason, "pinned tracked-flow map differs from this build's; its flows are carried over when the programs are attached");
            MapFate::Carried
        } else {
            tracing::warn!(map = name, %reason, "pinned map differs from this build's; recreating it empty");
            MapFate::Recreated { reason }
        };
        std::fs::remove_file(&path).map_err(DatapathError::io("unlink", &path))?;
        set_aside.push(SetAside { name, path, map });
        report.maps.push((name.to_string(), fate));
    }
    Ok(Prepared {
        report,
        set_aside,
        auth_entries,
        previous_ct,
    })
}

impl Prepared {
    /// Puts every set-aside map back at its pin path (the load failed).
    pub(crate) fn restore(self) {
        for s in self.set_aside {
            if let Err(e) = s.map.pin(&s.path) {
                tracing::error!(map = s.name, path = %s.path.display(), error = %e, "could not restore pinned map");
            }
        }
    }

    /// Writes the carried-over auth entries and the layout version into the
    /// freshly loaded maps.
    /// Returns the report and the tracked-flow map to carry over, if any.
    pub(crate) fn finish(
        self,
        ebpf: &mut aya::Ebpf,
    ) -> Result<(LayoutReport, Option<PreviousCt>), DatapathError> {
        if let Some(entries) = self.auth_entries {
            let map = ebpf.map_mut(names::AUTH).ok_or(DatapathError::Missing {
                kind: "map",
                name: names::AUTH,
            })?;
            let mut auth: HashMap<&mut MapData, AuthKey, AuthValue> =
                HashMap::try_from(map).map_err(DatapathError::map(names::AUTH))?;
            for (k, v) in entries {
                auth.insert(k, v, 0)
                    .map_err(DatapathError::map(names::AUTH))?;
            }
        }
        write_version(ebpf)?;
        Ok((self.report, self.previous_ct))
    }
}

/// Whether a pinned map's entries can be read as this build's: a layout
/// version since [`AUTH_LAYOUT_SINCE`] (the auth and tracked-flow entries
/// have not changed since) and the same key and value sizes.
fn entries_carry_over(pinned: Option<u32>, info: &aya::maps::MapInfo, def: &aya_obj::Map) -> bool {
    pinned.is_some_and(|v| v >= AUTH_LAYOUT_SINCE)
        && info.key_size() == def.key_size()
        && info.value_size() == def.value_size()
}

fn read_auth_entries(path: &Path) -> Result<Vec<(AuthKey, AuthValue)>, DatapathError> {
    let data = MapData::from_pin(path).map_err(DatapathError::map(names::AUTH))?;
    let auth: HashMap<MapData, AuthKey, AuthValue> =
        HashMap::try_from(Map::HashMap(data)).map_err(DatapathError::map(names::AUTH))?;
    auth.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(DatapathError::map(names::AUTH))
}

pub(crate) fn read_pinned_version(pin_dir: &Path) -> Option<u32> {
    let map = MapData::from_pin(pin_dir.join(names::LAYOUT)).ok()?;
    let arr: Array<MapData, LayoutValue> = Array::try_from(Map::Array(map)).ok()?;
    arr.get(&0, 0).ok().map(|v| v.version).filter(|&v| v != 0)
}

fn write_version(ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    let map = ebpf.map_mut(names::LAYOUT).ok_or(DatapathError::Missing {
        kind: "map",
        name: names::LAYOUT,
    })?;
    let mut arr: Array<&mut MapData, LayoutValue> =
        Array::try_from(map).map_err(DatapathError::map(names::LAYOUT))?;
    arr.set(
        0,
        LayoutValue {
            version: LAYOUT_VERSION,
            pad: 0,
        },
        0,
    )
    .map_err(DatapathError::map(names::LAYOUT))
}
