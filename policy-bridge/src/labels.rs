//! Canonical identity labels (design.md §Identities and names) and Cilium's
//! label-key syntax.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The namespace label every identity carries.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// The service-account label every identity carries.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// Prefix of the namespace's own labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// Pod label keys that do not identify a workload (they differ between pods
/// of one workload, or between rollouts).
const NON_IDENTIFYING: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "controller-uid",
    "etcd_node",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/controller-uid",
];

/// Key prefixes that do not identify (Kubernetes-owned and annotation-like
/// keys, as in Cilium's default label filter).
const NON_IDENTIFYING_PREFIXES: &[&str] =
    &["io.kubernetes", "kubernetes.io/", "k8s.io/", "annotation"];

/// Errors about labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// A canonical label string lacks `k8s:` or `=`.
    #[error("label {0:?} is not canonical (expected k8s:<key>=<value>)")]
    NotCanonical(String),
}

/// True if a pod label key identifies the workload.
pub fn is_identifying(key: &str) -> bool {
    !NON_IDENTIFYING.contains(&key)
        && !NON_IDENTIFYING_PREFIXES.iter().any(|p| key.starts_with(p))
        && !key.ends_with("beta.kubernetes.io")
        && !key.contains("beta.kubernetes.io/")
}

/// A canonical label set: keys and values of the `k8s` source, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(BTreeMap<String, String>);

impl LabelSet {
    /// The identity labels of a pod in namespace `ns` with service account
    /// `sa`, given the pod's and the namespace's labels.
    pub fn for_pod(
        pod_labels: &BTreeMap<String, String>,
        ns: &str,
        sa: &str,
        ns_labels: &BTreeMap<String, String>,
    ) -> Self {
        let mut m: BTreeMap<String, String> = pod_labels
            .iter()
            .filter(|(k, _)| is_identifying(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in ns_labels {
            m.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
        }
        m.insert(NAMESPACE_LABEL.into(), ns.into());
        m.insert(SERVICE_ACCOUNT_LABEL.into(), sa.into());
        Self(m)
    }

    /// Builds a set from `key → value` pairs (all of the `k8s` source).
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// Parses canonical strings (`k8s:<key>=<value>`).
    pub fn from_canonical<'a>(
        labels: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, LabelError> {
        let mut m = BTreeMap::new();
        for l in labels {
            let (k, v) = l
                .strip_prefix("k8s:")
                .and_then(|kv| kv.split_once('='))
                .ok_or_else(|| LabelError::NotCanonical(l.to_string()))?;
            m.insert(k.to_string(), v.to_string());
        }
        Ok(Self(m))
    }

    /// Canonical strings (`k8s:<key>=<value>`), sorted.
    pub fn canonical(&self) -> BTreeSet<String> {
        self.0.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect()
    }

    /// The value of `key` (without source prefix).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Key/value pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.canonical().into_iter().collect();
        f.write_str(&parts.join(","))
    }
}

/// The source part of a Cilium label key (`k8s:app` → `k8s`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// `k8s:` — labels from Kubernetes (all identity labels are of this source).
    K8s,
    /// `any:` or no prefix — matches any source.
    Any,
    /// `reserved:` — Cilium's reserved identities (host, world, …).
    Reserved,
    /// Any other source (`cidr:`, `container:`, `unspec:`, …); matches no pod.
    Other(String),
}

/// Sources Cilium knows; a key with another `x:` prefix is a plain key.
const SOURCES: &[&str] = &[
    "k8s",
    "any",
    "reserved",
    "cidr",
    "container",
    "unspec",
    "fqdn",
    "cilium-generated",
    "cilium",
];

/// A selector key split into source and key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelectorKey {
    /// The source.
    pub source: Source,
    /// The key without source.
    pub key: String,
}

impl SelectorKey {
    /// Parses `k8s:app`, `any:app`, `app`, `reserved:host`.
    pub fn parse(s: &str) -> Self {
        if let Some((src, key)) = s.split_once(':')
            && SOURCES.contains(&src)
        {
            let source = match src {
                "k8s" => Source::K8s,
                "any" => Source::Any,
                "reserved" => Source::Reserved,
                other => Source::Other(other.to_string()),
            };
            return Self {
                source,
                key: key.to_string(),
            };
        }
        Self {
            source: Source::Any,
            key: s.to_string(),
        }
    }

    /// True if this key can match pod identity labels.
    pub fn matches_pods(&self) -> bool {
        matches!(self.source, Source::K8s | Source::Any)
    }

    /// True for the namespace label (`io.kubernetes.pod.namespace` from `k8s` or `any`).
    pub fn is_namespace(&self) -> bool {
        self.matches_pods() && self.key == NAMESPACE_LABEL
    }
}

impl fmt::Display for SelectorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::K8s => write!(f, "k8s:{}", self.key),
            Source::Any => write!(f, "any:{}", self.key),
            Source::Reserved => write!(f, "reserved:{}", self.key),
            Source::Other(s) => write!(f, "{s}:{}", self.key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_labels_become_canonical_minus_non_identifying() {
        let pod = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("pod-template-hash".to_string(), "abc".to_string()),
            (
                "statefulset.kubernetes.io/pod-name".to_string(),
                "web-0".to_string(),
            ),
            ("app.kubernetes.io/name".to_string(), "web".to_string()),
        ]);
        let ns = BTreeMap::from([("team".to_string(), "blue".to_string())]);
        let set = LabelSet::for_pod(&pod, "prod", "web-sa", &ns);
        let c: Vec<String> = set.canonical().into_iter().collect();
        assert_eq!(
            c,
            vec![
                "k8s:app.kubernetes.io/name=web",
                "k8s:app=web",
                "k8s:io.cilium.k8s.namespace.labels.team=blue",
                "k8s:io.cilium.k8s.policy.serviceaccount=web-sa",
                "k8s:io.kubernetes.pod.namespace=prod",
            ]
        );
        assert_eq!(
            LabelSet::from_canonical(c.iter().map(String::as_str)).unwrap(),
            set
        );
        assert!(LabelSet::from_canonical(["app=web"]).is_err());
    }

    #[test]
    fn selector_keys_parse_sources() {
        assert_eq!(SelectorKey::parse("k8s:app").source, Source::K8s);
        assert_eq!(SelectorKey::parse("app").source, Source::Any);
        assert_eq!(SelectorKey::parse("reserved:host").source, Source::Reserved);
        let odd = SelectorKey::parse("example.com:thing");
        assert_eq!(
            (odd.source, odd.key.as_str()),
            (Source::Any, "example.com:thing")
        );
        assert!(SelectorKey::parse("any:io.kubernetes.pod.namespace").is_namespace());
        assert!(!SelectorKey::parse("cidr:io.kubernetes.pod.namespace").is_namespace());
    }
}
