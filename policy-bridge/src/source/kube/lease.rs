//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's
//! `leaderelection` does it, so that exactly one agent in the cluster writes
//! policy status.
//!
//! - A Lease held by another holder counts as expired only when its record
//!   (holder, renew time) has not changed for `leaseDurationSeconds` *as
//!   measured on this node's monotonic clock* since this node first saw it:
//!   no two nodes' wall clocks are ever compared.
//! - Every write is a replace with the read `resourceVersion`, so of two
//!   nodes taking an expired Lease at once exactly one succeeds (the other
//!   gets 409 Conflict).
//! - The leader counts itself leader only until its last successful renewal
//!   plus the renew deadline (two thirds of the duration): it stops writing
//!   before any other node may take the Lease.
//! - Released on shutdown (holder cleared, duration 1 s), so a rolling
//!   update hands over at once instead of after a full lease duration.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

/// Where the Lease is and who this node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The Lease's namespace (the chart's release namespace).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This candidate (the node name).
    pub holder: String,
    /// How long a leader that stopped renewing keeps the Lease.
    pub duration: Duration,
}

impl LeaseConfig {
    /// How often a round runs: renewals by the leader, tries by the others.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 7).max(Duration::from_millis(200))
    }

    /// How long a leader keeps leading without a successful renewal.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

/// The part of a Lease's record that tells whether its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew: Option<Timestamp>,
    duration: Option<i32>,
}

impl Record {
    fn of(spec: Option<&LeaseSpec>) -> Self {
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renew: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            duration: spec.and_then(|s| s.lease_duration_seconds),
        }
    }
}

/// One candidate's view of the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The record last seen and when (this node's clock) it was first seen.
    observed: Option<(Record, Instant)>,
    /// When this node last acquired or renewed the Lease.
    renewed: Option<Instant>,
}

impl Elector {
    /// A candidate; nothing is read before the first [`Elector::round`].
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
            renewed: None,
        }
    }

    /// True while this node may act as leader: it renewed within the renew
    /// deadline.
    pub fn leading(&self) -> bool {
        self.renewed
            .is_some_and(|t| t.elapsed() < self.cfg.renew_deadline())
    }

    /// Tries to acquire or renew the Lease once. Returns whether this node
    /// leads now; an API error leaves the leadership to run out at the
    /// renew deadline.
    pub async fn round(&mut self) -> Result<bool, kube::Error> {
        let secs = i32::try_from(self.cfg.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let now = Timestamp::now();
        let current = match self.api.get_opt(&self.cfg.name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.cfg.holder.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(l) => Ok(self.won(&l)),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(self.lost()),
                    Err(e) => Err(e),
                };
            }
        };
        let record = Record::of(current.spec.as_ref());
        let seen_at = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => Instant::now(),
        };
        self.observed = Some((record.clone(), seen_at));
        let mine = record.holder.as_deref() == Some(self.cfg.holder.as_str());
        // Held by another: taken only once its record has not changed
        // for its whole duration on this node's clock.
        if !mine && record.holder.is_some() {
            let held_for = Duration::from_secs(
                u64::try_from(record.duration.unwrap_or(secs).max(1)).unwrap_or(1),
            );
            if seen_at.elapsed() < held_for {
                return Ok(self.lost());
            }
        }
        let mut lease = current;
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if !mine {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.cfg.holder.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(MicroTime(now));
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => Ok(self.won(&l)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(self.lost()),
            Err(e) => Err(e),
        }
    }

    fn won(&mut self, lease: &Lease) -> bool {
        let now = Instant::now();
        self.observed = Some((Record::of(lease.spec.as_ref()), now));
        if self.renewed.is_none() {
            tracing::info!(
                lease = %format!("{}/{}", self.cfg.namespace, self.cfg.name),
                "leading: this agent writes policy status"
            );
        }
        self.renewed = Some(now);
        true
    }

    fn lost(&mut self) -> bool {
        if self.renewed.take().is_some() {
            tracing::warn!(
                lease = %format!("{}/{}", self.cfg.namespace, self.cfg.name),
                "no longer leading: another agent writes policy status"
            );
        }
        false
    }

    /// Gives the Lease up if this node holds it (shutdown): the holder is
    /// cleared and the duration set to 1 s, so another node takes over on
    /// its next round.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if self.renewed.take().is_none() {
            return Ok(());
        }
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.cfg.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await?;
        tracing::info!("released the policy status lease");
        Ok(())
    }
}
