//! The WireGuard manager: one task that owns `meshauth_wg0`.
//!
//! At start (after the first policy sync, so the node table is whole) it
//! creates or adopts the interface, sets the node's key and port, adds the
//! routing rules, publishes the public key, reads what the kernel holds and
//! makes it what the node table asks for — removing what nobody wants, once
//! (a restarted agent finds its peers still there: traffic never stopped).
//! Then it follows the desired state: each change is planned against an
//! in-memory copy of the kernel's state and only the difference is sent
//! (a node joining is one peer entry and its routes). Every
//! `refresh` it reads the device again, for status, and repairs drift (a
//! peer or route removed by hand). A key rotation (API or interval)
//! writes a new key, sets it, and publishes it; peers rebuild their peer for
//! this node when they see it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use policy_bridge::{DesiredState, IpPrefix};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::key::{self, KeyError, PrivateKey, PublicKey};
use super::netlink::{DeviceDump, Kernel, KernelError, OVERHEAD};
use super::plan::{self, PeerState, Step};
use super::publish::Publisher;

/// Settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name.
    pub node: String,
    /// The interface (`meshauth_wg0`).
    pub interface: String,
    /// The UDP port (51871).
    pub port: u16,
    /// A fixed MTU; `None`: the underlay's minus 80.
    pub mtu: Option<u32>,
    /// Where the key file is.
    pub state_dir: PathBuf,
    /// Rotate the key this often (`None`: only on demand).
    pub rotate_every: Option<Duration>,
    /// Read the device again this often (status, drift repair).
    pub refresh: Duration,
}

/// Why WireGuard could not start.
#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    /// The key file.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The kernel.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// A peer as `meshauth status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerView {
    /// Its node (empty for a peer no node owns, waiting for collection).
    pub node: String,
    /// Its public key.
    pub public_key: String,
    /// Its endpoint.
    pub endpoint: Option<String>,
    /// Its AllowedIPs.
    pub allowed_ips: Vec<String>,
    /// The last WireGuard handshake (RFC 3339).
    pub last_handshake: Option<String>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// WireGuard as `meshauth status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireGuardStatus {
    /// The interface.
    pub interface: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its UDP port.
    pub listen_port: u16,
    /// This node's public key.
    pub public_key: String,
    /// Whether the key is published where the other nodes read it.
    pub published: bool,
    /// Why publishing failed, if it did.
    pub publish_error: Option<String>,
    /// Peers, by node.
    pub peers: Vec<PeerView>,
    /// Remote nodes without a peer, with the reason (a key that disagrees
    /// with the node table shows here).
    pub refused: BTreeMap<String, String>,
    /// Addresses claimed by two nodes.
    pub conflicts: Vec<String>,
    /// The last error programming the kernel, if the last attempt failed.
    pub last_error: Option<String>,
    /// Key rotations since start.
    pub rotations: u64,
    /// When the device was last read (RFC 3339).
    pub as_of: String,
}

/// WireGuard metrics (prefix `meshauth_wireguard_`).
#[derive(Debug, Clone, Default)]
pub struct WgMetrics {
    /// Peers on the interface.
    pub peers: Gauge,
    /// Remote nodes refused a peer.
    pub refused_nodes: Gauge,
    /// Netlink messages sent.
    pub netlink_messages: Counter,
    /// Peer entries sent (created, extended, released or removed).
    pub peer_updates: Counter,
    /// Failed attempts to program the kernel.
    pub sync_errors: Counter,
    /// Drift found and repaired (the kernel differed from what was set).
    pub drift_repairs: Counter,
    /// Key rotations.
    pub key_rotations: Counter,
    /// Failed attempts to publish the key.
    pub publish_errors: Counter,
}

