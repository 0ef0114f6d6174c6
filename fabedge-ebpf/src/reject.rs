//! Answers for a Service with no endpoints, the way kube-proxy's REJECT
//! rules answer: TCP RST (RFC 793 rules for the sequence numbers) or ICMP
//! port unreachable quoting the datagram, from the Service address. The
//! reply is built in place over the client's packet and redirected out of
//! the bridge it came in on, so the client fails at once instead of retrying.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use fabedge_common::Counter;

use crate::{
    conntrack::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple},
    csum,
    nat::{IPPROTO_ICMP, IPPROTO_TCP, L4_OFF},
    parse::{ETH_HLEN, EthHdr, IPV4_HLEN, ptr_at},
    stats::count,
    verdict::drop,
};

const TCP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes: the IPv4 header and the first 8 bytes after it.
const QUOTE_LEN: usize = IPV4_HLEN + 8;

#[inline(always)]
pub fn reject(ctx: &TcContext, t: &Tuple, tcp_flags: u8) -> i32 {
    let built = if t.proto == IPPROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            // Never answer a RST.
            return drop(Counter::DropNoEndpoints);
        }
        tcp_reset(ctx, t, tcp_flags)
    } else {
        port_unreachable(ctx, t)
    };
    if built.is_err() {
        return drop(Counter::DropNoEndpoints);
    }
    count(Counter::ServiceRejected);
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Swap the Ethernet addresses and write a fresh IPv4 header from `t.daddr`
/// to `t.saddr`.
#[inline(always)]
fn reply_headers(ctx: &TcContext, t: &Tuple, proto: u8, l4_len: usize) -> Result<(), ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let src = (*eth).src;
        (*eth).src = (*eth).dst;
        (*eth).dst = src;
    }
    let total = (IPV4_HLEN + l4_len) as u16;
    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&t.daddr);
    ip[16..20].copy_from_slice(&t.saddr);
    let check = csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let dst = ptr_at::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *dst = ip };
    Ok(())
}

#[inline(always)]
fn tcp_reset(ctx: &TcContext, t: &Tuple, tcp_flags: u8) -> Result<(), ()> {
    let ip_total = ctx.load::<[u8; 2]>(ETH_HLEN + 2).map_err(|_| ())?;
    let hdr = ctx.load::<[u8; TCP_HLEN]>(L4_OFF).map_err(|_| ())?;
    let seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let ack = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let doff = ((hdr[12] >> 4) as u32) * 4;
    let payload = (u16::from_be_bytes(ip_total) as u32).saturating_sub(IPV4_HLEN as u32 + doff);
    let seg_len = payload + (tcp_flags & TCP_SYN != 0) as u32 + (tcp_flags & TCP_FIN != 0) as u32;
    let (rst_seq, rst_ack, flags) = if tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        (0, seq.wrapping_add(seg_len), TCP_RST | TCP_ACK)
    };
    // SAFETY: plain helper call; pointers are re-derived afterwards.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (L4_OFF + TCP_HLEN) as u32, 0) } != 0 {
        return Err(());
    }
    reply_headers(ctx, t, IPPROTO_TCP, TCP_HLEN)?;
    let mut tcp = [0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&t.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&t.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[12] = (TCP_HLEN as u8 / 4) << 4;
    tcp[13] = flags;
    // Pseudo header: addresses, protocol, TCP length.
    let mut sum = pair_sum(&t.daddr) + pair_sum(&t.saddr) + IPPROTO_TCP as u32 + TCP_HLEN as u32;
    let mut i = 0;
    while i < TCP_HLEN {
        sum += u16::from_be_bytes([tcp[i], tcp[i + 1]]) as u32;
        i += 2;
    }
    tcp[16..18].copy_from_slice(&csum::fold(sum).to_be_bytes());
    let dst = ptr_at::<[u8; TCP_HLEN]>(ctx, L4_OFF).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *dst = tcp };
    Ok(())
}

#[inline(always)]
fn port_unreachable(ctx: &TcContext, t: &Tuple) -> Result<(), ()> {
    let quote = ctx.load::<[u8; QUOTE_LEN]>(ETH_HLEN).map_err(|_| ())?;
    // SAFETY: plain helper call; pointers are re-derived afterwards.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (L4_OFF + ICMP_HLEN + QUOTE_LEN) as u32, 0) } != 0
    {
        return Err(());
    }
    reply_headers(ctx, t, IPPROTO_ICMP, ICMP_HLEN + QUOTE_LEN)?;
    let mut icmp = [0u8; ICMP_HLEN + QUOTE_LEN];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 3; // port unreachable
    let mut i = 0;
    while i < QUOTE_LEN {
        icmp[ICMP_HLEN + i] = quote[i];
        i += 1;
    }
    let mut sum = 0u32;
    let mut i = 0;
    while i < ICMP_HLEN + QUOTE_LEN {
        sum += u16::from_be_bytes([icmp[i], icmp[i + 1]]) as u32;
        i += 2;
    }
    icmp[2..4].copy_from_slice(&csum::fold(sum).to_be_bytes());
    let dst = ptr_at::<[u8; ICMP_HLEN + QUOTE_LEN]>(ctx, L4_OFF).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *dst = icmp };
    Ok(())
}

#[inline(always)]
fn pair_sum(addr: &[u8; 4]) -> u32 {
    u16::from_be_bytes([addr[0], addr[1]]) as u32 + u16::from_be_bytes([addr[2], addr[3]]) as u32
}
