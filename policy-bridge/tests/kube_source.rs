//! The Kubernetes source against kube-rs's mock client (tower-test) backed
//! by a small fake API server: initial list, watch events, a watch error
//! and relist, deletion, CRDs not installed, and MeshIdentity allocation
//! with a conflict.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::Client;
use kube::client::Body;
use policy_bridge::source::kube::{KubeConfig, spawn};
use policy_bridge::{Snapshot, Subscription};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const NODES: &str = "/api/v1/nodes";
const CNP: &str = "/apis/cilium.io/v2/ciliumnetworkpolicies";
const CCNP: &str = "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies";
const MAP: &str = "/apis/meshauth.io/v1alpha1/meshauthpolicies";
const CMAP: &str = "/apis/meshauth.io/v1alpha1/clustermeshauthpolicies";
const IDS: &str = "/apis/meshauth.io/v1alpha1/meshidentities";

#[derive(Default)]
struct Fake {
    objects: HashMap<&'static str, BTreeMap<String, Value>>,
    missing: HashSet<&'static str>,
    watchers: HashMap<&'static str, Vec<mpsc::UnboundedSender<Bytes>>>,
    rv: u64,
    /// Names whose first create answers 409 after "another node" created them with these labels.
    race: HashMap<String, Vec<String>>,
    creates: Vec<String>,
    patches: Vec<(String, Value)>,
    deletes: Vec<String>,
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn obj_key(v: &Value) -> String {
    let ns = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{ns}/{name}")
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":reason,"reason":reason,"code":code})
}

impl Fake {
    fn collection(path: &str) -> Option<(&'static str, Option<String>)> {
        for c in [PODS, NAMESPACES, NODES, CNP, CCNP, MAP, CMAP, IDS] {
            if path == c {
                return Some((c, None));
            }
            if let Some(rest) = path.strip_prefix(c).and_then(|r| r.strip_prefix('/')) {
                return Some((c, Some(rest.to_string())));
            }
        }
        None
    }

