//! CLI subcommands: `policy status --dir` works without an agent; the
//! others ask the running agent over its local API and render the answer.

use std::fmt::Write as _;
use std::path::Path;

use crate::api::types::{AgentStatus, AuthEntry, IdentityEntry};
use crate::api::{ApiClient, ApiError};

use policy_bridge::Verdict;
use policy_bridge::source::files::{FilesConfig, FilesSource};
use policy_bridge::status::{render_json, render_text};

/// `meshauth policy status --dir DIR`: what meshauth makes of every policy
/// in a manifest directory (the same compiler the agent runs), as text or
/// JSON. Returns the report and whether every policy was accepted or
/// partially enforced (none rejected, every file readable), so scripts and
/// CI can fail on a rejected policy.
pub fn policy_status(dir: &Path, json: bool) -> anyhow::Result<(String, bool)> {
    let mut source = FilesSource::new(FilesConfig::new(dir))?;
    source.sync()?;
    let statuses = source.engine().status();
    let load_errors = source.errors().to_vec();
    let clean = load_errors.is_empty() && statuses.iter().all(|s| s.verdict != Verdict::Rejected);
    let report = if json {
        let policies: serde_json::Value = serde_json::from_str(&render_json(&statuses)?)?;
        serde_json::to_string_pretty(&serde_json::json!({
            "policies": policies,
            "load_errors": load_errors,
        }))?
    } else {
        let mut out = render_text(&statuses);
        for e in &load_errors {
            out.push_str(&format!("load error: {e}\n"));
        }
        if statuses.is_empty() && load_errors.is_empty() {
            out.push_str(&format!("no policies in {}\n", dir.display()));
        }
        out
    };
    Ok((report, clean))
}

/// `meshauth policy status` against a running agent: what it enforces now.
/// Returns the report and whether no policy is rejected.
pub async fn policy_status_live(api: &ApiClient, json: bool) -> Result<(String, bool), ApiError> {
    let text = api
        .get_text(if json {
            "/v1/policies?o=json"
        } else {
            "/v1/policies?o=text"
        })
        .await?;
    let rejected = if json {
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| a.iter().any(|p| p["verdict"] == "rejected"))
    } else {
        text.lines().any(|l| l.contains("rejected"))
    };
    Ok((text, !rejected))
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

/// `meshauth status` for people.
pub fn render_status(s: &AgentStatus) -> String {
    let mut o = String::new();
    let r = &s.ready;
    let _ = writeln!(
        o,
        "Node:        {} (meshauth {}, mode {}, started {})",
        s.node, s.version, s.mode, s.started
    );
    let _ = writeln!(
        o,
        "Ready:       {} (datapath attached: {}, SPIRE answered: {}, policy synced: {})",
        if r.all() { "yes" } else { "NO" },
        yes(r.datapath),
        yes(r.svids),
        yes(r.policy)
    );
    let sp = &s.spire;
    let _ = writeln!(
        o,
        "SPIRE:       {} since {} via {} ({}); {} SVIDs, earliest expiry {}; {} reconnects",
        sp.state,
        sp.since.as_deref().unwrap_or("-"),
        sp.source,
        sp.socket,
        sp.svids,
        sp.next_expiry.as_deref().unwrap_or("-"),
        sp.reconnects
    );
    if sp.outage {
        let _ = writeln!(
            o,
            "             OUTAGE: cached SVIDs stay in use until they expire; nothing rotates until SPIRE is back"
        );
    }
    if sp.overdue_svids > 0 {
        let _ = writeln!(
            o,
            "             WARNING: {} SVIDs past 3/4 of their lifetime and not rotated (SPIRE server unreachable?); they stay in use until they expire ({})",
            sp.overdue_svids,
            sp.next_expiry.as_deref().unwrap_or("-")
        );
    }
    if let Some(e) = &sp.last_error {
        let _ = writeln!(o, "             last error: {e}");
    }
    let d = &s.datapath;
    let _ = writeln!(
        o,
        "Datapath:    {} links on {} (pins {})",
        d.links, d.cgroup, d.pin_dir
    );
    let _ = writeln!(
        o,
        "Maps:        auth {}/{} ({:.1}%), ipcache {}, policy {}",
        d.auth_entries,
        d.auth_capacity,
        if d.auth_capacity > 0 {
            100.0 * d.auth_entries as f64 / f64::from(d.auth_capacity)
        } else {
            0.0
        },
        d.ipcache_entries,
        d.policy_entries
    );
    let _ = writeln!(
        o,
        "Drops:       {} packets dropped for \"Authentication required\"",
        d.auth_required_drops
    );
    let p = &s.policy;
    let _ = writeln!(
        o,
        "Policy:      {} (generation {}, synced {}): {} policies ({} rejected), {} identities, {} endpoints, {} auth rules",
        p.source,
        p.generation,
        yes(p.synced),
        p.policies,
        p.rejected,
        p.identities,
        p.endpoints,
        p.rules
    );
    for e in &p.errors {
        let _ = writeln!(o, "             input error: {e}");
    }
    let h = &s.handshakes;
    let _ = writeln!(
        o,
        "Handshakes:  initiated {} ok / {} failed, served {} ok / {} failed",
        h.initiated_ok, h.initiated_failed, h.served_ok, h.served_failed
    );
    let _ = writeln!(o, "Peers:       {}", s.peers.len());
    for peer in &s.peers {
        let _ = writeln!(
            o,
            "  {:<24} id {:<5} {:<40} {} pairs",
            peer.node, peer.id, peer.address, peer.pairs
        );
    }
    o
}

