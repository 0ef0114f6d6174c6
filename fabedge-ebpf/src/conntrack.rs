//! Service conntrack (`FE_CT`): one entry per direction of a translated flow,
//! keyed by the tuple exactly as it is on the wire where it is looked up, so
//! every packet costs one hash lookup and no normalisation. The agent
//! expires entries (`fabedge-agent/src/services/ctgc.rs`) and deletes those of removed backends; the
//! LRU bounds the table whatever happens.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use fabedge_common::services::{CtEntry, CtKey, ct_flags};

use crate::maps::FE_CT;

/// TCP flags byte bits we track.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The L4 five-tuple of a packet, ports host order.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    #[inline(always)]
    pub fn key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The entry for `tuple`, refreshed (timestamp, closing state) as a side
/// effect: a copy, so the caller never holds a pointer into an LRU slot.
#[inline(always)]
pub fn lookup(tuple: &Tuple, tcp_flags: u8) -> Option<CtEntry> {
    let entry = FE_CT.get_ptr_mut(tuple.key())?;
    // SAFETY: a valid map value pointer; concurrent updates of the timestamp
    // and flags from other CPUs are benign (last writer wins).
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*entry).flags |= ct_flags::CLOSING;
        }
        if (*entry).flags & ct_flags::REPLY != 0 {
            (*entry).flags |= ct_flags::SEEN_REPLY;
        }
        Some(*entry)
    }
}

/// Insert an entry unless one exists (`BPF_NOEXIST`). Err: taken or no room.
#[inline(always)]
pub fn create(key: &CtKey, entry: &CtEntry) -> Result<(), i32> {
    FE_CT.insert(key, entry, aya_ebpf::bindings::BPF_NOEXIST as u64)
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    let _ = FE_CT.remove(key);
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}
