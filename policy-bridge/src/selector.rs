//! Label selectors with Cilium's semantics: `k8s:`/`any:` sources,
//! `matchLabels` and `matchExpressions`, and the namespace rules — a
//! namespaced policy's subject is always its own namespace, its peers are
//! too unless they name `io.kubernetes.pod.namespace`; a clusterwide
//! policy's peers are every pod that has a namespace (every cluster pod).

use std::collections::BTreeSet;
use std::fmt;

use crate::labels::{LabelSet, NAMESPACE_LABEL, SelectorKey, Source};
use crate::model::policy::{EndpointSelector, SelectorOperator};

/// Errors in a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// `In`/`NotIn` without values.
    #[error("matchExpressions[{index}] ({key} {op:?}): needs at least one value")]
    MissingValues {
        /// Index in matchExpressions.
        index: usize,
        /// The key.
        key: String,
        /// The operator.
        op: SelectorOperator,
    },
    /// `Exists`/`DoesNotExist` with values.
    #[error("matchExpressions[{index}] ({key} {op:?}): takes no values")]
    UnexpectedValues {
        /// Index in matchExpressions.
        index: usize,
        /// The key.
        key: String,
        /// The operator.
        op: SelectorOperator,
    },
}

/// Where a policy lives, which bounds what its selectors can select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A namespaced policy.
    Namespace(String),
    /// A clusterwide policy.
    Cluster,
}

/// A requirement's operation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// The value is one of these.
    In(BTreeSet<String>),
    /// The key is absent or the value is none of these.
    NotIn(BTreeSet<String>),
    /// The key is present.
    Exists,
    /// The key is absent.
    DoesNotExist,
}

/// One requirement on one key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    /// The key, with its source.
    pub key: SelectorKey,
    /// The operation.
    pub op: Op,
}

impl Requirement {
    fn matches(&self, labels: &LabelSet) -> bool {
        let value = if self.key.matches_pods() {
            labels.get(&self.key.key)
        } else {
            None
        };
        match (&self.op, value) {
            (Op::In(vs), Some(v)) => vs.contains(v),
            (Op::In(_), None) => false,
            (Op::NotIn(vs), Some(v)) => !vs.contains(v),
            (Op::NotIn(_), None) => true,
            (Op::Exists, v) => v.is_some(),
            (Op::DoesNotExist, v) => v.is_none(),
        }
    }
}

/// A normalized selector: requirements sorted and deduplicated, namespace
/// rules applied. Equal selectors select the same identities, so compiled
/// policies share them.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

fn ns_key() -> SelectorKey {
    SelectorKey {
        source: Source::K8s,
        key: NAMESPACE_LABEL.to_string(),
    }
}

impl Selector {
    /// Converts a policy selector without namespace rules.
    pub fn from_spec(es: &EndpointSelector) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for (k, v) in es.match_labels.iter().flatten() {
            reqs.push(Requirement {
                key: SelectorKey::parse(k),
                op: Op::In(BTreeSet::from([v.clone()])),
            });
        }
        for (index, e) in es.match_expressions.iter().flatten().enumerate() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match e.operator {
                SelectorOperator::In | SelectorOperator::NotIn if values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        index,
                        key: e.key.clone(),
                        op: e.operator,
                    });
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        index,
                        key: e.key.clone(),
                        op: e.operator,
                    });
                }
                SelectorOperator::In => Op::In(values),
                SelectorOperator::NotIn => Op::NotIn(values),
                SelectorOperator::Exists => Op::Exists,
                SelectorOperator::DoesNotExist => Op::DoesNotExist,
            };
            reqs.push(Requirement {
                key: SelectorKey::parse(&e.key),
                op,
            });
        }
        let mut s = Self { reqs };
        s.normalize();
        Ok(s)
    }

    /// The pods a policy applies to. In a namespaced policy the subject is
    /// always the policy's namespace (Cilium drops any other namespace
    /// requirement); returns whether one was dropped.
    pub fn subject(es: &EndpointSelector, scope: &Scope) -> Result<(Self, bool), SelectorError> {
        let mut s = Self::from_spec(es)?;
        let mut dropped = false;
        if let Scope::Namespace(ns) = scope {
            let before = s.reqs.len();
            let own = Op::In(BTreeSet::from([ns.clone()]));
            s.reqs.retain(|r| !(r.key.is_namespace() && r.op == own));
            let kept_other = s.reqs.iter().any(|r| r.key.is_namespace());
            s.reqs.retain(|r| !r.key.is_namespace());
            dropped = kept_other && s.reqs.len() < before;
            s.reqs.push(Requirement {
                key: ns_key(),
                op: own,
            });
            s.normalize();
        }
        Ok((s, dropped))
    }

    /// A peer selector (`fromEndpoints`/`toEndpoints` entry).
    pub fn peer(es: &EndpointSelector, scope: &Scope) -> Result<Self, SelectorError> {
        let mut s = Self::from_spec(es)?;
        if !s.reqs.iter().any(|r| r.key.is_namespace()) && !s.has_reserved() {
            let op = match scope {
                Scope::Namespace(ns) => Op::In(BTreeSet::from([ns.clone()])),
                Scope::Cluster => Op::Exists,
            };
            s.reqs.push(Requirement { key: ns_key(), op });
            s.normalize();
        }
        Ok(s)
    }

    fn normalize(&mut self) {
        self.reqs.sort();
        self.reqs.dedup();
    }

    /// True when this selects every cluster pod and nothing else ("any
    /// cluster identity").
    pub fn is_any_cluster(&self) -> bool {
        matches!(self.reqs.as_slice(), [r] if r.key.is_namespace() && r.op == Op::Exists)
    }

    /// True when it names a `reserved:` label (host, world, …): such peers
    /// have no SPIFFE identity.
    pub fn has_reserved(&self) -> bool {
        self.reqs.iter().any(|r| r.key.source == Source::Reserved)
    }

    /// True if an identity with these labels is selected.
    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.reqs.iter().all(|r| r.matches(labels))
    }

    /// A `(key, value)` every selected identity must carry, for index
    /// lookups: one other than the namespace when there is one (a
    /// namespace is shared by many identities; an app label by few).
    pub fn index_hint(&self) -> Option<(&str, &str)> {
        fn hint(r: &Requirement) -> Option<(&str, &str)> {
            match &r.op {
                Op::In(vs) if vs.len() == 1 && r.key.matches_pods() => {
                    vs.iter().next().map(|v| (r.key.key.as_str(), v.as_str()))
                }
                _ => None,
            }
        }
        let ns = ns_key();
        self.reqs
            .iter()
            .filter(|r| r.key != ns)
            .find_map(hint)
            .or_else(|| self.reqs.iter().find_map(hint))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .reqs
            .iter()
            .map(|r| match &r.op {
                Op::In(v) => format!("{} in ({})", r.key, join(v)),
                Op::NotIn(v) => format!("{} notin ({})", r.key, join(v)),
                Op::Exists => format!("{}", r.key),
                Op::DoesNotExist => format!("!{}", r.key),
            })
            .collect();
        write!(f, "{{{}}}", parts.join(", "))
    }
}

