//! The agent's clock: wall-clock time kept on `CLOCK_BOOTTIME` from the
//! moment the agent started ([`auth_ebpf::clock::agent_now`]), so a step of
//! the system clock moves neither certificate validity, auth entry
//! expiries, nor re-authentication; [`watch`] reports such a step.

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// The agent's wall-clock time as a [`svid_cache::Clock`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentClock;

impl svid_cache::Clock for AgentClock {
    fn now(&self) -> SystemTime {
        auth_ebpf::clock::agent_now()
    }
}

/// How far the system clock may drift from the agent's before it is
/// reported as a step (NTP slews stay well below).
pub const STEP_TOLERANCE_SECS: f64 = 1.0;

/// Every `every`, compares the system clock with the agent's and logs a
/// warning when the difference changed by more than [`STEP_TOLERANCE_SECS`]
/// since the last report. Runs until `token` is cancelled.
pub async fn watch(every: Duration, token: CancellationToken) {
    let mut reported = 0.0f64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let step = auth_ebpf::clock::wall_clock_step();
        if (step - reported).abs() > STEP_TOLERANCE_SECS {
            if step.abs() > STEP_TOLERANCE_SECS {
                tracing::warn!(
                    step_seconds = format!("{step:.3}"),
                    "the system clock stepped since the agent started; the agent keeps its own time \
                     (certificate validity, auth entry expiries and re-authentication are unaffected) \
                     until it restarts (meshauth_wall_clock_step_seconds)"
                );
            } else {
                tracing::info!(
                    step_seconds = format!("{step:.3}"),
                    "the system clock agrees with the agent's again"
                );
            }
            reported = step;
        }
    }
}