impl WgMetrics {
    /// Creates the metrics and registers them in `r` (already prefixed).
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register("peers", "Peers on the WireGuard interface", m.peers.clone());
        r.register(
            "refused_nodes",
            "Remote nodes without a peer: no, bad, own or duplicate key",
            m.refused_nodes.clone(),
        );
        r.register(
            "netlink_messages",
            "Netlink messages sent to program WireGuard",
            m.netlink_messages.clone(),
        );
        r.register(
            "peer_updates",
            "Peer entries sent to the kernel",
            m.peer_updates.clone(),
        );
        r.register(
            "sync_errors",
            "Failed attempts to program the WireGuard interface",
            m.sync_errors.clone(),
        );
        r.register(
            "drift_repairs",
            "Times the interface differed from what the agent set and was repaired",
            m.drift_repairs.clone(),
        );
        r.register(
            "key_rotations",
            "WireGuard key rotations",
            m.key_rotations.clone(),
        );
        r.register(
            "publish_errors",
            "Failed attempts to publish the WireGuard public key",
            m.publish_errors.clone(),
        );
        m
    }
}

/// What the rest of the agent holds: the local public key (for the
/// handshake message), the status, and the rotate command.
#[derive(Debug, Clone)]
pub struct WireGuardHandle {
    /// This node's public key (base64), as the handshake states it.
    pub key: watch::Receiver<Option<String>>,
    /// The status.
    pub status: watch::Receiver<Arc<WireGuardStatus>>,
    rotate: mpsc::Sender<oneshot::Sender<Result<String, String>>>,
}

impl WireGuardHandle {
    /// Rotates the key now; the new public key.
    pub async fn rotate(&self) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.rotate
            .send(tx)
            .await
            .map_err(|_| "the WireGuard manager is not running".to_string())?;
        rx.await
            .map_err(|_| "the WireGuard manager stopped".to_string())?
    }
}

/// The manager's state.
struct Manager {
    settings: Settings,
    kernel: Kernel,
    publisher: Box<dyn Publisher>,
    metrics: WgMetrics,
    key: PrivateKey,
    throwaway: PublicKey,
    index: u32,
    mtu: u32,
    /// What the kernel holds, as far as the agent knows.
    peers: BTreeMap<PublicKey, PeerState>,
    routes: BTreeSet<IpPrefix>,
    last_dump: DeviceDump,
    plan: plan::Desired,
    published: Option<String>,
    publish_error: Option<String>,
    last_error: Option<String>,
    rotations: u64,
    key_tx: watch::Sender<Option<String>>,
    status_tx: watch::Sender<Arc<WireGuardStatus>>,
}

/// Sets the interface up and starts the manager. Returns the handle and
/// the task (it ends when `token` is cancelled, leaving the interface and
/// its peers in place for the next agent).
pub async fn start(
    settings: Settings,
    kernel: Kernel,
    publisher: Box<dyn Publisher>,
    desired: watch::Receiver<Arc<DesiredState>>,
    metrics: WgMetrics,
    token: CancellationToken,
) -> Result<(WireGuardHandle, tokio::task::JoinHandle<()>), WireGuardError> {
    // First whether the kernel can do it at all: no key is made for a
    // node that cannot use it.
    kernel.check_support().await?;
    let (key, created) = key::load_or_create(&settings.state_dir)?;
    if on_tmpfs(&settings.state_dir) {
        tracing::warn!(
            dir = %settings.state_dir.display(),
            "the state directory is on tmpfs: a reboot loses the WireGuard key, and every peer must learn a new one"
        );
    }
    tracing::info!(
        public_key = %key.public_key(),
        created,
        file = %settings.state_dir.join(key::KEY_FILE).display(),
        "WireGuard key"
    );
    let state = desired.borrow().clone();
    let mtu = match settings.mtu {
        Some(m) => m,
        None => underlay_mtu(&kernel, &settings.node, &state).await?,
    };
    let index = kernel.ensure_link(mtu).await?;
    kernel.configure(&key, settings.port).await?;
    kernel.ensure_rules().await?;
    let throwaway = key::ephemeral()?.public_key();
    let (key_tx, key_rx) = watch::channel(Some(key.public_key().to_string()));
    let (status_tx, status_rx) = watch::channel(Arc::new(WireGuardStatus::default()));
    let mut m = Manager {
        settings,
        kernel,
        publisher,
        metrics,
        key,
        throwaway,
        index,
        mtu,
        peers: BTreeMap::new(),
        routes: BTreeSet::new(),
        last_dump: DeviceDump::default(),
        plan: plan::Desired::default(),
        published: None,
        publish_error: None,
        last_error: None,
        rotations: 0,
        key_tx,
        status_tx,
    };
    m.publish().await;
    m.read_kernel().await?;
    tracing::info!(
        interface = %m.settings.interface,
        mtu,
        peers_found = m.peers.len(),
        routes_found = m.routes.len(),
        "WireGuard interface ready"
    );
    // The first full sync: the node table is whole, so what nobody wants
    // goes now.
    if let Err(e) = m.reconcile(&state).await {
        tracing::warn!(error = %e, "first WireGuard sync failed; retrying");
    }
    m.publish_status();
    let (rot_tx, rot_rx) = mpsc::channel(4);
    let handle = WireGuardHandle {
        key: key_rx,
        status: status_rx,
        rotate: rot_tx,
    };
    let task = tokio::spawn(m.run(desired, rot_rx, token));
    Ok((handle, task))
}

