//! The reconnect loop shared by all sources: open a stream, apply its messages
//! to the cache, publish the state, back off and retry when it ends.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Backoff, BackoffConfig, SourceError, SourceHandle, SourceState, SourceStatus};
use crate::cache::{SvidCache, Update};

/// A stream of full-state updates (or errors) from one open session.
pub(crate) type Session = BoxStream<'static, Result<Update, SourceError>>;

/// Opens sessions to one source.
pub(crate) trait Connector: Send + 'static {
    /// The RPC name, for errors.
    const CALL: &'static str;
    /// The socket path, for errors and logs.
    fn path(&self) -> &std::path::Path;
    /// Connects and opens the stream(s).
    fn connect(&mut self) -> impl Future<Output = Result<Session, SourceError>> + Send;
}

/// Spawns the worker for `connector` on the current runtime.
pub(crate) fn spawn<C: Connector>(
    name: &'static str,
    connector: C,
    cache: SvidCache,
    backoff: BackoffConfig,
    connect_timeout: Duration,
    shutdown: CancellationToken,
) -> SourceHandle {
    let (tx, rx) = watch::channel(SourceStatus::default());
    let span = info_span!("svid_source", source = name, socket.path = %connector.path().display());
    let worker = Worker {
        connector,
        cache,
        status: tx,
        backoff: Backoff::new(backoff),
        connect_timeout,
    };
    let task = tokio::spawn(worker.run(shutdown).instrument(span));
    SourceHandle::new(name, rx, task)
}

struct Worker<C> {
    connector: C,
    cache: SvidCache,
    status: watch::Sender<SourceStatus>,
    backoff: Backoff,
    connect_timeout: Duration,
}

impl<C: Connector> Worker<C> {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut sessions = 0u64;
        loop {
            let ended = tokio::select! {
                () = shutdown.cancelled() => break,
                e = self.session(sessions) => e,
            };
            sessions += 1;
            self.disconnected(ended);
            let delay = self.backoff.next_delay();
            debug!(?delay, "reconnecting after backoff");
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        info!("source stopped");
    }

    /// Runs one session until it ends; returns why.
    async fn session(&mut self, sessions: u64) -> SourceError {
        // A peer that accepts (or leaves the connection queued) and never
        // answers would otherwise hold the source here forever.
        let after = self.connect_timeout;
        let mut stream = match tokio::time::timeout(after, self.connector.connect()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return e,
            Err(_) => {
                return SourceError::ConnectTimeout {
                    call: C::CALL,
                    path: self.connector.path().to_owned(),
                    after,
                };
            }
        };
        // The server accepted the stream(s): it speaks the protocol.
        self.connected(sessions > 0);
        while let Some(item) = stream.next().await {
            match item {
                Ok(update) => self.apply(update).await,
                Err(SourceError::NoIdentityIssued { call, path }) => {
                    // The authoritative answer "nothing for you": the full state is empty.
                    self.apply(Update {
                        svids: Some(Vec::new()),
                        bundle: None,
                    })
                    .await;
                    return SourceError::NoIdentityIssued { call, path };
                }
                Err(e) if e.is_message_rejection() => self.rejected(e),
                Err(e) => return e,
            }
        }
        SourceError::StreamEnded {
            call: C::CALL,
            path: self.connector.path().to_owned(),
        }
    }

    async fn apply(&mut self, update: Update) {
        let cache = self.cache.clone();
        let result = tokio::task::spawn_blocking(move || cache.apply(update)).await;
        match result {
            Ok(Ok(_)) => {
                self.backoff.reset();
                self.status.send_modify(|s| s.updates_applied += 1);
            }
            Ok(Err(source)) => self.rejected(SourceError::Rejected {
                call: C::CALL,
                path: self.connector.path().to_owned(),
                source: Box::new(source),
            }),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(join) => warn!(error = %join, "cache update task cancelled"),
        }
    }

    fn connected(&mut self, reconnect: bool) {
        info!(reconnect, "source connected");
        self.status.send_modify(|s| {
            s.state = SourceState::Connected {
                since: SystemTime::now(),
            };
            if reconnect {
                s.reconnects += 1;
            }
        });
    }

    fn rejected(&mut self, error: SourceError) {
        warn!(error = %error, "message rejected; cache keeps what it had");
        let now = SystemTime::now();
        self.status.send_modify(|s| {
            s.updates_rejected += 1;
            s.last_error = Some((now, Arc::new(error)));
        });
    }

    fn disconnected(&mut self, error: SourceError) {
        warn!(error = %error, "source disconnected; keeping still-valid SVIDs");
        let now = SystemTime::now();
        let error = Arc::new(error);
        self.status.send_modify(|s| {
            let since = match &s.state {
                SourceState::Disconnected { since, .. } => *since,
                _ => now,
            };
            s.state = SourceState::Disconnected {
                since,
                error: error.clone(),
            };
            s.last_error = Some((now, error));
        });
    }
}