fn join(v: &BTreeSet<String>) -> String {
    v.iter().cloned().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::policy::LabelSelectorRequirement;

    fn labels(ns: &str, pairs: &[(&str, &str)]) -> LabelSet {
        let pod: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let nsl = BTreeMap::from([("team".to_string(), format!("{ns}-team"))]);
        LabelSet::for_pod(&pod, ns, "default", &nsl)
    }

    fn es(ml: &[(&str, &str)], me: &[(&str, SelectorOperator, &[&str])]) -> EndpointSelector {
        EndpointSelector {
            match_labels: Some(
                ml.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: Some(
                me.iter()
                    .map(|(k, op, vs)| LabelSelectorRequirement {
                        key: k.to_string(),
                        operator: *op,
                        values: Some(vs.iter().map(|s| s.to_string()).collect()),
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let web = labels("prod", &[("app", "web"), ("tier", "front")]);
        let db = labels("prod", &[("app", "db")]);
        let cluster = Scope::Cluster;
        let sel = |ml: &[(&str, &str)], me: &[(&str, SelectorOperator, &[&str])]| {
            Selector::peer(&es(ml, me), &cluster).unwrap()
        };
        use SelectorOperator::*;
        let s = sel(&[], &[("app", In, &["web", "api"])]);
        assert!(s.matches(&web) && !s.matches(&db));
        let s = sel(&[], &[("tier", NotIn, &["front"])]);
        assert!(
            !s.matches(&web) && s.matches(&db),
            "NotIn matches an absent key"
        );
        let s = sel(&[], &[("tier", Exists, &[])]);
        assert!(s.matches(&web) && !s.matches(&db));
        let s = sel(&[], &[("k8s:tier", DoesNotExist, &[])]);
        assert!(!s.matches(&web) && s.matches(&db));
        let s = sel(&[("any:app", "db")], &[]);
        assert!(s.matches(&db) && !s.matches(&web));
        let s = sel(&[("container:app", "db")], &[]);
        assert!(!s.matches(&db), "other sources select no pod");
        let s = sel(&[("io.cilium.k8s.namespace.labels.team", "prod-team")], &[]);
        assert!(s.matches(&db));
        assert!(Selector::peer(&es(&[], &[("a", In, &[])]), &cluster).is_err());
        assert!(Selector::peer(&es(&[], &[("a", Exists, &["x"])]), &cluster).is_err());
    }

    #[test]
    fn namespace_rules() {
        let prod = labels("prod", &[("app", "web")]);
        let dev = labels("dev", &[("app", "web")]);
        let in_prod = Scope::Namespace("prod".into());
        let web = es(&[("app", "web")], &[]);
        let p = Selector::peer(&web, &in_prod).unwrap();
        assert!(
            p.matches(&prod) && !p.matches(&dev),
            "peers stay in the policy's namespace"
        );
        let named = es(
            &[("app", "web"), ("io.kubernetes.pod.namespace", "dev")],
            &[],
        );
        let p = Selector::peer(&named, &in_prod).unwrap();
        assert!(
            !p.matches(&prod) && p.matches(&dev),
            "unless they name the namespace"
        );
        let (s, dropped) = Selector::subject(&named, &in_prod).unwrap();
        assert!(
            dropped && s.matches(&prod) && !s.matches(&dev),
            "subjects always stay"
        );
        let p = Selector::peer(&web, &Scope::Cluster).unwrap();
        assert!(p.matches(&prod) && p.matches(&dev));
        let empty = EndpointSelector::default();
        assert!(
            Selector::peer(&empty, &Scope::Cluster)
                .unwrap()
                .is_any_cluster()
        );
        assert!(!Selector::peer(&empty, &in_prod).unwrap().is_any_cluster());
        let host = es(&[("reserved:host", "")], &[]);
        assert!(Selector::peer(&host, &in_prod).unwrap().has_reserved());
    }
}
