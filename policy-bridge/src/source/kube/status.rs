//! Policy status written back to the cluster by exactly one agent: the
//! holder of a Lease ([`super::lease`]).
//!
//! - meshauth's own kinds get `.status` through the status subresource
//!   (server-side apply, field manager `meshauth-agent`; `reportedBy`
//!   names the node whose agent wrote it): the verdict, what the
//!   rules cover, errors and notes, and an `Enforced` condition. A status
//!   already equal to the one computed is not written again, so a new
//!   leader writes only what changed (and `reportedBy`).
//! - Cilium's kinds are never written: Cilium owns their status. Each gets
//!   a core/v1 Event instead (what `kubectl describe` shows), one object per
//!   policy and verdict with a stable name, patched when its message
//!   changes and refreshed before the API server's event TTL (1 h by
//!   default) would drop it. Cilium policies without authentication rules
//!   get none.
//! - Writes happen on the leader's rounds (every [`LeaseConfig::retry_period`]),
//!   so a policy's status is written at most once per round however fast
//!   the cluster changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::lease::{Elector, LeaseConfig};
use crate::model::crd::{PolicyStatusBody, StatusCondition, StatusCoverage, StatusProblem};
use crate::model::{ObjectKey, ObjectKind, PolicyKind};
use crate::source::Subscription;
use crate::status::{PolicyStatus, Verdict, enforcement};

/// What the watch saw of a policy object, beside its spec.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PolicyRef {
    pub(crate) uid: String,
    pub(crate) generation: Option<i64>,
    /// `.status` as stored (meshauth's kinds).
    pub(crate) status: Option<Value>,
}

/// Every policy object's [`PolicyRef`].
pub(crate) type Refs = BTreeMap<ObjectKey, PolicyRef>;

/// Settings of the status writer.
#[derive(Clone, Debug)]
pub struct StatusConfig {
    /// The Lease deciding the one writer.
    pub lease: LeaseConfig,
    /// How often an unchanged Event is written again (below the API
    /// server's event TTL).
    pub event_refresh: Duration,
}

impl StatusConfig {
    /// A writer for `holder` on the Lease `namespace/name`, with
    /// client-go's default lease duration (15 s).
    pub fn new(namespace: &str, name: &str, holder: &str) -> Self {
        Self {
            lease: LeaseConfig {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                holder: holder.to_owned(),
                duration: Duration::from_secs(15),
            },
            event_refresh: Duration::from_secs(30 * 60),
        }
    }
}

/// The running writer.
#[derive(Debug)]
pub struct StatusWriter {
    stop: watch::Sender<bool>,
    leading: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl StatusWriter {
    /// True while this agent holds the Lease and writes status.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops writing and releases the Lease if held (bounded by `timeout`),
    /// so another agent takes over at once.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            abort.abort();
        }
    }
}

pub(crate) fn spawn(
    client: Client,
    cfg: StatusConfig,
    sub: Subscription,
    refs: watch::Receiver<Arc<Refs>>,
) -> StatusWriter {
    let (stop, mut stop_rx) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut w = Writer {
            elector: Elector::new(client.clone(), cfg.lease.clone()),
            field_manager: "meshauth-agent".to_owned(),
            client,
            cfg,
            written: HashMap::new(),
            events: HashMap::new(),
        };
        let mut tick = tokio::time::interval(w.cfg.lease.retry_period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_leading = false;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => break,
            }
            // One line per outage, not one per round.
            match w.elector.round().await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("policy status lease: the API server answers again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "policy status lease: retrying every round");
                }
                Err(e) => tracing::debug!(error = %e, "policy status lease"),
            }
            let leading = w.elector.leading();
            if leading != was_leading {
                // A new term starts from what the cluster shows.
                w.written.clear();
                w.events.clear();
                was_leading = leading;
                leading_tx.send_replace(leading);
            }
            let snap = sub.current();
            if leading && snap.synced {
                let refs = refs.borrow().clone();
                w.sync(&snap.policies, &refs).await;
            }
        }
        leading_tx.send_replace(false);
        if let Err(e) = w.elector.release().await {
            tracing::warn!(error = %e, "releasing the policy status lease");
        }
    });
    StatusWriter {
        stop,
        leading,
        task,
    }
}

