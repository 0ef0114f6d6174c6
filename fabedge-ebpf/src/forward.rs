//! The forwarding decision shared by every entry point, and the plaintext
//! tunnel fast path.
//!
//! The kernel stays the slow path: routes the agent installs send every
//! tunnel prefix into `fe-tunnel` (or xfrm, in ESP mode), so whatever the fast
//! path declines — TTL about to expire, too big for the tunnel, ESP mode — is
//! handed to the kernel with `TC_ACT_OK` and the kernel behaves as a router
//! (ICMP time-exceeded, fragmentation-needed). The tunnel key itself is set in
//! one place only, `fe_tunnel_egress`, whichever path a packet took; with
//! `config_flags::TC_ENCAP` the fast path encapsulates itself (`encap`) and
//! only what that declines goes through `fe-tunnel`.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use fabedge_common::{Counter, DatapathConfig, config_flags, mark, route_kind, tunnel_mode};

use crate::{
    encap,
    fastpath::{decrement_ttl, fast_path_check, punt},
    flannel,
    maps::Route,
    parse::Ipv4Hdr,
    stats::count,
    verdict::{drop, pass},
};

/// Act on a routed IPv4 packet (Ethernet header at offset 0).
#[inline(always)]
pub fn forward(ctx: &TcContext, cfg: &DatapathConfig, route: &Route, ip: &mut Ipv4Hdr) -> i32 {
    match route.kind {
        route_kind::LOCAL_POD | route_kind::LOCAL_HOST => pass(Counter::PassLocal),
        route_kind::KERNEL => pass(Counter::PassKernel),
        route_kind::TUNNEL => to_tunnel(ctx, cfg, route, ip),
        route_kind::CLOUD_VTEP => flannel::encap(ctx, cfg, route.peer_id, ip),
        _ => drop(Counter::DropNoRoute),
    }
}

/// Send a packet toward the tunnel peer of `route` (a group route's
/// active member, resolved by `maps::route`).
#[inline(always)]
pub fn to_tunnel(ctx: &TcContext, cfg: &DatapathConfig, route: &Route, ip: &mut Ipv4Hdr) -> i32 {
    if let Err(reason) = route.next_hop() {
        return drop(reason);
    }
    let peer_id = route.peer_id;
    // SAFETY: the context pointer is valid for the program's lifetime.
    let existing = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark::to_tunnel(existing, peer_id));
    if cfg.tunnel_mode != tunnel_mode::VXLAN || cfg.flags & config_flags::NO_FAST_PATH != 0 {
        // ESP: the kernel routes into `fe-tunnel`, whose egress program
        // counts it (ToTunnel and per peer); xfrm matches the mark. Without
        // the fast path, the same in VXLAN mode: the egress program encapsulates.
        return pass(Counter::PassKernel);
    }
    if cfg.tunnel_ifindex == 0 {
        return drop(Counter::DropNoTunnel);
    }
    if let Err(reason) = fast_path_check(ctx, ip, cfg.tunnel_mtu) {
        return punt(reason);
    }
    decrement_ttl(ip);
    count(Counter::RedirectToTunnel);
    if cfg.flags & config_flags::TC_ENCAP != 0 {
        if let Some(action) = encap::to_uplink(ctx, cfg, peer_id) {
            return action;
        }
    }
    // fe_tunnel_egress sets the tunnel key and the inner MAC addresses.
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(cfg.tunnel_ifindex, 0) as i32 }
}
