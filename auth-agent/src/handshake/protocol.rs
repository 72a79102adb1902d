//! The `meshauth/1` message each side sends once the TLS session is up.
//!
//! One frame each way: a 4-byte big-endian length, then that many bytes of
//! JSON. Frames are capped at [`MAX_MESSAGE_LEN`]; the reader refuses a
//! longer length before reading the body, so a peer cannot make us buffer
//! more. The JSON always carries `version` first in meaning: a reader checks
//! it before anything else, so a later version fails as "unsupported
//! version" rather than as a confusing field error.
//!
//! The initiator sends a [`Message::Hello`] with its node name, its identity
//! `L` as `local` and the identity it asked for `R` as `remote`; the
//! responder answers with its own hello (`local` = R, `remote` = L) or a
//! [`Message::Refused`] saying which check failed.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The largest frame body accepted or sent, in bytes.
pub const MAX_MESSAGE_LEN: u32 = 4096;

/// One side's statement after the TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's node name.
    pub node: String,
    /// The sender's identity (the one its certificate proves).
    pub local: u32,
    /// The identity the sender talks to.
    pub remote: u32,
    /// The sender node's WireGuard public key (base64) when WireGuard is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_key: Option<String>,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// The sender's node, identities and WireGuard key.
    Hello(Hello),
    /// The responder refused the initiator's hello.
    Refused {
        /// The label of the failed check (as in the responder's metrics).
        label: String,
        /// What failed.
        message: String,
    },
}

#[derive(Serialize)]
struct Out<'a> {
    version: u32,
    #[serde(flatten)]
    message: &'a Message,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct In {
    #[serde(flatten)]
    message: Message,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer announced a frame longer than [`MAX_MESSAGE_LEN`].
    #[error(
        "meshauth/1 message of {len} bytes announced; the limit is {MAX_MESSAGE_LEN} bytes (garbage or a peer speaking another protocol?)"
    )]
    Oversized {
        /// The announced length.
        len: u32,
    },
    /// The peer announced an empty frame.
    #[error("meshauth/1 message of 0 bytes; expected a JSON object")]
    Empty,
    /// The connection ended before a whole frame arrived.
    #[error("connection closed after {got} of {want} bytes of the {part} of the peer's message")]
    Truncated {
        /// `length prefix` or `body`.
        part: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The frame is not the JSON of a message.
    #[error("meshauth/1 message is malformed: {reason}; first bytes {head:?}")]
    Malformed {
        /// The parser's complaint.
        reason: String,
        /// The first bytes of the body (lossy UTF-8, at most 64).
        head: String,
    },
    /// The message is of a version this build does not speak.
    #[error("meshauth/1 message has version {got}; this agent speaks version {VERSION}")]
    UnsupportedVersion {
        /// The version field as sent.
        got: String,
    },
    /// The frame would exceed [`MAX_MESSAGE_LEN`] (a node name or key far too long).
    #[error("refusing to send a meshauth/1 message of {len} bytes (limit {MAX_MESSAGE_LEN})")]
    TooLargeToSend {
        /// Its length.
        len: usize,
    },
    /// Reading or writing the TLS stream failed.
    #[error("{call}: {source}")]
    Io {
        /// `read` or `write`.
        call: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl ProtocolError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Oversized { .. } | Self::TooLargeToSend { .. } => "message_oversized",
            Self::Empty | Self::Malformed { .. } => "message_malformed",
            Self::Truncated { .. } => "message_truncated",
            Self::UnsupportedVersion { .. } => "message_version",
            Self::Io { .. } => "message_io",
        }
    }
}

/// Encodes a message as one frame (length prefix included).
pub fn encode(message: &Message) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(&Out {
        version: VERSION,
        message,
    })
    .map_err(|e| ProtocolError::Malformed {
        reason: format!("serialising: {e}"),
        head: String::new(),
    })?;
    if body.len() > MAX_MESSAGE_LEN as usize {
        return Err(ProtocolError::TooLargeToSend { len: body.len() });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes a frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
    if body.is_empty() {
        return Err(ProtocolError::Empty);
    }
    let malformed = |e: serde_json::Error| ProtocolError::Malformed {
        reason: e.to_string(),
        head: String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned(),
    };
    let v: VersionOnly = serde_json::from_slice(body).map_err(malformed)?;
    match v.version {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
        Some(other) => {
            return Err(ProtocolError::UnsupportedVersion {
                got: other.to_string(),
            });
        }
        None => {
            return Err(ProtocolError::Malformed {
                reason: "no \"version\" field".into(),
                head: String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned(),
            });
        }
    }
    let msg: In = serde_json::from_slice(body).map_err(malformed)?;
    Ok(msg.message)
}

