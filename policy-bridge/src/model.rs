//! The objects meshauth reads (Pods, Namespaces, Nodes and four policy kinds)
//! and their parsing from YAML or JSON, with errors that name the object and
//! the field path.

pub mod crd;
pub mod policy;

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use crd::PolicyKind;
pub use policy::PolicySpec;

/// Errors reading objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The text is not valid YAML (or JSON).
    #[error("{origin}: invalid YAML: {message}")]
    Yaml {
        /// File and document number.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// A field has the wrong type or value.
    #[error("{object}: field {path}: {message}")]
    Field {
        /// Kind, namespace/name and origin of the object.
        object: String,
        /// Dotted path of the field (`spec.ingress[0].toPorts[0].ports[0].port`).
        path: String,
        /// What was wrong and what would be right.
        message: String,
    },
    /// `apiVersion`/`kind` names a kind meshauth does not read.
    #[error(
        "{object}: unknown kind {api_version}/{kind} (expected v1 Pod, Namespace, Node, cilium.io/v2 CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy, meshauth.io/v1alpha1 MeshAuthPolicy or ClusterMeshAuthPolicy)"
    )]
    UnknownKind {
        /// Name and origin of the object.
        object: String,
        /// Its apiVersion.
        api_version: String,
        /// Its kind.
        kind: String,
    },
}

/// What kind of object a key refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// v1 Pod.
    Pod,
    /// v1 Namespace.
    Namespace,
    /// v1 Node.
    Node,
    /// One of the policy kinds.
    Policy(PolicyKind),
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod => f.write_str("Pod"),
            Self::Namespace => f.write_str("Namespace"),
            Self::Node => f.write_str("Node"),
            Self::Policy(k) => f.write_str(k.as_str()),
        }
    }
}

/// Identifies one object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// The kind.
    pub kind: ObjectKind,
    /// The namespace (namespaced kinds only).
    pub namespace: Option<String>,
    /// The name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A policy object of any of the four kinds, with its specs.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    /// The kind.
    pub kind: PolicyKind,
    /// Namespace (namespaced kinds).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Each spec with its field path (`spec` or `specs[i]`).
    pub specs: Vec<(String, PolicySpec)>,
}

impl PolicyObject {
    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: ObjectKind::Policy(self.kind),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// One object meshauth reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A pod.
    Pod(Box<Pod>),
    /// A namespace.
    Namespace(Box<Namespace>),
    /// A node.
    Node(Box<Node>),
    /// A policy.
    Policy(Box<PolicyObject>),
}

impl Object {
    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        fn meta_key(
            kind: ObjectKind,
            m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> ObjectKey {
            ObjectKey {
                kind,
                namespace: m.namespace.clone(),
                name: m.name.clone().unwrap_or_default(),
            }
        }
        match self {
            Self::Pod(p) => meta_key(ObjectKind::Pod, &p.metadata),
            Self::Namespace(n) => meta_key(ObjectKind::Namespace, &n.metadata),
            Self::Node(n) => meta_key(ObjectKind::Node, &n.metadata),
            Self::Policy(p) => p.key(),
        }
    }
}

/// Splits multi-document YAML (JSON is YAML) and parses each document.
/// `origin` names the source (a file path) in errors. Empty documents are
/// skipped; `kind: List` is expanded. A document that fails does not stop
/// the others, except a YAML syntax error, after which the parser cannot
/// find the next document.
pub fn parse_documents(text: &str, origin: &str) -> Vec<Result<Object, Invalid>> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let here = format!("{origin} document {}", i + 1);
        match Value::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(v) => parse_value_into(v, &here, &mut out),
            Err(e) => {
                out.push(Err(Invalid {
                    key: None,
                    error: ModelError::Yaml {
                        origin: here,
                        message: e.to_string(),
                    },
                }));
                break;
            }
        }
    }
    out
}

/// A document that could not be read, with the object's key when it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// Kind, namespace and name, if the document got that far.
    pub key: Option<Box<ObjectKey>>,
    /// What was wrong.
    pub error: ModelError,
}

fn parse_keyed(v: Value, origin: &str) -> Result<Object, Invalid> {
    let key = key_of(&v).map(Box::new);
    parse_value(v, origin).map_err(|error| Invalid { key, error })
}

/// The key of a raw object, if it has a known kind and a name.
pub fn key_of(v: &Value) -> Option<ObjectKey> {
    let api_version = v.get("apiVersion")?.as_str()?;
    let kind = match (api_version, v.get("kind")?.as_str()?) {
        ("v1", "Pod") => ObjectKind::Pod,
        ("v1", "Namespace") => ObjectKind::Namespace,
        ("v1", "Node") => ObjectKind::Node,
        (a, k) => ObjectKind::Policy(PolicyKind::from_type(a, k)?),
    };
    let namespaced = match kind {
        ObjectKind::Pod => true,
        ObjectKind::Policy(p) => !p.is_clusterwide(),
        _ => false,
    };
    Some(ObjectKey {
        kind,
        namespace: namespaced.then(|| {
            v.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string()
        }),
        name: v.pointer("/metadata/name")?.as_str()?.to_string(),
    })
}

