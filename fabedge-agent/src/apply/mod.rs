//! Make the node match a [`Plan`]: idempotent writers that diff desired
//! against actual, so a re-apply (or an agent restart) changes only what
//! differs and never flushes state that traffic depends on.
//!
//! Order matters for traffic in flight: devices before the maps that name
//! their ifindexes; peers before the routes that name them; routes before
//! the configuration that arms the programs; programs before the kernel
//! routes that steer traffic into them. Removal runs the other way round.

pub mod net;
pub mod rtnl;
pub mod sysctl;
pub mod xdp;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context, Result, bail};
use fabedge_common::{MAX_PEERS, MAX_ROUTES, POD_BRIDGE, PeerEntry, TUNNEL_DEV};
use log::{debug, info};

use crate::{
    datapath::{Attachment, Datapath, XdpMode},
    maps::Maps,
    model::format_mac,
    plan::{CNI_FILE_NAME, Device, Plan, Settings},
    sys,
    sys::write_if_changed,
};

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
}

impl ApplyReport {
    pub fn is_noop(&self) -> bool {
        *self == ApplyReport::default()
    }
}

/// Remembers what this process attached, so re-applies skip it.
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
}

impl Applier {
    pub fn with_xdp(xdp: XdpMode) -> Self {
        Applier {
            xdp,
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

    pub fn apply(
        &mut self,
        datapath: &mut Datapath,
        maps: &mut Maps,
        plan: &Plan,
        settings: &Settings,
    ) -> Result<ApplyReport> {
        check_capacity(plan)?;
        let mut report = ApplyReport::default();

        for device in &plan.devices {
            ensure_device(device)
                .with_context(|| format!("configuring device {}", device.name()))?;
        }
        for sysctl in &plan.sysctls {
            sysctl::set(self.state_dir.as_deref(), &sysctl.key, &sysctl.value)?;
        }

        // Maps: add and change first, remove after, arm last.
        let current_peers = read_peers(maps)?;
        for (&id, peer) in &plan.peers {
            if current_peers.get(&id) != Some(peer) {
                maps.set_peer(id, *peer)?;
                report.peers_written += 1;
            }
        }
        maps.sync_peer_addrs(&plan.peers)?;
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
        for id in current_peers
            .keys()
            .filter(|id| !plan.peers.contains_key(id))
        {
            maps.set_peer(*id, PeerEntry::default())?;
            report.peers_removed += 1;
        }
        report.service_changes =
            crate::services::apply::apply_services(maps, &plan.services)?.changes();
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

        // Programs.
        let wanted: BTreeSet<Attachment> = plan.attachments.iter().cloned().collect();
        let missing: Vec<Attachment> = wanted.difference(&self.attached).cloned().collect();
        for attachment in missing {
            datapath.attach(&attachment)?;
            self.attached.insert(attachment);
            report.attached += 1;
        }
        for stale in datapath
            .attached()?
            .into_iter()
            .filter(|a| !wanted.contains(a))
        {
            datapath.detach(&stale)?;
            self.attached.remove(&stale);
            report.detached += 1;
        }
        let xdp_ifaces = xdp::interfaces(plan, settings)?;
        if self.xdp_ifaces.as_ref() != Some(&xdp_ifaces) {
            datapath.sync_xdp(&xdp_ifaces, self.xdp)?;
            self.xdp_ifaces = Some(xdp_ifaces);
        }

        // The kernel's slow path.
        let installed = net::our_routes()?;
        for route in &plan.kernel_routes {
            if !installed.iter().any(|r| net::route_matches(route, r)) {
                net::replace_route(route)?;
                report.kernel_routes_written += 1;
            }
        }
        for route in installed
            .iter()
            .filter(|r| !plan.kernel_routes.iter().any(|p| p.dst == r.dst))
        {
            net::delete_route(route)?;
            report.kernel_routes_removed += 1;
        }

        if let Some(cni) = &plan.cni {
            write_if_changed(&cni.path, cni.json.as_bytes(), 0o644)?;
        }
        if !report.is_noop() {
            info!("applied plan for {}: {report:?}", plan.node);
        } else {
            debug!("plan for {} already applied", plan.node);
        }
        Ok(report)
    }
}

/// Refuse a plan the maps cannot hold before touching anything: a full map
/// must never leave half a configuration behind.
fn check_capacity(plan: &Plan) -> Result<()> {
    if plan.routes.len() > MAX_ROUTES as usize {
        bail!(
            "the plan has {} routes but FE_ROUTES holds {MAX_ROUTES}: nothing was applied; \
             reduce the number of nodes/prefixes or rebuild with a larger MAX_ROUTES",
            plan.routes.len()
        );
    }
    if let Some((&id, _)) = plan
        .peers
        .iter()
        .find(|(id, _)| **id == 0 || **id as u32 >= MAX_PEERS)
    {
        bail!("peer id {id} is outside FE_PEERS (1..{MAX_PEERS}): nothing was applied");
    }
    Ok(())
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
    removed.extend(crate::esp::apply::teardown()?);
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
