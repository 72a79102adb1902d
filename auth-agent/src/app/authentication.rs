//! Start phase, once policy has synced: the auth map (entries read back
//! and checked against the node table), the handshake server, the
//! initiator, the auth manager's inputs, and the manager itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use policy_bridge::{DesiredState, NodeInfo};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::sources::Sources;
use super::tasks::{self, Stop};
use super::{AgentError, Counts, Start};
use crate::auth::manager::{AuthManager, ManagerConfig, ManagerError, ManagerInputs};
use crate::auth::metrics::ManagerMetrics;
use crate::auth::rotation::forward_rotations;
use crate::auth::schedule::spawn_sweep_schedule;
use crate::auth::store::{BpfAuthStore, Pair};
use crate::auth::{AuthFailure, Authenticated, Authenticator};
use crate::handshake::{
    ClientOptions, HandshakeClient, HandshakeServer, Metrics, ServerOptions, StatedKey,
};

/// The auth manager with its inputs wired, ready to run.
#[derive(Debug)]
pub(super) struct Manager {
    manager: AuthManager<Counting, BpfAuthStore>,
    inputs: ManagerInputs,
}

impl Manager {
    /// Runs the manager until `token` is cancelled.
    pub(super) async fn run(self, token: &CancellationToken) -> Result<(), ManagerError> {
        self.manager.run(self.inputs, token.clone()).await
    }
}

/// Opens the auth map and vouches for the entries read back, starts the
/// handshake server, then the manager's inputs (signals, rotations, sweep
/// ticks) and the suspend watch, and builds the manager.
pub(super) async fn start(
    s: &mut Start<'_>,
    sources: &Sources,
    desired: watch::Receiver<Arc<DesiredState>>,
    hs_metrics: Metrics,
    mgr_metrics: ManagerMetrics,
    wireguard_key: StatedKey,
) -> Result<Manager, AgentError> {
    let store = open_auth_store(s, sources)?;
    start_handshake_server(
        s,
        sources,
        desired.clone(),
        store.clone(),
        hs_metrics.clone(),
        wireguard_key.clone(),
    )
    .await?;
    let mut client_opts = client_options(s, sources);
    client_opts.wireguard_key = wireguard_key;
    let client = Counting {
        inner: HandshakeClient::new(client_opts, hs_metrics),
        counts: s.counts.clone(),
    };
    let inputs = start_inputs(s, sources, desired).await?;
    spawn_suspend_watch(s);
    let config = s.config;
    let manager = AuthManager::new(
        ManagerConfig {
            reauth_fraction: config.reauth_fraction,
            sweep_cron: config.sweep_cron.clone(),
            ..ManagerConfig::default()
        },
        Arc::new(client),
        store,
        sources.nodes.clone(),
        Arc::new(crate::clock::AgentClock),
        mgr_metrics,
    );
    Ok(Manager { manager, inputs })
}

/// Opens the pinned auth map and, before anything reads or writes it, drops
/// the entries read back whose node id the node table cannot vouch for
/// (table lost or replaced).
fn open_auth_store(s: &Start<'_>, sources: &Sources) -> Result<Arc<BpfAuthStore>, AgentError> {
    let pin_dir = &s.config.bpf_pin_dir;
    let store = Arc::new(BpfAuthStore::open(pin_dir)?);
    let resumed = crate::nodes::resume::vouch_resumed_entries(pin_dir, &*store, &sources.nodes)?;
    tracing::info!(
        ?resumed,
        "auth entries read back checked against the node table"
    );
    Ok(store)
}

/// Starts what feeds the manager besides `desired`: the datapath's
/// auth-required signals, SVID rotations, and the sweep schedule's ticks.
async fn start_inputs(
    s: &mut Start<'_>,
    sources: &Sources,
    desired: watch::Receiver<Arc<DesiredState>>,
) -> Result<ManagerInputs, AgentError> {
    let (signal_tx, signal_rx) = mpsc::channel::<Pair>(4096);
    tasks::spawn_signals(
        s.tasks,
        auth_ebpf::signals::SignalReader::open(&s.config.bpf_pin_dir)?,
        signal_tx,
        s.token.clone(),
        s.live.clone(),
    );
    let (rot_tx, rot_rx) = mpsc::channel(1024);
    s.tasks.adopt(
        "svid_rotations",
        Stop::Abort,
        forward_rotations(sources.cache.clone(), rot_tx),
    );
    let (sweep_tx, sweep_rx) = mpsc::channel(4);
    s.tasks.adopt(
        "sweep_schedule",
        Stop::Token,
        spawn_sweep_schedule(&s.config.sweep_cron, sweep_tx, s.token.clone()).await?,
    );
    Ok(ManagerInputs {
        desired,
        signals: signal_rx,
        rotations: rot_rx,
        sweep: sweep_rx,
    })
}

