//! The kernel side: the WireGuard device through generic netlink
//! (`netlink-packet-wireguard` over `genetlink`), the link, its routes and
//! the routing rule through rtnetlink. No `wg` or `ip` is run.
//!
//! Routes for remote pods live in a table of the agent's own
//! ([`ROUTE_TABLE`]), looked up by one rule per family
//! ([`RULE_PRIORITY`], before `main`): routes the CNI keeps in `main` are
//! never touched, an address the table lacks falls through to `main`, and
//! turning WireGuard off is deleting the rule, the table's routes and the
//! link.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::{StreamExt as _, TryStreamExt as _};
use genetlink::GenetlinkHandle;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use policy_bridge::IpPrefix;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::route::{RouteAttribute, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{LinkUnspec, LinkWireguard, RouteMessageBuilder};

use super::key::{PrivateKey, PublicKey};
use super::plan::{PeerState, Step};

/// The routing table holding the routes through the interface.
pub const ROUTE_TABLE: u32 = 51871;
/// The priority of the rule that looks the table up (before `main`, 32766).
pub const RULE_PRIORITY: u32 = 1871;
/// WireGuard's overhead on the underlay (IPv6 outer header 40 + UDP 8 +
/// WireGuard 32): the interface's MTU is the underlay's minus this.
pub const OVERHEAD: u32 = 80;
/// The keepalive interval a new peer is created with, for one message: a
/// keepalive is sent (and a handshake started) the moment it is set.
pub const KICK_KEEPALIVE: u16 = 25;
/// Netlink messages are cut before this size (the kernel takes far more;
/// `wg` itself stays near a page).
const MAX_MESSAGE: usize = 32 * 1024;

/// Kernel errors, each naming the call and what it was about.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel has no WireGuard.
    #[error(
        "the kernel has no WireGuard ({call}: {source}); load the module (`modprobe wireguard`, package linux-modules-extra on some distributions) or use a kernel built with CONFIG_WIREGUARD (5.6 or later), or set wireguard: false"
    )]
    Unsupported {
        /// The call that showed it.
        call: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A netlink socket could not be opened.
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    /// A netlink request failed.
    #[error("{call} {what}: {source}")]
    Request {
        /// The operation.
        call: &'static str,
        /// What it was about.
        what: String,
        /// The OS error (from the kernel's answer).
        source: std::io::Error,
    },
    /// A link with the interface's name exists but is not WireGuard.
    #[error(
        "link {name} exists and is a {kind}, not WireGuard; remove it or pick another interface name"
    )]
    NotWireGuard {
        /// The name.
        name: String,
        /// What it is.
        kind: String,
    },
}

fn rt_err(call: &'static str, what: impl ToString) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let what = what.to_string();
    move |e| KernelError::Request {
        call,
        what,
        source: match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io(),
            other => std::io::Error::other(other.to_string()),
        },
    }
}

