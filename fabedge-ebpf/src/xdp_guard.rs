//! The NIC-level guard: tunnel-port traffic must come from a peer, and a
//! peer may only send in the name of its own prefixes. What it drops here
//! the kernel would otherwise decapsulate (Flannel, ESP) or `fe_tunnel_ingress`
//! would drop later at a higher price (our VXLAN).

use fabedge_common::{
    Counter, DatapathConfig, ESP_IN_UDP_PORT, PeerAddrEntry, peer_flags, peer_kind, role,
    route_kind, tunnel_mode,
};

use crate::maps::{peer, peers_at, route, sender_at};

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

    /// The `PeerAddrEntry::kinds` bits allowed to send on this tunnel. ESP
    /// in UDP may also come from where a peer's NAT shows it, or from the
    /// port forward it publishes ([`peer_kind::ESP_SENDER`]).
    #[inline(always)]
    fn sender_kinds(self) -> u8 {
        match self {
            Tunnel::Ours => 1 << peer_kind::TUNNEL,
            Tunnel::Esp => (1 << peer_kind::TUNNEL) | (1 << peer_kind::ESP_SENDER),
            Tunnel::Flannel => 1 << peer_kind::FLANNEL_VTEP,
        }
    }
}

/// The peers at `outer_src`, if one of them may send on `tunnel`.
#[inline(always)]
pub fn known_sender(tunnel: Tunnel, outer_src: [u8; 4]) -> Option<&'static PeerAddrEntry> {
    let allowed = tunnel.sender_kinds();
    match peers_at(outer_src) {
        Some(at) if at.kinds & allowed != 0 => Some(at),
        _ => None,
    }
}

/// Check an inner IPv4 source against the sender. `Err` is the drop counter;
/// `Ok` carries the sending peer's id when the inner source's route names
/// the sender (for a group's prefixes: the member at the outer source).
///
/// Our tunnel: the source must route to a tunnel peer whose underlay address
/// is the outer source (or to a group with a member there) — what
/// `fe_tunnel_ingress` demands, decided earlier.
/// Flannel: a cloud node may not send in the name of an edge (a tunnel
/// route) — another connector may — or of another VTEP's pods; other
/// sources (its node address, say) are Flannel's business, as without fabedge.
#[inline(always)]
pub fn check_inner_source(
    tunnel: Tunnel,
    outer_src: [u8; 4],
    inner_src: [u8; 4],
) -> Result<Option<u16>, Counter> {
    match (tunnel, route(inner_src)) {
        (Tunnel::Ours, Some(r)) if r.kind == route_kind::TUNNEL => match sender_at(&r, outer_src) {
            Some(sender) => Ok(Some(sender)),
            None => Err(Counter::XdpDropSpoofed),
        },
        (Tunnel::Ours, _) => Err(Counter::XdpDropSpoofed),
        // Another connector relays its edges' traffic to our pods.
        (Tunnel::Flannel, Some(r)) if r.kind == route_kind::TUNNEL => {
            if sent_by_connector(outer_src) {
                Ok(None)
            } else {
                Err(Counter::XdpDropSpoofed)
            }
        }
        (Tunnel::Flannel, Some(r)) if r.kind == route_kind::CLOUD_VTEP => {
            match sender_at(&r, outer_src) {
                Some(sender) => Ok(Some(sender)),
                None => Err(Counter::XdpDropSpoofed),
            }
        }
        _ => Ok(None),
    }
}

/// Whether the VTEP at `outer_src` is another connector's.
#[inline(always)]
fn sent_by_connector(outer_src: [u8; 4]) -> bool {
    match peers_at(outer_src) {
        Some(at) => matches!(
            peer(at.peer_id),
            Some(p) if p.kind == peer_kind::FLANNEL_VTEP && p.flags & peer_flags::CONNECTOR != 0
        ),
        None => false,
    }
}
