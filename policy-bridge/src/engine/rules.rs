//! Policies → selector cache → reference-counted auth rules.

use std::collections::BTreeSet;

use super::{Engine, EngineError, SelEntry};
use crate::compile::{Peer, compile_policy};
use crate::model::{ObjectKey, PolicyObject};
use crate::selector::Selector;
use crate::state::{AuthRule, Remote};

impl Engine {
    pub(super) fn upsert_policy(&mut self, p: &PolicyObject) -> Result<(), EngineError> {
        let compiled = compile_policy(p);
        if self.policies.get(&compiled.key) == Some(&compiled) {
            return Ok(());
        }
        self.remove_policy(&compiled.key);
        let key = compiled.key.clone();
        for (idx, r) in compiled.rules.iter().enumerate() {
            self.use_selector(&r.subject, &key, idx);
            if let Peer::Selector(s) = &r.peer {
                self.use_selector(s, &key, idx);
            }
        }
        self.policies.insert(key.clone(), compiled);
        for idx in 0..self.policies[&key].rules.len() {
            self.all_pairs(&key, idx, 1);
        }
        Ok(())
    }

    pub(super) fn remove_policy(&mut self, key: &ObjectKey) {
        let Some(n) = self.policies.get(key).map(|c| c.rules.len()) else {
            return;
        };
        for idx in 0..n {
            self.all_pairs(key, idx, -1);
        }
        let compiled = self.policies.remove(key).expect("checked above");
        for (idx, r) in compiled.rules.iter().enumerate() {
            self.unuse_selector(&r.subject, key, idx);
            if let Peer::Selector(s) = &r.peer {
                self.unuse_selector(s, key, idx);
            }
        }
    }

    pub(super) fn use_selector(&mut self, sel: &Selector, key: &ObjectKey, idx: usize) {
        if !self.selectors.contains_key(sel) {
            let candidates: Box<dyn Iterator<Item = u32>> = match sel.index_hint() {
                Some((k, v)) => Box::new(
                    self.label_index
                        .get(&(k.to_string(), v.to_string()))
                        .into_iter()
                        .flatten()
                        .copied(),
                ),
                None => Box::new(self.present.keys().copied()),
            };
            let ids = candidates
                .filter(|id| sel.matches(&self.present[id]))
                .collect();
            self.selectors.insert(
                sel.clone(),
                SelEntry {
                    ids,
                    users: BTreeSet::new(),
                },
            );
            match sel.index_hint() {
                Some((k, v)) => {
                    self.sel_by_hint
                        .entry((k.to_string(), v.to_string()))
                        .or_default()
                        .insert(sel.clone());
                }
                None => {
                    self.sel_unhinted.insert(sel.clone());
                }
            }
        }
        let e = self.selectors.get_mut(sel).expect("inserted above");
        e.users.insert((key.clone(), idx));
    }

    pub(super) fn unuse_selector(&mut self, sel: &Selector, key: &ObjectKey, idx: usize) {
        if let Some(e) = self.selectors.get_mut(sel) {
            e.users.remove(&(key.clone(), idx));
            if e.users.is_empty() {
                self.selectors.remove(sel);
                match sel.index_hint() {
                    Some((k, v)) => {
                        let hk = (k.to_string(), v.to_string());
                        if let Some(set) = self.sel_by_hint.get_mut(&hk) {
                            set.remove(sel);
                            if set.is_empty() {
                                self.sel_by_hint.remove(&hk);
                            }
                        }
                    }
                    None => {
                        self.sel_unhinted.remove(sel);
                    }
                }
            }
        }
    }

    /// Adds (`delta` = 1) or removes (-1) every rule of a compiled rule.
    pub(super) fn all_pairs(&mut self, key: &ObjectKey, idx: usize, delta: i32) {
        let r = &self.policies[key].rules[idx];
        let locals = &self.selectors[&r.subject].ids;
        let remotes: Vec<Remote> = match &r.peer {
            Peer::AnyCluster => vec![Remote::AnyCluster],
            Peer::Selector(s) => self.selectors[s]
                .ids
                .iter()
                .map(|&i| Remote::Identity(i))
                .collect(),
        };
        let mut out = Vec::new();
        for &l in locals {
            for &rem in &remotes {
                for &(protocol, ports) in &r.ports {
                    out.push(AuthRule {
                        local: l,
                        remote: rem,
                        direction: r.direction,
                        protocol,
                        ports,
                    });
                }
            }
        }
        self.count(out, delta);
    }

    /// Adds or removes the rules of a compiled rule that involve `id`
    /// (which the selector cache already lists).
    pub(super) fn pairs_with(&mut self, key: &ObjectKey, idx: usize, id: u32, delta: i32) {
        let Some(r) = self.policies.get(key).and_then(|p| p.rules.get(idx)) else {
            return;
        };
        let locals = &self.selectors[&r.subject].ids;
        let peer_ids = match &r.peer {
            Peer::AnyCluster => None,
            Peer::Selector(s) => Some(&self.selectors[s].ids),
        };
        let mut pairs = Vec::new();
        if locals.contains(&id) {
            match peer_ids {
                None => pairs.push((id, Remote::AnyCluster)),
                Some(ids) => pairs.extend(ids.iter().map(|&p| (id, Remote::Identity(p)))),
            }
        }
        if let Some(ids) = peer_ids
            && ids.contains(&id)
        {
            pairs.extend(
                locals
                    .iter()
                    .filter(|&&l| l != id)
                    .map(|&l| (l, Remote::Identity(id))),
            );
        }
        let mut out = Vec::new();
        for (local, remote) in pairs {
            for &(protocol, ports) in &r.ports {
                out.push(AuthRule {
                    local,
                    remote,
                    direction: r.direction,
                    protocol,
                    ports,
                });
            }
        }
        self.count(out, delta);
    }

    pub(super) fn count(&mut self, rules: Vec<AuthRule>, delta: i32) {
        for rule in rules {
            if delta > 0 {
                let n = self.rule_counts.entry(rule).or_insert(0);
                *n += 1;
                if *n == 1 {
                    self.tracker.rule(&self.state, rule);
                    self.state.rules.insert(rule);
                }
            } else if let Some(n) = self.rule_counts.get_mut(&rule) {
                *n -= 1;
                if *n == 0 {
                    self.rule_counts.remove(&rule);
                    self.tracker.rule(&self.state, rule);
                    self.state.rules.remove(&rule);
                }
            }
        }
    }
}
