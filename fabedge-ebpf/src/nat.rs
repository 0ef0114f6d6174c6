//! Rewriting addresses and ports of a TCP/UDP packet in place, with the IPv4
//! header checksum and the L4 checksum (pseudo-header included) updated
//! incrementally by the kernel's helpers, which also keep `CHECKSUM_PARTIAL`
//! packets (veth offload) right.
//!
//! Only IHL-5, unfragmented packets are translated: the L4 header is then
//! at a constant offset, which keeps every access verifier-friendly. Others
//! (IP options, fragments: rare from pods) are routed untranslated, which
//! for a ClusterIP means toward the connector.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::parse::{ETH_HLEN, IPPROTO_UDP, IPV4_HLEN};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_CSUM_OFF: usize = L4_OFF + 16;
const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Replace `old_addr:old_port` with `new_addr:new_port` at `end`. Ports are
/// host order. Err: a helper failed (packet left partly rewritten: drop it).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    proto: u8,
    end: End,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let (csum_off, mangled) = match proto {
        IPPROTO_TCP => (TCP_CSUM_OFF, 0),
        IPPROTO_UDP => (UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64),
        _ => return Err(()),
    };
    let (addr_off, port_off) = match end {
        End::Source => (IP_SRC_OFF, L4_OFF),
        End::Destination => (IP_DST_OFF, L4_OFF + 2),
    };
    if old_addr != new_addr {
        let from = u32::from_ne_bytes(old_addr) as u64;
        let to = u32::from_ne_bytes(new_addr) as u64;
        ctx.l4_csum_replace(csum_off, from, to, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
            .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| ())?;
    }
    if old_port != new_port {
        let from = u16::from_ne_bytes(old_port.to_be_bytes()) as u64;
        let to = u16::from_ne_bytes(new_port.to_be_bytes()) as u64;
        ctx.l4_csum_replace(csum_off, from, to, mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &new_port.to_be_bytes(), 0)
            .map_err(|_| ())?;
    }
    Ok(())
}
