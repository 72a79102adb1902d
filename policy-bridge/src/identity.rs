//! Identity allocation: canonical label set ↔ number (≥ 256), stable across
//! restarts. The table is in memory; [`IdentityFile`] persists it for
//! standalone mode (atomic replace), and the Kubernetes source persists it
//! as `MeshIdentity` objects (`source::kube`).
//!
//! Rules every node follows so all agree: a new label set gets the lowest
//! free number; if two numbers ever carry the same labels (two nodes raced),
//! the lowest wins everywhere and the other is collected once unused.
//! Identities no pod uses are collected after a grace period.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::labels::{LabelError, LabelSet};
use crate::state::FIRST_CLUSTER_IDENTITY;

/// Errors of identity allocation and persistence.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the state file failed.
    #[error("identity state file {path}: {call}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        call: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state file is not valid.
    #[error("identity state file {path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A stored label is not canonical.
    #[error("identity {id}: {source}")]
    Label {
        /// The identity.
        id: u32,
        /// The label problem.
        source: LabelError,
    },
    /// An identity number below 256 or otherwise unusable.
    #[error("identity {0} is reserved (cluster identities start at 256)")]
    Reserved(u32),
    /// Every number is taken.
    #[error("no free identity number left")]
    Exhausted,
}

/// Label sets and their numbers.
#[derive(Debug, Default, Clone)]
pub struct IdentityTable {
    by_labels: HashMap<LabelSet, u32>,
    by_id: BTreeMap<u32, LabelSet>,
    next: u32,
    unused_since: HashMap<u32, Instant>,
}

impl IdentityTable {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            next: FIRST_CLUSTER_IDENTITY,
            ..Self::default()
        }
    }

    /// The number of a label set, if allocated.
    pub fn get(&self, labels: &LabelSet) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    /// The labels of a number.
    pub fn labels(&self, id: u32) -> Option<&LabelSet> {
        self.by_id.get(&id)
    }

    /// Number of identities held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every (number, labels).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &LabelSet)> {
        self.by_id.iter().map(|(id, l)| (*id, l))
    }

    /// The lowest free number (what [`Self::allocate`] would pick).
    pub fn lowest_free(&self) -> Result<u32, IdentityError> {
        let mut n = self.next.max(FIRST_CLUSTER_IDENTITY);
        while self.by_id.contains_key(&n) {
            n = n.checked_add(1).ok_or(IdentityError::Exhausted)?;
        }
        Ok(n)
    }

    /// The number of `labels`, allocating the lowest free one if needed.
    pub fn allocate(&mut self, labels: &LabelSet) -> Result<u32, IdentityError> {
        if let Some(id) = self.get(labels) {
            return Ok(id);
        }
        let id = self.lowest_free()?;
        self.insert(id, labels.clone())?;
        self.next = id + 1;
        Ok(id)
    }

    /// Records a known (number, labels), e.g. one another node allocated.
    /// Returns the number now in effect for `labels` (the lowest of any
    /// duplicates).
    pub fn insert(&mut self, id: u32, labels: LabelSet) -> Result<u32, IdentityError> {
        if id < FIRST_CLUSTER_IDENTITY {
            return Err(IdentityError::Reserved(id));
        }
        if let Some(old) = self.by_id.insert(id, labels.clone())
            && old != labels
        {
            self.unlink(id, &old);
        }
        let effective = match self.by_labels.get(&labels) {
            Some(&cur) if cur < id => cur,
            _ => id,
        };
        self.by_labels.insert(labels, effective);
        Ok(effective)
    }

    fn unlink(&mut self, id: u32, labels: &LabelSet) {
        if self.by_labels.get(labels) == Some(&id) {
            let other = self
                .by_id
                .iter()
                .find(|(o, l)| **o != id && *l == labels)
                .map(|(o, _)| *o);
            match other {
                Some(o) => self.by_labels.insert(labels.clone(), o),
                None => self.by_labels.remove(labels),
            };
        }
    }

    /// Forgets a number. Returns its labels.
    pub fn remove(&mut self, id: u32) -> Option<LabelSet> {
        let labels = self.by_id.remove(&id)?;
        self.unlink(id, &labels);
        self.unused_since.remove(&id);
        self.next = self.next.min(id);
        Some(labels)
    }

    /// Marks a number used (cancels collection).
    pub fn mark_used(&mut self, id: u32) {
        self.unused_since.remove(&id);
    }

    /// Marks a number unused from `now` (collection after the grace period).
    pub fn mark_unused(&mut self, id: u32, now: Instant) {
        if self.by_id.contains_key(&id) {
            self.unused_since.entry(id).or_insert(now);
        }
    }

    /// Removes every number unused for at least `grace` and returns them.
    pub fn collect(&mut self, now: Instant, grace: Duration) -> Vec<(u32, LabelSet)> {
        let due: Vec<u32> = self
            .unused_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
            .map(|(id, _)| *id)
            .collect();
        let mut out: Vec<(u32, LabelSet)> = due
            .into_iter()
            .filter_map(|id| self.remove(id).map(|l| (id, l)))
            .collect();
        out.sort();
        out
    }
}

