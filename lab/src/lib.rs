//! The lab: a small multi-node "cluster" in network namespaces, built from Rust alone
//! (no `ip`, `nsenter` or scripts): for `meshauth demo`, multi-node
//! integration tests and the latency bench. Needs root, network namespaces
//! and a cgroup v2 mount.
//!
//! # Topology (fixed, for a lab network number `net`, default 42)
//!
//! - One *fabric* namespace holding the bridge `br0`.
//! - Node *i* (1..=254): its own namespace, `eth0` on the bridge (veth, the
//!   fabric end is `n<i>`) with `10.<net>.0.<i>/24` and `fd00:<net>::<i>/64`
//!   (`<net>` as a hex group in IPv6), forwarding on, routes to every other
//!   node's pod CIDRs via that node's address.
//! - Pod *k* (2..=254) on node *i*: its own namespace, `eth0` paired with
//!   `p<k>` in the node namespace; the pod has `10.<net>.<i>.<k>/32` and
//!   `fd00:<net>:<i>::<k>/128`, default routes via `10.<net>.<i>.1` (on every
//!   `p<k>` of the node) and `fe80::1` (likewise). Pod CIDRs of node *i*:
//!   `10.<net>.<i>.0/24` and `fd00:<net>:<i>::/64`.
//! - Cgroups: `<cgroup2>/meshauth-lab-<prefix>-<uniq>/<node>` is the node's
//!   "kubepods" (a cgroup_skb program attached there covers all its pods),
//!   `.../<node>/<pod>` a pod, `.../<node>.host` the node's own processes
//!   (an agent), outside the pods' subtree.
//! - Namespaces are mounted at `/run/netns/<prefix>-<uniq>-{fabric,node-X,pod-X}`
//!   (visible to `ip netns` for debugging).
//!
//! Every namespace belongs to one lab, so two labs can use the same addresses.
//! Dropping the [`Lab`] kills every process in its cgroups and removes
//! everything, also on a panic; [`Lab::cleanup_stale`] removes what a killed
//! run left.

mod cgroup;
pub mod demo;
mod error;
pub mod exec;
pub mod forward;
pub mod kube_real;
mod netlink;
pub(crate) mod netns;
pub mod pod;
mod process;
pub mod spire_real;
mod stale;
pub mod testbed;
mod topology;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use error::LabError;
pub use process::{ConnectRetry, PodProcess, Proto, StreamStats};
pub use topology::{Cidr, NodeInfo, PodInfo, Target};

use cgroup::{kill_cgroup, remove_cgroup_tree};
use topology::{gateway_v4, gateway_v6, pod_routes};

use netlink::Via;

/// Lab settings.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The `<net>` of every address (see the module docs).
    pub net: u8,
    /// The `meshauth` binary that runs `lab-exec` and `lab-pod`; `None`:
    /// the current executable (tests pass `env!("CARGO_BIN_EXE_meshauth")`).
    pub meshauth_bin: Option<PathBuf>,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            net: 42,
            meshauth_bin: None,
        }
    }
}

#[derive(Debug)]
struct Node {
    info: NodeInfo,
    /// Index of `n<i>` in the fabric namespace.
    fabric_if: Option<u32>,
}

/// A cluster in network namespaces. Drop removes it.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    uniq: String,
    net: u8,
    bin: PathBuf,
    fabric: PathBuf,
    bridge: u32,
    cgroup_root: PathBuf,
    cgroup_mount: PathBuf,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<String, PodInfo>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn check_name(kind: &str, name: &str, max: usize) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "{kind} name {name:?}: want 1..={max} of [a-z0-9-], not starting with '-'"
        )))
    }
}

impl Lab {
    /// A lab with default options (see [`LabOptions`]). `prefix`: 1..=8 of
    /// `[a-z0-9]`, names its namespaces and cgroups.
    pub fn new(prefix: &str) -> Result<Self, LabError> {
        Self::with_options(prefix, LabOptions::default())
    }

