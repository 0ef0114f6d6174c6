//! `fe-tunnel` (collect-metadata VXLAN) programs: ingress accepts what peers
//! send, egress chooses the remote end of everything we send.

use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_tunnel_key},
    helpers::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use fabedge_common::{
    Counter, DatapathConfig, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, mark, peer_kind, route_kind,
    tunnel_mode,
};

use crate::{
    forward::forward,
    maps::{config, peer, route, sender_at, sent_by},
    parse::{self, EthHdr, Ipv4Hdr, L3, ptr_at},
    stats::{count, peer_rx, peer_tx},
    trust::tunnel_destination,
    verdict::{drop, pass},
};

/// The `bpf_tunnel_key` prefix every kernel we support understands (up to
/// and including `tunnel_label`; `local_ipv4` is left to the device).
const TUNNEL_KEY_SIZE: u32 = core::mem::offset_of!(bpf_tunnel_key, __bindgen_anon_3) as u32;

#[classifier]
pub fn fe_tunnel_ingress(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else {
        return pass(Counter::NotConfigured);
    };
    if cfg.tunnel_mode == tunnel_mode::ESP {
        return esp_ingress(&ctx, cfg);
    }
    // SAFETY: zeroed plain-old-data struct filled by the helper.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: helper writes at most TUNNEL_KEY_SIZE bytes into `key`.
    if unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, TUNNEL_KEY_SIZE, 0) } < 0 {
        return drop(Counter::DropSpoofed);
    }
    // SAFETY: IPv4 tunnel: the union holds remote_ipv4 (host order).
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();

    let ip = match parse::ipv4(&ctx) {
        L3::Ipv4(ip) => ip,
        L3::Other => return drop(Counter::DropUnsupported),
        L3::Malformed => return drop(Counter::DropMalformed),
    };
    // The sending peer must own the source address: a peer cannot inject
    // traffic in the name of another site (for a group's prefixes, any
    // member may send).
    let sender = match route(ip.saddr) {
        Some(r) if r.kind == route_kind::TUNNEL => match sender_at(&r, remote) {
            Some(sender) => sender,
            None => return drop(Counter::DropSpoofed),
        },
        _ => return drop(Counter::DropSpoofed),
    };
    // SAFETY: the context pointer is valid for the program's lifetime.
    let existing = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark::from_tunnel(existing, sender));
    let Some(dst) = tunnel_destination(cfg, ip.daddr) else {
        return drop(Counter::DropTunnelDestination);
    };
    peer_rx(sender, ctx.len());
    count(Counter::FromTunnel);
    forward(&ctx, cfg, &dst, ip)
}

#[classifier]
pub fn fe_tunnel_egress(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else {
        return pass(Counter::NotConfigured);
    };
    if cfg.tunnel_mode == tunnel_mode::ESP {
        return esp_egress(&ctx);
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let existing = unsafe { (*ctx.skb.skb).mark };
    let peer_id = match mark::tunnel_peer(existing) {
        Some(id) => id,
        // Not marked by our ingress programs: the node's own traffic
        // (hostNetwork pods), routed here by the kernel.
        None => match parse::ipv4(&ctx) {
            L3::Ipv4(ip) => match route(ip.daddr) {
                Some(r) if r.kind == route_kind::TUNNEL => match r.next_hop() {
                    Ok(_) => r.peer_id,
                    Err(reason) => return drop(reason),
                },
                _ => return drop(Counter::DropNoRoute),
            },
            L3::Other => return drop(Counter::DropUnsupported),
            L3::Malformed => return drop(Counter::DropMalformed),
        },
    };
    let remote = match peer(peer_id) {
        Some(p) if p.kind == peer_kind::TUNNEL => p.underlay_ip,
        _ => return drop(Counter::DropUnknownPeer),
    };
    // SAFETY: zeroed plain-old-data struct.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = cfg.tunnel_vni;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote);
    key.tunnel_ttl = 64;
    // SAFETY: helper reads TUNNEL_KEY_SIZE bytes of `key`.
    if unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, TUNNEL_KEY_SIZE, 0) } < 0 {
        debug!(&ctx, "tunnel egress: set_tunnel_key failed");
        return drop(Counter::DropHelperFailed);
    }
    // Fast path or kernel route, every frame leaves with the same inner
    // addresses: the receiver's device MAC (PACKET_HOST there) from a source
    // that is not (VXLAN drops frames "from itself").
    match ptr_at::<EthHdr>(&ctx, 0) {
        // SAFETY: bounds checked by ptr_at.
        Some(eth) => unsafe {
            (*eth).dst = TUNNEL_DEV_MAC;
            (*eth).src = TUNNEL_SRC_MAC;
        },
        None => return drop(Counter::DropMalformed),
    }
    // The mark has done its job; keep it from steering the outer packet.
    ctx.set_mark(existing & !mark::OWNED_MASK);
    peer_tx(peer_id, ctx.len());
    count(Counter::ToTunnel);
    TC_ACT_OK as i32
}

