//! Text views of the local API's answers, for people: what `meshauth
//! status`, `auth list` and `identity list` print (the demo prints them
//! too). Flows render in [`super::flows::render_line`].

use std::fmt::Write as _;

use super::types::{AgentStatus, AuthEntry, IdentityEntry};

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
    for p in &sp.pods {
        let _ = writeln!(
            o,
            "             pod {}: {} (pid {}, identity {}){}{}",
            p.pod,
            p.state,
            p.pid.map_or("-".to_owned(), |v| v.to_string()),
            p.identity.map_or("-".to_owned(), |v| v.to_string()),
            if p.ignored.is_empty() {
                String::new()
            } else {
                format!("; ignored {}", p.ignored.join(", "))
            },
            p.error
                .as_deref()
                .map_or(String::new(), |e| format!("; {e}"))
        );
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
    match &s.wireguard {
        None => {
            let _ = writeln!(o, "WireGuard:   off");
        }
        Some(w) => render_wireguard(&mut o, w),
    }
    o
}

fn render_wireguard(o: &mut String, w: &crate::wireguard::manager::WireGuardStatus) {
    let _ = writeln!(
        o,
        "WireGuard:   {} (UDP {}, MTU {}), key {} ({}), {} peers, {} key rotations",
        w.interface,
        w.listen_port,
        w.mtu,
        w.public_key,
        if w.published {
            "published"
        } else {
            "NOT published"
        },
        w.peers.len(),
        w.rotations
    );
    if let Some(e) = &w.publish_error {
        let _ = writeln!(o, "             publish error: {e}");
    }
    if let Some(e) = &w.last_error {
        let _ = writeln!(o, "             last error: {e}");
    }
    for p in &w.peers {
        let node = if p.node.is_empty() {
            "(no node: collected)"
        } else {
            &p.node
        };
        let _ = writeln!(
            o,
            "  {:<24} {} {:<22} handshake {:<26} rx {} B tx {} B",
            node,
            p.public_key,
            p.endpoint.as_deref().unwrap_or("-"),
            p.last_handshake.as_deref().unwrap_or("never"),
            p.rx_bytes,
            p.tx_bytes
        );
        let _ = writeln!(o, "  {:<24} allowed {}", "", p.allowed_ips.join(", "));
    }
    for (node, why) in &w.refused {
        let _ = writeln!(o, "  {node:<24} no peer: {why}");
    }
    for c in &w.conflicts {
        let _ = writeln!(o, "  address conflict: {c}");
    }
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

#[cfg(test)]
mod tests {
    use crate::wireguard::manager::{PeerView, WireGuardStatus};

    #[test]
    fn wireguard_shows_each_peer_and_every_node_without_one() {
        let w = WireGuardStatus {
            interface: "meshauth_wg0".into(),
            mtu: 1420,
            listen_port: 51871,
            public_key: "OWN=".into(),
            published: false,
            publish_error: Some("no manifest holds node a".into()),
            peers: vec![PeerView {
                node: "node-b".into(),
                public_key: "BKEY=".into(),
                endpoint: Some("10.0.0.2:51871".into()),
                allowed_ips: vec!["10.0.0.2/32".into(), "10.42.2.0/24".into()],
                last_handshake: None,
                rx_bytes: 10,
                tx_bytes: 20,
            }],
            refused: [("node-c".to_owned(), "published no WireGuard key".to_owned())].into(),
            conflicts: vec![],
            last_error: None,
            rotations: 2,
            as_of: "2026-11-30T00:00:00Z".into(),
        };
        let mut o = String::new();
        super::render_wireguard(&mut o, &w);
        for needle in [
            "meshauth_wg0 (UDP 51871, MTU 1420), key OWN= (NOT published), 1 peers, 2 key rotations",
            "publish error: no manifest holds node a",
            "node-b",
            "BKEY= 10.0.0.2:51871",
            "handshake never",
            "rx 10 B tx 20 B",
            "allowed 10.0.0.2/32, 10.42.2.0/24",
            "node-c                   no peer: published no WireGuard key",
        ] {
            assert!(o.contains(needle), "missing {needle:?} in:\n{o}");
        }
    }
}
