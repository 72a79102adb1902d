//! Which auth entries read back from the pinned map the node table can
//! vouch for, decided once at start before anything reads or writes the map.
//!
//! The table's epoch is pinned beside the maps as an empty directory
//! `<pin dir>/meshauth_node_table/<epoch in hex>`: bpffs holds directories
//! but no files, and the marker lives as long as the pins do (a reboot or a
//! wiped pin directory takes both). At start:
//!
//! 1. the pinned epoch is read and the marker removed — from here until
//!    step 4 nothing is vouched for, whatever happens;
//! 2. if the pinned epoch is not the table's (table file missing, reset,
//!    replaced, or from before epochs), every entry toward another node is
//!    dropped; otherwise every entry toward a node id the table's file did
//!    not hold for the node that has it now ([`NodeTable::vouches_for`]);
//! 3. the table is written (fsync, rename, fsync of the directory);
//! 4. only if that write succeeded, the table's epoch is pinned.
//!
//! A crash anywhere leaves either no marker (nothing trusted next time) or
//! the epoch of a table that is durably on disk. Dropped entries are
//! authenticated again by pre-authentication.

use std::path::{Path, PathBuf};

use super::{LOCAL_NODE_ID, NodeTable};
use crate::auth::store::{AuthStore, StoreError};

/// The directory under the pin directory holding the epoch marker.
pub const EPOCH_DIR: &str = "meshauth_node_table";

/// Errors of the start-up check.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The epoch marker could not be read, removed or written.
    #[error("node table epoch marker {path}: {call}: {source}")]
    Marker {
        /// What was done.
        call: &'static str,
        /// The marker path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The auth map could not be read or changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`vouch_resumed_entries`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeReport {
    /// The epoch found pinned, if any.
    pub pinned_epoch: Option<u64>,
    /// True if it was the table's.
    pub table_matches: bool,
    /// Entries dropped because the table cannot vouch for their node id.
    pub dropped: usize,
    /// True if the table was written and its epoch pinned.
    pub pinned: bool,
}

fn marker_err(call: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ResumeError {
    let path = path.to_path_buf();
    move |source| ResumeError::Marker { call, path, source }
}

/// The epoch pinned under `pin_dir`, if any (the highest if, after a crash,
/// there are several: they are all removed before the next is written).
pub fn pinned_epoch(pin_dir: &Path) -> Result<Option<u64>, ResumeError> {
    let dir = pin_dir.join(EPOCH_DIR);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(marker_err("read_dir", &dir)(e)),
    };
    Ok(rd
        .flatten()
        .filter_map(|e| u64::from_str_radix(e.file_name().to_str()?, 16).ok())
        .max())
}

/// Removes every pinned epoch marker.
pub fn unpin_epoch(pin_dir: &Path) -> Result<(), ResumeError> {
    let dir = pin_dir.join(EPOCH_DIR);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(marker_err("read_dir", &dir)(e)),
    };
    for e in rd.flatten() {
        let p = e.path();
        std::fs::remove_dir(&p).map_err(marker_err("remove_dir", &p))?;
    }
    Ok(())
}

/// Pins `epoch` (after removing any other marker).
pub fn pin_epoch(pin_dir: &Path, epoch: u64) -> Result<(), ResumeError> {
    unpin_epoch(pin_dir)?;
    let p = pin_dir.join(EPOCH_DIR).join(format!("{epoch:016x}"));
    std::fs::create_dir_all(&p).map_err(marker_err("mkdir", &p))
}