fn errno(e: &KernelError) -> Option<i32> {
    match e {
        KernelError::Request { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// A peer as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDump {
    /// Endpoint and AllowedIPs.
    pub state: PeerState,
    /// The last completed WireGuard handshake, if any.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// The device as the kernel reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceDump {
    /// Its public key (none before a private key is set).
    pub public_key: Option<PublicKey>,
    /// Its UDP port.
    pub listen_port: u16,
    /// Its peers.
    pub peers: BTreeMap<PublicKey, PeerDump>,
}

/// Netlink handles for one interface, with a count of the messages sent
/// (the benchmark's "netlink messages").
#[derive(Debug, Clone)]
pub struct Kernel {
    genl: GenetlinkHandle,
    rt: rtnetlink::Handle,
    name: String,
    sent: Arc<AtomicU64>,
}

impl Kernel {
    /// Opens the two netlink sockets (their connections run as tasks on the
    /// current runtime) for the interface `name`.
    pub fn connect(name: &str) -> Result<Self, KernelError> {
        let (gconn, genl, _) = genetlink::new_connection().map_err(KernelError::Socket)?;
        tokio::spawn(gconn);
        let (rconn, rt, _) = rtnetlink::new_connection().map_err(KernelError::Socket)?;
        tokio::spawn(rconn);
        Ok(Self {
            genl,
            rt,
            name: name.to_owned(),
            sent: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Netlink messages sent so far.
    pub fn messages_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the kernel knows the `wireguard` generic netlink family (it
    /// may load the module to answer). `Err(Unsupported)` when it does not.
    pub async fn check_support(&self) -> Result<(), KernelError> {
        match self.genl.resolve_family::<WireguardMessage>().await {
            Ok(_) => Ok(()),
            Err(genetlink::GenetlinkError::NetlinkError(e)) => Err(KernelError::Unsupported {
                call: "resolving the wireguard generic netlink family",
                source: e,
            }),
            Err(e) => Err(KernelError::Request {
                call: "resolving",
                what: "the wireguard generic netlink family".into(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// The interface's index and kind, if it exists.
    async fn link(&self) -> Result<Option<(u32, Option<InfoKind>, u32)>, KernelError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let r = self
            .rt
            .link()
            .get()
            .match_name(self.name.clone())
            .execute()
            .try_next()
            .await;
        let msg = match r {
            Ok(m) => m,
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => None,
            Err(e) => return Err(rt_err("getting link", &self.name)(e)),
        };
        Ok(msg.map(|m| {
            let mut kind = None;
            let mut mtu = 0;
            for a in &m.attributes {
                match a {
                    LinkAttribute::LinkInfo(infos) => {
                        for i in infos {
                            if let LinkInfo::Kind(k) = i {
                                kind = Some(k.clone());
                            }
                        }
                    }
                    LinkAttribute::Mtu(v) => mtu = *v,
                    _ => {}
                }
            }
            (m.header.index, kind, mtu)
        }))
    }

    /// Creates the interface if it is missing (an existing one is kept with
    /// its peers: a restarted agent does not interrupt traffic), sets its
    /// MTU and brings it up. Returns its index.
    pub async fn ensure_link(&self, mtu: u32) -> Result<u32, KernelError> {
        let index = match self.link().await? {
            Some((index, Some(InfoKind::Wireguard), _)) => index,
            Some((_, kind, _)) => {
                return Err(KernelError::NotWireGuard {
                    name: self.name.clone(),
                    kind: kind.map_or_else(|| "link of unknown kind".into(), |k| format!("{k:?}")),
                });
            }
            None => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                match self
                    .rt
                    .link()
                    .add(LinkWireguard::new(&self.name).build())
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EOPNOTSUPP => {
                        return Err(KernelError::Unsupported {
                            call: "creating a wireguard link",
                            source: e.to_io(),
                        });
                    }
                    Err(e) => return Err(rt_err("creating link", &self.name)(e)),
                }
                match self.link().await? {
                    Some((index, _, _)) => index,
                    None => {
                        return Err(KernelError::Request {
                            call: "creating link",
                            what: self.name.clone(),
                            source: std::io::Error::from_raw_os_error(libc::ENODEV),
                        });
                    }
                }
            }
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.rt
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(rt_err("setting mtu and up on", &self.name))?;
        Ok(index)
    }

    /// The interface's index, if it exists and is WireGuard.
    pub async fn index(&self) -> Result<Option<u32>, KernelError> {
        Ok(match self.link().await? {
            Some((i, Some(InfoKind::Wireguard), _)) => Some(i),
            _ => None,
        })
    }

    /// The MTU of the link that holds `addr` (the underlay); `None` if no
    /// link holds it.
    pub async fn mtu_of_link_with(&self, addr: IpAddr) -> Result<Option<u32>, KernelError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        self.sent.fetch_add(1, Ordering::Relaxed);
        let mut addrs = self.rt.address().get().execute();
        let mut index = None;
        while let Some(m) = addrs
            .try_next()
            .await
            .map_err(rt_err("listing addresses", "all links"))?
        {
            if m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(x) if *x == addr))
            {
                index = Some(m.header.index);
            }
        }
        let Some(index) = index else { return Ok(None) };
        self.sent.fetch_add(1, Ordering::Relaxed);
        let link = self
            .rt
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(rt_err("getting link", index))?;
        Ok(link.and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(v) => Some(*v),
                _ => None,
            })
        }))
    }

    /// Deletes the interface (and with it its peers and routes); `false`
    /// if there was none.
    pub async fn delete_link(&self) -> Result<bool, KernelError> {
        let Some(index) = self.index().await? else {
            return Ok(false);
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.rt
            .link()
            .del(index)
            .execute()
            .await
            .map_err(rt_err("deleting link", &self.name))?;
        Ok(true)
    }

    async fn genl(
        &self,
        call: &'static str,
        attributes: Vec<WireguardAttribute>,
        dump: bool,
    ) -> Result<Vec<WireguardMessage>, KernelError> {
        let genl = GenlMessage::from_payload(WireguardMessage {
            cmd: if dump {
                WireguardCmd::GetDevice
            } else {
                WireguardCmd::SetDevice
            },
            attributes,
        });
        let mut msg = NetlinkMessage::from(genl);
        msg.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        msg.finalize();
        self.sent.fetch_add(1, Ordering::Relaxed);
        let mut handle = self.genl.clone();
        let mut stream = handle.request(msg).await.map_err(|e| match e {
            genetlink::GenetlinkError::NetlinkError(source) => KernelError::Unsupported {
                call: "resolving the wireguard generic netlink family",
                source,
            },
            other => KernelError::Request {
                call,
                what: self.name.clone(),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        let mut out = Vec::new();
        while let Some(r) = stream.next().await {
            let m = r.map_err(|e| KernelError::Request {
                call,
                what: self.name.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
            match m.payload {
                NetlinkPayload::InnerMessage(g) => out.push(g.payload),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(KernelError::Request {
                        call,
                        what: self.name.clone(),
                        source: e.to_io(),
                    });
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The device: its key, port and peers (with handshake times and byte
    /// counts). A peer whose AllowedIPs span several messages is merged.
    pub async fn device(&self) -> Result<DeviceDump, KernelError> {
        let msgs = self
            .genl(
                "getting device",
                vec![WireguardAttribute::IfName(self.name.clone())],
                true,
            )
            .await?;
        let mut out = DeviceDump::default();
        for m in msgs {
            for a in m.attributes {
                match a {
                    WireguardAttribute::PublicKey(k) if k != [0; 32] => {
                        out.public_key = Some(PublicKey(k));
                    }
                    WireguardAttribute::ListenPort(p) => out.listen_port = p,
                    WireguardAttribute::Peers(peers) => {
                        for p in peers {
                            merge_peer(&mut out.peers, p);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Sets the device's private key and UDP port (the kernel ignores a
    /// value it already has).
    pub async fn configure(&self, key: &PrivateKey, port: u16) -> Result<(), KernelError> {
        self.genl(
            "setting key and port on",
            vec![
                WireguardAttribute::IfName(self.name.clone()),
                WireguardAttribute::PrivateKey(key.to_bytes()),
                WireguardAttribute::ListenPort(port),
            ],
            false,
        )
        .await
        .map(drop)
    }

    /// Applies a plan's steps in order: each run of peer steps as few
    /// messages as fit ([`Self::apply_peers`]), each run of route steps
    /// pipelined (up to 64 requests outstanding; their order within the run
    /// does not matter). Returns how many steps were applied before an
    /// error, with the error.
    pub async fn apply(
        &self,
        steps: &[Step],
        index: u32,
        throwaway: &PublicKey,
    ) -> Result<(), (usize, KernelError)> {
        use futures::stream::{self, StreamExt as _};
        let is_route = |s: &Step| matches!(s, Step::AddRoute(_) | Step::DelRoute(_));
        let mut i = 0;
        while i < steps.len() {
            let route = is_route(&steps[i]);
            let run: Vec<&Step> = steps[i..]
                .iter()
                .take_while(|s| is_route(s) == route)
                .collect();
            if route {
                let mut requests: Vec<futures::future::BoxFuture<'_, Result<(), KernelError>>> =
                    Vec::with_capacity(run.len());
                for s in &run {
                    match s {
                        Step::AddRoute(p) => requests.push(Box::pin(self.add_route(p, index))),
                        Step::DelRoute(p) => requests.push(Box::pin(self.del_route(p))),
                        _ => {}
                    }
                }
                let results: Vec<Result<(), KernelError>> =
                    stream::iter(requests).buffered(64).collect().await;
                if let Some(pos) = results.iter().position(Result::is_err) {
                    let e = results.into_iter().nth(pos).and_then(Result::err);
                    return Err((
                        i + pos,
                        e.unwrap_or_else(|| KernelError::Socket(std::io::Error::other("route"))),
                    ));
                }
            } else {
                self.apply_peers(&run, throwaway)
                    .await
                    .map_err(|e| (i, e))?;
            }
            i += run.len();
        }
        Ok(())
    }

    /// Applies the peer steps of a plan (upserts, releases, removals), as
    /// few messages as fit, in order. `throwaway` is the key of the
    /// temporary peer releases go through. Route steps are skipped (see
    /// [`Self::add_route`]).
    pub async fn apply_peers(
        &self,
        steps: &[&Step],
        throwaway: &PublicKey,
    ) -> Result<(), KernelError> {
        let mut batch: Vec<WireguardPeer> = Vec::new();
        let mut size = 0;
        let created: Vec<PublicKey> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Upsert {
                    key, created: true, ..
                } => Some(*key),
                _ => None,
            })
            .collect();
        for step in steps {
            let peers = peer_messages(step, throwaway);
            for p in peers {
                let len = netlink_packet_core::Emitable::buffer_len(&p);
                if size + len > MAX_MESSAGE && !batch.is_empty() {
                    self.send_peers(std::mem::take(&mut batch)).await?;
                    size = 0;
                }
                size += len;
                batch.push(p);
            }
        }
        if !batch.is_empty() {
            self.send_peers(batch).await?;
        }
        self.unkick(created).await
    }

    /// After a batch that created peers: their keepalive back to off. The
    /// kick ([`KICK_KEEPALIVE`]) made each send a keepalive at once, which
    /// starts a WireGuard handshake: a new peer (a node joining, or one
    /// whose key rotated) carries traffic at once instead of after the
    /// other side's handshake retry (5 s).
    async fn unkick(&self, created: Vec<PublicKey>) -> Result<(), KernelError> {
        if created.is_empty() {
            return Ok(());
        }
        self.send_peers(
            created
                .into_iter()
                .map(|k| {
                    WireguardPeer(vec![
                        WireguardPeerAttribute::PublicKey(k.0),
                        WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly),
                        WireguardPeerAttribute::PersistentKeepalive(0),
                    ])
                })
                .collect(),
        )
        .await
    }

    async fn send_peers(&self, peers: Vec<WireguardPeer>) -> Result<(), KernelError> {
        self.genl(
            "setting peers on",
            vec![
                WireguardAttribute::IfName(self.name.clone()),
                WireguardAttribute::Peers(peers),
            ],
            false,
        )
        .await
        .map(drop)
    }

    /// The prefixes routed in [`ROUTE_TABLE`].
    pub async fn routes(&self) -> Result<BTreeSet<IpPrefix>, KernelError> {
        let mut out = BTreeSet::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(ROUTE_TABLE)
                .build(),
            RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(ROUTE_TABLE)
                .build(),
        ] {
            self.sent.fetch_add(1, Ordering::Relaxed);
            let mut s = self.rt.route().get(msg).execute();
            while let Some(r) = s
                .try_next()
                .await
                .map_err(rt_err("listing routes", "table 51871"))?
            {
                let table = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(r.header.table));
                if table != ROUTE_TABLE {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(d) => route_addr(d),
                    _ => None,
                });
                let dst = dst.unwrap_or(if r.header.address_family == AddressFamily::Inet6 {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                });
                if let Some(p) = IpPrefix::new(dst, r.header.destination_prefix_length) {
                    out.insert(p);
                }
            }
        }
        Ok(out)
    }

    fn route_message(
        prefix: &IpPrefix,
        index: u32,
    ) -> rtnetlink::packet_route::route::RouteMessage {
        match prefix.addr() {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, prefix.prefix_len())
                .output_interface(index)
                .table_id(ROUTE_TABLE)
                .scope(RouteScope::Link)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, prefix.prefix_len())
                .output_interface(index)
                .table_id(ROUTE_TABLE)
                .scope(RouteScope::Link)
                .build(),
        }
    }

    /// Routes `prefix` through the interface (`index`) in [`ROUTE_TABLE`];
    /// an existing route is replaced.
    pub async fn add_route(&self, prefix: &IpPrefix, index: u32) -> Result<(), KernelError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.rt
            .route()
            .add(Self::route_message(prefix, index))
            .replace()
            .execute()
            .await
            .map_err(rt_err("adding route", prefix))
    }

    /// Removes the route for `prefix` from [`ROUTE_TABLE`] (gone already is
    /// not an error).
    pub async fn del_route(&self, prefix: &IpPrefix) -> Result<(), KernelError> {
        let mut msg = Self::route_message(prefix, 0);
        msg.attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        self.sent.fetch_add(1, Ordering::Relaxed);
        match self.rt.route().del(msg).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            r => r.map_err(rt_err("deleting route", prefix)),
        }
    }

    /// The agent's rules (priority [`RULE_PRIORITY`], table
    /// [`ROUTE_TABLE`]) present, per family: (IPv4, IPv6).
    pub async fn rules(&self) -> Result<(usize, usize), KernelError> {
        let mut found = (0, 0);
        for v6 in [false, true] {
            let version = if v6 {
                rtnetlink::IpVersion::V6
            } else {
                rtnetlink::IpVersion::V4
            };
            self.sent.fetch_add(1, Ordering::Relaxed);
            let mut s = self.rt.rule().get(version).execute();
            while let Some(r) = s.try_next().await.map_err(rt_err("listing rules", "all"))? {
                let ours = is_ours(&r);
                if ours {
                    if v6 {
                        found.1 += 1;
                    } else {
                        found.0 += 1;
                    }
                }
            }
        }
        Ok(found)
    }

    /// Adds the rules that look up [`ROUTE_TABLE`] if they are missing.
    pub async fn ensure_rules(&self) -> Result<(), KernelError> {
        let (v4, v6) = self.rules().await?;
        for (present, family, what) in [
            (v4, AddressFamily::Inet, "IPv4 lookup 51871"),
            (v6, AddressFamily::Inet6, "IPv6 lookup 51871"),
        ] {
            if present > 0 {
                continue;
            }
            let mut req = self
                .rt
                .rule()
                .add()
                .table_id(ROUTE_TABLE)
                .priority(RULE_PRIORITY)
                .action(RuleAction::ToTable);
            req.message_mut().header.family = family;
            self.sent.fetch_add(1, Ordering::Relaxed);
            req.execute().await.map_err(rt_err("adding rule", what))?;
        }
        Ok(())
    }

    /// Deletes every rule of the agent's and every route in its table.
    pub async fn delete_rules_and_routes(&self) -> Result<(), KernelError> {
        for p in self.routes().await? {
            self.del_route(&p).await?;
        }
        for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            self.sent.fetch_add(1, Ordering::Relaxed);
            let rules: Vec<_> = self
                .rt
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(rt_err("listing rules", "all"))?;
            for r in rules {
                let ours = is_ours(&r);
                if ours {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    self.rt
                        .rule()
                        .del(r)
                        .execute()
                        .await
                        .map_err(rt_err("deleting rule", "lookup 51871"))?;
                }
            }
        }
        Ok(())
    }
}

/// Whether a rule is the agent's (its priority and table).
fn is_ours(r: &rtnetlink::packet_route::rule::RuleMessage) -> bool {
    r.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == RULE_PRIORITY))
        && r.attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Table(t) if *t == ROUTE_TABLE))
}

/// Whether a kernel error says the object was already there.
pub fn is_exists(e: &KernelError) -> bool {
    errno(e) == Some(libc::EEXIST)
}

fn route_addr(d: &rtnetlink::packet_route::route::RouteAddress) -> Option<IpAddr> {
    use rtnetlink::packet_route::route::RouteAddress;
    match d {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn allowed_ip(p: &IpPrefix) -> WireguardAllowedIp {
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(if p.addr().is_ipv4() {
            WireguardAddressFamily::Ipv4
        } else {
            WireguardAddressFamily::Ipv6
        }),
        WireguardAllowedIpAttr::IpAddr(p.addr()),
        WireguardAllowedIpAttr::Cidr(p.prefix_len()),
    ])
}

/// The netlink peer entries for one step (none for route steps).
pub fn peer_messages(step: &Step, throwaway: &PublicKey) -> Vec<WireguardPeer> {
    match step {
        Step::Upsert {
            key,
            endpoint,
            add,
            created,
        } => {
            let mut attrs = vec![WireguardPeerAttribute::PublicKey(key.0)];
            if let Some(e) = endpoint {
                attrs.push(WireguardPeerAttribute::Endpoint(*e));
            }
            if *created {
                attrs.push(WireguardPeerAttribute::PersistentKeepalive(KICK_KEEPALIVE));
            }
            if !add.is_empty() {
                attrs.push(WireguardPeerAttribute::AllowedIps(
                    add.iter().map(allowed_ip).collect(),
                ));
            }
            vec![WireguardPeer(attrs)]
        }
        Step::Release(ps) => vec![
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(throwaway.0),
                WireguardPeerAttribute::AllowedIps(ps.iter().map(allowed_ip).collect()),
            ]),
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(throwaway.0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]),
        ],
        Step::Remove(k) => vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(k.0),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ])],
        Step::AddRoute(_) | Step::DelRoute(_) => Vec::new(),
    }
}