    fn put(&mut self, c: &'static str, mut v: Value, event: Option<&str>) {
        self.rv += 1;
        v["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects
            .entry(c)
            .or_default()
            .insert(obj_key(&v), v.clone());
        if let Some(t) = event {
            self.send(c, json!({"type": t, "object": v}));
        }
    }

    fn remove(&mut self, c: &'static str, key: &str, event: bool) {
        self.rv += 1;
        if let Some(mut v) = self.objects.entry(c).or_default().remove(key)
            && event
        {
            v["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            self.send(c, json!({"type": "DELETED", "object": v}));
        }
    }

    fn send(&mut self, c: &'static str, ev: Value) {
        let line = Bytes::from(format!("{ev}\n"));
        if let Some(ws) = self.watchers.get_mut(c) {
            ws.retain(|w| w.send(line.clone()).is_ok());
        }
    }

    /// Ends every watch on `c` with a 410 Gone error event.
    fn expire_watches(&mut self, c: &'static str) {
        self.send(
            c,
            json!({"type": "ERROR", "object": status(410, "Expired")}),
        );
        self.watchers.remove(c);
    }

    fn respond(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> Response<RespBody> {
        let full = |code: u16, v: Value| {
            Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
                .unwrap()
        };
        let Some((c, name)) = Self::collection(path) else {
            return full(404, status(404, "NotFound"));
        };
        if self.missing.contains(c) {
            return full(404, status(404, "NotFound"));
        }
        match (method.as_str(), name) {
            ("GET", None) if query.contains("watch=true") => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.watchers.entry(c).or_default().push(tx);
                let stream =
                    UnboundedReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
                Response::builder()
                    .status(200)
                    .body(StreamBody::new(stream).boxed_unsync())
                    .unwrap()
            }
            ("GET", None) => {
                let items: Vec<Value> = self
                    .objects
                    .get(c)
                    .into_iter()
                    .flat_map(|m| m.values().cloned())
                    .collect();
                full(
                    200,
                    json!({"apiVersion":"v1","kind":"List","metadata":{"resourceVersion": self.rv.to_string()},"items": items}),
                )
            }
            ("GET", Some(n)) => match self.objects.get(c).and_then(|m| m.get(&format!("/{n}"))) {
                Some(v) => full(200, v.clone()),
                None => full(404, status(404, "NotFound")),
            },
            ("POST", None) => {
                let v: Value = serde_json::from_slice(body).unwrap();
                let name = v
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                self.creates.push(name.clone());
                if let Some(labels) = self.race.remove(&name) {
                    let theirs = json!({"apiVersion":"meshauth.io/v1alpha1","kind":"MeshIdentity","metadata":{"name": name},"spec":{"labels": labels}});
                    self.put(c, theirs, Some("ADDED"));
                }
                if self
                    .objects
                    .get(c)
                    .is_some_and(|m| m.contains_key(&obj_key(&v)))
                {
                    return full(409, status(409, "AlreadyExists"));
                }
                self.put(c, v.clone(), Some("ADDED"));
                full(201, v)
            }
            ("PATCH", Some(n)) => {
                let key = format!("/{n}");
                let Some(cur) = self.objects.get(c).and_then(|m| m.get(&key)).cloned() else {
                    return full(404, status(404, "NotFound"));
                };
                let patch: Value = serde_json::from_slice(body).unwrap();
                if let Some(rv) = patch.pointer("/metadata/resourceVersion")
                    && Some(rv) != cur.pointer("/metadata/resourceVersion")
                {
                    return full(409, status(409, "Conflict"));
                }
                let mut v = cur;
                merge_patch(&mut v, &patch);
                self.patches.push((n.clone(), patch));
                self.put(c, v.clone(), Some("MODIFIED"));
                let v = self.objects[c][&key].clone();
                full(200, v)
            }
            ("DELETE", Some(n)) => {
                let key = format!("/{n}");
                let want = serde_json::from_slice::<Value>(body)
                    .ok()
                    .and_then(|b| b.pointer("/preconditions/resourceVersion").cloned());
                let cur = self.objects.get(c).and_then(|m| m.get(&key)).cloned();
                if let (Some(want), Some(cur)) = (want, &cur)
                    && Some(&want) != cur.pointer("/metadata/resourceVersion")
                {
                    return full(409, status(409, "Conflict"));
                }
                self.deletes.push(n.clone());
                self.remove(c, &key, true);
                full(200, status(200, "Success"))
            }
            _ => full(405, status(405, "MethodNotAllowed")),
        }
    }
}

fn serve(fake: Arc<Mutex<Fake>>) -> Client {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<RespBody>>();
    tokio::spawn(async move {
        let mut handle = pin!(handle);
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let resp = fake.lock().unwrap().respond(
                &parts.method,
                parts.uri.path(),
                parts.uri.query().unwrap_or(""),
                &bytes,
            );
            send.send_response(resp);
        }
    });
    Client::new(svc, "default")
}

fn pod(name: &str, app: &str, ip: &str) -> Value {
    json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":name,"namespace":"production","labels":{"app":app}},
        "spec":{"nodeName":"node-a","containers":[{"name":"c"}]},
        "status":{"phase":"Running","podIP":ip,"podIPs":[{"ip":ip}]}})
}

fn cnp(port: &str) -> Value {
    json!({"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"require-mutual-auth","namespace":"production"},
        "spec":{"endpointSelector":{"matchLabels":{"app":"payment-service"}},
            "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"order-service"}}],"authentication":{"mode":"required"},
                "toPorts":[{"ports":[{"port":port,"protocol":"TCP"}]}]}]}})
}

fn canonical(app: &str, sa: &str) -> Vec<String> {
    let mut v = vec![
        format!("k8s:app={app}"),
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=production".to_string(),
        format!("k8s:io.cilium.k8s.policy.serviceaccount={sa}"),
        "k8s:io.kubernetes.pod.namespace=production".to_string(),
    ];
    v.sort();
    v
}

