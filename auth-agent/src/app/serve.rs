//! Start phase: what the agent serves before policy has synced — metrics
//! and health over HTTP, the local API on its (already bound) socket, and
//! the datapath's flow events into the hub the API streams from.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::registry::Registry;
use tokio::net::UnixListener;

use super::sources::Sources;
use super::tasks::{self, Stop};
use super::{AgentError, Start, backend, health, metrics};
use crate::api::FlowHub;

/// Serves metrics and health on the configured address, the API on `api`,
/// and starts the flow-event reader. `registry` holds the subsystems'
/// metrics; the agent's own collector is added to it here.
pub(super) async fn start(
    s: &mut Start<'_>,
    api: UnixListener,
    mut registry: Registry,
    sources: &Sources,
    cgroup: &Path,
) -> Result<(), AgentError> {
    let config = s.config;
    let pin_dir = &config.bpf_pin_dir;
    let hub = FlowHub::new(4096);
    registry.register_collector(Box::new(metrics::AgentCollector {
        pin_dir: pin_dir.clone(),
        cache: sources.cache.clone(),
        source: sources.status.clone(),
        nodes: sources.nodes.clone(),
        ready: s.ready.clone(),
        status_leader: sources.status_leader.clone(),
    }));
    let registry = Arc::new(Mutex::new(registry));
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| AgentError::Listen {
            what: "metrics and health",
            addr: config.metrics_listen.to_string(),
            source,
        })?;
    s.tasks.spawn(
        "health",
        Stop::Token,
        health::serve(
            listener,
            health::Health {
                registry,
                ready: s.ready.clone(),
                live: s.live.clone(),
            },
            s.token.clone(),
        ),
    );
    let backend = Arc::new(backend::AgentBackend {
        config: config.clone(),
        started: SystemTime::now(),
        cgroup: cgroup.to_path_buf(),
        cache: sources.cache.clone(),
        source: sources.status.clone(),
        pod_svids: sources.pod_svids.clone(),
        subscription: sources.subscription.clone(),
        nodes: sources.nodes.clone(),
        ready: s.ready.clone(),
        counts: s.counts.clone(),
        hub: hub.clone(),
        wireguard: s.wireguard.clone(),
    });
    s.tasks.spawn(
        "api",
        Stop::Token,
        crate::api::server::serve(api, backend, s.token.clone()),
    );

    // Events → observe.
    tasks::spawn_flow_events(
        s.tasks,
        auth_ebpf::events::EventReader::open(pin_dir)?,
        sources.subscription.clone(),
        hub,
        config.node_name.clone(),
        s.token.clone(),
        s.live.clone(),
    );
    Ok(())
}
