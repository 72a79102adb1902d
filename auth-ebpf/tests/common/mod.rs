//! Shared setup for the datapath tests: a loaded datapath in its own pin
//! directory with two pods' addresses in the ipcache.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use auth_ebpf::maps::auth::{AUTH_TYPE_MTLS, AuthMap};
use auth_ebpf::maps::config::{ConfigMap, DatapathConfig};
use auth_ebpf::maps::ipcache::{Ipcache, Prefix};
use auth_ebpf::maps::policy::{PolicyMap, PolicyRule};
use auth_ebpf::testing::{L4, TestPinDir, frame};
use auth_ebpf::types::{AuthKey, Direction};
use auth_ebpf::{Datapath, LoadOptions};

pub const LOCAL_ID: u32 = 256;
pub const REMOTE_ID: u32 = 257;
pub const REMOTE_NODE: u16 = 3;
pub const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
pub const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1);

pub struct Fixture {
    pub pins: TestPinDir,
    pub dp: Datapath,
}

impl Fixture {
    pub fn new(tag: &str) -> Self {
        Self::with_config(tag, DatapathConfig::default())
    }

    pub fn with_config(tag: &str, config: DatapathConfig) -> Self {
        let pins = TestPinDir::new(tag);
        let dp = Datapath::load(&LoadOptions {
            pin_dir: pins.path().to_path_buf(),
            config,
            auth_capacity: None,
            ipcache_capacity: None,
        })
        .unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        let mut ipc = Ipcache::open(pins.path()).expect("open ipcache");
        for (ip, id, node) in [
            (IpAddr::V4(LOCAL_V4), LOCAL_ID, 0),
            (IpAddr::V4(REMOTE_V4), REMOTE_ID, REMOTE_NODE),
            (IpAddr::V6(LOCAL_V6), LOCAL_ID, 0),
            (IpAddr::V6(REMOTE_V6), REMOTE_ID, REMOTE_NODE),
        ] {
            ipc.insert(Prefix::host(ip), id, node)
                .expect("ipcache insert");
        }
        Self { pins, dp }
    }

    pub fn policy(&self) -> PolicyMap {
        PolicyMap::open(self.pins.path()).expect("open policy")
    }

    pub fn auth(&self) -> AuthMap {
        AuthMap::open(self.pins.path()).expect("open auth map")
    }

    pub fn config(&self) -> ConfigMap {
        ConfigMap::open(self.pins.path()).expect("open config")
    }

    /// Requires mTLS for the local pod's `direction` flows with REMOTE_ID.
    pub fn require(&self, direction: Direction, port: u16, proto: u8) {
        self.policy()
            .insert(
                PolicyRule {
                    local: LOCAL_ID,
                    remote: REMOTE_ID,
                    port,
                    proto,
                    direction,
                },
                AUTH_TYPE_MTLS,
            )
            .expect("policy insert");
    }

    pub fn authenticate(&self, node: u16, expiry: SystemTime) {
        self.auth().insert(key(node), expiry).expect("auth insert");
    }

    /// Runs one packet; returns true when it passed.
    pub fn run(&self, direction: Direction, pkt: &[u8]) -> bool {
        let r = self
            .dp
            .test_run(direction, pkt, 1)
            .unwrap_or_else(|e| panic!("test run: {e}"));
        match r.return_value {
            1 => true,
            0 => false,
            v => panic!("unexpected cgroup_skb verdict {v}"),
        }
    }
}

pub fn key(node: u16) -> AuthKey {
    AuthKey {
        local_id: LOCAL_ID,
        remote_id: REMOTE_ID,
        remote_node_id: node,
        auth_type: AUTH_TYPE_MTLS,
        pad: 0,
    }
}

pub fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// A TCP packet of the local pod's flow with the remote, in `direction`
/// (egress: local → remote:dport; ingress: remote → local:dport).
pub fn tcp(direction: Direction, dport: u16, flags: u8) -> Vec<u8> {
    match direction {
        Direction::Egress => frame(
            IpAddr::V4(LOCAL_V4),
            IpAddr::V4(REMOTE_V4),
            L4::Tcp {
                sport: 40000,
                dport,
                flags,
            },
            0,
        ),
        Direction::Ingress => frame(
            IpAddr::V4(REMOTE_V4),
            IpAddr::V4(LOCAL_V4),
            L4::Tcp {
                sport: 40000,
                dport,
                flags,
            },
            0,
        ),
    }
}
