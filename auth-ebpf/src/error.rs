//! The datapath's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading, attaching or driving the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The pin directory is not on a bpffs mount.
    #[error("{path} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs {
        /// The directory that was checked.
        path: PathBuf,
    },
    /// A filesystem call on a pin or cgroup path failed.
    #[error("{call} {path}: {source}")]
    Io {
        /// The call that failed (`mkdir`, `open`, `statfs`, …).
        call: &'static str,
        /// The path it was called on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The embedded object could not be parsed.
    #[error("parsing the datapath object: {0}")]
    Object(#[from] aya_obj::ParseError),
    /// aya could not load the object (maps or BTF).
    #[error("loading the datapath object: {0}")]
    Load(#[from] aya::EbpfError),
    /// The object has no program or map of that name.
    #[error("the datapath object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The name looked for.
        name: &'static str,
    },
    /// A program could not be loaded, attached or detached.
    #[error("program {name}: {source}")]
    Program {
        /// The program's name.
        name: &'static str,
        /// aya's error (with the verifier log when loading failed).
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: aya::maps::MapError,
    },
    /// A map is full; the entry was not written and nothing stored was lost.
    #[error("map {name} is full ({max_entries} entries): the new entry was not written")]
    MapFull {
        /// The map's name.
        name: &'static str,
        /// Its capacity.
        max_entries: u32,
    },
    /// Pinning or unpinning a map or link failed.
    #[error("pinning {path}: {source}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// aya's error.
        #[source]
        source: aya::pin::PinError,
    },
    /// A pinned link could not be opened or released.
    #[error("pinned link {path}: {source}")]
    Link {
        /// The pin path.
        path: PathBuf,
        /// aya's error.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// No cgroup holding the pods was found.
    #[error("no pods cgroup found: looked for {tried}; set it explicitly")]
    NoPodsCgroup {
        /// The candidate paths, comma-separated.
        tried: String,
    },
    /// A value handed to a typed map API is out of range.
    #[error("invalid {what}: {value}")]
    Invalid {
        /// What was invalid (`prefix length`, …).
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

impl DatapathError {
    pub(crate) fn map(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| Self::Map { name, source }
    }

    pub(crate) fn program(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        move |source| Self::Program { name, source }
    }

    pub(crate) fn io(
        call: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { call, path, source }
    }
}
