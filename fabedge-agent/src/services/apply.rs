//! Write the Service translation maps from a [`ServicePlan`], diffing
//! against a [`ServiceShadow`]: what this agent wrote, kept in memory (read
//! from the kernel once, at start-up, so a restarted agent adopts what its
//! predecessor left). A change writes only the entries that differ; the
//! maps are not dumped on every pass.
//!
//! Backend slots are stable: a backend keeps its slot while it stays in its
//! Service, a new one takes the slot a removed one left (or the next one),
//! and when the Service shrinks the backends above its new count move down
//! into the holes. One endpoint added, removed or replaced rewrites one or
//! two slots, not the whole Service.
//!
//! Order keeps every packet's lookup consistent: frontends that go are
//! removed first (their ids may be reused) with the backends only they
//! pointed at (room in a full map); then per frontend its backends before
//! the frontend entry that counts them, and the slots above its new count
//! after it. Conntrack and affinity entries pointing at backends that left
//! their Service are deleted, so those flows fail fast (the next packet is
//! balanced again: a TCP peer that never saw the connection answers RST, a
//! UDP flow simply moves) instead of hanging on a dead address.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use fabedge_common::services::{Backend, BackendKey, CtKey, ServiceEntry, ServiceKey, ct_flags};
use log::info;

use super::plan::{Frontend, ServicePlan, frontend_ids};
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

/// What `FE_SERVICES` and `FE_BACKENDS` hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTables {
    pub frontends: BTreeMap<ServiceKey, ServiceEntry>,
    pub backends: BTreeMap<BackendKey, Backend>,
}

impl ServiceTables {
    /// Both maps, dumped from the kernel.
    pub fn read(maps: &Maps) -> Result<Self> {
        Ok(ServiceTables {
            frontends: maps.service_entries()?.into_iter().collect(),
            backends: maps.backend_entries()?.into_iter().collect(),
        })
    }

    /// The backends of service `id`, by slot.
    pub fn slots(&self, id: u32) -> impl Iterator<Item = (&BackendKey, &Backend)> {
        self.backends.range(
            BackendKey {
                service_id: id,
                slot: 0,
            }..=BackendKey {
                service_id: id,
                slot: u32::MAX,
            },
        )
    }

    /// What the datapath makes of the maps, ids and slot order aside: each
    /// frontend with its entry (id zeroed) and the backends in its slots
    /// `0..count` as a sorted list. Two tables that agree here translate
    /// every packet alike.
    pub fn meaning(&self) -> BTreeMap<ServiceKey, (ServiceEntry, Vec<Option<Backend>>)> {
        self.frontends
            .iter()
            .map(|(key, entry)| {
                let mut backends: Vec<Option<Backend>> = (0..u32::from(entry.count))
                    .map(|slot| {
                        self.backends
                            .get(&BackendKey {
                                service_id: entry.id,
                                slot,
                            })
                            .copied()
                    })
                    .collect();
                backends.sort_by_key(|b| b.map(|b| (b.addr, b.port, b.flags)));
                (*key, (ServiceEntry { id: 0, ..*entry }, backends))
            })
            .collect()
    }
}

/// The writes a Service sync makes: the pinned maps, or a
/// [`ServiceTables`] standing in for them (tests).
pub trait ServiceMaps {
    fn write_frontend(&mut self, key: &ServiceKey, entry: ServiceEntry) -> Result<()>;
    fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()>;
    fn write_backend(&mut self, key: &BackendKey, backend: Backend) -> Result<()>;
    fn remove_backend(&mut self, key: &BackendKey) -> Result<()>;
}

impl ServiceMaps for Maps {
    fn write_frontend(&mut self, key: &ServiceKey, entry: ServiceEntry) -> Result<()> {
        Ok(self.services.insert(key, entry, 0)?)
    }

    fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
        Ok(self.services.remove(key)?)
    }

    fn write_backend(&mut self, key: &BackendKey, backend: Backend) -> Result<()> {
        Ok(self.backends.insert(key, backend, 0)?)
    }

    fn remove_backend(&mut self, key: &BackendKey) -> Result<()> {
        Ok(self.backends.remove(key)?)
    }
}

impl ServiceMaps for ServiceTables {
    fn write_frontend(&mut self, key: &ServiceKey, entry: ServiceEntry) -> Result<()> {
        self.frontends.insert(*key, entry);
        Ok(())
    }

    fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
        self.frontends
            .remove(key)
            .map(drop)
            .context("no such frontend")
    }

    fn write_backend(&mut self, key: &BackendKey, backend: Backend) -> Result<()> {
        self.backends.insert(*key, backend);
        Ok(())
    }

    fn remove_backend(&mut self, key: &BackendKey) -> Result<()> {
        self.backends
            .remove(key)
            .map(drop)
            .context("no such backend")
    }
}

/// One write, with the value it replaced (`None`: the key was absent).
#[derive(Debug, Clone, Copy)]
enum Undo {
    Frontend(ServiceKey, Option<ServiceEntry>),
    Backend(BackendKey, Option<Backend>),
}

/// A backend as a Service's member: its address and port.
type Member = ([u8; 4], u16);

fn member(backend: &Backend) -> Member {
    (backend.addr, backend.port)
}

/// The agent's copy of the Service maps and the writes that keep them
/// equal to a plan.
#[derive(Debug, Clone, Default)]
pub struct ServiceShadow {
    /// What the maps hold: each write lands here once the kernel took it.
    held: ServiceTables,
    /// The writes since [`ServiceShadow::begin`], oldest first.
    journal: Vec<Undo>,
    /// Read from the kernel and not synced since: the first sync also
    /// clears backends no frontend points at, and checks every flow.
    adopted: bool,
}

/// What a sync changed, and which backends left which service ids.
#[derive(Debug, Default)]
struct Sync {
    report: ServiceReport,
    left: BTreeSet<(u32, Member)>,
}

impl ServiceShadow {
    /// Adopt what the maps hold now (the agent's start).
    pub fn read(maps: &Maps) -> Result<Self> {
        Ok(Self::adopt(ServiceTables::read(maps)?))
    }

    /// Adopt `held` as what the maps hold.
    pub fn adopt(held: ServiceTables) -> Self {
        ServiceShadow {
            held,
            journal: Vec::new(),
            adopted: true,
        }
    }

    pub fn held(&self) -> &ServiceTables {
        &self.held
    }

    /// Start a new journal: [`ServiceShadow::undo`] takes back what is
    /// written from now on.
    pub fn begin(&mut self) {
        self.journal.clear();
    }

    /// The writes since [`ServiceShadow::begin`] stay: nothing will take
    /// them back, and the journal's memory goes (a full sync at 10 k
    /// Services journals 100 k writes, about 3 MB).
    pub fn commit(&mut self) {
        self.journal = Vec::new();
    }

    /// Take back every write since [`ServiceShadow::begin`], newest first:
    /// the maps pass through the same consistent states as on the way in.
    pub fn undo(&mut self, maps: &mut impl ServiceMaps) -> Result<()> {
        while let Some(undo) = self.journal.pop() {
            let taken_back = self.journal.len();
            match undo {
                Undo::Frontend(key, before) => self.put_frontend(maps, &key, before)?,
                Undo::Backend(key, before) => self.put_backend(maps, &key, before)?,
            }
            // Taking back is not itself journaled.
            self.journal.truncate(taken_back);
        }
        Ok(())
    }

