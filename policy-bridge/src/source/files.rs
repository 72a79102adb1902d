//! Standalone source: a directory of multi-document YAML (or JSON) files
//! with Pods, Namespaces, Nodes and the four policy kinds.
//!
//! The directory is polled (default every second) rather than watched with
//! inotify: polling sees every change on every filesystem — including
//! ConfigMap volumes, whose updates are symlink swaps that inotify watches
//! on the files miss — costs one `readdir` and a few reads per second for a
//! manifest directory, and has no event-coalescing corner cases. Unchanged
//! files are not re-parsed.
//!
//! A file or document that cannot be read does not lose state: objects
//! that file produced before stay in force, and the error is published.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tokio::task::JoinHandle;

use super::{Publisher, Subscription};
use crate::engine::{Change, Engine, EngineConfig};
use crate::identity::{IdentityError, IdentityFile, IdentityTable};
use crate::model::{Invalid, ModelError, Object, ObjectKey, ObjectKind, parse_documents};
use crate::state::StateDiff;

/// Errors of the directory source.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The directory cannot be listed.
    #[error("reading directory {path}: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The identity state file failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The status report could not be encoded as JSON.
    #[error(transparent)]
    Status(#[from] crate::status::StatusError),
}

/// Settings of the directory source.
#[derive(Clone, Debug)]
pub struct FilesConfig {
    /// The manifest directory (files ending .yaml, .yml or .json; not recursive).
    pub dir: PathBuf,
    /// How often to look for changes.
    pub interval: Duration,
    /// Identity state file (None: identities live in memory only).
    pub identity_file: Option<PathBuf>,
    /// How long an unused identity is kept.
    pub identity_grace: Duration,
    /// How long a freed identity number stays quarantined (not given to
    /// another label set): at least the longest SVID lifetime plus margin.
    pub identity_quarantine: Duration,
    /// Engine settings.
    pub engine: EngineConfig,
    /// A file is read only once it was last modified at least this long
    /// ago (zero: at once), so a file being written in place is not taken
    /// half written — a prefix of a manifest can be valid YAML that means
    /// something else (a rule without its `authentication`, a policy
    /// missing). The first read at start takes every file as it is.
    pub settle: Duration,
}

impl FilesConfig {
    /// Defaults for `dir`: poll every second, 15 minutes identity grace,
    /// [`crate::identity::DEFAULT_QUARANTINE`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            interval: Duration::from_secs(1),
            identity_file: None,
            identity_grace: Duration::from_secs(15 * 60),
            identity_quarantine: crate::identity::DEFAULT_QUARANTINE,
            engine: EngineConfig::default(),
            settle: Duration::ZERO,
        }
    }
}

/// What one file gave: a digest of its text and of each object, not the
/// text or the objects — the engine holds what they mean, and a file is
/// parsed again only when its digest changes.
#[derive(Debug, Default)]
struct FileEntry {
    digest: Digest,
    objects: BTreeMap<ObjectKey, u64>,
    errors: Vec<String>,
    invalid: BTreeMap<ObjectKey, crate::model::ModelError>,
}

/// The directory source, driven by [`FilesSource::sync`] (or [`spawn`]).
#[derive(Debug)]
pub struct FilesSource {
    cfg: FilesConfig,
    id_file: Option<IdentityFile>,
    files: BTreeMap<PathBuf, FileEntry>,
    /// What the engine holds: each object's digest.
    applied: BTreeMap<ObjectKey, u64>,
    engine: Engine,
    errors: Vec<String>,
    /// The first sync is done (later ones honour `settle`).
    started: bool,
}

impl FilesSource {
    /// Loads the identity state file (if any); reads nothing else yet.
    pub fn new(cfg: FilesConfig) -> Result<Self, FilesError> {
        let id_file = cfg.identity_file.clone().map(IdentityFile::new);
        let table = match &id_file {
            Some(f) => f.load()?,
            None => IdentityTable::new(),
        };
        Ok(Self {
            engine: Engine::new(cfg.engine.clone(), table),
            cfg,
            id_file,
            files: BTreeMap::new(),
            applied: BTreeMap::new(),
            errors: Vec::new(),
            started: false,
        })
    }

