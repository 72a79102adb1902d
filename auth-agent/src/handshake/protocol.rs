//! The messages each side sends once the TLS session is up.
//!
//! Frames: a 4-byte big-endian length, then that many bytes of JSON. Frames
//! are capped ([`Version::max_len`]: 4 KiB in `meshauth/1`, 16 KiB in
//! `meshauth/2`, whose proofs carry certificate chains); the reader refuses
//! a longer length before reading the body, so a peer cannot make us buffer
//! more. The JSON always carries `version` first in meaning: a reader checks
//! it (against the version ALPN negotiated) before anything else, so another
//! version fails as "unsupported version" rather than as a field error.
//!
//! Both versions open alike: the initiator sends a [`Message::Hello`] with
//! its node name, its identity `L` as `local` and the identity it asked for
//! `R` as `remote`; the responder answers with its own hello (`local` = R,
//! `remote` = L) or a [`Message::Refused`] saying which check failed. In
//! `meshauth/1` the connection then ends. In `meshauth/2` it stays open as a
//! session: the initiator may send [`Message::Prove`] for further pairs, each
//! answered by [`Message::Proven`] or a [`Message::Refused`] carrying its
//! `id` (see [`super::proof`]).

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The newest protocol version this build speaks.
pub const VERSION: u32 = 2;

/// The largest `meshauth/1` frame body accepted or sent, in bytes.
pub const MAX_MESSAGE_LEN: u32 = 4096;

/// The largest `meshauth/2` frame body accepted or sent, in bytes (a proof
/// carries the signer's certificate chain).
pub const MAX_MESSAGE_LEN_V2: u32 = 16384;

/// A protocol version, as negotiated by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    /// `meshauth/1`: one pair per TLS handshake.
    V1,
    /// `meshauth/2`: a session; further pairs proved over it.
    V2,
}

impl Version {
    /// The `version` field of its messages.
    pub fn number(self) -> u32 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }

    /// Its ALPN protocol id.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Self::V1 => super::ALPN,
            Self::V2 => super::ALPN_V2,
        }
    }

    /// The version an ALPN id names.
    pub fn from_alpn(alpn: &[u8]) -> Option<Self> {
        [Self::V2, Self::V1].into_iter().find(|v| v.alpn() == alpn)
    }

    /// The largest frame body of this version.
    pub fn max_len(self) -> u32 {
        match self {
            Self::V1 => MAX_MESSAGE_LEN,
            Self::V2 => MAX_MESSAGE_LEN_V2,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1 => "meshauth/1",
            Self::V2 => "meshauth/2",
        })
    }
}

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