/// On-disk form of the table.
#[derive(Debug, Serialize, Deserialize)]
struct FileForm {
    version: u32,
    identities: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    id: u32,
    labels: Vec<String>,
}

/// The standalone identity state file (JSON), replaced atomically
/// (write a temporary file in the same directory, fsync, rename).
#[derive(Debug, Clone)]
pub struct IdentityFile {
    path: PathBuf,
}

impl IdentityFile {
    /// A state file at `path` (created on first save).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the table; a missing file is an empty table.
    pub fn load(&self) -> Result<IdentityTable, IdentityError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(IdentityTable::new()),
            Err(source) => {
                return Err(IdentityError::Io {
                    path: self.path.clone(),
                    call: "read",
                    source,
                });
            }
        };
        let form: FileForm = serde_json::from_str(&text).map_err(|e| IdentityError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        if form.version != 1 {
            return Err(IdentityError::Corrupt {
                path: self.path.clone(),
                message: format!("version {} (expected 1)", form.version),
            });
        }
        let mut t = IdentityTable::new();
        for e in form.identities {
            let labels = LabelSet::from_canonical(e.labels.iter().map(String::as_str))
                .map_err(|source| IdentityError::Label { id: e.id, source })?;
            t.insert(e.id, labels)?;
        }
        Ok(t)
    }

    /// Saves the table atomically.
    pub fn save(&self, t: &IdentityTable) -> Result<(), IdentityError> {
        let form = FileForm {
            version: 1,
            identities: t
                .iter()
                .map(|(id, l)| FileEntry {
                    id,
                    labels: l.canonical().into_iter().collect(),
                })
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&form).expect("plain data serializes");
        let io = |call: &'static str| {
            let path = self.path.clone();
            move |source| IdentityError::Io { path, call, source }
        };
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(io("create temporary file"))?;
        f.write_all(&text).map_err(io("write"))?;
        f.sync_all().map_err(io("fsync"))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io("rename"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ls(app: &str) -> LabelSet {
        LabelSet::from_pairs([("app", app), ("io.kubernetes.pod.namespace", "ns")])
    }

    #[test]
    fn allocation_is_lowest_free_and_stable_across_reload() {
        let dir = tempfile::tempdir().unwrap();
        let file = IdentityFile::new(dir.path().join("ids.json"));
        let mut t = file.load().unwrap();
        assert_eq!(t.allocate(&ls("a")).unwrap(), 256);
        assert_eq!(t.allocate(&ls("b")).unwrap(), 257);
        assert_eq!(t.allocate(&ls("a")).unwrap(), 256);
        file.save(&t).unwrap();
        let mut again = file.load().unwrap();
        assert_eq!(again.get(&ls("b")), Some(257));
        assert_eq!(again.allocate(&ls("c")).unwrap(), 258);
        again.remove(256);
        assert_eq!(
            again.allocate(&ls("d")).unwrap(),
            256,
            "freed numbers are reused"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn duplicates_resolve_to_the_lowest_and_gc_waits_for_grace() {
        let mut t = IdentityTable::new();
        assert_eq!(t.insert(300, ls("a")).unwrap(), 300);
        assert_eq!(t.insert(290, ls("a")).unwrap(), 290);
        assert_eq!(t.insert(310, ls("a")).unwrap(), 290);
        assert_eq!(t.get(&ls("a")), Some(290));
        t.remove(290);
        assert_eq!(t.get(&ls("a")), Some(300));
        assert!(t.insert(5, ls("z")).is_err());
        let now = Instant::now();
        t.mark_unused(300, now);
        assert!(
            t.collect(now + Duration::from_secs(59), Duration::from_secs(60))
                .is_empty()
        );
        t.mark_used(300);
        assert!(
            t.collect(now + Duration::from_secs(61), Duration::from_secs(60))
                .is_empty()
        );
        t.mark_unused(300, now);
        let gone = t.collect(now + Duration::from_secs(60), Duration::from_secs(60));
        assert_eq!(gone, vec![(300, ls("a"))]);
        assert_eq!(t.get(&ls("a")), Some(310));
    }
}
