//! The node table: node names ↔ the `u16` node ids the datapath keys auth
//! entries and ipcache entries by (0 = this node), and the addresses a peer
//! node's handshake may come from.
//!
//! Ids are local to this agent and must survive its restarts, because the
//! pinned auth map and ipcache outlive the process. The table is saved to a
//! state file (JSON, written atomically: temporary file, fsync, rename,
//! fsync of the directory) on every change and read back on start. An id is
//! never reused while the agent runs, so a stale entry can never be
//! mistaken for another node's.
//!
//! The pinned auth map can outlive the table file too (state directory
//! lost or reset, an older copy restored). A new table would then hand an
//! old node's id to another node, and auth entries read back would
//! authenticate pairs toward the wrong node. So the table carries a random
//! *epoch*, also pinned beside the maps ([`resume`]); on start an entry read
//! back is trusted only if the pinned epoch is the table's and the table as
//! read from its file had that id for the node that still holds it. Every
//! other entry is dropped and authenticated afresh.
//!
//! A failed write does not stop the agent: it is logged, counted
//! ([`NodeTable::write_failures`]) and retried at the next sync.

pub mod resume;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use policy_bridge::NodeInfo;
use serde::{Deserialize, Serialize};

/// Node id of the local node.
pub const LOCAL_NODE_ID: u16 = 0;

/// Node table errors.
#[derive(Debug, thiserror::Error)]
pub enum NodeTableError {
    /// The state file could not be read or written.
    #[error("{call} {path}: {source}")]
    Io {
        /// `read`, `write`, `rename`.
        call: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a node table.
    #[error("node table {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// All 65,535 remote node ids are taken.
    #[error("no free node id for {node}: 65,535 remote nodes already known")]
    Exhausted {
        /// The node that could not get one.
        node: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    local: String,
    ids: BTreeMap<String, u16>,
    next: u16,
    /// Random, fixed when the table is created; 0 in files written before
    /// epochs existed (such a file vouches for nothing).
    #[serde(default)]
    epoch: u64,
}

#[derive(Debug)]
struct Inner {
    saved: Saved,
    info: BTreeMap<String, NodeInfo>,
    /// The ids as read from the file at open (id → node); `None` for a
    /// table created afresh.
    loaded: Option<BTreeMap<u16, String>>,
    /// A save failed; the next sync retries.
    dirty: bool,
}

/// Nodes the agent knows, with their ids. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeTable {
    inner: Arc<RwLock<Inner>>,
    path: Option<PathBuf>,
    write_failures: Arc<AtomicU64>,
}

fn new_epoch() -> u64 {
    // Never 0 (0 = "no epoch").
    rand::random::<u64>().max(1)
}

/// What a [`NodeTable::sync`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeChanges {
    /// Nodes that got an id now.
    pub added: Vec<(String, u16)>,
    /// Nodes gone from the cluster, with the id they had.
    pub removed: Vec<(String, u16)>,
    /// Nodes whose handshake address, addresses or key changed.
    pub changed: Vec<(String, u16)>,
}