async fn wait_for(
    sub: &mut Subscription,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let cur = sub.current();
    if pred(&cur) {
        return cur;
    }
    let fut = async {
        loop {
            let (s, _) = sub.next().await.expect("source stopped");
            if pred(&s) {
                return s;
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(15), fut).await {
        Ok(s) => s,
        Err(_) => panic!(
            "timed out waiting for {what}; last snapshot: {:#?}",
            sub.current()
        ),
    }
}

#[tokio::test]
async fn list_watch_error_relist_delete() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        f.put(NAMESPACES, json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"production","labels":{"kubernetes.io/metadata.name":"production"}}}), None);
        f.put(NODES, json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"node-a"},"status":{"addresses":[{"type":"InternalIP","address":"fd00::1"},{"type":"InternalIP","address":"192.168.0.1"}]}}), None);
        f.put(PODS, pod("payment", "payment-service", "10.0.0.1"), None);
        f.put(PODS, pod("order", "order-service", "10.0.0.2"), None);
        f.put(CNP, cnp("8080"), None);
        // A previous run allocated 256 for payment-service: it must be reused.
        f.put(IDS, json!({"apiVersion":"meshauth.io/v1alpha1","kind":"MeshIdentity","metadata":{"name":"256"},"spec":{"labels": canonical("payment-service","default")}}), None);
        // Another node grabs 257 for something else just as we create it.
        f.race.insert("257".into(), canonical("other", "default"));
        f.missing.insert(CCNP);
        f.missing.insert(MAP);
        f.objects.entry(CMAP).or_default();
    }
    let client = serve(fake.clone());
    let (mut sub, task) = spawn(client, KubeConfig::default()).await;

    // Initial list.
    let s = wait_for(&mut sub, "initial sync with one rule", |s| {
        s.synced && s.state.rules.len() == 1
    })
    .await;
    let rule = *s.state.rules.iter().next().unwrap();
    assert_eq!(
        rule.local, 256,
        "payment-service keeps its number across restarts"
    );
    assert_eq!(
        rule.remote,
        policy_bridge::Remote::Identity(258),
        "257 was taken by another node"
    );
    assert_eq!(rule.ports, policy_bridge::PortRange::single(8080));
    assert_eq!(
        s.state.nodes["node-a"].handshake_addr.to_string(),
        "192.168.0.1",
        "IPv4 InternalIP preferred"
    );
    assert_eq!(
        fake.lock().unwrap().creates,
        vec!["257", "258"],
        "conflict, then the next number"
    );
    assert_eq!(s.policies.len(), 1);

    // Watch events: a pod added, the policy modified.
    fake.lock().unwrap().put(
        PODS,
        pod("order-2", "order-service", "10.0.0.3"),
        Some("ADDED"),
    );
    let s = wait_for(&mut sub, "order-2 endpoint", |s| {
        s.state.endpoints.contains_key(&"10.0.0.3".parse().unwrap())
    })
    .await;
    assert_eq!(
        s.state.endpoints[&"10.0.0.3".parse().unwrap()].identity,
        258
    );
    fake.lock().unwrap().put(CNP, cnp("9090"), Some("MODIFIED"));
    wait_for(&mut sub, "rule on 9090", |s| {
        s.state.rules.len() == 1 && s.state.rules.iter().all(|r| r.ports.start == 9090)
    })
    .await;

    // A watch error: order-2 vanished while the watch was broken; the relist finds out.
    {
        let mut f = fake.lock().unwrap();
        f.remove(PODS, "production/order-2", false);
        f.expire_watches(PODS);
    }
    wait_for(&mut sub, "order-2 gone after relist", |s| {
        !s.state.endpoints.contains_key(&"10.0.0.3".parse().unwrap())
    })
    .await;

    // Deletion.
    fake.lock()
        .unwrap()
        .remove(CNP, "production/require-mutual-auth", true);
    let s = wait_for(&mut sub, "policy deleted", |s| {
        s.state.rules.is_empty() && s.policies.is_empty()
    })
    .await;
    assert_eq!(s.state.endpoints.len(), 2);
    task.abort();
}

