//! openssl verifies the served chains against the served bundle, and rejects
//! a tampered leaf.

use std::path::Path;
use std::process::Output;

use crate::support::*;

fn pem(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| {
            let b64 = base64(d);
            let body: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).expect("ascii"))
                .collect();
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                body.join("\n")
            )
        })
        .collect()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn verify(dir: &Path, leaf: &[u8], intermediates: &[Vec<u8>]) -> Output {
    let leaf_path = dir.join("leaf.pem");
    let inter_path = dir.join("intermediates.pem");
    std::fs::write(&leaf_path, pem(&[leaf.to_vec()])).expect("write leaf");
    std::fs::write(&inter_path, pem(intermediates)).expect("write intermediates");
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.arg("verify")
        .arg("-CAfile")
        .arg(dir.join("bundle.pem"))
        .arg("-purpose")
        .arg("sslclient");
    if !intermediates.is_empty() {
        cmd.arg("-untrusted").arg(&inter_path);
    }
    cmd.arg(&leaf_path)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running openssl verify (is openssl installed?): {e}"))
}

#[test]
fn base64_matches_known_vectors() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

#[tokio::test]
async fn openssl_verifies_chains_and_rejects_tampering() {
    let d = start(
        &["a"],
        vec![entry("a", "/identity/1"), entry("a", "/identity/2")],
    )
    .await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    let m = next("first message", &mut s).await;
    std::fs::write(
        tmp.path().join("bundle.pem"),
        pem(&split_certs(&m.svids[0].bundle)),
    )
    .expect("write bundle");
    for svid in &m.svids {
        let chain = split_certs(&svid.x509_svid);
        let out = verify(tmp.path(), &chain[0], &chain[1..]).await;
        assert!(
            out.status.success(),
            "openssl verify {}: {}{}",
            svid.spiffe_id,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Flip a byte in the signature (the DER ends with the signature BIT STRING).
        let mut bad = chain[0].clone();
        let at = bad.len() - 5;
        bad[at] ^= 0x01;
        let out = verify(tmp.path(), &bad, &chain[1..]).await;
        assert!(
            !out.status.success(),
            "openssl accepted a tampered leaf of {}: {}",
            svid.spiffe_id,
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // After rotation the new chain verifies against the two-CA bundle, and an
    // SVID of the old CA still verifies (previous CA kept), until pruned.
    let old_leaf = split_certs(&m.svids[0].x509_svid).remove(0);
    d.dev.rotate_ca().expect("rotate");
    let m = next("message after rotation", &mut s).await;
    std::fs::write(
        tmp.path().join("bundle.pem"),
        pem(&split_certs(&m.svids[0].bundle)),
    )
    .expect("write bundle");
    let new_leaf = split_certs(&m.svids[0].x509_svid).remove(0);
    assert!(
        verify(tmp.path(), &new_leaf, &[]).await.status.success(),
        "new leaf verifies"
    );
    assert!(
        verify(tmp.path(), &old_leaf, &[]).await.status.success(),
        "old leaf verifies with old CA kept"
    );
    d.dev.prune_ca();
    let m = next("message after prune", &mut s).await;
    std::fs::write(
        tmp.path().join("bundle.pem"),
        pem(&split_certs(&m.svids[0].bundle)),
    )
    .expect("write bundle");
    assert!(
        verify(tmp.path(), &new_leaf, &[]).await.status.success(),
        "new leaf verifies after prune"
    );
    assert!(
        !verify(tmp.path(), &old_leaf, &[]).await.status.success(),
        "old leaf rejected after prune"
    );
}