/// Whether `dir` is on tmpfs (lost at reboot).
#[allow(
    clippy::unnecessary_cast,
    reason = "f_type is i64 on x86_64 but another type elsewhere"
)]
fn on_tmpfs(dir: &std::path::Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    rustix::fs::statfs(dir).is_ok_and(|s| s.f_type as i64 == TMPFS_MAGIC)
}

/// The underlay's MTU minus WireGuard's overhead: the link holding this
/// node's handshake address; 1500 − 80 when it cannot be found.
async fn underlay_mtu(
    kernel: &Kernel,
    node: &str,
    state: &DesiredState,
) -> Result<u32, KernelError> {
    let Some(info) = state.nodes.get(node) else {
        tracing::warn!(
            node,
            "this node is not in the node table yet; WireGuard MTU 1420"
        );
        return Ok(1500 - OVERHEAD);
    };
    match kernel.mtu_of_link_with(info.handshake_addr).await? {
        Some(m) => Ok(m.saturating_sub(OVERHEAD).max(1280)),
        None => {
            tracing::warn!(addr = %info.handshake_addr, "no link holds this node's handshake address; WireGuard MTU 1420");
            Ok(1500 - OVERHEAD)
        }
    }
}

impl Manager {
    async fn run(
        mut self,
        mut desired: watch::Receiver<Arc<DesiredState>>,
        mut rotate: mpsc::Receiver<oneshot::Sender<Result<String, String>>>,
        token: CancellationToken,
    ) {
        let mut refresh = tokio::time::interval(self.settings.refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.reset();
        let every = self.settings.rotate_every;
        let mut next_rotation = every.map(|d| tokio::time::Instant::now() + d);
        loop {
            let rotation_due = async {
                match next_rotation {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = token.cancelled() => break,
                r = desired.changed() => {
                    if r.is_err() {
                        break;
                    }
                    let state = desired.borrow_and_update().clone();
                    if let Err(e) = self.reconcile(&state).await {
                        tracing::warn!(error = %e, "WireGuard sync failed; retried at the next change or refresh");
                    }
                }
                _ = refresh.tick() => {
                    let state = desired.borrow().clone();
                    match self.read_kernel().await {
                        Ok(()) => {
                            if let Err(e) = self.reconcile(&state).await {
                                tracing::warn!(error = %e, "WireGuard sync failed");
                            }
                        }
                        Err(e) => self.failed(&e),
                    }
                    // Publish again when it failed, or when the node table
                    // shows another key for this node (edited by hand, or an
                    // old value restored): the table must hold the key the
                    // interface uses, or peers cannot reach this node.
                    let own = self.key.public_key().to_string();
                    let listed = state.nodes.get(&self.settings.node).and_then(|n| n.wireguard_key.clone());
                    if self.publish_error.is_some() || (state.nodes.contains_key(&self.settings.node) && listed.as_deref() != Some(own.as_str())) {
                        self.publish().await;
                    }
                }
                Some(reply) = rotate.recv() => {
                    let r = self.rotate().await;
                    let _ = reply.send(r);
                    next_rotation = every.map(|d| tokio::time::Instant::now() + d);
                }
                () = rotation_due => {
                    if let Err(e) = self.rotate().await {
                        tracing::error!(error = %e, "scheduled WireGuard key rotation failed");
                    }
                    next_rotation = every.map(|d| tokio::time::Instant::now() + d);
                }
            }
            self.publish_status();
        }
        tracing::info!(interface = %self.settings.interface, "WireGuard manager stopped; the interface and its peers stay");
    }

    fn failed(&mut self, e: &KernelError) {
        self.metrics.sync_errors.inc();
        self.last_error = Some(e.to_string());
    }

    /// Reads the device and the route table into the in-memory copy;
    /// counts a drift repair when they differ from it.
    async fn read_kernel(&mut self) -> Result<(), KernelError> {
        let before = self.kernel.messages_sent();
        let dump = self.kernel.device().await?;
        let routes = self.kernel.routes().await?;
        self.count_messages(before);
        let peers: BTreeMap<PublicKey, PeerState> = dump
            .peers
            .iter()
            .map(|(k, p)| (*k, p.state.clone()))
            .collect();
        if !self.last_dump.peers.is_empty() && (peers != self.peers || routes != self.routes) {
            self.metrics.drift_repairs.inc();
            tracing::warn!(
                interface = %self.settings.interface,
                "the WireGuard interface differed from what the agent set; repairing"
            );
        }
        if dump.public_key != Some(self.key.public_key()) || dump.listen_port != self.settings.port
        {
            self.kernel.configure(&self.key, self.settings.port).await?;
        }
        self.peers = peers;
        self.routes = routes;
        self.last_dump = dump;
        Ok(())
    }

    fn count_messages(&self, before: u64) {
        self.metrics
            .netlink_messages
            .inc_by(self.kernel.messages_sent().saturating_sub(before));
    }

    /// Plans against the in-memory copy and sends the difference.
    async fn reconcile(&mut self, state: &DesiredState) -> Result<(), KernelError> {
        let own = self.key.public_key();
        self.plan = plan::desired(
            &self.settings.node,
            &own,
            &state.nodes,
            state,
            self.settings.port,
        );
        let steps = plan::steps(&self.peers, &self.routes, &self.plan, true);
        let before = self.kernel.messages_sent();
        let r = self.apply(&steps).await;
        self.count_messages(before);
        self.metrics.peers.set(self.peers.len() as i64);
        self.metrics
            .refused_nodes
            .set(self.plan.refused.len() as i64);
        match &r {
            Ok(()) => self.last_error = None,
            Err(e) => {
                self.failed(e);
                // The copy may be wrong now: read the kernel before the next plan.
                let _ = self.read_kernel().await;
            }
        }
        if !steps.is_empty() {
            tracing::debug!(steps = steps.len(), "WireGuard interface updated");
        }
        r
    }

    /// Sends `steps` ([`Kernel::apply`]); the in-memory copy follows the
    /// steps applied (all, or those before the one that failed — the
    /// caller reads the kernel back after a failure).
    async fn apply(&mut self, steps: &[Step]) -> Result<(), KernelError> {
        let (done, r) = match self.kernel.apply(steps, self.index, &self.throwaway).await {
            Ok(()) => (steps.len(), Ok(())),
            Err((done, e)) => (done, Err(e)),
        };
        for s in &steps[..done] {
            if !matches!(s, Step::AddRoute(_) | Step::DelRoute(_)) {
                self.metrics.peer_updates.inc();
            }
            plan::apply_model(&mut self.peers, &mut self.routes, s);
        }
        r
    }

    async fn publish(&mut self) {
        let key = self.key.public_key().to_string();
        match self.publisher.publish(Some(key.clone())).await {
            Ok(changed) => {
                if changed {
                    tracing::info!(public_key = %key, "WireGuard public key published");
                }
                self.published = Some(key);
                self.publish_error = None;
            }
            Err(e) => {
                self.metrics.publish_errors.inc();
                if self.publish_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "WireGuard public key not published; retrying");
                }
                self.publish_error = Some(e);
            }
        }
    }

