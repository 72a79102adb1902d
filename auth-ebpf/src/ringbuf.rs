//! An async reader over a BPF ring buffer, shared by signals and events.

use std::path::Path;

use aya::maps::{Map, MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::error::DatapathError;
use crate::maps::open_pinned;
use crate::types::read_pod;

/// Reads fixed-size records of type `T` from a pinned ring buffer.
pub(crate) struct RingReader<T> {
    name: &'static str,
    fd: AsyncFd<RingBuf<MapData>>,
    /// Records whose length did not match `T` (a layout mismatch).
    pub(crate) malformed: u64,
    _t: std::marker::PhantomData<T>,
}

impl<T> std::fmt::Debug for RingReader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingReader")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: aya::Pod + Default> RingReader<T> {
    /// Opens the ring buffer pinned as `name` (needs a tokio runtime).
    pub(crate) fn open(pin_dir: &Path, name: &'static str) -> Result<Self, DatapathError> {
        let data = open_pinned(pin_dir, name)?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(DatapathError::map(name))?;
        let fd = register(ring).map_err(DatapathError::io("epoll register", name))?;
        Ok(Self {
            name,
            fd,
            malformed: 0,
            _t: std::marker::PhantomData,
        })
    }

    /// Waits for at least one record, then returns every record available.
    pub(crate) async fn next_batch(&mut self) -> Result<Vec<T>, DatapathError> {
        loop {
            let mut guard = self
                .fd
                .readable_mut()
                .await
                .map_err(DatapathError::io("epoll wait", self.name))?;
            let mut out = Vec::new();
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                match read_pod::<T>(&item) {
                    Some(v) if item.len() == std::mem::size_of::<T>() => out.push(v),
                    _ => self.malformed += 1,
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Returns the records available now without waiting.
    pub(crate) fn drain_now(&mut self) -> Vec<T> {
        let ring = self.fd.get_mut();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            match read_pod::<T>(&item) {
                Some(v) if item.len() == std::mem::size_of::<T>() => out.push(v),
                _ => self.malformed += 1,
            }
        }
        out
    }
}

#[allow(unsafe_code)]
fn register(ring: RingBuf<MapData>) -> std::io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the RingBuf owns its map fd (and the mmapped pages) for its
    // whole life, and `as_raw_fd` always returns that same fd; the AsyncFd
    // owns the RingBuf, so the fd stays open while registered.
    unsafe { Ok(AsyncFd::register(ring)?) }
}
