use super::*;

use base64::Engine as _;
use policy_bridge::Endpoint;

const PORT: u16 = 51871;

fn key(n: u8) -> PublicKey {
    PublicKey([n; 32])
}

fn b64(k: &PublicKey) -> String {
    k.to_string()
}

fn p(s: &str) -> IpPrefix {
    s.parse().unwrap()
}

fn node(name: &str, i: u8, key: Option<&PublicKey>) -> NodeInfo {
    let v4: IpAddr = format!("10.0.0.{i}").parse().unwrap();
    NodeInfo {
        name: name.into(),
        handshake_addr: v4,
        addresses: [v4, format!("fd00::{i}").parse().unwrap()].into(),
        wireguard_key: key.map(b64),
        pod_cidrs: [p(&format!("10.42.{i}.0/24"))].into(),
    }
}

fn nodes(list: &[NodeInfo]) -> BTreeMap<String, NodeInfo> {
    list.iter().map(|n| (n.name.clone(), n.clone())).collect()
}

fn pods(list: &[(&str, &str)]) -> DesiredState {
    let mut s = DesiredState::default();
    for (ip, node) in list {
        s.endpoints.insert(
            ip.parse().unwrap(),
            Endpoint {
                ip: ip.parse().unwrap(),
                identity: 256,
                node: (*node).into(),
                pod: format!("default/{ip}"),
            },
        );
    }
    s
}

/// Runs `steps` from `before` against the kernel model and checks, after
/// every step, that each address wanted both before and after is held by
/// some peer and each route wanted both before and after is present.
/// Returns the final peers and routes.
fn run(
    before: &Desired,
    after: &Desired,
    collect: bool,
) -> (
    BTreeMap<PublicKey, PeerState>,
    BTreeSet<IpPrefix>,
    Vec<Step>,
) {
    let mut peers: BTreeMap<PublicKey, PeerState> = before
        .peers
        .iter()
        .map(|(k, s)| {
            (
                *k,
                PeerState {
                    endpoint: Some(s.endpoint),
                    allowed: s.allowed.clone(),
                },
            )
        })
        .collect();
    let mut routes = before.routes.clone();
    let live: BTreeSet<IpPrefix> = before
        .peers
        .values()
        .flat_map(|s| s.allowed.iter().copied())
        .filter(|a| after.peers.values().any(|s| s.allowed.contains(a)))
        .collect();
    let live_routes: BTreeSet<IpPrefix> =
        before.routes.intersection(&after.routes).copied().collect();
    let steps = steps(&peers, &routes, after, collect);
    for (i, s) in steps.iter().enumerate() {
        apply_model(&mut peers, &mut routes, s);
        for a in &live {
            assert!(
                peers.values().any(|p| p.allowed.contains(a)),
                "after step {i} ({s:?}) the live address {a} has no peer"
            );
        }
        for r in &live_routes {
            assert!(
                routes.contains(r),
                "after step {i} ({s:?}) the live route {r} is gone"
            );
        }
    }
    (peers, routes, steps)
}

fn as_state(d: &Desired) -> BTreeMap<PublicKey, PeerState> {
    d.peers
        .iter()
        .map(|(k, s)| {
            (
                *k,
                PeerState {
                    endpoint: Some(s.endpoint),
                    allowed: s.allowed.clone(),
                },
            )
        })
        .collect()
}

