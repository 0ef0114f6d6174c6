//! Per-CPU counters (verdicts and drop reasons) and per-peer traffic statistics.

use fabedge_common::Counter;

use crate::maps::{FE_COUNTERS, FE_PEER_STATS};

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
