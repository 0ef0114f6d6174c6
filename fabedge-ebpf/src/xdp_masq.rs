//! The connector's Flannel masquerade at the NIC, VXLAN mode: one VXLAN
//! encapsulation rewritten in place into the other (same size, so no head
//! adjustment), outer Ethernet from the FIB, and the frame sent straight
//! back out. What `fe_uplink_ingress` + `fe_tunnel_egress` (Flannel → edge)
//! and `fe_tunnel_ingress` + `flannel::encap` (edge → cloud) do in two
//! passes through the stack, with the same bytes on the wire.
//!
//! Everything declined returns `None` before the first byte is written, so
//! the caller passes the frame unchanged to the TC programs and the kernel.

use aya_ebpf::{bindings::xdp_action::XDP_TX, helpers::bpf_redirect, programs::XdpContext};
use fabedge_common::{Counter, DatapathConfig, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, peer_kind};

use crate::{
    csum,
    fastpath::decrement_ttl,
    fib::{Miss, NextHop},
    maps::peer,
    parse::{ETH_HLEN, IPPROTO_UDP, IPV4_HLEN, Ipv4Hdr},
    stats::{count, peer_rx, peer_tx},
    xdp_cache::{action, remember},
    xdp_guard::Tunnel,
    xdp_parse::{VXLAN_FRAME_LEN, VxlanFrame, frame_len, is_fragment, ptr_at},
};

const IPPROTO_TCP: u8 = 6;
/// Bytes in front of the inner IPv4 header: outer IPv4 + UDP + VXLAN + inner Ethernet.
const ENCAP_LEN: u16 = (VXLAN_FRAME_LEN - ETH_HLEN - IPV4_HLEN) as u16;
/// Outer TTL, as `fe_tunnel_egress` and `flannel::encap` send.
const OUTER_TTL: u8 = 64;
/// Linux's default range for VXLAN source ports (flow entropy).
const SPORT_MIN: u32 = 32768;
const SPORT_SPAN: u32 = 61000 - 32768;

/// The headers a masquerade writes over a frame's encapsulation, and where
/// the frame goes: computed once per flow on the full path, then kept in
/// the verdict cache (`xdp_cache`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub inner_dst_mac: [u8; 6],
    pub inner_src_mac: [u8; 6],
    pub vni: u32,
    /// Egress device: the ingress one means `XDP_TX`.
    pub ifindex: u32,
    pub dport: u16,
    /// The target's MTU for the inner packet.
    pub mtu: u16,
    /// Peer statistics: received from (0: none counted), sent to.
    pub rx_peer: u16,
    pub tx_peer: u16,
}
const _: () = assert!(core::mem::size_of::<Rewrite>() == 48);

/// Flannel VXLAN from a cloud VTEP for an edge (`edge_id`): into our tunnel.
/// `vtep_id`: the sending VTEP's peer id, 0 when the address is no VTEP's.
/// `epoch`: the cache generation read before the verdict's first lookup;
/// `None` when the verdict may not be cached.
#[inline(always)]
pub fn flannel_to_tunnel(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    frame: &mut VxlanFrame,
    edge_id: u16,
    vtep_id: u16,
    epoch: Option<u64>,
) -> Option<u32> {
    let edge = match peer(edge_id) {
        Some(p) if p.kind == peer_kind::TUNNEL => p,
        _ => return None,
    };
    fits(ctx, frame, cfg.tunnel_mtu)?;
    // Source chosen by the kernel's routing toward the edge: the address
    // the edge knows us by, as `fe-tunnel` (no fixed local) would send from.
    let hop = next_hop(ctx, frame, edge.underlay_ip, None)?;
    let r = Rewrite {
        eth_dst: hop.dst_mac,
        eth_src: hop.src_mac,
        src_ip: hop.src_ip,
        dst_ip: edge.underlay_ip,
        inner_dst_mac: TUNNEL_DEV_MAC,
        inner_src_mac: TUNNEL_SRC_MAC,
        vni: cfg.tunnel_vni,
        ifindex: hop.ifindex,
        dport: edge.port,
        mtu: cfg.tunnel_mtu,
        rx_peer: vtep_id,
        tx_peer: edge_id,
    };
    finish(
        ctx,
        frame,
        Tunnel::Flannel,
        epoch,
        action::FLANNEL_TO_TUNNEL,
        &r,
    )
}