/// One side's proof, in a `meshauth/2` session, that it holds the key of
/// identity `local`'s SVID, signed over the session's exporter and the pair
/// ([`super::proof`] builds and checks it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// The request's number in the session: strictly increasing, chosen by
    /// the initiator; the answer carries the same.
    pub id: u64,
    /// The sender's node name.
    pub node: String,
    /// The sender's identity.
    pub local: u32,
    /// The identity the sender talks to.
    pub remote: u32,
    /// The sender node's WireGuard public key (base64) when WireGuard is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_key: Option<String>,
    /// The sender's SVID chain, leaf first, each certificate's DER in base64.
    pub chain: Vec<String>,
    /// The TLS SignatureScheme code point of `signature`.
    pub scheme: u16,
    /// The signature (base64) by the leaf's key.
    pub signature: String,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// The sender's node, identities and WireGuard key.
    Hello(Hello),
    /// The responder refused the initiator's hello, or (with `id`) one proof.
    Refused {
        /// The proof refused (`meshauth/2`); absent for the opening hello.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The label of the failed check (as in the responder's metrics).
        label: String,
        /// What failed.
        message: String,
    },
    /// `meshauth/2`: the initiator proves a further pair over the session.
    Prove(Proof),
    /// `meshauth/2`: the responder's proof for the same pair.
    Proven(Proof),
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
    /// The peer announced a frame longer than the version's limit.
    #[error(
        "meshauth message of {len} bytes announced; the limit is {limit} bytes (garbage or a peer speaking another protocol?)"
    )]
    Oversized {
        /// The announced length.
        len: u32,
        /// The limit.
        limit: u32,
    },
    /// The peer announced an empty frame.
    #[error("meshauth message of 0 bytes; expected a JSON object")]
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
    #[error("meshauth message is malformed: {reason}; first bytes {head:?}")]
    Malformed {
        /// The parser's complaint.
        reason: String,
        /// The first bytes of the body (lossy UTF-8, at most 64).
        head: String,
    },
    /// The message is of a version this build does not speak.
    #[error("meshauth message has version {got}; this session speaks version {expected}")]
    UnsupportedVersion {
        /// The version field as sent.
        got: String,
        /// The version negotiated.
        expected: u32,
    },
    /// The frame would exceed the version's limit (a node name or key far too long).
    #[error("refusing to send a meshauth message of {len} bytes (limit {limit})")]
    TooLargeToSend {
        /// Its length.
        len: usize,
        /// The limit.
        limit: u32,
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

/// Encodes a `meshauth/1` message as one frame (length prefix included).
pub fn encode(message: &Message) -> Result<Vec<u8>, ProtocolError> {
    encode_as(Version::V1, message)
}

/// Encodes a message of `version` as one frame (length prefix included).
pub fn encode_as(version: Version, message: &Message) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(&Out {
        version: version.number(),
        message,
    })
    .map_err(|e| ProtocolError::Malformed {
        reason: format!("serialising: {e}"),
        head: String::new(),
    })?;
    let limit = version.max_len();
    if body.len() > limit as usize {
        return Err(ProtocolError::TooLargeToSend {
            len: body.len(),
            limit,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes a `meshauth/1` frame body (without the length prefix).
pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
    decode_as(Version::V1, body)
}

/// Decodes a frame body of `version` (without the length prefix). Proofs are
/// refused in `meshauth/1`.
pub fn decode_as(version: Version, body: &[u8]) -> Result<Message, ProtocolError> {
    if body.is_empty() {
        return Err(ProtocolError::Empty);
    }
    let head = || String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned();
    let malformed = |e: serde_json::Error| ProtocolError::Malformed {
        reason: e.to_string(),
        head: head(),
    };
    let v: VersionOnly = serde_json::from_slice(body).map_err(malformed)?;
    match v.version {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(version.number())) => {}
        Some(other) => {
            return Err(ProtocolError::UnsupportedVersion {
                got: other.to_string(),
                expected: version.number(),
            });
        }
        None => {
            return Err(ProtocolError::Malformed {
                reason: "no \"version\" field".into(),
                head: head(),
            });
        }
    }
    let msg: In = serde_json::from_slice(body).map_err(malformed)?;
    if version == Version::V1 && matches!(msg.message, Message::Prove(_) | Message::Proven(_)) {
        return Err(ProtocolError::Malformed {
            reason: "a proof in a meshauth/1 exchange".into(),
            head: head(),
        });
    }
    Ok(msg.message)
}

/// Writes one `meshauth/1` message and flushes.
pub async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &Message,
) -> Result<(), ProtocolError> {
    write_as(w, Version::V1, message).await
}

/// Writes one message of `version` and flushes.
pub async fn write_as<W: AsyncWrite + Unpin>(
    w: &mut W,
    version: Version,
    message: &Message,
) -> Result<(), ProtocolError> {
    let frame = encode_as(version, message)?;
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

/// Reads one `meshauth/1` message; refuses oversized frames before reading their body.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, ProtocolError> {
    read_as(r, Version::V1).await
}

/// Reads one message of `version`; refuses oversized frames before reading their body.
pub async fn read_as<R: AsyncRead + Unpin>(
    r: &mut R,
    version: Version,
) -> Result<Message, ProtocolError> {
    let mut len = [0u8; 4];
    read_full(r, &mut len, "length prefix").await?;
    let len = u32::from_be_bytes(len);
    let limit = version.max_len();
    if len > limit {
        return Err(ProtocolError::Oversized { len, limit });
    }
    let mut body = vec![0u8; len as usize];
    read_full(r, &mut body, "body").await?;
    decode_as(version, &body)
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
            id: None,
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
            matches!(e, ProtocolError::Oversized { len, .. } if len == MAX_MESSAGE_LEN + 1),
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
