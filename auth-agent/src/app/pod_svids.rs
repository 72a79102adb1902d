//! Per-pod SVIDs (`--identity-source delegated-pods`): which pods of this
//! node the Delegated Identity source subscribes for, and by which PID.
//!
//! Every pod of this node in the desired state is looked up by its
//! `metadata.uid` in the pods' cgroups (kubelet's naming); a process of it
//! is the PID SPIRE attests. A PID stays while it is still in the pod's
//! cgroup; when it leaves (a restarted container) another process of the
//! pod is taken. A pod without a uid, a cgroup or a process is not
//! subscribed for and is shown with the reason. The sandbox's `pause`
//! process is taken only when nothing else runs (SPIRE's k8s attestor
//! knows containers, not the sandbox).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use policy_bridge::DesiredState;
use svid_cache::{PodSubscription, PodTarget, PodTargets};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::tasks::{Stop, Tasks};
use crate::api::types::PodSvidStatus;
use crate::datapath_sync::pod_cgroups::{PodCgroups, pids_in};

/// How often the pods' processes are checked again without a policy change
/// (a restarted container has a new PID).
const RECHECK: Duration = Duration::from_secs(2);

/// The per-pod source's inputs and outputs.
#[derive(Debug, Clone)]
pub(super) struct PodSvids {
    /// The pods to subscribe for (`None` until the first policy sync).
    pub(super) targets: watch::Sender<Option<PodTargets>>,
    /// The source's subscriptions.
    pub(super) subscriptions: watch::Receiver<BTreeMap<String, PodSubscription>>,
    /// Pods of this node not subscribed for, and why.
    pub(super) unresolved: watch::Sender<BTreeMap<String, String>>,
}

impl PodSvids {
    /// What the status API shows: every pod of this node, subscribed or not.
    pub(super) fn status(&self) -> Vec<PodSvidStatus> {
        let subs = self.subscriptions.borrow();
        let mut out: Vec<PodSvidStatus> = subs
            .iter()
            .map(|(pod, s)| PodSvidStatus {
                pod: pod.clone(),
                pid: Some(s.pid),
                identity: Some(s.identity),
                state: if s.serves_identity {
                    "serving"
                } else if s.error.is_some() {
                    "failing"
                } else if s.answered {
                    "not_served"
                } else {
                    "waiting"
                }
                .to_owned(),
                ignored: s.ignored.clone(),
                error: s.error.clone(),
            })
            .collect();
        out.extend(
            self.unresolved
                .borrow()
                .iter()
                .map(|(pod, why)| PodSvidStatus {
                    pod: pod.clone(),
                    pid: None,
                    identity: None,
                    state: "unresolved".to_owned(),
                    ignored: Vec::new(),
                    error: Some(why.clone()),
                }),
        );
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        out
    }
}

