//! Pinned maps across reloads and upgrades, and an independent reader
//! (bpftool) of what the Rust API wrote. Root; real kernel.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, SystemTime};

use auth_ebpf::layout::MapFate;
use auth_ebpf::maps::auth::AuthMap;
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::names;
use auth_ebpf::testing::TestPinDir;
use auth_ebpf::types::{AuthKey, Direction};
use auth_ebpf::{Datapath, DatapathError, LoadOptions};
use common::*;

fn load(pins: &TestPinDir, auth_capacity: Option<u32>) -> Datapath {
    Datapath::load(&LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        auth_capacity,
        ..LoadOptions::default()
    })
    .unwrap_or_else(|e| panic!("load: {e}"))
}

fn pair(n: u32) -> AuthKey {
    AuthKey {
        local_id: 256 + n,
        remote_id: 1000 + n,
        remote_node_id: (n % 7) as u16,
        auth_type: 1,
        pad: 0,
    }
}

#[test]
fn reload_reuses_pinned_maps_and_keeps_auth_entries() {
    let pins = TestPinDir::new("reload");
    let first = load(&pins, None);
    assert!(
        first
            .layout_report()
            .maps
            .iter()
            .all(|(_, f)| *f == MapFate::Created)
    );
    let expiry = SystemTime::now() + Duration::from_secs(600);
    let mut auth = AuthMap::open(pins.path()).unwrap();
    for n in 0..50 {
        auth.insert(pair(n), expiry).unwrap();
    }
    drop(auth);
    drop(first); // the loader process goes away

    let second = load(&pins, None);
    assert!(
        second
            .layout_report()
            .maps
            .iter()
            .all(|(_, f)| *f == MapFate::Reused),
        "{:?}",
        second.layout_report()
    );
    let entries = AuthMap::open(pins.path()).unwrap().entries().unwrap();
    assert_eq!(entries.len(), 50, "no auth entry lost across a reload");
    for (k, t) in entries {
        let d = t.duration_since(expiry).unwrap_or_else(|e| e.duration());
        assert!(d < Duration::from_millis(5), "{k:?} expiry moved by {d:?}");
    }
}

#[test]
fn auth_map_with_another_capacity_is_migrated() {
    let pins = TestPinDir::new("migrate");
    drop(load(&pins, Some(1024)));
    let expiry = SystemTime::now() + Duration::from_secs(600);
    let mut auth = AuthMap::open(pins.path()).unwrap();
    assert_eq!(auth.capacity(), 1024);
    for n in 0..100 {
        auth.insert(pair(n), expiry).unwrap();
    }
    drop(auth);

    let dp = load(&pins, None);
    assert_eq!(
        dp.layout_report().fate(names::AUTH),
        Some(&MapFate::Migrated { entries: 100 })
    );
    assert_eq!(
        dp.layout_report().fate(names::POLICY),
        Some(&MapFate::Reused)
    );
    let auth = AuthMap::open(pins.path()).unwrap();
    assert_eq!(auth.capacity(), 131_072);
    assert_eq!(auth.entries().unwrap().len(), 100, "entries carried over");
}

#[test]
fn map_with_another_layout_is_recreated_not_misread() {
    let pins = TestPinDir::new("recreate");
    // A policy map of an older shape: 8-byte values instead of 4.
    let path = pins.path().join(names::POLICY);
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args([
            "type",
            "hash",
            "key",
            "12",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "meshauth_policy",
            "flags",
            "1",
        ])
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dp = load(&pins, None);
    match dp.layout_report().fate(names::POLICY) {
        Some(MapFate::Recreated { reason }) => {
            assert!(reason.contains("value size 8 != 4"), "reason: {reason}")
        }
        other => panic!("policy map should be recreated, got {other:?}"),
    }
    // And the new map is the right shape: a policy written through the API works.
    let f_policy = auth_ebpf::maps::policy::PolicyMap::open(pins.path()).unwrap();
    assert!(f_policy.entries().unwrap().is_empty());
}

