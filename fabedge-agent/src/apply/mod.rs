//! Make the node match a [`Plan`]: idempotent writers that diff desired
//! against actual, so a re-apply (or an agent restart) changes only what
//! differs and never flushes state that traffic depends on.
//!
//! Order matters for traffic in flight: devices before the maps that name
//! their ifindexes; programs (the uplink guards among them) before the maps
//! and kernel routes that steer traffic into them; peers before the groups
//! that list them, groups before the routes that name them; routes before
//! the configuration that arms the programs.
//! Removal runs the other way round.
//!
//! All or nothing: what can be checked is checked before the first write
//! ([`precheck`]: capacities, addresses, devices, routes we do not own), and
//! a step failing midway puts back what the node held ([`rollback`]). A
//! planned kernel route whose destination holds a route fabedge did not
//! create is left out and reported, never replaced.

pub mod failpoint;
pub mod net;
pub mod pod_ports;
pub mod pod_rx;
pub mod precheck;
mod rollback;
pub mod rtnl;
pub mod sysctl;
pub mod tunnel_table;
pub mod xdp;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context, Result};
use fabedge_common::{GroupEntry, MAX_PEERS, POD_BRIDGE, PeerEntry, TUNNEL_DEV};
use log::{debug, info, warn};

use crate::{
    datapath::{Attachment, Datapath, XdpMode},
    maps::Maps,
    model::{checks::Problem, format_mac},
    plan::{CNI_FILE_NAME, Device, KernelRoute, Plan, Settings, uplink_guards},
    sys,
    sys::write_if_changed,
};

/// The steps of an apply, in order: what failures and problems name, and
/// what [`failpoint`] injects failures after.
pub const STEPS: [&str; 10] = [
    "devices",
    "sysctls",
    "attachments",
    "peers",
    "routes",
    "services",
    "config",
    "xdp",
    "kernel-routes",
    "cni",
];

/// What one apply changed, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub routes_written: usize,
    pub routes_removed: usize,
    pub peers_written: usize,
    pub peers_removed: usize,
    pub kernel_routes_written: usize,
    pub kernel_routes_removed: usize,
    pub attached: usize,
    pub detached: usize,
    /// Frontends, backends and purged flows changed (see `services::ServiceReport`).
    pub service_changes: usize,
    /// `FE_GROUPS` entries written or cleared.
    pub groups_written: usize,
}

impl ApplyReport {
    pub fn is_noop(&self) -> bool {
        *self == ApplyReport::default()
    }
}

/// Applies plans all or nothing: everything checkable is checked before the
/// first write ([`precheck`]), and a step failing midway puts back what the
/// node held before ([`rollback`]). Remembers what this process attached, so
/// re-applies skip it, and the kernel routes it installed, so that one
/// deleted behind its back is restored ([`Applier::restore_routes`]).
#[derive(Default)]
pub struct Applier {
    attached: BTreeSet<Attachment>,
    /// Where the sysctls' former values are recorded (`sysctl::ORIGINALS_FILE`);
    /// `None`: not recorded (tests).
    state_dir: Option<std::path::PathBuf>,
    /// How `fe_xdp_uplink` is attached (`--xdp`).
    pub xdp: XdpMode,
    /// The interfaces XDP was last synced to.
    xdp_ifaces: Option<BTreeSet<String>>,
    /// The kernel routes the last successful apply installed.
    installed_routes: Option<Vec<KernelRoute>>,
    /// The tunnel table's prefixes the last successful apply installed.
    installed_tunnel_table: Option<BTreeSet<ipnet::Ipv4Net>>,
    /// Planned routes left out for a conflict, as of the last successful apply.
    conflicts: Vec<Problem>,
    /// Why the last apply failed (and was rolled back), if it did.
    failure: Option<Problem>,
    /// What `FE_SERVICES` and `FE_BACKENDS` hold, read from the kernel at
    /// the first apply and kept since (`None`: read it again).
    services: Option<crate::services::apply::ServiceShadow>,
    fail_point: failpoint::FailPoint,
}

impl Applier {
    pub fn with_xdp(xdp: XdpMode) -> Self {
        Applier {
            xdp,
            fail_point: failpoint::FailPoint::from_env(),
            ..Applier::default()
        }
    }

    /// An applier that also records each sysctl's former value in `state_dir`.
    pub fn recording_sysctls_in(self, state_dir: &Path) -> Applier {
        Applier {
            state_dir: Some(state_dir.to_owned()),
            ..self
        }
    }

