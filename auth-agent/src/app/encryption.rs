//! Start phase, once policy has synced (the node table is whole): WireGuard.
//! On, the manager takes the interface over (created, or adopted with its
//! peers after a restart) and the handshake states its key; off, whatever
//! an earlier run left (interface, rules, routes, the published key) is
//! removed.

use std::sync::Arc;

use policy_bridge::DesiredState;
use tokio::sync::watch;

use super::tasks::Stop;
use super::{AgentError, Start};
use crate::config::{Config, PolicySource};
use crate::handshake::StatedKey;
use crate::wireguard::manager::{self, Settings, WgMetrics};
use crate::wireguard::netlink::Kernel;
use crate::wireguard::publish::{KubePublisher, ManifestPublisher, Publisher};

/// Where this node's key is published: the Node object, or its manifest.
async fn publisher(config: &Config) -> Result<Box<dyn Publisher>, AgentError> {
    let annotation = policy_bridge::engine::WIREGUARD_KEY_ANNOTATION.to_owned();
    Ok(match &config.policy_source {
        PolicySource::Directory { path } => Box::new(ManifestPublisher {
            dir: path.clone(),
            node: config.node_name.clone(),
            annotation,
        }),
        PolicySource::Kubernetes => Box::new(KubePublisher {
            client: kube::Client::try_default()
                .await
                .map_err(|e| AgentError::Kube(e.to_string()))?,
            node: config.node_name.clone(),
            annotation,
        }),
    })
}

/// Starts WireGuard (or removes it when off). The key the handshake states
/// follows the manager's.
pub(super) async fn start(
    s: &mut Start<'_>,
    desired: &watch::Receiver<Arc<DesiredState>>,
    metrics: WgMetrics,
) -> Result<StatedKey, AgentError> {
    let config = s.config;
    let kernel = Kernel::connect(&config.wireguard_interface).map_err(wg)?;
    let publisher = publisher(config).await?;
    if !config.wireguard {
        manager::remove(&kernel, &*publisher).await;
        return Ok(StatedKey::default());
    }
    let settings = Settings {
        node: config.node_name.clone(),
        interface: config.wireguard_interface.clone(),
        port: config.wireguard_port,
        mtu: config.wireguard_mtu,
        state_dir: config.state_dir.clone(),
        rotate_every: config.wireguard_key_rotation,
        refresh: config.wireguard_refresh,
    };
    let (handle, task) = manager::start(
        settings,
        kernel,
        publisher,
        desired.clone(),
        metrics,
        s.token.clone(),
    )
    .await
    .map_err(AgentError::WireGuard)?;
    s.tasks.adopt("wireguard", Stop::Token, task);
    let key = StatedKey::following(handle.key.clone());
    let _ = s.wireguard.set(handle);
    Ok(key)
}

fn wg(e: crate::wireguard::netlink::KernelError) -> AgentError {
    AgentError::WireGuard(e.into())
}
