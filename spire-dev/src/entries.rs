//! Registration entries: which SPIFFE ID is issued to which node agent, for
//! which selectors, with which TTL.
//!
//! A node agent serves every entry parented to its node. On the Workload API
//! the caller is treated as matching every entry of the node (spire-dev does
//! no workload attestation); on the Delegated Identity API an entry matches
//! when all its selectors are contained in the request's selectors.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::spiffe_id::SpiffeId;
use meshauth_duration::{DurationError, parse_duration};

/// The longest TTL an entry may ask for; the CA itself lives ten years.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 86_400);

/// Errors about SPIFFE IDs, selectors and registration entries.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// `SpiffeId::parse` rejected `value`; `reason` says what is wrong.
    #[error(
        "SpiffeId::parse({value:?}): {reason}; expected spiffe://<trust-domain>/<path> or /<path>"
    )]
    SpiffeId {
        /// The offending input.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `Entries::add` got a SPIFFE ID of another trust domain than the server's.
    #[error("Entries::add({spiffe_id}): trust domain {got:?} is not the server's {want:?}")]
    TrustDomain {
        /// The SPIFFE ID of the rejected entry.
        spiffe_id: String,
        /// Its trust domain.
        got: String,
        /// The server's trust domain.
        want: String,
    },
    /// `Selector::parse` rejected `value` (expected `type:value`).
    #[error("Selector::parse({value:?}): expected <type>:<value>, e.g. k8s:ns:default")]
    Selector {
        /// The offending input.
        value: String,
    },
    /// `EntrySpec::parse_cli` rejected `value`; `reason` says what is wrong.
    #[error(
        "EntrySpec::parse_cli({value:?}): {reason}; expected NODE=SPIFFE_ID_OR_PATH[,selector=type:value...][,ttl=DURATION][,id=ID]"
    )]
    Spec {
        /// The offending input.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `EntrySpec::parse_cli` could not read the `ttl=` part of an entry.
    #[error("EntrySpec::parse_cli: ttl: {0}")]
    Ttl(#[from] DurationError),
    /// `Entries::add` got a TTL of zero or above [`MAX_TTL`].
    #[error("Entries::add({spiffe_id}): ttl {ttl} out of range (1s..=366d)")]
    TtlRange {
        /// The SPIFFE ID of the rejected entry.
        spiffe_id: String,
        /// The rejected TTL, formatted.
        ttl: String,
    },
    /// `Entries::add` got an entry ID that is already registered.
    #[error("Entries::add: entry id {id:?} already exists")]
    DuplicateId {
        /// The duplicate ID.
        id: String,
    },
    /// `Entries::add` got an empty node name.
    #[error("Entries::add({spiffe_id}): empty parent node name")]
    EmptyNode {
        /// The SPIFFE ID of the rejected entry.
        spiffe_id: String,
    },
    /// `Entries::remove` found no entry with ID `id`.
    #[error("Entries::remove({id:?}): no such entry")]
    NotFound {
        /// The unknown ID.
        id: String,
    },
}

/// A workload selector `type:value` (`k8s:ns:default`, `meshauth:identity:7`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    /// The selector type (`k8s`, `unix`, `meshauth`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The value; may itself contain `:`.
    pub value: String,
}

