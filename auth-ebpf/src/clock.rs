//! The agent's wall-clock time, and conversions between it (certificate
//! expiry) and `CLOCK_BOOTTIME` nanoseconds (what the datapath compares
//! against with `bpf_ktime_get_boot_ns`). BOOTTIME keeps counting through
//! suspend, so an entry never outlives its certificate because the node slept.
//!
//! The agent's wall-clock time is BOOTTIME plus the offset between the wall
//! clock and BOOTTIME sampled once, when the process first asks
//! ([`agent_now`]). A step of the system's wall clock after that (an NTP
//! step, a mistaken `date -s`) does not move it: certificates do not all
//! look expired after a jump forward, nor a peer's fresh one not yet valid
//! after a jump back, auth entries keep the expiry their certificates give
//! them, and re-authentication stays on schedule. [`wall_clock_step`] says
//! how far the system's wall clock now is from the agent's (the agent
//! reports it); restarting the agent adopts the system's time.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds since the Unix epoch of `t` (negative before it).
fn unix_ns(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn from_unix_ns(ns: i128) -> SystemTime {
    if ns >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.min(u64::MAX as i128) as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_nanos((-ns).min(u64::MAX as i128) as u64)
    }
}

/// Wall-clock nanoseconds minus BOOTTIME nanoseconds, sampled at first use.
fn offset_ns() -> i128 {
    static OFFSET: OnceLock<i128> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        let boot = boottime_now_ns() as i128;
        unix_ns(SystemTime::now()) - boot
    })
}

/// The agent's wall-clock time: BOOTTIME plus the offset sampled at first
/// use. Steps of the system clock after that do not move it.
pub fn agent_now() -> SystemTime {
    from_unix_ns(boottime_now_ns() as i128 + offset_ns())
}

