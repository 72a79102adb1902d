//! Where authenticated pairs go: the datapath's auth map, behind a trait so
//! the manager's logic is tested without a kernel.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use auth_ebpf::maps::auth::{AUTH_TYPE_MTLS, AuthMap};
use auth_ebpf::types::AuthKey;

/// One authenticated pair as the datapath keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Pair {
    /// Local identity.
    pub local: u32,
    /// Remote identity.
    pub remote: u32,
    /// The remote's node id (0 = this node).
    pub node: u16,
}

impl Pair {
    fn key(self) -> AuthKey {
        AuthKey {
            local_id: self.local,
            remote_id: self.remote,
            remote_node_id: self.node,
            auth_type: AUTH_TYPE_MTLS,
            pad: 0,
        }
    }
}

impl std::fmt::Display for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {}, node {})", self.local, self.remote, self.node)
    }
}

/// Errors of an auth store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The datapath map failed (full, gone, …).
    #[error("auth map: {0}")]
    Datapath(#[from] auth_ebpf::DatapathError),
}

impl StoreError {
    /// True when the map is full (nothing was lost; room must be made).
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            Self::Datapath(auth_ebpf::DatapathError::MapFull { .. })
        )
    }
}

/// The auth map as the manager and the handshake server use it.
pub trait AuthStore: Send + Sync + 'static {
    /// Writes or replaces a pair's entry.
    fn upsert(&self, pair: Pair, expiry: SystemTime) -> Result<(), StoreError>;
    /// Removes a pair; `false` if it had none.
    fn remove(&self, pair: Pair) -> Result<bool, StoreError>;
    /// Every entry (meshauth/1 ones).
    fn entries(&self) -> Result<Vec<(Pair, SystemTime)>, StoreError>;
}

/// The pinned eBPF auth map.
#[derive(Debug)]
pub struct BpfAuthStore {
    map: Mutex<AuthMap>,
}

impl BpfAuthStore {
    /// Opens the auth map pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            map: Mutex::new(AuthMap::open(pin_dir)?),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AuthStore for BpfAuthStore {
    fn upsert(&self, pair: Pair, expiry: SystemTime) -> Result<(), StoreError> {
        Ok(self.lock().insert(pair.key(), expiry)?)
    }

    fn remove(&self, pair: Pair) -> Result<bool, StoreError> {
        Ok(self.lock().remove(&pair.key())?)
    }

    fn entries(&self) -> Result<Vec<(Pair, SystemTime)>, StoreError> {
        Ok(self
            .lock()
            .entries()?
            .into_iter()
            .filter(|(k, _)| k.auth_type == AUTH_TYPE_MTLS)
            .map(|(k, t)| {
                (
                    Pair {
                        local: k.local_id,
                        remote: k.remote_id,
                        node: k.remote_node_id,
                    },
                    t,
                )
            })
            .collect())
    }
}

/// An in-memory store (tests, and a dry-run mode).
#[derive(Debug, Default)]
pub struct MemoryAuthStore {
    map: Mutex<BTreeMap<Pair, SystemTime>>,
}

impl MemoryAuthStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Pair, SystemTime>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the entries, sorted.
    pub fn snapshot(&self) -> BTreeMap<Pair, SystemTime> {
        self.lock().clone()
    }
}

impl AuthStore for MemoryAuthStore {
    fn upsert(&self, pair: Pair, expiry: SystemTime) -> Result<(), StoreError> {
        self.lock().insert(pair, expiry);
        Ok(())
    }

    fn remove(&self, pair: Pair) -> Result<bool, StoreError> {
        Ok(self.lock().remove(&pair).is_some())
    }

    fn entries(&self) -> Result<Vec<(Pair, SystemTime)>, StoreError> {
        Ok(self.lock().iter().map(|(p, t)| (*p, *t)).collect())
    }
}
