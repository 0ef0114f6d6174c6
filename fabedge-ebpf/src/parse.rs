//! Header layouts and bounds-checked access to packet bytes.

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_UDP: u8 = 17;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network order.
    pub ether_type: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ipv4Hdr {
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }
    #[inline(always)]
    pub fn total_len(&self) -> u16 {
        u16::from_be_bytes(self.tot_len)
    }
    /// More fragments follow, or this is not the first one.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag_off) & 0x3fff != 0
    }
    /// A sane IPv4 header: version 4, IHL >= 5, total length covers the header.
    #[inline(always)]
    pub fn is_valid(&self) -> bool {
        self.version_ihl >> 4 == 4
            && self.header_len() >= IPV4_HLEN
            && self.total_len() as usize >= self.header_len()
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    /// 0x08: VNI present (the I flag).
    pub flags: u8,
    pub _reserved0: [u8; 3],
    pub vni: [u8; 3],
    pub _reserved1: u8,
}

impl VxlanHdr {
    #[inline(always)]
    pub fn vni(&self) -> u32 {
        u32::from_be_bytes([0, self.vni[0], self.vni[1], self.vni[2]])
    }
}

/// A pointer to a `T` at `offset` into the linear packet data, or `None` if
/// the packet is too short. Direct packet access: re-derive after any helper
/// that may move packet data (adjust_room, store_bytes, csum_replace).
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The Ethernet and IPv4 headers of a frame, if it carries IPv4.
pub enum L3<'a> {
    Ipv4(&'a mut Ipv4Hdr),
    /// Not IPv4: ARP, IPv6, ...
    Other,
    /// Claims IPv4 but the header is truncated or invalid.
    Malformed,
}

#[inline(always)]
pub fn ipv4<'a>(ctx: &TcContext) -> L3<'a> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return L3::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &*eth };
    if u16::from_be_bytes(eth.ether_type) != ETH_P_IP {
        return L3::Other;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return L3::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    if !ip.is_valid() {
        return L3::Malformed;
    }
    L3::Ipv4(ip)
}
