//! The `spiffe` crate (what svid-cache builds on) reads spire-dev: its
//! Workload API client and its X509Source, which follows CA rotation.

use spiffe::{TrustDomain, WorkloadApiClient, X509Source};

use crate::support::*;

#[tokio::test]
async fn spiffe_crate_client_and_source() {
    let d = start(
        &["a"],
        vec![entry("a", "/identity/1"), entry("a", "/identity/2")],
    )
    .await;
    let endpoint = format!("unix:{}", d.workload_socket("a").display());

    let client = WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap_or_else(|e| panic!("spiffe WorkloadApiClient::connect_to({endpoint}): {e}"));
    let ctx = within("spiffe fetch_x509_context", client.fetch_x509_context())
        .await
        .unwrap_or_else(|e| panic!("fetch_x509_context: {e}"));
    let got: Vec<(String, String)> = ctx
        .svids()
        .iter()
        .map(|s| (s.spiffe_id().to_string(), serial_hex(s.leaf().as_ref())))
        .collect();
    let want: Vec<(String, String)> = d
        .dev
        .agent("a")
        .expect("agent")
        .identities()
        .into_iter()
        .map(|i| (i.spiffe_id, i.serial))
        .collect();
    assert_eq!(got, want, "spiffe crate sees what spire-dev issued");
    let td = TrustDomain::new(TD).expect("trust domain");
    let bundle = ctx
        .bundle_set()
        .get(&td)
        .expect("bundle for meshauth.local");
    assert_eq!(bundle.authorities().len(), 1);

    let source = within(
        "X509Source::build",
        X509Source::builder().endpoint(&endpoint).build(),
    )
    .await
    .unwrap_or_else(|e| panic!("X509Source::build: {e}"));
    let before = source.svid().expect("svid").leaf().as_ref().to_vec();
    let mut updates = source.updated();
    d.dev.rotate_ca().expect("rotate");
    within("X509Source to see the rotation", async {
        loop {
            updates.changed().await.expect("source open");
            let n = source
                .bundle_set()
                .expect("bundles")
                .get(&td)
                .map_or(0, |b| b.authorities().len());
            if n == 2 {
                break;
            }
        }
    })
    .await;
    let after = source.svid().expect("svid").leaf().as_ref().to_vec();
    assert_ne!(
        serial_hex(&after),
        serial_hex(&before),
        "re-issued from the new CA"
    );
    assert_eq!(
        issuer(&after),
        subject(&split_certs(&d.dev.server().bundle()[0])[0])
    );
    source.shutdown().await;
}