fn parse_value_into(v: Value, origin: &str, out: &mut Vec<Result<Object, Invalid>>) {
    let is_list = v.get("kind").and_then(Value::as_str) == Some("List")
        && v.get("apiVersion").and_then(Value::as_str) == Some("v1");
    if !is_list {
        out.push(parse_keyed(v, origin));
        return;
    }
    match v.get("items") {
        Some(Value::Array(items)) => {
            for (j, item) in items.iter().enumerate() {
                out.push(parse_keyed(item.clone(), &format!("{origin} items[{j}]")));
            }
        }
        _ => out.push(Err(Invalid {
            key: None,
            error: ModelError::Field {
                object: format!("List ({origin})"),
                path: "items".into(),
                message: "expected a list of objects".into(),
            },
        })),
    }
}

fn string_at<'a>(v: &'a Value, field: &str, object: &str) -> Result<&'a str, ModelError> {
    v.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| ModelError::Field {
            object: object.to_string(),
            path: field.to_string(),
            message: "required, must be a string".into(),
        })
}

/// Parses one object (already decoded from YAML or JSON).
pub fn parse_value(mut v: Value, origin: &str) -> Result<Object, ModelError> {
    if !v.is_object() {
        return Err(ModelError::Field {
            object: format!("document ({origin})"),
            path: "(root)".into(),
            message: format!(
                "expected a mapping with apiVersion and kind, found {}",
                type_name(&v)
            ),
        });
    }
    let anon = format!("object ({origin})");
    let api_version = string_at(&v, "apiVersion", &anon)?.to_string();
    let kind = string_at(&v, "kind", &anon)?.to_string();
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string);
    let object = match &name {
        Some(n) => format!("{kind} {n} ({origin})"),
        None => format!("{kind} ({origin})"),
    };
    let Some(name) = name else {
        return Err(ModelError::Field {
            object,
            path: "metadata.name".into(),
            message: "required, must be a string".into(),
        });
    };
    let object_kind = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Pod") => ObjectKind::Pod,
        ("v1", "Namespace") => ObjectKind::Namespace,
        ("v1", "Node") => ObjectKind::Node,
        (a, k) => match PolicyKind::from_type(a, k) {
            Some(p) => ObjectKind::Policy(p),
            None => {
                return Err(ModelError::UnknownKind {
                    object,
                    api_version,
                    kind,
                });
            }
        },
    };
    let namespaced = match object_kind {
        ObjectKind::Pod => true,
        ObjectKind::Namespace | ObjectKind::Node => false,
        ObjectKind::Policy(p) => !p.is_clusterwide(),
    };
    // Like kubectl: a namespaced object without a namespace is in "default".
    if namespaced
        && v.pointer("/metadata/namespace").is_none()
        && let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut)
    {
        m.insert("namespace".into(), Value::String("default".into()));
    }
    let namespace = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    let object = match (&namespace, namespaced) {
        (Some(ns), true) => format!("{kind} {ns}/{name} ({origin})"),
        _ => format!("{kind} {name} ({origin})"),
    };
    Ok(match object_kind {
        ObjectKind::Pod => Object::Pod(Box::new(typed(v, "", &object)?)),
        ObjectKind::Namespace => Object::Namespace(Box::new(typed(v, "", &object)?)),
        ObjectKind::Node => Object::Node(Box::new(typed(v, "", &object)?)),
        ObjectKind::Policy(kind) => {
            let mut specs = Vec::new();
            let map = v.as_object_mut().expect("checked above");
            if let Some(spec) = map.remove("spec") {
                specs.push(("spec".to_string(), typed(spec, "spec", &object)?));
            }
            match map.remove("specs") {
                Some(_) if !kind.allows_specs() => {
                    return Err(ModelError::Field {
                        object,
                        path: "specs".into(),
                        message: format!("{kind} has only `spec`"),
                    });
                }
                Some(Value::Array(list)) => {
                    for (i, s) in list.into_iter().enumerate() {
                        let path = format!("specs[{i}]");
                        specs.push((path.clone(), typed(s, &path, &object)?));
                    }
                }
                Some(Value::Null) | None => {}
                Some(other) => {
                    return Err(ModelError::Field {
                        object,
                        path: "specs".into(),
                        message: format!(
                            "expected a list of policy specs, found {}",
                            type_name(&other)
                        ),
                    });
                }
            }
            if specs.is_empty() {
                return Err(ModelError::Field {
                    object,
                    path: "spec".into(),
                    message: "a policy needs `spec` or `specs`".into(),
                });
            }
            Object::Policy(Box::new(PolicyObject {
                kind,
                namespace: if kind.is_clusterwide() {
                    None
                } else {
                    namespace
                },
                name,
                specs,
            }))
        }
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Deserializes with the failing field's path in the error.
fn typed<T: DeserializeOwned>(v: Value, prefix: &str, object: &str) -> Result<T, ModelError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (prefix.is_empty(), inner.as_str()) {
            (true, _) => inner.clone(),
            (false, ".") => prefix.to_string(),
            (false, _) => format!("{prefix}.{inner}"),
        };
        ModelError::Field {
            object: object.to_string(),
            path,
            message: e.into_inner().to_string(),
        }
    })
}