    /// Tests only: fail every apply right after `step` (one of [`STEPS`])
    /// has written; `None` disarms.
    pub fn fail_after(&mut self, step: Option<&str>) {
        self.fail_point.step = step.map(str::to_owned);
    }

    /// What the operator should know about the applied state: planned routes
    /// left out for a conflict, and why the latest apply was rolled back.
    pub fn problems(&self) -> Vec<Problem> {
        self.conflicts
            .iter()
            .cloned()
            .chain(self.failure.clone())
            .collect()
    }

    /// Make the node match `plan`, all or nothing. On error the node holds
    /// what it held before (the previous plan), and [`Applier::problems`]
    /// names the step and the object that failed.
    pub fn apply(
        &mut self,
        datapath: &mut Datapath,
        maps: &mut Maps,
        plan: &Plan,
        settings: &Settings,
    ) -> Result<ApplyReport> {
        let checked = match precheck::HostFacts::observe()
            .and_then(|host| precheck::precheck(plan, &settings.capacity, &host))
        {
            Ok(checked) => checked,
            Err(e) => {
                self.failure = Some(Problem::new("apply (checks)", format!("{e:#}")));
                return Err(e);
            }
        };
        let before = match rollback::Before::record(self, datapath, maps, plan) {
            Ok(before) => before,
            Err(e) => {
                let e = e.context("reading the node's state before applying: nothing was applied");
                self.failure = Some(Problem::new("apply (checks)", format!("{e:#}")));
                return Err(e);
            }
        };
        if let Some(services) = &mut self.services {
            services.begin();
        }
        let mut step = STEPS[0];
        match self.write(datapath, maps, plan, settings, &checked, &mut step) {
            Ok(report) => {
                if let Some(services) = &mut self.services {
                    services.commit();
                }
                self.installed_routes = Some(checked.kernel_routes);
                self.installed_tunnel_table = Some(tunnel_table::wanted(&plan.kernel_routes));
                self.conflicts = checked.conflicts;
                self.failure = None;
                if !report.is_noop() {
                    info!("applied plan for {}: {report:?}", plan.node);
                } else {
                    debug!("plan for {} already applied", plan.node);
                }
                Ok(report)
            }
            Err(e) => {
                let rolled_back = before.restore(self, datapath, maps);
                let outcome = match &rolled_back {
                    Ok(()) => "rolled back to the last applied state".to_owned(),
                    Err(undo) => format!("rolling back failed too: {undo:#}"),
                };
                let e = e.context(format!("apply step {step} failed; {outcome}"));
                self.failure = Some(Problem::new(
                    format!("apply (step {step})"),
                    format!("{e:#}"),
                ));
                Err(e)
            }
        }
    }

    /// Write the Service frontends `keys` of `plan` (the rest of the node
    /// is as the last apply left it: an EndpointSlice change), all or
    /// nothing: on error the writes are taken back and the next full apply
    /// starts from what the maps hold.
    pub fn apply_services(
        &mut self,
        maps: &mut Maps,
        plan: &crate::services::plan::ServicePlan,
        keys: &BTreeSet<fabedge_common::services::ServiceKey>,
    ) -> Result<crate::services::apply::ServiceReport> {
        let Some(services) = &mut self.services else {
            anyhow::bail!("no full apply yet: the Service maps are not adopted");
        };
        services.begin();
        match services.apply_some(maps, plan, keys) {
            Ok(report) => {
                services.commit();
                Ok(report)
            }
            Err(e) => {
                let outcome = match services.undo(maps) {
                    Ok(()) => "taken back".to_owned(),
                    Err(undo) => {
                        // What the maps hold is unknown now: read it again.
                        self.services = None;
                        format!("taking them back failed too: {undo:#}")
                    }
                };
                Err(e.context(format!(
                    "writing the Service maps failed; the writes were {outcome}"
                )))
            }
        }
    }

