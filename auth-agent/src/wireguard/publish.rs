//! Publishing the node's public key where the other agents read the node
//! table: on Kubernetes the Node's annotation
//! (`meshauth.io/wireguard-public-key`, a merge patch of that one key);
//! standalone, the same annotation in the node's manifest in the manifest
//! directory (the file that holds `kind: Node` with this node's name,
//! rewritten atomically). `None` removes it (WireGuard turned off).

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use serde::Deserialize as _;
use serde_norway::Value;

/// Where the key goes.
pub trait Publisher: Send + Sync + std::fmt::Debug {
    /// Sets (or with `None` removes) the key; `Ok(true)` if something changed.
    fn publish(&self, key: Option<String>) -> BoxFuture<'static, Result<bool, String>>;
}

/// The node's manifest in a manifest directory.
#[derive(Debug, Clone)]
pub struct ManifestPublisher {
    /// The directory.
    pub dir: PathBuf,
    /// The node's name.
    pub node: String,
    /// The annotation.
    pub annotation: String,
}

impl Publisher for ManifestPublisher {
    fn publish(&self, key: Option<String>) -> BoxFuture<'static, Result<bool, String>> {
        let me = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                set_in_dir(&me.dir, &me.node, &me.annotation, key.as_deref())
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

fn is_node(v: &Value, node: &str) -> bool {
    v.get("kind").and_then(Value::as_str) == Some("Node")
        && v.get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            == Some(node)
}

/// Sets `annotation` to `key` (or removes it) on the Node named `node` in
/// the one manifest file of `dir` that holds it. Other documents in the
/// file are kept (comments are not).
pub fn set_in_dir(
    dir: &Path,
    node: &str,
    annotation: &str,
    key: Option<&str>,
) -> Result<bool, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("manifest directory {}: {e}", dir.display()))?;
    let mut found = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || ![".yaml", ".yml", ".json"].iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let docs = documents(&text);
        if docs.iter().flatten().any(|d| is_node(d, node)) {
            found.push((path, text));
        }
    }
    let (path, text) = match found.len() {
        0 => {
            return Err(format!(
                "no manifest in {} holds kind: Node named {node}; the WireGuard key is published there (add the node's manifest)",
                dir.display()
            ));
        }
        1 => found.remove(0),
        _ => {
            return Err(format!(
                "Node {node} is in more than one manifest ({}); the key is not published until one is left",
                found
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    };
    let mut docs = documents(&text)
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut changed = false;
    for d in docs.iter_mut().filter(|d| is_node(d, node)) {
        changed |= set_annotation(d, annotation, key);
    }
    if !changed {
        return Ok(false);
    }
    let mut out = String::new();
    for d in &docs {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_norway::to_string(d).map_err(|e| e.to_string())?);
    }
    write_atomically(&path, &out)?;
    Ok(true)
}

fn documents(text: &str) -> Vec<Result<Value, String>> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).map_err(|e| e.to_string()))
        .filter(|v| !matches!(v, Ok(Value::Null)))
        .collect()
}

/// Sets or removes one annotation; whether the value changed.
fn set_annotation(doc: &mut Value, annotation: &str, key: Option<&str>) -> bool {
    let Some(meta) = doc.get_mut("metadata").and_then(Value::as_mapping_mut) else {
        return false;
    };
    let anns_key = Value::String("annotations".into());
    match key {
        Some(k) => {
            let anns = meta
                .entry(anns_key)
                .or_insert_with(|| Value::Mapping(Default::default()));
            if !anns.is_mapping() {
                *anns = Value::Mapping(Default::default());
            }
            let Some(m) = anns.as_mapping_mut() else {
                return false;
            };
            let old = m.insert(Value::String(annotation.into()), Value::String(k.into()));
            old.as_ref().and_then(Value::as_str) != Some(k)
        }
        None => {
            let Some(m) = meta.get_mut(&anns_key).and_then(Value::as_mapping_mut) else {
                return false;
            };
            let removed = m.remove(annotation).is_some();
            if m.is_empty() {
                meta.remove(&anns_key);
            }
            removed
        }
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.meshauth-new"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

/// The Node object on Kubernetes (needs `patch` on `nodes`).
#[derive(Clone)]
pub struct KubePublisher {
    /// The client.
    pub client: kube::Client,
    /// The node's name.
    pub node: String,
    /// The annotation.
    pub annotation: String,
}

impl std::fmt::Debug for KubePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePublisher")
            .field("node", &self.node)
            .finish()
    }
}