    fn put_frontend(
        &mut self,
        maps: &mut impl ServiceMaps,
        key: &ServiceKey,
        entry: Option<ServiceEntry>,
    ) -> Result<()> {
        let before = self.held.frontends.get(key).copied();
        if before == entry {
            return Ok(());
        }
        match entry {
            Some(entry) => maps.write_frontend(key, entry).with_context(|| {
                format!(
                    "writing frontend {} to FE_SERVICES (is the map full?)",
                    describe(key)
                )
            })?,
            None => maps
                .remove_frontend(key)
                .with_context(|| format!("removing {} from FE_SERVICES", describe(key)))?,
        }
        match entry {
            Some(entry) => self.held.frontends.insert(*key, entry),
            None => self.held.frontends.remove(key),
        };
        self.journal.push(Undo::Frontend(*key, before));
        Ok(())
    }

    fn put_backend(
        &mut self,
        maps: &mut impl ServiceMaps,
        key: &BackendKey,
        backend: Option<Backend>,
    ) -> Result<()> {
        let before = self.held.backends.get(key).copied();
        if before == backend {
            return Ok(());
        }
        match backend {
            Some(backend) => maps.write_backend(key, backend).with_context(|| {
                format!(
                    "writing backend {}/{} to FE_BACKENDS (is the map full?)",
                    key.service_id, key.slot
                )
            })?,
            None => maps.remove_backend(key).with_context(|| {
                format!(
                    "removing backend {}/{} from FE_BACKENDS",
                    key.service_id, key.slot
                )
            })?,
        }
        match backend {
            Some(backend) => self.held.backends.insert(*key, backend),
            None => self.held.backends.remove(key),
        };
        self.journal.push(Undo::Backend(*key, before));
        Ok(())
    }

    /// Remove every backend of service `id`, noting them as left.
    fn clear_service(
        &mut self,
        maps: &mut impl ServiceMaps,
        id: u32,
        sync: &mut Sync,
    ) -> Result<()> {
        let slots: Vec<(BackendKey, Backend)> =
            self.held.slots(id).map(|(k, b)| (*k, *b)).collect();
        for (key, backend) in slots {
            self.put_backend(maps, &key, None)?;
            sync.left.insert((id, member(&backend)));
            sync.report.backends_removed += 1;
        }
        Ok(())
    }

    /// Make the maps hold `plan`, writing only what differs from what they hold.
    fn sync(&mut self, maps: &mut impl ServiceMaps, plan: &ServicePlan) -> Result<Sync> {
        let mut sync = Sync::default();
        let ids = frontend_ids(plan, &self.held.frontends);

        // Frontends that go, first: a new frontend may reuse a freed id,
        // and its backends must never be written under an id a ClusterIP
        // still points at (that would send it to another Service's pods).
        // Their backends go with them: room for the new ones in a full map.
        let referenced: BTreeSet<u32> = self
            .held
            .frontends
            .iter()
            .filter(|(key, _)| plan.frontends.contains_key(key))
            .map(|(_, entry)| entry.id)
            .collect();
        let gone: Vec<(ServiceKey, u32)> = self
            .held
            .frontends
            .iter()
            .filter(|(key, _)| !plan.frontends.contains_key(key))
            .map(|(key, entry)| (*key, entry.id))
            .collect();
        for (key, _) in &gone {
            self.put_frontend(maps, key, None)?;
            sync.report.frontends_removed += 1;
        }
        let mut orphans: BTreeSet<u32> = gone.iter().map(|(_, id)| *id).collect();
        if self.adopted {
            // Left by a predecessor that stopped midway.
            orphans.extend(self.held.backends.keys().map(|k| k.service_id));
        }
        for id in orphans.difference(&referenced) {
            self.clear_service(maps, *id, &mut sync)?;
        }

        for (key, frontend) in &plan.frontends {
            self.sync_frontend(maps, key, frontend, ids[key], &mut sync)?;
        }
        Ok(sync)
    }

