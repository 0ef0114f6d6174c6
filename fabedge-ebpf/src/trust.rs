//! Who may send what, where, outside the checks of a tunnel's own sender:
//! tunnel destinations never leave in clear, tunnel sources never arrive in
//! clear, a pod speaks only from its node's pod CIDR, and a peer reaches
//! only what we route. None of these depends on the kernel's routes: a
//! route of ours that is missing (deleted, not yet installed) opens no hole.

use fabedge_common::{DatapathConfig, peer_kind, role, route_kind};

use crate::maps::{Route, peers_at, route};

/// Whether `addr` is a tunnel peer's underlay address: our encapsulations
/// (VXLAN, ESP, ESP in UDP) go to it, and its own come from it, in plain.
/// The planner keeps peer addresses out of tunnel prefixes; this keeps a
/// node address that is also a tunnel endpoint working if one ever is.
#[inline(always)]
fn is_tunnel_endpoint(addr: [u8; 4]) -> bool {
    match peers_at(addr) {
        Some(at) => at.kinds & (1 << peer_kind::TUNNEL) != 0,
        None => false,
    }
}

/// Whether `addr` is reached through a tunnel (and is no tunnel endpoint):
/// a packet to it must not leave the node in plain, and a packet from it
/// must not arrive in plain.
#[inline(always)]
pub fn is_tunnel_address(addr: [u8; 4]) -> bool {
    match route(addr) {
        Some(r) if r.kind == route_kind::TUNNEL => !is_tunnel_endpoint(addr),
        _ => false,
    }
}

/// Whether a pod may send from `saddr`: only from its node's pod CIDR.
#[inline(always)]
pub fn is_pod_source(saddr: [u8; 4]) -> bool {
    matches!(route(saddr), Some(r) if r.kind == route_kind::LOCAL_POD)
}

/// The route of `daddr` if a packet that arrived from a tunnel may go
/// there: this node (its pods, its address), another tunnel, a cloud VTEP,
/// or on the connector what the kernel routes for the cluster (the Service
/// CIDR, cloud node addresses). An edge's only kernel route is its default
/// route (pods' way out to their site): not for its peers.
#[inline(always)]
pub fn tunnel_destination(cfg: &DatapathConfig, daddr: [u8; 4]) -> Option<Route> {
    let r = route(daddr)?;
    match r.kind {
        route_kind::LOCAL_POD
        | route_kind::LOCAL_HOST
        | route_kind::TUNNEL
        | route_kind::CLOUD_VTEP => Some(r),
        route_kind::KERNEL if cfg.role == role::CONNECTOR => Some(r),
        _ => None,
    }
}