/// The merge patch that sets (or with `None` removes) one annotation.
pub fn annotation_patch(annotation: &str, key: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "metadata": { "annotations": { annotation: key } } })
}

impl Publisher for KubePublisher {
    fn publish(&self, key: Option<String>) -> BoxFuture<'static, Result<bool, String>> {
        let me = self.clone();
        Box::pin(async move {
            use k8s_openapi::api::core::v1::Node;
            use kube::api::{Api, Patch, PatchParams};
            let api: Api<Node> = Api::all(me.client.clone());
            let current = api
                .get(&me.node)
                .await
                .map_err(|e| format!("reading Node {}: {e}", me.node))?;
            let have = current
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(&me.annotation))
                .cloned();
            if have == key {
                return Ok(false);
            }
            api.patch(
                &me.node,
                &PatchParams::default(),
                &Patch::Merge(annotation_patch(&me.annotation, key.as_deref())),
            )
            .await
            .map_err(|e| {
                format!(
                    "patching Node {} annotation {}: {e}",
                    me.node, me.annotation
                )
            })?;
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANN: &str = "meshauth.io/wireguard-public-key";

    #[test]
    fn the_key_goes_into_the_nodes_own_manifest_and_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = "# nodes\napiVersion: v1\nkind: Node\nmetadata:\n  name: a\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 10.0.0.1\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: b\n  annotations:\n    other: x\n";
        std::fs::write(dir.path().join("nodes.yaml"), nodes).unwrap();
        std::fs::write(
            dir.path().join("policy.yaml"),
            "kind: CiliumNetworkPolicy\nmetadata:\n  name: a\n",
        )
        .unwrap();
        assert!(set_in_dir(dir.path(), "b", ANN, Some("KEY=")).unwrap());
        assert!(
            !set_in_dir(dir.path(), "b", ANN, Some("KEY=")).unwrap(),
            "unchanged the second time"
        );
        let text = std::fs::read_to_string(dir.path().join("nodes.yaml")).unwrap();
        let docs: Vec<Value> = documents(&text).into_iter().map(Result::unwrap).collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[1]["metadata"]["annotations"][ANN].as_str(),
            Some("KEY=")
        );
        assert_eq!(
            docs[1]["metadata"]["annotations"]["other"].as_str(),
            Some("x")
        );
        assert!(
            docs[0]["metadata"].get("annotations").is_none(),
            "node a untouched"
        );
        // What the files source reads back is the same node with the key.
        let objs = policy_bridge::model::parse_documents(&text, "nodes.yaml");
        assert!(objs.iter().all(Result::is_ok));
        assert!(set_in_dir(dir.path(), "b", ANN, None).unwrap());
        let text = std::fs::read_to_string(dir.path().join("nodes.yaml")).unwrap();
        assert!(!text.contains(ANN), "{text}");
        assert!(text.contains("other: x"));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no staging file left: {names:?}");
    }

    #[test]
    fn a_missing_or_doubled_node_is_an_error_naming_it_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let e = set_in_dir(dir.path(), "c", ANN, Some("K")).unwrap_err();
        assert!(e.contains("holds kind: Node named c"), "{e}");
        let one = "kind: Node\nmetadata:\n  name: c\n";
        std::fs::write(dir.path().join("1.yaml"), one).unwrap();
        std::fs::write(dir.path().join("2.yml"), one).unwrap();
        let e = set_in_dir(dir.path(), "c", ANN, Some("K")).unwrap_err();
        assert!(e.contains("more than one manifest"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("1.yaml")).unwrap(),
            one
        );
    }

    #[test]
    fn the_kubernetes_patch_touches_only_the_one_annotation() {
        assert_eq!(
            annotation_patch(ANN, Some("K=")).to_string(),
            r#"{"metadata":{"annotations":{"meshauth.io/wireguard-public-key":"K="}}}"#
        );
        assert_eq!(
            annotation_patch(ANN, None).to_string(),
            r#"{"metadata":{"annotations":{"meshauth.io/wireguard-public-key":null}}}"#
        );
    }
}