#[test]
fn a_peer_per_keyed_remote_node_with_its_addresses_cidrs_and_stray_pods() {
    let own = key(1);
    let table = nodes(&[
        node("a", 1, Some(&own)),
        node("b", 2, Some(&key(2))),
        node("c", 3, None),
    ]);
    // 10.42.2.7 is inside b's CIDR; 10.99.0.5 is a pod of b outside it;
    // 10.42.1.9 is a's own (local) pod; c has no key.
    let state = pods(&[
        ("10.42.2.7", "b"),
        ("10.99.0.5", "b"),
        ("10.42.1.9", "a"),
        ("10.42.3.4", "c"),
    ]);
    let d = desired("a", &own, &table, &state, PORT);
    assert_eq!(d.peers.len(), 1, "{d:?}");
    let b = &d.peers[&key(2)];
    assert_eq!(b.node, "b");
    assert_eq!(b.endpoint, "10.0.0.2:51871".parse().unwrap());
    assert_eq!(
        b.allowed,
        [
            p("10.0.0.2/32"),
            p("fd00::2/128"),
            p("10.42.2.0/24"),
            p("10.99.0.5/32")
        ]
        .into()
    );
    // Routes: pod blocks only — never the node's own addresses (the UDP
    // packets to 10.0.0.2:51871 would loop into the tunnel).
    assert_eq!(d.routes, [p("10.42.2.0/24"), p("10.99.0.5/32")].into());
    assert_eq!(d.refused, [("c".to_owned(), Refused::NoKey)].into());
}

#[test]
fn zero_garbage_own_and_duplicate_keys_are_refused_for_every_node_claiming_them() {
    let own = key(1);
    let zero = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
    let mut bad = node("bad", 2, None);
    bad.wireguard_key = Some("not-a-key".into());
    let mut zeroed = node("zero", 3, None);
    zeroed.wireguard_key = Some(zero);
    let table = nodes(&[
        node("a", 1, Some(&own)),
        bad,
        zeroed,
        node("thief", 4, Some(&own)),
        node("d1", 5, Some(&key(9))),
        node("d2", 6, Some(&key(9))),
        node("ok", 7, Some(&key(7))),
    ]);
    let d = desired("a", &own, &table, &DesiredState::default(), PORT);
    assert_eq!(d.peers.keys().collect::<Vec<_>>(), [&key(7)], "{d:?}");
    assert!(matches!(
        d.refused["bad"],
        Refused::BadKey(PublicKeyError::Malformed(_))
    ));
    assert_eq!(d.refused["zero"], Refused::BadKey(PublicKeyError::AllZero));
    assert_eq!(d.refused["thief"], Refused::OwnKey(own));
    assert_eq!(
        d.refused["d1"],
        Refused::Duplicate {
            key: key(9),
            other: "d2".into()
        }
    );
    assert_eq!(
        d.refused["d2"],
        Refused::Duplicate {
            key: key(9),
            other: "d1".into()
        }
    );
    assert!(
        d.refused["d1"]
            .to_string()
            .contains("which node d2 also published")
    );
}

#[test]
fn an_address_two_nodes_claim_stays_with_the_first_by_name() {
    let own = key(1);
    let table = nodes(&[
        node("a", 1, Some(&own)),
        node("b", 2, Some(&key(2))),
        node("c", 3, Some(&key(3))),
    ]);
    // c's pod reported with b's node address (stale or forged).
    let mut state = pods(&[("10.99.0.5", "b")]);
    state.endpoints.insert(
        "10.0.0.2".parse().unwrap(),
        Endpoint {
            ip: "10.0.0.2".parse().unwrap(),
            identity: 256,
            node: "c".into(),
            pod: "x/y".into(),
        },
    );
    let d = desired("a", &own, &table, &state, PORT);
    assert!(d.peers[&key(2)].allowed.contains(&p("10.0.0.2/32")));
    assert!(!d.peers[&key(3)].allowed.contains(&p("10.0.0.2/32")));
    assert!(
        !d.routes.contains(&p("10.0.0.2/32")),
        "a conflicting address is not routed"
    );
    assert_eq!(
        d.conflicts,
        vec![(p("10.0.0.2/32"), "b".to_owned(), "c".to_owned())]
    );
}

