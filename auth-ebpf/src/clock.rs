//! Conversions between wall-clock `SystemTime` (certificate expiry) and
//! `CLOCK_BOOTTIME` nanoseconds (what the datapath compares against with
//! `bpf_ktime_get_boot_ns`). BOOTTIME keeps counting through suspend, so an
//! entry never outlives its certificate because the node slept.

use std::time::{Duration, SystemTime};

use rustix::time::{ClockId, clock_gettime};

/// Now on `CLOCK_BOOTTIME`, in nanoseconds.
pub fn boottime_now_ns() -> u64 {
    let ts = clock_gettime(ClockId::Boottime);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `CLOCK_BOOTTIME` instant of a wall-clock time, relative to now. A
/// time in the past maps below now (saturating at 0).
pub fn system_to_boottime_ns(t: SystemTime) -> u64 {
    let wall_now = SystemTime::now();
    let boot_now = boottime_now_ns();
    match t.duration_since(wall_now) {
        Ok(ahead) => boot_now.saturating_add(ahead.as_nanos().min(u64::MAX as u128) as u64),
        Err(e) => boot_now.saturating_sub(e.duration().as_nanos().min(u64::MAX as u128) as u64),
    }
}

/// The wall-clock time of a `CLOCK_BOOTTIME` instant, relative to now.
pub fn boottime_to_system(ns: u64) -> SystemTime {
    let wall_now = SystemTime::now();
    let boot_now = boottime_now_ns();
    if ns >= boot_now {
        wall_now + Duration::from_nanos(ns - boot_now)
    } else {
        wall_now - Duration::from_nanos(boot_now - ns)
    }
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
    fn future_maps_ahead_of_boottime_now() {
        let now = boottime_now_ns();
        let later = system_to_boottime_ns(SystemTime::now() + Duration::from_secs(10));
        assert!(later > now + 9_000_000_000, "{later} vs {now}");
        assert!(later < now + 11_000_000_000, "{later} vs {now}");
    }
}
