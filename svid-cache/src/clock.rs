//! Wall-clock time behind a trait, so tests control it.
//!
//! Certificates speak wall-clock time ([`SystemTime`]); timers speak tokio's
//! monotonic [`Instant`]. A [`Clock`] gives the current wall-clock time and turns a
//! wall-clock deadline into a tokio instant. [`SystemClock`] is the real one;
//! [`TokioClock`] derives wall-clock time from tokio's clock, so a test with
//! `#[tokio::test(start_paused = true)]` moves certificate time with
//! `tokio::time::advance` (or by auto-advance while sleeping).

use std::fmt::Debug;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;

    /// The tokio instant at which wall-clock time `at` is reached, as seen now.
    ///
    /// Timers re-check [`Clock::now`] when they fire, so a wall clock that jumps
    /// only makes a timer fire early or late, never skip an expiry.
    fn deadline(&self, at: SystemTime) -> Instant {
        let now = Instant::now();
        match at.duration_since(self.now()) {
            Ok(ahead) => now.checked_add(ahead).unwrap_or(now + FAR_FUTURE),
            Err(_) => now,
        }
    }
}

/// Used for deadlines too far ahead for `Instant` arithmetic.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Wall-clock time derived from tokio's clock: `start` plus the tokio time elapsed
/// since construction. With tokio's time paused it only moves when tokio time does.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: SystemTime,
    anchor: Instant,
}

impl TokioClock {
    /// A clock reading `start` now.
    pub fn starting_at(start: SystemTime) -> Self {
        Self {
            start,
            anchor: Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.start + self.anchor.elapsed()
    }

    fn deadline(&self, at: SystemTime) -> Instant {
        match at.duration_since(self.start) {
            Ok(d) => self
                .anchor
                .checked_add(d)
                .unwrap_or(self.anchor + FAR_FUTURE),
            Err(_) => self.anchor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = TokioClock::starting_at(t0);
        assert_eq!(clock.now(), t0);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), t0 + Duration::from_secs(90));
        let at = t0 + Duration::from_secs(100);
        tokio::time::sleep_until(clock.deadline(at)).await;
        assert_eq!(clock.now(), at);
        // A deadline in the past is now.
        assert_eq!(clock.deadline(t0), clock.anchor);
    }

    #[tokio::test]
    async fn system_clock_deadline_is_relative_to_now() {
        let clock = SystemClock;
        let d = clock.deadline(SystemTime::now() + Duration::from_secs(60));
        let ahead = d - Instant::now();
        assert!(ahead > Duration::from_secs(59) && ahead <= Duration::from_secs(60));
        let past = clock.deadline(SystemTime::now() - Duration::from_secs(60));
        assert!(past <= Instant::now());
    }
}