#[test]
fn full_auth_map_is_a_clear_error_and_keeps_entries() {
    let pins = TestPinDir::new("full");
    let _dp = load(&pins, Some(8));
    let expiry = SystemTime::now() + Duration::from_secs(600);
    let mut auth = AuthMap::open(pins.path()).unwrap();
    for n in 0..8 {
        auth.insert(pair(n), expiry).unwrap();
    }
    let err = auth
        .insert(pair(8), expiry)
        .expect_err("a ninth pair cannot fit");
    assert!(
        matches!(
            err,
            DatapathError::MapFull {
                name: "meshauth_auth",
                max_entries: 8
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("meshauth_auth is full (8 entries)"),
        "{err}"
    );
    assert_eq!(auth.entries().unwrap().len(), 8, "nothing stored was lost");
    // Replacing an existing pair in place still works on a full map.
    auth.insert(pair(3), expiry + Duration::from_secs(60))
        .unwrap();
}

#[test]
fn bpftool_reads_what_the_rust_api_wrote() {
    let f = Fixture::new("bpftool");
    f.require(Direction::Ingress, 8080, 6);
    let expiry = SystemTime::now() + Duration::from_secs(3600);
    f.authenticate(REMOTE_NODE, expiry);

    let dump = |name: &str| -> serde_json::Value {
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(f.pins.path().join(name))
            .output()
            .expect("running bpftool");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("bpftool JSON")
    };

    // bpftool prints BTF-typed maps as named fields.
    let auth = dump(names::AUTH);
    let entries = auth.as_array().expect("array of entries");
    assert_eq!(entries.len(), 1, "{auth}");
    // Raw bytes first (independent of BTF): local 256, remote 257 little-endian.
    let raw: Vec<String> = serde_json::from_value(entries[0]["key"].clone()).expect("raw key");
    assert_eq!(
        &raw[..8],
        [
            "0x00", "0x01", "0x00", "0x00", "0x01", "0x01", "0x00", "0x00"
        ]
    );
    let k = &entries[0]["formatted"]["key"];
    assert_eq!(k["local_id"], LOCAL_ID);
    assert_eq!(k["remote_id"], REMOTE_ID);
    assert_eq!(k["remote_node_id"], REMOTE_NODE);
    assert_eq!(k["auth_type"], 1);
    let stored = entries[0]["formatted"]["value"]["expiry"]
        .as_u64()
        .expect("expiry");
    let want = auth_ebpf::clock::system_to_boottime_ns(expiry);
    assert!(stored.abs_diff(want) < 5_000_000, "{stored} vs {want}");

    let policy = dump(names::POLICY);
    let p = &policy[0]["formatted"]["key"];
    assert_eq!(
        (p["local_id"].as_u64(), p["remote_id"].as_u64()),
        (Some(256), Some(257))
    );
    assert_eq!(
        (
            p["port"].as_u64(),
            p["proto"].as_u64(),
            p["direction"].as_u64()
        ),
        (Some(8080), Some(6), Some(1))
    );
    assert_eq!(policy[0]["formatted"]["value"]["auth_type"], 1);

    let ipcache = dump(names::IPCACHE);
    let n = ipcache.as_array().unwrap().len();
    assert_eq!(n, 4, "two v4 and two v6 pods: {ipcache}");
    let mut ipc = Ipcache::open(f.pins.path()).unwrap();
    assert_eq!(
        ipc.lookup(IpAddr::V4(REMOTE_V4))
            .unwrap()
            .map(|v| v.identity),
        Some(REMOTE_ID)
    );
    assert!(ipc.remove(Prefix::host(IpAddr::V4(REMOTE_V4))).unwrap());
    assert_eq!(dump(names::IPCACHE).as_array().unwrap().len(), 3);
}

#[test]
fn the_ipcache_capacity_is_set_at_load_and_a_change_recreates_it() {
    let pins = TestPinDir::new("ipcap");
    let opts = |n: Option<u32>| LoadOptions {
        pin_dir: pins.path().to_path_buf(),
        ipcache_capacity: n,
        ..LoadOptions::default()
    };
    let dp = Datapath::load(&opts(Some(4))).unwrap_or_else(|e| panic!("{e}"));
    let mut ipc = Ipcache::open(pins.path()).unwrap();
    let host = |i: u8| Prefix::host(IpAddr::from([10, 9, 0, i]));
    for i in 0..4 {
        ipc.insert(host(i), 256, 0).unwrap();
    }
    let err = ipc
        .insert(host(4), 256, 0)
        .expect_err("a fifth address cannot fit");
    assert!(
        err.to_string()
            .contains("meshauth_ipcache is full (4 entries)"),
        "{err}"
    );
    drop((ipc, dp));
    // Reloaded with room for more: recreated (empty, rewritten by the
    // agent from desired state), and now holding more than the default.
    let dp = Datapath::load(&opts(Some(100_000))).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        dp.layout_report()
            .maps
            .iter()
            .any(|(n, f)| n == "meshauth_ipcache" && matches!(f, MapFate::Recreated { .. })),
        "{:?}",
        dp.layout_report()
    );
    let mut ipc = Ipcache::open(pins.path()).unwrap();
    for i in 0..70_000u32 {
        let b = i.to_be_bytes();
        ipc.insert(Prefix::host(IpAddr::from([10, b[1], b[2], b[3]])), 256, 0)
            .unwrap_or_else(|e| panic!("address {i}: {e}"));
    }
}

fn ct_flow(n: u16) -> (auth_ebpf::types::CtKey, auth_ebpf::types::CtValue) {
    let (saddr, family) = auth_ebpf::types::RawAddr::from_ip("10.9.0.1".parse().unwrap());
    let (daddr, _) = auth_ebpf::types::RawAddr::from_ip("10.9.0.2".parse().unwrap());
    (
        auth_ebpf::types::CtKey {
            cgroup: 42,
            saddr,
            daddr,
            sport: 40_000 + n,
            dport: 8080,
            proto: 6,
            family,
            direction: 1,
            pad: 0,
        },
        auth_ebpf::types::CtValue {
            last_seen: 1_000 + u64::from(n),
            flags: 0,
            pad: 0,
        },
    )
}

fn pinned_ct(
    pins: &TestPinDir,
) -> aya::maps::HashMap<aya::maps::MapData, auth_ebpf::types::CtKey, auth_ebpf::types::CtValue> {
    let data = aya::maps::MapData::from_pin(pins.path().join(names::CT)).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap()
}

/// A build of another layout version finds tracked flows pinned: the map is
/// carried, not emptied, and nothing is copied before the new programs are
/// attached, so flows the old programs track meanwhile are carried too. The
/// copy made before the new programs run overwrites: until then the old map
/// is the one in use.
#[test]
fn tracked_flows_are_carried_into_another_layout_when_attached() {
    let pins = TestPinDir::new("ctcarry");
    let cg = meshauth_test_support::netns::TestCgroup::new("ctcarry");
    let mut old = load(&pins, None);
    old.attach(&cg.path).unwrap();
    let mut ct = pinned_ct(&pins);
    for n in 0..10 {
        let (k, v) = ct_flow(n);
        ct.insert(k, v, 0).unwrap();
    }
    // The old map, as the old programs keep using it after it is unpinned.
    let old_ct = ct;
    drop(old);
    auth_ebpf::testing::set_pinned_layout_version(
        pins.path(),
        auth_ebpf::layout::LAYOUT_VERSION - 1,
    )
    .unwrap();

    let mut new = load(&pins, None);
    assert_eq!(
        new.layout_report().fate(names::CT),
        Some(&MapFate::Carried),
        "{:?}",
        new.layout_report()
    );
    assert_eq!(
        new.layout_report()
            .fate(names::POLICY)
            .map(|f| matches!(f, MapFate::Recreated { .. })),
        Some(true)
    );
    assert_eq!(
        pinned_ct(&pins).iter().count(),
        0,
        "nothing copied before attaching"
    );
    // Tracked by the old programs after the load: flow 10; flow 3 refreshed
    // in the new map already (as if the new programs had seen it).
    let mut old_ct = old_ct;
    let (k, v) = ct_flow(10);
    old_ct.insert(k, v, 0).unwrap();
    let (k3, mut v3) = ct_flow(3);
    v3.last_seen = 9_999;
    pinned_ct(&pins).insert(k3, v3, 0).unwrap();

    new.attach(&cg.path).unwrap();
    let carried: std::collections::BTreeMap<u16, u64> = pinned_ct(&pins)
        .iter()
        .map(|e| e.unwrap())
        .map(|(k, v)| (k.sport - 40_000, v.last_seen))
        .collect();
    let want: std::collections::BTreeMap<u16, u64> =
        (0..=10).map(|n| (n, 1_000 + u64::from(n))).collect();
    // The copy made before the new programs run overwrites (the old map is
    // the fresher one until then).
    assert_eq!(carried, want);
    assert_eq!(Datapath::pinned_links(pins.path(), &cg.path).unwrap(), 2);
    Datapath::detach(pins.path(), &cg.path).unwrap();
}
