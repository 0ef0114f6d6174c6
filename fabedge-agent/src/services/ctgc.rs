//! Conntrack garbage collection for `FE_CT` and `FE_AFFINITY`. The LRU
//! bounds the tables; this expires what is idle, so a closed TCP connection
//! or a finished DNS query frees its slot (and its source port at the
//! ClusterIP) quickly instead of when memory pressure evicts it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use fabedge_common::services::{CtEntry, CtKey, ct_flags};

use crate::maps::Maps;

/// Idle time after which an entry is deleted, by state. The choices follow
/// the kernel's nf_conntrack defaults, shortened where a stale entry costs
/// more than a new balancing decision.
pub mod timeout {
    pub const TCP_ESTABLISHED_S: u64 = 6 * 3600;
    /// A SYN that got no answer, as nf_conntrack's SYN_SENT (120 s), shortened.
    pub const TCP_UNANSWERED_S: u64 = 60;
    /// FIN or RST seen (nf_conntrack: TIME_WAIT 120 s; CLOSE 10 s).
    pub const TCP_CLOSING_S: u64 = 10;
    /// nf_conntrack's UDP stream timeout.
    pub const UDP_S: u64 = 120;
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long an entry may stay idle.
pub fn idle_limit_ns(entry: &CtEntry) -> u64 {
    let seconds = match entry.proto {
        6 if entry.flags & ct_flags::CLOSING != 0 => timeout::TCP_CLOSING_S,
        6 if entry.flags & ct_flags::SEEN_REPLY == 0 && entry.flags & ct_flags::REPLY != 0 => {
            timeout::TCP_UNANSWERED_S
        }
        6 => timeout::TCP_ESTABLISHED_S,
        _ => timeout::UDP_S,
    };
    seconds * 1_000_000_000
}

/// How often `run` collects.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// One collection with each frontend's affinity timeout; errors are logged
/// (the next tick retries), never fatal.
pub fn collect_and_log(maps: &mut Maps) {
    // The timeouts matter to affinity entries only: with none (no client of
    // a ClientIP Service lately) FE_SERVICES is not read, which at 10 k
    // Services is most of an idle agent's work. One that appears meanwhile
    // is kept until the next collection.
    let no_affinity = maps.affinity.keys().next().is_none();
    let timeouts: Option<std::collections::BTreeMap<u32, u64>> = if no_affinity {
        None
    } else {
        match maps.service_entries() {
            Ok(entries) => Some(
                entries
                    .into_iter()
                    .map(|(_, e)| (e.id, e.affinity_timeout as u64))
                    .collect(),
            ),
            Err(e) => return log::warn!("conntrack GC: {e:#}"),
        }
    };
    match collect(maps, monotonic_ns(), |id| match &timeouts {
        Some(timeouts) => timeouts.get(&id).copied().unwrap_or(0),
        None => u64::from(u32::MAX),
    }) {
        Ok(report) if report != GcReport::default() => log::debug!("conntrack GC: {report:?}"),
        Ok(_) => {}
        Err(e) => log::warn!("conntrack GC: {e:#}"),
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub ct_expired: usize,
    pub affinity_expired: usize,
}

/// The reply-direction key of a forward entry.
pub fn reply_key(key: &CtKey, entry: &CtEntry) -> CtKey {
    let (daddr, dport) = if entry.flags & ct_flags::SNAT != 0 {
        (entry.snat_addr, entry.snat_port)
    } else {
        (key.saddr, key.sport)
    };
    CtKey {
        saddr: entry.addr,
        daddr,
        sport: entry.port,
        dport,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// Delete expired entries. A flow's two entries expire together, judged on
/// the pair: the later timestamp, and the reply entry's state (it alone
/// learns whether the backend answered).
pub fn collect(
    maps: &mut Maps,
    now_ns: u64,
    affinity_timeout_s: impl Fn(u32) -> u64,
) -> Result<GcReport> {
    let mut report = GcReport::default();
    let entries: BTreeMap<CtKey, CtEntry> = maps.ct_entries()?.into_iter().collect();
    let mut paired = BTreeSet::new();
    let mut expired = Vec::new();
    for (key, entry) in entries
        .iter()
        .filter(|(_, e)| e.flags & ct_flags::FORWARD != 0)
    {
        let rkey = reply_key(key, entry);
        let mut judged = *entry;
        if let Some(reply) = entries.get(&rkey) {
            paired.insert(rkey);
            judged.flags = reply.flags | (entry.flags & ct_flags::CLOSING);
            judged.last_seen_ns = entry.last_seen_ns.max(reply.last_seen_ns);
        }
        if now_ns.saturating_sub(judged.last_seen_ns) > idle_limit_ns(&judged) {
            expired.push(*key);
            if paired.contains(&rkey) {
                expired.push(rkey);
            }
        }
    }
    for (key, entry) in entries
        .iter()
        .filter(|(k, e)| e.flags & ct_flags::FORWARD == 0 && !paired.contains(k))
    {
        if now_ns.saturating_sub(entry.last_seen_ns) > idle_limit_ns(entry) {
            expired.push(*key);
        }
    }
    for key in &expired {
        // Gone already if the LRU evicted it meanwhile.
        let _ = maps.ct.remove(key);
    }
    report.ct_expired = expired.len();
    for (key, entry) in maps.affinity_entries()? {
        if now_ns.saturating_sub(entry.last_seen_ns)
            > affinity_timeout_s(key.service_id) * 1_000_000_000
        {
            let _ = maps.affinity.remove(&key);
            report.affinity_expired += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(proto: u8, flags: u8) -> CtEntry {
        CtEntry {
            proto,
            flags,
            ..CtEntry::default()
        }
    }

    #[test]
    fn closing_tcp_expires_in_seconds_and_established_tcp_in_hours() {
        let closing = idle_limit_ns(&entry(6, ct_flags::FORWARD | ct_flags::CLOSING));
        let established = idle_limit_ns(&entry(6, ct_flags::REPLY | ct_flags::SEEN_REPLY));
        assert_eq!(closing, 10_000_000_000);
        assert!(established >= 3600 * 1_000_000_000);
        assert_eq!(
            idle_limit_ns(&entry(6, ct_flags::REPLY)),
            60_000_000_000,
            "SYN never answered"
        );
        assert_eq!(
            idle_limit_ns(&entry(17, ct_flags::FORWARD)),
            120_000_000_000
        );
    }
}
