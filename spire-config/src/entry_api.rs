//! The registration reconciler's side of the wire: a client of SPIRE's Entry
//! API (`spire.api.server.entry.v1`) on the server's local admin socket —
//! where spire-controller-manager talks to it too — and [`reconcile`], which
//! lists every entry (all pages), plans against what meshauth wants
//! ([`crate::entries::plan`]) and applies the plan in batches of at most
//! [`crate::entries::MAX_BATCH`]: creations first, then updates, then deletions, so an
//! identity moving between nodes is never without an entry.
//!
//! Per-entry failures do not stop the run: they are collected in the
//! [`Report`] with the entry and SPIRE's message, and the next run tries
//! again. `ALREADY_EXISTS` on create (the entry was made by an earlier run,
//! or the same entry exists under someone else's ID) and `NOT_FOUND` on
//! delete (already gone) count as done.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use spire_proto::entry::entry_client::EntryClient as GrpcEntryClient;
use spire_proto::entry::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchUpdateEntryRequest, ListEntriesRequest,
};
use spire_proto::types;
use tonic::transport::Channel;

use crate::entries::{Entry, Selector, plan};

/// Entries asked for per ListEntries page.
pub const DEFAULT_PAGE_SIZE: i32 = 500;

/// gRPC status codes the reconciler tells apart.
const CODE_OK: i32 = 0;
const CODE_NOT_FOUND: i32 = 5;
const CODE_ALREADY_EXISTS: i32 = 6;

/// What went wrong talking to the Entry API.
#[derive(Debug, thiserror::Error)]
pub enum EntryApiError {
    /// The admin socket could not be reached.
    #[error(
        "cannot reach the SPIRE server's admin socket {socket}: {message} \
         (is spire-server running with socket_path = \"{socket}\"?)"
    )]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        message: String,
    },
    /// A call failed as a whole.
    #[error("SPIRE Entry API {call} failed: {code:?}: {message}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// gRPC code.
        code: tonic::Code,
        /// SPIRE's message.
        message: String,
    },
    /// SPIRE answered with something this client cannot read.
    #[error("SPIRE Entry API {call}: {message}")]
    Malformed {
        /// The RPC.
        call: &'static str,
        /// What was wrong.
        message: String,
    },
}

