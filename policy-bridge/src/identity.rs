//! Identity allocation: canonical label set ↔ number (≥ 256), stable across
//! restarts. The table is in memory; [`IdentityFile`] persists it for
//! standalone mode (atomic replace), and the Kubernetes source persists it
//! as `MeshIdentity` objects (`source::kube`).
//!
//! Rules every node follows so all agree: a new label set gets the lowest
//! free number; if two numbers ever carry the same labels (two nodes raced),
//! the lowest wins everywhere and the other is collected once unused.
//! Identities no pod uses are collected after a grace period.
//!
//! Quarantine: a collected number is not given to another label set until
//! every SVID that could carry it has expired, or a certificate issued for
//! the old label set would authenticate as the new one. It is *freed* with
//! its wall-clock time (`freed_at`) and stays quarantined for at least the
//! longest SVID lifetime plus margin ([`DEFAULT_QUARANTINE`], configurable);
//! the freed-at time is persisted (state file, MeshIdentity `freedAt`) so a
//! restart does not forget it. The same label set coming back takes its
//! quarantined number back: any SVID still carrying that number names the
//! same label set, so nothing is confused, and pods keep their identity
//! across a short absence.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

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

/// Default quarantine of a freed number: SPIRE's default X.509-SVID TTL
/// (1 h) plus 30 minutes of margin (clock skew, an SVID issued just before
/// its entry was deleted, a slow registration-entry reconciler).
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(90 * 60);

/// A freed number waiting for every SVID that could carry it to expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The label set it had.
    pub labels: LabelSet,
    /// When it was freed (wall clock: SVID expiry is wall-clock time).
    pub freed_at: SystemTime,
}

/// Label sets and their numbers.
#[derive(Debug, Default, Clone)]
pub struct IdentityTable {
    by_labels: HashMap<LabelSet, u32>,
    by_id: BTreeMap<u32, LabelSet>,
    next: u32,
    unused_since: HashMap<u32, Instant>,
    quarantined: BTreeMap<u32, Quarantined>,
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

    /// The lowest free number (what [`Self::allocate`] would pick for a
    /// label set without a quarantined number): neither in use nor
    /// quarantined.
    pub fn lowest_free(&self) -> Result<u32, IdentityError> {
        let mut n = self.next.max(FIRST_CLUSTER_IDENTITY);
        while self.by_id.contains_key(&n) || self.quarantined.contains_key(&n) {
            n = n.checked_add(1).ok_or(IdentityError::Exhausted)?;
        }
        Ok(n)
    }

    /// The number of `labels`: its current one; else the lowest number
    /// quarantined with exactly these labels (taken back); else the lowest
    /// free one.
    pub fn allocate(&mut self, labels: &LabelSet) -> Result<u32, IdentityError> {
        if let Some(id) = self.get(labels) {
            return Ok(id);
        }
        if let Some(id) = self.quarantined_for(labels) {
            self.quarantined.remove(&id);
            self.insert(id, labels.clone())?;
            return Ok(id);
        }
        let id = self.lowest_free()?;
        self.insert(id, labels.clone())?;
        self.next = id + 1;
        Ok(id)
    }

    /// The lowest number quarantined with exactly `labels`.
    pub fn quarantined_for(&self, labels: &LabelSet) -> Option<u32> {
        self.quarantined
            .iter()
            .find(|(_, q)| &q.labels == labels)
            .map(|(id, _)| *id)
    }

    /// Every quarantined number.
    pub fn quarantined(&self) -> impl Iterator<Item = (u32, &Quarantined)> {
        self.quarantined.iter().map(|(id, q)| (*id, q))
    }

    /// Records a quarantined number (read back from where it persists, or
    /// freed by another node). A number in use is taken out of use; an
    /// earlier freed-at time already known is kept (the longer quarantine).
    pub fn quarantine(
        &mut self,
        id: u32,
        labels: LabelSet,
        freed_at: SystemTime,
    ) -> Result<(), IdentityError> {
        if id < FIRST_CLUSTER_IDENTITY {
            return Err(IdentityError::Reserved(id));
        }
        if let Some(old) = self.by_id.remove(&id) {
            self.unlink(id, &old);
            self.unused_since.remove(&id);
        }
        let freed_at = match self.quarantined.get(&id) {
            Some(q) if q.labels == labels => q.freed_at.min(freed_at),
            _ => freed_at,
        };
        self.quarantined
            .insert(id, Quarantined { labels, freed_at });
        Ok(())
    }

    /// Frees a number in use: it leaves the table and is quarantined from
    /// `at`. Returns its labels.
    pub fn free(&mut self, id: u32, at: SystemTime) -> Option<LabelSet> {
        let labels = self.remove(id)?;
        self.quarantined.insert(
            id,
            Quarantined {
                labels: labels.clone(),
                freed_at: at,
            },
        );
        Some(labels)
    }