    /// The engine (state, status).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Everything that could not be read in the last sync.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Reads the directory once and applies what changed.
    pub fn sync(&mut self) -> Result<StateDiff, FilesError> {
        self.sync_at(Instant::now(), SystemTime::now())
    }

    /// [`Self::sync`] at a given time (`now` and its wall-clock `wall`):
    /// identity collection and quarantine follow it.
    pub fn sync_at(&mut self, now: Instant, wall: SystemTime) -> Result<StateDiff, FilesError> {
        let dir = &self.cfg.dir;
        let rd = std::fs::read_dir(dir).map_err(|source| FilesError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.')
                    && [".yaml", ".yml", ".json"].iter().any(|s| name.ends_with(s))
            })
            .collect();
        paths.sort();
        let mut next = BTreeMap::new();
        let mut parsed = BTreeMap::new();
        let settle = self.cfg.settle;
        let started = std::mem::replace(&mut self.started, true);
        for p in paths {
            let old = self.files.remove(&p);
            // Modified within the settle time: possibly still being
            // written. What the file gave before stays; it is read on a
            // later round.
            let recent = started
                && !settle.is_zero()
                && std::fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|m| wall.duration_since(m).is_ok_and(|age| age < settle));
            if recent {
                tracing::debug!(path = %p.display(), "modified within the settle time; read later");
                if let Some(old) = old {
                    next.insert(p, old);
                }
                continue;
            }
            let (entry, objects) = read_file(&p, old, false);
            if let Some(objects) = objects {
                parsed.insert(p.clone(), objects);
            }
            next.insert(p, entry);
        }
        self.files = next;
        self.apply(parsed, now, wall)
    }

    /// Applies the files' objects: `parsed` holds the objects of the files
    /// read anew this time (the others are unchanged, known by digest).
    fn apply(
        &mut self,
        mut parsed: BTreeMap<PathBuf, BTreeMap<ObjectKey, Object>>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<StateDiff, FilesError> {
        // Each key's object comes from the last file (in name order) that
        // has it, as before.
        let mut wanted: BTreeMap<ObjectKey, (&PathBuf, u64)> = BTreeMap::new();
        let mut errors = Vec::new();
        for (path, f) in &self.files {
            for (k, d) in &f.objects {
                wanted.insert(k.clone(), (path, *d));
            }
            errors.extend(f.errors.iter().cloned());
        }
        let mut changes = Vec::new();
        for k in self.applied.keys() {
            if !wanted.contains_key(k) {
                changes.push(Change::Delete(k.clone()));
            }
        }
        let stale: Vec<(ObjectKey, PathBuf)> = wanted
            .iter()
            .filter(|(k, (_, d))| self.applied.get(*k) != Some(d))
            .map(|(k, (path, _))| ((*k).clone(), (*path).clone()))
            .collect();
        // An object that changed owner to a file not parsed this time (a
        // duplicate key left the later file): read that file again.
        for (_, path) in &stale {
            if !parsed.contains_key(path)
                && let Some(old) = self.files.remove(path)
            {
                let (entry, objects) = read_file(path, Some(old), true);
                parsed.insert(path.clone(), objects.unwrap_or_default());
                self.files.insert(path.clone(), entry);
            }
        }
        // Namespaces first so pods see their labels; policies last.
        let mut ups: Vec<Object> = stale
            .iter()
            .filter_map(|(k, path)| parsed.get_mut(path).and_then(|o| o.remove(k)))
            .collect();
        drop(parsed);
        ups.sort_by_key(|o| match o {
            Object::Namespace(_) => 0,
            Object::Node(_) => 1,
            Object::Pod(_) => 2,
            Object::Policy(_) => 3,
        });
        changes.extend(ups.into_iter().map(Change::Upsert));
        for f in self.files.values() {
            for (key, e) in f.invalid.iter() {
                changes.push(Change::Invalid(key.clone(), e.clone()));
            }
        }
        self.engine.set_now(Some(now));
        for c in changes {
            if let Err(e) = self.engine.apply(c) {
                errors.push(e.to_string());
            }
        }
        self.engine.set_now(None);
        self.applied = self
            .files
            .values()
            .flat_map(|f| f.objects.iter().map(|(k, d)| (k.clone(), *d)))
            .collect();
        let gone = self
            .engine
            .collect_identities(now, self.cfg.identity_grace, wall);
        if !gone.is_empty() {
            tracing::info!(count = gone.len(), quarantine = ?self.cfg.identity_quarantine, "freed unused identities into quarantine");
        }
        let released = self
            .engine
            .release_quarantined(wall, self.cfg.identity_quarantine);
        if !released.is_empty() {
            tracing::info!(identities = ?released, "quarantine over; numbers free for any label set");
        }
        if self.engine.take_table_dirty()
            && let Some(f) = &self.id_file
        {
            f.save(self.engine.table())?;
        }
        self.errors = errors;
        Ok(self.engine.commit())
    }
}

