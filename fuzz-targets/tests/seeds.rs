//! The seeds committed under `fuzz/seeds/<target>/seed-*`: real
//! inputs of each kind (handshake frames as the agent writes them, the
//! example policies, SPIRE responses carrying real certificate chains and
//! keys made for the corpus, API requests) for the fuzzers to start from.
//! `UPDATE_FUZZ_SEEDS=1 cargo test -p meshauth-fuzz-targets --test seeds`
//! writes them again (`UPDATE_FUZZ_SEEDS=<name>`: only that seed);
//! otherwise the test checks they are there and that each still takes the
//! path it was made for.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use auth_agent::handshake::proof::{self, Signer, Statement};
use auth_agent::handshake::protocol::{Hello, Message, Version, encode, encode_as};
use meshauth_test_support::certs::Ca;
use prost::Message as _;
use spire_proto::delegatedidentity::{
    SubscribeToX509BundlesResponse, SubscribeToX509sviDsResponse, X509svidWithKey,
};
use spire_proto::types::{Spiffeid, X509svid as TypesX509svid};
use spire_proto::workload::{X509svid, X509svidResponse};

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
}

fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let hello = |wg: Option<&str>| {
        Message::Hello(Hello {
            node: "node-a".into(),
            local: 256,
            remote: 257,
            wireguard_key: wg.map(str::to_owned),
        })
    };
    for (name, m) in [
        ("hello", hello(None)),
        ("hello-wg", hello(Some("a2V5LWE="))),
        (
            "refused",
            Message::Refused {
                id: None,
                label: "identity_mismatch".into(),
                message: "the certificate proves 258".into(),
            },
        ),
    ] {
        out.push((
            "handshake_message",
            name.into(),
            encode(&m).unwrap_or_else(|e| panic!("{e}")),
        ));
    }
    let mut v2 = br#"{"version":2,"type":"hello","node":"n","local":1,"remote":2}"#.to_vec();
    let mut framed = (v2.len() as u32).to_be_bytes().to_vec();
    framed.append(&mut v2);
    out.push(("handshake_message", "version-2".into(), framed));
    out.push((
        "handshake_message",
        "too-long".into(),
        vec![0xff, 0xff, 0xff, 0xff],
    ));
    // A meshauth/2 proof with a real chain, signed over the statement the
    // fuzz target checks it against (so it verifies: the deep path).
    let ca = Ca::root("fuzz seed CA");
    let leaf = ca.svid(256, SystemTime::now(), Duration::from_secs(3600));
    let svid = svid_cache::Svid::build(
        &leaf.input(),
        &meshauth_test_support::certs::td(),
        None,
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let exporter = [7u8; 32];
    let statement = Statement {
        exporter: &exporter,
        id: 1,
        initiator: 256,
        responder: 257,
        initiator_node: "node-a",
        responder_node: "node-b",
    };
    let (p, _) = proof::make(Signer::Initiator, &statement, &svid, None, None)
        .unwrap_or_else(|e| panic!("{e}"));
    out.push((
        "handshake_message",
        "prove-v2".into(),
        encode_as(Version::V2, &Message::Prove(p)).unwrap_or_else(|e| panic!("{e}")),
    ));

    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut names: Vec<_> = std::fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("{}: {e}", examples.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    names.sort();
    for p in names {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((
            "policy_yaml",
            stem,
            std::fs::read(&p).unwrap_or_else(|e| panic!("{e}")),
        ));
    }

    let now = SystemTime::now();
    let ca = Ca::root("meshauth fuzz corpus");
    let inter = ca.intermediate("meshauth fuzz intermediate");
    let a = ca.svid(256, now, Duration::from_secs(3600));
    let b = inter.svid(257, now, Duration::from_secs(3600));
    let ders = |c: &[rustls_pki_types::CertificateDer<'static>]| -> Vec<u8> {
        c.iter().flat_map(|d| d.as_ref().to_vec()).collect()
    };
    let bundle = ca.der().as_ref().to_vec();
    let w = |svids: Vec<X509svid>| X509svidResponse {
        svids,
        ..X509svidResponse::default()
    };
    let wsvid = |leaf: &meshauth_test_support::certs::Leaf| X509svid {
        spiffe_id: leaf.spiffe_id.clone(),
        x509_svid: ders(&leaf.chain),
        x509_svid_key: leaf.key.clone(),
        bundle: bundle.clone(),
        ..X509svid::default()
    };
    out.push((
        "workload_api",
        "one".into(),
        w(vec![wsvid(&a)]).encode_to_vec(),
    ));
    out.push((
        "workload_api",
        "two-with-intermediate".into(),
        w(vec![wsvid(&a), wsvid(&b)]).encode_to_vec(),
    ));
    let mut federated = w(vec![wsvid(&a)]);
    federated.svids[0].bundle = vec![0x30, 0x03, 0x01, 0x01, 0xff];
    federated
        .federated_bundles
        .insert("spiffe://meshauth.local".into(), bundle.clone());
    out.push((
        "workload_api",
        "federated".into(),
        federated.encode_to_vec(),
    ));

    let dsvid = |leaf: &meshauth_test_support::certs::Leaf| X509svidWithKey {
        x509_svid: Some(TypesX509svid {
            cert_chain: leaf.chain.iter().map(|d| d.as_ref().to_vec()).collect(),
            id: Some(Spiffeid {
                trust_domain: "meshauth.local".into(),
                path: leaf
                    .spiffe_id
                    .trim_start_matches("spiffe://meshauth.local")
                    .to_owned(),
            }),
            expires_at: 0,
            ..TypesX509svid::default()
        }),
        x509_svid_key: leaf.key.clone(),
    };
    let mut svids = vec![0u8];
    svids.extend(
        SubscribeToX509sviDsResponse {
            x509_svids: vec![dsvid(&a), dsvid(&b)],
            federates_with: Vec::new(),
        }
        .encode_to_vec(),
    );
    out.push(("delegated_api", "svids".into(), svids));
    let mut bundles = vec![1u8];
    bundles.extend(
        SubscribeToX509BundlesResponse {
            ca_certificates: [("meshauth.local".to_owned(), bundle.clone())].into(),
        }
        .encode_to_vec(),
    );
    out.push(("delegated_api", "bundles".into(), bundles));

    for (name, req) in [
        ("status", "GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n"),
        ("auth", "GET /v1/auth HTTP/1.1\r\nHost: agent\r\n\r\n"),
        (
            "policies-json",
            "GET /v1/policies?o=json HTTP/1.1\r\nHost: agent\r\n\r\n",
        ),
        (
            "flows",
            "GET /v1/flows?verdict=DROPPED&identity=256&last=5 HTTP/1.1\r\nHost: agent\r\n\r\n",
        ),
        (
            "rotate",
            "POST /v1/wireguard/rotate-key HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "pipelined",
            "GET /v1/identities HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
    ] {
        out.push(("local_api", name.into(), req.as_bytes().to_vec()));
    }
    out
}

#[test]
fn every_target_has_its_seeds() {
    let update = std::env::var("UPDATE_FUZZ_SEEDS").ok();
    if let Some(only) = update {
        for (target, name, bytes) in seeds() {
            if only != "1" && only != name {
                continue;
            }
            let dir = corpus(target);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(dir.join(format!("seed-{name}")), bytes)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    for (target, _) in meshauth_fuzz_targets::TARGETS {
        let n = std::fs::read_dir(corpus(target))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
                    .count()
            })
            .unwrap_or(0);
        assert!(
            n >= 2,
            "fuzz/seeds/{target} has {n} seeds; run UPDATE_FUZZ_SEEDS=1 cargo test -p meshauth-fuzz-targets --test seeds"
        );
    }
    // The proof seed decodes and its signature verifies as the target checks it.
    let prove =
        std::fs::read(corpus("handshake_message").join("seed-prove-v2")).unwrap_or_default();
    let Some(Message::Prove(p)) = prove
        .get(4..)
        .and_then(|b| auth_agent::handshake::protocol::decode_as(Version::V2, b).ok())
    else {
        panic!("seed-prove-v2 is not a meshauth/2 proof");
    };
    let exporter = [7u8; 32];
    let statement = Statement {
        exporter: &exporter,
        id: p.id,
        initiator: p.local,
        responder: p.remote,
        initiator_node: &p.node,
        responder_node: "node-b",
    };
    let decoded = proof::decode(&p).unwrap_or_else(|e| panic!("seed-prove-v2: {e}"));
    proof::check(Signer::Initiator, &statement, &p, &decoded, None)
        .unwrap_or_else(|e| panic!("seed-prove-v2 does not verify: {e}"));
    // The SPIRE seeds carry chains the cache accepts (not just bytes that
    // decode): the fuzzers start from the deep end.
    let one = std::fs::read(corpus("workload_api").join("seed-one")).unwrap_or_default();
    let took = svid_cache::fuzzing::workload_response(&one);
    assert!(
        took == "applied" || took.contains("expired"),
        "seed-one: {took}"
    );
}
