//! The plaintext tunnel's VXLAN encapsulation, done by the program that
//! forwards a packet (`config_flags::TC_ENCAP`): outer headers pushed with
//! `bpf_skb_adjust_room` and the frame redirected straight to the NIC the
//! FIB names. The other way — redirect into `fe-tunnel`, whose egress
//! program sets a tunnel key — makes the kernel allocate a metadata dst for
//! every packet and pass it through the VXLAN device; this one does not.
//!
//! Same bytes on the wire as `fe-tunnel` sends (outer TTL 64, DF clear, ECN
//! carried outward, the inner MACs `fe_tunnel_egress` writes), but for the
//! outer UDP checksum, which is zero as IPv4 VXLAN allows. Same verdicts,
//! marks and counters: `to_tunnel` has already counted the redirect; this
//! counts what `fe_tunnel_egress` would (`to_tunnel`, the peer's tx) and
//! `tunnel_encap`.
//!
//! Whatever is not known cheaply here — no route or neighbour for the peer
//! yet, a kernel without `BPF_FIB_LOOKUP_SRC` (< 6.7), a GSO kind
//! `adjust_room` refuses — is declined before the packet is touched, and the
//! caller redirects into `fe-tunnel` as before: the kernel resolves the
//! neighbour there and no packet is lost to the new path.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_redirect,
    programs::TcContext,
};
use fabedge_common::{
    Counter, DatapathConfig, TUNNEL_DEV_MAC, TUNNEL_SRC_MAC, VXLAN_OVERHEAD, mark, peer_kind,
};

use crate::{
    csum,
    fib::{self, Miss, NextHop},
    maps::peer,
    parse::{ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, Ipv4Hdr, ptr_at},
    stats::{count, peer_tx},
    verdict::drop,
};

const IPPROTO_TCP: u8 = 6;
/// Outer TTL, as `fe_tunnel_egress` asks of `fe-tunnel`.
const OUTER_TTL: u8 = 64;
/// Linux's default range for VXLAN source ports (flow entropy).
const SPORT_MIN: u32 = 32768;
const SPORT_SPAN: u32 = 61000 - 32768;