/// Reads one file: its entry, and the objects it gave if it was parsed
/// (`None`: unchanged since `old`, or unreadable). `force` parses it even
/// when unchanged.
fn read_file(
    p: &Path,
    old: Option<FileEntry>,
    force: bool,
) -> (FileEntry, Option<BTreeMap<ObjectKey, Object>>) {
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) => {
            // Keep what the file gave before; report the error.
            let mut keep = old.unwrap_or_default();
            keep.errors = vec![format!("{}: {e}", p.display())];
            keep.invalid.clear();
            return (keep, None);
        }
    };
    let digest = Digest::of(&text);
    let old = match old {
        Some(o) if o.digest == digest && !force => return (o, None),
        o => o,
    };
    let mut objects = BTreeMap::new();
    let mut entry = FileEntry {
        digest,
        ..FileEntry::default()
    };
    let mut failed = false;
    let origin = p.display().to_string();
    for r in parse_documents(&text, &origin).into_iter().map(|r| {
        r.and_then(|o| match without_phase(&o, &origin) {
            Some(inv) => Err(inv),
            None => Ok(o),
        })
    }) {
        match r {
            Ok(o) => {
                let key = o.key();
                entry.objects.insert(key.clone(), object_digest(&o));
                objects.insert(key, o);
            }
            Err(inv) => {
                failed = true;
                // A policy's error is reported once, in its status (as
                // rejected); everything else is a load error.
                match inv.key {
                    Some(k) if matches!(k.kind, ObjectKind::Policy(_)) => {
                        entry.invalid.insert(*k, inv.error);
                    }
                    Some(k) => {
                        entry.errors.push(inv.error.to_string());
                        entry.invalid.insert(*k, inv.error);
                    }
                    None => entry.errors.push(inv.error.to_string()),
                }
            }
        }
    }
    if failed {
        // Objects this file gave before and did not give now stay in force.
        for (k, d) in old.map(|o| o.objects).unwrap_or_default() {
            entry.objects.entry(k).or_insert(d);
        }
    }
    (entry, Some(objects))
}

/// A digest of everything an object says (its derived `Debug` form names
/// every field), to tell whether a re-read file changed it.
fn object_digest(o: &Object) -> u64 {
    use std::fmt::Write as _;
    use std::hash::Hasher as _;
    struct HashWriter(std::hash::DefaultHasher);
    impl std::fmt::Write for HashWriter {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    let mut w = HashWriter(std::hash::DefaultHasher::new());
    let _ = write!(w, "{o:?}");
    w.0.finish()
}

/// A file's content, to see that it did not change without keeping it: its
/// length and a 64-bit hash.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Digest {
    len: usize,
    hash: u64,
}