    /// Every write of an apply; `step` follows along for the caller's
    /// error and rollback.
    fn write(
        &mut self,
        datapath: &mut Datapath,
        maps: &mut Maps,
        plan: &Plan,
        settings: &Settings,
        checked: &precheck::Checked,
        step: &mut &'static str,
    ) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        // The step just done may be made to fail (tests); else on to the next.
        let next = |step: &mut &'static str, fail_point: &failpoint::FailPoint| {
            fail_point.check(step)?;
            if let Some(i) = STEPS.iter().position(|s| s == step) {
                *step = STEPS[(i + 1).min(STEPS.len() - 1)];
            }
            Ok::<(), anyhow::Error>(())
        };

        for device in &plan.devices {
            ensure_device(device)
                .with_context(|| format!("configuring device {}", device.name()))?;
        }
        next(step, &self.fail_point)?;
        for sysctl in &plan.sysctls {
            sysctl::set(self.state_dir.as_deref(), &sysctl.key, &sysctl.value)?;
        }
        next(step, &self.fail_point)?;

        // Programs before any map or kernel route names a tunnel
        // destination, so the uplink guards hold from the first packet
        // (fail closed). Until the configuration is armed below, the other
        // programs pass everything.
        let uplinks = xdp::interfaces(plan, settings)?;
        let wanted: BTreeSet<Attachment> = plan
            .attachments
            .iter()
            .cloned()
            .chain(uplinks.iter().flat_map(|iface| uplink_guards(iface)))
            .collect();
        let missing: Vec<Attachment> = wanted.difference(&self.attached).cloned().collect();
        for attachment in missing {
            datapath.attach(&attachment)?;
            self.attached.insert(attachment);
            report.attached += 1;
        }
        next(step, &self.fail_point)?;

        // Maps: add and change first, remove after, arm last.
        let current_peers = read_peers(maps)?;
        for (&id, peer) in &plan.peers {
            if current_peers.get(&id) != Some(peer) {
                maps.set_peer(id, *peer)?;
                report.peers_written += 1;
            }
        }
        maps.sync_peer_addrs(&plan.peers, &plan.esp_senders)?;
        maps.set_vtep_addrs(&plan.vtep_addrs)?;
        // Groups before the routes that name them (a route naming a group
        // not written yet would drop as `drop_group_down`); groups no
        // longer planned stay until their routes are gone, below.
        let current_groups = maps.group_entries()?;
        let groups = keep_live_active(&plan.groups, &current_groups);
        let mut staged = current_groups.clone();
        staged.extend(groups.iter().map(|(&id, &g)| (id, g)));
        report.groups_written = maps.set_groups(&staged)?;
        next(step, &self.fail_point)?;
        let current_routes: BTreeMap<_, _> = maps.route_entries()?.into_iter().collect();
        for (&net, &entry) in &plan.routes {
            if current_routes.get(&net) != Some(&entry) {
                maps.set_route(net, entry)?;
                report.routes_written += 1;
            }
        }
        for net in current_routes
            .keys()
            .filter(|n| !plan.routes.contains_key(n))
        {
            maps.remove_route(*net)?;
            report.routes_removed += 1;
        }
        report.groups_written += maps.set_groups(&groups)?;
        for id in current_peers
            .keys()
            .filter(|id| !plan.peers.contains_key(id))
        {
            maps.set_peer(*id, PeerEntry::default())?;
            report.peers_removed += 1;
        }
        next(step, &self.fail_point)?;
        let services = match &mut self.services {
            Some(services) => services,
            None => self
                .services
                .insert(crate::services::apply::ServiceShadow::read(maps)?),
        };
        report.service_changes = services.apply(maps, &plan.services)?.changes();
        next(step, &self.fail_point)?;
        let mut config = plan.config;
        if plan
            .devices
            .iter()
            .any(|d| matches!(d, Device::VxlanTunnel { .. } | Device::XfrmTunnel { .. }))
        {
            config.tunnel_ifindex = sys::ifindex(TUNNEL_DEV)?;
        }
        if let Some(uplink) = &settings.uplink {
            config.uplink_ifindex = sys::ifindex(uplink)?;
        }
        if maps.config()? != config {
            maps.set_config(config)?;
        }
        next(step, &self.fail_point)?;

        // Programs no longer wanted.
        for stale in datapath
            .attached()?
            .into_iter()
            .filter(|a| !wanted.contains(a))
        {
            datapath.detach(&stale)?;
            self.attached.remove(&stale);
            report.detached += 1;
        }
        let xdp_ifaces = uplinks;
        if self.xdp_ifaces.as_ref() != Some(&xdp_ifaces) {
            datapath.sync_xdp(&xdp_ifaces, self.xdp)?;
            if self.xdp == XdpMode::Native {
                warn_veth_peers_without_xdp(&xdp_ifaces);
            }
            self.xdp_ifaces = Some(xdp_ifaces);
        }
        next(step, &self.fail_point)?;

        // The kernel's slow path: ours only. A planned route whose
        // destination holds a route we do not own was left out by the checks.
        let installed = net::our_routes()?;
        for route in &checked.kernel_routes {
            if !installed.iter().any(|r| net::route_matches(route, r)) {
                net::replace_route(route)?;
                report.kernel_routes_written += 1;
            }
        }
        for route in installed
            .iter()
            .filter(|r| !checked.kernel_routes.iter().any(|p| p.dst == r.dst))
        {
            net::delete_route(route)?;
            report.kernel_routes_removed += 1;
        }
        // Every tunnel route, the ones the main table could not take included.
        report.kernel_routes_written +=
            tunnel_table::sync(&tunnel_table::wanted(&plan.kernel_routes))?;
        next(step, &self.fail_point)?;

        if let Some(cni) = &plan.cni {
            write_if_changed(&cni.path, cni.json.as_bytes(), 0o644)?;
        }
        next(step, &self.fail_point)?;
        Ok(report)
    }

    /// Put back any kernel route of the last applied plan that was removed
    /// behind our back (`ip route del`, an interface flap). Called on every
    /// tick of the reconcile loop: one netlink dump when nothing is missing.
    /// Returns the routes restored; one whose destination now holds a route
    /// we do not own is left alone (the next apply reports the conflict).
    pub fn restore_routes(&mut self) -> Result<Vec<String>> {
        let Some(wanted) = self.installed_routes.clone() else {
            return Ok(Vec::new());
        };
        let mut restored = Vec::new();
        if let Some(table) = &self.installed_tunnel_table
            && tunnel_table::TunnelTable::read()?
                != (tunnel_table::TunnelTable {
                    prefixes: table.clone(),
                    rule: !table.is_empty(),
                })
        {
            tunnel_table::sync(table).context("restoring the tunnel routing table")?;
            restored.push(format!("routing table {}", tunnel_table::TABLE));
        }
        let installed = net::our_routes()?;
        let missing: Vec<&KernelRoute> = wanted
            .iter()
            .filter(|route| !installed.iter().any(|r| net::route_matches(route, r)))
            .collect();
        if missing.is_empty() {
            return Ok(restored);
        }
        let foreign = net::foreign_routes()?;
        for route in missing {
            let what = net::describe_route(route);
            if let Some(other) = foreign.get(&route.dst) {
                // Not ours to replace: from now on a conflict, like at apply.
                self.conflicts.push(Problem::new(
                    &what,
                    format!(
                        "was removed and {other}, which fabedge did not create, took its place: \
                         left alone"
                    ),
                ));
                if let Some(routes) = &mut self.installed_routes {
                    routes.retain(|r| r != route);
                }
                continue;
            }
            net::replace_route(route).with_context(|| format!("restoring {what}"))?;
            restored.push(what);
        }
        Ok(restored)
    }
}

