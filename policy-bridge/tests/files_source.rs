//! The directory source and bad input: malformed YAML, wrong types and
//! unknown kinds are errors naming the object and field path; a bad document
//! does not lose state built from good ones; identities survive restarts.

mod common;

use std::time::Duration;

use common::{id_of, read};
use policy_bridge::model::{ModelError, parse_documents};
use policy_bridge::source::files::{FilesConfig, FilesSource, spawn};

fn err_of(yaml: &str) -> ModelError {
    let mut r = parse_documents(yaml, "t.yaml");
    assert_eq!(r.len(), 1, "{r:?}");
    r.remove(0).expect_err("should fail").error
}

#[test]
fn bad_input_names_object_and_field() {
    let e = err_of(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n}\nspec: {containers: 3}\n",
    );
    let s = e.to_string();
    assert!(
        s.contains("Pod n/p") && s.contains("field spec.containers"),
        "{s}"
    );

    let e = err_of(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x, namespace: n}\nspec:\n  ingress:\n  - toPorts:\n    - ports:\n      - port: [1]\n",
    );
    match &e {
        ModelError::Field { object, path, .. } => {
            assert!(object.starts_with("CiliumNetworkPolicy n/x"), "{object}");
            assert_eq!(path, "spec.ingress[0].toPorts[0].ports[0].port");
        }
        other => panic!("{other:?}"),
    }
    let e = err_of(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: c}\nspecs:\n- endpointSelector:\n    matchExpressions: [{key: a, operator: Maybe}]\n",
    );
    assert!(
        e.to_string()
            .contains("specs[0].endpointSelector.matchExpressions[0].operator"),
        "{e}"
    );
    let e = err_of("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n");
    assert!(matches!(e, ModelError::UnknownKind { .. }), "{e:?}");
    let e = err_of("apiVersion: v1\nkind: Pod\nmetadata: {name: [}\n");
    assert!(matches!(e, ModelError::Yaml { .. }), "{e:?}");
    let e = err_of("- just\n- a list\n");
    assert!(e.to_string().contains("expected a mapping"), "{e}");
    let e = err_of(
        "apiVersion: meshauth.io/v1alpha1\nkind: MeshAuthPolicy\nmetadata: {name: m}\nspecs: []\n",
    );
    assert!(e.to_string().contains("field specs"), "{e}");
}

#[test]
fn a_bad_document_keeps_the_good_state_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.yaml"),
        read("tests/fixtures/cluster.yaml"),
    )
    .unwrap();
    let policy = read("../deploy/examples/payment-requires-auth.yaml");
    std::fs::write(dir.path().join("policy.yaml"), &policy).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    let mut cfg = FilesConfig::new(dir.path());
    cfg.identity_file = Some(dir.path().join(".identities.json"));
    let mut src = FilesSource::new(cfg.clone()).unwrap();
    let d = src.sync().unwrap();
    assert_eq!(d.rules_added.len(), 1);
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    let pay = id_of(src.engine().state(), "production", "payment-service");

    // The policy's file now holds a broken version plus a bad document.
    let broken = policy.replace("port: \"8080\"", "port: [8080]") + "---\nkind: Nope\n";
    std::fs::write(dir.path().join("policy.yaml"), broken).unwrap();
    let d = src.sync().unwrap();
    assert!(d.is_empty(), "the previous version stays in force: {d:?}");
    assert_eq!(src.engine().state().rules.len(), 1);
    // The policy's parse error is reported once, in its status; the
    // document without a name or known kind is a load error.
    assert_eq!(src.errors().len(), 1, "{:?}", src.errors());
    assert!(src.errors()[0].contains("document 2"), "{:?}", src.errors());
    let st = src.engine().status();
    assert!(
        st[0].errors[0]
            .message
            .contains("previous version stays in force")
            && st[0].errors[0].message.contains("port"),
        "{st:#?}"
    );

    // Fixed: the error goes away. Removed: the rule goes away.
    std::fs::write(
        dir.path().join("policy.yaml"),
        policy.replace("8080", "9090"),
    )
    .unwrap();
    let d = src.sync().unwrap();
    assert_eq!((d.rules_added.len(), d.rules_removed.len()), (1, 1));
    assert!(src.errors().is_empty());
    std::fs::remove_file(dir.path().join("policy.yaml")).unwrap();
    let d = src.sync().unwrap();
    assert_eq!(d.rules_removed.len(), 1);
    assert!(src.engine().status().is_empty());

    // Restart: identities come back from the state file.
    let again = {
        let mut s = FilesSource::new(cfg).unwrap();
        s.sync().unwrap();
        id_of(s.engine().state(), "production", "payment-service")
    };
    assert_eq!(again, pay);
}

