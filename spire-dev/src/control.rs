//! The control socket: newline-delimited JSON requests and responses over a
//! unix socket, one response line per request line, driving the switches of
//! [`SpireDev`]. A malformed line gets an error response; a line longer than
//! [`MAX_LINE`] closes that connection; other connections are unaffected.
//!
//! ```text
//! → {"op":"outage","on":true}
//! ← {"ok":{"result":"outage","was":false,"now":true}}
//! → {"op":"entry_add","node":"a","spiffe_id":"/identity/7","selectors":[{"type":"k8s","value":"ns:x"}],"ttl":"30s"}
//! → {"op":"bogus"}
//! ← {"error":{"message":"control request line 3: unknown variant `bogus`, ..."}}
//! ```

use std::path::{Path, PathBuf};
use std::sync::Weak;

use meshauth_duration::parse_duration;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::dev::{DevInner, DevStatus, SpireDev};
use crate::entries::{Entry, EntrySpec, Selector, SpiffeId};
use crate::socket::{self, SocketError};
use crate::stream::went_down;

mod client;
pub use client::request;

/// The longest request or response line accepted.
pub const MAX_LINE: usize = 1 << 20;

/// Errors of the control client and server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `UnixStream::connect` to the control socket `path` failed.
    #[error("UnixStream::connect({path}): {source} (is `spire-dev serve` running?)")]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing the control socket `path` failed in `op`.
    #[error("{op} on control socket {path}: {source}")]
    Io {
        /// `write request` or `read response`.
        op: &'static str,
        /// The control socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server at `path` closed the connection without a response.
    #[error("control socket {path}: closed without a response")]
    Closed {
        /// The control socket.
        path: PathBuf,
    },
    /// A response line from `path` was not valid JSON of the protocol.
    #[error("control socket {path}: bad response {line:?}: {source}")]
    Decode {
        /// The control socket.
        path: PathBuf,
        /// The line (truncated to 200 characters).
        line: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The server refused request `op` with `message`.
    #[error("control request {op}: {message}")]
    Remote {
        /// The request's op.
        op: String,
        /// The server's message.
        message: String,
    },
    /// Binding the control socket failed (the socket error names the path).
    #[error(transparent)]
    Bind(#[from] SocketError),
}

/// `entry_add` fields: the SPIFFE ID may be a path relative to the trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryAdd {
    /// Parent node.
    pub node: String,
    /// SPIFFE ID or path (`/identity/7`).
    pub spiffe_id: String,
    /// Selectors.
    #[serde(default)]
    pub selectors: Vec<Selector>,
    /// TTL (`30s`, `1h`); the server default when absent.
    #[serde(default)]
    pub ttl: Option<String>,
    /// Entry ID; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
}

/// A control request (one JSON line, tagged by `op`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Server outage on or off.
    Outage {
        /// On or off.
        on: bool,
    },
    /// Take a node agent down.
    AgentDown {
        /// The node.
        node: String,
    },
    /// Bring a node agent back up.
    AgentUp {
        /// The node.
        node: String,
    },
    /// Rotate the CA.
    RotateCa,
    /// Prepare the next CA (in the bundle, not signing).
    PrepareCa,
    /// Activate the prepared CA.
    ActivateCa,
    /// Drop previous CAs from the bundle.
    PruneCa,
    /// Register an entry.
    EntryAdd(EntryAdd),
    /// Remove an entry.
    EntryRemove {
        /// The entry ID.
        id: String,
    },
    /// Everything: entries, agents, identities served.
    List,
}

impl ControlRequest {
    /// The request's `op` name.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Outage { .. } => "outage",
            Self::AgentDown { .. } => "agent_down",
            Self::AgentUp { .. } => "agent_up",
            Self::RotateCa => "rotate_ca",
            Self::PrepareCa => "prepare_ca",
            Self::ActivateCa => "activate_ca",
            Self::PruneCa => "prune_ca",
            Self::EntryAdd(_) => "entry_add",
            Self::EntryRemove { .. } => "entry_remove",
            Self::List => "list",
        }
    }
}

/// A successful result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlReply {
    /// Outage switch flipped.
    Outage {
        /// Previous value.
        was: bool,
        /// New value.
        now: bool,
    },
    /// Agent state after `agent_down` / `agent_up`.
    Agent {
        /// The node.
        node: String,
        /// Whether it is up now.
        up: bool,
        /// Whether the request changed anything.
        changed: bool,
    },
    /// CA rotated.
    CaRotated {
        /// New generation.
        generation: u64,
        /// CAs in the bundle.
        bundle_cas: usize,
    },
    /// Next CA prepared.
    CaPrepared {
        /// Its generation.
        generation: u64,
        /// CAs in the bundle.
        bundle_cas: usize,
    },
    /// Prepared CA activated.
    CaActivated {
        /// Its generation.
        generation: u64,
        /// CAs in the bundle.
        bundle_cas: usize,
    },
    /// Previous CAs pruned.
    CaPruned {
        /// How many were dropped.
        dropped: usize,
        /// CAs in the bundle.
        bundle_cas: usize,
    },
    /// Entry registered.
    EntryAdded {
        /// The entry.
        entry: Entry,
    },
    /// Entry removed.
    EntryRemoved {
        /// The entry.
        entry: Entry,
    },
    /// The full status.
    Status(DevStatus),
}

