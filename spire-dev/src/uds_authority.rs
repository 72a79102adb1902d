//! Accepts the `:authority` that gRPC-core clients send over unix sockets.
//!
//! gRPC-core (Python, C++, Ruby; ≥ 1.57) sends the percent-encoded socket path
//! as `:authority` on unix sockets (`tmp%2Fx%2Fagent.sock`), which h2 — the
//! HTTP/2 server under tonic — rejects as malformed (PROTOCOL_ERROR; see
//! hyperium/h2#487, grpc/grpc#38142). SPIRE (Go) accepts it, so py-spiffe
//! works against SPIRE; to be wire-compatible spire-dev puts this shim between
//! each accepted connection and tonic: it rewrites the client's HEADERS frames,
//! replacing an `:authority` h2 would refuse with `localhost`. Header blocks are
//! HPACK-decoded with the client's dynamic table and re-encoded as literals
//! without indexing, so the server's table stays empty. Everything else passes
//! through unchanged; bytes that are not HTTP/2 pass through untouched for the
//! server to reject.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;

mod hpack;
mod huffman_table;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The frame size h2 accepts by default (SETTINGS_MAX_FRAME_SIZE; tonic keeps
/// it): larger incoming frames end the connection, and rewritten header blocks
/// are split into CONTINUATION frames of at most this size.
const MAX_FRAME: usize = 16_384;
/// The HPACK table size h2 advertises (SETTINGS_HEADER_TABLE_SIZE default).
const HEADER_TABLE_SIZE: usize = 4096;
/// The most bytes one header block may take across its frames.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// The authority used instead of one h2 refuses.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// A connection whose client-to-server bytes went through the rewriter.
#[derive(Debug)]
pub struct RewrittenConn(DuplexStream);

impl Connected for RewrittenConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for RewrittenConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RewrittenConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Wraps an accepted connection: spawns the pump task and returns the end tonic serves.
pub fn wrap(client: UnixStream) -> RewrittenConn {
    let (server_end, pump_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(pump(client, pump_end));
    RewrittenConn(server_end)
}

async fn pump(client: UnixStream, server: DuplexStream) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let inbound = async {
        if let Err(e) = rewrite(&mut client_read, &mut server_write).await {
            tracing::debug!(error = %e, "unix socket connection (client side) ended");
        }
        let _ = server_write.shutdown().await;
    };
    let outbound = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::pin!(inbound, outbound);
    tokio::select! {
        () = &mut inbound => outbound.await,
        () = &mut outbound => {}
    }
}

/// Copies `src` to `dst`, rewriting HEADERS/CONTINUATION frames.
async fn rewrite<R, W>(src: &mut R, dst: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    let n = read_up_to(src, &mut preface).await?;
    dst.write_all(&preface[..n]).await?;
    if n < preface.len() || &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: let the server reject it.
        tokio::io::copy(src, dst).await?;
        return Ok(());
    }
    let mut decoder = hpack::Decoder::new(HEADER_TABLE_SIZE);
    loop {
        let Some((header, payload)) = read_frame(src).await? else {
            return Ok(());
        };
        let kind = header[3];
        if kind != FRAME_HEADERS {
            dst.write_all(&header).await?;
            dst.write_all(&payload).await?;
            continue;
        }
        let flags = header[4];
        let stream = [header[5] & 0x7f, header[6], header[7], header[8]];
        let (priority, mut block) = match headers_fragment(flags, &payload) {
            Some(parts) => parts,
            None => return Err(invalid("HEADERS frame with bad padding")),
        };
        let mut end = flags & FLAG_END_HEADERS != 0;
        while !end {
            let (h, p) = read_frame(src)
                .await?
                .ok_or_else(|| invalid("connection closed inside a header block"))?;
            if h[3] != FRAME_CONTINUATION || h[5..9] != header[5..9] {
                return Err(invalid("header block interrupted by another frame"));
            }
            if block.len() + p.len() > MAX_HEADER_BLOCK {
                return Err(invalid("header block too large"));
            }
            block.extend_from_slice(&p);
            end = h[4] & FLAG_END_HEADERS != 0;
        }
        let mut fields = decoder
            .decode(&block)
            .map_err(|e| invalid(&e.to_string()))?;
        for f in &mut fields {
            if f.name == b":authority" && !authority_ok(&f.value) {
                tracing::trace!(authority = %String::from_utf8_lossy(&f.value), "rewriting :authority to localhost");
                f.value = LOCAL_AUTHORITY.to_vec();
            }
        }
        let mut first = priority;
        first.extend_from_slice(&hpack::encode(&fields));
        write_header_block(
            dst,
            flags & !(FLAG_PADDED | FLAG_END_HEADERS),
            stream,
            &first,
        )
        .await?;
    }
}

/// Whether h2 accepts `value` as an authority (reg-name/IP with optional port).
fn authority_ok(value: &[u8]) -> bool {
    value
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]@".contains(b))
}

