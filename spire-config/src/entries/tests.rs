use super::*;

fn labels(l: &[&str]) -> BTreeSet<String> {
    l.iter().map(|s| (*s).to_owned()).collect()
}

fn ids() -> BTreeMap<u32, BTreeSet<String>> {
    [
        (
            256,
            labels(&["k8s:app=payment", "k8s:io.kubernetes.pod.namespace=prod"]),
        ),
        (
            257,
            labels(&["k8s:app=order", "k8s:io.kubernetes.pod.namespace=prod"]),
        ),
    ]
    .into()
}

fn agents() -> Scope {
    Scope::PerNode {
        agent_ids: [
            ("a".to_owned(), "spiffe://td/spire/agent/a".to_owned()),
            ("b".to_owned(), "spiffe://td/spire/agent/b".to_owned()),
        ]
        .into(),
    }
}

fn agent_selection() -> Selection {
    Selection::Agent(
        [
            Selector::new("unix", "uid:0"),
            Selector::new("unix", "path:/usr/bin/meshauth-agent"),
        ]
        .into(),
    )
}

fn want<'a>(
    ids: &'a BTreeMap<u32, BTreeSet<String>>,
    placements: &'a BTreeMap<u32, BTreeSet<String>>,
    scope: &'a Scope,
    selection: &'a Selection,
) -> Wanted<'a> {
    Wanted {
        trust_domain: "td",
        identities: ids,
        placements,
        scope,
        selection,
        x509_svid_ttl: 0,
    }
}

#[test]
fn least_privilege_gives_a_node_only_the_identities_it_runs() {
    let ids = ids();
    let placements: BTreeMap<u32, BTreeSet<String>> = [
        (256, ["a".to_owned()].into()),
        (257, ["a".to_owned(), "b".to_owned()].into()),
    ]
    .into();
    let (scope, sel) = (agents(), agent_selection());
    let d = desired(&want(&ids, &placements, &scope, &sel));
    let mut got: Vec<(String, String)> = d
        .values()
        .map(|e| (e.spiffe_id.clone(), e.parent_id.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                "spiffe://td/identity/256".into(),
                "spiffe://td/spire/agent/a".into()
            ),
            (
                "spiffe://td/identity/257".into(),
                "spiffe://td/spire/agent/a".into()
            ),
            (
                "spiffe://td/identity/257".into(),
                "spiffe://td/spire/agent/b".into()
            ),
        ]
    );
    assert!(d.keys().all(|id| id.starts_with(ID_PREFIX)));
    // The pod leaving node b takes b's entry away.
    let placements: BTreeMap<u32, BTreeSet<String>> = [
        (256, ["a".to_owned()].into()),
        (257, ["a".to_owned()].into()),
    ]
    .into();
    let d2 = desired(&want(&ids, &placements, &scope, &sel));
    let existing: Vec<Entry> = d.values().cloned().collect();
    let p = plan(&existing, &d2);
    assert_eq!(p.delete.len(), 1);
    assert!(p.create.is_empty() && p.update.is_empty());
    assert_eq!(
        d.values().find(|e| e.id == p.delete[0]).unwrap().parent_id,
        "spiffe://td/spire/agent/b"
    );
}

#[test]
fn cluster_wide_is_one_entry_per_identity_and_delegated_selects_the_pods() {
    let ids = ids();
    let placements = BTreeMap::new();
    let scope = Scope::ClusterWide {
        alias: "spiffe://td/meshauth/nodes".into(),
    };
    let d = desired(&want(&ids, &placements, &scope, &Selection::Pods));
    assert_eq!(d.len(), 2, "every identity, no placement needed");
    let pay = d.values().find(|e| e.spiffe_id.ends_with("/256")).unwrap();
    assert_eq!(
        pay.selectors,
        [
            Selector::new("k8s", "ns:prod"),
            Selector::new("k8s", "pod-label:app:payment")
        ]
        .into()
    );
    assert_eq!(pay.parent_id, "spiffe://td/meshauth/nodes");
}

#[test]
fn the_plan_is_idempotent_restores_drift_and_leaves_foreign_entries_alone() {
    let ids = ids();
    let placements: BTreeMap<u32, BTreeSet<String>> = [
        (256, ["a".to_owned()].into()),
        (257, ["b".to_owned()].into()),
    ]
    .into();
    let (scope, sel) = (agents(), agent_selection());
    let d = desired(&want(&ids, &placements, &scope, &sel));
    // Same inputs, same IDs: a second reconcile creates nothing.
    assert_eq!(d, desired(&want(&ids, &placements, &scope, &sel)));
    let mut existing: Vec<Entry> = d.values().cloned().collect();
    assert!(plan(&existing, &d).is_empty());
    // Someone else's entry, and one of ours changed and one deleted by hand.
    existing.push(Entry {
        id: "5d3e-user-entry".into(),
        spiffe_id: "spiffe://td/other".into(),
        parent_id: "spiffe://td/spire/agent/a".into(),
        selectors: [Selector::new("unix", "uid:1000")].into(),
        x509_svid_ttl: 0,
        extras: BTreeSet::new(),
    });
    existing[0].x509_svid_ttl = 999_999;
    let removed = existing.remove(1);
    let p = plan(&existing, &d);
    assert_eq!(p.foreign, 1);
    assert_eq!(p.update.len(), 1);
    assert_eq!(
        p.update[0].x509_svid_ttl, 0,
        "put back as meshauth wants it"
    );
    assert_eq!(p.create, vec![removed]);
    assert!(p.delete.is_empty(), "the foreign entry is not deleted");
}

