//! `fe_uplink_ingress`: TC ingress of the uplinks of edges and the
//! connector (every NIC tunnel traffic arrives on).
//!
//! Everywhere: a packet in the name of a tunnel source that arrives outside
//! the tunnel is forged, and dies here. On the connector: liveness probes
//! from peers are answered (`probe.rs`, as XDP does when it runs); Flannel
//! VXLAN must come from a known VTEP and carry only that VTEP's sources
//! (the XDP guard's verdict, given again for when XDP is off); Flannel
//! VXLAN to this connector (its address or a shared VTEP address of its
//! group) for edge destinations is decapsulated and sent into the edge
//! tunnel; plain packets for edge destinations (cloud nodes reaching edge
//! node IPs) go straight into the tunnel. Everything else is the node's own business and
//! passes untouched and uncounted.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use fabedge_common::{Counter, DatapathConfig, role, route_kind};

use crate::{
    flannel,
    forward::to_tunnel,
    maps::{config, is_vtep_addr, route},
    parse::{
        self, ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_UDP, IPV4_HLEN, Ipv4Hdr, L3, UDP_HLEN, UdpHdr,
        VXLAN_HLEN, VxlanHdr, ptr_at,
    },
    probe,
    trust::is_tunnel_address,
    verdict::{drop, pass},
    xdp_guard::{Tunnel, check_inner_source, known_sender},
    xdp_parse::{VxlanFrame, is_later_fragment},
};

const INNER_ETH_OFF: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN;

#[classifier]
pub fn fe_uplink_ingress(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TC_ACT_OK as i32;
    };
    let L3::Ipv4(ip) = parse::ipv4(&ctx) else {
        return TC_ACT_OK as i32;
    };
    if is_tunnel_address(ip.saddr) {
        return drop(Counter::DropTunnelSourceOutsideTunnel);
    }
    if cfg.role != role::CONNECTOR {
        return TC_ACT_OK as i32;
    }
    if probe::enabled(cfg) {
        if let Some(verdict) = probe::tc(&ctx, cfg) {
            return verdict;
        }
    }
    if let Err(counter) = flannel_guard(&ctx, cfg, ip) {
        return drop(counter);
    }
    if is_flannel_vxlan(&ctx, cfg, ip) {
        let (vtep, daddr) = (ip.saddr, ip.daddr);
        if daddr != cfg.underlay_ip {
            if let Err(counter) = adopt_inner_dst_mac(&ctx, cfg) {
                return drop(counter);
            }
        }
        return from_flannel(&ctx, cfg, vtep);
    }
    match route(ip.daddr) {
        Some(r) if r.kind == route_kind::TUNNEL => to_tunnel(&ctx, cfg, &r, ip),
        _ => TC_ACT_OK as i32,
    }
}

/// The XDP guard's verdict on Flannel's port (`fe_xdp_uplink`), for when
/// XDP is off or declined: the sender must be a known VTEP and the inner
/// source one it may send from. The same frames are judged, so XDP only
/// makes the drop cheaper: any UDP to Flannel's port with a plain outer
/// header that is not a later fragment; the inner source when the frame
/// holds a whole VXLAN header (right flag and VNI) and inner IPv4 header.
#[inline(always)]
fn flannel_guard(ctx: &TcContext, cfg: &DatapathConfig, ip: &Ipv4Hdr) -> Result<(), Counter> {
    if ip.version_ihl != 0x45 || ip.protocol != IPPROTO_UDP || is_later_fragment(ip) {
        return Ok(());
    }
    let Some(udp) = ptr_at::<UdpHdr>(ctx, ETH_HLEN + IPV4_HLEN) else {
        return Ok(());
    };
    // SAFETY: bounds checked by ptr_at.
    let dest = u16::from_be_bytes(unsafe { (*udp).dest });
    if Tunnel::at_port(cfg, dest) != Some(Tunnel::Flannel) {
        return Ok(());
    }
    if known_sender(Tunnel::Flannel, ip.saddr).is_none() {
        return Err(Counter::DropSpoofed);
    }
    let Some(frame) = ptr_at::<VxlanFrame>(ctx, 0) else {
        return Ok(());
    };
    // SAFETY: bounds checked by ptr_at.
    let frame = unsafe { &*frame };
    if frame.vxlan.flags & 0x08 == 0
        || frame.vxlan.vni() != cfg.flannel_vni
        || u16::from_be_bytes(frame.inner_eth.ether_type) != ETH_P_IP
        || !frame.inner_ip.is_valid()
    {
        return Ok(());
    }
    match check_inner_source(Tunnel::Flannel, ip.saddr, frame.inner_ip.saddr) {
        Ok(_) => Ok(()),
        Err(_) => Err(Counter::DropSpoofed),
    }
}

