//! Namespaces and pods → identities and endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::{Allocation, Engine, EngineError, PodEntry};
use crate::labels::LabelSet;
use crate::model::ObjectKey;
use crate::state::{Endpoint, Identity};

/// The uids a pod's containers run as, where the spec says: each
/// container's `securityContext.runAsUser`, else the pod's; a pod without
/// containers in the spec (a bare manifest), the pod's. Containers that
/// say nothing (the image's user) are left out.
fn run_as_users(spec: &k8s_openapi::api::core::v1::PodSpec) -> BTreeSet<u32> {
    let pod = spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .and_then(|u| u32::try_from(u).ok());
    if spec.containers.is_empty() {
        return pod.into_iter().collect();
    }
    spec.containers
        .iter()
        .filter_map(|c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .and_then(|u| u32::try_from(u).ok())
                .or(pod)
        })
        .collect()
}

impl Engine {
    pub(super) fn upsert_namespace(&mut self, ns: &Namespace) -> Result<(), EngineError> {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        self.set_namespace(&name, Some(labels))
    }

    pub(super) fn set_namespace(
        &mut self,
        name: &str,
        labels: Option<BTreeMap<String, String>>,
    ) -> Result<(), EngineError> {
        let old = self.namespaces.get(name);
        if old == labels.as_ref() {
            return Ok(());
        }
        match labels {
            Some(l) => self.namespaces.insert(name.to_string(), l),
            None => self.namespaces.remove(name),
        };
        let pods: Vec<String> = self
            .ns_pods
            .get(name)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for p in pods {
            let key = (name.to_string(), p);
            if let Some(entry) = self.pods.get(&key).cloned() {
                self.set_pod(key, Some(entry))?;
            }
        }
        Ok(())
    }

    pub(super) fn upsert_pod(&mut self, pod: &Pod) -> Result<(), EngineError> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        ips.sort();
        ips.dedup();
        let entry = PodEntry {
            namespace: ns.clone(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ips,
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            run_as: spec.map(run_as_users).unwrap_or_default(),
            running: phase == "Running",
            wants_identity: !host_network && phase != "Succeeded" && phase != "Failed",
            ..PodEntry::default()
        };
        self.set_pod((ns, name), Some(entry))
    }

    /// Replaces a pod's entry (`None` = deleted) and updates identities,
    /// endpoints and rules.
    pub(super) fn set_pod(
        &mut self,
        key: (String, String),
        new: Option<PodEntry>,
    ) -> Result<(), EngineError> {
        let old = self.pods.remove(&key);
        let new = match new {
            Some(mut e) => {
                e.label_set = e.wants_identity.then(|| {
                    let empty = BTreeMap::new();
                    let nsl = self.namespaces.get(&e.namespace).unwrap_or(&empty);
                    LabelSet::for_pod(&e.labels, &e.namespace, &e.service_account, nsl)
                });
                e.identity = match &e.label_set {
                    None => None,
                    Some(ls) => self.resolve(ls)?,
                };
                e.endpoints = if e.identity.is_some() && e.running && !e.node.is_empty() {
                    e.ips.clone()
                } else {
                    Vec::new()
                };
                Some(e)
            }
            None => None,
        };
        let (old_ls, old_id, old_eps) = old
            .as_ref()
            .map(|o| (o.label_set.clone(), o.identity, o.endpoints.clone()))
            .unwrap_or_default();
        let (new_ls, new_id) = new
            .as_ref()
            .map(|n| (n.label_set.clone(), n.identity))
            .unwrap_or_default();
        if old_ls != new_ls {
            if let Some(ls) = &old_ls
                && let Some(set) = self.labels_pods.get_mut(ls)
            {
                set.remove(&key);
                if set.is_empty() {
                    self.labels_pods.remove(ls);
                    self.pending.remove(ls);
                }
            }
            if let Some(ls) = &new_ls {
                self.labels_pods
                    .entry(ls.clone())
                    .or_default()
                    .insert(key.clone());
            }
        }
        for ip in &old_eps {
            if self
                .state
                .endpoints
                .get(ip)
                .is_some_and(|e| e.pod == pod_name(&key))
            {
                self.tracker.endpoint(&self.state, *ip);
                self.state.endpoints.remove(ip);
            }
        }
        if old_id != new_id {
            if let Some(id) = new_id {
                self.acquire(id);
            }
            if let Some(id) = old_id {
                self.release(id);
            }
        }
        let name = pod_name(&key);
        match new
            .as_ref()
            .filter(|n| !n.endpoints.is_empty() && !n.uid.is_empty())
        {
            Some(n) => {
                self.state.pod_uids.insert(name.clone(), n.uid.clone());
            }
            None => {
                self.state.pod_uids.remove(&name);
            }
        }
        match new
            .as_ref()
            .filter(|n| !n.endpoints.is_empty() && !n.run_as.is_empty())
        {
            Some(n) => {
                self.state.pod_run_as.insert(name, n.run_as.clone());
            }
            None => {
                self.state.pod_run_as.remove(&name);
            }
        }
        match new {
            Some(n) => {
                for ip in &n.endpoints {
                    self.tracker.endpoint(&self.state, *ip);
                    self.state.endpoints.insert(
                        *ip,
                        Endpoint {
                            ip: *ip,
                            identity: n.identity.expect("endpoints only with an identity"),
                            node: n.node.clone(),
                            pod: pod_name(&key),
                        },
                    );
                }
                self.ns_pods
                    .entry(key.0.clone())
                    .or_default()
                    .insert(key.1.clone());
                self.pods.insert(key, n);
            }
            None => {
                if let Some(set) = self.ns_pods.get_mut(&key.0) {
                    set.remove(&key.1);
                }
            }
        }
        Ok(())
    }