#[test]
fn batches_stay_within_spires_limit() {
    let ids: BTreeMap<u32, BTreeSet<String>> = (256..256 + 450)
        .map(|n| (n, labels(&[&format!("k8s:app=a{n}")])))
        .collect();
    let placements: BTreeMap<u32, BTreeSet<String>> =
        ids.keys().map(|n| (*n, ["a".to_owned()].into())).collect();
    let (scope, sel) = (agents(), agent_selection());
    let d = desired(&want(&ids, &placements, &scope, &sel));
    let p = plan(&[], &d);
    let sizes: Vec<usize> = p.create_batches().map(<[Entry]>::len).collect();
    assert_eq!(sizes, vec![200, 200, 50]);
    let p = plan(&d.values().cloned().collect::<Vec<_>>(), &BTreeMap::new());
    assert_eq!(
        p.delete_batches().map(<[String]>::len).collect::<Vec<_>>(),
        vec![200, 200, 50]
    );
}

#[test]
fn only_kubernetes_labels_become_pod_selectors() {
    // The labels policy-bridge gives a pod's identity: its own, the
    // namespace, the service account, the namespace's labels.
    let s = pod_selectors(&labels(&[
        "k8s:app=x",
        "reserved:host=",
        "any:foo=bar",
        "k8s:io.kubernetes.pod.namespace=ns1",
        "k8s:io.cilium.k8s.policy.serviceaccount=payments",
        "k8s:io.cilium.k8s.namespace.labels.team=blue",
        "k8s:io.cilium.k8s.policy.cluster=default",
    ]));
    assert_eq!(
        s,
        [
            Selector::new("k8s", "ns:ns1"),
            Selector::new("k8s", "pod-label:app:x"),
            Selector::new("k8s", "sa:payments"),
        ]
        .into(),
        "the service account is k8s:sa, not a pod label; namespace labels have no selector"
    );
}

#[test]
fn pods_by_uid_select_each_identitys_uids_and_refuse_shared_ones_and_root() {
    let ids = ids();
    let placements = BTreeMap::new();
    let run_as: BTreeMap<(u32, String), BTreeSet<u32>> = [
        ((256, "a".to_owned()), BTreeSet::from([20001])),
        // order on a runs as 20002 and, in a second container, as 20001 —
        // payment's uid on a: 20001 is shared there.
        ((257, "a".to_owned()), BTreeSet::from([20001, 20002])),
        // On b, 20001 is order's alone.
        ((257, "b".to_owned()), BTreeSet::from([20001])),
        // Root on c.
        ((256, "c".to_owned()), BTreeSet::from([0])),
    ]
    .into();
    let scope = Scope::PerNode {
        agent_ids: [
            ("a".to_owned(), "spiffe://td/agent/a".to_owned()),
            ("b".to_owned(), "spiffe://td/agent/b".to_owned()),
            ("c".to_owned(), "spiffe://td/agent/c".to_owned()),
        ]
        .into(),
    };
    let selection = Selection::PodsByUid(run_as.clone());
    let d = desired(&want(&ids, &placements, &scope, &selection));
    let got: BTreeSet<(String, String, String)> = d
        .values()
        .map(|e| {
            let s = e.selectors.iter().next().unwrap();
            assert_eq!(e.selectors.len(), 1);
            (
                e.spiffe_id.clone(),
                e.parent_id.clone(),
                format!("{}:{}", s.kind, s.value),
            )
        })
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([
            (
                "spiffe://td/identity/257".to_owned(),
                "spiffe://td/agent/a".to_owned(),
                "unix:uid:20002".to_owned()
            ),
            (
                "spiffe://td/identity/257".to_owned(),
                "spiffe://td/agent/b".to_owned(),
                "unix:uid:20001".to_owned()
            ),
        ])
    );
    let refusals = uid_refusals(&run_as, &scope);
    assert_eq!(
        refusals,
        vec![
            UidRefusal::Shared {
                node: "a".into(),
                uid: 20001,
                identities: BTreeSet::from([256, 257])
            },
            UidRefusal::Root {
                node: "c".into(),
                identities: BTreeSet::from([256])
            },
        ]
    );
    assert!(refusals[0].to_string().contains("cannot tell them apart"));

    // Cluster-wide: one entry reaches every node, so 20001 is shared.
    let wide = Scope::ClusterWide {
        alias: "spiffe://td/nodes".into(),
    };
    let d = desired(&want(&ids, &placements, &wide, &selection));
    assert_eq!(d.len(), 1, "{d:?}");
    let e = d.values().next().unwrap();
    assert_eq!(e.spiffe_id, "spiffe://td/identity/257");
    assert!(e.selectors.contains(&Selector::new("unix", "uid:20002")));
}