/// Our VXLAN from edge `sender_id` for a cloud pod behind VTEP `vtep_id`:
/// into Flannel VXLAN, as `flannel.1` would have sent it.
#[inline(always)]
pub fn tunnel_to_flannel(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    frame: &mut VxlanFrame,
    sender_id: u16,
    vtep_id: u16,
    epoch: Option<u64>,
) -> Option<u32> {
    let vtep = match peer(vtep_id) {
        Some(p) if p.kind == peer_kind::FLANNEL_VTEP => p,
        _ => return None,
    };
    fits(ctx, frame, cfg.flannel_mtu)?;
    let hop = next_hop(ctx, frame, vtep.underlay_ip, Some(cfg.underlay_ip))?;
    let r = Rewrite {
        eth_dst: hop.dst_mac,
        eth_src: hop.src_mac,
        src_ip: cfg.underlay_ip,
        dst_ip: vtep.underlay_ip,
        inner_dst_mac: vtep.vtep_mac,
        inner_src_mac: cfg.flannel_mac,
        vni: cfg.flannel_vni,
        ifindex: hop.ifindex,
        dport: cfg.flannel_port,
        mtu: cfg.flannel_mtu,
        rx_peer: sender_id,
        tx_peer: vtep_id,
    };
    finish(
        ctx,
        frame,
        Tunnel::Ours,
        epoch,
        action::TUNNEL_TO_FLANNEL,
        &r,
    )
}

/// Remember the verdict (before the frame's addresses change), rewrite,
/// count, send.
#[inline(always)]
fn finish(
    ctx: &XdpContext,
    frame: &mut VxlanFrame,
    tunnel: Tunnel,
    epoch: Option<u64>,
    what: u8,
    r: &Rewrite,
) -> Option<u32> {
    if let Some(epoch) = epoch {
        remember(ctx, frame, tunnel, epoch, what, r);
    }
    Some(apply(ctx, frame, what, r))
}

/// Rewrite the frame as `r` says, count it (`what`: one of the masquerade
/// [`action`]s), send it: the full path's end and a cache hit's.
#[inline(always)]
pub fn apply(ctx: &XdpContext, frame: &mut VxlanFrame, what: u8, r: &Rewrite) -> u32 {
    let inner_len = inner_frame_len(frame);
    rewrite(frame, r, flow_hash(ctx, &frame.inner_ip));
    count(if what == action::FLANNEL_TO_TUNNEL {
        Counter::XdpFlannelToTunnel
    } else {
        Counter::XdpTunnelToFlannel
    });
    if r.rx_peer != 0 {
        peer_rx(r.rx_peer, inner_len);
    }
    peer_tx(r.tx_peer, inner_len);
    send(ctx, r.ifindex)
}

