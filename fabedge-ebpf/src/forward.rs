//! The forwarding decision shared by every entry point, and the plaintext
//! tunnel fast path.
//!
//! The kernel stays the slow path: routes the agent installs send every
//! tunnel prefix into `fe-tunnel` (or xfrm, in ESP mode), so whatever the fast
//! path declines — TTL about to expire, too big for the tunnel, ESP mode — is
//! handed to the kernel with `TC_ACT_OK` and the kernel behaves as a router
//! (ICMP time-exceeded, fragmentation-needed). The tunnel key itself is set in
//! one place only, `fe_tunnel_egress`, whichever path a packet took.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use fabedge_common::{
    Counter, DatapathConfig, RouteEntry, config_flags, mark, route_kind, tunnel_mode,
};

use crate::{
    csum, flannel,
    maps::peer,
    parse::{ETH_HLEN, IPPROTO_UDP, Ipv4Hdr, UDP_HLEN},
    stats::count,
};

/// Largest L4 header on top of `gso_size` when we cannot read the real one.
const MAX_L4_HLEN: u32 = 60;
const IPPROTO_TCP: u8 = 6;

#[inline(always)]
pub fn drop(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_SHOT as i32
}

#[inline(always)]
pub fn pass(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_OK as i32
}

/// Act on a routed IPv4 packet (Ethernet header at offset 0).
#[inline(always)]
pub fn forward(ctx: &TcContext, cfg: &DatapathConfig, route: &RouteEntry, ip: &mut Ipv4Hdr) -> i32 {
    match route.kind {
        route_kind::LOCAL_POD | route_kind::LOCAL_HOST => pass(Counter::PassLocal),
        route_kind::KERNEL => pass(Counter::PassKernel),
        route_kind::TUNNEL => to_tunnel(ctx, cfg, route.peer_id, ip),
        route_kind::CLOUD_VTEP => flannel::encap(ctx, cfg, route.peer_id, ip),
        _ => drop(Counter::DropNoRoute),
    }
}

/// Why the fast path declined a packet.
pub enum Punt {
    Ttl,
    TooBig,
}

/// Whether a packet may bypass the kernel's forwarding into a link of `mtu`.
#[inline(always)]
pub fn fast_path_check(ctx: &TcContext, ip: &Ipv4Hdr, mtu: u16) -> Result<(), Punt> {
    if ip.ttl <= 1 {
        return Err(Punt::Ttl);
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (gso_segs, gso_size) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).gso_size) };
    let fits = if gso_segs > 1 {
        // Each segment carries gso_size payload bytes behind the IP and L4 headers.
        gso_size + ip.header_len() as u32 + l4_header_len(ctx, ip) <= mtu as u32
    } else {
        ip.total_len() <= mtu
    };
    if fits { Ok(()) } else { Err(Punt::TooBig) }
}

/// Length of the L4 header a GSO packet repeats in every segment.
#[inline(always)]
fn l4_header_len(ctx: &TcContext, ip: &Ipv4Hdr) -> u32 {
    match ip.protocol {
        IPPROTO_UDP => UDP_HLEN as u32,
        IPPROTO_TCP => {
            // The TCP data offset: high nibble of byte 12, in 32-bit words.
            let offset = ETH_HLEN + (ip.header_len() & 0x3c) + 12;
            // A helper load, not direct access: the variable offset is beyond
            // what the verifier tracks for packet pointers, and only GSO
            // packets get here.
            match ctx.load::<u8>(offset) {
                Ok(doff) => ((doff >> 4) as u32) * 4,
                Err(_) => MAX_L4_HLEN,
            }
        }
        _ => MAX_L4_HLEN,
    }
}

#[inline(always)]
pub fn punt(reason: Punt) -> i32 {
    match reason {
        Punt::Ttl => pass(Counter::PuntTtl),
        Punt::TooBig => pass(Counter::PuntMtu),
    }
}

/// Decrement TTL, updating the header checksum incrementally (RFC 1624).
#[inline(always)]
pub fn decrement_ttl(ip: &mut Ipv4Hdr) {
    let old = u16::from_be_bytes([ip.ttl, ip.protocol]);
    ip.ttl -= 1;
    let new = u16::from_be_bytes([ip.ttl, ip.protocol]);
    let check = u16::from_be_bytes(ip.check);
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    ip.check = csum::fold(sum).to_be_bytes();
}

/// Send a packet toward tunnel peer `peer_id`.
#[inline(always)]
pub fn to_tunnel(ctx: &TcContext, cfg: &DatapathConfig, peer_id: u16, ip: &mut Ipv4Hdr) -> i32 {
    if peer(peer_id).is_none() {
        return drop(Counter::DropUnknownPeer);
    }
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
    // fe_tunnel_egress sets the tunnel key and the inner MAC addresses.
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(cfg.tunnel_ifindex, 0) as i32 }
}
