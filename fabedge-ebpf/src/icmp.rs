//! ICMP errors about translated flows (destination unreachable, time
//! exceeded): the quoted packet is the one the backend saw, so the client's
//! kernel would match it to no socket. Conntrack is looked up with the
//! quoted tuple reversed (the reply direction), and the error is rewritten
//! as if the Service had sent it: inner destination back to the ClusterIP
//! (and, for SNATed flows, inner source back to the client), outer source
//! the ClusterIP if the backend itself answered, outer destination the
//! client. The outer IPv4 checksum, the ICMP checksum and the quoted IPv4
//! checksum are updated; the quoted L4 checksum is left as it was (Linux
//! does not check it, and it is often not quoted whole).

use aya_ebpf::programs::TcContext;
use fabedge_common::services::{CtKey, ct_flags};

use crate::{
    maps::FE_CT,
    nat::L4_OFF,
    parse::{ETH_HLEN, IPV4_HLEN, Ipv4Hdr, ptr_at},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_CSUM_OFF: usize = L4_OFF + 2;
const INNER_OFF: usize = L4_OFF + 8;
const INNER_CSUM_OFF: usize = INNER_OFF + 10;
const INNER_L4_OFF: usize = INNER_OFF + IPV4_HLEN;
const OUTER_CSUM_OFF: usize = ETH_HLEN + 10;
/// IPv4 total length up to the end of the quoted ports.
const QUOTED_PORTS_END: usize = INNER_L4_OFF + 4 - ETH_HLEN;

/// Whether this packet is an ICMP error about a Service flow, translated
/// in place. Err: a helper failed half-way (drop the packet).
#[inline(always)]
pub fn translate_error(ctx: &TcContext, outer: &Ipv4Hdr) -> Result<bool, ()> {
    // A whole message, and the quoted header and ports inside the packet,
    // not in Ethernet padding after it: the ICMP checksum covers only the
    // former.
    if outer.header_len() != IPV4_HLEN
        || outer.is_fragment()
        || (outer.total_len() as usize) < QUOTED_PORTS_END
    {
        return Ok(false);
    }
    let Some(icmp_type) = ptr_at::<u8>(ctx, L4_OFF) else {
        return Ok(false);
    };
    // SAFETY: bounds checked by ptr_at.
    let icmp_type = unsafe { *icmp_type };
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return Ok(false);
    }
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, INNER_OFF) else {
        return Ok(false);
    };
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { *inner };
    if inner.header_len() != IPV4_HLEN || (inner.protocol != 6 && inner.protocol != 17) {
        return Ok(false);
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, INNER_L4_OFF) else {
        return Ok(false);
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    let (isport, idport) = ([ports[0], ports[1]], [ports[2], ports[3]]);
    // The quoted packet went client → backend; its replies are keyed backend → client.
    let key = CtKey {
        saddr: inner.daddr,
        daddr: inner.saddr,
        sport: u16::from_be_bytes(idport),
        dport: u16::from_be_bytes(isport),
        proto: inner.protocol,
        _pad: [0; 3],
    };
    // SAFETY: read-only copy.
    let Some(entry) = (unsafe { FE_CT.get(&key) }).copied() else {
        return Ok(false);
    };
    if entry.flags & ct_flags::REPLY == 0 {
        return Ok(false);
    }
    let snat = entry.flags & ct_flags::SNAT != 0;
    let outer_saddr = outer.saddr;
    let outer_daddr = outer.daddr;

    // Quoted packet: destination back to the Service.
    inner_rewrite(ctx, INNER_OFF + 16, inner.daddr, entry.addr)?;
    inner_port(ctx, INNER_L4_OFF + 2, idport, entry.port.to_be_bytes())?;
    if snat {
        inner_rewrite(ctx, INNER_OFF + 12, inner.saddr, entry.snat_addr)?;
        inner_port(ctx, INNER_L4_OFF, isport, entry.snat_port.to_be_bytes())?;
        outer_rewrite(ctx, ETH_HLEN + 16, outer_daddr, entry.snat_addr)?;
    }
    if outer_saddr == inner.daddr {
        outer_rewrite(ctx, ETH_HLEN + 12, outer_saddr, entry.addr)?;
    }
    Ok(true)
}

/// An address inside the quoted header: its bytes and the quoted header
/// checksum change, and the ICMP checksum follows both.
#[inline(always)]
fn inner_rewrite(ctx: &TcContext, offset: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    let old_check = ctx.load::<[u8; 2]>(INNER_CSUM_OFF).map_err(|_| ())?;
    ctx.l3_csum_replace(INNER_CSUM_OFF, from, to, 4)
        .map_err(|_| ())?;
    let new_check = ctx.load::<[u8; 2]>(INNER_CSUM_OFF).map_err(|_| ())?;
    ctx.store(offset, &new, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, from, to, 4)
        .map_err(|_| ())?;
    let (old_check, new_check) = (
        u16::from_ne_bytes(old_check) as u64,
        u16::from_ne_bytes(new_check) as u64,
    );
    ctx.l4_csum_replace(ICMP_CSUM_OFF, old_check, new_check, 2)
        .map_err(|_| ())
}

#[inline(always)]
fn inner_port(ctx: &TcContext, offset: usize, old: [u8; 2], new: [u8; 2]) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.store(offset, &new, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(
        ICMP_CSUM_OFF,
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )
    .map_err(|_| ())
}

/// An outer address: ICMP has no pseudo-header, so only the IPv4 checksum.
#[inline(always)]
fn outer_rewrite(ctx: &TcContext, offset: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(
        OUTER_CSUM_OFF,
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
        4,
    )
    .map_err(|_| ())?;
    ctx.store(offset, &new, 0).map_err(|_| ())
}