    /// Make frontend `key` (id `id`) and its slots hold `frontend`.
    fn sync_frontend(
        &mut self,
        maps: &mut impl ServiceMaps,
        key: &ServiceKey,
        frontend: &Frontend,
        id: u32,
        sync: &mut Sync,
    ) -> Result<()> {
        let held: Vec<(BackendKey, Backend)> = self.held.slots(id).map(|(k, b)| (*k, *b)).collect();
        // The dense run of slots from 0 is what the layout starts from;
        // anything past a gap (never written by us) goes.
        let dense: Vec<Backend> = held
            .iter()
            .enumerate()
            .take_while(|(i, (k, _))| k.slot == *i as u32)
            .map(|(_, (_, b))| *b)
            .collect();
        let entry = ServiceEntry {
            id,
            ..frontend.entry
        };
        // Unchanged, as all but a few are on a pass: no layout to
        // compute (same backends, in whatever slots).
        if dense.len() == held.len()
            && dense.len() == frontend.backends.len()
            && frontend.backends.iter().all(|b| dense.contains(b))
            && self.held.frontends.get(key) == Some(&entry)
        {
            return Ok(());
        }
        let layout = stable_slots(&dense, &frontend.backends);
        for (slot, backend) in layout.iter().enumerate() {
            if dense.get(slot) != Some(backend) {
                let key = BackendKey {
                    service_id: id,
                    slot: slot as u32,
                };
                self.put_backend(maps, &key, Some(*backend))?;
                sync.report.backends_written += 1;
            }
        }
        if self.held.frontends.get(key) != Some(&entry) {
            self.put_frontend(maps, key, Some(entry))
                .with_context(|| format!("Service frontend {}", frontend.name))?;
            sync.report.frontends_written += 1;
        }
        let members: BTreeSet<Member> = layout.iter().map(member).collect();
        for (key, backend) in &held {
            if !members.contains(&member(backend)) {
                sync.left.insert((id, member(backend)));
            }
            if key.slot as usize >= layout.len() {
                self.put_backend(maps, key, None)?;
                sync.report.backends_removed += 1;
            }
        }
        Ok(())
    }

    /// [`ServiceShadow::sync`] of frontends `keys` only, which keep their
    /// ids: the rest of `plan` is in the maps already (an EndpointSlice
    /// change, see [`super::plan::replan_services`]).
    fn sync_some(
        &mut self,
        maps: &mut impl ServiceMaps,
        plan: &ServicePlan,
        keys: &BTreeSet<ServiceKey>,
    ) -> Result<Sync> {
        let mut sync = Sync::default();
        for key in keys {
            let (Some(frontend), Some(held)) =
                (plan.frontends.get(key), self.held.frontends.get(key))
            else {
                anyhow::bail!(
                    "frontend {} is not both planned and in FE_SERVICES: only a full apply can place it",
                    describe(key)
                );
            };
            let id = held.id;
            self.sync_frontend(maps, key, frontend, id, &mut sync)?;
        }
        Ok(sync)
    }

    /// Whether `backend` is in a slot of service `id` now.
    fn serves(&self, id: u32, backend: Member) -> bool {
        self.held.slots(id).any(|(_, b)| member(b) == backend)
    }

    /// Make the pinned maps hold `plan` (see the module's doc), and purge
    /// the flows and affinities of backends that left their Service.
    pub fn apply(&mut self, maps: &mut Maps, plan: &ServicePlan) -> Result<ServiceReport> {
        // Skipped Services are reported by the caller once per change (the
        // agent's problem list), not here on every pass.
        maps.set_gauge(
            fabedge_common::Counter::ServicesNotProgrammed,
            plan.skipped.len() as u64,
        )?;
        let sync = self.sync(maps, plan)?;
        self.purge(maps, sync)
    }

    /// Make the pinned maps hold `plan`'s frontends `keys` (their backends
    /// changed, nothing else did), and purge the flows of backends that
    /// left them. Refused until a full [`ServiceShadow::apply`] has run.
    pub fn apply_some(
        &mut self,
        maps: &mut Maps,
        plan: &ServicePlan,
        keys: &BTreeSet<ServiceKey>,
    ) -> Result<ServiceReport> {
        anyhow::ensure!(
            !self.adopted,
            "the Service maps were adopted and not yet synced whole"
        );
        let sync = self.sync_some(maps, plan, keys)?;
        self.purge(maps, sync)
    }