#[tokio::test]
async fn spawned_source_publishes_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.yaml"),
        read("tests/fixtures/cluster.yaml"),
    )
    .unwrap();
    let mut cfg = FilesConfig::new(dir.path());
    cfg.interval = Duration::from_millis(20);
    let (mut sub, task) = spawn(cfg).unwrap();
    let first = sub.current();
    assert!(first.synced && first.state.rules.is_empty() && !first.state.endpoints.is_empty());
    std::fs::write(
        dir.path().join("p.yaml"),
        read("../deploy/examples/payment-requires-auth.yaml"),
    )
    .unwrap();
    // The first `next` yields the initial snapshot (diff from empty); then
    // the policy arrives (possibly after a poll that saw a half-written file).
    let (init, diff) = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(diff.endpoints_upserted.len(), init.state.endpoints.len());
    let mut added = Vec::new();
    let snap = loop {
        let (snap, diff) = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        added.extend(diff.rules_added);
        if !snap.state.rules.is_empty() {
            break snap;
        }
    };
    assert_eq!(added.len(), 1);
    assert_eq!(snap.state.rules.len(), 1);
    assert_eq!(snap.policies.len(), 1);
    task.abort();
    assert!(spawn(FilesConfig::new(dir.path().join("missing"))).is_err());
}

fn dir_with_cluster(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.yaml"),
        read("tests/fixtures/cluster.yaml"),
    )
    .unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn status_reports_what_a_policy_covers_and_when_it_covers_nothing() {
    let policy = read("../deploy/examples/payment-requires-auth.yaml");
    let ghost = policy
        .replace("require-mutual-auth", "ghost")
        .replace("app: payment-service", "app: no-such-app");
    let dir = dir_with_cluster(&[("policy.yaml", policy), ("ghost.yaml", ghost)]);
    let mut src = FilesSource::new(FilesConfig::new(dir.path())).unwrap();
    src.sync().unwrap();
    let st = src.engine().status();
    let of = |name: &str| st.iter().find(|s| s.name == name).expect(name).coverage;
    let c = of("require-mutual-auth");
    assert_eq!(
        (c.compiled_rules, c.pairs, c.datapath_rules, c.pods),
        (1, 1, 1, 3),
        "payment-service ×2 and order-service, one pair, one port: {c:?}"
    );
    let c = of("ghost");
    assert_eq!((c.compiled_rules, c.pairs, c.pods), (1, 0, 0), "{c:?}");
    let text = policy_bridge::status::render_text(&st);
    assert!(
        text.contains("production/ghost: accepted (1 compiled rule requiring authentication; selects no pod: nothing enforced)"),
        "{text}"
    );
}

#[test]
fn a_standalone_pod_without_a_phase_is_an_error_naming_file_and_field() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: order-2\n  namespace: production\n  labels:\n    app: order-service\nspec:\n  nodeName: node-b\nstatus:\n  podIP: 10.0.2.99\n";
    let dir = dir_with_cluster(&[("order-2.yaml", pod.to_string())]);
    let mut src = FilesSource::new(FilesConfig::new(dir.path())).unwrap();
    src.sync().unwrap();
    assert_eq!(src.errors().len(), 1, "{:?}", src.errors());
    let e = &src.errors()[0];
    assert!(
        e.contains("order-2.yaml")
            && e.contains("Pod production/order-2")
            && e.contains("status.phase"),
        "{e}"
    );
    assert!(
        !src.engine()
            .state()
            .endpoints
            .contains_key(&"10.0.2.99".parse().unwrap()),
        "not taken as running"
    );

    // With a phase it is read.
    std::fs::write(
        dir.path().join("order-2.yaml"),
        pod.replace("  podIP:", "  phase: Running\n  podIP:"),
    )
    .unwrap();
    src.sync().unwrap();
    assert!(src.errors().is_empty(), "{:?}", src.errors());
    assert!(
        src.engine()
            .state()
            .endpoints
            .contains_key(&"10.0.2.99".parse().unwrap())
    );
}