fn big_table(n: u16, own: &PublicKey) -> BTreeMap<String, NodeInfo> {
    let mut out = BTreeMap::new();
    out.insert("local".to_owned(), {
        let mut l = node("local", 250, Some(own));
        l.name = "local".into();
        l
    });
    for i in 0..n {
        let ip: IpAddr = format!("10.1.{}.{}", i / 250, i % 250 + 1).parse().unwrap();
        let mut k = [0u8; 32];
        k[..2].copy_from_slice(&(i + 1).to_be_bytes());
        k[31] = 0x42;
        out.insert(
            format!("n{i:04}"),
            NodeInfo {
                name: format!("n{i:04}"),
                handshake_addr: ip,
                addresses: [ip].into(),
                wireguard_key: Some(PublicKey(k).to_string()),
                pod_cidrs: [IpPrefix::new(
                    format!("10.{}.{}.0", 100 + i / 250, i % 250)
                        .parse()
                        .unwrap(),
                    24,
                )
                .unwrap()]
                .into(),
            },
        );
    }
    out
}

#[test]
fn from_empty_every_peer_is_one_upsert_and_the_model_reaches_the_wanted_state() {
    let own = key(1);
    let table = big_table(1000, &own);
    let d = desired("local", &own, &table, &DesiredState::default(), PORT);
    assert_eq!(d.peers.len(), 1000);
    let (peers, routes, steps) = run(&Desired::default(), &d, true);
    assert_eq!(
        steps
            .iter()
            .filter(|s| matches!(s, Step::Upsert { created: true, .. }))
            .count(),
        1000
    );
    assert_eq!(steps.len(), 2000, "1,000 peers and 1,000 routes");
    assert_eq!(peers, as_state(&d));
    assert_eq!(routes, d.routes);
    // Nothing to do the second time.
    assert!(super::steps(&peers, &routes, &d, true).is_empty());
}

#[test]
fn one_node_joining_a_thousand_touches_exactly_one_peer() {
    let own = key(1);
    let mut table = big_table(1000, &own);
    let before = desired("local", &own, &table, &DesiredState::default(), PORT);
    let joiner = node("zz-new", 9, Some(&key(200)));
    table.insert(joiner.name.clone(), joiner);
    let after = desired("local", &own, &table, &DesiredState::default(), PORT);
    let (peers, routes, steps) = run(&before, &after, true);
    assert_eq!(
        steps,
        vec![
            Step::Upsert {
                key: key(200),
                created: true,
                endpoint: Some("10.0.0.9:51871".parse().unwrap()),
                add: vec![p("10.0.0.9/32"), p("10.42.9.0/24"), p("fd00::9/128")],
            },
            Step::AddRoute(p("10.42.9.0/24")),
        ]
    );
    assert_eq!(peers, as_state(&after));
    assert_eq!(routes, after.routes);
}

#[test]
fn a_pod_moving_between_nodes_is_moved_not_removed_and_a_gone_pod_is_released() {
    let own = key(1);
    let table = nodes(&[
        node("a", 1, Some(&own)),
        node("b", 2, Some(&key(2))),
        node("c", 3, Some(&key(3))),
    ]);
    let before = desired(
        "a",
        &own,
        &table,
        &pods(&[("10.99.0.5", "b"), ("10.99.0.6", "b")]),
        PORT,
    );
    let after = desired("a", &own, &table, &pods(&[("10.99.0.5", "c")]), PORT);
    let (peers, routes, steps) = run(&before, &after, true);
    assert_eq!(
        steps,
        vec![
            Step::Upsert {
                key: key(3),
                created: false,
                endpoint: None,
                add: vec![p("10.99.0.5/32")]
            },
            Step::DelRoute(p("10.99.0.6/32")),
            Step::Release(vec![p("10.99.0.6/32")]),
        ]
    );
    assert_eq!(peers, as_state(&after));
    assert_eq!(routes, after.routes);
}