    pub(super) fn resolve(&mut self, ls: &LabelSet) -> Result<Option<u32>, EngineError> {
        if let Some(id) = self.table.get(ls) {
            return Ok(Some(id));
        }
        match self.cfg.allocation {
            Allocation::Local => {
                let id = self
                    .table
                    .allocate(ls)
                    .map_err(|source| EngineError::Identity {
                        labels: ls.clone(),
                        source,
                    })?;
                self.table_dirty = true;
                Ok(Some(id))
            }
            Allocation::Deferred => {
                self.pending.insert(ls.clone());
                Ok(None)
            }
        }
    }

    /// Records an identity allocated elsewhere (a MeshIdentity object) and
    /// gives waiting pods their identity.
    pub fn identity_allocated(&mut self, id: u32, labels: LabelSet) -> Result<(), EngineError> {
        if self.table.labels(id) == Some(&labels) && !self.pending.contains(&labels) {
            return Ok(());
        }
        self.table
            .insert(id, labels.clone())
            .map_err(|source| EngineError::Identity {
                labels: labels.clone(),
                source,
            })?;
        self.pending.remove(&labels);
        self.refresh_label_set(&labels)
    }

    /// Records that an identity object disappeared. Returns false (and keeps
    /// it) if pods still use it — the caller should re-create it.
    pub fn identity_deleted(&mut self, id: u32) -> Result<bool, EngineError> {
        if self.id_users.get(&id).copied().unwrap_or(0) > 0 {
            return Ok(false);
        }
        // A deleted object ends a quarantine too (the deleter decided it was over).
        self.table.end_quarantine(id);
        if let Some(labels) = self.table.remove(id) {
            // A duplicate with a higher number may now be in effect.
            self.refresh_label_set(&labels)?;
        }
        Ok(true)
    }

    pub(super) fn refresh_label_set(&mut self, labels: &LabelSet) -> Result<(), EngineError> {
        let pods: Vec<(String, String)> = self
            .labels_pods
            .get(labels)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for key in pods {
            if let Some(e) = self.pods.get(&key).cloned() {
                self.set_pod(key, Some(e))?;
            }
        }
        Ok(())
    }

    /// Frees identities unused for `grace` into quarantine from `wall` (the
    /// wall-clock time of `now`); returns them (the caller marks their
    /// persisted form freed).
    pub fn collect_identities(
        &mut self,
        now: Instant,
        grace: Duration,
        wall: SystemTime,
    ) -> Vec<(u32, LabelSet)> {
        let gone = self.table.collect(now, grace, wall);
        if !gone.is_empty() {
            self.table_dirty = true;
        }
        gone
    }

