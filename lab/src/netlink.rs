//! The few rtnetlink operations the lab needs. Each runs on a thread that
//! entered the target namespace, so its netlink socket belongs there.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::path::Path;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use super::LabError;

/// Runs `f` with a netlink handle whose socket lives in the namespace at
/// `ns` (on a fresh thread with its own small runtime, so this can be called
/// from anywhere, also from inside another runtime).
pub fn in_ns<T, F, Fut>(ns: &Path, f: F) -> Result<T, LabError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, LabError>>,
{
    super::netns::run_in(ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LabError::sys("building a runtime", ns.display(), e))?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| LabError::sys("netlink socket", ns.display(), e))?;
            let task = tokio::spawn(conn);
            let out = f(handle).await;
            task.abort();
            out
        })
    })
}

fn nl(op: &'static str, what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> LabError {
    let what = what.to_string();
    move |source| LabError::Netlink { op, what, source }
}

/// The index of the link `name`.
pub async fn ifindex(h: &Handle, name: &str) -> Result<u32, LabError> {
    let msg = h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(nl("get link", name))?;
    msg.map(|m| m.header.index)
        .ok_or_else(|| LabError::NotFound(format!("link {name}")))
}

/// Sets a link up.
pub async fn link_up(h: &Handle, index: u32) -> Result<(), LabError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("set link up", index))
}

/// Creates a bridge (up, no multicast snooping) and returns its index.
pub async fn add_bridge(h: &Handle, name: &str) -> Result<u32, LabError> {
    h.link()
        .add(LinkBridge::new(name).mcast_snooping(false).build())
        .execute()
        .await
        .map_err(nl("add bridge", name))?;
    ifindex(h, name).await
}

/// Creates a veth pair: `name` here (up, optionally enslaved to
/// `controller`), `peer` directly in the namespace open as `peer_ns`.
/// Returns the index of `name`.
pub async fn add_veth(
    h: &Handle,
    name: &str,
    peer: &str,
    peer_ns: RawFd,
    controller: Option<u32>,
) -> Result<u32, LabError> {
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .setns_by_fd(peer_ns)
        .build();
    let msg = LinkVeth::new(name, peer)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(nl("add veth", format!("{name} <-> {peer}")))?;
    let index = ifindex(h, name).await?;
    if let Some(c) = controller {
        h.link()
            .set(LinkUnspec::new_with_index(index).controller(c).build())
            .execute()
            .await
            .map_err(nl("set controller", name))?;
    }
    link_up(h, index).await?;
    Ok(index)
}

/// Deletes a link (a veth takes its peer along).
pub async fn del_link(h: &Handle, index: u32) -> Result<(), LabError> {
    h.link()
        .del(index)
        .execute()
        .await
        .map_err(nl("del link", index))
}

/// Adds an address; IPv6 ones without duplicate address detection.
pub async fn add_addr(h: &Handle, index: u32, addr: IpAddr, prefix: u8) -> Result<(), LabError> {
    let mut req = h.address().add(index, addr, prefix);
    if addr.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .map_err(nl("add address", format!("{addr}/{prefix} on {index}")))
}

/// Where a route goes.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    /// Through a gateway.
    Gateway(IpAddr),
    /// Directly out of a link (scope link).
    Dev(u32),
    /// Through a gateway reached on a given link (IPv6 link-local gateways).
    GatewayDev(IpAddr, u32),
}

fn route_msg(
    dst: IpAddr,
    prefix: u8,
    via: Via,
) -> Result<rtnetlink::packet_route::route::RouteMessage, LabError> {
    let b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, prefix)
        .map_err(|e| LabError::Invalid(format!("route {dst}/{prefix}: {e}")))?;
    let b = match via {
        Via::Gateway(gw) => b
            .gateway(gw)
            .map_err(|e| LabError::Invalid(format!("route {dst}/{prefix} via {gw}: {e}")))?,
        Via::Dev(i) => b.output_interface(i).scope(RouteScope::Link),
        Via::GatewayDev(gw, i) => b
            .gateway(gw)
            .map_err(|e| LabError::Invalid(format!("route {dst}/{prefix} via {gw}: {e}")))?
            .output_interface(i),
    };
    Ok(b.build())
}

/// Adds a route.
pub async fn add_route(h: &Handle, dst: IpAddr, prefix: u8, via: Via) -> Result<(), LabError> {
    h.route()
        .add(route_msg(dst, prefix, via)?)
        .execute()
        .await
        .map_err(nl("add route", format!("{dst}/{prefix} {via:?}")))
}

/// Deletes a route.
pub async fn del_route(h: &Handle, dst: IpAddr, prefix: u8, via: Via) -> Result<(), LabError> {
    h.route()
        .del(route_msg(dst, prefix, via)?)
        .execute()
        .await
        .map_err(nl("del route", format!("{dst}/{prefix} {via:?}")))
}

/// The unspecified addresses, to build `default` routes.
pub const ANY_V4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// See [`ANY_V4`].
pub const ANY_V6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