struct EventMemo {
    policy: ObjectKey,
    message: String,
    at: Instant,
}

struct Writer {
    client: Client,
    cfg: StatusConfig,
    elector: Elector,
    field_manager: String,
    /// Status last written per policy (this term).
    written: HashMap<ObjectKey, Value>,
    /// Events written (this term), by Event name.
    events: HashMap<(String, String), EventMemo>,
}

fn kind_of(s: &PolicyStatus) -> Option<PolicyKind> {
    PolicyKind::ALL.into_iter().find(|k| k.as_str() == s.kind)
}

fn reason(v: Verdict) -> &'static str {
    match v {
        Verdict::Accepted => "Accepted",
        Verdict::PartiallyEnforced => "PartiallyEnforced",
        Verdict::Rejected => "Rejected",
    }
}

/// The status in words: the enforcement summary, then the errors and
/// notes, bounded.
fn message(s: &PolicyStatus) -> String {
    let mut m = format!("{}: {}", s.verdict, enforcement(s));
    for e in &s.errors {
        m.push_str(&format!("; error: {e}"));
    }
    for n in &s.notes {
        m.push_str(&format!("; not enforced: {n}"));
    }
    const MAX: usize = 1024;
    if m.len() > MAX {
        let mut cut = MAX - 3;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push_str("...");
    }
    m
}

fn now_seconds() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now())
}

