//! When a packet may bypass the kernel's forwarding, and what bypassing owes
//! it: the TTL decrement a router would do. What is declined is handed to the
//! kernel (`punt`), which answers as a router would (ICMP time-exceeded,
//! fragmentation-needed).

use aya_ebpf::programs::TcContext;
use fabedge_common::Counter;

use crate::{
    csum,
    parse::{ETH_HLEN, IPPROTO_UDP, Ipv4Hdr, UDP_HLEN},
    verdict::pass,
};

/// Largest L4 header on top of `gso_size` when we cannot read the real one.
const MAX_L4_HLEN: u32 = 60;
const IPPROTO_TCP: u8 = 6;

/// Why the fast path declined a packet.
pub enum Punt {
    Ttl,
    TooBig,
}

/// Whether a packet may bypass the kernel's forwarding into a link of `mtu`.
#[inline(always)]
pub fn fast_path_check(ctx: &TcContext, ip: &Ipv4Hdr, mtu: u16) -> Result<(), Punt> {
    if ip.ttl <= 1 {
        return Err(Punt::Ttl);
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (gso_segs, gso_size) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).gso_size) };
    let fits = if gso_segs > 1 {
        // Each segment carries gso_size payload bytes behind the IP and L4 headers.
        gso_size + ip.header_len() as u32 + l4_header_len(ctx, ip) <= mtu as u32
    } else {
        ip.total_len() <= mtu
    };
    if fits { Ok(()) } else { Err(Punt::TooBig) }
}

/// Length of the L4 header a GSO packet repeats in every segment.
#[inline(always)]
fn l4_header_len(ctx: &TcContext, ip: &Ipv4Hdr) -> u32 {
    match ip.protocol {
        IPPROTO_UDP => UDP_HLEN as u32,
        IPPROTO_TCP => {
            // The TCP data offset: high nibble of byte 12, in 32-bit words.
            let offset = ETH_HLEN + (ip.header_len() & 0x3c) + 12;
            // A helper load, not direct access: the variable offset is beyond
            // what the verifier tracks for packet pointers, and only GSO
            // packets get here.
            match ctx.load::<u8>(offset) {
                Ok(doff) => ((doff >> 4) as u32) * 4,
                Err(_) => MAX_L4_HLEN,
            }
        }
        _ => MAX_L4_HLEN,
    }
}

#[inline(always)]
pub fn punt(reason: Punt) -> i32 {
    match reason {
        Punt::Ttl => pass(Counter::PuntTtl),
        Punt::TooBig => pass(Counter::PuntMtu),
    }
}

/// Decrement TTL, updating the header checksum incrementally (RFC 1624).
#[inline(always)]
pub fn decrement_ttl(ip: &mut Ipv4Hdr) {
    let old = u16::from_be_bytes([ip.ttl, ip.protocol]);
    ip.ttl -= 1;
    let new = u16::from_be_bytes([ip.ttl, ip.protocol]);
    let check = u16::from_be_bytes(ip.check);
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    ip.check = csum::fold(sum).to_be_bytes();
}
