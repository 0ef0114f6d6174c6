//! Connector high availability in the run loop: the prober's verdicts
//! turned into the datapath's connector group (edges) and into shared VTEP
//! addresses held on the cloud network (connectors).
//!
//! - Edge: before each apply the plan's [`CONNECTOR_GROUP`] gets the member
//!   the probes choose; between applies a change of health rewrites that
//!   one map entry at once (`react`), which is the whole failover.
//! - Connector: it holds its own VTEP address, and that of every dead
//!   connector whose first live successor it is. A dead connector's
//!   address is released only once it has answered for the hold-down and
//!   holds its address again (it answers ARP for it).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Instant,
};

use anyhow::Result;
use fabedge_common::CONNECTOR_GROUP;
use fabedge_common::GroupEntry;
use log::{debug, info, warn};
use serde::Serialize;

use super::HaOptions;
use crate::{
    ha::{
        liveness::LivenessConfig,
        probe::{ProbeConfig, Prober, Reaction},
        vtep,
    },
    maps::Maps,
    model::Role,
    plan::Plan,
};

/// Where the agent writes what `inspect peers` shows of connector health.
pub const HA_STATUS_FILE: &str = "ha-status.json";

pub struct HaRuntime {
    options: HaOptions,
    node: String,
    /// Started with the first plan that has something to probe.
    prober: Option<Prober>,
    role: Option<Role>,
    /// Edge: the connectors, preferred first, and their peer ids.
    order: Vec<String>,
    member_ids: BTreeMap<String, u16>,
    /// Edge: the connector the datapath sends to now.
    active: Option<String>,
    /// Connector: every connector and its VTEP address; the NIC they go on.
    connectors: Vec<(String, Option<Ipv4Addr>)>,
    vtep_iface: Option<String>,
    /// Connector: the VTEP addresses we hold, and whether a plan has been
    /// applied (we forward for our edges only after that).
    held: BTreeSet<Ipv4Addr>,
    /// Connector: asks who else holds an address we are about to give back.
    holder_check: Option<vtep::HolderCheck>,
    applied_once: bool,
    failovers: u64,
    status_path: PathBuf,
    last_status: Option<String>,
    /// Where the metrics read it.
    metrics: Option<std::sync::Arc<crate::observe::Status>>,
    /// The last failure logged: a failure that repeats on every tick is
    /// logged once, until another one (or success) replaces it.
    last_failure: Option<String>,
}

/// What `inspect peers` and the metrics read (`ha-status.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct HaStatus {
    /// Edge: the connector in use.
    pub active: Option<String>,
    /// Edge: the connectors, preferred first.
    pub order: Vec<String>,
    /// Connector: VTEP addresses held here.
    pub held_vteps: Vec<Ipv4Addr>,
    pub failovers: u64,
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub probes_missed: u64,
    pub targets: BTreeMap<String, TargetStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct TargetStatus {
    pub address: String,
    pub up: bool,
    /// Up for the hold-down: may take traffic back.
    pub stable: bool,
    /// Consecutive misses now.
    pub misses: u32,
    pub rtt_us: Option<u64>,
    /// Milliseconds since the last answer.
    pub last_answer_ms: Option<u64>,
    pub sent: u64,
    pub answered: u64,
    pub missed: u64,
}

