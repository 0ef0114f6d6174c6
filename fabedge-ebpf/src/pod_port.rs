//! `fe_pod_port`: TC ingress of each pod's host-side veth (a port of
//! `br-fabedge`), where every frame a pod sends enters the host, bridged to
//! a neighbour pod or routed alike. A pod speaks only from the address its
//! CNI gave it (the agent's `FE_POD_PORTS` entry for this port): IPv4 from
//! another source and ARP claiming another address are dropped before the
//! bridge learns or forwards anything. Everything else passes uncounted, as
//! does all of a port the agent has not learned yet.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use fabedge_common::Counter;

use crate::{
    maps::pod_port,
    parse::{self, ETH_HLEN, L3, ptr_at},
    verdict::drop,
};

const ETH_P_ARP: u16 = 0x0806;
/// The ARP sender protocol address: after hardware and protocol types,
/// their lengths, the operation and the sender's hardware address.
const ARP_SPA_OFF: usize = ETH_HLEN + 2 + 2 + 1 + 1 + 2 + 6;

#[classifier]
pub fn fe_pod_port(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the skb the program runs on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(own) = pod_port(ifindex) else {
        return TC_ACT_OK as i32;
    };
    match parse::ipv4(&ctx) {
        L3::Ipv4(ip) if ip.saddr != own => drop(Counter::DropPodSpoofed),
        L3::Ipv4(_) => TC_ACT_OK as i32,
        L3::Malformed => drop(Counter::DropMalformed),
        L3::Other => arp(&ctx, own),
    }
}

/// ARP (or anything else that is not IPv4): an ARP sender address other
/// than the pod's own, or 0.0.0.0 (an RFC 5227 probe, which updates no
/// neighbour), claims a neighbour's address.
#[inline(always)]
fn arp(ctx: &TcContext, own: [u8; 4]) -> i32 {
    let Some(eth) = ptr_at::<parse::EthHdr>(ctx, 0) else {
        return drop(Counter::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be_bytes(unsafe { (*eth).ether_type }) != ETH_P_ARP {
        return TC_ACT_OK as i32;
    }
    let Some(spa) = ptr_at::<[u8; 4]>(ctx, ARP_SPA_OFF) else {
        return drop(Counter::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let spa = unsafe { *spa };
    if spa == own || spa == [0; 4] {
        TC_ACT_OK as i32
    } else {
        drop(Counter::DropPodSpoofed)
    }
}
