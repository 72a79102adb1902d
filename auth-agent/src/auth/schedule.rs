//! The expired-entry sweep's schedule: a cron job that ticks the auth
//! manager's sweep input.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The sweep schedule could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("sweep schedule {cron:?}: {reason}")]
pub struct ScheduleError {
    /// The cron expression.
    pub cron: String,
    /// What tokio-cron-scheduler said.
    pub reason: String,
}

/// Starts the cron schedule that sends a tick on `tx` at every match of
/// `cron` (6 fields, seconds first). Stops with `shutdown`.
pub async fn spawn_sweep_schedule(
    cron: &str,
    tx: mpsc::Sender<()>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ScheduleError> {
    use tokio_cron_scheduler::{Job, JobScheduler};
    let err = |e: tokio_cron_scheduler::JobSchedulerError| ScheduleError {
        cron: cron.to_string(),
        reason: e.to_string(),
    };
    let mut sched = JobScheduler::new().await.map_err(err)?;
    let job = Job::new_async(cron, move |_, _| {
        let tx = tx.clone();
        Box::pin(async move {
            let _ = tx.try_send(());
        })
    })
    .map_err(err)?;
    sched.add(job).await.map_err(err)?;
    sched.start().await.map_err(err)?;
    Ok(tokio::spawn(async move {
        shutdown.cancelled().await;
        let _ = sched.shutdown().await;
    }))
}