/// Binds the handshake server and starts it (with the task counting what
/// it served).
async fn start_handshake_server(
    s: &mut Start<'_>,
    sources: &Sources,
    desired: watch::Receiver<Arc<DesiredState>>,
    store: Arc<BpfAuthStore>,
    metrics: Metrics,
    wireguard_key: StatedKey,
) -> Result<(), AgentError> {
    let config = s.config;
    let mut server_opts = ServerOptions::new(
        config.handshake_listen,
        sources.cache.clone(),
        sources.nodes.clone(),
        desired,
        store,
    );
    server_opts.handshake_timeout = config.handshake_timeout;
    server_opts.max_concurrent = config.max_concurrent_handshakes;
    server_opts.tls_timeout = config.handshake_tls_timeout;
    server_opts.max_per_source = config.max_handshakes_per_source;
    server_opts.wireguard_key = wireguard_key;
    // Half the grace: cancelled handshakes still have time to end before
    // the tasks' grace runs out.
    server_opts.drain_timeout = config.shutdown_grace / 2;
    let server = HandshakeServer::bind(server_opts, metrics).await?;
    tracing::info!(listen = %server.local_addr(), "handshake server listening");
    tasks::spawn_served_counts(
        s.tasks,
        server.subscribe(),
        s.counts.clone(),
        s.token.clone(),
    );
    s.tasks.adopt(
        "handshake_server",
        Stop::Token,
        server.spawn(s.token.clone()),
    );
    Ok(())
}

/// The initiator's options: the peers' handshake port is ours, and when we
/// listen on one address we dial from it.
fn client_options(s: &Start<'_>, sources: &Sources) -> ClientOptions {
    let config = s.config;
    let mut client_opts = ClientOptions::new(sources.cache.clone(), config.node_name.clone());
    client_opts.port = config.handshake_listen.port();
    client_opts.connect_timeout = config.connect_timeout;
    client_opts.handshake_timeout = config.handshake_timeout;
    if !config.handshake_listen.ip().is_unspecified() {
        client_opts.source_addr = Some(config.handshake_listen.ip());
    }
    client_opts
}

/// Watches for the node resuming from suspend and then bumps the datapath's
/// map generation, so no socket keeps a verdict whose deadline slept
/// through the suspend.
fn spawn_suspend_watch(s: &mut Start<'_>) {
    let pin_dir = s.config.bpf_pin_dir.clone();
    let token = s.token.clone();
    s.tasks.spawn(
        "clock_watch",
        Stop::Token,
        crate::clock::watch(Duration::from_secs(5), token.clone()),
    );
    s.tasks.spawn("suspend_watch", Stop::Token, async move {
        tokio::select! {
            _ = token.cancelled() => {}
            r = auth_ebpf::clock::bump_generation_on_resume(pin_dir, Duration::from_secs(1)) => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "suspend watch stopped");
                }
            }
        }
    });
}

/// The initiator, counting outcomes.
#[derive(Debug)]
struct Counting {
    inner: HandshakeClient,
    counts: Arc<Counts>,
}

impl Authenticator for Counting {
    fn authenticate(
        &self,
        local: u32,
        remote: u32,
        node: NodeInfo,
    ) -> futures::future::BoxFuture<'static, Result<Authenticated, AuthFailure>> {
        let fut = self.inner.authenticate(local, remote, node);
        let counts = self.counts.clone();
        Box::pin(async move {
            let r = fut.await;
            match &r {
                Ok(_) => counts.initiated_ok.fetch_add(1, Ordering::Relaxed),
                Err(_) => counts.initiated_failed.fetch_add(1, Ordering::Relaxed),
            };
            r
        })
    }
}