    /// A new key: written (0600, atomically), set on the interface, stated
    /// in handshakes, published.
    async fn rotate(&mut self) -> Result<String, String> {
        let started = Instant::now();
        let key = key::rotate(&self.settings.state_dir).map_err(|e| e.to_string())?;
        self.kernel
            .configure(&key, self.settings.port)
            .await
            .map_err(|e| e.to_string())?;
        let old = self.key.public_key();
        self.key = key;
        let new = self.key.public_key().to_string();
        let _ = self.key_tx.send(Some(new.clone()));
        self.published = None;
        self.publish().await;
        self.rotations += 1;
        self.metrics.key_rotations.inc();
        tracing::info!(
            old = %old,
            new = %new,
            took = ?started.elapsed(),
            published = self.publish_error.is_none(),
            "WireGuard key rotated"
        );
        match &self.publish_error {
            None => Ok(new),
            Some(e) => Err(format!(
                "key rotated to {new} but not published yet ({e}); retrying"
            )),
        }
    }

    fn publish_status(&self) {
        let by_key: BTreeMap<&PublicKey, &str> = self
            .plan
            .peers
            .iter()
            .map(|(k, p)| (k, p.node.as_str()))
            .collect();
        let peers = self
            .peers
            .iter()
            .map(|(k, p)| {
                let dump = self.last_dump.peers.get(k);
                PeerView {
                    node: by_key.get(k).map(|n| (*n).to_owned()).unwrap_or_default(),
                    public_key: k.to_string(),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    allowed_ips: p.allowed.iter().map(ToString::to_string).collect(),
                    last_handshake: dump
                        .and_then(|d| d.last_handshake)
                        .map(crate::api::flows::rfc3339),
                    rx_bytes: dump.map_or(0, |d| d.rx_bytes),
                    tx_bytes: dump.map_or(0, |d| d.tx_bytes),
                }
            })
            .collect();
        let status = WireGuardStatus {
            interface: self.settings.interface.clone(),
            mtu: self.mtu,
            listen_port: self.settings.port,
            public_key: self.key.public_key().to_string(),
            published: self.published.is_some() && self.publish_error.is_none(),
            publish_error: self.publish_error.clone(),
            peers,
            refused: self
                .plan
                .refused
                .iter()
                .map(|(n, r)| (n.clone(), r.to_string()))
                .collect(),
            conflicts: self
                .plan
                .conflicts
                .iter()
                .map(|(p, a, b)| format!("{p}: kept for {a}, claimed by {b}"))
                .collect(),
            last_error: self.last_error.clone(),
            rotations: self.rotations,
            as_of: crate::api::flows::rfc3339(SystemTime::now()),
        };
        self.status_tx.send_replace(Arc::new(status));
    }
}

/// WireGuard off: removes the interface, the rules and routes, and the
/// published key, if an earlier run left them. The key file is kept (it is
/// reused when WireGuard is turned on again). Errors are logged, not fatal.
pub async fn remove(kernel: &Kernel, publisher: &dyn Publisher) {
    match kernel.index().await {
        Ok(Some(_)) => {
            let r = async {
                kernel.delete_rules_and_routes().await?;
                kernel.delete_link().await
            }
            .await;
            match r {
                Ok(_) => tracing::info!(
                    interface = kernel.name(),
                    "wireguard: false — interface, rules and routes removed"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "wireguard: false — could not remove the WireGuard interface")
                }
            }
        }
        Ok(None) => {
            // Rules may outlive a link deleted by hand.
            if let Ok((v4, v6)) = kernel.rules().await
                && v4 + v6 > 0
                && let Err(e) = kernel.delete_rules_and_routes().await
            {
                tracing::warn!(error = %e, "wireguard: false — could not remove the routing rules");
            }
        }
        Err(e) => tracing::debug!(error = %e, "wireguard: false — no interface checked"),
    }
    match publisher.publish(None).await {
        Ok(true) => tracing::info!("wireguard: false — published key removed"),
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "wireguard: false — published key not checked"),
    }
}