/// How far the system's wall clock is ahead of the agent's (negative:
/// behind), in seconds: the steps it took since the agent sampled it.
pub fn wall_clock_step() -> f64 {
    let agent = agent_now();
    let wall = SystemTime::now();
    match wall.duration_since(agent) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Now on `CLOCK_BOOTTIME`, in nanoseconds.
pub fn boottime_now_ns() -> u64 {
    let ts = clock_gettime(ClockId::Boottime);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `CLOCK_BOOTTIME` instant of an agent wall-clock time ([`agent_now`]'s
/// scale). A time before boot saturates at 0.
pub fn system_to_boottime_ns(t: SystemTime) -> u64 {
    (unix_ns(t) - offset_ns()).clamp(0, u64::MAX as i128) as u64
}

/// The agent wall-clock time of a `CLOCK_BOOTTIME` instant.
pub fn boottime_to_system(ns: u64) -> SystemTime {
    from_unix_ns(ns as i128 + offset_ns())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_within_a_millisecond() {
        // Past times only as far back as the machine has been up: earlier
        // ones saturate at boot (see the next test).
        let up = (boottime_now_ns() / 1_000_000_000) as i64;
        for offset in [-(up / 2), -1, 0, 1, 3600, 86_400 * 30] {
            let t = if offset >= 0 {
                SystemTime::now() + Duration::from_secs(offset as u64)
            } else {
                SystemTime::now() - Duration::from_secs((-offset) as u64)
            };
            let back = boottime_to_system(system_to_boottime_ns(t));
            let diff = match back.duration_since(t) {
                Ok(d) => d,
                Err(e) => e.duration(),
            };
            assert!(
                diff < Duration::from_millis(1),
                "offset {offset}s drifted by {diff:?}"
            );
        }
    }

    #[test]
    fn before_boot_saturates_at_zero() {
        let up = boottime_now_ns() / 1_000_000_000;
        let t = SystemTime::now() - Duration::from_secs(up + 60);
        assert_eq!(system_to_boottime_ns(t), 0);
    }

    #[test]
    fn agent_time_is_boottime_plus_a_fixed_offset() {
        let a = (agent_now(), boottime_now_ns());
        std::thread::sleep(Duration::from_millis(20));
        let b = (agent_now(), boottime_now_ns());
        let agent = b.0.duration_since(a.0).expect("agent time goes forward");
        let boot = Duration::from_nanos(b.1 - a.1);
        let diff = agent.abs_diff(boot);
        assert!(diff < Duration::from_millis(1), "{agent:?} vs {boot:?}");
        // Nobody stepped this machine's clock during the test.
        assert!(wall_clock_step().abs() < 0.5, "{}", wall_clock_step());
    }

    #[test]
    fn future_maps_ahead_of_boottime_now() {
        let now = boottime_now_ns();
        let later = system_to_boottime_ns(SystemTime::now() + Duration::from_secs(10));
        assert!(later > now + 9_000_000_000, "{later} vs {now}");
        assert!(later < now + 11_000_000_000, "{later} vs {now}");
    }
}

/// `CLOCK_BOOTTIME − CLOCK_MONOTONIC` in nanoseconds: how long the machine
/// has been suspended since boot. It only grows, and only across a suspend.
/// MONOTONIC is read first, so the reading is never below the true value
/// (it is above it by the time between the two reads): the datapath's
/// coarse estimate of BOOTTIME built on it errs late, never early.
pub fn suspended_ns() -> u64 {
    let ts = clock_gettime(ClockId::Monotonic);
    let mono = (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64;
    let boot = boottime_now_ns();
    boot.saturating_sub(mono)
}

/// Notices a suspend: the socket verdict cache keeps deadlines on the
/// monotonic clock, which stands still while suspended, so after a resume
/// every cached verdict must be dropped (the agent bumps the map
/// generation). Feed it [`suspended_ns`] readings; it says when the
/// suspended time grew by more than `tolerance` since the last reading.
#[derive(Debug, Clone)]
pub struct SuspendWatch {
    last: u64,
    tolerance_ns: u64,
}

impl SuspendWatch {
    /// Starts from `reading`; growth up to `tolerance` is ignored (the two
    /// clocks are read one after the other, a few µs apart).
    pub fn new(reading: u64, tolerance: std::time::Duration) -> Self {
        Self {
            last: reading,
            tolerance_ns: tolerance.as_nanos().min(u128::from(u64::MAX)) as u64,
        }
    }

    /// True when the machine was suspended since the previous reading.
    pub fn resumed(&mut self, reading: u64) -> bool {
        let grew = reading.saturating_sub(self.last);
        self.last = self.last.max(reading);
        grew > self.tolerance_ns
    }
}

/// Whether the datapath's config must be told of a suspend: the watch saw
/// the suspended time grow since its last reading, or the config holds a
/// suspended time (`written`) more than `tolerance` behind `now` (a resume
/// between the config's write and the watch's first reading).
pub fn config_behind(
    watch: &mut SuspendWatch,
    now: u64,
    written: Option<u64>,
    tolerance: Duration,
) -> bool {
    let seen = watch.resumed(now);
    let behind = written.is_some_and(|w| {
        now.saturating_sub(w) > tolerance.as_nanos().min(u128::from(u64::MAX)) as u64
    });
    seen || behind
}

/// Runs until aborted: every `every`, reads the suspended time and, after a
/// resume, writes it into the datapath's config and bumps the map
/// generation ([`crate::maps::config::ConfigMap::resumed`]), so the coarse
/// clock of the authenticated path (`bpf/lib/clock.h`) counts the time
/// asleep again and no socket keeps a verdict whose coarse-clock deadline
/// slept through the suspend.
pub async fn bump_generation_on_resume(
    pin_dir: std::path::PathBuf,
    every: Duration,
) -> Result<(), crate::DatapathError> {
    let tolerance = Duration::from_millis(100);
    let mut config = crate::maps::config::ConfigMap::open(&pin_dir)?;
    let mut watch = SuspendWatch::new(suspended_ns(), tolerance);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = suspended_ns();
        if config_behind(&mut watch, now, config.suspended_ns()?, tolerance) {
            let generation = config.resumed(now)?;
            tracing::info!(
                generation,
                suspended_s = now as f64 / 1e9,
                "resumed from suspend: the datapath's suspended time updated, socket-cached verdicts invalidated"
            );
        }
    }
}

#[cfg(test)]
mod suspend_tests {
    use super::*;

    #[test]
    fn a_jump_in_suspended_time_is_a_resume() {
        let tol = Duration::from_millis(100);
        let mut w = SuspendWatch::new(5_000_000_000, tol);
        assert!(!w.resumed(5_000_000_000));
        assert!(!w.resumed(5_000_050_000), "read jitter is not a suspend");
        assert!(w.resumed(65_000_000_000), "a minute asleep");
        assert!(!w.resumed(65_000_000_000));
        assert!(!w.resumed(64_000_000_000), "never goes backwards");
    }

    #[test]
    fn a_config_behind_the_suspended_time_is_updated_even_if_the_watch_saw_nothing() {
        let tol = Duration::from_millis(100);
        let mut w = SuspendWatch::new(65_000_000_000, tol);
        // The config was written before a minute-long suspend the watch
        // started after.
        assert!(config_behind(
            &mut w,
            65_000_000_000,
            Some(5_000_000_000),
            tol
        ));
        assert!(!config_behind(
            &mut w,
            65_000_000_000,
            Some(65_000_000_000),
            tol
        ));
        assert!(
            !config_behind(&mut w, 65_000_050_000, Some(65_000_000_000), tol),
            "read jitter"
        );
        assert!(
            !config_behind(&mut w, 65_000_000_000, None, tol),
            "nothing written, nothing seen"
        );
        assert!(
            config_behind(&mut w, 95_000_000_000, None, tol),
            "a resume the watch saw"
        );
    }

    #[test]
    fn this_machine_reads_a_stable_value() {
        let a = suspended_ns();
        let b = suspended_ns();
        assert!(
            b >= a.saturating_sub(1_000_000) && b <= a + 1_000_000,
            "{a} vs {b}"
        );
    }
}