/// Starts following the desired state and the pods' processes.
pub(super) fn spawn_tracker(
    tasks: &mut Tasks,
    pods: PodSvids,
    mut desired: watch::Receiver<Arc<DesiredState>>,
    node: String,
    cgroup: PathBuf,
    token: CancellationToken,
) {
    tasks.spawn("pod_svid_targets", Stop::Token, async move {
        let mut cgroups = PodCgroups::new(&cgroup);
        cgroups.rescan();
        loop {
            let d = desired.borrow_and_update().clone();
            let current = pods.targets.borrow().clone().unwrap_or_default();
            let (targets, unresolved) = resolve(&d, &node, &mut cgroups, &current, &cgroup);
            pods.targets.send_if_modified(|t| {
                if t.as_ref() == Some(&targets) {
                    return false;
                }
                tracing::debug!(pods = targets.len(), "pods to subscribe for changed");
                *t = Some(targets);
                true
            });
            pods.unresolved.send_if_modified(|u| {
                if *u == unresolved {
                    return false;
                }
                for (pod, why) in unresolved.iter().filter(|(p, _)| !u.contains_key(*p)) {
                    tracing::warn!(%pod, reason = %why, "no SVID subscription for this pod");
                }
                *u = unresolved;
                true
            });
            tokio::select! {
                () = token.cancelled() => return,
                r = desired.changed() => if r.is_err() { return },
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    });
}

/// The pods of `node` to subscribe for, and those that cannot be (why).
fn resolve(
    d: &DesiredState,
    node: &str,
    cgroups: &mut PodCgroups,
    current: &PodTargets,
    root: &Path,
) -> (PodTargets, BTreeMap<String, String>) {
    let mut by_pod: BTreeMap<&str, u32> = BTreeMap::new();
    for e in d.endpoints.values().filter(|e| e.node == node) {
        by_pod.insert(&e.pod, e.identity);
    }
    let mut targets = PodTargets::new();
    let mut unresolved = BTreeMap::new();
    let mut rescanned = false;
    for (pod, identity) in by_pod {
        let Some(uid) = d.pod_uids.get(pod) else {
            unresolved.insert(pod.to_owned(), "the pod has no metadata.uid".to_owned());
            continue;
        };
        if cgroups.path(uid).is_none() && !rescanned {
            cgroups.rescan();
            rescanned = true;
        }
        let Some(dir) = cgroups.path(uid) else {
            unresolved.insert(
                pod.to_owned(),
                format!("no cgroup for pod uid {uid} under {}", root.display()),
            );
            continue;
        };
        let pids = pids_in(dir);
        let pid = match current.get(pod) {
            Some(t) if t.identity == identity && pids.contains(&t.pid) => Some(t.pid),
            _ => pick(&pids),
        };
        match pid {
            Some(pid) => {
                targets.insert(pod.to_owned(), PodTarget { pid, identity });
            }
            None => {
                unresolved.insert(
                    pod.to_owned(),
                    format!("no process in its cgroup {}", dir.display()),
                );
            }
        }
    }
    (targets, unresolved)
}

/// The lowest PID that is not the sandbox's `pause`; `pause` only when it
/// is all there is.
fn pick(pids: &[u32]) -> Option<u32> {
    let is_pause = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "pause")
    };
    pids.iter()
        .copied()
        .find(|&p| !is_pause(p))
        .or_else(|| pids.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_bridge::Endpoint;

    fn state(pods: &[(&str, &str, u32, Option<&str>)]) -> DesiredState {
        let mut d = DesiredState::default();
        for (i, &(pod, node, identity, uid)) in pods.iter().enumerate() {
            let ip = std::net::IpAddr::from([10, 0, 0, u8::try_from(i + 2).unwrap()]);
            d.endpoints.insert(
                ip,
                Endpoint {
                    ip,
                    identity,
                    node: node.into(),
                    pod: pod.into(),
                },
            );
            if let Some(uid) = uid {
                d.pod_uids.insert(pod.into(), uid.into());
            }
        }
        d
    }

    #[test]
    fn pods_resolve_to_a_process_of_their_cgroup_or_say_why_not() {
        let root = tempfile::tempdir().unwrap();
        let (a, c, e) = (
            "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d",
            "0e1f2a3b-4c5d-4a7b-8c9d-1b2c3d4e5f60",
            "2e1f2a3b-4c5d-4a7b-8c9d-1b2c3d4e5f61",
        );
        let me = std::process::id();
        // Pod a: a container with this process and a higher PID.
        let a_dir = root.path().join("burstable").join(format!("pod{a}"));
        std::fs::create_dir_all(a_dir.join("ctr")).unwrap();
        std::fs::write(a_dir.join("cgroup.procs"), "").unwrap();
        std::fs::write(
            a_dir.join("ctr").join("cgroup.procs"),
            format!("{}\n{me}\n", me + 1),
        )
        .unwrap();
        // Pod e: a cgroup with no process.
        std::fs::create_dir_all(root.path().join(format!("pod{e}"))).unwrap();
        std::fs::write(root.path().join(format!("pod{e}")).join("cgroup.procs"), "").unwrap();
        let d = state(&[
            ("default/a", "n1", 256, Some(a)),
            ("default/b", "n1", 257, None),
            ("default/c", "n1", 258, Some(c)),
            ("default/e", "n1", 259, Some(e)),
            ("default/other-node", "n2", 260, Some(a)),
        ]);
        let mut cg = PodCgroups::new(root.path());
        let (t, u) = resolve(&d, "n1", &mut cg, &PodTargets::new(), root.path());
        assert_eq!(
            t,
            PodTargets::from([(
                "default/a".to_owned(),
                PodTarget {
                    pid: me,
                    identity: 256
                }
            )]),
            "the lowest PID of the pod; only this node's pods"
        );
        assert!(u["default/b"].contains("no metadata.uid"), "{u:?}");
        assert!(u["default/c"].contains("no cgroup for pod uid"), "{u:?}");
        assert!(u["default/e"].contains("no process"), "{u:?}");
        assert_eq!(u.len(), 3);

        // The PID subscribed with stays while it is in the pod, even when a
        // lower one appears; it is replaced once it leaves.
        let keep = PodTargets::from([(
            "default/a".to_owned(),
            PodTarget {
                pid: me + 1,
                identity: 256,
            },
        )]);
        let (t, _) = resolve(&d, "n1", &mut cg, &keep, root.path());
        assert_eq!(t["default/a"].pid, me + 1);
        std::fs::write(a_dir.join("ctr").join("cgroup.procs"), format!("{me}\n")).unwrap();
        let (t, _) = resolve(&d, "n1", &mut cg, &keep, root.path());
        assert_eq!(t["default/a"].pid, me);
    }

    #[test]
    fn the_sandbox_pause_process_is_the_last_choice() {
        assert_eq!(pick(&[]), None);
        let me = std::process::id();
        // A process whose command is `pause`, like a pod sandbox's (the
        // name is the executed path's, a symlink's: no copy to race with
        // other tests' forks into ETXTBSY).
        let dir = tempfile::tempdir().unwrap();
        let pause = dir.path().join("pause");
        std::os::unix::fs::symlink("/bin/sleep", &pause).unwrap();
        let mut child = std::process::Command::new(&pause)
            .arg("60")
            .spawn()
            .unwrap();
        let pause_pid = child.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pause_pid}/comm"))
            .map(|c| c.trim() != "pause")
            .unwrap_or(true)
        {
            assert!(std::time::Instant::now() < deadline, "pause never ran");
            std::thread::yield_now();
        }
        assert_eq!(pick(&[pause_pid, me]), Some(me), "pause skipped");
        assert_eq!(pick(&[pause_pid]), Some(pause_pid), "pause when alone");
        assert_eq!(pick(&[me, u32::MAX]), Some(me));
        let _ = child.kill();
        let _ = child.wait();
    }
}
