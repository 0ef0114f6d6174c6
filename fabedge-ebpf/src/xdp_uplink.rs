//! XDP on the uplinks (every node's underlay NICs): the guard everywhere,
//! on the connector the probe reflector (`probe.rs`), on the connector
//! in VXLAN mode the Flannel masquerade finished at the NIC, and with
//! `--xdp-pod-rx` our tunnel's frames for local pods delivered straight
//! into their veths (`xdp_pod_rx.rs`). XDP may only
//! make a verdict cheaper, never different: whatever it declines is
//! `XDP_PASS` with the frame unchanged, and the TC programs and the kernel
//! handle it exactly as without XDP.
//!
//! - `fe_xdp_uplink`: the program.
//! - `fe_xdp_empty`: `XDP_PASS` and nothing else, the bench's baseline.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use fabedge_common::{
    Counter, DatapathConfig, config_flags, peer_kind, role, route_kind, tunnel_mode,
};

use crate::{
    maps::{config, is_vtep_addr, peer, route},
    parse::{ETH_P_IP, IPPROTO_UDP, IPV4_HLEN},
    probe,
    stats::count,
    xdp_cache::{self, action},
    xdp_guard::{Tunnel, check_inner_source, known_sender},
    xdp_masq::{flannel_to_tunnel, tunnel_to_flannel},
    xdp_parse::{OUTER_UDP_LEN, OuterUdp, VxlanFrame, is_later_fragment, ptr_at},
    xdp_pod_rx,
};