/// `meshauth auth list` for people.
pub fn render_auth(entries: &[AuthEntry]) -> String {
    let mut o = format!(
        "{:<8} {:<8} {:<24} {:<26} {}\n",
        "LOCAL", "REMOTE", "NODE", "EXPIRES", "REMAINING"
    );
    for e in entries {
        let node = match (&e.node, e.node_id) {
            (_, 0) => "(this node)".to_string(),
            (Some(n), id) => format!("{n} ({id})"),
            (None, id) => format!("? ({id})"),
        };
        let remaining = if e.remaining_seconds < 0 {
            "expired".to_string()
        } else {
            format!("{}s", e.remaining_seconds)
        };
        let _ = writeln!(
            o,
            "{:<8} {:<8} {:<24} {:<26} {}",
            e.local, e.remote, node, e.expiry, remaining
        );
    }
    let _ = writeln!(o, "{} entries", entries.len());
    o
}

/// `meshauth identity list` for people.
pub fn render_identities(ids: &[IdentityEntry]) -> String {
    let mut o = String::new();
    for i in ids {
        let _ = writeln!(o, "{}  {}", i.id, i.spiffe_id);
        let _ = writeln!(o, "    labels: {}", i.labels.join(", "));
        let _ = writeln!(o, "    nodes:  {}", i.nodes.join(", "));
        if !i.local_pods.is_empty() {
            let _ = writeln!(o, "    pods here: {}", i.local_pods.join(", "));
            let _ = writeln!(
                o,
                "    SVID here: {}",
                i.svid_expiry
                    .as_deref()
                    .map(|e| format!("until {e}"))
                    .unwrap_or_else(|| "NONE (no SPIRE entry for this node?)".to_string())
            );
        }
    }
    let _ = writeln!(o, "{} identities", ids.len());
    o
}

/// `meshauth observe`: prints flows (text lines or Hubble-style JSON)
/// until the agent closes the stream, `limit` flows were printed, or the
/// output goes away.
pub async fn observe(
    api: &ApiClient,
    filter: &ObserveArgs,
    mut out: impl std::io::Write,
) -> Result<(), ApiError> {
    let mut path = format!("/v1/flows?last={}", filter.last);
    if let Some(v) = &filter.verdict {
        path.push_str(&format!("&verdict={}", v.to_ascii_uppercase()));
    }
    if let Some(id) = filter.identity {
        path.push_str(&format!("&identity={id}"));
    }
    if filter.follow {
        path.push_str("&follow=true");
    }
    api.stream_lines(&path, |line| {
        let text = if filter.json {
            line.to_string()
        } else {
            match serde_json::from_str::<crate::api::types::FlowRecord>(line) {
                Ok(r) => crate::api::flows::render_line(&r),
                Err(_) => line.to_string(),
            }
        };
        writeln!(out, "{text}").is_ok() && out.flush().is_ok()
    })
    .await
}

/// What `meshauth observe` asks for.
#[derive(Debug, Clone, Default)]
pub struct ObserveArgs {
    /// `DROPPED`, `FORWARDED` or `AUDIT`.
    pub verdict: Option<String>,
    /// Only flows of this identity.
    pub identity: Option<u32>,
    /// How many past flows to print first.
    pub last: usize,
    /// Keep streaming new flows.
    pub follow: bool,
    /// Hubble-style JSON, one flow per line.
    pub json: bool,
}