fn pod_yaml(app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {app}, namespace: ns, labels: {{app: {app}}}}}\nspec: {{nodeName: n1, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

/// A collected identity's number is not given to another label set while
/// SVIDs for it may still be valid — not right after collection, and not
/// after a restart that reads the state file back.
#[test]
fn a_collected_number_is_not_given_to_another_label_set_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let mut cfg = FilesConfig::new(&manifests);
    cfg.identity_file = Some(dir.path().join("identities.json"));
    cfg.identity_grace = Duration::ZERO;
    let mut src = FilesSource::new(cfg.clone()).unwrap();
    std::fs::write(manifests.join("a.yaml"), pod_yaml("a", "10.0.0.1")).unwrap();
    src.sync().unwrap();
    let a = id_of(src.engine().state(), "ns", "a");
    // Pod a goes; with no grace its identity is collected at once.
    std::fs::remove_file(manifests.join("a.yaml")).unwrap();
    src.sync().unwrap();
    src.sync().unwrap();
    assert!(src.engine().table().labels(a).is_none(), "collected");
    std::fs::write(manifests.join("b.yaml"), pod_yaml("b", "10.0.0.2")).unwrap();
    src.sync().unwrap();
    let b = id_of(src.engine().state(), "ns", "b");
    assert_ne!(
        b, a,
        "a's number went to another label set right after it was freed"
    );

    // Restart: the quarantine comes back from the state file.
    drop(src);
    let mut src = FilesSource::new(cfg).unwrap();
    std::fs::write(manifests.join("c.yaml"), pod_yaml("c", "10.0.0.3")).unwrap();
    src.sync().unwrap();
    let c = id_of(src.engine().state(), "ns", "c");
    assert_ne!(c, a, "after a restart a's number went to another label set");
    assert_ne!(c, b);
}

/// The quarantine ends after the configured time (controlled clock), and the
/// label set that had the number takes it back before that.
#[test]
fn quarantine_ends_after_the_configured_time_and_the_same_labels_take_it_back() {
    use std::time::{Instant, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let mut cfg = FilesConfig::new(&manifests);
    cfg.identity_file = Some(dir.path().join("identities.json"));
    cfg.identity_grace = Duration::from_secs(60);
    cfg.identity_quarantine = Duration::from_secs(3600);
    let (t0, w0) = (Instant::now(), SystemTime::now());
    let at = |secs: u64| {
        (
            t0 + Duration::from_secs(secs),
            w0 + Duration::from_secs(secs),
        )
    };
    let mut src = FilesSource::new(cfg.clone()).unwrap();
    std::fs::write(manifests.join("a.yaml"), pod_yaml("a", "10.0.0.1")).unwrap();
    let (n, w) = at(0);
    src.sync_at(n, w).unwrap();
    let a = id_of(src.engine().state(), "ns", "a");
    std::fs::remove_file(manifests.join("a.yaml")).unwrap();
    let (n, w) = at(1);
    src.sync_at(n, w).unwrap();
    // Collected at 61 s (grace 60 s after 1 s).
    let (n, w) = at(61);
    src.sync_at(n, w).unwrap();
    assert!(src.engine().table().labels(a).is_none());
    // a comes back within the quarantine: same number.
    std::fs::write(manifests.join("a.yaml"), pod_yaml("a", "10.0.0.1")).unwrap();
    let (n, w) = at(120);
    src.sync_at(n, w).unwrap();
    assert_eq!(
        id_of(src.engine().state(), "ns", "a"),
        a,
        "a takes its number back"
    );
    // Gone again: collected at 181 s, quarantined until 3781 s.
    std::fs::remove_file(manifests.join("a.yaml")).unwrap();
    let (n, w) = at(121);
    src.sync_at(n, w).unwrap();
    let (n, w) = at(181);
    src.sync_at(n, w).unwrap();
    let (n, w) = at(181 + 3599);
    src.sync_at(n, w).unwrap();
    let mut probe = FilesSource::new(cfg.clone()).unwrap();
    std::fs::write(manifests.join("b.yaml"), pod_yaml("b", "10.0.0.2")).unwrap();
    probe.sync_at(n, w).unwrap();
    assert_ne!(
        id_of(probe.engine().state(), "ns", "b"),
        a,
        "one second early"
    );
    drop(probe);
    std::fs::remove_file(manifests.join("b.yaml")).unwrap();
    let (n, w) = at(181 + 3600);
    src.sync_at(n, w).unwrap();
    std::fs::write(manifests.join("b.yaml"), pod_yaml("b", "10.0.0.2")).unwrap();
    src.sync_at(n, w).unwrap();
    assert_eq!(
        id_of(src.engine().state(), "ns", "b"),
        a,
        "free once the quarantine is over"
    );
}

/// The source keeps digests, not objects: a pod defined in two files comes
/// from the later file (by name); when the later file stops defining it,
/// the earlier file's version (unchanged on disk, so not re-read by its
/// digest) takes over; a file rewritten to the same length with one pod's
/// address changed moves just that pod.
#[test]
fn a_duplicate_falls_back_to_the_earlier_file_and_a_same_length_edit_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path();
    let two = format!(
        "{}---\n{}",
        pod_yaml("a", "10.0.0.1"),
        pod_yaml("b", "10.0.0.2")
    );
    std::fs::write(m.join("1.yaml"), &two).unwrap();
    std::fs::write(m.join("2.yaml"), pod_yaml("a", "10.0.0.9")).unwrap();
    let mut src = FilesSource::new(FilesConfig::new(m)).unwrap();
    src.sync().unwrap();
    let ip = |src: &FilesSource, s: &str| {
        src.engine()
            .state()
            .endpoints
            .contains_key(&s.parse().unwrap())
    };
    assert!(
        ip(&src, "10.0.0.9") && !ip(&src, "10.0.0.1"),
        "2.yaml's a wins"
    );
    assert!(ip(&src, "10.0.0.2"));

    std::fs::write(m.join("2.yaml"), pod_yaml("c", "10.0.0.3")).unwrap();
    src.sync().unwrap();
    assert!(
        ip(&src, "10.0.0.1") && !ip(&src, "10.0.0.9"),
        "a falls back to 1.yaml's version"
    );
    assert!(ip(&src, "10.0.0.3") && ip(&src, "10.0.0.2"));

    let edited = two.replace("10.0.0.2", "10.0.0.4");
    assert_eq!(edited.len(), two.len());
    std::fs::write(m.join("1.yaml"), &edited).unwrap();
    let d = src.sync().unwrap();
    assert!(ip(&src, "10.0.0.4") && !ip(&src, "10.0.0.2"), "{d:?}");
    assert!(ip(&src, "10.0.0.1"), "a is unchanged");
    assert!(src.errors().is_empty(), "{:?}", src.errors());
}

/// A file written in place is not taken half written: a change is read
/// only once the file was last modified `settle` ago. The prefix here is
/// valid YAML meaning something else (the rule without its
/// `authentication`): taken, it would collect the pair.
#[test]
fn a_file_being_written_in_place_is_read_once_it_settled() {
    let policy = read("../deploy/examples/payment-requires-auth.yaml");
    let dir = dir_with_cluster(&[("policy.yaml", policy.clone())]);
    let path = dir.path().join("policy.yaml");
    let mut cfg = FilesConfig::new(dir.path());
    cfg.settle = Duration::from_millis(500);
    let mut src = FilesSource::new(cfg).unwrap();
    src.sync().unwrap();
    assert_eq!(src.engine().state().rules.len(), 1, "read at once at start");

    let prefix = &policy[..policy.find("authentication").unwrap()];
    std::fs::write(&path, prefix).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let now = std::time::Instant::now();
    let d = src
        .sync_at(now, mtime + Duration::from_millis(100))
        .unwrap();
    assert!(
        d.is_empty(),
        "a file modified 100 ms ago is not read: {d:?}"
    );
    assert_eq!(src.engine().state().rules.len(), 1);

    // The writer finishes (another port); read once it settled.
    std::fs::write(&path, policy.replace("8080", "9090")).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let d = src
        .sync_at(now, mtime + Duration::from_millis(100))
        .unwrap();
    assert!(d.is_empty(), "{d:?}");
    let d = src
        .sync_at(now, mtime + Duration::from_millis(600))
        .unwrap();
    assert_eq!(
        (d.rules_added.len(), d.rules_removed.len()),
        (1, 1),
        "{d:?}"
    );
    assert!(
        src.engine()
            .state()
            .rules
            .iter()
            .all(|r| format!("{r:?}").contains("9090")),
        "{:?}",
        src.engine().state().rules
    );
}
