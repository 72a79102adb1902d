//! What the handshake benches share: two nodes on loopback (node-a 127.0.0.1
//! initiating as identity 256, node-b 127.0.0.2 responding as 257), P-256
//! SVIDs from an rcgen CA in each node's cache, and the desired state
//! "257 requires authentication from 256".

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use policy_bridge::{
    AuthRule, DesiredState, Direction, Endpoint, Identity, NodeInfo, PortRange, Protocol, Remote,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::PrivatePkcs8KeyDer;
use svid_cache::{CacheConfig, SvidCache, SvidInput, TrustBundle, TrustDomain, Update};

pub const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
pub const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
pub const L: u32 = 256;
pub const R: u32 = 257;
pub const TD: &str = "meshauth.local";

pub fn odt(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).expect("timestamp")
}

/// A P-256 CA and one P-256 SVID per identity (rcgen's default key is
/// ECDSA P-256 with SHA-256).
pub fn caches() -> (SvidCache, SvidCache) {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "bench CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = odt(now - Duration::from_secs(3600));
    p.not_after = odt(now + Duration::from_secs(86400));
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("CA");
    let svid = |id: u32| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        let uri = format!("spiffe://{TD}/identity/{id}");
        p.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().expect("uri"))];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = odt(now - Duration::from_secs(60));
        p.not_after = odt(now + Duration::from_secs(3600));
        let cert = p.signed_by(&key, &ca).expect("sign");
        SvidInput {
            spiffe_id: uri,
            cert_chain: vec![cert.der().clone()],
            private_key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    };
    let cache = |input: SvidInput| {
        let c = SvidCache::new(CacheConfig::default());
        c.apply(Update {
            svids: Some(vec![input]),
            bundle: Some(
                TrustBundle::new(TrustDomain::new(TD).expect("td"), vec![ca.der().clone()])
                    .expect("bundle"),
            ),
        })
        .expect("apply");
        c
    };
    (cache(svid(L)), cache(svid(R)))
}

pub fn node(name: &str, ip: IpAddr) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        handshake_addr: ip,
        addresses: BTreeSet::from([ip]),
        wireguard_key: None,
    }
}

pub fn desired(extra_nodes: &[(&str, IpAddr)]) -> DesiredState {
    let mut d = DesiredState::default();
    for (id, ip, n) in [(L, "10.0.1.1", "node-a"), (R, "10.0.2.1", "node-b")] {
        d.identities.insert(
            id,
            Identity {
                id,
                labels: BTreeSet::new(),
            },
        );
        let ip: IpAddr = ip.parse().expect("ip");
        d.endpoints.insert(
            ip,
            Endpoint {
                ip,
                identity: id,
                node: n.into(),
                pod: format!("default/w{id}"),
            },
        );
    }
    d.nodes = BTreeMap::from([
        ("node-a".into(), node("node-a", A)),
        ("node-b".into(), node("node-b", B)),
    ]);
    for (name, ip) in extra_nodes {
        d.nodes.insert(name.to_string(), node(name, *ip));
    }
    d.rules.insert(AuthRule {
        local: R,
        remote: Remote::Identity(L),
        direction: Direction::Ingress,
        protocol: Protocol::Any,
        ports: PortRange::ANY,
    });
    d
}
