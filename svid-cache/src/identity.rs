//! Numeric identities and their names: SPIFFE IDs (`spiffe://<td>/identity/<N>`)
//! and TLS server names (`<N>.<td>`).

use std::fmt;
use std::sync::Arc;

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "meshauth.local";

/// The path prefix of every identity's SPIFFE ID.
const IDENTITY_PATH: &str = "/identity/";

/// Errors from naming identities.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A trust domain name is empty, too long or holds characters SPIFFE does not allow.
    #[error(
        "TrustDomain::new({name:?}): {reason}; a trust domain is 1..=255 characters of [a-z0-9.-_]"
    )]
    InvalidTrustDomain {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A SPIFFE ID is not `spiffe://<trust domain>/<path>`.
    #[error("parse SPIFFE ID {spiffe_id:?}: {reason}")]
    InvalidSpiffeId {
        /// The rejected SPIFFE ID.
        spiffe_id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A SPIFFE ID belongs to another trust domain.
    #[error("SPIFFE ID {spiffe_id:?} is not in trust domain {expected:?}")]
    ForeignTrustDomain {
        /// The rejected SPIFFE ID.
        spiffe_id: String,
        /// The configured trust domain.
        expected: String,
    },
    /// A SPIFFE ID of the right trust domain whose path is not `/identity/<u32>`.
    #[error(
        "SPIFFE ID {spiffe_id:?} is not an identity path; expected spiffe://{trust_domain}/identity/<N> with N a u32 without leading zeros"
    )]
    NotIdentityPath {
        /// The rejected SPIFFE ID.
        spiffe_id: String,
        /// The configured trust domain.
        trust_domain: String,
    },
}

/// A validated SPIFFE trust domain name, e.g. `meshauth.local`.
///
/// Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Validates `name` as a SPIFFE trust domain name (lowercase letters, digits, `.`, `-`, `_`).
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        let invalid = |reason| IdentityError::InvalidTrustDomain {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("empty"));
        }
        if name.len() > 255 {
            return Err(invalid("longer than 255 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(invalid("holds a character other than [a-z0-9.-_]"));
        }
        Ok(Self(name.into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of identity `n`: `spiffe://<td>/identity/<n>`.
    pub fn spiffe_id(&self, n: u32) -> String {
        format!("spiffe://{}{IDENTITY_PATH}{n}", self.0)
    }

    /// The TLS server name of identity `n`: `<n>.<td>`.
    pub fn server_name(&self, n: u32) -> String {
        format!("{n}.{}", self.0)
    }

    /// Parses the identity out of `spiffe://<td>/identity/<N>`.
    ///
    /// Other trust domains give [`IdentityError::ForeignTrustDomain`], other paths
    /// [`IdentityError::NotIdentityPath`].
    pub fn parse_spiffe_id(&self, spiffe_id: &str) -> Result<u32, IdentityError> {
        let (td, path) = split_spiffe_id(spiffe_id)?;
        if td != &*self.0 {
            return Err(IdentityError::ForeignTrustDomain {
                spiffe_id: spiffe_id.to_owned(),
                expected: self.0.to_string(),
            });
        }
        path.strip_prefix(IDENTITY_PATH)
            .and_then(parse_canonical_u32)
            .ok_or_else(|| IdentityError::NotIdentityPath {
                spiffe_id: spiffe_id.to_owned(),
                trust_domain: self.0.to_string(),
            })
    }

    /// Parses the identity out of a TLS server name `<N>.<td>`; `None` for any other name.
    pub fn parse_server_name(&self, name: &str) -> Option<u32> {
        let n = name.strip_suffix(&*self.0)?.strip_suffix('.')?;
        parse_canonical_u32(n)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({:?})", &*self.0)
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self(DEFAULT_TRUST_DOMAIN.into())
    }
}

/// Splits `spiffe://td/path` into `(td, path)`; the path starts with `/`.
pub(crate) fn split_spiffe_id(spiffe_id: &str) -> Result<(&str, &str), IdentityError> {
    let invalid = |reason| IdentityError::InvalidSpiffeId {
        spiffe_id: spiffe_id.to_owned(),
        reason,
    };
    let rest = spiffe_id
        .strip_prefix("spiffe://")
        .ok_or_else(|| invalid("scheme is not spiffe://"))?;
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if td.is_empty() {
        return Err(invalid("empty trust domain"));
    }
    if path.is_empty() || path == "/" {
        return Err(invalid("no path"));
    }
    if path.contains(['?', '#']) {
        return Err(invalid("query or fragment present"));
    }
    Ok((td, path))
}

/// Decimal u32 without sign, leading zeros or other characters.
fn parse_canonical_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.spiffe_id(4242), "spiffe://example.org/identity/4242");
        assert_eq!(td.parse_spiffe_id(&td.spiffe_id(4242)), Ok(4242));
        assert_eq!(td.server_name(7), "7.example.org");
        assert_eq!(td.parse_server_name("7.example.org"), Some(7));
        assert_eq!(
            td.parse_spiffe_id("spiffe://example.org/identity/4294967295"),
            Ok(u32::MAX)
        );
    }

    #[test]
    fn rejects_other_names() {
        let td = TrustDomain::default();
        assert_eq!(td.as_str(), "meshauth.local");
        for bad in [
            "spiffe://meshauth.local/identity/",
            "spiffe://meshauth.local/identity/007",
            "spiffe://meshauth.local/identity/+7",
            "spiffe://meshauth.local/identity/7/x",
            "spiffe://meshauth.local/identity/4294967296",
            "spiffe://meshauth.local/ns/default/sa/x",
        ] {
            assert!(
                matches!(
                    td.parse_spiffe_id(bad),
                    Err(IdentityError::NotIdentityPath { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            td.parse_spiffe_id("spiffe://other.org/identity/7"),
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
        assert!(matches!(
            td.parse_spiffe_id("https://meshauth.local/identity/7"),
            Err(IdentityError::InvalidSpiffeId { .. })
        ));
        assert!(matches!(
            td.parse_spiffe_id("spiffe://meshauth.local"),
            Err(IdentityError::InvalidSpiffeId { .. })
        ));
        assert_eq!(td.parse_server_name("7.other.local"), None);
        assert_eq!(td.parse_server_name("x7.meshauth.local"), None);
        assert_eq!(td.parse_server_name("7meshauth.local"), None);
        assert_eq!(td.parse_server_name("meshauth.local"), None);
    }

    #[test]
    fn validates_trust_domains() {
        assert!(TrustDomain::new("").is_err());
        assert!(TrustDomain::new("Upper.case").is_err());
        assert!(TrustDomain::new("a/b").is_err());
        assert!(TrustDomain::new("cluster-1.example_org").is_ok());
    }
}
