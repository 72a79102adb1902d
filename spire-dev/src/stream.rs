//! Server streams that follow an agent's state: the first message at once, then
//! one per change, ended by the agent going down.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::agent::AgentSnapshot;

/// The stream type the gRPC services return.
pub type StatusStream<T> = ReceiverStream<Result<T, Status>>;

/// What to do with a new agent state.
#[derive(Debug)]
pub(crate) enum Render<T> {
    /// Send this message.
    Send(T),
    /// Nothing the caller sees changed.
    Skip,
    /// Send this status and end the stream.
    End(Status),
}

/// Spawns a task that sends `first`, then `render(state)` on every change of
/// `state`, until the client goes away, `render` ends the stream, or `down`
/// turns true (or its sender is dropped), which ends it with `Unavailable`.
pub(crate) fn follow<T, F>(
    node: String,
    mut state: watch::Receiver<Arc<AgentSnapshot>>,
    mut down: watch::Receiver<bool>,
    first: T,
    mut render: F,
) -> StatusStream<T>
where
    T: Send + 'static,
    F: FnMut(&AgentSnapshot) -> Render<T> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        let unavailable = || Status::unavailable(format!("spire-dev agent {node} is down"));
        loop {
            tokio::select! {
                biased;
                () = went_down(&mut down) => {
                    let _ = tx.send(Err(unavailable())).await;
                    return;
                }
                () = tx.closed() => return,
                changed = state.changed() => {
                    if changed.is_err() {
                        let _ = tx.send(Err(unavailable())).await;
                        return;
                    }
                    let snapshot = state.borrow_and_update().clone();
                    match render(&snapshot) {
                        Render::Send(msg) => {
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                        }
                        Render::Skip => {}
                        Render::End(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Resolves when `down` turns true or its sender is gone.
pub(crate) async fn went_down(down: &mut watch::Receiver<bool>) {
    let _ = down.wait_for(|d| *d).await;
}
