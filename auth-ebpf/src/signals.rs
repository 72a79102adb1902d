//! Auth-required signals from the datapath to the agent.

use std::path::Path;

use crate::error::DatapathError;
use crate::maps::names;
use crate::ringbuf::RingReader;
use crate::types::{AuthKey, SignalMsg};

/// One signal: the datapath dropped (or, in audit mode, would have dropped)
/// a packet because `key` had no live auth entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    /// The pair to authenticate.
    pub key: AuthKey,
    /// When (CLOCK_BOOTTIME ns).
    pub boottime_ns: u64,
}

/// Reads signals from the pinned `meshauth_signals` ring buffer.
#[derive(Debug)]
pub struct SignalReader {
    ring: RingReader<SignalMsg>,
}

impl SignalReader {
    /// Opens the pinned ring buffer (needs a tokio runtime).
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            ring: RingReader::open(pin_dir, names::SIGNALS)?,
        })
    }

    /// Waits for signals; returns every one available.
    pub async fn next_batch(&mut self) -> Result<Vec<Signal>, DatapathError> {
        Ok(self
            .ring
            .next_batch()
            .await?
            .into_iter()
            .map(to_signal)
            .collect())
    }

    /// The signals available now, without waiting.
    pub fn drain_now(&mut self) -> Vec<Signal> {
        self.ring.drain_now().into_iter().map(to_signal).collect()
    }

    /// The signals as an async stream of batches (ends on a read error,
    /// which it yields first).
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<Vec<Signal>, DatapathError>> + Send {
        futures::stream::unfold(Some(self), |reader| async move {
            let mut reader = reader?;
            match reader.next_batch().await {
                Ok(batch) => Some((Ok(batch), Some(reader))),
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    /// Records of the wrong size seen so far (a layout mismatch).
    pub fn malformed(&self) -> u64 {
        self.ring.malformed
    }
}

fn to_signal(m: SignalMsg) -> Signal {
    Signal {
        key: m.key,
        boottime_ns: m.ts,
    }
}