    /// Delete the conntrack and affinity entries of backends that left
    /// their Service (every stale one after a start).
    fn purge(&mut self, maps: &mut Maps, sync: Sync) -> Result<ServiceReport> {
        let Sync { mut report, left } = sync;
        // After a start every flow is checked (the predecessor may have
        // stopped before its purge); after that only when a backend left.
        let check_all = std::mem::take(&mut self.adopted);
        if check_all || !left.is_empty() {
            let stale = |service_id: u32, backend: Member| {
                (check_all || left.contains(&(service_id, backend)))
                    && !self.serves(service_id, backend)
            };
            let flows: Vec<CtKey> = maps
                .ct_entries()?
                .into_iter()
                .filter(|(key, entry)| {
                    let backend = if entry.flags & ct_flags::FORWARD != 0 {
                        (entry.addr, entry.port)
                    } else {
                        (key.saddr, key.sport)
                    };
                    stale(entry.service_id, backend)
                })
                .map(|(key, _)| key)
                .collect();
            for key in &flows {
                // An LRU entry may have gone by itself meanwhile.
                let _ = maps.ct.remove(key);
                report.flows_purged += 1;
            }
            let affinities: Vec<_> = maps
                .affinity_entries()?
                .into_iter()
                .filter(|(key, entry)| stale(key.service_id, member(&entry.backend)))
                .map(|(key, _)| key)
                .collect();
            for key in &affinities {
                let _ = maps.affinity.remove(key);
            }
        }
        if report.changes() > 0 {
            info!("services: {report:?}");
        }
        Ok(report)
    }
}

/// Slot order for a Service whose slots hold `held` and which must hold
/// `wanted`: a backend that stays keeps its slot if it is below the new
/// count; holes (backends that left) take the new backends, then the ones
/// stranded above the new count. A Service with nothing held gets
/// `wanted`'s order.
pub fn stable_slots(held: &[Backend], wanted: &[Backend]) -> Vec<Backend> {
    let mut waiting: BTreeMap<Member, Backend> = wanted.iter().map(|b| (member(b), *b)).collect();
    let count = waiting.len();
    let mut layout: Vec<Option<Backend>> = vec![None; count];
    for (slot, backend) in held.iter().enumerate().take(count) {
        layout[slot] = waiting.remove(&member(backend));
    }
    let stranded: Vec<Backend> = held
        .iter()
        .skip(count)
        .filter_map(|b| waiting.remove(&member(b)))
        .collect();
    let new = wanted
        .iter()
        .filter_map(|b| waiting.remove(&member(b)))
        .collect::<Vec<_>>();
    let mut fill = new.into_iter().chain(stranded);
    layout
        .into_iter()
        .map(|slot| slot.or_else(|| fill.next()))
        .collect::<Option<Vec<_>>>()
        .expect("as many backends as slots")
}

