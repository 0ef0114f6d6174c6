//! Edge receive at the NIC (`--xdp-pod-rx`): our tunnel's VXLAN for a pod of
//! this node, decapsulated and redirected straight into the pod's veth
//! (`FE_POD_DEVS`), with the inner MACs and TTL the kernel's routing over
//! the pod bridge would give. What the slow path does in three passes —
//! `fe-tunnel` decapsulates and `fe_tunnel_ingress` accepts, the kernel
//! routes onto `br-fabedge`, `fe_to_pod` translates Service replies — with
//! the same bytes arriving in the pod.
//!
//! Only frames whose delivery needs nothing but that are taken: anything
//! `fe_to_pod` would translate (a packet of a Service flow in `FE_CT`, an
//! ICMP error), anything the kernel would judge differently (a UDP or IPv4
//! checksum, lengths, options, fragments, an ECN mark the decapsulation must
//! carry inward, TTL about to expire, a frame the veth would refuse) and
//! pods the agent has not learned (or whose veth cannot take XDP frames)
//! are `XDP_PASS` before the first byte is written, counted
//! `xdp_pass_to_pod`.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use fabedge_common::{
    Counter, DatapathConfig, LocalPodEntry, RouteAddr, TUNNEL_DEV_MAC, config_flags, route_kind,
    services::CtKey,
};

use crate::{
    csum,
    fastpath::decrement_ttl,
    fib,
    maps::{FE_CT, FE_LOCAL_PODS, FE_POD_DEVS, route},
    parse::{ETH_HLEN, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN},
    stats::{count, peer_rx},
    xdp_parse::{VXLAN_FRAME_LEN, VxlanFrame, frame_len, is_fragment, ptr_at},
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// What XDP removes: the outer Ethernet, IPv4, UDP and VXLAN headers.
const OUTER_LEN: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN;
/// The outer IPv4 packet's bytes in front of the inner IPv4 header.
const ENCAP_LEN: u16 = (IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN) as u16;
const _: () = assert!(OUTER_LEN + ETH_HLEN + IPV4_HLEN == VXLAN_FRAME_LEN);
const ECN_CE: u8 = 3;

/// Our tunnel's frame from tunnel peer `sender`: `None` when its inner
/// destination is no pod of this node (the caller goes on), else the
/// verdict — a redirect into the pod's veth, or `XDP_PASS` unchanged.
#[inline(always)]
pub fn deliver(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    frame: &mut VxlanFrame,
    sender: u16,
) -> Option<u32> {
    if cfg.flags & config_flags::XDP_POD_RX == 0 || cfg.flags & config_flags::NO_FAST_PATH != 0 {
        return None;
    }
    match route(frame.inner_ip.daddr) {
        Some(r) if r.kind == route_kind::LOCAL_POD => {}
        _ => return None,
    }
    // SAFETY: plain data; the agent rewrites an entry only when the pod's
    // veth changes, and a torn read at worst misdelivers one frame to a
    // veth that is going away.
    let Some(pod) = (unsafe {
        FE_LOCAL_PODS.get(&RouteAddr {
            addr: frame.inner_ip.daddr,
        })
    }) else {
        return Some(pass());
    };
    let pod = *pod;
    if !deliverable(ctx, cfg, frame, &pod) || translated_by_to_pod(ctx, frame) {
        return Some(pass());
    }
    // The target first: a pod whose veth left the map is still the kernel's.
    if FE_POD_DEVS.redirect(pod.ifindex, XDP_PASS as u64).is_err() {
        return Some(pass());
    }
    let inner_len = ETH_HLEN as u32 + frame.inner_ip.total_len() as u32;
    frame.inner_eth.dst = pod.pod_mac;
    frame.inner_eth.src = pod.bridge_mac;
    decrement_ttl(&mut frame.inner_ip);
    // SAFETY: the xdp_md is this program's context; shrinking the head by
    // fewer bytes than `deliverable` found in front of the inner frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER_LEN as i32) } != 0 {
        // Not reached (the frame is longer than its outer headers), but the
        // frame is half rewritten: it must not reach the kernel like this.
        count(Counter::DropHelperFailed);
        return Some(XDP_DROP);
    }
    count(Counter::XdpRedirectToPod);
    peer_rx(sender, inner_len);
    Some(aya_ebpf::bindings::xdp_action::XDP_REDIRECT)
}