/// Drops the auth entries read back that `nodes` cannot vouch for, then
/// records the table as the one the map's entries belong to. Call once at
/// start, after the first node sync and before the handshake server or the
/// auth manager touch the map. See the module docs for the order.
pub fn vouch_resumed_entries<S: AuthStore + ?Sized>(
    pin_dir: &Path,
    store: &S,
    nodes: &NodeTable,
) -> Result<ResumeReport, ResumeError> {
    let pinned_epoch = pinned_epoch(pin_dir)?;
    unpin_epoch(pin_dir)?;
    let table_matches = nodes.was_loaded() && pinned_epoch == Some(nodes.epoch());
    let mut dropped = 0;
    for (pair, _) in store.entries()? {
        let trusted = pair.node == LOCAL_NODE_ID || (table_matches && nodes.vouches_for(pair.node));
        if !trusted && store.remove(pair)? {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            table_matches,
            "auth entries read back whose node id the node table cannot vouch for were dropped; they are authenticated again"
        );
    }
    let pinned = match nodes.save_now() {
        Ok(()) => {
            pin_epoch(pin_dir, nodes.epoch())?;
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "writing the node table failed; the next start will trust no auth entry read back");
            false
        }
    };
    Ok(ResumeReport {
        pinned_epoch,
        table_matches,
        dropped,
        pinned,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;
    use std::time::{Duration, SystemTime};

    use policy_bridge::NodeInfo;

    use super::*;
    use crate::auth::store::{MemoryAuthStore, Pair};

    fn nodes(names: &[&str]) -> BTreeMap<String, NodeInfo> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let addr: IpAddr = format!("10.0.0.{}", i + 1).parse().unwrap();
                (
                    n.to_string(),
                    NodeInfo {
                        name: n.to_string(),
                        handshake_addr: addr,
                        addresses: BTreeSet::from([addr]),
                        wireguard_key: None,
                        pod_cidrs: Default::default(),
                    },
                )
            })
            .collect()
    }

    fn pair(node: u16) -> Pair {
        Pair {
            local: 300,
            remote: 400,
            node,
        }
    }

    /// First start: table and map new; entries written toward b (1) and c (2).
    fn first_start(state: &Path, pins: &Path) -> MemoryAuthStore {
        let t = NodeTable::open(&state.join("nodes.json"), "a").unwrap();
        t.sync(&nodes(&["a", "b", "c"])).unwrap();
        let store = MemoryAuthStore::default();
        let r = vouch_resumed_entries(pins, &store, &t).unwrap();
        assert_eq!(r.pinned_epoch, None);
        assert!(r.pinned);
        assert_eq!(pinned_epoch(pins).unwrap(), Some(t.epoch()));
        let exp = SystemTime::now() + Duration::from_secs(3600);
        for n in [0, 1, 2] {
            store.upsert(pair(n), exp).unwrap();
        }
        store
    }

    fn kept(store: &MemoryAuthStore) -> Vec<u16> {
        store.snapshot().keys().map(|p| p.node).collect()
    }

    #[test]
    fn the_same_table_keeps_every_entry_it_vouches_for() {
        let (state, pins) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = first_start(state.path(), pins.path());
        // Restart with the table file intact; c left the cluster meanwhile.
        let t = NodeTable::open(&state.path().join("nodes.json"), "a").unwrap();
        t.sync(&nodes(&["a", "b"])).unwrap();
        let r = vouch_resumed_entries(pins.path(), &store, &t).unwrap();
        assert!(r.table_matches);
        assert_eq!(r.dropped, 1);
        assert_eq!(kept(&store), vec![0, 1], "c's entry goes, b's stays");
    }

    #[test]
    fn a_lost_node_table_drops_every_entry_toward_a_reassigned_id() {
        let (state, pins) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = first_start(state.path(), pins.path());
        // The table file is lost between two starts; the new table gives
        // b's old id 1 to d and c's old id 2 to b.
        std::fs::remove_file(state.path().join("nodes.json")).unwrap();
        let t = NodeTable::open(&state.path().join("nodes.json"), "a").unwrap();
        t.sync(&nodes(&["a", "d", "b"])).unwrap();
        assert_eq!((t.id_of("b"), t.id_of("d")), (Some(1), Some(2)));
        let r = vouch_resumed_entries(pins.path(), &store, &t).unwrap();
        assert!(!r.table_matches);
        assert_eq!(r.dropped, 2);
        assert_eq!(kept(&store), vec![0], "only the local node's entry stays");
        // The new table is now the map's: the next start trusts it.
        assert_eq!(pinned_epoch(pins.path()).unwrap(), Some(t.epoch()));
    }

    #[test]
    fn a_table_younger_than_the_map_is_not_trusted() {
        let (state, pins) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = first_start(state.path(), pins.path());
        // Another table (a restored copy, another agent's) with the same
        // names and ids but another epoch.
        let other = tempfile::tempdir().unwrap();
        let t2 = NodeTable::open(&other.path().join("nodes.json"), "a").unwrap();
        t2.sync(&nodes(&["a", "b", "c"])).unwrap();
        std::fs::copy(
            other.path().join("nodes.json"),
            state.path().join("nodes.json"),
        )
        .unwrap();
        let t = NodeTable::open(&state.path().join("nodes.json"), "a").unwrap();
        t.sync(&nodes(&["a", "b", "c"])).unwrap();
        let r = vouch_resumed_entries(pins.path(), &store, &t).unwrap();
        assert!(!r.table_matches);
        assert_eq!(kept(&store), vec![0]);
    }

    #[test]
    fn a_table_that_cannot_be_written_leaves_nothing_trusted_next_time() {
        let (state, pins) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = first_start(state.path(), pins.path());
        // The state directory becomes unwritable (a file where it was).
        let t = NodeTable::open(&state.path().join("nodes.json"), "a").unwrap();
        t.sync(&nodes(&["a", "b", "c"])).unwrap();
        std::fs::remove_dir_all(state.path()).unwrap();
        std::fs::write(state.path(), "blocked").unwrap();
        let r = vouch_resumed_entries(pins.path(), &store, &t).unwrap();
        assert!(r.table_matches, "the table was the map's");
        assert_eq!(r.dropped, 0);
        assert!(!r.pinned);
        assert_eq!(t.write_failures(), 1);
        assert_eq!(pinned_epoch(pins.path()).unwrap(), None, "marker removed");
        std::fs::remove_file(state.path()).unwrap();
    }
}