fn merge_peer(peers: &mut BTreeMap<PublicKey, PeerDump>, p: WireguardPeer) {
    let mut key = None;
    let mut dump = PeerDump {
        state: PeerState::default(),
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
    };
    for a in p.0 {
        match a {
            WireguardPeerAttribute::PublicKey(k) => key = Some(PublicKey(k)),
            WireguardPeerAttribute::Endpoint(e) => dump.state.endpoint = Some(e),
            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 || t.nano_seconds > 0 => {
                dump.last_handshake = Some(
                    SystemTime::UNIX_EPOCH
                        + Duration::new(
                            t.seconds.max(0) as u64,
                            t.nano_seconds.clamp(0, 999_999_999) as u32,
                        ),
                );
            }
            WireguardPeerAttribute::RxBytes(b) => dump.rx_bytes = b,
            WireguardPeerAttribute::TxBytes(b) => dump.tx_bytes = b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let mut addr = None;
                    let mut cidr = None;
                    for x in ip.0 {
                        match x {
                            WireguardAllowedIpAttr::IpAddr(a) => addr = Some(a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                            _ => {}
                        }
                    }
                    if let Some(p) = addr.zip(cidr).and_then(|(a, c)| IpPrefix::new(a, c)) {
                        dump.state.allowed.insert(p);
                    }
                }
            }
            _ => {}
        }
    }
    let Some(key) = key else { return };
    match peers.get_mut(&key) {
        // The same peer continued in the next message of the dump.
        Some(have) => have.state.allowed.extend(dump.state.allowed),
        None => {
            peers.insert(key, dump);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    #[test]
    fn a_release_adds_to_the_throwaway_peer_then_removes_it_and_never_sets_replace() {
        let t = PublicKey([7; 32]);
        let msgs = peer_messages(&Step::Release(vec![p("10.1.0.0/24"), p("fd00::5/128")]), &t);
        assert_eq!(msgs.len(), 2);
        assert!(
            msgs[0]
                .0
                .contains(&WireguardPeerAttribute::PublicKey([7; 32]))
        );
        assert!(matches!(&msgs[0].0[1], WireguardPeerAttribute::AllowedIps(v) if v.len() == 2));
        assert_eq!(
            msgs[1].0[1],
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)
        );
        let up = peer_messages(
            &Step::Upsert {
                key: PublicKey([1; 32]),
                created: true,
                endpoint: Some("10.0.0.2:51871".parse().unwrap()),
                add: vec![p("10.0.0.2/32")],
            },
            &t,
        );
        for m in msgs.iter().chain(&up) {
            for a in &m.0 {
                if let WireguardPeerAttribute::Flags(f) = a {
                    assert!(!f.contains(WireguardPeerFlags::ReplaceAllowedIps), "{m:?}");
                }
            }
        }
        assert!(peer_messages(&Step::AddRoute(p("10.1.0.0/24")), &t).is_empty());
    }

    #[test]
    fn a_peer_continued_across_dump_messages_is_merged() {
        let mut peers = BTreeMap::new();
        let k = [3; 32];
        merge_peer(
            &mut peers,
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(k),
                WireguardPeerAttribute::Endpoint("10.0.0.3:51871".parse().unwrap()),
                WireguardPeerAttribute::RxBytes(10),
                WireguardPeerAttribute::AllowedIps(vec![allowed_ip(&p("10.0.0.3/32"))]),
            ]),
        );
        merge_peer(
            &mut peers,
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(k),
                WireguardPeerAttribute::AllowedIps(vec![allowed_ip(&p("10.42.3.0/24"))]),
            ]),
        );
        let d = &peers[&PublicKey(k)];
        assert_eq!(
            d.state.allowed,
            [p("10.0.0.3/32"), p("10.42.3.0/24")].into()
        );
        assert_eq!(d.rx_bytes, 10);
        assert_eq!(d.state.endpoint, Some("10.0.0.3:51871".parse().unwrap()));
    }
}