/// Flannel VXLAN addressed to this connector — its own address or a shared
/// VTEP address of its group (`FE_VTEP_ADDRS`) — (outer IHL 5, our port and
/// VNI, not a fragment: a fragment's bytes are not a whole VXLAN frame, and
/// the kernel reassembles it for `flannel.1`).
#[inline(always)]
fn is_flannel_vxlan(ctx: &TcContext, cfg: &DatapathConfig, ip: &Ipv4Hdr) -> bool {
    if ip.protocol != IPPROTO_UDP
        || ip.header_len() != IPV4_HLEN
        || ip.is_fragment()
        || (ip.daddr != cfg.underlay_ip && !is_vtep_addr(ip.daddr))
    {
        return false;
    }
    let Some(udp) = ptr_at::<UdpHdr>(ctx, ETH_HLEN + IPV4_HLEN) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let (dest, udp_len) = unsafe { ((*udp).dest, (*udp).len) };
    if u16::from_be_bytes(dest) != cfg.flannel_port {
        return false;
    }
    // A datagram whose length is not the packet's, or too short to hold an
    // inner frame, is the kernel's to judge (it trims or drops it).
    let udp_len = u16::from_be_bytes(udp_len) as usize;
    if udp_len != ip.total_len() as usize - IPV4_HLEN
        || udp_len < UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN
    {
        return false;
    }
    let Some(vxlan) = ptr_at::<VxlanHdr>(ctx, ETH_HLEN + IPV4_HLEN + UDP_HLEN) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let vxlan = unsafe { &*vxlan };
    vxlan.flags & 0x08 != 0 && vxlan.vni() == cfg.flannel_vni
}

/// Flannel VXLAN to a shared VTEP address names the group's VTEP MAC as its
/// inner destination, which after a failover is another connector's
/// `flannel.1`: whatever this connector hands to its own `flannel.1`
/// (frames we decline, GSO frames above all) would be `PACKET_OTHERHOST`
/// there and dropped. Ours instead, with the UDP checksum (if any) and the
/// skb's receive checksum kept right. Broadcast and multicast stay as sent.
#[inline(always)]
fn adopt_inner_dst_mac(ctx: &TcContext, cfg: &DatapathConfig) -> Result<(), Counter> {
    let Some(inner_eth) = ptr_at::<EthHdr>(ctx, INNER_ETH_OFF) else {
        return Ok(());
    };
    // SAFETY: bounds checked by ptr_at.
    let old = unsafe { (*inner_eth).dst };
    if old == cfg.flannel_mac || old[0] & 1 != 0 {
        return Ok(());
    }
    let Some(udp) = ptr_at::<UdpHdr>(ctx, ETH_HLEN + IPV4_HLEN) else {
        return Ok(());
    };
    // SAFETY: bounds checked by ptr_at.
    let check = unsafe { (*udp).check };
    let new = cfg.flannel_mac;
    let flags = if check == [0, 0] {
        // No UDP checksum: only the skb's receive checksum follows the bytes.
        BPF_F_RECOMPUTE_CSUM as u64
    } else {
        // The UDP checksum follows the six bytes (the packet's sum is then
        // unchanged, and so is the receive checksum).
        const CHECK_OFF: usize = ETH_HLEN + IPV4_HLEN + 6;
        let mangled = BPF_F_MARK_MANGLED_0 as u64;
        let word = |m: [u8; 6], i: usize| u16::from_ne_bytes([m[i], m[i + 1]]) as u64;
        for i in [0, 2, 4] {
            if ctx
                .l4_csum_replace(CHECK_OFF, word(old, i), word(new, i), 2 | mangled)
                .is_err()
            {
                return Err(Counter::DropHelperFailed);
            }
        }
        0
    };
    if ctx.store(INNER_ETH_OFF, &new, flags).is_err() {
        return Err(Counter::DropHelperFailed);
    }
    Ok(())
}

/// A Flannel frame from the VTEP at `vtep`: decapsulate it if its inner
/// destination is behind a tunnel, else leave it to `flannel.1`.
#[inline(always)]
fn from_flannel(ctx: &TcContext, cfg: &DatapathConfig, vtep: [u8; 4]) -> i32 {
    let Some(inner_eth) = ptr_at::<EthHdr>(ctx, INNER_ETH_OFF) else {
        return drop(Counter::DropMalformed);
    };
    // Only IPv4 is ours to decapsulate; anything else stays Flannel's.
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be_bytes(unsafe { (*inner_eth).ether_type }) != ETH_P_IP {
        return pass(Counter::PassFlannel);
    }
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, INNER_ETH_OFF + ETH_HLEN) else {
        return drop(Counter::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner };
    if !inner.is_valid() {
        return drop(Counter::DropMalformed);
    }
    let dst = match route(inner.daddr) {
        Some(r) if r.kind == route_kind::TUNNEL => r,
        _ => return pass(Counter::PassFlannel),
    };
    if !flannel::decap(ctx) {
        return pass(Counter::PassFlannel);
    }
    crate::stats::count(Counter::FlannelDecap);
    crate::stats::vtep_rx(vtep, ctx.len());
    match parse::ipv4(ctx) {
        L3::Ipv4(ip) => to_tunnel(ctx, cfg, &dst, ip),
        _ => drop(Counter::DropMalformed),
    }
}
