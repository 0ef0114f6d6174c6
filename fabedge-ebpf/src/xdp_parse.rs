//! Bounds-checked access to an XDP frame, and the one shape the uplink's XDP
//! program reads: a VXLAN-in-IPv4 frame up to the inner IPv4 header. The
//! header layouts themselves are the TC side's (`parse.rs`).

use aya_ebpf::programs::XdpContext;

use crate::parse::{EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr};

/// The outer headers every UDP check needs.
#[repr(C)]
pub struct OuterUdp {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
}
pub const OUTER_UDP_LEN: usize = core::mem::size_of::<OuterUdp>();
const _: () = assert!(OUTER_UDP_LEN == 14 + 20 + 8);

/// A VXLAN frame from its outer Ethernet header to the inner IPv4 header,
/// read with one bounds check. Both encapsulations we translate between
/// (Flannel's and ours) have exactly this shape, so the rewrite is in place.
#[repr(C)]
pub struct VxlanFrame {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub inner_eth: EthHdr,
    pub inner_ip: Ipv4Hdr,
}
pub const VXLAN_FRAME_LEN: usize = core::mem::size_of::<VxlanFrame>();
const _: () = assert!(VXLAN_FRAME_LEN == 14 + 20 + 8 + 8 + 14 + 20);

/// A pointer to a `T` at `offset` into the frame, or `None` if it is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Frame length in bytes.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Fragment bits of an IPv4 header's `frag_off`: MF and the offset (DF aside).
#[inline(always)]
pub fn is_fragment(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frag_off) & 0x3fff != 0
}

/// A non-first fragment: no L4 header to read.
#[inline(always)]
pub fn is_later_fragment(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frag_off) & 0x1fff != 0
}