fn call_error(call: &'static str, s: &tonic::Status) -> EntryApiError {
    EntryApiError::Call {
        call,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// A SPIFFE ID split as the API carries it (`spiffe://td/path` → `td`,
/// `/path`).
fn to_proto_id(id: &str) -> Result<types::Spiffeid, String> {
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{id:?} is not a SPIFFE ID (no spiffe:// scheme)"))?;
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if td.is_empty() {
        return Err(format!("{id:?} has no trust domain"));
    }
    Ok(types::Spiffeid {
        trust_domain: td.to_owned(),
        path: path.to_owned(),
    })
}

fn from_proto_id(id: Option<&types::Spiffeid>) -> String {
    id.map_or_else(String::new, |i| {
        format!("spiffe://{}{}", i.trust_domain, i.path)
    })
}

/// The fields meshauth never sets, as `name=value` for those set on an
/// entry (by hand, or by someone widening meshauth's entries: `admin` and
/// `downstream` would hand a node far more than its identities).
fn extras_of(e: &types::Entry) -> BTreeSet<String> {
    let mut x = BTreeSet::new();
    if e.admin {
        x.insert("admin=true".to_owned());
    }
    if e.downstream {
        x.insert("downstream=true".to_owned());
    }
    if e.store_svid {
        x.insert("store_svid=true".to_owned());
    }
    if e.expires_at != 0 {
        x.insert(format!("expires_at={}", e.expires_at));
    }
    if e.jwt_svid_ttl != 0 {
        x.insert(format!("jwt_svid_ttl={}", e.jwt_svid_ttl));
    }
    if !e.hint.is_empty() {
        x.insert(format!("hint={}", e.hint));
    }
    for d in &e.dns_names {
        x.insert(format!("dns_name={d}"));
    }
    for f in &e.federates_with {
        x.insert(format!("federates_with={f}"));
    }
    x
}

/// An entry as SPIRE holds it, in meshauth's terms.
pub fn from_proto(e: &types::Entry) -> Entry {
    Entry {
        id: e.id.clone(),
        spiffe_id: from_proto_id(e.spiffe_id.as_ref()),
        parent_id: from_proto_id(e.parent_id.as_ref()),
        selectors: e
            .selectors
            .iter()
            .map(|s| Selector::new(&s.r#type, &s.value))
            .collect(),
        x509_svid_ttl: u32::try_from(e.x509_svid_ttl).unwrap_or(0),
        extras: extras_of(e),
    }
}

/// The entry as sent to SPIRE: every field meshauth does not use is at its
/// zero value, so an update clears what was set by hand.
pub fn to_proto(e: &Entry) -> Result<types::Entry, String> {
    Ok(types::Entry {
        id: e.id.clone(),
        spiffe_id: Some(to_proto_id(&e.spiffe_id)?),
        parent_id: Some(to_proto_id(&e.parent_id)?),
        selectors: e
            .selectors
            .iter()
            .map(|s| types::Selector {
                r#type: s.kind.clone(),
                value: s.value.clone(),
            })
            .collect(),
        x509_svid_ttl: i32::try_from(e.x509_svid_ttl)
            .map_err(|_| format!("x509_svid_ttl {} is too large", e.x509_svid_ttl))?,
        ..types::Entry::default()
    })
}

/// Which batch write.
#[derive(Debug, Clone, Copy)]
enum Write {
    Create,
    Update,
}

/// A client of the Entry API on the server's admin socket.
#[derive(Debug, Clone)]
pub struct EntryClient {
    inner: GrpcEntryClient<Channel>,
    page_size: i32,
}

impl EntryClient {
    /// Connects to `socket` (waiting at most `timeout`).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, EntryApiError> {
        use hyper_util::rt::TokioIo;
        use tokio::net::UnixStream;
        use tonic::transport::{Endpoint, Uri};
        let path = socket.to_owned();
        let fail = |message: String| EntryApiError::Connect {
            socket: socket.to_owned(),
            message,
        };
        let endpoint = Endpoint::from_static("http://spire-server.invalid")
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = tokio::time::timeout(
            timeout,
            endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            })),
        )
        .await
        .map_err(|_| fail(format!("no connection within {timeout:?}")))?
        .map_err(|e| fail(source_chain(&e)))?;
        Ok(Self {
            inner: GrpcEntryClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
            page_size: DEFAULT_PAGE_SIZE,
        })
    }

    /// Sets the ListEntries page size.
    #[must_use]
    pub fn with_page_size(mut self, page_size: i32) -> Self {
        self.page_size = page_size;
        self
    }

    /// Every entry on the server (all pages), and how many pages it took.
    pub async fn list(&mut self) -> Result<(Vec<Entry>, usize), EntryApiError> {
        let mut out = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let resp = self
                .inner
                .list_entries(ListEntriesRequest {
                    page_size: self.page_size,
                    page_token: token.clone(),
                    ..ListEntriesRequest::default()
                })
                .await
                .map_err(|s| call_error("ListEntries", &s))?
                .into_inner();
            pages += 1;
            out.extend(resp.entries.iter().map(from_proto));
            if resp.next_page_token.is_empty() {
                return Ok((out, pages));
            }
            if resp.next_page_token == token {
                return Err(EntryApiError::Malformed {
                    call: "ListEntries",
                    message: format!("the same page token twice ({token:?})"),
                });
            }
            token = resp.next_page_token;
        }
    }

    /// Creates `entries` (at most [`crate::entries::MAX_BATCH`]); one outcome per entry.
    pub async fn create(&mut self, entries: &[Entry]) -> Result<Vec<Outcome>, EntryApiError> {
        self.write(Write::Create, entries).await
    }

    /// Replaces `entries` whole (every field); one outcome per entry.
    pub async fn update(&mut self, entries: &[Entry]) -> Result<Vec<Outcome>, EntryApiError> {
        self.write(Write::Update, entries).await
    }

    /// BatchCreateEntry or BatchUpdateEntry (no masks: every field) of the
    /// entries that encode; a failed outcome for each that does not.
    async fn write(
        &mut self,
        kind: Write,
        entries: &[Entry],
    ) -> Result<Vec<Outcome>, EntryApiError> {
        let (sendable, mut outcomes) = encode(entries);
        if sendable.is_empty() {
            return Ok(outcomes);
        }
        let ids: Vec<String> = sendable.iter().map(|e| e.id.clone()).collect();
        let (call, statuses): (&'static str, Vec<_>) = match kind {
            Write::Create => (
                "BatchCreateEntry",
                self.inner
                    .batch_create_entry(BatchCreateEntryRequest {
                        entries: sendable,
                        output_mask: None,
                    })
                    .await
                    .map_err(|s| call_error("BatchCreateEntry", &s))?
                    .into_inner()
                    .results
                    .into_iter()
                    .map(|r| r.status)
                    .collect(),
            ),
            Write::Update => (
                "BatchUpdateEntry",
                self.inner
                    .batch_update_entry(BatchUpdateEntryRequest {
                        entries: sendable,
                        input_mask: None,
                        output_mask: None,
                    })
                    .await
                    .map_err(|s| call_error("BatchUpdateEntry", &s))?
                    .into_inner()
                    .results
                    .into_iter()
                    .map(|r| r.status)
                    .collect(),
            ),
        };
        outcomes.extend(zip_statuses(call, &ids, statuses)?);
        Ok(outcomes)
    }

    /// Deletes entries by ID; one outcome per ID.
    pub async fn delete(&mut self, ids: &[String]) -> Result<Vec<Outcome>, EntryApiError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let resp = self
            .inner
            .batch_delete_entry(BatchDeleteEntryRequest { ids: ids.to_vec() })
            .await
            .map_err(|s| call_error("BatchDeleteEntry", &s))?
            .into_inner();
        let statuses = resp.results.into_iter().map(|r| r.status).collect();
        zip_statuses("BatchDeleteEntry", ids, statuses)
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The entries that encode, and a failed outcome for each that does not.
fn encode(entries: &[Entry]) -> (Vec<types::Entry>, Vec<Outcome>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for e in entries {
        match to_proto(e) {
            Ok(p) => ok.push(p),
            Err(message) => bad.push(Outcome {
                id: e.id.clone(),
                code: -1,
                message,
            }),
        }
    }
    (ok, bad)
}

fn zip_statuses(
    call: &'static str,
    ids: &[String],
    statuses: Vec<Option<types::Status>>,
) -> Result<Vec<Outcome>, EntryApiError> {
    if statuses.len() != ids.len() {
        return Err(EntryApiError::Malformed {
            call,
            message: format!("{} results for {} entries", statuses.len(), ids.len()),
        });
    }
    Ok(ids
        .iter()
        .zip(statuses)
        .map(|(id, s)| {
            let s = s.unwrap_or_default();
            Outcome {
                id: id.clone(),
                code: s.code,
                message: s.message,
            }
        })
        .collect())
}

/// SPIRE's answer for one entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The entry's ID.
    pub id: String,
    /// gRPC code (0: done; -1: not sent, it could not be encoded).
    pub code: i32,
    /// SPIRE's message.
    pub message: String,
}

