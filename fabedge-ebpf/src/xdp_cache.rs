//! The XDP verdict cache: what `fe_xdp_uplink` decided for a tunnel flow
//! (uplink, outer and inner addresses), kept so that the flow's next frames
//! skip the guard's lookups, the routes and the FIB and are rewritten from
//! the stored headers.
//!
//! Only verdicts that the maps and the kernel's FIB alone decide are kept:
//! the masquerade (a rewrite template), a pass after the guard, and the
//! guard's drop of a peer's spoofed inner source. Never a drop of a
//! stranger: anyone could fill the cache with those. What a
//! frame itself decides (headers, size, TTL, checksums) is checked again on
//! every frame, and a frame that fails any check takes the full path, which
//! decides it as without the cache.
//!
//! An entry is good while `FE_XDP_GEN` holds the value read before the
//! verdict was computed, and for at most [`MAX_AGE_NS`]. The agent writes a
//! fresh random value after every write to a map the verdict reads and on
//! every route, neighbour, address, rule or link change the kernel reports
//! (`fabedge_agent::datapath::xdp_epoch`); the age bound covers an agent that
//! stopped. A random value, not a counter: writers in two processes (an
//! agent and its successor) never give an old value back.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::{Array, PerCpuArray},
    helpers::bpf_ktime_get_coarse_ns,
    macros::btf_map,
    programs::XdpContext,
};
use fabedge_common::{Counter, DatapathConfig};

use crate::{
    parse::{ETH_P_IP, IPV4_HLEN},
    stats::count,
    xdp_guard::Tunnel,
    xdp_masq::{Rewrite, apply, fits},
    xdp_parse::{VxlanFrame, ptr_at},
};

/// How long an entry may stand without the agent confirming it (1 s).
pub const MAX_AGE_NS: u64 = 1_000_000_000;
/// Slots per CPU. The cache is direct-mapped per CPU: a flow has one slot
/// (a hash of its key), a new flow there replaces the old one, and a lookup
/// or a fill is a few loads and stores with no helper call, no lock and
/// nothing to allocate. 2048 × 112 bytes per CPU.
const SLOTS: u32 = 2048;

/// What a cached verdict does.
pub mod action {
    /// `XDP_PASS`, after the guard let the frame through.
    pub const PASS: u8 = 1;
    /// Flannel VXLAN → our tunnel (counted `xdp_flannel_to_tunnel`).
    pub const FLANNEL_TO_TUNNEL: u8 = 2;
    /// Our tunnel → Flannel VXLAN (counted `xdp_tunnel_to_flannel`).
    pub const TUNNEL_TO_FLANNEL: u8 = 3;
    /// `XDP_DROP`: the sender may not use the inner source (counted
    /// `xdp_drop_spoofed`).
    pub const DROP_SPOOFED: u8 = 4;
}

/// Everything of a frame the cached verdict depends on.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    pub ifindex: u32,
    pub outer_src: [u8; 4],
    pub outer_dst: [u8; 4],
    pub inner_src: [u8; 4],
    pub inner_dst: [u8; 4],
    /// 1: our tunnel, 2: Flannel's.
    pub tunnel: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 24);

/// A verdict and, for a rewrite, its headers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Cached {
    /// `FE_XDP_GEN` when the verdict was computed.
    pub epoch: u64,
    /// `bpf_ktime_get_coarse_ns` then.
    pub stamp: u64,
    /// One of [`action`].
    pub action: u8,
    pub _pad: [u8; 3],
    /// The largest outer IPv4 total length the FIB let through on this
    /// path; a longer frame takes the full path (the FIB's MTU check).
    pub max_len: u16,
    pub _pad2: [u8; 2],
    pub rewrite: Rewrite,
}

/// One slot: the flow it holds and its verdict.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slot {
    pub key: FlowKey,
    pub cached: Cached,
}

/// Not pinned (the agent pins `FE_*` maps only): a new program starts
/// with an empty cache, and the cache goes with the programs.
#[allow(non_upper_case_globals)]
#[btf_map]
static fe_xdp_verdicts: PerCpuArray<Slot, { SLOTS as usize }> = PerCpuArray::new();

/// Written by the agent (see the module text); 0 before it first did.
#[btf_map]
pub static FE_XDP_GEN: Array<u64, 1> = Array::new();

/// The cache's generation now. Read it before the first map lookup of a
/// verdict that [`remember`] will store.
#[inline(always)]
pub fn epoch() -> u64 {
    match FE_XDP_GEN.get(0) {
        Some(epoch) => *epoch,
        None => 0,
    }
}

#[inline(always)]
fn key(ctx: &XdpContext, frame: &VxlanFrame, tunnel: Tunnel) -> FlowKey {
    FlowKey {
        ifindex: ctx.ingress_ifindex() as u32,
        outer_src: frame.ip.saddr,
        outer_dst: frame.ip.daddr,
        inner_src: frame.inner_ip.saddr,
        inner_dst: frame.inner_ip.daddr,
        tunnel: match tunnel {
            Tunnel::Ours => 1,
            _ => 2,
        },
        _pad: [0; 3],
    }
}