/// The `.status` for a policy; the condition keeps its transition time
/// while its status stays the same.
pub(crate) fn status_body(
    s: &PolicyStatus,
    generation: Option<i64>,
    holder: &str,
    previous: Option<&Value>,
) -> Value {
    let enforced = if s.verdict == Verdict::Accepted {
        "True"
    } else {
        "False"
    };
    let since = previous
        .and_then(|p| p.get("conditions"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Enforced" && c["status"] == enforced)
        .and_then(|c| c["lastTransitionTime"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| now_seconds().to_string());
    let problems = |v: &[crate::compile::Problem]| {
        v.iter()
            .map(|p| StatusProblem {
                path: p.path.clone(),
                message: p.message.clone(),
            })
            .collect()
    };
    let c = &s.coverage;
    let body = PolicyStatusBody {
        observed_generation: generation,
        verdict: Some(s.verdict),
        required_rules: Some(s.required_rules as u64),
        coverage: Some(StatusCoverage {
            compiled_rules: c.compiled_rules as u64,
            pods: c.pods as u64,
            pairs: c.pairs as u64,
            datapath_rules: c.datapath_rules as u64,
        }),
        errors: problems(&s.errors),
        notes: problems(&s.notes),
        reported_by: Some(holder.to_owned()),
        conditions: vec![StatusCondition {
            type_: "Enforced".into(),
            status: enforced.into(),
            reason: reason(s.verdict).into(),
            message: message(s),
            observed_generation: generation,
            last_transition_time: since,
        }],
    };
    serde_json::to_value(body).unwrap_or(Value::Null)
}

/// A stable Event name for a policy and reason (DNS subdomain, ≤ 253).
fn event_name(policy: &str, uid: &str, reason: &str) -> String {
    // FNV-1a: stable across versions and machines, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes().chain([0]).chain(reason.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let head: String = policy.chars().take(200).collect();
    format!("{head}.meshauth.{h:016x}")
}

impl Writer {
    async fn sync(&mut self, policies: &[PolicyStatus], refs: &Refs) {
        let holder = self.cfg.lease.holder.clone();
        for s in policies {
            let Some(kind) = kind_of(s) else { continue };
            let key = ObjectKey {
                kind: ObjectKind::Policy(kind),
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            };
            // Not (yet) seen by the watch, or gone: nothing to write to.
            let Some(r) = refs.get(&key) else { continue };
            if !self.elector.leading() {
                return;
            }
            match kind {
                PolicyKind::MeshAuthPolicy | PolicyKind::ClusterMeshAuthPolicy => {
                    self.write_status(kind, &key, s, r, &holder).await;
                }
                PolicyKind::CiliumNetworkPolicy | PolicyKind::CiliumClusterwideNetworkPolicy => {
                    self.write_event(kind, &key, s, r, &holder).await;
                }
            }
        }
        self.written.retain(|k, _| refs.contains_key(k));
        self.events.retain(|_, m| refs.contains_key(&m.policy));
    }

    async fn write_status(
        &mut self,
        kind: PolicyKind,
        key: &ObjectKey,
        s: &PolicyStatus,
        r: &PolicyRef,
        holder: &str,
    ) {
        let previous = self.written.get(key).or(r.status.as_ref());
        let body = status_body(s, r.generation, holder, previous);
        if r.status.as_ref() == Some(&body) || self.written.get(key) == Some(&body) {
            return;
        }
        let ar = kind.api_resource();
        let api: Api<DynamicObject> = match &s.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        let patch = json!({
            "apiVersion": kind.api_version(),
            "kind": kind.as_str(),
            "metadata": {"name": s.name, "uid": r.uid},
            "status": body,
        });
        let pp = PatchParams::apply(&self.field_manager).force();
        match api.patch_status(&s.name, &pp, &Patch::Apply(&patch)).await {
            Ok(_) => {
                tracing::debug!(policy = %key, verdict = %s.verdict, "policy status written");
                self.written.insert(key.clone(), body);
            }
            // Deleted (or replaced: the uid precondition) meanwhile.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(policy = %key, error = %e, "writing policy status"),
        }
    }

    async fn write_event(
        &mut self,
        kind: PolicyKind,
        key: &ObjectKey,
        s: &PolicyStatus,
        r: &PolicyRef,
        holder: &str,
    ) {
        // Policies without authentication rules are not meshauth's business.
        if s.verdict == Verdict::Accepted && s.required_rules == 0 {
            return;
        }
        let reason = reason(s.verdict);
        let ns = s.namespace.clone().unwrap_or_else(|| "default".into());
        let name = event_name(&s.name, &r.uid, reason);
        let msg = message(s);
        let memo_key = (ns.clone(), name.clone());
        if let Some(m) = self.events.get(&memo_key)
            && m.message == msg
            && m.at.elapsed() < self.cfg.event_refresh
        {
            return;
        }
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let now = now_seconds();
        let result = match api.get_opt(&name).await {
            Ok(Some(ev)) => {
                // A previous term's Event, already saying this: keep it
                // (its timestamps stay true) unless a refresh is due.
                if ev.message.as_deref() == Some(msg.as_str())
                    && !self.events.contains_key(&memo_key)
                    && ev.last_timestamp.as_ref().is_some_and(|t| {
                        now.as_second() - t.0.as_second()
                            < i64::try_from(self.cfg.event_refresh.as_secs()).unwrap_or(i64::MAX)
                    })
                {
                    Ok(())
                } else {
                    let patch = json!({
                        "count": ev.count.unwrap_or(1) + 1,
                        "message": msg,
                        "lastTimestamp": Time(now),
                        "source": {"component": "meshauth-agent", "host": holder},
                        "reportingInstance": holder,
                    });
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(|_| ())
                }
            }
            Ok(None) => {
                let ev = Event {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "meshauth".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    involved_object: ObjectReference {
                        api_version: Some(kind.api_version().into()),
                        kind: Some(kind.as_str().into()),
                        name: Some(s.name.clone()),
                        namespace: s.namespace.clone(),
                        uid: Some(r.uid.clone()),
                        ..ObjectReference::default()
                    },
                    reason: Some(reason.into()),
                    message: Some(msg.clone()),
                    type_: Some(
                        if s.verdict == Verdict::Accepted {
                            "Normal"
                        } else {
                            "Warning"
                        }
                        .into(),
                    ),
                    count: Some(1),
                    first_timestamp: Some(Time(now)),
                    last_timestamp: Some(Time(now)),
                    event_time: None,
                    action: None,
                    related: None,
                    series: None,
                    source: Some(EventSource {
                        component: Some("meshauth-agent".into()),
                        host: Some(holder.to_owned()),
                    }),
                    reporting_component: Some("meshauth.io/agent".into()),
                    reporting_instance: Some(holder.to_owned()),
                };
                api.create(&PostParams::default(), &ev).await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.events.insert(
                    memo_key,
                    EventMemo {
                        policy: key.clone(),
                        message: msg,
                        at: Instant::now(),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(policy = %s.name, kind = %kind, error = %e, "writing policy event")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Problem;
    use crate::status::Coverage;

    fn status(verdict: Verdict, errors: usize) -> PolicyStatus {
        PolicyStatus {
            kind: "MeshAuthPolicy".into(),
            namespace: Some("production".into()),
            name: "p".into(),
            verdict,
            required_rules: 1,
            coverage: Coverage {
                compiled_rules: 1,
                pods: 2,
                pairs: 1,
                datapath_rules: 1,
            },
            errors: (0..errors)
                .map(|i| Problem {
                    path: format!("spec.ingress[{i}]"),
                    message: "x".repeat(100),
                })
                .collect(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn the_condition_keeps_its_transition_time_while_its_status_holds() {
        let first = status_body(&status(Verdict::Accepted, 0), Some(3), "node-a", None);
        let mut stored = first.clone();
        stored["conditions"][0]["lastTransitionTime"] = "2020-01-01T00:00:00Z".into();
        let again = status_body(
            &status(Verdict::Accepted, 0),
            Some(4),
            "node-b",
            Some(&stored),
        );
        assert_eq!(
            again["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(again["conditions"][0]["observedGeneration"], 4);
        assert_eq!(again["observedGeneration"], 4);
        assert_eq!(again["reportedBy"], "node-b");
        let flipped = status_body(
            &status(Verdict::Rejected, 1),
            Some(5),
            "node-b",
            Some(&stored),
        );
        assert_ne!(
            flipped["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(flipped["conditions"][0]["status"], "False");
        assert_eq!(flipped["conditions"][0]["reason"], "Rejected");
        assert_eq!(flipped["verdict"], "rejected");
        assert_eq!(flipped["errors"][0]["path"], "spec.ingress[0]");
        // The same input gives the same body: an unchanged status is not
        // written again.
        assert_eq!(
            status_body(
                &status(Verdict::Accepted, 0),
                Some(4),
                "node-b",
                Some(&again)
            ),
            again
        );
    }

    #[test]
    fn messages_are_bounded_and_name_the_first_errors() {
        let m = message(&status(Verdict::PartiallyEnforced, 50));
        assert!(m.len() <= 1024 && m.ends_with("..."), "{}", m.len());
        assert!(m.starts_with("partially enforced: 1 compiled rule"), "{m}");
        assert!(m.contains("error: spec.ingress[0]"), "{m}");
    }

    #[test]
    fn event_names_are_stable_dns_subdomains_per_policy_uid_and_reason() {
        let long = "a".repeat(253);
        let n = event_name(&long, "uid-1", "Accepted");
        assert!(n.len() <= 253, "{}", n.len());
        assert!(
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        );
        assert_eq!(n, event_name(&long, "uid-1", "Accepted"));
        assert_ne!(n, event_name(&long, "uid-2", "Accepted"));
        assert_ne!(n, event_name(&long, "uid-1", "Rejected"));
        assert!(event_name("p", "u", "Accepted").starts_with("p.meshauth."));
    }
}