#[xdp]
pub fn fe_xdp_uplink(ctx: XdpContext) -> u32 {
    let Some(cfg) = config() else {
        return XDP_PASS;
    };
    let Some(outer) = ptr_at::<OuterUdp>(&ctx, 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let outer = unsafe { &*outer };
    // Outer options or a later fragment: no UDP header where we look.
    if u16::from_be_bytes(outer.eth.ether_type) != ETH_P_IP
        || outer.ip.version_ihl != 0x45
        || outer.ip.protocol != IPPROTO_UDP
        || is_later_fragment(&outer.ip)
    {
        return XDP_PASS;
    }
    let dest = u16::from_be_bytes(outer.udp.dest);
    if probe::enabled(cfg) && dest == cfg.probe_port {
        if let Some(verdict) = probe::xdp(&ctx, cfg) {
            return verdict;
        }
    }
    let Some(tunnel) = Tunnel::at_port(cfg, dest) else {
        return XDP_PASS;
    };
    let outer_src = outer.ip.saddr;
    if tunnel == Tunnel::Esp {
        return esp(&ctx, outer_src);
    }
    // Before any lookup the verdict depends on (see `xdp_cache`).
    let epoch = xdp_cache::epoch();
    if let Some(verdict) = xdp_cache::lookup(&ctx, cfg, tunnel, epoch) {
        return verdict;
    }
    let Some(at) = known_sender(tunnel, outer_src) else {
        return drop(Counter::XdpDropUnknownTunnelSource);
    };
    // Received from a Flannel VTEP, for its statistics (not when a tunnel
    // peer with a lower id shares the address: the index keeps one id).
    let vtep_id = match peer(at.peer_id) {
        Some(p) if p.kind == peer_kind::FLANNEL_VTEP => at.peer_id,
        _ => 0,
    };
    vxlan(&ctx, cfg, tunnel, outer_src, vtep_id, epoch)
}

#[xdp]
pub fn fe_xdp_empty(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// ESP in UDP: ESP from a stranger dies here. Non-ESP markers (NAT
/// keepalives, hellos) pass whoever sends them: a hello is how the agent
/// learns that an edge's NAT mapping moved, and it is authenticated there.
#[inline(always)]
fn esp(ctx: &XdpContext, outer_src: [u8; 4]) -> u32 {
    let Some(spi) = ptr_at::<[u8; 4]>(ctx, OUTER_UDP_LEN) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    if u32::from_ne_bytes(unsafe { *spi }) == 0 {
        return XDP_PASS;
    }
    if known_sender(Tunnel::Esp, outer_src).is_none() {
        return drop(Counter::XdpDropUnknownTunnelSource);
    }
    pass(Counter::XdpPass)
}

/// VXLAN (ours or Flannel's) from a known sender: check the inner source,
/// then masquerade on the connector or leave it to the stack. What the maps
/// alone decided is remembered in the verdict cache, as of `epoch`.
#[inline(always)]
fn vxlan(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    tunnel: Tunnel,
    outer_src: [u8; 4],
    vtep_id: u16,
    epoch: u64,
) -> u32 {
    let Some(frame) = ptr_at::<VxlanFrame>(ctx, 0) else {
        return pass(Counter::XdpPass);
    };
    // SAFETY: bounds checked by ptr_at; XDP owns the frame.
    let frame = unsafe { &mut *frame };
    if !xdp_cache::well_formed(cfg, frame, tunnel) {
        return pass(Counter::XdpPass);
    }
    let src = match check_inner_source(tunnel, outer_src, frame.inner_ip.saddr) {
        Ok(src) => src,
        Err(counter) => {
            if counter == Counter::XdpDropSpoofed {
                xdp_cache::remember_verdict(ctx, frame, tunnel, epoch, action::DROP_SPOOFED);
            }
            return drop(counter);
        }
    };
    if let (Tunnel::Ours, Some(sender)) = (tunnel, src) {
        if let Some(verdict) = xdp_pod_rx::deliver(ctx, cfg, frame, sender) {
            return verdict;
        }
    }
    // From here on a pass is the maps' verdict for the whole flow (the
    // pod delivery above declined without looking at the frame).
    if cfg.role != role::CONNECTOR
        || cfg.tunnel_mode != tunnel_mode::VXLAN
        || cfg.flags & config_flags::NO_FAST_PATH != 0
    {
        return remember_pass(ctx, frame, tunnel, epoch);
    }
    if frame.inner_ip.header_len() != IPV4_HLEN {
        return pass(Counter::XdpPass);
    }
    let dst = route(frame.inner_ip.daddr);
    // A route through a group follows its active member, which the
    // agent's prober switches without the cache knowing: not cached.
    let cache = match dst {
        Some(r) if r.through_group() => None,
        _ => Some(epoch),
    };
    let verdict = match (tunnel, dst) {
        // Addressed to our VTEP, as `fe_uplink_ingress` demands: Flannel
        // traffic between other nodes is not ours to masquerade.
        // Or to a shared VTEP address of the connector group, which this
        // connector may hold (after a failover) or be sent to (a stale ARP
        // entry): the same frame, another connector's name on it.
        (Tunnel::Flannel, Some(dst))
            if dst.kind == route_kind::TUNNEL
                && dst.next_hop().is_ok()
                && (frame.ip.daddr == cfg.underlay_ip || is_vtep_addr(frame.ip.daddr)) =>
        {
            flannel_to_tunnel(ctx, cfg, frame, dst.peer_id, vtep_id, cache)
        }
        (Tunnel::Ours, Some(dst)) if dst.kind == route_kind::CLOUD_VTEP => match src {
            Some(sender) => tunnel_to_flannel(ctx, cfg, frame, sender, dst.peer_id, cache),
            None => None,
        },
        // Not ours to masquerade: the stack's, for the whole flow.
        _ => return remember_pass(ctx, frame, tunnel, epoch),
    };
    match verdict {
        Some(verdict) => verdict,
        None => pass(Counter::XdpPass),
    }
}

/// Pass, and remember that the flow passes.
#[inline(always)]
fn remember_pass(ctx: &XdpContext, frame: &VxlanFrame, tunnel: Tunnel, epoch: u64) -> u32 {
    xdp_cache::remember_verdict(ctx, frame, tunnel, epoch, action::PASS);
    pass(Counter::XdpPass)
}

#[inline(always)]
fn drop(counter: Counter) -> u32 {
    count(counter);
    XDP_DROP
}

#[inline(always)]
fn pass(counter: Counter) -> u32 {
    count(counter);
    XDP_PASS
}

// Peer kinds are bit positions of `PeerAddrEntry::kinds`.
const _: () = assert!(peer_kind::TUNNEL < 8 && peer_kind::FLANNEL_VTEP < 8);