    /// A lab: the fabric namespace with its bridge and the cgroup root.
    pub fn with_options(prefix: &str, opts: LabOptions) -> Result<Self, LabError> {
        if prefix.is_empty()
            || prefix.len() > 8
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(LabError::Invalid(format!(
                "lab prefix {prefix:?}: want 1..=8 of [a-z0-9]"
            )));
        }
        let bin = match opts.meshauth_bin {
            Some(b) => b,
            None => std::env::current_exe()
                .map_err(|e| LabError::sys("current_exe", "meshauth binary", e))?,
        };
        let uniq = format!(
            "{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mount = auth_ebpf::attach::cgroup2_mounts()
            .into_iter()
            .next()
            .ok_or_else(|| {
                LabError::NotFound("a cgroup v2 mount in /proc/self/mountinfo".into())
            })?;
        let cgroup_root = mount.join(format!("meshauth-lab-{prefix}-{uniq}"));
        std::fs::create_dir(&cgroup_root)
            .map_err(|e| LabError::io("creating cgroup", &cgroup_root, e))?;
        let mut lab = Self {
            prefix: prefix.to_string(),
            uniq,
            net: opts.net,
            bin,
            fabric: PathBuf::new(),
            bridge: 0,
            cgroup_root,
            cgroup_mount: mount,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
        };
        // From here on, Drop cleans up whatever was made.
        lab.fabric = netns::create(&lab.netns_name("fabric"))?;
        lab.bridge = netlink::in_ns(&lab.fabric, |h| async move {
            netlink::add_bridge(&h, "br0").await
        })?;
        Ok(lab)
    }

    fn netns_name(&self, role: &str) -> String {
        format!("{}-{}-{role}", self.prefix, self.uniq)
    }

    /// The lab's network number.
    pub fn net(&self) -> u8 {
        self.net
    }

    /// The fabric namespace (the bridge).
    pub fn fabric_netns(&self) -> &Path {
        &self.fabric
    }