/// What one reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries on the server before.
    pub listed: usize,
    /// ListEntries pages read.
    pub pages: usize,
    /// Entries meshauth wants.
    pub desired: usize,
    /// Created.
    pub created: usize,
    /// Creations SPIRE answered ALREADY_EXISTS (made by an earlier run, or
    /// the same entry under another ID).
    pub already_existed: usize,
    /// Put back after a change by hand.
    pub updated: usize,
    /// Deleted (nobody wants them any more).
    pub deleted: usize,
    /// Others' entries, left alone.
    pub foreign: usize,
    /// Batches sent.
    pub batches: usize,
    /// Entries SPIRE refused, with its message.
    pub failed: Vec<String>,
}

impl Report {
    /// Whether nothing failed.
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty()
    }

    /// Whether the run changed anything on the server.
    pub fn changed(&self) -> bool {
        self.created + self.updated + self.deleted > 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} entries listed ({} pages), {} wanted: {} created, {} already existed, \
             {} put back, {} deleted, {} of others left alone, {} failed",
            self.listed,
            self.pages,
            self.desired,
            self.created,
            self.already_existed,
            self.updated,
            self.deleted,
            self.foreign,
            self.failed.len()
        )
    }
}

/// One pass: list, plan against `desired`, apply.
pub async fn reconcile(
    client: &mut EntryClient,
    desired: &BTreeMap<String, Entry>,
) -> Result<Report, EntryApiError> {
    let (existing, pages) = client.list().await?;
    let p = plan(&existing, desired);
    let mut r = Report {
        listed: existing.len(),
        pages,
        desired: desired.len(),
        foreign: p.foreign,
        ..Report::default()
    };
    let by_id: BTreeMap<&str, &Entry> = desired.values().map(|e| (e.id.as_str(), e)).collect();
    let describe = |id: &str| {
        by_id.get(id).map_or_else(
            || id.to_owned(),
            |e| format!("{id} ({} under {})", e.spiffe_id, e.parent_id),
        )
    };
    for batch in p.create_batches() {
        r.batches += 1;
        for o in client.create(batch).await? {
            match o.code {
                CODE_OK => r.created += 1,
                CODE_ALREADY_EXISTS => r.already_existed += 1,
                _ => r
                    .failed
                    .push(format!("create {}: {}", describe(&o.id), o.message)),
            }
        }
    }
    for batch in p.update_batches() {
        r.batches += 1;
        for o in client.update(batch).await? {
            match o.code {
                CODE_OK => r.updated += 1,
                _ => r
                    .failed
                    .push(format!("update {}: {}", describe(&o.id), o.message)),
            }
        }
    }
    for batch in p.delete_batches() {
        r.batches += 1;
        for o in client.delete(batch).await? {
            match o.code {
                CODE_OK | CODE_NOT_FOUND => r.deleted += 1,
                _ => r.failed.push(format!("delete {}: {}", o.id, o.message)),
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_split_and_join_as_the_api_carries_them() {
        let p = to_proto_id("spiffe://example.org/identity/256").unwrap();
        assert_eq!(p.trust_domain, "example.org");
        assert_eq!(p.path, "/identity/256");
        assert_eq!(from_proto_id(Some(&p)), "spiffe://example.org/identity/256");
        assert!(to_proto_id("https://example.org/x").is_err());
        assert!(to_proto_id("spiffe:///x").is_err());
    }

    #[test]
    fn hand_set_fields_show_as_extras_and_an_update_clears_them() {
        let e = Entry {
            id: "meshauth-1".into(),
            spiffe_id: "spiffe://td/identity/256".into(),
            parent_id: "spiffe://td/meshauth/node/a".into(),
            selectors: [Selector::new("unix", "uid:0")].into(),
            x509_svid_ttl: 0,
            extras: BTreeSet::new(),
        };
        let mut widened = to_proto(&e).unwrap();
        widened.admin = true;
        widened.downstream = true;
        widened.dns_names = vec!["evil.example".into()];
        let back = from_proto(&widened);
        assert_eq!(
            back.extras,
            BTreeSet::from([
                "admin=true".to_owned(),
                "dns_name=evil.example".to_owned(),
                "downstream=true".to_owned()
            ])
        );
        assert_ne!(back, e, "a widened entry must not look like the wanted one");
        let sent = to_proto(&e).unwrap();
        assert!(!sent.admin && !sent.downstream && sent.dns_names.is_empty());
    }

    #[test]
    fn a_batch_answer_of_the_wrong_length_is_an_error() {
        let ids = vec!["a".to_owned(), "b".to_owned()];
        let err = zip_statuses("BatchDeleteEntry", &ids, vec![None]).unwrap_err();
        assert!(err.to_string().contains("1 results for 2 entries"), "{err}");
    }
}