#[tokio::test]
async fn malformed_policy_is_reported_not_fatal() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        for c in [PODS, NAMESPACES, NODES, IDS, CCNP, MAP, CMAP] {
            f.objects.entry(c).or_default();
        }
        let mut bad = cnp("8080");
        bad["metadata"]["name"] = json!("bad");
        bad["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = json!(["x"]);
        f.put(CNP, bad, None);
        f.put(CNP, cnp("8080"), None);
    }
    let (mut sub, task) = spawn(serve(fake), KubeConfig::default()).await;
    let s = wait_for(&mut sub, "two statuses", |s| {
        s.synced && s.policies.len() == 2
    })
    .await;
    let bad = s.policies.iter().find(|p| p.name == "bad").unwrap();
    assert_eq!(bad.verdict, policy_bridge::Verdict::Rejected);
    assert!(
        bad.errors[0]
            .message
            .contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "{bad:#?}"
    );
    let good = s
        .policies
        .iter()
        .find(|p| p.name == "require-mutual-auth")
        .unwrap();
    assert_eq!(good.verdict, policy_bridge::Verdict::Accepted);
    task.abort();
}

fn identity_object(fake: &Arc<Mutex<Fake>>, id: u32) -> Option<Value> {
    fake.lock()
        .unwrap()
        .objects
        .get(IDS)
        .and_then(|m| m.get(&format!("/{id}")))
        .cloned()
}

async fn wait_fake(fake: &Arc<Mutex<Fake>>, what: &str, pred: impl Fn(&Fake) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !pred(&fake.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; MeshIdentities: {:#?}",
            fake.lock().unwrap().objects.get(IDS)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ep(s: &Snapshot, ip: &str) -> Option<u32> {
    s.state
        .endpoints
        .get(&ip.parse().unwrap())
        .map(|e| e.identity)
}

/// Kubernetes mode: an unused identity's MeshIdentity is marked freed
/// (`spec.freedAt`), not deleted, so no label set can take the number
/// while SVIDs for it may be valid; the same labels take it back; the
/// object goes once the quarantine is over.
#[tokio::test]
async fn a_freed_meshidentity_is_kept_quarantined_then_deleted() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        for c in [PODS, IDS, CNP, CCNP, MAP, CMAP] {
            f.objects.entry(c).or_default();
        }
        f.put(NAMESPACES, json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"production","labels":{"kubernetes.io/metadata.name":"production"}}}), None);
        f.put(NODES, json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"node-a"},"status":{"addresses":[{"type":"InternalIP","address":"192.168.0.1"}]}}), None);
        f.put(PODS, pod("order", "order-service", "10.0.0.2"), None);
    }
    let cfg = KubeConfig {
        identity_grace: Duration::ZERO,
        identity_quarantine: Duration::from_secs(3600),
        housekeeping: Duration::from_millis(20),
        ..KubeConfig::default()
    };
    let (mut sub, task) = spawn(serve(fake.clone()), cfg).await;
    // (The pod may be seen before its namespace: a first label set without
    // the namespace labels gets a number too, freed at once.)
    let s = wait_for(&mut sub, "order has its identity", |s| {
        s.state
            .identities
            .values()
            .any(|i| i.labels.iter().any(|l| l.contains("namespace.labels")))
            && ep(s, "10.0.0.2").is_some()
    })
    .await;
    let o = ep(&s, "10.0.0.2").unwrap();
    let key = format!("/{o}");

    // order goes: its number is freed, and stays as an object.
    fake.lock().unwrap().remove(PODS, "production/order", true);
    wait_fake(&fake, "order's MeshIdentity marked freed", |f| {
        f.objects[IDS]
            .get(&key)
            .is_some_and(|o| o.pointer("/spec/freedAt").is_some())
    })
    .await;
    // Another label set gets a new number, not a quarantined one.
    fake.lock()
        .unwrap()
        .put(PODS, pod("web", "web-service", "10.0.0.3"), Some("ADDED"));
    let s = wait_for(&mut sub, "web has an identity", |s| {
        ep(s, "10.0.0.3").is_some()
    })
    .await;
    let w = ep(&s, "10.0.0.3").unwrap();
    assert!(w > o, "web got {w}; {o} (and below) are quarantined");
    assert!(
        identity_object(&fake, o).is_some(),
        "not deleted during the quarantine"
    );
    assert!(fake.lock().unwrap().deletes.is_empty());
    // order comes back: it takes 256 back, freedAt cleared.
    fake.lock().unwrap().put(
        PODS,
        pod("order", "order-service", "10.0.0.2"),
        Some("ADDED"),
    );
    wait_for(&mut sub, "order has its number again", |s| {
        ep(s, "10.0.0.2") == Some(o)
    })
    .await;
    wait_fake(&fake, "freedAt cleared", |f| {
        f.objects[IDS]
            .get(&key)
            .is_some_and(|o| o.pointer("/spec/freedAt").is_none())
    })
    .await;
    task.abort();
}