/// The groups to write: the plan's, except that an existing group's
/// `active` stays what it is in the map while it is still a member (or 0,
/// none alive). The plan's
/// choice (its first member) is where a new group starts; after that the
/// run loop's probes own `active` (`Maps::set_group_active`), and a
/// re-apply for an unrelated change must not move the group's traffic
/// back to a member the probes found dead.
pub fn keep_live_active(
    planned: &BTreeMap<u16, GroupEntry>,
    current: &BTreeMap<u16, GroupEntry>,
) -> BTreeMap<u16, GroupEntry> {
    planned
        .iter()
        .map(|(&id, &group)| {
            let active = match current.get(&id) {
                // The group existed: its probes' verdict stands, "none
                // alive" (0) included, while it names a member still.
                Some(now)
                    if now.members[0] != 0 && (now.active == 0 || group.has_member(now.active)) =>
                {
                    now.active
                }
                _ => group.active,
            };
            (id, GroupEntry { active, ..group })
        })
        .collect()
}

fn read_peers(maps: &Maps) -> Result<BTreeMap<u16, PeerEntry>> {
    let mut peers = BTreeMap::new();
    for id in 1..MAX_PEERS as u16 {
        let peer = maps.peer(id)?;
        if peer.kind != 0 {
            peers.insert(id, peer);
        }
    }
    Ok(peers)
}

fn ensure_device(device: &Device) -> Result<()> {
    match device {
        Device::Bridge { name, address, mtu } => {
            net::ensure_bridge(name, *address, Some(*mtu as u32))
        }
        Device::VxlanTunnel {
            name,
            port,
            mac,
            mtu,
            local: _,
        } => net::ensure_vxlan_external(name, *port, &format_mac(*mac), *mtu as u32),
        Device::XfrmTunnel { name, if_id, mtu } => {
            crate::esp::apply::ensure_device(name, *if_id, *mtu as u32)
        }
    }
}