/// Make the pinned maps hold `plan`, reading what they hold first: for a
/// one-off apply (tests, tools). The agent keeps a [`ServiceShadow`].
pub fn apply_services(maps: &mut Maps, plan: &ServicePlan) -> Result<ServiceReport> {
    ServiceShadow::read(maps)?.apply(maps, plan)
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

#[cfg(test)]
mod tests {
    use fabedge_common::services::backend_flags;

    use super::*;
    use crate::services::{plan::Frontend, random::Random};

    /// Maps in memory that check, after every single write, what a packet
    /// would meet at that instant: each frontend's slots `0..count` hold a
    /// backend.
    #[derive(Default)]
    struct Watched {
        tables: ServiceTables,
        writes: usize,
    }

    impl Watched {
        fn check(&self) -> Result<()> {
            for (key, entry) in &self.tables.frontends {
                for slot in 0..u32::from(entry.count) {
                    let backend = BackendKey {
                        service_id: entry.id,
                        slot,
                    };
                    anyhow::ensure!(
                        self.tables.backends.contains_key(&backend),
                        "after write {}: {} counts {} backends but slot {slot} is empty",
                        self.writes,
                        describe(key),
                        entry.count
                    );
                }
            }
            Ok(())
        }

        fn wrote(&mut self) -> Result<()> {
            self.writes += 1;
            self.check()
        }
    }

    impl ServiceMaps for Watched {
        fn write_frontend(&mut self, key: &ServiceKey, entry: ServiceEntry) -> Result<()> {
            self.tables.write_frontend(key, entry)?;
            self.wrote()
        }

        fn remove_frontend(&mut self, key: &ServiceKey) -> Result<()> {
            self.tables.remove_frontend(key)?;
            self.wrote()
        }

        fn write_backend(&mut self, key: &BackendKey, backend: Backend) -> Result<()> {
            self.tables.write_backend(key, backend)?;
            self.wrote()
        }

        fn remove_backend(&mut self, key: &BackendKey) -> Result<()> {
            self.tables.remove_backend(key)?;
            self.wrote()
        }
    }

    fn key(n: usize) -> ServiceKey {
        ServiceKey {
            addr: [10, 96, 0, n as u8],
            port: 80,
            proto: 6,
            _pad: 0,
        }
    }

    fn backend(n: usize) -> Backend {
        Backend {
            addr: [10, 234, (n / 8) as u8, (n % 8) as u8],
            port: 8080,
            flags: if n.is_multiple_of(3) {
                backend_flags::LOCAL
            } else {
                0
            },
            _pad: 0,
        }
    }

    fn frontend(n: usize, backends: Vec<Backend>, affinity_timeout: u32) -> Frontend {
        Frontend {
            name: format!("default/svc-{n}:http"),
            entry: ServiceEntry {
                id: 0,
                count: backends.len() as u16,
                flags: 0,
                _pad: 0,
                affinity_timeout,
            },
            backends,
        }
    }

    /// One random change: a Service added or removed, an endpoint added,
    /// removed or replaced, a Service's endpoints all replaced, or its
    /// affinity changed.
    fn change(plan: &mut ServicePlan, random: &mut Random) {
        const FRONTENDS: usize = 8;
        const BACKENDS: usize = 24;
        let n = random.below(FRONTENDS);
        let Some(f) = plan.frontends.get_mut(&key(n)) else {
            let backends = (0..random.below(6)).map(|_| backend(random.below(BACKENDS)));
            let mut backends: Vec<Backend> = backends.collect();
            backends.sort_by_key(member);
            backends.dedup_by_key(|b| member(b));
            plan.frontends.insert(key(n), frontend(n, backends, 0));
            return;
        };
        match random.below(6) {
            0 => {
                plan.frontends.remove(&key(n));
                return;
            }
            1 => f.backends.push(backend(random.below(BACKENDS))),
            2 if !f.backends.is_empty() => {
                let i = random.below(f.backends.len());
                f.backends.remove(i);
            }
            3 if !f.backends.is_empty() => {
                let i = random.below(f.backends.len());
                f.backends[i] = backend(random.below(BACKENDS));
            }
            4 => {
                f.backends = (0..random.below(8))
                    .map(|_| backend(random.below(BACKENDS)))
                    .collect()
            }
            _ => f.entry.affinity_timeout = random.below(3) as u32 * 30,
        }
        f.backends.sort_by_key(member);
        f.backends.dedup_by_key(|b| member(b));
        f.entry.count = f.backends.len() as u16;
    }

    /// Every backend entry belongs to a frontend's slots `0..count`, and ids are unique.
    fn assert_tidy(tables: &ServiceTables) {
        let counts: BTreeMap<u32, u16> =
            tables.frontends.values().map(|e| (e.id, e.count)).collect();
        assert_eq!(counts.len(), tables.frontends.len(), "ids are unique");
        for key in tables.backends.keys() {
            assert!(
                counts
                    .get(&key.service_id)
                    .is_some_and(|count| key.slot < u32::from(*count)),
                "backend {key:?} is outside every frontend's slots"
            );
        }
    }

    #[test]
    fn applying_random_changes_one_by_one_gives_the_maps_a_full_apply_gives() {
        // Changes that keep every frontend (backends only) go through
        // `sync_some` with the changed keys, as an EndpointSlice change does.
        let mut partial = 0;
        for seed in 1..=200u64 {
            let mut random = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut plan = ServicePlan::default();
            let mut maps = Watched::default();
            let mut shadow = ServiceShadow::adopt(ServiceTables::default());
            for step in 0..60 {
                let before = plan.clone();
                change(&mut plan, &mut random);
                let result = if step > 0 && before.frontends.keys().eq(plan.frontends.keys()) {
                    partial += 1;
                    let changed = plan
                        .frontends
                        .iter()
                        .filter(|(key, f)| before.frontends.get(*key) != Some(*f))
                        .map(|(key, _)| *key)
                        .collect();
                    shadow.sync_some(&mut maps, &plan, &changed)
                } else {
                    shadow.sync(&mut maps, &plan)
                };
                result.unwrap_or_else(|e| panic!("seed {seed} step {step}: {e:#}"));
                assert_eq!(
                    shadow.held(),
                    &maps.tables,
                    "the shadow is what the maps hold"
                );
                assert_tidy(&maps.tables);

                let mut fresh = ServiceTables::default();
                ServiceShadow::adopt(ServiceTables::default())
                    .sync(&mut fresh, &plan)
                    .unwrap();
                assert_eq!(
                    maps.tables.meaning(),
                    fresh.meaning(),
                    "seed {seed} step {step}: incremental differs from full"
                );
            }
        }
        assert!(partial > 2000, "{partial} partial syncs");
    }

    #[test]
    fn one_endpoint_change_rewrites_that_backends_slot_only() {
        let backends: Vec<Backend> = (0..10).map(backend).collect();
        let mut plan = ServicePlan::default();
        for n in 0..3 {
            plan.frontends
                .insert(key(n), frontend(n, backends.clone(), 0));
        }
        let mut maps = Watched::default();
        let mut shadow = ServiceShadow::adopt(ServiceTables::default());
        shadow.sync(&mut maps, &plan).unwrap();
        let id = shadow.held().frontends[&key(1)].id;
        let slot_of = |tables: &ServiceTables, b: &Backend| {
            tables
                .slots(id)
                .find(|(_, held)| *held == b)
                .map(|(k, _)| k.slot)
        };

        // Endpoint 4 of Service 1 replaced by a new pod: its slot, in place.
        let before = maps.tables.clone();
        let replaced = plan.frontends.get_mut(&key(1)).unwrap();
        replaced.backends[4] = backend(20);
        let writes = maps.writes;
        let sync = shadow.sync(&mut maps, &plan).unwrap();
        assert_eq!(maps.writes - writes, 1, "one write");
        assert_eq!(
            slot_of(&maps.tables, &backend(20)),
            slot_of(&before, &backend(4))
        );
        assert_eq!(
            sync.left,
            BTreeSet::from([(id, member(&backend(4)))]),
            "the flows to the replaced pod are purged, no others"
        );

        // Endpoint 2 removed: the last slot's backend moves into its slot,
        // the count shrinks, the last slot goes. Nothing else is written.
        let removed = plan.frontends.get_mut(&key(1)).unwrap();
        removed.backends.retain(|b| *b != backend(2));
        removed.entry.count = 9;
        let before = maps.tables.clone();
        let writes = maps.writes;
        let sync = shadow.sync(&mut maps, &plan).unwrap();
        assert_eq!(
            (
                sync.report.backends_written,
                sync.report.frontends_written,
                sync.report.backends_removed
            ),
            (1, 1, 1)
        );
        assert_eq!(maps.writes - writes, 3);
        for b in (0..10).filter(|&n| n != 2 && n != 4).map(backend) {
            let (was, is) = (slot_of(&before, &b), slot_of(&maps.tables, &b));
            assert!(
                was == is || was == Some(9),
                "{b:?} moved from {was:?} to {is:?}"
            );
        }

        // Endpoint added: one slot and the count.
        let added = plan.frontends.get_mut(&key(1)).unwrap();
        added.backends.push(backend(21));
        added.entry.count = 10;
        let writes = maps.writes;
        shadow.sync(&mut maps, &plan).unwrap();
        assert_eq!(maps.writes - writes, 2);
        assert_eq!(slot_of(&maps.tables, &backend(21)), Some(9));

        // Nothing changed: nothing written.
        let writes = maps.writes;
        let sync = shadow.sync(&mut maps, &plan).unwrap();
        assert_eq!((maps.writes, sync.report.changes()), (writes, 0));
    }

    #[test]
    fn undo_puts_back_what_the_maps_held_before_the_journal_began() {
        for seed in 1..=50u64 {
            let mut random = Random(seed);
            let mut plan = ServicePlan::default();
            let mut maps = Watched::default();
            let mut shadow = ServiceShadow::adopt(ServiceTables::default());
            for _ in 0..20 {
                let previous = plan.clone();
                change(&mut plan, &mut random);
                let before = maps.tables.clone();
                shadow.begin();
                shadow.sync(&mut maps, &plan).unwrap();
                if random.below(3) == 0 {
                    shadow.undo(&mut maps).unwrap();
                    assert_eq!(maps.tables, before, "seed {seed}");
                    assert_eq!(shadow.held(), &before);
                    plan = previous;
                }
            }
        }
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_and_clears_what_no_frontend_points_at() {
        let mut plan = ServicePlan::default();
        plan.frontends
            .insert(key(1), frontend(1, (0..3).map(backend).collect(), 0));
        let mut maps = Watched::default();
        ServiceShadow::adopt(ServiceTables::default())
            .sync(&mut maps, &plan)
            .unwrap();
        // A predecessor stopped midway: a backend of a frontend it had
        // already removed is left.
        let stray = BackendKey {
            service_id: 7,
            slot: 0,
        };
        maps.tables.backends.insert(stray, backend(5));
        let mut restarted = ServiceShadow::adopt(maps.tables.clone());
        let writes = maps.writes;
        let sync = restarted.sync(&mut maps, &plan).unwrap();
        assert_eq!(maps.writes - writes, 1, "the stray backend only");
        assert!(!maps.tables.backends.contains_key(&stray));
        assert_eq!(sync.left, BTreeSet::from([(7, member(&backend(5)))]));
    }

    #[test]
    fn stable_slots_keep_backends_in_place_and_fill_holes() {
        let b = backend;
        // New Service: the plan's order.
        assert_eq!(stable_slots(&[], &[b(1), b(2)]), [b(1), b(2)]);
        // b(2) replaced by b(9): same slot.
        assert_eq!(
            stable_slots(&[b(3), b(2), b(1)], &[b(1), b(3), b(9)]),
            [b(3), b(9), b(1)]
        );
        // b(3) removed: b(1) moves down from the last slot.
        assert_eq!(
            stable_slots(&[b(3), b(2), b(1)], &[b(1), b(2)]),
            [b(1), b(2)]
        );
        // Flags changed on a kept backend: same slot, new value.
        let mut local = b(1);
        local.flags ^= backend_flags::LOCAL;
        assert_eq!(stable_slots(&[b(2), b(1)], &[local, b(2)]), [b(2), local]);
    }
}
