//! The connector's probe reflector: edges (and other connectors) send a
//! liveness probe every 100 ms to each connector they may fail over to;
//! the connector's datapath turns the request into the reply in place and
//! sends it back out of the NIC it came in on, so thousands of edges cost
//! its agent nothing per probe. XDP answers where it runs
//! (`fe_xdp_uplink`); `fe_uplink_ingress` answers the same frames when XDP
//! is off, or in generic mode declined by a driver.
//!
//! Only known peers are answered: a reflector that answers anyone turns
//! the connector into an amplifier toward whatever address a forged
//! request names. In ESP mode an edge behind NAT is known at the address
//! its NAT shows (`peer_kind::ESP_SENDER`), where its probes come from. In ESP mode only while the agent holds the ESP-in-UDP
//! socket (UDP 4500): without it the kernel decapsulates nothing, and a
//! connector that answered would draw edges into a black hole (a crashed
//! agent, or a node whose pinned datapath is back before its agent). Anything that is not a well-formed request to this node
//! passes untouched; the kernel has no socket on the port and answers with
//! ICMP port unreachable as it would without us.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_F_MARK_MANGLED_0, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, xdp_action::XDP_TX,
    },
    cty::c_void,
    helpers::{bpf_redirect, bpf_sk_lookup_udp, bpf_sk_release},
    programs::{TcContext, XdpContext},
};
use fabedge_common::{
    Counter, DatapathConfig, ESP_IN_UDP_PORT, probe, probe::ProbeHeader, role, tunnel_mode,
};

use crate::{
    csum,
    maps::{is_vtep_addr, peers_at},
    parse::{ETH_P_IP, EthHdr, IPPROTO_UDP, IPV4_HLEN, Ipv4Hdr, UDP_HLEN, UdpHdr},
    stats::count,
};

/// A probe frame from the outer Ethernet header to the end of the probe
/// header, read with one bounds check.
#[repr(C)]
pub struct ProbeFrame {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub probe: ProbeHeader,
}
const PROBE_FRAME_LEN: usize = core::mem::size_of::<ProbeFrame>();
const _: () = assert!(PROBE_FRAME_LEN == 14 + 20 + 8 + 32);

/// Offset of the UDP checksum in the frame.
const UDP_CHECK_OFF: usize = 14 + IPV4_HLEN + 6;

/// What the reflector makes of a frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a well-formed probe request to this node: untouched.
    NotProbe,
    /// A request from a known peer: answer it.
    Answer,
    /// A request from an address that is no peer: drop it.
    UnknownSource,
}

/// ESP mode: whether a socket holds UDP 4500 here (the agent's ESP-in-UDP
/// socket, which the kernel's decapsulation needs), looked up as a datagram
/// from the prober's address would be. Other modes need no agent to forward.
#[inline(always)]
fn carries_tunnel(ctx: *mut c_void, cfg: &DatapathConfig, from: [u8; 4], to: [u8; 4]) -> bool {
    if cfg.tunnel_mode != tunnel_mode::ESP {
        return true;
    }
    let port = ESP_IN_UDP_PORT.to_be();
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(from),
                daddr: u32::from_ne_bytes(to),
                sport: port,
                dport: port,
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    // SAFETY: the tuple lives across the call; a socket found is released.
    unsafe {
        let sock = bpf_sk_lookup_udp(ctx, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0);
        if sock.is_null() {
            return false;
        }
        bpf_sk_release(sock.cast());
    }
    true
}

/// Whether the reflector runs on this node.
#[inline(always)]
pub fn enabled(cfg: &DatapathConfig) -> bool {
    cfg.role == role::CONNECTOR && cfg.probe_port != 0
}

/// Judge a frame of `frame_len` bytes (headers read through `f`).
#[inline(always)]
pub fn judge(cfg: &DatapathConfig, f: &ProbeFrame, frame_len: usize) -> Verdict {
    let ip = &f.ip;
    if u16::from_be_bytes(f.eth.ether_type) != ETH_P_IP
        || ip.version_ihl != 0x45
        || ip.protocol != IPPROTO_UDP
        || ip.is_fragment()
        || u16::from_be_bytes(f.udp.dest) != cfg.probe_port
    {
        return Verdict::NotProbe;
    }
    // The datagram must be what the IPv4 header says, hold a whole probe
    // header, and fit the frame; the IPv4 checksum must be right (the
    // reply keeps it, so a wrong one would be sent back wrong).
    let total = ip.total_len() as usize;
    let udp_len = u16::from_be_bytes(f.udp.len) as usize;
    if udp_len + IPV4_HLEN != total
        || udp_len < UDP_HLEN + core::mem::size_of::<ProbeHeader>()
        || frame_len < 14 + total
        || !csum::ipv4_header_valid(ip)
    {
        return Verdict::NotProbe;
    }
    if f.probe.magic != probe::MAGIC || f.probe.kind != probe::REQUEST {
        return Verdict::NotProbe;
    }
    let to_us = ip.daddr == cfg.underlay_ip || ip.daddr == cfg.node_ip || is_vtep_addr(ip.daddr);
    if !to_us {
        return Verdict::NotProbe;
    }
    if peers_at(ip.saddr).is_none() {
        return Verdict::UnknownSource;
    }
    Verdict::Answer
}