/// After the quarantine the freed object is deleted (with the freed version
/// as precondition); a restarted source that sees a freed object keeps the
/// number quarantined.
#[tokio::test]
async fn quarantine_over_deletes_and_a_restart_remembers_freed_objects() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        for c in [PODS, CNP, CCNP, MAP, CMAP] {
            f.objects.entry(c).or_default();
        }
        f.put(NAMESPACES, json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"production","labels":{"kubernetes.io/metadata.name":"production"}}}), None);
        f.put(NODES, json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"node-a"},"status":{"addresses":[{"type":"InternalIP","address":"192.168.0.1"}]}}), None);
        // Freed by an earlier run just now (quarantine not over).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        f.put(IDS, json!({"apiVersion":"meshauth.io/v1alpha1","kind":"MeshIdentity","metadata":{"name":"256"},"spec":{"labels": canonical("old-service","default"),"freedAt": now}}), None);
        f.put(PODS, pod("web", "web-service", "10.0.0.3"), None);
    }
    let cfg = KubeConfig {
        identity_grace: Duration::ZERO,
        identity_quarantine: Duration::from_secs(3600),
        housekeeping: Duration::from_millis(20),
        ..KubeConfig::default()
    };
    let (mut sub, task) = spawn(serve(fake.clone()), cfg.clone()).await;
    let s = wait_for(&mut sub, "web has its identity", |s| {
        s.state
            .identities
            .values()
            .any(|i| i.labels.iter().any(|l| l.contains("namespace.labels")))
            && ep(s, "10.0.0.3").is_some()
    })
    .await;
    let w = ep(&s, "10.0.0.3").unwrap();
    assert_ne!(w, 256, "the freed 256 is still quarantined after a restart");
    assert!(identity_object(&fake, 256).is_some());
    task.abort();

    // A short quarantine: web goes, 257 is freed, then deleted.
    let cfg = KubeConfig {
        identity_quarantine: Duration::from_secs(1),
        ..cfg
    };
    let (mut sub, task) = spawn(serve(fake.clone()), cfg).await;
    wait_for(&mut sub, "restarted source has web", |s| {
        s.synced && ep(s, "10.0.0.3") == Some(w)
    })
    .await;
    fake.lock().unwrap().remove(PODS, "production/web", true);
    let wn = w.to_string();
    wait_fake(&fake, "web's identity freed then deleted after 1 s", |f| {
        f.deletes.contains(&wn)
    })
    .await;
    assert!(
        fake.lock()
            .unwrap()
            .patches
            .iter()
            .any(|(n, p)| *n == wn && p.pointer("/spec/freedAt").is_some()),
        "freed before it was deleted"
    );
    task.abort();
}
