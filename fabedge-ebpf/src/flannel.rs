//! The connector's Flannel VXLAN masquerade: cloud nodes believe edge pod
//! CIDRs live behind the connector's `flannel.1` VTEP. Their VXLAN for edge
//! destinations is decapsulated here (uplink ingress) and sent into the edge
//! tunnel; tunnel traffic for cloud pods is encapsulated here to the owning
//! cloud node's VTEP, exactly as `flannel.1` would have sent it.
//!
//! Why TC and not XDP: the decapsulated packet must leave with tunnel metadata
//! (VXLAN mode) or an skb mark (ESP mode, for xfrm), and XDP can set neither;
//! nor can XDP redirect into a VXLAN device. Anything we decline stays a valid
//! Flannel frame and `flannel.1` handles it as before.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_redirect_neigh},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use fabedge_common::{Counter, DatapathConfig, VXLAN_OVERHEAD, peer_kind};

use crate::{
    csum,
    fastpath::{decrement_ttl, fast_path_check, punt},
    maps::peer,
    parse::{ETH_HLEN, ETH_P_IP, IPPROTO_UDP, Ipv4Hdr},
    stats::{count, peer_tx},
    verdict::drop,
};

/// Everything VXLAN puts between the outer Ethernet header and the inner IP
/// packet, in wire order.
#[repr(C)]
struct VxlanEncap {
    ip: [u8; 20],
    udp: [u8; 8],
    vxlan: [u8; 8],
    inner_eth: [u8; 14],
}
const _: () = assert!(core::mem::size_of::<VxlanEncap>() == VXLAN_OVERHEAD as usize);

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header length for GSO.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Linux's default range for VXLAN source ports (flow entropy).
const SPORT_MIN: u32 = 32768;
const SPORT_SPAN: u32 = 61000 - 32768;

/// Encapsulate a tunnel packet for a cloud pod to its node's Flannel VTEP.
#[inline(always)]
pub fn encap(ctx: &TcContext, cfg: &DatapathConfig, vtep_id: u16, ip: &mut Ipv4Hdr) -> i32 {
    let Some(vtep) = peer(vtep_id) else {
        return drop(Counter::DropUnknownPeer);
    };
    if vtep.kind != peer_kind::FLANNEL_VTEP {
        return drop(Counter::DropUnknownPeer);
    }
    if cfg.uplink_ifindex == 0 {
        return drop(Counter::DropNoTunnel);
    }
    if let Err(reason) = fast_path_check(ctx, ip, cfg.flannel_mtu) {
        // The kernel forwards through Flannel's own route and flannel.1.
        return punt(reason);
    }
    decrement_ttl(ip);

    let inner_len = ctx.len() - ETH_HLEN as u32;
    let outer_len = inner_len + VXLAN_OVERHEAD as u32;
    // SAFETY: plain helper call on our skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport = SPORT_MIN + ((hash as u64 * SPORT_SPAN as u64) >> 32) as u32;

    let mut hdr = VxlanEncap {
        ip: [0; 20],
        udp: [0; 8],
        vxlan: [0; 8],
        inner_eth: [0; 14],
    };
    let total = (outer_len as u16).to_be_bytes();
    hdr.ip[0] = 0x45;
    hdr.ip[2] = total[0];
    hdr.ip[3] = total[1];
    hdr.ip[8] = 64;
    hdr.ip[9] = IPPROTO_UDP;
    hdr.ip[12..16].copy_from_slice(&cfg.underlay_ip);
    hdr.ip[16..20].copy_from_slice(&vtep.underlay_ip);
    let check = csum::ipv4_header(&hdr.ip).to_be_bytes();
    hdr.ip[10] = check[0];
    hdr.ip[11] = check[1];

    hdr.udp[0..2].copy_from_slice(&(sport as u16).to_be_bytes());
    hdr.udp[2..4].copy_from_slice(&cfg.flannel_port.to_be_bytes());
    hdr.udp[4..6].copy_from_slice(&((outer_len - 20) as u16).to_be_bytes());
    // UDP checksum stays zero, as Flannel's kernel VXLAN sends it.

    hdr.vxlan[0] = 0x08;
    let vni = cfg.flannel_vni.to_be_bytes();
    hdr.vxlan[4] = vni[1];
    hdr.vxlan[5] = vni[2];
    hdr.vxlan[6] = vni[3];

    hdr.inner_eth[0..6].copy_from_slice(&vtep.vtep_mac);
    hdr.inner_eth[6..12].copy_from_slice(&cfg.flannel_mac);
    hdr.inner_eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());

    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
        | encap_l2(ETH_HLEN as u64);
    if ctx
        .adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        debug!(ctx, "flannel encap: adjust_room failed");
        return drop(Counter::DropHelperFailed);
    }
    if ctx.store(ETH_HLEN, &hdr, 0).is_err() {
        debug!(ctx, "flannel encap: store failed");
        return drop(Counter::DropHelperFailed);
    }
    count(Counter::FlannelEncap);
    peer_tx(vtep_id, inner_len + ETH_HLEN as u32);
    // The neighbour subsystem fills in the outer Ethernet addresses.
    // SAFETY: plain helper call; NULL params asks for a FIB lookup.
    unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Remove Flannel's outer IPv4/UDP/VXLAN headers and the inner Ethernet
/// header, leaving `[outer Ethernet][inner IPv4 ...]`. `false` when the frame
/// must be left to `flannel.1` (it is then unchanged): when the kernel refuses,
/// and for every GSO frame (merged by GRO, or passed whole by a veth). The
/// kernel would accept a TCP one, but `bpf_skb_adjust_room` keeps its tunnel
/// GSO state (`SKB_GSO_UDP_TUNNEL`, `skb->encapsulation`) and grows its
/// `gso_size` by the removed headers, so forwarding segments it wrong and bulk
/// TCP from the cloud to edge pods stalls. `BPF_F_ADJ_ROOM_DECAP_L4_UDP`,
/// which resets that state, is newer than the kernels we support; `flannel.1`
/// decapsulates correctly and the kernel routes the result into the tunnel.
#[inline(always)]
pub fn decap(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is valid for the program's lifetime.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return false;
    }
    ctx.adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, 0)
        .is_ok()
}
