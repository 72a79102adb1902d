//! The control socket client: one request line out, one response line back.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{ControlError, ControlReply, ControlRequest, ControlResponse, MAX_LINE};

/// Sends one request to the control socket at `path` and returns the reply.
pub async fn request(path: &Path, request: &ControlRequest) -> Result<ControlReply, ControlError> {
    let conn = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let (read, mut write) = conn.into_split();
    let mut line = serde_json::to_vec(request).map_err(|source| ControlError::Decode {
        path: path.to_owned(),
        line: format!("{request:?}"),
        source,
    })?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .map_err(|source| ControlError::Io {
            op: "write request",
            path: path.to_owned(),
            source,
        })?;
    let mut response = Vec::new();
    BufReader::new(read)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut response)
        .await
        .map_err(|source| ControlError::Io {
            op: "read response",
            path: path.to_owned(),
            source,
        })?;
    if response.is_empty() {
        return Err(ControlError::Closed {
            path: path.to_owned(),
        });
    }
    match serde_json::from_slice::<ControlResponse>(&response) {
        Ok(ControlResponse::Ok(reply)) => Ok(reply),
        Ok(ControlResponse::Error { message }) => Err(ControlError::Remote {
            op: request.op().to_owned(),
            message,
        }),
        Err(source) => Err(ControlError::Decode {
            path: path.to_owned(),
            line: String::from_utf8_lossy(&response)
                .chars()
                .take(200)
                .collect(),
            source,
        }),
    }
}