/// Turn the request into the reply, all but the UDP checksum: swapped
/// Ethernet and IPv4 addresses and UDP ports, `kind` REPLY. The IPv4
/// checksum and the UDP pseudo-header sum are unchanged by a swap.
#[inline(always)]
fn swap(f: &mut ProbeFrame) {
    core::mem::swap(&mut f.eth.dst, &mut f.eth.src);
    core::mem::swap(&mut f.ip.saddr, &mut f.ip.daddr);
    core::mem::swap(&mut f.udp.source, &mut f.udp.dest);
    f.probe.kind = probe::REPLY;
}

/// XDP: answer a request from a known peer with `XDP_TX`; `None` for a
/// frame that is no probe to this node (the caller goes on with it).
#[inline(always)]
pub fn xdp(ctx: &XdpContext, cfg: &DatapathConfig) -> Option<u32> {
    let f = crate::xdp_parse::ptr_at::<ProbeFrame>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at; XDP owns the frame.
    let f = unsafe { &mut *f };
    match judge(cfg, f, crate::xdp_parse::frame_len(ctx)) {
        Verdict::NotProbe => None,
        Verdict::UnknownSource => {
            count(Counter::DropProbeUnknownSource);
            Some(aya_ebpf::bindings::xdp_action::XDP_DROP)
        }
        Verdict::Answer if !carries_tunnel(ctx.as_ptr(), cfg, f.ip.saddr, f.ip.daddr) => {
            count(Counter::DropProbeNotReady);
            Some(aya_ebpf::bindings::xdp_action::XDP_DROP)
        }
        Verdict::Answer => {
            // RFC 1624: the checksum follows the one word that changes;
            // zero means the sender sent none, and neither do we.
            let check = u16::from_be_bytes(f.udp.check);
            let old = u16::from_be_bytes([probe::REQUEST, f.probe._pad[0]]);
            swap(f);
            if check != 0 {
                let new = u16::from_be_bytes([probe::REPLY, f.probe._pad[0]]);
                let sum = !check as u32 + !old as u32 + new as u32;
                let check = match csum::fold(sum) {
                    0 => 0xffff,
                    check => check,
                };
                f.udp.check = check.to_be_bytes();
            }
            count(Counter::ProbeAnswered);
            Some(XDP_TX)
        }
    }
}

/// TC (uplink ingress): answer a request from a known peer by redirecting
/// it to the egress of the device it arrived on; `None` for a frame that is
/// no probe to this node.
#[inline(always)]
pub fn tc(ctx: &TcContext, cfg: &DatapathConfig) -> Option<i32> {
    let f = crate::parse::ptr_at::<ProbeFrame>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let (verdict, pad, from, to) = unsafe {
        (
            judge(cfg, &*f, ctx.len() as usize),
            (*f).probe._pad[0],
            (*f).ip.saddr,
            (*f).ip.daddr,
        )
    };
    match verdict {
        Verdict::NotProbe => None,
        Verdict::UnknownSource => Some(crate::verdict::drop(Counter::DropProbeUnknownSource)),
        Verdict::Answer if !carries_tunnel(ctx.as_ptr(), cfg, from, to) => {
            Some(crate::verdict::drop(Counter::DropProbeNotReady))
        }
        Verdict::Answer => {
            // The one checksummed word that changes, as it sits in memory.
            let old = u16::from_ne_bytes([probe::REQUEST, pad]);
            let new = u16::from_ne_bytes([probe::REPLY, pad]);
            // The kernel's helper knows the skb's checksum state: a
            // checksum still to be finished (CHECKSUM_PARTIAL, a local
            // sender on a veth) covers the payload later and is left
            // alone; a zero one (none sent) stays zero; the rest is
            // updated incrementally.
            if ctx
                .l4_csum_replace(
                    UDP_CHECK_OFF,
                    old as u64,
                    new as u64,
                    2 | BPF_F_MARK_MANGLED_0 as u64,
                )
                .is_err()
            {
                // The caller's packet pointers are stale after the helper:
                // nothing more may read them.
                return Some(crate::verdict::drop(Counter::DropHelperFailed));
            }
            // The helper may move packet data: read the frame again.
            let Some(f) = crate::parse::ptr_at::<ProbeFrame>(ctx, 0) else {
                return Some(crate::verdict::drop(Counter::DropHelperFailed));
            };
            // SAFETY: bounds checked by ptr_at.
            swap(unsafe { &mut *f });
            count(Counter::ProbeAnswered);
            // SAFETY: the context pointer is valid for the program's lifetime.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            // SAFETY: plain helper call.
            Some(unsafe { bpf_redirect(ifindex, 0) as i32 })
        }
    }
}
