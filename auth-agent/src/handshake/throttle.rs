//! Log throttling per peer: anyone who reaches the handshake port can make
//! the responder refuse, so refusals are logged at most once per peer and
//! interval (with the number suppressed since the last line); metrics count
//! every one. The auth manager throttles its failed handshakes the same way,
//! per peer node and failure kind.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How many peers are tracked at once; beyond it, the peers not tracked
/// share one entry (so many source addresses cannot flood the logs either).
pub const DEFAULT_MAX_PEERS: usize = 4096;

#[derive(Debug)]
struct Entry {
    last: Instant,
    suppressed: u64,
}

/// Decides whether a line about a peer (an address, by default) is logged
/// now.
#[derive(Debug)]
pub struct LogThrottle<K = IpAddr> {
    interval: Duration,
    max_peers: usize,
    peers: Mutex<HashMap<Option<K>, Entry>>,
}

impl<K: Hash + Eq> LogThrottle<K> {
    /// At most one line per peer per `interval`, tracking up to `max_peers`.
    pub fn new(interval: Duration, max_peers: usize) -> Self {
        Self {
            interval,
            max_peers: max_peers.max(1),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when a line for `peer` may be logged now, `n` being how
    /// many were suppressed for it since its last line; `None` when this one
    /// is suppressed.
    pub fn allow(&self, peer: K) -> Option<u64> {
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = Some(peer);
        if !peers.contains_key(&key) && peers.len() >= self.max_peers {
            let interval = self.interval;
            peers.retain(|_, e| now.duration_since(e.last) < interval);
            if peers.len() >= self.max_peers {
                key = None;
            }
        }
        match peers.get_mut(&key) {
            Some(e) if now.duration_since(e.last) < self.interval => {
                e.suppressed += 1;
                None
            }
            Some(e) => {
                let n = std::mem::take(&mut e.suppressed);
                e.last = now;
                Some(n)
            }
            None => {
                peers.insert(
                    key,
                    Entry {
                        last: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test(start_paused = true)]
    async fn one_line_per_peer_per_interval_with_the_suppressed_count() {
        let t = LogThrottle::new(Duration::from_secs(60), 16);
        let a = ip("10.0.0.1");
        assert_eq!(t.allow(a), Some(0));
        for _ in 0..999 {
            assert_eq!(t.allow(a), None);
        }
        // Another peer is not held back by the first.
        assert_eq!(t.allow(ip("10.0.0.2")), Some(0));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(t.allow(a), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(t.allow(a), Some(1000));
        assert_eq!(t.allow(a), None);
    }

    #[tokio::test(start_paused = true)]
    async fn peers_beyond_the_cap_share_one_entry() {
        let t = LogThrottle::new(Duration::from_secs(60), 2);
        assert_eq!(t.allow(ip("10.0.0.1")), Some(0));
        assert_eq!(t.allow(ip("10.0.0.2")), Some(0));
        // Full: every further address shares one line per interval.
        assert_eq!(t.allow(ip("10.0.0.3")), Some(0));
        for i in 4..200 {
            assert_eq!(t.allow(ip(&format!("10.0.0.{i}"))), None, "10.0.0.{i}");
        }
        // Stale entries are dropped to make room once the interval has passed.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.allow(ip("10.0.1.1")), Some(0));
    }
}
