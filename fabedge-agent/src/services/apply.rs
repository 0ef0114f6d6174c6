//! Write the Service translation maps from a [`ServicePlan`], diffing
//! against what they hold. Order keeps every packet's lookup consistent:
//! frontends that go removed first (their ids may be reused) with the
//! backends only they pointed at (room in a full map), backends before the
//! frontends that count them, the other backends that go removed last. Conntrack and affinity entries pointing at backends that
//! left their Service are deleted, so those flows fail fast (the next packet
//! is balanced again: a TCP peer that never saw the connection answers RST,
//! a UDP flow simply moves) instead of hanging on a dead address.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use fabedge_common::services::{CtKey, ServiceEntry, ServiceKey, ct_flags};
use log::info;

use super::plan::{ServicePlan, reuse_ids};
use crate::maps::Maps;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceReport {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    /// Conntrack entries of flows whose backend was removed.
    pub flows_purged: usize,
}

impl ServiceReport {
    pub fn changes(&self) -> usize {
        self.frontends_written
            + self.frontends_removed
            + self.backends_written
            + self.backends_removed
            + self.flows_purged
    }
}

pub fn apply_services(maps: &mut Maps, planned: &ServicePlan) -> Result<ServiceReport> {
    let mut report = ServiceReport::default();
    // Skipped Services are reported by the caller once per change (the
    // agent's problem list), not here on every pass.
    maps.set_gauge(
        fabedge_common::Counter::ServicesNotProgrammed,
        planned.skipped.len() as u64,
    )?;
    let current: BTreeMap<ServiceKey, ServiceEntry> = maps.service_entries()?.into_iter().collect();
    let mut plan = planned.clone();
    reuse_ids(&mut plan, &current);

    // Frontends that go are removed first: a new Service may reuse a freed
    // id, and its backends must never be written under an id a ClusterIP
    // still points at (that would send it to another Service's pods); it
    // also frees room, so a full map can swap one Service for another.
    for key in current.keys().filter(|k| !plan.frontends.contains_key(k)) {
        maps.services
            .remove(key)
            .with_context(|| format!("removing {} from FE_SERVICES", describe(key)))?;
        report.frontends_removed += 1;
    }
    // Backends no frontend left in the map points at (their Services just
    // went) go now, not last: a full FE_BACKENDS needs their room for the
    // new Services' backends.
    let referenced: BTreeSet<u32> = current
        .iter()
        .filter(|(key, _)| plan.frontends.contains_key(key))
        .map(|(_, entry)| entry.id)
        .collect();
    for key in maps
        .backend_entries()?
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| !referenced.contains(&key.service_id))
    {
        maps.backends.remove(&key).with_context(|| {
            format!(
                "removing backend {}/{} from FE_BACKENDS",
                key.service_id, key.slot
            )
        })?;
        report.backends_removed += 1;
    }
    let wanted_backends = plan.backend_map();
    let current_backends: BTreeMap<_, _> = maps.backend_entries()?.into_iter().collect();
    for (key, backend) in &wanted_backends {
        if current_backends.get(key) != Some(backend) {
            maps.backends.insert(key, backend, 0).with_context(|| {
                format!(
                    "writing backend {}/{} to FE_BACKENDS (is the map full?)",
                    key.service_id, key.slot
                )
            })?;
            report.backends_written += 1;
        }
    }
    for (key, frontend) in &plan.frontends {
        if current.get(key) != Some(&frontend.entry) {
            maps.services
                .insert(key, frontend.entry, 0)
                .with_context(|| {
                    format!(
                        "writing service {} to FE_SERVICES (is the map full?)",
                        frontend.name
                    )
                })?;
            report.frontends_written += 1;
        }
    }
    for key in current_backends
        .keys()
        .filter(|k| !wanted_backends.contains_key(k))
    {
        maps.backends.remove(key).with_context(|| {
            format!(
                "removing backend {}/{} from FE_BACKENDS",
                key.service_id, key.slot
            )
        })?;
        report.backends_removed += 1;
    }

    // Flows whose backend is no longer one of their frontend's.
    let live: BTreeMap<u32, BTreeSet<([u8; 4], u16)>> = plan
        .frontends
        .values()
        .map(|f| {
            (
                f.entry.id,
                f.backends.iter().map(|b| (b.addr, b.port)).collect(),
            )
        })
        .collect();
    let alive = |service_id: u32, backend: ([u8; 4], u16)| {
        live.get(&service_id)
            .is_some_and(|set| set.contains(&backend))
    };
    let stale: Vec<CtKey> = maps
        .ct_entries()?
        .into_iter()
        .filter(|(key, entry)| {
            let backend = if entry.flags & ct_flags::FORWARD != 0 {
                (entry.addr, entry.port)
            } else {
                (key.saddr, key.sport)
            };
            !alive(entry.service_id, backend)
        })
        .map(|(key, _)| key)
        .collect();
    for key in &stale {
        // An LRU entry may have gone by itself meanwhile.
        let _ = maps.ct.remove(key);
        report.flows_purged += 1;
    }
    let stale_affinity: Vec<_> = maps
        .affinity_entries()?
        .into_iter()
        .filter(|(key, entry)| !alive(key.service_id, (entry.backend.addr, entry.backend.port)))
        .map(|(key, _)| key)
        .collect();
    for key in &stale_affinity {
        let _ = maps.affinity.remove(key);
    }
    if report.changes() > 0 {
        info!("services: {report:?}");
    }
    Ok(report)
}

pub fn describe(key: &ServiceKey) -> String {
    let proto = match key.proto {
        6 => "TCP",
        17 => "UDP",
        _ => "?",
    };
    format!(
        "{}:{}/{proto}",
        std::net::Ipv4Addr::from(key.addr),
        key.port
    )
}