impl FlowKey {
    /// The flow's slot.
    #[inline(always)]
    fn slot(&self) -> u32 {
        let mut h = u32::from_ne_bytes(self.outer_src).wrapping_mul(0x9e37_79b1)
            ^ u32::from_ne_bytes(self.inner_src).rotate_left(11)
            ^ u32::from_ne_bytes(self.inner_dst).wrapping_mul(0x85eb_ca6b)
            ^ u32::from_ne_bytes(self.outer_dst).rotate_left(23)
            ^ self.ifindex
            ^ self.tunnel as u32;
        h ^= h >> 15;
        h = h.wrapping_mul(0x2c1b_3c6d);
        (h ^ (h >> 13)) & (SLOTS - 1)
    }

    #[inline(always)]
    fn same(&self, other: &FlowKey) -> bool {
        self.ifindex == other.ifindex
            && self.outer_src == other.outer_src
            && self.outer_dst == other.outer_dst
            && self.inner_src == other.inner_src
            && self.inner_dst == other.inner_dst
            && self.tunnel == other.tunnel
    }
}
const _: () = assert!(SLOTS.is_power_of_two());

/// Whether the frame is a VXLAN frame of `tunnel` with an IPv4 packet
/// inside, as the full path checks before its guard.
#[inline(always)]
pub fn well_formed(cfg: &DatapathConfig, frame: &VxlanFrame, tunnel: Tunnel) -> bool {
    let vni = match tunnel {
        Tunnel::Ours => cfg.tunnel_vni,
        _ => cfg.flannel_vni,
    };
    frame.vxlan.flags & 0x08 != 0
        && frame.vxlan.vni() == vni
        && u16::from_be_bytes(frame.inner_eth.ether_type) == ETH_P_IP
        && frame.inner_ip.is_valid()
}

/// The cached verdict for this frame, if there is a good one and the frame
/// passes the checks the verdict leaves to each frame. `None`: take the
/// full path.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, cfg: &DatapathConfig, tunnel: Tunnel, epoch: u64) -> Option<u32> {
    let frame = ptr_at::<VxlanFrame>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at; XDP owns the frame.
    let frame = unsafe { &mut *frame };
    if !well_formed(cfg, frame, tunnel) {
        return None;
    }
    let key = key(ctx, frame, tunnel);
    // SAFETY: this CPU's slot; XDP does not run twice at once on one CPU.
    let slot = unsafe { &*fe_xdp_verdicts.get_ptr(key.slot())? };
    if !slot.key.same(&key) {
        return None;
    }
    let cached = &slot.cached;
    if cached.epoch != epoch {
        return None;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(cached.stamp) > MAX_AGE_NS {
        return None;
    }
    if cached.action == action::PASS {
        count(Counter::XdpCached);
        count(Counter::XdpPass);
        return Some(XDP_PASS);
    }
    if cached.action == action::DROP_SPOOFED {
        count(Counter::XdpCached);
        count(Counter::XdpDropSpoofed);
        return Some(XDP_DROP);
    }
    let r = &cached.rewrite;
    if frame.inner_ip.header_len() != IPV4_HLEN
        || frame.ip.total_len() > cached.max_len
        || fits(ctx, frame, r.mtu).is_none()
    {
        return None;
    }
    count(Counter::XdpCached);
    Some(apply(ctx, frame, cached.action, r))
}

/// Keep a verdict computed with the maps as of `epoch` for the frame's flow.
/// Called before the frame is rewritten (the key is the frame's own).
#[inline(always)]
pub fn remember(
    ctx: &XdpContext,
    frame: &VxlanFrame,
    tunnel: Tunnel,
    epoch: u64,
    action: u8,
    rewrite: &Rewrite,
) {
    // SAFETY: plain helper call.
    let stamp = unsafe { bpf_ktime_get_coarse_ns() };
    let cached = Cached {
        epoch,
        stamp,
        action,
        _pad: [0; 3],
        max_len: frame.ip.total_len(),
        _pad2: [0; 2],
        rewrite: *rewrite,
    };
    let key = key(ctx, frame, tunnel);
    if let Some(slot) = fe_xdp_verdicts.get_ptr_mut(key.slot()) {
        // SAFETY: this CPU's slot; XDP does not run twice at once on one CPU.
        unsafe { *slot = Slot { key, cached } };
    }
}

/// Keep a pass or drop (one of [`action`]) the maps decided for the
/// frame's flow, as of `epoch`.
#[inline(always)]
pub fn remember_verdict(
    ctx: &XdpContext,
    frame: &VxlanFrame,
    tunnel: Tunnel,
    epoch: u64,
    what: u8,
) {
    let none = Rewrite {
        eth_dst: [0; 6],
        eth_src: [0; 6],
        src_ip: [0; 4],
        dst_ip: [0; 4],
        inner_dst_mac: [0; 6],
        inner_src_mac: [0; 6],
        vni: 0,
        ifindex: 0,
        dport: 0,
        mtu: 0,
        rx_peer: 0,
        tx_peer: 0,
    };
    remember(ctx, frame, tunnel, epoch, what, &none);
}