#[test]
fn a_node_with_a_new_key_gets_a_new_peer_before_the_old_one_goes() {
    let own = key(1);
    let before = desired(
        "a",
        &own,
        &nodes(&[node("a", 1, Some(&own)), node("b", 2, Some(&key(2)))]),
        &DesiredState::default(),
        PORT,
    );
    let after = desired(
        "a",
        &own,
        &nodes(&[node("a", 1, Some(&own)), node("b", 2, Some(&key(5)))]),
        &DesiredState::default(),
        PORT,
    );
    let (peers, _, steps) = run(&before, &after, true);
    assert!(
        matches!(steps[0], Step::Upsert { key: k, created: true, .. } if k == key(5)),
        "{steps:?}"
    );
    assert_eq!(steps.last(), Some(&Step::Remove(key(2))));
    assert_eq!(peers, as_state(&after));
}

#[test]
fn before_the_first_full_sync_nothing_is_removed() {
    let own = key(1);
    let before = desired(
        "a",
        &own,
        &nodes(&[
            node("a", 1, Some(&own)),
            node("b", 2, Some(&key(2))),
            node("c", 3, Some(&key(3))),
        ]),
        &pods(&[("10.99.0.5", "b")]),
        PORT,
    );
    let after = desired(
        "a",
        &own,
        &nodes(&[node("a", 1, Some(&own)), node("b", 2, Some(&key(2)))]),
        &DesiredState::default(),
        PORT,
    );
    let (peers, routes, steps) = run(&before, &after, false);
    assert!(steps.is_empty(), "{steps:?}");
    assert_eq!(peers, as_state(&before));
    assert_eq!(routes, before.routes);
    let (peers, _, steps) = run(&before, &after, true);
    assert!(steps.contains(&Step::Remove(key(3))));
    assert_eq!(peers, as_state(&after));
}

#[test]
fn an_endpoint_change_updates_the_peer_in_place() {
    let own = key(1);
    let before = desired(
        "a",
        &own,
        &nodes(&[node("a", 1, Some(&own)), node("b", 2, Some(&key(2)))]),
        &DesiredState::default(),
        PORT,
    );
    let mut b = node("b", 2, Some(&key(2)));
    b.handshake_addr = "fd00::2".parse().unwrap();
    let after = desired(
        "a",
        &own,
        &nodes(&[node("a", 1, Some(&own)), b]),
        &DesiredState::default(),
        PORT,
    );
    let (_, _, steps) = run(&before, &after, true);
    assert_eq!(
        steps,
        vec![Step::Upsert {
            key: key(2),
            created: false,
            endpoint: Some("[fd00::2]:51871".parse().unwrap()),
            add: vec![]
        }]
    );
}

/// Random before/after tables and pods: the model always ends in the wanted
/// state, no live address or route is ever missing in between, and a
/// second pass has nothing to do.
#[test]
fn random_changes_keep_live_addresses_and_converge() {
    let own = key(1);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..300 {
        let make = |next: &mut dyn FnMut(u64) -> u64| {
            let mut list = vec![node("a", 1, Some(&own))];
            for i in 2..8u8 {
                if next(4) != 0 {
                    let k = key(10 + i + 10 * u8::from(next(3) == 0));
                    let mut n = node(&format!("n{i}"), i, Some(&k));
                    if next(3) == 0 {
                        n.pod_cidrs.clear();
                    }
                    list.push(n);
                }
            }
            let mut ps = Vec::new();
            for j in 0..10u8 {
                if next(2) == 0 {
                    ps.push((format!("10.99.0.{j}"), format!("n{}", 2 + next(6))));
                }
            }
            let ps: Vec<(&str, &str)> = ps.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            desired("a", &own, &nodes(&list), &pods(&ps), PORT)
        };
        let before = make(&mut next);
        let after = make(&mut next);
        let (peers, routes, _) = run(&before, &after, true);
        assert_eq!(peers, as_state(&after), "round {round}");
        assert_eq!(routes, after.routes, "round {round}");
        assert!(
            super::steps(&peers, &routes, &after, true).is_empty(),
            "round {round}"
        );
    }
}
