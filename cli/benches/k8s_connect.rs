//! Time from a new pod's publication to its first successful connection,
//! with the agents in Kubernetes mode (watch-driven) on a real
//! kube-apiserver; the measurement and its same-run baseline are
//! `first_connection_bench` in `tests/kubernetes.rs`, whose Cluster harness
//! this bench shares by including that file.
//!
//! `cargo bench -p meshauth-cli --bench k8s_connect` (root, with
//! `MESHAUTH_K8S_TOOLS_BIN` as the test command sets it). `REPEATS` new
//! nodes, one pod of each case on each (default 5).

#[path = "../tests/kubernetes.rs"]
#[allow(dead_code, unused_imports)]
mod kubernetes;

fn main() {
    let repeats: usize = std::env::var("REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let table = rt.block_on(kubernetes::first_connection_bench(repeats));
    println!("{table}");
}