/// Whether the frame is one we may finish here: a whole, option-free,
/// unfragmented inner packet with TTL to spare that fits the target, in a
/// frame the kernel would forward itself. What the kernel would drop or
/// trim (a wrong IPv4 header checksum, outer or inner; a UDP length that
/// disagrees with the IPv4 one) stays the kernel's to judge: a rewrite
/// would heal the headers and send on what the slow path drops. A UDP
/// checksum is not verified here (that is a sum over the whole frame): the
/// rewrite carries it over incrementally, so a wrong one stays wrong and
/// the receiving kernel drops the frame as ours would have.
#[inline(always)]
pub fn fits(ctx: &XdpContext, frame: &VxlanFrame, mtu: u16) -> Option<()> {
    let outer = &frame.ip;
    let inner = &frame.inner_ip;
    if is_fragment(outer) || is_fragment(inner) {
        return None;
    }
    if inner.version_ihl != 0x45 || inner.ttl <= 1 {
        return None;
    }
    // Both headers are option-free here (the outer one by the caller).
    if u16::from_be_bytes(frame.udp.len) as u32 + IPV4_HLEN as u32 != outer.total_len() as u32
        || !csum::ipv4_header_valid(outer)
        || !csum::ipv4_header_valid(inner)
    {
        return None;
    }
    let inner_total = inner.total_len();
    if inner_total < IPV4_HLEN as u16 || inner_total > mtu {
        return None;
    }
    // Exactly one inner packet behind the headers, nothing trailing.
    if outer.total_len() != inner_total + ENCAP_LEN
        || frame_len(ctx) != ETH_HLEN + outer.total_len() as usize
    {
        return None;
    }
    Some(())
}

/// The inner frame's length as the TC programs count it (Ethernet + IPv4).
#[inline(always)]
pub fn inner_frame_len(frame: &VxlanFrame) -> u32 {
    ETH_HLEN as u32 + frame.inner_ip.total_len() as u32
}

/// Route `dst` from the ingress device: egress device, MACs and (without
/// `src`) the source address the kernel would pick. `None` (counted) when
/// the kernel has no usable route or neighbour yet: it resolves them on
/// the slow path, and the next frame takes this one.
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    frame: &VxlanFrame,
    dst: [u8; 4],
    src: Option<[u8; 4]>,
) -> Option<NextHop> {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the xdp_md is this program's context.
    match unsafe {
        crate::fib::next_hop(ctx.ctx as *mut _, ifindex, frame.ip.total_len(), dst, src)
    } {
        Ok(hop) => Some(hop),
        Err(Miss::NoNeighbour) => {
            count(Counter::XdpPassNoNeighbour);
            None
        }
        Err(Miss::Declined) => None,
    }
}

/// Write the new encapsulation over the old one; the inner packet keeps its
/// bytes but for TTL and checksum.
#[inline(always)]
pub fn rewrite(frame: &mut VxlanFrame, r: &Rewrite, hash: u32) {
    // RFC 1624: the UDP checksum follows the words the rewrite changes.
    let udp_check = u16::from_be_bytes(frame.udp.check);
    // Zero: the sender sent none (Linux VXLAN may), and neither do we.
    let old_words = if udp_check != 0 {
        udp_covered_words(frame, true)
    } else {
        0
    };

    frame.eth.dst = r.eth_dst;
    frame.eth.src = r.eth_src;

    // ECN travels outward as RFC 6040 has it (CE as ECT(0)); DSCP is not ours to copy.
    let ecn = match frame.inner_ip.tos & 3 {
        3 => 2,
        other => other,
    };
    // The new header's checksum, word by word (the BPF stack has no room
    // for a copy of the header): version/IHL/TOS, length, id, TTL/protocol
    // and the addresses; the fragment field is zero.
    let src_ip = r.src_ip;
    let dst_ip = r.dst_ip;
    let check = csum::fold(
        u16::from_be_bytes([0x45, ecn]) as u32
            + frame.ip.total_len() as u32
            + u16::from_be_bytes(frame.ip.id) as u32
            + u16::from_be_bytes([OUTER_TTL, IPPROTO_UDP]) as u32
            + u16::from_be_bytes([src_ip[0], src_ip[1]]) as u32
            + u16::from_be_bytes([src_ip[2], src_ip[3]]) as u32
            + u16::from_be_bytes([dst_ip[0], dst_ip[1]]) as u32
            + u16::from_be_bytes([dst_ip[2], dst_ip[3]]) as u32,
    )
    .to_be_bytes();
    frame.ip.version_ihl = 0x45;
    frame.ip.tos = ecn;
    frame.ip.frag_off = [0, 0];
    frame.ip.ttl = OUTER_TTL;
    frame.ip.protocol = IPPROTO_UDP;
    frame.ip.check = check;
    frame.ip.saddr = src_ip;
    frame.ip.daddr = dst_ip;

    let sport = SPORT_MIN + ((hash as u64 * SPORT_SPAN as u64) >> 32) as u32;
    frame.udp.source = (sport as u16).to_be_bytes();
    frame.udp.dest = r.dport.to_be_bytes();

    let vni = r.vni.to_be_bytes();
    frame.vxlan.flags = 0x08;
    frame.vxlan._reserved0 = [0; 3];
    frame.vxlan.vni = [vni[1], vni[2], vni[3]];
    frame.vxlan._reserved1 = 0;

    frame.inner_eth.dst = r.inner_dst_mac;
    frame.inner_eth.src = r.inner_src_mac;
    decrement_ttl(&mut frame.inner_ip);

    if udp_check != 0 {
        let sum = !udp_check as u32 + old_words + udp_covered_words(frame, false);
        let check = match csum::fold(sum) {
            0 => 0xffff,
            check => check,
        };
        frame.udp.check = check.to_be_bytes();
    }
}