/// Writes one message and flushes.
pub async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &Message,
) -> Result<(), ProtocolError> {
    let frame = encode(message)?;
    w.write_all(&frame)
        .await
        .map_err(|source| ProtocolError::Io {
            call: "write",
            source,
        })?;
    w.flush().await.map_err(|source| ProtocolError::Io {
        call: "flush",
        source,
    })
}

async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    part: &'static str,
) -> Result<(), ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    part,
                    got,
                    want: buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ProtocolError::Truncated {
                    part,
                    got,
                    want: buf.len(),
                });
            }
            Err(source) => {
                return Err(ProtocolError::Io {
                    call: "read",
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Reads one message; refuses oversized frames before reading their body.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, ProtocolError> {
    let mut len = [0u8; 4];
    read_full(r, &mut len, "length prefix").await?;
    let len = u32::from_be_bytes(len);
    if len > MAX_MESSAGE_LEN {
        return Err(ProtocolError::Oversized { len });
    }
    let mut body = vec![0u8; len as usize];
    read_full(r, &mut body, "body").await?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            node: "node-a".into(),
            local: 256,
            remote: 257,
            wireguard_key: Some("k".repeat(44)),
        })
    }

    #[tokio::test]
    async fn round_trips_through_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(8192);
        write(&mut a, &hello()).await.unwrap();
        let refused = Message::Refused {
            label: "node_name_mismatch".into(),
            message: "x".into(),
        };
        write(&mut a, &refused).await.unwrap();
        assert_eq!(read(&mut b).await.unwrap(), hello());
        assert_eq!(read(&mut b).await.unwrap(), refused);
    }

    #[test]
    fn the_wire_form_is_versioned_json() {
        let frame = encode(&hello()).unwrap();
        let body = std::str::from_utf8(&frame[4..]).unwrap();
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            body.len()
        );
        assert!(
            body.starts_with(r#"{"version":1,"type":"hello","node":"node-a""#),
            "{body}"
        );
    }

    #[tokio::test]
    async fn oversized_is_refused_before_the_body_is_read() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(MAX_MESSAGE_LEN + 1).to_be_bytes())
            .await
            .unwrap();
        let e = read(&mut b).await.unwrap_err();
        assert!(
            matches!(e, ProtocolError::Oversized { len } if len == MAX_MESSAGE_LEN + 1),
            "{e}"
        );
        assert_eq!(e.label(), "message_oversized");
    }

    #[tokio::test]
    async fn garbage_truncation_and_versions_are_named() {
        let cases: &[(&[u8], &str, &str)] = &[
            (
                b"\x00\x00\x00\x05hello",
                "message_malformed",
                "first bytes \"hello\"",
            ),
            (b"\x00\x00\x00\x00", "message_malformed", "0 bytes"),
            (
                b"\x00\x00\x00\x10{\"ver",
                "message_truncated",
                "5 of 16 bytes of the body",
            ),
            (b"\x00\x00", "message_truncated", "length prefix"),
            (
                b"\x00\x00\x00\x0d{\"version\":2}",
                "message_version",
                "version 2",
            ),
            (b"\x00\x00\x00\x02{}", "message_malformed", "no \"version\""),
            (
                b"\x00\x00\x00\x1c{\"version\":1,\"type\":\"hello\"}",
                "message_malformed",
                "missing field",
            ),
        ];
        for (bytes, label, text) in cases {
            let (mut a, mut b) = tokio::io::duplex(256);
            a.write_all(bytes).await.unwrap();
            drop(a);
            let e = read(&mut b).await.unwrap_err();
            assert_eq!(e.label(), *label, "{bytes:?}: {e}");
            assert!(e.to_string().contains(text), "{bytes:?}: {e}");
        }
    }

    #[test]
    fn refuses_to_send_an_oversized_message() {
        let m = Message::Hello(Hello {
            node: "n".repeat(5000),
            local: 1,
            remote: 2,
            wireguard_key: None,
        });
        assert!(matches!(
            encode(&m),
            Err(ProtocolError::TooLargeToSend { .. })
        ));
    }
}