/// Every header in front of the inner IPv4 packet once encapsulated, in
/// wire order: written in one go.
#[repr(C)]
struct Headers {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    eth_type: [u8; 2],
    ip: [u8; 20],
    udp: [u8; 8],
    vxlan: [u8; 8],
    inner_eth: [u8; 14],
}
const _: () = assert!(core::mem::size_of::<Headers>() == ETH_HLEN + VXLAN_OVERHEAD as usize);

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header length for GSO.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Encapsulate a packet that `to_tunnel` has checked (TTL, size) and
/// decremented for tunnel peer `peer_id`, and redirect it to the uplink.
/// `None`: declined with the packet untouched; the caller redirects it into
/// `fe-tunnel`.
#[inline(always)]
pub fn to_uplink(ctx: &TcContext, cfg: &DatapathConfig, peer_id: u16) -> Option<i32> {
    let to = match peer(peer_id) {
        // `fe_tunnel_egress` drops the rest and counts why.
        Some(p) if p.kind == peer_kind::TUNNEL && p.port != 0 => p,
        _ => return None,
    };
    let hop = match next_hop(ctx, to.underlay_ip) {
        Ok(hop) if hop.ifindex != cfg.tunnel_ifindex => hop,
        Ok(_) => return declined(),
        Err(counter) => {
            count(counter);
            return None;
        }
    };
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at; read before the head moves.
    let (tos, id, hash) = unsafe { ((*ip).tos, (*ip).id, flow_hash(ctx, &*ip)) };

    // The frame as `fe_tunnel_egress` counts it: inner Ethernet + IPv4.
    let frame_len = ctx.len();
    let inner_len = frame_len - ETH_HLEN as u32;
    let outer_len = inner_len + VXLAN_OVERHEAD as u32;
    let mut hdr = Headers {
        eth_dst: hop.dst_mac,
        eth_src: hop.src_mac,
        eth_type: ETH_P_IP.to_be_bytes(),
        ip: [0; 20],
        udp: [0; 8],
        vxlan: [0; 8],
        inner_eth: [0; 14],
    };
    // ECN travels outward as RFC 6040 has it (CE as ECT(0)), as the
    // kernel's VXLAN does; DSCP is not ours to copy.
    let ecn = match tos & 3 {
        3 => 2,
        other => other,
    };
    let total = (outer_len as u16).to_be_bytes();
    hdr.ip[0] = 0x45;
    hdr.ip[1] = ecn;
    hdr.ip[2] = total[0];
    hdr.ip[3] = total[1];
    // The inner packet's id: varies per packet of a flow where fragments
    // could need it (DF clear), and costs nothing to pick.
    hdr.ip[4] = id[0];
    hdr.ip[5] = id[1];
    hdr.ip[8] = OUTER_TTL;
    hdr.ip[9] = IPPROTO_UDP;
    hdr.ip[12..16].copy_from_slice(&hop.src_ip);
    hdr.ip[16..20].copy_from_slice(&to.underlay_ip);
    let check = csum::ipv4_header(&hdr.ip).to_be_bytes();
    hdr.ip[10] = check[0];
    hdr.ip[11] = check[1];

    let sport = SPORT_MIN + ((hash as u64 * SPORT_SPAN as u64) >> 32) as u32;
    hdr.udp[0..2].copy_from_slice(&(sport as u16).to_be_bytes());
    hdr.udp[2..4].copy_from_slice(&to.port.to_be_bytes());
    hdr.udp[4..6].copy_from_slice(&((outer_len - IPV4_HLEN as u32) as u16).to_be_bytes());
    // UDP checksum zero: allowed for IPv4 VXLAN, and no sum over the payload.

    hdr.vxlan[0] = 0x08;
    let vni = cfg.tunnel_vni.to_be_bytes();
    hdr.vxlan[4] = vni[1];
    hdr.vxlan[5] = vni[2];
    hdr.vxlan[6] = vni[3];

    // As `fe_tunnel_egress` addresses every frame: the receiver's device
    // MAC, from a source VXLAN does not take for its own.
    hdr.inner_eth[0..6].copy_from_slice(&TUNNEL_DEV_MAC);
    hdr.inner_eth[6..12].copy_from_slice(&TUNNEL_SRC_MAC);
    hdr.inner_eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());

    // FIXED_GSO: `to_tunnel` checked that every segment fits the tunnel
    // MTU as it is, so segments keep their size instead of shrinking by
    // the header.
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
        | BPF_F_ADJ_ROOM_FIXED_GSO) as u64
        | encap_l2(ETH_HLEN as u64);
    if ctx
        .adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        // Refused (a GSO kind it does not take, no headroom): untouched.
        return declined();
    }
    // adjust_room leaves the headers in the linear area: written directly,
    // a helper call only if they are not.
    match ptr_at::<Headers>(ctx, 0) {
        // SAFETY: bounds checked by ptr_at.
        Some(at) => unsafe { core::ptr::write_unaligned(at, hdr) },
        None => {
            if ctx.store(0, &hdr, 0).is_err() {
                // Grown but not written: no longer a packet either path can send.
                return Some(drop(Counter::DropHelperFailed));
            }
        }
    }
    // The mark has done its job; keep it from steering the outer packet.
    // SAFETY: the context pointer is valid for the program's lifetime.
    let existing = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(existing & !mark::OWNED_MASK);
    peer_tx(peer_id, frame_len);
    count(Counter::ToTunnel);
    count(Counter::TunnelEncap);
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(hop.ifindex, 0) as i32 })
}

#[inline(always)]
fn declined() -> Option<i32> {
    count(Counter::TunnelEncapDeclined);
    None
}

/// Route the outer destination as a forwarded packet from the device the
/// packet is on (`fib::next_hop`, the source address the kernel would
/// pick: what `fe-tunnel`, with no fixed local address, sends from). The
/// counter says why not. `tot_len` 0: the helper checks the skb against
/// the egress MTU; the tunnel MTU check before us is the one that counts.
#[inline(always)]
fn next_hop(ctx: &TcContext, dst: [u8; 4]) -> Result<NextHop, Counter> {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the skb is this program's context.
    unsafe { fib::next_hop(ctx.skb.skb as *mut _, ifindex, 0, dst, None) }.map_err(
        |miss| match miss {
            Miss::NoNeighbour => Counter::TunnelEncapNoNeighbour,
            Miss::Declined => Counter::TunnelEncapDeclined,
        },
    )
}

/// A hash of the inner flow for the outer UDP source port, so that ECMP and
/// RSS downstream spread flows: the skb's own flow hash when the stack has
/// one (no flow dissection here), else one of addresses, protocol and ports.
#[inline(always)]
fn flow_hash(ctx: &TcContext, inner: &Ipv4Hdr) -> u32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let skb_hash = unsafe { (*ctx.skb.skb).hash };
    if skb_hash != 0 {
        return skb_hash;
    }
    let mut h = u32::from_ne_bytes(inner.saddr).wrapping_mul(0x9e37_79b1)
        ^ u32::from_ne_bytes(inner.daddr)
        ^ inner.protocol as u32;
    if (inner.protocol == IPPROTO_TCP || inner.protocol == IPPROTO_UDP) && inner.version_ihl == 0x45
    {
        if let Some(ports) = ptr_at::<[u8; 4]>(ctx, ETH_HLEN + IPV4_HLEN) {
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