    /// Ends the quarantine of numbers freed at least `quarantine` before
    /// `wall`; returns them (the caller deletes their persisted form).
    pub fn release_quarantined(&mut self, wall: SystemTime, quarantine: Duration) -> Vec<u32> {
        let done = self.table.release_quarantined(wall, quarantine);
        if !done.is_empty() {
            self.table_dirty = true;
        }
        done
    }

    /// Records a number another node freed (a MeshIdentity with `freedAt`).
    /// Returns false (and changes nothing) if pods here still use it — the
    /// caller should take it back.
    pub fn identity_quarantined(
        &mut self,
        id: u32,
        labels: LabelSet,
        freed_at: SystemTime,
    ) -> Result<bool, EngineError> {
        if self.id_users.get(&id).copied().unwrap_or(0) > 0 {
            return Ok(false);
        }
        self.table
            .quarantine(id, labels.clone(), freed_at)
            .map_err(|source| EngineError::Identity {
                labels: labels.clone(),
                source,
            })?;
        // A duplicate with a higher number may now be in effect.
        self.refresh_label_set(&labels)?;
        Ok(true)
    }

    pub(super) fn acquire(&mut self, id: u32) {
        let n = self.id_users.entry(id).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.table.mark_used(id);
            self.identity_appeared(id);
        }
    }

    pub(super) fn release(&mut self, id: u32) {
        let Some(n) = self.id_users.get_mut(&id) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.id_users.remove(&id);
            self.identity_gone(id);
            let now = self.now.unwrap_or_else(Instant::now);
            self.table.mark_unused(id, now);
        }
    }

    pub(super) fn identity_appeared(&mut self, id: u32) {
        let Some(labels) = self.table.labels(id).cloned() else {
            return;
        };
        self.tracker.identity(&self.state, id);
        self.state.identities.insert(
            id,
            Identity {
                id,
                labels: labels.canonical(),
            },
        );
        for (k, v) in labels.iter() {
            self.label_index
                .entry((k.to_string(), v.to_string()))
                .or_default()
                .insert(id);
        }
        let mut users = BTreeSet::new();
        for sel in self.candidate_selectors(&labels) {
            if let Some(entry) = self.selectors.get_mut(&sel) {
                entry.ids.insert(id);
                users.extend(entry.users.iter().cloned());
            }
        }
        self.present.insert(id, labels);
        for (pk, idx) in users {
            self.pairs_with(&pk, idx, id, 1);
        }
    }

    pub(super) fn identity_gone(&mut self, id: u32) {
        let Some(labels) = self.present.get(&id).cloned() else {
            return;
        };
        // Only selectors its labels satisfy can hold it.
        let candidates = self.candidate_selectors(&labels);
        let users: BTreeSet<(ObjectKey, usize)> = candidates
            .iter()
            .filter_map(|s| self.selectors.get(s))
            .filter(|e| e.ids.contains(&id))
            .flat_map(|e| e.users.iter().cloned())
            .collect();
        for (pk, idx) in users {
            self.pairs_with(&pk, idx, id, -1);
        }
        for s in &candidates {
            if let Some(e) = self.selectors.get_mut(s) {
                e.ids.remove(&id);
            }
        }
        for (k, v) in labels.iter() {
            let key = (k.to_string(), v.to_string());
            if let Some(s) = self.label_index.get_mut(&key) {
                s.remove(&id);
                if s.is_empty() {
                    self.label_index.remove(&key);
                }
            }
        }
        self.present.remove(&id);
        self.tracker.identity(&self.state, id);
        self.state.identities.remove(&id);
    }
}

impl Engine {
    /// The selectors in use that match `labels`, found among those whose
    /// index hint is one of its labels and those without a hint (never a
    /// scan of every selector).
    fn candidate_selectors(&self, labels: &LabelSet) -> Vec<crate::selector::Selector> {
        let hinted = labels
            .iter()
            .filter_map(|(k, v)| self.sel_by_hint.get(&(k.to_string(), v.to_string())));
        self.sel_unhinted
            .iter()
            .chain(hinted.flatten())
            .filter(|s| s.matches(labels))
            .cloned()
            .collect()
    }
}

fn pod_name(key: &(String, String)) -> String {
    format!("{}/{}", key.0, key.1)
}