/// One response line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlResponse {
    /// Success.
    Ok(ControlReply),
    /// Failure.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Executes one request against `dev`.
pub async fn execute(dev: &SpireDev, request: ControlRequest) -> Result<ControlReply, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    Ok(match request {
        ControlRequest::Outage { on } => ControlReply::Outage {
            was: dev.set_outage(on),
            now: on,
        },
        ControlRequest::AgentDown { node } => {
            let changed = dev.agent_down(&node).await.map_err(|e| err(&e))?;
            ControlReply::Agent {
                node,
                up: false,
                changed,
            }
        }
        ControlRequest::AgentUp { node } => {
            let changed = dev.agent_up(&node).await.map_err(|e| err(&e))?;
            ControlReply::Agent {
                node,
                up: true,
                changed,
            }
        }
        ControlRequest::RotateCa => ControlReply::CaRotated {
            generation: dev.rotate_ca().map_err(|e| err(&e))?,
            bundle_cas: dev.server().bundle().len(),
        },
        ControlRequest::PrepareCa => ControlReply::CaPrepared {
            generation: dev.prepare_ca().map_err(|e| err(&e))?,
            bundle_cas: dev.server().bundle().len(),
        },
        ControlRequest::ActivateCa => ControlReply::CaActivated {
            generation: dev.activate_ca().map_err(|e| err(&e))?,
            bundle_cas: dev.server().bundle().len(),
        },
        ControlRequest::PruneCa => ControlReply::CaPruned {
            dropped: dev.prune_ca(),
            bundle_cas: dev.server().bundle().len(),
        },
        ControlRequest::EntryAdd(add) => {
            let td = dev.server().trust_domain().to_owned();
            let mut spec = EntrySpec::new(
                add.node,
                SpiffeId::parse_in(&td, &add.spiffe_id).map_err(|e| err(&e))?,
            );
            spec.selectors = add.selectors;
            spec.id = add.id;
            spec.ttl = add
                .ttl
                .map(|t| parse_duration(&t))
                .transpose()
                .map_err(|e| err(&e))?;
            ControlReply::EntryAdded {
                entry: dev.add_entry(spec).map_err(|e| err(&e))?,
            }
        }
        ControlRequest::EntryRemove { id } => ControlReply::EntryRemoved {
            entry: dev.remove_entry(&id).map_err(|e| err(&e))?,
        },
        ControlRequest::List => ControlReply::Status(dev.status()),
    })
}

/// The control socket server.
#[derive(Debug)]
pub(crate) struct ControlServer {
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ControlServer {
    /// Binds `path` and serves requests against the deployment behind `dev`.
    pub(crate) fn start(path: &Path, dev: Weak<DevInner>) -> Result<Self, SocketError> {
        let listener = socket::bind(path)?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, dev, stop_rx));
        tracing::info!(path = %path.display(), "control socket serving");
        Ok(Self {
            path: path.to_owned(),
            stop,
            task,
        })
    }

    /// Stops serving and removes the socket.
    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
        socket::remove(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, dev: Weak<DevInner>, mut stop: watch::Receiver<bool>) {
    let conn_stop = stop.clone();
    loop {
        tokio::select! {
            () = went_down(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    tokio::spawn(serve_conn(conn, dev.clone(), conn_stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve_conn(conn: UnixStream, dev: Weak<DevInner>, mut stop: watch::Receiver<bool>) {
    let (read, mut write) = conn.into_split();
    let mut reader = BufReader::new(read);
    let mut line_no = 0u64;
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let read = tokio::select! {
            () = went_down(&mut stop) => return,
            r = limited.read_until(b'\n', &mut line) => r,
        };
        match read {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "control connection read");
                return;
            }
        }
        line_no += 1;
        let too_long = line.len() > MAX_LINE;
        let response = if too_long {
            ControlResponse::Error {
                message: format!(
                    "control request line {line_no}: longer than {MAX_LINE} bytes; closing"
                ),
            }
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            match serde_json::from_slice::<ControlRequest>(&line) {
                Err(e) => ControlResponse::Error {
                    message: format!("control request line {line_no}: {e}"),
                },
                Ok(request) => match dev.upgrade() {
                    None => return,
                    Some(inner) => {
                        let op = request.op();
                        tracing::info!(op, "control request");
                        match execute(&SpireDev::from_inner(inner), request).await {
                            Ok(reply) => ControlResponse::Ok(reply),
                            Err(message) => {
                                tracing::warn!(op, %message, "control request failed");
                                ControlResponse::Error { message }
                            }
                        }
                    }
                },
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|e| {
            format!("{{\"error\":{{\"message\":\"encoding response: {e}\"}}}}").into_bytes()
        });
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || too_long {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"op":"outage","on":true}"#).expect("outage");
        assert_eq!(r, ControlRequest::Outage { on: true });
        let r: ControlRequest = serde_json::from_str(
            r#"{"op":"entry_add","node":"a","spiffe_id":"/identity/7","ttl":"30s"}"#,
        )
        .expect("entry_add");
        assert_eq!(r.op(), "entry_add");
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"bogus"}"#).is_err());
        let resp = ControlResponse::Ok(ControlReply::Outage {
            was: false,
            now: true,
        });
        assert_eq!(
            serde_json::to_string(&resp).expect("encode"),
            r#"{"ok":{"result":"outage","was":false,"now":true}}"#
        );
    }
}