impl Selector {
    /// Builds a selector.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// Parses `type:value` (split at the first `:`; both parts non-empty).
    pub fn parse(value: &str) -> Result<Self, EntryError> {
        match value.split_once(':') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok(Self::new(k, v)),
            _ => Err(EntryError::Selector {
                value: value.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// What to register: an entry before the server gives it an ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntrySpec {
    /// The entry ID; generated (`entry-<n>`) when `None`.
    #[serde(default)]
    pub id: Option<String>,
    /// The SPIFFE ID to issue.
    pub spiffe_id: SpiffeId,
    /// The node whose agent receives the SVID (SPIRE's parent ID).
    pub node: String,
    /// Selectors, used by the Delegated Identity API.
    #[serde(default)]
    pub selectors: Vec<Selector>,
    /// SVID TTL; the server default when `None`.
    #[serde(default, with = "meshauth_duration::serde::option")]
    pub ttl: Option<Duration>,
}

impl EntrySpec {
    /// An entry for `spiffe_id` on `node`, no selectors, default TTL.
    pub fn new(node: impl Into<String>, spiffe_id: SpiffeId) -> Self {
        Self {
            id: None,
            spiffe_id,
            node: node.into(),
            selectors: Vec::new(),
            ttl: None,
        }
    }

    /// Adds a selector.
    pub fn with_selector(mut self, selector: Selector) -> Self {
        self.selectors.push(selector);
        self
    }

    /// Sets the TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the entry ID.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Parses the `--entry` flag: `NODE=SPIFFE_ID_OR_PATH[,selector=type:value...][,ttl=DURATION][,id=ID]`;
    /// a path is taken relative to `trust_domain`.
    pub fn parse_cli(trust_domain: &str, value: &str) -> Result<Self, EntryError> {
        let spec_err = |reason: &str| EntryError::Spec {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = value.split(',');
        let head = parts.next().unwrap_or_default();
        let (node, id) = head
            .split_once('=')
            .ok_or_else(|| spec_err("missing NODE="))?;
        if node.is_empty() {
            return Err(spec_err("empty node name"));
        }
        let mut spec = Self::new(node, SpiffeId::parse_in(trust_domain, id)?);
        for part in parts {
            match part.split_once('=') {
                Some(("selector", s)) => spec.selectors.push(Selector::parse(s)?),
                Some(("ttl", t)) => spec.ttl = Some(parse_duration(t)?),
                Some(("id", i)) if !i.is_empty() => spec.id = Some(i.to_owned()),
                _ => return Err(spec_err(&format!("unknown option {part:?}"))),
            }
        }
        Ok(spec)
    }
}

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The entry ID.
    pub id: String,
    /// Registration order; SVIDs are listed in this order (the first is the default SVID).
    pub seq: u64,
    /// The SPIFFE ID issued.
    pub spiffe_id: SpiffeId,
    /// The parent node.
    pub node: String,
    /// Selectors (Delegated Identity API matching).
    pub selectors: Vec<Selector>,
    /// The SVID TTL.
    #[serde(with = "meshauth_duration::serde")]
    pub ttl: Duration,
}

impl Entry {
    /// Whether the entry's selectors are all contained in `request` (SPIRE's
    /// subset match; an entry without selectors matches any request).
    pub fn matches_selectors(&self, request: &[Selector]) -> bool {
        self.selectors.iter().all(|s| request.contains(s))
    }
}

/// The server's registration entries, in registration order.
#[derive(Debug, Default)]
pub struct Entries {
    by_id: BTreeMap<String, Entry>,
    next_seq: u64,
}

impl Entries {
    /// Validates and registers `spec` in `trust_domain` with `default_ttl` when it has none.
    pub fn add(
        &mut self,
        trust_domain: &str,
        default_ttl: Duration,
        spec: EntrySpec,
    ) -> Result<Entry, EntryError> {
        let spiffe_id = spec.spiffe_id.to_string();
        if spec.spiffe_id.trust_domain() != trust_domain {
            return Err(EntryError::TrustDomain {
                spiffe_id,
                got: spec.spiffe_id.trust_domain().to_owned(),
                want: trust_domain.to_owned(),
            });
        }
        if spec.node.is_empty() {
            return Err(EntryError::EmptyNode { spiffe_id });
        }
        let ttl = spec.ttl.unwrap_or(default_ttl);
        if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
            return Err(EntryError::TtlRange {
                spiffe_id,
                ttl: meshauth_duration::format_duration(ttl),
            });
        }
        if let Some(id) = spec.id.as_ref().filter(|id| self.by_id.contains_key(*id)) {
            return Err(EntryError::DuplicateId { id: id.clone() });
        }
        self.next_seq += 1;
        let mut seq = self.next_seq;
        let id = match spec.id {
            Some(id) => id,
            None => loop {
                let id = format!("entry-{seq}");
                if !self.by_id.contains_key(&id) {
                    break id;
                }
                self.next_seq += 1;
                seq = self.next_seq;
            },
        };
        let entry = Entry {
            id: id.clone(),
            seq,
            spiffe_id: spec.spiffe_id,
            node: spec.node,
            selectors: spec.selectors,
            ttl,
        };
        self.by_id.insert(id, entry.clone());
        Ok(entry)
    }

    /// Removes the entry `id`.
    pub fn remove(&mut self, id: &str) -> Result<Entry, EntryError> {
        self.by_id
            .remove(id)
            .ok_or_else(|| EntryError::NotFound { id: id.to_owned() })
    }

    /// All entries, in registration order.
    pub fn all(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self.by_id.values().cloned().collect();
        v.sort_by_key(|e| e.seq);
        v
    }

    /// The entries parented to `node`, in registration order.
    pub fn for_node(&self, node: &str) -> Vec<Entry> {
        let mut v: Vec<Entry> = self
            .by_id
            .values()
            .filter(|e| e.node == node)
            .cloned()
            .collect();
        v.sort_by_key(|e| e.seq);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_spec() {
        let spec = EntrySpec::parse_cli(
            "meshauth.local",
            "node-a=/identity/256,selector=k8s:ns:default,selector=meshauth:identity:256,ttl=30s,id=e1",
        )
        .expect("valid spec");
        assert_eq!(spec.node, "node-a");
        assert_eq!(
            spec.spiffe_id.to_string(),
            "spiffe://meshauth.local/identity/256"
        );
        assert_eq!(
            spec.selectors,
            vec![
                Selector::new("k8s", "ns:default"),
                Selector::new("meshauth", "identity:256")
            ]
        );
        assert_eq!(spec.ttl, Some(Duration::from_secs(30)));
        assert_eq!(spec.id.as_deref(), Some("e1"));
        assert!(EntrySpec::parse_cli("td", "noequals").is_err());
        assert!(EntrySpec::parse_cli("td", "n=/x,bogus=1").is_err());
        assert!(EntrySpec::parse_cli("td", "n=/x,selector=nocolon").is_err());
    }

    #[test]
    fn registry_rules() {
        let mut e = Entries::default();
        let td = "meshauth.local";
        let ttl = Duration::from_secs(60);
        let id = |p| SpiffeId::parse_in(td, p).expect("id");
        let a = e.add(td, ttl, EntrySpec::new("n1", id("/a"))).expect("a");
        e.add(td, ttl, EntrySpec::new("n2", id("/b"))).expect("b");
        e.add(td, ttl, EntrySpec::new("n1", id("/c"))).expect("c");
        assert_eq!(a.ttl, ttl);
        let n1: Vec<_> = e
            .for_node("n1")
            .into_iter()
            .map(|e| e.spiffe_id.path().to_owned())
            .collect();
        assert_eq!(n1, ["/a", "/c"]);
        let other = SpiffeId::parse("spiffe://other.td/x").expect("id");
        assert!(matches!(
            e.add(td, ttl, EntrySpec::new("n1", other)),
            Err(EntryError::TrustDomain { .. })
        ));
        assert!(matches!(
            e.add(
                td,
                ttl,
                EntrySpec::new("n1", id("/z")).with_ttl(Duration::ZERO)
            ),
            Err(EntryError::TtlRange { .. })
        ));
        assert!(matches!(
            e.add(
                td,
                ttl,
                EntrySpec::new("n1", id("/d")).with_id(a.id.clone())
            ),
            Err(EntryError::DuplicateId { .. })
        ));
        e.remove(&a.id).expect("remove");
        assert!(matches!(e.remove(&a.id), Err(EntryError::NotFound { .. })));
        assert_eq!(e.all().len(), 2);
    }

    #[test]
    fn selector_subset_match() {
        let mut e = Entries::default();
        let entry = e
            .add(
                "td",
                Duration::from_secs(60),
                EntrySpec::new("n", SpiffeId::parse("spiffe://td/x").expect("id"))
                    .with_selector(Selector::new("k8s", "ns:a"))
                    .with_selector(Selector::new("k8s", "sa:b")),
            )
            .expect("add");
        let a = Selector::new("k8s", "ns:a");
        let b = Selector::new("k8s", "sa:b");
        let c = Selector::new("k8s", "pod:c");
        assert!(entry.matches_selectors(&[a.clone(), b.clone(), c.clone()]));
        assert!(!entry.matches_selectors(&[a, c]));
    }
}
