//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), validated as the SPIFFE
//! specification asks: lowercase trust domain, non-empty path of non-empty
//! segments without `.`/`..`, no query, fragment, port or user info.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::entries::EntryError;

/// A SPIFFE ID: `spiffe://<trust_domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

impl SpiffeId {
    /// Parses `spiffe://td/path` (the path must be non-empty; no query, fragment,
    /// port or user info; no `.`/`..` or empty segments).
    pub fn parse(value: &str) -> Result<Self, EntryError> {
        let err = |reason| EntryError::SpiffeId {
            value: value.to_owned(),
            reason,
        };
        let rest = value
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("missing spiffe:// scheme"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td).map_err(err)?;
        validate_path(path).map_err(err)?;
        Ok(Self {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }

    /// Parses either a full SPIFFE ID or a path (`/identity/7`, `identity/7`)
    /// taken as relative to `trust_domain`.
    pub fn parse_in(trust_domain: &str, value: &str) -> Result<Self, EntryError> {
        if value.starts_with("spiffe://") {
            return Self::parse(value);
        }
        let path = if value.starts_with('/') {
            value.to_owned()
        } else {
            format!("/{value}")
        };
        Self::parse(&format!("spiffe://{trust_domain}{path}"))
    }

    /// The trust domain name (`meshauth.local`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

fn validate_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("empty trust domain");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err("trust domain may only hold a-z, 0-9, '-', '.', '_'");
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() || path == "/" {
        return Err("empty path (a workload SPIFFE ID needs one)");
    }
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err("empty path segment");
        }
        if seg == "." || seg == ".." {
            return Err("'.' or '..' path segment");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err("path may only hold a-z, A-Z, 0-9, '-', '.', '_', '/'");
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = EntryError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let id = SpiffeId::parse("spiffe://meshauth.local/identity/7").expect("valid");
        assert_eq!(id.trust_domain(), "meshauth.local");
        assert_eq!(id.path(), "/identity/7");
        assert_eq!(
            SpiffeId::parse_in("meshauth.local", "identity/7").expect("path"),
            id
        );
        for bad in [
            "http://x/y",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/x",
            "spiffe://td/a//b",
            "spiffe://td/../x",
            "spiffe://td/x?y",
            "spiffe://td:80/x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