impl NodeTable {
    /// A table for `local` kept only in memory (tests).
    pub fn in_memory(local: &str) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Inner {
                saved: Saved {
                    local: local.to_string(),
                    ids: BTreeMap::new(),
                    next: 1,
                    epoch: new_epoch(),
                },
                info: BTreeMap::new(),
                loaded: None,
                dirty: false,
            })),
            path: None,
            write_failures: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Opens (or creates) the table saved at `path` for the local node
    /// `local`. A file saved for another local node name is not reused.
    pub fn open(path: &Path, local: &str) -> Result<Self, NodeTableError> {
        let saved = match std::fs::read(path) {
            Ok(bytes) => {
                let s: Saved =
                    serde_json::from_slice(&bytes).map_err(|e| NodeTableError::Malformed {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })?;
                if s.local != local {
                    tracing::warn!(path = %path.display(), saved = %s.local, local, "node table was saved for another node; starting afresh");
                    None
                } else if s.next == 0 || s.ids.values().any(|&id| id == 0 || id >= s.next) {
                    return Err(NodeTableError::Malformed {
                        path: path.to_path_buf(),
                        reason: format!("ids must be in 1..{}", s.next),
                    });
                } else {
                    Some(s)
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(NodeTableError::Io {
                    call: "read",
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let (saved, loaded) = match saved {
            Some(s) if s.epoch != 0 => {
                let loaded = s.ids.iter().map(|(n, id)| (*id, n.clone())).collect();
                (s, Some(loaded))
            }
            Some(mut s) => {
                tracing::warn!(path = %path.display(), "node table has no epoch (written by an older agent); auth entries read back will not be trusted");
                s.epoch = new_epoch();
                (s, None)
            }
            None => (
                Saved {
                    local: local.to_string(),
                    ids: BTreeMap::new(),
                    next: 1,
                    epoch: new_epoch(),
                },
                None,
            ),
        };
        Ok(Self {
            inner: Arc::new(RwLock::new(Inner {
                saved,
                info: BTreeMap::new(),
                loaded,
                dirty: false,
            })),
            path: Some(path.to_path_buf()),
            write_failures: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The table's epoch (random, fixed when the table was created).
    pub fn epoch(&self) -> u64 {
        self.read().saved.epoch
    }

    /// True if an auth entry toward node `id` read back from the pinned map
    /// can be trusted as far as this table goes: the local node, or an id
    /// the table had in its file when opened for the node that holds it
    /// now. (Whether the file belongs to the map is [`resume`]'s question.)
    pub fn vouches_for(&self, id: u16) -> bool {
        if id == LOCAL_NODE_ID {
            return true;
        }
        let inner = self.read();
        let Some(loaded) = &inner.loaded else {
            return false;
        };
        loaded
            .get(&id)
            .is_some_and(|name| inner.saved.ids.get(name) == Some(&id))
    }

    /// True if the table was read from its file (not created afresh).
    pub fn was_loaded(&self) -> bool {
        self.read().loaded.is_some()
    }

    /// How many writes of the state file have failed since start.
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// Writes the state file now.
    pub fn save_now(&self) -> Result<(), NodeTableError> {
        let r = self.save();
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.dirty = r.is_err();
        if r.is_err() {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// The local node's name.
    pub fn local_name(&self) -> String {
        self.read().saved.local.clone()
    }

    /// Brings the table to the cluster's node list: new nodes get ids, gone
    /// nodes lose theirs (ids are not handed out again), the local node is
    /// always id 0. A failed write of the state file is logged, counted and
    /// retried at the next sync; it is not an error here.
    pub fn sync(&self, nodes: &BTreeMap<String, NodeInfo>) -> Result<NodeChanges, NodeTableError> {
        let mut changes = NodeChanges::default();
        {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            let local = inner.saved.local.clone();
            let gone: Vec<String> = inner
                .saved
                .ids
                .keys()
                .filter(|n| !nodes.contains_key(*n))
                .cloned()
                .collect();
            for n in gone {
                if let Some(id) = inner.saved.ids.remove(&n) {
                    changes.removed.push((n.clone(), id));
                }
                inner.info.remove(&n);
            }
            for (name, info) in nodes {
                let id = if *name == local {
                    LOCAL_NODE_ID
                } else if let Some(&id) = inner.saved.ids.get(name) {
                    id
                } else {
                    let id = inner.saved.next;
                    if id == u16::MAX {
                        return Err(NodeTableError::Exhausted { node: name.clone() });
                    }
                    inner.saved.next += 1;
                    inner.saved.ids.insert(name.clone(), id);
                    changes.added.push((name.clone(), id));
                    id
                };
                match inner.info.insert(name.clone(), info.clone()) {
                    Some(old) if old != *info => changes.changed.push((name.clone(), id)),
                    _ => {}
                }
            }
        }
        let dirty = self.read().dirty;
        if (dirty || !changes.added.is_empty() || !changes.removed.is_empty())
            && let Err(e) = self.save_now()
        {
            tracing::error!(error = %e, failures = self.write_failures(), "writing the node table failed; ids stay in memory, retrying at the next change");
        }
        Ok(changes)
    }

    /// The id of a node (0 for the local node).
    pub fn id_of(&self, name: &str) -> Option<u16> {
        let inner = self.read();
        if name == inner.saved.local {
            return Some(LOCAL_NODE_ID);
        }
        inner.saved.ids.get(name).copied()
    }

    /// The name of a node id.
    pub fn name_of(&self, id: u16) -> Option<String> {
        let inner = self.read();
        if id == LOCAL_NODE_ID {
            return Some(inner.saved.local.clone());
        }
        inner
            .saved
            .ids
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(n, _)| n.clone())
    }

    /// A node's published information.
    pub fn info(&self, name: &str) -> Option<NodeInfo> {
        self.read().info.get(name).cloned()
    }

    /// The node an address belongs to (any of its addresses), with its id.
    pub fn by_address(&self, addr: IpAddr) -> Option<(u16, NodeInfo)> {
        let inner = self.read();
        let info = inner
            .info
            .values()
            .find(|n| n.handshake_addr == addr || n.addresses.contains(&addr))?;
        let id = if info.name == inner.saved.local {
            LOCAL_NODE_ID
        } else {
            *inner.saved.ids.get(&info.name)?
        };
        Some((id, info.clone()))
    }

    /// Every known node id (including 0 for the local node).
    pub fn ids(&self) -> Vec<u16> {
        let inner = self.read();
        std::iter::once(LOCAL_NODE_ID)
            .chain(inner.saved.ids.values().copied())
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self) -> Result<(), NodeTableError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&self.read().saved).map_err(|e| {
            NodeTableError::Malformed {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        let io = |call: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| NodeTableError::Io {
                call,
                path: p,
                source,
            }
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io("rename", path))?;
        // The rename is durable only once the directory is.
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory", dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn node(name: &str, ip: &str) -> (String, NodeInfo) {
        let addr: IpAddr = ip.parse().unwrap();
        (
            name.to_string(),
            NodeInfo {
                name: name.to_string(),
                handshake_addr: addr,
                addresses: BTreeSet::from([addr]),
                wireguard_key: None,
                pod_cidrs: Default::default(),
            },
        )
    }

    #[test]
    fn ids_are_stable_across_restarts_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes.json");
        let t = NodeTable::open(&path, "a").unwrap();
        let all = BTreeMap::from([
            node("a", "10.0.0.1"),
            node("b", "10.0.0.2"),
            node("c", "10.0.0.3"),
        ]);
        let ch = t.sync(&all).unwrap();
        assert_eq!(ch.added, vec![("b".into(), 1), ("c".into(), 2)]);
        assert_eq!(t.id_of("a"), Some(0));
        assert_eq!(
            t.by_address("10.0.0.3".parse().unwrap()).map(|(id, _)| id),
            Some(2)
        );

        let again = NodeTable::open(&path, "a").unwrap();
        again.sync(&all).unwrap();
        assert_eq!((again.id_of("b"), again.id_of("c")), (Some(1), Some(2)));

        let without_b = BTreeMap::from([node("a", "10.0.0.1"), node("c", "10.0.0.3")]);
        let ch = again.sync(&without_b).unwrap();
        assert_eq!(ch.removed, vec![("b".into(), 1)]);
        let with_d = BTreeMap::from([
            node("a", "10.0.0.1"),
            node("c", "10.0.0.3"),
            node("d", "10.0.0.4"),
        ]);
        let ch = again.sync(&with_d).unwrap();
        assert_eq!(
            ch.added,
            vec![("d".into(), 3)],
            "id 1 is not handed out again"
        );
        assert_eq!(again.name_of(3).as_deref(), Some("d"));
        assert!(again.by_address("10.0.0.2".parse().unwrap()).is_none());
    }

    #[test]
    fn a_malformed_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes.json");
        std::fs::write(&path, r#"{"local":"a","ids":{"b":0},"next":1}"#).unwrap();
        let e = NodeTable::open(&path, "a").unwrap_err().to_string();
        assert!(
            e.contains("nodes.json") && e.contains("ids must be in"),
            "{e}"
        );
        std::fs::write(&path, "garbage").unwrap();
        assert!(NodeTable::open(&path, "a").is_err());
    }

    #[test]
    fn a_failed_write_is_counted_and_retried_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("state");
        std::fs::create_dir(&blocker).unwrap();
        let path = blocker.join("nodes.json");
        let t = NodeTable::open(&path, "a").unwrap();
        // The table's directory becomes a file: every write fails (even as root).
        std::fs::remove_dir(&blocker).unwrap();
        std::fs::write(&blocker, "not a directory").unwrap();
        let ch = t
            .sync(&BTreeMap::from([
                node("a", "10.0.0.1"),
                node("b", "10.0.0.2"),
            ]))
            .expect("a write error is not a sync error");
        assert_eq!(ch.added, vec![("b".into(), 1)]);
        assert_eq!(t.write_failures(), 1);
        assert_eq!(t.id_of("b"), Some(1), "ids stay in memory");
        // Nothing changed, but the failed write is retried: still failing.
        t.sync(&BTreeMap::from([
            node("a", "10.0.0.1"),
            node("b", "10.0.0.2"),
        ]))
        .unwrap();
        assert_eq!(t.write_failures(), 2);
        // The directory appears: the next sync writes the table.
        std::fs::remove_file(&blocker).unwrap();
        std::fs::create_dir(&blocker).unwrap();
        t.sync(&BTreeMap::from([
            node("a", "10.0.0.1"),
            node("b", "10.0.0.2"),
        ]))
        .unwrap();
        assert_eq!(t.write_failures(), 2);
        let again = NodeTable::open(&path, "a").unwrap();
        assert_eq!(again.id_of("b"), Some(1));
        assert_eq!(again.epoch(), t.epoch());
        let names: Vec<_> = std::fs::read_dir(&blocker)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["nodes.json"], "no temporary file left");
    }

    #[test]
    fn the_epoch_is_kept_by_the_file_and_a_new_table_vouches_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes.json");
        let all = BTreeMap::from([node("a", "10.0.0.1"), node("b", "10.0.0.2")]);
        let t = NodeTable::open(&path, "a").unwrap();
        assert!(!t.was_loaded());
        t.sync(&all).unwrap();
        assert!(t.vouches_for(LOCAL_NODE_ID));
        assert!(
            !t.vouches_for(1),
            "a table created afresh vouches for no remote id"
        );

        let again = NodeTable::open(&path, "a").unwrap();
        assert!(again.was_loaded());
        assert_eq!(again.epoch(), t.epoch());
        again.sync(&all).unwrap();
        assert!(again.vouches_for(1));
        assert!(!again.vouches_for(2), "an id the file did not hold");
        // b leaves: its id is vouched for no more.
        again
            .sync(&BTreeMap::from([node("a", "10.0.0.1")]))
            .unwrap();
        assert!(!again.vouches_for(1));

        // Lost file: a new epoch.
        std::fs::remove_file(&path).unwrap();
        let fresh = NodeTable::open(&path, "a").unwrap();
        assert_ne!(fresh.epoch(), t.epoch());
        // A file from before epochs vouches for nothing.
        std::fs::write(&path, r#"{"local":"a","ids":{"b":1},"next":2}"#).unwrap();
        let old = NodeTable::open(&path, "a").unwrap();
        old.sync(&all).unwrap();
        assert!(!old.was_loaded() && !old.vouches_for(1));
    }
}