#[inline(always)]
fn pass() -> u32 {
    count(Counter::XdpPassToPod);
    XDP_PASS
}

/// Whether the kernel would have delivered this frame to the pod as it is,
/// and the veth will take it from XDP: the outer packet addressed to this
/// node (its Ethernet destination unicast, its IPv4 one local), whole, with right lengths and
/// IPv4 checksum and no UDP checksum (one we cannot verify without summing
/// the frame, which the kernel does before decapsulating); the VXLAN header
/// exactly as `fe-tunnel` accepts it and the inner Ethernet header as
/// `fe_tunnel_egress` stamps it (the device's MAC, from another); no ECN
/// mark the decapsulation must carry inward; one inner IPv4 packet without
/// options or fragments, right checksum, TTL to spare, within the pod's MTU.
#[inline(always)]
fn deliverable(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    frame: &VxlanFrame,
    pod: &LocalPodEntry,
) -> bool {
    let outer = &frame.ip;
    let inner = &frame.inner_ip;
    if frame.eth.dst[0] & 1 != 0
        || is_fragment(outer)
        || outer.tos & 3 == ECN_CE
        || u16::from_be_bytes(frame.udp.len) as u32 + IPV4_HLEN as u32 != outer.total_len() as u32
        || !csum::ipv4_header_valid(outer)
    {
        return false;
    }
    let vx = &frame.vxlan;
    if vx.flags != 0x08 || vx._reserved0 != [0; 3] || vx._reserved1 != 0 {
        return false;
    }
    if frame.inner_eth.dst != TUNNEL_DEV_MAC || frame.inner_eth.src == TUNNEL_DEV_MAC {
        return false;
    }
    if inner.version_ihl != 0x45
        || is_fragment(inner)
        || inner.ttl <= 1
        || !csum::ipv4_header_valid(inner)
    {
        return false;
    }
    let inner_total = inner.total_len();
    if inner_total < IPV4_HLEN as u16
        || inner_total > pod.mtu
        || outer.total_len() != inner_total + ENCAP_LEN
        || frame_len(ctx) != ETH_HLEN + outer.total_len() as usize
    {
        return false;
    }
    if frame.udp.check != [0, 0] && !udp_checksum_right(ctx, frame.ip.saddr, frame.ip.daddr) {
        return false;
    }
    // Addressed to this node, not through it: peers send to its address,
    // or (behind NAT, or by ExternalIP) to one the FIB calls local.
    outer.daddr == cfg.node_ip
        // SAFETY: the xdp_md is this program's context.
        || unsafe { fib::is_local(ctx.ctx as *mut _, ctx.ingress_ifindex() as u32, outer.daddr) }
}

/// Whether `fe_to_pod` would act on the inner packet: a TCP or UDP packet
/// of a flow with a Service conntrack entry (reverse NAT, and the entry's
/// timestamp and closing state, are that program's), or an ICMP error
/// (it may quote a translated flow). A packet too short for its ports is
/// left to the kernel as well.
#[inline(always)]
fn translated_by_to_pod(ctx: &XdpContext, frame: &VxlanFrame) -> bool {
    let inner = &frame.inner_ip;
    match inner.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            let l4_len: u16 = if inner.protocol == IPPROTO_TCP { 20 } else { 8 };
            if inner.total_len() < IPV4_HLEN as u16 + l4_len {
                return true;
            }
            let Some(ports) = ptr_at::<[u8; 4]>(ctx, VXLAN_FRAME_LEN) else {
                return true;
            };
            // SAFETY: bounds checked by ptr_at.
            let ports = unsafe { *ports };
            let key = CtKey {
                saddr: inner.saddr,
                daddr: inner.daddr,
                sport: u16::from_be_bytes([ports[0], ports[1]]),
                dport: u16::from_be_bytes([ports[2], ports[3]]),
                proto: inner.protocol,
                _pad: [0; 3],
            };
            // SAFETY: only the entry's presence is read.
            unsafe { FE_CT.get(&key) }.is_some()
        }
        IPPROTO_ICMP => match ptr_at::<u8>(ctx, VXLAN_FRAME_LEN) {
            // SAFETY: bounds checked by ptr_at.
            Some(kind) => matches!(unsafe { *kind }, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED),
            None => true,
        },
        _ => false,
    }
}