// ESP mode: `fe-tunnel` is an xfrm interface, a layer-3 device (the IPv4
// header is at offset 0). xfrm encrypts and decrypts; these programs only
// tie packets to peers through the mark.

/// The IPv4 header of a packet on a layer-3 device.
#[inline(always)]
fn l3_ipv4(ctx: &TcContext) -> Option<&mut Ipv4Hdr> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    if ip.is_valid() { Some(ip) } else { None }
}

/// Decrypted by one of our inbound SAs, which set the `from-tunnel` mark of
/// its peer: the inner source must belong to that peer. The kernel routes
/// the rest (local delivery, Flannel, or back into another tunnel) if it
/// is ours to deliver.
#[inline(always)]
fn esp_ingress(ctx: &TcContext, cfg: &DatapathConfig) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let existing = unsafe { (*ctx.skb.skb).mark };
    if existing & mark::MAGIC_MASK != mark::MAGIC_FROM_TUNNEL {
        return drop(Counter::DropSpoofed);
    }
    let sender = (existing >> mark::PEER_SHIFT) as u16;
    // xfrm's tunnel-mode decapsulation rebuilds the outer Ethernet header in
    // front of the inner packet (with its type set to IPv4), so received
    // packets usually carry one even on this layer-3 device; what the
    // device itself sends does not.
    let ip = match parse::ipv4(ctx) {
        L3::Ipv4(ip) => ip,
        _ => match l3_ipv4(ctx) {
            Some(ip) => ip,
            None => return drop(Counter::DropMalformed),
        },
    };
    match route(ip.saddr) {
        Some(r) if r.kind == route_kind::TUNNEL && sent_by(&r, sender) => {}
        _ => return drop(Counter::DropSpoofed),
    }
    // A route may name a peer the table no longer (or not yet) has; only a
    // configured peer speaks for its prefixes.
    match peer(sender) {
        Some(p) if p.kind == peer_kind::TUNNEL => {}
        _ => return drop(Counter::DropSpoofed),
    }
    if tunnel_destination(cfg, ip.daddr).is_none() {
        return drop(Counter::DropTunnelDestination);
    }
    peer_rx(sender, ctx.len());
    pass(Counter::FromTunnel)
}

/// Everything routed into `fe-tunnel` leaves with the `to-tunnel` mark of
/// its peer, which the peer's outbound xfrm policy matches. Marked already
/// by our ingress programs, or the node's own traffic looked up here.
#[inline(always)]
fn esp_egress(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let existing = unsafe { (*ctx.skb.skb).mark };
    let peer_id = match mark::tunnel_peer(existing) {
        Some(id) => id,
        None => match l3_ipv4(ctx) {
            Some(ip) => match route(ip.daddr) {
                Some(r) if r.kind == route_kind::TUNNEL => match r.next_hop() {
                    Ok(_) => r.peer_id,
                    Err(reason) => return drop(reason),
                },
                _ => return drop(Counter::DropNoRoute),
            },
            None => return drop(Counter::DropMalformed),
        },
    };
    match peer(peer_id) {
        Some(p) if p.kind == peer_kind::TUNNEL => {}
        _ => return drop(Counter::DropUnknownPeer),
    }
    ctx.set_mark(mark::to_tunnel(existing, peer_id));
    peer_tx(peer_id, ctx.len());
    count(Counter::ToTunnel);
    TC_ACT_OK as i32
}