    /// The lab's cgroup (parent of every node's cgroups).
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name).map(|n| &n.info)
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> Option<&PodInfo> {
        self.pods.get(name)
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values().map(|n| &n.info)
    }

    /// All pods, by name.
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    /// Adds a node (name: 1..=32 of `[a-z0-9-]`) with its namespace, its
    /// link to the bridge, its cgroups and the routes between it and every
    /// other node's pods.
    pub fn add_node(&mut self, name: &str) -> Result<NodeInfo, LabError> {
        check_name("node", name, 32)?;
        if self.nodes.contains_key(name) {
            return Err(LabError::Invalid(format!("node {name} exists already")));
        }
        let index = (1..=254u8)
            .find(|i| self.nodes.values().all(|n| n.info.index != *i))
            .ok_or_else(|| LabError::Invalid("254 nodes at most".into()))?;
        let (net, i) = (self.net, index);
        let pods_cgroup = self.cgroup_root.join(name);
        let host_cgroup = self.cgroup_root.join(format!("{name}.host"));
        let info = NodeInfo {
            name: name.to_string(),
            index,
            netns: PathBuf::new(),
            ipv4: Ipv4Addr::new(10, net, 0, i),
            ipv6: Ipv6Addr::new(0xfd00, net.into(), 0, 0, 0, 0, 0, i.into()),
            pod_cidr_v4: Cidr {
                addr: Ipv4Addr::new(10, net, i, 0).into(),
                prefix: 24,
            },
            pod_cidr_v6: Cidr {
                addr: Ipv6Addr::new(0xfd00, net.into(), i.into(), 0, 0, 0, 0, 0).into(),
                prefix: 64,
            },
            pods_cgroup,
            host_cgroup,
        };
        self.nodes.insert(
            name.to_string(),
            Node {
                info,
                fabric_if: None,
            },
        );
        match self.setup_node(name) {
            Ok(info) => Ok(info),
            Err(e) => {
                let _ = self.remove_node(name);
                Err(e)
            }
        }
    }

    fn setup_node(&mut self, name: &str) -> Result<NodeInfo, LabError> {
        let mut info = self.nodes[name].info.clone();
        for dir in [&info.pods_cgroup, &info.host_cgroup] {
            std::fs::create_dir(dir).map_err(|e| LabError::io("creating cgroup", dir, e))?;
        }
        info.netns = netns::create(&self.netns_name(&format!("node-{name}")))?;
        self.nodes.get_mut(name).expect("inserted").info.netns = info.netns.clone();
        netns::run_in(&info.netns, || {
            netns::sysctl("net/ipv4/ip_forward", "1")?;
            netns::sysctl("net/ipv6/conf/all/forwarding", "1")?;
            netns::sysctl("net/ipv6/conf/default/forwarding", "1")
        })?;
        let node_ns = std::fs::File::open(&info.netns)
            .map_err(|e| LabError::io("opening", &info.netns, e))?;
        let fabric_name = format!("n{}", info.index);
        let bridge = self.bridge;
        let fabric_if = netlink::in_ns(&self.fabric, |h| {
            let fd = node_ns.as_raw_fd();
            async move { netlink::add_veth(&h, &fabric_name, "eth0", fd, Some(bridge)).await }
        })?;
        self.nodes.get_mut(name).expect("inserted").fabric_if = Some(fabric_if);
        let others: Vec<NodeInfo> = self
            .nodes
            .values()
            .filter(|n| n.info.name != name)
            .map(|n| n.info.clone())
            .collect();
        let me = info.clone();
        let peers = others.clone();
        netlink::in_ns(&info.netns, |h| async move {
            let eth0 = netlink::ifindex(&h, "eth0").await?;
            netlink::link_up(&h, eth0).await?;
            netlink::add_addr(&h, eth0, me.ipv4.into(), 24).await?;
            netlink::add_addr(&h, eth0, me.ipv6.into(), 64).await?;
            for o in &peers {
                for (cidr, gw) in pod_routes(o) {
                    netlink::add_route(&h, cidr.addr, cidr.prefix, Via::Gateway(gw)).await?;
                }
            }
            Ok(())
        })?;
        for o in &others {
            let me = info.clone();
            netlink::in_ns(&o.netns, |h| async move {
                for (cidr, gw) in pod_routes(&me) {
                    netlink::add_route(&h, cidr.addr, cidr.prefix, Via::Gateway(gw)).await?;
                }
                Ok(())
            })?;
        }
        Ok(info)
    }

    /// Removes a node: kills its processes, removes its pods, its namespace,
    /// its cgroups and the routes other nodes had to its pods.
    pub fn remove_node(&mut self, name: &str) -> Result<(), LabError> {
        let Some(node) = self.nodes.get(name) else {
            return Err(LabError::NotFound(format!("node {name}")));
        };
        let info = node.info.clone();
        let fabric_if = node.fabric_if;
        let mut first_err = None;
        let pods: Vec<String> = self
            .pods
            .values()
            .filter(|p| p.node == name)
            .map(|p| p.name.clone())
            .collect();
        for p in pods {
            if let Err(e) = self.remove_pod(&p) {
                first_err.get_or_insert(e);
            }
        }
        for dir in [&info.host_cgroup, &info.pods_cgroup] {
            kill_cgroup(dir);
            remove_cgroup_tree(dir);
        }
        if fabric_if.is_some() {
            for o in self.nodes.values().filter(|n| n.info.name != name) {
                let me = info.clone();
                let r = netlink::in_ns(&o.info.netns, |h| async move {
                    for (cidr, gw) in pod_routes(&me) {
                        netlink::del_route(&h, cidr.addr, cidr.prefix, Via::Gateway(gw)).await?;
                    }
                    Ok(())
                });
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(idx) = fabric_if
            && let Err(e) =
                netlink::in_ns(
                    &self.fabric,
                    |h| async move { netlink::del_link(&h, idx).await },
                )
        {
            first_err.get_or_insert(e);
        }
        if !info.netns.as_os_str().is_empty() {
            netns::remove(&info.netns);
        }
        self.nodes.remove(name);
        first_err.map_or(Ok(()), Err)
    }

    /// Sets the uid `pod`'s processes run as from now on (`None`: root).
    pub fn set_run_as(&mut self, pod: &str, uid: Option<u32>) -> Result<(), LabError> {
        let p = self
            .pods
            .get_mut(pod)
            .ok_or_else(|| LabError::NotFound(format!("pod {pod}")))?;
        p.run_as = uid;
        Ok(())
    }

    /// Adds a pod (name: 1..=32 of `[a-z0-9-]`, unique in the lab) on a node.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<PodInfo, LabError> {
        self.add_pod_with_uid(node, name, None)
    }

    /// [`Self::add_pod`] with the pod's `metadata.uid` given (the one an API
    /// server assigned to its Pod object), which names its cgroup as
    /// kubelet would; `None`: one made up.
    pub fn add_pod_with_uid(
        &mut self,
        node: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<PodInfo, LabError> {
        check_name("pod", name, 32)?;
        if self.pods.contains_key(name) {
            return Err(LabError::Invalid(format!("pod {name} exists already")));
        }
        let n = self
            .nodes
            .get(node)
            .ok_or_else(|| LabError::NotFound(format!("node {node}")))?
            .info
            .clone();
        let index = (2..=254u8)
            .find(|k| self.pods.values().all(|p| p.node != node || p.index != *k))
            .ok_or_else(|| LabError::Invalid(format!("node {node}: 253 pods at most")))?;
        let (net, i, k) = (self.net, n.index, index);
        let uid = uid.map_or_else(|| pod_uid(&self.uniq, name), str::to_owned);
        let info = PodInfo {
            name: name.to_string(),
            node: node.to_string(),
            index,
            netns: PathBuf::new(),
            ipv4: Ipv4Addr::new(10, net, i, k),
            ipv6: Ipv6Addr::new(0xfd00, net.into(), i.into(), 0, 0, 0, 0, k.into()),
            cgroup: n.pods_cgroup.join(format!("pod{uid}")),
            uid,
            host_veth: format!("p{k}"),
            run_as: None,
        };
        self.pods.insert(name.to_string(), info);
        match self.setup_pod(&n, name) {
            Ok(info) => Ok(info),
            Err(e) => {
                let _ = self.remove_pod(name);
                Err(e)
            }
        }
    }

    fn setup_pod(&mut self, node: &NodeInfo, name: &str) -> Result<PodInfo, LabError> {
        let mut info = self.pods[name].clone();
        std::fs::create_dir(&info.cgroup)
            .map_err(|e| LabError::io("creating cgroup", &info.cgroup, e))?;
        info.netns = netns::create(&self.netns_name(&format!("pod-{name}")))?;
        self.pods.get_mut(name).expect("inserted").netns = info.netns.clone();
        let gw4 = gateway_v4(node);
        let gw6 = gateway_v6();
        let pod_ns = std::fs::File::open(&info.netns)
            .map_err(|e| LabError::io("opening", &info.netns, e))?;
        let p = info.clone();
        netlink::in_ns(&node.netns, |h| {
            let fd = pod_ns.as_raw_fd();
            async move {
                let idx = netlink::add_veth(&h, &p.host_veth, "eth0", fd, None).await?;
                netlink::add_addr(&h, idx, gw4.into(), 32).await?;
                netlink::add_addr(&h, idx, gw6.into(), 64).await?;
                netlink::add_route(&h, p.ipv4.into(), 32, Via::Dev(idx)).await?;
                netlink::add_route(&h, p.ipv6.into(), 128, Via::Dev(idx)).await
            }
        })?;
        let p = info.clone();
        netlink::in_ns(&info.netns, |h| async move {
            let eth0 = netlink::ifindex(&h, "eth0").await?;
            netlink::link_up(&h, eth0).await?;
            netlink::add_addr(&h, eth0, p.ipv4.into(), 32).await?;
            netlink::add_addr(&h, eth0, p.ipv6.into(), 128).await?;
            netlink::add_route(&h, gw4.into(), 32, Via::Dev(eth0)).await?;
            netlink::add_route(&h, netlink::ANY_V4, 0, Via::Gateway(gw4.into())).await?;
            netlink::add_route(&h, netlink::ANY_V6, 0, Via::GatewayDev(gw6.into(), eth0)).await
        })?;
        Ok(info)
    }

    /// Removes a pod: kills its processes, removes its cgroup, its veth and
    /// its namespace.
    pub fn remove_pod(&mut self, name: &str) -> Result<(), LabError> {
        let Some(info) = self.pods.remove(name) else {
            return Err(LabError::NotFound(format!("pod {name}")));
        };
        kill_cgroup(&info.cgroup);
        remove_cgroup_tree(&info.cgroup);
        let mut result = Ok(());
        if let Some(node) = self.nodes.get(&info.node)
            && !node.info.netns.as_os_str().is_empty()
            && !info.netns.as_os_str().is_empty()
        {
            let veth = info.host_veth.clone();
            result = netlink::in_ns(&node.info.netns, |h| async move {
                match netlink::ifindex(&h, &veth).await {
                    Ok(idx) => netlink::del_link(&h, idx).await,
                    Err(LabError::NotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            });
        }
        if !info.netns.as_os_str().is_empty() {
            netns::remove(&info.netns);
        }
        result
    }

    /// A command that runs `program` inside `target` (its cgroup first, then
    /// its namespace) through `meshauth lab-exec`; add arguments, stdio and
    /// environment as usual. Its processes are killed when the lab (or the
    /// node or pod) is removed.
    pub fn command<'a>(
        &self,
        target: impl Into<Target<'a>>,
        program: impl AsRef<OsStr>,
    ) -> Command {
        let (netns, cgroup, run_as) = match target.into() {
            Target::Node(n) => (&n.netns, &n.host_cgroup, None),
            Target::Pod(p) => (
                &p.netns,
                &p.cgroup,
                self.pods.get(&p.name).map_or(p.run_as, |q| q.run_as),
            ),
        };
        let mut cmd = Command::new(&self.bin);
        cmd.arg("lab-exec")
            .arg("--netns")
            .arg(netns)
            .arg("--cgroup")
            .arg(cgroup);
        if let Some(uid) = run_as {
            cmd.arg("--uid").arg(uid.to_string());
        }
        cmd.arg("--").arg(program);
        cmd
    }

    /// The `meshauth` binary the lab runs.
    pub fn meshauth_bin(&self) -> &Path {
        &self.bin
    }

    /// Spawns `program args…` inside `target`, stdin closed, stdout and
    /// stderr inherited (use [`Self::command`] for more control); returns
    /// once the process is in the target's cgroup.
    pub fn spawn<'a, I, S>(
        &self,
        target: impl Into<Target<'a>>,
        program: impl AsRef<OsStr>,
        args: I,
    ) -> Result<Child, LabError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let target = target.into();
        let cgroup = match target {
            Target::Node(n) => &n.host_cgroup,
            Target::Pod(p) => &p.cgroup,
        };
        let mut cmd = self.command(target, program);
        cmd.args(args).stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| LabError::sys("spawn", format!("{cmd:?}"), e))?;
        // Return once the process is in its cgroup, so that a kill of the
        // cgroup right after cannot miss it.
        let want = format!(
            "0::/{}",
            cgroup
                .strip_prefix(&self.cgroup_mount)
                .unwrap_or(cgroup)
                .display()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now =
                std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap_or_default();
            if now.lines().any(|l| l == want) {
                return Ok(child);
            }
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Invalid(format!(
                    "{cmd:?} did not join cgroup {} (its cgroups: {})",
                    cgroup.display(),
                    now.trim().replace('\n', ", ")
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts the `lab-pod` workload in a pod.
    pub fn start_pod_process(&self, pod: &PodInfo) -> Result<PodProcess, LabError> {
        self.start_workload(pod.into(), &pod.name)
    }

    /// Starts the `lab-pod` workload on a node itself (its namespace and
    /// host cgroup, outside the pods' cgroup): traffic from the node.
    pub fn start_node_process(&self, node: &NodeInfo) -> Result<PodProcess, LabError> {
        self.start_workload(node.into(), &format!("node {}", node.name))
    }

    fn start_workload(&self, target: Target<'_>, label: &str) -> Result<PodProcess, LabError> {
        let mut cmd = self.command(target, &self.bin);
        cmd.arg("lab-pod");
        PodProcess::spawn(label, cmd)
    }

    /// Removes everything; what [`Drop`] does. Idempotent, and it needs no
    /// netlink: processes die with the cgroups, links with the namespaces.
    pub fn teardown(&mut self) {
        kill_cgroup(&self.cgroup_root);
        for p in std::mem::take(&mut self.pods).into_values() {
            if !p.netns.as_os_str().is_empty() {
                netns::remove(&p.netns);
            }
        }
        for n in std::mem::take(&mut self.nodes).into_values() {
            if !n.info.netns.as_os_str().is_empty() {
                netns::remove(&n.info.netns);
            }
        }
        if !self.fabric.as_os_str().is_empty() {
            netns::remove(&self.fabric);
            self.fabric = PathBuf::new();
        }
        remove_cgroup_tree(&self.cgroup_root);
    }

    /// Removes what earlier runs with this prefix left behind (killed before
    /// they could drop their lab): namespaces `/run/netns/<prefix>-<pid>x<n>-*`
    /// and cgroups `meshauth-lab-<prefix>-<pid>x<n>` whose process is gone
    /// (or is this one: a lab it leaked). Prefixes must not be shared by
    /// labs of live processes.
    /// Returns what it removed.
    pub fn cleanup_stale(prefix: &str) -> Vec<PathBuf> {
        stale::cleanup_stale(prefix)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A UUID-shaped uid for pod `name` of the lab `uniq` (kubelet-style cgroup
/// names need hex digits and dashes).
fn pod_uid(uniq: &str, name: &str) -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(uniq.as_bytes());
    h.write(name.as_bytes());
    let a = h.finish();
    h.write_u8(0xff);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}