/// Chunk sizes of the checksum sum: `bpf_csum_diff` takes at most 512 bytes.
const BIG_CHUNK: usize = 512;
const SMALL_CHUNK: usize = 64;
/// Longest datagram summed (three big chunks, seven small ones and a tail):
/// longer ones with a checksum are left to the kernel.
const MAX_SUMMED: usize = 3 * BIG_CHUNK + 7 * SMALL_CHUNK + SMALL_CHUNK - 1;

/// Whether the outer UDP checksum is right, as the kernel checks it before
/// handing a datagram to the VXLAN socket: the pseudo-header and the whole
/// datagram (the frame's end, lengths checked by the caller), checksum
/// field included, sum to all ones. Senders do checksum VXLAN (a Linux
/// VXLAN device does by default, Flannel's too), and the connector's XDP
/// masquerade keeps what Flannel sent. A subprogram of its own: its stack
/// (the tail's copy) is not the caller's.
#[inline(never)]
fn udp_checksum_right(ctx: &XdpContext, saddr: [u8; 4], daddr: [u8; 4]) -> bool {
    let start = ETH_HLEN + IPV4_HLEN;
    let end = frame_len(ctx);
    if end < start + UDP_HLEN || end - start > MAX_SUMMED {
        return false;
    }
    let udp_len = (end - start) as u16;
    // Source, destination, zero, protocol, UDP length: as 32-bit words.
    let len = udp_len.to_be_bytes();
    let mut pseudo = [
        u32::from_ne_bytes(saddr),
        u32::from_ne_bytes(daddr),
        u32::from_ne_bytes([0, IPPROTO_UDP, len[0], len[1]]),
    ];
    let Some(mut sum) = sum_into(pseudo.as_mut_ptr(), 12, 0) else {
        return false;
    };
    let mut off = start;
    for _ in 0..3 {
        if off + BIG_CHUNK > end {
            break;
        }
        let Some(chunk) = ptr_at::<[u8; BIG_CHUNK]>(ctx, off) else {
            return false;
        };
        match sum_into(chunk as *mut u32, BIG_CHUNK as u32, sum) {
            Some(s) => sum = s,
            None => return false,
        }
        off += BIG_CHUNK;
    }
    for _ in 0..7 {
        if off + SMALL_CHUNK > end {
            break;
        }
        let Some(chunk) = ptr_at::<[u8; SMALL_CHUNK]>(ctx, off) else {
            return false;
        };
        match sum_into(chunk as *mut u32, SMALL_CHUNK as u32, sum) {
            Some(s) => sum = s,
            None => return false,
        }
        off += SMALL_CHUNK;
    }
    // The tail, copied behind zeros' padding: zeros add nothing, and an odd
    // last byte stays the high half of its word.
    let mut tail = [0u32; SMALL_CHUNK / 4];
    let bytes = tail.as_mut_ptr() as *mut u8;
    for i in 0..SMALL_CHUNK - 1 {
        if off + i >= end {
            break;
        }
        let Some(byte) = ptr_at::<u8>(ctx, off + i) else {
            return false;
        };
        // SAFETY: `i` < SMALL_CHUNK, inside `tail`; bounds of `byte` checked by ptr_at.
        unsafe { *bytes.add(i) = *byte };
    }
    match sum_into(tail.as_mut_ptr(), SMALL_CHUNK as u32, sum) {
        Some(sum) => csum::fold(sum) == 0,
        None => false,
    }
}

/// `sum` plus the one's complement sum of `size` bytes at `words`.
#[inline(always)]
fn sum_into(words: *mut u32, size: u32, sum: u32) -> Option<u32> {
    // SAFETY: `words` points at `size` readable bytes (stack, or packet
    // bytes bounds checked by the caller); nothing is written.
    let result = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words, size, sum) };
    if result < 0 {
        None
    } else {
        Some(result as u32)
    }
}
