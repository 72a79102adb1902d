//! Garbage bytes on spire-dev's sockets hurt only that connection.

use std::path::Path;

use spire_dev::ControlRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::support::*;

/// Writes `bytes`, then reads until the server closes or 1 s passes.
async fn throw(path: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut conn = UnixStream::connect(path)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    let _ = conn.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        conn.read_to_end(&mut out),
    )
    .await;
    out
}

fn garbage() -> Vec<Vec<u8>> {
    vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0u8..=255).cycle().take(70_000).collect(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        vec![0u8; 3],
        // A well-framed HTTP/2 HEADERS frame whose HPACK block is invalid.
        [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(),
            &[0, 0, 3, 0x1, 0x4, 0, 0, 0, 1, 0xbe, 0xff, 0x00],
        ]
        .concat(),
    ]
}

#[tokio::test]
async fn garbage_on_agent_sockets_does_not_hurt_the_server() {
    let d = start(&["a"], vec![entry("a", "/identity/1")]).await;
    // An open stream survives the garbage on other connections.
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    next("first message", &mut s).await;
    for g in garbage() {
        throw(&d.workload_socket("a"), &g).await;
        throw(&d.admin_socket("a"), &g).await;
    }
    let mut fresh = workload(&d.workload_socket("a")).await;
    let mut s2 = fetch_svids(&mut fresh).await;
    let m = next("fresh stream after garbage", &mut s2).await;
    assert_eq!(m.svids.len(), 1);
    d.dev
        .add_entry(entry("a", "/identity/2"))
        .expect("add_entry");
    assert_eq!(
        next("old stream after garbage", &mut s).await.svids.len(),
        2
    );
    let mut dc = delegated(&d.admin_socket("a")).await;
    dc.subscribe_to_x509_bundles(spire_proto::delegatedidentity::SubscribeToX509BundlesRequest {})
        .await
        .unwrap_or_else(|e| panic!("admin socket after garbage: {e:?}"));
}

#[tokio::test]
async fn garbage_on_control_socket_gets_errors_and_server_keeps_serving() {
    let d = start(&["a"], vec![entry("a", "/identity/1")]).await;
    let ctl = d.dev.control_socket();
    let out = throw(&ctl, b"this is not json\n{\"op\":\"bogus\"}\n\xff\xfe\n").await;
    let text = String::from_utf8(out).expect("responses are UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "one error response per bad line: {text}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("response {l}: {e}"));
        assert!(v["error"]["message"].is_string(), "error response: {l}");
    }
    assert!(lines[1].contains("bogus"), "names the bad op: {}", lines[1]);
    // A line longer than the limit closes that connection only.
    let long = vec![b'x'; spire_dev::control::MAX_LINE + 10];
    let out = throw(&ctl, &long).await;
    assert!(
        String::from_utf8_lossy(&out).contains("longer than"),
        "too-long line answered"
    );
    for g in garbage() {
        throw(&ctl, &g).await;
    }
    let reply = spire_dev::control::request(&ctl, &ControlRequest::List)
        .await
        .unwrap_or_else(|e| panic!("list after garbage: {e}"));
    let spire_dev::ControlReply::Status(status) = reply else {
        panic!("list reply: {reply:?}")
    };
    assert_eq!(status.nodes[0].identities.len(), 1);
    // The workload socket is still fine.
    let mut c = workload(&d.workload_socket("a")).await;
    let mut s = fetch_svids(&mut c).await;
    next("workload after control garbage", &mut s).await;
}