/// The sum of the 16-bit words covered by the outer UDP checksum that
/// [`rewrite`] may change (each complemented when `complement`): the
/// pseudo-header addresses, the ports, the VXLAN header, the inner MACs and
/// the inner TTL/protocol and checksum words. Lengths do not change.
/// A BPF subprogram of its own: inlined twice, it overflowed the stack.
#[inline(never)]
fn udp_covered_words(frame: &VxlanFrame, complement: bool) -> u32 {
    let ip = &frame.ip;
    let vx = &frame.vxlan;
    let eth = &frame.inner_eth;
    let inner = &frame.inner_ip;
    // Summed word by word, not from an array: the BPF stack is small.
    let word = |bytes: [u8; 2]| {
        let w = u16::from_be_bytes(bytes);
        (if complement { !w } else { w }) as u32
    };
    word([ip.saddr[0], ip.saddr[1]])
        + word([ip.saddr[2], ip.saddr[3]])
        + word([ip.daddr[0], ip.daddr[1]])
        + word([ip.daddr[2], ip.daddr[3]])
        + word(frame.udp.source)
        + word(frame.udp.dest)
        + word([vx.flags, vx._reserved0[0]])
        + word([vx._reserved0[1], vx._reserved0[2]])
        + word([vx.vni[0], vx.vni[1]])
        + word([vx.vni[2], vx._reserved1])
        + word([eth.dst[0], eth.dst[1]])
        + word([eth.dst[2], eth.dst[3]])
        + word([eth.dst[4], eth.dst[5]])
        + word([eth.src[0], eth.src[1]])
        + word([eth.src[2], eth.src[3]])
        + word([eth.src[4], eth.src[5]])
        + word([inner.ttl, inner.protocol])
        + word(inner.check)
}

/// A hash of the inner flow (addresses, protocol, ports): the outer UDP
/// source port, so that ECMP and RSS downstream spread flows.
#[inline(always)]
pub fn flow_hash(ctx: &XdpContext, inner: &Ipv4Hdr) -> u32 {
    let mut h = u32::from_ne_bytes(inner.saddr).wrapping_mul(0x9e37_79b1)
        ^ u32::from_ne_bytes(inner.daddr)
        ^ inner.protocol as u32;
    if inner.protocol == IPPROTO_TCP || inner.protocol == IPPROTO_UDP {
        if let Some(ports) = ptr_at::<[u8; 4]>(ctx, VXLAN_FRAME_LEN) {
            // SAFETY: bounds checked by ptr_at.
            h ^= u32::from_ne_bytes(unsafe { *ports }).rotate_left(16);
        }
    }
    // murmur3's finaliser: every input bit moves every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
pub fn send(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        return XDP_TX;
    }
    // SAFETY: plain helper call; XDP_REDIRECT (the device is checked when
    // the frame is flushed).
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}