    /// Ends one number's quarantine now (its persisted form is gone).
    pub fn end_quarantine(&mut self, id: u32) -> bool {
        let was = self.quarantined.remove(&id).is_some();
        if was {
            self.next = self.next.min(id);
        }
        was
    }

    /// Ends the quarantine of every number freed at least `quarantine`
    /// before `now`; returns them (sorted). They may now go to any label set.
    pub fn release_quarantined(&mut self, now: SystemTime, quarantine: Duration) -> Vec<u32> {
        let done: Vec<u32> = self
            .quarantined
            .iter()
            .filter(|(_, q)| {
                now.duration_since(q.freed_at)
                    .is_ok_and(|since| since >= quarantine)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &done {
            self.quarantined.remove(id);
            self.next = self.next.min(*id);
        }
        done
    }

    /// Records a known (number, labels), e.g. one another node allocated.
    /// Returns the number now in effect for `labels` (the lowest of any
    /// duplicates).
    pub fn insert(&mut self, id: u32, labels: LabelSet) -> Result<u32, IdentityError> {
        if id < FIRST_CLUSTER_IDENTITY {
            return Err(IdentityError::Reserved(id));
        }
        // In use again (taken back, or live elsewhere): no longer quarantined.
        self.quarantined.remove(&id);
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

    /// Forgets a number without quarantining it (its quarantine, if any,
    /// is kept). Returns its labels.
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

    /// Frees every number unused for at least `grace` (quarantined from
    /// `wall`, the wall-clock time of `now`) and returns them.
    pub fn collect(
        &mut self,
        now: Instant,
        grace: Duration,
        wall: SystemTime,
    ) -> Vec<(u32, LabelSet)> {
        let due: Vec<u32> = self
            .unused_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
            .map(|(id, _)| *id)
            .collect();
        let mut out: Vec<(u32, LabelSet)> = due
            .into_iter()
            .filter_map(|id| self.free(id, wall).map(|l| (id, l)))
            .collect();
        out.sort();
        out
    }
}

/// On-disk form of the table. Version 2 added `quarantined`; version 1
/// files (no quarantine) are read as having none.
#[derive(Debug, Serialize, Deserialize)]
struct FileForm {
    version: u32,
    identities: Vec<FileEntry>,
    #[serde(default)]
    quarantined: Vec<FileQuarantined>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    id: u32,
    labels: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileQuarantined {
    id: u32,
    labels: Vec<String>,
    /// Unix time (seconds) the number was freed.
    freed_at: u64,
}

/// Unix seconds of a wall-clock time (0 before the epoch).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The wall-clock time of unix seconds.
pub fn from_unix_seconds(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
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
        if form.version != 1 && form.version != 2 {
            return Err(IdentityError::Corrupt {
                path: self.path.clone(),
                message: format!("version {} (expected 1 or 2)", form.version),
            });
        }
        let mut t = IdentityTable::new();
        for e in form.identities {
            let labels = LabelSet::from_canonical(e.labels.iter().map(String::as_str))
                .map_err(|source| IdentityError::Label { id: e.id, source })?;
            t.insert(e.id, labels)?;
        }
        for q in form.quarantined {
            if t.labels(q.id).is_some() {
                return Err(IdentityError::Corrupt {
                    path: self.path.clone(),
                    message: format!("identity {} is both in use and quarantined", q.id),
                });
            }
            let labels = LabelSet::from_canonical(q.labels.iter().map(String::as_str))
                .map_err(|source| IdentityError::Label { id: q.id, source })?;
            t.quarantine(q.id, labels, from_unix_seconds(q.freed_at))?;
        }
        Ok(t)
    }

    /// Saves the table atomically.
    pub fn save(&self, t: &IdentityTable) -> Result<(), IdentityError> {
        let form = FileForm {
            version: 2,
            identities: t
                .iter()
                .map(|(id, l)| FileEntry {
                    id,
                    labels: l.canonical().into_iter().collect(),
                })
                .collect(),
            quarantined: t
                .quarantined()
                .map(|(id, q)| FileQuarantined {
                    id,
                    labels: q.labels.canonical().into_iter().collect(),
                    // Rounded up: a reload never shortens the quarantine.
                    freed_at: unix_seconds(q.freed_at)
                        + u64::from(q.freed_at > from_unix_seconds(unix_seconds(q.freed_at))),
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
        // The rename is durable only once the directory is.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory"))?;
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
            t.collect(
                now + Duration::from_secs(59),
                Duration::from_secs(60),
                SystemTime::now()
            )
            .is_empty()
        );
        t.mark_used(300);
        assert!(
            t.collect(
                now + Duration::from_secs(61),
                Duration::from_secs(60),
                SystemTime::now()
            )
            .is_empty()
        );
        t.mark_unused(300, now);
        let gone = t.collect(
            now + Duration::from_secs(60),
            Duration::from_secs(60),
            SystemTime::now(),
        );
        assert_eq!(gone, vec![(300, ls("a"))]);
        assert_eq!(t.get(&ls("a")), Some(310));
    }

    const Q: Duration = DEFAULT_QUARANTINE;

    #[test]
    fn a_freed_number_goes_to_no_other_label_set_before_its_quarantine_ends() {
        let t0 = Instant::now();
        let wall0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let grace = Duration::from_secs(15 * 60);
        let mut t = IdentityTable::new();
        assert_eq!(t.allocate(&ls("a")).unwrap(), 256);
        t.mark_unused(256, t0);
        // Collected after the grace period: freed into quarantine at wall0 + grace.
        let freed_at = wall0 + grace;
        assert_eq!(t.collect(t0 + grace, grace, freed_at), vec![(256, ls("a"))]);
        assert_eq!(t.get(&ls("a")), None, "no longer in use");
        // Another label set, any time before the quarantine ends: not 256.
        for before in [Duration::ZERO, Q / 2, Q - Duration::from_secs(1)] {
            let mut probe = t.clone();
            assert!(probe.release_quarantined(freed_at + before, Q).is_empty());
            assert_eq!(
                probe.allocate(&ls("b")).unwrap(),
                257,
                "256 went to another label set {before:?} after it was freed"
            );
        }
        // At freed + quarantine it is free for anyone.
        assert_eq!(t.release_quarantined(freed_at + Q, Q), vec![256]);
        assert_eq!(t.allocate(&ls("b")).unwrap(), 256);
    }

    #[test]
    fn the_same_label_set_takes_its_quarantined_number_back() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut t = IdentityTable::new();
        assert_eq!(t.allocate(&ls("a")).unwrap(), 256);
        assert_eq!(t.allocate(&ls("b")).unwrap(), 257);
        assert_eq!(t.free(256, wall), Some(ls("a")));
        assert_eq!(t.allocate(&ls("c")).unwrap(), 258, "256 is quarantined");
        assert_eq!(t.allocate(&ls("a")).unwrap(), 256, "a gets 256 back");
        assert_eq!(t.quarantined().count(), 0);
    }

    #[test]
    fn quarantine_survives_a_reload_of_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = IdentityFile::new(dir.path().join("ids.json"));
        // Sub-second freed-at: the file rounds up, never shortening the quarantine.
        let freed_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_500);
        let mut t = file.load().unwrap();
        assert_eq!(t.allocate(&ls("a")).unwrap(), 256);
        assert_eq!(t.allocate(&ls("b")).unwrap(), 257);
        t.free(256, freed_at);
        file.save(&t).unwrap();

        let mut again = file.load().unwrap();
        let q: Vec<_> = again.quarantined().map(|(id, q)| (id, q.clone())).collect();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].0, 256);
        assert_eq!(q[0].1.labels, ls("a"));
        assert!(q[0].1.freed_at >= freed_at && q[0].1.freed_at < freed_at + Duration::from_secs(1));
        assert!(
            again
                .release_quarantined(freed_at + Q - Duration::from_secs(1), Q)
                .is_empty()
        );
        assert_eq!(
            again.allocate(&ls("c")).unwrap(),
            258,
            "a restart forgot the quarantine of 256"
        );
        assert_eq!(
            again.release_quarantined(freed_at + Q + Duration::from_secs(1), Q),
            vec![256]
        );
        file.save(&again).unwrap();
        let mut third = file.load().unwrap();
        assert_eq!(third.quarantined().count(), 0);
        assert_eq!(third.allocate(&ls("d")).unwrap(), 256);

        // A version-1 file (before quarantine) still loads.
        std::fs::write(
            file.path(),
            r#"{"version":1,"identities":[{"id":300,"labels":["k8s:app=x"]}]}"#,
        )
        .unwrap();
        assert_eq!(file.load().unwrap().len(), 1);
        // A number both in use and quarantined is refused, naming the file.
        std::fs::write(
            file.path(),
            r#"{"version":2,"identities":[{"id":300,"labels":["k8s:app=x"]}],"quarantined":[{"id":300,"labels":["k8s:app=y"],"freed_at":1}]}"#,
        )
        .unwrap();
        let e = file.load().unwrap_err().to_string();
        assert!(
            e.contains("ids.json") && e.contains("both in use and quarantined"),
            "{e}"
        );
    }
}
