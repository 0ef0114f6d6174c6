//! The NIC-level guard: tunnel-port traffic must come from a peer, and a
//! peer may only send in the name of its own prefixes. What it drops here
//! the kernel would otherwise decapsulate (Flannel, ESP) or `fe_tunnel_ingress`
//! would drop later at a higher price (our VXLAN).

use fabedge_common::{
    Counter, DatapathConfig, ESP_IN_UDP_PORT, RouteEntry, peer_kind, role, route_kind, tunnel_mode,
};

use crate::maps::{peer, peers_at, route};

/// Which tunnel a UDP port belongs to on this node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// fabedge's plaintext VXLAN (`fe-tunnel`).
    Ours,
    /// Flannel's VXLAN (connector only).
    Flannel,
    /// ESP in UDP (ESP mode).
    Esp,
}

impl Tunnel {
    /// The tunnel listening on UDP `port` here, if any.
    #[inline(always)]
    pub fn at_port(cfg: &DatapathConfig, port: u16) -> Option<Tunnel> {
        if cfg.tunnel_mode == tunnel_mode::VXLAN && cfg.tunnel_port != 0 && port == cfg.tunnel_port
        {
            Some(Tunnel::Ours)
        } else if cfg.role == role::CONNECTOR && cfg.flannel_port != 0 && port == cfg.flannel_port {
            Some(Tunnel::Flannel)
        } else if cfg.tunnel_mode == tunnel_mode::ESP && port == ESP_IN_UDP_PORT {
            Some(Tunnel::Esp)
        } else {
            None
        }
    }

    /// The peer kind allowed to send on this tunnel.
    #[inline(always)]
    fn sender_kind(self) -> u8 {
        match self {
            Tunnel::Ours | Tunnel::Esp => peer_kind::TUNNEL,
            Tunnel::Flannel => peer_kind::FLANNEL_VTEP,
        }
    }
}

/// Whether `outer_src` is a peer allowed to send on `tunnel`.
#[inline(always)]
pub fn known_sender(tunnel: Tunnel, outer_src: [u8; 4]) -> bool {
    match peers_at(outer_src) {
        Some(at) => at.kinds & (1 << tunnel.sender_kind()) != 0,
        None => false,
    }
}

/// Check an inner IPv4 source against the sender. `Err` is the drop counter;
/// `Ok` carries the route of the inner source when it names the sender.
///
/// Our tunnel: the source must route to a tunnel peer whose underlay address
/// is the outer source — what `fe_tunnel_ingress` demands, decided earlier.
/// Flannel: a cloud node may not send in the name of an edge (a tunnel
/// route) or of another VTEP's pods; other sources (its node address, say)
/// are Flannel's business, as without fabedge.
#[inline(always)]
pub fn check_inner_source(
    tunnel: Tunnel,
    outer_src: [u8; 4],
    inner_src: [u8; 4],
) -> Result<Option<&'static RouteEntry>, Counter> {
    let src = route(inner_src);
    let owned_by_sender = |r: &RouteEntry| match peer(r.peer_id) {
        Some(p) => p.underlay_ip == outer_src,
        None => false,
    };
    match (tunnel, src) {
        (Tunnel::Ours, Some(r)) if r.kind == route_kind::TUNNEL && owned_by_sender(r) => {
            Ok(Some(r))
        }
        (Tunnel::Ours, _) => Err(Counter::XdpDropSpoofed),
        (Tunnel::Flannel, Some(r)) if r.kind == route_kind::TUNNEL => Err(Counter::XdpDropSpoofed),
        (Tunnel::Flannel, Some(r)) if r.kind == route_kind::CLOUD_VTEP => {
            if owned_by_sender(r) {
                Ok(Some(r))
            } else {
                Err(Counter::XdpDropSpoofed)
            }
        }
        _ => Ok(None),
    }
}