impl Digest {
    fn of(text: &str) -> Self {
        use std::hash::Hasher as _;
        let mut h = std::hash::DefaultHasher::new();
        h.write(text.as_bytes());
        Self {
            len: text.len(),
            hash: h.finish(),
        }
    }
}

/// A standalone Pod manifest must state `status.phase`: the API server
/// always sets it, so a Kubernetes pod never lacks it, but a hand-written
/// manifest easily does — and a pod that is not `Running` is never
/// enforced. Rather than guess, such a Pod is rejected with an error naming
/// the file and the field (and what was there before stays in force).
fn without_phase(o: &Object, origin: &str) -> Option<Invalid> {
    let Object::Pod(pod) = o else {
        return None;
    };
    if pod.status.as_ref().and_then(|s| s.phase.as_ref()).is_some() {
        return None;
    }
    let key = o.key();
    let name = match &key.namespace {
        Some(ns) => format!("{ns}/{}", key.name),
        None => key.name.clone(),
    };
    Some(Invalid {
        key: Some(Box::new(key)),
        error: ModelError::Field {
            object: format!("Pod {name} ({origin})"),
            path: "status.phase".into(),
            message: "missing: a standalone Pod manifest must state the pod's phase \
                      (`Running` for meshauth to enforce its traffic; `Pending`, \
                      `Succeeded` or `Failed` otherwise)"
                .into(),
        },
    })
}

/// Starts the directory source: reads the directory once (errors such as a
/// missing directory are returned here), then polls it every
/// `cfg.interval` until every [`Subscription`] is dropped.
pub fn spawn(cfg: FilesConfig) -> Result<(Subscription, JoinHandle<()>), FilesError> {
    let interval = cfg.interval;
    let mut src = FilesSource::new(cfg)?;
    let diff = src.sync()?;
    let (publisher, sub) = Publisher::new();
    publisher.publish(&src.engine, diff, src.errors.clone(), true);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if publisher.is_closed() {
                return;
            }
            match src.sync() {
                Ok(diff) => publisher.publish(&src.engine, diff, src.errors.clone(), true),
                Err(e) => {
                    tracing::warn!(error = %e, "manifest directory sync failed; keeping the previous state");
                    let mut errors = src.errors.clone();
                    errors.insert(0, e.to_string());
                    publisher.publish(&src.engine, StateDiff::default(), errors, true);
                }
            }
        }
    });
    Ok((sub, task))
}

/// `meshauth policy status --dir DIR`: what meshauth makes of every policy
/// in a manifest directory (the same compiler the agent runs), as text or
/// JSON. Returns the report and whether every policy was accepted or
/// partially enforced (none rejected, every file readable), so scripts and
/// CI can fail on a rejected policy.
pub fn status_report(dir: &Path, json: bool) -> Result<(String, bool), FilesError> {
    use crate::Verdict;
    use crate::status::{StatusError, render_json, render_text};
    let mut source = FilesSource::new(FilesConfig::new(dir))?;
    source.sync()?;
    let statuses = source.engine().status();
    let load_errors = source.errors().to_vec();
    let clean = load_errors.is_empty() && statuses.iter().all(|s| s.verdict != Verdict::Rejected);
    let report = if json {
        let policies: serde_json::Value =
            serde_json::from_str(&render_json(&statuses)?).map_err(StatusError::Json)?;
        serde_json::to_string_pretty(&serde_json::json!({
            "policies": policies,
            "load_errors": load_errors,
        }))
        .map_err(StatusError::Json)?
    } else {
        let mut out = render_text(&statuses);
        for e in &load_errors {
            out.push_str(&format!("load error: {e}\n"));
        }
        if statuses.is_empty() && load_errors.is_empty() {
            out.push_str(&format!("no policies in {}\n", dir.display()));
        }
        out
    };
    Ok((report, clean))
}