/// Splits a HEADERS payload into (priority bytes, header block fragment).
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut p = payload;
    let mut pad = 0usize;
    if flags & FLAG_PADDED != 0 {
        let (&n, rest) = p.split_first()?;
        pad = usize::from(n);
        p = rest;
    }
    let mut priority = Vec::new();
    if flags & FLAG_PRIORITY != 0 {
        if p.len() < 5 {
            return None;
        }
        priority = p[..5].to_vec();
        p = &p[5..];
    }
    let len = p.len().checked_sub(pad)?;
    Some((priority, p[..len].to_vec()))
}

/// Writes `block` (priority bytes first when flagged) as HEADERS plus
/// CONTINUATION frames of at most [`MAX_FRAME`] bytes.
async fn write_header_block<W: AsyncWrite + Unpin>(
    dst: &mut W,
    flags: u8,
    stream: [u8; 4],
    block: &[u8],
) -> io::Result<()> {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut kind = FRAME_HEADERS;
    let mut frame_flags = flags;
    if chunks.peek().is_none() {
        return write_frame(dst, kind, frame_flags | FLAG_END_HEADERS, stream, &[]).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let f = if last {
            frame_flags | FLAG_END_HEADERS
        } else {
            frame_flags
        };
        write_frame(dst, kind, f, stream, chunk).await?;
        kind = FRAME_CONTINUATION;
        frame_flags = 0;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    dst: &mut W,
    kind: u8,
    flags: u8,
    stream: [u8; 4],
    payload: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| invalid("frame too large"))?;
    let len = len.to_be_bytes();
    let header = [
        len[1], len[2], len[3], kind, flags, stream[0], stream[1], stream[2], stream[3],
    ];
    dst.write_all(&header).await?;
    dst.write_all(payload).await
}

/// Reads one frame: `None` at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(src: &mut R) -> io::Result<Option<([u8; 9], Vec<u8>)>> {
    let mut header = [0u8; 9];
    match read_up_to(src, &mut header).await? {
        0 => return Ok(None),
        9 => {}
        _ => return Err(invalid("connection closed inside a frame header")),
    }
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    if len > MAX_FRAME {
        // h2 advertises the default SETTINGS_MAX_FRAME_SIZE, so a larger frame
        // is a protocol error; refuse it before allocating.
        return Err(invalid("frame larger than SETTINGS_MAX_FRAME_SIZE"));
    }
    let mut payload = vec![0u8; len];
    src.read_exact(&mut payload).await?;
    Ok(Some((header, payload)))
}

/// Fills `buf` unless the stream ends first; returns how many bytes were read.
async fn read_up_to<R: AsyncRead + Unpin>(src: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 rewriter: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, stream];
        f.extend_from_slice(payload);
        f
    }

    fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            out.push((bytes[3], bytes[4], bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        rewrite(&mut input.as_slice(), &mut out)
            .await
            .expect("rewrite");
        out
    }

    #[tokio::test]
    async fn rewrites_percent_encoded_authority_across_padding_and_continuation() {
        let fields = |authority: &[u8]| {
            hpack::encode(&[
                hpack::Field {
                    name: b":method".to_vec(),
                    value: b"POST".to_vec(),
                    sensitive: false,
                },
                hpack::Field {
                    name: b":authority".to_vec(),
                    value: authority.to_vec(),
                    sensitive: false,
                },
                hpack::Field {
                    name: b"x-big".to_vec(),
                    value: vec![b'v'; 20_000],
                    sensitive: false,
                },
            ])
        };
        let block = fields(b"tmp%2Fx%2Fagent.sock");
        // HEADERS (padded) + two CONTINUATIONs, then a DATA frame.
        let (a, rest) = block.split_at(100);
        let (b, c) = rest.split_at(10_000);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, FLAG_PADDED, 1, &padded));
        input.extend(frame(FRAME_CONTINUATION, 0, 1, b));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, c));
        input.extend(frame(0x0, 0x1, 1, b"data"));
        let out = run(input).await;
        assert_eq!(&out[..24], PREFACE);
        let frames = parse_frames(&out[24..]);
        let mut block = Vec::new();
        let mut seen_end = false;
        for (kind, flags, payload) in &frames[..frames.len() - 1] {
            assert!(*kind == FRAME_HEADERS || *kind == FRAME_CONTINUATION);
            assert!(payload.len() <= MAX_FRAME);
            assert_eq!(flags & FLAG_PADDED, 0);
            block.extend_from_slice(payload);
            seen_end = flags & FLAG_END_HEADERS != 0;
        }
        assert!(seen_end, "END_HEADERS on the last frame");
        assert_eq!(block, fields(b"localhost"));
        assert_eq!(frames.last().expect("data"), &(0x0, 0x1, b"data".to_vec()));
    }

    #[tokio::test]
    async fn keeps_valid_authority_and_passes_non_http2_through() {
        let block = hpack::encode(&[hpack::Field {
            name: b":authority".to_vec(),
            value: b"localhost:50051".to_vec(),
            sensitive: false,
        }]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS | 0x1, 3, &block));
        let out = run(input.clone()).await;
        assert_eq!(out, input);
        let garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(run(garbage.clone()).await, garbage);
        // An oversized frame ends the connection without allocating it.
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 1]);
        let mut out = Vec::new();
        assert!(rewrite(&mut huge.as_slice(), &mut out).await.is_err());
    }
}