/// Everything outside bpffs that apply creates: our routes, `fe-tunnel`,
/// the pod bridge, the CNI config. Returns what was removed.
/// `uninstall --purge-state`: the agent's own files in its state dir (the
/// node key included: the node comes back with a new identity), and the dir
/// itself when nothing else is left in it. Other files are never touched.
pub fn purge_state(state_dir: &Path) -> Result<Vec<String>> {
    let ours = [
        crate::plan::PEER_IDS_FILE,
        crate::esp::keys::KEY_FILE,
        crate::esp::run::OBSERVED_FILE,
        crate::esp::run::ROTATE_REQUEST,
        crate::esp::hellos::SENT_FILE,
        crate::esp::hellos::RECEIVED_FILE,
        crate::esp::apply::GENERATION_FILE,
        crate::source::last_good::FILE_NAME,
        crate::run::problems::FILE_NAME,
        crate::run::handover::LOCK_FILE,
        sysctl::ORIGINALS_FILE,
    ];
    let mut removed = Vec::new();
    for name in ours {
        let path = state_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => removed.push(format!("file {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    if fs::remove_dir(state_dir).is_ok() {
        removed.push(format!("directory {}", state_dir.display()));
    }
    Ok(removed)
}

pub fn teardown(cni_conf_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for route in net::our_routes()? {
        net::delete_route(&route)?;
        removed.push(format!("route {}", route.dst));
    }
    removed.extend(tunnel_table::teardown()?);
    removed.extend(crate::esp::apply::teardown()?);
    removed.extend(crate::ha::vtep::release_everywhere()?);
    for dev in [TUNNEL_DEV, POD_BRIDGE] {
        if net::delete_link_if_present(dev)? {
            removed.push(format!("device {dev}"));
        }
    }
    let cni = cni_conf_dir.join(CNI_FILE_NAME);
    if cni.exists() {
        fs::remove_file(&cni).with_context(|| format!("removing {}", cni.display()))?;
        removed.push(format!("file {}", cni.display()));
    }
    Ok(removed)
}

/// Once per change of the XDP interfaces: a native XDP uplink that is a veth
/// whose peer runs no XDP program loses what XDP sends out of it
/// ([`net::veth_peer_without_xdp`]).
fn warn_veth_peers_without_xdp(ifaces: &BTreeSet<String>) {
    for iface in ifaces {
        match net::veth_peer_without_xdp(iface) {
            Ok(Some(peer)) => warn!(
                "{iface} is a veth whose peer {peer} runs no XDP program: what XDP bounces out of \
                 {iface} (XDP_TX: the edge-to-edge hairpin, probe replies) waits on {peer}'s ring \
                 without waking it and is lost when the ring fills (ethtool -S {iface}: \
                 rx_queue_0_xdp_tx_errors). Attach an XDP program to {peer} (one that passes \
                 every frame will do), or run with --xdp generic or --xdp off"
            ),
            Ok(None) => {}
            Err(e) => debug!("{iface}: could not tell whether its veth peer runs XDP: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fabedge_common::GroupEntry;

    use super::keep_live_active;

    fn group(active: u16, members: &[u16]) -> GroupEntry {
        GroupEntry::new(active, members)
    }

    #[test]
    fn a_reapply_keeps_the_member_the_probes_chose_while_it_is_still_a_member() {
        let planned = BTreeMap::from([(1, group(3, &[3, 5])), (2, group(7, &[7]))]);
        // Group 1 failed over to 5; group 2 is new.
        let current = BTreeMap::from([(1, group(5, &[3, 5]))]);
        assert_eq!(
            keep_live_active(&planned, &current),
            BTreeMap::from([(1, group(5, &[3, 5])), (2, group(7, &[7]))])
        );
        // 5 left the group: the plan's choice.
        let planned = BTreeMap::from([(1, group(3, &[3, 9]))]);
        assert_eq!(keep_live_active(&planned, &current), planned);
        // None alive (0) stands too: the plan does not know better.
        let current = BTreeMap::from([(1, group(0, &[3, 9]))]);
        assert_eq!(
            keep_live_active(&planned, &current),
            BTreeMap::from([(1, group(0, &[3, 9]))])
        );
    }
}
