//! Per-CPU counters (verdicts and drop reasons) and per-peer traffic statistics.

use fabedge_common::{Counter, peer_kind};

use crate::maps::{FE_COUNTERS, FE_PEER_STATS, peer, peers_at};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = FE_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn peer_tx(peer_id: u16, bytes: u32) {
    if let Some(stats) = FE_PEER_STATS.get_ptr_mut(peer_id as u32) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*stats).tx_packets += 1;
            (*stats).tx_bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn peer_rx(peer_id: u16, bytes: u32) {
    if let Some(stats) = FE_PEER_STATS.get_ptr_mut(peer_id as u32) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*stats).rx_packets += 1;
            (*stats).rx_bytes += bytes as u64;
        }
    }
}

/// Flannel VXLAN the connector took over from the cloud VTEP at `outer_src`:
/// received from that VTEP (`bytes`: the inner frame, as the TX side counts).
/// Nothing is counted when the address belongs to no VTEP (or when a
/// tunnel peer with a lower id shares it: the index keeps one id per address).
#[inline(always)]
pub fn vtep_rx(outer_src: [u8; 4], bytes: u32) {
    let Some(at) = peers_at(outer_src) else {
        return;
    };
    if matches!(peer(at.peer_id), Some(p) if p.kind == peer_kind::FLANNEL_VTEP) {
        peer_rx(at.peer_id, bytes);
    }
}