impl HaStatus {
    pub fn read(state_dir: &std::path::Path) -> Option<HaStatus> {
        let bytes = std::fs::read(state_dir.join(HA_STATUS_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

impl HaRuntime {
    pub fn new(options: HaOptions, node: &str, state_dir: &std::path::Path) -> Self {
        HaRuntime {
            options,
            node: node.to_owned(),
            prober: None,
            role: None,
            order: Vec::new(),
            member_ids: BTreeMap::new(),
            active: None,
            connectors: Vec::new(),
            vtep_iface: None,
            held: BTreeSet::new(),
            holder_check: None,
            applied_once: false,
            failovers: 0,
            status_path: state_dir.join(HA_STATUS_FILE),
            last_status: None,
            metrics: None,
            last_failure: None,
        }
    }

    /// Publish health to the metrics endpoint too.
    pub fn with_metrics(mut self, status: std::sync::Arc<crate::observe::Status>) -> Self {
        self.metrics = Some(status);
        self
    }

    /// A counter that moves when a probed node goes up or down.
    pub fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.prober.as_ref().map(|p| p.changes())
    }

    /// Before apply: probe what the plan names, and put the member the
    /// probes choose into the plan's connector group. A restarted agent
    /// starts from the member the datapath uses (a previous agent's
    /// failover stands until its probes say otherwise).
    pub fn prepare(&mut self, plan: &mut Plan, maps: &Maps) -> Result<()> {
        self.role = Some(plan.role);
        self.set_targets(plan.ha.probe_targets.clone())?;
        self.connectors = plan
            .ha
            .connectors
            .iter()
            .map(|(n, a)| (n.clone(), *a))
            .collect();
        self.vtep_iface = plan.ha.vtep_iface.clone();
        self.order.clear();
        self.member_ids.clear();
        if let Some(group) = plan.groups.get_mut(&CONNECTOR_GROUP) {
            for id in group.members.iter().copied().take_while(|id| *id != 0) {
                if let Some(name) = plan.peer_ids.node(id) {
                    self.order.push(name.to_owned());
                    self.member_ids.insert(name.to_owned(), id);
                }
            }
            if self.active.is_none()
                && let Ok(current) = maps.group_entries()
                && let Some(entry) = current.get(&CONNECTOR_GROUP)
            {
                self.active = self
                    .member_ids
                    .iter()
                    .find(|(_, id)| **id == entry.active)
                    .map(|(name, _)| name.clone());
            }
            let choice = self.choose();
            if let Some(id) = choice.as_ref().and_then(|c| self.member_ids.get(c)) {
                group.active = *id;
            }
            if choice != self.active {
                if let (Some(old), Some(new)) = (&self.active, &choice) {
                    info!(
                        "{}: connector {new} replaces {old} (plan changed)",
                        self.node
                    );
                }
                self.active = choice;
            }
        } else {
            self.active = None;
        }
        Ok(())
    }

    /// After a successful apply: the datapath uses our choice (apply keeps
    /// a group's member while it is one), and we hold the VTEP addresses we must.
    pub fn applied(&mut self, maps: &mut Maps) {
        self.applied_once = true;
        self.install_reaction(maps);
        if let Some(id) = self
            .active
            .as_ref()
            .and_then(|a| self.member_ids.get(a))
            .copied()
            && maps
                .group_entries()
                .is_ok_and(|groups| groups.get(&CONNECTOR_GROUP).is_some_and(|g| g.active != id))
            && let Err(e) = maps.set_group_active(CONNECTOR_GROUP, id)
        {
            self.failed(format!(
                "{}: setting the connector group's member: {e:#}",
                self.node
            ));
        }
        self.sync_vteps();
        self.write_status();
    }

    /// Hand the prober thread what must not wait for this loop (which an
    /// apply or a slow netlink dump can keep busy for seconds): an edge's
    /// switch of its connector group (one map write), a connector's
    /// takeover of a dead connector's VTEP address. The loop still logs,
    /// counts and writes the same decisions (idempotently), and alone gives
    /// addresses back.
    fn install_reaction(&mut self, maps: &Maps) {
        if self.prober.is_none() {
            return;
        }
        let reaction = match (self.role, &self.vtep_iface) {
            (Some(Role::Edge), _) if !self.order.is_empty() => match maps.groups_handle() {
                Ok(groups) => Some(edge_reaction(
                    self.order.clone(),
                    self.member_ids.clone(),
                    groups,
                )),
                Err(e) => {
                    let message = format!(
                        "{}: the prober cannot switch connectors itself (the run loop will): {e:#}",
                        self.node
                    );
                    self.failed(message);
                    None
                }
            },
            (Some(Role::Connector), Some(iface)) => Some(connector_reaction(
                self.node.clone(),
                self.connectors.clone(),
                iface.clone(),
                self.held.clone(),
            )),
            _ => None,
        };
        if let Some(prober) = &self.prober {
            prober.set_reaction(reaction);
        }
    }

    /// Health changed (or time passed: hold-downs end without an event):
    /// move the edge's traffic with one map write, take over or give back
    /// VTEP addresses.
    pub fn react(&mut self, maps: &mut Maps) {
        if let Some(choice) = self.choose()
            && self.active.as_ref() != Some(&choice)
            && let Some(id) = self.member_ids.get(&choice).copied()
        {
            match maps.set_group_active(CONNECTOR_GROUP, id) {
                Ok(()) => {
                    let health = self
                        .prober
                        .as_ref()
                        .map(|p| p.snapshot())
                        .unwrap_or_default();
                    let why = match &self.active {
                        Some(old) if health.get(old).is_some_and(|t| !t.health.up) => {
                            format!("{old} missed {} probes", self.options.probe_misses)
                        }
                        Some(old) => format!(
                            "{choice} is back (answering for the hold-down), {old} was standing in"
                        ),
                        None => "first choice".to_owned(),
                    };
                    info!(
                        "{}: traffic through the connectors now goes to {choice}: {why}",
                        self.node
                    );
                    self.active = Some(choice);
                    self.failovers += 1;
                }
                Err(e) => self.failed(format!(
                    "{}: switching to connector {choice}: {e:#}",
                    self.node
                )),
            }
        }
        self.sync_vteps();
        self.write_status();
    }

    /// The VTEP addresses to remove on uninstall (this connector's NIC).
    pub fn release_all(iface: &str) -> Result<()> {
        for addr in vtep::held(iface)? {
            vtep::release(iface, addr)?;
        }
        Ok(())
    }

    fn set_targets(&mut self, targets: BTreeMap<String, SocketAddrV4>) -> Result<()> {
        match &self.prober {
            Some(prober) => prober.set_targets(targets),
            None if targets.is_empty() => {}
            None => {
                let config = ProbeConfig {
                    interval: self.options.probe_interval,
                    liveness: LivenessConfig {
                        misses: self.options.probe_misses,
                        hold_down: self.options.hold_down,
                    },
                    ..ProbeConfig::default()
                };
                let prober = Prober::start(config, targets)?;
                info!(
                    "{}: probing connectors every {:?} from {} ({} misses: dead; hold-down {:?})",
                    self.node,
                    self.options.probe_interval,
                    prober.local_addr(),
                    self.options.probe_misses,
                    self.options.hold_down
                );
                self.prober = Some(prober);
            }
        }
        Ok(())
    }

    fn choose(&self) -> Option<String> {
        if self.order.is_empty() {
            return None;
        }
        match &self.prober {
            Some(prober) => prober.choose(&self.order, self.active.as_deref()),
            None => self.order.first().cloned(),
        }
    }

    /// Connector: claim and release so that we hold exactly what we must.
    /// A connector that is up again is still "dead" for its address while
    /// we hold it and it has not answered for the hold-down: no ping-pong.
    fn sync_vteps(&mut self) {
        let (Some(Role::Connector), Some(iface)) = (self.role, self.vtep_iface.clone()) else {
            return;
        };
        if !self.applied_once {
            return;
        }
        // The prober thread may have taken an address over (its reaction)
        // before this loop saw the death: whatever of a connector's is on
        // the NIC under our label is ours to give back.
        if let Ok(on_nic) = vtep::held(&iface) {
            for addr in on_nic.difference(&self.held.clone()) {
                let Some((whose, _)) = self.connectors.iter().find(|(_, v)| *v == Some(*addr))
                else {
                    continue;
                };
                // Our own address is claimed (and announced) below.
                if *whose == self.node {
                    continue;
                }
                warn!(
                    "{}: connector {whose} is dead: took over its VTEP address {addr} on {iface} (gratuitous ARP sent by the prober)",
                    self.node
                );
                self.failovers += 1;
                self.held.insert(*addr);
            }
        }
        let health = self
            .prober
            .as_ref()
            .map(|p| p.snapshot())
            .unwrap_or_default();
        let alive: BTreeSet<String> = self
            .connectors
            .iter()
            .filter(|(name, vtep)| {
                let Some(target) = health.get(name) else {
                    return false;
                };
                let ours_now = vtep.is_some_and(|a| self.held.contains(&a));
                target.health.stable || (target.health.up && !ours_now)
            })
            .map(|(name, _)| name.clone())
            .collect();
        let borrowed: Vec<(&str, Option<Ipv4Addr>)> = self
            .connectors
            .iter()
            .map(|(n, a)| (n.as_str(), *a))
            .collect();
        let wanted = vtep::holders(&borrowed, &alive, &self.node);
        for addr in wanted.difference(&self.held.clone()) {
            let whose = self
                .connectors
                .iter()
                .find(|(_, a)| *a == Some(*addr))
                .map_or_else(|| "?".to_owned(), |(n, _)| n.clone());
            match vtep::claim(&iface, *addr) {
                Ok(()) => {
                    if whose == self.node {
                        info!("{}: holding its VTEP address {addr} on {iface}", self.node);
                    } else {
                        warn!(
                            "{}: connector {whose} is dead: took over its VTEP address {addr} on {iface} (gratuitous ARP sent)",
                            self.node
                        );
                        self.failovers += 1;
                    }
                    self.held.insert(*addr);
                }
                Err(e) => self.failed(format!(
                    "{}: claiming VTEP address {addr} of {whose}: {e:#}",
                    self.node
                )),
            }
        }
        for addr in self.held.clone().difference(&wanted) {
            // A connector that is back gets its address back once it holds
            // it again; an address no connector names any more goes at once.
            let owner = self
                .connectors
                .iter()
                .find(|(name, a)| *a == Some(*addr) && *name != self.node)
                .map(|(name, _)| name.clone());
            let why = match &owner {
                Some(owner) => match self.holds_again(&iface, *addr) {
                    Ok(Some(mac)) => format!(
                        "{owner} is back and holds it again ({})",
                        crate::model::format_mac(mac)
                    ),
                    Ok(None) => continue,
                    Err(e) => {
                        self.failed(format!(
                            "{}: checking whether {owner} holds VTEP address {addr} again: {e:#}",
                            self.node
                        ));
                        continue;
                    }
                },
                None => "no connector names it any more".to_owned(),
            };
            match vtep::release(&iface, *addr) {
                Ok(_) => {
                    info!("{}: gave VTEP address {addr} back: {why}", self.node);
                    self.held.remove(addr);
                    if let Some(check) = &mut self.holder_check {
                        check.forget(*addr);
                    }
                }
                Err(e) => self.failed(format!(
                    "{}: releasing VTEP address {addr}: {e:#}",
                    self.node
                )),
            }
        }
        // Nothing to hand back: stop listening to the network's ARP.
        if self.held.is_subset(&wanted) {
            self.holder_check = None;
        }
    }

    /// The MAC of the connector that holds `addr` again besides us, once it
    /// answers ARP for it; `None` while it does not (asked again each tick).
    fn holds_again(&mut self, iface: &str, addr: Ipv4Addr) -> Result<Option<[u8; 6]>> {
        if self.holder_check.is_none() {
            self.holder_check = Some(vtep::HolderCheck::open(iface)?);
        }
        let Some(check) = &mut self.holder_check else {
            return Ok(None);
        };
        let found = check.other_holder(addr)?;
        if found.is_none() {
            let message = format!(
                "{}: keeping VTEP address {addr} until its connector holds it again                  (it answers probes but not ARP for it yet)",
                self.node
            );
            if self.last_failure.as_deref() != Some(message.as_str()) {
                info!("{message}");
                self.last_failure = Some(message);
            }
        }
        Ok(found)
    }

    /// Log a failure once while it repeats.
    fn failed(&mut self, message: String) {
        if self.last_failure.as_deref() != Some(message.as_str()) {
            warn!("{message}");
            self.last_failure = Some(message);
        }
    }

    fn write_status(&mut self) {
        let Some(prober) = &self.prober else { return };
        let now = Instant::now();
        let stats = prober.stats();
        let targets: BTreeMap<String, TargetStatus> = prober
            .snapshot()
            .into_iter()
            .map(|(name, t)| {
                let h = t.health;
                let status = TargetStatus {
                    address: t.addr.to_string(),
                    up: h.up,
                    stable: h.stable,
                    misses: h.misses,
                    rtt_us: h.last_rtt.map(|d| d.as_micros() as u64),
                    last_answer_ms: h
                        .last_answer
                        .map(|a| now.duration_since(a).as_millis() as u64),
                    sent: h.sent,
                    answered: h.answered,
                    missed: h.missed,
                };
                (name, status)
            })
            .collect();
        let status = HaStatus {
            active: self.active.clone(),
            order: self.order.clone(),
            held_vteps: self.held.iter().copied().collect(),
            failovers: self.failovers,
            probes_sent: stats.sent,
            probes_answered: stats.answered,
            probes_missed: targets.values().map(|t| t.missed).sum(),
            targets,
        };
        // What changes on every probe (RTT, counts) is written at most as
        // often as the loop reacts; the file is for humans and metrics.
        if let Some(metrics) = &self.metrics {
            metrics.ha(status.clone());
        }
        let Ok(json) = serde_json::to_string_pretty(&status) else {
            return;
        };
        if self.last_status.as_deref() == Some(json.as_str()) {
            return;
        }
        if let Err(e) = crate::sys::write_if_changed(&self.status_path, json.as_bytes(), 0o644) {
            warn!("writing {}: {e:#}", self.status_path.display());
        }
        self.last_status = Some(json);
    }
}

/// Edge: on the prober thread, point the connector group at the member the
/// probes choose, if it is not that already (a failover is this one write).
fn edge_reaction(
    order: Vec<String>,
    ids: BTreeMap<String, u16>,
    mut groups: aya::maps::Array<aya::maps::MapData, GroupEntry>,
) -> Reaction {
    let index = u32::from(CONNECTOR_GROUP);
    Box::new(move |liveness, now| {
        let Ok(entry) = groups.get(&index, 0) else {
            return;
        };
        let current = ids
            .iter()
            .find(|(_, id)| **id == entry.active)
            .map(|(name, _)| name.as_str());
        let Some(id) = liveness
            .choose_at(&order, current, now)
            .and_then(|choice| ids.get(&choice).copied())
        else {
            return;
        };
        if id != entry.active && entry.has_member(id) {
            let switched = GroupEntry {
                active: id,
                ..entry
            };
            if let Err(e) = groups.set(index, switched, 0) {
                debug!("probes: switching the connector group to peer {id}: {e}");
            }
        }
    })
}

/// Connector: on the prober thread, take over the VTEP address of every
/// connector that is down and whose first live successor we are. Giving
/// addresses back waits for the run loop (it checks that the owner holds
/// its address again). `held`: what the run loop holds already.
fn connector_reaction(
    me: String,
    connectors: Vec<(String, Option<Ipv4Addr>)>,
    iface: String,
    held: BTreeSet<Ipv4Addr>,
) -> Reaction {
    let own = connectors
        .iter()
        .find(|(name, _)| *name == me)
        .and_then(|(_, addr)| *addr);
    let mut claimed = held;
    Box::new(move |liveness, now| {
        // Down by our probes; a connector we do not probe is not dead.
        let alive: BTreeSet<String> = connectors
            .iter()
            .filter(|(name, _)| liveness.health(name, now).is_none_or(|h| h.up))
            .map(|(name, _)| name.clone())
            .collect();
        let named: Vec<(&str, Option<Ipv4Addr>)> = connectors
            .iter()
            .map(|(name, addr)| (name.as_str(), *addr))
            .collect();
        let wanted = vtep::holders(&named, &alive, &me);
        claimed.retain(|addr| wanted.contains(addr));
        for addr in wanted {
            if Some(addr) == own || claimed.contains(&addr) {
                continue;
            }
            match vtep::claim(&iface, addr) {
                Ok(()) => {
                    claimed.insert(addr);
                }
                Err(e) => debug!("probes: taking over VTEP address {addr}: {e:#}"),
            }
        }
    })
}
