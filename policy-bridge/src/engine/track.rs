//! Remembers the first old value of everything a batch touches, so the
//! diff is exact and costs O(touched), not O(state).

use std::collections::HashMap;
use std::net::IpAddr;

use crate::state::{AuthRule, DesiredState, Endpoint, Identity, NodeInfo, StateDiff};

#[derive(Debug, Default)]
pub(super) struct Tracker {
    identities: HashMap<u32, Option<Identity>>,
    endpoints: HashMap<IpAddr, Option<Endpoint>>,
    nodes: HashMap<String, Option<NodeInfo>>,
    rules: HashMap<AuthRule, bool>,
}

impl Tracker {
    pub(super) fn identity(&mut self, s: &DesiredState, id: u32) {
        self.identities
            .entry(id)
            .or_insert_with(|| s.identities.get(&id).cloned());
    }

    pub(super) fn endpoint(&mut self, s: &DesiredState, ip: IpAddr) {
        self.endpoints
            .entry(ip)
            .or_insert_with(|| s.endpoints.get(&ip).cloned());
    }

    pub(super) fn node(&mut self, s: &DesiredState, name: &str) {
        if !self.nodes.contains_key(name) {
            self.nodes
                .insert(name.to_string(), s.nodes.get(name).cloned());
        }
    }

    pub(super) fn rule(&mut self, s: &DesiredState, r: AuthRule) {
        self.rules.entry(r).or_insert_with(|| s.rules.contains(&r));
    }

    pub(super) fn finish(self, s: &DesiredState) -> StateDiff {
        let mut d = StateDiff::default();
        for (id, old) in self.identities {
            match (old, s.identities.get(&id)) {
                (old, Some(new)) if old.as_ref() != Some(new) => {
                    d.identities_upserted.push(new.clone())
                }
                (Some(_), None) => d.identities_removed.push(id),
                _ => {}
            }
        }
        for (ip, old) in self.endpoints {
            match (old, s.endpoints.get(&ip)) {
                (old, Some(new)) if old.as_ref() != Some(new) => {
                    d.endpoints_upserted.push(new.clone())
                }
                (Some(_), None) => d.endpoints_removed.push(ip),
                _ => {}
            }
        }
        for (name, old) in self.nodes {
            match (old, s.nodes.get(&name)) {
                (old, Some(new)) if old.as_ref() != Some(new) => d.nodes_upserted.push(new.clone()),
                (Some(_), None) => d.nodes_removed.push(name),
                _ => {}
            }
        }
        for (r, was) in self.rules {
            match (was, s.rules.contains(&r)) {
                (false, true) => d.rules_added.push(r),
                (true, false) => d.rules_removed.push(r),
                _ => {}
            }
        }
        d.identities_upserted.sort();
        d.identities_removed.sort();
        d.endpoints_upserted.sort();
        d.endpoints_removed.sort();
        d.nodes_upserted.sort();
        d.nodes_removed.sort();
        d.rules_added.sort();
        d.rules_removed.sort();
        d
    }
}
