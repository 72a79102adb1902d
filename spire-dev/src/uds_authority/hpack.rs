//! A small HPACK (RFC 7541) decoder with its dynamic table, and an encoder
//! that writes every field as a literal without indexing (so the receiving
//! decoder's dynamic table stays empty and nothing has to be tracked).

use std::collections::{HashMap, VecDeque};
use std::sync::LazyLock;

use super::huffman_table::{ENCODE_CODE_LENGTHS, ENCODE_CODES};

/// Why a header block could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// `Decoder::decode` ran out of bytes in the middle of a representation.
    #[error("HPACK decode: header block truncated")]
    Truncated,
    /// `Decoder::decode` read an integer that does not fit 32 bits.
    #[error("HPACK decode: integer overflow")]
    Overflow,
    /// `Decoder::decode` got an index `index` past the tables.
    #[error("HPACK decode: index {index} out of range")]
    Index {
        /// The offending index.
        index: usize,
    },
    /// `Decoder::decode` got a table size update to `size` above the limit.
    #[error("HPACK decode: table size update {size} above the limit {limit}")]
    TableSize {
        /// The requested size.
        size: usize,
        /// The limit (SETTINGS_HEADER_TABLE_SIZE).
        limit: usize,
    },
    /// `huffman_decode` found an invalid code or padding.
    #[error("HPACK decode: bad Huffman string")]
    Huffman,
}

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Name (lowercase for HTTP/2).
    pub name: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Sent as "never indexed" (sensitive); kept so on re-encoding.
    pub sensitive: bool,
}

const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Per-entry overhead in the dynamic table size (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// An HPACK decoder: the dynamic table of one connection direction.
#[derive(Debug)]
pub struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    limit: usize,
}

impl Decoder {
    /// A decoder whose table may grow to `limit` bytes (the receiver's
    /// SETTINGS_HEADER_TABLE_SIZE; 4096 by default).
    pub fn new(limit: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// Decodes one complete header block.
    pub fn decode(&mut self, mut block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                let index = read_int(&mut block, 7)?;
                let (name, value) = self.get(index)?;
                fields.push(Field {
                    name,
                    value,
                    sensitive: false,
                });
            } else if first & 0xc0 == 0x40 {
                let field = self.literal(&mut block, 6, false)?;
                self.insert(field.name.clone(), field.value.clone());
                fields.push(field);
            } else if first & 0xe0 == 0x20 {
                let size = read_int(&mut block, 5)?;
                if size > self.limit {
                    return Err(HpackError::TableSize {
                        size,
                        limit: self.limit,
                    });
                }
                self.max_size = size;
                self.evict();
            } else {
                let sensitive = first & 0xf0 == 0x10;
                fields.push(self.literal(&mut block, 4, sensitive)?);
            }
        }
        Ok(fields)
    }

    fn literal(&self, block: &mut &[u8], prefix: u8, sensitive: bool) -> Result<Field, HpackError> {
        let index = read_int(block, prefix)?;
        let name = if index == 0 {
            read_string(block)?
        } else {
            self.get(index)?.0
        };
        let value = read_string(block)?;
        Ok(Field {
            name,
            value,
            sensitive,
        })
    }

    fn get(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        match index {
            0 => Err(HpackError::Index { index }),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(HpackError::Index { index }),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let entry = name.len() + value.len() + ENTRY_OVERHEAD;
        if entry > self.max_size {
            // An entry larger than the table empties it (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.size += entry;
        self.table.push_front((name, value));
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

/// Encodes `fields` as literals without indexing (never-indexed when
/// sensitive), names and values raw (no Huffman).
pub fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.push(if f.sensitive { 0x10 } else { 0x00 });
        write_int(&mut out, f.name.len(), 7, 0);
        out.extend_from_slice(&f.name);
        write_int(&mut out, f.value.len(), 7, 0);
        out.extend_from_slice(&f.value);
    }
    out
}

fn read_int(block: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, rest) = block.split_first().ok_or(HpackError::Truncated)?;
    *block = rest;
    let mask = (1u16 << prefix) as u8 - 1;
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let (&b, rest) = block.split_first().ok_or(HpackError::Truncated)?;
        *block = rest;
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        value = value
            .checked_add(usize::from(b & 0x7f) << shift)
            .filter(|v| *v <= u32::MAX as usize)
            .ok_or(HpackError::Overflow)?;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

fn write_int(out: &mut Vec<u8>, value: usize, prefix: u8, flags: u8) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

fn read_string(block: &mut &[u8]) -> Result<Vec<u8>, HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(block, 7)?;
    if block.len() < len {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        huffman_decode(raw)
    } else {
        Ok(raw.to_vec())
    }
}

/// (code length, code) → symbol.
static HUFFMAN: LazyLock<HashMap<(u8, u32), u8>> = LazyLock::new(|| {
    (0..=255u8)
        .map(|sym| {
            let i = usize::from(sym);
            ((ENCODE_CODE_LENGTHS[i], ENCODE_CODES[i]), sym)
        })
        .collect()
});

/// Decodes a Huffman-coded string (RFC 7541 §5.2): padding must be fewer than
/// 8 one-bits; EOS inside the string is an error.
pub fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0u8);
    for byte in src {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if let Some(&sym) = HUFFMAN.get(&(len, code)) {
                out.push(sym);
                code = 0;
                len = 0;
            } else if len >= 30 {
                return Err(HpackError::Huffman);
            }
        }
    }
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8_lossy(&f.name).into_owned(),
                    String::from_utf8_lossy(&f.value).into_owned(),
                )
            })
            .collect()
    }

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        let mut d = Decoder::new(4096);
        let first = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
            .expect("C.4.1");
        assert_eq!(
            pairs(&first),
            p(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let second = d
            .decode(&hex("8286 84be 5886 a8eb 1064 9cbf"))
            .expect("C.4.2");
        assert_eq!(
            pairs(&second),
            p(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        let third = d
            .decode(&hex(
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ))
            .expect("C.4.3");
        assert_eq!(
            pairs(&third),
            p(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.size, 164, "table size after C.4.3");
    }

    #[test]
    fn rfc7541_c3_requests_without_huffman() {
        let mut d = Decoder::new(4096);
        let first = d
            .decode(&hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"))
            .expect("C.3.1");
        assert_eq!(
            pairs(&first)[3],
            ("".to_owned() + ":authority", "www.example.com".to_owned())
        );
    }

    #[test]
    fn encode_round_trips_and_keeps_sensitivity() {
        let fields = vec![
            Field {
                name: b":authority".to_vec(),
                value: b"localhost".to_vec(),
                sensitive: false,
            },
            Field {
                name: b"x-long".to_vec(),
                value: vec![b'a'; 300],
                sensitive: true,
            },
        ];
        let mut d = Decoder::new(4096);
        assert_eq!(d.decode(&encode(&fields)).expect("round trip"), fields);
        assert!(d.table.is_empty(), "literals without indexing add nothing");
    }

    #[test]
    fn rejects_bad_blocks() {
        let mut d = Decoder::new(4096);
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::Index { index: 62 }));
        assert_eq!(d.decode(&[0x41]), Err(HpackError::Truncated));
        assert!(matches!(
            d.decode(&hex("3fe2 1f")),
            Err(HpackError::TableSize { .. })
        ));
        assert_eq!(
            huffman_decode(&[0x00]),
            Err(HpackError::Huffman),
            "zero padding"
        );
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::Huffman),
            "EOS"
        );
        assert_eq!(
            d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::Overflow)
        );
    }
}
